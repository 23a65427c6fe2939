"""Rules for ops that move data without computing on it: Concat, Split, Slice, Gather, Pad,
Transpose, Squeeze/Unsqueeze, Resize, Expand and Tile.

They follow their input's channel axis, wherever it lies; those that cut, offset or pad the
channel axis record a fixup that rewrites their constants after a cut.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.channels.groups import (
    CHANNEL_AXIS,
    ChannelAnalysis,
    LayoutFixup,
    ZeroSource,
    describe,
)
from onnxcompress.graph.channels.rule import (
    OpRule,
    WritesChannelCount,
    attr_ints,
    axes_operand,
    check_side_inputs,
    const,
    default_opset,
    new_int_input,
    op_set,
    optional,
    rank,
    required,
    set_entry,
    set_int_entry,
    static_dim,
    write_ints,
)
from onnxcompress.graph.channels.shapes import own_channel_entry, trace_shape

if TYPE_CHECKING:
    from onnxcompress.graph.channels.analysis import Builder


class ConcatRule(OpRule):
    family = "concat"
    op_types = op_set("Concat")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        y = node.outputs[0]
        out_rank = rank(y)
        if out_rank is None:
            b.block_node(node, f"{describe(node)} has an output of unknown rank")
            return
        if out_rank < 2:
            for value in node.inputs:
                b.touch(value)
            return
        computed = [v for v in node.inputs if v is not None and v.const_value is None]
        channel_axes = {b.axis(v) for v in computed}
        if len(channel_axes) > 1:
            b.block_node(
                node, f"{describe(node)} joins tensors whose channels lie on different axes"
            )
            return
        channel = channel_axes.pop() if channel_axes else CHANNEL_AXIS
        b.place(y, channel)
        axis = node.attributes.get_int("axis", 0) % out_rank
        if axis != channel:
            if len(computed) != len(node.inputs):
                b.block_node(node, f"{describe(node)} concatenates a constant")
                return
            for value in computed:
                b.identity(node, value, y)
            b.path(node, [*computed, y], linear=True, homogeneous=True)
            return
        counts = [
            b.channels(v) if v is not None and v.const_value is None else None for v in node.inputs
        ]
        if any(c is None for c in counts):
            b.block_node(
                node, f"{describe(node)} concatenates channels of unknown count or constants"
            )
            return
        total = int(sum(c for c in counts if c is not None))
        ys = b.slots(y, declare=total)
        if ys is None or ys.size != total:
            b.block_node(node, f"the channel counts around {describe(node)} do not add up")
            return
        offset = 0
        for value in node.inputs:
            xs = b.slots(value)
            assert xs is not None  # counts were checked above
            b.join(xs, ys[offset : offset + xs.size])
            offset += xs.size
        b.explain(ys)
        b.path(node, [*node.inputs, y], linear=True, homogeneous=True)  # type: ignore[list-item]


@dataclasses.dataclass(frozen=True, eq=False)
class SplitFixup(LayoutFixup):
    """The part sizes of a channel Split, given as an input, an attribute or implicitly."""

    kind: ClassVar[str] = "split"

    input: ir.Value
    outputs: tuple[ir.Value, ...]
    form: str


class SplitRule(OpRule[SplitFixup]):
    family = "split"
    op_types = op_set("Split")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x = required(node, 0)
        x_rank = rank(x)
        if x_rank is None or x_rank < 2:
            b.block_node(node, f"{describe(node)} has an input of unknown rank")
            return
        channel = b.axis(x)
        for out in node.outputs:
            b.place(out, channel)
        axis = node.attributes.get_int("axis", 0) % x_rank
        if axis != channel:
            if not check_side_inputs(node, b):
                return
            for out in node.outputs:
                b.identity(node, x, out)
            b.path(node, [x, *node.outputs], linear=True, homogeneous=True)
            return
        cx = b.channels(x)
        split_value = optional(node, 1)
        split_attr = attr_ints(node, "split")
        if split_value is not None:
            sizes = const(split_value)
            if sizes is None:
                b.block_node(node, f"{describe(node)} splits channels by computed sizes")
                return
            form, split = "input", [int(s) for s in sizes.reshape(-1)]
        elif split_attr is not None:
            form, split = "attr", split_attr
        else:
            parts = len(node.outputs)
            if cx is None:
                split = []
            else:
                # Opset 18 ``num_outputs`` puts the remainder in the last part.
                chunk = -(-cx // parts)
                split = [min(chunk, cx - i * chunk) for i in range(parts)]
            form = "implicit"
        xs = b.slots(x)
        if xs is None or sum(split) != xs.size or len(split) != len(node.outputs):
            b.block_node(node, f"the channel counts around {describe(node)} are unknown")
            return
        b.touch(split_value)
        offset = 0
        for out, size in zip(node.outputs, split, strict=True):
            ys = b.slots(out, declare=size)
            if ys is None or ys.size != size:
                b.block_node(node, f"the channel counts around {describe(node)} do not add up")
                return
            b.join(xs[offset : offset + size], ys)
            b.explain(ys)
            offset += size
        outputs = tuple(node.outputs)
        b.add_fixup(SplitFixup(self, node, (x, *outputs), x, outputs, form))
        b.path(node, [x, *node.outputs], linear=True, homogeneous=True)

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: SplitFixup) -> None:
        sizes = [analysis.channel_count(out) for out in fixup.outputs]
        node = fixup.node
        if fixup.form == "input":
            write_ints(graph, node, 1, sizes)
        elif fixup.form == "attr" or default_opset(analysis.model) < 13:
            node.attributes["split"] = ir.AttrInt64s("split", sizes)
        else:
            node.attributes.pop("num_outputs", None)
            new_int_input(graph, node, 1, sizes)


@dataclasses.dataclass(frozen=True, eq=False)
class SliceFixup(LayoutFixup):
    """The bounds of a Slice on the channel axis (``entry`` of its starts/ends)."""

    kind: ClassVar[str] = "slice"

    input: ir.Value
    output: ir.Value
    entry: int
    start: int
    form: str


def _slice_params(node: ir.Node, opset: int) -> tuple[str, list[list[int]]] | None:
    """(form, [starts, ends, axes, steps]) with every list constant, or None."""
    if opset < 10:
        starts, ends = attr_ints(node, "starts"), attr_ints(node, "ends")
        if starts is None or ends is None:
            return None
        axes = attr_ints(node, "axes") or list(range(len(starts)))
        return "attr", [starts, ends, axes, [1] * len(starts)]
    arrays = []
    for index in (1, 2):
        array = const(optional(node, index))
        if array is None:
            return None
        arrays.append([int(v) for v in array.reshape(-1)])
    axes_value, steps_value = optional(node, 3), optional(node, 4)
    axes_array, steps_array = const(axes_value), const(steps_value)
    if (axes_value is not None and axes_array is None) or (
        steps_value is not None and steps_array is None
    ):
        return None
    axes = (
        [int(v) for v in axes_array.reshape(-1)]
        if axes_array is not None
        else list(range(len(arrays[0])))
    )
    steps = (
        [int(v) for v in steps_array.reshape(-1)]
        if steps_array is not None
        else [1] * len(arrays[0])
    )
    return "input", [arrays[0], arrays[1], axes, steps]


class SliceRule(OpRule[SliceFixup]):
    family = "slice"
    op_types = op_set("Slice")
    channel_axis = None
    linear_ops = op_set("Slice")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        x_rank = rank(x)
        params = _slice_params(node, b.opset)
        if x_rank is None or params is None:
            b.block_node(node, f"{describe(node)} slices with computed bounds")
            return
        for value in node.inputs[1:]:
            b.touch(value)
        if x_rank < 2:
            return
        form, (starts, ends, axes, steps) = params
        normalized = [a % x_rank for a in axes]
        if 0 in normalized:
            b.block_node(node, f"{describe(node)} slices the batch axis")
            return
        channel = b.axis(x)
        if channel not in normalized:
            self.passthrough(node, b, x, y)
            return
        entry = normalized.index(channel)
        cx = b.channels(x)
        if steps[entry] != 1 or cx is None:
            b.block_node(node, f"{describe(node)} slices channels with step {steps[entry]}")
            return
        start, end = starts[entry], ends[entry]
        start = max(0, min(cx, start + cx if start < 0 else start))
        end = max(0, min(cx, end + cx if end < 0 else end))
        count = max(0, end - start)
        b.place(y, channel)
        xs = b.slots(x)
        ys = b.slots(y, declare=count)
        if xs is None or ys is None or ys.size != count or count == 0:
            b.block_node(node, f"the channel counts around {describe(node)} are unknown")
            return
        b.join(xs[start:end], ys)
        b.explain(ys)
        b.add_fixup(SliceFixup(self, node, (x, y), x, y, entry, start, form))
        b.path(node, (x, y), linear=True, homogeneous=True)

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: SliceFixup) -> None:
        alive_out = np.flatnonzero(analysis.alive(fixup.output))
        start = int(analysis.current_positions(fixup.input)[fixup.start + alive_out[0]])
        end = start + alive_out.size
        if fixup.form == "attr":
            set_int_entry(fixup.node, "starts", fixup.entry, start)
            set_int_entry(fixup.node, "ends", fixup.entry, end)
            return
        set_entry(graph, fixup.node, 1, fixup.entry, start)
        set_entry(graph, fixup.node, 2, fixup.entry, end)


@dataclasses.dataclass(frozen=True, eq=False)
class GatherFixup(LayoutFixup):
    """The indices of a Gather on the channel axis (``indices``: the original ones)."""

    kind: ClassVar[str] = "gather"

    input: ir.Value
    output: ir.Value
    indices: np.ndarray


class GatherRule(OpRule[GatherFixup]):
    family = "gather"
    op_types = op_set("Gather")
    channel_axis = None
    linear_ops = op_set("Gather")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, indices_value, y = required(node, 0), required(node, 1), node.outputs[0]
        b.touch(indices_value)
        if not b.is_channel_tensor(x):
            return  # shape arithmetic or an embedding table; its output is checked where used
        x_rank = rank(x)
        indices = const(indices_value)
        assert x_rank is not None
        axis = node.attributes.get_int("axis", 0) % x_rank
        if indices is None or axis == 0:
            b.block_node(node, f"{describe(node)} gathers along the batch axis or computed indices")
            return
        channel = b.axis(x)
        if axis != channel:
            # The gathered axis becomes ``indices.ndim`` axes; the channels shift if it was before.
            shift = indices.ndim - 1 if axis < channel else 0
            self.passthrough(node, b, x, y, axis=channel + shift)
            return
        cx = b.channels(x)
        if indices.ndim != 1 or cx is None:
            b.block_node(node, f"{describe(node)} gathers channels into a different layout")
            return
        picked = np.where(indices < 0, indices + cx, indices).astype(np.int64)
        b.place(y, channel)
        xs = b.slots(x)
        ys = b.slots(y, declare=picked.size)
        if xs is None or ys is None or ys.size != picked.size:
            b.block_node(node, f"the channel counts around {describe(node)} are unknown")
            return
        b.join(xs[picked], ys)
        b.explain(ys)
        b.add_fixup(GatherFixup(self, node, (x, y), x, y, picked))
        b.path(node, (x, y), linear=True, homogeneous=True)

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: GatherFixup) -> None:
        picked = fixup.indices[analysis.alive(fixup.output)]
        current = analysis.current_positions(fixup.input)[picked]
        write_ints(graph, fixup.node, 1, current.tolist())


@dataclasses.dataclass(frozen=True, eq=False)
class PadFixup(LayoutFixup):
    """The channel-axis amounts of a Pad that creates zero channels.

    ``entry_before`` / ``entry_after`` index the pads list; ``before`` / ``after`` are the
    original numbers of zero channels in front and behind.
    """

    kind: ClassVar[str] = "pad"

    output: ir.Value
    before: int
    after: int
    entry_before: int
    entry_after: int
    form: str


class PadRule(OpRule[PadFixup]):
    family = "pad"
    op_types = op_set("Pad")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        x_rank = rank(x)
        if x_rank is None or x_rank < 2:
            b.block_node(node, f"{describe(node)} pads a tensor of unknown rank")
            return
        mode = node.attributes.get_string("mode", "constant")
        value = 0.0
        if b.opset < 11:
            pads, form = attr_ints(node, "pads"), "attr"
            value = node.attributes.get_float("value", 0.0)
            axes: list[int] | None = None
        else:
            pads_array = const(optional(node, 1))
            pads = [int(v) for v in pads_array.reshape(-1)] if pads_array is not None else None
            form = "input"
            value_array = const(optional(node, 2))
            if optional(node, 2) is not None and value_array is None:
                pads = None
            elif value_array is not None and value_array.size:
                value = float(value_array.reshape(-1)[0])
            known, axes = axes_operand(node, 3, "__none__")
            if not known:
                pads = None
        if pads is None:
            b.block_node(node, f"{describe(node)} pads by computed amounts")
            return
        for extra in node.inputs[1:]:
            b.touch(extra)
        axes = [a % x_rank for a in axes] if axes is not None else list(range(x_rank))
        if len(pads) != 2 * len(axes):
            b.block_node(node, f"{describe(node)} has malformed pads")
            return
        befores = dict(zip(axes, pads[: len(axes)], strict=True))
        afters = dict(zip(axes, pads[len(axes) :], strict=True))
        if befores.get(0, 0) or afters.get(0, 0):
            b.block_node(node, f"{describe(node)} pads the batch axis")
            return
        channel = b.axis(x)
        b.place(y, channel)
        before, after = befores.get(channel, 0), afters.get(channel, 0)
        linear = mode in ("reflect", "edge", "wrap") or value == 0.0
        if before == 0 and after == 0:
            if b.identity(node, x, y):
                b.path(node, (x, y), linear=linear, homogeneous=linear)
            return
        cx = b.channels(x)
        if mode != "constant" or before < 0 or after < 0 or cx is None:
            b.block_node(node, f"{describe(node)} pads the channel axis in mode {mode!r}")
            return
        xs = b.slots(x)
        ys = b.slots(y, declare=before + cx + after)
        if xs is None or ys is None or ys.size != before + cx + after:
            b.block_node(node, f"the channel counts around {describe(node)} are unknown")
            return
        b.join(xs, ys[before : before + cx])
        b.explain(ys)
        zero_positions = np.concatenate([np.arange(before), np.arange(before + cx, ys.size)])
        b.zero_sources.append(ZeroSource(node, y, zero_positions))
        entry_before = axes.index(channel)
        entry_after = len(axes) + entry_before
        b.add_fixup(PadFixup(self, node, (x, y), y, before, after, entry_before, entry_after, form))
        b.path(node, (x, y), linear=value == 0.0, homogeneous=value == 0.0)

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: PadFixup) -> None:
        alive = analysis.alive(fixup.output)
        before = int(alive[: fixup.before].sum())
        after = int(alive[alive.size - fixup.after :].sum()) if fixup.after else 0
        entries = ((fixup.entry_before, before), (fixup.entry_after, after))
        for entry, number in entries:
            if fixup.form == "attr":
                set_int_entry(fixup.node, "pads", entry, number)
            else:
                set_entry(graph, fixup.node, 1, entry, number)


class TransposeRule(OpRule):
    """Transpose carries the channels to wherever the permutation puts their axis."""

    family = "transpose"
    op_types = op_set("Transpose")
    channel_axis = None
    cuts_any_axis = True
    linear_ops = op_set("Transpose")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        perm = attr_ints(node, "perm")
        x = required(node, 0)
        if not b.is_channel_tensor(x):
            b.touch(x)
            return
        channel = b.axis(x)
        if perm is None or perm[0] != 0 or channel not in perm:
            b.block_node(node, f"{describe(node)} moves the channel axis (perm={perm})")
            return
        self.passthrough(node, b, x, node.outputs[0], axis=perm.index(channel))


class SqueezeRule(OpRule):
    """Squeeze/Unsqueeze of axes after the channel axis (before it they would move it)."""

    family = "squeeze"
    op_types = op_set("Squeeze Unsqueeze")
    channel_axis = None
    cuts_any_axis = True
    linear_ops = op_set("Squeeze Unsqueeze")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        if not b.is_channel_tensor(x) and not b.is_channel_tensor(y):
            b.touch(x)
            b.touch(optional(node, 1))
            return
        known, axes = axes_operand(node, 1, "axes")
        b.touch(optional(node, 1))
        out_rank = rank(y) if node.op_type == "Unsqueeze" else rank(x)
        if not known or out_rank is None:
            b.block_node(node, f"{describe(node)} has computed axes")
            return
        channel = b.axis(x)
        if axes is None:
            # Squeeze without axes drops every unit dim: safe only if none is at or before the
            # channel axis.
            batch_and_before = [static_dim(x, a) for a in range(channel)]
            if any(d in (1, None) for d in batch_and_before) or b.channels(x) == 1:
                b.block_node(node, f"{describe(node)} may drop the batch or channel axis")
                return
            axes = []
        if any(a % out_rank <= channel for a in axes):
            b.block_node(node, f"{describe(node)} moves the channel axis")
            return
        self.passthrough(node, b, x, y)


class ResizeRule(WritesChannelCount):
    family = "resize"
    op_types = op_set("Resize Upsample")
    channel_axis = None
    linear_ops = op_set("Resize Upsample")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        x_rank = rank(x)
        if x_rank is None or x_rank < 2:
            b.block_node(node, f"{describe(node)} resizes a tensor of unknown rank")
            return
        channel = b.axis(x)
        axes = attr_ints(node, "axes")
        axes = [a % x_rank for a in axes] if axes is not None else list(range(x_rank))
        if node.op_type == "Upsample" and b.opset < 9:
            scales_list = [float(s) for s in (node.attributes["scales"].as_floats())]
            scales: np.ndarray | None = np.asarray(scales_list)
            sizes_index = None
        else:
            if node.op_type == "Upsample" or b.opset < 11:
                scales_index, sizes_index = 1, None
            else:
                scales_index, sizes_index = 2, 3
            scales_value = optional(node, scales_index)
            scales = const(scales_value)
            if scales_value is not None and scales is None:
                b.block_node(node, f"{describe(node)} has computed scales")
                return
            if scales is not None and scales.size == 0:
                scales = None
        for axis, what in ((channel, "channel"), (0, "batch")):
            if (
                scales is not None
                and axis in axes
                and float(scales.reshape(-1)[axes.index(axis)]) != 1.0
            ):
                b.block_node(node, f"{describe(node)} scales the {what} axis")
                return
        sizes_value = optional(node, sizes_index) if sizes_index is not None else None
        if sizes_value is not None:
            sizes = const(sizes_value)
            if sizes is None:
                # Sizes computed at run time are fine where the channel entry is this tensor's
                # own channel count (Concat(Shape(x)[:2], new H, W)): it follows the cut.
                entries = trace_shape(sizes_value, node, sizes_index or 0)
                position = axes.index(channel) if channel in axes else None
                if (
                    entries is None
                    or len(entries) != len(axes)
                    or (
                        position is not None
                        and not own_channel_entry(entries, x, channel, position)
                    )
                ):
                    b.block_node(node, f"{describe(node)} has computed output sizes")
                    return
            elif sizes.size and channel in axes:
                assert sizes_index is not None
                cx = b.channels(x)
                entry = axes.index(channel)
                if cx is None or int(sizes.reshape(-1)[entry]) != cx:
                    b.block_node(node, f"{describe(node)} resizes the channel axis")
                    return
                self.count_fixup(b, node, y, (node, sizes_index, entry))
        for extra in node.inputs[1:]:
            if b.is_channel_tensor(extra):
                b.block_node(node, f"{describe(node)} takes a computed tensor as a side input")
                return
            b.touch(extra)
        self.passthrough(node, b, x, y)


class ExpandRule(WritesChannelCount):
    family = "expand"
    op_types = op_set("Expand")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        shape = const(node.inputs[1])
        b.touch(node.inputs[1])
        out_rank = rank(y)
        if not b.is_channel_tensor(x):
            if b.is_channel_tensor(y):
                b.block_value(
                    y, f"{describe(node)} broadcasts a tensor onto the channel axis", explain=True
                )
            b.touch(x)
            return
        if shape is None and out_rank is not None and rank(x) == out_rank:
            # A computed shape whose channel entry is this tensor's own count follows the cut.
            entries = trace_shape(node.inputs[1], node, 1)
            position = b.axis(x) - (out_rank - len(entries)) if entries is not None else None
            if entries is not None and own_channel_entry(entries, x, b.axis(x), position):
                self.passthrough(node, b, x, y)
                return
        if shape is None or out_rank is None or rank(x) != out_rank:
            b.block_node(node, f"{describe(node)} expands to a computed shape")
            return
        position = b.axis(x) - (out_rank - shape.size)
        cx = b.channels(x)
        if position >= 0:
            target = int(shape.reshape(-1)[position])
            if target not in (1, cx):
                b.block_node(node, f"{describe(node)} broadcasts onto the channel axis")
                return
            if target == cx and cx != 1:
                self.count_fixup(b, node, y, (node, 1, position))
        self.passthrough(node, b, x, y)


class TileRule(OpRule):
    family = "tile"
    op_types = op_set("Tile")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        repeats = const(optional(node, 1))
        b.touch(optional(node, 1))
        x = node.inputs[0]
        if not b.is_channel_tensor(x):
            b.touch(x)
            return
        channel = b.axis(x)
        if (
            repeats is None
            or repeats.size <= channel
            or int(repeats[0]) != 1
            or int(repeats[channel]) != 1
        ):
            b.block_node(node, f"{describe(node)} repeats the batch or channel axis")
            return
        self.passthrough(node, b, x, node.outputs[0])
