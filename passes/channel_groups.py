"""Channel groups: which channels of which tensors must be pruned together, and the rewrite.

Modelled on Torch-Pruning's dependency graph (STYLE.md §4), for ONNX (ALGORITHMS.md §0
"Channel propagation"). A *channel space* is a set of tensors whose channel axis is indexed
the same way: a Conv/Gemm output and everything that reaches it through ops that map channel
``i`` to channel ``i``:

* pass-through ops: Relu, Clip, LeakyRelu, PRelu and other unary activations, pools,
  BatchNormalization (params sliced), Mul/Add/Sub/Div with a scalar or per-channel constant
  (constant sliced), Resize, Identity, Dropout, Slice/Pad on spatial axes only;
* depthwise Conv (``group == C``, one filter per channel): keeps ``W[S]``, ``group = |S|``;
* residual ``Add`` of two activations: both operands and the sum are one space, so every
  producer feeding it is pruned alike (or, if any member cannot be, none is).

``Concat`` on axis 1 makes a *composite* space: input ``j`` occupies channels
``[offset_j, offset_j + C_j)`` of the output, so a group reaches the Concat's consumers at an
offset. A group is one space with its Conv/Gemm producers (rows ``W[S]``), its pass-through
and depthwise members, and its consumers: Conv (``W[:, S]``) and Gemm after Flatten of
``(C, H, W)`` (columns ``{c*H*W + j : c in S}``; after GlobalAveragePool, ``H*W = 1``).

A group is frozen, with a reason, when a member is a graph output, feeds an op whose channel
mapping is not handled (Slice/Pad/Split/Reshape/Transpose on the channel axis, Mul of two
activations, grouped Conv with ``1 < group < C``, unknown ops), or when some of its channels
come from something other than a Conv/Gemm (a graph input, the channel Pad of an option-A
ResNet shortcut).

:func:`find_groups` analyses a ``gs.Graph``; :func:`apply_keep` applies a kept-channel set to
a group (the graph rewrite). For a Conv reading a group that is left alone (a residual stream),
:func:`sampler_group` + :func:`insert_sampler` select its input channels through a
``Gather(axis=1)`` instead (He et al. 2017, "Multi-branch"). Offsets are read from the graph when analysed, so analyse again
after each rewrite.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

UNARY_PASS_THROUGH = {
    "Relu", "Clip", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Gelu", "Identity", "Dropout", "Abs", "Neg", "Exp", "Sqrt", "Cast",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "Resize", "Upsample",
    "LRN",
}
ELEMENTWISE = {"Add", "Sub", "Mul", "Div"}


@dataclass
class Member:
    """A node touching a group; the group's channels sit at ``offset`` on its channel axis."""

    node: gs.Node
    role: str                # producer | pass-through | depthwise | consumer | concat | residual-add
    offset: int = 0
    block: int = 1           # consumer Gemm after Flatten: input columns per channel (H*W)
    rank: int = 4            # rank of the activation (to find the channel axis of constants)

    def describe(self) -> str:
        name = self.node.name or self.node.outputs[0].name
        extra = f" @+{self.offset}" if self.offset else ""
        if self.block > 1:
            extra += f" (x{self.block} columns)"
        return f"{self.node.op} {name}{extra}"


@dataclass
class ChannelGroup:
    """Channels pruned together: producers, pass-through/depthwise members, consumers."""

    channels: int
    tensors: list[str] = field(default_factory=list)
    producers: list[Member] = field(default_factory=list)
    members: list[Member] = field(default_factory=list)       # pass-through, depthwise, concat, residual-add
    consumers: list[Member] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return not self.frozen and bool(self.producers) and self.channels > 1

    @property
    def reason(self) -> str | None:
        """Why the group cannot be pruned (None if it can)."""
        if self.frozen:
            return "; ".join(dict.fromkeys(self.frozen))
        if not self.producers:
            return "no Conv/Gemm produces these channels"
        if self.channels <= 1:
            return "a single channel"
        return None

    @property
    def name(self) -> str:
        first = self.producers[0].node if self.producers else None
        return (first.name or first.outputs[0].name) if first is not None else (self.tensors[0] if self.tensors else "?")

    @property
    def depthwise(self) -> list[Member]:
        return [m for m in self.members if m.role == "depthwise"]

    @property
    def is_residual(self) -> bool:
        return any(m.role == "residual-add" for m in self.members)

    def to_json(self) -> dict:
        def names(items):
            return [{"op": m.node.op, "name": m.node.name or m.node.outputs[0].name, "role": m.role,
                     "offset": m.offset, "block": m.block} for m in items]
        return {"name": self.name, "channels": self.channels, "prunable": self.prunable, "reason": self.reason,
                "producers": names(self.producers), "members": names(self.members), "consumers": names(self.consumers)}

    def describe(self) -> str:
        head = f"group {self.name}: {self.channels} channels, "
        head += "prunable" if self.prunable else f"frozen ({self.reason})"
        lines = [head]
        for label, items in (("producers", self.producers), ("through", self.members), ("consumers", self.consumers)):
            if items:
                lines.append(f"  {label:<10} " + ", ".join(m.describe() if m.role not in ("depthwise", "concat", "residual-add")
                                                           else f"{m.describe()} ({m.role})" for m in items))
        return "\n".join(lines)


# ---------------------------------------------------------------------------- analysis


class _UnionFind:
    def __init__(self):
        self.parent: dict[str, str] = {}

    def find(self, key: str) -> str:
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def _is_var(t) -> bool:
    return isinstance(t, gs.Variable) and bool(t.name)


def _const_value(t) -> np.ndarray | None:
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    return None


def _rank(t: gs.Variable) -> int:
    return len(t.shape) if t.shape is not None else 4


def _channel_axis_of_constant(const: np.ndarray, rank: int) -> int | None:
    """Axis of ``const`` that broadcasts onto axis 1 of a rank-``rank`` tensor (None if none)."""
    axis = const.ndim - (rank - 1)
    return axis if 0 <= axis < const.ndim else None


def _constant_mapping(const: np.ndarray, rank: int, channels: int | None) -> str | None:
    """None if a constant operand maps channel i to channel i; else the reason it does not."""
    if const.size == 1:
        return None
    if const.ndim > rank:
        return "a constant operand of higher rank"
    axis = _channel_axis_of_constant(const, rank)
    for index, size in enumerate(const.shape):
        if index != axis and size != 1:
            return "a constant operand that varies along a non-channel axis"
    if axis is None or const.shape[axis] == 1:
        return None
    if channels is not None and const.shape[axis] != channels:
        return "a constant operand whose size is not the channel count"
    return None


def _slice_axes(node: gs.Node, rank: int) -> list[int] | None:
    values = [_const_value(t) for t in node.inputs[1:]]
    if len(values) < 2 or values[0] is None or values[1] is None:
        return None
    if len(values) >= 3 and node.inputs[3].name:
        if values[2] is None:
            return None
        return [int(a) % rank for a in values[2].reshape(-1)]
    return list(range(len(values[0].reshape(-1))))


def _pad_touches_channels(node: gs.Node, rank: int) -> bool | None:
    if "pads" in node.attrs:
        pads = list(node.attrs["pads"])
        axes = list(range(rank))
    else:
        pads_value = _const_value(node.inputs[1]) if len(node.inputs) > 1 else None
        if pads_value is None:
            return None
        pads = [int(p) for p in pads_value.reshape(-1)]
        if len(node.inputs) > 3 and node.inputs[3].name:
            axes_value = _const_value(node.inputs[3])
            if axes_value is None:
                return None
            axes = [int(a) % rank for a in axes_value.reshape(-1)]
        else:
            axes = list(range(len(pads) // 2))
    half = len(pads) // 2
    return any(axis == 1 and (pads[i] != 0 or pads[i + half] != 0) for i, axis in enumerate(axes))


def tensor_channels(tensor: gs.Tensor) -> int | None:
    """Current channel count of a tensor, from its producer's weights where possible."""
    seen = 0
    while seen < 10000:
        seen += 1
        if isinstance(tensor, gs.Constant):
            return tensor.values.shape[1] if tensor.values.ndim > 1 else None
        if not tensor.inputs:
            return tensor.shape[1] if tensor.shape and isinstance(tensor.shape[1], int) else None
        node = tensor.inputs[0]
        if node.op == "Conv" and isinstance(node.inputs[1], gs.Constant):
            return int(node.inputs[1].values.shape[0])
        if node.op == "Gemm" and isinstance(node.inputs[1], gs.Constant):
            w = node.inputs[1].values
            return int(w.shape[0] if node.attrs.get("transB", 0) else w.shape[1])
        if node.op == "Concat" and int(node.attrs.get("axis", 0)) in (1, 1 - _rank(tensor)):
            parts = [tensor_channels(t) for t in node.inputs]
            return None if any(p is None for p in parts) else int(sum(parts))
        if node.op in UNARY_PASS_THROUGH or node.op in ELEMENTWISE or node.op in ("BatchNormalization", "PRelu", "Slice", "Pad"):
            data = [t for t in node.inputs if _is_var(t)]
            if not data:
                break
            tensor = data[0]
            continue
        break
    return tensor.shape[1] if tensor.shape and len(tensor.shape) > 1 and isinstance(tensor.shape[1], int) else None


def find_groups(graph: gs.Graph) -> list[ChannelGroup]:
    """All channel groups of ``graph`` (prunable or frozen), in topological order of producers."""
    graph.toposort()
    uf = _UnionFind()
    events: dict[str, list[Member]] = {}        # tensor -> members attached to its space
    freeze: dict[str, list[str]] = {}           # tensor -> reasons
    foreign: dict[str, list[str]] = {}          # tensor -> channels that come from a non-producer
    concat_parts: dict[str, list[tuple[str, gs.Node, int]]] = {}   # concat output -> (input tensor, node, index)
    graph_outputs = {t.name for t in graph.outputs}

    def add(tensor: gs.Variable, member: Member) -> None:
        uf.find(tensor.name)
        events.setdefault(tensor.name, []).append(member)

    def stop(tensor, reason: str) -> None:
        if _is_var(tensor):
            uf.find(tensor.name)
            freeze.setdefault(tensor.name, []).append(reason)

    def untracked_outputs(node: gs.Node, why: str) -> None:
        for out in node.outputs:
            if _is_var(out):
                uf.find(out.name)
                foreign.setdefault(out.name, []).append(why)

    def barrier(node: gs.Node, label: str, tensors, reason: str) -> None:
        """``node`` does not map channels: freeze its inputs, and its outputs start untracked."""
        for tensor in tensors:
            stop(tensor, reason)
        untracked_outputs(node, f"output of {label}")

    for tensor in graph.inputs:
        uf.find(tensor.name)
        foreign.setdefault(tensor.name, []).append(f"graph input {tensor.name}")

    for node in graph.nodes:
        label = f"{node.op} {node.name or node.outputs[0].name if node.outputs else node.op}"
        data_inputs = [t for t in node.inputs if _is_var(t)]
        out = node.outputs[0] if node.outputs and _is_var(node.outputs[0]) else None
        if out is not None:
            uf.find(out.name)
        op = node.op
        if node.inputs and not _is_var(node.inputs[0]) and op not in ("Concat", "Add", "Sub", "Mul", "Div"):
            untracked_outputs(node, f"output of {label} (computed from constants)")
            continue
        if op == "Conv" and len(node.inputs) >= 2:
            weight = _const_value(node.inputs[1])
            x = node.inputs[0]
            if weight is None or weight.ndim != 4:
                stop(x, f"feeds {label} whose weights are not a constant 4-D initializer")
                untracked_outputs(node, f"output of {label} (non-constant weights)")
                continue
            groups = int(node.attrs.get("group", 1))
            bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)
            if groups == 1:
                if _is_var(x):
                    add(x, Member(node, "consumer"))
                if bias_ok:
                    add(out, Member(node, "producer"))
                else:
                    untracked_outputs(node, f"output of {label} (non-constant bias)")
            elif weight.shape[1] == 1 and weight.shape[0] == groups and bias_ok:     # depthwise, multiplier 1
                uf.union(x.name, out.name)
                add(x, Member(node, "depthwise"))
            else:
                stop(x, f"feeds {label}, a grouped Conv (1 < group < C or channel multiplier > 1)")
                untracked_outputs(node, f"output of grouped {label}")
            continue
        if op == "Gemm" and len(node.inputs) >= 2:
            weight = _const_value(node.inputs[1])
            x = node.inputs[0]
            from_flatten = _is_var(x) and x.inputs and x.inputs[0].op == "Flatten"
            bias_ok = len(node.inputs) < 3 or not node.inputs[2].name or isinstance(node.inputs[2], gs.Constant)
            if weight is None or weight.ndim != 2 or node.attrs.get("transA", 0):
                barrier(node, label, [x], f"feeds {label} (transA or non-constant weights)")
                continue
            if not from_flatten and _is_var(x):
                if _rank(x) == 2:
                    add(x, Member(node, "consumer", rank=2))
                else:
                    stop(x, f"feeds {label} with a non-2-D input")
            if bias_ok:
                add(out, Member(node, "producer", rank=2))
            else:
                untracked_outputs(node, f"output of {label} (non-constant bias)")
            continue
        if op == "Flatten":
            x = node.inputs[0]
            axis = int(node.attrs.get("axis", 1))
            shape = x.shape
            consumers = out.outputs if out is not None else []
            gemm_ok = bool(consumers) and all(
                c.op == "Gemm" and c.inputs[0] is out and isinstance(c.inputs[1], gs.Constant) and not c.attrs.get("transA", 0)
                for c in consumers)
            if axis != 1 or shape is None or not all(isinstance(d, int) for d in shape[2:]) or not gemm_ok or out.name in graph_outputs:
                barrier(node, label, [x], f"feeds {label} whose output is not only read by Gemm (or spatial size unknown)")
                continue
            block = int(np.prod(shape[2:])) if len(shape) > 2 else 1
            for gemm in consumers:
                add(x, Member(gemm, "consumer", block=block, rank=len(shape)))
            add(x, Member(node, "pass-through", rank=len(shape)))
            continue
        if op in UNARY_PASS_THROUGH and data_inputs and out is not None:
            x = node.inputs[0]
            if op in ("Resize", "Upsample") and len(data_inputs) > 1:
                barrier(node, label, [x], f"feeds {label} with computed scales/sizes")
                continue
            uf.union(x.name, out.name)
            add(x, Member(node, "pass-through", rank=_rank(x)))
            continue
        if op in ("BatchNormalization", "PRelu") and out is not None:
            x = node.inputs[0]
            params = node.inputs[1:5] if op == "BatchNormalization" else node.inputs[1:2]
            if not all(isinstance(p, gs.Constant) for p in params):
                barrier(node, label, [x], f"feeds {label} with non-constant parameters")
                continue
            if op == "PRelu":
                reason = _constant_mapping(np.asarray(params[0].values), _rank(x), None)
                if reason:
                    barrier(node, label, [x], f"feeds {label} with {reason}")
                    continue
            uf.union(x.name, out.name)
            add(x, Member(node, "pass-through", rank=_rank(x)))
            continue
        if op in ELEMENTWISE and len(node.inputs) == 2 and out is not None:
            variables = [t for t in node.inputs if _is_var(t)]
            constants = [t for t in node.inputs if isinstance(t, gs.Constant)]
            if len(variables) == 1 and len(constants) == 1:
                x = variables[0]
                reason = _constant_mapping(np.asarray(constants[0].values), _rank(x), None)
                if reason:
                    barrier(node, label, [x], f"feeds {label} with {reason}")
                    continue
                uf.union(x.name, out.name)
                add(x, Member(node, "pass-through", rank=_rank(x)))
                continue
            if len(variables) == 2 and op == "Add" and variables[0] is not variables[1]:
                a, b = variables
                if a.shape is not None and b.shape is not None and len(a.shape) != len(b.shape):
                    barrier(node, label, variables, f"feeds {label}, which broadcasts two activations")
                    continue
                uf.union(a.name, b.name)
                uf.union(a.name, out.name)
                add(a, Member(node, "residual-add", rank=_rank(a)))
                continue
            barrier(node, label, variables, f"feeds {label}, an elementwise {op} of two activations (gating)")
            continue
        if op == "Concat" and out is not None:
            rank = _rank(out)
            axis = int(node.attrs.get("axis", 0))
            if axis % max(rank, 1) != 1 or not all(_is_var(t) for t in node.inputs):
                barrier(node, label, data_inputs, f"feeds {label}, a Concat not on the channel axis (or with constant parts)")
                continue
            concat_parts[out.name] = [(t.name, node, index) for index, t in enumerate(node.inputs)]
            for t in node.inputs:
                add(t, Member(node, "concat", rank=rank))
            continue
        if op == "Slice" and data_inputs and out is not None:
            x = node.inputs[0]
            axes = _slice_axes(node, _rank(x))
            if axes is not None and 1 not in axes and 0 not in axes:
                uf.union(x.name, out.name)
                add(x, Member(node, "pass-through", rank=_rank(x)))
                continue
            barrier(node, label, [x], f"feeds {label}, a Slice on the channel axis (or with computed bounds)")
            continue
        if op == "Pad" and data_inputs and out is not None:
            x = node.inputs[0]
            touches = _pad_touches_channels(node, _rank(x))
            if touches is False:
                uf.union(x.name, out.name)
                add(x, Member(node, "pass-through", rank=_rank(x)))
                continue
            stop(x, f"feeds {label}, a Pad on the channel axis (or with computed pads)")
            untracked_outputs(node, f"output of {label} (channel padding)")
            continue
        barrier(node, label, data_inputs, f"feeds {label} ({node.op} on the channel axis is not handled)")

    for name in graph_outputs:
        uf.find(name)
        freeze.setdefault(name, []).append(f"{name} is a graph output")

    # ---- collect spaces
    spaces: dict[str, dict] = {}
    for key in list(uf.parent):
        root = uf.find(key)
        space = spaces.setdefault(root, {"tensors": [], "members": [], "freeze": [], "foreign": [], "concat": []})
        space["tensors"].append(key)
        space["members"].extend(events.get(key, []))
        space["freeze"].extend(freeze.get(key, []))
        space["foreign"].extend(foreign.get(key, []))
        if key in concat_parts:
            space["concat"].append(key)

    tensors = graph.tensors()

    def reach(root: str, offset: int, depth: int, group: ChannelGroup, via: str) -> None:
        """Attach the members of space ``root`` (seen at ``offset``) to ``group``."""
        space = spaces[root]
        if depth > 0:
            producers = [m for m in space["members"] if m.role == "producer"]
            if producers or space["foreign"] or len(space["concat"]) > 1:
                group.frozen.append(f"{via} is merged with other channels (Add after Concat)")
            if any(m.role == "residual-add" for m in space["members"]):
                group.frozen.append(f"{via} feeds a residual Add")
        group.frozen.extend(f"{via}: {r}" if via else r for r in space["freeze"])
        if depth == 0:
            group.frozen.extend(f"channels also come from {why}" for why in space["foreign"])
        for member in space["members"]:
            if member.role == "producer":
                if depth == 0:
                    group.producers.append(member)
                continue
            shifted = Member(member.node, member.role, member.offset + offset, member.block, member.rank)
            if member.role == "consumer":
                group.consumers.append(shifted)
            elif member.role == "concat":
                # the space enters this Concat: continue into the Concat's output space
                concat = member.node
                out = concat.outputs[0].name
                start = 0
                found = False
                for tensor_name, _, index in concat_parts.get(out, []):
                    if uf.find(tensor_name) == root:
                        found = True
                        break
                    channels = tensor_channels(tensors[tensor_name])
                    if channels is None:
                        group.frozen.append(f"channel count of {tensor_name} (input of Concat {concat.name}) unknown")
                        channels = 0
                    start += channels
                if not found:
                    continue
                if sum(1 for t, _, _ in concat_parts.get(out, []) if uf.find(t) == root) > 1:
                    group.frozen.append(f"enters Concat {concat.name} more than once")
                group.members.append(Member(concat, "concat", offset + start, 1, member.rank))
                if depth > 8:
                    group.frozen.append("Concat nesting too deep")
                    continue
                reach(uf.find(out), offset + start, depth + 1, group, f"via Concat {concat.name}")
            else:
                group.members.append(shifted)

    groups = []
    order = {id(node): index for index, node in enumerate(graph.nodes)}
    for root, space in spaces.items():
        if space["concat"] and not any(m.role == "producer" for m in space["members"]):
            continue        # composite Concat outputs are reached from their inputs' groups
        producers = [m for m in space["members"] if m.role == "producer"]
        if not producers:
            continue
        channels = tensor_channels(producers[0].node.outputs[0])
        group = ChannelGroup(channels=int(channels or 0), tensors=sorted(space["tensors"]))
        if space["concat"]:
            group.frozen.append("merged with a Concat output")
        reach(root, 0, 0, group, "")
        counts = {tensor_channels(p.node.outputs[0]) for p in group.producers}
        if len(counts) > 1:
            group.frozen.append(f"producers disagree on the channel count ({sorted(counts)})")
        group.producers.sort(key=lambda m: order.get(id(m.node), 0))
        group.consumers.sort(key=lambda m: order.get(id(m.node), 0))
        group.members.sort(key=lambda m: order.get(id(m.node), 0))
        groups.append(group)
    groups.sort(key=lambda g: order.get(id(g.producers[0].node), 0))
    return groups


def group_of(groups: list[ChannelGroup], producer_name: str) -> ChannelGroup | None:
    """The group whose producers include the node named ``producer_name``."""
    for group in groups:
        if any((m.node.name or m.node.outputs[0].name) == producer_name for m in group.producers):
            return group
    return None


# ---------------------------------------------------------------------------- rewrite


_counter = [0]


def _new_constant(old: gs.Constant, values: np.ndarray) -> gs.Constant:
    _counter[0] += 1
    return gs.Constant(f"{old.name}_pruned{_counter[0]}", np.ascontiguousarray(values.astype(old.values.dtype)))


def _replace_input(node: gs.Node, index: int, values: np.ndarray) -> None:
    node.inputs[index] = _new_constant(node.inputs[index], values)


def set_weights(node: gs.Node, weight: np.ndarray, bias: np.ndarray | None) -> None:
    """Give a Conv/Gemm new weights (its initializer layout) and, unless None, a bias."""
    _replace_input(node, 1, np.asarray(weight))
    if bias is None:
        return
    if len(node.inputs) > 2 and node.inputs[2].name and isinstance(node.inputs[2], gs.Constant):
        _replace_input(node, 2, np.asarray(bias))
        return
    _counter[0] += 1
    bias_const = gs.Constant(f"{node.name or node.outputs[0].name}.bias_pruned{_counter[0]}", np.asarray(bias, np.float32))
    if len(node.inputs) > 2:
        node.inputs[2] = bias_const
    else:
        node.inputs.append(bias_const)


def removed_indices(group: ChannelGroup, keep) -> np.ndarray:
    keep = np.unique(np.asarray(keep, dtype=int))
    if len(keep) and (keep.min() < 0 or keep.max() >= group.channels):
        raise ValueError(f"kept channels out of range 0..{group.channels - 1}")
    return np.setdiff1d(np.arange(group.channels), keep)


def apply_keep(graph: gs.Graph, group: ChannelGroup, keep, consumer_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> int:
    """Keep channels ``keep`` of ``group`` (sorted indices into its ``channels``); returns |removed|.

    Producers keep rows ``W[S]`` (and bias); BatchNormalization / PRelu / per-channel
    constants keep entries ``S``; depthwise Convs keep ``W[S]`` and set ``group = |S|``;
    consumer Convs keep ``W[:, S]``; Gemms after Flatten keep the columns of ``S``.
    ``consumer_weights`` maps a consumer's name to a refit ``(weight, bias)`` with the pruned
    input shape (``weight`` as the ONNX initializer is laid out), used instead of slicing.
    """
    if not group.prunable:
        raise ValueError(f"group {group.name} cannot be pruned: {group.reason}")
    removed = removed_indices(group, keep)
    if len(removed) == group.channels:
        raise ValueError(f"group {group.name}: at least one channel must be kept")
    if len(removed) == 0 and not consumer_weights:
        return 0
    consumer_weights = consumer_weights or {}
    for member in group.producers:
        node = member.node
        if node.op == "Conv":
            _replace_input(node, 1, np.delete(node.inputs[1].values, removed, axis=0))
            if len(node.inputs) > 2 and node.inputs[2].name:
                _replace_input(node, 2, np.delete(node.inputs[2].values, removed, axis=0))
        else:   # Gemm: output features
            axis = 0 if node.attrs.get("transB", 0) else 1
            _replace_input(node, 1, np.delete(node.inputs[1].values, removed, axis=axis))
            if len(node.inputs) > 2 and node.inputs[2].name and node.inputs[2].values.size > 1:
                bias = node.inputs[2].values
                _replace_input(node, 2, np.delete(bias, removed, axis=bias.ndim - 1))
    for member in group.members:
        node = member.node
        index = removed + member.offset
        if member.role == "depthwise":
            _replace_input(node, 1, np.delete(node.inputs[1].values, index, axis=0))
            if len(node.inputs) > 2 and node.inputs[2].name:
                _replace_input(node, 2, np.delete(node.inputs[2].values, index, axis=0))
            node.attrs["group"] = int(node.inputs[1].values.shape[0])
        elif member.role == "pass-through":
            if node.op == "BatchNormalization":
                for k in range(1, 5):
                    _replace_input(node, k, np.delete(node.inputs[k].values, index, axis=0))
            elif node.op in ELEMENTWISE or node.op == "PRelu":
                for k, tensor in enumerate(node.inputs):
                    if isinstance(tensor, gs.Constant) and tensor.values.size > 1:
                        axis = _channel_axis_of_constant(tensor.values, member.rank)
                        if axis is not None and tensor.values.shape[axis] > 1:
                            _replace_input(node, k, np.delete(tensor.values, index, axis=axis))
    _slice_consumers(group, removed, consumer_weights)
    _update_shapes(graph, group, len(removed))
    return len(removed)


def _slice_consumers(group: ChannelGroup, removed: np.ndarray, consumer_weights: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Consumers drop the input columns of ``removed``, or take their refit weights."""
    for member in group.consumers:
        node = member.node
        name = node.name or node.outputs[0].name
        if name in consumer_weights:
            set_weights(node, *consumer_weights[name])
            continue
        index = removed + member.offset
        if node.op == "Conv":
            _replace_input(node, 1, np.delete(node.inputs[1].values, index, axis=1))
        else:
            columns = (index[:, None] * member.block + np.arange(member.block)[None]).reshape(-1)
            axis = 1 if node.attrs.get("transB", 0) else 0
            _replace_input(node, 1, np.delete(node.inputs[1].values, columns, axis=axis))


def sampler_group(graph: gs.Graph, consumer_name: str) -> ChannelGroup:
    """The input channels of ONE Conv, as a group with no producer (for :func:`insert_sampler`).

    He et al. 2017 §2 "Multi-branch": the first conv of a residual branch reads the residual
    stream, which the shortcut also reads, so its producers cannot be pruned; the conv's input
    channels are selected instead.
    """
    node = next(n for n in graph.nodes if (n.name or n.outputs[0].name) == consumer_name)
    return ChannelGroup(channels=int(node.inputs[1].values.shape[1]), tensors=[node.inputs[0].name],
                        consumers=[Member(node, "consumer")])


def insert_sampler(graph: gs.Graph, group: ChannelGroup, keep, consumer_weights: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> int:
    """Feed the Conv of a :func:`sampler_group` through ``Gather(axis=1, indices=keep)``; returns |removed|.

    The Conv keeps ``W[:, keep]`` (or its refit weight from ``consumer_weights``, as in
    :func:`apply_keep`); its input tensor, and whatever else reads it, are unchanged.
    """
    removed = removed_indices(group, keep)
    if len(removed) == group.channels:
        raise ValueError(f"group {group.name}: at least one channel must be kept")
    if len(removed) == 0 and not consumer_weights:
        return 0
    node = group.consumers[0].node
    name = node.name or node.outputs[0].name
    source = node.inputs[0]
    kept = np.setdiff1d(np.arange(group.channels), removed).astype(np.int64)
    _counter[0] += 1
    shape = list(source.shape) if source.shape is not None and len(source.shape) > 1 else None
    if shape is not None:
        shape[1] = len(kept)
    sampled = gs.Variable(f"{name}.sampled{_counter[0]}", dtype=source.dtype or np.float32, shape=shape)
    gather = gs.Node("Gather", f"{name}.sampler{_counter[0]}", attrs={"axis": 1},
                     inputs=[source, gs.Constant(f"{name}.sampler_indices{_counter[0]}", kept)], outputs=[sampled])
    graph.nodes.append(gather)
    node.inputs[0] = sampled
    _slice_consumers(group, removed, consumer_weights or {})
    graph.toposort()
    return len(removed)


def _update_shapes(graph: gs.Graph, group: ChannelGroup, count: int) -> None:
    """Lower the channel dimension of the tensors whose channel count changed (keeps shapes valid)."""
    touched: list[tuple[gs.Variable, int]] = []
    seen: set[str] = set()
    tensors = graph.tensors()

    def mark(tensor, factor=1):
        if isinstance(tensor, gs.Variable) and tensor.name not in seen:
            seen.add(tensor.name)
            touched.append((tensor, factor))

    for name in group.tensors:
        if name in tensors:
            mark(tensors[name])
    for member in group.members:
        if member.role == "concat":
            mark(member.node.outputs[0])
            # pass-through ops after the concat
            stack = [member.node.outputs[0]]
            while stack:
                t = stack.pop()
                for node in t.outputs:
                    if node.op in UNARY_PASS_THROUGH or node.op in ("BatchNormalization", "PRelu", "Slice", "Pad") or (
                            node.op in ELEMENTWISE and sum(_is_var(i) for i in node.inputs) == 1):
                        mark(node.outputs[0])
                        stack.append(node.outputs[0])
    for member in group.consumers:
        if member.node.op == "Gemm":
            flat = member.node.inputs[0]
            if flat.inputs and flat.inputs[0].op == "Flatten":
                mark(flat, member.block)
    for tensor, factor in touched:
        shape = tensor.shape
        if shape is not None and len(shape) > 1 and isinstance(shape[1], int):
            tensor.shape = [shape[0], shape[1] - count * factor, *shape[2:]]
