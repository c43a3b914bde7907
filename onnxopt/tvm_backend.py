"""The TVM hand-off: compile an ONNX model with Apache TVM, tune it, run it, time it.

This is the only module of onnxopt that imports ``tvm`` (TVM's Python API changes with every
release; it is pinned to apache-tvm 0.27.0.post1 with apache-tvm-ffi 0.1.14.post0). ``tvm`` is
imported lazily inside the functions, so the rest of onnxopt works without it; when it is
missing, every entry point raises one :class:`~onnxopt.errors.UserError`.

The flow (TVM 0.27, relax):

1. Fix the shapes for this step only: a symbolic batch dimension becomes ``batch`` (default 1)
   or what ``input_shapes`` says. The ONNX file is never modified.
2. ``tvm.relax.frontend.onnx.from_onnx(model, shape_dict=...)``.
3. The tuning preparation of ``relax.get_pipeline("static_shape_tuning")``:
   ``DecomposeOpsForInference``, ``CanonicalizeBindings``, ``zero_pipeline`` (legalize, fold
   constants, fuse). Each fused PrimFunc is one meta_schedule task.
4. Optional tuning with ``meta_schedule.tune_tasks`` into a JSON database in ``tune_dir``.
   Tuning is done here rather than through ``static_shape_tuning`` because its builder and
   runner cannot be chosen there, and both must be: the stock ``LocalBuilder`` times out on
   every candidate (each worker imports ``tvm.s_tir.tensor_intrin``, ~40-80 s on 2 cores,
   longer than its 30 s timeout), and tuning for another machine needs an ``RPCRunner``.
   The builder used here runs an initializer in each worker that memoises Python's
   ``inspect.getmodule`` misses (the import's hot spot) and then imports ``tensor_intrin``
   once; the import drops to ~4 s and the initializer is not subject to the build timeout.
5. ``MetaScheduleApplyDatabase`` (when a database exists), ``tvm.compile``,
   ``export_library`` — with ``tvm.support.cc.cross_compiler`` for ARM targets.

Output layout (``OUT`` is a directory)::

    OUT/model.so        the deployable library (relax VM executable + kernels)
    OUT/manifest.json   target, inputs, outputs, versions, tuning database used
    OUT/model.cu        CUDA builds only: the generated kernels (check them with nvcc --ptx)

Load it with ``tvm.runtime.load_module("OUT/model.so")`` and
``tvm.relax.VirtualMachine(lib, device)``; :func:`run` does exactly that.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import inspect as _inspect
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from onnxopt import __version__ as ONNXOPT_VERSION
from onnxopt.errors import UserError

TVM_MISSING = "TVM is not installed: pip install 'onnxopt[tvm]'"
MANIFEST_NAME = "manifest.json"
LIBRARY_NAME = "model.so"
CUDA_SOURCE_NAME = "model.cu"
MANIFEST_FORMAT = "onnxopt-tvm-build/1"
DEFAULT_CUDA_ARCH = "sm_80"
BUILDER_TIMEOUT_SEC = 120.0

# An event sink for long steps: ``on_event(kind, data)``. Kinds: "stage" {"name"},
# "tasks" {"tasks": [names], "total_trials"}, "trials" {"task", "done", "total", "best_us"}.
EventSink = Callable[[str, dict], None]


# --------------------------------------------------------------------------- tvm import


def require_tvm():
    """Import and return ``tvm``, or raise the one-line UserError saying how to install it."""
    try:
        import tvm  # noqa: PLC0415  (lazy on purpose: TVM is an optional extra)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in ("tvm", "tvm_ffi"):
            raise UserError(TVM_MISSING) from exc
        raise UserError(f"TVM is installed but cannot be imported ({exc}); reinstall it: pip install 'onnxopt[tvm]'") from exc
    except ImportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"TVM is installed but cannot be imported ({reason}); reinstall it: pip install 'onnxopt[tvm]'") from exc
    return tvm


def tvm_version() -> str:
    return str(require_tvm().__version__)


# --------------------------------------------------------------------------- targets


@dataclasses.dataclass(frozen=True)
class TargetChoice:
    """A resolved compilation target.

    ``target`` and ``host`` are TVM JSON target dicts (TVM 0.27 refuses CLI target strings).
    ``cross_compiler`` is the C++ driver used to link the library (None: the host's ``g++``),
    ``apt_package`` the Debian package that provides it.
    """

    name: str
    description: str
    target: dict
    host: dict | None = None
    cross_compiler: str | None = None
    apt_package: str | None = None

    @property
    def kind(self) -> str:
        return str(self.target.get("kind"))

    @property
    def runs_on_this_machine(self) -> bool:
        """True when the library can be loaded and run here (a native CPU build whose vector
        unit, for the ``x86-avx2`` / ``x86-avx512`` presets, this CPU has)."""
        unit = _X86_VECTOR_UNITS.get(self.name)
        return self.kind == "llvm" and self.cross_compiler is None and (unit is None or unit in _host_cpu_flags())

    def to_json(self) -> dict:
        return {"name": self.name, "target": self.target, "host": self.host,
                "cross_compiler": self.cross_compiler}


_AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
_ARMV7 = {"kind": "llvm", "mtriple": "armv7a-linux-gnueabihf", "mattr": ["+neon", "+vfp4"], "mfloat-abi": "hard"}


# x86-64 CPUs named by their vector unit, for building on one machine for another: the oldest
# LLVM CPU with that unit (Haswell: AVX2 and FMA; Skylake-SP: AVX-512F/CD/BW/DQ/VL), so the code
# runs on every later one. The value is the /proc/cpuinfo flag the CPU needs to run it.
_X86_VECTOR_UNITS = {"x86-avx2": "avx2", "x86-avx512": "avx512f"}


def _x86(mcpu: str) -> dict:
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}


def _arm64(mcpu: str | None = None, cores: int | None = None) -> dict:
    target = copy.deepcopy(_AARCH64)
    if mcpu:
        target["mcpu"] = mcpu
    if cores:
        target["num-cores"] = cores
    return target


# name -> (description, builder). Builders take the CUDA arch (only CUDA presets use it).
_PRESETS: dict[str, tuple[str, Callable[[str | None], tuple[dict, dict | None]]]] = {
    "x86": ("this machine's x86-64 CPU (LLVM detects -mcpu)", lambda _arch: (_host_target(), None)),
    "x86-avx2": ("any x86-64 CPU with AVX2 and FMA (Haswell, Zen and newer): 8 float32 lanes",
                 lambda _arch: (_x86("haswell"), None)),
    "x86-avx512": ("any x86-64 CPU with AVX-512 (Skylake-SP, Ice Lake, Zen 4 and newer): 16 float32 lanes",
                   lambda _arch: (_x86("skylake-avx512"), None)),
    "aarch64": ("generic 64-bit ARM Linux (NEON)", lambda _arch: (_arm64(), None)),
    "armv7": ("32-bit ARMv7-A Linux, hard float, NEON/VFPv4", lambda _arch: (copy.deepcopy(_ARMV7), None)),
    "rpi3": ("Raspberry Pi 3, 64-bit OS (Cortex-A53 x4)", lambda _arch: (_arm64("cortex-a53", 4), None)),
    "rpi4": ("Raspberry Pi 4, 64-bit OS (Cortex-A72 x4)", lambda _arch: (_arm64("cortex-a72", 4), None)),
    "rpi5": ("Raspberry Pi 5, 64-bit OS (Cortex-A76 x4)", lambda _arch: (_arm64("cortex-a76", 4), None)),
    "cuda": ("NVIDIA GPU on this x86-64 host (--cuda-arch, default sm_80)",
             lambda arch: ({"kind": "cuda", "arch": arch or DEFAULT_CUDA_ARCH}, _host_target())),
    "jetson-nano": ("Jetson Nano: CUDA sm_53, Cortex-A57 host",
                    lambda arch: ({"kind": "cuda", "arch": arch or "sm_53"}, _arm64("cortex-a57", 4))),
    "jetson-xavier": ("Jetson AGX Xavier: CUDA sm_72, Carmel host",
                      lambda arch: ({"kind": "cuda", "arch": arch or "sm_72"}, _arm64("carmel"))),
    "jetson-orin": ("Jetson Orin: CUDA sm_87, Cortex-A78AE host",
                    lambda arch: ({"kind": "cuda", "arch": arch or "sm_87"}, _arm64("cortex-a78ae"))),
}

# Cross C++ drivers by LLVM triple prefix, and the Debian package providing each.
_CROSS_COMPILERS = (
    ("aarch64", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
    ("arm64", "aarch64-linux-gnu-g++", "g++-aarch64-linux-gnu"),
    ("armv7", "arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf"),
    ("arm", "arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf"),
    ("thumb", "arm-linux-gnueabihf-g++", "g++-arm-linux-gnueabihf"),
)


def known_targets() -> dict[str, str]:
    """Friendly target names and what each one means."""
    return {name: description for name, (description, _) in _PRESETS.items()}


def channel_grid(name: str) -> tuple[int, int]:
    """The channel counts pruning should keep for target ``name``, and the ranks factorisation
    may give the width between its two convs (``compress --target`` sets both): multiples of
    the float32 lanes of the target's vector unit (``--round-to``), so that no kernel runs a
    partly filled vector or falls back to an unblocked layout, and, on x86, fewer than that in
    multiples of 4 (the second number; 0: none).

    - ``x86`` (this machine): multiples of 8, the lanes of AVX2, or of 16 where the CPU has
      AVX-512F (``host_vector_unit``). onnxruntime's NCHWc convolutions block channels by the
      same number (MLAS's ``NchwcBlockSize``) and leave a conv whose input channels are a
      larger non-multiple of it in plain NCHW; a conv reading fewer channels than one block
      reads them from plain NCHW and still writes blocks (onnxruntime's ``NchwcTransformer``),
      hence the narrow counts, which let a 16-channel group be pruned at all. Measured
      (``benchmarks/prune_bench.py``, 1 thread, speed-up at batch 1 / 32 against the original):
      on AVX2, ResNet-56 pruned 2x 1.45x / 1.65x with multiples of 8, 1.29x / 1.38x with 4,
      1.02x unrounded; MobileNetV2 at 1.3x the same with 4, 8 or 16 (1.26-1.31x), 0.76x
      unrounded. On AVX-512 (2026-12-04), ResNet-56 pruned 2x with this grid 1.44x / 1.40x,
      multiples of 8 1.34x / 1.29x, of 4 1.29x / 1.26x; strict multiples of 16 cannot reach
      2x (its first stage has 16 channels) and lose 11 top-1 points at 1.8x. ResNet-56's
      spatial decomposition with ranks on this grid, at 1.6-2.4x fewer MACs: 1.01-1.11x faster
      at batch 1 than with multiples of 4, for 0.04-0.48 more top-1 points lost (README,
      "Spatial decomposition"); its low-rank factorisation at 2x: the same speed.
    - ``x86-avx2`` and ``x86-avx512`` (another x86 machine, by its vector unit): the same rule
      with 8 and 16. Measured on AVX2 by counting onnxruntime's instructions under valgrind,
      whose CPU has AVX2 and no AVX-512, so MLAS blocks channels by 8
      (``benchmarks/avx2_instructions.py``; README, "Channel counts in multiples of the SIMD
      width").
    - ARM (``aarch64``, ``armv7``, ``rpi*``): multiples of 4, the lanes of 128-bit NEON.
    - CUDA (``cuda``, ``jetson-*``): multiples of 8, NVIDIA's rule for Tensor Core shapes in
      half precision (not measured here: no GPU).
    """
    key = name.strip().lower()
    if key not in _PRESETS:
        raise UserError(f"unknown target {name!r}; known targets: {', '.join(_PRESETS)}")
    if key == "x86" or key in _X86_VECTOR_UNITS:
        unit = host_vector_unit() if key == "x86" else _X86_VECTOR_UNITS[key]
        return (16 if unit == "avx512f" else 8), 4
    if key == "cuda" or key.startswith("jetson-"):
        return 8, 0
    return 4, 0


def host_vector_unit() -> str:
    """The widest float32 vector unit of this x86 CPU that ``channel_grid`` knows: ``avx512f``,
    ``avx2`` or ``""`` (another CPU, or none known); benchmarks record it beside their latencies."""
    flags = _host_cpu_flags()
    return next((unit for unit in ("avx512f", "avx2") if unit in flags), "")


def _host_cpu_flags() -> set[str]:
    """This CPU's feature flags (``/proc/cpuinfo``; empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


@functools.lru_cache(maxsize=1)
def _host_cpu() -> str:
    require_tvm()
    from tvm.target import codegen  # noqa: PLC0415

    return str(codegen.llvm_get_system_cpu())


def _physical_cores() -> int:
    try:
        import psutil  # noqa: PLC0415

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:
        return int(os.cpu_count() or 1)


def _host_target() -> dict:
    return {"kind": "llvm", "mcpu": _host_cpu(), "num-cores": _physical_cores()}


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _cross_compiler_for(cpu_target: dict) -> tuple[str | None, str | None]:
    """(compiler, apt package) for linking code of this LLVM target on this machine."""
    triple = str(cpu_target.get("mtriple", "") or "")
    if not triple:
        return None, None
    arch = triple.split("-")[0].lower()
    if arch == _host_arch() or (arch.startswith("x86") and _host_arch() == "x86_64"):
        return None, None
    for prefix, compiler, package in _CROSS_COMPILERS:
        if arch.startswith(prefix):
            if _host_arch() == "aarch64" and prefix in ("aarch64", "arm64"):
                return None, None
            return compiler, package
    raise UserError(f"no cross compiler known for target triple {triple!r}; onnxopt links ARM (aarch64, armv7) and host builds only")


def resolve_target(name: str | None = "x86", *, cuda_arch: str | None = None,
                   target_json: str | Mapping | None = None) -> TargetChoice:
    """Map a friendly name (or a full TVM target dict) to a :class:`TargetChoice`.

    ``target_json`` is the escape hatch: a JSON object (or dict) such as
    ``{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}``; a CUDA target
    may carry its CPU side under ``"host"``. It is validated by constructing the TVM Target.
    """
    if target_json is not None:
        if name not in (None, "", "custom"):
            raise UserError("give either --target NAME or --target-json, not both")
        target, host = _parse_target_json(target_json)
        if cuda_arch:
            if target.get("kind") != "cuda":
                raise UserError("--cuda-arch only applies to CUDA targets")
            target["arch"] = cuda_arch
        choice_name, description = "custom", "custom target (--target-json)"
    else:
        if not name:
            raise UserError(f"no target given: pass --target with one of: {', '.join(_PRESETS)} (or --target-json)")
        key = name.strip().lower()
        if key not in _PRESETS:
            raise UserError(f"unknown target {name!r}; known targets: {', '.join(_PRESETS)} (or pass a full TVM target with --target-json)")
        description, make = _PRESETS[key]
        target, host = make(cuda_arch)
        if cuda_arch and target.get("kind") != "cuda":
            raise UserError(f"--cuda-arch only applies to CUDA targets, not {key!r}")
        choice_name = key
    if target.get("kind") == "cuda":
        arch = str(target.get("arch", ""))
        if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
            raise UserError(f"CUDA arch {arch!r} is not of the form sm_NN (e.g. sm_80, sm_87)")
    cpu_side = host if host is not None else target
    compiler, package = _cross_compiler_for(cpu_side) if cpu_side.get("kind") == "llvm" else (None, None)
    choice = TargetChoice(choice_name, description, target, host, compiler, package)
    _tvm_target(choice)  # validate now, with a one-line error
    return choice


def _parse_target_json(target_json: str | Mapping) -> tuple[dict, dict | None]:
    if isinstance(target_json, Mapping):
        data = dict(target_json)
    else:
        try:
            data = json.loads(target_json)
        except json.JSONDecodeError as exc:
            raise UserError(f"--target-json is not valid JSON ({exc.msg} at column {exc.colno})") from exc
    if not isinstance(data, dict) or "kind" not in data:
        raise UserError('--target-json must be a JSON object with a "kind", e.g. {"kind": "llvm", "mcpu": "znver3"}')
    host = data.pop("host", None)
    if host is not None and not (isinstance(host, dict) and "kind" in host):
        raise UserError('the "host" of --target-json must be a JSON object with a "kind"')
    if data.get("kind") == "cuda" and host is None:
        host = _host_target()
    return data, host


def _tvm_target(choice: TargetChoice):
    tvm = require_tvm()
    try:
        if choice.host is not None:
            return tvm.target.Target(choice.target, host=choice.host)
        return tvm.target.Target(choice.target)
    except Exception as exc:  # TVM raises ValueError/TVMError/TypeError for bad dicts
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"TVM refuses target {json.dumps(choice.target)}: {reason}") from exc


def require_compiler(choice: TargetChoice) -> None:
    """Raise a UserError naming the apt package when the target's cross compiler is missing."""
    if choice.cross_compiler and shutil.which(choice.cross_compiler) is None:
        raise UserError(f"cross compiler {choice.cross_compiler} not found for target {choice.name!r}: "
                        f"apt-get install {choice.apt_package} (or run tools/install_cross_toolchains.sh)")
    if choice.cross_compiler is None and shutil.which("g++") is None and shutil.which("gcc") is None:
        raise UserError("no C++ compiler found to link the library: apt-get install g++")


# --------------------------------------------------------------------------- shapes


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


def _graph_inputs(model) -> list:
    initializers = {t.name for t in model.graph.initializer}
    return [value for value in model.graph.input if value.name not in initializers]


def _value_shape(value) -> list:
    dims = []
    for dim in value.type.tensor_type.shape.dim:
        if dim.HasField("dim_value"):
            dims.append(int(dim.dim_value))
        else:
            dims.append(dim.dim_param or None)
    return dims


def _value_dtype(value) -> str:
    from onnx import helper  # noqa: PLC0415

    elem = value.type.tensor_type.elem_type
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem)).name
    except (KeyError, TypeError):
        raise UserError(f"input {value.name!r} has an ONNX element type ({elem}) TVM cannot take as an input") from None


def static_input_specs(model, input_shapes: Mapping[str, Sequence[int]] | None = None, batch: int = 1) -> list[TensorSpec]:
    """The model inputs with every dimension fixed, for this TVM step only.

    A symbolic (or unknown) first dimension becomes ``batch``; ``input_shapes`` overrides whole
    shapes by input name; any other symbolic dimension must be given in ``input_shapes``.
    """
    if batch < 1:
        raise UserError(f"batch must be at least 1, got {batch}")
    inputs = _graph_inputs(model)
    names = [value.name for value in inputs]
    overrides = dict(input_shapes or {})
    unknown = [name for name in overrides if name not in names]
    if unknown:
        raise UserError(f"--input-shape names unknown input(s) {', '.join(map(repr, unknown))}; the model's inputs are: {', '.join(names)}")
    specs = []
    for value in inputs:
        declared = _value_shape(value)
        if value.name in overrides:
            shape = tuple(int(d) for d in overrides[value.name])
            if declared and len(shape) != len(declared):
                raise UserError(f"--input-shape {value.name}: gives {len(shape)} dimensions but the model declares {len(declared)} ({_fmt_shape(declared)})")
            for axis, (given, want) in enumerate(zip(shape, declared)):
                if given < 1:
                    raise UserError(f"--input-shape {value.name}: dimension {axis} must be positive, got {given}")
                if isinstance(want, int) and want != given:
                    raise UserError(f"--input-shape {value.name}: dimension {axis} is fixed to {want} in the model, got {given}")
        else:
            if not declared:
                raise UserError(f"input {value.name!r} has no declared shape: pass --input-shape {value.name}:D0,D1,...")
            shape = []
            for axis, dim in enumerate(declared):
                if isinstance(dim, int) and dim > 0:
                    shape.append(dim)
                elif axis == 0:
                    shape.append(batch)
                else:
                    raise UserError(f"input {value.name!r} has symbolic dimension {dim!r} at axis {axis} ({_fmt_shape(declared)}): "
                                    f"pass --input-shape {value.name}:{','.join(str(d) if isinstance(d, int) else '?' for d in declared)}")
            shape = tuple(shape)
        specs.append(TensorSpec(value.name, shape, _value_dtype(value)))
    return specs


def _fmt_shape(shape: Sequence) -> str:
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


def _output_specs(model) -> list[dict]:
    outputs = []
    for value in model.graph.output:
        dtype = None
        with contextlib.suppress(UserError):
            dtype = _value_dtype(value)
        outputs.append({"name": value.name, "shape": _value_shape(value) or None, "dtype": dtype})
    return outputs


# --------------------------------------------------------------------------- import and lower


def _load_onnx(onnx_path: Path):
    import onnx  # noqa: PLC0415

    if not onnx_path.is_file():
        raise UserError(f"model not found: {onnx_path}")
    try:
        return onnx.load(str(onnx_path))
    except Exception as exc:
        raise UserError(f"cannot read {onnx_path} as an ONNX model ({type(exc).__name__})") from exc


def fold_for_import(model, specs: Sequence[TensorSpec]):
    """A copy of ``model`` with static input shapes and constant subgraphs folded.

    TVM's importer needs some operands to be constants that exporters compute from other
    constants (e.g. the ``pads`` of ResNet option-A shortcuts: ConstantOfShape -> Concat ->
    Reshape -> Slice -> Cast). onnx-graphsurgeon folds them (and shape subgraphs, now that
    the shapes are static) with onnxruntime. The caller's model is not modified; if folding
    fails the unfolded copy is returned and the importer has the last word.
    """
    import onnx  # noqa: PLC0415
    import onnx_graphsurgeon as gs  # noqa: PLC0415

    static = onnx.ModelProto()
    static.CopyFrom(model)
    by_name = {s.name: s for s in specs}
    for value in static.graph.input:
        if value.name in by_name:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for size in by_name[value.name].shape:
                dims.add().dim_value = int(size)
    try:
        graph = gs.import_onnx(static)
        graph.fold_constants(fold_shapes=True, error_ok=True).cleanup()
        folded = gs.export_onnx(graph, do_type_check=False)
    except Exception:  # folding is an optimisation for the importer, never a reason to fail
        return static
    folded.ir_version = model.ir_version
    del folded.opset_import[:]
    folded.opset_import.extend(model.opset_import)
    return folded


def import_onnx(model, specs: Sequence[TensorSpec]):
    """ONNX ModelProto -> relax IRModule with static input shapes (weights bound as constants)."""
    require_tvm()
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    model = fold_for_import(model, specs)
    try:
        return from_onnx(model, shape_dict={s.name: list(s.shape) for s in specs},
                         dtype_dict={s.name: s.dtype for s in specs})
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise UserError(f"TVM's ONNX importer cannot convert this model: {type(exc).__name__}: {reason}") from exc


def _lower_for_tuning(mod, target):
    """The preparation of relax's ``static_shape_tuning`` pipeline, up to (excluding) tuning."""
    tvm = require_tvm()
    from tvm import relax  # noqa: PLC0415

    with target:
        return tvm.transform.Sequential([
            relax.transform.DecomposeOpsForInference(),
            relax.transform.CanonicalizeBindings(),
            relax.pipeline.zero_pipeline(),
        ])(mod)


# --------------------------------------------------------------------------- tuning


def _is_pseudo_file(filename: str | None) -> bool:
    return bool(filename) and os.path.basename(str(filename)).startswith("<")


def _memoise_getmodule_misses() -> Callable[[], None]:
    """Make ``inspect.getmodule`` remember files that belong to no module.

    TVMScript's parser calls ``inspect.stack()`` for every ``@T.prim_func``; for frames of
    ``<frozen importlib._bootstrap>`` and ``<ast>`` ``getmodule`` rescans all of ``sys.modules``
    each time, which is ~90% of importing ``tvm.s_tir.tensor_intrin`` (38 s -> 4 s here).
    Only pseudo-files (``<...>``) are memoised, so real modules are still found. Returns the
    function that restores the original.
    """
    original = _inspect.getmodule
    if getattr(original, "_onnxopt_memoised", False):
        return lambda: None
    misses: set[str] = set()

    def getmodule(object, _filename=None):  # noqa: A002 (inspect's own signature)
        if _inspect.ismodule(object) or hasattr(object, "__module__"):
            return original(object, _filename)
        key = _filename
        if key is None:
            code = getattr(object, "f_code", None) or getattr(object, "__code__", None) or object
            key = getattr(code, "co_filename", None)
        if _is_pseudo_file(key) and key in misses:
            return None
        module = original(object, _filename)
        if module is None and _is_pseudo_file(key):
            misses.add(key)
        return module

    getmodule._onnxopt_memoised = True  # type: ignore[attr-defined]
    _inspect.getmodule = getmodule

    def restore() -> None:
        _inspect.getmodule = original

    return restore


def builder_worker_init() -> None:
    """Initializer of each tuning-builder worker: import ``tvm.s_tir.tensor_intrin`` once, fast.

    Runs before the worker takes any build, and outside the per-build timeout.
    """
    _memoise_getmodule_misses()
    import tvm.s_tir.tensor_intrin  # noqa: F401, PLC0415


def _import_tensor_intrin_here() -> None:
    restore = _memoise_getmodule_misses()
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401, PLC0415
    finally:
        restore()


def _reusing_builder(max_workers: int, timeout_sec: float, f_export=None):
    """A meta_schedule builder whose worker processes live for the whole tuning run.

    TVM's ``LocalBuilder`` starts a fresh process pool for every batch of candidates, so each
    batch pays ``import tvm`` and the ``tensor_intrin`` import again (10-20 s per batch on
    2 cores). This builder keeps its workers (recycled after 64 builds, the leak TVM's
    comment mentions) and builds with TVM's own ``default_build`` / ``default_export``.
    Call ``close()`` when tuning ends.
    """
    from tvm.ir.utils import derived_object  # noqa: PLC0415
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder  # noqa: PLC0415
    from tvm.s_tir.meta_schedule.builder import local_builder  # noqa: PLC0415
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind  # noqa: PLC0415

    @derived_object
    class _ReusingBuilder(PyBuilder):
        def __init__(self) -> None:
            super().__init__()
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          initializer=builder_worker_init, maximum_process_uses=64)

        def warm_up(self) -> None:
            """Start every worker now (initializer included), in the background."""
            for _ in range(max_workers):
                self.pool.submit(time.sleep, 0.5)

        def build(self, build_inputs):
            jobs = [(None, f_export, item.mod, item.target, local_builder._serialize_params(item.params))
                    for item in build_inputs]
            results = []
            for outcome in self.pool.map_with_error_catching(lambda job: local_builder._worker_func(*job), jobs):
                if outcome.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(outcome.value, None))
                elif outcome.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(None, f"build timed out after {timeout_sec:.0f} s"))
                else:
                    results.append(BuilderResult(None, f"build failed: {outcome.value}"))
            return results

        def close(self) -> None:
            self.pool.shutdown()

    return _ReusingBuilder()


def export_for_rpc(rt_mod, compiler: str | None = None) -> str:
    """Builder export for RPC measurement: a shared library linked for the device."""
    from tvm.support import cc  # noqa: PLC0415

    path = os.path.join(tempfile.mkdtemp(prefix="onnxopt_ms_"), "tvm_tmp_mod.so")
    if compiler:
        rt_mod.export_library(path, fcompile=cc.cross_compiler(compiler))
    else:
        rt_mod.export_library(path)
    return path


@dataclasses.dataclass(frozen=True)
class RpcConfig:
    """Where tuning candidates are measured: a TVM RPC tracker and the device key."""

    host: str
    port: int
    key: str
    session_timeout_sec: int = 60

    @classmethod
    def parse(cls, address: str, key: str | None) -> RpcConfig:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise UserError(f"--rpc must be HOST:PORT of a TVM RPC tracker, got {address!r}")
        if not key:
            raise UserError("--rpc needs --rpc-key: the key the device's rpc_server registered with the tracker")
        return cls(host, int(port), key)

    def __str__(self) -> str:
        return f"{self.host}:{self.port} key={self.key}"


@dataclasses.dataclass
class TaskReport:
    name: str
    weight: int
    trials: int          # measured candidates in the database (all runs)
    trials_this_run: int
    best_us: float | None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class TuningReport:
    database: str
    trials_per_task: int
    trials_run: int
    seconds: float
    tasks: list[TaskReport]
    runner: str

    @property
    def seconds_per_trial(self) -> float | None:
        return self.seconds / self.trials_run if self.trials_run else None

    def to_json(self) -> dict:
        return {"database": self.database, "trials_per_task": self.trials_per_task, "trials_run": self.trials_run,
                "seconds": round(self.seconds, 3), "seconds_per_trial": self.seconds_per_trial,
                "runner": self.runner, "tasks": [t.to_json() for t in self.tasks]}


def _database_files(tune_dir: Path) -> tuple[Path, Path]:
    return tune_dir / "database_workload.json", tune_dir / "database_tuning_record.json"


def has_database(tune_dir: str | Path) -> bool:
    workloads, records = _database_files(Path(tune_dir))
    return workloads.is_file() and records.is_file() and records.stat().st_size > 0


def _task_records(database, task_mod, target) -> tuple[int, float | None]:
    """(measured records, best mean seconds) of one task for this target."""
    if not database.has_workload(task_mod):
        return 0, None
    workload = database.commit_workload(task_mod)
    records = [r for r in database.get_top_k(workload, 1 << 30)
               if str(r.target.kind.name) == str(target.kind.name) and r.run_secs]
    best = None
    for record in records:
        secs = [float(s) for s in record.run_secs]
        mean = sum(secs) / len(secs)
        if mean < 1e9 and (best is None or mean < best):
            best = mean
    return len(records), best


def _progress_callback(on_event: EventSink, task_names: list[str], trials_per_task: int):
    from tvm.ir.utils import derived_object  # noqa: PLC0415
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback  # noqa: PLC0415

    @derived_object
    class _Progress(PyMeasureCallback):
        def __init__(self) -> None:
            self.done = [0] * len(task_names)
            self.best = [None] * len(task_names)

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            self.done[task_id] += len(measure_candidates)
            for result in runner_results:
                if result.error_msg is None and result.run_secs:
                    mean = sum(float(s) for s in result.run_secs) / len(result.run_secs)
                    if self.best[task_id] is None or mean < self.best[task_id]:
                        self.best[task_id] = mean
            best = self.best[task_id]
            on_event("trials", {"task": task_names[task_id], "task_id": task_id, "done": sum(self.done),
                                "total": trials_per_task * len(task_names),
                                "best_us": None if best is None else best * 1e6})

    return _Progress()


def _population_size(trials_per_task: int) -> int:
    """Evolutionary-search population: TVM's 512 for real budgets, smaller for a few trials.

    The search evolves the population with the cost model before each batch; with 512 that
    takes 20-60 s per task on 2 cores, which dominates a budget of a handful of trials.
    """
    return int(min(512, max(64, 16 * trials_per_task)))


def _cost_model(total_trials: int) -> str:
    """"xgb", or "random" when the budget is below XGBModel's 100 warm-up samples.

    Below ``num_warmup_samples`` TVM's XGBModel predicts uniform random scores anyway, yet it
    retrains after every batch (5-10 s each here); the random model selects the same way
    without the training.
    """
    return "xgb" if total_trials >= 100 else "random"


def tune(mod, choice: TargetChoice, tune_dir: str | Path, trials_per_task: int, *,
         rpc: RpcConfig | None = None, on_event: EventSink | None = None, seed: int | None = 0) -> TuningReport:
    """Tune every task of a lowered relax module; records go to the JSON database in ``tune_dir``.

    ``mod`` must come from :func:`_lower_for_tuning` (fused PrimFuncs). Candidates are measured
    on this machine, or on the RPC device when ``rpc`` is given.
    """
    require_tvm()
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    on_event = on_event or (lambda kind, data: None)
    if trials_per_task < 1:
        raise UserError(f"--tune-trials must be at least 1 to tune, got {trials_per_task}")
    if not choice.runs_on_this_machine and rpc is None:
        raise UserError(f"cannot tune for {choice.name!r} on this machine: candidates must be measured on the device; "
                        "start a TVM RPC tracker and rpc_server there and pass --rpc HOST:PORT --rpc-key KEY")
    target = _tvm_target(choice)
    tune_dir = Path(tune_dir).resolve()
    tune_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    extracted = ms.relax_integration.extract_tasks(mod, target)
    if not extracted:
        raise UserError("the model has no tunable kernels after lowering")
    f_export = None
    if rpc is not None:
        f_export = functools.partial(export_for_rpc, compiler=choice.cross_compiler)
        _check_tracker(rpc)
    builder = _reusing_builder(max_workers=_physical_cores(), timeout_sec=BUILDER_TIMEOUT_SEC, f_export=f_export)
    try:
        builder.warm_up()  # the workers import TVM while this process prepares the tasks
        return _tune_tasks(ms, extracted, target, tune_dir, trials_per_task, builder, rpc, on_event, seed, start)
    finally:
        builder.close()


def _tune_tasks(ms, extracted, target, tune_dir: Path, trials_per_task: int, builder, rpc: RpcConfig | None,
                on_event: EventSink, seed: int | None, start: float) -> TuningReport:
    _import_tensor_intrin_here()
    with _quiet_meta_schedule_console():
        return _run_tune_tasks(ms, extracted, target, tune_dir, trials_per_task, builder, rpc, on_event, seed, start)


@contextlib.contextmanager
def _quiet_meta_schedule_console():
    """Keep meta_schedule's console output to warnings; its full logs go to TUNE_DIR/logs/.

    meta_schedule sets its console handler to the level of the ``tvm.s_tir.meta_schedule``
    logger and prints every scheduler table at INFO. It also re-lists the logger's handlers
    by name when it configures logging again in the same process, and fails on a handler
    without a name (e.g. one a test harness attached); those are detached for the run.
    """
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    nameless = [handler for handler in logger.handlers if handler.get_name() is None]
    for handler in nameless:
        logger.removeHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for handler in nameless:
            logger.addHandler(handler)


def _run_tune_tasks(ms, extracted, target, tune_dir: Path, trials_per_task: int, builder, rpc: RpcConfig | None,
                    on_event: EventSink, seed: int | None, start: float) -> TuningReport:
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        extracted_tasks=extracted, work_dir=str(tune_dir), seed=seed,
        strategy=ms.search_strategy.EvolutionarySearch(population_size=_population_size(trials_per_task)))
    names = [ctx.task_name for ctx in contexts]
    on_event("tasks", {"tasks": names, "total_trials": trials_per_task * len(names)})

    if rpc is not None:
        runner = ms.runner.RPCRunner(rpc_config=ms.runner.RPCConfig(
            tracker_host=rpc.host, tracker_port=rpc.port, tracker_key=rpc.key,
            session_timeout_sec=rpc.session_timeout_sec))
        runner_label = f"rpc {rpc}"
    else:
        runner = ms.runner.LocalRunner()
        runner_label = "local"
    database = ms.database.JSONDatabase(work_dir=str(tune_dir))
    before = [_task_records(database, task.dispatched[0], target)[0] for task in extracted]
    callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
    callbacks.append(_progress_callback(on_event, names, trials_per_task))
    database = ms.tune.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(tune_dir),
        max_trials_global=trials_per_task * len(contexts), max_trials_per_task=trials_per_task,
        num_trials_per_iter=min(64, trials_per_task), builder=builder, runner=runner,
        database=database, measure_callbacks=callbacks,
        cost_model=_cost_model(trials_per_task * len(contexts)))
    seconds = time.perf_counter() - start

    reports = []
    for task, previous in zip(extracted, before):
        count, best = _task_records(database, task.dispatched[0], target)
        reports.append(TaskReport(task.task_name, int(task.weight), count, count - previous,
                                  None if best is None else best * 1e6))
    trials_run = sum(r.trials_this_run for r in reports)
    return TuningReport(str(tune_dir), trials_per_task, trials_run, seconds, reports, runner_label)


def _check_tracker(rpc: RpcConfig) -> None:
    import socket  # noqa: PLC0415

    from tvm import rpc as tvm_rpc  # noqa: PLC0415

    try:  # TVM's own client retries a refused connection for 60 s; fail fast instead
        socket.create_connection((rpc.host, rpc.port), timeout=10).close()
    except OSError as exc:
        raise UserError(f"cannot reach the TVM RPC tracker at {rpc.host}:{rpc.port} ({exc.strerror or exc}); "
                        "start it with: python -m tvm.exec.rpc_tracker --host HOST --port PORT") from exc
    try:
        tracker = tvm_rpc.connect_tracker(rpc.host, rpc.port)
        summary = tracker.summary()
    except Exception as exc:
        raise UserError(f"cannot reach the TVM RPC tracker at {rpc.host}:{rpc.port} ({type(exc).__name__}); "
                        "start it with: python -m tvm.exec.rpc_tracker --host HOST --port PORT") from exc
    keys = [str(item.get("key", "")).split(":")[-1] for item in summary.get("server_info", [])]
    if rpc.key not in keys:
        raise UserError(f"no rpc_server with key {rpc.key!r} is registered at the tracker {rpc.host}:{rpc.port} "
                        f"(registered: {', '.join(sorted(set(keys))) or 'none'}); on the device run: "
                        f"python -m tvm.exec.rpc_server --tracker {rpc.host}:{rpc.port} --key {rpc.key}")


# --------------------------------------------------------------------------- compile


@dataclasses.dataclass
class BuildResult:
    """What :func:`compile_model` produced."""

    out_dir: Path
    library: Path
    manifest_path: Path
    manifest: dict
    target: TargetChoice
    inputs: list[TensorSpec]
    tuning: TuningReport | None
    tuned: bool
    warnings: list[str]
    seconds: dict[str, float]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def compile_model(
    onnx_path: str | Path,
    target_name: str | None = "x86",
    *,
    out_dir: str | Path,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    batch: int = 1,
    tune_trials: int = 0,
    tune_dir: str | Path | None = None,
    rpc: RpcConfig | None = None,
    cuda_arch: str | None = None,
    target_json: str | Mapping | None = None,
    on_event: EventSink | None = None,
) -> BuildResult:
    """Compile an ONNX model with TVM into ``out_dir`` (``model.so`` + ``manifest.json``).

    ``tune_trials`` is per task (the total is trials × tasks). With ``tune_trials == 0`` and a
    ``tune_dir`` holding a database, the saved schedules are applied without tuning. The
    directory is written atomically: a failed build leaves any previous ``out_dir`` untouched.
    """
    tvm = require_tvm()
    on_event = on_event or (lambda kind, data: None)
    onnx_path = Path(onnx_path)
    out_dir = Path(out_dir)
    choice = resolve_target(target_name, cuda_arch=cuda_arch, target_json=target_json)
    require_compiler(choice)
    if tune_trials < 0:
        raise UserError(f"--tune-trials must be 0 or more, got {tune_trials}")
    if tune_trials > 0 and tune_dir is None:
        raise UserError("--tune-trials needs --tune-dir DIR: the tuning database is kept there and reused by later builds")
    if tune_trials > 0 and not choice.runs_on_this_machine and rpc is None:
        raise UserError(f"cannot tune for {choice.name!r} here: pass --rpc HOST:PORT --rpc-key KEY of a device "
                        "running TVM's rpc_server, or build untuned with --tune-trials 0")
    if rpc is not None and tune_trials == 0:
        raise UserError("--rpc is only used to measure tuning candidates on the device; add --tune-trials N --tune-dir DIR")
    if tune_trials == 0 and tune_dir is not None and not has_database(tune_dir):
        raise UserError(f"--tune-dir {tune_dir} holds no tuning database; tune first with --tune-trials N")
    if out_dir.exists() and not (out_dir.is_dir() and (out_dir / MANIFEST_NAME).is_file()):
        raise UserError(f"{out_dir} exists and is not an onnxopt build directory; choose another -o")
    _check_not_inside(out_dir, tune_dir)

    seconds: dict[str, float] = {}
    warnings: list[str] = []
    clock = time.perf_counter()

    on_event("stage", {"name": "import"})
    model = _load_onnx(onnx_path)
    specs = static_input_specs(model, input_shapes, batch)
    mod = import_onnx(model, specs)
    target = _tvm_target(choice)
    mod = _lower_for_tuning(mod, target)
    seconds["import"] = time.perf_counter() - clock

    report = None
    if tune_trials > 0:
        clock = time.perf_counter()
        on_event("stage", {"name": "tune"})
        report = tune(mod, choice, tune_dir, tune_trials, rpc=rpc, on_event=on_event)
        seconds["tune"] = time.perf_counter() - clock
    tuned_kernels, all_kernels = 0, _kernel_counts(mod)[1]
    kernel_names = sorted(_kernels(mod))
    if tune_dir is not None and has_database(tune_dir):
        mod = _apply_database(mod, target, tune_dir)
        tuned_kernels = _kernel_counts(mod)[0]
        if tuned_kernels == 0:
            warnings.append(f"the tuning database in {tune_dir} has no records for this model's kernels on this target; "
                            "the build is untuned")
        elif tuned_kernels < all_kernels:
            warnings.append(f"only {tuned_kernels} of {all_kernels} kernels have tuned schedules in {tune_dir}; "
                            "the rest use default schedules (tune more with --tune-trials N)")
    tuned = tuned_kernels > 0
    if not tuned:
        if choice.kind == "cuda":
            warnings.append("untuned CUDA build: kernels use DLight's default GPU schedules; for tuned kernels run "
                            "--tune-trials N --tune-dir DIR with --rpc HOST:PORT --rpc-key KEY of a machine with the GPU")
        elif choice.runs_on_this_machine:
            warnings.append("untuned build: TVM's default CPU schedules are naive (often 10x slower than onnxruntime); "
                            "tune with --tune-trials N --tune-dir DIR before measuring or shipping")
        else:
            warnings.append(f"UNTUNED cross build for {choice.name!r}: the kernels use naive default schedules and will be slow; "
                            "tune on the device with --rpc HOST:PORT --rpc-key KEY --tune-trials N --tune-dir DIR")

    clock = time.perf_counter()
    on_event("stage", {"name": "compile"})
    executable = _compile(mod, target)
    seconds["compile"] = time.perf_counter() - clock

    clock = time.perf_counter()
    on_event("stage", {"name": "export"})
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)
    try:
        library = staging / LIBRARY_NAME
        _export(executable, library, choice)
        cuda_file = None
        if choice.kind == "cuda":
            cuda_file = CUDA_SOURCE_NAME
            (staging / cuda_file).write_text(cuda_source(executable))
        manifest = {
            "format": MANIFEST_FORMAT,
            "library": LIBRARY_NAME,
            "source_model": str(onnx_path.resolve()),
            "source_sha256": _sha256(onnx_path),
            "target_name": choice.name,
            "target": choice.target,
            "host": choice.host,
            "target_tvm": json.loads(str(target)),
            "cross_compiler": choice.cross_compiler,
            "cuda_source": cuda_file,
            "inputs": [s.to_json() for s in specs],
            "outputs": _output_specs(model),
            "tuned": tuned,
            "tuned_kernels": tuned_kernels,
            "kernels": all_kernels,
            "kernel_names": kernel_names,
            "tuning_database": str(Path(tune_dir).resolve()) if tuned else None,
            "tuning": report.to_json() if report else None,
            "tvm_version": str(tvm.__version__),
            "onnxopt_version": ONNXOPT_VERSION,
            "warnings": warnings,
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    seconds["export"] = time.perf_counter() - clock
    return BuildResult(out_dir, out_dir / LIBRARY_NAME, out_dir / MANIFEST_NAME, manifest, choice, specs,
                       report, tuned, warnings, seconds)


def _check_not_inside(out_dir: Path, tune_dir: str | Path | None) -> None:
    if tune_dir is None:
        return
    out_abs, tune_abs = out_dir.resolve(), Path(tune_dir).resolve()
    if tune_abs == out_abs or out_abs in tune_abs.parents:
        raise UserError(f"--tune-dir {tune_dir} is inside the output directory {out_dir}, which is replaced on every build; keep it outside")


def _kernels(mod) -> dict[str, Any]:
    """The PrimFuncs (one per fused kernel) of a lowered module, by name."""
    tvm = require_tvm()
    return {str(gv.name_hint): f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def _kernel_counts(mod) -> tuple[int, int]:
    """(kernels with a schedule, all kernels) of a lowered module."""
    kernels = list(_kernels(mod).values())
    scheduled = [f for f in kernels if f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))]
    return len(scheduled), len(kernels)


def _apply_database(mod, target, tune_dir: str | Path):
    from tvm import relax  # noqa: PLC0415

    with target:
        return relax.transform.MetaScheduleApplyDatabase(str(Path(tune_dir).resolve()))(mod)


def _compile(mod, target):
    tvm = require_tvm()
    try:
        return tvm.compile(mod, target=target)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise RuntimeError(f"TVM failed to compile the model for {target.kind.name}: {reason}") from exc


def _export(executable, library: Path, choice: TargetChoice) -> None:
    from tvm.support import cc  # noqa: PLC0415

    if choice.cross_compiler:
        executable.export_library(str(library), fcompile=cc.cross_compiler(choice.cross_compiler))
    else:
        executable.export_library(str(library))


def _replace_dir(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)


# --------------------------------------------------------------------------- run and time


@dataclasses.dataclass
class LoadedModel:
    """A built library loaded into a relax VM on a device."""

    vm: Any
    device: Any
    manifest: dict | None
    library: Path

    @property
    def input_names(self) -> list[str] | None:
        return [i["name"] for i in self.manifest["inputs"]] if self.manifest else None


def _artifact_paths(artifact: str | Path | BuildResult) -> tuple[Path, dict | None]:
    if isinstance(artifact, BuildResult):
        return artifact.library, artifact.manifest
    path = Path(artifact)
    if path.is_dir():
        manifest_path = path / MANIFEST_NAME
        if not manifest_path.is_file():
            raise UserError(f"{path} is not an onnxopt build directory (no {MANIFEST_NAME})")
        manifest = json.loads(manifest_path.read_text())
        return path / manifest.get("library", LIBRARY_NAME), manifest
    if not path.is_file():
        raise UserError(f"built library not found: {path}")
    sibling = path.parent / MANIFEST_NAME
    manifest = json.loads(sibling.read_text()) if sibling.is_file() else None
    return path, manifest


def load(artifact: str | Path | BuildResult) -> LoadedModel:
    """Load a build directory (or its ``model.so``) into a relax VM on this machine."""
    tvm = require_tvm()
    from tvm import relax  # noqa: PLC0415

    library, manifest = _artifact_paths(artifact)
    if manifest and manifest.get("cross_compiler"):
        raise UserError(f"{library} was built for {manifest.get('target_name')!r} and cannot run on this machine "
                        "(for aarch64 see tools/arm_check)")
    kind = (manifest or {}).get("target", {}).get("kind", "llvm")
    device = tvm.cuda(0) if kind == "cuda" else tvm.cpu(0)
    if kind == "cuda" and not device.exist:
        raise UserError(f"{library} is a CUDA build and this machine has no CUDA GPU")
    lib = tvm.runtime.load_module(str(library))
    return LoadedModel(relax.VirtualMachine(lib, device), device, manifest, library)


def _ordered_inputs(model: LoadedModel, inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    if isinstance(inputs, Mapping):
        names = model.input_names
        if names is None:
            raise UserError("this library has no manifest.json; pass the inputs as a list in graph order")
        missing = [n for n in names if n not in inputs]
        if missing:
            raise UserError(f"missing input(s) {', '.join(missing)}; the model takes: {', '.join(names)}")
        arrays = [inputs[n] for n in names]
    else:
        arrays = list(inputs)
    if model.manifest:
        specs = model.manifest["inputs"]
        if len(arrays) != len(specs):
            raise UserError(f"the model takes {len(specs)} input(s), got {len(arrays)}")
        for array, spec in zip(arrays, specs):
            if list(np.shape(array)) != list(spec["shape"]):
                raise UserError(f"input {spec['name']!r} must have the static shape {spec['shape']} it was built with, got {list(np.shape(array))}")
    return [np.ascontiguousarray(a) for a in arrays]


def _to_numpy(value) -> list[np.ndarray]:
    if hasattr(value, "numpy"):
        return [value.numpy()]
    outputs: list[np.ndarray] = []
    for item in value:
        outputs.extend(_to_numpy(item))
    return outputs


def run(artifact: str | Path | BuildResult | LoadedModel,
        inputs: Mapping[str, np.ndarray] | Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run a built model on numpy inputs (by name, or a list in graph order); outputs in graph order."""
    tvm = require_tvm()
    model = artifact if isinstance(artifact, LoadedModel) else load(artifact)
    arrays = [tvm.runtime.tensor(a, model.device) for a in _ordered_inputs(model, inputs)]
    return _to_numpy(model.vm["main"](*arrays))


@contextlib.contextmanager
def _tvm_threads(threads: int | None):
    """TVM's runtime reads TVM_NUM_THREADS on each parallel launch (1 = run serially)."""
    if threads is None:
        yield
        return
    previous = os.environ.get("TVM_NUM_THREADS")
    os.environ["TVM_NUM_THREADS"] = str(int(threads))
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TVM_NUM_THREADS", None)
        else:
            os.environ["TVM_NUM_THREADS"] = previous


def random_inputs(specs: Sequence[TensorSpec] | Sequence[dict], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in specs:
        name, shape, dtype = (spec.name, spec.shape, spec.dtype) if isinstance(spec, TensorSpec) else (spec["name"], spec["shape"], spec["dtype"])
        if np.issubdtype(np.dtype(dtype), np.floating):
            arrays[name] = rng.standard_normal(tuple(shape)).astype(dtype)
        else:
            arrays[name] = rng.integers(0, 2, size=tuple(shape)).astype(dtype)
    return arrays


def measure_latency(
    model: str | Path | BuildResult,
    *,
    batch: int = 1,
    threads: int = 1,
    repeats: int = 50,
    warmup: int = 5,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tune_dir: str | Path | None = None,
) -> float:
    """Median seconds of one inference with TVM on this machine.

    ``model`` is a build directory / ``model.so`` (timed as built; ``batch`` and
    ``input_shapes`` must match the build) or an ``.onnx`` file, which is compiled for the
    host first (``x86``), applying the database in ``tune_dir`` if given. ``threads`` sets
    TVM_NUM_THREADS for the timing (TVM's pool keeps the first multi-thread count it saw).
    """
    path = model.library if isinstance(model, BuildResult) else Path(model)
    if isinstance(model, BuildResult) or path.suffix != ".onnx":
        loaded = load(model)
        if loaded.manifest and loaded.manifest["inputs"] and batch != loaded.manifest["inputs"][0]["shape"][0]:
            raise UserError(f"{loaded.library} was built for batch {loaded.manifest['inputs'][0]['shape'][0]}, not {batch}")
        return _time_loaded(loaded, threads, repeats, warmup)
    with tempfile.TemporaryDirectory(prefix="onnxopt_tvm_") as scratch:
        built = compile_model(path, "x86", out_dir=Path(scratch) / "build", input_shapes=input_shapes, batch=batch,
                              tune_dir=tune_dir if tune_dir is not None and has_database(tune_dir) else None)
        return _time_loaded(load(built), threads, repeats, warmup)


def _time_loaded(loaded: LoadedModel, threads: int, repeats: int, warmup: int) -> float:
    tvm = require_tvm()
    if repeats < 1:
        raise UserError(f"repeats must be at least 1, got {repeats}")
    if not loaded.manifest:
        raise UserError(f"{loaded.library} has no manifest.json; cannot make inputs of the right shapes")
    feeds = random_inputs(loaded.manifest["inputs"])
    arrays = [tvm.runtime.tensor(a, loaded.device) for a in feeds.values()]
    main = loaded.vm["main"]
    times = []
    with _tvm_threads(threads):
        for _ in range(max(0, warmup)):
            main(*arrays)
        loaded.device.sync()
        for _ in range(repeats):
            start = time.perf_counter()
            main(*arrays)
            loaded.device.sync()
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def compare_latency(onnx_path: str | Path, artifact: str | Path | BuildResult, *, threads: int = 1,
                    repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """Median seconds of TVM and of onnxruntime on the same input, runs interleaved.

    Alternating the two runtimes run by run lets both see the same background load on a
    shared machine. onnxruntime runs the ONNX file with ``threads`` intra-op threads.
    """
    import onnxruntime as ort  # noqa: PLC0415

    tvm = require_tvm()
    loaded = load(artifact)
    if not loaded.manifest:
        raise UserError(f"{loaded.library} has no manifest.json; cannot make inputs of the right shapes")
    feeds = random_inputs(loaded.manifest["inputs"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    arrays = [tvm.runtime.tensor(a, loaded.device) for a in feeds.values()]
    main = loaded.vm["main"]
    tvm_times, ort_times = [], []
    with _tvm_threads(threads):
        for _ in range(max(0, warmup)):
            main(*arrays)
            session.run(None, feeds)
        loaded.device.sync()
        for _ in range(repeats):
            start = time.perf_counter()
            main(*arrays)
            loaded.device.sync()
            tvm_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            session.run(None, feeds)
            ort_times.append(time.perf_counter() - start)
    return {"tvm": float(np.median(tvm_times)), "onnxruntime": float(np.median(ort_times))}


def compare_with_onnxruntime(onnx_path: str | Path, artifact: str | Path | BuildResult, *, seed: int = 0) -> float:
    """Max abs difference between TVM and onnxruntime outputs on random inputs of the built shapes."""
    import onnxruntime as ort  # noqa: PLC0415

    loaded = load(artifact)
    if not loaded.manifest:
        raise UserError(f"{loaded.library} has no manifest.json; cannot make inputs of the right shapes")
    feeds = random_inputs(loaded.manifest["inputs"], seed)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    expected = session.run(None, feeds)
    got = run(loaded, feeds)
    if len(got) != len(expected):
        raise RuntimeError(f"TVM returned {len(got)} outputs, onnxruntime {len(expected)}")
    return max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64)))) if np.size(e) else 0.0
               for g, e in zip(got, expected))


# --------------------------------------------------------------------------- CUDA source


def cuda_source(executable) -> str:
    """The generated CUDA C source of a compiled CUDA executable.

    :func:`compile_model` saves it as ``OUT/model.cu`` (the library itself cannot be loaded
    without a GPU), so that ``nvcc --ptx OUT/model.cu`` can check the kernels compile.
    """
    module = getattr(executable, "mod", executable)
    sources = []
    stack, seen = [module], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.kind == "cuda":
            sources.append(current.inspect_source("cuda") or current.inspect_source(""))
        stack.extend(current.imports)
    if not sources:
        raise UserError("no CUDA module found in this build")
    return "\n".join(sources)

