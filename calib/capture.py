"""Reading intermediate tensors of a model through onnxruntime.

The model is cut to what the requested tensors need (nodes downstream of them are dropped)
and those tensors become its outputs, so a pass that wants the early layers pays only for
the early layers. Batches stream through: callers reduce each batch (sample positions,
accumulate statistics) before the next one is read, so memory does not grow with the size
of the calibration set.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt.errors import UserError


def make_session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle onnxruntime workers otherwise spin-wait and starve numpy's BLAS between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot load the model: {message}") from None


def truncated_model(model: onnx.ModelProto, tensor_names: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose outputs are exactly ``tensor_names`` (in that order)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    outputs = []
    for name in tensor_names:
        tensor = tensors[name]
        if tensor.dtype is None:
            tensor.dtype = np.float32
        outputs.append(tensor)
    graph.outputs = outputs
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    cut = gs.export_onnx(graph, do_type_check=False)
    cut.ir_version = model.ir_version
    del cut.opset_import[:]
    cut.opset_import.extend(model.opset_import)
    return cut


class ActivationReader:
    """Runs a model cut to ``tensor_names`` and yields, per batch, the named tensors."""

    def __init__(self, model: onnx.ModelProto, tensor_names: list[str], threads: int = 0):
        self.tensor_names = list(dict.fromkeys(tensor_names))
        self.session = make_session(truncated_model(model, self.tensor_names), threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = {name: feeds[name] for name in self.input_names}
        values = self.session.run(self.tensor_names, feeds)
        return dict(zip(self.tensor_names, values))

    def stream(self, batches: Iterable[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
        for feeds in batches:
            yield self.run(feeds)
