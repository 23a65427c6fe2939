"""Closed-form, data-free factorizations of a convolution kernel into cheap convolutions.

The ``cheapconv`` pass substitutes depthwise-separable, group or shift convolutions for a
standard one; these least-squares factors start the cheap network as close to the trained one
as its structure allows, and the error they leave is what the pass reports per layer.

Every fit minimizes the output error of the layer under a stationary input model: channels
uncorrelated, and neighbouring pixels correlated by ``smoothness`` (ρ) per pixel of distance,
``E[x(p) x(q)] = ρ^{|p - q|₁}``. With ρ = 0 (the default of the pass) this is the plain
least-squares fit of the kernel weights, i.e. the per-channel rank-1 SVD of the paper for the
separable form. Kernels are ``[Cout, Cin, *k]`` arrays (any number of spatial axes).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnxcompress.fitting.ridge import ridge_solve

logger = logging.getLogger(__name__)

# Below this fraction of the largest channel energy a channel is treated as empty.
_EMPTY = 1e-12


@dataclasses.dataclass
class SeparableFactors:
    """Depthwise ``[Cin, 1, *k]`` then pointwise ``[Cout, Cin, 1...]``."""

    depthwise: np.ndarray
    pointwise: np.ndarray
    rel_error: float


@dataclasses.dataclass
class GroupFactors:
    """Grouped ``[Cout, Cin/g, *k]`` conv then a 1x1 mixing ``[Cout, Cout, 1...]`` conv."""

    grouped: np.ndarray
    mixing: np.ndarray
    rel_error: float


@dataclasses.dataclass
class ShuffleFactors:
    """Grouped conv whose output row ``r`` computes original channel ``order[r]``.

    A channel permutation (the shuffle) after the grouped conv puts the channels back in the
    original order: output channel ``o`` is row ``inverse[o]``.
    """

    grouped: np.ndarray
    order: np.ndarray
    rel_error: float

    @property
    def inverse(self) -> np.ndarray:
        inverse = np.empty_like(self.order)
        inverse[self.order] = np.arange(self.order.size)
        return inverse


@dataclasses.dataclass
class ShiftFactors:
    """A spatial shift per input channel then a pointwise ``[Cout, Cin, 1...]`` conv.

    ``positions[c]`` is the kernel tap (a multi-index into ``k``) whose input pixel channel
    ``c`` is moved to the output position: a one-hot depthwise kernel at that tap.
    """

    positions: np.ndarray
    pointwise: np.ndarray
    rel_error: float

    def one_hot(self, kernel: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """The equivalent depthwise kernel ``[Cin, 1, *kernel]``."""
        cin = self.positions.shape[0]
        flat = np.ravel_multi_index(tuple(self.positions.T), kernel)
        weights = np.zeros((cin, int(np.prod(kernel))), dtype=dtype)
        weights[np.arange(cin), flat] = 1
        return weights.reshape(cin, 1, *kernel)


def tap_correlation(
    kernel: tuple[int, ...], smoothness: float, dilations: tuple[int, ...] | None = None
) -> np.ndarray:
    """``[K, K]`` correlation of the input pixels under the kernel taps (K = prod(kernel)).

    ``ρ^{distance}`` with the L1 distance in pixels (dilation spreads the taps); the identity
    for ρ = 0.
    """
    size = int(np.prod(kernel))
    if smoothness <= 0.0:
        return np.eye(size)
    dilations = dilations or (1,) * len(kernel)
    taps = np.stack(np.unravel_index(np.arange(size), kernel), axis=1) * np.asarray(dilations)
    distance = np.abs(taps[:, None, :] - taps[None, :, :]).sum(axis=2)
    correlation: np.ndarray = smoothness ** distance.astype(np.float64)
    return correlation


def _sqrt_and_inverse(correlation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh(correlation)
    values = np.maximum(values, 1e-12)
    root = (vectors * np.sqrt(values)) @ vectors.T
    inverse = (vectors / np.sqrt(values)) @ vectors.T
    return root, inverse


def _error(weight: np.ndarray, approx: np.ndarray, correlation: np.ndarray) -> float:
    """Relative output error ``sqrt(Σ dᵀRd / Σ wᵀRw)`` over every (out, in) kernel slice."""
    cout, cin = weight.shape[:2]
    w = weight.reshape(cout * cin, -1).astype(np.float64)
    d = w - approx.reshape(cout * cin, -1).astype(np.float64)
    total = float(((w @ correlation) * w).sum())
    if total <= 0.0:
        return 0.0
    return float(np.sqrt(max(float(((d @ correlation) * d).sum()), 0.0) / total))


def separable(
    weight: np.ndarray, smoothness: float = 0.0, dilations: tuple[int, ...] | None = None
) -> SeparableFactors:
    """Depthwise-separable factors: the best rank-1 fit of every input channel's slice.

    For channel ``c`` the slice ``W[:, c]`` (``Cout x K``) is approximated by ``σ₁ u₁ v₁ᵀ``:
    ``pointwise[:, c] = σ₁ u₁`` and ``depthwise[c] = v₁`` (unit norm, positive sum), the
    least-squares optimum of this factorization (Eckart-Young). An exactly separable kernel
    is reproduced exactly.
    """
    cout, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    correlation = tap_correlation(kernel, smoothness, dilations)
    root, inverse_root = _sqrt_and_inverse(correlation)
    w = weight.reshape(cout, cin, -1).astype(np.float64)
    size = w.shape[2]
    depthwise = np.zeros((cin, size))
    pointwise = np.zeros((cout, cin))
    centre = size // 2
    for c in range(cin):
        u, s, vt = np.linalg.svd(w[:, c, :] @ root, full_matrices=False)
        if s[0] <= 0.0:
            # An empty channel: any tap works; the centre keeps its gradient path sensible.
            depthwise[c, centre] = 1.0
            continue
        taps = inverse_root @ vt[0]
        scale = np.linalg.norm(taps)
        sign = -1.0 if taps.sum() < 0 else 1.0
        depthwise[c] = sign * taps / scale
        pointwise[:, c] = sign * s[0] * u[:, 0] * scale
    approx = pointwise[:, :, None] * depthwise[None, :, :]
    dtype = weight.dtype
    return SeparableFactors(
        depthwise=depthwise.reshape(cin, 1, *kernel).astype(dtype),
        pointwise=pointwise.reshape(cout, cin, *(1,) * len(kernel)).astype(dtype),
        rel_error=_error(weight, approx, correlation),
    )


def grouped(
    weight: np.ndarray,
    groups: int,
    iterations: int = 10,
    smoothness: float = 0.0,
    dilations: tuple[int, ...] | None = None,
) -> GroupFactors:
    """Group-conv factors: the block-diagonal part of ``W``, then least-squares mixing.

    The grouped conv starts as the block-diagonal part (output block ``j`` reads input block
    ``j``) and the 1x1 mixing ``M`` as the least-squares fit ``W ≈ M G``. ``iterations`` rounds
    of alternating least squares then refit ``G`` block by block (``G_j = argmin ‖W_j - M_j
    G_j‖``) and ``M``; each round can only lower the error.

    Raises:
        ValueError: ``groups`` does not divide both channel counts.
    """
    cout, cin = weight.shape[:2]
    if cin % groups or cout % groups:
        raise ValueError(f"{groups} groups do not divide {cin} inputs and {cout} outputs")
    kernel = tuple(weight.shape[2:])
    correlation = tap_correlation(kernel, smoothness, dilations)
    root, inverse_root = _sqrt_and_inverse(correlation)
    # Work in the whitened space, where the error is the plain Frobenius norm.
    w = np.einsum("ock,kl->ocl", weight.reshape(cout, cin, -1).astype(np.float64), root)
    size = w.shape[2]
    width_in, width_out = cin // groups, cout // groups
    flat = w.reshape(cout, cin * size)
    blocks = [
        (
            slice(j * width_out, (j + 1) * width_out),
            slice(j * width_in * size, (j + 1) * width_in * size),
        )
        for j in range(groups)
    ]
    # G is block-diagonal, so G Gᵀ is too and the mixing fit splits by block:
    # M[:, rows_j] = (W_j G_jᵀ)(G_j G_jᵀ)⁻¹ with W_j the columns block j reads.
    parts = [flat[rows, cols] for rows, cols in blocks]
    columns = [np.ascontiguousarray(flat[:, cols]) for _, cols in blocks]
    mixing = np.zeros((cout, cout))

    def fit_mixing() -> None:
        for (rows, _), part, column in zip(blocks, parts, columns, strict=True):
            mixing[:, rows] = _solve_normal(part @ part.T, part @ column.T).T

    fit_mixing()
    for _ in range(iterations):
        for j, (rows, _) in enumerate(blocks):
            m = np.ascontiguousarray(mixing[:, rows])
            parts[j] = _solve_normal(m.T @ m, m.T @ columns[j])
        fit_mixing()
    # The grouped kernel keeps only its blocks: [Cout, Cin/g, *k].
    packed = np.concatenate(parts, axis=0).reshape(cout, width_in, size)
    approx = np.zeros((cout, cin * size))
    for (rows, cols), part in zip(blocks, parts, strict=True):
        approx[:, cols] = mixing[:, rows] @ part
    packed = packed @ inverse_root
    approx = np.einsum("ocl,lk->ock", approx.reshape(cout, cin, size), inverse_root)
    dtype = weight.dtype
    return GroupFactors(
        grouped=packed.reshape(cout, width_in, *kernel).astype(dtype),
        mixing=mixing.reshape(cout, cout, *(1,) * len(kernel)).astype(dtype),
        rel_error=_error(weight, approx, correlation),
    )


def _solve_normal(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """``gram⁻¹ rhs`` through the normal equations, with a tiny ridge for rank-deficient Grams.

    Normal equations on the small ``C x C`` Gram instead of an SVD of the tall factor: a
    512-channel layer takes milliseconds instead of seconds.
    """
    # LU, and a singular system raises: the closed forms were fixed with these.
    return ridge_solve(gram, rhs, 1e-10, factorization="lu", fallback="raise")


def _mixing_fit(target: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``M = argmin ‖target - M basis‖``."""
    mixing: np.ndarray = _solve_normal(basis @ basis.T, basis @ target.T).T
    return mixing


def shuffled(
    weight: np.ndarray,
    groups: int,
    assignment: str = "energy",
    smoothness: float = 0.0,
    dilations: tuple[int, ...] | None = None,
) -> ShuffleFactors:
    """Group-conv factors with a channel shuffle instead of a 1x1 mixing conv.

    Each output channel ``o`` is computed from one input block: ``assignment="energy"`` picks
    the blocks that keep the most kernel energy with every block serving ``Cout/g`` outputs
    (an assignment problem, solved exactly); ``"interleave"`` is ShuffleNet's fixed shuffle,
    ``o mod g``. The kept part of the kernel is exact; the rest is the error.

    Raises:
        ValueError: ``groups`` does not divide both channel counts, or unknown assignment.
    """
    cout, cin = weight.shape[:2]
    if cin % groups or cout % groups:
        raise ValueError(f"{groups} groups do not divide {cin} inputs and {cout} outputs")
    kernel = tuple(weight.shape[2:])
    correlation = tap_correlation(kernel, smoothness, dilations)
    width_in, width_out = cin // groups, cout // groups
    w = weight.reshape(cout, cin, -1).astype(np.float64)
    energy = np.einsum("ock,kl,ocl->oc", w, correlation, w)
    block_energy = energy.reshape(cout, groups, width_in).sum(axis=2)  # [Cout, g]
    if assignment == "energy":
        from scipy.optimize import linear_sum_assignment

        # Each block offers Cout/g slots; maximize the kept energy.
        cost = -np.repeat(block_energy, width_out, axis=1)
        rows, slots = linear_sum_assignment(cost)
        block_of = np.empty(cout, dtype=np.int64)
        block_of[rows] = slots // width_out
    elif assignment == "interleave":
        block_of = np.arange(cout) % groups
    else:
        raise ValueError(f"unknown assignment {assignment!r}")
    order = np.argsort(block_of, kind="stable").astype(np.int64)
    packed = np.zeros((cout, width_in, w.shape[2]))
    approx = np.zeros_like(w)
    for row, channel in enumerate(order):
        block = slice(block_of[channel] * width_in, (block_of[channel] + 1) * width_in)
        packed[row] = w[channel, block]
        approx[channel, block] = w[channel, block]
    return ShuffleFactors(
        grouped=packed.reshape(cout, width_in, *kernel).astype(weight.dtype),
        order=order,
        rel_error=_error(weight, approx, correlation),
    )


def shift(
    weight: np.ndarray, smoothness: float = 0.0, dilations: tuple[int, ...] | None = None
) -> ShiftFactors:
    """Shift factors: each channel moves by its kernel's energy peak, then a least-squares 1x1.

    With the tap ``p*`` of channel ``c`` fixed, the best pointwise column is
    ``P[:, c] = Σ_p W[:, c, p] R[p, p*]`` (with ρ = 0: the kernel's slice at ``p*``), and the
    tap kept is the one whose column explains the most of the slice's output energy (ρ = 0:
    the tap of largest energy ``Σ_o W[o, c, p]²``).
    """
    cout, cin = weight.shape[:2]
    kernel = tuple(weight.shape[2:])
    correlation = tap_correlation(kernel, smoothness, dilations)
    w = weight.reshape(cout, cin, -1).astype(np.float64)
    columns = np.einsum("ock,kp->ocp", w, correlation)  # candidate P[:, c] for each tap p
    explained = (columns**2).sum(axis=0)  # [Cin, K]
    best = explained.argmax(axis=1)
    centre = int(np.prod(kernel)) // 2
    empty = explained.max(axis=1) <= _EMPTY * max(float(explained.max()), 0.0)
    best[empty] = centre
    pointwise = columns[:, np.arange(cin), best]  # [Cout, Cin]
    approx = np.zeros_like(w)
    approx[:, np.arange(cin), best] = pointwise
    positions = np.stack(np.unravel_index(best, kernel), axis=1).astype(np.int64)
    return ShiftFactors(
        positions=positions,
        pointwise=pointwise.reshape(cout, cin, *(1,) * len(kernel)).astype(weight.dtype),
        rel_error=_error(weight, approx, correlation),
    )


__all__ = [
    "GroupFactors",
    "SeparableFactors",
    "ShiftFactors",
    "ShuffleFactors",
    "grouped",
    "separable",
    "shift",
    "shuffled",
    "tap_correlation",
]
