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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, SHARED, evaluate, latency_ratio, machine, models, onnxopt, run_measured  # noqa: E402

VARIANTS = {
    "svd": ["--solver", "svd"],
    "linear-sym": ["--solver", "linear", "--symmetric"],
    "linear-asym": ["--solver", "linear"],
    "relu-sym": ["--symmetric"],
    "relu-asym": [],
    "relu-asym-uniform": ["--allocation", "uniform"],
    "relu-asym-sensitivity": ["--allocation", "sensitivity"],
}


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
    names = args.models or (["cifar10_resnet20"] if args.quick else ["cifar10_resnet56"])
    speedups = args.speedups or ([1.5] if args.quick else [1.5, 2.0])
    variants = args.variants or (["svd", "linear-asym", "relu-asym"] if args.quick else list(VARIANTS))
    calib_size = 200 if args.quick else 2000
    eval_limit = 500 if args.quick else None
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    train = SHARED / "data/cifar10/train"
    rows = []
    specs = models()
    for model_name in names:
        original = SHARED / "models" / f"{model_name}.onnx"
        base_accuracy = evaluate(original, specs[model_name], eval_limit)
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
                accuracy = evaluate(out, specs[model_name], eval_limit)
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
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "quick": args.quick, "rows": rows}
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
