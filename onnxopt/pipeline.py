"""`onnxopt compress`: from a trained model and calibration data to a smaller, verified model.

1. Prepare the graph (``graph.prepare``) and list its layers (``layers.find_layers``).
2. Run the ORIGINAL model once over the calibration set: at a few sampled output positions
   per image, keep each candidate layer's responses (the targets ``y``).
3. Allocate ranks under the MAC budget (``passes.allocation``) from the energy spectra.
4. Compress layer by layer in topological order (or in ``stages``, slices of the chosen
   layers). Before each stage the CURRENT model (earlier stages already rewritten) is run
   from stored values at a graph cut just before the stage (``calib.capture.CutRunner``), and
   the same positions give ``yhat``, the original weights' responses on current inputs: the
   asymmetric formulation, so errors do not accumulate. Moving the cut forward after each
   stage makes the whole walk cost about two model runs, not one per layer.
5. Verify (``verify``) and return the model; the caller writes it atomically. If verification
   fails (checker, onnxruntime, or NaN/Inf outputs), the layers whose rewrite causes it are
   rolled back one by one (``_roll_back``) and reported as skipped.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxopt import graph as graphs
from onnxopt.cache import DiskCache, data_digest, default_dir, model_digest
from onnxopt.calib.capture import CutRunner, cut_before
from onnxopt.calib.readers import DataSource, measurement_samples
from onnxopt.calib.stats import RowSample, responses_at, sample_positions
from onnxopt.errors import UserError
from onnxopt.latency import LayerTimer
from onnxopt.layers import Layer, class_score_layers, find_layers, model_macs, shape_text
from onnxopt.passes import allocation, lowrank, vbmf
from onnxopt.sensitivity import Analysis, analyze, check_folds, cross_fitting_splits, fold_progress, measured_options
from onnxopt.verify import Verification, VerificationError, verify

Progress = Callable[[str, int, int], None]
SHORTCUT = "/shortcut"
SOLVERS = ("auto", "linear", "svd")
ALLOCATIONS = ("energy", "uniform", "sensitivity", "vbmf")
PRUNE_METHODS = ("prune", "filter-std", "filter-l1")
SELECTIONS = ("lasso", "greedy")       # channel pruning (prune, auto): He et al.'s LASSO path, or backward elimination
METHODS = ("lowrank", *PRUNE_METHODS, "tucker2", "spatial", "auto")
COSTS = ("macs", "latency")
POOL_EARLY = ("auto", "yes", "no")      # --pool-early (pooling_pipeline)
RECONSTRUCTIONS = ("ls", "block")     # each method's layer-wise least squares; then block_pipeline


def check_selection(selection: str) -> None:
    """Refuse an unknown ``--selection``."""
    if selection not in SELECTIONS:
        raise UserError(f"unknown --selection {selection!r}; choose {' or '.join(SELECTIONS)}")


@dataclass
class CompressOptions:
    speedup: float | None           # None: only with method "tucker2" (ranks from EVBMF alone)
    method: str = "lowrank"
    exclude: list[str] = field(default_factory=list)
    seed: int = 0
    rows_per_layer: int = 8192
    stages: int = 0                 # 0: one per compressed layer (exact asymmetric inputs)
    memory_budget: int = 2 * 2**30  # bytes of stored activations at a graph cut
    rank_multiple: int = 4          # factorising: ranks are multiples of this
    rank_below: int = 0             # ... or, below rank_multiple, multiples of this (0: never; --target x86)
    solver: str = "auto"            # "auto" (ReLU-aware where a ReLU follows), "linear", "svd" (data-free)
    asymmetric: bool = True         # inputs from the compressed model (False: from the original)
    allocation: str = "energy"      # "energy" (PCA-energy product, Zhang et al.), "uniform", "sensitivity" (measured)
    cost: str = "macs"              # what --speedup divides: "macs", or "latency" (measured per layer)
    round_to: int = 4               # pruning: kept channel counts are multiples of this
    round_below: int = 0            # ... or, fewer than round_to, multiples of this (0: never; --target x86)
    selection: str = "lasso"        # channel pruning (prune, auto): "lasso" (He et al.'s path) or "greedy" (backward elimination)
    latency_batch: int = 8
    threads: int = 0
    sensitivity_grid: int = 8       # ranks / keep counts measured per layer (--allocation sensitivity, analyze)
    sensitivity_folds: int = 1      # --allocation sensitivity (and auto's per-layer choice): damages averaged over this many cross-fitted held-out folds
    sensitivity_metric: str = "auto"  # "auto" (kl for classifiers, else error), "error", "kl", "top1_drop" (low-rank only); low-rank and pruning
    cache_dir: Path | None = field(default_factory=default_dir)   # None: no disk cache
    vbmf_weaken: float = 0.8        # tucker2: MUSCO's weakening factor of the EVBMF ranks, in (0, 1]
    compression_stages: int = 1     # tucker2: MUSCO stages (--stages; not --calib-stages)
    reconstruct: str = "ls"         # "ls" (each method's own layer-wise least squares) or "block" (then passes.block_fit)
    block_steps: int = 300          # --reconstruct block: Adam steps per fitted stretch
    block_span: int | str = "stage" # --reconstruct block: the blocks of a spatial size fitted as one, or so many
    block_lr: float = 1e-2          # --reconstruct block: each layer's Adam step size, relative to its weights' RMS
    factorize_classifier: bool = False  # low-rank / tucker2: also factorise the layer computing the class scores
    pool_early: str = "auto"        # "auto" (auto weighs it), "yes" (before any method), "no": pooling_pipeline


@dataclass
class LayerResult:
    name: str
    op: str
    shape: str
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    rank: int | None = None
    full_rank: int | None = None
    solver: str | None = None
    error_before: float | None = None   # relative response error, no compression (input drift)
    error_after: float | None = None    # relative response error of the factorised layer
    skipped: str | None = None


@dataclass
class CompressionResult:
    model: onnx.ModelProto
    layers: list[LayerResult]
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    verification: Verification
    preparation: dict
    timings: dict
    calib_samples: int
    holdout_samples: int
    rows_per_layer: int
    stages: int
    auto: dict | None = None            # --method auto: every prune/low-rank split tried, and its error
    reconstruction: dict | None = None  # --reconstruct block: the blocks fitted, their held-out errors before and after
    pooling: dict | None = None         # --pool-early: the heads pooled first, the response kept and both measured

    def to_json(self) -> dict:
        extra = {"auto": self.auto} if self.auto is not None else {}
        if self.reconstruction is not None:
            extra["block_reconstruction"] = self.reconstruction
        if self.pooling is not None:
            extra["early_pooling"] = self.pooling
        return {**extra,
            "macs_before": self.macs_before,
            "macs_after": self.macs_after,
            "mac_speedup": self.macs_before / max(self.macs_after, 1),
            "params_before": self.params_before,
            "params_after": self.params_after,
            "size_bytes": self.model.ByteSize(),
            "preparation": self.preparation,
            "calibration": {"samples": self.calib_samples, "holdout_samples": self.holdout_samples,
                            "rows_per_layer": self.rows_per_layer, "stages": self.stages},
            "verification": self.verification.to_json(),
            "timings_s": self.timings,
            "layers": [vars(layer) for layer in self.layers],
        }


def batch_size_for(per_sample_floats: int) -> int:
    """Batches of about 128 MB of captured activations, between 1 and 128 samples."""
    return int(max(1, min(128, (32 * 2**20) // max(per_sample_floats, 1))))


def per_sample_floats(layers: list[Layer]) -> int:
    total = 0
    for layer in layers:
        spatial = int(np.prod(layer.output_hw)) if layer.op == "Conv" else 1
        total += layer.out_channels * spatial
    return total


def layer_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:4], "little")


class ResponseSampler:
    """Sampled responses of chosen layers, at the same positions on every run.

    Positions come from a generator seeded by (seed, layer name, batch index), so the
    original and the current model are sampled at the same output positions.
    """

    def __init__(self, data: DataSource, layers: list[Layer], rows_per_layer: int, seed: int):
        self.rows_per_layer = rows_per_layer
        self.seed = seed
        self.samples = len(data)
        self.per_image = max(1, math.ceil(rows_per_layer / len(data)))
        self.batch_size = batch_size_for(per_sample_floats(layers))

    def collect(self, model: onnx.ModelProto, layers: list[Layer], runner: CutRunner,
                progress: Progress | None = None, label: str = "") -> dict[str, np.ndarray]:
        """Rows of each layer's output, and of its residual shortcut (key ``name + SHORTCUT``)."""
        names = [layer.output.name for layer in layers] + [layer.shortcut.name for layer in layers if layer.shortcut is not None]
        samples = {layer.name: RowSample(self.rows_per_layer) for layer in layers}
        samples.update({layer.name + SHORTCUT: RowSample(self.rows_per_layer) for layer in layers if layer.shortcut is not None})
        done = 0
        for batch_index, outputs in runner.run(model, names):
            for layer in layers:
                out = outputs[layer.output.name]
                if out.ndim == 4:
                    positions = sample_positions(out.shape[0], out.shape[2], out.shape[3], self.per_image,
                                                 (layer_seed(self.seed, layer.name), batch_index))
                    samples[layer.name].add(responses_at(out, positions))
                    if layer.shortcut is not None:
                        samples[layer.name + SHORTCUT].add(responses_at(outputs[layer.shortcut.name], positions))
                else:
                    samples[layer.name].add(out.reshape(out.shape[0], -1))
            done += len(out)
            if progress:
                progress(label, done, self.samples)
        return {name: sample.array() for name, sample in samples.items()}


def counts_below(multiple: int, below: int, limit: int) -> list[int]:
    """The counts under ``multiple`` and ``limit`` in multiples of ``below`` (none for 0): the
    narrow part of a target's channel grid (``tvm_backend.channel_grid``), for pruning's keep
    counts and factorisation's ranks alike."""
    return list(range(below, min(multiple, limit), below)) if below else []


def rank_grid(layer: Layer, multiple: int, max_saving_rank: Callable[[Layer], int] = lowrank.max_saving_rank,
              below: int = 0) -> list[int]:
    """The ranks a layer may be factorised to: multiples of ``multiple`` and, fewer than
    ``multiple``, of ``below`` (0: none; ``tvm_backend.channel_grid``, as pruning's keep counts),
    that save MACs (the largest such rank from ``max_saving_rank``: a pass's own cost model).
    Where none does, the largest rank that saves MACs."""
    top = max_saving_rank(layer)
    ranks = counts_below(multiple, below, top + 1) + list(range(multiple, top + 1, multiple))
    if not ranks and top >= 1:
        ranks.append(top)
    return ranks


def _rank_options(layer: Layer, eigenvalues: np.ndarray, multiple: int, timer: LayerTimer | None = None,
                  below: int = 0) -> list[allocation.Option]:
    """Keep, or factorise at each rank of ``rank_grid(layer, multiple, below=below)``.

    With a ``timer`` the cost of an option is its measured latency, and ranks that are not
    faster than the layer itself are not offered (never make a layer slower).
    """
    ranks = rank_grid(layer, multiple, below=below)
    if timer is None:
        options = [allocation.Option(cost=layer.macs, damage=0.0, value=None)]
        options += [allocation.Option(lowrank.decomposed_macs(layer, rank), allocation.energy_damage(eigenvalues, rank), rank) for rank in ranks]
        return options
    original = timer.seconds(layer)
    options = [allocation.Option(cost=original, damage=0.0, value=None)]
    for rank in ranks:
        seconds = timer.seconds(layer, rank)
        if seconds < original:
            options.append(allocation.Option(seconds, allocation.energy_damage(eigenvalues, rank), rank))
    return options


def choose_ranks(layers: list[Layer], candidates: list[Layer], targets: dict[str, np.ndarray],
                 options: CompressOptions, timings: dict[str, float],
                 measure: Callable[[list[list[allocation.Option]]], list[list[allocation.Option]]] | None = None
                 ) -> dict[str, int | None]:
    """A rank for each candidate (None: keep it) so that the cost drops by ``options.speedup``.

    The cost is MACs (exact per layer) or, with ``cost="latency"``, the sum of per-layer
    onnxruntime latencies; damage is the response energy lost (Zhang et al.), from the
    eigenvalues of each layer's response covariance in the original model (with no more rows
    than filters, the squared singular values of its weights), or, with
    ``measure`` (``--allocation sensitivity``), the output error measured per layer and rank.
    """
    spectra = {}
    for layer in candidates:
        rows = targets[layer.name].astype(np.float64)
        if len(rows) > layer.out_channels:
            spectra[layer.name] = np.linalg.eigvalsh(np.atleast_2d(np.cov(rows, rowvar=False)))
        else:       # too few rows to estimate it (lowrank.solve falls back to the weight SVD too)
            spectra[layer.name] = np.linalg.svd(layer.weight_matrix().astype(np.float64), compute_uv=False) ** 2
    timer = LayerTimer(batch=options.latency_batch) if options.cost == "latency" else None
    t0 = time.perf_counter()
    layer_options = [_rank_options(layer, spectra[layer.name], options.rank_multiple, timer, options.rank_below) for layer in candidates]
    others = [layer for layer in layers if layer not in candidates and layer.output_hw is not None]
    if timer is None:
        fixed = sum(layer.macs for layer in others)
    else:
        fixed = sum(timer.seconds(layer) for layer in others)
        timings["latency_table"] = time.perf_counter() - t0
    if measure is not None:
        layer_options = measure(layer_options)
    total = fixed + sum(opts[0].cost for opts in layer_options)
    budget = total / options.speedup - fixed
    if options.allocation == "uniform":
        choice = _proportional_choice([layer.out_channels for layer in candidates], layer_options, budget)
    elif options.allocation == "vbmf":
        choice = _proportional_choice(vbmf_references(candidates, options.vbmf_weaken), layer_options, budget)
    else:
        choice = allocation.allocate(layer_options, budget)
    if choice is None:
        best = total / (fixed + sum(min(o.cost for o in opts) for opts in layer_options))
        what = "measured latency" if timer else "MACs"
        raise UserError(
            f"--speedup {options.speedup:g} is out of reach for low-rank factorisation of this model "
            f"(at most {best:.2f}x in {what}: {fixed / total:.0%} is in layers it cannot factor or speed up); lower --speedup"
        )
    return {layer.name: opts[k].value for layer, opts, k in zip(candidates, layer_options, choice)}


def _proportional_choice(references: list[float], layer_options: list[list[allocation.Option]], budget: float) -> list[int] | None:
    """The same fraction of each layer's reference rank (its full rank: uniform; its EVBMF
    rank: vbmf), the largest fraction that meets ``budget`` (bisection); then the budget that
    the ranks' granularity leaves is filled one rank step at a time, the layer with the smallest
    share of its reference first (layers of equal shape would otherwise all step together, and
    miss the budget by a whole step of each)."""
    def pick(fraction: float) -> list[int]:
        chosen = []
        for reference, options in zip(references, layer_options):
            wanted = fraction * reference
            ranked = [(k, o) for k, o in enumerate(options) if o.value is not None]
            fitting = [k for k, o in ranked if o.value <= wanted]
            chosen.append(max(fitting, key=lambda k: options[k].value) if fitting else (ranked[0][0] if ranked else 0))
        return chosen

    def cost(choice: list[int]) -> float:
        return sum(options[k].cost for options, k in zip(layer_options, choice))

    low, high = 0.0, 1.0
    if cost(pick(low)) > budget:
        return None
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(pick(middle)) <= budget else (low, middle)
    choice = pick(low)
    while True:
        spare = budget - cost(choice)
        steps = []
        for i, (reference, options, k) in enumerate(zip(references, layer_options, choice)):
            if options[k].value is None:
                continue                                   # kept whole: nothing above
            above = [j for j, o in enumerate(options) if o.value is not None and o.value > options[k].value]
            up = min(above, key=lambda j: options[j].value) if above else 0     # the next rank, else keep
            if options[up].cost - options[k].cost <= spare:
                steps.append((options[k].value / max(reference, 1e-9), i, up))
        if not steps:
            return choice
        _, i, up = min(steps)
        choice[i] = up


def vbmf_references(layers: list[Layer], weaken_factor: float) -> list[float]:
    """Each layer's weakened EVBMF rank of its weight matrix (d x c k^2; MUSCO, ALGORITHMS.md
    §5), or its full rank where EVBMF is guarded (no rank estimate: nothing to scale by)."""
    if not 0 < weaken_factor <= 1:
        raise UserError(f"--vbmf-weaken must be in (0, 1] (got {weaken_factor}); 1 uses the EVBMF ranks as they are")
    references = []
    for layer in layers:
        rank, _ = vbmf.weakened_rank(layer.weight_matrix().astype(np.float64), weaken_factor)
        references.append(float(rank if rank is not None else layer.out_channels))
    return references


def _stage_slices(count: int, stages: int) -> list[slice]:
    stages = max(1, min(stages, count))
    bounds = np.linspace(0, count, stages + 1).round().astype(int)
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _relative_error(approx: np.ndarray, target: np.ndarray, relu: bool) -> float:
    if relu:
        approx, target = np.maximum(approx, 0), np.maximum(target, 0)
    return float(np.linalg.norm(approx - target) / max(np.linalg.norm(target), 1e-12))


CLASSIFIER_KEPT = ("computes the class scores: factorising them cost SqueezeNet 4-5 top-1 points on classes the "
                   "calibration images did not show (--factorize-classifier to factorise them anyway)")


def plan_candidates(layers: list[Layer], exclude: list[str], class_scores: set[str] = frozenset(),
                    applicability: Callable[[Layer], str | None] = lowrank.applicability) -> tuple[list[Layer], dict[str, str]]:
    """Layers a factorising pass will consider, and why each other layer is left alone.

    ``class_scores``: the layers computing a classifier's scores (``layers.class_score_layers``),
    left alone unless ``--factorize-classifier``. Measured, not derived: on SqueezeNet 1.1 at
    1.5x (``auto``, 250 calibration photos from 350 classes, evaluated on 350 others) the
    classifier factorised to rank 184 of 1000 lost 6.00 points on the calibration classes'
    photos and 9.71 on the others; kept whole, 7.71 and 5.71 (4.0-4.9 points on the others over
    three seeds). Factorised alone it loses about as much on both class sets (README).
    """
    import fnmatch

    reasons: dict[str, str] = {}
    candidates = []
    for layer in layers:
        reason = applicability(layer)
        if reason is None and any(fnmatch.fnmatchcase(layer.name, pattern) for pattern in exclude):
            reason = "excluded by --exclude"
        if reason is None and layer.name in class_scores:
            reason = CLASSIFIER_KEPT
        if reason:
            reasons[layer.name] = reason
        else:
            candidates.append(layer)
    return candidates, reasons


def kept_class_scores(graph: gs.Graph, layers: list[Layer], options: CompressOptions) -> set[str]:
    """The class-score layers ``plan_candidates`` leaves alone: none with ``--factorize-classifier``
    or the data-free ``--solver svd`` (whose factors do not depend on the calibration images)."""
    if options.factorize_classifier or options.solver == "svd":
        return set()
    return class_score_layers(graph, layers)


@dataclass
class Plan:
    """The prepared graph, its layers, and the ones the low-rank pass may factorise."""

    prepared: onnx.ModelProto
    preparation: dict
    graph: gs.Graph
    layers: list[Layer]
    candidates: list[Layer]
    reasons: dict[str, str]       # why each other layer is left alone


def plan(model: onnx.ModelProto, options: CompressOptions, sample_shapes: dict | None = None) -> Plan:
    """Step 1: prepare the graph (``graph.prepare``; ``sample_shapes``: the calibration data's
    input shapes, for dynamic spatial dims) and pick the candidate layers."""
    prepared, preparation = graphs.prepare(model, sample_shapes)
    graph = graphs.import_graph(prepared)
    layers = find_layers(graph)
    candidates, reasons = plan_candidates(layers, options.exclude, kept_class_scores(graph, layers, options))
    if not candidates:
        detail = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:3]) or "the model has no Conv or Gemm layers"
        raise UserError(f"nothing to compress: no layer can be low-rank factorised ({detail})")
    return Plan(prepared, preparation, graph, layers, candidates, reasons)


@dataclass
class Calibration:
    """Step 2: the ORIGINAL model's sampled responses of every candidate layer."""

    plan: Plan
    sampler: ResponseSampler
    samples: list[dict[str, np.ndarray]]       # calibration batches, decoded once
    targets: dict[str, np.ndarray]


def calibrate(model_plan: Plan, calib: DataSource, options: CompressOptions,
              progress: Progress | None = None) -> Calibration:
    sampler = ResponseSampler(calib, model_plan.candidates, options.rows_per_layer, options.seed)
    samples = list(calib.batches(sampler.batch_size))
    targets = sampler.collect(model_plan.prepared, model_plan.candidates, CutRunner(samples, options.threads),
                              progress, "original model")
    return Calibration(model_plan, sampler, samples, targets)


def layer_sensitivity(model: onnx.ModelProto, model_plan: Plan, calib: DataSource, held_out: DataSource | None,
                      options: CompressOptions, labels: np.ndarray | None = None, progress: Progress | None = None,
                      cal: Calibration | None = None) -> Analysis:
    """Per-layer damage curves (``onnxopt.sensitivity``) on ``held_out`` (default: part of the
    calibration set). With ``options.sensitivity_folds`` K > 1, the mean curves of K splits: the
    given one and the others of ``sensitivity.cross_fitting_splits``, each calibrated and
    measured alone (``cal``, the given split's calibration, serves the first only)."""
    folds = options.sensitivity_folds
    if folds > 1:
        check_folds(calib, held_out, folds, measured=True)
        if labels is not None:
            raise UserError("--sensitivity-folds measures on folds of the calibration samples, which have no labels: "
                            "drop --sensitivity-folds or the labelled held-out data")
    analysis = _split_sensitivity(model, model_plan, calib, held_out, options, labels, progress, cal)
    if folds == 1:
        return analysis
    analyses = [analysis]
    for number, (calib_part, held_part) in enumerate(cross_fitting_splits(calib, held_out, folds, options.seed), 2):
        analyses.append(_split_sensitivity(model, model_plan, calib_part, held_part, options, None,
                                           fold_progress(progress, number, folds), None))
    return Analysis.mean(analyses)


def _split_sensitivity(model: onnx.ModelProto, model_plan: Plan, calib: DataSource, held_out: DataSource | None,
                       options: CompressOptions, labels: np.ndarray | None, progress: Progress | None,
                       cal: Calibration | None) -> Analysis:
    """``layer_sensitivity`` of one (calibration, held-out) split, from the disk cache when the
    model, data and settings are unchanged (then nothing is calibrated or run)."""
    held_out = measurement_samples(calib, held_out)
    allowed = {layer.name: rank_grid(layer, options.rank_multiple, below=options.rank_below) for layer in model_plan.candidates}
    key = {"analysis": "lowrank-sensitivity/1", "model": model_digest(model), "calib": data_digest(calib),
           "held_out": data_digest(held_out), "seed": options.seed, "rows_per_layer": options.rows_per_layer,
           "grid": options.sensitivity_grid, "ranks": allowed,
           "labels": None if labels is None else hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()}
    cache = DiskCache(options.cache_dir)
    hit = cache.get("sensitivity", key)
    if hit is not None:
        analysis = Analysis.from_json(hit)
        analysis.cached = True
        return analysis
    cal = cal or calibrate(model_plan, calib, options, progress)
    batches = list(held_out.batches(cal.sampler.batch_size))
    analysis = analyze(model_plan.prepared, model_plan.candidates, allowed, cal.targets, batches, labels, options.threads,
                       options.sensitivity_grid, progress)
    cache.put("sensitivity", key, analysis.to_json())
    return analysis


def compress(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None, options: CompressOptions,
             progress: Progress | None = None) -> CompressionResult:
    """Compress ``model`` with ``options.method``; with ``options.reconstruct == "block"``, then fit
    its blocks to the original's (``block_pipeline``)."""
    if options.reconstruct not in RECONSTRUCTIONS:
        raise UserError(f"unknown --reconstruct {options.reconstruct!r}; choose {' or '.join(RECONSTRUCTIONS)}")
    if options.pool_early not in POOL_EARLY:
        raise UserError(f"unknown --pool-early {options.pool_early!r}; choose one of: {', '.join(POOL_EARLY)}")

    def run(start: onnx.ModelProto, run_options: CompressOptions) -> CompressionResult:
        return _compress_with_method(start, calib, holdout, run_options, progress)

    def method() -> CompressionResult:
        if options.pool_early == "yes" and options.method != "auto":      # auto weighs it itself
            from onnxopt.pooling_pipeline import pooled_then

            return pooled_then(model, calib, holdout, options, run, progress)
        return run(model, options)

    if options.reconstruct == "ls":
        return method()
    from onnxopt.block_pipeline import check_block_data, reconstruct    # imports PyTorch

    check_block_data(calib)
    return reconstruct(model, method(), calib, holdout, options, progress)


def merge_layer_rows(first: list[LayerResult], second: list[LayerResult]) -> list[LayerResult]:
    """Per-layer rows of two passes run one after the other (the second on the first's model),
    measured against the original layers: a layer the first left alone takes the second's row
    with the original size; one only the first changed keeps the first's row with the final
    size; one both changed, the second's row with both solvers."""
    before_rows = {row.name: row for row in first}
    merged = []
    for row in second:
        before = before_rows.get(row.name)
        if before is None:
            merged.append(row)
        elif before.solver is None:
            merged.append(replace(row, shape=before.shape, macs_before=before.macs_before, params_before=before.params_before))
        elif row.rank is None and row.solver is None:
            merged.append(replace(before, macs_after=row.macs_after, params_after=row.params_after))
        else:
            merged.append(replace(row, shape=before.shape, macs_before=before.macs_before, params_before=before.params_before,
                                  solver=f"{before.solver}, then {row.solver}"))
    return merged


def chain_results(first: CompressionResult, second: CompressionResult, **changes) -> CompressionResult:
    """``second`` (a pass run on ``first.model``) as one result measured against ``first``'s
    original: merged rows, the original's size and preparation, both passes' stages."""
    return replace(second, layers=merge_layer_rows(first.layers, second.layers), macs_before=first.macs_before,
                   params_before=first.params_before, preparation=first.preparation,
                   stages=first.stages + second.stages, pooling=second.pooling or first.pooling, **changes)


def _compress_with_method(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                          options: CompressOptions, progress: Progress | None = None) -> CompressionResult:
    """Compress ``model`` with ``options.method`` (see the module docstring for low-rank)."""
    if options.method == "tucker2":
        from onnxopt.tucker_pipeline import compress_tucker2

        return compress_tucker2(model, calib, holdout, options, progress)
    if options.speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {options.speedup})")
    if options.method not in METHODS:
        raise UserError(f"unknown --method {options.method!r}; choose one of: {', '.join(METHODS)}")
    if options.method in PRUNE_METHODS:
        from onnxopt.prune_pipeline import compress_prune

        return compress_prune(model, calib, holdout, options, progress)
    if options.method == "spatial":
        from onnxopt.spatial_pipeline import compress_spatial

        return compress_spatial(model, calib, holdout, options, progress)
    if options.method == "auto":
        from onnxopt.auto_pipeline import compress_auto

        return compress_auto(model, calib, holdout, options, progress)
    if calib is None:
        raise UserError("--method lowrank is data-driven: give calibration data with --calib (an image folder or .npz)")
    if options.solver not in SOLVERS:
        raise UserError(f"unknown --solver {options.solver!r}; choose one of: {', '.join(SOLVERS)}")
    if options.cost not in COSTS:
        raise UserError(f"unknown --cost {options.cost!r}; choose one of: {', '.join(COSTS)}")
    if options.allocation not in ALLOCATIONS:
        raise UserError(f"unknown --allocation {options.allocation!r}; choose one of: {', '.join(ALLOCATIONS)}")
    check_folds(calib, holdout, options.sensitivity_folds, measured=options.allocation == "sensitivity")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    model_plan = plan(model, options, calib.sample_shapes())
    prepared, graph, layers, candidates, reasons = (model_plan.prepared, model_plan.graph, model_plan.layers,
                                                    model_plan.candidates, model_plan.reasons)
    timings["prepare"] = time.perf_counter() - start
    t0 = time.perf_counter()
    cal = calibrate(model_plan, calib, options, progress)
    sampler, samples, targets = cal.sampler, cal.samples, cal.targets
    timings["capture_original"] = time.perf_counter() - t0
    macs_before = model_macs(layers)

    measure = None
    if options.allocation == "sensitivity":
        t0 = time.perf_counter()
        analysis = layer_sensitivity(model, model_plan, calib, holdout, options, progress=progress, cal=cal)
        timings["sensitivity"] = time.perf_counter() - t0
        metric = analysis.default_metric() if options.sensitivity_metric == "auto" else options.sensitivity_metric
        if metric not in analysis.metrics:
            raise UserError(f"sensitivity metric {metric!r} was not measured for this model (measured: {', '.join(analysis.metrics)})")
        measure = lambda opts: measured_options(opts, candidates, analysis, metric)  # noqa: E731
    ranks = choose_ranks(layers, candidates, targets, options, timings, measure)
    chosen = [layer for layer in candidates if ranks[layer.name] is not None]

    results: dict[str, LayerResult] = {}
    facts: dict[str, lowrank.Factorization] = {}
    t0 = time.perf_counter()
    slices = _stage_slices(len(chosen), options.stages or len(chosen)) if chosen else []
    runner = CutRunner(samples, options.threads, options.memory_budget)
    for number, part in enumerate(slices, 1):
        stage_layers = chosen[part]
        if options.asymmetric and options.solver != "svd":
            current = graphs.export(graph, prepared)
            runner.advance(current, cut_before(graph, stage_layers[0].node))
            yhats = sampler.collect(current, stage_layers, runner, progress, f"layer {part.start + 1}/{len(chosen)}")
        else:
            yhats = targets                 # symmetric: inputs from the original model
        for layer in stage_layers:
            yhat = yhats[layer.name].astype(np.float64)
            target = targets[layer.name].astype(np.float64)
            offset = None
            if layer.shortcut is not None and yhats is not targets:   # reconstruct the Add's output
                target = target + targets[layer.name + SHORTCUT]
                offset = yhats[layer.name + SHORTCUT].astype(np.float64)
            with threadpool_limits(limits=1, user_api="blas"):   # small (N, d) problems: threads only contend
                fact = lowrank.solve(layer, yhat, target, ranks[layer.name], offset, options.solver)
            relu = layer.activation == "relu"
            results[layer.name] = LayerResult(
                layer.name, layer.op, shape_text(layer), layer.macs, lowrank.decomposed_macs(layer, fact.rank),
                layer.params, fact.rank * (layer.in_channels * layer.kernel[0] * layer.kernel[1] + layer.out_channels) + layer.out_channels,
                rank=fact.rank, full_rank=layer.out_channels, solver=fact.solver,
                error_before=_relative_error(yhat + (0 if offset is None else offset), target, relu),
                error_after=_relative_error(fact.apply(yhat) + (0 if offset is None else offset), target, relu),
            )
            lowrank.rewrite(graph, layer, fact)
            facts[layer.name] = fact
    timings["solve_and_rewrite"] = time.perf_counter() - t0

    compressed = graphs.restore_signature(graphs.export(graph, prepared), model)
    t0 = time.perf_counter()
    check_data = holdout if holdout is not None and len(holdout) else calib
    try:
        verification = verify(model, compressed, check_data, options.threads)
    except VerificationError:
        compressed, verification = _roll_back(model, prepared, chosen, facts, check_data, options.threads, reasons)
        for name in reasons:
            results.pop(name, None)
    timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    table = []
    for layer in layers:
        if layer.name in results:
            table.append(results[layer.name])
        else:
            table.append(LayerResult(layer.name, layer.op, shape_text(layer), layer.macs or 0, layer.macs or 0,
                                     layer.params, layer.params,
                                     skipped=reasons.get(layer.name, "kept: the budget is met without it")))
    macs_after = sum(r.macs_after for r in table)
    return CompressionResult(
        model=compressed, layers=table, macs_before=macs_before, macs_after=macs_after,
        params_before=sum(r.params_before for r in table), params_after=sum(r.params_after for r in table),
        verification=verification, preparation=model_plan.preparation, timings=timings,
        calib_samples=len(calib), holdout_samples=len(holdout), rows_per_layer=options.rows_per_layer,
        stages=len(slices),
    )


def _rewritten(model: onnx.ModelProto, prepared: onnx.ModelProto, names: list[str],
               facts: dict[str, lowrank.Factorization]) -> onnx.ModelProto:
    """``prepared`` with the layers ``names`` replaced by their factorisations, ``model``'s signature."""
    graph = graphs.import_graph(prepared)
    by_name = {layer.name: layer for layer in find_layers(graph)}
    for name in names:
        lowrank.rewrite(graph, by_name[name], facts[name])
    return graphs.restore_signature(graphs.export(graph, prepared), model)


def _roll_back(model: onnx.ModelProto, prepared: onnx.ModelProto, chosen: list[Layer], facts: dict[str, lowrank.Factorization],
               data: DataSource, threads: int, reasons: dict[str, str]) -> tuple[onnx.ModelProto, Verification]:
    """The compressed model failed verification (a pass bug): undo the rewrites that cause it.

    Rewrites are applied again one layer at a time in topological order, verifying after each;
    a layer whose rewrite makes the model fail keeps its original weights and gets the reason
    in ``reasons`` (the report's ``skipped``). Costs one verification per chosen layer, only
    when the whole model failed.
    """
    kept: list[str] = []
    for layer in chosen:
        try:
            verify(model, _rewritten(model, prepared, [*kept, layer.name], facts), data, threads)
            kept.append(layer.name)
        except VerificationError as exc:
            reasons[layer.name] = f"rolled back: {exc}"
    compressed = _rewritten(model, prepared, kept, facts)
    return compressed, verify(model, compressed, data, threads)

