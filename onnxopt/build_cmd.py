"""`onnxopt build`: compile an ONNX model with Apache TVM for a target, optionally tuned.

All TVM work happens in :mod:`onnxopt.tvm_backend`; this module only parses options and
shows progress and results. ``register(app)`` adds the command to the onnxopt CLI.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from onnxopt.errors import UserError

STAGE_LABELS = {"import": "importing ONNX into TVM relax", "tune": "tuning (meta_schedule)",
                "compile": "compiling", "export": "linking the library"}


def parse_input_shape(spec: str) -> tuple[str, tuple[int, ...]]:
    """``name:1,3,224,224`` -> ("name", (1, 3, 224, 224)). The name may itself contain ':'."""
    name, sep, dims = spec.rpartition(":")
    if not sep or not name or not dims:
        raise UserError(f"--input-shape must look like NAME:1,3,224,224, got {spec!r}")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise UserError(f"--input-shape {spec!r}: dimensions must be positive integers separated by commas") from None
    if any(d < 1 for d in shape):
        raise UserError(f"--input-shape {spec!r}: dimensions must be positive integers")
    return name, shape


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, shape = parse_input_shape(spec)
        if name in shapes:
            raise UserError(f"--input-shape given twice for input {name!r}")
        shapes[name] = shape
    return shapes


def _quiet() -> bool:
    try:
        from onnxopt import cli  # noqa: PLC0415  (the root callback keeps --quiet there)
    except ImportError:
        return False
    return bool(getattr(cli, "_state", {}).get("quiet", False))


class _Display:
    """Turns backend events into a rich spinner per stage and a bar over tuning trials."""

    def __init__(self, console: Console, enabled: bool) -> None:
        self.console = console
        self.enabled = enabled
        self.progress: Progress | None = None
        self.stage_task = None
        self.trial_task = None

    def __enter__(self) -> _Display:
        if self.enabled:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, kind: str, data: dict) -> None:
        if self.progress is None:
            return
        if kind == "stage":
            label = STAGE_LABELS.get(data["name"], data["name"])
            if self.stage_task is None:
                self.stage_task = self.progress.add_task(label, total=None)
            else:
                self.progress.update(self.stage_task, description=label)
        elif kind == "tasks":
            self.trial_task = self.progress.add_task(f"trials over {len(data['tasks'])} tasks", total=data["total_trials"])
        elif kind == "trials" and self.trial_task is not None:
            best = data.get("best_us")
            note = f" (best {best:.1f} us)" if best is not None else ""
            self.progress.update(self.trial_task, completed=data["done"],
                                 description=f"tuning {data['task']}{note}")


def _tuning_table(report) -> Table:
    table = Table(title=f"tuning: {report.trials_run} trials in {report.seconds:.0f} s"
                        + (f" ({report.seconds_per_trial:.1f} s/trial)" if report.seconds_per_trial else "")
                        + f", runner {report.runner}")
    table.add_column("task", overflow="fold")
    table.add_column("weight", justify="right")
    table.add_column("trials", justify="right")
    table.add_column("in db", justify="right")
    table.add_column("best", justify="right")
    for task in report.tasks:
        table.add_row(task.name, str(task.weight), str(task.trials_this_run), str(task.trials),
                      f"{task.best_us:.1f} us" if task.best_us is not None else "-")
    return table


def build(
    model_path: Path = typer.Argument(..., metavar="MODEL.onnx", help="ONNX model to compile (never modified)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: model.so + manifest.json (replaced atomically)."),
    target: Optional[str] = typer.Option(None, "--target", "-t",
                                         help="x86 (default: this CPU), x86-avx2, x86-avx512, aarch64, armv7, rpi3, rpi4, rpi5, cuda, jetson-nano, "
                                              "jetson-xavier, jetson-orin; see --list-targets."),
    target_json: Optional[str] = typer.Option(None, "--target-json",
                                              help='A full TVM target dict instead of --target, e.g. '
                                                   '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}\'.'),
    cuda_arch: Optional[str] = typer.Option(None, "--cuda-arch", help="CUDA arch for CUDA targets, e.g. sm_80 (default), sm_87."),
    input_shape: Optional[list[str]] = typer.Option(None, "--input-shape",
                                                    help="NAME:1,3,224,224 fixes an input's shape for this build (repeatable)."),
    batch: int = typer.Option(1, "--batch", "-b", min=1, help="Value of a symbolic batch dimension (when --input-shape does not give it)."),
    tune_trials: int = typer.Option(0, "--tune-trials", min=0,
                                    help="meta_schedule trials per task (0: no tuning; a database in --tune-dir is still applied)."),
    tune_dir: Optional[Path] = typer.Option(None, "--tune-dir", help="Tuning database directory, reused and extended by later builds."),
    rpc: Optional[str] = typer.Option(None, "--rpc", help="HOST:PORT of a TVM RPC tracker: measure tuning candidates on that device."),
    rpc_key: Optional[str] = typer.Option(None, "--rpc-key", help="Device key registered with the RPC tracker."),
    check: bool = typer.Option(True, "--check/--no-check",
                               help="Compare outputs with onnxruntime on random inputs (host builds only)."),
    bench: bool = typer.Option(False, "--bench", help="Time TVM against onnxruntime after building (host builds, 1 thread)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest (plus check/bench results) as JSON."),
    list_targets: bool = typer.Option(False, "--list-targets", help="List the target names and exit."),
) -> None:
    """Compile MODEL.onnx with Apache TVM into OUT/model.so (+ OUT/manifest.json), optionally tuned."""
    from onnxopt import tvm_backend  # noqa: PLC0415  (imports tvm lazily itself)

    out_console = Console()
    console = Console(stderr=True)
    if list_targets:
        table = Table(title="onnxopt build targets")
        table.add_column("name")
        table.add_column("meaning")
        for name, description in tvm_backend.known_targets().items():
            table.add_row(name, description)
        out_console.print(table)
        return

    if rpc_key and not rpc:
        raise UserError("--rpc-key needs --rpc HOST:PORT")
    rpc_config = tvm_backend.RpcConfig.parse(rpc, rpc_key) if rpc else None
    shapes = parse_input_shapes(input_shape)
    target_name = target if (target or target_json) else "x86"

    quiet = _quiet() or as_json
    with _Display(console, enabled=not quiet) as display:
        result = tvm_backend.compile_model(
            model_path, target_name, out_dir=out, input_shapes=shapes, batch=batch, tune_trials=tune_trials,
            tune_dir=tune_dir, rpc=rpc_config, cuda_arch=cuda_arch, target_json=target_json, on_event=display)

    extra: dict = {}
    runs_here = result.target.runs_on_this_machine
    if check and runs_here:
        extra["max_abs_diff_vs_onnxruntime"] = tvm_backend.compare_with_onnxruntime(model_path, result)
    if bench:
        if not runs_here:
            raise UserError(f"--bench runs on this machine only; {result.target.name!r} builds run on their device")
        latency = tvm_backend.compare_latency(model_path, result, threads=1)
        extra["latency_ms"] = {name: seconds * 1e3 for name, seconds in latency.items()}

    if as_json:
        print(json.dumps({**result.manifest, **extra}, indent=2))
        return
    if result.tuning is not None and not _quiet():
        out_console.print(_tuning_table(result.tuning))
    for warning in result.warnings:
        console.print(Panel(warning, title="warning", border_style="bold yellow"), highlight=False)
    shapes_text = ", ".join(f"{i.name}{list(i.shape)}" for i in result.inputs)
    tuned = (f"tuned: {result.manifest['tuned_kernels']}/{result.manifest['kernels']} kernels from {result.manifest['tuning_database']}"
             if result.tuned else "UNTUNED")
    out_console.print(f"built {result.library} for {result.target.name} ({result.target.kind}), {shapes_text}, {tuned}",
                      highlight=False, soft_wrap=True)
    out_console.print(f"manifest {result.manifest_path}", highlight=False, soft_wrap=True)
    if "max_abs_diff_vs_onnxruntime" in extra:
        out_console.print(f"check: max abs diff vs onnxruntime {extra['max_abs_diff_vs_onnxruntime']:.3g} (random inputs)",
                          highlight=False)
    if "latency_ms" in extra:
        ms = extra["latency_ms"]
        out_console.print(f"latency (median, 1 thread): TVM {ms['tvm']:.3f} ms, onnxruntime {ms['onnxruntime']:.3f} ms "
                          f"-> TVM is {ms['onnxruntime'] / ms['tvm']:.2f}x onnxruntime's speed", highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``build`` command to the onnxopt CLI."""
    app.command("build")(build)
