"""PNG figures (matplotlib, the `plot` extra): sensitivity curves and the predicted Pareto front."""

from __future__ import annotations

from pathlib import Path

from onnxopt.atomic import atomic_path
from onnxopt.errors import UserError
from onnxopt.sensitivity import Analysis

METRIC_LABELS = {
    "error": "relative output error",
    "kl": "KL(original || compressed), nats",
    "top1_drop": "top-1 drop (points)",
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("--plot needs matplotlib: pip install 'onnxopt[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_analysis(analysis: Analysis, metric: str, front: list[dict], path: Path, title: str = "") -> None:
    """Left: each layer's damage against the fraction of its MACs kept. Right: the model's
    predicted damage against its MAC speed-up (the knapsack's optimum at each budget)."""
    plt = _pyplot()
    figure, (curves, pareto) = plt.subplots(1, 2, figsize=(12, 4.8))
    colours = plt.cm.viridis
    count = max(len(analysis.curves) - 1, 1)
    for index, curve in enumerate(analysis.curves):
        if not curve.ranks:
            continue
        kept = [m / curve.macs for m in curve.macs_at]
        order = sorted(range(len(kept)), key=kept.__getitem__)
        damage = curve.damage(metric)
        curves.plot([kept[i] for i in order], [damage[i] for i in order], marker=".", lw=1,
                    color=colours(index / count), label=curve.name if len(analysis.curves) <= 12 else None)
    if metric == "top1_drop":          # measured in whole images: zeros are common
        curves.set_yscale("symlog", linthresh=0.1)
    else:
        curves.set_yscale("log")
    curves.set_xlabel("fraction of the layer's MACs kept")
    curves.set_ylabel(METRIC_LABELS[metric])
    curves.set_title("per-layer sensitivity (colour: depth, dark = first)")
    if len(analysis.curves) <= 12:
        curves.legend(fontsize=7)
    if front:
        pareto.plot([p["mac_speedup"] for p in front], [p["predicted_damage"] for p in front], marker="o")
    pareto.set_xlabel("MAC speed-up")
    pareto.set_ylabel(f"predicted {METRIC_LABELS[metric]} (sum over layers)")
    pareto.set_title("best allocation at each budget (predicted)")
    pareto.grid(alpha=0.3)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    _save(figure, plt, path)


def _save(figure, plt, path: Path) -> None:
    try:
        with atomic_path(path) as tmp:
            figure.savefig(tmp, dpi=120, format="png")
    finally:
        plt.close(figure)
