"""Block reconstruction (``passes.block_fit``): the PyTorch interpreter agrees with onnxruntime,
cuts are where every path passes, and the fit brings a damaged model back toward the original."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import run, shared_path, small_cnn
from onnxopt.errors import UserError
from onnxopt.graph import prepare
from test_channel_groups import Builder, concat_model, depthwise_model, option_a_model, residual_model

torch = pytest.importorskip("torch", reason="block reconstruction needs PyTorch (pip install -e '.[reconstruct]')")
from onnxopt.passes import block_fit  # noqa: E402


def _everything_model() -> onnx.ModelProto:
    """Most of BLOCK_OPS in one graph: asymmetric pads, pools with padding, Gather, Slice, Pad."""
    b = Builder(size=9)
    c = b.op("Clip", [b.conv("c1", "x", 3, 8), b.const("lo", 0.0), b.const("hi", 6.0)], "clip")
    b.nodes.append(onnx.helper.make_node("Conv", [c, b.const("c2.w", b.rng.standard_normal((6, 8, 3, 3)) * 0.2)], ["c2"],
                                         name="c2", kernel_shape=[3, 3], pads=[0, 1, 1, 0], strides=[2, 2]))
    b.inits.append(numpy_helper.from_array(np.array([5, 0, 2, 3], np.int64), "idx"))
    g = b.op("Gather", ["c2", "idx"], "gather", axis=1)
    leaky = b.op("LeakyRelu", [g], "leaky", alpha=0.1)
    mp = b.op("MaxPool", [leaky], "mp", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    ap = b.op("AveragePool", [leaky], "ap", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=1)
    cat = b.op("Concat", [mp, ap], "cat", axis=1)
    for name, values in (("st", [0]), ("en", [3]), ("ax", [1]), ("pads", [0, 1, 0, 0, 0, 2, 0, 0])):
        b.inits.append(numpy_helper.from_array(np.array(values, np.int64), name))
    sliced = b.op("Slice", [cat, "st", "en", "ax"], "slice")
    padded = b.op("Pad", [sliced, "pads"], "pad")
    s = b.op("Sigmoid", [b.op("Mul", [padded, b.const("k", 0.5)], "mul")], "sig")
    gap = b.op("GlobalAveragePool", [s], "gap")
    flat = b.op("Flatten", [gap], "flat", axis=1)
    b.const("fc.w", b.rng.standard_normal((6, 4)))
    b.const("fc.b", b.rng.standard_normal(4))
    b.nodes.append(onnx.helper.make_node("Gemm", [flat, "fc.w", "fc.b"], ["y"], name="fc"))
    return b.model({"y": ["N", 4]})


def _torch_run(model, x):
    constants = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    block = block_fit.OnnxBlock(list(model.graph.node), constants, ["x"], [o.name for o in model.graph.output], trainable=False)
    with torch.no_grad():
        return [y.numpy() for y in block(torch.from_numpy(x))]


@pytest.mark.parametrize("make", [_everything_model, residual_model, concat_model, depthwise_model, option_a_model,
                                  lambda: prepare(small_cnn())[0]])
def test_interpreter_agrees_with_onnxruntime(make):
    model = make()
    size = model.graph.input[0].type.tensor_type.shape.dim[2].dim_value
    x = np.random.default_rng(1).standard_normal((3, 3, size, size)).astype(np.float32)
    for ours, reference in zip(_torch_run(model, x), run(model, {"x": x})):
        np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)


def test_interpreter_runs_resnet20_with_its_computed_shortcut_pads():
    """The CIFAR ResNets' option-A shortcuts pad channels by pads computed from constants
    (ConstantOfShape, Concat, Slice with step -1, Transpose, Cast): folded once, then run."""
    path = shared_path("models/cifar10_resnet20.onnx")
    model = onnx.load(path)
    prepared, _ = prepare(model, {model.graph.input[0].name: (3, 32, 32)})
    name = prepared.graph.input[0].name
    assert {"ConstantOfShape", "Pad"} <= {node.op_type for node in prepared.graph.node}
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    constants = {t.name: numpy_helper.to_array(t) for t in prepared.graph.initializer}
    block = block_fit.OnnxBlock(list(prepared.graph.node), constants, [name], [prepared.graph.output[0].name], trainable=False)
    with torch.no_grad():
        ours = block(torch.from_numpy(x))[0].numpy()
    np.testing.assert_allclose(ours, run(prepared, {name: x})[0], rtol=1e-4, atol=1e-4)


def test_images_within_the_memory_budget():
    from onnxopt.block_pipeline import images_within

    original = prepare(small_cnn())[0]
    per_image = 4 * 4 * 16 * 12 * 12          # four float32 copies of the largest boundary, [16, 12, 12]
    assert images_within(original, original, 100 * per_image, 1000) == 100
    assert images_within(original, original, 100 * per_image, 50) == 50
    assert images_within(original, original, 1, 1000) == 8


def test_cuts_are_where_every_path_passes():
    cuts = block_fit.cuts(prepare(small_cnn())[0])
    assert "r0" in cuts and "r2" in cuts                 # the residual block's input and output
    assert "r1" not in cuts and "block.conv2.out" not in cuts   # inside it the shortcut is live too
    assert "y" not in cuts                                 # graph outputs are not cuts
    assert len(cuts) == len(set(cuts))


def test_what_is_computed_from_constants_alone_does_not_break_cuts():
    """A constant computed at the start and read at the end (an exporter's shape arithmetic)
    is not live in between."""
    model = prepare(small_cnn())[0]
    gemm = next(node for node in model.graph.node if node.op_type == "Gemm")
    gemm.input[2] = "fc.b.copy"
    model.graph.node.insert(0, onnx.helper.make_node("Identity", ["fc.b"], ["fc.b.copy"], name="copy"))
    assert {"r0", "r2"} <= set(block_fit.cuts(model))


def test_an_op_it_cannot_run_is_a_one_line_error():
    model = prepare(small_cnn())[0]
    node = onnx.helper.make_node("Erf", ["r3"], ["erf"], name="erf")
    with pytest.raises(UserError, match="cannot run op Erf.*--reconstruct ls"):
        block_fit.OnnxBlock([node], {}, ["r3"], ["erf"], trainable=True)


def _damaged(model: onnx.ModelProto, scale: float, seed: int = 3) -> onnx.ModelProto:
    """The model with noise added to every conv weight of the residual block."""
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    rng = np.random.default_rng(seed)
    for tensor in damaged.graph.initializer:
        if tensor.name in ("block.conv1.w", "block.conv2.w"):
            w = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array((w + scale * rng.standard_normal(w.shape) * w.std()).astype(np.float32),
                                                    tensor.name))
    return damaged


def _relative_error(model, reference, x):
    y, t = run(model, {"x": x})[0], run(reference, {"x": x})[0]
    return float(((y - t) ** 2).sum() / (t ** 2).sum())


def test_fit_brings_a_damaged_block_back_toward_the_original():
    original = prepare(small_cnn())[0]
    damaged = _damaged(original, 0.5)
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((64, 3, 12, 12)).astype(np.float32)}
    test = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    fitted, fits = block_fit.reconstruct_blocks(original, damaged, calib,
                                                block_fit.BlockFitOptions(steps=200, span=1, check_every=20))
    onnx.checker.check_model(fitted, full_check=True)
    # the damaged block, and every block after it (its input drifted), are fitted; the stem is not
    assert [fit.output for fit in fits] == ["r2", "flat", "y"]
    # the classifier's logits are fitted on the KL divergence of the class distributions, the rest on squared error
    assert [fit.loss for fit in fits] == ["relative_l2", "relative_l2", "kl"]
    assert all(fit.loss_after <= fit.loss_before for fit in fits)
    before, after = _relative_error(damaged, original, test), _relative_error(fitted, original, test)
    assert after < 0.5 * before, (before, after)
    # only Conv/Gemm weights and biases changed; the stem's are untouched
    changed = {a.name for a, b in zip(damaged.graph.initializer, fitted.graph.initializer)
               if not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))}
    assert changed and changed <= {"block.conv1.w", "block.conv1.b", "block.conv2.w", "block.conv2.b", "down.w", "down.b",
                                   "fc.w", "fc.b"}


def test_the_logits_objective_is_the_kl_divergence_of_the_class_distributions():
    rng = np.random.default_rng(0)
    t, y = rng.standard_normal((5, 7)), rng.standard_normal((5, 7))
    p, q = np.exp(t) / np.exp(t).sum(1, keepdims=True), np.exp(y) / np.exp(y).sum(1, keepdims=True)
    expected = float((p * np.log(p / q)).sum())
    targets = block_fit._Data([torch.tensor(t)])
    objective = block_fit._Objective(targets, np.arange(5), classifier=True)
    assert float(objective.summed([torch.tensor(y)], [torch.tensor(t)])) == pytest.approx(expected, rel=1e-9)
    squared = block_fit._Objective(targets, np.arange(5), classifier=False)     # relative to the mean energy per image
    assert float(squared.summed([torch.tensor(y)], [torch.tensor(t)])) == pytest.approx(((y - t) ** 2).sum() / ((t ** 2).sum() / 5))


def test_a_span_fits_consecutive_blocks_as_one():
    original = prepare(small_cnn())[0]
    damaged = _damaged(original, 0.5)
    assert block_fit.block_ends(original, damaged) == [["r0"], ["r2"], ["flat"], ["y"]]
    assert block_fit.block_ends(original, damaged, span=2) == [["r2"], ["y"]]
    assert block_fit.block_ends(original, damaged, span=99) == [["y"]]
    # stages: r0 and r2 are 12x12 (the residual block keeps the size), flat is pooled (the same stage)
    assert block_fit.block_ends(original, damaged, span="stage") == [["flat"], ["y"]]
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((64, 3, 12, 12)).astype(np.float32)}
    test = rng.standard_normal((64, 3, 12, 12)).astype(np.float32)
    fitted, fits = block_fit.reconstruct_blocks(original, damaged, calib,
                                                block_fit.BlockFitOptions(steps=200, span=99, check_every=20))
    # one block from the input to the output: the stem is in it, so its weights may change too
    assert [(fit.output, fit.nodes) for fit in fits] == [("y", len(damaged.graph.node))]
    assert fits[0].loss_after < fits[0].loss_before
    assert _relative_error(fitted, original, test) < 0.5 * _relative_error(damaged, original, test)


def test_an_unchanged_model_is_returned_as_it_was():
    original = prepare(small_cnn())[0]
    calib = {"x": np.random.default_rng(0).standard_normal((16, 3, 12, 12)).astype(np.float32)}
    fitted, fits = block_fit.reconstruct_blocks(original, original, calib, block_fit.BlockFitOptions(steps=10))
    assert fits == []
    assert fitted.SerializeToString() == original.SerializeToString()


def test_without_torch_it_says_what_to_install(monkeypatch):
    monkeypatch.setattr(block_fit, "torch", None)
    with pytest.raises(UserError, match=r"pip install 'onnxopt\[reconstruct\]'"):
        block_fit.require_torch()


def test_compress_reconstruct_block_from_the_command_line(tmp_path, small_model_file, small_calib_file):
    from test_cli import assert_user_error, onnxopt

    common = ["compress", small_model_file, "--method", "prune", "--speedup", "1.5", "--calib", small_calib_file]
    plain, fitted, report = tmp_path / "ls.onnx", tmp_path / "block.onnx", tmp_path / "block.json"
    assert onnxopt(*common, "-o", plain).returncode == 0
    result = onnxopt(*common, "-o", fitted, "--reconstruct", "block", "--reconstruct-steps", "40", "--reconstruct-lr", "0.005",
                     "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["reconstruct"] == "block"
    assert data["block_reconstruction"]["lr"] == 0.005 and data["block_reconstruction"]["steps"] == 40
    blocks = data["block_reconstruction"]["blocks"]
    assert blocks and all(b["loss_after"] <= b["loss_before"] for b in blocks)
    assert any(b["loss_after"] < b["loss_before"] for b in blocks)
    # the same pruned shapes as without it, other weights
    ls_model, block_model = onnx.load(plain), onnx.load(fitted)
    onnx.checker.check_model(block_model, full_check=True)
    assert [t.dims for t in ls_model.graph.initializer] == [t.dims for t in block_model.graph.initializer]
    assert any(not np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
               for a, b in zip(ls_model.graph.initializer, block_model.graph.initializer))
    assert block_model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"

    assert_user_error(onnxopt(*common, "-o", tmp_path / "x.onnx", "--reconstruct", "adam"), "unknown --reconstruct 'adam'")
    assert_user_error(onnxopt(*common, "-o", tmp_path / "x.onnx", "--reconstruct", "block", "--reconstruct-span", "0"),
                      "--reconstruct-span must be stage or a whole number")
    assert_user_error(onnxopt(*common, "-o", tmp_path / "x.onnx", "--reconstruct", "block", "--reconstruct-lr", "0"),
                      "--reconstruct-lr must be a relative step size above 0")
    assert_user_error(onnxopt("compress", small_model_file, "-o", tmp_path / "y.onnx", "--method", "filter-std",
                              "--speedup", "1.5", "--reconstruct", "block"), "--reconstruct block", "--calib")
    assert not (tmp_path / "x.onnx").exists() and not (tmp_path / "y.onnx").exists()
