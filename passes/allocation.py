"""Choosing one option per layer under a MAC budget (a multiple-choice knapsack).

Each layer offers options (keep it, or compress it to some rank / width), each with an exact
cost in MACs and a damage (for the energy criterion of Zhang et al. §1, ``-log`` of the kept
fraction of the response energy, so that minimising the sum maximises the product of
energies; for Niu et al. 2017 §4, a measured accuracy drop). We solve

    min  sum_l damage_l(o_l)   s.t.  sum_l cost_l(o_l) <= budget

exactly up to the cost discretisation, by dynamic programming over ``bins`` cost units.
Costs are rounded UP to whole units, so the returned choice always meets the budget.
O(layers x options x bins) time, O(layers x bins) memory for the back-pointers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Option:
    cost: float
    damage: float
    value: Any = None       # what the pass applies (a rank, a width; None = keep)


def allocate(options: list[list[Option]], budget: float, bins: int = 4000) -> list[int] | None:
    """Index of the chosen option for each layer, or None when no choice meets ``budget``."""
    if not options:
        return []
    if budget < 0:
        return None
    integral = all(float(o.cost).is_integer() for layer in options for o in layer)
    if integral and budget <= bins:
        unit, bins = 1.0, int(np.floor(budget))        # integer costs (MACs): exact
    else:
        unit = budget / bins if budget > 0 else 1.0
    best = np.zeros(bins + 1)                       # best[b]: least damage using <= b units
    choices = np.zeros((len(options), bins + 1), np.int32)
    for index, layer_options in enumerate(options):
        new = np.full(bins + 1, np.inf)
        for k, option in enumerate(layer_options):
            units = _units(option.cost, unit)
            if units > bins:
                continue
            candidate = np.full(bins + 1, np.inf)
            candidate[units:] = best[: bins + 1 - units] + option.damage
            better = candidate < new
            new[better] = candidate[better]
            choices[index, better] = k
        best = new
    if not np.isfinite(best[bins]):
        return None
    picked = []
    remaining = bins
    for index in range(len(options) - 1, -1, -1):
        k = int(choices[index, remaining])
        picked.append(k)
        option = options[index][k]
        remaining -= _units(option.cost, unit)
    return picked[::-1]


def _units(cost: float, unit: float) -> int:
    """Cost in whole units, rounded up (a relative slack absorbs float error)."""
    return int(np.ceil(cost / unit * (1 - 1e-12))) if cost > 0 else 0


def energy_damage(eigenvalues: np.ndarray, rank: int) -> float:
    """``-log`` of the fraction of response energy kept by the top ``rank`` components."""
    eigenvalues = np.sort(np.clip(eigenvalues, 0, None))[::-1]
    total = eigenvalues.sum()
    if total <= 0:
        return 0.0
    kept = eigenvalues[:rank].sum()
    return float(-np.log(max(kept / total, 1e-300)))
