"""Rules for reshaping and shape arithmetic: Flatten and Reshape (followed through the shape
vectors that feed them), Shape and Size (harmless unless a channel count escapes), and ops that
make tensors from nothing.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.channels.groups import CHANNEL_AXIS, describe
from onnxcompress.graph.channels.rule import (
    OpRule,
    WritesChannelCount,
    const,
    op_set,
    optional,
    rank,
    required,
    spatial,
    static_dim,
)
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

if TYPE_CHECKING:
    from onnxcompress.graph.channels.analysis import Builder


def _flatten_channels(node: ir.Node, b: Builder, x: ir.Value, y: ir.Value) -> bool:
    """Channel k of ``x`` becomes the contiguous block of ``H*W`` features k*HW .. of ``y``."""
    pixels = spatial(x)
    xs = b.slots(x)
    if pixels is None or xs is None:
        b.block_node(node, f"{describe(node)} flattens a tensor with non-static dims")
        return False
    ys = b.slots(y, declare=xs.size * pixels)
    if ys is None or ys.size != xs.size * pixels:
        b.block_node(node, f"the feature counts around {describe(node)} do not add up")
        return False
    b.join(np.repeat(xs, pixels), ys)
    b.explain(ys)
    b.path(node, (x, y), linear=True, homogeneous=True)
    return True


class FlattenRule(OpRule):
    """Flatten at axis 1 of an NCHW tensor: channel k owns a block of ``H*W`` features."""

    family = "flatten"
    op_types = op_set("Flatten")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        x_rank = rank(x)
        if (
            x_rank is None
            or x_rank < 2
            or node.attributes.get_int("axis", 1) % x_rank != CHANNEL_AXIS
        ):
            b.block_node(node, f"{describe(node)} merges channels with the batch or spatial axes")
            return
        _flatten_channels(node, b, x, y)


@dataclasses.dataclass(frozen=True)
class ShapeEntry:
    """One entry of a shape vector: a literal (with where it is stored) or a dim of a tensor."""

    literal: int | None = None
    address: tuple[ir.Node, int, int] | None = None
    dim_of: tuple[ir.Value, int] | None = None


def trace_shape(
    value: ir.Value | None, user: ir.Node, index: int, depth: int = 0
) -> list[ShapeEntry] | None:
    """Follow a shape vector through shape arithmetic (Shape, Gather, Concat...) to its sources."""
    if value is None or depth > 12:
        return None
    array = const(value)
    if array is not None:
        if array.ndim > 1:
            return None
        return [
            ShapeEntry(literal=int(v), address=(user, index, i))
            for i, v in enumerate(array.reshape(-1).tolist())
        ]
    producer = value.producer()
    if producer is None or producer.domain not in DEFAULT_DOMAINS:
        return None
    op = producer.op_type
    if op == "Shape":
        source = producer.inputs[0]
        source_rank = rank(source)
        if source is None or source_rank is None:
            return None
        start = producer.attributes.get_int("start", 0)
        end = producer.attributes.get_int("end", source_rank)
        start, end = (s + source_rank if s < 0 else s for s in (start, end))
        return [
            ShapeEntry(dim_of=(source, axis))
            for axis in range(max(start, 0), min(end, source_rank))
        ]
    if op in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
        return trace_shape(producer.inputs[0], producer, 0, depth + 1)
    if op == "Concat":
        entries: list[ShapeEntry] = []
        for i, part in enumerate(producer.inputs):
            traced = trace_shape(part, producer, i, depth + 1)
            if traced is None:
                # A part computed some other way (Mul of spatial sizes...) of known length
                # stands as opaque entries: a channel count inside it went through arithmetic,
                # which the Shape rule freezes where it reads the count.
                length = static_dim(part, 0) if part is not None and rank(part) == 1 else None
                if length is None:
                    return None
                traced = [ShapeEntry() for _ in range(length)]
            entries.extend(traced)
        return entries
    if op == "Gather":
        data = trace_shape(producer.inputs[0], producer, 0, depth + 1)
        indices = const(producer.inputs[1])
        if data is None or indices is None or indices.ndim > 1:
            return None
        return [data[int(i)] for i in indices.reshape(-1)]
    if op == "Slice":
        data = trace_shape(producer.inputs[0], producer, 0, depth + 1)
        bounds = [const(optional(producer, i)) for i in (1, 2)]
        if data is None or any(x is None for x in bounds):
            return None
        start, end = (int(x.reshape(-1)[0]) for x in bounds)  # type: ignore[union-attr]
        steps = const(optional(producer, 4))
        if steps is not None and int(steps.reshape(-1)[0]) != 1:
            return None
        return data[slice(start, end)]
    return None


class ReshapeRule(WritesChannelCount):
    """Reshapes that flatten NCHW channels (into blocks) or keep them on axis 1."""

    family = "reshape"
    op_types = op_set("Reshape")
    linear_ops = op_set("Reshape")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        b.touch(node.inputs[1])
        if not b.is_channel_tensor(x):
            if b.is_channel_tensor(y):
                b.block_value(
                    y, f"{describe(node)} builds channels from a lower-rank tensor", explain=True
                )
            return
        entries = trace_shape(node.inputs[1], node, 1)
        cx = b.channels(x)
        if entries is None or cx is None or len(entries) < 2:
            b.block_node(node, f"{describe(node)} has a target shape this analysis cannot follow")
            return
        allowzero = node.attributes.get_int("allowzero", 0)
        batch = static_dim(x, 0)

        def literal(entry: ShapeEntry, number: int) -> bool:
            return entry.dim_of is None and entry.literal == number

        def batch_like(entry: ShapeEntry) -> bool:
            if entry.dim_of is not None:
                return entry.dim_of[1] == 0
            return (entry.literal == 0 and not allowzero) or (
                batch is not None and entry.literal == batch
            )

        first, second = entries[0], entries[1]
        pixels = spatial(x)
        if len(entries) == 2 and pixels is not None:
            flat = cx * pixels
            if (batch_like(first) and (literal(second, -1) or literal(second, flat))) or (
                literal(first, -1) and literal(second, flat)
            ):
                if literal(second, flat) and flat not in (0, -1):
                    if second.address is None:
                        b.block_node(node, f"{describe(node)} has a target shape it cannot edit")
                        return
                    self.count_fixup(b, node, y, second.address)
                _flatten_channels(node, b, x, y)
                return
        keeps_channels = (
            (literal(second, 0) and not allowzero)
            or literal(second, cx)
            or (second.dim_of == (x, CHANNEL_AXIS))
        )
        minus_ones = sum(literal(e, -1) for e in entries)
        if (batch_like(first) or literal(first, -1)) and keeps_channels and minus_ones <= 1:
            cy = static_dim(y, CHANNEL_AXIS) if rank(y) == len(entries) else None
            if cy is not None and cy != cx:
                b.block_node(node, f"{describe(node)} changes the channel count")
                return
            if literal(second, cx) and cx != 0:
                if second.address is None:
                    b.block_node(node, f"{describe(node)} has a target shape it cannot edit")
                    return
                self.count_fixup(b, node, y, second.address)
            self.passthrough(node, b, x, y)
            return
        shown = [e.literal if e.dim_of is None else f"dim{e.dim_of[1]}" for e in entries]
        b.block_node(
            node,
            f"feeds Reshape {node.name or '<unnamed>'} whose target shape {shown} is not a "
            "flatten-style merge of channels nor channel-preserving",
        )


def _shape_entries_read(user: ir.Node, index: int, length: int) -> list[int] | None:
    """Which entries of a shape vector ``user`` reads, when it only picks some of them."""
    if index != 0:
        return None
    if user.op_type == "Gather" and user.attributes.get_int("axis", 0) == 0:
        indices = const(user.inputs[1])
        if indices is None:
            return None
        return [int(i) % length for i in indices.reshape(-1)]
    if user.op_type == "Slice":
        bounds = [const(optional(user, i)) for i in (1, 2)]
        steps = const(optional(user, 4))
        if any(x is None for x in bounds) or (steps is not None and int(steps.reshape(-1)[0]) != 1):
            return None
        start, end = (int(x.reshape(-1)[0]) for x in bounds)  # type: ignore[union-attr]
        return list(range(length))[slice(start, end)]
    return None


# Ops a shape vector passes through on its way from Shape to where it is used.
SHAPE_ARITHMETIC = frozenset(
    {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity"}
)
# Where a computed shape may carry a tensor's own channel count: (op, input index). Such a
# count follows the tensor when its channels are cut, at run time, so nothing is baked in.
SHAPE_INPUTS = {("Reshape", 1), ("Expand", 1), ("Resize", 3)}


def own_channel_entry(
    entries: list[ShapeEntry], x: ir.Value, channel: int, position: int | None
) -> bool:
    """Whether ``x``'s channel count appears in ``entries`` only at ``position`` (and there)."""
    hits = [i for i, entry in enumerate(entries) if entry.dim_of == (x, channel)]
    return position is not None and hits == [position]


def _channel_position(user: ir.Node, x: ir.Value, channel: int, length: int) -> int | None:
    """Where the channel count of ``user``'s data input sits in its shape input of ``length``."""
    x_rank = rank(x)
    if x_rank is None:
        return None
    if user.op_type == "Expand":  # broadcast: aligned to the right
        position = channel - (x_rank - length)
        return position if 0 <= position < length else None
    if user.op_type == "Resize":
        axes_attr = user.attributes.get("axes")
        axes = (
            [int(a) % x_rank for a in axes_attr.as_ints()]
            if axes_attr is not None
            else list(range(x_rank))
        )
        return axes.index(channel) if channel in axes and len(axes) == length else None
    return channel  # Reshape keeps channels on their axis (ReshapeRule checks the rest)


def _shape_users(value: ir.Value, depth: int = 0) -> list[tuple[ir.Node, int]] | None:
    """The ops that finally use a shape vector, past the shape arithmetic it flows through
    (None where it goes further than this analysis follows)."""
    if depth > 12:
        return None
    users: list[tuple[ir.Node, int]] = []
    for use in value.uses():
        node = use.node
        if node.domain in DEFAULT_DOMAINS and node.op_type in SHAPE_ARITHMETIC:
            if any(out.is_graph_output() for out in node.outputs):
                return None
            for out in node.outputs:
                further = _shape_users(out, depth + 1)
                if further is None:
                    return None
                users.extend(further)
        else:
            users.append((node, use.idx))
    return users


class ShapeRule(OpRule):
    """Reading a shape is harmless unless the channel count flows somewhere it is baked in.

    The count is followed through shape arithmetic (Gather, Slice, Concat, Unsqueeze...) to
    where it is used. It may end as the same tensor's own channel count in the shape a Reshape,
    Expand or Resize computes for that tensor (how dynamic exports size an upsample or a view):
    that count follows the channels when they are cut. Anywhere else (arithmetic on it, a
    graph output, another tensor's shape) the group is frozen.
    """

    family = "shape"
    op_types = op_set("Shape")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x = required(node, 0)
        b.touch(x)
        if not b.is_channel_tensor(x):
            return
        x_rank = rank(x)
        assert x_rank is not None
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", x_rank)
        start, end = (s + x_rank if s < 0 else s for s in (start, end))
        read = range(max(start, 0), min(end, x_rank))
        channel = b.axis(x)
        if channel not in read:
            return
        if node.outputs[0].is_graph_output():
            b.block_value(x, f"its shape is a graph output via {describe(node)}")
            return
        users = _shape_users(node.outputs[0])
        if users is None:
            b.block_value(x, f"its shape is read by {describe(node)} and used beyond it")
            return
        for user, index in users:
            entries = trace_shape(user.inputs[index], user, index)
            if entries is not None and not any(e.dim_of == (x, channel) for e in entries):
                continue  # the channel count was dropped on the way
            follows = (
                entries is not None
                and user.domain in DEFAULT_DOMAINS
                and (user.op_type, index) in SHAPE_INPUTS
                and user.inputs[0] is x
                and own_channel_entry(
                    entries, x, channel, _channel_position(user, x, channel, len(entries))
                )
            )
            if not follows:
                b.block_value(
                    x,
                    f"its shape is read by {describe(node)} and the channel count is used by "
                    f"{describe(user)}",
                )
                return


class SizeRule(OpRule):
    family = "size"
    op_types = op_set("Size")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x = required(node, 0)
        if b.is_channel_tensor(x):
            b.block_value(x, f"its element count is read by {describe(node)}")
        b.touch(x)


class SourceRule(OpRule):
    """Ops that read no channels; a channel tensor they make stays unexplained (frozen)."""

    family = "source"
    op_types = op_set("Constant ConstantOfShape Range EyeLike RandomNormal RandomUniform")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        for value in node.inputs:
            if b.is_channel_tensor(value):
                b.block_value(value, f"consumed by {describe(node)}")
            b.touch(value)
