"""Low-rank compression of the CIFAR-10 ResNets: solvers side by side at the same MACs.

For each model and budget, runs `onnxopt compress` (each in its own process, so that wall time
and peak RSS are the process's own) with:

  svd            data-free truncated SVD of the weights (baseline)
  linear-sym     linear response reconstruction, inputs from the original model (PCA)
  linear-asym    linear, asymmetric (inputs from the compressed model)
  relu-sym       ReLU-aware solver, symmetric
  relu-asym      ReLU-aware, asymmetric: onnxopt's default
  relu-asym-uniform   the default solver with uniform ranks instead of the energy allocation
  relu-asym-sensitivity   the default solver with ranks from measured per-layer sensitivity

The first five variants share the rank allocation (energy criterion), hence the same MACs.
Each model is evaluated on ../shared/data/cifar10/test (calibration draws from .../train), and
its onnxruntime latency is measured against the original in the same run (batch 32 and 1,
1 thread, runs alternated). Prints a Markdown table and writes JSON.

    python benchmarks/lowrank_cifar.py [--quick] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

VARIANTS = {
    "svd": ["--solver", "svd"],
    "linear-sym": ["--solver", "linear", "--symmetric"],
    "linear-asym": ["--solver", "linear"],
    "relu-sym": ["--symmetric"],
    "relu-asym": [],
    "relu-asym-uniform": ["--allocation", "uniform"],
    "relu-asym-sensitivity": ["--allocation", "sensitivity"],
}


def run_measured(args: list[str]) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run a command; return it with its wall seconds and its own peak RSS in MB (os.wait4)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(args, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        result = subprocess.CompletedProcess(args, os.waitstatus_to_exitcode(status), out.read(), err.read())
    return result, wall, usage.ru_maxrss / 1024


def onnxopt(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnxopt", *args]


def evaluate(model: Path, test: Path, limit: int | None) -> dict:
    args = ["eval", str(model), "--data", str(test), "--preset", "cifar10", "--json"]
    if limit:
        args += ["--limit", str(limit)]
    result = subprocess.run(onnxopt(*args), capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def latency_ratio(model: Path, baseline: Path, batch: int) -> dict:
    result = subprocess.run(onnxopt("bench", str(model), "--baseline", str(baseline), "--batch", str(batch),
                                    "--threads", "1", "--runs", "20", "--json"), capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, one budget, few images (CI).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-models", help="Where compressed models go.")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--speedups", nargs="*", type=float, default=None)
    parser.add_argument("--variants", nargs="*", default=None)
    args = parser.parse_args()
    if not (SHARED / "models").is_dir():
        sys.exit("benchmarks need ../shared (reference models and CIFAR-10 images next to the repository)")
    models = args.models or (["cifar10_resnet20"] if args.quick else ["cifar10_resnet56"])
    speedups = args.speedups or ([1.5] if args.quick else [1.5, 2.0])
    variants = args.variants or (["svd", "linear-asym", "relu-asym"] if args.quick else list(VARIANTS))
    calib_size = 200 if args.quick else 2000
    eval_limit = 500 if args.quick else None
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    test = SHARED / "data/cifar10/test"
    train = SHARED / "data/cifar10/train"
    rows = []
    for model_name in models:
        original = SHARED / "models" / f"{model_name}.onnx"
        base_accuracy = evaluate(original, test, eval_limit)
        print(f"{model_name}: original top-1 {base_accuracy['top1']:.4f} on {base_accuracy['n']} test images", flush=True)
        for speedup in speedups:
            for variant in variants:
                out = args.work / f"{model_name}_{variant}_{speedup:g}x.onnx"
                report = args.work / f"{model_name}_{variant}_{speedup:g}x.json"
                command = onnxopt("-q", "compress", str(original), "-o", str(out), "--speedup", str(speedup),
                                  "--calib", str(train), "--preset", "cifar10", "--calib-size", str(calib_size),
                                  "--report", str(report), *VARIANTS[variant])
                result, wall, peak_mb = run_measured(command)
                if result.returncode != 0:
                    print(f"  {variant} {speedup}x failed: {result.stderr.strip().splitlines()[-1]}", flush=True)
                    continue
                data = json.loads(report.read_text())
                accuracy = evaluate(out, test, eval_limit)
                latency = {batch: latency_ratio(out, original, batch) for batch in (32, 1)}
                mac_ratio = data["macs_before"] / data["macs_after"]
                row = {
                    "model": model_name, "speedup_target": speedup, "variant": variant,
                    "mac_ratio": mac_ratio, "params_ratio": data["params_before"] / data["params_after"],
                    "top1": accuracy["top1"], "top1_original": base_accuracy["top1"],
                    "top1_drop_points": 100 * (base_accuracy["top1"] - accuracy["top1"]),
                    "latency_speedup_b32": latency[32]["speedup"], "latency_speedup_b1": latency[1]["speedup"],
                    "realized_over_mac_b32": latency[32]["speedup"] / mac_ratio,
                    "compress_wall_s": wall, "compress_peak_rss_mb": peak_mb,
                    "eval_images": accuracy["n"], "calib_images": calib_size,
                }
                row["layers"] = [{k: layer[k] for k in ("name", "rank", "full_rank", "solver")} for layer in data["layers"]]
                rows.append(row)
                print(f"  {speedup:g}x {variant:18s} top-1 {accuracy['top1']:.4f} (drop {row['top1_drop_points']:.2f}) "
                      f"MACs {mac_ratio:.2f}x  latency b32 {row['latency_speedup_b32']:.2f}x b1 {row['latency_speedup_b1']:.2f}x  "
                      f"{wall:.0f} s  {peak_mb:.0f} MB", flush=True)
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        machine["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "quick": args.quick, "rows": rows}
    (args.out / ("lowrank_quick.json" if args.quick else "lowrank_cifar.json")).write_text(json.dumps(summary, indent=2) + "\n")
    header = "| model | target | variant | MACs ratio | top-1 | drop (pts) | ORT speed-up b32 | b1 | speed-up ÷ MAC ratio | time (s) | peak RSS (MB) |"
    print()
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for r in rows:
        print(f"| {r['model']} | {r['speedup_target']:g}x | {r['variant']} | {r['mac_ratio']:.2f} | {r['top1']:.4f} | "
              f"{r['top1_drop_points']:.2f} | {r['latency_speedup_b32']:.2f} | {r['latency_speedup_b1']:.2f} | "
              f"{r['realized_over_mac_b32']:.2f} | {r['compress_wall_s']:.0f} | {r['compress_peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
