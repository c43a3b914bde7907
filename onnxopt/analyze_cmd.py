"""`onnxopt analyze`: how much each layer tolerates, and what the whole model can reach.

For every layer the low-rank pass can factorise, and a grid of its ranks, the layer is
compressed alone and the damage measured on held-out data (``onnxopt.sensitivity``, Niu et
al. 2017): the top-1 drop with ``--eval-data`` (labelled images), and the smooth proxies (KL
divergence of the class distribution, relative output error) always. The curves are cached on
disk (``onnxopt.cache``), so `compress --allocation sensitivity` with the same model, data and
settings, and a second `analyze`, reuse them. From the curves, the knapsack gives the best
allocation at each budget: the predicted damage against MAC speed-up (the Pareto front).
``register(app)`` adds the command to the onnxopt CLI.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from onnxopt import cli_options as opt
from onnxopt.errors import UserError

FRONT_SPEEDUPS = (1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)


def analyze(
    model_path: Path = typer.Argument(..., metavar="IN.onnx", help="Trained model."),
    calib: list[str] = typer.Option(..., "--calib", help="Calibration data: image folder, .npy/.npz, or name:file.npy (repeatable)."),
    preset: Optional[str] = opt.Preset,
    size: Optional[int] = opt.Size,
    resize: Optional[int] = opt.Resize,
    mean: Optional[str] = opt.Mean,
    std: Optional[str] = opt.Std,
    scale: Optional[float] = opt.Scale,
    channel_order: Optional[str] = opt.ChannelOrder,
    calib_size: int = opt.CalibSize,
    holdout: int = typer.Option(100, "--holdout", help="Samples of --calib set aside to measure damage on (without --eval-data)."),
    eval_data: Optional[Path] = opt.EvalData,
    eval_size: int = opt.EvalSize,
    labels: Optional[Path] = opt.Labels,
    label_offset: int = opt.LabelOffset,
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write the analysis as JSON here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: per-layer curves and the predicted Pareto front."),
    metric: str = typer.Option("auto", "--metric", help="Damage for the front: auto (top1_drop with --eval-data, else kl for classifiers, else error), top1_drop, kl, error."),
    grid: int = typer.Option(8, "--grid", help="Ranks measured per layer."),
    exclude: Optional[list[str]] = opt.Exclude,
    factorize_classifier: bool = opt.FactorizeClassifier,
    seed: int = opt.Seed,
    rows: int = opt.Rows,
    threads: int = opt.Threads,
    no_cache: bool = typer.Option(False, "--no-cache", help="Measure again; don't read or write the disk cache."),
) -> None:
    """Per-layer sensitivity curves and the accuracy-vs-speed-up front (cached on disk)."""
    from onnxopt import cli
    from onnxopt.cache import default_dir
    from onnxopt.calib.readers import make_preprocess, open_source, split_source
    from onnxopt.evaluate import labelled_source, refuse_overlap
    from onnxopt.graph import load_model
    from onnxopt.pipeline import CompressOptions, _rank_options, layer_sensitivity, plan
    from onnxopt.report import write_json
    from onnxopt.sensitivity import METRICS, pareto_front

    if grid < 2:
        raise UserError(f"--grid must be at least 2 (got {grid})")
    if metric != "auto" and metric not in METRICS:
        raise UserError(f"unknown --metric {metric!r}; choose auto or one of: {', '.join(METRICS)}")
    for path in (output, plot):
        if path is not None:
            cli._check_output_path(model_path, path)
    start = time.perf_counter()
    model = load_model(model_path)
    prep = make_preprocess(preset, size, resize, mean, std, scale, channel_order)
    inputs = cli.model_inputs(model)
    source = open_source(calib, inputs, prep)
    calib_data, holdout_data = split_source(source, calib_size, holdout, seed)
    held_out, truth = holdout_data, None
    if eval_data is not None:
        held_out, truth = labelled_source(eval_data, inputs, prep, labels, label_offset, eval_size, seed)
        refuse_overlap(source, held_out, eval_data)
    options = CompressOptions(speedup=2.0, exclude=list(exclude or []), factorize_classifier=factorize_classifier, seed=seed, rows_per_layer=rows, threads=threads,
                              sensitivity_grid=grid, cache_dir=None if no_cache else default_dir())
    model_plan = plan(model, options, calib_data.sample_shapes())
    bar, progress = cli._progress()
    if bar:
        with bar:
            analysis = layer_sensitivity(model, model_plan, calib_data, held_out, options, truth, progress)
    else:
        analysis = layer_sensitivity(model, model_plan, calib_data, held_out, options, truth)
    if metric == "auto":
        metric = "top1_drop" if "top1_drop" in analysis.metrics else analysis.default_metric()
    if metric not in analysis.metrics:
        raise UserError(f"--metric {metric} was not measured (measured: {', '.join(analysis.metrics)}); "
                        f"top1_drop needs --eval-data, kl a classifier's (N, classes) output")
    candidates = model_plan.candidates
    layer_options = [_rank_options(layer, np.ones(layer.out_channels), options.rank_multiple, below=options.rank_below) for layer in candidates]
    fixed = sum(layer.macs for layer in model_plan.layers if layer not in candidates and layer.macs)
    front = pareto_front(analysis, layer_options, candidates, fixed, metric, list(FRONT_SPEEDUPS))
    wall = time.perf_counter() - start
    data = {"model": str(model_path), "calib": calib_data.description, "held_out": held_out.description,
            "metric": metric, "cached": analysis.cached, "wall_seconds": wall,
            "analysis": analysis.to_json(), "front": front}
    if output is not None:
        write_json(data, output)
    if plot is not None:
        from onnxopt.plot import plot_analysis

        plot_analysis(analysis, metric, front, plot, title=f"{model_path.name}: {analysis.samples} held-out samples")
    if not cli._state["quiet"]:
        _print(analysis, metric, front, wall)


def _print(analysis, metric: str, front: list[dict], wall: float) -> None:
    from onnxopt.report import human

    out = Console()
    table = Table(title=f"Sensitivity ({metric}; damage at each measured rank, layer compressed alone)")
    for column in ("layer", "shape", "MACs", "rank: damage", "time"):
        table.add_column(column, justify="right" if column in ("MACs", "time") else "left")
    for curve in analysis.curves:
        damage = curve.damage(metric)
        points = "  ".join(f"{rank}: {value:.3g}" for rank, value in zip(curve.ranks, damage))
        table.add_row(curve.name, curve.shape, human(curve.macs), points, f"{curve.seconds:.1f}s")
    out.print(table)
    pareto = Table(title="Predicted front (knapsack over the curves; damages summed)")
    for column in ("MAC speed-up", f"predicted {metric}"):
        pareto.add_column(column, justify="right")
    for point in front:
        pareto.add_row(f"{point['mac_speedup']:.2f}x", f"{point['predicted_damage']:.4g}")
    out.print(pareto)
    base = f"; original top-1 {analysis.base_top1:.2f}%" if analysis.base_top1 is not None else ""
    source = "from the cache" if analysis.cached else f"measured in {analysis.seconds:.1f}s"
    out.print(f"{len(analysis.curves)} layers x {max(len(c.ranks) for c in analysis.curves)} ranks on {analysis.samples} samples, "
              f"{source}{base}; wall time {wall:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze)
