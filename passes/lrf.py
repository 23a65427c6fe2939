"""``lrf``: remove linearly replaceable filters and fold the replacement into the next layers.

Joo et al., "Linearly Replaceable Filters for Deep Network Channel Pruning" (AAAI 2021). A
channel that is (nearly) a linear combination of the others in its group is removed, and the
combination is added to the consumers' weights (``W_next[:, i] += λ_i W_next[:, j]``), so the
network keeps computing almost the same thing without retraining.

Two ways to fit λ:

* ``criterion=weights`` (the paper, data-free): λ from the producers' filters; exact when only
  linear ops sit between producer and consumer, the paper's approximation across a ReLU.
* ``criterion=activations``: λ (plus an intercept, folded into the consumers' biases) from the
  values the consumers actually read on calibration data, least-squares optimal through the
  non-linearity.

Channels are ranked across the whole network by estimated relative output change per MAC
saved, and removed in rounds until the measured MACs (or params) reach the target.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from onnxcompress.fitting.replaceability import Compensation, compensation, greedy_removal_views
from onnxcompress.graph.channels import ChannelGroup
from onnxcompress.graph.model_io import drop_resident_external_pages
from onnxcompress.graph.surgery import fold_compensation, remove_channels
from onnxcompress.passes.channel_views import View, consumers_by_tensor
from onnxcompress.passes.structured_pruning import (
    GroupFit,
    StructuredPruningConfig,
    StructuredPruningPass,
)

logger = logging.getLogger(__name__)

# The greedy path removes this fraction of a group's channels per step (at least one):
# one at a time up to 64 channels, 32 at a time in a 2048-wide stage; the allocator's
# granularity is unaffected, and ResNet-50 plans in seconds instead of minutes.
STEP_FRACTION = 1 / 64


@dataclasses.dataclass
class LrfConfig(StructuredPruningConfig):
    """Options of the ``lrf`` pass: every option of :class:`StructuredPruningConfig`, whose
    attributes say what each does, with its defaults."""


class LinearlyReplaceableFilters(StructuredPruningPass[LrfConfig]):
    """Remove channels that the others can replace, compensating in the consumers."""

    name = "lrf"
    config_class = LrfConfig

    # -- fitting -----------------------------------------------------------------------------

    def fit_group(self, model: ir.Model, group: ChannelGroup, views: list[View] | None) -> GroupFit:
        """λ fits on the views (the paper's filter Gram without data), then a greedy plan."""
        intercept = views is not None
        if views is None:
            views = self._weight_views(group)
            # Weights read from a memory-mapped external file stay resident until let go.
            drop_resident_external_pages(model)
        plan = greedy_removal_views(
            [(v.gram, v.outgoing_gram) for v in views],
            max_remove=group.size - self._min_keep(group),
            intercept=intercept,
            ridge=self.cfg.ridge,
            step_fraction=STEP_FRACTION,
        )
        return GroupFit(group, views, plan, intercept)

    @staticmethod
    def _weight_views(group: ChannelGroup) -> list[View]:
        """The paper's data-free fit: one filter Gram, one view per tensor the consumers read.

        Every view shares the Gram (so the λ are the same everywhere); splitting the outgoing
        weights by tensor makes a channel read at seven places cost seven relative errors, as
        with activations, instead of one averaged over all of them.
        """
        filters = group.producer_matrix()
        gram = filters @ filters.T
        by_tensor = consumers_by_tensor(group)
        if not by_tensor:
            return [View(gram, np.zeros((group.size, group.size)), [])]
        views = []
        for slices in by_tensor.values():
            rows = group.slice_matrix(slices)
            views.append(View(gram, rows @ rows.T, slices))
        return views

    # -- editing -----------------------------------------------------------------------------

    def fold_and_remove(self, model: ir.Model, fit: GroupFit, count: int) -> np.ndarray:
        """Refit λ for the planned channels, fold them into the consumers, then cut them."""
        group = fit.group
        removed = sorted(fit.plan.order[:count])
        residuals = []
        fitted: dict[int, Compensation] = {}  # views of the weights criterion share one Gram
        for view in fit.views:
            comp = fitted.get(id(view.gram))
            if comp is None:
                comp = fitted[id(view.gram)] = compensation(
                    view.gram,
                    removed,
                    channels=group.size,
                    intercept=fit.intercept,
                    ridge=self.cfg.ridge,
                )
            bias = comp.bias
            if not fit.intercept and group.linear_path:
                # The paper's bias part: b_j - Σ λ_i b_i, exact on a linear path.
                totals = group.producer_bias().sum(axis=1)
                if totals.size:
                    bias = totals[comp.removed] - comp.matrix @ totals[comp.keep]
            fold_compensation(
                model, group, comp.removed, comp.keep, comp.matrix, bias, consumers=view.consumers
            )
            residuals.append(comp.residual)
        remove_channels(model, group, removed)
        return np.mean(residuals, axis=0)
