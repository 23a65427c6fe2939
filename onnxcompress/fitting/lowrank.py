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
