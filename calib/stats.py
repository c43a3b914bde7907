"""Sampled activation rows and float64 sufficient statistics (ALGORITHMS.md §0).

A Conv with input ``x`` (B, C, H, W) gives, at output position (b, i, j), an input row
``x_row`` = the (C*kh*kw,) patch under the kernel (channel-major blocks of kh*kw, as
``W.reshape(M, -1)`` orders the weights) and a response row ``y_row = out[b, :, i, j]``, so that
``y_row = W.reshape(M, -1) @ x_row + bias``. A few positions are sampled per image, with a
generator seeded by (seed, layer, batch) so that the original and the compressed model are
sampled at the same places.

Least squares, the LASSO Gram and reduced-rank regression need only
``Sxx = Xc^T Xc``, ``Sxy = Xc^T Yc``, the means and N, accumulated here in float64 with a
streaming (Chan et al.) update; memory is O(dim^2), independent of the number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Positions:
    """Sampled output positions: image index, row, column (each (N,))."""

    image: np.ndarray
    row: np.ndarray
    col: np.ndarray

    def __len__(self) -> int:
        return len(self.image)


def sample_positions(batch: int, height: int, width: int, per_image: int, seed: tuple[int, ...]) -> Positions:
    """``per_image`` distinct output positions for each image of a batch."""
    rng = np.random.default_rng(seed)
    per_image = min(per_image, height * width)
    if per_image == height * width:
        flat = np.tile(np.arange(height * width), (batch, 1))
    else:
        flat = np.argsort(rng.random((batch, height * width)), axis=1)[:, :per_image]
    image = np.repeat(np.arange(batch), per_image)
    flat = flat.reshape(-1)
    return Positions(image, flat // width, flat % width)


def responses_at(output: np.ndarray, positions: Positions) -> np.ndarray:
    """Rows ``output[b, :, i, j]`` for a (B, M, Ho, Wo) tensor; a (B, M) tensor is returned as is."""
    if output.ndim == 2:
        return output
    return output[positions.image, :, positions.row, positions.col]


def extract_patches(x: np.ndarray, positions: Positions, kernel, strides, pads, dilations) -> np.ndarray:
    """Input patches (N, C*kh*kw) under the kernel at the given output positions.

    Honours pads ``[top, left, bottom, right]``, strides and dilations exactly as ONNX Conv.
    """
    kh, kw = kernel
    sh, sw = strides
    dh, dw = dilations
    pt, pl, pb, pr = pads
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    rows = positions.row[:, None] * sh + np.arange(kh)[None] * dh          # (N, kh)
    cols = positions.col[:, None] * sw + np.arange(kw)[None] * dw          # (N, kw)
    channels = np.arange(x.shape[1])
    patches = xp[positions.image[:, None, None, None], channels[None, :, None, None],
                 rows[:, None, :, None], cols[:, None, None, :]]
    return patches.reshape(len(positions), -1)


class SufficientStats:
    """Streaming float64 means, ``Sxx = Xc^T Xc`` and (optionally) ``Sxy = Xc^T Yc``."""

    def __init__(self, x_dim: int, y_dim: int | None = None):
        self.n = 0
        self.mean_x = np.zeros(x_dim)
        self.sxx = np.zeros((x_dim, x_dim))
        self.mean_y = None if y_dim is None else np.zeros(y_dim)
        self.sxy = None if y_dim is None else np.zeros((x_dim, y_dim))
        self.syy = None if y_dim is None else np.zeros((y_dim, y_dim))

    def update(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        """Add rows ``x`` (n, x_dim) and ``y`` (n, y_dim)."""
        if len(x) == 0:
            return
        x = np.asarray(x, np.float64)
        batch = SufficientStats(x.shape[1], None if self.sxy is None else self.sxy.shape[1])
        batch.n = len(x)
        batch.mean_x = x.mean(0)
        xc = x - batch.mean_x
        batch.sxx = xc.T @ xc
        if self.sxy is not None:
            y = np.asarray(y, np.float64)
            batch.mean_y = y.mean(0)
            yc = y - batch.mean_y
            batch.sxy = xc.T @ yc
            batch.syy = yc.T @ yc
        self.absorb(batch)

    def absorb(self, other: SufficientStats) -> None:
        """Add the rows behind ``other`` (Chan et al.'s pairwise combination)."""
        if other.n == 0:
            return
        total = self.n + other.n
        dx = other.mean_x - self.mean_x
        weight = self.n * other.n / total
        self.sxx += other.sxx + np.outer(dx, dx) * weight
        if self.sxy is not None:
            dy = other.mean_y - self.mean_y
            self.sxy += other.sxy + np.outer(dx, dy) * weight
            self.syy += other.syy + np.outer(dy, dy) * weight
            self.mean_y += dy * (other.n / total)
        self.mean_x += dx * (other.n / total)
        self.n = total


def merged(parts: list[SufficientStats]) -> SufficientStats:
    """The statistics of the union of the rows behind ``parts``."""
    total = SufficientStats(len(parts[0].mean_x), None if parts[0].mean_y is None else len(parts[0].mean_y))
    for part in parts:
        total.absorb(part)
    return total


class RowSample:
    """Rows kept as float32 for solvers that need them (the ReLU-aware ones), up to a cap."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.chunks: list[np.ndarray] = []
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        room = self.max_rows - self.count
        if room <= 0:
            return
        rows = np.asarray(rows[:room], np.float32)
        self.chunks.append(rows)
        self.count += len(rows)

    def array(self) -> np.ndarray:
        return np.concatenate(self.chunks) if self.chunks else np.zeros((0, 0), np.float32)
