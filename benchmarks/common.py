"""What the benchmarks share: the reference models with their data and preprocessing, and
running onnxopt in a subprocess with its wall time and peak RSS, accuracy and latency.

Calibration always draws from a model's training images (CIFAR-10 train, or the even
classes of the ImageNet sample), evaluation from disjoint held-out images (CIFAR-10 test, or
the odd classes: ``benchmarks/imagenet_split.py``).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from onnxopt.tvm_backend import host_vector_unit

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SPLIT = ROOT / "out" / "imagenet-split"
IMAGENET_CALIB = 280     # the calibration half's 350 photos less the 70 `--holdout` sets apart (at most a fifth)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    calib: Path
    test: Path
    preset: str
    eval_args: tuple[str, ...] = field(default_factory=tuple)

    def needs_split(self) -> bool:
        return SPLIT in self.calib.parents


def models() -> dict[str, ModelSpec]:
    cifar = dict(calib=SHARED / "data/cifar10/train", test=SHARED / "data/cifar10/test", preset="cifar10")
    imagenet = dict(calib=SPLIT / "calib", test=SPLIT / "eval")
    synsets = str(SHARED / "data/imagenet_synsets.txt")
    return {
        "cifar10_resnet20": ModelSpec("cifar10_resnet20", SHARED / "models/cifar10_resnet20.onnx", **cifar),
        "cifar10_resnet56": ModelSpec("cifar10_resnet56", SHARED / "models/cifar10_resnet56.onnx", **cifar),
        "vgg16_cifar10": ModelSpec("vgg16_cifar10", ROOT / "models/vgg16_cifar10.onnx", **cifar),
        "mobilenet_v2": ModelSpec("mobilenet_v2", SHARED / "models/mobilenet_v2_1.0_224.onnx", preset="mobilenet",
                                  eval_args=("--labels", synsets, "--label-offset", "1"), **imagenet),
        "squeezenet1.1": ModelSpec("squeezenet1.1", SHARED / "models/squeezenet1.1.onnx", preset="imagenet",
                                   eval_args=("--labels", synsets), **imagenet),
    }


def prepare_data(specs: list[ModelSpec]) -> None:
    if not (SHARED / "models").is_dir():
        sys.exit("benchmarks need ../shared (reference models and images next to the repository)")
    if any(spec.needs_split() for spec in specs):
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from imagenet_split import make_split

        make_split(SPLIT)


def onnxopt(*args: str) -> list[str]:
    return [sys.executable, "-m", "onnxopt", *map(str, args)]


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


def evaluate(model: Path, spec: ModelSpec, limit: int | None = None, baseline: Path | None = None) -> dict:
    """``onnxopt eval --json`` on the model's evaluation images; with ``baseline``, also the
    paired drop (``top1_drop_points``, ``drop_se_points``, ``top1_agreement``) and the mean KL divergence
    of the class distributions (``kl``, ``kl_se``)."""
    args = ["eval", str(model), "--data", str(spec.test), "--preset", spec.preset, "--json", *spec.eval_args]
    if baseline is not None:
        args += ["--baseline", str(baseline)]
    if limit:
        args += ["--limit", str(limit)]
    result = subprocess.run(onnxopt(*args), capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def latency_ratio(model: Path, baseline: Path, batch: int, runs: int = 20) -> dict:
    """onnxruntime latency of ``model`` against ``baseline`` (1 thread, runs alternated)."""
    result = subprocess.run(onnxopt("bench", str(model), "--baseline", str(baseline), "--batch", str(batch),
                                    "--threads", "1", "--runs", str(runs), "--json"), capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


@functools.cache
def machine() -> dict:
    """The CPU, its vector unit, cores and package versions of this run (read once: every row and summary asks)."""
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": platform.python_version()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info["vector_unit"] = host_vector_unit()     # what channel counts in multiples of 8 or 16 meet
    from importlib.metadata import version

    info["versions"] = {name: version(name) for name in ("onnxopt", "onnx", "onnxruntime", "numpy", "scipy")}
    return info


def markdown(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """A Markdown table: ``columns`` are (header, key, format)."""
    lines = ["| " + " | ".join(header for header, _, _ in columns) + " |", "|---" * len(columns) + "|"]
    for row in rows:
        cells = [format(row[key], fmt) if row.get(key) is not None else "" for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
