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


class LayerTimer:
    """onnxruntime latency of one layer alone, original or factorised at a rank.

    Each configuration is a one- or two-node model with the layer's exact shapes (random
    weights), timed at ``batch`` with ``threads`` threads (median of repeated runs). The sum
    over layers tracks the model's latency closely for conv-dominated CNNs, and unlike MACs it
    sees what the runtime's kernels make of odd channel counts and small 1x1 convs.
    Results are memoised per shape signature, so repeated layer shapes are timed once.
    """

    def __init__(self, batch: int = 8, threads: int = 1, runs: int = 15):
        self.batch = batch
        self.threads = threads
        self.runs = runs
        self._cache: dict[tuple, float] = {}

    def _signature(self, layer, rank) -> tuple:
        relu = layer.activation == "relu" and layer.shortcut is None
        return (layer.op, layer.in_channels, layer.out_channels, tuple(layer.kernel), tuple(layer.strides),
                tuple(layer.pads), tuple(layer.dilations), layer.group, self._input_hw(layer), relu, rank)

    @staticmethod
    def _input_hw(layer) -> tuple[int, int]:
        if layer.op != "Conv":
            return (1, 1)
        shape = layer.input.shape
        if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
            return (int(shape[2]), int(shape[3]))
        (oh, ow), (sh, sw), (kh, kw) = layer.output_hw, layer.strides, layer.kernel
        return ((oh - 1) * sh + kh, (ow - 1) * sw + kw)

    def _model(self, layer, rank) -> onnx.ModelProto:
        from onnx import TensorProto, helper, numpy_helper

        rng = np.random.default_rng(0)
        weight = lambda name, shape: numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32) * 0.1, name)
        d, c = layer.out_channels, layer.in_channels
        inits, nodes = [], []
        if layer.op == "Conv":
            kh, kw = layer.kernel
            attrs = {"strides": list(layer.strides), "pads": list(layer.pads), "dilations": list(layer.dilations),
                     "group": layer.group}
            h, w = self._input_hw(layer)
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [self.batch, c, h, w])
            if rank is None:
                inits += [weight("w", (d, c // layer.group, kh, kw)), weight("b", (d,))]
                nodes.append(helper.make_node("Conv", ["x", "w", "b"], ["y"], **attrs))
            else:
                inits += [weight("w1", (rank, c, kh, kw)), weight("w2", (d, rank, 1, 1)), weight("b", (d,))]
                nodes.append(helper.make_node("Conv", ["x", "w1"], ["m"], **attrs))
                nodes.append(helper.make_node("Conv", ["m", "w2", "b"], ["y"]))
        else:
            x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [self.batch, c])
            if rank is None:
                inits += [weight("w", (c, d)), weight("b", (d,))]
                nodes.append(helper.make_node("Gemm", ["x", "w", "b"], ["y"]))
            else:
                inits += [weight("w1", (c, rank)), weight("w2", (rank, d)), weight("b", (d,))]
                nodes.append(helper.make_node("Gemm", ["x", "w1"], ["m"]))
                nodes.append(helper.make_node("Gemm", ["m", "w2", "b"], ["y"]))
        if layer.activation == "relu" and layer.shortcut is None:   # onnxruntime fuses Conv+Relu: time them together
            nodes[-1].output[0] = "pre"
            nodes.append(helper.make_node("Relu", ["pre"], ["y"]))
        graph = helper.make_graph(nodes, "layer", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        return model

    def seconds(self, layer, rank: int | None = None) -> float:
        """Median latency of ``layer`` (rank None: as it is; else factorised at ``rank``)."""
        key = self._signature(layer, rank)
        if key not in self._cache:
            [latency] = measure([self._model(layer, rank)], batch=self.batch, threads=self.threads,
                                warmup=2, runs=self.runs, min_seconds=0.0)
            self._cache[key] = latency.median_ms / 1e3
        return self._cache[key]
