"""`onnxopt compress --method auto`: channel pruning and low-rank factorisation under one budget.

In the spirit of He et al.'s "3C" (ALGORITHMS.md §2: pruning + factorisation combined), under
ONE ``--speedup`` budget ``s`` on MACs. Candidates are built, each meeting ``s``, and the one
that moves the model's outputs least is kept:

1. Global splits. For each prune share ``f`` in ``SHARES`` (0, 1/3, 1/2, 2/3, 1), prune
   channels to ``s_p = s^f`` times fewer MACs (``prune_pipeline.compress_prune``, He et al.
   LASSO + least squares), then factorise the pruned model by ``s_l = MACs_pruned /
   (MACs_orig / s)``, once with each of ``FACTORISERS``: low-rank (``pipeline.compress``,
   Zhang et al.) and spatial decomposition (``spatial_pipeline``, Jaderberg et al.; on
   ResNet-20 at 1.5x it alone lost 0.78 points where this method's best had lost 1.85).
   ``f = 0`` is a factoriser alone, ``f = 1`` pruning alone (one candidate). The pruning
   analysis of the original model (groups, damage at every keep count) does not depend on
   ``s_p`` and is made once; each pruned model once for both factorisers.
2. Per-layer choice (``per_layer_choice``). Every prunable group ``g`` offers keep counts
   ``k`` and every factorisable layer ``l`` ranks ``r``, each priced by the same measured
   damage: the relative squared output error of the model with that group pruned alone
   (``prune_pipeline.OutputSensitivity``) or that layer factorised alone
   (``onnxopt.sensitivity``, Niu et al. 2017), on the same held-out samples (with
   ``--sensitivity-folds K``, both averaged over K cross-fitted held-out folds). One
   multiple-choice knapsack over groups AND layers (``passes.allocation``; damages additive
   as in Niu et al.) then decides, per group and per layer, whether and how much to prune or
   to factorise, under the MAC budget. A layer may be both (pruned, then factorised at a
   rank): the knapsack prices the two savings as if they added up, which overstates them
   (``M (1 - i/I)(1 - o/O)``-type overlap), so its budget is corrected a few times by the
   MACs of the choice on the pruned shapes. The chosen groups are pruned to their counts,
   then the chosen layers, only they, are factorised by the low-rank pass to meet ``s``
   exactly (its own allocation, on the pruned model).
3. Measure each candidate's output on the held-out calibration samples against the ORIGINAL
   model (``verify.compare_outputs``; without a holdout, on the first 128 calibration
   samples): for a classifier (N, classes) the mean ``KL(softmax z_orig || softmax z_cand)``,
   otherwise the relative L2 error ``||z_orig - z_cand|| / ||z_orig||``. Keep the candidate
   with the smallest and report every one (``auto`` in the JSON). KL, not L2, because it
   follows accuracy: on SqueezeNet 1.1 at 1.5x the six candidates scored 43.1-49.4% top-1 on
   the evaluation split; the least KL picked the best one (49.4%), the least L2 the fifth
   (46.0%).

With ``--pool-early auto`` (the default) or ``yes``, a model whose global average pooling reads
1x1 convolutions (``pooling_pipeline``: SqueezeNet's classifier conv, MobileNetV2's last two
convs) is also pooled first, and steps 1-2 run again on that model under the rest of the budget
(``yes``: only there); step 3 compares all of them with the original. Measured on SqueezeNet 1.1
at 1.5x (README): the classifier conv pooled first takes 1.33x of the budget for a held-out KL
of 0.015; over three calibration draws the candidates kept (each pooled first) lose 1.71 points
on average, against 5.52 with the head left alone.

A candidate whose pass cannot reach its part of the budget (the pass raises "out of reach")
is recorded with the reason and skipped.
"""

from __future__ import annotations

import dataclasses
import glob
import time
from collections.abc import Callable

import numpy as np
import onnx

from onnxopt import graph as graphs
from onnxopt.calib.readers import DataSource, measurement_samples
from onnxopt.errors import UserError
from onnxopt.layers import Layer
from onnxopt.passes import allocation, lowrank
from onnxopt.pooling_pipeline import NOTHING_TO_POOL, pool_early, rest_speedup
from onnxopt.pipeline import (CompressionResult, CompressOptions, Plan, Progress, chain_results, compress, layer_sensitivity,
                              plan, rank_grid)
from onnxopt.prune_pipeline import PruneAnalysis, analyze_prune, compress_prune, kept_fractions, macs_kept
from onnxopt.sensitivity import Analysis, check_folds, measured_options
from onnxopt.spatial_pipeline import ALLOCATIONS as SPATIAL_ALLOCATIONS
from onnxopt.verify import compare_outputs

SHARES = (0.0, 1 / 3, 1 / 2, 2 / 3, 1.0)     # exponent f of the prune speed-up s^f
FACTORISERS = ("lowrank", "spatial")          # what factorises after pruning, in each split but pruning alone
MIN_STAGE_SPEEDUP = 1.01                      # a pass asked for less than this is not run
BUDGET_CORRECTIONS = 12                       # per-layer choice: budget lowered by the overshoot at most this often


def _prune_then_factorise(model: onnx.ModelProto, calib: DataSource, holdout: DataSource | None, options: CompressOptions,
                          prune: Callable[[], CompressionResult] | None, exclude: list[str],
                          progress: Progress | None, factoriser: str = "lowrank") -> CompressionResult:
    """Run ``prune`` (None: nothing to prune), then factorise to the full budget ``s`` with
    ``exclude`` left alone by the ``factoriser`` (``lowrank`` or ``spatial``, whose rank
    allocation is then its energy criterion)."""
    pruned = prune() if prune is not None else None
    if pruned is not None:
        model = pruned.model
    factor_speedup = options.speedup if pruned is None else pruned.macs_after / (pruned.macs_before / options.speedup)
    if pruned is not None and factor_speedup < MIN_STAGE_SPEEDUP:
        return pruned
    factor_options = dataclasses.replace(options, method=factoriser, speedup=factor_speedup, exclude=exclude)
    if factoriser == "spatial" and options.allocation not in SPATIAL_ALLOCATIONS:
        factor_options.allocation = "energy"
    factor_options.sensitivity_folds = _folds(factor_options)
    factorised = compress(model, calib, holdout, factor_options, progress)
    if pruned is None:
        return factorised
    return chain_results(pruned, factorised, timings={"prune": pruned.timings["total"], factoriser: factorised.timings["total"]})


def _folds(options: CompressOptions) -> int:
    """``--sensitivity-folds`` where ``options.allocation`` measures damages; one elsewhere. The
    per-layer choice always measures; the global splits with ``--allocation sensitivity``."""
    return options.sensitivity_folds if options.allocation == "sensitivity" else 1


@dataclasses.dataclass
class PerLayerChoice:
    """``per_layer_choice``'s answer: keep counts for the prune analysis' plans, ranks by layer."""

    counts: list[int]
    ranks: dict[str, int]                 # layers to factorise (the rank the knapsack priced)
    pruned_macs: int                      # exact MACs after pruning to ``counts``
    predicted_macs: float                 # after pruning and factorising, on the pruned shapes
    predicted_damage: float               # sum of the measured damages of the choice


def _macs_after(analysis: PruneAnalysis, counts: list[int], ranks: dict[str, int]) -> tuple[int, float]:
    """Exact MACs after pruning to ``counts``, and after also factorising ``ranks`` on the
    pruned shapes (``r (I' kh kw + O') HW``, never more than the pruned layer)."""
    graph = graphs.import_graph(analysis.prepared)
    out_kept, in_kept = kept_fractions(graph, analysis.layer_list, analysis.plans, counts)
    pruned = both = 0.0
    for layer in analysis.layer_list:
        macs = macs_kept(layer, out_kept, in_kept)
        pruned += macs
        rank = ranks.get(layer.name)
        if rank:
            kh, kw = layer.kernel
            spatial = int(np.prod(layer.output_hw)) if layer.op == "Conv" else 1
            macs = min(macs, spatial * rank * (layer.in_channels * in_kept[layer.name] * kh * kw
                                               + layer.out_channels * out_kept[layer.name]))
        both += macs
    return int(round(pruned)), both


def per_layer_choice(analysis: PruneAnalysis, candidates: list[Layer], lowrank_analysis: Analysis, rank_multiple: int,
                     speedup: float, rank_below: int = 0) -> PerLayerChoice:
    """Per group a keep count and per layer a rank, from ONE knapsack on measured output error
    (module docstring, step 2). ``analysis``: ``prune_pipeline.analyze_prune`` with output-measured
    damages; ``lowrank_analysis``: ``onnxopt.sensitivity`` curves of ``candidates``."""
    prune_options = [[allocation.Option(k * p.macs_per_channel, d, k) for k, d in zip(p.counts, p.damages)]
                     for p in analysis.plans]
    rank_options = [[allocation.Option(layer.macs, 0.0, None)]
                    + [allocation.Option(lowrank.decomposed_macs(layer, r), 0.0, r) for r in rank_grid(layer, rank_multiple, below=rank_below)]
                    for layer in candidates]
    rank_options = measured_options(rank_options, candidates, lowrank_analysis, analysis.metric)
    options = prune_options + rank_options
    # MACs ~ fixed + sum of the chosen costs, with every group and candidate layer counted as removable
    fixed = (analysis.macs_before - sum(p.channels * p.macs_per_channel for p in analysis.plans)
             - sum(layer.macs for layer in candidates))
    target = analysis.macs_before / speedup
    budget = target - fixed
    best = None
    for _ in range(BUDGET_CORRECTIONS):
        picked = allocation.allocate(options, budget)
        if picked is None:
            break
        counts = [opts[k].value for opts, k in zip(prune_options, picked)]
        ranks = {layer.name: opts[k].value for layer, opts, k in zip(candidates, rank_options, picked[len(prune_options):])
                 if opts[k].value is not None}
        pruned, both = _macs_after(analysis, counts, ranks)
        best = PerLayerChoice(counts, ranks, pruned, both, float(sum(opts[k].damage for opts, k in zip(options, picked))))
        if both <= target:
            break
        budget -= (both - target) * 1.05 + 1
    if best is None:
        raise UserError(f"--speedup {speedup:g} is out of reach for pruning and low-rank chosen per layer")
    return best


class _Analyses:
    """The original model's analyses, each made once and shared by the candidates."""

    def __init__(self, model: onnx.ModelProto, calib: DataSource, measure_on: DataSource, options: CompressOptions):
        self.model, self.calib, self.measure_on, self.options = model, calib, measure_on, options
        self._prune: dict[str, PruneAnalysis] = {}
        self._pruned: dict[float, CompressionResult] = {}

    def prune(self, allocation_kind: str, progress: Progress | None) -> PruneAnalysis:
        if allocation_kind not in self._prune:
            options = dataclasses.replace(self.options, method="prune", allocation=allocation_kind)
            options.sensitivity_folds = _folds(options)
            self._prune[allocation_kind] = analyze_prune(self.model, self.calib, self.measure_on, options, progress)
        return self._prune[allocation_kind]

    def pruned(self, speedup: float, progress: Progress | None) -> CompressionResult:
        """The original pruned to ``speedup`` (the measured allocation of ``--allocation``), once
        for every factoriser that follows it."""
        if speedup not in self._pruned:
            options = dataclasses.replace(self.options, method="prune", speedup=speedup)
            self._pruned[speedup] = compress_prune(self.model, self.calib, self.measure_on, options, progress,
                                                   analysis=self.prune(self.options.allocation, progress))
        return self._pruned[speedup]

    def lowrank(self, progress: Progress | None) -> tuple[Plan, Analysis]:
        model_plan = plan(self.model, self.options, self.calib.sample_shapes())
        return model_plan, layer_sensitivity(self.model, model_plan, self.calib, self.measure_on, self.options, progress=progress)


def _split_candidate(analyses: _Analyses, options: CompressOptions, share: float, factoriser: str,
                     progress: Progress | None) -> tuple[CompressionResult, dict]:
    """Prune by ``s^share``, then factorise to the full budget ``s`` with ``factoriser``."""
    prune_speedup = options.speedup ** share
    prune = None
    if prune_speedup >= MIN_STAGE_SPEEDUP:
        prune = lambda: analyses.pruned(prune_speedup, progress)  # noqa: E731
        if share == 1.0:
            return prune(), {}
    return _prune_then_factorise(analyses.model, analyses.calib, analyses.measure_on, options, prune, options.exclude, progress,
                                 factoriser), {}


def _per_layer_candidate(analyses: _Analyses, options: CompressOptions,
                         progress: Progress | None) -> tuple[CompressionResult, dict]:
    """Prune the groups and factorise the layers ``per_layer_choice`` picks."""
    pruning = analyses.prune("sensitivity", progress)
    model_plan, curves = analyses.lowrank(progress)
    choice = per_layer_choice(pruning, model_plan.candidates, curves, options.rank_multiple, options.speedup, options.rank_below)
    pruned_groups = sum(c < p.channels for c, p in zip(choice.counts, pruning.plans))
    facts = {"prune_speedup": pruning.macs_before / max(choice.pruned_macs, 1), "groups_pruned": pruned_groups,
             "layers_factorised": len(choice.ranks), "predicted_mac_speedup": pruning.macs_before / max(choice.predicted_macs, 1),
             "predicted_error": choice.predicted_damage}
    if not choice.ranks:        # pruning alone, on output-measured damages: met exactly by the prune allocation
        if options.allocation == "sensitivity":
            raise UserError("nothing to add: the per-layer choice factorises no layer, the same as pruning alone")
        prune_options = dataclasses.replace(options, method="prune", allocation="sensitivity")
        return compress_prune(analyses.model, analyses.calib, analyses.measure_on, prune_options, progress, analysis=pruning), facts
    prune = None
    if pruned_groups:
        prune_options = dataclasses.replace(options, method="prune", allocation="sensitivity",
                                            speedup=max(facts["prune_speedup"], 1 + 1e-9))
        prune = lambda: compress_prune(analyses.model, analyses.calib, analyses.measure_on, prune_options,  # noqa: E731
                                       progress, analysis=pruning, keep=choice.counts)
    exclude = options.exclude + [glob.escape(layer.name) for layer in model_plan.candidates if layer.name not in choice.ranks]
    return _prune_then_factorise(analyses.model, analyses.calib, analyses.measure_on, options, prune, exclude, progress), facts


def _candidate_runs(model: onnx.ModelProto, calib: DataSource, measure_on: DataSource, options: CompressOptions,
                    progress: Progress | None) -> list[tuple[str, dict, Callable]]:
    """(label, report entry, run) of every candidate: the global splits and the per-layer choice
    of ``model``, and with ``--pool-early auto|yes`` the same of the model pooled first
    (``pooling_pipeline``) under the rest of the budget, or that model alone when it meets it."""
    bases = [("", model, options, None)] if options.pool_early != "yes" else []
    if options.pool_early in ("auto", "yes"):
        try:
            pooled = pool_early(model, calib, measure_on, options, progress)
        except UserError as exc:
            if options.pool_early == "yes" or not str(exc).startswith(NOTHING_TO_POOL):
                raise
        else:
            rest = rest_speedup(pooled, options.speedup)
            if rest > 1:
                bases.append(("pooled first, ", pooled.model, dataclasses.replace(options, speedup=rest, pool_early="no"), pooled))
            else:
                bases.append(("pooled first alone", None, None, pooled))
    runs = []
    for prefix, start, base_options, pooled in bases:
        marks = {"pooled_first": pooled is not None}
        if start is None:
            runs.append((prefix, {**marks, "prune_share": None}, lambda step, pooled=pooled: (pooled, {})))
            continue
        analyses = _Analyses(start, calib, measure_on, base_options)
        base_runs = [(f"prune {base_options.speedup ** share:.2f}x" + ("" if share == 1.0 else f", then {factoriser}"),
                      {"prune_share": share, "prune_speedup": base_options.speedup ** share, "factoriser": None if share == 1.0 else factoriser},
                      lambda step, analyses=analyses, base_options=base_options, share=share, factoriser=factoriser:
                      _split_candidate(analyses, base_options, share, factoriser, step))
                     for share in SHARES for factoriser in FACTORISERS if share < 1.0 or factoriser == FACTORISERS[0]]
        base_runs.append(("per layer", {"prune_share": None, "per_layer": True},
                          lambda step, analyses=analyses, base_options=base_options: _per_layer_candidate(analyses, base_options, step)))
        for label, entry, run in base_runs:
            runs.append((prefix + label, {**marks, **entry}, run if pooled is None else _after_pooling(pooled, run)))
    return runs


def _after_pooling(pooled: CompressionResult, run: Callable) -> Callable:
    """``run`` (a candidate of the pooled model) as a candidate of the original model."""
    def chained(step):
        result, facts = run(step)
        return chain_results(pooled, result), facts
    return chained


def compress_auto(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                  options: CompressOptions, progress: Progress | None = None) -> CompressionResult:
    """Best of the global splits and the per-layer choice under ``options.speedup`` (module docstring)."""
    if calib is None or len(calib) == 0:
        raise UserError("--method auto is data-driven: give calibration data with --calib (an image folder or .npz)")
    if options.speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {options.speedup})")
    check_folds(calib, holdout, options.sensitivity_folds, measured=True)      # the per-layer choice measures
    start = time.perf_counter()
    measure_on = measurement_samples(calib, holdout)
    runs = _candidate_runs(model, calib, measure_on, options, progress)
    tried, best, best_error = [], None, None
    for label, entry, run in runs:
        step = (lambda what, done, total, label=label: progress(f"auto: {label} | {what}", done, total)) if progress else None
        t0 = time.perf_counter()
        entry["candidate"] = label
        try:
            result, facts = run(step)
        except UserError as exc:
            if "out of reach" not in str(exc) and "nothing to" not in str(exc):
                raise
            entry.update(skipped=str(exc), seconds=time.perf_counter() - t0)
            tried.append(entry)
            continue
        check = compare_outputs(model, result.model, measure_on, options.threads)
        entry.update(facts, mac_speedup=result.macs_before / max(result.macs_after, 1), relative_l2=check.relative_l2,
                     kl=check.kl, top1_agreement=check.top1_agreement, seconds=time.perf_counter() - t0)
        tried.append(entry)
        error = check.damage
        if best_error is None or error < best_error:
            best, best_error = (result, check, entry), error
    if best is None:
        reasons = "; ".join(f"{e['candidate']}: {e['skipped']}" for e in tried)
        raise UserError(f"--speedup {options.speedup:g} is out of reach for pruning and low-rank combined ({reasons}); lower --speedup")
    result, check, entry = best
    entry["chosen"] = True
    timings = {**result.timings, "total": time.perf_counter() - start}
    return dataclasses.replace(result, verification=check, timings=timings, holdout_samples=check.samples,
                               auto={"measured_on": check.samples, "candidates": tried})
