"""A corpus of bad inputs, generated here: each gets one line naming the problem, exit code 2,
and nothing is written (no output, no temporary file) and the input is never touched."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import onnx
import pytest
from onnx import external_data_helper, numpy_helper
from PIL import Image

from conftest import small_cnn


@pytest.fixture
def onnxopt(capsys, monkeypatch):
    """Run the CLI in this process (as ``onnxopt.cli.main``: exit code and stderr, as a user sees them)."""
    from onnxopt.cli import main

    def invoke(*args):
        monkeypatch.setattr(sys, "argv", ["onnxopt", *map(str, args)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main()
            sys.exit(0)
        return exit_info.value.code, capsys.readouterr().err

    return invoke


def assert_user_error(result, *fragments):
    code, stderr = result
    assert code == 2, stderr
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def _model_bytes() -> bytes:
    return small_cnn().SerializeToString()


def _calib(tmp, array=None):
    path = tmp / "calib.npy"
    np.save(path, np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32) if array is None else array)
    return path


def _write(tmp, name, data: bytes):
    path = tmp / name
    path.write_bytes(data)
    return path


def _weights_with(value):
    model = small_cnn()
    tensor = next(t for t in model.graph.initializer if t.name == "block.conv1.w")
    array = numpy_helper.to_array(tensor).copy()
    array.flat[3] = value
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return model.SerializeToString()


def _hostile(tmp, location):
    """A model whose conv weight claims to live in ``location`` (outside its folder)."""
    (tmp / "secret.bin").write_bytes(b"\0" * 8192)
    folder = tmp / "models"
    folder.mkdir()
    (folder / "link").symlink_to(tmp)
    model = small_cnn()
    tensor = next(t for t in model.graph.initializer if t.name == "block.conv1.w")
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=tensor.ByteSize())
    tensor.data_location = onnx.TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    return _write(folder, "hostile.onnx", model.SerializeToString())


def _bad_image_folder(tmp):
    folder = tmp / "images"
    folder.mkdir()
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    return folder


# name -> (make(tmp) -> (model path, extra CLI args), expected fragments). The output is tmp/out/o.onnx.
MODEL_CASES = {
    "missing file": (lambda tmp: tmp / "nope.onnx", ["no such file"]),
    "empty file": (lambda tmp: _write(tmp, "empty.onnx", b""), ["empty"]),
    "directory": (lambda tmp: tmp, ["is a directory"]),
    "not onnx": (lambda tmp: _write(tmp, "text.onnx", b"this is not a protobuf \x00\xff\xfe" * 10), ["text.onnx", "not a readable ONNX model"]),
    "truncated": (lambda tmp: _write(tmp, "cut.onnx", _model_bytes()[:700]), ["cut.onnx"]),
    "corrupt": (lambda tmp: _write(tmp, "corrupt.onnx", _model_bytes()[:200] + bytes(range(256)) * 4 + _model_bytes()[1224:]), ["corrupt.onnx"]),
    "NaN weight": (lambda tmp: _write(tmp, "nanw.onnx", _weights_with(np.nan)), ["block.conv1.w", "NaN or Inf"]),
    "Inf weight": (lambda tmp: _write(tmp, "infw.onnx", _weights_with(np.inf)), ["block.conv1.w", "NaN or Inf"]),
    "external ../": (lambda tmp: _hostile(tmp, "../secret.bin"), ["outside the model's folder"]),
    "external absolute": (lambda tmp: _hostile(tmp, "/etc/passwd"), ["outside the model's folder"]),
    "external symlink": (lambda tmp: _hostile(tmp, "link/secret.bin"), ["outside the model's folder"]),
    "external missing": (lambda tmp: _hostile(tmp, "gone.bin"), ["gone.bin", "missing"]),
}


def _snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", MODEL_CASES)
def test_bad_model_file(onnxopt, tmp_path, case):
    make, fragments = MODEL_CASES[case]
    model = make(tmp_path)
    calib = _calib(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = _snapshot(tmp_path)
    result = onnxopt("compress", model, "-o", out_dir / "o.onnx", "--speedup", "1.5", "--calib", calib)
    assert_user_error(result, *fragments)
    assert _snapshot(tmp_path) == before


def _pickled(tmp):
    path = tmp / "objects.npy"
    np.save(path, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    return path


def _nan_calib(value):
    data = np.random.default_rng(0).standard_normal((24, 3, 12, 12)).astype(np.float32)
    data[3, 1, 2, 2] = value
    return data


CALIB_CASES = {
    "NaN in calibration data": (lambda tmp: [_calib(tmp, _nan_calib(np.nan))], ["NaN"]),
    "Inf in calibration data": (lambda tmp: [_calib(tmp, _nan_calib(np.inf))], ["Inf"]),
    "wrong shape": (lambda tmp: [_calib(tmp, np.zeros((8, 3, 10, 10), np.float32))], ["shape"]),
    "wrong dtype": (lambda tmp: [_calib(tmp, np.zeros((8, 3, 12, 12), np.complex64))], ["dtype"]),
    "pickled object array": (lambda tmp: [_pickled(tmp)], ["without pickle"]),
    "undecodable image": (lambda tmp: [_bad_image_folder(tmp), "--size", "12"], ["broken.png", "cannot decode"]),
    "more sensitivity folds than samples": (lambda tmp: [_calib(tmp), "--method", "prune", "--sensitivity-folds", "9"],
                                            ["--sensitivity-folds 9 needs", "lower --sensitivity-folds"]),
    "sensitivity folds without a measured allocation": (lambda tmp: [_calib(tmp), "--sensitivity-folds", "3"],
                                                         ["--allocation sensitivity", "drop --sensitivity-folds"]),
    "sensitivity folds with spatial": (lambda tmp: [_calib(tmp), "--method", "spatial", "--sensitivity-folds", "3"],
                                       ["for --method prune, lowrank, auto"]),
}


@pytest.mark.parametrize("case", CALIB_CASES)
def test_bad_calibration_data(onnxopt, tmp_path, small_model_file, case):
    make, fragments = CALIB_CASES[case]
    args = make(tmp_path)
    before = _snapshot(tmp_path)
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "o.onnx", "--speedup", "1.5", "--calib", *args)
    assert_user_error(result, *fragments)
    assert _snapshot(tmp_path) == before


def test_output_in_a_missing_folder(onnxopt, tmp_path, small_model_file):
    result = onnxopt("compress", small_model_file, "-o", tmp_path / "nowhere" / "o.onnx", "--speedup", "1.5", "--calib", _calib(tmp_path))
    assert_user_error(result, "does not exist")
    assert not (tmp_path / "nowhere").exists()


def test_output_folder_not_writable(onnxopt, tmp_path, small_model_file):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        result = onnxopt("compress", small_model_file, "-o", folder / "o.onnx", "--speedup", "1.5", "--calib", _calib(tmp_path))
        assert_user_error(result, "not writable")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o700)


def test_output_equal_to_input_is_refused_and_input_untouched(onnxopt, tmp_path, small_model_file):
    before = small_model_file.read_bytes()
    result = onnxopt("compress", small_model_file, "-o", small_model_file, "--speedup", "1.5", "--calib", _calib(tmp_path))
    assert_user_error(result, "is the input model")
    assert small_model_file.read_bytes() == before
    alias = tmp_path / "alias.onnx"
    alias.symlink_to(small_model_file)
    assert_user_error(onnxopt("compress", small_model_file, "-o", alias, "--speedup", "1.5", "--calib", _calib(tmp_path)),
                      "is the input model")
    assert small_model_file.read_bytes() == before


# Runs the CLI with one step slowed down: it touches `marker` and sleeps, so the test can send
# SIGINT while compress is inside that step.
SLOW_STEP = """
import os, sys, time
from pathlib import Path
marker = Path(sys.argv[1])
target = sys.argv[2]
def slow(original):
    def wrapper(*args, **kwargs):
        marker.touch()
        time.sleep(60)
        return original(*args, **kwargs)
    return wrapper
if target == "solve":
    import onnxopt.passes.lowrank as module
    module.solve = slow(module.solve)
else:                       # the rename that publishes the written model (its data file is moved first)
    import onnxopt.graph as module
    rename = module.os.replace
    slowed = slow(rename)
    module.os.replace = lambda a, b: slowed(a, b) if str(b).endswith(".onnx") else rename(a, b)
from onnxopt.cli import main
sys.argv = ["onnxopt", *sys.argv[3:]]
main()
"""


@pytest.mark.parametrize("step, options", [("solve", []), ("write", []), ("write", ["--external-data"])])
def test_ctrl_c_leaves_nothing_behind(tmp_path, small_model_file, small_calib_file, step, options):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = tmp_path / "in-slow-step"
    process = subprocess.Popen(
        [sys.executable, "-c", SLOW_STEP, marker, step, "-q", "compress", small_model_file, "-o", out_dir / "o.onnx",
         "--speedup", "1.5", "--calib", small_calib_file, "--calib-size", "32", *options],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A job started in the background inherits SIGINT ignored; a user's terminal does not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "interrupted; nothing written"
    assert list(out_dir.iterdir()) == []
