"""`onnxopt compress --method auto`: channel pruning, then low-rank factorisation of what remains.

In the spirit of He et al.'s "3C" (ALGORITHMS.md §2: pruning + factorisation combined), under
ONE ``--speedup`` budget ``s`` on MACs. The split of ``s`` between the two is chosen by
measurement, not by a rule:

1. For each prune share ``f`` in ``SHARES`` (0, 1/3, 1/2, 2/3, 1), prune channels to
   ``s_p = s^f`` times fewer MACs (``prune_pipeline.compress_prune``, He et al. LASSO + least
   squares), then factorise the pruned model (``pipeline.compress``, method lowrank, Zhang et
   al.) by ``s_l = MACs_pruned / (MACs_orig / s)``, so the candidate meets ``s`` exactly as
   each pass meets its own budget. ``f = 0`` is low-rank alone, ``f = 1`` pruning alone.
2. Measure each candidate's output on the held-out calibration samples against the ORIGINAL
   model: relative L2 error ``||z_orig - z_cand|| / ||z_orig||`` of the outputs
   (``verify.compare_outputs``; without a holdout, on the first 128 calibration samples).
3. Keep the candidate with the smallest error and report every split (``auto`` in the JSON).

A candidate whose pass cannot reach its part of the budget (the pass raises "out of reach")
is recorded with the reason and skipped. This is a global split, not a per-layer choice
between pruning and factorising: each pass allocates its own layers under its share.
"""

from __future__ import annotations

import dataclasses
import time

import onnx

from onnxopt.calib.readers import DataSource
from onnxopt.errors import UserError
from onnxopt.pipeline import CompressionResult, CompressOptions, LayerResult, Progress
from onnxopt.verify import compare_outputs

SHARES = (0.0, 1 / 3, 1 / 2, 2 / 3, 1.0)     # exponent f of the prune speed-up s^f
MIN_STAGE_SPEEDUP = 1.01                      # a pass asked for less than this is not run


def _merge_layers(pruned: CompressionResult, factorised: CompressionResult) -> list[LayerResult]:
    """Per-layer rows of prune-then-factorise, measured against the original layers."""
    first = {row.name: row for row in pruned.layers}
    merged = []
    for row in factorised.layers:
        before = first.get(row.name)
        if before is None:
            merged.append(row)
            continue
        if row.rank is None:          # not factorised: the pruned row, with the final size
            row = dataclasses.replace(before, macs_after=row.macs_after, params_after=row.params_after)
        else:
            solver = f"{before.solver}, then {row.solver}" if before.solver else row.solver
            row = dataclasses.replace(row, shape=before.shape, macs_before=before.macs_before,
                                      params_before=before.params_before, solver=solver)
        merged.append(row)
    return merged


def _candidate(model: onnx.ModelProto, calib: DataSource, holdout: DataSource | None, options: CompressOptions,
               share: float, progress: Progress | None) -> CompressionResult:
    """Prune by ``s^share``, then factorise to the full budget ``s``."""
    from onnxopt.pipeline import compress
    from onnxopt.prune_pipeline import compress_prune

    speedup = options.speedup
    prune_speedup = speedup ** share
    pruned = None
    if prune_speedup >= MIN_STAGE_SPEEDUP:
        pruned = compress_prune(model, calib, holdout, dataclasses.replace(options, method="prune", speedup=prune_speedup), progress)
        if share == 1.0:
            return pruned
        model = pruned.model
    macs_before = pruned.macs_before if pruned else None
    macs_now = pruned.macs_after if pruned else None
    lowrank_speedup = speedup if pruned is None else macs_now / (macs_before / speedup)
    if lowrank_speedup < MIN_STAGE_SPEEDUP:
        return pruned
    factorised = compress(model, calib, holdout, dataclasses.replace(options, method="lowrank", speedup=lowrank_speedup), progress)
    if pruned is None:
        return factorised
    return dataclasses.replace(
        factorised, layers=_merge_layers(pruned, factorised), macs_before=pruned.macs_before,
        params_before=pruned.params_before, preparation=pruned.preparation,
        stages=pruned.stages + factorised.stages,
        timings={"prune": pruned.timings["total"], "lowrank": factorised.timings["total"]},
    )


def compress_auto(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                  options: CompressOptions, progress: Progress | None = None) -> CompressionResult:
    """Best split of ``options.speedup`` between pruning and low-rank (module docstring)."""
    if calib is None or len(calib) == 0:
        raise UserError("--method auto is data-driven: give calibration data with --calib (an image folder or .npz)")
    if options.speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {options.speedup})")
    start = time.perf_counter()
    measure_on = holdout if holdout is not None and len(holdout) else calib.subset(range(min(128, len(calib))))
    tried, best, best_error = [], None, None
    for share in SHARES:
        label = f"auto: prune {options.speedup ** share:.2f}x"
        step = (lambda what, done, total, label=label: progress(f"{label} | {what}", done, total)) if progress else None
        t0 = time.perf_counter()
        entry = {"prune_share": share, "prune_speedup": options.speedup ** share}
        try:
            result = _candidate(model, calib, measure_on, options, share, step)
        except UserError as exc:
            if "out of reach" not in str(exc) and "nothing to" not in str(exc):
                raise
            entry.update(skipped=str(exc), seconds=time.perf_counter() - t0)
            tried.append(entry)
            continue
        check = compare_outputs(model, result.model, measure_on, options.threads)
        entry.update(mac_speedup=result.macs_before / max(result.macs_after, 1), relative_l2=check.relative_l2,
                     top1_agreement=check.top1_agreement, seconds=time.perf_counter() - t0)
        tried.append(entry)
        if best_error is None or check.relative_l2 < best_error:
            best, best_error = (result, check, entry), check.relative_l2
    if best is None:
        reasons = "; ".join(f"prune {e['prune_speedup']:.2f}x: {e['skipped']}" for e in tried)
        raise UserError(f"--speedup {options.speedup:g} is out of reach for pruning and low-rank combined ({reasons}); lower --speedup")
    result, check, entry = best
    entry["chosen"] = True
    timings = {**result.timings, "total": time.perf_counter() - start}
    return dataclasses.replace(result, verification=check, timings=timings, holdout_samples=check.samples,
                               auto={"measured_on": check.samples, "candidates": tried})
