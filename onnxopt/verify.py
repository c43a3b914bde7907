"""Checking a rewritten model before it is written.

The output must pass the full ONNX checker (with shape inference), load and run in
onnxruntime, keep the original's graph input/output names, element types and ranks, and give
finite outputs wherever the original's are finite; otherwise :class:`VerificationError`. Its
outputs on held-out inputs are compared with the original's: max absolute difference, relative
L2 error and, for (N, classes) outputs (taken as logits), top-1 agreement and the mean
``KL(softmax z_orig || softmax z)``.

A model of 2 GiB or more cannot be serialised in memory: it is checked and run from the file it
was loaded from or staged to (``path``), see ``graph.save_model_atomic``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import onnx
from scipy.special import log_softmax

from onnxopt import graph as graphs
from onnxopt.calib.capture import make_session
from onnxopt.calib.readers import DataSource
from onnxopt.errors import UserError


class VerificationError(RuntimeError):
    """The rewritten model is invalid: a bug in a pass, never the user's fault."""


@dataclass
class Verification:
    samples: int
    max_abs_diff: float
    relative_l2: float
    top1_agreement: float | None
    kl: float | None = None

    @property
    def damage(self) -> float:
        """What candidates are ranked by: the KL divergence of the class distributions for a
        classifier, else the relative L2 of the outputs."""
        return self.relative_l2 if self.kl is None else self.kl

    def to_json(self) -> dict:
        return asdict(self)


def _signature(values) -> list[tuple]:
    return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values]


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_structure(original: onnx.ModelProto, compressed: onnx.ModelProto) -> None:
    try:
        if graphs.is_large(compressed):
            with graphs.staged_file(compressed) as path:
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(compressed, full_check=True)
    except Exception as exc:
        raise VerificationError(f"the rewritten model fails the ONNX checker: {_first_line(exc)}") from exc
    originals = [i for i in original.graph.input if i.name not in {t.name for t in original.graph.initializer}]
    if _signature(originals) != _signature(compressed.graph.input):
        raise VerificationError("the rewritten model's inputs differ from the original's")
    if _signature(original.graph.output) != _signature(compressed.graph.output):
        raise VerificationError("the rewritten model's outputs differ from the original's")


def row_kl(reference_log_probs: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """``KL(p || softmax logits)`` per row, with ``p = exp(reference_log_probs)`` (log-softmax of
    the original's logits, rows = samples)."""
    log_q = log_softmax(np.asarray(logits, np.float64), axis=1)
    return (np.exp(reference_log_probs) * (reference_log_probs - log_q)).sum(1)


def summed_kl(reference_log_probs: np.ndarray, logits: np.ndarray) -> float:
    """``row_kl`` summed over the rows."""
    return float(row_kl(reference_log_probs, logits).sum())


def compare_outputs(original: onnx.ModelProto, compressed: onnx.ModelProto, data: DataSource,
                    threads: int = 0, batch_size: int = 32) -> Verification:
    """Output difference of ``compressed`` against ``original`` on ``data``."""
    reference = make_session(original, threads)
    try:
        candidate = make_session(compressed, threads)
    except UserError as exc:
        raise VerificationError(f"the rewritten model does not load: {exc}") from None
    max_abs, err_sq, ref_sq, agree, rows, samples, kl = 0.0, 0.0, 0.0, 0, 0, 0, 0.0
    for feeds in data.batches(batch_size):
        expected = reference.run(None, feeds)
        try:
            got = candidate.run(None, feeds)
        except Exception as exc:
            raise VerificationError(f"the rewritten model fails in onnxruntime: {_first_line(exc)}") from None
        samples += len(next(iter(feeds.values())))
        for e, g in zip(expected, got):
            e64, g64 = np.asarray(e, np.float64), np.asarray(g, np.float64)
            if not np.isfinite(g64[np.isfinite(e64)]).all():
                raise VerificationError("the rewritten model gives NaN or Inf where the original's outputs are finite")
            max_abs = max(max_abs, float(np.abs(e64 - g64).max(initial=0.0)))
            err_sq += float(np.square(e64 - g64).sum())
            ref_sq += float(np.square(e64).sum())
        first_e, first_g = expected[0], got[0]
        if first_e.ndim == 2 and first_e.shape[1] > 1:
            agree += int((first_e.argmax(1) == first_g.argmax(1)).sum())
            rows += first_e.shape[0]
            kl += summed_kl(log_softmax(np.asarray(first_e, np.float64), axis=1), first_g)
    return Verification(
        samples=samples,
        max_abs_diff=max_abs,
        relative_l2=float(np.sqrt(err_sq / ref_sq)) if ref_sq > 0 else 0.0,
        top1_agreement=agree / rows if rows else None,
        kl=kl / rows if rows else None,
    )


def verify(original: onnx.ModelProto, compressed: onnx.ModelProto, data: DataSource, threads: int = 0) -> Verification:
    check_structure(original, compressed)
    return compare_outputs(original, compressed, data, threads)
