"""The multiple-choice knapsack allocation against brute force."""

import itertools

import numpy as np

from onnxopt.passes.allocation import Option, allocate, energy_damage


def brute_force(options, budget):
    best, best_choice = np.inf, None
    for choice in itertools.product(*[range(len(o)) for o in options]):
        cost = sum(options[i][k].cost for i, k in enumerate(choice))
        damage = sum(options[i][k].damage for i, k in enumerate(choice))
        if cost <= budget and damage < best:
            best, best_choice = damage, choice
    return best, best_choice


def test_allocation_matches_brute_force_on_random_instances():
    rng = np.random.default_rng(0)
    for _ in range(40):
        layers = rng.integers(1, 5)
        options = [[Option(float(rng.integers(1, 100)), float(rng.random()), k) for k in range(rng.integers(1, 5))]
                   for _ in range(layers)]
        budget = float(rng.integers(20, 250))
        expected, _ = brute_force(options, budget)
        choice = allocate(options, budget, bins=20000)
        if not np.isfinite(expected):
            assert choice is None
            continue
        assert choice is not None
        cost = sum(options[i][k].cost for i, k in enumerate(choice))
        damage = sum(options[i][k].damage for i, k in enumerate(choice))
        assert cost <= budget
        assert damage <= expected + 1e-9


def test_energy_damage_is_monotone_and_zero_at_full_rank():
    eig = np.array([5.0, 3.0, 1.0, 0.5])
    damages = [energy_damage(eig, r) for r in range(1, 5)]
    assert all(a >= b for a, b in zip(damages, damages[1:]))
    assert damages[-1] == 0.0
