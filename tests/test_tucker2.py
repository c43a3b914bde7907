"""Tucker-2 / SVD decomposition (MUSCO): exact at full rank, shapes, MACs, and --method tucker2."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run, small_cnn
from test_cli import assert_user_error, onnxopt
from onnxopt.calib.readers import DataSource, InputSpec
from onnxopt.errors import UserError
from onnxopt.graph import export, import_graph, prepare
from onnxopt.layers import find_layers
from onnxopt.passes import tucker2
from onnxopt.pipeline import CompressOptions, compress


def _prepared(model):
    prepared, _ = prepare(model)
    graph = import_graph(prepared)
    return prepared, graph, find_layers(graph)


def _images(count=8, seed=0):
    return np.random.default_rng(seed).standard_normal((count, 3, 12, 12)).astype(np.float32)


def test_full_rank_is_exact_through_onnxruntime_also_after_a_second_stage():
    model = small_cnn()
    prepared, graph, layers = _prepared(model)
    for layer in layers:
        start = tucker2.Decomposition.of(layer)
        once = tucker2.redecompose(start, *start.ranks)
        twice = tucker2.redecompose(once, *once.ranks)            # MUSCO: decompose the core again
        np.testing.assert_allclose(twice.weight(), start.weight(), atol=1e-10)
        tucker2.rewrite(graph, layer, [layer.node], twice)
    x = _images()
    np.testing.assert_allclose(run(export(graph, prepared), {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_rewrite_shapes_and_macs_formula():
    model = small_cnn()
    prepared, graph, layers = _prepared(model)
    ranks = {"block.conv1": (6, 5), "down": (7, 4), "fc": (3, None), "stem": (4, 2)}
    expected = {}
    for layer in layers:
        if layer.name not in ranks:
            continue
        decomposition = tucker2.redecompose(tucker2.Decomposition.of(layer), *ranks[layer.name])
        expected[layer.name] = tucker2.decomposed_macs(layer, *ranks[layer.name])
        nodes = tucker2.rewrite(graph, layer, [layer.node], decomposition)
        assert len(nodes) == (3 if layer.op == "Conv" else 2)
    rewritten = find_layers(import_graph(prepare(export(graph, prepared))[0]))
    by_name = {layer.name: layer for layer in rewritten}
    down_in, down_core, down_out = (by_name[f"down/tucker2_{part}"] for part in ("in", "core", "out"))
    assert (down_in.in_channels, down_in.out_channels, down_in.kernel, down_in.strides) == (16, 4, (1, 1), (1, 1))
    assert (down_core.in_channels, down_core.out_channels, down_core.kernel, down_core.strides) == (4, 7, (3, 3), (2, 2))
    assert (down_out.in_channels, down_out.out_channels, down_out.kernel, down_out.has_bias) == (7, 32, (1, 1), True)
    assert (by_name["fc/svd_in"].out_channels, by_name["fc/svd_out"].out_channels) == (3, 10)
    for name, macs in expected.items():
        measured = sum(layer.macs for layer in rewritten if layer.name.startswith(name + "/"))
        assert measured == macs, name
    # the formula itself: in 1x1 at the input size, core and out 1x1 at the (strided) output size
    assert expected["down"] == 12 * 12 * 16 * 4 + 6 * 6 * (7 * 4 * 9 + 32 * 7)


def test_hooi_beats_truncated_hosvd_and_error_falls_with_rank():
    rng = np.random.default_rng(0)
    tensor = np.einsum("ab kl,oa,ib->oikl".replace(" ", ""), rng.standard_normal((6, 6, 3, 3)),
                       rng.standard_normal((20, 6)), rng.standard_normal((12, 6))) + 0.3 * rng.standard_normal((20, 12, 3, 3))
    errors = []
    for rank in (2, 4, 6, 8):
        u_out, core, u_in = tucker2.hooi(tensor, rank, rank)
        approx = np.einsum("abkl,oa,ib->oikl", core, u_out, u_in)
        errors.append(np.linalg.norm(tensor - approx))
        hosvd_out = np.linalg.svd(tucker2.unfold(tensor, 0))[0][:, :rank]
        hosvd_in = np.linalg.svd(tucker2.unfold(tensor, 1))[0][:, :rank]
        hosvd = np.einsum("oikl,oa,ib,pa,jb->pjkl", tensor, hosvd_out, hosvd_in, hosvd_out, hosvd_in, optimize=True)
        assert errors[-1] <= np.linalg.norm(tensor - hosvd) + 1e-9
    assert errors == sorted(errors, reverse=True)


def _grouped_model():
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name) for name, shape in
             (("g.w", (8, 2, 3, 3)), ("dw.w", (8, 1, 3, 3)), ("pw.w", (16, 8, 3, 3)))]
    nodes = [helper.make_node("Conv", ["x", "g.w"], ["g"], name="grouped", group=2, pads=[1] * 4),
             helper.make_node("Conv", ["g", "dw.w"], ["d"], name="depthwise", group=8, pads=[1] * 4),
             helper.make_node("Conv", ["d", "pw.w"], ["y"], name="full", pads=[1] * 4)]
    graph = helper.make_graph(nodes, "grouped", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 8, 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


def test_grouped_and_depthwise_convs_are_skipped_with_a_reason():
    model = _grouped_model()
    _, _, layers = _prepared(model)
    reasons = {layer.name: tucker2.applicability(layer) for layer in layers}
    assert "grouped conv (group=2)" in reasons["grouped"]
    assert "depthwise" in reasons["depthwise"]
    assert reasons["full"] is None
    data = DataSource([InputSpec("x", ["N", 4, 8, 8])], arrays={"x": np.random.default_rng(1).standard_normal((40, 4, 8, 8)).astype(np.float32)})
    result = compress(model, data, data.subset(range(8)), CompressOptions(speedup=None, method="tucker2", vbmf_weaken=1.0))
    rows = {row.name: row for row in result.layers}
    assert "grouped conv" in rows["grouped"].skipped and "depthwise" in rows["depthwise"].skipped


def _small_data(count=96):
    return DataSource([InputSpec("x", ["N", 3, 12, 12])], arrays={"x": _images(count, seed=1)})


def test_compress_meets_the_speedup_in_stages_and_reports_vbmf_ranks():
    model = small_cnn()
    data = _small_data()
    result = compress(model, data, _small_data(16), CompressOptions(speedup=2.0, method="tucker2", compression_stages=2))
    assert 2.0 <= result.macs_before / result.macs_after < 2.3
    assert result.compression_stages == 2
    decomposed = [row for row in result.layers if row.rank is not None]
    assert decomposed and all(row.error_after <= row.error_before + 1e-9 for row in decomposed)
    for row in result.layers:
        if row.name == "fc":            # the classifier's scores are left alone (--factorize-classifier)
            assert "class scores" in row.skipped and not row.stages
            continue
        assert [entry["stage"] for entry in row.stages] == [1, 2]
        assert all("vbmf" in entry and "weakened" in entry for entry in row.stages)
    report = result.to_json()
    assert "fine-tuning" in report["tucker2"]["refit"]
    # the written model computes what the report says: its MACs, and outputs close to the original
    layers = find_layers(import_graph(prepare(result.model)[0]))
    assert sum(layer.macs for layer in layers) == result.macs_after
    x = _images(16, seed=5)
    original, compressed = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    assert np.linalg.norm(compressed - original) / np.linalg.norm(original) < 0.5


def test_without_speedup_ranks_come_from_vbmf_alone():
    rng = np.random.default_rng(0)
    model = small_cnn()
    for init in model.graph.initializer:                # make block.conv1 nearly rank 4 on both channel modes
        if init.name == "block.conv1.w":
            low = np.einsum("abkl,oa,ib->oikl", rng.standard_normal((4, 4, 3, 3)), rng.standard_normal((16, 4)),
                            rng.standard_normal((16, 4))) * 0.1 + 0.001 * rng.standard_normal((16, 16, 3, 3))
            init.CopyFrom(numpy_helper.from_array(low.astype(np.float32), init.name))
    result = compress(model, _small_data(), _small_data(8), CompressOptions(speedup=None, method="tucker2", vbmf_weaken=1.0))
    rows = {row.name: row for row in result.layers}
    assert rows["block.conv1"].stages[0]["vbmf"] == [4, 4]
    assert (rows["block.conv1"].rank, rows["block.conv1"].rank_in) == (8, 8)   # MUSCO's floor of 8
    assert rows["block.conv2"].skipped and rows["block.conv2"].stages[0]["guard"]   # random weights: EVBMF rank 0, kept


def test_unreachable_speedup_and_bad_options_are_user_errors():
    with pytest.raises(UserError, match="out of reach"):
        compress(small_cnn(), _small_data(), _small_data(8), CompressOptions(speedup=1000.0, method="tucker2"))
    with pytest.raises(UserError, match="--vbmf-weaken"):
        compress(small_cnn(), _small_data(), _small_data(8), CompressOptions(speedup=None, method="tucker2", vbmf_weaken=1.5))
    with pytest.raises(UserError, match="--stages"):
        compress(small_cnn(), _small_data(), _small_data(8), CompressOptions(speedup=None, method="tucker2", compression_stages=0))


def test_cli_speedup_optional_for_tucker2_only(tmp_path, small_model_file, small_calib_file):
    out = tmp_path / "out.onnx"
    result = onnxopt("compress", small_model_file, "-o", out, "--method", "lowrank", "--calib", small_calib_file)
    assert_user_error(result, "give --speedup")
    assert not out.exists()
    assert_user_error(onnxopt("compress", small_model_file, "-o", out, "--method", "tucker2", "--calib", small_calib_file,
                              "--vbmf-weaken", "0"), "--vbmf-weaken")
    report = tmp_path / "report.json"
    result = onnxopt("compress", small_model_file, "-o", out, "--method", "tucker2", "--calib", small_calib_file,
                     "--speedup", "1.5", "--stages", "2", "--vbmf-weaken", "0.5", "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["mac_speedup"] >= 1.5 and data["tucker2"]["vbmf_weaken"] == 0.5
    onnx.checker.check_model(onnx.load(out), full_check=True)
