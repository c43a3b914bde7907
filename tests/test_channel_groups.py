"""Channel groups: analysis on small graphs (Add, Concat, depthwise, Flatten->Gemm, option-A
shortcut), and the rewrite checked numerically through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run, shared_path, small_cnn
from onnxopt.graph import export, import_graph, prepare
from onnxopt.passes.channel_groups import apply_keep, find_groups, group_of, insert_sampler, sampler_group


class Builder:
    """A tiny ONNX graph written in code: x [N, 3, 8, 8] -> ... -> named outputs."""

    def __init__(self, seed: int = 0, size: int = 8):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.size = size

    def const(self, name, array):
        self.inits.append(numpy_helper.from_array(np.asarray(array, np.float32), name))
        return name

    def conv(self, name, x, cin, cout, k=3, group=1, bias=True):
        inputs = [x, self.const(f"{name}.w", self.rng.standard_normal((cout, cin // group, k, k)) * 0.3)]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.standard_normal(cout) * 0.1))
        self.nodes.append(helper.make_node("Conv", inputs, [name], name=name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group))
        return name

    def op(self, op, inputs, name, **attrs):
        self.nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def model(self, outputs: dict[str, list]) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, self.size, self.size])],
            [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in outputs.items()],
            initializer=self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.checker.check_model(model, full_check=True)
        return model


def chain_model():
    b = Builder()
    a = b.op("Relu", [b.conv("c1", "x", 3, 8)], "r1")
    bn = b.op("BatchNormalization", [a, b.const("g", b.rng.uniform(0.5, 1.5, 8)), b.const("beta", b.rng.standard_normal(8)),
                                     b.const("mu", b.rng.standard_normal(8) * 0.1), b.const("var", b.rng.uniform(0.5, 2, 8))], "bn")
    m = b.op("Mul", [bn, b.const("scale", b.rng.uniform(0.5, 2, (8, 1, 1)))], "mul")
    p = b.op("MaxPool", [m], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b.conv("c2", p, 8, 6)
    return b.model({"c2": ["N", 6, 4, 4]})


def residual_model():
    b = Builder()
    stem = b.op("Relu", [b.conv("stem", "x", 3, 8)], "r0")
    branch = b.conv("c2", b.op("Relu", [b.conv("c1", stem, 8, 8)], "r1"), 8, 8)
    out = b.op("Relu", [b.op("Add", [branch, stem], "add")], "r2")
    b.conv("head", out, 8, 4)
    return b.model({"head": ["N", 4, 8, 8]})


def concat_model():
    b = Builder()
    s = b.op("Relu", [b.conv("squeeze", "x", 3, 4, k=1)], "rs")
    e1 = b.op("Relu", [b.conv("e1", s, 4, 6, k=1)], "r1")
    e3 = b.op("Relu", [b.conv("e3", s, 4, 5, k=3)], "r3")
    cat = b.op("Concat", [e1, e3], "cat", axis=1)
    pooled = b.op("MaxPool", [cat], "pool", kernel_shape=[2, 2], strides=[2, 2])
    b.conv("next", pooled, 11, 7, k=3)
    return b.model({"next": ["N", 7, 4, 4]})


def depthwise_model():
    b = Builder()
    expand = b.op("Clip", [b.conv("expand", "x", 3, 12, k=1), b.const("lo", 0.0), b.const("hi", 6.0)], "c1")
    dw = b.op("Clip", [b.conv("dw", expand, 12, 12, k=3, group=12), "lo", "hi"], "c2")
    b.conv("project", dw, 12, 5, k=1)
    return b.model({"project": ["N", 5, 8, 8]})


def gemm_model(gap: bool):
    b = Builder()
    h = b.op("Relu", [b.conv("c1", "x", 3, 6)], "r1")
    if gap:
        h = b.op("GlobalAveragePool", [h], "gap")
    flat = b.op("Flatten", [h], "flat", axis=1)
    features = 6 if gap else 6 * 64
    b.const("fc.w", b.rng.standard_normal((4, features)) * 0.1)
    b.const("fc.b", b.rng.standard_normal(4))
    b.nodes.append(helper.make_node("Gemm", [flat, "fc.w", "fc.b"], ["y"], name="fc", transB=1))
    return b.model({"y": ["N", 4]})


def option_a_model():
    """ResNet option-A shortcut: spatial Slice then a Pad of the channel axis, then Add."""
    b = Builder()
    stem = b.op("Relu", [b.conv("stem", "x", 3, 4)], "r0")
    branch = b.conv("c2", b.op("Relu", [b.conv("c1", stem, 4, 8)], "r1"), 8, 8)
    starts, ends = b.const("st", np.array([0, 0])), b.const("en", np.array([8, 8]))
    # int64 inputs for Slice/Pad
    b.inits[-2] = numpy_helper.from_array(np.array([0, 0], np.int64), "st")
    b.inits[-1] = numpy_helper.from_array(np.array([8, 8], np.int64), "en")
    b.inits.append(numpy_helper.from_array(np.array([2, 3], np.int64), "ax"))
    sliced = b.op("Slice", [stem, starts, ends, "ax"], "slice")
    b.inits.append(numpy_helper.from_array(np.array([0, 2, 0, 0, 0, 2, 0, 0], np.int64), "pads"))
    padded = b.op("Pad", [sliced, "pads"], "pad")
    b.op("Relu", [b.op("Add", [branch, padded], "add")], "out")
    return b.model({"out": ["N", 8, 8, 8]})


def _groups(model):
    graph = import_graph(prepare(model)[0])
    return graph, find_groups(graph)


def _feeds(seed=0, size=8):
    return {"x": np.random.default_rng(seed).standard_normal((2, 3, size, size)).astype(np.float32)}


def _zero_consumer_columns(model, group, removed) -> onnx.ModelProto:
    """Reference: the original model with the removed channels' consumer columns zeroed."""
    graph = import_graph(prepare(model)[0])
    fresh = group_of(find_groups(graph), group.name)
    for member in fresh.consumers:
        node = member.node
        weight = np.array(node.inputs[1].values)
        index = np.asarray(removed) + member.offset
        if node.op == "Conv":
            weight[:, index] = 0
        else:
            columns = (index[:, None] * member.block + np.arange(member.block)[None]).reshape(-1)
            if node.attrs.get("transB", 0):
                weight[:, columns] = 0
            else:
                weight[columns] = 0
        node.inputs[1].values = weight
    return export(graph, model)


def _check_pruned(model, producer, keep):
    graph, groups = _groups(model)
    group = group_of(groups, producer)
    assert group.prunable, group.describe()
    removed = np.setdiff1d(np.arange(group.channels), keep)
    apply_keep(graph, group, keep)
    pruned = export(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    assert [o.name for o in pruned.graph.output] == [o.name for o in model.graph.output]
    reference = _zero_consumer_columns(model, group, removed)
    feeds = _feeds()
    for got, expected in zip(run(pruned, feeds), run(reference, feeds)):
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    return pruned


def test_chain_group_members_and_rewrite():
    graph, groups = _groups(chain_model())
    group = group_of(groups, "c1")
    assert group.prunable and group.channels == 8
    assert [m.node.name for m in group.consumers] == ["c2"]
    assert {m.node.op for m in group.members} >= {"Relu", "BatchNormalization", "Mul", "MaxPool"}
    assert "c1" in group.describe() and "c2" in group.describe()
    assert group.to_json()["consumers"][0]["name"] == "c2"
    _check_pruned(chain_model(), "c1", [0, 2, 3, 7])


def test_residual_add_merges_producers():
    _, groups = _groups(residual_model())
    group = group_of(groups, "c2")
    assert {m.node.name for m in group.producers} == {"stem", "c2"}
    assert group.is_residual and group.prunable
    assert {m.node.name for m in group.consumers} == {"c1", "head"}
    inner = group_of(groups, "c1")
    assert [m.node.name for m in inner.producers] == ["c1"] and not inner.is_residual
    _check_pruned(residual_model(), "c1", [1, 4, 5])
    _check_pruned(residual_model(), "stem", [0, 1, 2, 6, 7])        # all members alike


def test_concat_offsets():
    _, groups = _groups(concat_model())
    first, second = group_of(groups, "e1"), group_of(groups, "e3")
    assert [(m.node.name, m.offset) for m in first.consumers] == [("next", 0)]
    assert [(m.node.name, m.offset) for m in second.consumers] == [("next", 6)]
    squeeze = group_of(groups, "squeeze")
    assert {m.node.name for m in squeeze.consumers} == {"e1", "e3"}
    _check_pruned(concat_model(), "e3", [0, 2, 4])
    _check_pruned(concat_model(), "e1", [1, 5])


def test_concat_offsets_follow_an_earlier_rewrite():
    model = concat_model()
    graph, groups = _groups(model)
    apply_keep(graph, group_of(groups, "e1"), [0, 1, 2])
    second = group_of(find_groups(graph), "e3")
    assert [(m.node.name, m.offset) for m in second.consumers] == [("next", 3)]
    apply_keep(graph, second, [1, 3])
    pruned = export(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    assert run(pruned, _feeds())[0].shape == (2, 7, 4, 4)


def test_depthwise_passes_channels_through():
    _, groups = _groups(depthwise_model())
    group = group_of(groups, "expand")
    assert [m.node.name for m in group.depthwise] == ["dw"]
    assert [m.node.name for m in group.consumers] == ["project"]
    pruned = _check_pruned(depthwise_model(), "expand", [0, 3, 4, 8, 11])
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 5


@pytest.mark.parametrize("gap", [True, False])
def test_flatten_gemm_columns(gap):
    _, groups = _groups(gemm_model(gap))
    group = group_of(groups, "c1")
    assert [(m.node.name, m.block) for m in group.consumers] == [("fc", 1 if gap else 64)]
    assert not group_of(groups, "fc").prunable        # graph output
    _check_pruned(gemm_model(gap), "c1", [0, 2, 5])


def test_option_a_shortcut_is_a_barrier():
    _, groups = _groups(option_a_model())
    residual = group_of(groups, "c2")
    assert not residual.prunable and "Pad" in residual.reason
    stem = group_of(groups, "stem")
    assert not stem.prunable and "Pad" in stem.reason          # stem feeds the channel Pad
    assert group_of(groups, "c1").prunable                      # the block interior stays prunable
    _check_pruned(option_a_model(), "c1", [0, 1, 5, 6])


def test_barriers_have_reasons():
    b = Builder()
    h = b.op("Relu", [b.conv("c1", "x", 3, 4)], "r1")
    b.inits.append(numpy_helper.from_array(np.array([0, 2, 16, 4], np.int64), "shape"))
    b.op("Reshape", [h, "shape"], "reshaped")
    model = b.model({"reshaped": ["N", 2, 16, 4]})
    _, groups = _groups(model)
    assert "Reshape" in group_of(groups, "c1").reason
    with pytest.raises(ValueError, match="cannot be pruned"):
        graph, groups = _groups(model)
        apply_keep(graph, group_of(groups, "c1"), [0])


def test_keeping_everything_is_an_exact_identity():
    model = small_cnn()
    graph, groups = _groups(model)
    for group in groups:
        if group.prunable:
            assert apply_keep(graph, group, np.arange(group.channels)) == 0
    pruned = export(graph, model)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    np.testing.assert_array_equal(run(pruned, feeds)[0], run(prepare(model)[0], feeds)[0])


def test_gather_sampler_keeping_everything_is_an_exact_identity():
    """A sampler with all channels (and the conv's own weights as 'refit') changes no output bit."""
    model = small_cnn()
    graph, _ = _groups(model)
    group = sampler_group(graph, "block.conv1")
    assert group.channels == 16 and not group.producers
    conv = group.consumers[0].node
    same = {"block.conv1": (np.array(conv.inputs[1].values), np.array(conv.inputs[2].values))}
    assert insert_sampler(graph, group, np.arange(16), same) == 0
    sampled = export(graph, model)
    assert [n.op_type for n in sampled.graph.node].count("Gather") == 1
    onnx.checker.check_model(sampled, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)}
    np.testing.assert_array_equal(run(sampled, feeds)[0], run(prepare(model)[0], feeds)[0])


def test_gather_sampler_selects_input_channels_and_leaves_the_shortcut_alone():
    """Sampling channels S of the residual stream for block.conv1 equals zeroing its other input
    columns; the stream itself (read by the Add and by 'down') keeps all 16 channels."""
    model = small_cnn()
    keep = np.array([0, 2, 3, 7, 8, 12, 13, 15])
    graph, _ = _groups(model)
    group = sampler_group(graph, "block.conv1")
    assert insert_sampler(graph, group, keep) == 8
    sampled = export(graph, model)
    onnx.checker.check_model(sampled, full_check=True)
    assert [i.name for i in sampled.graph.input] == ["x"] and [o.name for o in sampled.graph.output] == ["y"]
    conv = next(n for n in sampled.graph.node if n.name == "block.conv1")
    weight = next(t for t in sampled.graph.initializer if t.name == conv.input[1])
    assert list(weight.dims) == [16, 8, 3, 3]
    reference = import_graph(prepare(model)[0])
    node = next(n for n in reference.nodes if n.name == "block.conv1")
    zeroed = np.array(node.inputs[1].values)
    zeroed[:, np.setdiff1d(np.arange(16), keep)] = 0
    node.inputs[1].values = zeroed
    feeds = {"x": np.random.default_rng(1).standard_normal((3, 3, 12, 12)).astype(np.float32)}
    got, expected = run(sampled, feeds)[0], run(export(reference, model), feeds)[0]
    assert got.shape == (3, 10)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    stream = next(g for g in find_groups(import_graph(sampled)) if g.name == "stem")
    assert stream.channels == 16 and [m.node.name for m in stream.consumers] == ["down"]


@pytest.mark.parametrize("name,prunable_at_least", [
    ("cifar10_resnet20.onnx", 9), ("mobilenet_v2_1.0_224.onnx", 20), ("squeezenet1.1.onnx", 20)])
def test_real_models_analyse(name, prunable_at_least):
    model = onnx.load(shared_path(f"models/{name}"))
    _, groups = _groups(model)
    prunable = [g for g in groups if g.prunable and len(g.producers) == 1]
    assert len(prunable) >= prunable_at_least
    for group in groups:
        assert group.describe()
    if name.startswith("cifar10"):
        residual = [g for g in groups if g.is_residual]
        assert residual and all(not g.prunable for g in residual)
