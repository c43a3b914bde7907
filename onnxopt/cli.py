"""The `onnxopt` command line.

Every user-facing failure is a :class:`onnxopt.errors.UserError`, printed as one line with
exit code 2; an unexpected exception is an internal error, printed as one line with exit
code 1 (``--debug`` shows the traceback). Nothing is written unless the whole job succeeds.
"""

from __future__ import annotations

import os
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from onnxopt import __version__
from onnxopt import cli_options as opt
from onnxopt.calib.readers import InputSpec, make_preprocess, open_source, split_source
from onnxopt.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compress trained CNNs in ONNX with data-driven low-rank factorisation, and check the result.")
console = Console(stderr=True)
FOLDED_METHODS = ("prune", "lowrank", "auto")      # whose measured damages --sensitivity-folds cross-fits
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


@app.command()
def inspect(
    model_path: Path = typer.Argument(..., metavar="IN.onnx", help="Model to inspect."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    groups: bool = typer.Option(False, "--groups", help="Also print the channel groups pruning sees, and why frozen ones are."),
) -> None:
    """Every Conv/Gemm: shape, kernel, stride, group, MACs, params, and what a pass can do with it."""
    from onnxopt.graph import import_graph, load_model, prepare
    from onnxopt.layers import class_score_layers, find_layers
    from onnxopt.pipeline import plan_candidates
    from onnxopt.passes import early_pooling
    from onnxopt.report import human, inspect_table, layer_rows, print_json

    model = load_model(model_path)
    prepared, preparation = prepare(model)
    graph = import_graph(prepared)
    layers = find_layers(graph)
    reasons = plan_candidates(layers, [], class_score_layers(graph, layers))[1]
    rows = layer_rows(layers, {layer.name: reasons.get(layer.name) for layer in layers})
    macs = {layer.name: layer.macs or 0 for layer in layers}
    poolable = [{"head": head.describe(), "macs_saved": sum(macs[conv.name] for conv in head.convs) * (head.spatial - 1) // head.spatial}
                for head in early_pooling.find_heads(graph)]
    channel_groups = []
    if groups:
        from onnxopt.passes.channel_groups import find_groups

        channel_groups = find_groups(import_graph(prepared))
    if as_json:
        data = {"model": str(model_path), "preparation": preparation, "layers": rows,
                "total_macs": sum(r["macs"] or 0 for r in rows), "total_params": sum(r["params"] for r in rows)}
        if groups:
            data["channel_groups"] = [group.to_json() for group in channel_groups]
        data["early_pooling"] = poolable
        print_json(data)
    else:
        out = Console()
        out.print(inspect_table(rows, f"{model_path.name}: {len(rows)} Conv/Gemm layers"))
        for entry in poolable:
            out.print(f"--pool-early: {entry['head']}, {human(entry['macs_saved'])} MACs fewer", highlight=False)
        for group in channel_groups:
            out.print(group.describe(), highlight=False)


@app.command()
def compress(
    model_path: Path = typer.Argument(..., metavar="IN.onnx", help="Trained model (never modified)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the compressed model."),
    method: Optional[str] = typer.Option(None, "--method", help="lowrank (Zhang et al.; the default), prune (He et al. LASSO + least squares), filter-std or filter-l1 (data-free ranking; refit with --calib), tucker2 (MUSCO: Tucker-2/SVD with weakened EVBMF ranks, least-squares refit instead of fine-tuning), spatial (every k x k conv as k x 1 then 1 x k, Jaderberg et al., fitted to the calibration data), or auto (prune then low-rank, the split measured; the default with --max-drop)."),
    speedup: Optional[float] = typer.Option(None, "--speedup", help="Target: whole-model MACs become at most original/SPEEDUP (with --max-drop: where the search starts; optional with --method tucker2: ranks then come from EVBMF alone)."),
    calib: Optional[list[str]] = typer.Option(None, "--calib", help="Calibration data: image folder, .npy/.npz, or name:file.npy (repeatable)."),
    preset: Optional[str] = opt.Preset,
    size: Optional[int] = opt.Size,
    resize: Optional[int] = opt.Resize,
    mean: Optional[str] = opt.Mean,
    std: Optional[str] = opt.Std,
    scale: Optional[float] = opt.Scale,
    channel_order: Optional[str] = opt.ChannelOrder,
    calib_size: int = opt.CalibSize,
    holdout: int = typer.Option(100, "--holdout", help="Samples of --calib set aside (not calibrated on) to measure the output difference."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write a JSON report here."),
    exclude: Optional[list[str]] = opt.Exclude,
    factorize_classifier: bool = opt.FactorizeClassifier,
    seed: int = opt.Seed,
    stages: int = typer.Option(0, "--calib-stages", help="Re-run the compressed model this many times for asymmetric inputs (0: auto)."),
    rows: int = opt.Rows,
    threads: int = typer.Option(0, "--threads", help="onnxruntime threads for calibration (0: all cores)."),
    solver: str = typer.Option("auto", "--solver", help="auto (ReLU-aware where a ReLU follows), linear, or svd (data-free baseline)."),
    symmetric: bool = typer.Option(False, "--symmetric", help="Take layer inputs from the original model (baseline; default is asymmetric)."),
    allocation: Optional[str] = typer.Option(None, "--allocation", help="Rank allocation under the budget: energy (default), uniform, sensitivity (each layer's rank grid, or each channel group's keep counts, measured at the output on held-out samples; the default with --max-drop and for --method prune), or vbmf (ranks proportional to each layer's weakened EVBMF rank, --vbmf-weaken)."),
    external_data: bool = typer.Option(False, "--external-data", help="Write weights to one OUT.data file beside the model (automatic over 2 GiB)."),
    round_to: Optional[int] = typer.Option(None, "--round-to", help="Pruning: kept channel counts are multiples of this (1, 4, 8, 16); default: --target's (4 without one)."),
    target: Optional[str] = typer.Option(None, "--target", help="Where the model will run (a name of `onnxopt build --list-targets`); sets --round-to and the factorisation ranks' grid alike: multiples of 8 for x86 with AVX2 (16 with AVX-512; `x86` is this CPU, `x86-avx2` / `x86-avx512` another; on x86 also fewer than that in multiples of 4, which onnxruntime reads unblocked) and CUDA, of 4 for ARM (NEON)."),
    selection: Optional[str] = typer.Option(None, "--selection", help="Channel pruning (prune, and auto's pruning): which channels stay: lasso (He et al.'s LASSO path; the default for prune) or greedy (backward elimination on the refit's residual; the default for auto)."),
    cost: str = typer.Option("macs", "--cost", help="What --speedup divides: macs, or latency (each layer timed in onnxruntime; never slower)."),
    max_drop: Optional[float] = typer.Option(None, "--max-drop", help="Instead of --speedup: the fastest model whose top-1 drop on --eval-data stays within this many points (searched)."),
    eval_data: Optional[Path] = opt.EvalData,
    eval_size: int = opt.EvalSize,
    labels: Optional[Path] = opt.Labels,
    label_offset: int = opt.LabelOffset,
    search_steps: int = typer.Option(7, "--search-steps", help="--max-drop: compressions tried at most."),
    vbmf_weaken: float = typer.Option(0.8, "--vbmf-weaken", help="tucker2 and --allocation vbmf: weakening factor w in (0,1] of the EVBMF ranks, rank = full - w (full - EVBMF) (1: EVBMF ranks as they are)."),
    sensitivity_grid: int = typer.Option(8, "--sensitivity-grid", help="--allocation sensitivity: ranks or keep counts measured per layer (the rest interpolated)."),
    sensitivity_folds: int = typer.Option(1, "--sensitivity-folds", help="--allocation sensitivity (prune, lowrank) and auto's per-layer choice: average each group's or layer's measured damages over this many folds of the calibration samples, each held out in turn (--holdout samples each; K times the measurement's time; README, K-fold damages)."),
    reconstruct: str = typer.Option("ls", "--reconstruct", help="ls (each method's layer-wise least squares), or block: then fit the blocks of the compressed model (--reconstruct-span), through their nonlinearities, to the original's block outputs on the calibration images (needs PyTorch: pip install 'onnxopt\\[reconstruct]')."),
    block_steps: int = typer.Option(300, "--reconstruct-steps", help="--reconstruct block: Adam steps per fitted stretch (--reconstruct-span)."),
    block_lr: float = typer.Option(1e-2, "--reconstruct-lr", help="--reconstruct block: each Conv/Gemm's Adam step size, relative to the RMS of its weights (cosine-annealed to 0 over --reconstruct-steps)."),
    block_span: str = typer.Option("stage", "--reconstruct-span", help="--reconstruct block: which consecutive blocks (residual blocks, Fire modules, a chain's layers) are fitted as one: stage (every block of one spatial size; measured best on ResNet-56, MobileNetV2 and SqueezeNet), or a number of blocks (1: each alone; more than the model has: the whole network at once)."),
    pool_early: str = typer.Option("auto", "--pool-early", help="Move a global average pooling ahead of the 1x1 convs that feed it, so they run on the 1x1 map (MobileNetV3's efficient last stage, not retrained; where it crosses an activation, a per-channel response fitted or not, whichever moves held-out outputs less): auto (--method auto weighs it against the unchanged head; other methods leave the head alone), yes (first, then the method compresses the rest of --speedup), or no."),
    compression_stages: int = typer.Option(1, "--stages", help="tucker2: MUSCO stages (decompose, refit, repeat on the result); with --speedup, stop once it is met. Not --calib-stages."),
) -> None:
    """Compress IN.onnx to a model with SPEEDUP times fewer MACs, calibrated on your data."""
    from onnxopt import tvm_backend
    from onnxopt.graph import load_model, save_model_atomic
    from onnxopt.pipeline import CompressOptions, check_selection
    from onnxopt.pipeline import compress as run_compress
    from onnxopt.report import compress_tables, search_table, write_json

    if max_drop is None and speedup is None and method != "tucker2":
        raise UserError("give --speedup S (S times fewer MACs) or --max-drop D with --eval-data DIR (the fastest model within D points)")
    if speedup is not None and speedup <= 1:
        raise UserError(f"--speedup must be greater than 1 (got {speedup:g}); 2 means half the MACs")
    if max_drop is not None and eval_data is None:
        raise UserError("--max-drop needs --eval-data DIR: labelled images, disjoint from --calib, to measure the drop on")
    if calib_size < 1:
        raise UserError(f"--calib-size must be at least 1 (got {calib_size})")
    _check_output_path(model_path, output)
    if report is not None:
        _check_output_path(model_path, report)
    grid = tvm_backend.channel_grid(target) if target else (4, 0)    # an unknown --target is refused here
    round_to, round_below = grid if round_to is None else (round_to, 0)    # an explicit --round-to: strict multiples
    rank_multiple, rank_below = grid                                        # factorisation ranks: the same grid
    if round_to < 1:
        raise UserError(f"--round-to must be at least 1 (got {round_to})")
    if block_steps < 1:
        raise UserError(f"--reconstruct-steps must be at least 1 (got {block_steps})")
    if not 0 < block_lr < 1:
        raise UserError(f"--reconstruct-lr must be a relative step size above 0 and below 1 (got {block_lr})")
    if block_span != "stage" and not (block_span.isdigit() and int(block_span) >= 1):
        raise UserError(f"--reconstruct-span must be stage or a whole number of at least 1 (got {block_span})")
    if sensitivity_grid < 2:
        raise UserError(f"--sensitivity-grid must be at least 2 (got {sensitivity_grid})")
    method = method or ("auto" if max_drop is not None else "lowrank")
    if sensitivity_folds != 1 and method not in FOLDED_METHODS:
        raise UserError(f"--sensitivity-folds is for --method {', '.join(FOLDED_METHODS)} (got --method {method}); drop it")
    # auto: backward elimination measured closer to the original than the LASSO path (README)
    selection = selection or ("greedy" if method == "auto" else "lasso")
    check_selection(selection)
    # prune: measured damages beat the local reconstruction errors on ResNet-56, SqueezeNet and MobileNetV2 (README)
    allocation = allocation or ("sensitivity" if max_drop is not None or (method == "prune" and calib) else "energy")
    model = load_model(model_path)
    prep = make_preprocess(preset, size, resize, mean, std, scale, channel_order)
    calib_data = holdout_data = source = None
    if calib:
        source = open_source(calib, model_inputs(model), prep)
        calib_data, holdout_data = split_source(source, calib_size, holdout, seed)
    elif not method.startswith("filter-"):
        raise UserError(f"--method {method} is data-driven: give calibration data with --calib (an image folder or .npz)")
    options = CompressOptions(speedup=speedup or (1.5 if max_drop is not None else None), method=method, exclude=list(exclude or []), seed=seed,
                              factorize_classifier=factorize_classifier,
                              rows_per_layer=rows, stages=stages, threads=threads, solver=solver,
                              asymmetric=not symmetric, allocation=allocation, cost=cost, round_to=round_to, round_below=round_below, selection=selection,
                              rank_multiple=rank_multiple, rank_below=rank_below,
                              vbmf_weaken=vbmf_weaken, compression_stages=compression_stages, sensitivity_grid=sensitivity_grid,
                              sensitivity_folds=sensitivity_folds, reconstruct=reconstruct, block_steps=block_steps, block_lr=block_lr,
                              block_span=block_span if block_span == "stage" else int(block_span), pool_early=pool_early)
    search = None
    bar, progress = _progress()
    with bar or nullcontext():
        if max_drop is None:
            result = run_compress(model, calib_data, holdout_data, options, progress)
        else:
            result, search = _search_max_drop(model, source, calib_data, holdout_data, options, progress, max_drop, eval_data,
                                              eval_size, labels, label_offset, search_steps, seed, prep)
    save_model_atomic(result.model, output, external_data=external_data)
    data = {"input": str(model_path), "output": str(output), "method": method, "allocation": allocation, "reconstruct": reconstruct, "speedup_target": speedup,
            **({"selection": selection} if method in ("prune", "auto") else {}),
            **({"sensitivity_folds": sensitivity_folds} if method in FOLDED_METHODS else {}),
            **({"round_to": round_to, "round_below": round_below} if method in ("prune", "auto", "filter-std", "filter-l1") else {}),
            **({"rank_multiple": rank_multiple, "rank_below": rank_below} if method in ("lowrank", "spatial", "auto") else {}),
            "target": target, "pool_early": pool_early,
            "preprocess": prep.describe(), "calib": " ".join(calib or []), "seed": seed, **result.to_json()}
    if search is not None:
        data["max_drop_search"] = search
    if report is not None:
        write_json(data, report)
    if not _state["quiet"]:
        out = Console()
        for table in compress_tables(result):
            out.print(table)
        if search is not None:
            out.print(search_table(search))
        out.print(f"wrote {output} ({result.macs_before / max(result.macs_after, 1):.2f}x fewer MACs)")


def _search_max_drop(model, source, calib_data, holdout_data, options, progress, max_drop: float, eval_data: Path,
                     eval_size: int, labels: Path | None, label_offset: int, steps: int, seed: int, prep):
    """``--max-drop``: search ``--speedup`` (``onnxopt.target_search``), measuring top-1 on ``eval_data``."""
    from dataclasses import replace

    from onnxopt.evaluate import accuracy, labelled_source, paired, refuse_overlap, top5
    from onnxopt.pipeline import compress as run_compress
    from onnxopt.target_search import Trial, search_speedup

    if source is None:
        raise UserError("--max-drop needs --calib data to compress with")
    eval_source, truth = labelled_source(eval_data, model_inputs(model), prep, labels, label_offset, eval_size, seed)
    refuse_overlap(source, eval_source, eval_data)
    base_top5 = top5(model, eval_source, truth, options.threads)
    base = accuracy(base_top5, truth).top1 * 100

    def try_speedup(speedup: float) -> Trial:
        result = run_compress(model, calib_data, holdout_data, replace(options, speedup=speedup), progress)
        measured = paired(top5(result.model, eval_source, truth, options.threads), base_top5, truth)
        return Trial(result, result.macs_before / max(result.macs_after, 1), measured.model.top1 * 100, measured.drop_se_points)

    def on_step(step) -> None:
        if not _state["quiet"]:
            verdict = "within" if step.within else "over"
            got = (f"{step.mac_speedup:.2f}x MACs, top-1 {step.top1:.2f}% (drop {step.drop:.2f} ± {step.drop_se:.2f}, {verdict})"
                   if step.drop is not None else step.note)
            console.print(f"--speedup {step.speedup:.3f}: {got}", highlight=False)

    result, walked = search_speedup(try_speedup, base, max_drop, start=options.speedup, steps=steps, on_step=on_step)
    return result, {"max_drop": max_drop, "eval_data": eval_source.description, "base_top1": base,
                    "steps": [step.to_json() for step in walked]}


def _check_output_path(model_path: Path, output: Path) -> None:
    if output.exists() and model_path.exists() and output.resolve() == model_path.resolve():
        raise UserError(f"output {output} is the input model; choose another -o path (the input is never overwritten)")
    if output.exists() and output.is_dir():
        raise UserError(f"output {output} is a directory; give a file path")
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        raise UserError(f"output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UserError(f"output folder {folder} is not writable; choose another -o path")   # before the work, not after


@app.command("eval")
def evaluate_command(
    model_path: Path = typer.Argument(..., metavar="MODEL.onnx"),
    data: Path = typer.Option(..., "--data", help="Labelled images: <folder>/<class>/<image>."),
    preset: Optional[str] = opt.Preset,
    size: Optional[int] = opt.Size,
    resize: Optional[int] = opt.Resize,
    mean: Optional[str] = opt.Mean,
    std: Optional[str] = opt.Std,
    scale: Optional[float] = opt.Scale,
    channel_order: Optional[str] = opt.ChannelOrder,
    labels: Optional[Path] = opt.Labels,
    label_offset: int = opt.LabelOffset,
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate a seeded random subset of N images."),
    seed: int = opt.Seed,
    threads: int = opt.Threads,
    baseline_path: Optional[Path] = typer.Option(None, "--baseline", metavar="ORIGINAL.onnx",
                                                 help="Also score this model on the same images: the top-1 drop, its paired standard error, the answers changed, and the mean KL divergence of the class distributions (baseline || model)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with top1, top5, n (and with --baseline: baseline, top1_drop_points, drop_se_points, lost, gained, top1_agreement, kl, kl_se)."),
) -> None:
    """Top-1/top-5 accuracy on a labelled image folder."""
    from onnxopt.evaluate import evaluate
    from onnxopt.graph import load_model
    from onnxopt.report import print_json

    model = load_model(model_path)
    baseline = None
    if baseline_path is not None:
        baseline = load_model(baseline_path)
        if model_inputs(baseline) != model_inputs(model):
            raise UserError(f"--baseline {baseline_path} takes other inputs than {model_path} "
                            f"({model_inputs(baseline)} against {model_inputs(model)}); compare a model with its original")
    prep = make_preprocess(preset, size, resize, mean, std, scale, channel_order)
    bar, progress = (None, None) if as_json else _progress()
    with bar or nullcontext():
        result = evaluate(model, model_inputs(model), data, prep, labels, label_offset, limit, seed, threads,
                          progress=progress, baseline=baseline)
    if as_json:
        print_json(result.to_json())
    elif baseline is None:
        Console().print(f"{model_path.name}: top-1 {result.top1:.2%}  top-5 {result.top5:.2%}  on {result.n} images")
    else:
        Console().print(f"{model_path.name}: top-1 {result.model.top1:.2%}  top-5 {result.model.top5:.2%}; "
                        f"{baseline_path.name}: top-1 {result.baseline.top1:.2%}  top-5 {result.baseline.top5:.2%}; on {result.model.n} images\n"
                        f"top-1 drop {result.drop_points:.2f} ± {result.drop_se_points:.2f} points (paired standard error): "
                        f"{result.lost} images lost, {result.gained} gained; the same top-1 class on {result.top1_agreement:.1%}; "
                        f"KL of the class distributions {result.kl:.4f} ± {result.kl_se:.4f}",
                        highlight=False)


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
    from onnxopt import analyze_cmd

    analyze_cmd.register(app)
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
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("interrupted; nothing written", highlight=False)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:             # typer turns KeyboardInterrupt into a silent exit 130
            console.print("interrupted; nothing written", highlight=False)
        raise
    except Exception as exc:
        if _state["debug"]:
            raise
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        console.print(f"[bold red]internal error:[/] {type(exc).__name__}: {escape(message)} (rerun with --debug for the traceback)",
                      highlight=False, soft_wrap=True)
        sys.exit(1)
