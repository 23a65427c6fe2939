"""The analysis walk: run every node's rule once, then group the coupled channel slots.

:class:`Builder` allocates one slot per channel position of each tracked tensor and collects
what the rules state (couplings, blocks, weight slices, fixups); :meth:`Builder.finish` turns
the connected components of the slot graph into :class:`ChannelGroup` objects.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.channels.groups import (
    CHANNEL_AXIS,
    ChannelAnalysis,
    ChannelGroup,
    LayoutFixup,
    PathStep,
    Role,
    WeightSlice,
    ZeroSource,
    describe,
)
from onnxcompress.graph.channels.registry import UNKNOWN_OP, rule_for
from onnxcompress.graph.channels.rule import (
    OpRule,
    Unsupported,
    default_opset,
    rank,
    static_dim,
)

logger = logging.getLogger(__name__)


def analyze_channels(model: ir.Model) -> ChannelAnalysis:
    """Compute the channel groups of a (canonicalized) model.

    The model should have static channel dims (``onnxcompress.graph.canonicalize.canonicalize``
    infers them); channels whose count is unknown are frozen.

    Returns:
        The analysis; ``.groups`` holds every group (frozen ones included, with reasons).
    """
    builder = Builder(model)
    builder.run()
    return builder.finish()


class Builder:
    """Collects slots, couplings, weight slices and blocks while the rules run."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.opset = default_opset(model)
        self.base: dict[ir.Value, int] = {}
        self.count: dict[ir.Value, int] = {}
        self.axes: dict[ir.Value, int] = {}
        self.tensor_order: list[ir.Value] = []
        self.n_slots = 0
        self.edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocks: list[tuple[np.ndarray, str]] = []
        self.explained: list[np.ndarray] = []
        self.records: list[WeightSlice] = []
        self.fixups: list[LayoutFixup] = []
        self.zero_sources: list[ZeroSource] = []
        self.path_steps: list[PathStep] = []
        self.touched: set[ir.Value] = set()

    # -- slots ---------------------------------------------------------------------------------

    def is_channel_tensor(self, value: ir.Value | None) -> bool:
        """A computed tensor with a channel axis (rank >= 2, or already tracked).

        A weight decoded from stored constants (a DequantizeLinear of int8 values) is a
        constant, not a channel tensor.
        """
        if value is None or value.const_value is not None or self.storage(value) is not None:
            return False
        if value in self.base:
            return True
        value_rank = rank(value)
        return value_rank is not None and value_rank >= 2

    def storage(self, value: ir.Value | None) -> OpRule[Any] | None:
        """The rule of the op that decodes ``value`` from stored constants, or None."""
        producer = None if value is None else value.producer()
        if producer is None:
            return None
        rule = rule_for(producer)
        return rule if rule is not None and rule.stores(producer) else None

    def constant(self, value: ir.Value | None) -> np.ndarray | None:
        """The contents of a constant input, or None for a computed tensor.

        An initializer, or a weight decoded from stored constants (its rule then cuts the
        stored tensors). Raises :class:`Unsupported` for a stored weight that cannot be cut,
        which freezes the reader with the reason.
        """
        if value is None:
            return None
        if value.const_value is not None:
            return value.const_value.numpy()
        storage = self.storage(value)
        producer = value.producer()
        if storage is None or producer is None:
            return None
        storage.check_stored(producer)
        self.touch(value)
        return storage.decode(producer)

    def axis(self, value: ir.Value | None) -> int:
        """The channel axis of ``value``: where its producer's rule put it, else axis 1."""
        if value is None:
            return CHANNEL_AXIS
        return self.axes.get(value, CHANNEL_AXIS)

    def place(self, value: ir.Value | None, axis: int) -> None:
        """State that ``value`` (an output of the node being analyzed) holds its channels on
        ``axis``. Call before asking for the value's channels. Which ops may cut channels off
        axis 1 is decided once every rule has run (:meth:`_block_moved_axes`).
        """
        if value is None or value in self.base:
            return
        self.axes[value] = axis

    def _block_moved_axes(self) -> None:
        """Freeze channels held off axis 1 wherever an op touching them cannot be cut there.

        Channels-last regions (tf2onnx's NHWC squeeze-excite blocks, a Transpose pair around
        per-channel arithmetic) are cut like any other: elementwise, broadcasting arithmetic,
        reductions and Transposes carry no layout constant that assumes axis 1
        (``OpRule.cuts_any_axis``). Any other op reading or writing such a tensor freezes it,
        naming the op.
        """
        for value in self.tensor_order:
            axis = self.axes.get(value, CHANNEL_AXIS)
            if axis == CHANNEL_AXIS:
                continue
            producer = value.producer()
            nodes = ([producer] if producer is not None else []) + [u.node for u in value.uses()]
            for node in nodes:
                rule = rule_for(node)
                if rule is not None and (rule.cuts_any_axis or rule.channel_axis is not None):
                    # A fixed-axis op (Conv, pooling...) already froze what it misreads.
                    continue
                start = self.base[value]
                self.block(
                    np.arange(start, start + self.count[value]),
                    f"{describe(node)} meets channels moved to axis {axis} (channels-last), "
                    "where they are cut only through elementwise, broadcast, reduce, softmax, "
                    "normalization and Transpose ops",
                )
                break

    def channels(self, value: ir.Value | None) -> int | None:
        if value is None:
            return None
        if value in self.count:
            return self.count[value]
        if not self.is_channel_tensor(value):
            return None
        return static_dim(value, self.axis(value))

    def slots(self, value: ir.Value | None, declare: int | None = None) -> np.ndarray | None:
        """Global slot ids of ``value``'s channels, allocating them on first use.

        ``declare`` gives the channel count when shape inference left it symbolic (the rule
        knows it from a weight shape or the op's semantics).
        """
        if value is None or value.const_value is not None:
            return None
        self.touched.add(value)
        if value in self.base:
            start = self.base[value]
            return np.arange(start, start + self.count[value])
        value_rank = rank(value)
        if value_rank is not None and value_rank < 2:
            return None
        count = self.channels(value)
        if count is None:
            count = declare
        if count is None:
            return None
        self.base[value] = self.n_slots
        self.count[value] = count
        self.axes.setdefault(value, CHANNEL_AXIS)
        self.tensor_order.append(value)
        self.n_slots += count
        ids = np.arange(self.base[value], self.n_slots)
        if value.is_graph_input():
            self.blocks.append((ids, f"produced by graph input {value.name!r}"))
            self.explained.append(ids)
        return ids

    def touch(self, value: ir.Value | None) -> None:
        if value is not None:
            self.touched.add(value)

    def join(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.size:
            self.edges.append((np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64)))

    def explain(self, ids: np.ndarray | None) -> None:
        if ids is not None:
            self.explained.append(ids)

    def block(self, ids: np.ndarray | None, reason: str) -> None:
        if ids is not None and ids.size:
            self.blocks.append((ids, reason))

    def block_value(self, value: ir.Value | None, reason: str, *, explain: bool = False) -> None:
        ids = self.slots(value)
        self.block(ids, reason)
        if explain:
            self.explain(ids)

    def block_node(self, node: ir.Node, reason: str) -> None:
        """Freeze every channel tensor around ``node``."""
        for value in node.inputs:
            if self.is_channel_tensor(value):
                self.block_value(value, reason)
        for value in node.outputs:
            if self.is_channel_tensor(value):
                self.block_value(value, reason, explain=True)

    # -- records -------------------------------------------------------------------------------

    def weight(
        self,
        node: ir.Node,
        input_index: int,
        axis: int,
        tensor: ir.Value,
        role: Role,
        *,
        is_bias: bool = False,
        out_axis: int | None = None,
        macs_factor: int = 0,
    ) -> None:
        storage = self.storage(node.inputs[input_index])
        self.records.append(
            WeightSlice(
                node, input_index, axis, tensor, role, is_bias, out_axis, macs_factor, storage
            )
        )

    def add_fixup(self, fixup: LayoutFixup) -> None:
        self.fixups.append(fixup)

    def path(
        self, node: ir.Node, tensors: Sequence[ir.Value], *, linear: bool, homogeneous: bool
    ) -> None:
        self.path_steps.append(PathStep(node, tuple(tensors), linear, homogeneous))

    def identity(self, node: ir.Node, x: ir.Value | None, y: ir.Value | None) -> bool:
        """Join channel k of ``x`` with channel k of ``y``; block both when counts disagree."""
        cx, cy = self.channels(x), self.channels(y)
        if cx is None and cy is None:
            self.touch(x)
            self.touch(y)
            return False
        xs = self.slots(x, declare=cy)
        ys = self.slots(y, declare=cx)
        if xs is None or ys is None or xs.size != ys.size:
            reason = f"{describe(node)} changes the channel count"
            self.block(xs, reason)
            self.block(ys, reason)
            self.explain(ys)
            return False
        self.join(xs, ys)
        self.explain(ys)
        return True

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> None:
        for node in list(self.graph):
            self.touched = set()
            rule = rule_for(node)
            try:
                if rule is None:
                    UNKNOWN_OP.analyze(node, self)
                elif rule.accepts_axes(node, self):
                    rule.analyze(node, self)
            except Unsupported as exc:
                self.block_node(node, str(exc))
            for index, value in enumerate(node.inputs):
                if self.is_channel_tensor(value) and value not in self.touched:
                    self.block_value(
                        value, f"input {index} of {describe(node)} is not understood here"
                    )
        for value in self.graph.outputs:
            if self.is_channel_tensor(value):
                self.block_value(value, f"reaches graph output {value.name!r}")
        for value in list(self.base):
            for use in value.uses():
                if use.node.graph is not self.graph:
                    self.block_value(value, f"read inside a subgraph by {describe(use.node)}")
                    break

    def finish(self) -> ChannelAnalysis:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components

        analysis = ChannelAnalysis(self.model)
        n = self.n_slots
        if self.edges:
            a = np.concatenate([e[0] for e in self.edges])
            b = np.concatenate([e[1] for e in self.edges])
        else:
            a = b = np.zeros(0, dtype=np.int64)
        if n:
            adjacency = coo_matrix((np.ones(a.size, dtype=np.int8), (a, b)), shape=(n, n))
            n_comp, labels = connected_components(adjacency, directed=False)
        else:
            n_comp, labels = 0, np.zeros(0, dtype=np.int64)

        explained = np.zeros(n, dtype=bool)
        for ids in self.explained:
            explained[ids] = True
        for value in self.tensor_order:
            start, count = self.base[value], self.count[value]
            missing = ~explained[start : start + count]
            if missing.any():
                producer = value.producer()
                source = describe(producer) if producer is not None else "nothing known"
                self.blocks.append(
                    (
                        np.arange(start, start + count)[missing],
                        f"channels of {value.name!r} come from {source}, whose channel mapping "
                        "is not understood",
                    )
                )
        self._block_moved_axes()

        reasons: dict[int, list[str]] = {}
        for ids, reason in self.blocks:
            for comp in np.unique(labels[ids]):
                bucket = reasons.setdefault(int(comp), [])
                if reason not in bucket:
                    bucket.append(reason)

        # A component's signature: which tensors it touches and how often.
        tensor_index = np.zeros(n, dtype=np.int64)
        for t, value in enumerate(self.tensor_order):
            start = self.base[value]
            tensor_index[start : start + self.count[value]] = t
        n_tensors = max(len(self.tensor_order), 1)
        keys, counts = np.unique(
            labels.astype(np.int64) * n_tensors + tensor_index, return_counts=True
        )
        signature: dict[int, list[tuple[int, int]]] = {}
        for key, cnt in zip(keys.tolist(), counts.tolist(), strict=True):
            signature.setdefault(key // n_tensors, []).append((key % n_tensors, cnt))
        first_slot = np.full(n_comp, n, dtype=np.int64)
        np.minimum.at(first_slot, labels, np.arange(n))

        buckets: dict[tuple[Any, ...], list[int]] = {}
        for comp in range(n_comp):
            key = (tuple(signature[comp]), tuple(reasons.get(comp, ())))
            buckets.setdefault(key, []).append(comp)
        ordered = sorted(buckets.items(), key=lambda item: int(first_slot[item[1]].min()))

        analysis._removed = np.zeros(n_comp, dtype=bool)
        group_of = np.zeros(n_comp, dtype=np.int64)
        rank_in_group = np.zeros(n_comp, dtype=np.int64)
        group_specs = []
        for gid, ((sig, why), comps_list) in enumerate(ordered):
            comps = np.asarray(comps_list, dtype=np.int64)
            comps = comps[np.argsort(first_slot[comps], kind="stable")]
            group_of[comps] = gid
            rank_in_group[comps] = np.arange(comps.size)
            tensors = [self.tensor_order[t] for t, _ in sig]
            frozen: str | None = None
            if why:
                frozen = "; ".join(why[:3]) + (f" (+{len(why) - 3} more)" if len(why) > 3 else "")
            group_specs.append((comps, tensors, frozen))

        positions: list[dict[ir.Value, np.ndarray]] = [{} for _ in group_specs]
        for value in self.tensor_order:
            start, count = self.base[value], self.count[value]
            comp_labels = labels[start : start + count].astype(np.int64)
            analysis._labels[value] = comp_labels
            analysis._axes[value] = self.axis(value)
            groups = group_of[comp_labels]
            order = np.lexsort((np.arange(count), rank_in_group[comp_labels], groups))
            sorted_groups = groups[order]
            bounds = np.flatnonzero(np.diff(sorted_groups)) + 1
            for chunk in np.split(order, bounds):
                gid = int(groups[chunk[0]])
                size = group_specs[gid][0].size
                positions[gid][value] = chunk.reshape(size, -1)

        for gid, (comps, tensors, frozen) in enumerate(group_specs):
            group = ChannelGroup(analysis, gid, comps, tensors, positions[gid], frozen)
            analysis.groups.append(group)
            for value in tensors:
                analysis._groups_by_tensor.setdefault(value, []).append(group)

        for record in self.records:
            if record.tensor in analysis._labels:
                analysis._records_by_tensor.setdefault(record.tensor, []).append(record)
        for fix in self.fixups:
            for value in fix.tensors:
                if value in analysis._labels:
                    analysis._fixups_by_tensor.setdefault(value, []).append(fix)
        for zero in self.zero_sources:
            analysis._zero_by_tensor.setdefault(zero.tensor, []).append(zero)
        for step in self.path_steps:
            for value in step.tensors:
                if value in analysis._labels:
                    analysis._path_by_tensor.setdefault(value, []).append(step)

        _name_groups(analysis.groups)
        logger.debug("channel analysis: %d slots, %d groups", n, len(analysis.groups))
        return analysis


def _name_groups(groups: list[ChannelGroup]) -> None:
    taken: dict[str, int] = {}
    for group in groups:
        parts = [node.name or node.op_type for node in group.producer_nodes]
        parts += [f"zeros of {node.name or 'Pad'}" for node in group.zero_padding]
        if not parts:
            parts = [group.tensors[0].name or f"tensor {group.id}"]
        name = ", ".join(parts[:3]) + (f" (+{len(parts) - 3} more)" if len(parts) > 3 else "")
        taken[name] = taken.get(name, 0) + 1
        group.name = name if taken[name] == 1 else f"{name} #{taken[name]}"
