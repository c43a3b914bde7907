"""The README's first command, `make demo`: the commands its Makefile target runs, run as they are
(read from `make -n demo`), on the bundled Fashion-MNIST model and images; nothing from ../shared."""

import json
import shlex
import shutil
import subprocess

import onnx
import pytest

from conftest import ROOT
from test_cli import onnxopt


def demo_commands(out_dir) -> list[list[str]]:
    """The onnxopt invocations of `make demo OUT=out_dir`, each as argv after `onnxopt`."""
    if shutil.which("make") is None:
        pytest.skip("needs make (the README's demo is a Makefile target)")
    listing = subprocess.run(["make", "-n", "demo", f"OUT={out_dir}"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.replace("\\\n", " ")
    commands = [shlex.split(line) for line in listing.splitlines() if line.strip()]
    return [argv[1:] for argv in commands if argv and argv[0].endswith("/onnxopt")]


def test_make_demo_compresses_the_bundled_model_2x_and_keeps_its_accuracy(tmp_path):
    commands = demo_commands(tmp_path)
    assert [argv[0] for argv in commands] == ["inspect", "compress", "eval", "eval", "bench"]
    for argv in commands:
        result = onnxopt(*argv, cwd=ROOT)
        assert result.returncode == 0, f"onnxopt {shlex.join(argv)}\n{result.stderr}"

    compressed = tmp_path / "fmnist_cnn_2x.onnx"
    onnx.checker.check_model(onnx.load(compressed), full_check=True)
    report = json.loads((tmp_path / "fmnist_cnn_2x.json").read_text())
    assert report["macs_before"] >= 2 * report["macs_after"]

    compared = onnxopt("eval", compressed, "--data", "models/demo/fashion-mnist/test", "--preset", "fashion-mnist",
                       "--baseline", "models/demo/fmnist_cnn.onnx", "--json", cwd=ROOT)
    assert compared.returncode == 0, compared.stderr
    accuracy = json.loads(compared.stdout)
    assert accuracy["n"] == 1000
    assert accuracy["baseline"]["top1"] >= 0.90                 # the bundled model as trained
    assert accuracy["top1_drop_points"] <= 1.5                  # README: 92.9% -> 92.1%
    assert accuracy["top1_agreement"] >= 0.95
