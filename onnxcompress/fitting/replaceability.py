"""Greedy least-squares channel removal: which channels are linear combinations of the others.

Given the Gram matrix ``G = Y Yᵀ`` of a group's channels (filters for the paper's weights
criterion, activations for ``criterion=activations``) and the Gram matrix ``H`` of their outgoing
weights, this finds an order in which to remove channels so that each removed channel is
replaced by the least-squares combination of the channels still there, with that combination
folded into the outgoing weights.

Every step uses the precision matrix ``P = (G + εI)⁻¹`` of the remaining channels: the residual
energy of regressing channel j on the others is ``1 / P_jj`` and its coefficients are
``-P_ij / P_jj`` (the leave-one-out identities), and removing a set R updates ``P`` by a Schur
complement in O(|R|·C²), so a 2048-channel group costs seconds, not a solve per candidate.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from onnxcompress.fitting.ridge import ridge_inverse, ridge_solve

logger = logging.getLogger(__name__)

# An all-zero Gram (every channel of the group dead) is regularized as if its channels had unit
# energy, so its precision stays finite.
_DEAD_GROUP_SCALE = 1.0


@dataclasses.dataclass
class RemovalPlan:
    """The greedy path through one group.

    Attributes:
        order: channels in the order they are removed.
        costs: estimated output change (squared, relative to the group's output energy) of each
            removal at the time it was made; non-decreasing in practice, not guaranteed.
    """

    order: list[int]
    costs: list[float]
    channels: int
    intercept: bool

    def prefix(self, count: int) -> list[int]:
        return self.order[:count]


@dataclasses.dataclass
class Compensation:
    """How the removed channels are rebuilt from the kept ones.

    ``channel[r] ≈ Σ_k matrix[r, k] · channel[keep[k]] + bias[r]`` for each removed ``r``.
    """

    removed: list[int]
    keep: list[int]
    matrix: np.ndarray  # [len(removed), len(keep)]
    bias: np.ndarray | None  # [len(removed)], only with an intercept
    residual: np.ndarray  # residual energy of each removed channel's fit, relative


def greedy_removal(
    gram: np.ndarray,
    outgoing_gram: np.ndarray,
    *,
    max_remove: int,
    intercept: bool = False,
    ridge: float = 1e-6,
    step_fraction: float = 0.0,
) -> RemovalPlan:
    """Plan the order of removal for up to ``max_remove`` channels of one group.

    Args:
        gram: ``[C, C]`` (or ``[C+1, C+1]`` with ``intercept``: last row/column the constant
            channel, which is never removed) Gram of the channels' values.
        outgoing_gram: ``[C, C]`` Gram of the channels' outgoing weights (``W_next[:, i] ·
            W_next[:, j]`` summed over all consumers). Removing channel j costs about
            ``residual_j · ‖effective outgoing_j‖²``.
        step_fraction: remove up to this fraction of the remaining channels per step (0: one
            at a time). Wide groups use a few percent to stay fast.
    """
    return greedy_removal_views(
        [(gram, outgoing_gram)],
        max_remove=max_remove,
        intercept=intercept,
        ridge=ridge,
        step_fraction=step_fraction,
    )


def greedy_removal_views(
    views: list[tuple[np.ndarray, np.ndarray]],
    *,
    max_remove: int,
    intercept: bool = False,
    ridge: float = 1e-6,
    step_fraction: float = 0.0,
) -> RemovalPlan:
    """Like :func:`greedy_removal` for a group read in several places.

    A residual stream is read by many consumers, each seeing its own tensor (the stream after
    a different block). Each view is ``(gram, outgoing_gram)`` for one such tensor and the
    consumers reading it; each gets its own least-squares fit, and a channel's cost is the sum
    of the relative output change over all views, so a channel read by seven layers costs
    about seven times what a channel read by one does. Views may share one Gram (the weights
    criterion): it is inverted and downdated once.
    """
    channels = views[0][1].shape[0]
    # Views sharing a Gram share the coefficients, and scores and updates are linear in the
    # outgoing Gram: they collapse into one view with the energy-weighted sum of theirs.
    precisions: dict[int, np.ndarray] = {}
    merged: dict[int, np.ndarray] = {}
    for gram, out_gram in views:
        energy = float(np.sum(out_gram * gram[:channels, :channels])) or 1.0
        if id(gram) not in precisions:
            precisions[id(gram)] = ridge_inverse(
                gram, ridge, scale_floor=0.0, zero_scale=_DEAD_GROUP_SCALE
            )
            merged[id(gram)] = np.zeros((channels, channels))
        merged[id(gram)] += out_gram / energy
    view_keys = list(merged)
    outgoing = [merged[key] for key in view_keys]
    energies = [1.0] * len(view_keys)
    alive = np.arange(views[0][0].shape[0])  # original channels (+ intercept last)
    order: list[int] = []
    costs: list[float] = []
    max_remove = max(0, min(max_remove, channels - 1))
    while len(order) < max_remove:
        real = alive < channels  # the intercept is never a candidate
        score = np.zeros(int(real.sum()))
        for key, q, energy in zip(view_keys, outgoing, energies, strict=True):
            residual = 1.0 / np.maximum(np.diag(precisions[key])[real], 1e-300)
            score += residual * np.maximum(np.diag(q), 0.0) / energy
        count = 1
        if step_fraction > 0:  # a fixed share of the original width: about 1/step_fraction steps
            count = max(1, min(max_remove - len(order), int(channels * step_fraction)))
        picks = np.sort(np.argsort(score, kind="stable")[:count])
        removed_mask = np.zeros(alive.size, dtype=bool)
        removed_mask[np.flatnonzero(real)[picks]] = True
        coefficients = {}
        for key in precisions:
            coefficients[key], precisions[key] = _remove(precisions[key], removed_mask)
        kept_real = real[~removed_mask]
        for index, key in enumerate(view_keys):
            outgoing[index] = _fold_outgoing(
                outgoing[index], removed_mask[real], coefficients[key][:, kept_real]
            )
        order.extend(int(c) for c in alive[removed_mask])
        costs.extend(float(c) for c in score[picks])
        alive = alive[~removed_mask]
    return RemovalPlan(order=order, costs=costs, channels=channels, intercept=intercept)


def _remove(precision: np.ndarray, removed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of the removed channels on the rest, and the rest's precision.

    With P partitioned into removed (r) and kept (s) blocks, the least-squares coefficients
    are ``-P_rr⁻¹ P_rs`` and the precision of the kept channels alone is the Schur complement
    ``P_ss - P_sr P_rr⁻¹ P_rs``.
    """
    kept = np.flatnonzero(~removed)
    gone = np.flatnonzero(removed)
    p_rr = precision[np.ix_(gone, gone)]
    p_rs = precision[np.ix_(gone, kept)]
    solved = np.linalg.solve(p_rr, p_rs)
    schur = precision[np.ix_(kept, kept)]
    schur -= p_rs.T @ solved  # in place: one C×C temporary fewer per step
    return -solved, schur


def _fold_outgoing(q: np.ndarray, removed: np.ndarray, coeffs: np.ndarray) -> np.ndarray:
    """Effective outgoing Gram of the kept channels once the removed ones ride on them.

    E_k ← E_k + Σ_r B[r, k] E_r gives Q_kk ← Q_kk + BᵀQ_rk + Q_krB + BᵀQ_rrB, written as
    ``Q_kk + BᵀM + MᵀB`` with ``M = Q_rk + ½Q_rrB`` (one rank-|R| product fewer).
    """
    kept = np.flatnonzero(~removed)
    gone = np.flatnonzero(removed)
    half = q[np.ix_(gone, kept)] + 0.5 * (q[np.ix_(gone, gone)] @ coeffs)
    update = coeffs.T @ half
    folded = q[np.ix_(kept, kept)]
    folded += update
    folded += update.T
    return folded


def compensation(
    gram: np.ndarray, removed: list[int], *, channels: int, intercept: bool, ridge: float = 1e-6
) -> Compensation:
    """Fit every removed channel on the kept ones at once (the plan's prefix).

    Sequential greedy folding and this joint fit give the same result: both express each
    removed channel as its least-squares combination of the final kept set.
    """
    removed_set = set(removed)
    keep = [c for c in range(channels) if c not in removed_set]
    regressors = keep + ([channels] if intercept else [])
    g = gram.astype(np.float64)
    g_kk = g[np.ix_(regressors, regressors)]
    g_kr = g[np.ix_(regressors, removed)]
    # The constant regressor is penalized like the channels (intercept=False to the solver),
    # and an exactly singular system raises: the plans were fitted this way.
    coef = ridge_solve(
        g_kk,
        g_kr,
        ridge,
        scale_floor=0.0,
        zero_scale=_DEAD_GROUP_SCALE,
        factorization="lu",
        fallback="raise",
    ).T  # [|R|, |K|(+1)]
    # residual energy of each removed channel relative to its own energy
    # Row-wise quadratic forms through BLAS (a 3-operand einsum here ran unblocked).
    fitted = np.sum((coef @ g_kk) * coef, axis=1)
    cross = np.sum(coef * g_kr.T, axis=1)
    own = np.diag(g)[removed]
    residual = np.maximum(own - 2 * cross + fitted, 0.0) / np.maximum(own, 1e-30)
    matrix = coef[:, : len(keep)]
    bias = coef[:, len(keep)] if intercept else None
    return Compensation(
        removed=list(removed), keep=keep, matrix=matrix, bias=bias, residual=residual
    )
