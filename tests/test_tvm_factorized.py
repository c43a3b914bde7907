"""benchmarks/tvm_factorized.py --quick runs end to end (so the study cannot rot)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from conftest import run

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "tvm_factorized.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("tvm_factorized", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_variant_models_compute_what_they_claim():
    """The factorised models are the original conv with a rank-r / sampled weight (onnxruntime)."""
    bench = _load_script()
    shape = bench.Shape("t", 8, 12, 6)
    x = np.random.default_rng(1).standard_normal((1, 8, 6, 6)).astype(np.float32)
    lowrank = bench.build_model(shape, bench.Variant("lr", "lowrank", rank=3))
    assert [n.op_type for n in lowrank.graph.node] == ["Conv", "Conv"]
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in lowrank.graph.initializer}
    kxk, one = (weights[n.input[1]] for n in lowrank.graph.node)
    assert kxk.shape == (3, 8, 3, 3) and one.shape == (12, 3, 1, 1)
    spatial = bench.build_model(shape, bench.Variant("sp", "spatial", rank=5))
    assert [onnx.numpy_helper.to_array(t).shape for t in spatial.graph.initializer][:2] == [(5, 8, 3, 1), (12, 5, 1, 3)]
    gather = bench.build_model(shape, bench.Variant("g", "gather", keep=0.5))
    kept = bench.build_model(shape, bench.Variant("k", "kept", keep=0.5))
    indices = next(onnx.numpy_helper.to_array(t) for t in gather.graph.initializer if t.name == "kept")
    assert len(indices) == 4
    np.testing.assert_allclose(run(gather, {"x": x})[0], run(kept, {"x": x[:, indices]})[0], rtol=1e-5, atol=1e-5)
    assert bench.macs(shape, bench.Variant("lr", "lowrank", rank=3)) == 36 * (3 * 8 * 9 + 12 * 3)
    assert bench.macs(shape, bench.Variant("sp", "spatial", rank=5)) == 36 * (5 * 8 * 3 + 12 * 5 * 3)


def test_quick_mode_runs_and_writes_the_table(tmp_path, capsys):
    pytest.importorskip("tvm")
    bench = _load_script()
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "tvm_factorized.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {v.name for v in bench.QUICK_VARIANTS}
    for row in rows.values():
        assert row["max_abs_diff_vs_ort"] < 1e-4, row
        assert row["tvm_ms"] > 0 and row["ort_ms"] > 0
        assert row["tvm_over_ort"] == pytest.approx(row["tvm_ms"] / row["ort_ms"])
    assert rows["original"]["macs_ratio"] == 1.0 and rows["original"]["tvm_speedup"] == 1.0
    assert rows["lowrank-r4"]["macs_ratio"] == pytest.approx(4 * (16 * 9 + 16) / (16 * 16 * 9))
    # TVM does not fuse two convolutions, nor a Gather into the conv that consumes it.
    assert len(rows["original"]["kernels"]) == 1 and len(rows["kept-p50"]["kernels"]) == 1
    assert len(rows["lowrank-r4"]["kernels"]) == 2 and len(rows["gather-p50"]["kernels"]) == 2
    assert "| lowrank-r4 |" in capsys.readouterr().out
