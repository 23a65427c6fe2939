"""Low-rank approximation of weight matrices: truncated SVD and the rank an energy keeps.

``onnxcompress.graph.factorization`` turns a weight of rank r into two cheaper nodes.
"""

from __future__ import annotations

import numpy as np


def truncate(matrix: np.ndarray, rank: int) -> np.ndarray:
    """Best rank-``rank`` approximation (Frobenius norm) of ``matrix``, in its dtype."""
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    rank = max(0, min(rank, s.size))
    return ((u[:, :rank] * s[:rank]) @ vt[:rank]).astype(matrix.dtype)


def energy_rank(singular_values: np.ndarray, energy: float) -> int:
    """Smallest rank keeping at least ``energy`` of the squared singular values (at least 1)."""
    squares = np.asarray(singular_values, np.float64) ** 2
    total = squares.sum()
    if total <= 0:
        return 1
    kept = np.cumsum(squares) / total
    return min(int(squares.size), int(np.searchsorted(kept, energy - 1e-12)) + 1)


def covariance_root(covariance: np.ndarray) -> np.ndarray:
    """A matrix ``R`` with ``R Rᵀ = covariance`` (symmetric PSD; negative round-off clipped)."""
    values, vectors = np.linalg.eigh(np.asarray(covariance, np.float64))
    return vectors * np.sqrt(np.clip(values, 0.0, None))


def response_spectrum(matrix: np.ndarray, second_moment: np.ndarray) -> np.ndarray:
    """Singular values of ``W R`` (``R Rᵀ = E[z zᵀ]``): their squares are the output energy per
    position that each rank of ``W z`` carries on inputs with that second moment.

    The weight's own spectrum treats every input direction alike; a rank cut ranked by this one
    drops the directions the layer's real inputs barely excite (the data-aware SVD of Zhang et
    al., "Accelerating Very Deep Convolutional Networks", 2016).
    """
    root = covariance_root(second_moment)
    return np.linalg.svd(np.asarray(matrix, np.float64) @ root, compute_uv=False)


def reduced_rank_fit(
    gram: np.ndarray, cross: np.ndarray, rank: int, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """The rank-``rank`` map and free bias that best predict targets from inputs.

    ``argmin ‖y - W z - b‖²`` over ``W`` of rank at most ``rank`` (ridge-regularized) and any
    ``b``, from Gram statistics with an intercept (``gram = Σ[z,1][z,1]ᵀ``, ``cross =
    Σ[z,1]yᵀ``): the least-squares map, then its fitted outputs projected onto their top
    ``rank`` principal directions (reduced-rank regression). The bias stays full and keeps the
    fitted mean of every output.

    Returns:
        ``W`` as ``[outputs, inputs]`` and ``b`` as ``[outputs]``, float64.
    """
    from onnxcompress.fitting.ridge import ridge_solve

    solution = ridge_solve(gram, cross, ridge, intercept=True)  # [inputs + 1, outputs]
    weight, bias = solution[:-1].T, solution[-1]
    count = max(float(gram[-1, -1]), 1.0)
    mean = gram[:-1, -1] / count
    covariance = gram[:-1, :-1] / count - np.outer(mean, mean)
    fitted = weight @ covariance @ weight.T  # covariance of the fitted outputs
    _, vectors = np.linalg.eigh((fitted + fitted.T) / 2.0)
    rank = max(0, min(rank, vectors.shape[1]))
    basis = vectors[:, ::-1][:, :rank]
    low = basis @ (basis.T @ weight)
    # The mean the dropped directions carried goes to the bias, so every output's mean holds.
    return low, bias + (weight - low) @ mean
