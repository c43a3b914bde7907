"""A rewrite that breaks the model is rolled back to the original layer and reported, not shipped."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from conftest import run
from onnxopt.calib.readers import DataSource
from onnxopt.cli import model_inputs
from onnxopt.passes import lowrank
from onnxopt.pipeline import CompressOptions, compress

BROKEN = "block.conv1"


def _break_nan(nodes):
    weight = nodes[1].inputs[1]
    nodes[1].inputs[1] = gs.Constant(weight.name, np.full_like(weight.values, np.nan))


def _break_shape(nodes):                       # a 1x1 weight with one input channel too many
    weight = nodes[1].inputs[1]
    nodes[1].inputs[1] = gs.Constant(weight.name, np.concatenate([weight.values, weight.values[:, :1]], axis=1))


@pytest.mark.parametrize("damage", [_break_nan, _break_shape], ids=["nan-output", "invalid-graph"])
def test_a_layer_that_fails_verification_is_rolled_back(monkeypatch, small_model, damage):
    rewrite = lowrank.rewrite

    def faulty(graph, layer, fact):
        nodes = rewrite(graph, layer, fact)
        if layer.name == BROKEN:
            damage(nodes)
        return nodes

    monkeypatch.setattr(lowrank, "rewrite", faulty)
    x = np.random.default_rng(0).standard_normal((40, 3, 12, 12)).astype(np.float32)
    source = DataSource(model_inputs(small_model), arrays={"x": x})
    result = compress(small_model, source.subset(range(8, 40)), source.subset(range(8)),
                      CompressOptions(speedup=1.2, rows_per_layer=512, stages=1))
    rows = {row.name: row for row in result.layers}
    assert rows[BROKEN].skipped.startswith("rolled back: the rewritten model")
    assert rows[BROKEN].macs_after == rows[BROKEN].macs_before
    assert any(row.rank is not None for row in result.layers)      # the other rewrites are kept
    onnx.checker.check_model(result.model, full_check=True)
    assert not any(node.name.startswith(BROKEN + "/") for node in result.model.graph.node)
    out = run(result.model, {"x": x[:4]})[0]
    assert np.isfinite(out).all()
    assert result.verification.relative_l2 < 0.5
