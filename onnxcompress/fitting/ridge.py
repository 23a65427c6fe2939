"""Ridge least squares from normal equations: the one place every fit of the passes solves
``(G + λ·s·D) W = C``, with the penalty's scale, intercept and fallback named by the caller.

The penalty is relative: ``λ`` times ``s``, the mean diagonal of the penalized part of the Gram,
so one ``ridge`` value means the same on channels of any magnitude. The callers differ in what
they need, and each states it: whether the last row is an unpenalized constant (``intercept``),
how an all-zero Gram is scaled (``scale_floor``, ``zero_scale``), and how the system is
factored and what happens when that fails (``factorization``, ``fallback``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Factorization = Literal["cholesky", "lu"]
Fallback = Literal["lstsq", "raise"]


def penalty_scale(
    gram: np.ndarray, size: int, *, scale_floor: float = 1e-30, zero_scale: float | None = None
) -> float:
    """The mean diagonal of ``gram[:size, :size]``, the unit the relative ridge is measured in.

    Args:
        scale_floor: the mean diagonal is raised to at least this, so an all-zero Gram (dead
            channels) still gets a tiny, positive penalty.
        zero_scale: when given, the scale of a Gram whose mean diagonal is not positive,
            instead of ``scale_floor`` (the removal planner penalizes an all-zero Gram as if
            its channels had unit energy, which keeps its precisions finite and comparable).
    """
    scale = float(np.trace(gram[:size, :size])) / max(size, 1)
    if zero_scale is not None and not scale > 0:
        return zero_scale
    return max(scale, scale_floor)


def regularized(
    gram: np.ndarray,
    ridge: float,
    *,
    intercept: bool = False,
    scale_floor: float = 1e-30,
    zero_scale: float | None = None,
) -> np.ndarray:
    """``G + λ·s·D``: ``D`` the identity, or without its last entry with ``intercept``.

    With ``intercept`` the last row and column are the constant regressor: left out of the
    scale and unpenalized, so the fitted bias is not shrunk toward zero.
    """
    size = gram.shape[0] - (1 if intercept else 0)
    scale = ridge * penalty_scale(gram, size, scale_floor=scale_floor, zero_scale=zero_scale)
    penalty = np.full(gram.shape[0], scale)
    if intercept:
        penalty[-1] = 0.0
    return gram + np.diag(penalty)


def ridge_solve(
    gram: np.ndarray,
    rhs: np.ndarray,
    ridge: float,
    *,
    intercept: bool = False,
    scale_floor: float = 1e-30,
    zero_scale: float | None = None,
    factorization: Factorization = "cholesky",
    fallback: Fallback = "lstsq",
) -> np.ndarray:
    """``argmin ‖y - Wᵀz‖² + λ·s‖W‖²`` from ``G = Σzzᵀ`` and ``rhs = Σzyᵀ``.

    Args:
        gram: ``[n, n]`` Gram of the regressors (last: the constant with ``intercept``).
        rhs: ``[n, m]`` (or ``[n]``) cross statistics with the targets.
        ridge: ``λ``, relative to the mean diagonal (see :func:`penalty_scale`).
        factorization: ``"cholesky"`` (``scipy.linalg.solve(assume_a="pos")``, several times
            faster than an SVD-based lstsq on 577x577 patch Grams) or ``"lu"``
            (``numpy.linalg.solve``, for callers whose results were fixed with it).
        fallback: when the factorization fails (the regularized Gram is singular or, for
            Cholesky, not numerically positive definite): ``"lstsq"`` takes the minimum-norm
            least-squares solution of the regularized system, ``"raise"`` lets the
            ``LinAlgError`` through.

    Raises:
        numpy.linalg.LinAlgError: the factorization failed and ``fallback="raise"``.
    """
    import scipy.linalg

    system = regularized(
        gram, ridge, intercept=intercept, scale_floor=scale_floor, zero_scale=zero_scale
    )
    try:
        if factorization == "cholesky":
            solution: np.ndarray = scipy.linalg.solve(system, rhs, assume_a="pos")
        else:
            solution = np.linalg.solve(system, rhs)
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        if fallback == "raise":
            raise
        solution = np.linalg.lstsq(system, rhs, rcond=None)[0]
    return solution


def ridge_inverse(
    gram: np.ndarray,
    ridge: float,
    *,
    scale_floor: float = 1e-30,
    zero_scale: float | None = None,
) -> np.ndarray:
    """``(G + λ·s·I)⁻¹`` by Cholesky (about half the work of a general inverse).

    The fallback, when the regularized Gram is not numerically positive definite (``ridge=0``
    on rank-deficient channels), is the pseudo-inverse.
    """
    from scipy.linalg import lapack

    system = regularized(gram, ridge, scale_floor=scale_floor, zero_scale=zero_scale)
    factor, info = lapack.dpotrf(system, lower=True)
    if info == 0:
        inverse, info = lapack.dpotri(factor, lower=True)
    if info != 0:
        pseudo: np.ndarray = np.linalg.pinv(system, hermitian=True)
        return pseudo
    # dpotri fills one triangle: mirror it.
    mirrored: np.ndarray = np.tril(inverse) + np.tril(inverse, -1).T
    return mirrored


__all__ = [
    "Factorization",
    "Fallback",
    "penalty_scale",
    "regularized",
    "ridge_inverse",
    "ridge_solve",
]
