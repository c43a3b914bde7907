"""EVBMF (Nakajima et al. 2013) rank estimation and MUSCO's weakening."""

import numpy as np
import pytest

from onnxopt.passes import vbmf


def _low_rank_plus_noise(rng, rows, cols, rank, noise_to_signal):
    signal = rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols))
    sigma = noise_to_signal * np.linalg.norm(signal) / np.sqrt(rows * cols)
    return signal + sigma * rng.standard_normal((rows, cols)), sigma ** 2


@pytest.mark.parametrize("rows, cols, rank, noise", [
    (50, 80, 5, 1.0), (64, 576, 12, 0.5), (200, 60, 7, 0.3), (30, 300, 3, 0.2),
    (128, 1152, 30, 1.0), (96, 96, 10, 0.8), (16, 144, 4, 0.5),
])
def test_recovers_true_rank_and_noise_variance(rows, cols, rank, noise):
    matrix, variance = _low_rank_plus_noise(np.random.default_rng(rows + cols), rows, cols, rank, noise)
    estimate = vbmf.evbmf(matrix)
    assert estimate.rank == rank
    assert estimate.full_rank == min(rows, cols)
    assert estimate.sigma2 == pytest.approx(variance, rel=0.15)
    assert vbmf.evbmf(matrix.T).rank == rank            # either orientation


def test_pure_noise_is_guarded_with_a_reason():
    estimate = vbmf.evbmf(np.random.default_rng(0).standard_normal((40, 90)))
    assert estimate.rank is None
    assert "rank is 0" in estimate.reason
    rank, same = vbmf.weakened_rank(np.random.default_rng(0).standard_normal((40, 90)), 0.8)
    assert rank is None and same.reason == estimate.reason


def test_failures_are_guarded():
    bad = np.ones((10, 20))
    bad[0, 0] = np.nan
    assert vbmf.evbmf(bad).rank is None and "not finite" in vbmf.evbmf(bad).reason
    assert vbmf.evbmf(np.zeros((10, 20))).rank is None       # empty noise interval
    assert vbmf.evbmf(np.ones((1, 5))).rank is None


def test_weakening_follows_musco_and_is_monotone():
    assert vbmf.weaken(64, 20, 1.0) == 20
    assert vbmf.weaken(64, 20, 0.8) == int(64 - 0.8 * 44)
    assert vbmf.weaken(64, 2, 1.0) == vbmf.MIN_RANK
    assert vbmf.weaken(4, 1, 1.0) == 4                    # the floor never exceeds the full rank
    matrix, _ = _low_rank_plus_noise(np.random.default_rng(3), 64, 300, 12, 0.5)
    ranks = [vbmf.weakened_rank(matrix, w, min_rank=1)[0] for w in (0.1, 0.3, 0.5, 0.8, 1.0)]
    assert ranks == sorted(ranks, reverse=True)
    assert ranks[-1] == 12 and ranks[0] > ranks[-1]
    with pytest.raises(ValueError):
        vbmf.weaken(64, 20, 0.0)
