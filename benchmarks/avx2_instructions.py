"""Pruned models on onnxruntime's AVX2 kernels, counted in instructions under valgrind.

onnxruntime's MLAS chooses its convolution kernels and the channel block of its NCHWc layout
(8 float32 lanes with AVX2, 16 with AVX-512F) from CPUID at start-up. valgrind's virtual CPU
has AVX2 and no AVX-512, so onnxruntime run under valgrind takes the AVX2 path on any x86-64
machine, this AVX-512 one included. Each run checks that it did (``nchwc_block``: a conv with
24 output channels keeps 24 rows when its weights are reordered into blocks of 8, 32 with
blocks of 16).

callgrind counts the instructions of the inferences alone: the child process runs one
inference to warm up (memory arena, prepacked weights), then ``R`` more inside
``functools.reduce``, and callgrind collects only within CPython's ``functools_reduce``
(``--toggle-collect``), so start-up, imports and the session's own threads are not counted.
The count repeats to 0.001%, also with other processes on the cores, so models are counted
in parallel.

Instructions are not seconds: layout conversions and memory traffic cost more time per
instruction than the FMA loops. The table puts each ratio next to the latency speed-up that
``benchmarks/prune_bench.py`` measured natively on this machine's vector unit.

The models are the ones ``benchmarks/prune_bench.py`` compressed (its ``--work`` folder,
seed 0): ``prune`` (multiples of 4) and its roundings, ``prune+x86-avx2`` among them (the grid
``--target x86-avx2`` gives: multiples of 8, and of 4 below 8).

    python benchmarks/avx2_instructions.py [--models ...] [--variants ...] [--runs 2]

Prints a Markdown table, writes ``avx2_instructions.json`` in ``--out``. Needs valgrind
(Debian's ``valgrind``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE_CHANNELS = 24         # a multiple of 8, not of 16: padded to 32 only with blocks of 16


def child(model_path: str, batch: int, runs: int) -> None:
    """Run ``model_path`` once, then ``runs`` times inside ``functools.reduce`` (the calls
    callgrind counts), on random input with one thread.

    numpy and onnxruntime only: every import costs 50 times its time under valgrind (onnx's
    alone, ml_dtypes, over 20 s), so the feeds come from the session rather than from
    ``onnxopt.latency.random_feeds``."""
    import functools  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.log_severity_level = 1, 1, 3
    session = ort.InferenceSession(model_path, options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {value.name: rng.standard_normal([d if isinstance(d, int) else batch for d in value.shape]).astype(np.float32)
             for value in session.get_inputs()}
    session.run(None, feeds)
    functools.reduce(lambda _, __: session.run(None, feeds), range(runs), None)


def probe() -> None:
    """Print the NCHWc channel block onnxruntime uses in this process (0: none)."""
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    weight = numpy_helper.from_array(np.ones((PROBE_CHANNELS, 16, 1, 1), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, PROBE_CHANNELS, 8, 8])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    with tempfile.TemporaryDirectory() as folder:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        optimized = onnx.load(options.optimized_model_filepath)
    shapes = {tensor.name: tuple(tensor.dims) for tensor in optimized.graph.initializer}
    rows = [shapes[node.input[1]][0] for node in optimized.graph.node if node.domain == "com.microsoft.nchwc" and node.op_type == "Conv"]
    print({PROBE_CHANNELS: 8, 32: 16}.get(rows[0], 0) if rows else 0)


def valgrind(args: list[str], *, counted: str | None = None) -> tuple[str, int]:
    """Run this script with ``args`` under callgrind: its stdout, and the instructions executed
    within the C function ``counted`` (None: nothing is counted)."""
    with tempfile.TemporaryDirectory() as folder:
        collect = ["--collect-atstart=no"] + ([f"--toggle-collect={counted}"] if counted else [])
        done = subprocess.run(["valgrind", "--tool=callgrind", *collect, f"--callgrind-out-file={folder}/cg",
                               sys.executable, __file__, *args], env=dict(os.environ, OPENBLAS_NUM_THREADS="1"),
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"valgrind {' '.join(args)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return done.stdout, int(re.search(r"^summary: (\d+)", (Path(folder) / "cg").read_text(), re.M).group(1))


def instructions_per_inference(model: Path, batch: int, runs: int) -> int:
    _, count = valgrind(["--child", str(model), str(batch), str(runs)], counted="functools_reduce")
    if count == 0:
        raise RuntimeError("callgrind counted nothing in functools_reduce: this Python's libpython has no symbols")
    return round(count / runs)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:            # before any import the count would include
        return child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine, markdown, models  # noqa: PLC0415
    from prune_bench import MODELS, ROUNDINGS  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-prune", help="prune_bench.py's compressed models.")
    parser.add_argument("--models", nargs="*", default=["cifar10_resnet56", "mobilenet_v2"])
    parser.add_argument("--variants", nargs="*", default=["prune", *ROUNDINGS])
    parser.add_argument("--runs", type=int, default=2, help="Inferences counted per model (after a first one).")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind")
    block = int(valgrind(["--probe"])[0].strip())
    if block != 8:
        sys.exit(f"under valgrind onnxruntime blocks channels by {block}, not AVX2's 8: this valgrind's CPU is not AVX2 without AVX-512")
    specs = models()
    prune_rows = json.loads((args.out / "prune.json").read_text())["rows"] if (args.out / "prune.json").exists() else []
    jobs = []                                     # (model, variant, path, report)
    for name in args.models:
        speedup, variants = MODELS[name][:2]
        jobs.append((name, "original", specs[name].path, None))
        for variant in (v for v in args.variants if v in variants):
            stem = f"{name}_{variant}_{speedup:g}x"          # prune_bench.py's names, seed 0
            model, report = args.work / f"{stem}.onnx", args.work / f"{stem}.json"
            if not model.exists():
                sys.exit(f"{model} is missing: run python benchmarks/prune_bench.py --models {name} --variants {variant}")
            jobs.append((name, variant, model, report))
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        counts = list(pool.map(lambda job: instructions_per_inference(job[2], args.batch, args.runs), jobs))
    originals = {name: count for (name, variant, _, _), count in zip(jobs, counts) if variant == "original"}
    rows = []
    for (name, variant, path, report), count in zip(jobs, counts):
        row = {"model": name, "variant": variant, "batch": args.batch, "instructions_m": count / 1e6,
               "instruction_ratio": originals[name] / count}
        if report is not None:
            data = json.loads(report.read_text())
            row["mac_ratio"] = data["macs_before"] / data["macs_after"]
            native = [r for r in prune_rows if r["model"] == name and r["variant"] == variant and not r.get("seed")
                      and r.get("vector_unit") == machine()["vector_unit"]]
            if native:
                row.update(native_vector_unit=native[-1]["vector_unit"], native_latency_speedup_b1=native[-1]["latency_speedup_b1"],
                           top1_drop_points=native[-1]["top1_drop_points"])
        rows.append(row)
        print(f"{name:18s} {variant:16s} {count / 1e6:9.2f} M instructions  {row['instruction_ratio']:.2f}x", flush=True)
    version = subprocess.run(["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    summary = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "valgrind": version, "nchwc_block": block,
               "runs": args.runs, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "avx2_instructions.json").write_text(json.dumps(summary, indent=2) + "\n")
    print()
    print(markdown(rows, [("model", "model", "s"), ("variant", "variant", "s"), ("MACs ratio", "mac_ratio", ".2f"),
                          ("AVX2 instructions (M)", "instructions_m", ".2f"), ("AVX2 instruction ratio", "instruction_ratio", ".2f"),
                          ("native b1 speed-up", "native_latency_speedup_b1", ".2f"), ("on", "native_vector_unit", "s"),
                          ("drop (pts)", "top1_drop_points", ".2f")]))


if __name__ == "__main__":
    main()
