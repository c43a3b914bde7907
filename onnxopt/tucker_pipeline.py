"""`onnxopt compress --method tucker2`: MUSCO-style multi-stage Tucker-2 / SVD, without training.

Gusak et al. 2019 (MUSCO), ALGORITHMS.md §5; decompositions in ``passes.tucker2``, ranks in
``passes.vbmf``.

1. Prepare the graph, list its layers; every Conv/Gemm that is not grouped, depthwise,
   excluded or a classifier's class-score layer (without ``--factorize-classifier``;
   ``pipeline.plan_candidates``) is a candidate (k x k Conv: Tucker-2, 1 x 1 Conv and Gemm: SVD).
2. Run the ORIGINAL model once over the calibration set and keep each candidate's responses
   (and its residual shortcut's) at sampled positions: the targets (``pipeline.ResponseSampler``).
3. Each of ``--stages K`` stages:

   a. ranks: weakened EVBMF (``--vbmf-weaken w``) of the mode-0 / mode-1 unfoldings of each
      layer's CURRENT core (its weight at the first stage). A guarded estimate (rank 0, empty
      noise interval, failure) keeps the current rank, and the reason is reported. A layer not
      yet decomposed whose decomposition would not save MACs is left alone for this stage.
   b. with ``--speedup``: ranks are moved along ``t`` in [0, 2] (``t <= 1``: from the current
      ranks toward the weakened EVBMF ranks; ``t > 1``: the EVBMF ranks scaled down by
      ``2 - t``), and the smallest ``t`` whose whole-model MACs meet the target is taken,
      only if the target is passed at ``t = 1`` or this is the last stage. Stages stop once the
      target is met; if even ``t = 2`` cannot meet it the run fails with a UserError.
   c. decompose (already decomposed layers: their core, the factors merged, as MUSCO does)
      and rewrite the graph.
   d. refit, standing in for MUSCO's fine-tuning (there is no training loop here): in
      topological order, run the CURRENT model from a stored graph cut before the layer
      (``calib.capture.CutRunner``) to get the input ``Z`` of the layer's last 1 x 1 (Gemm),
      and refit that layer's weight and bias by least squares (``passes.prune.least_squares``)
      toward the ORIGINAL model's responses, ``min ||Z U^T + b - Y||^2``: asymmetric, so the
      error of earlier layers is compensated. For a layer feeding a residual Add the target is
      ``Y_orig + S_orig - S_current`` (``S`` the shortcut), as in ``pipeline.py``.

4. Verify and return a ``CompressionResult`` whose layer rows carry each stage's EVBMF ranks,
   guard reasons, and the refit's response error before and after.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxopt import graph as graphs
from onnxopt.calib.capture import CutRunner, cut_before
from onnxopt.calib.readers import DataSource
from onnxopt.calib.stats import SufficientStats
from onnxopt.errors import UserError
from onnxopt.layers import Layer, find_layers, model_macs
from onnxopt.passes import prune, tucker2
from onnxopt.pipeline import (SHORTCUT, CompressionResult, CompressOptions, LayerResult, Progress, ResponseSampler,
                              _relative_error, _stage_slices, kept_class_scores, plan_candidates, shape_text)
from onnxopt.prune_pipeline import MIN_ROWS_PER_COLUMN
from onnxopt.verify import verify

REFIT_NOTE = ("least-squares refit of each decomposed layer's last 1x1 (and bias) toward the original model's "
              "responses; it stands in for MUSCO's fine-tuning (no training)")
SEARCH_STEPS = 40


@dataclasses.dataclass
class TuckerLayerResult(LayerResult):
    rank_in: int | None = None                  # Tucker-2 input rank (None: SVD layer)
    full_rank_in: int | None = None
    stages: list[dict] = dataclasses.field(default_factory=list)   # per stage: EVBMF ranks, applied ranks, guard reasons
    refit: str | None = None
    # here error_before / error_after are the response errors of the decomposed layer before / after the refit


@dataclasses.dataclass
class TuckerCompressionResult(CompressionResult):
    compression_stages: int = 0
    weaken: float = 0.8

    def to_json(self) -> dict:
        data = super().to_json()
        data["tucker2"] = {"stages_run": self.compression_stages, "vbmf_weaken": self.weaken, "refit": REFIT_NOTE}
        return data


@dataclasses.dataclass
class _State:
    layer: Layer
    nodes: list[gs.Node]
    decomposition: tucker2.Decomposition
    in_hw: tuple[int, int] | None
    decomposed: bool = False
    refit_errors: tuple[float, float] | None = None
    history: list[dict] = dataclasses.field(default_factory=list)

    def macs(self, ranks: tuple[int, int | None] | None = None) -> int:
        """MACs at ``ranks`` (default: current); an undecomposed layer never costs more than itself."""
        if ranks is None:
            if not self.decomposed:
                return self.layer.macs
            ranks = self.decomposition.ranks
        cost = self.cost(ranks)
        return cost if self.decomposed else min(cost, self.layer.macs)

    def cost(self, ranks: tuple[int, int | None]) -> int:
        return tucker2.decomposed_macs(self.layer, *ranks, in_hw=self.in_hw)


def _ranks_at(current: tuple[int, int | None], weakened: tuple[int, int | None], t: float) -> tuple[int, int | None]:
    """Ranks on the path of step 3b: current (t=0) -> weakened EVBMF (t=1) -> 1 (t=2)."""
    def one(now: int | None, target: int | None) -> int | None:
        if now is None:
            return None
        if t <= 1:
            return now - int(np.floor(t * (now - target) + 1e-9))
        return max(1, int(np.ceil((2 - t) * target - 1e-9)))
    return one(current[0], weakened[0]), one(current[1], weakened[1])


def _plan_stage(states: list[_State], fixed: int, budget: float | None, last: bool, weaken: float,
                stage: int) -> dict[str, tuple[int, int | None]]:
    """New ranks for each layer this stage (only those that change); recorded in each layer's history."""
    current, weakened = {}, {}
    for state in states:
        with threadpool_limits(limits=1, user_api="blas"):
            estimate = tucker2.estimate_ranks(state.decomposition, weaken)
        now = state.decomposition.ranks
        weakened[state.layer.name] = (min(now[0], estimate.r_out or now[0]),
                                      None if now[1] is None else min(now[1], estimate.r_in or now[1]))
        current[state.layer.name] = now
        state.history.append({"stage": stage, "ranks_before": list(now), "vbmf": [estimate.vbmf_out.rank, None if estimate.vbmf_in is None else estimate.vbmf_in.rank],
                              "weakened": list(weakened[state.layer.name]), "guard": estimate.reasons})

    def ranks(t: float) -> dict[str, tuple[int, int | None]]:
        return {name: _ranks_at(current[name], weakened[name], t) for name in current}

    def macs(t: float) -> int:
        chosen = ranks(t)
        return fixed + sum(state.macs(chosen[state.layer.name]) if chosen[state.layer.name] != current[state.layer.name]
                           else state.macs() for state in states)

    t = 1.0
    if budget is not None and (macs(1.0) <= budget or last):
        high = 1.0 if macs(1.0) <= budget else 2.0
        if macs(high) > budget:
            raise UserError(f"--speedup is out of reach for Tucker-2/SVD of this model: at most "
                            f"{(fixed + sum(s.layer.macs for s in states)) / macs(2.0):.2f}x with every rank 1; lower --speedup")
        low = 0.0 if high == 1.0 else 1.0
        for _ in range(SEARCH_STEPS):
            middle = (low + high) / 2
            low, high = (low, middle) if macs(middle) <= budget else (middle, high)
        t = high
    chosen = ranks(t)
    changes = {}
    for state in states:
        name = state.layer.name
        new = chosen[name]
        worth = state.decomposed or state.cost(new) < state.layer.macs
        state.history[-1]["t"] = t
        if new != current[name] and worth:
            changes[name] = new
            state.history[-1]["applied"] = list(new)
        else:
            state.history[-1]["applied"] = None
            state.history[-1]["kept"] = ("ranks unchanged" if new == current[name]
                                         else "decomposition at these ranks would not save MACs")
    return changes


def _refit(state: _State, rows: dict[str, np.ndarray], targets: dict[str, np.ndarray]) -> None:
    """Least-squares refit of the last layer (module docstring, step 3d); the graph is updated."""
    name = state.layer.name
    inputs = rows[name].astype(np.float64)
    target = targets[name].astype(np.float64)
    if state.layer.shortcut is not None:
        target = target + targets[name + SHORTCUT] - rows[name + SHORTCUT]
    decomposition = state.decomposition
    before = inputs @ decomposition.out_factor.T + decomposition.bias
    if len(inputs) < MIN_ROWS_PER_COLUMN * inputs.shape[1]:
        error = _relative_error(before, target, False)
        state.refit_errors = (error, error)
        return
    stats = SufficientStats(inputs.shape[1], target.shape[1])
    stats.update(inputs, target)
    with threadpool_limits(limits=1, user_api="blas"):
        weight, bias = prune.least_squares(prune.LinearStats(stats.sxx, stats.sxy, stats.syy, stats.mean_x, stats.mean_y, stats.n),
                                           np.arange(inputs.shape[1]))
    state.refit_errors = (_relative_error(before, target, False), _relative_error(inputs @ weight.T + bias, target, False))
    state.decomposition = dataclasses.replace(decomposition, out_factor=weight, bias=bias)
    last = state.nodes[-1]
    values = weight.T if last.op == "Gemm" else weight[:, :, None, None]
    last.inputs[1] = gs.Constant(last.inputs[1].name, np.ascontiguousarray(values, np.float32))
    last.inputs[2] = gs.Constant(last.inputs[2].name, bias.astype(np.float32))


def compress_tucker2(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                     options: CompressOptions, progress: Progress | None = None) -> TuckerCompressionResult:
    """Compress ``model`` by multi-stage Tucker-2 / SVD (see the module docstring)."""
    if calib is None:
        raise UserError("--method tucker2 refits from data: give calibration data with --calib (an image folder or .npz)")
    if options.speedup is not None and options.speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {options.speedup})")
    if not 0 < options.vbmf_weaken <= 1:
        raise UserError(f"--vbmf-weaken must be in (0, 1] (got {options.vbmf_weaken}); 1 uses the EVBMF ranks as they are")
    if options.compression_stages < 1:
        raise UserError(f"--stages must be at least 1 (got {options.compression_stages})")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepared, preparation = graphs.prepare(model, calib.sample_shapes())
    graph = graphs.import_graph(prepared)
    layers = find_layers(graph)
    candidates, reasons = plan_candidates(layers, options.exclude, kept_class_scores(graph, layers, options), tucker2.applicability)
    if not candidates:
        detail = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:3]) or "the model has no Conv or Gemm layers"
        raise UserError(f"nothing to compress: no layer can be decomposed ({detail})")
    macs_before = model_macs(layers)
    fixed = macs_before - sum(layer.macs for layer in candidates)
    budget = None if options.speedup is None else macs_before / options.speedup
    timings["prepare"] = time.perf_counter() - start

    sampler = ResponseSampler(calib, candidates, options.rows_per_layer, options.seed)
    t0 = time.perf_counter()
    samples = list(calib.batches(sampler.batch_size))
    targets = sampler.collect(prepared, candidates, CutRunner(samples, options.threads), progress, "original model")
    timings["capture_original"] = time.perf_counter() - t0

    states = [_State(layer, [layer.node], tucker2.Decomposition.of(layer), tucker2.input_hw(layer) if tucker2.is_tucker(layer) else None)
              for layer in candidates]
    stages_run = calibration_runs = 0
    for stage in range(1, options.compression_stages + 1):
        if budget is not None and fixed + sum(state.macs() for state in states) <= budget:
            break
        t0 = time.perf_counter()
        changes = _plan_stage(states, fixed, budget, stage == options.compression_stages, options.vbmf_weaken, stage)
        stages_run = stage
        changed = [state for state in states if state.layer.name in changes]
        for state in changed:
            ranks = changes[state.layer.name]
            with threadpool_limits(limits=1, user_api="blas"):     # small SVDs: threads only contend
                state.decomposition = tucker2.redecompose(state.decomposition, *ranks)
            state.nodes = tucker2.rewrite(graph, state.layer, state.nodes, state.decomposition)
            state.decomposed = True
        timings[f"stage{stage}_decompose"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        runner = CutRunner(samples, options.threads, options.memory_budget)
        slices = _stage_slices(len(changed), options.stages or len(changed)) if changed else []
        for part in slices:
            part_states = changed[part]
            current = graphs.export(graph, prepared)
            runner.advance(current, cut_before(graph, part_states[0].nodes[0]))
            # the input of the last 1x1 at the positions the original output was sampled at
            probes = [dataclasses.replace(s.layer, node=s.nodes[-2]) for s in part_states]
            rows = sampler.collect(current, probes, runner, progress, f"stage {stage}: refit {part.start + 1}/{len(changed)}")
            calibration_runs += 1
            for state in part_states:
                _refit(state, rows, targets)
        timings[f"stage{stage}_refit"] = time.perf_counter() - t0

    compressed = graphs.restore_signature(graphs.export(graph, prepared), model)
    t0 = time.perf_counter()
    verification = verify(model, compressed, holdout, options.threads)
    timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    by_name = {state.layer.name: state for state in states}
    table = []
    for layer in layers:
        state = by_name.get(layer.name)
        if state is None or not state.decomposed:
            kept = reasons.get(layer.name) or (f"kept: {state.history[-1]['kept']}" if state.history
                                               else "kept: the --speedup target was met without it")
            table.append(TuckerLayerResult(layer.name, layer.op, shape_text(layer), layer.macs or 0, layer.macs or 0,
                                           layer.params, layer.params, skipped=kept,
                                           stages=state.history if state else []))
            continue
        r_out, r_in = state.decomposition.ranks
        before, after = state.refit_errors or (None, None)
        table.append(TuckerLayerResult(
            layer.name, layer.op, shape_text(layer), layer.macs, state.macs(), layer.params,
            tucker2.decomposed_params(layer, r_out, r_in), rank=r_out, full_rank=layer.out_channels,
            solver="tucker2+refit" if r_in is not None else "svd+refit", error_before=before, error_after=after,
            rank_in=r_in, full_rank_in=layer.in_channels if r_in is not None else None, stages=state.history, refit=REFIT_NOTE))
    return TuckerCompressionResult(
        model=compressed, layers=table, macs_before=macs_before, macs_after=sum(r.macs_after for r in table),
        params_before=sum(r.params_before for r in table), params_after=sum(r.params_after for r in table),
        verification=verification, preparation=preparation, timings=timings,
        calib_samples=len(calib), holdout_samples=len(holdout) if holdout is not None else 0,
        rows_per_layer=options.rows_per_layer, stages=calibration_runs,
        compression_stages=stages_run, weaken=options.vbmf_weaken)
