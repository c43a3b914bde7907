"""Patch extraction is exact for every stride / pad / dilation: patches @ W^T + b == Conv output."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import run
from onnxopt.calib.stats import SufficientStats, extract_patches, responses_at, sample_positions


@pytest.mark.parametrize("kernel,stride,pads,dilation", [
    ((3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1, 1, 1), (1, 1)),
    ((3, 1), (1, 2), (1, 0, 1, 0), (1, 1)),
    ((3, 3), (1, 1), (2, 0, 1, 3), (2, 2)),
    ((1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
    ((5, 3), (3, 1), (2, 1, 2, 1), (1, 3)),
])
def test_patches_reproduce_conv(kernel, stride, pads, dilation):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((5, 3, *kernel)).astype(np.float32)
    bias = rng.standard_normal(5).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=list(kernel), strides=list(stride),
                            pads=list(pads), dilations=list(dilation))
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 11, 13])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                              initializer=[numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((2, 3, 11, 13)).astype(np.float32)
    out = run(model, {"x": x})[0]
    positions = sample_positions(2, out.shape[2], out.shape[3], 7, (0, 1))
    patches = extract_patches(x, positions, kernel, stride, pads, dilation)
    np.testing.assert_allclose(patches @ weight.reshape(5, -1).T + bias, responses_at(out, positions), rtol=1e-4, atol=1e-4)


def test_sample_positions_are_distinct_and_reproducible():
    a = sample_positions(3, 4, 5, 6, (7, 0))
    b = sample_positions(3, 4, 5, 6, (7, 0))
    assert np.array_equal(a.row, b.row) and np.array_equal(a.col, b.col)
    for image in range(3):
        chosen = {(r, c) for r, c, i in zip(a.row, a.col, a.image) if i == image}
        assert len(chosen) == 6
    full = sample_positions(2, 2, 2, 10, (0,))
    assert len(full) == 8


def test_streaming_statistics_match_batch_computation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 6)) + 3
    y = x @ rng.standard_normal((6, 4)) + rng.standard_normal((500, 4))
    stats = SufficientStats(6, 4)
    for chunk in np.array_split(np.arange(500), 7):
        stats.update(x[chunk], y[chunk])
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(stats.sxx, xc.T @ xc, rtol=1e-10)
    np.testing.assert_allclose(stats.sxy, xc.T @ yc, rtol=1e-10)
    np.testing.assert_allclose(stats.mean_y, y.mean(0), rtol=1e-12)
    assert stats.n == 500


def test_merged_statistics_are_those_of_the_union_of_rows():
    from onnxopt.calib.stats import merged

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 5)) * 2 + 1
    y = x @ rng.standard_normal((5, 3)) + rng.standard_normal((300, 3))
    parts = []
    for chunk in (slice(0, 40), slice(40, 41), slice(41, 41), slice(41, 300)):
        part = SufficientStats(5, 3)
        part.update(x[chunk], y[chunk])
        parts.append(part)
    total = merged(parts)
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(total.sxx, xc.T @ xc, rtol=1e-10)
    np.testing.assert_allclose(total.sxy, xc.T @ yc, rtol=1e-10)
    np.testing.assert_allclose(total.syy, yc.T @ yc, rtol=1e-10)
    np.testing.assert_allclose(total.mean_x, x.mean(0), rtol=1e-12)
    assert total.n == 300

