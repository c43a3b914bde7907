"""`onnxopt compress --pool-early`: global average pooling moved ahead of the 1x1 convolutions
that feed it (``passes.early_pooling``), alone or before any method under the same budget.

1. Find the poolable heads of the prepared model (``early_pooling.find_heads``); a head whose
   convolution matches ``--exclude`` is left alone.
2. On the calibration images, capture each head's source and the original's output of every
   activation the pooling crosses, each averaged over the map (one vector per image).
3. Two candidates: every crossed activation data-free (``phi`` of the pooled pre-activation),
   and every one fitted (``early_pooling.fit_response``, in chain order, on the rewritten head's
   own inputs). Both run on the held-out samples against the original; the one whose outputs
   move less (the KL divergence of the class distributions for a classifier, the relative L2
   otherwise: ``verify.compare_outputs``) is kept. Measured (README; top-1 drop on the 350
   ImageNet evaluation photos): SqueezeNet 1.1's classifier conv pooled first, data-free, loses
   0.57 points for 1.33x fewer MACs (held-out KL 0.015; fitted 0.020); MobileNetV2's last two
   1x1 convs, fitted, 2.00 points for 1.13x (held-out KL 0.050; data-free 0.892). Without
   calibration data: data-free.
4. ``pooled_then``: the method compresses the rest of ``--speedup``,
   ``s_rest = MACs_pooled / (MACs_original / s)``, on the pooled model; nothing more when the
   pooling alone meets ``s``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Callable

import numpy as np
import onnx

from onnxopt import graph as graphs
from onnxopt.calib.capture import CutRunner
from onnxopt.calib.readers import DataSource, measurement_samples
from onnxopt.errors import UserError
from onnxopt.layers import find_layers, shape_text
from onnxopt.passes import early_pooling
from onnxopt.pipeline import CompressionResult, CompressOptions, LayerResult, Progress, chain_results
from onnxopt.verify import Verification, check_structure, verify

NOTHING_TO_POOL = ("nothing to pool early: no GlobalAveragePool (or AveragePool over the whole map) reads the model "
                   "through 1x1 convolutions")


def _heads(graph, exclude: list[str]) -> list[early_pooling.PoolableHead]:
    return [head for head in early_pooling.find_heads(graph)
            if not any(fnmatch.fnmatchcase(conv.name, pattern) for conv in head.convs for pattern in exclude)]


def _pooled_model(model: onnx.ModelProto, prepared: onnx.ModelProto, exclude: list[str],
                  responses: dict[str, early_pooling.Response]) -> onnx.ModelProto:
    graph = graphs.import_graph(prepared)
    for head in _heads(graph, exclude):
        early_pooling.rewrite(graph, head, responses)
    return graphs.restore_signature(graphs.export(graph, prepared), model)


def _pooled_means(prepared: onnx.ModelProto, calib: DataSource, names: list[str], threads: int) -> dict[str, np.ndarray]:
    """Each tensor of ``names`` averaged over its map, per calibration image: (N, C) float64."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for _, values in CutRunner(list(calib.batches(32)), threads).run(prepared, names):
        for name in names:
            parts[name].append(np.asarray(values[name], np.float64).mean(axis=(2, 3)))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def fitted_responses(heads: list[early_pooling.PoolableHead], means: dict[str, np.ndarray]) -> dict[str, early_pooling.Response]:
    """Every crossed activation's response, fitted in chain order (module docstring, step 3)."""
    responses: dict[str, early_pooling.Response] = {}
    for head in heads:
        for activation in head.activations:
            pre = early_pooling.run_head(head, means[head.source.name], responses, until=activation)
            responses[early_pooling.node_name(activation)] = early_pooling.fit_response(early_pooling.activation_function(activation), pre,
                                                                    means[activation.outputs[0].name])
    return responses


def pool_early(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None, options: CompressOptions,
               progress: Progress | None = None) -> CompressionResult:
    """The model with every poolable head pooled first (module docstring, steps 1-3)."""
    start = time.perf_counter()
    prepared, preparation = graphs.prepare(model, calib.sample_shapes() if calib is not None and len(calib) else None)
    graph = graphs.import_graph(prepared)
    heads = _heads(graph, options.exclude)
    if not heads:
        raise UserError(f"{NOTHING_TO_POOL}; drop --pool-early yes")
    candidates = {"data-free": _pooled_model(model, prepared, options.exclude, {})}
    crossed = [activation for head in heads for activation in head.activations]
    if crossed and calib is not None and len(calib):
        if progress:
            progress("pool early: the original's pooled responses", 0, 1)
        names = list(dict.fromkeys([head.source.name for head in heads] + [a.outputs[0].name for a in crossed]))
        means = _pooled_means(prepared, calib, names, options.threads)
        candidates["fitted"] = _pooled_model(model, prepared, options.exclude, fitted_responses(heads, means))
    measure_on = measurement_samples(calib, holdout)
    measured = []
    if measure_on is None:
        check_structure(model, candidates["data-free"])
        chosen, verification = "data-free", Verification(0, 0.0, 0.0, None)
    else:
        checks = {kind: verify(model, candidate, measure_on, options.threads) for kind, candidate in candidates.items()}
        chosen = min(checks, key=lambda kind: checks[kind].damage)
        verification = checks[chosen]
        measured = [{"response": kind, "kl": check.kl, "relative_l2": check.relative_l2, "top1_agreement": check.top1_agreement}
                    for kind, check in checks.items()]
    compressed = candidates[chosen]
    final = {layer.name: layer for layer in find_layers(graphs.import_graph(compressed))}
    pooled_convs = {conv.name: head for head in heads for conv in head.convs}
    table = []
    for layer in find_layers(graph):
        row = LayerResult(layer.name, layer.op, shape_text(layer), layer.macs or 0, final[layer.name].macs or 0,
                          layer.params, final[layer.name].params)
        head = pooled_convs.get(layer.name)
        if head is None:
            row.skipped = "left alone: no global pooling reads it through 1x1 convs"
        else:
            response = f"; {chosen} response of {', '.join(map(early_pooling.node_name, head.activations))}" if head.activations else ""
            row.solver = f"pooled first: on the 1x1 map, not {head.spatial} positions (Howard et al. 2019){response}"
        table.append(row)
    timings = {"total": time.perf_counter() - start}
    return CompressionResult(
        model=compressed, layers=table, macs_before=sum(r.macs_before for r in table), macs_after=sum(r.macs_after for r in table),
        params_before=sum(r.params_before for r in table), params_after=sum(r.params_after for r in table),
        verification=verification, preparation=preparation, timings=timings,
        calib_samples=len(calib) if calib is not None else 0, holdout_samples=verification.samples,
        rows_per_layer=0, stages=0,
        pooling={"heads": [head.describe() for head in heads], "response": chosen if crossed else "exact (no activation crossed)",
                 "candidates": measured},
    )


def rest_speedup(pooled: CompressionResult, speedup: float | None) -> float | None:
    """What is left of ``speedup`` after the pooling: ``MACs_pooled / (MACs_original / s)`` (at
    most 1 when the pooling alone meets it; None for no budget)."""
    return None if speedup is None else pooled.macs_after / (pooled.macs_before / speedup)


def pooled_then(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None, options: CompressOptions,
                run_rest: Callable[[onnx.ModelProto, CompressOptions], CompressionResult],
                progress: Progress | None = None) -> CompressionResult:
    """``pool_early``, then ``run_rest(pooled model, options)`` for the rest of the budget
    (module docstring, step 4), verified against the original."""
    pooled = pool_early(model, calib, holdout, options, progress)
    rest = rest_speedup(pooled, options.speedup)
    if rest is not None and rest <= 1:
        return pooled
    result = run_rest(pooled.model, dataclasses.replace(options, speedup=rest, pool_early="no"))
    measure_on = measurement_samples(calib, holdout)
    if measure_on is not None:
        verification = verify(model, result.model, measure_on, options.threads)
    else:
        check_structure(model, result.model)
        verification = result.verification
    return chain_results(pooled, result, verification=verification,
                         timings={"pool_early": pooled.timings["total"], options.method: result.timings["total"],
                                  "total": pooled.timings["total"] + result.timings["total"]})
