"""onnxopt.tvm_backend and `onnxopt build`: targets, refusals, build-and-run equivalence.

Tuning and RPC live in test_tvm_tuning.py. Tests that need TVM skip without it; tests on the
real models skip without ../shared; cross builds skip without the cross compilers (CI
installs them with tools/install_cross_toolchains.sh).
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import typer
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from onnxopt import build_cmd, tvm_backend
from onnxopt.errors import UserError

SHARED = Path(__file__).parents[1].parent / "shared"
RESNET20 = SHARED / "models" / "cifar10_resnet20.onnx"
AARCH64_GXX = "aarch64-linux-gnu-g++"
ARMV7_GXX = "arm-linux-gnueabihf-g++"


def tiny_conv_model(batch_dim="N", height: int = 16) -> onnx.ModelProto:
    """conv3x3(+bias) -> relu -> conv3x3 -> residual add -> global pool -> flatten -> gemm."""
    rng = np.random.default_rng(0)

    def weight(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="residual"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes, "tiny_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch_dim, 3, height, height])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch_dim, 10])],
        [weight("w1", 8, 3, 3, 3), weight("b1", 8), weight("w2", 8, 8, 3, 3), weight("w3", 10, 8), weight("b3", 10)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "tiny_conv.onnx"
    onnx.save(tiny_conv_model(), str(path))
    return path


def onnxruntime_run(path: Path, feeds: dict) -> list[np.ndarray]:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name, kind, triple", [
    ("aarch64", "llvm", "aarch64-linux-gnu"),
    ("rpi4", "llvm", "aarch64-linux-gnu"),
    ("armv7", "llvm", "armv7a-linux-gnueabihf"),
])
def test_arm_presets_are_cross_builds(name, kind, triple):
    pytest.importorskip("tvm")
    choice = tvm_backend.resolve_target(name)
    assert choice.kind == kind and choice.target["mtriple"] == triple
    assert choice.cross_compiler in (AARCH64_GXX, ARMV7_GXX)
    assert not choice.runs_on_this_machine


def test_x86_detects_the_host_cpu():
    pytest.importorskip("tvm")
    choice = tvm_backend.resolve_target("x86")
    assert choice.target["kind"] == "llvm" and choice.target["mcpu"] not in ("", "generic")
    assert choice.runs_on_this_machine


@pytest.mark.parametrize("flags, runs", [({"avx2", "fma"}, {"x86-avx2": True, "x86-avx512": False}),
                                         ({"avx2", "avx512f"}, {"x86-avx2": True, "x86-avx512": True}),
                                         (set(), {"x86-avx2": False, "x86-avx512": False})])
def test_x86_vector_presets_build_for_other_machines(monkeypatch, flags, runs):
    """`x86-avx2` / `x86-avx512` compile for the oldest CPU with that vector unit and run here
    only where this CPU has it."""
    pytest.importorskip("tvm")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the x86 presets link with the host's compiler only on x86-64")
    monkeypatch.setattr(tvm_backend, "_host_cpu_flags", lambda: flags)
    for name, mcpu in (("x86-avx2", "haswell"), ("x86-avx512", "skylake-avx512")):
        choice = tvm_backend.resolve_target(name)
        assert choice.target == {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu} and choice.cross_compiler is None
        assert choice.runs_on_this_machine is runs[name]


def test_cuda_arch_and_jetson_host():
    pytest.importorskip("tvm")
    assert tvm_backend.resolve_target("cuda").target == {"kind": "cuda", "arch": "sm_80"}
    assert tvm_backend.resolve_target("cuda", cuda_arch="sm_86").target["arch"] == "sm_86"
    orin = tvm_backend.resolve_target("jetson-orin")
    assert orin.target["arch"] == "sm_87" and orin.host["mcpu"] == "cortex-a78ae"
    assert orin.cross_compiler == AARCH64_GXX


def test_target_json_escape_hatch():
    pytest.importorskip("tvm")
    choice = tvm_backend.resolve_target(None, target_json='{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55"}')
    assert choice.name == "custom" and choice.target["mcpu"] == "cortex-a55" and choice.cross_compiler == AARCH64_GXX


@pytest.mark.parametrize("call, fragment", [
    (lambda: tvm_backend.resolve_target("pdp11"), "known targets: x86, x86-avx2, x86-avx512, aarch64"),
    (lambda: tvm_backend.resolve_target("x86", cuda_arch="sm_80"), "only applies to CUDA"),
    (lambda: tvm_backend.resolve_target("cuda", cuda_arch="80"), "sm_NN"),
    (lambda: tvm_backend.resolve_target(None, target_json="{kind: llvm"), "not valid JSON"),
    (lambda: tvm_backend.resolve_target(None, target_json='{"mcpu": "x"}'), '"kind"'),
    (lambda: tvm_backend.resolve_target("x86", target_json='{"kind": "llvm"}'), "not both"),
])
def test_target_refusals_are_one_line(call, fragment):
    pytest.importorskip("tvm")
    with pytest.raises(UserError) as info:
        call()
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_missing_cross_compiler_names_the_apt_package(monkeypatch, tiny_path, tmp_path):
    pytest.importorskip("tvm")
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == AARCH64_GXX else real_which(name, *a, **k))
    with pytest.raises(UserError) as info:
        tvm_backend.compile_model(tiny_path, "rpi4", out_dir=tmp_path / "out")
    message = str(info.value)
    assert "apt-get install g++-aarch64-linux-gnu" in message and "\n" not in message
    assert not (tmp_path / "out").exists()


def test_missing_tvm_is_one_user_error(monkeypatch, tiny_path, tmp_path):
    monkeypatch.setitem(sys.modules, "tvm", None)  # makes `import tvm` fail as if not installed
    with pytest.raises(UserError) as info:
        tvm_backend.compile_model(tiny_path, "x86", out_dir=tmp_path / "out")
    assert str(info.value) == "TVM is not installed: pip install 'onnxopt[tvm]'"


# ----------------------------------------------------------------------------- shapes


def test_symbolic_batch_is_fixed_for_this_step_only(tiny_path):
    model = onnx.load(str(tiny_path))
    assert [s.shape for s in tvm_backend.static_input_specs(model)] == [(1, 3, 16, 16)]
    assert [s.shape for s in tvm_backend.static_input_specs(model, batch=4)] == [(4, 3, 16, 16)]
    assert [s.shape for s in tvm_backend.static_input_specs(model, {"x": (2, 3, 16, 16)})] == [(2, 3, 16, 16)]
    assert onnx.load(str(tiny_path)).graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


@pytest.mark.parametrize("shapes, fragment", [
    ({"image": (1, 3, 16, 16)}, r"unknown input\(s\) 'image'; the model's inputs are: x"),
    ({"x": (1, 3, 16)}, "gives 3 dimensions but the model declares 4"),
    ({"x": (1, 4, 16, 16)}, "dimension 1 is fixed to 3"),
])
def test_bad_input_shapes(tiny_path, shapes, fragment):
    with pytest.raises(UserError, match=fragment):
        tvm_backend.static_input_specs(onnx.load(str(tiny_path)), shapes)


def test_other_symbolic_dims_need_input_shape():
    model = tiny_conv_model()
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "H"
    with pytest.raises(UserError, match=r"symbolic dimension 'H' at axis 2.*--input-shape x:\?,3,\?,16"):
        tvm_backend.static_input_specs(model)


@pytest.mark.parametrize("spec, expected", [("x:1,3,224,224", ("x", (1, 3, 224, 224))),
                                            ("input.1:2,3,32,32", ("input.1", (2, 3, 32, 32))),
                                            ("ns:x:1,4", ("ns:x", (1, 4)))])
def test_parse_input_shape(spec, expected):
    assert build_cmd.parse_input_shape(spec) == expected


@pytest.mark.parametrize("spec", ["x", "x:", ":1,2", "x:1,a", "x:0,3"])
def test_parse_input_shape_refusals(spec):
    with pytest.raises(UserError, match="--input-shape"):
        build_cmd.parse_input_shape(spec)


# ----------------------------------------------------------------------------- x86 build and run


def test_x86_build_matches_onnxruntime(tiny_path, tmp_path):
    pytest.importorskip("tvm")
    result = tvm_backend.compile_model(tiny_path, "x86", out_dir=tmp_path / "out", batch=2)
    assert result.library.is_file() and result.manifest_path.is_file()
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["inputs"] == [{"name": "x", "shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert manifest["outputs"][0]["name"] == "y"
    assert manifest["target"]["kind"] == "llvm" and manifest["tuned"] is False and manifest["tuning_database"] is None
    assert manifest["tvm_version"].startswith("0.27") and manifest["onnxopt_version"]
    assert any("untuned" in w for w in result.warnings)

    feeds = tvm_backend.random_inputs(result.inputs, seed=3)
    got = tvm_backend.run(tmp_path / "out", feeds)
    expected = onnxruntime_run(tiny_path, feeds)
    np.testing.assert_allclose(got[0], expected[0], rtol=1e-5, atol=1e-5)
    assert tvm_backend.measure_latency(tmp_path / "out", batch=2, repeats=3, warmup=1) > 0


def test_wrong_input_shape_at_run_time(tiny_path, tmp_path):
    pytest.importorskip("tvm")
    tvm_backend.compile_model(tiny_path, "x86", out_dir=tmp_path / "out")
    with pytest.raises(UserError, match=r"static shape \[1, 3, 16, 16\]"):
        tvm_backend.run(tmp_path / "out", {"x": np.zeros((2, 3, 16, 16), np.float32)})


def test_output_dir_is_replaced_not_clobbered(tiny_path, tmp_path):
    pytest.importorskip("tvm")
    stranger = tmp_path / "not_a_build"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not an onnxopt build directory"):
        tvm_backend.compile_model(tiny_path, "x86", out_dir=stranger)
    assert (stranger / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_resnet20_matches_onnxruntime(tmp_path):
    """ResNet-20's option-A shortcuts compute Pad's pads from constants: folded before import."""
    pytest.importorskip("tvm")
    if not RESNET20.is_file():
        pytest.skip(f"{RESNET20} not present (../shared is not checked out)")
    result = tvm_backend.compile_model(RESNET20, "x86", out_dir=tmp_path / "r20")
    assert tvm_backend.compare_with_onnxruntime(RESNET20, result) < 1e-4


# ----------------------------------------------------------------------------- cross builds


def _elf_description(path: Path) -> str:
    if shutil.which("file") is None:
        pytest.skip("`file` is not installed")
    return subprocess.run(["file", "-b", str(path)], capture_output=True, text=True, check=True).stdout


@pytest.mark.parametrize("target, compiler, expected", [
    ("aarch64", AARCH64_GXX, ("ELF 64-bit", "ARM aarch64")),
    ("rpi4", AARCH64_GXX, ("ELF 64-bit", "ARM aarch64")),
    ("armv7", ARMV7_GXX, ("ELF 32-bit", "ARM", "EABI5")),
])
def test_cross_build_elf_machine(tiny_path, tmp_path, target, compiler, expected):
    pytest.importorskip("tvm")
    if shutil.which(compiler) is None:
        pytest.skip(f"{compiler} not installed (tools/install_cross_toolchains.sh)")
    result = tvm_backend.compile_model(tiny_path, target, out_dir=tmp_path / target)
    description = _elf_description(result.library)
    assert all(fragment in description for fragment in expected), description
    assert result.manifest["cross_compiler"] == compiler
    assert any("UNTUNED cross build" in w for w in result.warnings)
    with pytest.raises(UserError, match="cannot run on this machine"):
        tvm_backend.run(result.out_dir, tvm_backend.random_inputs(result.inputs))


def test_cross_tuning_without_rpc_is_refused(tiny_path, tmp_path):
    pytest.importorskip("tvm")
    if shutil.which(AARCH64_GXX) is None:
        pytest.skip(f"{AARCH64_GXX} not installed")
    with pytest.raises(UserError, match="--rpc HOST:PORT --rpc-key KEY"):
        tvm_backend.compile_model(tiny_path, "aarch64", out_dir=tmp_path / "o", tune_trials=2, tune_dir=tmp_path / "db")


def test_cuda_source_compiles_to_ptx(tiny_path, tmp_path):
    pytest.importorskip("tvm")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not installed")
    result = tvm_backend.compile_model(tiny_path, "cuda", out_dir=tmp_path / "cuda")
    assert result.manifest["cuda_source"] == "model.cu"
    ptx = tmp_path / "model.ptx"
    done = subprocess.run([nvcc, "--ptx", "-w", "-arch=sm_80", str(result.out_dir / "model.cu"), "-o", str(ptx)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert ".entry" in ptx.read_text()


# ----------------------------------------------------------------------------- CLI


def _app() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        """test app"""

    build_cmd.register(app)
    return app


def test_cli_build_and_check(tiny_path, tmp_path):
    pytest.importorskip("tvm")
    result = CliRunner().invoke(_app(), ["build", str(tiny_path), "-o", str(tmp_path / "out"), "--target", "x86",
                                         "--input-shape", "x:1,3,16,16", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["inputs"][0]["shape"] == [1, 3, 16, 16] and data["max_abs_diff_vs_onnxruntime"] < 1e-4


def test_cli_unknown_target_is_a_user_error(tiny_path, tmp_path):
    result = CliRunner().invoke(_app(), ["build", str(tiny_path), "-o", str(tmp_path / "out"), "--target", "vax"])
    assert isinstance(result.exception, UserError)
    assert "known targets" in str(result.exception)


def test_cli_main_prints_one_line_and_exits_2(tiny_path, tmp_path):
    pytest.importorskip("onnxopt.cli")
    done = subprocess.run([sys.executable, "-m", "onnxopt", "build", str(tiny_path), "-o", str(tmp_path / "o"), "-t", "vax"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown target 'vax'" in lines[0]


@pytest.mark.parametrize("flags, x86, unit", [({"sse4_2", "avx2", "fma"}, 8, "avx2"), ({"avx2", "avx512f", "avx512bw"}, 16, "avx512f"),
                                              (set(), 8, "")])
def test_channel_grid_follows_the_vector_lanes(monkeypatch, flags, x86, unit):
    """x86 (this machine): onnxruntime's NCHWc block, 8 floats with AVX2, 16 with AVX-512F, and
    fewer channels than a block in multiples of 4; ARM NEON 4; CUDA 8 whatever the host."""
    monkeypatch.setattr(tvm_backend, "_host_cpu_flags", lambda: flags)
    assert tvm_backend.host_vector_unit() == unit
    assert tvm_backend.channel_grid("x86") == (x86, 4)
    assert (tvm_backend.channel_grid("x86-avx2"), tvm_backend.channel_grid("x86-avx512")) == ((8, 4), (16, 4))
    assert [tvm_backend.channel_grid(name) for name in ("aarch64", "armv7", "rpi4", "cuda", "jetson-orin")] == \
        [(4, 0), (4, 0), (4, 0), (8, 0), (8, 0)]
    with pytest.raises(UserError, match="unknown target"):
        tvm_backend.channel_grid("avx512")


def test_host_cpu_flags_are_read_from_cpuinfo():
    flags = tvm_backend._host_cpu_flags()
    if not Path("/proc/cpuinfo").exists():
        assert flags == set()
    elif tvm_backend._host_arch() == "x86_64":
        assert "sse2" in flags          # every x86-64 CPU has it
