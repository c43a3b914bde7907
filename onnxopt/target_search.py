"""`compress --max-drop D`: the fastest model whose measured accuracy drop stays within D.

The drop of a compressed model grows with its speed-up (more removed, more lost), so the
largest speed-up that keeps ``drop <= D`` is found by a search over ``--speedup``: grow it
geometrically from a start value while the drop stays within the target, then bisect (on a
log scale) between the last speed-up that passed and the first that failed, until the two are
within ``tolerance`` of each other or the step budget is spent. A speed-up the method cannot
reach counts as a failure. Every step compresses the model at that speed-up and measures its
top-1 on the evaluation data; the per-layer sensitivity curves come from the disk cache after
the first step, so a step costs one compression and one evaluation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from onnxopt.errors import UserError


@dataclass
class SearchStep:
    speedup: float                 # the --speedup tried
    mac_speedup: float | None      # what the compressed model achieved
    top1: float | None             # measured, in %
    drop: float | None             # points below the original's top-1
    within: bool
    note: str = ""
    drop_se: float | None = None   # the drop's paired standard error, in points

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Trial:
    """One compression, as ``try_speedup`` returns it."""

    candidate: Any                 # what the caller keeps for the best step (the compressed model)
    mac_speedup: float
    top1: float
    drop_se: float | None = None   # paired standard error of the drop, in points


def search_speedup(try_speedup: Callable[[float], Trial], base_top1: float, max_drop: float, start: float = 1.5,
                   growth: float = 1.5, steps: int = 7, tolerance: float = 0.05,
                   on_step: Callable[[SearchStep], None] | None = None) -> tuple[Any, list[SearchStep]]:
    """The candidate of the largest speed-up within ``max_drop``, and every step walked.

    ``try_speedup(s)`` compresses at speed-up ``s`` and measures top-1 (raising ``UserError``
    when ``s`` is out of the method's reach).
    """
    if max_drop < 0:
        raise UserError(f"--max-drop must be at least 0 points (got {max_drop:g})")
    if start <= 1:
        raise UserError(f"the starting --speedup must be greater than 1 (got {start:g})")
    walked: list[SearchStep] = []
    best, low, high = None, 1.0, None
    speedup = start
    for _ in range(steps):
        try:
            trial = try_speedup(speedup)
        except UserError as exc:
            step = SearchStep(speedup, None, None, None, False, note=f"out of reach: {exc}")
        else:
            drop = base_top1 - trial.top1
            step = SearchStep(speedup, trial.mac_speedup, trial.top1, drop, drop <= max_drop, drop_se=trial.drop_se)
            if step.within:
                best = (trial, step)
        walked.append(step)
        if on_step:
            on_step(step)
        if step.within:
            low = speedup
        else:
            high = speedup
        if high is not None and high / low <= 1 + tolerance:
            break
        speedup = speedup * growth if high is None else math.sqrt(low * high)
    if best is None:
        first = walked[0]
        tried = f"at {first.speedup:.2f}x the drop is {first.drop:.2f} points" if first.drop is not None else first.note
        raise UserError(f"no speed-up tried keeps the top-1 drop within {max_drop:g} points ({tried}); "
                        f"raise --max-drop or give a smaller starting --speedup")
    return best[0].candidate, walked
