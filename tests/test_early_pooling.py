"""Global average pooling moved ahead of 1x1 convolutions (--pool-early): exact where no
activation is crossed, the fitted response, the choice between responses, the CLI, SqueezeNet."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import ROOT, run, shared_path, small_cnn
from test_cli import assert_user_error, onnxopt
from onnxopt.calib.capture import submodel
from onnxopt.calib.readers import DataSource, InputSpec
from onnxopt.graph import export, import_graph, prepare
from onnxopt.layers import find_layers
from onnxopt.passes import early_pooling
from onnxopt.pipeline import CompressOptions
from onnxopt.pooling_pipeline import pool_early

SIZE = 6


def head_model(activation: bool = True, pool: str = "global", seed: int = 0) -> onnx.ModelProto:
    """x [N, 8, 6, 6] -> 3x3 conv -> Relu -> 1x1 "expand" (8 -> 32) [-> Clip(0, 6)] -> 1x1
    "project" (32 -> 24) -> pooling -> Flatten -> Gemm "fc" (24 -> 10)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("stem.w", rng.standard_normal((8, 8, 3, 3)) * 0.3), ("stem.b", rng.standard_normal(8) * 0.1),
        ("expand.w", rng.standard_normal((32, 8, 1, 1)) * 0.5), ("expand.b", rng.standard_normal(32) * 0.5 + 0.5),
        ("project.w", rng.standard_normal((24, 32, 1, 1)) * 0.3), ("project.b", rng.standard_normal(24) * 0.1),
        ("fc.w", rng.standard_normal((10, 24)) * 0.5), ("fc.b", rng.standard_normal(10) * 0.1),
        ("lo", np.array(0.0)), ("hi", np.array(6.0)))]
    nodes = [helper.make_node("Conv", ["x", "stem.w", "stem.b"], ["s"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["s"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "expand.w", "expand.b"], ["e"], name="expand", kernel_shape=[1, 1])]
    expanded = "e"
    if activation:
        nodes.append(helper.make_node("Clip", ["e", "lo", "hi"], ["ec"], name="clip"))
        expanded = "ec"
    nodes.append(helper.make_node("Conv", [expanded, "project.w", "project.b"], ["p"], name="project", kernel_shape=[1, 1]))
    if pool == "global":
        nodes.append(helper.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"))
    else:
        nodes.append(helper.make_node("AveragePool", ["p"], ["g"], name="gap", kernel_shape=[SIZE, SIZE]))
    nodes += [helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
              helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], name="fc", transB=1)]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, SIZE, SIZE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _images(count: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 8, SIZE, SIZE)).astype(np.float32)


def _source(count: int, seed: int = 1) -> DataSource:
    return DataSource([InputSpec("x", ["N", 8, SIZE, SIZE])], arrays={"x": _images(count, seed)}, description="test")


def _macs(model: onnx.ModelProto) -> dict[str, int]:
    return {layer.name: layer.macs for layer in find_layers(import_graph(prepare(model)[0]))}


@pytest.mark.parametrize("pool", ["global", "average"])
def test_pooling_first_is_exact_through_linear_1x1_convs(pool):
    model = head_model(activation=False, pool=pool)
    prepared, _ = prepare(model)
    graph = import_graph(prepared)
    heads = early_pooling.find_heads(graph)
    assert [[node.name for node in head.chain] for head in heads] == [["expand", "project"]]
    assert heads[0].spatial == SIZE * SIZE and heads[0].source.name == "r"
    early_pooling.rewrite(graph, heads[0])
    rewritten = export(graph, prepared)
    onnx.checker.check_model(rewritten, full_check=True)
    x = _images(4, seed=7)
    np.testing.assert_allclose(run(rewritten, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-5, atol=1e-5)
    before, after = _macs(model), _macs(rewritten)
    for name in ("expand", "project"):
        assert after[name] * SIZE * SIZE == before[name]
    assert after["stem"] == before["stem"] and after["fc"] == before["fc"]


def test_find_heads_stops_where_the_mean_does_not_commute():
    prepared, _ = prepare(head_model())
    assert [node.name for node in early_pooling.find_heads(import_graph(prepared))[0].chain] == ["expand", "clip", "project"]
    # a window smaller than the map is not a global mean
    partial = head_model(pool="average")
    partial.graph.node[5].attribute[0].ints[:] = [3, 3]
    assert early_pooling.find_heads(import_graph(prepare(partial)[0])) == []
    # a tensor read twice cannot move: the chain starts after it
    branched = head_model()
    branched.graph.node.append(helper.make_node("Identity", ["ec"], ["extra"], name="tap"))
    branched.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    heads = early_pooling.find_heads(import_graph(prepare(branched)[0]))
    assert [[node.name for node in head.chain] for head in heads] == [["project"]]
    # a 3x3 conv before the pooling (conv 3x3 -> Relu -> GAP): nothing to move
    assert early_pooling.find_heads(import_graph(prepare(small_cnn())[0])) == []


def test_fit_response_recovers_a_known_response():
    rng = np.random.default_rng(4)
    u = rng.standard_normal((300, 7)) * 4 + 2
    scale, linear, offset = rng.standard_normal((3, 7))
    hinges = rng.standard_normal((7, 2))
    knots = np.stack([np.percentile(u, 25, axis=0), np.percentile(u, 75, axis=0)], axis=1)
    phi = lambda v: np.clip(v, 0, 6)  # noqa: E731
    target = scale * phi(u) + linear * u + offset + sum(hinges[:, k] * np.maximum(u - knots[:, k], 0) for k in range(2))
    response = early_pooling.fit_response(phi, u, target)
    np.testing.assert_allclose(response.knots, knots)
    np.testing.assert_allclose(response.scale, scale, atol=1e-6)
    np.testing.assert_allclose(response.linear, linear, atol=1e-6)
    np.testing.assert_allclose(response.offset, offset, atol=1e-6)
    np.testing.assert_allclose(response.hinges, hinges, atol=1e-6)
    np.testing.assert_allclose(early_pooling.respond(phi, u, response), target, atol=1e-6)


def test_fitted_rewrite_runs_in_onnxruntime_as_the_numpy_head():
    model = head_model()
    prepared, _ = prepare(model)
    graph = import_graph(prepared)
    head = early_pooling.find_heads(graph)[0]
    rng = np.random.default_rng(2)
    responses = {"clip": early_pooling.Response(*(rng.standard_normal((3, 32))), knots=rng.standard_normal((32, 2)),
                                                hinges=rng.standard_normal((32, 2)))}
    x = _images(5, seed=3)
    source = run(submodel(prepared, ["x"], ["r"]), {"x": x})[0].mean(axis=(2, 3))
    fc = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    expected = early_pooling.run_head(head, source, responses) @ fc["fc.w"].T.astype(np.float64) + fc["fc.b"]
    early_pooling.rewrite(graph, head, responses)
    rewritten = export(graph, prepared)
    onnx.checker.check_model(rewritten, full_check=True)
    np.testing.assert_allclose(run(rewritten, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)
    ops = [node.op_type for node in rewritten.graph.node]
    assert ops.count("GlobalAveragePool") == 1 and ops.index("GlobalAveragePool") < ops.index("Clip")


def test_pool_early_keeps_the_response_that_moves_the_outputs_less():
    model = head_model()
    result = pool_early(model, _source(96), _source(32, seed=9), CompressOptions(speedup=1.5))
    measured = {c["response"]: c for c in result.pooling["candidates"]}
    assert set(measured) == {"data-free", "fitted"}
    assert result.pooling["response"] == min(measured, key=lambda kind: measured[kind]["kl"])
    assert result.verification.kl == pytest.approx(measured[result.pooling["response"]]["kl"])
    # the fitted response is the better one here: Clip(0, 6) bends both ways and the fit sees it
    assert measured["fitted"]["kl"] < measured["data-free"]["kl"]
    before = _macs(model)
    assert result.macs_before == sum(before.values())
    assert result.macs_after == result.macs_before - (before["expand"] + before["project"]) * (1 - 1 / SIZE ** 2)
    rows = {row.name: row for row in result.layers}
    assert rows["expand"].solver.startswith("pooled first") and "fitted response of clip" in rows["expand"].solver
    assert rows["stem"].solver is None and rows["stem"].macs_after == rows["stem"].macs_before
    # without calibration data: data-free, exact shapes, nothing measured
    free = pool_early(model, None, None, CompressOptions(speedup=1.5))
    assert free.pooling["response"] == "data-free" and free.verification.samples == 0


def test_pool_early_from_the_command_line(tmp_path, small_model_file):
    model_file, calib = tmp_path / "head.onnx", tmp_path / "calib.npz"
    onnx.save(head_model(), model_file)
    np.savez(calib, x=_images(120))
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    common = ("compress", model_file, "-o", out, "--calib", calib, "--calib-size", "96", "--report", report)
    inspected = json.loads(onnxopt("inspect", model_file, "--json").stdout)["early_pooling"]
    assert [entry["macs_saved"] for entry in inspected] == [(8 + 24) * 32 * (SIZE * SIZE - 1)]
    # pooling first gives 2.6x; pruning does the rest of 3x
    result = onnxopt(*common, "--method", "prune", "--speedup", "3", "--pool-early", "yes")
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["pool_early"] == "yes" and data["early_pooling"]["response"] in ("data-free", "fitted")
    assert data["macs_after"] * 3 <= data["macs_before"]
    rows = {row["name"]: row for row in data["layers"]}
    assert rows["project"]["solver"].startswith("pooled first")
    assert rows["stem"]["macs_after"] < rows["stem"]["macs_before"] and rows["stem"]["rank"] < 8      # pruned
    compressed = onnx.load(out)
    onnx.checker.check_model(compressed, full_check=True)
    assert run(compressed, {"x": _images(2)})[0].shape == (2, 10)
    # --method auto weighs it by default: both heads' candidates are measured
    result = onnxopt(*common, "--method", "auto", "--speedup", "1.3")
    assert result.returncode == 0, result.stderr
    candidates = json.loads(report.read_text())["auto"]["candidates"]
    assert {c["pooled_first"] for c in candidates} == {True, False}
    assert sum(c.get("chosen", False) for c in candidates) == 1
    # bad input: nothing to pool, an unknown choice; nothing written
    out.unlink()
    assert_user_error(onnxopt("compress", small_model_file, "-o", out, "--method", "filter-l1", "--speedup", "1.3",
                              "--pool-early", "yes"), "nothing to pool early", "--pool-early yes")
    assert_user_error(onnxopt(*common, "--speedup", "1.3", "--pool-early", "maybe"), "unknown --pool-early", "auto, yes, no")
    assert not out.exists()


def test_squeezenet_pooled_first_loses_little_on_real_photos(tmp_path):
    """SqueezeNet 1.1's classifier conv (25% of the MACs) pooled first: 1.33x fewer MACs for a
    drop of 0.57 points on the 350 evaluation photos (README). Calibrated on the other half."""
    model_path = shared_path("models/squeezenet1.1.onnx")
    sample = shared_path("data/imagenet-sample")
    spec = importlib.util.spec_from_file_location("imagenet_split", ROOT / "benchmarks" / "imagenet_split.py")
    split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(split)
    calib_folder, eval_folder = split.make_split(tmp_path / "split", Path(sample))
    from onnxopt.calib.readers import PRESETS, open_source
    from onnxopt.evaluate import evaluate
    from onnxopt.graph import load_model

    model = load_model(model_path)
    inputs = [InputSpec(i.name, [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim]) for i in model.graph.input]
    calib = open_source(str(calib_folder), inputs, PRESETS["imagenet"])
    result = pool_early(model, calib.subset(range(100)), calib.subset(range(100, 150)), CompressOptions(speedup=1.3))
    assert result.macs_before / result.macs_after == pytest.approx(349151936 / 263135936)
    paired = evaluate(result.model, inputs, eval_folder, PRESETS["imagenet"], ROOT.parent / "shared" / "data" / "imagenet_synsets.txt",
                      baseline=model)
    assert paired.baseline.top1 > 0.55
    assert paired.drop_points <= 1.5, paired.to_json()
    assert paired.top1_agreement >= 0.93
