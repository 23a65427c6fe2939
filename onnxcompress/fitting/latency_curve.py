"""Latency of one layer as a function of its channel widths, fitted to a few measurements.

ONNX Runtime's CPU convolutions (MLAS, NCHWc layout) process channels in blocks of the vector
width: 8 floats on AVX2, 16 on AVX-512. A layer's time therefore moves in steps of whole
blocks, not channel by channel; measured here on a 64-channel 3x3 conv at 8x8 on an AVX-512
CPU, 48 output channels ran in 0.035 ms and 52 in 0.046 ms. The curve counts blocks:

    t(c_in, c_out) = base + cross * B(c_in) * B(c_out) + in_term * B(c_in) + out_term * B(c_out)

with ``B(c) = ceil(c / block)``. ``cross`` carries the multiply-accumulates, the linear terms the
per-channel memory traffic (reorders, bias, activation) and ``base`` what does not shrink (the
kernel launch, threading). Coefficients are fitted by non-negative least squares, so the curve
never predicts that removing channels makes a layer slower. A depthwise layer (one width for
both sides) has only ``base`` and a per-block term.

:class:`LatencySavings` prices a whole removal plan with these curves, the latency twin of
``allocation.ExactSavings``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.optimize import nnls


def blocks(channels: int, block: int) -> int:
    """Vector blocks ``channels`` occupy (a partial block costs a whole one)."""
    return max(1, math.ceil(channels / max(block, 1)))


@dataclasses.dataclass(frozen=True)
class CostCurve:
    """Fitted latency (ms) of one layer by its input and output channel widths.

    Attributes:
        block: channels per vector block of the target.
        coefficients: ``(base, cross, in_term, out_term)`` in ms, all >= 0 (``cross`` and
            ``in_term`` are 0 for a depthwise layer).
        depthwise: the layer's input and output widths are one (a depthwise conv).
        table: measured times by ``(in, out)`` widths, which win over the fit where present.
            Narrow layers are timed at every width a pass may choose, because inside one
            block the kernels are not flat: measured on AVX-512, a 16-channel 3x3 conv at
            32x32 ran 0.065 ms with 16 outputs and 0.054 ms with 8, which the block count
            cannot tell apart, and a 64-input conv ran slower with 56 outputs than with 64.
    """

    block: int
    coefficients: tuple[float, float, float, float]
    depthwise: bool = False
    table: Mapping[tuple[int, int], float] = dataclasses.field(
        default_factory=dict, compare=False, hash=False
    )

    def __call__(self, in_channels: int, out_channels: int) -> float:
        measured = self.table.get(
            (out_channels, out_channels) if self.depthwise else (in_channels, out_channels)
        )
        if measured is not None:
            return measured
        base, cross, in_term, out_term = self.coefficients
        bo = blocks(out_channels, self.block)
        if self.depthwise:
            return base + out_term * bo
        bi = blocks(in_channels, self.block)
        return base + cross * bi * bo + in_term * bi + out_term * bo

    @staticmethod
    def features(in_channels: int, out_channels: int, block: int, depthwise: bool) -> list[float]:
        bo = blocks(out_channels, block)
        if depthwise:
            return [1.0, 0.0, 0.0, float(bo)]
        bi = blocks(in_channels, block)
        return [1.0, float(bi * bo), float(bi), float(bo)]

    @classmethod
    def fit(
        cls,
        points: Sequence[tuple[int, int, float]],
        block: int,
        depthwise: bool = False,
        keep_table: bool = False,
    ) -> CostCurve:
        """Fit the curve to measured ``(in_channels, out_channels, ms)`` points.

        With fewer distinct points than coefficients, the least-squares solution with the
        smallest norm among the non-negative ones is what NNLS returns; one point gives a
        curve proportional to the block product through it (no constant), the usual
        MAC-proportional assumption. With ``keep_table`` the measured points are kept and
        answer for their own widths.
        """
        curve = cls._fit(points, block, depthwise)
        if not keep_table:
            return curve
        table = {(i, o): max(float(ms), 0.0) for i, o, ms in points}
        return dataclasses.replace(curve, table=table)

    @classmethod
    def _fit(
        cls, points: Sequence[tuple[int, int, float]], block: int, depthwise: bool
    ) -> CostCurve:
        if not points:
            raise ValueError("a cost curve needs at least one measured point")
        if len({(i, o) for i, o, _ in points}) == 1:
            cin, cout, _ = points[0]
            feature = CostCurve.features(cin, cout, block, depthwise)
            scale = feature[3] if depthwise else feature[1]
            coefficient = max(float(np.median([p[2] for p in points])), 0.0) / scale
            if depthwise:
                return cls(block, (0.0, 0.0, 0.0, coefficient), True)
            return cls(block, (0.0, coefficient, 0.0, 0.0), False)
        design = np.array([cls.features(i, o, block, depthwise) for i, o, _ in points])
        target = np.array([max(ms, 0.0) for _, _, ms in points])
        # Relative error is what matters (a 10 us layer and a 10 ms layer are fitted alike).
        weights = 1.0 / np.maximum(target, 1e-6)
        solution, _ = nnls(design * weights[:, None], target * weights)
        base, cross, in_term, out_term = (float(v) for v in solution)
        return cls(block, (base, cross, in_term, out_term), depthwise)


class LatencySavings:
    """Milliseconds a whole removal plan saves, priced by each affected layer's cost curve.

    Like ``allocation.ExactSavings``: every group slices some weight axes; a plan
    (``{group key: channels removed}``) shortens those axes, and each layer whose weight is
    sliced is re-priced at its new widths. A layer sliced by two groups (a conv between two
    pruned layers) is priced once, at both new widths.
    """

    def __init__(
        self,
        groups: Sequence[Any],
        curves: Mapping[Any, CostCurve],
        widths: Callable[[Any], tuple[int, int, int]],
    ) -> None:
        """``curves`` by node; ``widths(node)`` gives a node's current ``(in, out, group)``
        channel counts (``group`` is the conv's group count, 1 for dense layers)."""
        self._curves = curves
        # node -> (in, out, groups, {axis: [(group key, positions per channel)]})
        self._layers: dict[Any, tuple[int, int, int, dict[int, list[tuple[int, int]]]]] = {}
        for group in groups:
            for ws in group.slices:
                node = ws.node
                if node not in curves or ws.is_bias or ws.input_index != 1:
                    continue
                if node not in self._layers:
                    self._layers[node] = (*widths(node), {})
                cuts = self._layers[node][3].setdefault(ws.axis, [])
                entry = (group.id, group.multiplicity(ws.tensor))
                if entry not in cuts:
                    cuts.append(entry)

    def layer_widths(self, node: Any, removed: Mapping[int, int]) -> tuple[int, int]:
        """``node``'s ``(in, out)`` widths after ``removed``."""
        in_channels, out_channels, groups, axes = self._layers[node]
        curve = self._curves[node]
        cut_out = sum(removed.get(key, 0) * per for key, per in axes.get(0, ()))
        cut_in = sum(removed.get(key, 0) * per for key, per in axes.get(1, ()))
        new_out = max(out_channels - cut_out, 1)
        if curve.depthwise:
            return new_out, new_out
        per_group = max(in_channels // max(groups, 1) - cut_in, 1)
        return per_group * groups, new_out

    def __call__(self, removed: Mapping[int, int]) -> float:
        total = 0.0
        for node, (in_channels, out_channels, _, axes) in self._layers.items():
            if not any(removed.get(key, 0) for cuts in axes.values() for key, _ in cuts):
                continue
            curve = self._curves[node]
            now = curve(in_channels, out_channels)
            total += now - curve(*self.layer_widths(node, removed))
        return total


__all__ = ["CostCurve", "LatencySavings", "blocks"]
