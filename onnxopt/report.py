"""Tables and JSON for `inspect` and `compress` (rich for the terminal)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from onnxopt.atomic import atomic_path
from onnxopt.layers import Layer
from onnxopt.pipeline import CompressionResult


def human(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def layer_rows(layers: list[Layer], reasons: dict[str, str | None]) -> list[dict]:
    rows = []
    for layer in layers:
        rows.append({
            "name": layer.name, "op": layer.op,
            "out_channels": layer.out_channels, "in_channels": layer.in_channels,
            "kernel": list(layer.kernel), "stride": list(layer.strides), "group": layer.group,
            "output_hw": list(layer.output_hw) if layer.output_hw else None,
            "macs": layer.macs, "params": layer.params, "activation": layer.activation,
            "lowrank": reasons[layer.name] is None, "lowrank_reason": reasons[layer.name],
        })
    return rows


def inspect_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, show_lines=False)
    for column in ("layer", "op", "shape (in->out kxk)", "stride", "group", "out HxW", "MACs", "params", "lowrank"):
        table.add_column(column, justify="right" if column in ("MACs", "params") else "left")
    for row in rows:
        kernel = "x".join(map(str, row["kernel"]))
        table.add_row(
            row["name"], row["op"], f"{row['in_channels']}->{row['out_channels']} {kernel}",
            "x".join(map(str, row["stride"])), str(row["group"]),
            "x".join(map(str, row["output_hw"])) if row["output_hw"] else "?",
            human(row["macs"]) if row["macs"] is not None else "?", human(row["params"]),
            "yes" if row["lowrank"] else f"no: {row['lowrank_reason']}",
        )
    total_macs = sum(r["macs"] or 0 for r in rows)
    table.add_section()
    table.add_row("total", "", f"{len(rows)} layers", "", "", "", human(total_macs), human(sum(r["params"] for r in rows)),
                  f"{sum(r['lowrank'] for r in rows)} factorable")
    return table


def compress_tables(result: CompressionResult) -> list[Table]:
    layers = Table(title="Per layer")
    for column in ("layer", "shape", "rank", "solver", "MACs before", "MACs after", "resp. err before", "resp. err after"):
        layers.add_column(column, justify="left" if column in ("layer", "shape", "solver") else "right")
    for row in result.layers:
        if row.rank is None:
            layers.add_row(row.name, row.shape, "-", row.skipped or row.solver or "", human(row.macs_before), human(row.macs_after), "", "")
        else:
            layers.add_row(row.name, row.shape, f"{row.rank}/{row.full_rank}", row.solver or "", human(row.macs_before), human(row.macs_after),
                           _fixed(row.error_before), _fixed(row.error_after))
    summary = Table(title="Before / after")
    for column in ("", "before", "after", "ratio"):
        summary.add_column(column, justify="right")
    summary.add_row("MACs", human(result.macs_before), human(result.macs_after), f"{result.macs_before / max(result.macs_after, 1):.2f}x")
    summary.add_row("params", human(result.params_before), human(result.params_after), f"{result.params_before / max(result.params_after, 1):.2f}x")
    check = result.verification
    if check.samples == 0:
        summary.add_row("output difference", "", "not measured (no --calib data)", "")
    else:
        summary.add_row("held-out samples", str(check.samples), "", "")
        summary.add_row("output max |diff|", "", f"{check.max_abs_diff:.4g}", "")
        summary.add_row("output relative L2", "", f"{check.relative_l2:.4f}", "")
        if check.top1_agreement is not None:
            summary.add_row("top-1 agreement", "", f"{check.top1_agreement:.2%}", "")
    summary.add_row("time", "", f"{result.timings['total']:.1f} s", "")
    return [layers, summary]


def _fixed(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def write_json(data: dict, path: Path) -> None:
    """Write JSON atomically (``onnxopt.atomic``)."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, default=float)
        handle.write("\n")


def print_json(data: dict) -> None:
    print(json.dumps(data, indent=2, default=float))


def search_table(search: dict) -> Table:
    """The speed-ups `compress --max-drop` tried, and what each measured."""
    table = Table(title=f"--max-drop {search['max_drop']:g}: search over --speedup (original top-1 {search['base_top1']:.2f}% on {search['eval_data']})")
    for column in ("--speedup", "MAC speed-up", "top-1", "drop", "verdict"):
        table.add_column(column, justify="left" if column == "verdict" else "right")
    for step in search["steps"]:
        if step["drop"] is None:
            table.add_row(f"{step['speedup']:.3f}", "", "", "", step["note"])
            continue
        error = f" ± {step['drop_se']:.2f}" if step.get("drop_se") is not None else ""
        table.add_row(f"{step['speedup']:.3f}", f"{step['mac_speedup']:.2f}x", f"{step['top1']:.2f}%", f"{step['drop']:.2f}{error}",
                      "within" if step["within"] else "over the target")
    return table
