"""Build a model for aarch64 and armv7, run the aarch64 library under qemu-aarch64, compare.

Called by arm_check.sh, which prepares the arm64 root (--root) and the site folder with the
aarch64 wheels (--site). Exit status: 0 when the aarch64 outputs match onnxruntime on this
machine within --tolerance and the armv7 library is an ELF 32-bit ARM EABI5 object, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing

from onnxopt import tvm_backend  # noqa: E402
from onnxopt.errors import UserError  # noqa: E402


def onnxruntime_outputs(model_path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def check_armv7(model_path: Path, shapes: dict, work: Path) -> bool:
    build = tvm_backend.compile_model(model_path, "armv7", out_dir=work / "build_armv7", input_shapes=shapes)
    described = subprocess.run(["file", "-b", str(build.library)], capture_output=True, text=True, check=True).stdout.strip()
    ok = "ELF 32-bit" in described and "ARM" in described and "EABI5" in described
    print(f"armv7: {build.library}: {described.split(',')[0:3]} -> {'OK' if ok else 'WRONG'}")
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="?")
    parser.add_argument("--root", type=Path, help="arm64 Debian root (from arm_check.sh)")
    parser.add_argument("--site", type=Path, help="folder with the unpacked aarch64 wheels")
    parser.add_argument("--work", type=Path, default=Path(".cache/arm/work"))
    parser.add_argument("--input-shape", action="append", default=[], help="NAME:1,3,32,32")
    parser.add_argument("--target", default="aarch64", help="aarch64-family target to check (aarch64, rpi3, rpi4, rpi5)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--skip-armv7", action="store_true")
    args = parser.parse_args()

    if not (args.model and args.root and args.site):
        parser.error("MODEL, --root and --site are required (arm_check.sh passes them)")

    from onnxopt.build_cmd import parse_input_shapes

    shapes = parse_input_shapes(args.input_shape)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        build = tvm_backend.compile_model(args.model, args.target, out_dir=work / f"build_{args.target}", input_shapes=shapes)
        armv7_ok = True if args.skip_armv7 else check_armv7(args.model, shapes, work)
    except UserError as exc:
        print(f"arm-check: {exc}", file=sys.stderr)
        return 2
    feeds = tvm_backend.random_inputs(build.inputs, seed=0)
    np.savez(work / "inputs.npz", **{f"in{i}": a for i, a in enumerate(feeds.values())})

    python = args.root / "usr" / "bin" / "python3.11"
    command = ["qemu-aarch64", "-L", str(args.root), str(python), str(HERE / "run.py"),
               str(build.library), str(work / "inputs.npz"), str(work / "outputs.npz")]
    env = {**os.environ, "PYTHONPATH": str(args.site.resolve()), "PYTHONNOUSERSITE": "1", "TVM_NUM_THREADS": "1"}
    env.pop("PYTHONHOME", None)
    print("aarch64: " + " ".join(command))
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    emulated_seconds = time.perf_counter() - started

    with np.load(work / "outputs.npz") as data:
        got = [data[f"out{i}"] for i in range(len(data.files))]
    expected = onnxruntime_outputs(args.model, feeds)
    if len(got) != len(expected):
        print(f"aarch64: {len(got)} outputs from TVM, {len(expected)} from onnxruntime -> FAIL")
        return 1
    diff = max(float(np.max(np.abs(g.astype(np.float64) - e.astype(np.float64)))) for g, e in zip(got, expected))
    ok = diff <= args.tolerance
    summary = {"model": str(args.model), "target": args.target, "inputs": [s.to_json() for s in build.inputs],
               "max_abs_diff": diff, "tolerance": args.tolerance, "aarch64_ok": ok, "armv7_elf_ok": armv7_ok,
               "emulated_seconds": round(emulated_seconds, 1)}
    (work / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"aarch64: max abs diff vs onnxruntime {diff:.3g} (tolerance {args.tolerance:g}) -> {'OK' if ok else 'FAIL'}")
    return 0 if ok and armv7_ok else 1


if __name__ == "__main__":
    sys.exit(main())
