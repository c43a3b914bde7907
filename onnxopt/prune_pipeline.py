"""`onnxopt compress --method prune|filter-std|filter-l1`: channel pruning without fine-tuning.

1. Prepare the graph (``graph.prepare``: BN folded) and find its channel groups
   (``passes.channel_groups``). A group is a candidate when it is prunable, has ONE producer
   (residual groups, where every block output would be pruned alike, are left alone) and is
   not excluded. With ``--method prune``, a plain Conv that reads all the channels of a group
   left alone (the first conv of a residual branch, which shares its input with the shortcut)
   is a *sampler* candidate: its input channels are selected and a ``Gather(axis=1)`` is
   inserted before it, the stream itself unchanged (He et al. 2017 "Multi-branch").
2. Run the ORIGINAL model once over the calibration set. For every consumer of a candidate
   group, at a few sampled output positions per image, keep its response rows (the targets)
   and the rows of its residual shortcut; accumulate float64 statistics of its input patches
   against its responses (``Sxx``, ``Sxy``) for the allocation.
3. Allocate keep counts under the MAC budget with the exact multiple-choice knapsack
   (``passes.allocation.allocate``). Options per group: keep ``k`` channels, ``k`` a multiple
   of ``round_to`` (or all; with ``round_below``, also fewer than ``round_to`` in multiples of
   it). Cost: the MACs the group's producer, depthwise members and
   consumers keep, linear in ``k`` (a layer that is the consumer of one group and the producer
   of another is bilinear; the budget is lowered until the exact MAC count meets the target).
   Damage [design]: the squared reconstruction error of the consumers' responses after
   selection + least-squares refit on the ORIGINAL model's statistics (``prune``, and the
   ``filter-*`` methods with data), relative to the energy of the consumers' outputs; for a
   consumer feeding a residual Add, of the block output ``branch + shortcut`` (a branch that
   adds little to its block may lose more: on ResNet-20 at 1.5x this gave 77.7% top-1 instead
   of 76.2% with the branch's own energy). Without data (``filter-*``): the fraction of the
   ranking-score mass removed. With ``--allocation sensitivity`` (and data): each group pruned
   alone, its damage measured at the model's output on held-out samples (``OutputSensitivity``);
   with ``--sensitivity-folds K``, averaged over K cross-fitted folds (``cross_fitting_splits``).
4. Walk the groups in topological order of their producers. For each, run the CURRENT
   (partly pruned) model from a stored graph cut just before the producer
   (``calib.capture.CutRunner``) to get the consumers' input patches ``X``; the targets
   ``Y`` come from the original model (asymmetric, He et al. 2017). A consumer that feeds a
   residual ``Add`` is reconstructed toward ``Y_branch_orig + (Y_short_orig - Y_short_cur)``.
   First (``prune`` only), a producer no earlier group refit as a consumer (MobileNetV2's
   expansion convs, which read the residual stream) is itself refit toward its original
   outputs on the current inputs (``_refit_toward_original``): its drift would otherwise pass
   through the nonlinearity after it. Measured (README): MobileNetV2 1.3x, the KL
   divergence from the original on the evaluation photos 0.282 -> 0.271 and 0.356 -> 0.339
   on two calibration splits; ResNet-56 2x top-1 drop 1.95 -> 1.79; SqueezeNet 1.5x KL
   0.813 -> 0.841. After the ``filter-*`` rankings it hurt (MobileNetV2 ``filter-std`` KL
   1.81 -> 2.65), so they do without.
   Select the kept channels (``prune``: He et al.'s LASSO path, or with ``--selection
   greedy`` backward elimination on the refit's residual, ``prune.elimination_order``; the
   lowest std / L1 filters removed, ``filter-std`` / ``filter-l1``), refit each consumer by least squares on the kept
   input columns, shrunk toward its original weights by an amount cross-validated over
   ``FOLDS`` folds of the calibration images (``prune.cross_validated_shrinkage``; the
   allocation's refits in step 3 are plain least squares), and rewrite the graph
   (``channel_groups.apply_keep``). A consumer with
   fewer than ``MIN_ROWS_PER_COLUMN`` sampled rows per kept column (a classifier after
   global pooling gives one row per image) is not refit: its sliced weights stay. Last, the
   model's head (its last layer), when no group's consumers include it (a classifier reading
   the pooled residual stream), is refit the same way toward the original outputs: pruning
   upstream moved its inputs too.
5. Verify (``onnxopt.verify``) and return a ``CompressionResult``.

Without calibration data (``calib`` None or empty) the ``filter-*`` methods remove the
filters and slice the consumers, nothing else (Li et al.'s data-free pruning).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from threadpoolctl import threadpool_limits

from onnxopt import graph as graphs
from onnxopt.calib.capture import CutRunner, cut_before
from onnxopt.calib.readers import DataSource, measurement_samples
from onnxopt.calib.stats import SufficientStats, extract_patches, merged, responses_at, sample_positions
from onnxopt.errors import UserError
from onnxopt.layers import Layer, find_layers, gemm_weight_and_bias, model_macs
from onnxopt.passes import allocation, prune
from onnxopt.passes.channel_groups import (ChannelGroup, Member, apply_keep, find_groups, group_of, insert_sampler,
                                           sampler_group, set_weights)
from onnxopt.pipeline import (SHORTCUT, CompressionResult, CompressOptions, LayerResult, Progress, batch_size_for,
                              check_selection, counts_below, layer_seed, shape_text)
from onnxopt.sensitivity import OutputReference, check_folds, cross_fitting_splits, fold_progress, grid_ranks
from onnxopt.verify import Verification, verify

METHODS = ("prune", "filter-std", "filter-l1")
MAX_STATS_DIM = 4608          # consumer input columns (c*kh*kw) above which statistics are not kept
MAX_OPTIONS = 32              # keep-count options per group
MIN_ROWS_PER_COLUMN = 4       # least-squares refit only with at least this many rows per input column
FOLDS = 4                     # cross-validation folds (by image) for the refit's shrinkage toward the original weights


@dataclass
class GroupPlan:
    """A candidate group, its allocation options and the chosen keep count."""

    name: str                          # producer name (groups are re-found by it after each rewrite)
    channels: int
    consumers: list[str]
    macs_per_channel: float
    counts: list[int] = field(default_factory=list)
    damages: list[float] = field(default_factory=list)
    scores: np.ndarray | None = None   # filter-* ranking scores
    keep: int | None = None
    sampler: bool = False              # input channels of ONE Conv (``name``) through a Gather sampler


def _group(plan: GroupPlan, graph: gs.Graph, groups: list[ChannelGroup] | None = None) -> ChannelGroup:
    """The plan's group in ``graph`` (re-found by name: the graph is rewritten between uses)."""
    if plan.sampler:
        return sampler_group(graph, plan.name)
    return group_of(groups if groups is not None else find_groups(graph), plan.name)


def _cut_node(group: ChannelGroup) -> gs.Node:
    """The node the current model is cut before to sample the group's consumers."""
    return (group.producers or group.consumers)[0].node


def _apply(plan: GroupPlan, graph: gs.Graph, group: ChannelGroup, keep: np.ndarray, weights: dict | None) -> None:
    (insert_sampler if plan.sampler else apply_keep)(graph, group, keep, weights)


# ---------------------------------------------------------------------------- helpers


def _node_name(node: gs.Node) -> str:
    return node.name or node.outputs[0].name


def _consumer_weight(node: gs.Node) -> np.ndarray:
    """Consumer weights as (n, in_columns): Conv channel-major blocks, Gemm (N, K)."""
    if node.op == "Conv":
        weight = node.inputs[1].values
        return np.asarray(weight, np.float64).reshape(weight.shape[0], -1)
    return gemm_weight_and_bias(node)[0].T.astype(np.float64)


def _consumer_bias(node: gs.Node) -> np.ndarray:
    if node.op == "Conv":
        if len(node.inputs) > 2 and node.inputs[2].name:
            return np.asarray(node.inputs[2].values, np.float64)
        return np.zeros(node.inputs[1].values.shape[0])
    return gemm_weight_and_bias(node)[1].astype(np.float64)


def _consumer_block(node: gs.Node, member: Member) -> int:
    if node.op == "Conv":
        kh, kw = node.inputs[1].values.shape[2:]
        return int(kh * kw)
    return member.block


def _onnx_weight(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """A refit (n, in_columns) weight in the consumer's initializer layout."""
    if node.op == "Conv":
        kh, kw = node.inputs[1].values.shape[2:]
        return weight.reshape(weight.shape[0], -1, kh, kw).astype(np.float32)
    node.attrs["alpha"] = 1.0
    node.attrs["beta"] = 1.0
    return (weight if node.attrs.get("transB", 0) else weight.T).astype(np.float32)


def _rows(node: gs.Node, x: np.ndarray, positions) -> np.ndarray:
    """Input rows of a consumer at ``positions``: patches (Conv) or flattened inputs (Gemm)."""
    if node.op == "Conv":
        kernel = node.inputs[1].values.shape[2:]
        pads = graphs.explicit_pads(node, x.shape, node.inputs[1].values.shape)   # auto_pad left by prepare (dynamic dims)
        return extract_patches(x, positions, kernel, tuple(node.attrs.get("strides", [1, 1])),
                               tuple(pads), tuple(node.attrs.get("dilations", [1, 1])))
    return x.reshape(x.shape[0], -1)


def _as_linear(stats: SufficientStats) -> prune.LinearStats:
    return prune.LinearStats(stats.sxx, stats.sxy, stats.syy, stats.mean_x, stats.mean_y, stats.n)


class ConsumerSampler:
    """Input patches of consumers against their targets, at the same positions on every run."""

    def __init__(self, per_image: int, seed: int, shortcuts: dict[str, str]):
        self.per_image = per_image
        self.seed = seed
        self.shortcuts = shortcuts      # consumer name -> shortcut tensor name (residual consumers)

    def positions(self, name: str, batch_index: int, out_shape):
        return sample_positions(out_shape[0], out_shape[2], out_shape[3], self.per_image,
                                (layer_seed(self.seed, name), batch_index))

    def collect(self, model: onnx.ModelProto, runner: CutRunner, consumers: list[gs.Node],
                targets: dict[str, list[np.ndarray]] | None, progress: Progress | None = None,
                label: str = "", record_only: set[str] = frozenset(), folds_of: int = FOLDS) -> tuple[dict[str, SufficientStats], dict[str, list[np.ndarray]],
                                          dict[str, list[SufficientStats]]]:
        """Statistics of each consumer's (input rows, target rows).

        ``targets`` None: this is the ORIGINAL model; its responses are the targets and are
        returned (with the shortcut rows under ``name + SHORTCUT``; consumers named in
        ``record_only`` get no statistics, only their targets). Otherwise the targets are
        the stored original rows, corrected by ``Y_short_orig - Y_short_cur`` for residual
        consumers, and the statistics of ``folds_of`` folds of the images are also returned, for
        the cross-validated shrinkage of the refit.
        """
        names = []
        for node in consumers:
            if targets is not None or _node_name(node) not in record_only:
                names.append(node.inputs[0].name)
            if targets is None:
                names.append(node.outputs[0].name)
            if _node_name(node) in self.shortcuts:
                names.append(self.shortcuts[_node_name(node)])
        names = list(dict.fromkeys(names))
        stats: dict[str, SufficientStats] = {}
        folds: dict[str, list[SufficientStats]] = {}
        recorded: dict[str, list[np.ndarray]] = {}
        done = 0
        total = len(runner)
        for batch_index, values in runner.run(model, names):
            for node in consumers:
                name = _node_name(node)
                x = values.get(node.inputs[0].name)
                if targets is None:
                    out = values[node.outputs[0].name]
                    out_shape = out.shape
                else:
                    out_shape = (x.shape[0], 0, *targets[name + "/hw"][0]) if node.op == "Conv" else None
                positions = self.positions(name, batch_index, out_shape) if node.op == "Conv" else None
                shortcut = self.shortcuts.get(name)
                if targets is None:
                    y = responses_at(out, positions) if node.op == "Conv" else out.reshape(out.shape[0], -1)
                    recorded.setdefault(name, []).append(y.astype(np.float32))
                    if node.op == "Conv":
                        recorded[name + "/hw"] = [out.shape[2:]]
                    if shortcut is not None:
                        recorded.setdefault(name + SHORTCUT, []).append(responses_at(values[shortcut], positions).astype(np.float32))
                    if name in record_only:
                        continue
                else:
                    y = targets[name][batch_index].astype(np.float64)
                    if shortcut is not None and name + SHORTCUT in targets:
                        y = y + targets[name + SHORTCUT][batch_index] - responses_at(values[shortcut], positions)
                rows = _rows(node, x, positions)
                if targets is None:
                    if name not in stats:
                        stats[name] = SufficientStats(rows.shape[1], y.shape[1])
                    stats[name].update(rows, y)
                    continue
                if name not in folds:
                    folds[name] = [SufficientStats(rows.shape[1], y.shape[1]) for _ in range(folds_of)]
                image = done + (positions.image if positions is not None else np.arange(len(rows)))
                for fold, part in enumerate(folds[name]):
                    chosen = image % folds_of == fold
                    part.update(rows[chosen], y[chosen])
            done += len(next(iter(values.values())))
            if progress:
                progress(label, done, total)
        for name, parts in folds.items():
            stats[name] = merged(parts)
        return stats, recorded, folds


# ---------------------------------------------------------------------------- selection


def _lasso_problem(group: ChannelGroup, stats: dict[str, prune.LinearStats]) -> tuple[np.ndarray, np.ndarray, int]:
    """Summed LASSO ``G``, ``q`` over the group's consumers (other Concat channels fixed)."""
    gram_total = np.zeros((group.channels, group.channels))
    q_total = np.zeros(group.channels)
    n = 0
    for member in group.consumers:
        node = member.node
        s = stats[_node_name(node)]
        weight = _consumer_weight(node)
        block = _consumer_block(node, member)
        in_channels = weight.shape[1] // block
        gram, q = prune.channel_gram(weight, s.sxx, s.sxy, in_channels)
        index = np.arange(group.channels) + member.offset
        gram_g, q_g = prune.fixed_channel_target(gram, q, index)
        gram_total += gram_g
        q_total += q_g
        n = max(n, s.n)
    return gram_total, q_total, n


def _kept_columns(group: ChannelGroup, member: Member, keep: np.ndarray) -> np.ndarray:
    node = member.node
    block = _consumer_block(node, member)
    columns = _consumer_weight(node).shape[1]
    removed = np.setdiff1d(np.arange(group.channels), keep) + member.offset
    return np.setdiff1d(np.arange(columns), prune.block_columns(removed, block))


def _shrunk_least_squares(stats: prune.LinearStats, folds: list[SufficientStats], columns: np.ndarray,
                          prior: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Least squares on ``columns`` shrunk toward ``prior`` by the amount cross-validated over
    the ``folds``' statistics: weight, bias and that amount."""
    shrinkage = prune.cross_validated_shrinkage(stats, [_as_linear(f) for f in folds], columns, prior)
    weight, bias = prune.least_squares(stats, columns, prior, shrinkage)
    return weight, bias, shrinkage


def _refit(group: ChannelGroup, keep: np.ndarray, stats: dict[str, prune.LinearStats],
           unfitted: set[str] | None = None, folds: dict[str, list[SufficientStats]] | None = None,
           shrinkages: dict[str, float] | None = None) -> tuple[dict, float, float, dict]:
    """Least-squares refit of every consumer on the kept columns; for a consumer with the
    statistics of ``folds`` of the images (``ConsumerSampler.collect``), shrunk toward its
    current weights (the original ones unless an earlier group's refit changed them) by the
    cross-validated amount (``prune.cross_validated_shrinkage``; recorded in ``shrinkages``).

    A consumer with fewer than ``MIN_ROWS_PER_COLUMN`` sampled rows per kept input column
    (e.g. a classifier conv after global pooling: one row per image) keeps its sliced
    original weights instead (named in ``unfitted``). Returns ONNX-layout weights by consumer
    name, the summed squared error and target energy, and per-consumer (error before, after).
    """
    unfitted = set() if unfitted is None else unfitted
    weights, errors = {}, {}
    err_sum, energy = 0.0, 0.0
    for member in group.consumers:
        node = member.node
        name = _node_name(node)
        s = stats[name]
        columns = _kept_columns(group, member, keep)
        full = _consumer_weight(node)
        if s.n >= MIN_ROWS_PER_COLUMN * len(columns):
            if folds and name in folds:
                weight, bias, shrinkage = _shrunk_least_squares(s, folds[name], columns, full[:, columns])
                if shrinkages is not None:
                    shrinkages[name] = shrinkage
            else:
                weight, bias = prune.least_squares(s, columns)
        else:       # too few rows: a refit would overfit; keep the sliced original weights
            weight, bias = full[:, columns], _consumer_bias(node)
            unfitted.add(name)
        weights[name] = (_onnx_weight(node, weight), bias.astype(np.float32))
        err_sum += prune.residual(s, weight, columns)
        energy += float(np.trace(s.syy))
        errors[name] = (prune.relative_error(s, full, np.arange(full.shape[1]), _consumer_bias(node)),
                        prune.relative_error(s, weight, columns, bias))
    return weights, err_sum, energy, errors


def _elimination_problems(group: ChannelGroup, stats: dict[str, prune.LinearStats]) -> list[tuple[prune.LinearStats, np.ndarray]] | None:
    """Per consumer, its statistics and the columns of each group channel (``prune.elimination_order``);
    None when a consumer has too few rows to be refit (its sliced weights stay: LASSO selects)."""
    problems = []
    for member in group.consumers:
        s = stats[_node_name(member.node)]
        block = _consumer_block(member.node, member)
        if s.n < MIN_ROWS_PER_COLUMN * len(s.sxx):
            return None
        columns = prune.block_columns(np.arange(group.channels) + member.offset, block).reshape(group.channels, block)
        problems.append((s, columns))
    return problems


def _selector(options: CompressOptions, group: ChannelGroup, plan: GroupPlan, stats: dict[str, prune.LinearStats] | None,
              keep_min: int) -> Callable[[int], np.ndarray]:
    """Kept channel indices by keep count: for ``prune``, backward elimination on the refit's
    residual (``--selection greedy``, when every consumer is refit) or He et al.'s LASSO path;
    for ``filter-*``, the ranking."""
    if options.method != "prune":
        return lambda count: prune.rank_select(plan.scores, count)
    problems = _elimination_problems(group, stats) if options.selection == "greedy" else None
    if problems is not None:
        order = prune.elimination_order(problems, keep_min)
        return lambda count: prune.select_from_order(order, group.channels, count)
    gram, q, n = _lasso_problem(group, stats)
    coefs = prune.lasso_path(gram, q, n)
    return lambda count: prune.select_from_path(coefs, count, gram)


# ---------------------------------------------------------------------------- measured damage


class OutputSensitivity:
    """``--allocation sensitivity``: a group's damage measured at the model's output.

    As ``onnxopt.sensitivity`` does for low-rank (Niu et al., ALGORITHMS.md §4): prune ONE
    group alone (selection + refit on the original model's statistics) at ``grid`` keep
    counts (``--sensitivity-grid``; 8 gave ResNet-56 at 2x 80.99% top-1, 4 gave 80.73%), run
    the part of the ORIGINAL model after the group's producer on held-out samples, and measure
    how far the outputs move (``OutputReference``): for a classifier the mean KL divergence of
    the class distributions, else ``sum ||f_g,k(x) - f(x)||^2 / sum ||f(x)||^2`` (``metric``
    "auto"; the same choice low-rank's sensitivity makes). The relative L2 of logits misjudges
    classifiers: on SqueezeNet 1.1 at 1.5x the allocation it chose moved the logits by only
    0.19 (relative L2) yet changed 47% of the top-1 classes. Counts between grid points are
    interpolated; the damage is made monotone (never larger when more channels are kept). It
    replaces the consumers' local reconstruction error, which misjudges how much a layer
    matters to the output (an early layer's error grows through the network; a branch's may
    be absorbed).
    """

    def __init__(self, prepared: onnx.ModelProto, batches: list[dict[str, np.ndarray]], threads: int, grid: int = 8,
                 metric: str = "auto"):
        self.grid = grid
        self.prepared = prepared
        self.runner = CutRunner(batches, threads)
        self.reference = OutputReference(self.runner, prepared, None)
        self.base = graphs.import_graph(prepared)
        if metric == "auto":
            metric = "kl" if self.reference.classifier else "error"
        if metric not in ("kl", "error") or (metric == "kl" and not self.reference.classifier):
            raise UserError(f"pruning's sensitivity cannot measure {metric!r} on this model; use error"
                            + (" or kl" if self.reference.classifier else ""))
        self.metric = metric

    def damages(self, plan: GroupPlan, solutions: list[tuple[np.ndarray, dict | None]]) -> list[float]:
        """Measured damage for every count of ``plan`` (``solutions[i]`` = kept set, refit weights)."""
        pruned = [i for i, count in enumerate(plan.counts) if count < plan.channels]
        if not pruned:
            return [0.0] * len(plan.counts)
        self.runner.advance(self.prepared, cut_before(self.base, _cut_node(_group(plan, self.base))))
        picks = grid_ranks(pruned, self.grid)
        measured = []
        for i in picks:
            graph = graphs.import_graph(self.prepared)
            keep, weights = solutions[i]
            _apply(plan, graph, _group(plan, graph), keep, weights)
            measured.append(self.reference.damages(self.runner, graphs.export(graph, self.prepared))[self.metric])
        measured = np.maximum.accumulate(np.asarray(measured)[::-1])[::-1]      # monotone in the count
        counts = [plan.counts[i] for i in picks] + [plan.channels]
        return [float(d) for d in np.interp(plan.counts, counts, [*measured, 0.0])]


def _cross_fitted_damages(model: onnx.ModelProto, calib: DataSource, holdout: DataSource, options: CompressOptions,
                          plans: list[GroupPlan], progress: Progress | None) -> None:
    """``plans``' damages (measured on ``holdout``) averaged with those of the other splits of
    ``cross_fitting_splits``, each analysed afresh (statistics, selection, refit, damage)."""
    totals = [np.asarray(plan.damages, dtype=np.float64) for plan in plans]
    splits = cross_fitting_splits(calib, holdout, options.sensitivity_folds, options.seed)
    for number, (calib_part, holdout_part) in enumerate(splits, 2):
        fold = analyze_prune(model, calib_part, holdout_part, dataclasses.replace(options, sensitivity_folds=1),
                             fold_progress(progress, number, options.sensitivity_folds))
        assert [p.name for p in fold.plans] == [p.name for p in plans]       # the groups depend on shapes, not data
        for total, plan in zip(totals, fold.plans):
            total += plan.damages
    for total, plan in zip(totals, plans):
        plan.damages = (total / options.sensitivity_folds).tolist()


def _refittable(node: gs.Node, exclude: list[str]) -> bool:
    """Whether a layer can be refit whole toward its original outputs
    (``_refit_toward_original``): not grouped, statistics small enough, not excluded."""
    return not ((node.op == "Conv" and node.attrs.get("group", 1) != 1)
                or _consumer_weight(node).shape[1] > MAX_STATS_DIM
                or any(fnmatch.fnmatchcase(_node_name(node), pattern) for pattern in exclude))


def _head(layers: list[Layer], consumers: dict[str, gs.Node], plans: list[GroupPlan], exclude: list[str]) -> Layer | None:
    """The model's last layer when no group's refit covers it (e.g. a classifier reading the
    pooled residual stream), else None."""
    if not layers:
        return None
    head = layers[-1]
    if (head.unsupported or head.name in consumers or any(p.name == head.name for p in plans)
            or not _refittable(head.node, exclude)):
        return None
    return head


def _refit_head(graph: gs.Graph, prepared: onnx.ModelProto, analysis: PruneAnalysis, runner: CutRunner,
                progress: Progress | None) -> tuple[float, float] | None:
    """Refit of the head toward the original model's outputs (``_refit_toward_original``;
    pruning upstream moves its inputs even where no group reaches it). Returns the relative
    error of its response before and after, or None when it has too few rows per column to be
    refit (it is left as it is)."""
    node = next(n for n in graph.nodes if _node_name(n) == analysis.head)
    refit = _refit_toward_original(graph, prepared, analysis, runner, node, progress, "head")
    return refit[:2] if refit is not None else None


def _refittable_producers(graph: gs.Graph, plans: list[GroupPlan], groups: list[ChannelGroup],
                          exclude: list[str]) -> dict[str, gs.Node]:
    """Producers of the candidate groups, plain Conv/Gemm layers, each refit toward its
    original outputs before its group is pruned unless an earlier group refit it as a consumer
    (``_refit_toward_original``; e.g. MobileNetV2's expansion convs, which read the residual
    stream). ``--method prune`` only (module docstring)."""
    return {_node_name(member.node): member.node for plan in plans if not plan.sampler
            for member in _group(plan, graph, groups).producers if _refittable(member.node, exclude)}


def _refit_toward_original(graph: gs.Graph, prepared: onnx.ModelProto, analysis: PruneAnalysis, runner: CutRunner,
                           node: gs.Node, progress: Progress | None, label: str) -> tuple[float, float, float] | None:
    """Least-squares refit of one layer, all its channels kept, on the CURRENT model's inputs
    toward the ORIGINAL model's outputs (asymmetric, as every consumer; Zhang et al. 2015):
    the head at the end, a group's producer before the group is pruned. Shrunk toward its
    weights by the cross-validated amount. Returns (error before, after, shrinkage), or None
    with too few rows per column (the layer is left as it is)."""
    name = _node_name(node)
    current = graphs.export(graph, prepared)
    runner.advance(current, cut_before(graph, node))
    raw, _, folds = analysis.sampler.collect(current, runner, [node], analysis.targets, progress, label)
    stats = _as_linear(raw[name])
    columns = np.arange(stats.sxx.shape[0])
    if stats.n < MIN_ROWS_PER_COLUMN * len(columns):
        return None
    original = _consumer_weight(node)
    before = prune.relative_error(stats, original, columns, _consumer_bias(node))
    with threadpool_limits(limits=1, user_api="blas"):
        weight, bias, shrinkage = _shrunk_least_squares(stats, folds[name], columns, original)
    set_weights(node, _onnx_weight(node, weight), bias.astype(np.float32))
    return before, prune.relative_error(stats, weight, columns, bias), shrinkage


# ---------------------------------------------------------------------------- planning


def _keep_counts(channels: int, round_to: int, below: int = 0) -> list[int]:
    """What a group of ``channels`` may keep: multiples of ``round_to`` (at most ``MAX_OPTIONS``
    of them, evenly spaced), all of them, and with ``below``, counts under ``round_to`` in
    multiples of ``below`` (``--target x86``: onnxruntime's blocked convs read fewer channels
    than a block from plain NCHW, ``tvm_backend.channel_grid``)."""
    round_to = max(1, int(round_to))
    step = round_to * max(1, math.ceil((channels // round_to) / MAX_OPTIONS))
    counts = list(range(step, channels, step)) if channels > step else []
    return counts_below(round_to, below, channels) + counts + [channels]


def plan_groups(graph: gs.Graph, layers: dict[str, Layer], exclude: list[str], round_to: int,
                data: bool, samplers: bool = False, round_below: int = 0) -> tuple[list[GroupPlan], dict[str, str]]:
    """Candidate groups and, for every other group, why it is left alone (by producer name).

    With ``samplers``, every plain Conv reading ALL the channels of a group left alone (a
    residual stream) becomes a sampler plan: its input channels are selected through a
    ``Gather`` (``channel_groups.insert_sampler``). Plans are in topological order of the
    node the walk cuts before; a sampler comes before the group its Conv produces. Keep counts:
    ``_keep_counts(channels, round_to, round_below)``.
    """
    plans, reasons = [], {}

    def prunable(channels: int) -> bool:
        return len(_keep_counts(channels, round_to, round_below)) > 1

    for group in find_groups(graph):
        name = group.name
        reason = group.reason
        if reason is None and len(group.producers) > 1:
            reason = "residual group (every block output would be pruned alike); left alone"
        if reason is None and any(fnmatch.fnmatchcase(_node_name(m.node), p) for m in group.producers for p in exclude):
            reason = "excluded by --exclude"
        if reason is None and not prunable(group.channels):
            reason = f"{group.channels} channels: nothing to prune at --round-to {round_to}"
        if reason is None and not group.consumers:
            reason = "no consumer reads these channels"
        if reason is None and data:
            for member in group.consumers:
                columns = _consumer_weight(member.node).shape[1]
                if columns > MAX_STATS_DIM:
                    reason = f"consumer {_node_name(member.node)} has {columns} input columns (over {MAX_STATS_DIM} for statistics)"
        if reason is not None:
            for member in group.producers:
                reasons[_node_name(member.node)] = reason
            if samplers and prunable(group.channels):
                plans += _sampler_plans(group, layers, exclude, round_to, round_below)
            continue
        per_channel = 0.0
        for member in group.producers + group.depthwise:
            layer = layers.get(_node_name(member.node))
            per_channel += (layer.macs or 0) / group.channels if layer else 0.0
        for member in group.consumers:
            layer = layers.get(_node_name(member.node))
            if layer:
                per_channel += (layer.macs or 0) / layer.in_channels * member.block
        plans.append(GroupPlan(name, group.channels, [_node_name(m.node) for m in group.consumers], per_channel,
                               counts=_keep_counts(group.channels, round_to, round_below)))
    order = {_node_name(node): index for index, node in enumerate(graph.nodes)}
    plans.sort(key=lambda p: (order.get(p.name, 0), not p.sampler))
    return plans, reasons


def _sampler_plans(group: ChannelGroup, layers: dict[str, Layer], exclude: list[str], round_to: int,
                   round_below: int) -> list[GroupPlan]:
    plans = []
    for member in group.consumers:
        node, name = member.node, _node_name(member.node)
        weight = node.inputs[1].values if node.op == "Conv" else None
        if (weight is None or node.attrs.get("group", 1) != 1 or member.offset or weight.shape[1] != group.channels
                or weight[0].size > MAX_STATS_DIM or name not in layers
                or any(fnmatch.fnmatchcase(name, p) for p in exclude)):
            continue
        plans.append(GroupPlan(name, group.channels, [name], (layers[name].macs or 0) / group.channels,
                               counts=_keep_counts(group.channels, round_to, round_below), sampler=True))
    return plans


def kept_fractions(graph: gs.Graph, layers: list[Layer], plans: list[GroupPlan], counts: list[int],
                   groups: list[ChannelGroup] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """The fraction of each layer's output and input channels left if each plan keeps ``counts``."""
    out_ratio = {layer.name: 1.0 for layer in layers}
    in_removed = {layer.name: 0 for layer in layers}
    groups = find_groups(graph) if groups is None else groups
    for plan, count in zip(plans, counts):
        group = _group(plan, graph, groups)
        for member in group.producers:
            out_ratio[_node_name(member.node)] *= count / plan.channels
        for member in group.consumers + group.depthwise:   # a depthwise conv after a Concat spans several groups
            in_removed[_node_name(member.node)] += (plan.channels - count) * member.block
    in_ratio = {layer.name: (layer.in_channels - in_removed[layer.name]) / max(layer.in_channels, 1) for layer in layers}
    return out_ratio, in_ratio


def _exact_macs(graph: gs.Graph, layers: list[Layer], plans: list[GroupPlan], counts: list[int],
                groups: list[ChannelGroup] | None = None) -> int:
    """Model MACs if each plan keeps ``counts`` channels (bilinear per layer)."""
    out_ratio, in_ratio = kept_fractions(graph, layers, plans, counts, groups)
    return int(round(sum(macs_kept(layer, out_ratio, in_ratio) for layer in layers)))


def macs_kept(layer: Layer, out_ratio: dict[str, float], in_ratio: dict[str, float]) -> float:
    """MACs ``layer`` keeps with ``kept_fractions`` of its channels left (a depthwise conv's
    outputs are its inputs)."""
    kept = in_ratio[layer.name] if layer.is_depthwise else out_ratio[layer.name] * in_ratio[layer.name]
    return (layer.macs or 0) * kept


def allocate_counts(graph: gs.Graph, layers: list[Layer], plans: list[GroupPlan], target: float) -> list[int] | None:
    """Keep counts meeting ``target`` MACs exactly, from the knapsack on linearised costs.

    The knapsack prices a channel of a group at its MACs in every member alone, which
    overstates what two pruned neighbours save together (a conv whose inputs AND outputs shrink
    loses ``M (1 - o/O)(1 - i/I)`` less than the sum). So its budget is corrected by the exact
    overshoot a few times; whatever overshoot is left (the knapsack's cost bins can be coarser
    than the last few thousand MACs) is removed by ``_step_down``.
    """
    macs_before = model_macs(layers)
    removable = sum(p.channels * p.macs_per_channel for p in plans)
    budget = target - (macs_before - removable)
    options = [[allocation.Option(cost=k * p.macs_per_channel, damage=d, value=k) for k, d in zip(p.counts, p.damages)]
               for p in plans]
    groups = find_groups(graph)
    counts = None
    for _ in range(12):
        choice = allocation.allocate(options, budget)
        if choice is None:
            break
        counts = [p.counts[k] for p, k in zip(plans, choice)]
        exact = _exact_macs(graph, layers, plans, counts, groups)
        if exact <= target:
            return counts
        budget -= (exact - target) * 1.05 + 1
    return None if counts is None else _step_down(graph, layers, plans, counts, target, groups)


def _step_down(graph: gs.Graph, layers: list[Layer], plans: list[GroupPlan], counts: list[int], target: float,
               groups: list[ChannelGroup]) -> list[int] | None:
    """Greedy repair of an allocation over ``target``: lower one plan by one count step at a
    time until the target is met. A step that closes the remaining gap alone is taken with
    the least damage added; otherwise the step with the least damage per exact MAC saved."""
    index = [p.counts.index(c) for p, c in zip(plans, counts)]
    exact = _exact_macs(graph, layers, plans, counts, groups)
    while exact > target:
        steps = []                      # (damage added, MACs saved, plan index, counts after)
        for i, plan in enumerate(plans):
            if index[i] == 0:
                continue
            trial = counts[:i] + [plan.counts[index[i] - 1]] + counts[i + 1:]
            saved = exact - _exact_macs(graph, layers, plans, trial, groups)
            if saved > 0:
                steps.append((plan.damages[index[i] - 1] - plan.damages[index[i]], saved, i, trial))
        if not steps:
            return None
        closing = [step for step in steps if exact - step[1] <= target]
        _, saved, i, counts = (min(closing, key=lambda step: step[0]) if closing
                              else min(steps, key=lambda step: step[0] / step[1]))
        exact -= saved
        index[i] -= 1
    return counts


# ---------------------------------------------------------------------------- pipeline


@dataclass
class PruneAnalysis:
    """Steps 1-3 up to the knapsack: what the ORIGINAL model says about every candidate group.

    None of it depends on ``--speedup``, so one analysis serves every budget
    (``--method auto`` prunes the same model to several budgets, and prices groups against
    low-rank layers from ``plans``' damages).
    """

    prepared: onnx.ModelProto
    preparation: dict
    layer_list: list[Layer]
    plans: list[GroupPlan]               # damages filled in; ``keep`` left None
    reasons: dict[str, str]              # why each other group is left alone
    samples: list[dict[str, np.ndarray]]
    sampler: ConsumerSampler | None
    targets: dict[str, list[np.ndarray]]
    round_to: int
    timings: dict[str, float]
    head: str | None = None              # the last layer, refit toward the original outputs at the end
    metric: str | None = None            # what ``plans``' damages measure at the output (OutputSensitivity), else None
    producers: set[str] = field(default_factory=set)   # producers refit toward their original outputs (targets kept)

    @property
    def macs_before(self) -> int:
        return model_macs(self.layer_list)


def _check_options(options: CompressOptions, data: bool) -> int:
    """``--round-to``, after the options pruning cannot take are refused."""
    method = options.method
    if method not in METHODS:
        raise UserError(f"unknown pruning --method {method!r}; choose one of: {', '.join(METHODS)}")
    if options.speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {options.speedup})")
    round_to = int(getattr(options, "round_to", 4) or 1)
    if round_to < 1:
        raise UserError(f"--round-to must be at least 1 (got {round_to})")
    if getattr(options, "cost", "macs") != "macs":
        raise UserError(f"--cost {options.cost} is not available for --method {method}; channel pruning targets MACs (use --cost macs)")
    check_selection(options.selection)
    if method == "prune" and not data:
        raise UserError("--method prune is data-driven: give calibration data with --calib (an image folder or .npz)")
    return round_to


def analyze_prune(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                  options: CompressOptions, progress: Progress | None = None) -> PruneAnalysis:
    """Candidate groups of ``model`` and each one's damage at every keep count (steps 1-3)."""
    method = options.method
    data = calib is not None and len(calib) > 0
    round_to = _check_options(options, data)
    check_folds(calib, holdout, options.sensitivity_folds, measured=options.allocation == "sensitivity")
    timings: dict[str, float] = {}
    start = time.perf_counter()
    prepared, preparation = graphs.prepare(model, calib.sample_shapes() if data else None)
    graph = graphs.import_graph(prepared)
    layer_list = find_layers(graph)
    layers = {layer.name: layer for layer in layer_list}
    plans, reasons = plan_groups(graph, layers, options.exclude, round_to, data, samplers=method == "prune",
                                 round_below=options.round_below)
    if not plans:
        detail = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:3]) or "no channel groups"
        raise UserError(f"nothing to prune: no channel group can be pruned ({detail})")
    if method != "prune":
        originals = {_node_name(n): n for n in graphs.import_graph(model).nodes if n.op in ("Conv", "Gemm")}
        analysed = find_groups(graph)
        for plan in plans:
            node = originals.get(plan.name)
            producer = group_of(analysed, plan.name).producers[0].node
            weight = node.inputs[1].values if node is not None and isinstance(node.inputs[1], gs.Constant) else None
            if weight is None or weight.shape[0] != plan.channels:
                weight = producer.inputs[1].values
            if producer.op == "Gemm" and not producer.attrs.get("transB", 0):
                weight = weight.T
            plan.scores = prune.filter_scores(weight, method.removeprefix("filter-"))
    timings["prepare"] = time.perf_counter() - start

    # ---- original model: targets, and statistics for the allocation
    groups = find_groups(graph)
    consumer_nodes: dict[str, gs.Node] = {}
    for plan in plans:
        for member in _group(plan, graph, groups).consumers:
            consumer_nodes[_node_name(member.node)] = member.node
    head = _head(layer_list, consumer_nodes, plans, options.exclude) if data else None
    if head is not None:
        consumer_nodes[head.name] = head.node
    producer_nodes = _refittable_producers(graph, plans, groups, options.exclude) if data and method == "prune" else {}
    producers_only = [node for name, node in producer_nodes.items() if name not in consumer_nodes]
    shortcuts = {name: layers[name].shortcut.name for name in consumer_nodes
                 if name in layers and layers[name].shortcut is not None}
    targets: dict[str, list[np.ndarray]] = {}
    samples: list[dict[str, np.ndarray]] = []
    sampler = None
    original_stats: dict[str, prune.LinearStats] = {}
    if data:
        t0 = time.perf_counter()
        floats = 0
        for node in consumer_nodes.values():
            for tensor in (node.inputs[0], node.outputs[0]):
                shape = tensor.shape or []
                floats += int(np.prod([d for d in shape[1:] if isinstance(d, int)] or [1]))
        batch = batch_size_for(floats)
        samples = list(calib.batches(batch))
        sampler = ConsumerSampler(max(1, math.ceil(options.rows_per_layer / len(calib))), options.seed, shortcuts)
        stats, targets, _ = sampler.collect(prepared, CutRunner(samples, options.threads),
                                            [*consumer_nodes.values(), *producers_only], None, progress, "original model",
                                            record_only={_node_name(node) for node in producers_only})
        original_stats = {name: _as_linear(s) for name, s in stats.items()}
        del stats
        timings["capture_original"] = time.perf_counter() - t0

    # ---- allocation
    # damage = squared reconstruction error / energy of what the consumer's output becomes:
    # the block output ``branch + shortcut`` for a consumer that feeds a residual Add.
    output_energy: dict[str, float] = {}
    for name in consumer_nodes:
        if name in targets:
            rows = np.concatenate(targets[name]).astype(np.float64)
            if name + SHORTCUT in targets:
                rows = rows + np.concatenate(targets[name + SHORTCUT])
            output_energy[name] = float(np.square(rows - rows.mean(0)).sum())
    t0 = time.perf_counter()
    sensitivity = None
    if data and options.allocation == "sensitivity":
        held_out = measurement_samples(calib, holdout)
        sensitivity = OutputSensitivity(prepared, list(held_out.batches(batch)), options.threads, options.sensitivity_grid,
                                        options.sensitivity_metric)
    for number, plan in enumerate(plans, 1):
        group = _group(plan, graph, groups)
        if not data:
            plan.damages = [prune.removed_mass(plan.scores, k) for k in plan.counts]
            continue
        with threadpool_limits(limits=1, user_api="blas"):
            select = _selector(options, group, plan, original_stats, min(plan.counts))
            damages, solutions = [], []
            for count in plan.counts:
                keep = select(count)
                weights, err, energy, _ = _refit(group, keep, original_stats)
                energy = sum(output_energy.get(_node_name(m.node), 0.0) for m in group.consumers) or energy
                damages.append(err / max(energy, 1e-300))
                solutions.append((keep, weights))
        plan.damages = damages if sensitivity is None else sensitivity.damages(plan, solutions)
        if progress and sensitivity is not None:
            progress("sensitivity", number, len(plans))
    if sensitivity is not None and options.sensitivity_folds > 1:
        _cross_fitted_damages(model, calib, holdout, options, plans, progress)
    timings["allocate"] = time.perf_counter() - t0
    return PruneAnalysis(prepared, preparation, layer_list, plans, reasons, samples, sampler, targets, round_to, timings,
                         head.name if head is not None else None, sensitivity.metric if sensitivity is not None else None,
                         set(producer_nodes))


def compress_prune(model: onnx.ModelProto, calib: DataSource | None, holdout: DataSource | None,
                   options: CompressOptions, progress: Progress | None = None, analysis: PruneAnalysis | None = None,
                   keep: list[int] | None = None) -> CompressionResult:
    """Prune channels of ``model`` to ``options.speedup`` times fewer MACs (module docstring).

    ``analysis``: ``analyze_prune``'s result for the same model, data and options (not run
    again). ``keep``: a keep count per plan of the analysis, chosen elsewhere (``--method
    auto``'s per-layer choice), instead of the allocation under ``options.speedup``.
    """
    method = options.method
    data = calib is not None and len(calib) > 0
    _check_options(options, data)
    start = time.perf_counter()
    analysis = analysis or analyze_prune(model, calib, holdout, options, progress)
    prepared, preparation, layer_list, reasons = analysis.prepared, analysis.preparation, analysis.layer_list, analysis.reasons
    samples, sampler, targets = analysis.samples, analysis.sampler, analysis.targets
    timings = dict(analysis.timings)
    graph = graphs.import_graph(prepared)
    macs_before = model_macs(layer_list)
    plans = [dataclasses.replace(plan) for plan in analysis.plans]
    t0 = time.perf_counter()
    counts = keep if keep is not None else allocate_counts(graph, layer_list, plans, macs_before / options.speedup)
    if counts is None:
        best = _exact_macs(graph, layer_list, plans, [p.counts[0] for p in plans])
        raise UserError(f"--speedup {options.speedup:g} is out of reach for channel pruning of this model "
                        f"(at most {macs_before / max(best, 1):.2f}x with the prunable groups at --round-to {analysis.round_to}); lower --speedup or --round-to")
    for plan, count in zip(plans, counts):
        plan.keep = count
    timings["allocate"] = timings.get("allocate", 0.0) + time.perf_counter() - t0

    # ---- layer by layer, asymmetric
    t0 = time.perf_counter()
    chosen = [p for p in plans if p.keep < p.channels]
    runner = CutRunner(samples, options.threads, options.memory_budget) if data else None
    consumer_errors: dict[str, tuple[float, float]] = {}
    kept_by_producer: dict[str, tuple[int, int]] = {}
    sampled: dict[str, tuple[int, int]] = {}           # sampler plans: (kept, all) input channels
    unfitted: set[str] = set()
    shrinkages: dict[str, float] = {}
    producer_errors: dict[str, tuple[float, float, float]] = {}
    for number, plan in enumerate(chosen, 1):
        group = _group(plan, graph)
        stats = None
        producer = group.producers[0].node if group.producers else None
        if (data and producer is not None and _node_name(producer) in analysis.producers
                and _node_name(producer) not in consumer_errors):
            refit = _refit_toward_original(graph, prepared, analysis, runner, producer, progress,
                                           f"producer {number}/{len(chosen)}")
            if refit is not None:
                producer_errors[_node_name(producer)] = refit
        if data:
            current = graphs.export(graph, prepared)
            runner.advance(current, cut_before(graph, _cut_node(group)))
            consumers = [m.node for m in group.consumers]
            raw, _, folds = sampler.collect(current, runner, consumers, targets, progress, f"group {number}/{len(chosen)}")
            stats = {name: _as_linear(s) for name, s in raw.items()}
        with threadpool_limits(limits=1, user_api="blas"):
            keep = _selector(options, group, plan, stats, plan.keep)(plan.keep)
            weights = None
            if data:
                weights, _, _, errors = _refit(group, keep, stats, unfitted, folds, shrinkages)
                consumer_errors.update(errors)
        _apply(plan, graph, group, keep, weights)
        if plan.sampler:
            sampled[plan.name] = (len(keep), plan.channels)
        else:
            kept_by_producer[plan.name] = (len(keep), plan.channels)
    head_errors = _refit_head(graph, prepared, analysis, runner, progress) if analysis.head is not None and chosen else None
    if head_errors is not None:
        consumer_errors[analysis.head] = head_errors
    timings["solve_and_rewrite"] = time.perf_counter() - t0

    compressed = graphs.restore_signature(graphs.export(graph, prepared), model)
    t0 = time.perf_counter()
    if holdout is not None and len(holdout) > 0:
        verification = verify(model, compressed, holdout, options.threads)
    else:
        from onnxopt.verify import check_structure
        check_structure(model, compressed)
        verification = Verification(0, 0.0, 0.0, None)
    timings["verify"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start

    final = {layer.name: layer for layer in find_layers(graphs.import_graph(compressed))}
    label = {"prune": f"{options.selection}+ls", "filter-std": "std", "filter-l1": "l1"}[method] + ("" if data or method == "prune" else " (no refit)")
    if method != "prune" and data:
        label += "+ls"
    table = []
    for layer in layer_list:
        after = final.get(layer.name)
        macs_after = (after.macs or 0) if after else 0
        params_after = after.params if after else 0
        changed = layer.name in kept_by_producer or layer.name in consumer_errors or (after is not None and after.macs != layer.macs)
        result = LayerResult(layer.name, layer.op, shape_text(layer), layer.macs or 0, macs_after, layer.params, params_after)
        if layer.name in kept_by_producer:
            result.rank, result.full_rank = kept_by_producer[layer.name]
        changed = changed or layer.name in sampled
        if changed:
            result.solver = label
            if layer.name == analysis.head and head_errors is not None:
                result.solver = "ls refit of the head toward the original outputs"
            if layer.name in sampled:
                result.solver += " (input channels %d/%d through a Gather sampler)" % sampled[layer.name]
            if shrinkages.get(layer.name):
                result.solver += f" (shrunk toward the original weights, s={shrinkages[layer.name]:g}, cross-validated)"
            if layer.name in unfitted:
                result.solver += " (sliced, no refit: too few calibration rows)"
            if layer.name in consumer_errors:
                result.error_before, result.error_after = consumer_errors[layer.name]
            elif layer.name in producer_errors:
                result.error_before, result.error_after, shrinkage = producer_errors[layer.name]
                result.solver += f" (refit toward its original outputs first, s={shrinkage:g})"
        else:
            grouped = layer.op == "Conv" and layer.group > 1 and not layer.is_depthwise   # frozen as a barrier, no group of its own
            result.skipped = reasons.get(layer.name) or (f"grouped conv (group={layer.group}): channels cannot be pruned across groups"
                                                         if grouped else "kept: the budget is met without it")
        table.append(result)
    return CompressionResult(
        model=compressed, layers=table, macs_before=macs_before, macs_after=sum(r.macs_after for r in table),
        params_before=sum(r.params_before for r in table), params_after=sum(r.params_after for r in table),
        verification=verification, preparation=preparation, timings=timings,
        calib_samples=len(calib) if data else 0, holdout_samples=len(holdout) if holdout is not None else 0,
        rows_per_layer=options.rows_per_layer, stages=len(chosen),
    )
