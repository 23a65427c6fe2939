"""Channels priced by the time they save: what ``lrf``/``merge`` use for ``cost=latency`` and
``target_latency``.

The latency model (``runtime.latency_table``) says what each conv costs at any width on the run's
target; this module turns it into what the allocator reads: milliseconds saved per channel of
each group (a chunk of one vector block at a time, since only whole blocks save time), and the
milliseconds a whole plan saves. With ``target_latency`` it also measures the model between
rounds, interleaved with the original, and refits the model's scale to what was measured.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

from onnxcompress.fitting.latency_curve import LatencySavings
from onnxcompress.graph.channels import ChannelGroup
from onnxcompress.graph.input_shapes import counted_at
from onnxcompress.graph.model_io import clone_model
from onnxcompress.runtime.latency_table import (
    InterleavedTimer,
    LatencyModel,
    LatencyTarget,
    conv_widths,
)

logger = logging.getLogger(__name__)


class LatencyPricing:
    """The latency side of one structured-pruning run.

    Args:
        model: the model before any cut (the latency model is built on it, and with
            ``measure`` a copy is kept as the reference every round is timed against).
        target: provider, threads and batch to price for.
        measure: time the model between rounds (``target_latency``).
    """

    def __init__(
        self, model: ir.Model, target: LatencyTarget, *, measure: bool, progress: bool = False
    ) -> None:
        self.target = target
        self._timer = None
        model_timer = None
        if measure:
            # The reference every round is timed against also gives the original's latency.
            timer = InterleavedTimer(clone_model(model), target, overrides=counted_at(model))
            self._timer, model_timer = timer, lambda _: timer.reference_ms()
        self.model = LatencyModel.build(model, target, model_timer=model_timer, progress=progress)
        self.rounds: list[dict[str, float]] = []

    @property
    def block(self) -> int:
        return self.model.block

    def measure(self, model: ir.Model, predicted_ms: float) -> float:
        """Time ``model`` against the original, refit the latency model through it, and record
        the round's prediction beside the measurement; returns the measured ms."""
        assert self._timer is not None, "measure needs measure=True"
        measured = self._timer.ratio(model) * self.model.original_ms
        self.model.calibrate(measured)
        self.rounds.append(
            {
                "predicted_ratio": round(predicted_ms / self.model.original_ms, 4),
                "measured_ratio": round(measured / self.model.original_ms, 4),
            }
        )
        logger.info(
            "latency: predicted %.3f ms, measured %.3f ms (original %.3f ms)",
            predicted_ms,
            measured,
            self.model.original_ms,
        )
        return measured

    def plan_savings(self, groups: Sequence[ChannelGroup]) -> Callable[[Mapping[int, int]], float]:
        """Milliseconds a plan (``{group id: channels removed}``) saves, at the current scale."""
        savings = LatencySavings(groups, self.model.curves, conv_widths)
        scale = self.model.scale
        return lambda plan: scale * savings(plan)

    def worth_curves(
        self, groups: Sequence[ChannelGroup], min_keep: Callable[[ChannelGroup], int]
    ) -> dict[int, list[float]]:
        """For each group, the milliseconds its first ``n`` removals save together,
        ``n = 0 .. size - min_keep`` (steps where the widths cross vector blocks)."""
        curves: dict[int, list[float]] = {}
        scale = self.model.scale
        for group in groups:
            savings = LatencySavings([group], self.model.curves, conv_widths)
            limit = max(group.size - min_keep(group), 0)
            curves[group.id] = [scale * savings({group.id: n}) for n in range(limit + 1)]
        return curves

    def summary(self, final_predicted_ms: float | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "target": {
                "provider": self.target.provider_name(),
                "batch": self.target.batch,
                "threads": self.target.threads,
            },
            "model": self.model.as_dict(),
            "rounds": self.rounds,
        }
        if final_predicted_ms is not None:
            entry["predicted_ratio"] = round(final_predicted_ms / self.model.original_ms, 4)
        return entry


__all__ = ["LatencyPricing"]
