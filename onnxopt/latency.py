"""onnxruntime CPU latency: warm-up, repeated runs, median; baseline and candidate alternated.

Alternating the two models run by run makes the ratio robust to a shared, noisy machine:
both see the same background load.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import onnx

from onnxopt.calib.capture import make_session
from onnxopt.errors import UserError


@dataclass
class Latency:
    median_ms: float
    p10_ms: float
    p90_ms: float
    runs: int

    def to_json(self) -> dict:
        return asdict(self)


def random_feeds(model: onnx.ModelProto, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    initializers = {t.name for t in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = []
        for i, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                dims.append(dim.dim_value)
            elif i == 0:
                dims.append(batch)
            else:
                raise UserError(f"input {value.name!r} has a dynamic dim {i}; bench needs static sizes except the batch")
        if value.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
            raise UserError(f"input {value.name!r} is not float32; bench feeds random float32 data")
        feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def measure(models: list[onnx.ModelProto], batch: int = 1, threads: int = 1, warmup: int = 5,
            runs: int = 30, min_seconds: float = 2.0) -> list[Latency]:
    """Latency of each model on the same random input, runs interleaved."""
    sessions = [make_session(m, threads) for m in models]
    feeds = random_feeds(models[0], batch)
    for session in sessions:
        for _ in range(warmup):
            session.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    start = time.perf_counter()
    while len(times[0]) < runs or (time.perf_counter() - start < min_seconds and len(times[0]) < 10 * runs):
        for session, record in zip(sessions, times):
            t0 = time.perf_counter()
            session.run(None, feeds)
            record.append(time.perf_counter() - t0)
    return [Latency(float(np.median(t) * 1e3), float(np.percentile(t, 10) * 1e3), float(np.percentile(t, 90) * 1e3), len(t)) for t in times]
