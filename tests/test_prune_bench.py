"""benchmarks/prune_bench.py's summary over calibration seeds."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prune_bench.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("prune_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _row(variant: str, seed: int | None, drop: float, date: str = "2026-12-04", images: int = 280) -> dict:
    row = {"model": "m", "speedup_target": 1.3, "variant": variant, "calib_images": images, "date": date,
           "top1_drop_points": drop}
    if seed is not None:
        row["seed"] = seed
    return row


def test_seed_means_over_the_seeds_of_one_run():
    bench = _load_script()
    rows = [
        _row("prune", None, 9.0, "2026-12-03"),     # no seed recorded: seed 0, superseded by the later row
        _row("prune", 0, 10.0),
        _row("prune", 1, 6.0),
        _row("prune", 2, 5.0),
        _row("prune", 1, 1.0, images=100),          # other calibration size: its own run, one seed only
        _row("auto", 0, 4.0),                       # one seed: no mean
    ]
    (summary,) = bench.seed_means(rows)
    assert (summary["variant"], summary["seeds"], summary["drops"]) == ("prune", "0 1 2", "10.00 / 6.00 / 5.00")
    assert summary["mean_drop"] == pytest.approx(7.0)
    assert summary["mean_drop_se"] == pytest.approx(math.sqrt(7.0) / math.sqrt(3))    # sample variance (9+1+4)/2
