"""Choosing how much to compress each layer: allocations side by side, `--max-drop`, `analyze`.

Three parts, each optional (``--parts``):

  allocation  the same model and `--speedup` with each `--allocation` (energy: Zhang et al.'s
              PCA energy; uniform: one ratio for every layer; sensitivity: measured per-layer
              curves, Niu et al.; vbmf: ranks from weakened EVBMF, scaled to the budget) —
              MAC ratio, top-1 on the held-out split, compression wall time
  max-drop    `compress --max-drop D --eval-data ...`: the speed-up found, its top-1 on the
              search's evaluation images AND on the whole held-out split, and the onnxruntime
              latency speed-up (batch 1 and 32, 1 thread, runs alternated with the original)
  analyze     `onnxopt analyze` with 1,000 evaluation images, run twice: wall time of the
              measurement and of the cache hit

Prints Markdown tables and writes ``allocation.json`` to ``--out``.

    python benchmarks/allocation.py [--quick] [--parts ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, evaluate, latency_ratio, machine, markdown, models, onnxopt, prepare_data, run_measured  # noqa: E402

ALLOCATIONS = ("energy", "uniform", "sensitivity", "vbmf")


def compress(spec, out: Path, calib_size: int, *options: str) -> tuple[dict | None, float, float, str]:
    report = out.with_suffix(".json")
    command = onnxopt("-q", "compress", spec.path, "-o", out, "--calib", spec.calib, "--preset", spec.preset,
                      "--calib-size", str(calib_size), "--report", report, *options)
    result, wall, peak_mb = run_measured(command)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        return None, wall, peak_mb, lines[-1] if lines else f"exit code {result.returncode}"
    return json.loads(report.read_text()), wall, peak_mb, ""


def allocation_rows(spec, speedup: float, allocations, calib_size: int, limit: int | None, work: Path, base: dict) -> list[dict]:
    rows = []
    for name in allocations:
        out = work / f"{spec.name}_{name}_{speedup:g}x.onnx"
        data, wall, peak_mb, error = compress(spec, out, calib_size, "--speedup", str(speedup), "--allocation", name)
        row = {"model": spec.name, "speedup_target": speedup, "allocation": name, "compress_wall_s": wall, "peak_rss_mb": peak_mb}
        if data is None:
            row["error"] = error
            print(f"  {name}: failed: {error}", flush=True)
        else:
            accuracy = evaluate(out, spec, limit)
            row.update(mac_ratio=data["mac_speedup"], top1=100 * accuracy["top1"], eval_images=accuracy["n"],
                       top1_drop=100 * (base["top1"] - accuracy["top1"]))
            print(f"  {name:12s} MACs {row['mac_ratio']:.2f}x top-1 {row['top1']:.2f} (drop {row['top1_drop']:.2f}) {wall:.0f} s", flush=True)
        rows.append(row)
    return rows


def max_drop_row(spec, max_drop: float, method: str, calib_size: int, search_size: int, work: Path, base: dict) -> dict:
    out = work / f"{spec.name}_maxdrop{max_drop:g}_{method}.onnx"
    data, wall, peak_mb, error = compress(spec, out, calib_size, "--max-drop", str(max_drop), "--method", method,
                                          "--eval-data", spec.test, "--eval-size", str(search_size), *spec.eval_args)
    row = {"model": spec.name, "max_drop": max_drop, "method": method, "compress_wall_s": wall, "peak_rss_mb": peak_mb}
    if data is None:
        row["error"] = error
        print(f"  --max-drop {max_drop:g} ({method}): failed: {error}", flush=True)
        return row
    search = data["max_drop_search"]
    best = max((s for s in search["steps"] if s["within"]), key=lambda s: s["speedup"])
    accuracy = evaluate(out, spec)
    latency = {batch: latency_ratio(out, spec.path, batch) for batch in (1, 32)}
    row.update(mac_ratio=data["mac_speedup"], search_steps=len(search["steps"]), search_images=search_size,
               search_drop=best["drop"], top1=100 * accuracy["top1"], eval_images=accuracy["n"],
               top1_drop=100 * (base["top1"] - accuracy["top1"]),
               latency_speedup_b1=latency[1]["speedup"], latency_speedup_b32=latency[32]["speedup"], steps=search["steps"])
    print(f"  --max-drop {max_drop:g} ({method}): MACs {row['mac_ratio']:.2f}x, drop {row['search_drop']:.2f} on the "
          f"{search_size} search images, {row['top1_drop']:.2f} on all {row['eval_images']}; latency b1 "
          f"{row['latency_speedup_b1']:.2f}x b32 {row['latency_speedup_b32']:.2f}x; {wall:.0f} s", flush=True)
    return row


def analyze_rows(spec, calib_size: int, eval_size: int, work: Path) -> list[dict]:
    rows = []
    for attempt in ("first run", "second run"):
        report = work / f"{spec.name}_analysis.json"
        command = onnxopt("-q", "analyze", spec.path, "--calib", spec.calib, "--preset", spec.preset, "--calib-size",
                          str(calib_size), "--eval-data", spec.test, "--eval-size", str(eval_size), *spec.eval_args,
                          "-o", report, "--plot", work / f"{spec.name}_analysis.png")
        result, wall, peak_mb = run_measured(command)
        if result.returncode != 0:
            rows.append({"model": spec.name, "run": attempt, "error": result.stderr.strip()[-300:]})
            continue
        data = json.loads(report.read_text())
        rows.append({"model": spec.name, "run": attempt, "wall_s": wall, "cached": data["cached"], "peak_rss_mb": peak_mb,
                     "layers": len(data["analysis"]["curves"]), "eval_images": data["analysis"]["samples"],
                     "measure_s": data["analysis"]["seconds"]})
        print(f"  analyze {attempt}: {wall:.1f} s wall (cached: {data['cached']})", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, few images, no vbmf (CI).")
    parser.add_argument("--parts", nargs="*", default=["allocation", "max-drop", "analyze"])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-allocation")
    parser.add_argument("--allocations", nargs="*", default=list(ALLOCATIONS))
    parser.add_argument("--max-drop-method", default="lowrank")
    args = parser.parse_args()
    specs = models()
    if args.quick:
        plan = {"allocation": [("cifar10_resnet20", 1.5)], "max-drop": [], "analyze": ["cifar10_resnet20"]}
        calib_size, limit, eval_size = 300, 500, 200
    else:
        plan = {"allocation": [("cifar10_resnet56", 2.0), ("mobilenet_v2", 1.2)],
                "max-drop": ["cifar10_resnet56", "squeezenet1.1"], "analyze": ["cifar10_resnet56"]}
        calib_size, limit, eval_size = 2000, None, 1000
    prepare_data([specs[name] for part in plan.values() for name in (n if isinstance(n, str) else n[0] for n in part)])
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    bases: dict[str, dict] = {}

    def base(name: str) -> dict:
        if name not in bases:
            bases[name] = evaluate(specs[name].path, specs[name], limit)
            print(f"{name}: original top-1 {100 * bases[name]['top1']:.2f}% on {bases[name]['n']} images", flush=True)
        return bases[name]

    path = args.out / ("allocation_quick.json" if args.quick else "allocation.json")
    results = json.loads(path.read_text()) if path.is_file() else {"allocation": [], "max_drop": [], "analyze": []}
    results.update(date=time.strftime("%Y-%m-%d"), machine=machine(), quick=args.quick)   # parts not run are kept
    earlier = results.get("allocation", [])
    results.update({part.replace("-", "_"): [] for part in args.parts})
    if "allocation" in args.parts:
        for name, speedup in plan["allocation"]:
            calib = calib_size if name.startswith("cifar") else 350
            results["allocation"] += allocation_rows(specs[name], speedup, args.allocations if not args.quick else ALLOCATIONS[:3],
                                                     calib, limit, args.work, base(name))
        done = {(r["model"], r["allocation"]) for r in results["allocation"]}     # --allocations subsets accumulate
        results["allocation"] = [r for r in earlier if (r["model"], r["allocation"]) not in done] + results["allocation"]
    if "max-drop" in args.parts:
        for name in plan["max-drop"]:
            calib = calib_size if name.startswith("cifar") else 350
            results["max_drop"].append(max_drop_row(specs[name], 1.0, args.max_drop_method, calib, eval_size if name.startswith("cifar") else 350,
                                                    args.work, base(name)))
    if "analyze" in args.parts:
        for name in plan["analyze"]:
            results["analyze"] += analyze_rows(specs[name], calib_size, eval_size, args.work)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(markdown(results["allocation"], [("model", "model", "s"), ("target", "speedup_target", "g"), ("allocation", "allocation", "s"),
                                           ("MACs ratio", "mac_ratio", ".2f"), ("top-1 %", "top1", ".2f"), ("drop (pts)", "top1_drop", ".2f"),
                                           ("wall (s)", "compress_wall_s", ".0f"), ("error", "error", "s")]))
    print()
    print(markdown(results["max_drop"], [("model", "model", "s"), ("--max-drop", "max_drop", "g"), ("method", "method", "s"),
                                         ("MACs ratio", "mac_ratio", ".2f"), ("drop on search images", "search_drop", ".2f"),
                                         ("drop on all held-out", "top1_drop", ".2f"), ("ORT b1", "latency_speedup_b1", ".2f"),
                                         ("ORT b32", "latency_speedup_b32", ".2f"), ("steps", "search_steps", "d"),
                                         ("wall (s)", "compress_wall_s", ".0f"), ("error", "error", "s")]))
    print()
    print(markdown(results["analyze"], [("model", "model", "s"), ("run", "run", "s"), ("wall (s)", "wall_s", ".1f"),
                                        ("cached", "cached", ""), ("layers", "layers", "d"), ("eval images", "eval_images", "d")]))


if __name__ == "__main__":
    main()
