"""ONNX export shared by the training scripts: BN kept, symbolic batch dim N, opset 17, IR 8."""

import numpy as np


def inline_identity_initializers(m):
    """The TorchScript exporter de-duplicates equal parameters and re-creates them with Identity
    nodes; turn those back into plain initializers so the graph has one tensor per parameter."""
    from onnx import numpy_helper

    inits = {t.name: t for t in m.graph.initializer}
    keep = []
    for n in m.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits:
            m.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(inits[n.input[0]]), n.output[0]))
        else:
            keep.append(n)
    del m.graph.node[:]
    m.graph.node.extend(keep)
    used = {i for n in m.graph.node for i in n.input}
    live = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(live)
    return m


def export_onnx(model, path, example, producer, batchnorms):
    """Export with BN kept, symbolic batch dim N, opset 17, IR version 8."""
    import onnx
    import torch

    model.eval()
    torch.onnx.export(
        model, example, path, dynamo=False, opset_version=17,
        input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=False,
    )
    m = inline_identity_initializers(onnx.load(path))
    m.ir_version = 8
    m.producer_name = producer
    onnx.checker.check_model(m)
    onnx.save(m, path)
    ops = [n.op_type for n in m.graph.node]
    assert ops.count("BatchNormalization") == batchnorms, ops
    assert "Identity" not in ops, ops
    return ops


def ort_logits(path, x, batch=500):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(["logits"], {"input": x[i:i + batch]})[0]
                           for i in range(0, len(x), batch)])
