"""benchmarks/avx2_instructions.py: onnxruntime under valgrind runs its AVX2 kernels, and the
count per inference is the model's, not the process's."""

from __future__ import annotations

import importlib.util
import platform
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import tvm_backend

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "avx2_instructions.py"

pytestmark = [
    pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed (apt-get install valgrind)"),
    pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="counts onnxruntime's x86 kernels"),
]


def _load_script():
    spec = importlib.util.spec_from_file_location("avx2_instructions", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _conv(path: Path, filters: int) -> Path:
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((filters, 32, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32, 56, 56])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", filters, 56, 56])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_valgrind_hides_avx512_from_onnxruntime():
    """The NCHWc block is AVX2's 8 under valgrind, and this CPU's own natively."""
    under, _ = _load_script().valgrind(["--probe"])       # the benchmark's own valgrind run
    native = subprocess.run([sys.executable, str(SCRIPT), "--probe"], capture_output=True, text=True, timeout=600)
    assert native.returncode == 0, native.stderr
    assert int(under) == 8
    assert int(native.stdout) == {"avx512f": 16, "avx2": 8}.get(tvm_backend.host_vector_unit(), int(native.stdout))


def test_instructions_per_inference_follow_the_work_and_repeat(tmp_path):
    """Half the filters: about half the instructions (the inferences alone, not the process);
    the same model counted twice, in parallel, agrees within 0.1%."""
    script = _load_script()
    wide, narrow = _conv(tmp_path / "wide.onnx", 64), _conv(tmp_path / "narrow.onnx", 32)
    with ThreadPoolExecutor(max_workers=2) as pool:       # counts do not depend on the load
        first, again, half = pool.map(lambda model: script.instructions_per_inference(model, batch=1, runs=2), (wide, wide, narrow))
    assert abs(first - again) < 0.001 * first, (first, again)
    assert 1.7 < first / half < 2.2, (first, half)
    assert first > 64 * 32 * 9 * 56 * 56 / 8      # one FMA instruction does 8 multiply-adds with AVX2
