"""Shared fixtures: small models built in code, and the real models/data in ../shared."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SHARED_REASON = "needs ../shared (the reference models and images next to the repository)"


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        pytest.skip(f"{SHARED_REASON}: {relative} is absent")
    return path


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array, np.float32), name)


def small_cnn(seed: int = 0, batchnorm: bool = True, size: int = 12, opset: int = 13) -> onnx.ModelProto:
    """Conv-BN-Relu, a residual block (Conv-Relu-Conv-Add-Relu), a strided conv, GAP, Gemm.

    Input ``x`` [N, 3, size, size], output ``y`` [N, 10]; batch dimension symbolic.
    """
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def conv(name, x, cin, cout, k=3, stride=1, pad=1, bias=True):
        inits.append(_init(f"{name}.w", rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))))
        inputs = [x, f"{name}.w"]
        if bias:
            inits.append(_init(f"{name}.b", rng.standard_normal(cout) * 0.1))
            inputs.append(f"{name}.b")
        nodes.append(helper.make_node("Conv", inputs, [f"{name}.out"], name=name, kernel_shape=[k, k],
                                      strides=[stride, stride], pads=[pad] * 4))
        return f"{name}.out"

    h = conv("stem", "x", 3, 16, bias=not batchnorm)
    if batchnorm:
        for p, v in (("g", rng.uniform(0.5, 1.5, 16)), ("beta", rng.standard_normal(16) * 0.1),
                     ("mu", rng.standard_normal(16) * 0.1), ("var", rng.uniform(0.5, 2, 16))):
            inits.append(_init(f"bn.{p}", v))
        nodes.append(helper.make_node("BatchNormalization", [h, "bn.g", "bn.beta", "bn.mu", "bn.var"], ["bn.out"], name="bn", epsilon=1e-5))
        h = "bn.out"
    nodes.append(helper.make_node("Relu", [h], ["r0"], name="relu0"))
    a = conv("block.conv1", "r0", 16, 16)
    nodes.append(helper.make_node("Relu", [a], ["r1"], name="relu1"))
    b = conv("block.conv2", "r1", 16, 16)
    nodes.append(helper.make_node("Add", [b, "r0"], ["sum"], name="add"))
    nodes.append(helper.make_node("Relu", ["sum"], ["r2"], name="relu2"))
    c = conv("down", "r2", 16, 32, stride=2)
    nodes.append(helper.make_node("Relu", [c], ["r3"], name="relu3"))
    nodes.append(helper.make_node("GlobalAveragePool", ["r3"], ["gap"], name="gap"))
    nodes.append(helper.make_node("Flatten", ["gap"], ["flat"], name="flatten", axis=1))
    inits.append(_init("fc.w", rng.standard_normal((10, 32)) * 0.3))
    inits.append(_init("fc.b", rng.standard_normal(10) * 0.1))
    nodes.append(helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["y"], name="fc", transB=1))
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    from onnxopt.calib.capture import make_session

    return make_session(model, 1).run(None, feeds)


@pytest.fixture
def small_model() -> onnx.ModelProto:
    return small_cnn()


@pytest.fixture
def small_model_file(tmp_path, small_model) -> Path:
    path = tmp_path / "small.onnx"
    onnx.save(small_model, path)
    return path


@pytest.fixture
def small_calib_file(tmp_path) -> Path:
    """Calibration data for ``small_cnn``: an .npz keyed by input name."""
    rng = np.random.default_rng(1)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.standard_normal((96, 3, 12, 12)).astype(np.float32))
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test gets its own onnxopt disk cache (never the user's ~/.cache/onnxopt)."""
    monkeypatch.setenv("ONNXOPT_CACHE_DIR", str(tmp_path_factory.mktemp("onnxopt-cache")))


def labelled_folders(tmp_path, model):
    """Two disjoint labelled image folders whose labels are the model's own predictions."""
    from PIL import Image

    from onnxopt.calib.capture import make_session

    rng = np.random.default_rng(3)
    session = make_session(model, 1)
    folders = []
    for split, count in (("calib", 48), ("eval", 40)):
        pixels = rng.integers(0, 256, (count, 12, 12, 3), dtype=np.uint8)
        x = (pixels.astype(np.float32) / 255).transpose(0, 3, 1, 2)
        predicted = session.run(None, {"x": x})[0].argmax(1)
        for i, (image, label) in enumerate(zip(pixels, predicted)):
            folder = tmp_path / split / f"class{label:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
        folders.append(tmp_path / split)
    for label in range(10):                  # every class has a folder, so folder index == label
        for split in folders:
            (split / f"class{label:02d}").mkdir(exist_ok=True)
    return folders
