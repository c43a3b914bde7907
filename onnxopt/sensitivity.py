"""Per-layer sensitivity: the damage of compressing one layer alone, measured at the output.

Niu et al. 2017 (ALGORITHMS.md §4): for each layer and a grid of ranks, factorise that layer
alone and measure how much the model's outputs move on held-out samples. Here the damage is
the relative squared error of the outputs, ``sum ||f_l,r(x) - f(x)||^2 / sum ||f(x)||^2``, a
smooth proxy for the accuracy drop that needs no labels. The layer is factorised with the
symmetric linear solver (PCA of its responses): cheap, and a faithful ranking of how much each
layer tolerates. Only the part of the graph after the layer runs (``CutRunner`` from the
original model's values at a cut just before it). Ranks between grid points are interpolated,
and the damage is made monotone (never larger at a higher rank).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

from onnxopt import graph as graphs
from onnxopt.calib.capture import CutRunner, cut_before
from onnxopt.layers import Layer, find_layers
from onnxopt.passes import allocation, lowrank


def relative_output_error(runner: CutRunner, model: onnx.ModelProto, outputs: list[str],
                           reference: list[list[np.ndarray]]) -> float:
    error = norm = 0.0
    for (index, values), expected in zip(runner.run(model, outputs), reference):
        for name, ref in zip(outputs, expected):
            diff = values[name].astype(np.float64) - ref
            error += float(np.square(diff).sum())
            norm += float(np.square(ref.astype(np.float64)).sum())
    return error / max(norm, 1e-30)


def measured_options(prepared: onnx.ModelProto, candidates: list[Layer], layer_options: list[list[allocation.Option]],
                     targets: dict[str, np.ndarray], batches: list[dict[str, np.ndarray]], threads: int = 0,
                     grid: int = 4, progress: Callable[[str, int, int], None] | None = None) -> list[list[allocation.Option]]:
    """``layer_options`` with each option's damage replaced by the measured output error."""
    outputs = [o.name for o in prepared.graph.output]
    runner = CutRunner(batches, threads)
    reference = [[values[name] for name in outputs] for _, values in runner.run(prepared, outputs)]
    base = graphs.import_graph(prepared)
    base_layers = {layer.name: layer for layer in find_layers(base)}
    measured = []
    for number, (layer, options) in enumerate(zip(candidates, layer_options), 1):
        ranked = [k for k, option in enumerate(options) if option.value is not None]
        if not ranked:
            measured.append(options)
            continue
        runner.advance(prepared, cut_before(base, base_layers[layer.name].node))
        picks = sorted({ranked[int(i)] for i in np.linspace(0, len(ranked) - 1, min(grid, len(ranked))).round()})
        rows = targets[layer.name].astype(np.float64)
        ranks, damages = [], []
        for k in picks:
            rank = options[k].value
            graph = graphs.import_graph(prepared)
            twin = next(l for l in find_layers(graph) if l.name == layer.name)
            lowrank.rewrite(graph, twin, lowrank.solve_linear(rows, rows, rank))
            ranks.append(rank)
            damages.append(relative_output_error(runner, graphs.export(graph, prepared), outputs, reference))
        damages = np.maximum.accumulate(np.asarray(damages)[::-1])[::-1]       # monotone: less rank, more damage
        interpolated = np.interp([options[k].value for k in ranked], ranks, damages)
        new = list(options)
        for k, damage in zip(ranked, interpolated):
            new[k] = allocation.Option(options[k].cost, float(damage), options[k].value)
        measured.append(new)
        if progress:
            progress("sensitivity", number, len(candidates))
    return measured
