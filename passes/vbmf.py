"""Rank estimation by Empirical Variational Bayesian Matrix Factorization (EVBMF).

Nakajima, Sugiyama, Babacan, Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization" (JMLR 2013), as used for Tucker-2 ranks by Kim et al. 2016
and MUSCO (Gusak et al. 2019; ALGORITHMS.md §5).

For ``Y`` (L x M, L <= M; transpose otherwise) with singular values ``s_h``, ``alpha = L/M``:

    tau_bar = 2.5129 sqrt(alpha),   x_bar = (1 + tau_bar)(1 + alpha / tau_bar)

The noise variance ``sigma^2`` minimises the EVB free energy (Nakajima et al. 2013, Thm. 3 /
eq. (17)), with ``x_h = s_h^2 / (M sigma^2)`` and ``tau(x) = (x - (1+alpha) +
sqrt((x - (1+alpha))^2 - 4 alpha)) / 2``:

    F(sigma^2) = sum_{x_h <= x_bar} (x_h - log x_h)
               + sum_{x_h >  x_bar} (x_h - tau(x_h) + log((tau(x_h) + 1) / x_h) + alpha log(tau(x_h)/alpha + 1))
               + (||Y||_F^2 - sum_h s_h^2) / (M sigma^2) + (L - H) log sigma^2

over ``[max(s_{H_ub+1}^2 / (M x_bar), mean_{h > H_ub} s_h^2 / M), ||Y||_F^2 / (L M)]`` with
``H_ub = min(ceil(L / (1 + alpha)) - 1, H) - 1`` (bounded scalar minimisation). The estimated
rank is the number of components above the EVB threshold

    s_h > sqrt(M sigma^2 (1 + tau_bar)(1 + alpha / tau_bar)).

Weakening (MUSCO [code], ALGORITHMS.md §5): with the full rank ``R_full`` and the EVBMF rank
``R_vbmf``, ``R = int(R_full - w (R_full - R_vbmf))`` for a factor ``w`` in (0, 1] (w = 1: the
EVBMF rank itself; smaller w compresses less), and never below ``MIN_RANK`` (8, or the full
rank if smaller).

Guards (ALGORITHMS.md §5 pitfalls): an empty search interval (lower bound >= upper bound), a
non-finite result or an estimated rank of 0 give no rank (None) and a reason; callers then keep
the full rank and report why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

TAU_BAR_FACTOR = 2.5129
MIN_RANK = 8


@dataclass(frozen=True)
class Estimate:
    """EVBMF of one matrix: ``rank`` (None when guarded, see ``reason``) and noise ``sigma2``."""

    rank: int | None
    full_rank: int
    sigma2: float | None
    reason: str | None = None


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    shifted = x - (1 + alpha)
    return 0.5 * (shifted + np.sqrt(np.maximum(shifted ** 2 - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, lengths: tuple[int, int], s: np.ndarray, residual: float, x_bar: float) -> float:
    big_l, big_m = lengths
    alpha = big_l / big_m
    x = s ** 2 / (big_m * sigma2)
    above, below = x[x > x_bar], x[x <= x_bar]
    tau = _tau(above, alpha)
    return float(np.sum(below - np.log(below)) + np.sum(above - tau) + np.sum(np.log((tau + 1) / above))
                 + alpha * np.sum(np.log(tau / alpha + 1)) + residual / (big_m * sigma2)
                 + (big_l - len(s)) * np.log(sigma2))


def evbmf(matrix: np.ndarray) -> Estimate:
    """EVBMF rank and noise variance of ``matrix`` (see the module docstring)."""
    y = np.asarray(matrix, np.float64)
    if y.ndim != 2 or min(y.shape) == 0:
        raise ValueError(f"EVBMF needs a non-empty 2-D matrix, got shape {y.shape}")
    if y.shape[0] > y.shape[1]:
        y = y.T
    big_l, big_m = y.shape
    full = big_l
    if not np.all(np.isfinite(y)):
        return Estimate(None, full, None, "EVBMF failed: the weights are not finite")
    s = np.linalg.svd(y, compute_uv=False)
    alpha = big_l / big_m
    tau_bar = TAU_BAR_FACTOR * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    residual = 0.0                      # all H = L components are kept: nothing outside them
    h_ub = int(min(math.ceil(big_l / (1 + alpha)) - 1, big_l)) - 1
    if h_ub + 1 >= len(s):
        return Estimate(None, full, None, f"EVBMF undefined for a {big_l}x{big_m} matrix (too few singular values)")
    upper = float(np.sum(s ** 2) + residual) / (big_l * big_m)
    lower = max(s[h_ub + 1] ** 2 / (big_m * x_bar), float(np.mean(s[h_ub + 1:] ** 2)) / big_m)
    if not (lower < upper) or lower <= 0:
        return Estimate(None, full, None, f"EVBMF noise search interval is empty ({lower:.3g} >= {upper:.3g})")
    found = minimize_scalar(_free_energy, args=((big_l, big_m), s, residual, x_bar), bounds=(lower, upper), method="bounded")
    sigma2 = float(found.x)
    if not np.isfinite(sigma2) or sigma2 <= 0:
        return Estimate(None, full, None, "EVBMF failed: no finite noise variance")
    threshold = math.sqrt(big_m * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    rank = int(np.sum(s > threshold))
    if rank == 0:
        return Estimate(None, full, sigma2, "EVBMF rank is 0 (all singular values look like noise)")
    return Estimate(rank, full, sigma2)


def weaken(full_rank: int, vbmf_rank: int, weaken_factor: float, min_rank: int = MIN_RANK) -> int:
    """MUSCO's weakened rank ``int(R_full - w (R_full - R_vbmf))``, at least ``min(min_rank, R_full)``."""
    if not 0 < weaken_factor <= 1:
        raise ValueError(f"the weakening factor must be in (0, 1], got {weaken_factor}")
    rank = int(full_rank - weaken_factor * (full_rank - vbmf_rank))
    return max(rank, min(min_rank, full_rank))


def weakened_rank(matrix: np.ndarray, weaken_factor: float = 0.8, min_rank: int = MIN_RANK) -> tuple[int | None, Estimate]:
    """Weakened EVBMF rank of ``matrix`` (None when EVBMF is guarded: keep the full rank,
    ``estimate.reason`` says why), and the EVBMF estimate itself."""
    estimate = evbmf(matrix)
    if estimate.rank is None:
        return None, estimate
    return weaken(estimate.full_rank, estimate.rank, weaken_factor, min_rank), estimate
