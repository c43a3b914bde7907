"""The command line: a small model end to end, and one-line errors with exit code 2."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import run, shared_path


def onnxopt(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxopt", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_compress_small_model_end_to_end(tmp_path, small_model_file, small_calib_file):
    out = tmp_path / "out.onnx"
    report = tmp_path / "report.json"
    result = onnxopt("compress", small_model_file, "-o", out, "--speedup", "1.5", "--calib", small_calib_file,
                     "--calib-size", "64", "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["macs_after"] * 1.5 <= data["macs_before"]
    assert data["verification"]["samples"] > 0
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    original = onnx.load(small_model_file)
    assert [i.name for i in model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in original.graph.output]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    x = np.random.default_rng(5).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert run(model, {"x": x})[0].shape == (2, 10)
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert "computes the class scores" in layers["fc"]["skipped"] and layers["fc"]["rank"] is None


def test_factorize_classifier(tmp_path, small_model_file, small_calib_file):
    report = tmp_path / "report.json"
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "out.onnx", "--speedup", "1.5", "--calib", small_calib_file,
                     "--calib-size", "64", "--factorize-classifier", "--report", report)
    assert result.returncode == 0, result.stderr
    fc = next(layer for layer in json.loads(report.read_text())["layers"] if layer["name"] == "fc")
    assert "class scores" not in (fc["skipped"] or "")          # a candidate like any other layer


def test_inspect_json(small_model_file):
    result = onnxopt("inspect", small_model_file, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    names = [row["name"] for row in data["layers"]]
    assert names == ["stem", "block.conv1", "block.conv2", "down", "fc"]
    assert "class scores" in data["layers"][-1]["lowrank_reason"] and not data["layers"][-1]["lowrank"]
    assert data["preparation"]["batchnorms_folded"] == 1
    assert data["total_macs"] == sum(row["macs"] for row in data["layers"])


def test_calibration_folder_without_images(tmp_path, small_model_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--speedup", "2", "--calib", empty)
    assert_user_error(result, "no images")


def test_preset_shape_mismatch(tmp_path, small_model_file):
    images = tmp_path / "imgs"
    images.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(images / "a.png")
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--speedup", "2", "--calib", images, "--preset", "cifar10")
    assert_user_error(result, "32x32", "12x12")


@pytest.mark.parametrize("speedup", ["1", "0.5", "-3"])
def test_speedup_not_above_one(tmp_path, small_model_file, small_calib_file, speedup):
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--speedup", speedup, "--calib", small_calib_file)
    assert_user_error(result, "--speedup")


def test_speedup_out_of_reach(tmp_path, small_model_file, small_calib_file):
    out = tmp_path / "o.onnx"
    result = onnxopt("compress", small_model_file, "-o", out, "--speedup", "50", "--calib", small_calib_file)
    assert_user_error(result, "out of reach")
    assert not out.exists()


def test_resnet20_compress_and_eval_on_real_images(tmp_path):
    """ResNet-20 at 1.3x, calibrated on 300 training images: accuracy on 1,000 test images holds."""
    model = shared_path("models/cifar10_resnet20.onnx")
    train = shared_path("data/cifar10/train")
    test = shared_path("data/cifar10/test")
    out = tmp_path / "r20.onnx"
    result = onnxopt("compress", model, "-o", out, "--speedup", "1.3", "--calib", train, "--preset", "cifar10",
                     "--calib-size", "300", "--rows-per-layer", "4096")
    assert result.returncode == 0, result.stderr
    accuracy = {}
    for name, path in (("before", model), ("after", out)):
        evaluated = onnxopt("eval", path, "--data", test, "--preset", "cifar10", "--limit", "1000", "--json")
        assert evaluated.returncode == 0, evaluated.stderr
        accuracy[name] = json.loads(evaluated.stdout)
    assert accuracy["before"]["n"] == 1000
    assert accuracy["before"]["top1"] > 0.75
    assert accuracy["after"]["top1"] > accuracy["before"]["top1"] - 0.05


def test_same_input_and_seed_give_byte_identical_output(tmp_path, small_model_file, small_calib_file):
    outputs = []
    for index in range(2):
        out = tmp_path / f"o{index}.onnx"
        result = onnxopt("-q", "compress", small_model_file, "-o", out, "--speedup", "1.5", "--calib", small_calib_file, "--seed", "3")
        assert result.returncode == 0, result.stderr
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("method,with_data", [("prune", True), ("filter-std", False), ("filter-l1", True)])
def test_pruning_methods_from_the_command_line(tmp_path, small_model_file, small_calib_file, method, with_data):
    out = tmp_path / "pruned.onnx"
    report = tmp_path / "r.json"
    args = ["compress", small_model_file, "-o", out, "--method", method, "--speedup", "1.3", "--report", report]
    if with_data:
        args += ["--calib", small_calib_file]
    result = onnxopt(*args)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["macs_after"] * 1.3 <= data["macs_before"] * 1.0001
    assert data["allocation"] == ("sensitivity" if method == "prune" else "energy")     # measured damages: prune's default
    assert data.get("selection") == ("lasso" if method == "prune" else None)            # He et al.'s LASSO path: prune's default
    assert (data["round_to"], data["target"]) == (4, None)                             # no --target: multiples of 4
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert run(model, {"x": x})[0].shape == (2, 10)


def test_unknown_method_and_lowrank_without_data(tmp_path, small_model_file, small_calib_file):
    assert_user_error(onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--method", "magic", "--speedup", "2",
                              "--calib", small_calib_file), "--method")
    assert_user_error(onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--speedup", "2"), "--calib")
    assert_user_error(onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--method", "prune", "--speedup", "2",
                              "--calib", small_calib_file, "--selection", "best"), "--selection", "lasso or greedy")


def test_inspect_groups(small_model_file):
    result = onnxopt("inspect", small_model_file, "--groups", "--json")
    assert result.returncode == 0, result.stderr
    groups = json.loads(result.stdout)["channel_groups"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["block.conv1"]["prunable"]                                  # interior of the residual block
    assert [c["name"] for c in by_name["block.conv1"]["consumers"]] == ["block.conv2"]
    assert not by_name["fc"]["prunable"] and "output" in by_name["fc"]["reason"]


def test_bench_onnxruntime_and_tvm(small_model_file):
    result = onnxopt("bench", small_model_file, "--baseline", small_model_file, "--runs", "5", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["latency"]["median_ms"] > 0 and 0.3 < data["speedup"] < 3
    pytest.importorskip("tvm")
    result = onnxopt("bench", small_model_file, "--runtime", "tvm", "--runs", "5", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["runtime"] == "tvm"


def test_external_data_output_and_loading(tmp_path, small_model_file, small_calib_file):
    out = tmp_path / "big" / "model.onnx"
    out.parent.mkdir()
    result = onnxopt("-q", "compress", small_model_file, "-o", out, "--speedup", "1.5", "--calib", small_calib_file, "--external-data")
    assert result.returncode == 0, result.stderr
    assert (out.parent / "model.onnx.data").stat().st_size > 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx", "model.onnx.data"]   # no temporary leftovers
    assert onnxopt("inspect", out, "--json").returncode == 0                                     # loads back by path
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 12)).astype(np.float32)
    import onnxruntime as ort
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0].shape == (2, 10)


def test_target_sets_the_channel_multiple(tmp_path, small_model_file, small_calib_file):
    """`--target` chooses `--round-to` (x86 8, or 16 with AVX-512, and there fewer channels than
    that in multiples of 4, x86-avx2 8 and 4 whatever this CPU has; ARM 4); an explicit
    `--round-to` wins, with strict multiples."""
    from onnxopt.tvm_backend import channel_grid
    out, report = tmp_path / "pruned.onnx", tmp_path / "r.json"
    common = ["compress", small_model_file, "-o", out, "--method", "prune", "--speedup", "1.3", "--calib", small_calib_file,
              "--report", report]
    host = channel_grid("x86")
    assert host in ((8, 4), (16, 4))
    for target, extra, grid in (("x86", [], host), ("x86-avx2", [], (8, 4)), ("aarch64", [], (4, 0)), ("x86", ["--round-to", "1"], (1, 0)),
                                ("x86", ["--round-to", "16"], (16, 0))):
        multiple, below = grid
        result = onnxopt(*common, "--target", target, *extra)
        if grid == (16, 0):      # the small CNN's groups have 16 channels: strict multiples of 16 prune nothing
            assert_user_error(result, "out of reach", "--round-to 16")
            continue
        assert result.returncode == 0, result.stderr
        data = json.loads(report.read_text())
        assert (data["round_to"], data["round_below"], data["target"]) == (multiple, below, target)
        model = onnx.load(out)
        weights = {t.name: t.dims for t in model.graph.initializer}
        widths = [weights[node.input[1]][0] for node in model.graph.node if node.op_type == "Conv"]
        assert all(width % multiple == 0 or (below and width < multiple and width % below == 0) for width in widths), widths
        if target == "x86" and not extra:
            assert sum(widths) < 16 + 16 + 16 + 32                     # something was pruned, on the grid
    assert_user_error(onnxopt(*common, "--target", "tpu"), "unknown target 'tpu'", "x86")


@pytest.mark.parametrize("method", ["lowrank", "spatial"])
def test_target_puts_factorisation_ranks_on_the_channel_grid(tmp_path, small_model_file, small_calib_file, method):
    """`--target` gives the factorised layers' ranks (the width between their two convs) the
    channel grid of pruning's keep counts; without it, multiples of 4."""
    from onnxopt.tvm_backend import channel_grid
    out, report = tmp_path / "f.onnx", tmp_path / "r.json"
    common = ["compress", small_model_file, "-o", out, "--method", method, "--speedup", "1.5", "--calib", small_calib_file,
              "--report", report]
    for extra, (multiple, below) in (([], (4, 0)), (["--target", "x86"], channel_grid("x86")), (["--target", "cuda"], (8, 0))):
        result = onnxopt(*common, *extra)
        assert result.returncode == 0, result.stderr
        data = json.loads(report.read_text())
        assert (data["rank_multiple"], data["rank_below"]) == (multiple, below)
        ranks = [layer["rank"] for layer in data["layers"] if layer.get("rank")]
        assert ranks and all(r % multiple == 0 or (below and r < multiple and r % below == 0) for r in ranks), (extra, ranks)


def test_error_text_is_printed_verbatim(tmp_path):
    """Square brackets in an error (a path, ``pip install 'onnxopt[reconstruct]'``) are not
    taken for rich markup and dropped."""
    missing = tmp_path / "model[v2].onnx"
    assert_user_error(onnxopt("compress", missing, "-o", tmp_path / "out.onnx", "--speedup", "2"), "model[v2].onnx", "no such file")
