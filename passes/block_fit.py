"""Block reconstruction: fit each block of a compressed model, through its nonlinearities, to the
original model's block outputs (label-free, on the calibration images).

Layer-wise least squares (He et al. 2017, ``passes.prune``) refits one linear map at a time:
the consumer of a pruned group. What the removed channels carried can then only be recovered
linearly from the kept channels of that one layer; the layers before it (an inverted residual
block's expansion and depthwise convs, a Fire module's squeeze conv) keep their original
filters, although a change to them, passed through the ReLU between, could recover more.
Here every block's Conv/Gemm weights and biases are fitted jointly:

    min_θ  Σ_n ‖ f_θ(x_n^cur) − f^orig(x_n^orig) ‖² / Σ_n ‖ f^orig(x_n^orig) ‖²

``f_θ`` is the block of the compressed model, ``x^cur`` its input in the compressed model (the
blocks before it already fitted), ``f^orig`` and ``x^orig`` the original's: asymmetric, as in
He et al. 2017, so each block also absorbs the drift of the blocks before it. This is the
block reconstruction of post-training quantization (BRECQ, Li et al. 2021, ICLR) applied to the
weights a pruning pass left; no labels, no end-to-end training.

Blocks are the stretches of the graph between *cuts*: tensors that every path from the input to
the output passes through (in node order, the only tensor live after a node). They are a
residual block's output, a Fire module's Concat, a chain's every activation. A cut is used only
where the original model has the same tensor with the same shape, so a pruned chain's blocks
merge into one stretch from one unpruned tensor to the next. Consecutive blocks are fitted
together (``span``): by default all those of one spatial size, a stage, so that a stretch's
later layers are fitted to what its earlier ones give rather than to an intermediate target
the pruned model may not reach (measured: ResNet-56 `prune` 2x loses 1.04 points with stages
against 1.55 block by block, MobileNetV2 `prune` 1.3x 2.86 against 4.29). The stretch that ends
at a classifier's logits is fitted on the KL divergence of the class distributions
(``_Objective``).

Solver: Adam (Kingma & Ba 2015) on minibatches of images, each layer's step size a fixed
fraction of its weights' RMS, decayed on a cosine to zero. Every ``check_every`` steps the loss is measured on held-out calibration images; the
parameters kept are the best held out, the starting point (the least-squares solution)
included, so no block ends worse on them than the pass left it. The gradients come from PyTorch
(an optional dependency, ``pip install onnxopt[reconstruct]``): the block's ONNX nodes are run
by a small interpreter of the ops CNNs use (``BLOCK_OPS``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from onnxopt.errors import UserError

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the optional dependency; ``require_torch`` says what to do
    torch = None

BLOCK_OPS = {"Conv", "Gemm", "MatMul", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
             "Add", "Sub", "Mul", "Div", "Concat", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
             "Flatten", "Reshape", "Gather", "Slice", "Pad", "Identity", "Dropout", "Softmax", "Transpose",
             "Squeeze", "Unsqueeze"}
TRAINABLE_OPS = {"Conv", "Gemm"}


def require_torch() -> None:
    if torch is None:
        raise UserError("--reconstruct block needs PyTorch: pip install 'onnxopt[reconstruct]' (or torch), "
                        "or use --reconstruct ls")


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _explicit_pad(x, pads: list[int], value: float):
    """Explicit ONNX pads [x1_begin, x2_begin, ..., x1_end, x2_end] applied with F.pad."""
    half = len(pads) // 2
    torch_pads = []
    for axis in reversed(range(half)):
        torch_pads += [pads[axis], pads[axis + half]]
    return F.pad(x, torch_pads, value=value) if any(pads) else x


class OnnxBlock(torch.nn.Module if torch is not None else object):
    """The ONNX nodes from ``inputs`` to ``outputs`` run in PyTorch; the weights and biases of its
    Conv/Gemm nodes are parameters (trainable when ``trainable``)."""

    def __init__(self, nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], inputs: list[str],
                 outputs: list[str], trainable: bool):
        super().__init__()
        nodes, constants = _fold_constants(nodes, constants)
        self.nodes, self.inputs, self.outputs = nodes, inputs, outputs
        self.trained: dict[str, torch.nn.Parameter] = {}
        self.constants: dict[str, torch.Tensor] = {}
        for node in nodes:
            if node.op_type not in BLOCK_OPS:
                raise UserError(f"--reconstruct block cannot run op {node.op_type} (node {node.name!r}); "
                                f"use --reconstruct ls")
            for position, name in enumerate(node.input):
                if name not in constants or name in self.constants or name in self.trained:
                    continue
                value = _layout(torch.from_numpy(np.array(constants[name])))
                if node.op_type in TRAINABLE_OPS and position in (1, 2) and value.dtype == torch.float32:
                    self.trained[name] = torch.nn.Parameter(value.clone(), requires_grad=trainable)
                else:
                    self.constants[name] = value
        self.params = torch.nn.ParameterList(self.trained.values())

    def forward(self, *xs):
        env = dict(zip(self.inputs, xs))
        for node in self.nodes:
            args = [self._value(env, name) for name in node.input]
            results = _run(node, args)
            env.update(zip(node.output, results))
        return tuple(env[name] for name in self.outputs)

    def _value(self, env, name: str):
        if name == "":
            return None
        if name in env:
            return env[name]
        if name in self.trained:
            return self.trained[name]
        return self.constants[name]

    def param_groups(self, relative_lr: float) -> list[dict]:
        """One Adam group per Conv/Gemm node: step size ``relative_lr`` times the RMS of its weight,
        for its weight and bias alike (a late 1x1 conv over 960 channels has weights ten times
        smaller than the stem's; one absolute step size overfits it or leaves the stem unmoved)."""
        groups, grouped = [], set()
        for node in self.nodes:
            names = [n for n in node.input[1:3] if n in self.trained and n not in grouped]
            if node.op_type in TRAINABLE_OPS and names:
                scale = float(self.trained[names[0]].detach().pow(2).mean().sqrt()) or 1.0
                groups.append({"params": [self.trained[n] for n in names], "lr": relative_lr * scale})
                grouped.update(names)
        return groups

    def weights(self) -> dict[str, np.ndarray]:
        return {name: p.detach().numpy().copy() for name, p in self.trained.items()}

    def load(self, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for name, value in weights.items():
                self.trained[name].copy_(_layout(torch.from_numpy(value)))


def _fold_constants(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray]) -> tuple[list[onnx.NodeProto], dict]:
    """Nodes that read only constants (shape arithmetic, e.g. the pads an exporter computes for a
    ResNet's option-A shortcut with ConstantOfShape, Slice, Transpose, Cast) evaluated once by
    onnx's reference implementation; the rest, and the constants with the folded values."""
    from onnx.reference import ReferenceEvaluator

    constants, kept = dict(constants), []
    for node in nodes:
        if node.op_type not in TRAINABLE_OPS and all(not name or name in constants for name in node.input):
            values = ReferenceEvaluator(node).run(None, {name: constants[name] for name in node.input if name})
            constants.update((name, np.asarray(value)) for name, value in zip(node.output, values) if name)
        else:
            kept.append(node)
    return kept, constants


def _layout(tensor):
    """4-D tensors channels-last: PyTorch's CPU (oneDNN) convolutions, depthwise ones above all,
    run about twice as fast on it (measured: MobileNetV2's second block, forward + backward)."""
    return tensor.contiguous(memory_format=torch.channels_last) if tensor.dim() == 4 else tensor


def _ints(value) -> list[int]:
    return [int(v) for v in value.tolist()]


def _run(node: onnx.NodeProto, args: list) -> list:
    op, a = node.op_type, _attrs(node)
    x = args[0] if args else None
    if op == "Conv":
        spatial = x.dim() - 2
        if spatial != 2:
            raise UserError(f"--reconstruct block runs 2-D convolutions only (node {node.name!r}); use --reconstruct ls")
        pads = list(a.get("pads", [0] * 2 * spatial))
        if pads[:spatial] == pads[spatial:]:
            padding, xp = pads[:spatial], x
        else:
            padding, xp = 0, _explicit_pad(x, pads, 0.0)
        return [F.conv2d(xp, args[1], args[2] if len(args) > 2 else None, stride=list(a.get("strides", [1, 1])),
                         padding=padding, dilation=list(a.get("dilations", [1, 1])), groups=a.get("group", 1))]
    if op == "Gemm":
        A = x.t() if a.get("transA", 0) else x
        B = args[1].t() if a.get("transB", 0) else args[1]
        y = a.get("alpha", 1.0) * (A @ B)
        return [y + a.get("beta", 1.0) * args[2] if len(args) > 2 and args[2] is not None else y]
    if op == "MatMul":
        return [x @ args[1]]
    if op == "Relu":
        return [F.relu(x)]
    if op == "Clip":
        low = args[1] if len(args) > 1 and args[1] is not None else a.get("min")
        high = args[2] if len(args) > 2 and args[2] is not None else a.get("max")
        return [torch.clamp(x, None if low is None else float(low), None if high is None else float(high))]
    if op == "LeakyRelu":
        return [F.leaky_relu(x, a.get("alpha", 0.01))]
    if op == "Sigmoid":
        return [torch.sigmoid(x)]
    if op == "Tanh":
        return [torch.tanh(x)]
    if op == "HardSigmoid":
        return [torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)]
    if op == "HardSwish":
        return [F.hardswish(x)]
    if op in ("Add", "Sub", "Mul", "Div"):
        return [{"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[op](x, args[1])]
    if op == "Concat":
        return [torch.cat(args, dim=a["axis"])]
    if op in ("MaxPool", "AveragePool"):
        kernel = list(a["kernel_shape"])
        pads = list(a.get("pads", [0] * 2 * len(kernel)))
        strides = list(a.get("strides", [1] * len(kernel)))
        ceil = bool(a.get("ceil_mode", 0))
        if op == "MaxPool":
            return [F.max_pool2d(_explicit_pad(x, pads, -math.inf), kernel, strides, ceil_mode=ceil,
                                 dilation=list(a.get("dilations", [1] * len(kernel))))]
        if any(pads) and not a.get("count_include_pad", 0):
            if pads[:len(kernel)] != pads[len(kernel):]:
                raise UserError(f"--reconstruct block: asymmetric AveragePool pads (node {node.name!r}); use --reconstruct ls")
            return [F.avg_pool2d(x, kernel, strides, padding=pads[:len(kernel)], ceil_mode=ceil, count_include_pad=False)]
        return [F.avg_pool2d(_explicit_pad(x, pads, 0.0), kernel, strides, ceil_mode=ceil)]
    if op == "GlobalAveragePool":
        return [x.mean(dim=tuple(range(2, x.dim())), keepdim=True)]
    if op == "GlobalMaxPool":
        return [x.amax(dim=tuple(range(2, x.dim())), keepdim=True)]
    if op == "Flatten":
        axis = a.get("axis", 1) % x.dim() if x.dim() else 0
        return [x.reshape(int(np.prod(x.shape[:axis])), -1)]
    if op == "Reshape":
        shape = _ints(args[1])
        shape = [x.shape[i] if s == 0 and not a.get("allowzero", 0) else s for i, s in enumerate(shape)]
        return [x.reshape(shape)]
    if op == "Gather":
        return [torch.index_select(x, a.get("axis", 0), args[1].reshape(-1).long()).reshape(
            *x.shape[:a.get("axis", 0)], *args[1].shape, *x.shape[a.get("axis", 0) + 1:])]
    if op == "Slice":
        starts, ends = _ints(args[1]), _ints(args[2])
        axes = _ints(args[3]) if len(args) > 3 and args[3] is not None else list(range(len(starts)))
        steps = _ints(args[4]) if len(args) > 4 and args[4] is not None else [1] * len(starts)
        index = [slice(None)] * x.dim()
        for start, end, axis, step in zip(starts, ends, axes, steps):
            if step < 0:
                raise UserError(f"--reconstruct block: Slice with a negative step (node {node.name!r}); use --reconstruct ls")
            size = x.shape[axis]
            index[axis] = slice(max(min(start, size), -size), max(min(end, size), -size - 1), step)
        return [x[tuple(index)]]
    if op == "Pad":
        if a.get("mode", b"constant") not in (b"constant", "constant"):
            raise UserError(f"--reconstruct block: Pad mode {a['mode']} (node {node.name!r}); use --reconstruct ls")
        pads = _ints(args[1])
        value = float(args[2]) if len(args) > 2 and args[2] is not None and args[2].numel() else 0.0
        return [_explicit_pad(x, pads, value)]
    if op in ("Identity", "Dropout"):
        return [x] + ([torch.ones_like(x, dtype=torch.bool)] if len(node.output) > 1 else [])
    if op == "Softmax":
        return [torch.softmax(x, dim=a.get("axis", -1))]
    if op == "Transpose":
        return [x.permute(*a.get("perm", list(reversed(range(x.dim())))))]
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints(args[1]) if len(args) > 1 and args[1] is not None else list(a.get("axes", []))
        if op == "Squeeze":
            axes = axes or [i for i, s in enumerate(x.shape) if s == 1]
            for axis in sorted((ax % x.dim() for ax in axes), reverse=True):
                x = x.squeeze(axis)
            return [x]
        rank = x.dim() + len(axes)
        for axis in sorted(ax % rank for ax in axes):
            x = x.unsqueeze(axis)
        return [x]
    raise AssertionError(op)


def cuts(model: onnx.ModelProto) -> list[str]:
    """The tensors every path from the graph's inputs to its outputs passes through, in order:
    after a node, the only tensor still to be read (not a graph output), constants and what is
    computed from them alone aside."""
    graph = model.graph
    constants = {init.name for init in graph.initializer}
    for node in graph.node:     # computed from constants only (shape arithmetic): constants too, never live
        if all(not name or name in constants for name in node.input):
            constants.update(node.output)
    last_use: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in constants:
                last_use[name] = position
    outputs = {o.name for o in graph.output}
    live = {i.name for i in graph.input if i.name not in constants}
    found = []
    for position, node in enumerate(graph.node):
        live |= {name for name in node.output if name}
        live = {name for name in live if last_use.get(name, -1) > position or name in outputs}
        if len(live) == 1 and not live & outputs and live != set(found[-1:]):
            found.append(next(iter(live)))
    return found


def tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple]:
    """Every tensor's inferred shape (a symbolic dim as its name)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims)
    return shapes


def _stretch(model: onnx.ModelProto, start: list[str], end: list[str]) -> list[onnx.NodeProto]:
    """The nodes that compute ``end`` from ``start`` (and constants), in graph order."""
    producer = {name: node for node in model.graph.node for name in node.output}
    needed, stack = set(), list(end)
    while stack:
        name = stack.pop()
        if name in start or name not in producer:
            continue
        node = producer[name]
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack.extend(n for n in node.input if n)
    return [node for node in model.graph.node if id(node) in needed]


def graph_inputs(model: onnx.ModelProto) -> list[str]:
    return [i.name for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]


def block_ends(original: onnx.ModelProto, compressed: onnx.ModelProto, span: int | str = 1) -> list[list[str]]:
    """The blocks' outputs, in order: the cuts of ``compressed`` that ``original`` has with the same
    shape (the batch dim aside), each moved past the parameter-free ops after it (a residual
    block ends after the ReLU that follows its Add); last, the graph's outputs. With ``span`` > 1,
    only every ``span``-th of them: that many consecutive blocks are fitted as one. With
    ``span == "stage"``, only the last of each stage: the ends with the same spatial size (a
    pooled end, without spatial size, stays in the stage before it)."""
    original_shapes, compressed_shapes = tensor_shapes(original), tensor_shapes(compressed)
    candidates = [name for name in cuts(compressed)
                  if name in original_shapes and original_shapes[name][1:] == compressed_shapes.get(name, ())[1:]]
    outputs, ends = [o.name for o in compressed.graph.output], []
    for position, name in enumerate(candidates):
        following = candidates[position + 1] if position + 1 < len(candidates) else None
        rest = _stretch(compressed, [name], [following] if following else outputs)
        if any(node.op_type in TRAINABLE_OPS for node in rest):
            ends.append([name])
    if span == "stage":
        sizes = []
        for (name,) in ends:
            spatial = original_shapes[name][2:]
            sizes.append(spatial if any(d != 1 for d in spatial) or not sizes else sizes[-1])
        sizes.append(None)
        return [end for end, size, following in zip(ends, sizes, sizes[1:]) if size != following] + [outputs]
    return ends[span - 1::span] + [outputs]


@dataclass
class BlockFit:
    """What fitting one block did."""
    output: str
    nodes: int
    parameters: int
    loss: str                 # _Objective: "relative_l2", or "kl" for a classifier's logits
    loss_before: float        # on the held-out images
    loss_after: float
    steps: int
    seconds: float


@dataclass
class BlockFitOptions:
    steps: int = 300            # Adam steps per fitted stretch
    span: int | str = "stage"   # block_ends: the blocks of one spatial size fitted as one, or so many
    batch: int = 16             # images per step
    lr: float = 1e-2            # relative: per Conv/Gemm, times the RMS of its weight (OnnxBlock.param_groups)
    check_every: int = 50
    holdout_fraction: float = 0.125
    seed: int = 0
    threads: int = 0


@dataclass
class _Data:
    """Per-image activations, one tensor per block input (the first axis the images)."""
    tensors: list

    def take(self, index):
        return [t[index] for t in self.tensors]


def _apply(block: OnnxBlock, data: _Data, batch: int) -> _Data:
    outs = []
    with torch.no_grad():
        for start in range(0, len(data.tensors[0]), batch):
            outs.append(block(*data.take(slice(start, start + batch))))
    return _Data([torch.cat([o[i] for o in outs]) for i in range(len(block.outputs))])


class _Objective:
    """What a block's fit minimises, per image: the squared error relative to the targets' mean
    energy; for the block that ends at a classifier's logits (the graph's one output, shaped
    (N, classes)) the KL divergence ``KL(softmax t ‖ softmax y)`` of the original's class
    distribution from the fitted one, as in distillation (Hinton et al. 2015), since squared
    error weighs what top-1 ignores: SqueezeNet's logits (a ReLU's average) share a large
    positive part, and 1% relative error there moved the top-1 class on a third of the photos."""

    def __init__(self, targets: _Data, train, classifier: bool):
        self.kind = "kl" if classifier else "relative_l2"
        self.energy = 1.0 if classifier else sum(float((t[train] ** 2).sum()) for t in targets.tensors) / len(train)

    def summed(self, outputs, targets):
        """The loss summed over the images of a minibatch (a tensor, for gradients)."""
        if self.kind == "kl":
            (y,), (t,) = outputs, targets
            return F.kl_div(F.log_softmax(y, 1), F.log_softmax(t, 1), log_target=True, reduction="sum")
        return sum(((y - t) ** 2).sum() for y, t in zip(outputs, targets)) / self.energy

    def held_out(self, block: OnnxBlock, inputs: _Data, targets: _Data, index, batch: int) -> float:
        """The mean loss per image on ``index``."""
        with torch.no_grad():
            total = sum(float(self.summed(block(*inputs.take(part)), targets.take(part)))
                        for part in (index[start:start + batch] for start in range(0, len(index), batch)))
        return total / max(len(index), 1)


def _is_logits(block: OnnxBlock, targets: _Data, graph_outputs: list[str]) -> bool:
    return block.outputs == graph_outputs and len(targets.tensors) == 1 and targets.tensors[0].dim() == 2 \
        and targets.tensors[0].shape[1] > 1


def _fit(block: OnnxBlock, inputs: _Data, targets: _Data, train, held, objective: _Objective, options: BlockFitOptions,
         generator: np.random.Generator) -> tuple[float, float]:
    best = (objective.held_out(block, inputs, targets, held, options.batch), block.weights())
    before = best[0]
    optimizer = torch.optim.Adam(block.param_groups(options.lr))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, options.steps)
    for step in range(1, options.steps + 1):
        part = generator.choice(train, size=min(options.batch, len(train)), replace=False)
        loss = objective.summed(block(*inputs.take(part)), targets.take(part)) / len(part)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % options.check_every == 0 or step == options.steps:
            error = objective.held_out(block, inputs, targets, held, options.batch)
            if error < best[0]:
                best = (error, block.weights())
    block.load(best[1])
    return before, best[0]


def reconstruct_blocks(original: onnx.ModelProto, compressed: onnx.ModelProto,
                       samples: dict[str, np.ndarray], options: BlockFitOptions | None = None,
                       progress: Callable[[str, int, int], None] | None = None) -> tuple[onnx.ModelProto, list[BlockFit]]:
    """Fit the blocks of ``compressed`` to those of ``original`` (the graph it was made from: the
    same tensor names) on ``samples`` (input name -> array, images on the first axis); returns
    the model with the fitted weights and what each block's fit did."""
    require_torch()
    options = options or BlockFitOptions()
    if options.threads:
        torch.set_num_threads(options.threads)
    torch.manual_seed(options.seed)
    generator = np.random.default_rng(options.seed)
    inputs = graph_inputs(compressed)
    boundaries = block_ends(original, compressed, options.span)
    graph_outputs = boundaries[-1]
    original_constants = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    compressed_constants = {t.name: numpy_helper.to_array(t) for t in compressed.graph.initializer}

    count = len(next(iter(samples.values())))
    order = generator.permutation(count)
    held_count = max(1, int(round(count * options.holdout_fraction)))
    held, train = np.sort(order[:held_count]), np.sort(order[held_count:])
    x_orig = x_cur = _Data([_layout(torch.from_numpy(np.ascontiguousarray(samples[name], dtype=np.float32))) for name in inputs])
    start, drifted, fitted, fits = inputs, False, {}, []
    for number, end in enumerate(boundaries, 1):
        if progress:
            progress("block reconstruction", number, len(boundaries))
        original_block = OnnxBlock(_stretch(original, start, end), original_constants, start, end, trainable=False)
        nodes = _stretch(compressed, start, end)
        block = OnnxBlock(nodes, compressed_constants, start, end, trainable=True)
        y_orig = _apply(original_block, x_orig, options.batch)
        changed = drifted or len(nodes) != len(original_block.nodes) or any(
            name not in original_constants or original_constants[name].shape != value.shape
            or not np.array_equal(original_constants[name], value)
            for name, value in ((n, compressed_constants[n]) for n in block.trained))
        if changed and block.trained:
            t0 = time.perf_counter()
            objective = _Objective(y_orig, train, _is_logits(block, y_orig, graph_outputs))
            before, after = _fit(block, x_cur, y_orig, train, held, objective, options, generator)
            fitted.update(block.weights())
            fits.append(BlockFit(end[0], len(nodes), sum(p.numel() for p in block.params), objective.kind, before, after,
                                 options.steps, time.perf_counter() - t0))
        x_cur = _apply(block, x_cur, options.batch) if changed else y_orig    # unchanged, on the same inputs
        x_orig, start, drifted = y_orig, end, drifted or changed
    result = onnx.ModelProto()
    result.CopyFrom(compressed)
    for tensor in result.graph.initializer:
        if tensor.name in fitted:
            tensor.CopyFrom(numpy_helper.from_array(fitted[tensor.name].astype(np.float32), tensor.name))
    return result, fits
