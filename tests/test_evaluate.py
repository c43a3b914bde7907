"""`onnxopt eval --baseline`: both models on the same images, the paired drop and its error."""

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from PIL import Image
from scipy.special import log_softmax

from conftest import labelled_folders, run, small_cnn
from onnxopt.evaluate import Accuracy, PairedAccuracy
from test_cli import assert_user_error, onnxopt


def test_paired_drop_and_its_standard_error_are_those_of_the_per_image_differences():
    rng = np.random.default_rng(0)
    n = 300
    before = rng.random(n) < 0.8
    after = np.where(rng.random(n) < 0.85, before, ~before)
    differences = before.astype(float) - after
    paired = PairedAccuracy(Accuracy(after.mean(), 0.0, n), Accuracy(before.mean(), 0.0, n),
                            lost=int(np.sum(before & ~after)), gained=int(np.sum(after & ~before)), top1_agreement=0.0)
    assert paired.drop_points == pytest.approx(100 * differences.mean())
    assert paired.drop_se_points == pytest.approx(100 * differences.std(ddof=1) / np.sqrt(n))
    assert paired.drop_se_points > 0


def _with_class_favoured(model: onnx.ModelProto, label: int) -> onnx.ModelProto:
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    bias = next(t for t in changed.graph.initializer if t.name == "fc.b")
    values = numpy_helper.to_array(bias).copy()
    values[label] += 0.5
    bias.CopyFrom(numpy_helper.from_array(values, "fc.b"))
    return changed


def _folder_logits(model: onnx.ModelProto, folder) -> tuple[np.ndarray, np.ndarray]:
    """The logits of ``model`` on every image of a class folder (as ``eval`` reads them), and the labels."""
    paths = sorted(p for p in folder.glob("*/*.png"))
    x = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in paths]).transpose(0, 3, 1, 2)
    labels = np.array([int(p.parent.name.removeprefix("class")) for p in paths])
    return run(model, {"x": x})[0], labels


def test_eval_against_a_baseline_counts_the_answers_changed(tmp_path, small_model_file, small_model):
    _, evaluation = labelled_folders(tmp_path, small_model)
    changed = _with_class_favoured(small_model, 3)
    changed_file = tmp_path / "changed.onnx"
    onnx.save(changed, changed_file)
    common = ["--data", evaluation, "--size", "12", "--json"]

    same = onnxopt("eval", small_model_file, "--baseline", small_model_file, *common)
    assert same.returncode == 0, same.stderr
    same = json.loads(same.stdout)
    assert (same["top1_drop_points"], same["drop_se_points"], same["lost"], same["gained"]) == (0.0, 0.0, 0, 0)
    assert same["top1_agreement"] == 1.0 and same["baseline"]["top1"] == same["top1"] == 1.0   # labels: its own answers
    assert same["kl"] == pytest.approx(0.0, abs=1e-9)

    result = onnxopt("eval", changed_file, "--baseline", small_model_file, *common)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    logits, labels = _folder_logits(changed, evaluation)
    predicted = logits.argmax(1)
    lost = int(np.sum(predicted != labels))
    assert 0 < lost < len(labels)
    assert (data["lost"], data["gained"], data["n"]) == (lost, 0, len(labels))
    assert data["top1"] == pytest.approx(1 - lost / len(labels))
    assert data["top1_drop_points"] == pytest.approx(100 * lost / len(labels))
    assert data["top1_agreement"] == pytest.approx(1 - lost / len(labels))
    assert 0 < data["drop_se_points"] < data["top1_drop_points"]
    # KL(p_baseline || p_changed) per image, from the two models' logits on the same images
    log_p = log_softmax(_folder_logits(small_model, evaluation)[0].astype(np.float64), axis=1)
    per_image = (np.exp(log_p) * (log_p - log_softmax(logits.astype(np.float64), axis=1))).sum(1)
    assert per_image.min() > 0
    assert data["kl"] == pytest.approx(per_image.mean(), rel=1e-4)
    assert data["kl_se"] == pytest.approx(per_image.std(ddof=1) / np.sqrt(len(per_image)), rel=1e-3)

    text = onnxopt("eval", changed_file, "--baseline", small_model_file, "--data", evaluation, "--size", "12")
    assert text.returncode == 0, text.stderr
    assert f"{lost} images lost, 0 gained" in " ".join(text.stdout.split())
    assert f"KL of the class distributions {per_image.mean():.4f}" in " ".join(text.stdout.split())


def test_eval_refuses_a_baseline_with_other_inputs(tmp_path, small_model_file, small_model):
    _, evaluation = labelled_folders(tmp_path, small_model)
    other = tmp_path / "other.onnx"
    onnx.save(small_cnn(size=16), other)
    assert_user_error(onnxopt("eval", small_model_file, "--baseline", other, "--data", evaluation, "--size", "12"),
                      "--baseline", "other inputs")
    assert_user_error(onnxopt("eval", small_model_file, "--baseline", tmp_path / "missing.onnx", "--data", evaluation,
                              "--size", "12"), "missing.onnx")


def test_eval_refuses_a_baseline_with_another_number_of_classes(tmp_path, small_model_file, small_model):
    _, evaluation = labelled_folders(tmp_path, small_model)
    wider = onnx.ModelProto()
    wider.CopyFrom(small_model)
    for tensor in wider.graph.initializer:
        if tensor.name in ("fc.w", "fc.b"):
            values = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(np.concatenate([values, values[:1]]), tensor.name))
    wider.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 11
    onnx.checker.check_model(wider, full_check=True)
    wider_file = tmp_path / "wider.onnx"
    onnx.save(wider, wider_file)
    assert_user_error(onnxopt("eval", wider_file, "--baseline", small_model_file, "--data", evaluation, "--size", "12"),
                      "logits have shape", "original")
