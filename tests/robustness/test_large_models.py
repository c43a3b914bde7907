"""Models over 2 GiB: forced on a small model by lowering graph.EXTERNAL_DATA_LIMIT, every step
(checker, shape inference, onnxruntime, writing) goes through files with external data."""

import os
import subprocess
import sys

import numpy as np
import onnx

from conftest import run
from onnxopt import graph as graphs
from onnxopt.calib.readers import DataSource
from onnxopt.cli import model_inputs
from onnxopt.pipeline import CompressOptions, compress


def test_large_model_path_in_process(monkeypatch, tmp_path, small_model):
    monkeypatch.setattr(graphs, "EXTERNAL_DATA_LIMIT", 1)
    staged = []
    original_staged_file = graphs.staged_file

    def counting(model):
        staged.append(model.ByteSize())
        return original_staged_file(model)

    monkeypatch.setattr(graphs, "staged_file", counting)
    x = np.random.default_rng(0).standard_normal((40, 3, 12, 12)).astype(np.float32)
    source = DataSource(model_inputs(small_model), arrays={"x": x})
    result = compress(small_model, source.subset(range(8, 40)), source.subset(range(8)), CompressOptions(speedup=1.3, rows_per_layer=512))
    assert len(staged) >= 4                        # shape inference, sessions, the checker
    assert result.preparation["batchnorms_folded"] == 1 and result.verification.samples == 8
    out = tmp_path / "big.onnx"
    graphs.save_model_atomic(result.model, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    loaded = graphs.load_model(out)
    np.testing.assert_array_equal(run(loaded, {"x": x[:3]})[0], run(result.model, {"x": x[:3]})[0])


def test_large_model_path_from_the_command_line(tmp_path, small_model_file, small_calib_file):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = {**os.environ, "ONNXOPT_EXTERNAL_DATA_LIMIT": "1"}
    result = subprocess.run([sys.executable, "-m", "onnxopt", "-q", "compress", small_model_file, "-o", out_dir / "m.onnx",
                             "--speedup", "1.3", "--calib", small_calib_file, "--calib-size", "48"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["m.onnx", "m.onnx.data"]
    model = onnx.load(out_dir / "m.onnx", load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(str(out_dir / "m.onnx"), full_check=True)
