"""`onnxopt analyze`, the sensitivity cache, and `compress --max-drop`."""

import json

import numpy as np
import pytest

from conftest import labelled_folders, small_cnn
from test_cli import assert_user_error, onnxopt


# --- the search over --speedup --------------------------------------------------------------

def _trials(drop_per_speedup, reach=10.0):
    from onnxopt.errors import UserError
    from onnxopt.target_search import Trial

    tried = []

    def try_speedup(speedup):
        tried.append(speedup)
        if speedup > reach:
            raise UserError("out of reach")
        return Trial(candidate=speedup, mac_speedup=speedup, top1=90.0 - drop_per_speedup(speedup))

    return try_speedup, tried


def test_search_finds_the_largest_speedup_within_the_drop():
    from onnxopt.target_search import search_speedup

    try_speedup, tried = _trials(lambda s: 4 * (s - 1))         # drop 2.0 exactly at s = 1.5
    best, walked = search_speedup(try_speedup, 90.0, 2.0, start=1.2, steps=12, tolerance=0.02)
    assert 1.5 / 1.02 <= best <= 1.5
    assert all(step.within == (step.drop <= 2.0) for step in walked)
    assert best == max(step.speedup for step in walked if step.within)


def test_search_treats_out_of_reach_as_too_far_and_refuses_when_nothing_passes():
    from onnxopt.errors import UserError
    from onnxopt.target_search import search_speedup

    try_speedup, _ = _trials(lambda s: 0.0, reach=2.0)          # no loss, but nothing above 2x
    best, walked = search_speedup(try_speedup, 90.0, 1.0, start=1.5, steps=10, tolerance=0.05)
    assert 2.0 / 1.05 <= best <= 2.0
    assert any(step.note.startswith("out of reach") for step in walked)
    try_speedup, _ = _trials(lambda s: 5.0)
    with pytest.raises(UserError, match="raise --max-drop"):
        search_speedup(try_speedup, 90.0, 1.0, start=1.5, steps=4)


# --- the sensitivity curves and their cache ---------------------------------------------------

def _sensitivity(model, data, tmp_path, grid=3, held=None):
    from onnxopt.pipeline import CompressOptions, layer_sensitivity, plan

    options = CompressOptions(speedup=2.0, sensitivity_grid=grid, rows_per_layer=1024, cache_dir=tmp_path / "cache")
    return layer_sensitivity(model, plan(model, options), data, held, options)


def test_sensitivity_is_cached_and_the_cache_follows_model_data_and_settings(tmp_path):
    from onnxopt.calib.readers import DataSource, InputSpec

    rng = np.random.default_rng(0)
    spec = [InputSpec("x", ["N", 3, 12, 12])]
    data = DataSource(spec, arrays={"x": rng.standard_normal((48, 3, 12, 12)).astype(np.float32)})
    held = DataSource(spec, arrays={"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)})
    model = small_cnn()
    first = _sensitivity(model, data, tmp_path, held=held)
    again = _sensitivity(model, data, tmp_path, held=held)
    assert not first.cached and again.cached
    assert [c.error for c in again.curves] == [c.error for c in first.curves]
    assert first.metrics == ["error", "kl"]                   # no labels: no top-1 drop
    assert not _sensitivity(small_cnn(seed=1), data, tmp_path, held=held).cached            # another model
    assert not _sensitivity(model, data, tmp_path, grid=4, held=held).cached                 # another grid
    other = DataSource(spec, arrays={"x": held.arrays["x"] * 2})
    assert not _sensitivity(model, data, tmp_path, held=other).cached                        # other held-out data
    assert _sensitivity(model, data, tmp_path, held=held).cached


def test_sensitivity_folds_average_the_curves_of_each_split():
    """--sensitivity-folds 3: each layer's curves are the mean of the given split's and the other
    two cross-fitted splits' curves, each calibrated and measured alone; folds the data cannot
    give, labelled held-out data, and low-rank without the measured allocation are refused."""
    import dataclasses

    from onnxopt.calib.readers import DataSource, InputSpec
    from onnxopt.errors import UserError
    from onnxopt.pipeline import CompressOptions, compress, layer_sensitivity, plan
    from onnxopt.sensitivity import cross_fitting_splits

    rng = np.random.default_rng(0)
    spec = [InputSpec("x", ["N", 3, 12, 12])]
    data = DataSource(spec, arrays={"x": rng.standard_normal((48, 3, 12, 12)).astype(np.float32)})
    held = DataSource(spec, arrays={"x": rng.standard_normal((16, 3, 12, 12)).astype(np.float32)})
    model = small_cnn()
    options = CompressOptions(speedup=2.0, sensitivity_grid=3, rows_per_layer=1024, cache_dir=None)
    model_plan = plan(model, options)
    splits = [(data, held), *cross_fitting_splits(data, held, 3, options.seed)]
    alone = [layer_sensitivity(model, model_plan, c, h, options) for c, h in splits]
    folded = layer_sensitivity(model, model_plan, data, held, dataclasses.replace(options, sensitivity_folds=3))
    assert folded.samples == 48 and folded.metrics == ["error", "kl"]
    for curve in folded.curves:
        for metric in ("error", "kl"):
            per_split = np.array([getattr(a.curve(curve.name), metric) for a in alone])
            assert np.ptp(per_split, axis=0).max() > 0                  # the splits do differ
            np.testing.assert_allclose(getattr(curve, metric), per_split.mean(0), rtol=1e-9)
    with pytest.raises(UserError, match="needs 80 samples"):
        layer_sensitivity(model, model_plan, data, held, dataclasses.replace(options, sensitivity_folds=5))
    with pytest.raises(UserError, match="held-out folds"):
        layer_sensitivity(model, model_plan, data, None, dataclasses.replace(options, sensitivity_folds=2))
    with pytest.raises(UserError, match="no labels"):
        layer_sensitivity(model, model_plan, data, held, dataclasses.replace(options, sensitivity_folds=2),
                          labels=np.zeros(16, np.int64))
    with pytest.raises(UserError, match="--allocation sensitivity"):
        compress(model, data, held, dataclasses.replace(options, allocation="energy", sensitivity_folds=2))


def test_cache_ignores_a_corrupt_entry(tmp_path):
    from onnxopt.cache import DiskCache

    cache = DiskCache(tmp_path)
    path = cache.put("kind", {"a": 1}, {"value": 2})
    assert cache.get("kind", {"a": 1}) == {"value": 2} and cache.get("kind", {"a": 2}) is None
    path.write_text("{truncated")
    assert cache.get("kind", {"a": 1}) is None
    assert not list(path.parent.glob(".*.tmp"))              # atomic writes leave no temporary files


# --- the command line ---------------------------------------------------------------------------

def test_analyze_writes_json_and_plot_and_the_second_run_hits_the_cache(tmp_path, small_model_file, small_calib_file):
    report, picture = tmp_path / "analysis.json", tmp_path / "analysis.png"
    args = ["analyze", small_model_file, "--calib", small_calib_file, "--grid", "3", "-o", report]
    first = onnxopt(*args, "--plot", picture)
    assert first.returncode == 0, first.stderr
    data = json.loads(report.read_text())
    assert not data["cached"] and data["metric"] == "kl"
    assert {c["name"] for c in data["analysis"]["curves"]} >= {"block.conv1", "block.conv2"}
    assert data["front"] and all(b["mac_speedup"] >= a["mac_speedup"] for a, b in zip(data["front"], data["front"][1:]))
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    second = onnxopt(*args)
    assert second.returncode == 0, second.stderr
    assert json.loads(report.read_text())["cached"]
    assert_user_error(onnxopt(*args, "--metric", "top1_drop"), "--metric top1_drop was not measured", "--eval-data")


def test_max_drop_searches_and_refuses_evaluation_data_equal_to_calibration(tmp_path, small_model_file, small_model):
    calib, evaluation = labelled_folders(tmp_path, small_model)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    common = ["compress", small_model_file, "-o", out, "--calib", calib, "--size", "12", "--method", "lowrank"]
    assert_user_error(onnxopt(*common, "--max-drop", "1", "--eval-data", calib), "overlaps the calibration data")
    assert_user_error(onnxopt(*common, "--max-drop", "1"), "--max-drop needs --eval-data")
    assert_user_error(onnxopt(*common), "give --speedup")
    assert not out.exists()
    result = onnxopt(*common, "--max-drop", "100", "--eval-data", evaluation, "--search-steps", "2", "--report", report)
    assert result.returncode == 0, result.stderr
    search = json.loads(report.read_text())["max_drop_search"]
    assert search["base_top1"] == 100.0                       # labels are the model's predictions
    steps = search["steps"]
    assert [round(s["speedup"], 3) for s in steps] == [1.5, 2.25]   # within the target: the search grows
    for step in steps:     # a paired standard error with each drop (nothing can be gained: zero only for no drop)
        assert step["drop_se"] >= 0 and (step["drop_se"] > 0) == (step["drop"] > 0)
    best = max((s for s in steps if s["within"]), key=lambda s: s["speedup"])
    assert json.loads(report.read_text())["mac_speedup"] == pytest.approx(best["mac_speedup"])


def test_max_drop_without_method_uses_auto(tmp_path, small_model_file, small_model):
    calib, evaluation = labelled_folders(tmp_path, small_model)
    report = tmp_path / "report.json"
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "out.onnx", "--calib", calib, "--size", "12",
                     "--max-drop", "100", "--eval-data", evaluation, "--search-steps", "1", "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["method"] == "auto"
    assert data["auto"]["candidates"], data["auto"]           # every prune/low-rank split it measured
