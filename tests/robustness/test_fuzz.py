"""Fuzzing compress with random small CNNs (tests/robustness/fuzzgraphs.py).

Properties: compress ends with a result or a UserError, never another exception; every result
passes the full ONNX checker and runs in onnxruntime with the original's input/output names
and shapes; on weights of low rank, a factorisation that keeps that rank reproduces the
original outputs; and a few CLI runs. Profiles: ``ci`` (default, derandomized: 200 + 100 + 4
examples) and ``fuzz`` (``HYPOTHESIS_PROFILE=fuzz``, ``make fuzz``: 2,000 + 1,000 + 40 random ones).
"""

import os
import subprocess
import sys

import numpy as np
import onnx
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import fuzzgraphs
from conftest import run
from onnxopt.calib.readers import DataSource
from onnxopt.cli import model_inputs
from onnxopt.errors import UserError
from onnxopt.graph import import_graph, prepare
from onnxopt.layers import find_layers
from onnxopt.pipeline import METHODS, CompressOptions, compress

settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("fuzz", max_examples=2000, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
EXAMPLES = settings.get_profile(PROFILE).max_examples


def _sources(model: onnx.ModelProto, spec: dict) -> tuple[DataSource, DataSource]:
    arrays = fuzzgraphs.calibration(spec)
    source = DataSource(model_inputs(model), arrays=arrays)
    n = len(source)
    return source.subset(range(4, n)), source.subset(range(4))


def _check_output(original: onnx.ModelProto, compressed: onnx.ModelProto, spec: dict) -> tuple[np.ndarray, np.ndarray]:
    onnx.checker.check_model(compressed, full_check=True)
    assert [i.name for i in compressed.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in compressed.graph.output] == [o.name for o in original.graph.output]
    for a, b in zip(list(original.graph.input) + list(original.graph.output), list(compressed.graph.input) + list(compressed.graph.output)):
        assert a.type == b.type, (a, b)            # same dims, static or symbolic
    batch = spec["batch"] if isinstance(spec["batch"], int) else 3
    x = fuzzgraphs.calibration(spec)["x"][:batch]
    expected, got = run(original, {"x": x})[0], run(compressed, {"x": x})[0]
    assert got.shape == expected.shape
    return expected, got


@settings(settings.get_profile(PROFILE), max_examples=EXAMPLES)
@given(spec=fuzzgraphs.model_specs(), method=st.sampled_from(METHODS), speedup=st.sampled_from([1.05, 1.3, 2.0]))
def test_compress_never_crashes_and_outputs_are_valid(spec, method, speedup):
    model = fuzzgraphs.build(spec)
    calib, holdout = _sources(model, spec)
    options = CompressOptions(speedup=speedup, method=method, rows_per_layer=256, round_to=1, seed=spec["seed"], threads=1)
    try:
        result = compress(model, calib, holdout, options)
    except UserError as exc:
        assert "\n" not in str(exc)
        event(f"UserError: {str(exc)[:40]}")
        return
    event(f"compressed ({method})")
    _check_output(model, result.model, spec)
    assert result.macs_after * speedup <= result.macs_before * 1.0001
    assert np.isfinite(result.verification.max_abs_diff)


@settings(settings.get_profile(PROFILE), max_examples=max(100, EXAMPLES // 2))
@given(spec=fuzzgraphs.model_specs(dynamic_spatial=False))
def test_factorising_low_rank_weights_at_their_rank_is_exact(spec):
    """Every factorisable conv has weights of rank <= half its filters: a small speed-up is met
    by ranks that lose no response energy, so the outputs are the original's."""
    for block in spec["blocks"]:
        block["low_rank"] = True
    model = fuzzgraphs.build(spec)
    calib, holdout = _sources(model, spec)
    options = CompressOptions(speedup=1.01, rows_per_layer=512, rank_multiple=1, solver="linear", threads=1)
    try:
        result = compress(model, calib, holdout, options)
    except UserError:
        event("UserError")
        return
    expected, got = _check_output(model, result.model, spec)
    weights = {layer.name: layer for layer in find_layers(import_graph(prepare(model)[0]))}   # MatMul heads are Gemms
    if any(r.rank is not None and r.rank < np.linalg.matrix_rank(weights[r.name].weight_matrix(), tol=1e-4) for r in result.layers):
        event("a lossy rank was needed")
        return
    event("exactness checked")
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(expected - got).max() <= 2e-3 * scale


@settings(settings.get_profile(PROFILE), max_examples=max(4, EXAMPLES // 50))
@given(spec=fuzzgraphs.model_specs(), method=st.sampled_from(METHODS))
def test_command_line_on_random_models(tmp_path_factory, spec, method):
    """The CLI end to end: exit 0 with a valid model, or exit 2 with one line and nothing written."""
    folder = tmp_path_factory.mktemp("cli")
    model = fuzzgraphs.build(spec)
    onnx.save(model, folder / "in.onnx")
    np.savez(folder / "calib.npz", **fuzzgraphs.calibration(spec))
    out = folder / "out" / "o.onnx"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "-m", "onnxopt", "-q", "compress", folder / "in.onnx", "-o", out, "--method", method,
                             "--speedup", "1.2", "--calib", folder / "calib.npz", "--rows-per-layer", "256", "--round-to", "1"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode == 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert list(out.parent.iterdir()) == []
        return
    assert result.returncode == 0, result.stderr
    _check_output(model, onnx.load(out), spec)
