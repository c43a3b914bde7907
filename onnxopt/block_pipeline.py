"""`onnxopt compress --reconstruct block`: after any method, fit the compressed model's blocks to
the original's on the calibration images (``passes.block_fit``), then verify again.

The images are the calibration set's first ones, as many as ``options.memory_budget`` holds:
four activations of the largest block boundary per image (the original's and the compressed
model's block inputs and outputs) are kept at once; a minibatch's activations inside a block
come on top.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx

from onnxopt import graph as graphs
from onnxopt.calib.readers import DataSource
from onnxopt.errors import UserError
from onnxopt.passes import block_fit
from onnxopt.verify import check_structure, verify


def check_block_data(calib: DataSource | None) -> None:
    """Refuse ``--reconstruct block`` without calibration data or PyTorch, before any work."""
    if calib is None or len(calib) == 0:
        raise UserError("--reconstruct block fits blocks on calibration images: give --calib")
    block_fit.require_torch()


def images_within(prepared: onnx.ModelProto, compressed: onnx.ModelProto, budget: int, available: int,
                  span: int | str = 1) -> int:
    """How many images' activations fit in ``budget`` bytes (at least 8, at most ``available``):
    four float32 tensors per image, each the size of the largest block boundary or input."""
    shapes = block_fit.tensor_shapes(prepared)
    stored = [name for end in block_fit.block_ends(prepared, compressed, span) for name in end] + block_fit.graph_inputs(prepared)
    largest = max((int(np.prod([d for d in shapes[name][1:] if isinstance(d, int)])) for name in stored if shapes.get(name)),
                  default=1)
    return int(min(available, max(8, budget // (4 * 4 * largest))))


def stack(data: DataSource, count: int) -> dict[str, np.ndarray]:
    """The first ``count`` samples of ``data`` as arrays (input name -> [count, ...])."""
    parts: dict[str, list[np.ndarray]] = {}
    for batch in data.subset(range(count)).batches(32):
        for name, value in batch.items():
            parts.setdefault(name, []).append(value)
    return {name: np.concatenate(values) for name, values in parts.items()}


def reconstruct(model: onnx.ModelProto, result, calib: DataSource, holdout: DataSource | None, options,
                progress=None):
    """``result`` (a ``CompressionResult`` of ``model``) with its blocks fitted and verified again."""
    start = time.perf_counter()
    prepared, _ = graphs.prepare(model, calib.sample_shapes())
    count = images_within(prepared, result.model, options.memory_budget, len(calib), options.block_span)
    fit_options = block_fit.BlockFitOptions(steps=options.block_steps, span=options.block_span, lr=options.block_lr, seed=options.seed,
                                            threads=options.threads)
    fitted, fits = block_fit.reconstruct_blocks(prepared, result.model, stack(calib, count), fit_options, progress)
    verification = result.verification
    if holdout is not None and len(holdout) > 0:
        verification = verify(model, fitted, holdout, options.threads)
    else:
        check_structure(model, fitted)
    timings = {**result.timings, "block_reconstruction": time.perf_counter() - start}
    timings["total"] = result.timings.get("total", 0.0) + timings["block_reconstruction"]
    summary = {"images": count, "steps": options.block_steps, "span": options.block_span, "lr": fit_options.lr, "batch": fit_options.batch,
               "blocks": [dataclasses.asdict(fit) for fit in fits]}
    return dataclasses.replace(result, model=fitted, verification=verification, timings=timings, reconstruction=summary)
