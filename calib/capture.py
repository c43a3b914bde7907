"""Reading intermediate tensors of a model through onnxruntime.

A model is cut to what the requested tensors need, and requested tensors become its outputs.
Calibration runs layer after layer over the same samples, so :class:`CutRunner` keeps the
CURRENT model's values at a cut of the graph (a set of tensors that separates what has been
computed from what has not), one array per batch. A stage then runs only the part of the
graph between the cut and its layers, and :meth:`CutRunner.advance` moves the cut forward
once the stage's layers are rewritten. When the values at a cut would exceed the memory
budget the cut stays where it is (at worst at the graph inputs, i.e. the preprocessed
samples), so memory stays bounded whatever the model.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort

from onnxopt import graph as graphs
from onnxopt.errors import UserError


def make_session(model: onnx.ModelProto, threads: int = 0) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle onnxruntime workers otherwise spin-wait and starve numpy's BLAS between runs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        if not graphs.is_large(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with graphs.staged_file(model) as path:           # over 2 GiB: onnxruntime reads it from a file
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"onnxruntime cannot run the model: {message}") from None


def submodel(model: onnx.ModelProto, inputs: Iterable[str], outputs: Iterable[str],
             input_dtypes: dict[str, np.dtype] | None = None) -> onnx.ModelProto:
    """The part of ``model`` that computes ``outputs`` from the tensors ``inputs``."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    new_inputs = []
    for name in inputs:
        tensor = tensors[name]
        tensor.inputs.clear()                 # detach the producer: the value is given
        if tensor.dtype is None:
            tensor.dtype = (input_dtypes or {}).get(name, np.float32)
        new_inputs.append(tensor)
    new_outputs = []
    for name in outputs:
        tensor = tensors[name]
        if tensor.dtype is None:
            tensor.dtype = np.float32
        new_outputs.append(tensor)
    graph.inputs = new_inputs
    graph.outputs = new_outputs
    graph.cleanup(remove_unused_graph_inputs=True).toposort()
    given = {t.name for t in graph.inputs}
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Variable) and tensor.name and not tensor.inputs and tensor.name not in given:
                raise RuntimeError(f"cut does not cover tensor {tensor.name!r} needed by {node.name!r}")
    cut = gs.export_onnx(graph, do_type_check=False)
    cut.ir_version = model.ir_version
    del cut.opset_import[:]
    cut.opset_import.extend(model.opset_import)
    return cut


def cut_before(graph: gs.Graph, node: gs.Node) -> list[str]:
    """Tensors produced before ``node`` (in topological order) and used at or after it."""
    graph.toposort()
    position = graph.nodes.index(node)
    before = graph.nodes[:position]
    produced = {t.name for t in graph.inputs} | {t.name for n in before for t in n.outputs}
    needed = {t.name for n in graph.nodes[position:] for t in n.inputs if isinstance(t, gs.Variable)}
    needed |= {t.name for t in graph.outputs}
    return sorted(produced & needed)


class CutRunner:
    """Runs a model from stored values at a cut, batch by batch (see module docstring)."""

    def __init__(self, batches: Iterable[dict[str, np.ndarray]], threads: int = 0, memory_budget: int = 2 * 2**30):
        self.batches = [dict(b) for b in batches]
        self.threads = threads
        self.memory_budget = memory_budget

    @property
    def names(self) -> list[str]:
        return list(self.batches[0]) if self.batches else []

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for b in self.batches for a in b.values())

    def __len__(self) -> int:
        return sum(len(next(iter(b.values()))) for b in self.batches)

    def run(self, model: onnx.ModelProto, outputs: list[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(batch index, {name: value}) for ``outputs``; stored names are passed through."""
        stored = [name for name in outputs if name in self.names]
        computed = list(dict.fromkeys(name for name in outputs if name not in self.names))
        session = None
        if computed:
            dtypes = {name: array.dtype for name, array in self.batches[0].items()}
            session = make_session(submodel(model, self.names, computed, dtypes), self.threads)
            feeds_names = [i.name for i in session.get_inputs()]
        for index, batch in enumerate(self.batches):
            values = {name: batch[name] for name in stored}
            if session is not None:
                values.update(zip(computed, session.run(computed, {name: batch[name] for name in feeds_names})))
            yield index, values

    def advance(self, model: onnx.ModelProto, cut: list[str]) -> bool:
        """Store ``model``'s values at ``cut`` instead; False (and no change) if over budget."""
        if not self.batches or sorted(cut) == sorted(self.names):
            return True
        new_batches = []
        size = 0
        for index, values in self.run(model, cut):
            new_batches.append(values)
            size += sum(a.nbytes for a in values.values())
            if size * len(self.batches) / (index + 1) > self.memory_budget:
                return False
        self.batches = new_batches
        return True
