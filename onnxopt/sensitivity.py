"""Per-layer sensitivity: the damage of compressing one layer alone, measured at the output.

Niu et al. 2017 (ALGORITHMS.md §4): for each layer and a grid of ranks, factorise that layer
alone and measure how much the model's outputs move on held-out samples. The layer is
factorised with the data-driven linear solver (Zhang et al.'s PCA of its responses on the
calibration rows), the rest of the model is left as it is. Three damages are measured at each
grid point, on the same samples:

- ``error``: relative squared output error ``sum ||f_l,r(x) - f(x)||^2 / sum ||f(x)||^2``, a
  smooth proxy that needs no labels;
- ``kl``: for (N, classes) outputs, the mean ``KL(softmax f(x) || softmax f_l,r(x))``, the
  proxy closest to accuracy (in nats);
- ``top1_drop``: with labels (``--eval-data``), the top-1 accuracy lost, in points.

Only the part of the graph after the layer runs (``CutRunner`` from the original model's
values at a cut just before it), so a layer costs a fraction of a model run per grid point.
Each curve is made monotone (never more damage at a higher rank), and ranks between grid
points are interpolated when the curves price the allocation's options.

``--sensitivity-folds K`` (``cross_fitting_splits``): the damages, low-rank's curves here and
pruning's (``prune_pipeline.OutputSensitivity``), are measured on K disjoint held-out folds of the
calibration samples, each with the rest calibrated on, and averaged (``Analysis.mean``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from scipy.special import log_softmax

from onnxopt import graph as graphs
from onnxopt.calib.capture import CutRunner, cut_before
from onnxopt.calib.readers import DataSource
from onnxopt.errors import UserError
from onnxopt.layers import Layer, find_layers, shape_text
from onnxopt.passes import allocation, lowrank
from onnxopt.verify import summed_kl

METRICS = ("error", "kl", "top1_drop")


@dataclass
class LayerCurve:
    name: str
    shape: str
    macs: int
    ranks: list[int]
    macs_at: list[int]
    error: list[float]
    kl: list[float] | None = None
    top1_drop: list[float] | None = None
    seconds: float = 0.0

    def damage(self, metric: str) -> np.ndarray:
        """The ``metric`` at each grid rank, monotone: less rank, no less damage."""
        values = getattr(self, metric)
        if values is None:
            raise ValueError(f"no {metric} measured for {self.name}")
        order = np.argsort(self.ranks)
        damages = np.maximum(np.asarray(values, np.float64)[order], 0.0)
        damages = np.maximum.accumulate(damages[::-1])[::-1]
        out = np.empty_like(damages)
        out[order] = damages
        return out


@dataclass
class Analysis:
    curves: list[LayerCurve]
    samples: int
    base_top1: float | None = None
    seconds: float = 0.0
    cached: bool = False
    metrics: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("cached")
        return data

    @classmethod
    def from_json(cls, data: dict) -> Analysis:
        data = dict(data)
        curves = [LayerCurve(**curve) for curve in data.pop("curves")]
        return cls(curves=curves, **data)

    @classmethod
    def mean(cls, analyses: list[Analysis]) -> Analysis:
        """The curves of the cross-fitted splits (the same layers at the same ranks), averaged."""
        first = analyses[0]
        curves = []
        for curve in first.curves:
            same = [a.curve(curve.name) for a in analyses]
            assert all(c is not None and c.ranks == curve.ranks for c in same)     # ranks depend on shapes, not data
            averaged = {metric: None if getattr(curve, metric) is None
                        else np.mean([getattr(c, metric) for c in same], axis=0).tolist() for metric in METRICS}
            curves.append(LayerCurve(name=curve.name, shape=curve.shape, macs=curve.macs, ranks=curve.ranks,
                                     macs_at=curve.macs_at, seconds=sum(c.seconds for c in same), **averaged))
        return cls(curves=curves, samples=sum(a.samples for a in analyses),
                   seconds=sum(a.seconds for a in analyses), cached=all(a.cached for a in analyses),
                   metrics=first.metrics)

    def curve(self, name: str) -> LayerCurve | None:
        return next((c for c in self.curves if c.name == name), None)

    def default_metric(self) -> str:
        """``kl`` for classifiers (closest to accuracy, and smooth), else ``error``."""
        return "kl" if "kl" in self.metrics else "error"


class OutputReference:
    """The original model's outputs on the evaluation batches, and how far a variant moves them."""

    def __init__(self, runner: CutRunner, model: onnx.ModelProto, labels: np.ndarray | None):
        self.outputs = [o.name for o in model.graph.output]
        self.values = [[values[name].astype(np.float64) for name in self.outputs] for _, values in runner.run(model, self.outputs)]
        first = self.values[0][0] if self.values else np.zeros((0, 0))
        self.classifier = first.ndim == 2 and first.shape[1] > 1
        self.labels = labels
        self.log_probs = [log_softmax(batch[0], axis=1) for batch in self.values] if self.classifier else None
        self.base_top1 = self.top1([batch[0] for batch in self.values]) if labels is not None and self.classifier else None

    def top1(self, logits: list[np.ndarray]) -> float:
        predicted = np.concatenate([batch.argmax(1) for batch in logits])
        return float((predicted == self.labels[: len(predicted)]).mean() * 100)

    def damages(self, runner: CutRunner, model: onnx.ModelProto) -> dict[str, float]:
        error = norm = kl = 0.0
        logits, rows = [], 0
        for (index, values), expected in zip(runner.run(model, self.outputs), self.values):
            for name, ref in zip(self.outputs, expected):
                got = values[name].astype(np.float64)
                error += float(np.square(got - ref).sum())
                norm += float(np.square(ref).sum())
            if self.classifier:
                got = values[self.outputs[0]].astype(np.float64)
                kl += summed_kl(self.log_probs[index], got)
                rows += len(got)
                logits.append(got)
        result = {"error": error / max(norm, 1e-30)}
        if self.classifier:
            result["kl"] = kl / max(rows, 1)
        if self.base_top1 is not None:
            result["top1_drop"] = self.base_top1 - self.top1(logits)
        return result


def cross_fitting_splits(calib: DataSource, holdout: DataSource, folds: int, seed: int):
    """The other ``folds - 1`` (calibration, held-out) splits of ``--sensitivity-folds``.

    The calibration samples, shuffled by ``seed``, are cut into folds of the held-out set's
    size; each fold is held out in turn and the rest, the held-out set among them, calibrated
    on. With the given split as the first fold, every sample is held out once in
    ``folds * len(holdout)`` samples, and every split calibrates on as many samples as the
    given one. K-fold cross-fitting (Chernozhukov et al. 2018, "Double/debiased machine
    learning", §3): each damage is still measured on samples its refit never saw, but on K
    times as many of them, so the allocation follows the layers rather than the 70 photos one
    split holds out (README, "K-fold damages"). ``check_folds`` first.
    """
    size = len(holdout)
    order = np.random.default_rng(seed).permutation(len(calib))
    for fold in range(folds - 1):
        held = order[fold * size:(fold + 1) * size]
        yield calib.subset(np.setdiff1d(np.arange(len(calib)), held)).join(holdout), calib.subset(np.sort(held))


def check_folds(calib: DataSource | None, holdout: DataSource | None, folds: int, measured: bool) -> None:
    """Refuse a ``--sensitivity-folds`` the data cannot give, before any model runs: K folds of
    ``len(holdout)`` samples need held-out samples, an allocation by ``measured`` damages, and K
    times as many samples."""
    if folds < 1:
        raise UserError(f"--sensitivity-folds must be at least 1 (got {folds})")
    if folds == 1:
        return
    if not measured:
        raise UserError("--sensitivity-folds averages measured damages over held-out folds: "
                        "use --allocation sensitivity, or drop --sensitivity-folds")
    if calib is None or not len(calib) or holdout is None or not len(holdout):
        raise UserError("--sensitivity-folds averages the measured damages over held-out folds: "
                        "give --calib with --holdout above 0, or drop --sensitivity-folds")
    size = len(holdout)
    if folds * size > len(calib) + size:
        raise UserError(f"--sensitivity-folds {folds} needs {folds * size} samples ({folds} folds of the {size} held out); "
                        f"there are {len(calib) + size}: lower --sensitivity-folds or --holdout, or raise --calib-size")


def fold_progress(progress: Callable[[str, int, int], None] | None, number: int, folds: int):
    """``progress`` with each label saying which fold it belongs to ("fold 2/5: original model")."""
    if progress is None:
        return None
    return lambda label, done, total: progress(f"fold {number}/{folds}: {label}", done, total)


def grid_ranks(ranks: list[int], grid: int) -> list[int]:
    """``grid`` ranks spread evenly over the allowed ones (all of them if fewer)."""
    if not ranks:
        return []
    picks = np.linspace(0, len(ranks) - 1, min(grid, len(ranks))).round().astype(int)
    return sorted({ranks[i] for i in picks})


def analyze(prepared: onnx.ModelProto, candidates: list[Layer], allowed_ranks: dict[str, list[int]],
            targets: dict[str, np.ndarray], batches: list[dict[str, np.ndarray]], labels: np.ndarray | None = None,
            threads: int = 0, grid: int = 4, progress: Callable[[str, int, int], None] | None = None) -> Analysis:
    """Damage curves of every candidate layer compressed alone, at ``grid`` of its allowed ranks."""
    start = time.perf_counter()
    runner = CutRunner(batches, threads)
    reference = OutputReference(runner, prepared, labels)
    base = graphs.import_graph(prepared)
    base_layers = {layer.name: layer for layer in find_layers(base)}
    curves = []
    for number, layer in enumerate(candidates, 1):
        t0 = time.perf_counter()
        ranks = grid_ranks(allowed_ranks[layer.name], grid)
        runner.advance(prepared, cut_before(base, base_layers[layer.name].node))
        rows = targets[layer.name].astype(np.float64)
        measured: dict[str, list[float]] = {}
        for rank in ranks:
            graph = graphs.import_graph(prepared)
            twin = next(l for l in find_layers(graph) if l.name == layer.name)
            lowrank.rewrite(graph, twin, lowrank.solve_linear(rows, rows, rank))
            for metric, value in reference.damages(runner, graphs.export(graph, prepared)).items():
                measured.setdefault(metric, []).append(value)
        curves.append(LayerCurve(
            name=layer.name, shape=shape_text(layer), macs=layer.macs, ranks=ranks,
            macs_at=[lowrank.decomposed_macs(layer, r) for r in ranks], error=measured.get("error", []),
            kl=measured.get("kl"), top1_drop=measured.get("top1_drop"), seconds=time.perf_counter() - t0))
        if progress:
            progress("sensitivity", number, len(candidates))
    metrics = [m for m in METRICS if m == "error" or (m == "kl" and reference.classifier) or (m == "top1_drop" and reference.base_top1 is not None)]
    return Analysis(curves=curves, samples=sum(len(next(iter(b.values()))) for b in batches),
                    base_top1=reference.base_top1, seconds=time.perf_counter() - start, metrics=metrics)


def measured_options(layer_options: list[list[allocation.Option]], candidates: list[Layer], analysis: Analysis,
                     metric: str) -> list[list[allocation.Option]]:
    """``layer_options`` with each option's damage replaced by ``analysis``'s measured ``metric``
    (interpolated between grid ranks; keeping the layer costs nothing)."""
    priced = []
    for layer, options in zip(candidates, layer_options):
        curve = analysis.curve(layer.name)
        ranked = [k for k, option in enumerate(options) if option.value is not None]
        if curve is None or not curve.ranks or not ranked:
            priced.append(options)
            continue
        damages = curve.damage(metric)
        order = np.argsort(curve.ranks)
        interpolated = np.interp([options[k].value for k in ranked], np.asarray(curve.ranks)[order], damages[order])
        new = list(options)
        for k, damage in zip(ranked, interpolated):
            new[k] = allocation.Option(options[k].cost, float(damage), options[k].value)
        priced.append(new)
    return priced


def pareto_front(analysis: Analysis, layer_options: list[list[allocation.Option]], candidates: list[Layer],
                 fixed_macs: int, metric: str, speedups: list[float]) -> list[dict]:
    """Predicted damage (sum over layers, Niu et al.'s additive model) of the best allocation at
    each speed-up: the knapsack solved for every budget."""
    priced = measured_options(layer_options, candidates, analysis, metric)
    total = fixed_macs + sum(options[0].cost for options in priced)
    front = []
    for speedup in speedups:
        choice = allocation.allocate(priced, total / speedup - fixed_macs)
        if choice is None:
            break
        macs = fixed_macs + sum(options[k].cost for options, k in zip(priced, choice))
        front.append({"speedup_target": speedup, "mac_speedup": total / macs,
                      "predicted_damage": float(sum(options[k].damage for options, k in zip(priced, choice)))})
    return front
