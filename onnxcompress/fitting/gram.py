"""Gram and cross statistics of regressors (and targets) summed over calibration batches: the
normal equations of the activation fits, kept instead of the activations themselves.

Every position of a batch is one sample: the channel axis becomes the columns, all other axes
the rows. Sums are in float64 whatever the activations' type.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class GramStatistics:
    """Sums over calibration positions for the fit ``y ≈ Wᵀ [z, 1]``.

    Attributes:
        gram: ``Σ [z,1][z,1]ᵀ``, ``[Cin+1, Cin+1]`` (``[Cin, Cin]`` without an intercept).
        cross: ``Σ [z,1] yᵀ``, ``[Cin+1, Cout]`` (``[Cin+1, 0]`` without targets).
        target_sq: ``Σ y²`` per output channel.
        target_sum: ``Σ y`` per output channel.
        count: positions summed.
    """

    gram: np.ndarray
    cross: np.ndarray
    target_sq: np.ndarray
    target_sum: np.ndarray
    count: int

    def relative_error(
        self,
        solution: np.ndarray,
        gram: np.ndarray | None = None,
        cross: np.ndarray | None = None,
    ) -> float:
        """``‖y - Wᵀ[z,1]‖ / ‖y - mean(y)‖`` over all positions and channels.

        ``gram``/``cross`` replace the stored ones for features derived from the stored
        ``z`` by a linear map (the depthwise conv applied to patches).
        """
        gram = self.gram if gram is None else gram
        cross = self.cross if cross is None else cross
        residual = (
            self.target_sq.sum()
            - 2.0 * float((solution * cross).sum())
            + float((solution * (gram @ solution)).sum())
        )
        spread = float((self.target_sq - self.target_sum**2 / max(self.count, 1)).sum())
        if spread <= 0.0:
            return 0.0
        return float(np.sqrt(max(residual, 0.0) / spread))


def channel_rows(array: np.ndarray, channel_axis: int = 1) -> np.ndarray:
    """``array`` as samples x channels in float64: one row per position of every other axis."""
    moved = np.moveaxis(array, channel_axis, -1)
    return moved.reshape(-1, array.shape[channel_axis]).astype(np.float64)


class GramAccumulator:
    """Sums :class:`GramStatistics` batch by batch.

    Args:
        intercept: append the constant regressor (a column of ones) to the inputs, so the
            fit has a bias.
    """

    def __init__(self, *, intercept: bool = True) -> None:
        self.intercept = intercept
        self._stats: GramStatistics | None = None

    def add(
        self, inputs: np.ndarray, targets: np.ndarray | None = None, *, channel_axis: int = 1
    ) -> None:
        """Add one batch: ``inputs`` (and ``targets``) with their channels on ``channel_axis``.

        Raises:
            ValueError: inputs and targets have different numbers of positions.
        """
        z = channel_rows(inputs, channel_axis)
        if self.intercept:
            z = np.concatenate([z, np.ones((z.shape[0], 1))], axis=1)
        y = np.zeros((z.shape[0], 0)) if targets is None else channel_rows(targets, channel_axis)
        if y.shape[0] != z.shape[0]:
            raise ValueError(f"positions differ: {z.shape[0]} inputs vs {y.shape[0]} targets")
        update = GramStatistics(z.T @ z, z.T @ y, (y**2).sum(0), y.sum(0), z.shape[0])
        if self._stats is None:
            self._stats = update
            return
        self._stats.gram += update.gram
        self._stats.cross += update.cross
        self._stats.target_sq += update.target_sq
        self._stats.target_sum += update.target_sum
        self._stats.count += update.count

    @property
    def empty(self) -> bool:
        return self._stats is None

    def statistics(self) -> GramStatistics:
        """The sums so far.

        Raises:
            ValueError: no batch was added.
        """
        if self._stats is None:
            raise ValueError("no calibration batch was added")
        return self._stats


__all__ = ["GramAccumulator", "GramStatistics", "channel_rows"]
