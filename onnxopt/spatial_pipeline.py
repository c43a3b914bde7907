"""`onnxopt compress --method spatial`: every k x k conv as k x 1 then 1 x k, fitted to data.

The decomposition and its solver are ``passes.spatial`` (Jaderberg et al. 2014; ALGORITHMS.md
§1 "Spatial decomposition").

1. Prepare the graph, list its layers; every k x k Conv (k > 1 both ways, not grouped, not
   excluded) whose decomposition can save MACs is a candidate (``pipeline.plan_candidates``).
2. Run the ORIGINAL model once over the calibration set (``prune_pipeline.ConsumerSampler``):
   at sampled output positions, each candidate's responses (the targets) and its residual
   shortcut's, and the statistics of its input patches.
3. Ranks under the MAC budget: the exact multiple-choice knapsack (``passes.allocation``) over
   exact per-layer MACs, the damage being ``-log`` of the response energy a rank keeps, from the
   whitened spectrum of each layer on the original inputs (``spatial.whitened_spectrum``);
   ``--allocation uniform`` takes the same fraction of every layer's full rank instead.
4. In topological order, run the CURRENT model from a stored graph cut before the layer
   (``calib.capture.CutRunner``) for its input patches, fit V and H toward the original
   responses (asymmetric; a layer feeding a residual Add toward ``Y_orig + S_orig -
   S_current``), and rewrite it as two convs. ``--solver svd``: the data-free truncated SVD.
5. Verify and return a ``CompressionResult``.
"""

from __future__ import annotations

import math
import time

import numpy as np
import onnx

from onnxopt import graph as graphs
from onnxopt.calib.capture import CutRunner, cut_before
from onnxopt.calib.readers import DataSource
from onnxopt.errors import UserError
from onnxopt.layers import find_layers, model_macs
from onnxopt.passes import allocation, prune, spatial
from onnxopt.pipeline import (CompressionResult, CompressOptions, LayerResult, Progress, _proportional_choice,
                              batch_size_for, kept_class_scores, plan_candidates, rank_grid, shape_text)
from onnxopt.prune_pipeline import ConsumerSampler, _as_linear
from onnxopt.verify import verify

ALLOCATIONS = ("energy", "uniform")
SOLVERS = ("auto", "linear", "svd")       # auto and linear: the fitted (ALS) factors; svd: data-free


def _check(calib: DataSource | None, options: CompressOptions) -> None:
    if calib is None:
        raise UserError("--method spatial is data-driven: give calibration data with --calib (an image folder or .npz)")
    if options.allocation not in ALLOCATIONS:
        raise UserError(f"--method spatial allocates ranks by {' or '.join(ALLOCATIONS)} "
                        f"(got --allocation {options.allocation!r})")
    if options.cost != "macs":
        raise UserError("--method spatial counts MACs: --cost latency is not supported with it")
    if options.solver not in SOLVERS:
        raise UserError(f"unknown --solver {options.solver!r}; choose one of: {', '.join(SOLVERS)}")


def compress_spatial(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                     options: CompressOptions, progress: Progress | None = None) -> CompressionResult:
    """Compress ``model`` by spatial decomposition of its k x k convs (module docstring)."""
    _check(calib, options)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepared, preparation = graphs.prepare(model, calib.sample_shapes())
    graph = graphs.import_graph(prepared)
    layers = find_layers(graph)
    candidates, reasons = plan_candidates(layers, options.exclude, kept_class_scores(graph, layers, options),
                                          spatial.applicability)
    if not candidates:
        detail = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:3]) or "the model has no Conv layers"
        raise UserError(f"nothing to compress: no layer can be decomposed spatially ({detail})")
    macs_before = model_macs(layers)
    timings["prepare"] = time.perf_counter() - start

    t0 = time.perf_counter()
    floats = sum(int(np.prod(layer.output_hw)) * layer.out_channels + int(np.prod(layer.output_hw)) * layer.in_channels
                 for layer in candidates)
    samples = list(calib.batches(batch_size_for(floats)))
    shortcuts = {layer.name: layer.shortcut.name for layer in candidates if layer.shortcut is not None}
    sampler = ConsumerSampler(max(1, math.ceil(options.rows_per_layer / len(calib))), options.seed, shortcuts)
    stats, targets, _ = sampler.collect(prepared, CutRunner(samples, options.threads), [layer.node for layer in candidates],
                                        None, progress, "original model")
    spectra = {layer.name: spatial.whitened_spectrum(layer.node.inputs[1].values, stats[layer.name].sxx) for layer in candidates}
    del stats
    timings["capture_original"] = time.perf_counter() - t0

    layer_options = [[allocation.Option(layer.macs, 0.0, None)]
                     + [allocation.Option(spatial.decomposed_macs(layer, rank), allocation.energy_damage(spectra[layer.name], rank), rank)
                        for rank in rank_grid(layer, options.rank_multiple, spatial.max_saving_rank, options.rank_below)]
                     for layer in candidates]
    fixed = macs_before - sum(layer.macs for layer in candidates)
    budget = macs_before / options.speedup - fixed
    if options.allocation == "uniform":
        choice = _proportional_choice([spatial.full_rank(layer) for layer in candidates], layer_options, budget)
    else:
        choice = allocation.allocate(layer_options, budget)
    if choice is None:
        best = macs_before / (fixed + sum(min(o.cost for o in opts) for opts in layer_options))
        raise UserError(f"--speedup {options.speedup:g} is out of reach for spatial decomposition of this model "
                        f"(at most {best:.2f}x: {fixed / macs_before:.0%} of the MACs are in layers it cannot decompose); "
                        "lower --speedup")
    ranks = {layer.name: opts[k].value for layer, opts, k in zip(candidates, layer_options, choice)}
    chosen = [layer for layer in candidates if ranks[layer.name] is not None]

    t0 = time.perf_counter()
    results: dict[str, LayerResult] = {}
    runner = CutRunner(samples, options.threads, options.memory_budget)
    for number, layer in enumerate(chosen, 1):
        current = graphs.export(graph, prepared)
        runner.advance(current, cut_before(graph, layer.node))
        fitted, _, _ = sampler.collect(current, runner, [layer.node], targets, progress, f"layer {number}/{len(chosen)}",
                                       folds_of=1)          # no cross-validation here: one fold is the whole
        data = _as_linear(fitted[layer.name])
        weight = np.asarray(layer.node.inputs[1].values, np.float64)
        bias = layer.bias_vector().astype(np.float64)
        rank = ranks[layer.name]
        factors = (spatial.solve_svd(weight, bias, rank) if options.solver == "svd"
                   else spatial.solve(weight.shape, data, rank))
        columns = np.arange(weight[0].size)
        results[layer.name] = LayerResult(
            layer.name, layer.op, shape_text(layer), layer.macs, spatial.decomposed_macs(layer, rank), layer.params,
            spatial.decomposed_params(layer, rank),
            rank=rank, full_rank=spatial.full_rank(layer),
            solver=f"spatial {layer.kernel[0]}x1 + 1x{layer.kernel[1]} ({'data-free svd' if factors.solver == 'svd' else 'asymmetric ' + factors.solver})",
            error_before=prune.relative_error(data, weight.reshape(len(weight), -1), columns, bias),
            error_after=prune.relative_error(data, factors.weight().reshape(len(weight), -1), columns, factors.bias),
        )
        spatial.rewrite(graph, layer, factors)
    timings["solve_and_rewrite"] = time.perf_counter() - t0

    compressed = graphs.restore_signature(graphs.export(graph, prepared), model)
    t0 = time.perf_counter()
    verification = verify(model, compressed, holdout if holdout is not None and len(holdout) else calib, options.threads)
    timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    table = [results.get(layer.name) or LayerResult(layer.name, layer.op, shape_text(layer), layer.macs or 0, layer.macs or 0,
                                                    layer.params, layer.params,
                                                    skipped=reasons.get(layer.name, "kept: the budget is met without it"))
             for layer in layers]
    return CompressionResult(
        model=compressed, layers=table, macs_before=macs_before, macs_after=sum(r.macs_after for r in table),
        params_before=sum(r.params_before for r in table), params_after=sum(r.params_after for r in table),
        verification=verification, preparation=preparation, timings=timings,
        calib_samples=len(calib), holdout_samples=len(holdout) if holdout is not None else 0,
        rows_per_layer=options.rows_per_layer, stages=len(chosen),
    )
