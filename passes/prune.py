"""Channel selection and consumer reconstruction for channel pruning, on sufficient statistics.

Pure numpy/scipy/sklearn: no graph, no model. The graph side (which tensors are pruned
together, how the weights are sliced) is ``passes/channel_groups.py``; the walk over a model
is ``onnxopt/prune_pipeline.py``.

**He, Zhang, Sun 2017**, "Channel Pruning for Accelerating Very Deep Neural Networks"
(ALGORITHMS.md §2). A consumer layer ``Y = X W^T`` (``X`` (N, c*k2): patches, channel-major
blocks of ``k2 = kh*kw``; ``W`` (n, c*k2)) is written as a sum of channel contributions
``Y = sum_i X_i W_i^T``. Keeping ``c'`` of the ``c`` channels:

    min_beta (1/2N) ||Y - sum_i beta_i X_i W_i^T||_F^2 + lam ||beta||_1

With ``Sxx = Xc^T Xc`` and ``Sxy = Xc^T Yc`` (centred, float64), the quadratic's terms are

    G_ij = <X_i W_i^T, X_j W_j^T> = sum over blocks of (W^T W * Sxx)        (c, c)
    q_i  = <X_i W_i^T, Y>         = sum over blocks of (W * Sxy^T)           (c,)

and ``sklearn.linear_model.lars_path_gram(Xy=q, Gram=G, n_samples=N, method="lasso")``
returns the whole LASSO path exactly, from ``lam = inf`` (nothing selected) down. The kept set
is the support of the first path point with ``c'`` non-zeros (the official code instead
bisects ``lam`` for a randomised coordinate-descent LASSO on ~400 rows; the path on all rows
needs no bisection). Channels that must stay (the other inputs of a Concat) enter with
``beta = 1``: their contribution is moved to the target, ``q_g <- q_g - G_gf 1``.

Then ONE least-squares refit of the consumer on the kept input columns ``K`` (He §3.1's
``LinearRegression``), ridge ``delta = 1e-6 tr(Sxx_KK)/|K|``:

    W_K = (Sxx_KK + delta I)^{-1} Sxy_K,   b = ybar - W_K^T xbar_K

**Shrinkage toward the original weights** [design]. With few calibration images the refit
overfits: on SqueezeNet 1.1 (250 images) the refit classifier conv predicted rows of other
images worse than its sliced original weights did. The refit is therefore shrunk toward the
original weights ``W0`` of the kept columns (ridge regression with a prior mean),

    min ||Yc - Xc_K W||^2 + s t ||W - W0_K||^2,   t = tr(Sxx_KK)/|K|
    W_K = (Sxx_KK + (s + 1e-6) t I)^{-1} (Sxy_K + s t W0_K),

``s = 0`` being least squares and ``s -> inf`` the original weights (with the bias refit).
``s`` is chosen per consumer by K-fold cross-validation on the statistics alone: each fold's
squared error ``tr(Syy) - 2 tr(W^T Sxy) + tr(W^T Sxx W) + n ||ybar - W^T xbar - b||^2`` under
the fit on the other folds, whose statistics are the total's minus the fold's (one
eigendecomposition per fold serves the whole grid).

**Backward elimination** (``--selection greedy``) [design]: the LASSO scales channel
contributions with the consumer's weights held fixed, then the refit changes those weights,
so its support is not the best one for the refit. ``elimination_order`` instead removes, one
at a time, the channel whose removal raises the refit's residual least (exact for each step:
the extra sum of squares of the channel's block of columns, with the inverse Gram matrix
downdated after each removal). Its kept sets are nested like the path's.

**Data-free filter ranking** (producer side: a filter = one output channel):

* Li, Zhao, Han 2019 ("Convolutional neural network acceleration algorithm based on filters
  pruning", ALGORITHMS.md §3): importance = ``std(W[j])``, on the un-folded weights.
* Li, Kadav, Durdanovic, Samet, Graf 2017 ("Pruning Filters for Efficient ConvNets"):
  importance = ``||W[j]||_1``.

The lowest-scoring filters are removed; with calibration data the consumer is then refit by
the same least squares.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
from sklearn.linear_model import lars_path_gram


@dataclass
class LinearStats:
    """Centred float64 statistics of consumer inputs ``x`` (dim c*k2) and targets ``y`` (dim n)."""

    sxx: np.ndarray
    sxy: np.ndarray
    syy: np.ndarray
    mean_x: np.ndarray
    mean_y: np.ndarray
    n: int


# ---------------------------------------------------------------------------- LASSO selection


def channel_gram(weight: np.ndarray, sxx: np.ndarray, sxy: np.ndarray, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``G`` (c, c) and ``q`` (c,) of the channel-contribution LASSO (module docstring).

    ``weight``: (n, c*k2) consumer weights, channel-major blocks; ``sxx`` (c*k2, c*k2),
    ``sxy`` (c*k2, n).
    """
    weight = np.asarray(weight, np.float64)
    n, dim = weight.shape
    block = dim // channels
    gram_w = weight.T @ weight                                           # (c*k2, c*k2)
    gram = (gram_w * sxx).reshape(channels, block, channels, block).sum((1, 3))
    q = (weight * sxy.T).reshape(n, channels, block).sum((0, 2))
    return gram, q


def lasso_path(gram: np.ndarray, q: np.ndarray, n_samples: int) -> np.ndarray:
    """Coefficients along the exact LASSO path, shape (c, path points)."""
    # lars_path_gram's objective is (1/2N)||y - Xw||^2 + a|w|_1 with X^T X = G, X^T y = q.
    scale = max(float(np.trace(gram)) / len(gram), 1e-300)             # conditioning only
    _, _, coefs = lars_path_gram(Xy=q / scale, Gram=gram / scale, n_samples=max(int(n_samples), 1),
                                 method="lasso", max_iter=20 * len(gram))
    return coefs


def select_from_path(coefs: np.ndarray, keep: int, gram: np.ndarray | None = None) -> np.ndarray:
    """Sorted indices of the support of the first path point with ``keep`` non-zeros.

    The LASSO path can drop variables, so ``keep`` non-zeros might never occur exactly: then
    the first point with more is taken and its ``keep`` largest contributions
    ``|beta_i| sqrt(G_ii)`` are kept; if the path never reaches ``keep``, the support of its
    last point is completed the same way from the least-squares end of the path.
    """
    channels, points = coefs.shape
    keep = int(min(max(keep, 0), channels))
    if keep == channels:
        return np.arange(channels)
    nonzero = (np.abs(coefs) > 0).sum(0)
    weight = np.ones(channels) if gram is None else np.sqrt(np.clip(np.diag(gram), 0, None))
    for point in range(points):
        if nonzero[point] == keep:
            return np.sort(np.flatnonzero(coefs[:, point]))
        if nonzero[point] > keep:
            strength = np.abs(coefs[:, point]) * weight
            return np.sort(np.argsort(-strength, kind="stable")[:keep])
    # Path ended with fewer non-zeros (rank-deficient G): fill by first entry order, then strength.
    order: list[int] = []
    for point in range(points):
        for index in np.flatnonzero(coefs[:, point]):
            if index not in order:
                order.append(int(index))
    rest = [i for i in np.argsort(-weight, kind="stable") if i not in order]
    return np.sort(np.array((order + rest)[:keep], dtype=int))


def fixed_channel_target(gram: np.ndarray, q: np.ndarray, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``G``, ``q`` restricted to ``group`` with the other channels fixed at ``beta = 1``."""
    group = np.asarray(group)
    fixed = np.setdiff1d(np.arange(len(q)), group)
    gram_g = gram[np.ix_(group, group)]
    q_g = q[group] - gram[np.ix_(group, fixed)].sum(1)
    return gram_g, q_g


# ---------------------------------------------------------------------------- least squares


def block_columns(channels: np.ndarray, block: int) -> np.ndarray:
    """Input columns ``{c*block + j}`` of the given channels (channel-major blocks)."""
    channels = np.asarray(channels, dtype=int)
    return (channels[:, None] * block + np.arange(block)[None]).reshape(-1)


RIDGE = 1e-6                 # of the mean eigenvalue of Sxx_KK: numerical only
SHRINKAGE_GRID = (0.0, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)


def _scale(a: np.ndarray) -> float:
    return max(float(np.trace(a)), 1e-12) / max(len(a), 1)


def least_squares(stats: LinearStats, columns: np.ndarray, prior: np.ndarray | None = None,
                  shrinkage: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Refit on input ``columns``: weight (n, |columns|) and bias (n,), float64 (see docstring);
    shrunk toward ``prior`` (n, |columns|) by ``shrinkage`` when given."""
    columns = np.asarray(columns, dtype=int)
    a = stats.sxx[np.ix_(columns, columns)]
    scale = _scale(a)
    rhs = stats.sxy[columns]
    if prior is not None and shrinkage > 0:
        rhs = rhs + shrinkage * scale * np.asarray(prior, np.float64).T
    solution = scipy.linalg.solve(a + (RIDGE + shrinkage) * scale * np.eye(len(columns)), rhs, assume_a="pos")
    weight = solution.T                                                  # (n, |columns|)
    bias = stats.mean_y - weight @ stats.mean_x[columns]
    return weight, bias


def _on_columns(stats: LinearStats, columns: np.ndarray) -> LinearStats:
    """The statistics of the input ``columns`` only."""
    return LinearStats(stats.sxx[np.ix_(columns, columns)], stats.sxy[columns], stats.syy, stats.mean_x[columns],
                       stats.mean_y, stats.n)


def _without(total: LinearStats, part: LinearStats) -> LinearStats:
    """The statistics of the rows of ``total`` that are not in ``part`` (Chan et al.'s pairwise
    combination, inverted)."""
    n = total.n - part.n
    mean_x = (total.n * total.mean_x - part.n * part.mean_x) / n
    mean_y = (total.n * total.mean_y - part.n * part.mean_y) / n
    dx, dy = part.mean_x - mean_x, part.mean_y - mean_y
    weight = n * part.n / total.n
    return LinearStats(total.sxx - part.sxx - np.outer(dx, dx) * weight, total.sxy - part.sxy - np.outer(dx, dy) * weight,
                       total.syy - part.syy - np.outer(dy, dy) * weight, mean_x, mean_y, n)


def cross_validated_shrinkage(total: LinearStats, folds: list[LinearStats], columns: np.ndarray, prior: np.ndarray,
                              grid: tuple[float, ...] = SHRINKAGE_GRID) -> float:
    """The shrinkage toward ``prior`` with the least summed held-out squared error: each of
    ``folds`` (a partition of the rows behind ``total``) predicted by the fit on the others."""
    columns = np.asarray(columns, dtype=int)
    prior = np.asarray(prior, np.float64)
    total = _on_columns(total, columns)
    kept = np.arange(len(columns))
    errors = np.zeros(len(grid))
    for fold in folds:
        held = _on_columns(fold, columns)
        train = _without(total, held)
        scale = _scale(train.sxx)
        values, vectors = np.linalg.eigh(train.sxx)
        for i, shrinkage in enumerate(grid):
            rhs = vectors.T @ (train.sxy + shrinkage * scale * prior.T)
            weight = (vectors @ (rhs / (values + (RIDGE + shrinkage) * scale)[:, None])).T
            bias = train.mean_y - weight @ train.mean_x
            errors[i] += squared_error(held, weight, kept, bias)
    return float(grid[int(np.argmin(errors))])


def residual(stats: LinearStats, weight: np.ndarray, columns: np.ndarray) -> float:
    """Centred squared error ``||Yc - Xc_K W^T||^2`` from the statistics."""
    columns = np.asarray(columns, dtype=int)
    sxy = stats.sxy[columns]
    value = np.trace(stats.syy) - 2 * np.sum(weight.T * sxy) + np.sum((weight @ stats.sxx[np.ix_(columns, columns)]) * weight)
    return float(max(value, 0.0))


def squared_error(stats: LinearStats, weight: np.ndarray, columns: np.ndarray, bias: np.ndarray | None = None) -> float:
    """``||Y - (X_K W^T + b)||^2`` over the rows behind ``stats`` (``b`` None: centred)."""
    err = residual(stats, weight, columns)
    if bias is not None:
        offset = stats.mean_y - (weight @ stats.mean_x[np.asarray(columns, dtype=int)] + bias)
        err += stats.n * float(offset @ offset)
    return err


def relative_error(stats: LinearStats, weight: np.ndarray, columns: np.ndarray, bias: np.ndarray | None = None) -> float:
    """``||Y - (X_K W^T + b)|| / ||Y||`` over the sampled rows (uncentred target norm)."""
    total = float(np.trace(stats.syy)) + stats.n * float(stats.mean_y @ stats.mean_y)
    return float(np.sqrt(squared_error(stats, weight, columns, bias) / max(total, 1e-300)))


# ---------------------------------------------------------------------------- greedy selection


COMPACT_AT = 0.75            # elimination: the arrays shrink to the remaining columns each time a quarter of the channels left has gone


def elimination_order(problems: list[tuple[LinearStats, np.ndarray]], keep_min: int = 1) -> np.ndarray:
    """Backward elimination on the least-squares residual: the group's channels in the order
    they are removed, down to ``keep_min`` kept.

    ``problems``: per consumer, its statistics and ``columns`` (c, k2), the input columns each
    group channel occupies there (other columns, e.g. a Concat's other inputs, always stay).
    Each step removes the channel whose removal raises the summed residual of the refit least.
    With ``P = (Sxx + delta I)^{-1}`` and ``B = P Sxy`` over the remaining columns, removing the
    columns ``J`` of one channel raises the residual by ``tr(B_J^T P_JJ^{-1} B_J)`` (the extra
    sum of squares of a block of regressors) and updates ``B <- B - P_:J P_JJ^{-1} B_J``,
    ``P <- P - P_:J P_JJ^{-1} P_J:`` (the inverse of a Schur complement), so a step costs
    O(D^2 k2) per consumer of D remaining columns (the arrays shrink as channels go). The kept
    sets are nested, like the LASSO path's, and each minimises, greedily, exactly what the
    refit then minimises (ThiNet, Luo et al. 2017, ranks channels greedily by the same
    reconstruction error, without the refit in the loop).
    """
    channels = len(problems[0][1]) if problems else 0
    states = []
    for stats, columns in problems:
        columns = np.asarray(columns, dtype=int).reshape(channels, -1)
        a = stats.sxx + RIDGE * _scale(stats.sxx) * np.eye(len(stats.sxx))
        inverse = scipy.linalg.inv(a, check_finite=False)
        inverse = (inverse + inverse.T) / 2
        states.append([inverse, inverse @ stats.sxy, columns])
    alive = np.ones(channels, bool)
    order: list[int] = []
    compacted_at = channels
    while alive.sum() > max(int(keep_min), 0):
        candidates = np.flatnonzero(alive)
        cost = np.zeros(len(candidates))
        for inverse, coef, columns in states:
            cols = columns[candidates]                                     # (m, k2)
            p_jj = inverse[cols[:, :, None], cols[:, None, :]]             # (m, k2, k2)
            b_j = coef[cols]                                               # (m, k2, n)
            if cols.shape[1] == 1:
                cost += np.square(b_j[:, 0]).sum(1) / np.maximum(p_jj[:, 0, 0], 1e-300)
            else:
                cost += (b_j * np.linalg.solve(p_jj, b_j)).sum((1, 2))
        removed = int(candidates[int(np.argmin(cost))])
        for inverse, coef, columns in states:
            cols = columns[removed]
            p_j = inverse[:, cols]                                         # (D, k2)
            block_inverse = scipy.linalg.inv(inverse[np.ix_(cols, cols)], check_finite=False)
            coef -= p_j @ (block_inverse @ coef[cols])
            inverse -= p_j @ block_inverse @ p_j.T
        alive[removed] = False
        order.append(removed)
        if alive.sum() <= COMPACT_AT * compacted_at:        # drop the removed columns: later steps cost less
            compacted_at = alive.sum()
            for state in states:
                inverse, coef, columns = state
                gone = columns[~alive].reshape(-1)                         # -1: dropped before
                stay = np.setdiff1d(np.arange(len(inverse)), gone[gone >= 0])
                index = np.full(len(inverse), -1)
                index[stay] = np.arange(len(stay))
                state[:] = [inverse[np.ix_(stay, stay)], coef[stay], np.where(columns >= 0, index[columns], -1)]
    return np.array(order, dtype=int)


def select_from_order(order: np.ndarray, channels: int, keep: int) -> np.ndarray:
    """Sorted indices kept when the first ``channels - keep`` of ``order`` are removed."""
    keep = int(min(max(keep, 0), channels))
    removed = np.asarray(order[:channels - keep], dtype=int)
    if len(removed) < channels - keep:
        raise ValueError(f"the elimination order stops at {channels - len(order)} kept channels, not {keep}")
    return np.setdiff1d(np.arange(channels), removed)


# ---------------------------------------------------------------------------- data-free ranking


def filter_scores(weight: np.ndarray, criterion: str) -> np.ndarray:
    """Importance of each output filter: ``"std"`` (Li, Zhao, Han 2019) or ``"l1"`` (Li et al. 2017)."""
    rows = np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    if criterion == "std":
        return rows.std(axis=1)
    if criterion == "l1":
        return np.abs(rows).sum(axis=1)
    raise ValueError(f"unknown filter criterion {criterion!r}; use 'std' or 'l1'")


def rank_select(scores: np.ndarray, keep: int) -> np.ndarray:
    """Sorted indices of the ``keep`` highest scores (ties: lower index first)."""
    keep = int(min(max(keep, 0), len(scores)))
    return np.sort(np.argsort(-np.asarray(scores), kind="stable")[:keep])


def removed_mass(scores: np.ndarray, keep: int) -> float:
    """Fraction of the total score carried by the filters ``rank_select`` removes."""
    scores = np.asarray(scores, np.float64)
    total = scores.sum()
    if total <= 0:
        return 0.0
    return float(1 - scores[rank_select(scores, keep)].sum() / total)
