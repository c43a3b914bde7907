"""Loading, preparing and saving ONNX models.

Preparation (ALGORITHMS.md §0) makes a model ready for the passes without changing what it
computes:

* a model older than opset 11 is upgraded with onnx's version converter (or refused);
* weights held in ``Constant`` nodes, or behind ``Identity`` / ``Cast`` / ``DequantizeLinear``
  of constants, become initializers;
* ``MatMul(A, W) + b`` with a 2-D ``A`` and constant ``W``, ``b`` becomes ``Gemm(A, W, b)``;
* ``BatchNormalization`` after a Conv whose only consumer is the BN is folded into it:
  ``s = gamma / sqrt(var + eps)``, ``W <- W * s[:, None, None, None]``,
  ``b <- (b - mean) * s + beta``;
* ``auto_pad`` on Conv is replaced by explicit ``pads`` (needs static spatial shapes, or stride 1).

Graph input/output names, the opset, the IR version and symbolic dimensions are kept.
Editing goes through onnx-graphsurgeon (``gs.Graph``); :func:`export` turns a graph back into
a ``ModelProto`` that keeps the input model's IR version and metadata.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_graphsurgeon as gs

from .errors import UserError

# Newest IR version onnxruntime 1.31 loads; onnx 1.23 would otherwise write 14.
MAX_IR_VERSION = 13
# Protobuf cannot serialise 2 GiB: larger models are written with external data and handed to
# the checker, shape inference and onnxruntime as files. The environment variable lowers the
# threshold (tests force the file path on small models with it).
EXTERNAL_DATA_LIMIT = int(os.environ.get("ONNXOPT_EXTERNAL_DATA_LIMIT", 2**31 - 2**26))


def is_large(model: onnx.ModelProto) -> bool:
    """Too large to serialise in memory (see ``EXTERNAL_DATA_LIMIT``)."""
    return model.ByteSize() >= EXTERNAL_DATA_LIMIT


@contextlib.contextmanager
def staged_file(model: onnx.ModelProto) -> Iterator[Path]:
    """``model`` written to a temporary folder, weights in one external data file; removed after."""
    with tempfile.TemporaryDirectory(prefix="onnxopt-") as folder:
        path = Path(folder) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location="model.onnx.data", size_threshold=1024)
        yield path


def _all_tensors(graph: onnx.GraphProto):
    """Initializers and tensor-valued attributes of ``graph`` and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _all_tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _all_tensors(subgraph)


def _check_external_locations(model: onnx.ModelProto, folder: Path, path: Path) -> None:
    """Refuse external-data entries that point outside the model's folder.

    ``../``, absolute paths and symbolic links that leave the folder are refused: a model file
    must not make onnxopt read arbitrary files (ONNX's own path-traversal CVEs were this).
    """
    root = folder.resolve()
    for tensor in _all_tensors(model.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or root not in target.parents:
            raise UserError(f"{path}: external data {location!r} of tensor {tensor.name!r} points outside the model's folder; refusing to read it")
        if not target.is_file():
            raise UserError(f"{path}: external data file {location!r} is missing; keep it next to the model")


FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


def _check_finite_weights(model: onnx.ModelProto, path: Path) -> None:
    """Refuse NaN/Inf in floating-point weights: calibration and verification would be meaningless."""
    for tensor in _all_tensors(model.graph):
        if tensor.data_type not in FLOAT_TYPES:
            continue
        values = onnx.numpy_helper.to_array(tensor)
        if not np.isfinite(values).all():
            raise UserError(f"{path}: weight {tensor.name!r} contains NaN or Inf; the model is broken, re-export or retrain it")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and validate an ONNX file, with a one-line error for every way it can be wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file; check the path to the ONNX model")
    if path.is_dir():
        raise UserError(f"{path} is a directory; give the path to an .onnx file")
    if path.stat().st_size == 0:
        raise UserError(f"{path} is empty; re-export the model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise UserError(
            f"{path} is not a readable ONNX model ({type(exc).__name__}); re-export it or check it is not truncated"
        ) from None
    if len(model.graph.node) == 0:
        raise UserError(f"{path} has no graph nodes; it is not an ONNX model or it is truncated")
    _check_external_locations(model, path.parent, path)
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise UserError(f"{path}: cannot read its external data ({type(exc).__name__}); check the .data file beside it") from None
    _check_finite_weights(model, path)
    try:
        onnx.checker.check_model(str(path) if is_large(model) else model)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} fails the ONNX checker: {first_line}") from None
    return model


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` keeping the template's IR version, opsets and metadata; intermediate
    shapes are inferred afresh (a rewrite may have left stale ones on the graph's tensors)."""
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    model = gs.export_onnx(graph, do_type_check=False)
    del model.graph.value_info[:]      # shapes a rewrite made stale (pruned channels); inferred afresh
    model.ir_version = min(template.ir_version, MAX_IR_VERSION)
    del model.opset_import[:]
    model.opset_import.extend(template.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(model, field, getattr(template, field))
    del model.metadata_props[:]
    model.metadata_props.extend(template.metadata_props)
    if template.functions and not model.functions:
        model.functions.extend(template.functions)
    return infer_shapes(model)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shapes of the intermediate tensors (the model unchanged if inference fails)."""
    try:
        if not is_large(model):
            return onnx.shape_inference.infer_shapes(model, data_prop=True)
        with staged_file(model) as path:
            inferred = path.with_name("inferred.onnx")
            onnx.shape_inference.infer_shapes_path(str(path), str(inferred), data_prop=True)
            return onnx.load(str(inferred), load_external_data=True)
    except Exception:
        return model


def _replace_with_constant(graph: gs.Graph, node: gs.Node, value: np.ndarray) -> bool:
    """Make ``node``'s only output the constant ``value`` for all its consumers."""
    out = node.outputs[0]
    if out in graph.outputs:
        return False
    const = gs.Constant(out.name, np.ascontiguousarray(value))
    for consumer in list(out.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is out:
                consumer.inputs[index] = const
    node.outputs.clear()
    node.inputs.clear()
    return True


def _lift_constant_nodes(graph: gs.Graph) -> int:
    """Turn ``Constant`` nodes holding a tensor into initializers (gs.Constant)."""
    lifted = 0
    for node in list(graph.nodes):
        if node.op != "Constant" or "value" not in node.attrs or len(node.outputs) != 1:
            continue
        value = node.attrs["value"]
        values = value.values if isinstance(value, gs.Constant) else np.asarray(value)
        lifted += _replace_with_constant(graph, node, np.array(values))
    return lifted


def _fold_batchnorm(graph: gs.Graph) -> int:
    """Fold ``Conv -> BatchNormalization`` into the Conv (exact, see module docstring)."""
    folded = 0
    for bn in list(graph.nodes):
        if bn.op != "BatchNormalization" or len(bn.outputs) != 1:
            continue
        src = bn.inputs[0]
        if len(src.inputs) != 1 or len(src.outputs) != 1 or src in graph.outputs:
            continue
        conv = src.inputs[0]
        if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant):
            continue
        if not all(isinstance(t, gs.Constant) for t in bn.inputs[1:5]):
            continue
        if len(conv.inputs) > 2 and not isinstance(conv.inputs[2], gs.Constant):
            continue
        gamma, beta, mean, var = (np.asarray(t.values, np.float64) for t in bn.inputs[1:5])
        eps = float(bn.attrs.get("epsilon", 1e-5))
        scale = gamma / np.sqrt(var + eps)
        weight = conv.inputs[1].values
        bias = conv.inputs[2].values if len(conv.inputs) > 2 else np.zeros(weight.shape[0], weight.dtype)
        new_weight = (weight.astype(np.float64) * scale.reshape(-1, *([1] * (weight.ndim - 1)))).astype(weight.dtype)
        new_bias = ((bias.astype(np.float64) - mean) * scale + beta).astype(weight.dtype)
        conv.inputs[1] = gs.Constant(conv.inputs[1].name + "_bnfolded", new_weight)
        bias_constant = gs.Constant((conv.name or conv.outputs[0].name) + "_bias_bnfolded", new_bias)
        if len(conv.inputs) > 2:
            conv.inputs[2] = bias_constant
        else:
            conv.inputs.append(bias_constant)
        out = bn.outputs[0]
        conv.outputs[0] = out
        bn.outputs.clear()
        bn.inputs.clear()
        folded += 1
    return folded


def explicit_pads(node: gs.Node, in_shape, weight_shape) -> list[int] | None:
    """Explicit ``pads`` equivalent to the Conv's ``auto_pad`` for an input of ``in_shape``.

    SAME: ``out = ceil(size / stride)``, total padding ``(out - 1) * stride + (k - 1) * dil + 1 - size``,
    the odd one at the end (SAME_UPPER) or the beginning (SAME_LOWER). With stride 1 the total is
    ``(k - 1) * dil`` whatever the size, so dynamic spatial dims are fine; otherwise None.
    """
    mode = node.attrs.get("auto_pad", "NOTSET")
    spatial = len(weight_shape) - 2
    if mode in ("NOTSET", "VALID"):
        return list(node.attrs.get("pads", [0] * (2 * spatial))) if mode == "NOTSET" else [0] * (2 * spatial)
    if in_shape is None or len(in_shape) != spatial + 2:
        return None
    strides = node.attrs.get("strides", [1] * spatial)
    dilations = node.attrs.get("dilations", [1] * spatial)
    kernel = weight_shape[2:]
    begin, end = [], []
    for size, stride, dil, k in zip(in_shape[2:], strides, dilations, kernel):
        if isinstance(size, (int, np.integer)):
            out = -(-size // stride)
            total = max(0, (out - 1) * stride + (k - 1) * dil + 1 - size)
        elif stride == 1:
            total = (k - 1) * dil
        else:
            return None
        small, large = total // 2, total - total // 2
        begin.append(small if mode == "SAME_UPPER" else large)
        end.append(large if mode == "SAME_UPPER" else small)
    return begin + end


def _make_pads_explicit(graph: gs.Graph) -> int:
    changed = 0
    for node in graph.nodes:
        if node.op != "Conv" or node.attrs.get("auto_pad", "NOTSET") == "NOTSET":
            continue
        if not isinstance(node.inputs[1], gs.Constant):
            continue
        pads = explicit_pads(node, node.inputs[0].shape, node.inputs[1].values.shape)
        if pads is None:
            continue  # dynamic spatial dims: the layer table says why it is skipped
        node.attrs["pads"] = pads
        del node.attrs["auto_pad"]
        changed += 1
    return changed


def _dequantize(node: gs.Node) -> np.ndarray | None:
    """``(x - zero_point) * scale`` per tensor or per ``axis`` (blocked quantization: None)."""
    if node.attrs.get("block_size", 0):
        return None
    x = node.inputs[0].values.astype(np.float64)
    scale = np.asarray(node.inputs[1].values)
    zero = np.asarray(node.inputs[2].values, np.float64) if len(node.inputs) > 2 and node.inputs[2].name else 0.0
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * x.ndim
        shape[int(node.attrs.get("axis", 1)) % x.ndim] = -1
        scale = scale.reshape(shape)
        zero = np.reshape(zero, shape) if np.ndim(zero) else zero
    return ((x - zero) * scale).astype(scale.dtype)


def _fold_weight_chains(graph: gs.Graph) -> int:
    """Weights behind ``Identity``, ``Cast`` and ``DequantizeLinear`` of constants become
    initializers (exporters emit these for tied, fp16-stored or int8-stored weights)."""
    folded = 0
    graph.toposort()
    for node in list(graph.nodes):
        if node.op not in ("Identity", "Cast", "DequantizeLinear") or len(node.outputs) != 1:
            continue
        inputs = [t for t in node.inputs if t.name]
        if not inputs or not all(isinstance(t, gs.Constant) for t in inputs):
            continue
        if node.op == "Identity":
            value = inputs[0].values
        elif node.op == "Cast":
            value = inputs[0].values.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
        else:
            value = _dequantize(node)
        if value is not None and _replace_with_constant(graph, node, value):
            folded += 1
    return folded


def _matmul_add_to_gemm(graph: gs.Graph) -> int:
    """``MatMul(A, W) [+ b]`` with a 2-D input, a constant 2-D ``W`` and a constant ``b`` of
    ``N`` values becomes ``Gemm(A, W, b)``: the same ``A @ W + b``, and a layer the passes know."""
    rewritten = 0
    outputs = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant):
            continue
        a, weight = node.inputs
        if weight.values.ndim != 2 or a.shape is None or len(a.shape) != 2:
            continue
        out = node.outputs[0]
        inputs, result = [a, weight], out
        add = out.outputs[0] if len(out.outputs) == 1 and out.name not in outputs else None
        if add is not None and add.op == "Add" and len(add.inputs) == 2:
            bias = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            n = weight.values.shape[1]
            if isinstance(bias, gs.Constant) and bias.values.size == n and bias.values.shape in ((n,), (1, n)):
                inputs.append(gs.Constant(bias.name, bias.values.reshape(n)))
                result = add.outputs[0]
                add.outputs.clear()
                add.inputs.clear()
        node.op = "Gemm"
        node.inputs.clear()
        node.inputs.extend(inputs)
        node.outputs.clear()
        node.outputs.append(result)
        rewritten += 1
    return rewritten


MIN_OPSET = 11


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), MIN_OPSET)


def upgrade_opset(model: onnx.ModelProto) -> onnx.ModelProto:
    """Models older than opset 11 are upgraded with onnx's version converter (or refused)."""
    opset = opset_of(model)
    if opset >= MIN_OPSET:
        return model
    try:
        upgraded = onnx.version_converter.convert_version(model, MIN_OPSET)
        onnx.checker.check_model(upgraded)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"the model uses opset {opset} and onnx's version converter cannot upgrade it to {MIN_OPSET} ({first}); "
                        f"re-export it with opset {MIN_OPSET} or newer") from None
    upgraded.ir_version = max(upgraded.ir_version, model.ir_version)
    return upgraded


def _pin_dynamic_dims(model: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]]) -> dict[str, list[int]]:
    """Give the graph inputs' symbolic non-batch dims the calibration data's sizes (in place)."""
    pinned = {}
    for value in model.graph.input:
        shape = sample_shapes.get(value.name)
        dims = value.type.tensor_type.shape.dim
        if shape is None or len(dims) != len(shape) + 1 or all(d.HasField("dim_value") for d in dims[1:]):
            continue
        for dim, size in zip(dims[1:], shape):
            if not dim.HasField("dim_value"):
                dim.dim_value = int(size)
        pinned[value.name] = [int(d) for d in shape]
    return pinned


def restore_signature(compressed: onnx.ModelProto, original: onnx.ModelProto) -> onnx.ModelProto:
    """``compressed`` with the original's graph input/output types (symbolic dims), shapes re-inferred."""
    types = {v.name: v.type for v in (*original.graph.input, *original.graph.output)}
    for value in (*compressed.graph.input, *compressed.graph.output):
        if value.name in types:
            value.type.CopyFrom(types[value.name])
    del compressed.graph.value_info[:]
    return infer_shapes(compressed)


def prepare(model: onnx.ModelProto, sample_shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[onnx.ModelProto, dict]:
    """Opset upgrade, constant lifting and folding, MatMul+Add to Gemm, BN folding and explicit
    pads; returns the model and what changed.

    With ``sample_shapes`` (per-sample shapes of the calibration data), symbolic spatial dims of
    the inputs take the data's sizes in the prepared model, so layer shapes and MACs are known;
    the rewritten model gets the original signature back with :func:`restore_signature`. Pads
    are made explicit before that, so they never depend on the calibration size."""
    template = upgrade_opset(model)
    graph = import_graph(infer_shapes(template))
    summary = {
        "constants_lifted": _lift_constant_nodes(graph),
        "weight_chains_folded": _fold_weight_chains(graph),
        "matmul_add_to_gemm": _matmul_add_to_gemm(graph),
        "batchnorms_folded": _fold_batchnorm(graph),
        "auto_pads_made_explicit": _make_pads_explicit(graph),
    }
    if template is not model:
        summary["opset_upgraded_from"] = opset_of(model)
    prepared = export(graph, template)
    if sample_shapes:
        pinned = _pin_dynamic_dims(prepared, sample_shapes)
        if pinned:
            summary["spatial_dims_from_data"] = pinned
            prepared = infer_shapes(prepared)
    return prepared, summary




def save_model_atomic(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool = False,
                      size_threshold: int = 1024) -> None:
    """Write ``model`` to ``path`` atomically: temporary files in the same folder, then renames.

    With ``external_data`` (forced for models over 2 GiB) the weights larger than
    ``size_threshold`` bytes go to one ``<name>.data`` file beside the model; the data file is
    moved into place before the model, so a reader never sees a model without its data; if the
    model's rename fails or is interrupted, the data file is put back as it was.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"{folder}: output folder does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"{folder}: output folder is not writable; choose another -o path")
    scratch = Path(tempfile.mkdtemp(prefix="." + path.name + ".", dir=folder))
    data, previous = folder / (path.name + ".data"), scratch / "previous.data"
    published = False
    try:
        staged = scratch / path.name
        if external_data or is_large(model):
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            onnx.save_model(copy, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=path.name + ".data", size_threshold=size_threshold)
            if (scratch / data.name).exists():
                if data.exists():
                    os.replace(data, previous)          # kept until the model is in place
                os.replace(scratch / data.name, data)
                published = True
        else:
            staged.write_bytes(model.SerializeToString())
        os.replace(staged, path)
        published = False
    except BaseException:                               # Ctrl-C between the renames: the data goes back
        if published:
            if previous.exists():
                os.replace(previous, data)
            else:
                data.unlink(missing_ok=True)
        raise
    finally:
        for leftover in scratch.iterdir():
            leftover.unlink()
        scratch.rmdir()


def tensor_shape(value_info: onnx.ValueInfoProto) -> list[int | str | None]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in value_info.type.tensor_type.shape.dim]
