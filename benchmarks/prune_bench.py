"""Channel pruning on real models: He et al. against filter ranking at the same MACs, and auto.

For each model and budget, runs `onnxopt compress` (each in its own process: wall time and peak
RSS are the process's own) with:

  prune            He et al. 2017: LASSO channel selection + least-squares refit (asymmetric),
                   keep counts allocated by damage measured at the output (the default)
  prune+greedy     the same, channels selected by backward elimination on the refit's residual
  prune+energy     the same, keep counts allocated by the consumers' reconstruction error
  filter-std+ls    Li, Zhao, Han 2019 std ranking, consumers refit by least squares
  filter-l1+ls     Li et al. 2017 L1 ranking, refit
  filter-std       std ranking, data-free (no --calib: plain removal)
  filter-l1        L1 ranking, data-free
  auto             pruning (backward elimination) and low-rank, split globally or chosen per
                   layer, with and without the global pooling moved first (--pool-early), the
                   candidate measured on held-out samples
  prune+roundK     `prune` with kept channel counts in multiples of K (1, 8, 16; `prune` has 4):
                   what SIMD-friendly shapes are worth in latency, and cost in accuracy
  prune+x86        `prune --target x86`: multiples of this CPU's block (8 with AVX2, 16 with
                   AVX-512F), or fewer channels than that in multiples of 4
  prune+x86-avx2   `prune --target x86-avx2`: AVX2's grid (8, and 4) whatever this CPU has;
                   benchmarks/avx2_instructions.py counts what it costs on AVX2
  prune+block      `prune`, then each block fitted to the original's through its
  auto+block       nonlinearities (`--reconstruct block`, passes/block_fit.py); likewise `auto`
  prune+folds      `prune --sensitivity-folds 5`: each group's damage averaged over five
                   cross-fitted held-out folds; `+block` then the block fit, `+greedy` with
                   backward elimination; `auto+folds` likewise for auto's per-layer choice
  auto+no-pool     `auto --pool-early no`: the head left alone (auto before 2026-12-05)
  auto+x86         `auto --target x86`: channel counts and ranks on this CPU's SIMD grid
  prune+pool       `prune --pool-early yes`: the global pooling moved first, then pruning for the
                   rest of the budget; `+folds+block` with five folds and the block fit

All variants of a model share the --speedup, hence (up to rounding of the channel counts) the
same MACs: the value of reconstruction is the accuracy difference between `filter-*` and
`filter-*+ls`. Calibration uses training images only; evaluation:
../shared/data/cifar10/test for the CIFAR ResNets, the odd-class half of
../shared/data/imagenet-sample (``benchmarks/imagenet_split.py``) for ImageNet models, which
calibrate on the even half. onnxruntime latency is measured against the original in the same
run (batch 1 and 32, 1 thread, runs alternated). Prints a Markdown table, writes JSON; the drop
comes with its paired standard error (`onnxopt eval --baseline`).

    python benchmarks/prune_bench.py [--quick] [--out DIR] [--models ...] [--variants ...] [--seeds 0 1 2]

``--seeds``: each seed draws other calibration images (and held-out samples, sampled positions)
from the same calibration half; the evaluation images stay the same. With more than one, the
table ends with each (model, budget, variant, calibration size)'s mean drop over the seeds and
the standard error of that mean from the seeds' spread: one calibration draw moves the ImageNet drops by several points
(README), more than their paired standard errors say.

The JSON is written after every row; with ``--models`` or ``--variants``, rows of other
(model, variant) pairs already in it are kept, so the benchmark can be run in parts.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGENET_CALIB, ROOT, evaluate, latency_ratio, machine, markdown, models, onnxopt, prepare_data, run_measured  # noqa: E402

VARIANTS = {
    "prune": ["--method", "prune"],
    "prune+greedy": ["--method", "prune", "--selection", "greedy"],
    "prune+energy": ["--method", "prune", "--allocation", "energy"],
    "filter-std+ls": ["--method", "filter-std"],
    "filter-l1+ls": ["--method", "filter-l1"],
    "filter-std": ["--method", "filter-std"],          # without --calib: data-free
    "filter-l1": ["--method", "filter-l1"],
    "auto": ["--method", "auto"],
    "prune+round1": ["--method", "prune", "--round-to", "1"],     # `prune` keeps multiples of 4 (no --target)
    "prune+round8": ["--method", "prune", "--round-to", "8"],     # `--target x86` on AVX2 before 2026-12-04
    "prune+round16": ["--method", "prune", "--round-to", "16"],
    "prune+x86": ["--method", "prune", "--target", "x86"],
    "prune+x86-avx2": ["--method", "prune", "--target", "x86-avx2"],    # AVX2's grid on any machine (avx2_instructions.py counts it)
    "prune+block": ["--method", "prune", "--reconstruct", "block"],
    "prune+folds": ["--method", "prune", "--sensitivity-folds", "5"],       # damages over five cross-fitted folds
    "prune+folds+block": ["--method", "prune", "--sensitivity-folds", "5", "--reconstruct", "block"],
    "prune+greedy+folds+block": ["--method", "prune", "--selection", "greedy", "--sensitivity-folds", "5", "--reconstruct", "block"],
    "auto+block": ["--method", "auto", "--reconstruct", "block"],
    "auto+folds": ["--method", "auto", "--sensitivity-folds", "5"],         # the per-layer choice's damages over five folds
    "auto+no-pool": ["--method", "auto", "--pool-early", "no"],            # auto before --pool-early (2026-12-05)
    "auto+x86": ["--method", "auto", "--target", "x86"],                   # channel counts and ranks on this CPU's grid
    "prune+pool": ["--method", "prune", "--pool-early", "yes"],
    "prune+pool+folds+block": ["--method", "prune", "--pool-early", "yes", "--sensitivity-folds", "5", "--reconstruct", "block"],
}
ROUNDINGS = ["prune+round1", "prune+round8", "prune+round16", "prune+x86", "prune+x86-avx2"]
DATA_FREE = {"filter-std", "filter-l1"}
FILTERS = ["filter-std+ls", "filter-l1+ls", "filter-std", "filter-l1"]
FOLDS = ["prune+folds", "prune+folds+block"]

# model (benchmarks/common.py): (--speedup, variants, calibration images, --rows-per-layer, eval limit).
# ImageNet: the 280 calibration-half photos left after the held-out 70 (`--holdout 100` is capped
# at a fifth of the 350; until 2026-12-03 the benchmark drew 250 and left 30 unused). CIFAR-10 has
# 50,000 training images: ResNet-56 calibrates on 4,000 (`prune` at 2x, measured 2026-12-02 with
# the same code: drop 1.95, against 2.38 with 1,000 images and 8,192 rows).
MODELS = {
    # ResNet-56 at 2x is out of reach with multiples of 16 (its first stage has 16 channels)
    "cifar10_resnet56": (2.0, ["prune", "prune+greedy", "prune+energy", "auto", *FILTERS, "prune+round1", "prune+round8",
                               "prune+x86", "prune+x86-avx2", "prune+block", "auto+block", *FOLDS], 4000, 32768, None),
    "mobilenet_v2": (1.3, ["prune", "prune+greedy", "prune+energy", *FILTERS, *ROUNDINGS, "prune+block", *FOLDS,
                                 "prune+greedy+folds+block", "prune+pool", "prune+pool+folds+block"], IMAGENET_CALIB, 8192, None),
    "squeezenet1.1": (1.5, ["prune", "prune+greedy", "prune+energy", "auto", *FILTERS, "prune+block", "auto+block",
                                  "auto+folds", "auto+no-pool", "auto+x86"], IMAGENET_CALIB, 8192, None),
}
QUICK = {"cifar10_resnet20": (1.3, ["prune", "prune+block", "filter-l1+ls", "filter-l1"], 100, 8192, 200)}


def save(path: Path, kept: list[dict], rows: list[dict], quick: bool) -> None:
    """The JSON after every row. A partial run (--models/--variants) keeps the rows of other
    (model, variant) pairs already in the file, and those of another vector unit (``--round-to``'s
    latencies depend on it), so the benchmark can be run in parts and on several machines."""
    def key(row: dict) -> tuple:
        return row["model"], row["variant"], row.get("vector_unit"), row.get("seed") or 0

    done = {key(r) for r in rows}
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "quick": quick,
               "rows": [r for r in kept if key(r) not in done] + rows}
    path.write_text(json.dumps(summary, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20 at 1.3x, few images (< 2 min; CI).")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-prune", help="Where compressed models go.")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--variants", nargs="*", default=None)
    parser.add_argument("--reuse", action="store_true",
                        help="Evaluate models already compressed in --work (wall time: the report's total, no RSS).")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0],
                        help="Calibration draws (`onnxopt compress --seed`), each its own row.")
    args = parser.parse_args()
    table = QUICK if args.quick else MODELS
    names = args.models or list(table)
    specs = models()
    prepare_data([specs[name] for name in names])
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    path = args.out / ("prune_quick.json" if args.quick else "prune.json")
    kept = json.loads(path.read_text())["rows"] if (args.models or args.variants) and path.exists() else []
    rows = []
    for model_name in names:
        spec = specs[model_name]
        speedup, variants, calib_size, rows_per_layer, limit = {**MODELS, **QUICK}[model_name]
        variants = [v for v in variants if not args.variants or v in args.variants]
        print(f"{model_name}:", flush=True)
        for variant, seed in itertools.product(variants, args.seeds):
            stem = f"{model_name}_{variant}_{speedup:g}x" + (f"_seed{seed}" if seed else "")
            out, report = args.work / f"{stem}.onnx", args.work / f"{stem}.json"
            command = onnxopt("-q", "compress", spec.path, "-o", out, "--speedup", speedup, "--preset", spec.preset,
                              "--report", report, "--seed", seed, *VARIANTS[variant])
            if variant not in DATA_FREE:
                command += ["--calib", str(spec.calib), "--calib-size", str(calib_size), "--rows-per-layer", str(rows_per_layer)]
            if args.reuse and out.exists() and report.exists():
                result = subprocess.CompletedProcess(command, 0)
                wall, peak_mb = json.loads(report.read_text())["timings_s"]["total"], None
            else:
                result, wall, peak_mb = run_measured(command)
            if result.returncode != 0:
                print(f"  {variant} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}", flush=True)
                continue
            data = json.loads(report.read_text())
            accuracy = evaluate(out, spec, limit, baseline=spec.path)
            latency = {batch: latency_ratio(out, spec.path, batch) for batch in (32, 1)}
            mac_ratio = data["macs_before"] / data["macs_after"]
            row = {
                "model": model_name, "speedup_target": speedup, "variant": variant, "seed": seed, "date": time.strftime("%Y-%m-%d"),
                "cpu": machine()["cpu"], "vector_unit": machine()["vector_unit"],
                "mac_ratio": mac_ratio,
                "params_ratio": data["params_before"] / data["params_after"],
                "top1": accuracy["top1"], "top1_original": accuracy["baseline"]["top1"],     # the same images, the same run
                "top1_drop_points": accuracy["top1_drop_points"], "drop_se_points": accuracy["drop_se_points"],
                "top1_agreement": accuracy["top1_agreement"], "kl": accuracy["kl"], "kl_se": accuracy["kl_se"],
                "latency_speedup_b32": latency[32]["speedup"], "latency_speedup_b1": latency[1]["speedup"],
                "compress_wall_s": wall, "compress_peak_rss_mb": peak_mb,
                "eval_images": accuracy["n"], "calib_images": 0 if variant in DATA_FREE else calib_size,
                "rows_per_layer": None if variant in DATA_FREE else rows_per_layer,
                "holdout_relative_l2": data["verification"]["relative_l2"],
            }
            if "auto" in data:
                row["auto"] = data["auto"]
            rows.append(row)
            save(path, kept, rows, args.quick)
            print(f"  {variant:14s} seed {seed} top-1 {accuracy['top1']:.4f} (original {row['top1_original']:.4f}, drop {row['top1_drop_points']:.2f} ± {row['drop_se_points']:.2f}) MACs {mac_ratio:.2f}x  "
                  f"latency b32 {row['latency_speedup_b32']:.2f}x b1 {row['latency_speedup_b1']:.2f}x  {wall:.0f} s", flush=True)
    print()
    all_rows = json.loads(path.read_text())["rows"] if path.exists() else []
    print(markdown(all_rows,
                   [("model", "model", "s"), ("target", "speedup_target", "g"), ("variant", "variant", "s"), ("seed", "seed", "d"), ("SIMD", "vector_unit", "s"),
                    ("MACs ratio", "mac_ratio", ".2f"), ("top-1", "top1", ".4f"), ("orig.", "top1_original", ".4f"),
                    ("drop (pts)", "top1_drop_points", ".2f"), ("± s.e.", "drop_se_points", ".2f"), ("KL", "kl", ".4f"), ("ORT speed-up b1", "latency_speedup_b1", ".2f"),
                    ("b32", "latency_speedup_b32", ".2f"), ("time (s)", "compress_wall_s", ".0f"),
                    ("peak RSS (MB)", "compress_peak_rss_mb", ".0f")]))
    over_seeds = seed_means(all_rows)
    if over_seeds:
        print()
        print(markdown(over_seeds, [("model", "model", "s"), ("target", "speedup_target", "g"), ("variant", "variant", "s"),
                                    ("calibration images", "calib_images", "d"), ("seeds", "seeds", "s"), ("drops (pts)", "drops", "s"),
                                    ("mean drop", "mean_drop", ".2f"), ("± s.e. over seeds", "mean_drop_se", ".2f")]))


def seed_means(rows: list[dict]) -> list[dict]:
    """Each (model, budget, variant, calibration size) measured with more than one seed: its
    drops, their mean and the standard error of the mean from their spread (``std(ddof=1) /
    sqrt(n)``). Rows without a seed were seed 0; of two rows of one seed (two machines: the
    latency differs, not the model) the later counts."""
    runs: dict[tuple, dict[int, dict]] = {}
    for row in sorted(rows, key=lambda r: r["date"]):
        key = row["model"], row["speedup_target"], row["variant"], row["calib_images"]
        runs.setdefault(key, {})[row.get("seed") or 0] = row
    means = []
    for (model, target, variant, images), by_seed in runs.items():
        if len(by_seed) > 1:
            seeds = sorted(by_seed)
            drops = [by_seed[seed]["top1_drop_points"] for seed in seeds]
            means.append({"model": model, "speedup_target": target, "variant": variant, "calib_images": images,
                          "seeds": " ".join(map(str, seeds)), "drops": " / ".join(f"{d:.2f}" for d in drops),
                          "mean_drop": statistics.mean(drops), "mean_drop_se": statistics.stdev(drops) / math.sqrt(len(drops))})
    return means


if __name__ == "__main__":
    main()
