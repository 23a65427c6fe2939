"""``merge``: merge similar neurons/filters into one and sum their outgoing weights.

Zhong et al., "Merging Similar Neurons for Deep Networks Compression" (Cognitive Computation
2020). Channels of a group are clustered; each cluster is replaced by one of its members, and
the others' outgoing weights are added to that member's (``W_next[:, k] += α_j W_next[:, j]``),
so two identical neurons merge with no output change.

Which member represents a cluster: a medoid, an existing channel left untouched. The merge then
edits only the consumers, stays exact for duplicates whatever lies between the layers
(per-channel BatchNorm, residual streams with several producers, depthwise kernels), and works
the same for both criteria; a centroid would need new producer rows that compute what no
channel computed, and on activations there is no filter whose output is the centroid.

How a member ``j`` is expressed by the representative ``k`` (``channel_j ≈ α channel_k + β``):

* ``criterion=weights`` (data-free), scale-aware (default): across positively homogeneous ops
  (ReLU, MaxPool) a filter ``W_j = α W_k`` with ``α > 0`` (bias included) gives ``y_j = α y_k``,
  so α is the least-squares scale of the filters, clipped at 0; on a purely linear path any α
  works and the bias difference ``b_j - α b_k`` is folded into the consumers' biases, as lrf
  does. Elsewhere (sigmoid, clip, per-channel parameters on the way) only ``α = 1`` is exact,
  and the filters are compared together with their per-channel parameters.
* ``criterion=activations``: α and β are the least-squares fit on the values the consumers read
  over calibration data (one fit per tensor the group is read at, as in lrf).

Budgets are lrf's (``target_macs``, ``target_params``, ``ratio``; both passes share the
candidate selection, rounds against the measured total and global allocation of
``structured_pruning``). The clustering is then k-medoids by greedy elimination: every channel
is merged into its cheapest surviving representative, and representatives are dropped one at a
time, the one whose loss costs least first. The cost of expressing j by k is the estimated
relative change of the group's output (residual energy of j × ‖outgoing_j‖² / the group's output
energy, summed over the tensors the group is read at), comparable across layers; on ResNet-20
this order measured clearly better than cutting an average-linkage tree. ``threshold=`` instead
merges, with no budget, every cluster whose members are all within that cosine distance of each
other (complete linkage), each into its medoid.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import PassConfigError
from onnxcompress.fitting.replaceability import RemovalPlan
from onnxcompress.graph.channels import ChannelGroup, WeightSlice
from onnxcompress.graph.surgery import fold_compensation, remove_channels
from onnxcompress.passes.channel_views import View, consumers_by_tensor
from onnxcompress.passes.structured_pruning import (
    GroupFit,
    StructuredPruningConfig,
    StructuredPruningPass,
)

logger = logging.getLogger(__name__)

Mode = Literal["positive", "free", "unit"]


@dataclasses.dataclass
class MergeConfig(StructuredPruningConfig):
    """Options of the ``merge`` pass; the budget options are lrf's (see
    :class:`StructuredPruningConfig`).

    Attributes:
        threshold: instead of a budget, merge every cluster whose members are all within this
            cosine distance (``1 - cos``, in [0, 2)) of each other: of the filters (bias
            included) with ``criterion=weights``, of the activations with ``activations``.
            Where a negative scale is allowed (a linear path, or activations) ``1 - |cos|``;
            where only identical channels merge exactly, ``1 - 2<a, b> / (|a|² + |b|²)``.
            ``round_to`` still applies (a group keeps a multiple of it, merging fewer): give
            ``round_to=1`` to merge every such cluster.
        scale_aware: merge ``y_j ≈ α y_k`` for any fitted scale (positive across ReLU), not
            only ``y_j ≈ y_k`` as in the paper.
        ridge: relative ridge term of the scale fits (0: exact duplicates merge exactly).
    """

    target_macs: float | None = None  # restated: a threshold run clears the shared default
    threshold: float | None = None
    scale_aware: bool = True
    ridge: float = 0.0

    def validate(self) -> None:
        if self.threshold is not None:
            if any(b is not None for b in (self.target_macs, self.target_params, self.ratio)):
                raise PassConfigError(
                    "give either threshold or a budget (target_macs, target_params, ratio)"
                )
            if not 0.0 <= self.threshold < 2.0:
                raise PassConfigError(
                    f"threshold={self.threshold} is out of range: give a cosine distance in [0, 2)"
                )
        super().validate()
        if self.threshold is not None:
            self.target_macs = None  # the shared validation fills in a default budget


@dataclasses.dataclass
class _Relation:
    """How each channel is expressed by one other at one view: ``y_j ≈ α_jk y_k + β_jk``.

    Attributes:
        moments: ``[C, C]`` second moments of the channels: the Gram of their filters, or the
            covariance of the values the consumers read.
        offsets: ``[C]`` constant parts (biases on a linear path, activation means), giving
            ``β_jk = offsets_j - α_jk offsets_k``; None when there is no constant to fold.
        mode: ``positive`` (α >= 0, across ReLU), ``free`` (any α) or ``unit`` (α = 1).
        weight: ``[C]`` output change per unit of residual energy of each channel
            (``‖outgoing_j‖² / group output energy``).
        consumers: the consumer slices this view's fit is folded into (None: all of them).
    """

    moments: np.ndarray
    offsets: np.ndarray | None
    mode: Mode
    weight: np.ndarray
    consumers: list[WeightSlice] | None

    def alpha(self, rows: np.ndarray, cols: np.ndarray, ridge: float) -> np.ndarray:
        """Least-squares scale of channel ``rows[i]`` on channel ``cols[i]``."""
        return self._alpha(self.moments[rows, cols], self._energies(ridge)[cols])

    def residual(self, rows: np.ndarray, cols: np.ndarray, ridge: float) -> np.ndarray:
        """Residual energy of channel ``rows[i]`` expressed by channel ``cols[i]``."""
        cross = self.moments[rows, cols]
        alpha = self._alpha(cross, self._energies(ridge)[cols])
        diag = self._energies(0.0)
        return np.maximum(diag[rows] - 2 * alpha * cross + alpha**2 * diag[cols], 0.0)

    def residual_matrix(self, ridge: float) -> np.ndarray:
        """``[C, C]``: :meth:`residual` of every row channel on every column channel."""
        alpha = self._alpha(self.moments, self._energies(ridge)[None, :])
        diag = self._energies(0.0)
        energy = diag[:, None] - 2 * alpha * self.moments + alpha**2 * diag[None, :]
        return np.maximum(energy, 0.0)

    def _energies(self, ridge: float) -> np.ndarray:
        diag = np.maximum(np.diag(self.moments), 0.0)
        return diag + ridge * float(diag.mean()) if diag.size and ridge else diag

    def _alpha(self, cross: np.ndarray, denom: np.ndarray) -> np.ndarray:
        if self.mode == "unit":
            return np.ones(cross.shape)
        denom = np.broadcast_to(denom, cross.shape)
        alpha = np.divide(cross, denom, out=np.zeros(cross.shape), where=denom > 0)
        return np.maximum(alpha, 0.0) if self.mode == "positive" else alpha

    def distance(self) -> np.ndarray:
        """``[C, C]`` cosine-type distance (0: channel j is exactly a multiple of channel k)."""
        diag = np.maximum(np.diag(self.moments), 0.0)
        if self.mode == "unit":
            total = diag[:, None] + diag[None, :]
            similar = np.divide(
                2 * self.moments, total, out=np.ones(self.moments.shape), where=total > 0
            )
            return np.clip(1.0 - similar, 0.0, 2.0)
        norms = np.sqrt(np.outer(diag, diag))
        cosine = np.divide(self.moments, norms, out=np.zeros(norms.shape), where=norms > 0)
        if self.mode == "free":
            cosine = np.abs(cosine)
        distance = np.clip(1.0 - cosine, 0.0, 2.0)
        # A channel with no energy is 0 times any other (plus its constant): exact.
        distance[diag <= 0, :] = 0.0
        return distance


@dataclasses.dataclass
class _MergeFit(GroupFit):
    """One round's plan for one group.

    With a budget, ``plan.order`` lists channels in the order they are merged away (each into
    its cheapest survivor). With a threshold, it lists rows of ``linkage`` (scipy's format: row
    ``i`` joins nodes ``linkage[i, 0]`` and ``linkage[i, 1]`` into node ``size + i``), and each
    cluster keeps its medoid.
    """

    relations: list[_Relation]
    pair_cost: np.ndarray
    linkage: np.ndarray | None


class MergeSimilarNeurons(StructuredPruningPass[MergeConfig]):
    """Cluster similar channels and merge each cluster into one, summing outgoing weights.

    Shares lrf's budget machinery (candidates, rounds against the measured total, global
    allocation, activation capture: :class:`StructuredPruningPass`); only the plan and the
    edit differ, and ``threshold`` adds a per-layer budget.
    """

    name = "merge"
    config_class = MergeConfig
    budget_options = ("target_macs", "target_params", "target_latency", "ratio", "threshold")

    def summary_extras(self) -> dict[str, Any]:
        return {"scale_aware": self.cfg.scale_aware, "threshold": self.cfg.threshold}

    def _per_layer(self) -> bool:
        return super()._per_layer() or self.cfg.threshold is not None

    def _choose(
        self, fits: Sequence[GroupFit], current: float, target: float | None
    ) -> dict[int, int]:
        cfg = self.cfg
        if cfg.threshold is None:
            return super()._choose(fits, current, target)
        counts = {}
        for fit in fits:
            size = fit.group.size
            keep = max(self._min_keep(fit.group), size - len(fit.plan.order))
            multiple = self._multiple(fit.group)
            if multiple > 1 and size > multiple:
                keep = min(size, int(np.ceil(keep / multiple) * multiple))
            counts[fit.group.id] = size - keep
        return {k: v for k, v in counts.items() if v > 0}

    # -- fitting -----------------------------------------------------------------------------

    def fit_group(self, model: ir.Model, group: ChannelGroup, views: list[View] | None) -> GroupFit:
        """How each channel is expressed by each other (α, β) on the views, then the plan."""
        if views is None:
            relations, views = self._weight_relations(group)
        else:
            relations = [self._activation_relation(group, view) for view in views]
        return self._plan(group, views, relations)

    def _weight_relations(self, group: ChannelGroup) -> tuple[list[_Relation], list[View]]:
        """The data-free relations: one filter Gram, one view per tensor the consumers read.

        As in lrf, every view shares the scales and a channel read at several places costs
        the relative output change at each.
        """
        offsets = None
        if not self.cfg.scale_aware or group.params or not group.homogeneous_path:
            mode: Mode = "unit"
            # Identical channels need identical per-channel parameters on the way too
            # (slice_matrix reads any slices of the group, one row per channel).
            filters = np.concatenate(
                [group.producer_matrix(include_bias=True), group.slice_matrix(group.params)],
                axis=1,
            )
        elif group.linear_path:
            mode = "free"
            filters = group.producer_matrix()
            biases = group.producer_bias()
            offsets = biases.sum(axis=1) if biases.shape[1] else None
        else:
            mode = "positive"
            filters = group.producer_matrix(include_bias=True)
        moments = filters @ filters.T
        relations, views = [], []
        by_tensor = consumers_by_tensor(group) or {"": []}
        for slices in by_tensor.values():
            outgoing = group.slice_matrix(slices)
            outgoing_gram = outgoing @ outgoing.T
            energy = float(np.sum(outgoing_gram * moments)) or 1.0
            weight = np.diag(outgoing_gram) / energy
            relations.append(_Relation(moments, offsets, mode, weight, slices))
            views.append(View(moments, outgoing_gram, slices))
        return relations, views

    def _activation_relation(self, group: ChannelGroup, view: View) -> _Relation:
        size = group.size
        gram = view.gram  # augmented: the last row/column is the constant
        count = max(float(gram[size, size]), 1.0)
        mean = gram[:size, size] / count
        covariance = gram[:size, :size] - count * np.outer(mean, mean)
        energy = float(np.sum(view.outgoing_gram * gram[:size, :size])) or 1.0
        mode: Mode = "free" if self.cfg.scale_aware else "unit"
        weight = np.diag(view.outgoing_gram) / energy
        return _Relation(covariance, mean, mode, weight, view.consumers)

    def _plan(
        self, group: ChannelGroup, views: list[View], relations: list[_Relation]
    ) -> _MergeFit:
        cfg = self.cfg
        # pair_cost[j, k]: estimated relative output change of expressing j by k. The weights
        # criterion's views share one relation: sum their weights, compute the residual once.
        weights: dict[int, tuple[_Relation, np.ndarray]] = {}
        for r in relations:
            first, total = weights.get(id(r.moments), (r, 0.0))
            weights[id(r.moments)] = (first, total + r.weight)
        pair_cost = np.zeros((group.size, group.size))
        for relation, weight in weights.values():
            pair_cost += relation.residual_matrix(cfg.ridge) * weight[:, None]
        tree = None
        if cfg.threshold is None:
            order, costs = _elimination_order(pair_cost, group.size - self._min_keep(group))
        else:
            distances = [r.distance() for r, _ in weights.values()]
            tree = _complete_linkage(np.max(distances, axis=0))
            # Complete-linkage heights never decrease: the merges within reach are a prefix.
            order = [int(i) for i in np.flatnonzero(tree[:, 2] <= cfg.threshold)]
            costs = [float(tree[i, 2]) for i in order]
        plan = RemovalPlan(order=order, costs=costs, channels=group.size, intercept=False)
        intercept = any(r.offsets is not None for r in relations)
        return _MergeFit(group, views, plan, intercept, relations, pair_cost, tree)

    # -- editing -----------------------------------------------------------------------------

    def fold_and_remove(self, model: ir.Model, fit: GroupFit, count: int) -> np.ndarray:
        """Fold each merged channel into its representative's outgoing weights, then cut it."""
        assert isinstance(fit, _MergeFit)
        group = fit.group
        rows, reps = _assignment(fit, count)
        removed = set(rows.tolist())
        keep = [c for c in range(group.size) if c not in removed]
        column = {channel: i for i, channel in enumerate(keep)}
        errors = []
        for relation in fit.relations:
            alpha = relation.alpha(rows, reps, self.cfg.ridge)
            # Merging is compensation with one nonzero per row: channel j rides on k.
            matrix = np.zeros((rows.size, len(keep)))
            matrix[np.arange(rows.size), [column[int(k)] for k in reps]] = alpha
            bias = None
            if relation.offsets is not None:
                bias = relation.offsets[rows] - alpha * relation.offsets[reps]
            fold_compensation(
                model, group, rows.tolist(), keep, matrix, bias, consumers=relation.consumers
            )
            own = np.maximum(np.diag(relation.moments)[rows], 0.0)
            residual = relation.residual(rows, reps, self.cfg.ridge)
            errors.append(np.divide(residual, own, out=np.zeros(rows.size), where=own > 0))
        remove_channels(model, group, rows.tolist())
        return np.mean(errors, axis=0)


def _elimination_order(cost: np.ndarray, max_remove: int) -> tuple[list[int], list[float]]:
    """Greedy k-medoids from the top: drop the representative whose loss costs least.

    Every channel is merged into its cheapest surviving representative (a survivor represents
    itself at no cost). Dropping survivor ``j`` moves each channel it represents (``j``
    included) to its second-best survivor, so its cost is the sum of those channels'
    ``second - best`` costs. Only the channels whose best or second-best was ``j`` need a new
    search, so a 2048-channel group takes well under a second.

    Args:
        cost: ``[C, C]``, ``cost[j, k]`` the cost of expressing channel j by channel k (zero
            diagonal, non-negative).
        max_remove: stop after this many channels.

    Returns:
        The dropped channels in order, and what each drop added to the total cost.
    """
    size = cost.shape[0]
    alive = np.ones(size, dtype=bool)
    best = np.zeros(size, dtype=np.int64)
    second = np.zeros(size, dtype=np.int64)
    best_cost = np.zeros(size)
    second_cost = np.zeros(size)

    def search(channels: np.ndarray) -> None:
        survivors = np.flatnonzero(alive)
        sub = cost[np.ix_(channels, survivors)]
        if survivors.size < 2:
            best[channels], best_cost[channels] = survivors[0], sub[:, 0]
            second[channels], second_cost[channels] = -1, np.inf
            return
        two = np.argpartition(sub, 1, axis=1)[:, :2]
        values = np.take_along_axis(sub, two, axis=1)
        swap = values[:, 1] < values[:, 0]
        two[swap], values[swap] = two[swap][:, ::-1], values[swap][:, ::-1]
        best[channels], second[channels] = survivors[two[:, 0]], survivors[two[:, 1]]
        best_cost[channels], second_cost[channels] = values[:, 0], values[:, 1]

    search(np.arange(size))
    order: list[int] = []
    costs: list[float] = []
    for _ in range(max(0, min(max_remove, size - 1))):
        loss = np.bincount(best, weights=second_cost - best_cost, minlength=size)
        loss[~alive] = np.inf
        dropped = int(np.argmin(loss))
        order.append(dropped)
        costs.append(float(loss[dropped]))
        alive[dropped] = False
        search(np.flatnonzero((best == dropped) | (second == dropped)))
    return order, costs


def _complete_linkage(distance: np.ndarray) -> np.ndarray:
    """scipy's linkage matrix of complete-linkage clustering on a ``[C, C]`` distance."""
    from scipy.cluster.hierarchy import linkage
    from scipy.spatial.distance import squareform

    symmetric = np.minimum(distance, distance.T)
    np.fill_diagonal(symmetric, 0.0)
    return np.asarray(linkage(squareform(symmetric, checks=False), method="complete"))


def _assignment(fit: _MergeFit, count: int) -> tuple[np.ndarray, np.ndarray]:
    """The channels the first ``count`` steps of the plan merge away, and their representatives.

    Returns:
        ``(members, representatives)``, sorted by member.
    """
    size = fit.group.size
    cost = fit.pair_cost
    merged: list[tuple[int, int]] = []
    if fit.linkage is None:
        gone = np.zeros(size, dtype=bool)
        gone[fit.plan.order[:count]] = True
        survivors = np.flatnonzero(~gone)
        for j in np.flatnonzero(gone):
            merged.append((int(j), int(survivors[np.argmin(cost[j, survivors])])))
    else:
        for members in _clusters(fit.linkage, fit.plan.order[:count], size):
            medoid = int(members[np.argmin(cost[np.ix_(members, members)].sum(axis=0))])
            merged.extend((int(j), medoid) for j in members if j != medoid)
    merged.sort()
    members_out = np.array([j for j, _ in merged], dtype=np.int64)
    representatives = np.array([k for _, k in merged], dtype=np.int64)
    return members_out, representatives


def _clusters(tree: np.ndarray, rows: Sequence[int], size: int) -> list[np.ndarray]:
    """The clusters of two or more channels after the merges ``rows`` of ``tree``.

    Each row's clusters are built by earlier rows (true of any prefix of a scipy linkage).
    """
    members: dict[int, list[int]] = {}
    for row in rows:
        joined = []
        for child in tree[row, :2].astype(np.int64):
            joined.extend(members.pop(int(child)) if child >= size else [int(child)])
        members[size + int(row)] = joined
    return [np.array(sorted(m), dtype=np.int64) for m in members.values()]
