"""Random small CNNs for the fuzzer, built with onnx.helper from a drawn spec.

A spec is a plain dict drawn by hypothesis (so failures shrink to a small, readable spec);
:func:`build` turns it into a checked ``ModelProto``. Blocks: plain Conv (kernel, stride,
dilation, explicit pads or ``auto_pad``, with or without bias, group 1 / depthwise / grouped),
a residual pair with an ``Add``, a two-branch ``Concat``; an optional NHWC input followed by a
Transpose; a head that is ``Gemm`` (transA/transB/alpha/beta) or ``MatMul`` + ``Add``.
``low_rank`` weights have rank at most half their filters, so a factorisation at that rank is
exact (the equivalence check).
"""

from __future__ import annotations

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET, MAX_OPSET = 11, 26      # onnxruntime 1.31 runs opsets up to 26


@st.composite
def conv_specs(draw, channels: int) -> dict:
    kind = draw(st.sampled_from(["full", "full", "full", "depthwise", "grouped"]))
    if kind == "grouped" and channels % 2:
        kind = "full"
    group = {"full": 1, "depthwise": channels, "grouped": 2}[kind]
    out = channels if kind == "depthwise" else draw(st.integers(2, 12))
    if kind == "grouped":
        out = 2 * max(1, out // 2)
    return {
        "type": "conv", "out": out, "group": group,
        "k": draw(st.sampled_from([1, 3, 3, 5])),
        "stride": draw(st.sampled_from([1, 1, 2])),
        "dilation": draw(st.sampled_from([1, 1, 2])),
        "pad": draw(st.sampled_from(["same", "valid", "explicit", "SAME_UPPER", "SAME_LOWER", "VALID"])),
        "bias": draw(st.booleans()),
        "relu": draw(st.booleans()),
        "low_rank": draw(st.booleans()),
    }


@st.composite
def model_specs(draw, dynamic_spatial: bool | None = None) -> dict:
    channels = draw(st.integers(1, 4))
    blocks = []
    width = channels
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["conv", "conv", "residual", "concat"]))
        if kind == "conv":
            block = draw(conv_specs(width))
            width = block["out"]
        elif kind == "residual":
            block = {"type": "residual", "mid": draw(st.integers(2, 10)), "bias": draw(st.booleans()),
                     "low_rank": draw(st.booleans())}
        else:
            block = {"type": "concat", "a": draw(st.integers(1, 6)), "b": draw(st.integers(1, 6)), "relu": draw(st.booleans()),
                     "low_rank": draw(st.booleans())}
            width = block["a"] + block["b"]
        blocks.append(block)
    return {
        "seed": draw(st.integers(0, 2**16)),
        "opset": draw(st.integers(MIN_OPSET, MAX_OPSET)),
        "channels": channels,
        "size": draw(st.integers(6, 11)),
        "batch": draw(st.sampled_from(["N", "N", 1, 2])),
        "dynamic_spatial": draw(st.booleans()) if dynamic_spatial is None else dynamic_spatial,
        "nhwc": draw(st.booleans()),
        "blocks": blocks,
        "head": draw(st.sampled_from(["gemm", "gemm", "matmul"])),
        "classes": draw(st.integers(2, 10)),
        "hidden": draw(st.sampled_from([0, 0, 16])),
        "trans_a": draw(st.booleans()),
        "trans_b": draw(st.booleans()),
        "alpha": draw(st.sampled_from([1.0, 1.0, 0.5, 2.0])),
        "beta": draw(st.sampled_from([1.0, 1.0, 0.0, 0.7])),
        "samples": draw(st.integers(8, 24)),
    }


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def weight(self, shape, low_rank: bool = False) -> str:
        fan_in = int(np.prod(shape[1:])) or 1
        w = self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        if low_rank and shape[0] >= 2:
            rank = max(1, shape[0] // 2)
            flat = w.reshape(shape[0], -1)
            w = (self.rng.standard_normal((shape[0], rank)) @ flat[:rank] / np.sqrt(rank)).reshape(shape)
        return self.init(w)

    def init(self, value) -> str:
        name = self.name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower() + "_")
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, block: dict) -> str:
        k, group, out = block["k"], block["group"], block["out"]
        attrs = {"kernel_shape": [k, k], "strides": [block["stride"]] * 2}
        if block["dilation"] != 1:
            attrs["dilations"] = [block["dilation"]] * 2
        span = (k - 1) * block["dilation"]
        if block["pad"] in ("SAME_UPPER", "SAME_LOWER", "VALID"):
            attrs["auto_pad"] = block["pad"]
        elif block["pad"] == "same":
            attrs["pads"] = [span // 2, span // 2, span - span // 2, span - span // 2]
        elif block["pad"] == "explicit":
            attrs["pads"] = [1, 0, 0, 1]                    # asymmetric
        if group > 1:
            attrs["group"] = group
        inputs = [x, self.weight((out, cin // group, k, k), block.get("low_rank", False) and group == 1)]
        if block.get("bias", True):
            inputs.append(self.init(self.rng.standard_normal(out) * 0.1))
        y = self.node("Conv", inputs, **attrs)
        return self.node("Relu", [y]) if block.get("relu") else y


def _same_conv(out: int, bias: bool, low_rank: bool = False, relu: bool = False) -> dict:
    return {"out": out, "group": 1, "k": 3, "stride": 1, "dilation": 1, "pad": "same", "bias": bias, "relu": relu,
            "low_rank": low_rank}


def build(spec: dict) -> onnx.ModelProto:
    """The model of ``spec``; input ``x``, output ``y`` [batch, classes]."""
    b = _Builder(spec["seed"])
    c, size = spec["channels"], spec["size"]
    batch = spec["batch"]
    hw = ["H", "W"] if spec["dynamic_spatial"] else [size, size]
    if spec["nhwc"]:
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *hw, c])
        h = b.node("Transpose", ["x"], perm=[0, 3, 1, 2])
    else:
        x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, c, *hw])
        h = "x"
    width = c
    spatial = size
    for block in spec["blocks"]:
        if block["type"] == "conv":
            if block["pad"].startswith("SAME"):
                block = {**block, "dilation": 1}
            span = (block["k"] - 1) * block["dilation"] + 1
            pads = {"valid": 0, "VALID": 0, "explicit": 1}.get(block["pad"])
            if pads is not None and spatial + pads < span:      # would not fit: pad "same" instead
                block, pads = {**block, "pad": "same"}, None
            h = b.conv(h, width, block)
            width = block["out"]
            spatial = -(-spatial // block["stride"]) if pads is None else (spatial + pads - span) // block["stride"] + 1
        elif block["type"] == "residual":
            mid = b.conv(h, width, _same_conv(block["mid"], block["bias"], block["low_rank"], relu=True))
            back = b.conv(mid, block["mid"], _same_conv(width, block["bias"], block["low_rank"]))
            h = b.node("Relu", [b.node("Add", [back, h])])
        else:
            left = b.conv(h, width, _same_conv(block["a"], True, block["low_rank"], relu=block["relu"]))
            right = b.conv(h, width, _same_conv(block["b"], False, block["low_rank"]))
            h = b.node("Concat", [left, right], axis=1)
            width = block["a"] + block["b"]
    flat = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    features = width
    if spec["hidden"]:
        flat = b.node("Relu", [b.node("Gemm", [flat, b.weight((spec["hidden"], features)), b.init(np.zeros(spec["hidden"]))], transB=1)])
        features = spec["hidden"]
    classes = spec["classes"]
    if spec["head"] == "gemm":
        a = b.node("Transpose", [flat], perm=[1, 0]) if spec["trans_a"] else flat
        w = b.rng.standard_normal((features, classes)) * 0.5
        weight = b.init(w.T if spec["trans_b"] else w)
        y = b.node("Gemm", [a, weight, b.init(b.rng.standard_normal(classes) * 0.1)], transA=int(spec["trans_a"]),
                   transB=int(spec["trans_b"]), alpha=spec["alpha"], beta=spec["beta"])
    else:
        y = b.node("Add", [b.node("MatMul", [flat, b.weight((features, classes))]), b.init(b.rng.standard_normal(classes) * 0.1)])
    b.nodes[-1].output[0] = "y"
    graph = helper.make_graph(b.nodes, "fuzz", [x_info], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, classes])],
                              initializer=b.inits)
    opset = helper.make_opsetid("", spec["opset"])
    model = helper.make_model(graph, opset_imports=[opset], producer_name="fuzz")
    model.ir_version = helper.find_min_ir_version_for([opset])
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration(spec: dict) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(spec["seed"] + 1)
    size, c = spec["size"], spec["channels"]
    shape = (spec["samples"], size, size, c) if spec["nhwc"] else (spec["samples"], c, size, size)
    return {"x": rng.standard_normal(shape).astype(np.float32)}
