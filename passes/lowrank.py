"""Low-rank channel decomposition of Conv/Gemm layers from their responses.

Zhang, Zou, He, Sun, "Accelerating Very Deep Convolutional Networks for Classification and
Detection" (TPAMI 2016; CVPR 2015 "Efficient and accurate approximations of nonlinear
convolutional networks"), ALGORITHMS.md §1.

The d responses ``y = W x + b0`` of a layer lie near a low-dimensional subspace. With
``yhat`` the responses of the ORIGINAL weights on inputs from the CURRENT (partly compressed)
model and ``y`` the original model's responses (the asymmetric formulation), find a rank-r
``M = Q P^T`` and ``b`` with ``y ~ yhat M + b`` (rows are samples). Then

    Conv k x k, d filters  ->  Conv k x k, r filters, weight Q^T W, no bias
                               Conv 1 x 1, d filters, weight P, bias b + P Q^T b0

(a Gemm becomes two Gemms the same way). It pays only if ``r < d k^2 c / (k^2 c + d)``.

Solvers:

* linear, asymmetric (reduced-rank regression, closed form): ``A = cov(yhat) + delta I``,
  ``B = A^{-1} cov(yhat, y)``, ``E = B^T A B``, ``V`` = top-r eigenvectors of ``E``;
  ``Q = B V``, ``P = V``, ``b = mean(y) - mean(yhat) Q P^T``. Without asymmetry (yhat = y)
  this is PCA of the responses.
* nonlinear, for a layer whose only consumer is ReLU (Clip(0, x) approximately):
  minimise ``sum ||r(y) - r(yhat M + b)||^2`` by alternating over an auxiliary ``u`` with
  ``sum ||r(y) - r(u)||^2 + lam ||u - (yhat M + b)||^2`` (the authors' ``ITQ_decompose``,
  lam schedule 0.1 x 30 then 1.0 x 20 iterations). Every least-squares step projects onto the
  column space of the centred ``yhat``; with its thin SVD ``G = U_g S_g V_g^T`` each step is a
  (k x d) SVD instead of an (N x d) one. The solution is kept only if it beats the linear one
  on the ReLU objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs
import scipy.linalg

from onnxopt.layers import Layer, gemm_weight_and_bias

NONLINEAR_SCHEDULE = ((0.1, 30), (1.0, 20))


@dataclass
class Factorization:
    """``y ~ yhat @ project @ expand.T + bias`` with ``project``, ``expand`` of shape (d, rank)."""

    project: np.ndarray
    expand: np.ndarray
    bias: np.ndarray
    solver: str

    @property
    def rank(self) -> int:
        return self.project.shape[1]

    def apply(self, yhat: np.ndarray) -> np.ndarray:
        return (yhat @ self.project) @ self.expand.T + self.bias


# ---------------------------------------------------------------------------- costs


def decomposed_macs(layer: Layer, rank: int) -> int:
    """Exact MACs of the two layers replacing ``layer`` at ``rank``."""
    kh, kw = layer.kernel
    spatial = int(np.prod(layer.output_hw)) if layer.op == "Conv" else 1
    return spatial * (rank * layer.in_channels * kh * kw + layer.out_channels * rank)


def max_saving_rank(layer: Layer) -> int:
    """The largest rank whose decomposition costs fewer MACs than the layer itself."""
    kh, kw = layer.kernel
    per_rank = layer.in_channels * kh * kw + layer.out_channels
    full = layer.out_channels * layer.in_channels * kh * kw
    return min(layer.out_channels, (full - 1) // per_rank)


def applicability(layer: Layer) -> str | None:
    """Why the low-rank pass cannot handle ``layer`` (None: it can)."""
    if layer.unsupported:
        return layer.unsupported
    if layer.is_depthwise:
        return "depthwise conv: one filter per channel has no cross-channel redundancy to factor"
    if layer.group > 1:
        return f"grouped conv (group={layer.group}): factoring across groups is not supported"
    if max_saving_rank(layer) < 1:
        return f"no rank saves MACs for {layer.out_channels}x{layer.in_channels}x{layer.kernel[0]}x{layer.kernel[1]}"
    return None


# ---------------------------------------------------------------------------- solvers


def _centred_cov(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a - a.mean(0)).T @ (b - b.mean(0))


def solve_linear(yhat: np.ndarray, target: np.ndarray, rank: int) -> Factorization:
    """Reduced-rank regression of ``target`` on ``yhat`` (closed form, float64)."""
    yhat = np.asarray(yhat, np.float64)
    target = np.asarray(target, np.float64)
    d = yhat.shape[1]
    gram = _centred_cov(yhat, yhat)
    ridge = 1e-6 * max(np.trace(gram), 1e-12) / d
    cross = _centred_cov(yhat, target)
    coef = scipy.linalg.solve(gram + ridge * np.eye(d), cross, assume_a="pos")
    energy = coef.T @ (gram @ coef)
    _, vectors = np.linalg.eigh((energy + energy.T) / 2)
    basis = vectors[:, ::-1][:, :rank]
    project = coef @ basis
    bias = target.mean(0) - (yhat.mean(0) @ project) @ basis.T
    return Factorization(project, basis, bias, "linear")


def solve_weight_svd(layer: Layer, rank: int) -> Factorization:
    """Data-free truncated SVD of the weights (Jaderberg/Denton-style baseline):
    ``W = U S V^T``, first layer ``U_r^T W``, second ``U_r``; the original bias is kept."""
    weight = layer.weight_matrix().astype(np.float64)            # (d, c k^2)
    left, _, _ = np.linalg.svd(weight, full_matrices=False)
    basis = left[:, :rank]
    bias = layer.bias_vector().astype(np.float64)
    return Factorization(basis, basis, bias - (bias @ basis) @ basis.T, "svd")


def relu_objective(fact: Factorization, yhat: np.ndarray, target: np.ndarray, offset: np.ndarray | None = None) -> float:
    approx = np.maximum(fact.apply(yhat) + (0 if offset is None else offset), 0)
    return float(np.square(np.maximum(target, 0) - approx).sum())


def solve_relu(yhat: np.ndarray, target: np.ndarray, rank: int, offset: np.ndarray | None = None,
               schedule=NONLINEAR_SCHEDULE) -> Factorization:
    """ReLU-aware asymmetric decomposition (Zhang et al., alternating over auxiliary ``u``).

    With ``offset`` (a residual shortcut's current value, added before the ReLU) the objective
    is ``||r(target) - r(yhat M + b + offset)||^2``; ``target`` is then the original Add output.
    """
    yhat = np.asarray(yhat, np.float64)
    target = np.asarray(target, np.float64)
    offset32 = None if offset is None else np.asarray(offset, np.float32)
    linear = solve_linear(yhat, target if offset is None else target - offset, rank)
    relu_target = np.maximum(target, 0)
    mean_hat = yhat.mean(0)
    centred = yhat - mean_hat
    left, sing, right_t = np.linalg.svd(centred, full_matrices=False)
    keep = sing > sing[0] * 1e-7 if sing.size and sing[0] > 0 else np.zeros_like(sing, bool)
    if not keep.any():
        return linear
    left, sing, right_t = left[:, keep], sing[keep], right_t[keep]
    # The alternation runs in float32: it is elementwise work on (N, d) arrays.
    left32 = left.astype(np.float32)
    relu_target = relu_target.astype(np.float32)
    target_sq = relu_target ** 2
    aux = centred.astype(np.float32)
    mu_aux = mean_hat.astype(np.float32)
    low_rank = None
    for lam, iterations in schedule:
        for _ in range(iterations):
            coords = left32.T @ aux                         # projection of u onto col(G), (k, d)
            l_small, s_small, r_small = np.linalg.svd(coords.astype(np.float64), full_matrices=False)
            low_rank = (l_small[:, :rank] * s_small[:rank]) @ r_small[:rank]  # (k, d), rank r
            fitted = left32 @ low_rank.astype(np.float32)
            fitted += mu_aux                                # f = G T + mu_u (+ offset)
            if offset32 is not None:
                fitted += offset32
            # u <= 0: u = f if f < 0 else 0, cost z^2 + lam max(f, 0)^2
            # u >= 0: u = max((lam f + z) / (lam + 1), 0), cost lam (f - z)^2 / (lam + 1) unclipped
            u_pos = np.maximum((lam * fitted + relu_target) / (lam + 1), 0)
            clipped = u_pos == 0
            cost_pos = np.where(clipped, target_sq + lam * fitted ** 2, (lam / (lam + 1)) * (fitted - relu_target) ** 2)
            cost_neg = target_sq + lam * np.maximum(fitted, 0) ** 2
            aux = np.where(cost_neg <= cost_pos, np.minimum(fitted, 0), u_pos)
            if offset32 is not None:
                aux -= offset32
            mu_aux = aux.mean(0)
            aux -= mu_aux
    low_rank = low_rank.astype(np.float64)
    mu_aux = mu_aux.astype(np.float64)
    # T = pinv(G) (G T) = V_g S_g^{-1} low_rank  (d, d), rank r
    transform = right_t.T @ (low_rank / sing[:, None])
    u_t, s_t, v_t = np.linalg.svd(transform, full_matrices=False)
    project = u_t[:, :rank]
    expand = (s_t[:rank, None] * v_t[:rank]).T
    bias = mu_aux - mean_hat @ transform
    nonlinear = Factorization(project, expand, bias, "relu")
    if relu_objective(nonlinear, yhat, target, offset) < relu_objective(linear, yhat, target, offset):
        return nonlinear
    return linear


def solve(layer: Layer, yhat: np.ndarray, target: np.ndarray, rank: int, offset: np.ndarray | None = None,
          solver: str = "auto") -> Factorization:
    """Factorise ``layer``: responses ``yhat`` on current inputs, ``target`` the original output.

    For a residual layer, ``target`` is the original Add output and ``offset`` the current
    shortcut, so the factorised branch also absorbs the shortcut's accumulated error
    (He et al. 2017, multi-branch reconstruction). With no more response rows than filters the
    data cannot determine the response subspace, so the data-free weight SVD is used.
    """
    if solver == "svd" or len(yhat) <= layer.out_channels:
        return solve_weight_svd(layer, rank)
    if solver == "auto" and layer.activation == "relu":
        return solve_relu(yhat, target, rank, offset)
    return solve_linear(yhat, target if offset is None else target - offset, rank)


# ---------------------------------------------------------------------------- rewrite


def rewrite(graph: gs.Graph, layer: Layer, fact: Factorization) -> list[gs.Node]:
    """Replace ``layer`` in ``graph`` by its two factors; returns the new nodes."""
    node = layer.node
    name = layer.name
    original_bias = layer.bias_vector().astype(np.float64)
    out_bias = (fact.bias + fact.expand @ (fact.project.T @ original_bias)).astype(np.float32)
    out = node.outputs[0]
    middle = gs.Variable(f"{out.name}/lowrank", dtype=out.dtype)
    if layer.op == "Conv":
        weight = node.inputs[1].values
        reduced = (fact.project.T @ weight.reshape(weight.shape[0], -1).astype(np.float64))
        reduced = reduced.reshape(fact.rank, *weight.shape[1:]).astype(np.float32)
        attrs = {k: v for k, v in node.attrs.items() if k in ("strides", "pads", "dilations", "group")}
        first = gs.Node("Conv", f"{name}/lowrank_kxk", attrs=attrs,
                        inputs=[node.inputs[0], gs.Constant(f"{name}/lowrank_kxk.weight", reduced)],
                        outputs=[middle])
        expand = fact.expand.astype(np.float32).reshape(layer.out_channels, fact.rank, 1, 1)
        second = gs.Node("Conv", f"{name}/lowrank_1x1",
                         inputs=[middle, gs.Constant(f"{name}/lowrank_1x1.weight", expand),
                                 gs.Constant(f"{name}/lowrank_1x1.bias", out_bias)],
                         outputs=[out])
    else:
        weight, _ = gemm_weight_and_bias(node)                      # (K, N)
        reduced = (weight.astype(np.float64) @ fact.project).astype(np.float32)  # (K, r)
        first = gs.Node("Gemm", f"{name}/lowrank_in",
                        inputs=[node.inputs[0], gs.Constant(f"{name}/lowrank_in.weight", reduced)],
                        outputs=[middle])
        second = gs.Node("Gemm", f"{name}/lowrank_out",
                         inputs=[middle, gs.Constant(f"{name}/lowrank_out.weight", np.ascontiguousarray(fact.expand.T.astype(np.float32))),
                                 gs.Constant(f"{name}/lowrank_out.bias", out_bias)],
                         outputs=[out])
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend([first, second])
    return [first, second]
