"""Channel pruning: LASSO path selection against references, least-squares refit, filter
ranking, and the pipeline end to end (small model; ResNet-20 from ../shared)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from scipy.special import log_softmax
from sklearn.linear_model import Lasso

from conftest import run, shared_path, small_cnn
from onnxopt import graph as graphs
from onnxopt.calib.readers import DataSource, InputSpec
from onnxopt.errors import UserError
from onnxopt.layers import find_layers, model_macs
from onnxopt.passes import prune
from onnxopt.pipeline import CompressOptions
from onnxopt.prune_pipeline import _exact_macs, allocate_counts, analyze_prune, compress_prune, plan_groups


def _stats(x: np.ndarray, y: np.ndarray) -> prune.LinearStats:
    from onnxopt.calib.stats import SufficientStats

    s = SufficientStats(x.shape[1], y.shape[1])
    for part in np.array_split(np.arange(len(x)), 3):       # streaming, in chunks
        s.update(x[part], y[part])
    return prune.LinearStats(s.sxx, s.sxy, s.syy, s.mean_x, s.mean_y, s.n)


def _problem(seed=0, n=300, channels=6, block=4, outputs=5, active=(1, 3, 4)):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, channels * block)) @ (np.eye(channels * block) + 0.3 * rng.standard_normal((channels * block,) * 2))
    weight = rng.standard_normal((outputs, channels * block))
    mask = np.zeros(channels * block)
    for c in active:
        mask[c * block:(c + 1) * block] = 1
    y = x @ (weight * mask).T + 0.05 * rng.standard_normal((n, outputs))
    return x, y, weight


def test_gram_matches_explicit_channel_contributions():
    x, y, weight = _problem()
    s = _stats(x, y)
    gram, q = prune.channel_gram(weight, s.sxx, s.sxy, 6)
    xc, yc = x - x.mean(0), y - y.mean(0)
    contributions = [xc[:, c * 4:(c + 1) * 4] @ weight[:, c * 4:(c + 1) * 4].T for c in range(6)]
    explicit_gram = np.array([[np.sum(a * b) for b in contributions] for a in contributions])
    explicit_q = np.array([np.sum(a * yc) for a in contributions])
    np.testing.assert_allclose(gram, explicit_gram, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(q, explicit_q, rtol=1e-9, atol=1e-9)


def test_lasso_path_agrees_with_sklearn_lasso_on_a_lambda_grid():
    x, y, weight = _problem(seed=1, active=(0, 2, 5))
    s = _stats(x, y)
    gram, q = prune.channel_gram(weight, s.sxx, s.sxy, 6)
    xc, yc = x - x.mean(0), y - y.mean(0)
    features = np.stack([(xc[:, c * 4:(c + 1) * 4] @ weight[:, c * 4:(c + 1) * 4].T).reshape(-1) for c in range(6)], 1)
    target = yc.reshape(-1)
    supports = {}
    for alpha in np.geomspace(np.abs(features.T @ target).max() / len(target), 1e-6, 400):
        coef = Lasso(alpha=alpha, fit_intercept=False, tol=1e-10, max_iter=100000).fit(features, target).coef_
        support = tuple(np.flatnonzero(np.abs(coef) > 1e-10))
        supports.setdefault(len(support), support)        # first (largest lambda) support of each size
    assert len([k for k in range(1, 6) if k in supports]) >= 3
    for keep in range(1, 6):
        if keep in supports:
            # features have N*n rows: the path in lambda is the same up to the 1/N scaling
            assert tuple(prune.select_from_path(prune.lasso_path(gram, q, len(target)), keep, gram)) == supports[keep]


def test_lasso_selection_finds_best_subset_on_a_planted_problem():
    x, y, weight = _problem(seed=2, active=(1, 3, 4))
    s = _stats(x, y)
    gram, q = prune.channel_gram(weight, s.sxx, s.sxy, 6)
    selected = prune.select_from_path(prune.lasso_path(gram, q, s.n), 3, gram)

    def refit_error(subset):
        columns = prune.block_columns(np.array(subset), 4)
        w, _ = prune.least_squares(s, columns)
        return prune.residual(s, w, columns)

    best = min(itertools.combinations(range(6), 3), key=refit_error)
    assert tuple(selected) == best == (1, 3, 4)


def test_elimination_order_is_greedy_backward_elimination_of_the_summed_refit_residual():
    # two consumers of one 6-channel group: one with 4 columns per channel, one (a Concat's
    # reader) with 1 column per channel after 2 columns of other inputs, which always stay
    x, y, weight = _problem(seed=4)
    rng = np.random.default_rng(5)
    x2 = np.concatenate([rng.standard_normal((len(x), 2)), x[:, ::4] + 0.5 * x[:, 1::4]], 1)
    y2 = x2 @ rng.standard_normal((8, 3)) + 0.1 * rng.standard_normal((len(x), 3))
    s1, s2 = _stats(x, y), _stats(x2, y2)
    columns1 = np.arange(24).reshape(6, 4)
    columns2 = (np.arange(6) + 2).reshape(6, 1)
    order = prune.elimination_order([(s1, columns1), (s2, columns2)], keep_min=1)

    def summed_residual(kept):
        total = 0.0
        for s, columns, width in ((s1, columns1, 24), (s2, columns2, 8)):
            removed = columns[np.setdiff1d(np.arange(6), kept)].reshape(-1)
            cols = np.setdiff1d(np.arange(width), removed)
            w, _ = prune.least_squares(s, cols)
            total += prune.residual(s, w, cols)
        return total

    kept, expected = list(range(6)), []
    while len(kept) > 1:
        drop = min(kept, key=lambda c: summed_residual([k for k in kept if k != c]))
        expected.append(drop)
        kept.remove(drop)
    assert order.tolist() == expected
    assert prune.select_from_order(order, 6, 3).tolist() == sorted(kept + expected[3:])
    with pytest.raises(ValueError, match="stops at"):
        prune.select_from_order(order[:2], 6, 3)


def test_fixed_channels_move_to_the_target():
    x, y, weight = _problem(seed=3)
    s = _stats(x, y)
    gram, q = prune.channel_gram(weight, s.sxx, s.sxy, 6)
    gram_g, q_g = prune.fixed_channel_target(gram, q, np.array([3, 4, 5]))
    xc, yc = x - x.mean(0), y - y.mean(0)
    fixed = xc[:, :12] @ weight[:, :12].T
    residual_target = yc - fixed
    explicit = np.array([np.sum((xc[:, c * 4:(c + 1) * 4] @ weight[:, c * 4:(c + 1) * 4].T) * residual_target) for c in (3, 4, 5)])
    np.testing.assert_allclose(q_g, explicit, rtol=1e-9, atol=1e-8)
    np.testing.assert_allclose(gram_g, gram[3:, 3:])


def test_least_squares_recovers_a_linear_map():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((500, 10)) + 2.0
    columns = np.array([0, 1, 2, 5, 6, 9])
    true_weight = rng.standard_normal((3, len(columns)))
    true_bias = rng.standard_normal(3)
    y = x[:, columns] @ true_weight.T + true_bias
    s = _stats(x, y)
    weight, bias = prune.least_squares(s, columns)
    np.testing.assert_allclose(weight, true_weight, atol=1e-5)
    np.testing.assert_allclose(bias, true_bias, atol=1e-5)
    assert prune.relative_error(s, weight, columns, bias) < 1e-5


def _folds(x, y, folds=4):
    return _stats(x, y), [_stats(x[f::folds], y[f::folds]) for f in range(folds)]


def test_statistics_of_the_other_folds_are_the_total_minus_the_fold():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((200, 5)) + 1.5
    y = x @ rng.standard_normal((5, 2)) + 0.1 * rng.standard_normal((200, 2))
    rest = prune._without(_stats(x, y), _stats(x[:60], y[:60]))
    direct = _stats(x[60:], y[60:])
    for field in ("sxx", "sxy", "syy", "mean_x", "mean_y"):
        np.testing.assert_allclose(getattr(rest, field), getattr(direct, field), rtol=1e-9, atol=1e-9)
    assert rest.n == 140


def test_cross_validated_shrinkage_trusts_the_data_when_it_determines_the_map():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4000, 6))
    true_weight = rng.standard_normal((3, 6))
    y = x @ true_weight.T + 0.01 * rng.standard_normal((4000, 3))
    wrong_prior = true_weight + rng.standard_normal(true_weight.shape)
    columns = np.arange(6)
    assert prune.cross_validated_shrinkage(*_folds(x, y), columns, wrong_prior) == 0.0
    weight, _ = prune.least_squares(_stats(x, y), columns, wrong_prior, 0.0)
    np.testing.assert_allclose(weight, true_weight, atol=1e-3)


def test_cross_validated_shrinkage_keeps_the_prior_when_the_rows_are_too_few():
    """30 noisy rows for 20 weights per output: least squares overfits; the original weights
    (the prior) predict other rows better, and cross-validation finds that."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((30, 20))
    prior = rng.standard_normal((4, 20))
    y = x @ prior.T + 2.0 * rng.standard_normal((30, 4))
    columns = np.arange(20)
    shrinkage = prune.cross_validated_shrinkage(*_folds(x, y), columns, prior)
    assert shrinkage >= 1.0
    shrunk, _ = prune.least_squares(_stats(x, y), columns, prior, shrinkage)
    plain, _ = prune.least_squares(_stats(x, y), columns)
    assert np.linalg.norm(shrunk - prior) < 0.5 * np.linalg.norm(plain - prior)
    huge, _ = prune.least_squares(_stats(x, y), columns, prior, 1e9)
    np.testing.assert_allclose(huge, prior, atol=1e-6)


def test_filter_scores_and_ranking():
    weight = np.stack([np.full((2, 3, 3), 1.0), np.arange(18.0).reshape(2, 3, 3), -np.arange(18.0).reshape(2, 3, 3) * 2])
    np.testing.assert_allclose(prune.filter_scores(weight, "std"), [0.0, np.arange(18.0).std(), 2 * np.arange(18.0).std()])
    np.testing.assert_allclose(prune.filter_scores(weight, "l1"), [18.0, 153.0, 306.0])
    assert list(prune.rank_select(prune.filter_scores(weight, "std"), 2)) == [1, 2]
    assert prune.removed_mass(np.array([1.0, 3.0]), 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        prune.filter_scores(weight, "l2")


# ---------------------------------------------------------------------------- pipeline


def _data(count, seed=1):
    rng = np.random.default_rng(seed)
    return DataSource([InputSpec("x", ["N", 3, 12, 12])], arrays={"x": rng.standard_normal((count, 3, 12, 12)).astype(np.float32)})


def _check_model(original, result, speedup):
    onnx.checker.check_model(result.model, full_check=True)
    assert [i.name for i in result.model.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in original.graph.output]
    feeds = {"x": np.random.default_rng(9).standard_normal((3, 3, 12, 12)).astype(np.float32)}
    assert run(result.model, feeds)[0].shape == run(original, feeds)[0].shape
    assert result.macs_before / result.macs_after >= speedup * (1 - 1e-9)


@pytest.mark.parametrize("method", ["prune", "filter-std", "filter-l1"])
def test_pipeline_on_small_cnn(method):
    model = small_cnn()
    result = compress_prune(model, _data(80), _data(16, seed=2), CompressOptions(speedup=1.3, method=method, rows_per_layer=2000))
    _check_model(model, result, 1.3)
    assert result.verification.relative_l2 < 0.3
    pruned = [layer for layer in result.layers if layer.rank is not None]
    assert pruned and all(layer.rank % 4 == 0 and layer.rank < layer.full_rank for layer in pruned)
    stem = next(layer for layer in result.layers if layer.name == "stem")
    assert stem.skipped and "residual" in stem.skipped
    fc = next(layer for layer in result.layers if layer.name == "fc")      # one row per image after GAP
    kept_inputs = (fc.params_after - 10) // 10
    if fc.solver is not None:
        assert ("no refit" in fc.solver) == (80 < 4 * kept_inputs)


def test_data_free_filter_pruning_slices_only():
    model = small_cnn()
    result = compress_prune(model, None, _data(8, seed=2), CompressOptions(speedup=1.3, method="filter-l1"))
    _check_model(model, result, 1.3)
    with pytest.raises(UserError, match="data-driven"):
        compress_prune(model, None, None, CompressOptions(speedup=1.3, method="prune"))


def test_round_to_and_refusals():
    model = small_cnn()
    options = CompressOptions(speedup=1.2, method="filter-std")
    options.round_to = 8
    result = compress_prune(model, None, None, options)
    assert all(layer.rank % 8 == 0 for layer in result.layers if layer.rank is not None)
    with pytest.raises(UserError, match="out of reach"):
        compress_prune(model, None, None, CompressOptions(speedup=50, method="filter-std"))
    with pytest.raises(UserError, match="unknown pruning --method"):
        compress_prune(model, None, None, CompressOptions(speedup=2, method="lowrank"))
    with pytest.raises(UserError, match="unknown --selection 'best'"):
        compress_prune(model, _data(8), None, CompressOptions(speedup=1.3, method="prune", selection="best"))


def test_channel_grid_below_the_multiple():
    """``round_below`` (``--target x86``): multiples of ``round_to``, and fewer than that in
    multiples of ``round_below``; so a 16-channel group is prunable at ``round_to`` 16, and the
    pruned model keeps only such counts."""
    model = small_cnn()
    prepared, _ = graphs.prepare(model, {"x": (3, 12, 12)})
    graph = graphs.import_graph(prepared)
    layers = {layer.name: layer for layer in find_layers(graph)}
    strict, strict_reasons = plan_groups(graph, layers, [], 16, data=True)
    grid, _ = plan_groups(graph, layers, [], 16, data=True, round_below=4)
    assert {plan.channels: plan.counts for plan in grid if not plan.sampler} == {16: [4, 8, 12, 16], 32: [4, 8, 12, 16, 32]}
    assert [plan.channels for plan in strict] == [32]
    assert any("nothing to prune at --round-to 16" in reason for reason in strict_reasons.values())
    result = compress_prune(model, _data(64), _data(16, seed=2),
                            CompressOptions(speedup=1.6, method="prune", round_to=16, round_below=4, rows_per_layer=2000))
    _check_model(model, result, 1.6)
    kept = [layer.rank for layer in result.layers if layer.rank is not None]
    assert kept and all(k % 16 == 0 or (k < 16 and k % 4 == 0) for k in kept), kept
    assert any(k < 16 for k in kept)


def test_greedy_selection_keeps_what_the_refit_reconstructs_best():
    """``--selection greedy`` on the small CNN, every group at half its channels: the
    consumers' refit error on the calibration rows is lower in sum than after the LASSO path's
    choice (backward elimination minimises exactly that), and the report names the selection."""
    model = small_cnn()
    errors, solvers = {}, {}
    for selection in ("lasso", "greedy"):
        options = CompressOptions(speedup=1.3, method="prune", rows_per_layer=2000, selection=selection)
        analysis = analyze_prune(model, _data(80), _data(16, seed=2), options)
        half = [plan.channels // 2 for plan in analysis.plans]
        result = compress_prune(model, _data(80), _data(16, seed=2), options, analysis=analysis, keep=half)
        _check_model(model, result, 1.0)
        consumers = [r for r in result.layers if r.error_after is not None and r.rank is None]
        errors[selection] = sum(r.error_after for r in consumers)
        solvers[selection] = {r.solver.split(" ")[0] for r in consumers}
    assert errors["greedy"] < errors["lasso"]
    assert solvers == {"lasso": {"lasso+ls"}, "greedy": {"greedy+ls"}}


@pytest.mark.slow
def test_resnet20_prune_keeps_accuracy():
    """ResNet-20 (option-A shortcuts: Slice + channel Pad, left alone) at 1.3x, 500 test images."""
    from onnxopt.calib.capture import make_session
    from onnxopt.calib.readers import make_preprocess, open_source, split_source
    from onnxopt.cli import model_inputs

    model = onnx.load(shared_path("models/cifar10_resnet20.onnx"))
    inputs = model_inputs(model)
    prep = make_preprocess("cifar10")
    calib, holdout = split_source(open_source(str(shared_path("data/cifar10/train")), inputs, prep), 300, 50, 0)
    test = open_source(str(shared_path("data/cifar10/test")), inputs, prep)
    classes = sorted({p.parent.name for p in test.paths})
    test = test.subset(sorted(np.random.default_rng(0).permutation(len(test))[:500]))
    labels = np.array([classes.index(p.parent.name) for p in test.paths])

    def accuracy(m):
        session = make_session(m, 2)
        return float((np.concatenate([session.run(None, b)[0].argmax(1) for b in test.batches(100)]) == labels).mean())

    result = compress_prune(model, calib, holdout, CompressOptions(speedup=1.3, method="prune", rows_per_layer=4096, threads=2))
    assert result.macs_before / result.macs_after >= 1.3
    onnx.checker.check_model(result.model, full_check=True)
    before, after = accuracy(model), accuracy(result.model)
    assert after >= before - 0.05, (before, after)


def test_consumer_with_too_few_rows_keeps_sliced_weights():
    """One row per image after global pooling: no least-squares refit, the sliced weights stay."""
    from test_channel_groups import gemm_model

    from onnxopt.graph import import_graph, prepare
    from onnxopt.passes.channel_groups import find_groups, group_of
    from onnxopt.prune_pipeline import _consumer_weight, _refit

    graph = import_graph(prepare(gemm_model(gap=True))[0])
    group = group_of(find_groups(graph), "c1")
    fc = group.consumers[0].node
    rng = np.random.default_rng(0)
    for rows, refit in ((8, False), (400, True)):
        x = rng.standard_normal((rows, 6))
        stats = _stats(x, x @ _consumer_weight(fc).T + 0.1 * rng.standard_normal((rows, 4)))
        unfitted = set()
        weights, _, _, _ = _refit(group, np.array([0, 2, 5]), {"fc": stats}, unfitted)
        sliced = _consumer_weight(fc)[:, [0, 2, 5]]              # (N, K): the initializer layout with transB=1
        assert ("fc" in unfitted) == (not refit)
        assert np.allclose(weights["fc"][0], sliced, atol=1e-6) == (not refit)


def test_auto_meets_the_budget_and_keeps_the_best_measured_split():
    """--method auto: every prune/low-rank split and the per-layer choice are tried; the kept one has the smallest error."""
    from onnxopt.auto_pipeline import FACTORISERS, SHARES
    from onnxopt.pipeline import compress
    from onnxopt.verify import compare_outputs

    model = small_cnn()
    holdout = _data(16, seed=2)
    result = compress(model, _data(80), holdout, CompressOptions(speedup=1.5, method="auto", rows_per_layer=2000))
    _check_model(model, result, 1.5)
    candidates = result.auto["candidates"]
    splits = [(share, None if share == 1.0 else factoriser) for share in SHARES for factoriser in FACTORISERS
              if share < 1.0 or factoriser == FACTORISERS[0]]
    assert [(c["prune_share"], c.get("factoriser")) for c in candidates] == [*splits, (None, None)]
    assert any(c.get("factoriser") == "spatial" and "relative_l2" in c for c in candidates)     # spatial splits measured too
    per_layer = candidates[-1]
    assert per_layer["per_layer"] and "skipped" not in per_layer, per_layer      # groups and layers chosen by one knapsack
    measured = [c for c in candidates if "relative_l2" in c]
    assert len(measured) >= 3 and all(c["mac_speedup"] >= 1.5 * (1 - 1e-9) for c in measured)
    chosen = [c for c in candidates if c.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["kl"] == min(c["kl"] for c in measured)          # a classifier: the least KL
    again = compare_outputs(model, result.model, holdout)
    assert abs(again.relative_l2 - result.verification.relative_l2) < 1e-6
    x = next(holdout.batches(16))["x"]
    log_p, log_q = (log_softmax(run(m, {"x": x})[0].astype(np.float64), axis=1) for m in (model, result.model))
    assert again.kl == pytest.approx(float((np.exp(log_p) * (log_p - log_q)).sum(1).mean()), rel=1e-6, abs=1e-12)
    assert result.verification.relative_l2 == chosen[0]["relative_l2"]
    with pytest.raises(UserError, match="data-driven"):
        compress(model, None, None, CompressOptions(speedup=1.5, method="auto"))
    with pytest.raises(UserError, match="out of reach"):
        compress(model, _data(40), holdout, CompressOptions(speedup=50, method="auto", rows_per_layer=500))


def test_auto_cross_fits_the_measured_damages_only(monkeypatch):
    """--method auto --sensitivity-folds 2: the per-layer choice's prune damages and low-rank
    curves are cross-fitted; the global splits' energy allocations are not (they measure
    nothing); without held-out samples auto refuses before any candidate is built."""
    from onnxopt import auto_pipeline
    from onnxopt.pipeline import compress

    folds_seen = set()

    def recording(name, real, position):         # position of the CompressOptions argument
        def call(*args, **kwargs):
            options = args[position]
            folds_seen.add((name, options.allocation, options.sensitivity_folds))
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(auto_pipeline, "analyze_prune", recording("analyze_prune", auto_pipeline.analyze_prune, 3))
    monkeypatch.setattr(auto_pipeline, "layer_sensitivity", recording("layer_sensitivity", auto_pipeline.layer_sensitivity, 4))
    model, options = small_cnn(), CompressOptions(speedup=1.5, method="auto", rows_per_layer=2000, sensitivity_folds=2)
    result = compress(model, _data(80), _data(16, seed=2), options)
    _check_model(model, result, 1.5)
    assert folds_seen == {("analyze_prune", "energy", 1), ("analyze_prune", "sensitivity", 2),
                          ("layer_sensitivity", "energy", 2)}          # the per-layer choice's low-rank curves
    with pytest.raises(UserError, match="held-out folds"):
        compress(model, _data(80), None, options)


def _flat_curves(layers, scale: float, multiple: int = 4):
    """Low-rank damage curves ``scale * (1 - r / out)`` for every layer (priced like sensitivity's)."""
    from onnxopt.passes.lowrank import decomposed_macs
    from onnxopt.pipeline import rank_grid
    from onnxopt.sensitivity import Analysis, LayerCurve

    curves = []
    for layer in layers:
        ranks = rank_grid(layer, multiple)
        curves.append(LayerCurve(layer.name, "", layer.macs, ranks, [decomposed_macs(layer, r) for r in ranks],
                                 [scale * (1 - r / layer.out_channels) for r in ranks]))
    return Analysis(curves, samples=16, metrics=["error"])


def test_per_layer_choice_takes_whichever_family_damages_the_output_less(monkeypatch):
    """One knapsack over prune groups and low-rank layers: free factorisation is all low-rank,
    costly factorisation is all pruning; either way the choice meets the budget on the pruned shapes;
    end to end, exactly the chosen layers are factorised."""
    from onnxopt import auto_pipeline
    from onnxopt.auto_pipeline import _macs_after, per_layer_choice
    from onnxopt.pipeline import plan
    from onnxopt.prune_pipeline import analyze_prune

    model, calib, holdout = small_cnn(), _data(80), _data(16, seed=2)
    options = CompressOptions(speedup=2, method="prune", allocation="sensitivity", rows_per_layer=2000, sensitivity_metric="error")
    pruning = analyze_prune(model, calib, holdout, options)
    assert pruning.metric == "error"                                   # the low-rank curves are priced in the same metric
    candidates = plan(model, options, calib.sample_shapes()).candidates
    target = pruning.macs_before / 2

    free = per_layer_choice(pruning, candidates, _flat_curves(candidates, 1e-9), 4, 2.0)
    assert free.ranks and all(c == p.channels for c, p in zip(free.counts, pruning.plans)), free
    costly = per_layer_choice(pruning, candidates, _flat_curves(candidates, 1e3), 4, 2.0)
    assert not costly.ranks and any(c < p.channels for c, p in zip(costly.counts, pruning.plans)), costly
    assert free.predicted_macs <= target                               # factorising alone: the knapsack's costs are exact
    assert costly.pruned_macs == costly.predicted_macs <= target * 1.01  # pruning alone: the prune allocation meets it exactly
    for choice in (free, costly):
        assert _macs_after(pruning, choice.counts, choice.ranks) == (choice.pruned_macs, choice.predicted_macs)

    # mixed: the first conv costs nothing to factorise, the others a lot
    mixed_curves = _flat_curves(candidates, 1e3)
    mixed_curves.curves[0].error = [1e-9 for _ in mixed_curves.curves[0].error]
    mixed = per_layer_choice(pruning, candidates, mixed_curves, 4, 2.0)
    assert set(mixed.ranks) == {candidates[0].name}, mixed
    monkeypatch.setattr(auto_pipeline._Analyses, "lowrank", lambda self, progress: (plan(model, options, calib.sample_shapes()), mixed_curves))
    auto_options = CompressOptions(speedup=2, method="auto", rows_per_layer=2000, allocation="sensitivity", sensitivity_metric="error")
    result, facts = auto_pipeline._per_layer_candidate(auto_pipeline._Analyses(model, calib, holdout, auto_options), auto_options, None)
    _check_model(model, result, 2)
    assert facts["layers_factorised"] == 1 and facts["groups_pruned"] >= 1, facts
    convs = [n for n in result.model.graph.node if n.op_type == "Conv"]
    assert len(convs) == sum(n.op_type == "Conv" for n in model.graph.node) + 1      # one layer became two


def test_cross_fitting_splits_hold_out_every_sample_once():
    """--sensitivity-folds K: the other K-1 splits hold out disjoint folds of the held-out set's
    size, never calibrate on what they hold out, and calibrate on as many samples as the first."""
    from onnxopt.sensitivity import cross_fitting_splits

    calib, holdout = _data(80), _data(16, seed=2)

    def ids(source):
        return [source.arrays["x"][i].tobytes() for i in range(len(source))]

    held_out = [ids(holdout)]
    for calib_part, holdout_part in cross_fitting_splits(calib, holdout, 6, seed=0):
        assert len(holdout_part) == 16 and len(calib_part) == 80
        assert not set(ids(calib_part)) & set(ids(holdout_part))
        held_out.append(ids(holdout_part))
    assert len(held_out) == 6
    assert len(set().union(*held_out)) == 96 == len(set(ids(calib)) | set(ids(holdout)))   # each sample held out once


def test_sensitivity_folds_average_the_damages_of_each_split():
    """The damages of --sensitivity-folds 3 are the mean of the given split's and the other two
    splits' damages, each analysed alone; too many folds or no held-out samples are refused."""
    from onnxopt.sensitivity import cross_fitting_splits

    model, calib, holdout = small_cnn(), _data(48), _data(16, seed=2)
    options = CompressOptions(speedup=2, method="prune", allocation="sensitivity", rows_per_layer=1000, sensitivity_metric="error")
    splits = [(calib, holdout), *cross_fitting_splits(calib, holdout, 3, options.seed)]
    alone = [analyze_prune(model, c, h, options).plans for c, h in splits]
    folded = analyze_prune(model, calib, holdout, dataclasses.replace(options, sensitivity_folds=3)).plans
    for i, plan in enumerate(folded):
        per_split = np.array([plans[i].damages for plans in alone])
        assert np.ptp(per_split, axis=0).max() > 0                    # the splits do differ
        np.testing.assert_allclose(plan.damages, per_split.mean(0), rtol=1e-9)
    with pytest.raises(UserError, match="needs 80 samples"):
        analyze_prune(model, calib, holdout, dataclasses.replace(options, sensitivity_folds=5))
    with pytest.raises(UserError, match="held-out folds"):
        analyze_prune(model, calib, None, dataclasses.replace(options, sensitivity_folds=2))
    with pytest.raises(UserError, match="held-out folds"):
        analyze_prune(model, calib, holdout, dataclasses.replace(options, allocation="energy", sensitivity_folds=2))


def test_sensitivity_damage_is_the_measured_output_change_of_the_group_alone():
    """--allocation sensitivity: at grid counts, the damage is the group alone's output change on
    held-out data: the mean KL divergence for a classifier (the default), or ||f_k - f||^2/||f||^2."""
    from onnxopt.passes.channel_groups import apply_keep, find_groups, group_of
    from onnxopt.prune_pipeline import GroupPlan, OutputSensitivity
    from onnxopt.verify import compare_outputs

    model = small_cnn()
    prepared = graphs.prepare(model)[0]
    holdout = _data(24, seed=3)
    graph = graphs.import_graph(prepared)
    apply_keep(graph, group_of(find_groups(graph), "block.conv1"), np.arange(8), None)
    alone = compare_outputs(model, graphs.export(graph, prepared), holdout, 1)
    plan = GroupPlan("block.conv1", 16, ["block.conv2"], 1.0, counts=[4, 8, 12, 16])
    solutions = [(np.arange(k), None) for k in plan.counts]          # keep the first k channels, sliced
    for metric, expected in (("auto", alone.kl), ("error", alone.relative_l2 ** 2)):
        sensitivity = OutputSensitivity(prepared, list(holdout.batches(8)), 1, metric=metric)
        assert sensitivity.metric == ("kl" if metric == "auto" else metric)
        damages = sensitivity.damages(plan, solutions)
        assert damages[-1] == 0.0 and all(a >= b for a, b in zip(damages, damages[1:])) and damages[0] > 0
        assert damages[1] == pytest.approx(expected, rel=1e-6)
    with pytest.raises(UserError, match="cannot measure 'top1_drop'"):
        OutputSensitivity(prepared, list(holdout.batches(8)), 1, metric="top1_drop")
    result = compress_prune(model, _data(80), holdout, CompressOptions(speedup=1.3, method="prune", rows_per_layer=2000,
                                                                       allocation="sensitivity"))
    _check_model(model, result, 1.3)


def test_prune_selects_input_channels_of_convs_reading_the_residual_stream():
    """At 3x the stream's consumers (block.conv1, down) are sampled through Gather; prune only."""
    model = small_cnn()
    result = compress_prune(model, _data(80), _data(16, seed=2), CompressOptions(speedup=3, method="prune", rows_per_layer=2000))
    _check_model(model, result, 3)
    sampled = [layer.name for layer in result.layers if layer.solver and "Gather sampler" in layer.solver]
    gathers = [n for n in result.model.graph.node if n.op_type == "Gather"]
    assert sampled and len(gathers) == len(sampled) and set(sampled) <= {"block.conv1", "down"}
    assert result.verification.relative_l2 < 0.3
    data_free = compress_prune(model, None, None, CompressOptions(speedup=1.5, method="filter-l1"))
    assert not any(n.op_type == "Gather" for n in data_free.model.graph.node)


def test_allocation_meets_every_reachable_target_exactly():
    """The knapsack prices channels linearly, exact MACs are bilinear (VGG-16: every conv loses
    inputs and outputs). Its budget correction alone once stopped a few thousand MACs over the
    target and refused ``--speedup 4`` as out of reach; every reachable target must be met,
    without stepping far past it (which costs accuracy for nothing)."""
    model = onnx.load(Path(__file__).resolve().parents[1] / "models" / "vgg16_cifar10.onnx")
    prepared, _ = graphs.prepare(model, {"input": (3, 32, 32)})
    graph = graphs.import_graph(prepared)
    layer_list = find_layers(graph)
    plans, _ = plan_groups(graph, {layer.name: layer for layer in layer_list}, [], 4, data=True)
    rng = np.random.default_rng(0)
    for plan in plans:     # damage falls to 0 at the full count, at a random rate per group
        rate = rng.uniform(1, 8)
        plan.damages = list(np.exp(-rate * np.asarray(plan.counts) / plan.channels) - np.exp(-rate))
    macs = model_macs(layer_list)
    floor = _exact_macs(graph, layer_list, plans, [p.counts[0] for p in plans])
    for speedup in np.linspace(1.2, 0.97 * macs / floor, 40):
        counts = allocate_counts(graph, layer_list, plans, macs / speedup)
        assert counts is not None, f"--speedup {speedup:.3f} refused"
        # met, and not overshot: the repair's last step closes the gap at the least damage
        assert 0.975 <= _exact_macs(graph, layer_list, plans, counts) / (macs / speedup) <= 1


def test_head_no_group_reaches_is_refit_toward_the_original_outputs():
    """With the last conv's group excluded, the classifier is no consumer; it is refit at the end
    (its response error on the sampled rows can only fall), and only when there is data."""
    model = small_cnn()
    options = CompressOptions(speedup=1.2, method="prune", rows_per_layer=2000, exclude=["down"])
    result = compress_prune(model, _data(200), _data(16, seed=2), options)
    _check_model(model, result, 1.2)
    fc = next(row for row in result.layers if row.name == "fc")
    assert "head" in fc.solver, fc
    assert 0 < fc.error_after <= fc.error_before, fc
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    fc_node = next(n for n in result.model.graph.node if n.name == "fc")
    assert not np.allclose(weights[fc_node.input[1]], original["fc.w"])
    data_free = compress_prune(model, None, None, CompressOptions(speedup=1.2, method="filter-l1", exclude=["down"]))
    few_rows = compress_prune(model, _data(40), None, options)          # 40 rows, under 4 per each of 32 columns: not refit
    for other in (data_free, few_rows):
        assert not next(row for row in other.layers if row.name == "fc").solver


def test_producer_reading_a_drifted_stream_is_refit_before_its_group_is_pruned():
    """``down`` reads the residual stream, which moves once the block's group is pruned; no
    group refits it as a consumer, so ``prune`` refits it toward its original outputs before
    its own group is pruned: its response error can only fall, and its weights change. The
    ``filter-*`` methods leave producers alone."""
    model = small_cnn()
    result = compress_prune(model, _data(200), _data(16, seed=2), CompressOptions(speedup=1.3, method="prune", rows_per_layer=2000))
    _check_model(model, result, 1.3)
    rows = {row.name: row for row in result.layers}
    assert rows["block.conv1"].rank < rows["block.conv1"].full_rank and rows["down"].rank is not None, rows
    down = rows["down"]
    assert "refit toward its original outputs first" in down.solver, down
    assert 0 < down.error_after <= down.error_before, down
    weights = {i.name: onnx.numpy_helper.to_array(i) for i in result.model.graph.initializer}
    original = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    down_node = next(n for n in result.model.graph.node if n.name == "down")
    kept = weights[down_node.input[1]]
    assert not any(np.allclose(kept[0], filt) for filt in original["down.w"])
    ranked = compress_prune(model, _data(200), _data(16, seed=2), CompressOptions(speedup=1.3, method="filter-l1", rows_per_layer=2000))
    assert not any("original outputs first" in (row.solver or "") for row in ranked.layers)   # prune only
