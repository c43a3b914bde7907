"""Tuning with meta_schedule: a tiny budget on a tiny model, database reuse, and RPC measurement.

Budgets are a couple of trials per task so the file runs in a few minutes on 2 cores. The RPC
test starts TVM's own tracker and server on 127.0.0.1 only and always stops them.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxopt import tvm_backend
from onnxopt.errors import UserError

tvm = pytest.importorskip("tvm")


def conv_relu_model() -> onnx.ModelProto:
    """One fused kernel (conv3x3 + bias + relu): the smallest model with a real tuning task."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array((rng.standard_normal((16, 8, 3, 3)) * 0.2).astype(np.float32), "w")
    bias = numpy_helper.from_array((rng.standard_normal(16) * 0.1).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["y"], name="relu")],
        "conv_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 16, 16])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "conv_relu.onnx"
    onnx.save(conv_relu_model(), str(path))
    return path


@pytest.fixture(scope="module")
def tuned(model_path, tmp_path_factory):
    """One tuning run (2 trials per task) shared by the tests below: (build result, database dir, events)."""
    work = tmp_path_factory.mktemp("tuned")
    events = []
    result = tvm_backend.compile_model(model_path, "x86", out_dir=work / "tuned", tune_trials=2, tune_dir=work / "db",
                                       on_event=lambda kind, data: events.append(kind))
    return result, work / "db", events


def test_tune_tiny_budget(model_path, tuned):
    result, tune_dir, events = tuned
    report = result.tuning
    assert result.tuned and not result.warnings
    assert report.trials_run >= 1 and report.seconds_per_trial > 0
    assert all(task.trials <= 2 for task in report.tasks)
    assert any(task.best_us is not None and task.best_us > 0 for task in report.tasks)
    assert "tasks" in events and "trials" in events
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["tuned"] and manifest["tuning_database"] == str(tune_dir.resolve())
    assert manifest["tuning"]["trials_per_task"] == 2
    assert 0 < manifest["tuned_kernels"] <= manifest["kernels"]
    assert tvm_backend.compare_with_onnxruntime(model_path, result) < 1e-4


def test_reapplying_the_database_takes_seconds(model_path, tuned, tmp_path):
    _, tune_dir, _ = tuned
    start = time.perf_counter()
    reused = tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "reused", tune_dir=tune_dir)
    assert time.perf_counter() - start < 60
    assert reused.tuned and reused.tuning is None and reused.manifest["tuning_database"] == str(tune_dir.resolve())
    assert tvm_backend.compare_with_onnxruntime(model_path, reused) < 1e-4


def test_database_of_another_model_leaves_the_build_untuned(tuned, tmp_path):
    _, tune_dir, _ = tuned
    other = conv_relu_model()
    other.graph.node[0].attribute[0].ints[:] = [0, 0, 0, 0]  # no padding: a different kernel
    other.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 14
    other.graph.output[0].type.tensor_type.shape.dim[3].dim_value = 14
    other_path = tmp_path / "other.onnx"
    onnx.save(other, str(other_path))
    result = tvm_backend.compile_model(other_path, "x86", out_dir=tmp_path / "o", tune_dir=tune_dir)
    assert not result.tuned and result.manifest["tuned_kernels"] == 0
    assert any("no records for this model" in w for w in result.warnings)


def test_tuning_needs_a_database_dir(model_path, tmp_path):
    with pytest.raises(UserError, match="--tune-dir"):
        tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "o", tune_trials=2)
    with pytest.raises(UserError, match="holds no tuning database"):
        tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "o", tune_dir=tmp_path / "empty")


def test_rpc_without_tuning_is_refused(model_path, tmp_path):
    with pytest.raises(UserError, match="--rpc is only used"):
        tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "o", rpc=tvm_backend.RpcConfig("127.0.0.1", 9190, "k"))


def test_unreachable_tracker_is_a_user_error(model_path, tmp_path):
    port = _free_port()
    with pytest.raises(UserError, match="cannot reach the TVM RPC tracker"):
        tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "o", tune_trials=1, tune_dir=tmp_path / "db",
                                  rpc=tvm_backend.RpcConfig("127.0.0.1", port, "test"))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)  # the server forks a child per session
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def _wait_for_port(port: int, process: subprocess.Popen, deadline: float) -> None:
    while time.monotonic() < deadline and process.poll() is None:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)


@pytest.fixture
def rpc_device(tmp_path):
    """A TVM RPC tracker and one rpc_server (key "test") on 127.0.0.1, stopped afterwards."""
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado: pip install 'apache-tvm[rpc]'")
    tracker_port, server_port = _free_port(), _free_port()
    processes = []
    try:
        processes.append(_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(tracker_port),
                                 "--port-end", str(tracker_port + 1)], tmp_path / "tracker.log"))
        _wait_for_port(tracker_port, processes[0], deadline=time.monotonic() + 60)
        processes.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                                 "--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{tracker_port}",
                                 "--key", "test"], tmp_path / "server.log"))
        deadline = time.monotonic() + 90
        while True:
            try:
                summary = tvm.rpc.connect_tracker("127.0.0.1", tracker_port).summary()
                if any(str(item.get("key", "")).endswith(":test") for item in summary.get("server_info", [])):
                    break
            except (OSError, RuntimeError):
                pass
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                logs = "\n".join(log.read_text()[-1000:] for log in (tmp_path / "tracker.log", tmp_path / "server.log"))
                pytest.fail(f"RPC tracker/server did not come up:\n{logs}")
            time.sleep(1)
        yield tvm_backend.RpcConfig("127.0.0.1", tracker_port, "test")
    finally:
        for process in reversed(processes):
            _stop(process)


def test_tuning_through_rpc_tracker(model_path, tmp_path, rpc_device):
    result = tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "o", tune_trials=2,
                                       tune_dir=tmp_path / "db", rpc=rpc_device)
    assert result.tuning.runner.startswith("rpc 127.0.0.1")
    assert result.tuning.trials_run >= 1
    assert any(task.best_us is not None for task in result.tuning.tasks)
    assert tvm_backend.compare_with_onnxruntime(model_path, result) < 1e-4


def test_rpc_with_unknown_key_is_a_user_error(model_path, tmp_path, rpc_device):
    wrong = tvm_backend.RpcConfig(rpc_device.host, rpc_device.port, "no-such-board")
    with pytest.raises(UserError, match="no rpc_server with key 'no-such-board'.*registered: test"):
        tvm_backend.compile_model(model_path, "x86", out_dir=tmp_path / "o", tune_trials=1, tune_dir=tmp_path / "db",
                                  rpc=wrong)
