"""The benchmark harness: every model x budget x method, side by side, in one run.

For each model and each `--speedup` budget, `onnxopt compress` runs (each in its own process,
so wall time and peak RSS are its own) with onnxopt's methods and with plain baselines:

  onnxopt    auto (prune then low-rank, the split measured, both with sensitivity
             allocation: onnxopt's best), lowrank (Zhang et al., energy
             allocation), lowrank-sens (measured sensitivity allocation, Niu et al.), prune
             (He et al.), tucker2 (MUSCO, EVBMF ranks, least-squares refit), spatial (k x 1
             then 1 x k, Jaderberg et al., fitted to the calibration data)
  baselines  svd (data-free truncated SVD of the weights, Jaderberg/Denton), uniform (Zhang's
             solver, the same rank ratio in every layer), filter-l1 and filter-std (Li et al.
             filter ranking, data-free removal, no reconstruction)

Figures per row: MAC and parameter ratio, top-1 drop on the held-out split (CIFAR-10 test, or
the odd-class half of the ImageNet sample), onnxruntime latency speed-up at batch 1 and 32
(1 thread, median of alternated runs against the original), realized speed-up / MAC ratio,
compression wall time and peak RSS. Outputs: a Markdown table, ``harness.json`` and
``harness.png`` (top-1 drop against measured speed-up, one line per method, one panel per
model) in ``--out``; ``--readme`` rewrites the README's results table from the JSON.

    python benchmarks/harness.py [--quick] [--models ...] [--budgets ...] [--methods ...] [--out DIR]
    python benchmarks/harness.py --readme            # regenerate README.md's table from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import IMAGENET_CALIB, ROOT, evaluate, latency_ratio, machine, markdown, models, onnxopt, prepare_data, run_measured  # noqa: E402

METHODS = {
    "auto": ["--method", "auto", "--allocation", "sensitivity"],
    "lowrank": [],
    "lowrank-sens": ["--allocation", "sensitivity"],
    "prune": ["--method", "prune"],
    "tucker2": ["--method", "tucker2"],
    "spatial": ["--method", "spatial"],
    "svd": ["--solver", "svd"],
    "uniform": ["--allocation", "uniform"],
    "filter-l1": ["--method", "filter-l1"],
    "filter-std": ["--method", "filter-std"],
}
BASELINES = {"svd", "uniform", "filter-l1", "filter-std"}
DATA_FREE = {"filter-l1", "filter-std"}           # run without --calib: plain removal
BUDGETS = {"cifar10_resnet20": (1.5, 2.0, 3.0), "cifar10_resnet56": (1.5, 2.0, 3.0), "vgg16_cifar10": (2.0, 3.0, 4.0),
           "mobilenet_v2": (1.2, 1.4), "squeezenet1.1": (1.3, 1.6)}
README_BEGIN, README_END = "<!-- harness:begin -->", "<!-- harness:end -->"
COLUMNS = [("model", "model", "s"), ("budget", "budget", "g"), ("method", "method", "s"), ("MACs ratio", "mac_ratio", ".2f"),
           ("params ratio", "params_ratio", ".2f"), ("top-1 %", "top1", ".2f"), ("drop (pts)", "top1_drop", ".2f"),
           ("ORT b1", "latency_speedup_b1", ".2f"), ("ORT b32", "latency_speedup_b32", ".2f"),
           ("speed-up / MACs (b32)", "realized_over_mac_b32", ".2f"), ("wall (s)", "compress_wall_s", ".0f"),
           ("RSS (MB)", "peak_rss_mb", ".0f"), ("note", "error", "s")]


def run_one(spec, budget: float, method: str, calib_size: int, limit: int | None, work: Path, base: dict) -> dict:
    out = work / f"{spec.name}_{method}_{budget:g}x.onnx"
    report = out.with_suffix(".json")
    calib = [] if method in DATA_FREE else ["--calib", str(spec.calib), "--calib-size", str(calib_size)]
    command = onnxopt("-q", "compress", spec.path, "-o", out, "--speedup", str(budget), "--preset", spec.preset,
                      *calib, "--report", report, *METHODS[method])
    result, wall, peak_mb = run_measured(command)
    row = {"model": spec.name, "budget": budget, "method": method, "baseline": method in BASELINES,
           "date": time.strftime("%Y-%m-%d"), "cpu": machine()["cpu"], "compress_wall_s": wall, "peak_rss_mb": peak_mb}
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines()
        row["error"] = lines[-1][:200] if lines else f"exit code {result.returncode}"
        return row
    data = json.loads(report.read_text())
    accuracy = evaluate(out, spec, limit)
    latency = {batch: latency_ratio(out, spec.path, batch) for batch in (1, 32)}
    mac_ratio = data["macs_before"] / data["macs_after"]
    row.update(mac_ratio=mac_ratio, params_ratio=data["params_before"] / data["params_after"],
               top1=100 * accuracy["top1"], top1_original=100 * base["top1"], top1_drop=100 * (base["top1"] - accuracy["top1"]),
               eval_images=accuracy["n"], latency_speedup_b1=latency[1]["speedup"], latency_speedup_b32=latency[32]["speedup"],
               realized_over_mac_b32=latency[32]["speedup"] / mac_ratio)
    return row


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    figure, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.2), squeeze=False)
    for axis, name in zip(axes[0], names):
        for index, method in enumerate(METHODS):        # one colour per method in every panel
            points = sorted((r["latency_speedup_b32"], r["top1_drop"]) for r in rows
                            if r["model"] == name and r["method"] == method and "top1_drop" in r)
            if points:
                axis.plot(*zip(*points), marker="o", ls="--" if method in BASELINES else "-", color=f"C{index % 10}", label=method)
        axis.axvline(1.0, color="grey", lw=0.5)
        axis.set_title(name)
        axis.set_xlabel("measured onnxruntime speed-up (batch 32, 1 thread)")
        axis.set_ylabel("top-1 drop (points)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


SUMMARY = [("model", "model", "s"), ("budget", "budget", "g"), ("best onnxopt method", "method", "s"), ("drop (pts)", "drop", ".2f"),
           ("ORT b32", "speedup_b32", ".2f"), ("best baseline", "baseline", "s"), ("its drop", "baseline_drop", ".2f"),
           ("its ORT b32", "baseline_speedup_b32", ".2f")]
TARGETS = {"cifar10_resnet56": 2.0, "vgg16_cifar10": 3.0, "squeezenet1.1": 1.6, "mobilenet_v2": 1.4}   # MACs at <= 1.0 drop


def summary(rows: list[dict]) -> list[dict]:
    """Per model and budget: onnxopt's best method (smallest drop) against the best baseline."""
    table = []
    for model, budget in dict.fromkeys((r["model"], r["budget"]) for r in rows):
        measured = [r for r in rows if r["model"] == model and r["budget"] == budget and "top1_drop" in r]
        ours = min((r for r in measured if not r["baseline"]), key=lambda r: r["top1_drop"], default=None)
        theirs = min((r for r in measured if r["baseline"]), key=lambda r: r["top1_drop"], default=None)
        row = {"model": model, "budget": budget}
        if ours:
            row.update(method=ours["method"], drop=ours["top1_drop"], speedup_b32=ours["latency_speedup_b32"])
        if theirs:
            row.update(baseline=theirs["method"], baseline_drop=theirs["top1_drop"], baseline_speedup_b32=theirs["latency_speedup_b32"])
        table.append(row)
    return table


def within_one_point(rows: list[dict]) -> list[dict]:
    """Per model: the largest MAC reduction measured at a drop of at most 1.0 point, against the target."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        good = [r for r in rows if r["model"] == model and not r["baseline"] and r.get("top1_drop", 99) <= 1.0]
        best = max(good, key=lambda r: (round(r["mac_ratio"], 2), -r["top1_drop"]), default=None)
        table.append({"model": model, "target": TARGETS.get(model), "mac_ratio": best["mac_ratio"] if best else None,
                      "method": best["method"] if best else "none within 1 point",
                      "realized": best["realized_over_mac_b32"] if best else None})
    return table


def _dates_by_cpu(rows: list[dict]) -> dict[str, list[str]]:
    """Each CPU the rows were measured on, with the sorted dates of its rows (latency ratios are
    per machine: a row's model and its original are timed in the same run)."""
    days: dict[str, set[str]] = {}
    for row in rows:
        days.setdefault(row["cpu"], set()).add(row["date"])
    return {cpu: sorted(dates) for cpu, dates in sorted(days.items(), key=lambda item: min(item[1]))}


def in_table_order(rows: list[dict]) -> list[dict]:
    """Rows by model (``BUDGETS``' order), budget and method (``METHODS``' order)."""
    models, methods = list(BUDGETS), list(METHODS)
    return sorted(rows, key=lambda r: (models.index(r["model"]) if r["model"] in models else len(models), r["model"],
                                       r["budget"], methods.index(r["method"]) if r["method"] in methods else len(methods)))


def update_readme(results: dict, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        sys.exit(f"README.md has no {README_BEGIN} ... {README_END} block to fill")
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    info, calib = results["machine"], results["calib_images"]
    dates = sorted({r.get("date", results["date"]) for r in results["rows"]})      # runs in parts: first to last
    cpus = "; ".join(f"{cpu} ({' to '.join(dict.fromkeys((days[0], days[-1])))})" for cpu, days in _dates_by_cpu(results["rows"]).items())
    block = (f"\n_Generated by `python benchmarks/harness.py --readme` from `benchmarks/results/harness.json` "
             f"({' to '.join(dict.fromkeys((dates[0], dates[-1])))}; {cpus}; {info['cores']} cores; {calib['cifar']:,} calibration images for the "
             f"CIFAR-10 models, {calib['imagenet']} for the ImageNet ones, besides the held-out images of `--holdout`)._\n\n"
             "Largest MAC reduction within 1.0 point of top-1 (a budget grid: the true figure lies between grid points):\n\n"
             + markdown(within_one_point(results["rows"]), [("model", "model", "s"), ("target", "target", "g"),
                                                            ("measured", "mac_ratio", ".2f"), ("method", "method", "s"),
                                                            ("ORT speed-up / MACs (b32)", "realized", ".2f")])
             + "\n\nBest onnxopt method against best baseline at each budget:\n\n" + markdown(summary(results["rows"]), SUMMARY)
             + "\n\n<details><summary>Every row</summary>\n\n" + markdown(results["rows"], COLUMNS) + "\n\n</details>\n")
    readme.write_text(head + README_BEGIN + block + README_END + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ResNet-20, one budget, three methods, few images (CI).")
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--budgets", nargs="*", type=float, default=None)
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-harness")
    parser.add_argument("--readme", action="store_true", help="Only rewrite README.md's table from the JSON in --out.")
    args = parser.parse_args()
    path = args.out / ("harness_quick.json" if args.quick else "harness.json")
    if args.readme:
        update_readme(json.loads(path.read_text()))
        return
    specs = models()
    names = args.models or (["cifar10_resnet20"] if args.quick else list(BUDGETS))
    unknown = [n for n in names if n not in specs] + [m for m in args.methods or [] if m not in METHODS]
    if unknown:
        sys.exit(f"unknown model or method: {unknown}; models: {list(specs)}; methods: {list(METHODS)}")
    methods = args.methods or (["lowrank", "svd", "filter-l1"] if args.quick else list(METHODS))
    calib_size, limit = (200, 300) if args.quick else (1000, None)
    prepare_data([specs[n] for n in names])
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text())["rows"] if path.is_file() else []
    rows: list[dict] = []

    def save() -> list[dict]:
        """Written after every row, so an interrupted run keeps what it measured; rows of other
        (model, budget, method) already in the JSON are kept: runs in parts accumulate."""
        done = {(r["model"], r["budget"], r["method"]) for r in rows}
        merged = in_table_order([r for r in old if (r["model"], r["budget"], r["method"]) not in done] + rows)
        results = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "quick": args.quick,
                   "calib_images": {"cifar": calib_size, "imagenet": IMAGENET_CALIB}, "rows": merged}
        path.write_text(json.dumps(results, indent=2) + "\n")
        return merged

    for name in names:
        spec = specs[name]
        base = evaluate(spec.path, spec, limit)
        print(f"{name}: original top-1 {100 * base['top1']:.2f}% on {base['n']} images", flush=True)
        for budget in args.budgets or ((1.5,) if args.quick else BUDGETS[name]):
            for method in methods:
                row = run_one(spec, budget, method, calib_size if name.startswith(("cifar", "vgg")) else IMAGENET_CALIB, limit, args.work, base)
                rows.append(row)
                save()
                print("  " + ("  ".join(f"{h} {format(row[k], f)}" for h, k, f in COLUMNS[2:] if row.get(k) is not None)), flush=True)
    merged = save()
    plot(merged, path.with_suffix(".png"))
    table = markdown(merged, COLUMNS)
    path.with_suffix(".md").write_text(table + "\n")
    print()
    print(table)


if __name__ == "__main__":
    main()
