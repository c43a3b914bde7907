"""Are factorised layers scheduled well by TVM? Single-layer models, tuned TVM vs onnxruntime.

For each layer shape (batch 1, a 3x3 conv with bias, stride 1, pad 1) it builds:

  original     Conv k x k, c -> d
  lowrank-rR   Zhang et al.: Conv k x k, c -> R (no bias), then Conv 1 x 1, R -> d (bias);
               made by ``onnxopt.passes.lowrank.rewrite``, exactly what ``compress`` emits
  spatial-rR   Conv k x 1, c -> R (no bias), then Conv 1 x k, R -> d (bias)
               (Jaderberg et al.'s vertical/horizontal decomposition)
  gather-pP    Gather(axis=1) keeping P% of the c input channels, then Conv k x k, P%c -> d:
               an input-channel sampler in front of a pruned consumer
  kept-pP      the same conv on an input that has only the kept channels (no Gather)

MACs per sample (H x W output): original ``HW d c k^2``; lowrank ``HW (R c k^2 + d R)``;
spatial ``HW (R c k + d R k)``; gather/kept ``HW d (P c) k^2``.

Every model is compiled with TVM for this machine (``onnxopt.tvm_backend.compile_model``) and
tuned with meta_schedule, the same number of trials per task for every model, one database per
model under ``--tune-dir`` (reused when present: re-running only re-applies it). Latency of TVM
and onnxruntime (1 thread, batch 1) is measured in rounds: each round times every model of a
shape, the two runtimes interleaved run by run; the reported figure is the median over rounds
of each round's median. The compiled kernels (fused PrimFuncs) of every model are listed, which
shows whether TVM fuses the k x k -> 1 x 1 pair or the Gather into the conv. Prints a Markdown
table and writes JSON.

    python benchmarks/tvm_factorized.py [--trials 12] [--tune-dir .cache/tvm-factorized] [--out benchmarks/results]
    python benchmarks/tvm_factorized.py --quick --out out/tvm-quick     # untuned, tiny, < 1 min
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper, numpy_helper

from onnxopt import tvm_backend
from onnxopt.graph import export, import_graph
from onnxopt.layers import find_layers
from onnxopt.passes import lowrank

ROOT = Path(__file__).resolve().parents[1]
OPSET = 17
IR_VERSION = 8


@dataclasses.dataclass(frozen=True)
class Shape:
    """A k x k conv, c -> d channels, on an H x W input (stride 1, 'same' padding)."""

    name: str
    c: int
    d: int
    hw: int
    k: int = 3


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    kind: str       # original | lowrank | spatial | gather | kept
    rank: int = 0   # lowrank / spatial
    keep: float = 1.0  # gather / kept: fraction of input channels


FULL_SHAPES = (Shape("64->64 @16x16", 64, 64, 16), Shape("64->64 @56x56", 64, 64, 56))
FULL_VARIANTS = (Variant("original", "original"),
                 Variant("lowrank-r16", "lowrank", rank=16), Variant("lowrank-r32", "lowrank", rank=32),
                 Variant("spatial-r32", "spatial", rank=32),
                 Variant("gather-p50", "gather", keep=0.5), Variant("kept-p50", "kept", keep=0.5))
QUICK_SHAPES = (Shape("16->16 @8x8", 16, 16, 8),)
QUICK_VARIANTS = (Variant("original", "original"), Variant("lowrank-r4", "lowrank", rank=4),
                  Variant("spatial-r8", "spatial", rank=8), Variant("gather-p50", "gather", keep=0.5),
                  Variant("kept-p50", "kept", keep=0.5))


def kept_channels(shape: Shape, variant: Variant) -> int:
    return max(1, round(shape.c * variant.keep))


def macs(shape: Shape, variant: Variant) -> int:
    hw, c, d, k, r = shape.hw * shape.hw, shape.c, shape.d, shape.k, variant.rank
    if variant.kind == "original":
        return hw * d * c * k * k
    if variant.kind == "lowrank":
        return hw * (r * c * k * k + d * r)
    if variant.kind == "spatial":
        return hw * (r * c * k + d * r * k)
    return hw * d * kept_channels(shape, variant) * k * k


def _conv(name: str, x: str, y: str, weight: np.ndarray, bias: np.ndarray | None, pads: list[int]) -> tuple[onnx.NodeProto, list]:
    inits = [numpy_helper.from_array(weight.astype(np.float32), f"{name}.w")]
    inputs = [x, f"{name}.w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias.astype(np.float32), f"{name}.b"))
        inputs.append(f"{name}.b")
    node = helper.make_node("Conv", inputs, [y], name=name, kernel_shape=list(weight.shape[2:]), pads=pads)
    return node, inits


def _model(nodes: list, inits: list, in_channels: int, shape: Shape) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "layer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, in_channels, shape.hw, shape.hw])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, shape.d, shape.hw, shape.hw])],
        initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="tvm_factorized")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    return np.linalg.qr(rng.standard_normal((rows, cols)))[0]


def build_model(shape: Shape, variant: Variant, seed: int = 0) -> onnx.ModelProto:
    """The single-layer ONNX model of one variant (random weights; latency does not depend on them)."""
    rng = np.random.default_rng(seed)
    c, d, k, p = shape.c, shape.d, shape.k, shape.k // 2
    weight = rng.standard_normal((d, c, k, k)) * np.sqrt(2.0 / (c * k * k))
    bias = rng.standard_normal(d) * 0.1
    if variant.kind in ("original", "lowrank"):
        node, inits = _conv("conv", "x", "y", weight, bias, [p] * 4)
        model = _model([node], inits, c, shape)
        if variant.kind == "original":
            return model
        graph = import_graph(model)
        layer = find_layers(graph)[0]
        fact = lowrank.Factorization(project=_orthonormal(rng, d, variant.rank), expand=_orthonormal(rng, d, variant.rank),
                                     bias=np.zeros(d), solver="random")
        lowrank.rewrite(graph, layer, fact)
        return export(graph, model)
    if variant.kind == "spatial":
        r = variant.rank
        vertical, inits_v = _conv("conv_kx1", "x", "mid", rng.standard_normal((r, c, k, 1)) * np.sqrt(2.0 / (c * k)),
                                  None, [p, 0, p, 0])
        horizontal, inits_h = _conv("conv_1xk", "mid", "y", rng.standard_normal((d, r, 1, k)) * np.sqrt(2.0 / (r * k)),
                                    bias, [0, p, 0, p])
        return _model([vertical, horizontal], inits_v + inits_h, c, shape)
    kept = np.sort(rng.choice(c, kept_channels(shape, variant), replace=False))
    if variant.kind == "kept":
        node, inits = _conv("conv", "x", "y", weight[:, kept], bias, [p] * 4)
        return _model([node], inits, len(kept), shape)
    gather = helper.make_node("Gather", ["x", "kept"], ["sampled"], name="sampler", axis=1)
    node, inits = _conv("conv", "sampled", "y", weight[:, kept], bias, [p] * 4)
    return _model([gather, node], [numpy_helper.from_array(kept.astype(np.int64), "kept")] + inits, c, shape)


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text).strip("_")


def build_all(shapes, variants, trials: int, tune_dir: Path | None, work: Path, log) -> list[dict]:
    rows = []
    for shape in shapes:
        for variant in variants:
            model_path = work / f"{_slug(shape.name)}__{variant.name}.onnx"
            onnx.save(build_model(shape, variant), model_path)
            db = tune_dir / _slug(shape.name) / variant.name if tune_dir is not None else None
            reuse = db is not None and tvm_backend.has_database(db)
            start = time.perf_counter()
            built = tvm_backend.compile_model(model_path, "x86", out_dir=work / f"{model_path.stem}_build",
                                              tune_trials=0 if reuse or db is None else trials, tune_dir=db)
            seconds = time.perf_counter() - start
            manifest = built.manifest
            rows.append({
                "shape": shape.name, "variant": variant.name, "kind": variant.kind, "rank": variant.rank or None,
                "keep": variant.keep if variant.kind in ("gather", "kept") else None,
                "model": str(model_path), "build": str(built.out_dir),
                "macs": macs(shape, variant), "kernels": manifest["kernel_names"],
                "tuned_kernels": manifest["tuned_kernels"], "tuned": manifest["tuned"],
                "tuning_trials_this_run": built.tuning.trials_run if built.tuning else 0,
                "tuning_database_reused": reuse, "build_seconds": round(seconds, 1),
                "max_abs_diff_vs_ort": tvm_backend.compare_with_onnxruntime(model_path, built),
            })
            tuning = "reused database" if reuse else f"{rows[-1]['tuning_trials_this_run']} trials"
            log(f"{shape.name:>14} {variant.name:<12} kernels {len(rows[-1]['kernels'])} "
                f"({', '.join(rows[-1]['kernels'])}); {tuning}; {seconds:.0f} s")
    return rows


def time_all(rows: list[dict], rounds: int, repeats: int) -> None:
    """Median over rounds of (TVM, onnxruntime) medians; every model timed once per round."""
    samples = {id(row): [] for row in rows}
    for _ in range(rounds):
        for row in rows:
            times = tvm_backend.compare_latency(row["model"], row["build"], threads=1, repeats=repeats, warmup=3)
            samples[id(row)].append((times["tvm"], times["onnxruntime"]))
    for row in rows:
        tvm_times, ort_times = zip(*samples[id(row)])
        row["tvm_ms"] = float(np.median(tvm_times)) * 1e3
        row["ort_ms"] = float(np.median(ort_times)) * 1e3


def add_ratios(rows: list[dict]) -> None:
    for row in rows:
        base = next(r for r in rows if r["shape"] == row["shape"] and r["kind"] == "original")
        row["macs_ratio"] = row["macs"] / base["macs"]
        row["ort_speedup"] = base["ort_ms"] / row["ort_ms"]
        row["tvm_speedup"] = base["tvm_ms"] / row["tvm_ms"]
        row["tvm_over_ort"] = row["tvm_ms"] / row["ort_ms"]


def table(rows: list[dict]) -> str:
    lines = ["| shape | variant | MACs vs original | kernels | ORT ms | ORT speed-up | TVM ms | TVM speed-up | TVM ÷ ORT latency |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['variant']} | {r['macs_ratio']:.2f} | {len(r['kernels'])} | {r['ort_ms']:.3f} | "
                     f"{r['ort_speedup']:.2f}x | {r['tvm_ms']:.3f} | {r['tvm_speedup']:.2f}x | {r['tvm_over_ort']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="untuned, one tiny shape, few runs (checks the script works)")
    parser.add_argument("--trials", type=int, default=12, help="meta_schedule trials per task, the same for every model")
    parser.add_argument("--tune-dir", type=Path, default=ROOT / ".cache" / "tvm-factorized",
                        help="one tuning database per model under this folder, reused when present")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per runtime per model per round")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args(argv)

    shapes, variants = (QUICK_SHAPES, QUICK_VARIANTS) if args.quick else (FULL_SHAPES, FULL_VARIANTS)
    trials = 0 if args.quick else args.trials
    rounds, repeats = (2, 5) if args.quick else (args.rounds, args.repeats)
    tune_dir = None if args.quick else args.tune_dir.resolve()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tvm_factorized_") as scratch:
        rows = build_all(shapes, variants, trials, tune_dir, Path(scratch), lambda msg: print(msg, file=sys.stderr, flush=True))
        time_all(rows, rounds, repeats)
    add_ratios(rows)
    for row in rows:
        del row["model"], row["build"]
    print(table(rows))
    result = {
        "benchmark": "tvm_factorized", "quick": args.quick, "trials_per_task": trials,
        "rounds": rounds, "repeats_per_round": repeats, "threads": 1, "batch": 1,
        "machine": platform.processor() or platform.machine(), "tvm_version": tvm_backend.tvm_version(),
        "wall_seconds": round(time.perf_counter() - start, 1), "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tvm_factorized.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
