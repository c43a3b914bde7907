"""The compressible layers of a model: every Conv and Gemm, with shapes, MACs and params.

MACs follow ALGORITHMS.md: a Conv costs ``Ho*Wo*M*(C/g)*kH*kW`` per sample, a Gemm ``K*N``.
A layer whose weights are not constant, whose spatial shape is unknown, or that is not a 2-D
convolution carries a ``unsupported`` reason; passes add their own reasons on top
(``passes/*.applicability``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs


@dataclass
class Layer:
    name: str
    op: str                       # "Conv" or "Gemm"
    node: gs.Node = field(repr=False)
    out_channels: int
    in_channels: int              # input channels (Conv) or input features (Gemm)
    kernel: tuple[int, int] = (1, 1)
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    dilations: tuple[int, int] = (1, 1)
    group: int = 1
    output_hw: tuple[int, int] | None = (1, 1)
    activation: str = "linear"    # "relu" when the layer's only consumer is Relu / Clip(0, x)
    unsupported: str | None = None
    # Residual: the layer's only consumer is Add(layer, shortcut); `activation` then describes
    # what follows the Add. Passes reconstruct the Add's output, absorbing the shortcut's error.
    shortcut: gs.Variable | None = field(default=None, repr=False)

    @property
    def macs(self) -> int | None:
        if self.output_hw is None:
            return None
        kh, kw = self.kernel
        return int(np.prod(self.output_hw)) * self.out_channels * (self.in_channels // self.group) * kh * kw

    @property
    def params(self) -> int:
        kh, kw = self.kernel
        bias = self.out_channels if self.has_bias else 0
        return self.out_channels * (self.in_channels // self.group) * kh * kw + bias

    @property
    def has_bias(self) -> bool:
        return len(self.node.inputs) > 2 and self.node.inputs[2] is not None and self.node.inputs[2].name != ""

    @property
    def is_depthwise(self) -> bool:
        return self.op == "Conv" and self.group > 1 and self.group == self.in_channels

    @property
    def output(self) -> gs.Variable:
        return self.node.outputs[0]

    @property
    def input(self) -> gs.Variable:
        return self.node.inputs[0]

    def weight_matrix(self) -> np.ndarray:
        """Weights as a (out, in*kh*kw) matrix (Conv: channel-major blocks of kh*kw)."""
        if self.op == "Conv":
            weight = self.node.inputs[1].values
            return weight.reshape(weight.shape[0], -1)
        return gemm_weight_and_bias(self.node)[0].T

    def bias_vector(self) -> np.ndarray:
        if self.op == "Gemm":
            return gemm_weight_and_bias(self.node)[1]
        if self.has_bias:
            return np.asarray(self.node.inputs[2].values)
        return np.zeros(self.out_channels, np.float32)


def gemm_weight_and_bias(node: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """Effective ``(K, N)`` weight and ``(N,)`` bias of ``Y = alpha * A @ B' + beta * C``."""
    weight = np.asarray(node.inputs[1].values)
    if node.attrs.get("transB", 0):
        weight = weight.T
    weight = weight * node.attrs.get("alpha", 1.0)
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        bias = np.broadcast_to(np.asarray(node.inputs[2].values) * node.attrs.get("beta", 1.0), (weight.shape[1],))
    else:
        bias = np.zeros(weight.shape[1], weight.dtype)
    return weight.astype(np.float32), np.array(bias, np.float32)


def _same_static_shape(a, b) -> bool:
    """Shapes that can be equal: same rank (when known) and equal where both dims are static."""
    if a is None or b is None:
        return True
    return len(a) == len(b) and all(x == y for x, y in zip(a, b) if isinstance(x, int) and isinstance(y, int))


def _residual_shortcut(node: gs.Node, graph_outputs: set[str]) -> gs.Variable | None:
    """The other operand of ``Add(node output, shortcut)`` when that Add is the only consumer."""
    out = node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return None
    add = out.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    if isinstance(other, gs.Constant) or other is out or not _same_static_shape(other.shape, out.shape):
        return None
    return other


def _activation_of(node: gs.Node, graph_outputs: set[str]) -> str:
    out = node.outputs[0]
    if out.name in graph_outputs or len(out.outputs) != 1:
        return "linear"
    consumer = out.outputs[0]
    if consumer.op == "Relu":
        return "relu"
    if consumer.op == "Clip":
        low = consumer.attrs.get("min")
        if low is None and len(consumer.inputs) > 1 and isinstance(consumer.inputs[1], gs.Constant):
            low = float(np.asarray(consumer.inputs[1].values))
        if low == 0.0:
            return "relu"
    return "linear"


def _conv_layer(node: gs.Node, graph_outputs: set[str]) -> Layer:
    weight = node.inputs[1]
    name = node.name or node.outputs[0].name
    if not isinstance(weight, gs.Constant):
        return Layer(name, "Conv", node, 0, 0, unsupported="weight is not a constant initializer (computed or quantized weights)", output_hw=None)
    shape = weight.values.shape
    if len(shape) != 4:
        return Layer(name, "Conv", node, shape[0], shape[1], unsupported=f"{len(shape) - 2}-D convolution (only 2-D is handled)", output_hw=None)
    group = int(node.attrs.get("group", 1))
    out_shape = node.outputs[0].shape
    output_hw = None
    if out_shape is not None and len(out_shape) == 4 and all(isinstance(d, int) for d in out_shape[2:]):
        output_hw = (int(out_shape[2]), int(out_shape[3]))
    layer = Layer(
        name=name, op="Conv", node=node,
        out_channels=shape[0], in_channels=shape[1] * group,
        kernel=(shape[2], shape[3]),
        strides=tuple(node.attrs.get("strides", [1, 1])),
        pads=tuple(node.attrs.get("pads", [0, 0, 0, 0])),
        dilations=tuple(node.attrs.get("dilations", [1, 1])),
        group=group, output_hw=output_hw,
        activation=_activation_of(node, graph_outputs),
        shortcut=_residual_shortcut(node, graph_outputs),
    )
    if layer.shortcut is not None:
        layer.activation = _activation_of(node.outputs[0].outputs[0], graph_outputs)
    if node.attrs.get("auto_pad", "NOTSET") != "NOTSET":
        layer.unsupported = "auto_pad with dynamic spatial dims (give static input sizes)"
    elif output_hw is None:
        layer.unsupported = "output spatial shape unknown (dynamic spatial dims)"
    elif len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        layer.unsupported = "bias is not a constant initializer"
    return layer


def _gemm_layer(node: gs.Node, graph_outputs: set[str]) -> Layer:
    name = node.name or node.outputs[0].name
    weight = node.inputs[1]
    if not isinstance(weight, gs.Constant) or weight.values.ndim != 2:
        return Layer(name, "Gemm", node, 0, 0, unsupported="weight is not a constant 2-D initializer")
    k, n = weight.values.shape[::-1] if node.attrs.get("transB", 0) else weight.values.shape
    layer = Layer(name, "Gemm", node, out_channels=int(n), in_channels=int(k), activation=_activation_of(node, graph_outputs))
    if node.attrs.get("transA", 0):
        layer.unsupported = "Gemm with transA=1"
    elif len(node.inputs) > 2 and node.inputs[2].name and not isinstance(node.inputs[2], gs.Constant):
        layer.unsupported = "bias is not a constant initializer"
    return layer


def find_layers(graph: gs.Graph) -> list[Layer]:
    """Conv and Gemm layers in topological order."""
    graph.toposort()
    graph_outputs = {t.name for t in graph.outputs}
    layers = []
    for node in graph.nodes:
        if node.op == "Conv" and len(node.inputs) >= 2:
            layers.append(_conv_layer(node, graph_outputs))
        elif node.op == "Gemm" and len(node.inputs) >= 2:
            layers.append(_gemm_layer(node, graph_outputs))
    return layers


def model_macs(layers: list[Layer]) -> int:
    """MACs of all Conv/Gemm layers per sample (other ops are negligible)."""
    return sum(layer.macs or 0 for layer in layers)


def model_params(graph: gs.Graph) -> int:
    return int(sum(t.values.size for t in graph.tensors().values() if isinstance(t, gs.Constant)))


def shape_text(layer: Layer) -> str:
    if layer.op == "Gemm":
        return f"{layer.in_channels}->{layer.out_channels}"
    kh, kw = layer.kernel
    group = f" g{layer.group}" if layer.group > 1 else ""
    stride = f" s{layer.strides[0]}" if tuple(layer.strides) != (1, 1) else ""
    return f"{layer.in_channels}->{layer.out_channels} {kh}x{kw}{stride}{group}"


# ops between a classifier's last Conv/Gemm and its (N, classes) output that keep one value per class
_PER_CLASS_OPS = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Softmax", "LogSoftmax", "Flatten", "Reshape", "Squeeze",
                  "GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax", "Identity", "Dropout", "Add", "Mul"}


def class_score_layers(graph: gs.Graph, layers: list[Layer]) -> set[str]:
    """The layers that compute a classifier's class scores: a Conv/Gemm with C outputs from
    which a graph output of shape ``(N, C)``, C > 1, is reached through per-class ops only
    (activations, global pooling, flattening, a constant bias or scale, softmax)."""
    by_node = {id(layer.node): layer for layer in layers}
    names = set()
    for output in graph.outputs:
        shape = output.shape
        if shape is None or len(shape) != 2 or not isinstance(shape[1], int) or shape[1] < 2:
            continue
        tensor = output
        while tensor.inputs:
            node = tensor.inputs[0]
            layer = by_node.get(id(node))
            if layer is not None:
                if layer.out_channels == shape[1]:
                    names.add(layer.name)
                break
            if node.op not in _PER_CLASS_OPS:
                break
            if node.op in ("Add", "Mul"):       # a constant bias or scale: follow the other operand
                variables = [t for t in node.inputs if isinstance(t, gs.Variable)]
                if len(variables) != 1 or len(node.inputs) != 2:
                    break
                tensor = variables[0]
            elif isinstance(node.inputs[0], gs.Variable):
                tensor = node.inputs[0]
            else:
                break
    return names
