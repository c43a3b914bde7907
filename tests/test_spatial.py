"""Spatial decomposition (k x 1 then 1 x k): exact at full rank, the fit, MACs, --method spatial."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run, shared_path, small_cnn
from test_cli import assert_user_error, onnxopt
from onnxopt.calib.stats import SufficientStats
from onnxopt.graph import export, import_graph, prepare
from onnxopt.layers import find_layers
from onnxopt.passes import prune, spatial


def _odd_conv() -> onnx.ModelProto:
    """One 3 x 5 conv with strides (2, 1), asymmetric pads and dilations (1, 2), bias."""
    rng = np.random.default_rng(3)
    weight = numpy_helper.from_array(rng.standard_normal((6, 4, 3, 5)).astype(np.float32), "w")
    bias = numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", kernel_shape=[3, 5], strides=[2, 1],
                            pads=[1, 3, 2, 1], dilations=[1, 2])
    graph = helper.make_graph([node], "odd", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 11, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("model", [_odd_conv(), small_cnn()], ids=["strided-dilated-3x5", "small-cnn"])
def test_full_rank_is_exact_through_onnxruntime_and_macs_are_counted_exactly(model):
    prepared, _ = prepare(model)
    graph = import_graph(prepared)
    layers = [layer for layer in find_layers(graph) if layer.op == "Conv" and min(layer.kernel) > 1]
    assert layers
    expected = {}
    for layer in layers:
        rank = spatial.full_rank(layer)
        expected[layer.name] = spatial.decomposed_macs(layer, rank)
        factors = spatial.solve_svd(layer.node.inputs[1].values, layer.bias_vector(), rank)
        np.testing.assert_allclose(factors.weight(), layer.node.inputs[1].values, atol=1e-5)
        spatial.rewrite(graph, layer, factors)
    rewritten = export(graph, prepared)
    onnx.checker.check_model(rewritten, full_check=True)
    shape = [2, *[d.dim_value or 12 for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_allclose(run(rewritten, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)
    new_layers = {layer.name: layer for layer in find_layers(import_graph(rewritten))}
    for name, macs in expected.items():
        pair = [new_layers[f"{name}/spatial_kx1"], new_layers[f"{name}/spatial_1xk"]]
        assert sum(layer.macs for layer in pair) == macs
        assert pair[0].kernel[1] == 1 and pair[1].kernel[0] == 1


def _statistics(weight, rng, rows=4000, noise=0.05):
    """Correlated input patches x, responses y = W x + b + noise: the statistics and the rows."""
    n = weight.shape[0]
    dim = weight[0].size
    x = rng.standard_normal((rows, dim)) @ (np.eye(dim) + 0.3 * rng.standard_normal((dim, dim))) + 0.5
    y = x @ weight.reshape(n, -1).T + 1.0 + noise * rng.standard_normal((rows, n))
    stats = SufficientStats(dim, n)
    stats.update(x, y)
    return prune.LinearStats(stats.sxx, stats.sxy, stats.syy, stats.mean_x, stats.mean_y, stats.n), x, y


def test_fit_recovers_a_separable_weight_exactly():
    rng = np.random.default_rng(1)
    weight = spatial.compose(rng.standard_normal((5, 6, 3)), rng.standard_normal((8, 5, 3)))   # rank 5 of 18
    stats, x, y = _statistics(weight, rng, noise=0.0)
    factors = spatial.solve(weight.shape, stats, 5)
    pred = x @ factors.weight().reshape(8, -1).T + factors.bias
    assert np.linalg.norm(pred - y) / np.linalg.norm(y) < 1e-5          # the ridge (1e-6 of the mean eigenvalue) only


def test_fit_beats_its_start_and_the_data_free_svd(monkeypatch):
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((16, 8, 3, 3))
    stats, x, y = _statistics(weight, rng)

    def error(factors):
        pred = x @ factors.weight().reshape(16, -1).T
        pred += (y - pred).mean(0) if factors.solver == "svd" else factors.bias       # svd: the best bias, to be fair
        return np.linalg.norm(pred - y) / np.linalg.norm(y)

    fitted = error(spatial.solve(weight.shape, stats, 8))
    monkeypatch.setattr(spatial, "ALS_ITERATIONS", 0)
    start = spatial.solve(weight.shape, stats, 8)
    # the start's H is exact least squares on the first conv's outputs (an intercept too)
    z = x @ spatial._features(start.vertical, 3).T
    design = np.hstack([z, np.ones((len(z), 1))])
    coef = np.linalg.lstsq(design, y, rcond=None)[0]
    np.testing.assert_allclose(start.horizontal.reshape(16, -1), coef[:-1].T, rtol=1e-3, atol=1e-4)   # up to the ridge
    np.testing.assert_allclose(start.bias, coef[-1], rtol=1e-3, atol=1e-4)
    data_free = error(spatial.solve_svd(weight, np.zeros(16), 8))
    assert fitted < 0.95 * error(start) < 0.95 * data_free


def test_applicability():
    prepared, _ = prepare(small_cnn())
    reasons = {layer.name: spatial.applicability(layer) for layer in find_layers(import_graph(prepared))}
    assert reasons["block.conv1"] is None and reasons["down"] is None
    assert "no k x k kernel" in reasons["fc"]


def test_spatial_method_from_the_command_line(tmp_path, small_model_file, small_calib_file):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = onnxopt("compress", small_model_file, "-o", out, "--method", "spatial", "--speedup", "1.3",
                     "--calib", small_calib_file, "--calib-size", "64", "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["macs_after"] * 1.3 <= data["macs_before"]
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(small_model_file)
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    kernels = {tuple(a.ints) for node in model.graph.node for a in node.attribute if a.name == "kernel_shape"}
    assert {(3, 1), (1, 3)} <= kernels
    decomposed = [layer for layer in data["layers"] if layer["rank"] is not None]
    assert decomposed and all(layer["error_after"] < 1 for layer in decomposed)
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert run(model, {"x": x})[0].shape == (2, 10)


def test_spatial_method_errors(tmp_path, small_model_file, small_calib_file):
    out = tmp_path / "out.onnx"
    common = ("compress", small_model_file, "-o", out, "--method", "spatial", "--speedup", "1.3")
    assert_user_error(onnxopt(*common), "--method spatial is data-driven", "--calib")
    assert_user_error(onnxopt(*common, "--calib", small_calib_file, "--allocation", "sensitivity"),
                      "energy or uniform", "sensitivity")
    assert_user_error(onnxopt(*common[:-1], "9", "--calib", small_calib_file), "out of reach", "lower --speedup")
    assert not out.exists()


@pytest.mark.skipif(not shared_path("models/cifar10_resnet20.onnx").exists(), reason="needs ../shared (ResNet-20 and CIFAR-10)")
def test_resnet20_keeps_its_accuracy_on_real_images(tmp_path):
    """Calibrated on CIFAR-10 train images, evaluated on 2,000 test images: at 1.5x fewer MACs
    the fitted decomposition loses under 2 points (0.78 on all 8,000 with 1,000 calibration
    images, README), the data-free SVD tens of points."""
    model = shared_path("models/cifar10_resnet20.onnx")
    drops = {}
    for solver in ("auto", "svd"):
        out = tmp_path / f"{solver}.onnx"
        result = onnxopt("compress", model, "-o", out, "--method", "spatial", "--solver", solver, "--speedup", "1.5",
                         "--calib", shared_path("data/cifar10/train"), "--preset", "cifar10", "--calib-size", "500")
        assert result.returncode == 0, result.stderr
        scores = []
        for path in (out, model):
            evaluated = onnxopt("eval", path, "--data", shared_path("data/cifar10/test"), "--preset", "cifar10",
                                "--limit", "2000", "--json")
            assert evaluated.returncode == 0, evaluated.stderr
            scores.append(json.loads(evaluated.stdout)["top1"])
        drops[solver] = 100 * (scores[1] - scores[0])
    assert drops["auto"] < 2.0 and drops["svd"] > 10, drops
