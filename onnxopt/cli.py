"""The `onnxopt` command line.

Every user-facing failure is a :class:`onnxopt.errors.UserError`, printed as one line with
exit code 2; an unexpected exception is an internal error, printed as one line with exit
code 1 (``--debug`` shows the traceback). Nothing is written unless the whole job succeeds.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnxopt import __version__
from onnxopt.calib.readers import PRESETS, InputSpec, make_preprocess, open_source, split_source
from onnxopt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress trained CNNs in ONNX with data-driven low-rank factorisation, and check the result.")
console = Console(stderr=True)
_state = {"debug": False, "quiet": False}


def _version(value: bool) -> None:
    if value:
        print(f"onnxopt {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of internal errors."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars or tables."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    _state["debug"] = debug
    _state["quiet"] = quiet


def model_inputs(model) -> list[InputSpec]:
    from onnxopt.graph import tensor_shape

    initializers = {t.name for t in model.graph.initializer}
    return [InputSpec(i.name, tensor_shape(i)) for i in model.graph.input if i.name not in initializers]


def _progress() -> tuple[Progress | None, callable]:
    if _state["quiet"]:
        return None, lambda *_: None
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True)
    tasks: dict[str, int] = {}

    def update(label: str, done: int, total: int) -> None:
        if label not in tasks:
            tasks[label] = bar.add_task(label, total=total)
        bar.update(tasks[label], completed=done)

    return bar, update


PresetOption = typer.Option(None, "--preset", help=f"Preprocessing preset: {', '.join(PRESETS)}.")


@app.command()
def inspect(
    model_path: Path = typer.Argument(..., metavar="IN.onnx", help="Model to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    groups: bool = typer.Option(False, "--groups", help="Also print the channel groups pruning sees, and why frozen ones are."),
) -> None:
    """Every Conv/Gemm: shape, kernel, stride, group, MACs, params, and what a pass can do with it."""
    from onnxopt.graph import import_graph, load_model, prepare
    from onnxopt.layers import find_layers
    from onnxopt.passes import lowrank
    from onnxopt.report import inspect_table, layer_rows, print_json

    model = load_model(model_path)
    prepared, preparation = prepare(model)
    layers = find_layers(import_graph(prepared))
    rows = layer_rows(layers, {layer.name: lowrank.applicability(layer) for layer in layers})
    channel_groups = []
    if groups:
        from onnxopt.passes.channel_groups import find_groups

        channel_groups = find_groups(import_graph(prepared))
    if as_json:
        data = {"model": str(model_path), "preparation": preparation, "layers": rows,
                "total_macs": sum(r["macs"] or 0 for r in rows), "total_params": sum(r["params"] for r in rows)}
        if groups:
            data["channel_groups"] = [group.to_json() for group in channel_groups]
        print_json(data)
    else:
        out = Console()
        out.print(inspect_table(rows, f"{model_path.name}: {len(rows)} Conv/Gemm layers"))
        for group in channel_groups:
            out.print(group.describe(), highlight=False)


@app.command()
def compress(
    model_path: Path = typer.Argument(..., metavar="IN.onnx", help="Trained model (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the compressed model."),
    method: str = typer.Option("lowrank", "--method", help="lowrank (Zhang et al.), prune (He et al. LASSO + least squares), filter-std or filter-l1 (data-free ranking; refit with --calib), or auto (prune then low-rank, the split measured)."),
    speedup: float = typer.Option(..., "--speedup", help="Target: whole-model MACs become at most original/SPEEDUP."),
    calib: Optional[list[str]] = typer.Option(None, "--calib", help="Calibration data: image folder, .npy/.npz, or name:file.npy (repeatable)."),
    preset: Optional[str] = PresetOption,
    size: Optional[int] = typer.Option(None, "--size", help="Final image size (square)."),
    resize: Optional[int] = typer.Option(None, "--resize", help="Resize the shorter side before the centre crop."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean, e.g. 0.485,0.456,0.406."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std, e.g. 0.229,0.224,0.225."),
    scale: Optional[float] = typer.Option(None, "--scale", help="Pixel scale before mean/std (default 1/255)."),
    channel_order: Optional[str] = typer.Option(None, "--channel-order", help="rgb or bgr."),
    calib_size: int = typer.Option(2000, "--calib-size", help="Calibration samples drawn from --calib."),
    holdout: int = typer.Option(100, "--holdout", help="Samples of --calib set aside (not calibrated on) to measure the output difference."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a JSON report here."),
    exclude: Optional[list[str]] = typer.Option(None, "--exclude", help="Leave this layer alone (name or glob; repeatable)."),
    seed: int = typer.Option(0, "--seed", help="Seed for sampling images and positions."),
    stages: int = typer.Option(0, "--calib-stages", help="Re-run the compressed model this many times for asymmetric inputs (0: auto)."),
    rows: int = typer.Option(8192, "--rows-per-layer", help="Sampled response rows per layer."),
    threads: int = typer.Option(0, "--threads", help="onnxruntime threads for calibration (0: all cores)."),
    solver: str = typer.Option("auto", "--solver", help="auto (ReLU-aware where a ReLU follows), linear, or svd (data-free baseline)."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Take layer inputs from the original model (baseline; default is asymmetric)."),
    allocation: str = typer.Option("energy", "--allocation", help="Rank allocation under the budget: energy, uniform, or sensitivity (each layer's rank grid measured at the output on held-out samples)."),
    external_data: bool = typer.Option(False, "--external-data", help="Write weights to one OUT.data file beside the model (automatic over 2 GiB)."),
    round_to: int = typer.Option(4, "--round-to", help="Pruning: kept channel counts are multiples of this (1, 4, 8, 16)."),
    cost: str = typer.Option("macs", "--cost", help="What --speedup divides: macs, or latency (each layer timed in onnxruntime; never slower)."),
) -> None:
    """Compress IN.onnx to a model with SPEEDUP times fewer MACs, calibrated on your data."""
    from onnxopt.graph import load_model, save_model_atomic
    from onnxopt.pipeline import CompressOptions
    from onnxopt.pipeline import compress as run_compress
    from onnxopt.report import compress_tables, write_json

    if speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {speedup:g}); 2 means half the MACs")
    if calib_size < 1:
        raise UserError(f"--calib-size must be at least 1 (got {calib_size})")
    _check_output_path(model_path, output)
    if report is not None:
        _check_output_path(model_path, report)
    if round_to < 1:
        raise UserError(f"--round-to must be at least 1 (got {round_to})")
    model = load_model(model_path)
    prep = make_preprocess(preset, size, resize, mean, std, scale, channel_order)
    calib_data = holdout_data = None
    if calib:
        source = open_source(calib, model_inputs(model), prep)
        calib_data, holdout_data = split_source(source, calib_size, holdout, seed)
    elif not method.startswith("filter-"):
        raise UserError(f"--method {method} is data-driven: give calibration data with --calib (an image folder or .npz)")
    options = CompressOptions(speedup=speedup, method=method, exclude=list(exclude or []), seed=seed,
                              rows_per_layer=rows, stages=stages, threads=threads, solver=solver,
                              asymmetric=not symmetric, allocation=allocation, cost=cost, round_to=round_to)
    bar, progress = _progress()
    if bar:
        with bar:
            result = run_compress(model, calib_data, holdout_data, options, progress)
    else:
        result = run_compress(model, calib_data, holdout_data, options)
    save_model_atomic(result.model, output, external_data=external_data)
    data = {"input": str(model_path), "output": str(output), "method": method, "speedup_target": speedup,
            "preprocess": prep.describe(), "calib": " ".join(calib or []), "seed": seed, **result.to_json()}
    if report is not None:
        write_json(data, report)
    if not _state["quiet"]:
        out = Console()
        for table in compress_tables(result):
            out.print(table)
        out.print(f"wrote {output} ({result.macs_before / max(result.macs_after, 1):.2f}x fewer MACs)")


def _check_output_path(model_path: Path, output: Path) -> None:
    if output.exists() and model_path.exists() and output.resolve() == model_path.resolve():
        raise UserError(f"output {output} is the input model; choose another -o path (the input is never overwritten)")
    if output.exists() and output.is_dir():
        raise UserError(f"output {output} is a directory; give a file path")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist; create it first")


@app.command("eval")
def evaluate_command(
    model_path: Path = typer.Argument(..., metavar="MODEL.onnx"),
    data: Path = typer.Option(..., "--data", help="Labelled images: <folder>/<class>/<image>."),
    preset: Optional[str] = PresetOption,
    size: Optional[int] = typer.Option(None, "--size"),
    resize: Optional[int] = typer.Option(None, "--resize"),
    mean: Optional[str] = typer.Option(None, "--mean"),
    std: Optional[str] = typer.Option(None, "--std"),
    scale: Optional[float] = typer.Option(None, "--scale"),
    channel_order: Optional[str] = typer.Option(None, "--channel-order"),
    labels: Optional[Path] = typer.Option(None, "--labels", help="Class names, one per line, in class-index order."),
    label_offset: int = typer.Option(0, "--label-offset", help="Added to every label (1 for 1001-class TF models)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate a seeded random subset of N images."),
    seed: int = typer.Option(0, "--seed"),
    threads: int = typer.Option(0, "--threads"),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with top1, top5, n."),
) -> None:
    """Top-1/top-5 accuracy on a labelled image folder."""
    from onnxopt.evaluate import evaluate
    from onnxopt.graph import load_model
    from onnxopt.report import print_json

    model = load_model(model_path)
    prep = make_preprocess(preset, size, resize, mean, std, scale, channel_order)
    bar, progress = _progress()
    if as_json:
        bar, progress = None, None
    if bar:
        with bar:
            result = evaluate(model, model_inputs(model), data, prep, labels, label_offset, limit, seed, threads, progress=progress)
    else:
        result = evaluate(model, model_inputs(model), data, prep, labels, label_offset, limit, seed, threads)
    if as_json:
        print_json(result.to_json())
    else:
        Console().print(f"{model_path.name}: top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  on {result.n} images")


@app.command()
def bench(
    model_path: Path = typer.Argument(..., metavar="MODEL.onnx"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Also time this model and report the ratio."),
    batch: int = typer.Option(1, "--batch"),
    threads: int = typer.Option(1, "--threads"),
    runs: int = typer.Option(30, "--runs", help="Timed runs per model (at least)."),
    runtime: str = typer.Option("ort", "--runtime", help="ort (onnxruntime) or tvm (compiled for this host, see docs/TVM.md)."),
    tune_dir: Optional[Path] = typer.Option(None, "--tune-dir", help="tvm: apply the tuning database in this folder."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """CPU latency (median of repeated runs), optionally against a baseline; onnxruntime or TVM."""
    from onnxopt.graph import load_model
    from onnxopt.latency import Latency, measure
    from onnxopt.report import print_json

    if batch < 1 or threads < 1 or runs < 1:
        raise UserError("--batch, --threads and --runs must be at least 1")
    if runtime not in ("ort", "tvm"):
        raise UserError(f"--runtime must be ort or tvm, got {runtime!r}")
    paths = [model_path] + ([baseline] if baseline else [])
    models = [load_model(path) for path in paths]
    if runtime == "ort":                   # runs of the two models alternate: same background load
        timings = measure(models, batch=batch, threads=threads, runs=runs)
    else:
        from onnxopt import tvm_backend

        timings = []
        for path in paths:
            seconds = tvm_backend.measure_latency(path, batch=batch, threads=threads, repeats=runs, tune_dir=tune_dir)
            timings.append(Latency(seconds * 1e3, seconds * 1e3, seconds * 1e3, runs))
    data = {"model": str(model_path), "runtime": runtime, "batch": batch, "threads": threads, "latency": timings[0].to_json()}
    if baseline:
        data["baseline"] = str(baseline)
        data["baseline_latency"] = timings[1].to_json()
        data["speedup"] = timings[1].median_ms / timings[0].median_ms
    if as_json:
        print_json(data)
        return
    out = Console()
    out.print(f"{model_path.name}: {timings[0].median_ms:.3f} ms median ({runtime}, batch {batch}, {threads} thread(s), {timings[0].runs} runs)")
    if baseline:
        out.print(f"{baseline.name}: {timings[1].median_ms:.3f} ms median -> speed-up {data['speedup']:.2f}x")


def _register_optional_commands() -> None:
    try:
        from onnxopt import build_cmd
    except ImportError:
        return
    build_cmd.register(app)


_register_optional_commands()


def main() -> None:
    try:
        app()  # standalone: typer prints its own usage errors (exit 2)
    except UserError as exc:
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted; nothing was written", highlight=False)
        sys.exit(130)
    except Exception as exc:
        if _state["debug"]:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {message} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
