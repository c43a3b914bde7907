"""Tucker-2 decomposition of k x k convolutions, SVD of 1 x 1 convolutions and Gemm (MUSCO).

Gusak et al. 2019 (MUSCO), after Kim et al. 2016; ALGORITHMS.md §5. A Conv weight ``W``
(O, I, kh, kw) is approximated on its two channel modes,

    W ~ G x_0 U_out x_1 U_in,   W[o, i] = sum_ab U_out[o, a] G[a, b] U_in[i, b]

with ``U_out`` (O, R_out), ``U_in`` (I, R_in), core ``G`` (R_out, R_in, kh, kw), and runs as

    Conv 1x1 (I -> R_in, weight U_in^T, no bias)
    Conv kh x kw (R_in -> R_out, weight G, the original strides / pads / dilations)
    Conv 1x1 (R_out -> O, weight U_out, the original bias).

``G``, ``U_out``, ``U_in`` come from HOOI (higher-order orthogonal iteration): start from the
leading left singular vectors of the mode-0 unfolding (O x I kh kw) and the mode-1 unfolding
(I x O kh kw), then alternately set each factor to the leading left singular vectors of the
tensor projected on the other factor, until the fit ``||G|| / ||W||`` changes by less than
``1e-7``. At full rank the three layers compute exactly the original.

A 1 x 1 Conv or a Gemm has no spatial mode to keep apart: it becomes two layers by truncated
SVD, ``W ~ U_out B`` with ``B`` (R, I) the first layer (for a Conv: with the original strides
and pads) and ``U_out`` (O, R) the second, with the bias. This is a :class:`Decomposition`
without ``in_factor``.

Multi-stage (MUSCO): an already decomposed layer is decomposed further by first moving the
non-orthogonal parts of its factors into the core (QR, :meth:`Decomposition.normalized`),
then decomposing the core (Tucker-2 or SVD) and merging the new outer factors into the old
ones (:func:`redecompose`); the layer stays three (or two) layers.

MACs per sample (``H_in W_in`` the input, ``H W`` the output size):
``H_in W_in I R_in + H W R_out R_in kh kw + H W O R_out`` (Tucker-2) and
``H W R I kh kw + H W O R`` (SVD, as ``lowrank.decomposed_macs``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxopt.layers import Layer
from onnxopt.passes import lowrank, vbmf

HOOI_TOLERANCE = 1e-7
HOOI_MAX_ITERATIONS = 50


@dataclass
class Decomposition:
    """``W ~ core x_0 out_factor x_1 in_factor`` (float64); ``in_factor`` None: SVD (two layers)."""

    out_factor: np.ndarray              # (O, R_out)
    core: np.ndarray                    # (R_out, R_in, kh, kw); SVD: (R, I, kh, kw)
    in_factor: np.ndarray | None        # (I, R_in)
    bias: np.ndarray                    # (O,)

    @classmethod
    def of(cls, layer: Layer) -> Decomposition:
        """The trivial decomposition of ``layer`` (identity factors), the start of every stage."""
        weight = layer.weight_matrix().astype(np.float64)
        if layer.op == "Conv":
            weight = weight.reshape(layer.out_channels, layer.in_channels, *layer.kernel)
        else:
            weight = weight.reshape(*weight.shape, 1, 1)
        in_factor = np.eye(layer.in_channels) if is_tucker(layer) else None
        return cls(np.eye(layer.out_channels), weight, in_factor, layer.bias_vector().astype(np.float64))

    @property
    def ranks(self) -> tuple[int, int | None]:
        return self.core.shape[0], None if self.in_factor is None else self.core.shape[1]

    def weight(self) -> np.ndarray:
        """The full (O, I, kh, kw) weight this decomposition computes."""
        core = self.core if self.in_factor is None else np.einsum("abkl,ib->aikl", self.core, self.in_factor, optimize=True)
        return np.einsum("aikl,oa->oikl", core, self.out_factor, optimize=True)

    def normalized(self) -> Decomposition:
        """The same weight with orthonormal factors (their triangular QR parts moved into the core)."""
        q_out, r_out = np.linalg.qr(self.out_factor)
        core = np.einsum("aikl,ca->cikl", self.core, r_out, optimize=True)
        q_in = None
        if self.in_factor is not None:
            q_in, r_in = np.linalg.qr(self.in_factor)
            core = np.einsum("abkl,cb->ackl", core, r_in, optimize=True)
        return Decomposition(q_out, core, q_in, self.bias)


def is_tucker(layer: Layer) -> bool:
    """Tucker-2 (three layers) for a k x k Conv; SVD (two layers) for 1 x 1 Conv and Gemm."""
    return layer.op == "Conv" and tuple(layer.kernel) != (1, 1)


def applicability(layer: Layer) -> str | None:
    """Why ``layer`` cannot be decomposed (None: it can)."""
    if layer.unsupported:
        return layer.unsupported
    if layer.is_depthwise:
        return "depthwise conv: one filter per channel, no channel modes to decompose"
    if layer.group > 1:
        return f"grouped conv (group={layer.group}): Tucker-2 across groups is not supported"
    return None


def unfold(tensor: np.ndarray, mode: int) -> np.ndarray:
    """Mode-0 (O x I kh kw) or mode-1 (I x O kh kw) unfolding of an (O, I, kh, kw) tensor."""
    if mode == 1:
        tensor = tensor.transpose(1, 0, 2, 3)
    return tensor.reshape(tensor.shape[0], -1)


def _leading(matrix: np.ndarray, rank: int) -> np.ndarray:
    return np.linalg.svd(matrix, full_matrices=False)[0][:, :rank]


def hooi(tensor: np.ndarray, r_out: int, r_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tucker-2 of an (O, I, kh, kw) tensor: ``(U_out, G, U_in)``, orthonormal factors (HOOI)."""
    tensor = np.asarray(tensor, np.float64)
    norm = max(np.linalg.norm(tensor), 1e-300)
    u_out, u_in = _leading(unfold(tensor, 0), r_out), _leading(unfold(tensor, 1), r_in)
    core = np.einsum("oikl,oa,ib->abkl", tensor, u_out, u_in, optimize=True)
    fit = np.linalg.norm(core) / norm
    for _ in range(HOOI_MAX_ITERATIONS):
        u_out = _leading(unfold(np.einsum("oikl,ib->obkl", tensor, u_in, optimize=True), 0), r_out)
        u_in = _leading(unfold(np.einsum("oikl,oa->aikl", tensor, u_out, optimize=True), 1), r_in)
        core = np.einsum("oikl,oa,ib->abkl", tensor, u_out, u_in, optimize=True)
        previous, fit = fit, np.linalg.norm(core) / norm      # ||W - approx||^2 = ||W||^2 - ||G||^2
        if abs(fit - previous) < HOOI_TOLERANCE:
            break
    return u_out, core, u_in


def redecompose(decomposition: Decomposition, r_out: int, r_in: int | None) -> Decomposition:
    """Decompose ``decomposition``'s core at ranks ``(r_out, r_in)`` and merge the factors."""
    base = decomposition.normalized()
    if base.in_factor is None:
        shape = base.core.shape
        left, sing, right = np.linalg.svd(unfold(base.core, 0), full_matrices=False)
        core = (sing[:r_out, None] * right[:r_out]).reshape(r_out, *shape[1:])
        return Decomposition(base.out_factor @ left[:, :r_out], core, None, base.bias)
    u_out, core, u_in = hooi(base.core, r_out, r_in)
    return Decomposition(base.out_factor @ u_out, core, base.in_factor @ u_in, base.bias)


@dataclass(frozen=True)
class RankEstimate:
    """Weakened EVBMF ranks of the core's unfoldings (None: guarded, keep the current rank)."""

    r_out: int | None
    r_in: int | None
    vbmf_out: vbmf.Estimate
    vbmf_in: vbmf.Estimate | None

    @property
    def reasons(self) -> list[str]:
        found = [(mode, e.reason) for mode, e in (("out", self.vbmf_out), ("in", self.vbmf_in)) if e is not None and e.reason]
        return [f"{mode}: {reason}; rank kept" for mode, reason in found]


def estimate_ranks(decomposition: Decomposition, weaken: float) -> RankEstimate:
    """MUSCO's ranks for the next stage: weakened EVBMF on the mode-0 / mode-1 unfoldings of the
    (normalized) core; for SVD layers on the core matrix only."""
    core = decomposition.normalized().core
    r_out, out = vbmf.weakened_rank(unfold(core, 0), weaken)
    if decomposition.in_factor is None:
        return RankEstimate(r_out, None, out, None)
    r_in, inner = vbmf.weakened_rank(unfold(core, 1), weaken)
    return RankEstimate(r_out, r_in, out, inner)


# ---------------------------------------------------------------------------- costs


def input_hw(layer: Layer) -> tuple[int, int]:
    """Spatial size of the Conv input (from the graph; else output size x strides)."""
    shape = layer.input.shape
    if shape is not None and len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
        return int(shape[2]), int(shape[3])
    return layer.output_hw[0] * layer.strides[0], layer.output_hw[1] * layer.strides[1]


def decomposed_macs(layer: Layer, r_out: int, r_in: int | None = None, in_hw: tuple[int, int] | None = None) -> int:
    """Exact MACs per sample of the layers replacing ``layer`` (see the module docstring);
    ``in_hw``: the input size, when ``layer``'s node is already rewritten."""
    if not is_tucker(layer):
        return lowrank.decomposed_macs(layer, r_out)
    kh, kw = layer.kernel
    spatial = int(np.prod(layer.output_hw))
    return int(np.prod(in_hw or input_hw(layer))) * layer.in_channels * r_in + spatial * (r_out * r_in * kh * kw + layer.out_channels * r_out)


def decomposed_params(layer: Layer, r_out: int, r_in: int | None = None) -> int:
    kh, kw = layer.kernel
    first = 0 if r_in is None else layer.in_channels * r_in
    core_in = layer.in_channels if r_in is None else r_in
    return first + r_out * core_in * kh * kw + layer.out_channels * r_out + layer.out_channels


# ---------------------------------------------------------------------------- rewrite


def rewrite(graph: gs.Graph, layer: Layer, nodes: list[gs.Node], decomposition: Decomposition) -> list[gs.Node]:
    """Replace ``nodes`` (the layer's current node(s), input to output) by ``decomposition``'s
    layers; returns the new nodes, the last one producing the layer's output."""
    name = layer.name
    source, out = nodes[0].inputs[0], nodes[-1].outputs[0]
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)  # noqa: E731
    new: list[gs.Node] = []
    x = source
    if layer.op == "Gemm":
        core = unfold(decomposition.core, 0)                                     # (R, I)
        middle = gs.Variable(f"{out.name}/svd", dtype=out.dtype)
        new.append(gs.Node("Gemm", f"{name}/svd_in", inputs=[x, gs.Constant(f"{name}/svd_in.weight", f32(core.T))], outputs=[middle]))
        new.append(gs.Node("Gemm", f"{name}/svd_out", inputs=[middle, gs.Constant(f"{name}/svd_out.weight", f32(decomposition.out_factor.T)),
                                                              gs.Constant(f"{name}/svd_out.bias", f32(decomposition.bias))], outputs=[out]))
    else:
        prefix = f"{name}/tucker2" if decomposition.in_factor is not None else f"{name}/svd"
        if decomposition.in_factor is not None:
            reduced = gs.Variable(f"{out.name}/tucker2_in", dtype=out.dtype)
            weight = decomposition.in_factor.T[:, :, None, None]
            new.append(gs.Node("Conv", f"{prefix}_in", inputs=[x, gs.Constant(f"{prefix}_in.weight", f32(weight))], outputs=[reduced]))
            x = reduced
        attrs = {key: list(getattr(layer, key)) for key in ("strides", "pads", "dilations")}
        middle = gs.Variable(f"{out.name}/{prefix.rsplit('/', 1)[1]}_core", dtype=out.dtype)
        new.append(gs.Node("Conv", f"{prefix}_core", attrs=attrs, inputs=[x, gs.Constant(f"{prefix}_core.weight", f32(decomposition.core))],
                           outputs=[middle]))
        weight = decomposition.out_factor[:, :, None, None]
        new.append(gs.Node("Conv", f"{prefix}_out", inputs=[middle, gs.Constant(f"{prefix}_out.weight", f32(weight)),
                                                            gs.Constant(f"{prefix}_out.bias", f32(decomposition.bias))], outputs=[out]))
    for node in nodes:
        node.inputs.clear()
        node.outputs.clear()
    graph.nodes.extend(new)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return new
