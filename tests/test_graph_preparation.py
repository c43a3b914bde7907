"""Graph preparation keeps what the model computes: BN folding, constant lifting, explicit pads."""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from conftest import run, small_cnn
from onnxopt.graph import prepare


def test_batchnorm_folding_is_exact():
    model = small_cnn(batchnorm=True)
    prepared, summary = prepare(model)
    assert summary["batchnorms_folded"] == 1
    assert not any(n.op_type == "BatchNormalization" for n in prepared.graph.node)
    x = np.random.default_rng(0).standard_normal((4, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(prepared, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)


def test_preparation_keeps_names_opset_ir_and_symbolic_batch():
    model = small_cnn()
    prepared, _ = prepare(model)
    assert [i.name for i in prepared.graph.input] == ["x"]
    assert [o.name for o in prepared.graph.output] == ["y"]
    assert prepared.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert prepared.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in prepared.opset_import] == [(o.domain, o.version) for o in model.opset_import]


def _conv_model(auto_pad: str, size: int, stride: int, weight_in_constant_node: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 2, 3, 3)).astype(np.float32)
    nodes = []
    inits = []
    if weight_in_constant_node:
        nodes.append(helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(weight)))
    else:
        inits.append(numpy_helper.from_array(weight, "w"))
    nodes.append(helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[3, 3], strides=[stride, stride], auto_pad=auto_pad))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_auto_pad_made_explicit_and_constants_lifted():
    for mode in ("SAME_UPPER", "SAME_LOWER", "VALID"):
        for size, stride in ((7, 1), (8, 2), (9, 2)):
            model = _conv_model(mode, size, stride, weight_in_constant_node=True)
            prepared, summary = prepare(model)
            assert summary["constants_lifted"] == 1
            conv = next(n for n in prepared.graph.node if n.op_type == "Conv")
            assert all(a.name != "auto_pad" for a in conv.attribute)
            assert any(i.name == conv.input[1] for i in prepared.graph.initializer)
            x = np.random.default_rng(1).standard_normal((2, 2, size, size)).astype(np.float32)
            np.testing.assert_allclose(run(prepared, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
