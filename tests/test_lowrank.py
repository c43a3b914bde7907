"""Zhang et al. low-rank factorisation: solvers against references, rewrite exact at full rank."""

import numpy as np
import pytest
import scipy.optimize

from conftest import run, small_cnn
from onnxopt.graph import export, import_graph, prepare
from onnxopt.layers import find_layers
from onnxopt.passes import lowrank


def _objective(yhat, target, project, expand, bias):
    return float(np.square(target - (yhat @ project @ expand.T + bias)).sum())


def test_reduced_rank_regression_matches_brute_force():
    rng = np.random.default_rng(0)
    n, d, rank = 60, 4, 2
    yhat = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    target = yhat @ rng.standard_normal((d, d)) + 0.3 * rng.standard_normal((n, d)) + 1.0
    fact = lowrank.solve_linear(yhat, target, rank)
    closed = _objective(yhat, target, fact.project, fact.expand, fact.bias)

    def loss(theta):
        project = theta[: d * rank].reshape(d, rank)
        expand = theta[d * rank: 2 * d * rank].reshape(d, rank)
        bias = theta[2 * d * rank:]
        return _objective(yhat, target, project, expand, bias)

    found = min(scipy.optimize.minimize(loss, rng.standard_normal(2 * d * rank + d), method="BFGS").fun for _ in range(8))
    assert closed <= found + 1e-6
    assert closed == pytest.approx(found, rel=1e-4)


def test_linear_solver_is_pca_without_asymmetry():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((400, 6)) @ rng.standard_normal((6, 6))
    fact = lowrank.solve_linear(y, y, 3)
    centred = y - y.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    pca = centred @ vt[:3].T @ vt[:3] + y.mean(0)
    np.testing.assert_allclose(fact.apply(y), pca, atol=1e-4)  # up to the 1e-6 ridge


def test_relu_solver_beats_linear_on_relu_objective():
    rng = np.random.default_rng(2)
    n, d, rank = 3000, 16, 6
    yhat = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    target = yhat + 0.5 * rng.standard_normal((n, d)) - 1.0
    linear = lowrank.solve_linear(yhat, target, rank)
    relu = lowrank.solve_relu(yhat, target, rank)
    assert relu.solver == "relu"
    assert lowrank.relu_objective(relu, yhat, target) < 0.95 * lowrank.relu_objective(linear, yhat, target)


def test_relu_solver_with_residual_offset():
    rng = np.random.default_rng(3)
    n, d, rank = 2000, 8, 4
    yhat = rng.standard_normal((n, d))
    shortcut = rng.standard_normal((n, d))
    target = yhat @ rng.standard_normal((d, d)) * 0.3 + shortcut
    fact = lowrank.solve_relu(yhat, target, rank, offset=shortcut)
    without = lowrank.solve_relu(yhat, target, rank)
    assert lowrank.relu_objective(fact, yhat, target, shortcut) < lowrank.relu_objective(without, yhat, target, shortcut)


def test_rewrite_at_full_rank_is_exact_through_onnxruntime():
    model, _ = prepare(small_cnn())
    graph = import_graph(model)
    rng = np.random.default_rng(0)
    for layer in find_layers(graph):
        rows = rng.standard_normal((4000, layer.out_channels))           # well conditioned: ridge negligible
        fact = lowrank.solve_linear(rows, rows, layer.out_channels)   # identity map at full rank
        lowrank.rewrite(graph, layer, fact)
    factored = export(graph, model)
    ops = [n.op_type for n in factored.graph.node]
    assert ops.count("Conv") == 8 and ops.count("Gemm") == 2
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(run(factored, {"x": x})[0], run(model, {"x": x})[0], rtol=1e-4, atol=1e-4)


def test_costs_and_applicability():
    model, _ = prepare(small_cnn())
    layers = {layer.name: layer for layer in find_layers(import_graph(model))}
    conv = layers["block.conv1"]                       # 16 -> 16, 3x3, 12x12 output
    assert conv.macs == 144 * 16 * 16 * 9
    assert lowrank.decomposed_macs(conv, 5) == 144 * (5 * 16 * 9 + 16 * 5)
    top = lowrank.max_saving_rank(conv)
    assert lowrank.decomposed_macs(conv, top) < conv.macs <= lowrank.decomposed_macs(conv, top + 1)
    assert lowrank.applicability(conv) is None
    assert conv.shortcut is None and conv.activation == "relu"
    assert layers["block.conv2"].shortcut is not None and layers["block.conv2"].activation == "relu"


def test_latency_cost_offers_only_ranks_measured_faster():
    from onnxopt.latency import LayerTimer
    from onnxopt.pipeline import _rank_options

    model, _ = prepare(small_cnn(size=24))
    layer = next(l for l in find_layers(import_graph(model)) if l.name == "block.conv1")
    timer = LayerTimer(batch=2, runs=5)
    options = _rank_options(layer, np.linspace(1, 0, layer.out_channels), 4, timer)
    assert options[0].value is None and options[0].cost == timer.seconds(layer)
    assert all(o.cost < options[0].cost for o in options[1:])
    assert timer.seconds(layer, 4) == timer.seconds(layer, 4)          # memoised per shape signature


def test_rank_grid_below_the_multiple():
    """Ranks: multiples of the grid's multiple and, below it, of ``below``; the largest saving
    rank only where the grid has none."""
    from onnxopt.pipeline import rank_grid

    layers = {l.name: l for l in find_layers(import_graph(prepare(small_cnn())[0]))}
    layer = layers["block.conv1"]
    top = lowrank.max_saving_rank(layer)                   # 16 -> 16, 3x3: 14
    assert top == 14
    assert rank_grid(layer, 4) == [4, 8, 12]
    assert rank_grid(layer, 16) == [14]                    # no multiple of 16 saves MACs
    assert rank_grid(layer, 16, below=4) == [4, 8, 12]
    assert rank_grid(layer, 8, below=4) == [4, 8]
    assert rank_grid(layer, 4, below=4) == [4, 8, 12]
    wide = layers["down"]
    assert rank_grid(wide, 16, below=4) == [4, 8, 12, 16] and lowrank.max_saving_rank(wide) < 32


def test_sensitivity_damage_is_measured_monotone_and_zero_for_keep():
    from onnxopt.calib.capture import CutRunner
    from onnxopt.calib.readers import DataSource, InputSpec
    from onnxopt.pipeline import ResponseSampler, _rank_options, rank_grid
    from onnxopt.sensitivity import analyze, measured_options

    model, _ = prepare(small_cnn())
    layers = [l for l in find_layers(import_graph(model)) if lowrank.applicability(l) is None and l.op == "Conv"]
    x = np.random.default_rng(0).standard_normal((32, 3, 12, 12)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 10, 32)
    data = DataSource([InputSpec("x", ["N", 3, 12, 12])], arrays={"x": x})
    sampler = ResponseSampler(data, layers, 2048, 0)
    batches = list(data.batches(16))
    targets = sampler.collect(model, layers, CutRunner(batches))
    analysis = analyze(model, layers, {l.name: rank_grid(l, 4) for l in layers}, targets, batches, labels)
    assert analysis.metrics == ["error", "kl", "top1_drop"] and analysis.base_top1 is not None
    options = [_rank_options(l, np.ones(l.out_channels), 4) for l in layers]
    for metric in analysis.metrics:
        measured = measured_options(options, layers, analysis, metric)
        for layer_options in measured:
            assert layer_options[0].value is None and layer_options[0].damage == 0.0
            ranked = sorted((o.value, o.damage) for o in layer_options[1:])
            damages = [d for _, d in ranked]
            assert all(d >= 0 for d in damages)
            assert all(a >= b - 1e-12 for a, b in zip(damages, damages[1:]))     # less rank, more damage
            if len(damages) > 1 and metric != "top1_drop":
                assert damages[0] > damages[-1]                                    # measured, not constant


def test_proportional_choice_scales_every_layer_by_one_fraction_of_its_reference():
    from onnxopt.passes.allocation import Option
    from onnxopt.pipeline import _proportional_choice

    def options(full):                       # cost = rank (keep = full rank)
        return [Option(full, 0.0, None)] + [Option(r, 0.0, r) for r in range(4, full, 4)]

    layer_options = [options(64), options(64)]
    choice = _proportional_choice([16.0, 64.0], layer_options, budget=40)
    ranks = [layer_options[i][k].value for i, k in enumerate(choice)]
    assert sum(ranks) <= 40 and ranks[0] < ranks[1]
    assert ranks[1] / 64 == pytest.approx(ranks[0] / 16, abs=0.3)
    assert _proportional_choice([16.0, 64.0], layer_options, budget=4) is None   # below the smallest ranks


def test_proportional_choice_fills_the_budget_its_rank_steps_leave():
    """Ten equal layers at one fraction would all sit at rank 8 (cost 80 of 92): three step up to 12."""
    from onnxopt.passes.allocation import Option
    from onnxopt.pipeline import _proportional_choice

    layer_options = [[Option(16, 0.0, None)] + [Option(r, 0.0, r) for r in (4, 8, 12)] for _ in range(10)]
    choice = _proportional_choice([16.0] * 10, layer_options, budget=92)
    ranks = sorted(layer_options[i][k].value for i, k in enumerate(choice))
    assert ranks == [8] * 7 + [12] * 3


def test_vbmf_allocation_meets_the_budget(tmp_path):
    from onnxopt.calib.readers import DataSource, InputSpec
    from onnxopt.pipeline import CompressOptions, compress

    x = np.random.default_rng(0).standard_normal((48, 3, 12, 12)).astype(np.float32)
    data = DataSource([InputSpec("x", ["N", 3, 12, 12])], arrays={"x": x})
    result = compress(small_cnn(), data, data.subset(range(8)), CompressOptions(speedup=1.3, allocation="vbmf", rows_per_layer=1024))
    assert result.macs_before / result.macs_after >= 1.3
    from onnxopt.errors import UserError
    with pytest.raises(UserError, match="--vbmf-weaken"):
        compress(small_cnn(), data, None, CompressOptions(speedup=1.3, allocation="vbmf", vbmf_weaken=1.5))


def _conv_head(tail: list[str], spatial_output: bool = False):
    """x [N, 4, 5, 5] -> 1x1 Conv to 6 channels -> ``tail`` ops (GAP and Flatten unless
    ``spatial_output``) -> y; ``tail`` may hold Relu, BiasAdd (a constant Add), Softmax, Softplus."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "bias")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], name="head")]
    ops = list(tail) if spatial_output else [*tail[:1], "GlobalAveragePool", "Flatten", *tail[1:]]
    for i, op in enumerate(ops):
        inputs = [f"t{i}", "bias"] if op == "BiasAdd" else [f"t{i}"]
        nodes.append(helper.make_node("Add" if op == "BiasAdd" else op, inputs, [f"t{i + 1}"], name=f"op{i}"))
    nodes[-1].output[0] = "y"
    shape = ["N", 6, 5, 5] if spatial_output else ["N", 6]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("tail, spatial_output, found", [
    (["Relu"], False, True),                        # SqueezeNet: conv -> relu -> pool -> flatten
    (["Relu", "BiasAdd", "Softmax"], False, True),  # a constant bias and a softmax after the flatten
    (["Relu", "Softplus"], False, False),           # an op not known to keep one value per class
    (["Relu"], True, False),                        # (N, C, H, W): not a classifier's scores
])
def test_class_score_layers(tail, spatial_output, found):
    from onnxopt.layers import class_score_layers

    graph = import_graph(prepare(_conv_head(tail, spatial_output))[0])
    assert class_score_layers(graph, find_layers(graph)) == ({"head"} if found else set())
    small = import_graph(prepare(small_cnn())[0])
    assert class_score_layers(small, find_layers(small)) == {"fc"}        # GAP -> Flatten -> Gemm


def test_the_classifier_is_factorised_only_when_asked_or_data_free():
    from onnxopt.pipeline import CompressOptions, plan

    model = small_cnn()
    kept = plan(model, CompressOptions(speedup=2.0))
    assert "fc" not in [layer.name for layer in kept.candidates]
    assert "class scores" in kept.reasons["fc"] and "--factorize-classifier" in kept.reasons["fc"]
    for options in (CompressOptions(speedup=2.0, factorize_classifier=True), CompressOptions(speedup=2.0, solver="svd")):
        chosen = plan(model, options)
        assert "fc" in [layer.name for layer in chosen.candidates] and "fc" not in chosen.reasons
    assert plan(model, CompressOptions(speedup=2.0, exclude=["fc"])).reasons["fc"] == "excluded by --exclude"
