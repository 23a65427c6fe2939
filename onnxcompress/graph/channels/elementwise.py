"""Rules for ops that keep channels apart: activations, broadcasting arithmetic, normalizations,
pooling and reductions over other axes (and the rule for ops nobody knows).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxcompress.graph.channels.groups import CHANNEL_AXIS, describe
from onnxcompress.graph.channels.rule import (
    OpRule,
    axes_operand,
    block_extra_outputs,
    check_side_inputs,
    const,
    op_set,
    optional,
    rank,
    required,
    static_dim,
)

if TYPE_CHECKING:
    from onnxcompress.graph.channels.analysis import Builder


class UnknownOpRule(OpRule):
    """Any op without a rule (or outside the default domains): freezes what it touches."""

    family = "unknown"
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        for value in node.inputs:
            if b.is_channel_tensor(value):
                b.block_value(
                    value, f"consumed by an op with unknown channel semantics: {describe(node)}"
                )
        for value in node.outputs:
            if b.is_channel_tensor(value):
                b.block_value(
                    value,
                    f"produced by an op with unknown channel semantics: {describe(node)}",
                    explain=True,
                )


class _UnaryRule(OpRule):
    """Channel k in, channel k out (side inputs must be constants)."""

    def analyze(self, node: ir.Node, b: Builder) -> None:
        if not check_side_inputs(node, b):
            return
        self.passthrough(node, b, node.inputs[0], node.outputs[0])
        # MaxPool's Indices and Dropout's mask: flat indices encode channel positions.
        block_extra_outputs(node, b, f"the second output of {describe(node)} is used")


class ElementwiseRule(_UnaryRule):
    """Unary elementwise ops, on whatever axis holds the channels."""

    family = "elementwise"
    op_types = op_set(
        "Relu LeakyRelu Elu Selu Celu Sigmoid HardSigmoid HardSwish Tanh Softplus Softsign Mish "
        "Gelu Clip Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Erf ThresholdedRelu "
        "Shrink Identity Cast Not IsNaN IsInf Sin Cos Dropout"
    )
    channel_axis = None
    cuts_any_axis = True
    linear_ops = op_set("Identity Dropout Cast")
    homogeneous_ops = op_set("Relu LeakyRelu")


class PoolingRule(_UnaryRule):
    """Pooling: per channel over the spatial axes after axis 1 (NCHW only)."""

    family = "pooling"
    op_types = op_set("AveragePool MaxPool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool")
    linear_ops = op_set("AveragePool GlobalAveragePool")
    homogeneous_ops = op_set("MaxPool GlobalMaxPool")


_BROADCAST_LINEAR = op_set("Add Sub Sum")


class BroadcastRule(OpRule):
    """Elementwise ops with numpy broadcasting; operands are right-aligned to the output."""

    family = "broadcast"
    op_types = op_set(
        "Add Sub Mul Div Pow Max Min Sum Mean PRelu Where Equal Less Greater LessOrEqual "
        "GreaterOrEqual And Or Xor Mod"
    )
    channel_axis = None
    cuts_any_axis = True

    def analyze(self, node: ir.Node, b: Builder) -> None:
        analyze_broadcast(node, b)


def _operand_axis(node: ir.Node, b: Builder, out_rank: int) -> int | None:
    """The channel axis shared by the full-rank computed operands (None: they disagree)."""
    axes = {
        b.axis(v)
        for v in node.inputs
        if v is not None and v.const_value is None and rank(v) == out_rank
    }
    if len(axes) > 1:
        return None
    return axes.pop() if axes else CHANNEL_AXIS


def analyze_broadcast(node: ir.Node, b: Builder) -> None:
    """The broadcast rule (also used by MatMul for computed-by-computed products)."""
    y = node.outputs[0]
    ranks = [rank(v) for v in node.inputs if v is not None]
    out_rank = rank(y)
    if out_rank is None and ranks and all(r is not None for r in ranks):
        out_rank = max(r for r in ranks if r is not None)
    if out_rank is None or out_rank < 2:
        for value in node.inputs:
            if b.is_channel_tensor(value):
                b.block_node(node, f"{describe(node)} has operands of unknown rank")
                return
            b.touch(value)
        return
    out_axis = _operand_axis(node, b, out_rank)
    if out_axis is None:
        b.block_node(
            node, f"{describe(node)} combines operands whose channels lie on different axes"
        )
        return
    b.place(y, out_axis)
    cy = b.channels(y)
    if cy is None:
        cy = next(
            (b.channels(v) for v in node.inputs if rank(v) == out_rank and b.channels(v) != 1),
            None,
        )
    ys = b.slots(y, declare=cy)
    if ys is None:
        b.block_node(node, f"the channel count of {describe(node)}'s output is unknown")
        return
    joined: list[ir.Value] = []
    per_channel_const = False
    for index, value in enumerate(node.inputs):
        if value is None:
            continue
        value_rank = rank(value)
        if value_rank is None:
            b.block_node(node, f"{describe(node)} has an operand of unknown rank")
            return
        axis = out_axis - (out_rank - value_rank)
        if axis < 0:
            b.touch(value)
            continue
        if value.const_value is not None:
            width = static_dim(value, axis)
            if width == ys.size and width != 1:
                b.weight(node, index, axis, y, "param")
                per_channel_const = True
            elif width != 1:
                b.block_node(node, f"{describe(node)} broadcasts a constant of the wrong width")
                return
            continue
        if axis != out_axis:
            # A lower-rank computed operand puts one of its own non-channel axes on ours.
            b.block_node(node, f"{describe(node)} broadcasts a lower-rank tensor onto channels")
            return
        dim = b.channels(value)
        if dim == 1 and ys.size != 1:
            b.touch(value)  # e.g. a spatial attention map shared by all channels
            continue
        xs = b.slots(value, declare=ys.size)
        if xs is None or xs.size != ys.size:
            b.block_node(node, f"{describe(node)} mixes operands with different channel counts")
            return
        b.join(xs, ys)
        joined.append(value)
    if not joined:
        return  # output computed from constants and broadcasts only: left unexplained
    b.explain(ys)
    computed = [v for v in node.inputs if v is not None and v.const_value is None]
    op = node.op_type
    has_const = any(v is not None and v.const_value is not None for v in node.inputs)
    linear = (op in _BROADCAST_LINEAR and len(joined) == len(computed) and not has_const) or (
        op in ("Mul", "Div")
        and len(computed) == 1
        and len(joined) == 1
        and not per_channel_const
        and (op == "Mul" or node.inputs[0] is joined[0])
    )
    homogeneous = linear or (op in ("Max", "Min") and len(joined) == len(computed) == 2)
    b.path(node, [*joined, y], linear=linear, homogeneous=homogeneous)


class BatchNormRule(OpRule):
    family = "batchnorm"
    op_types = op_set("BatchNormalization")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        params = node.inputs[1:5]
        if (
            any(const(v) is None for v in params)
            or node.attributes.get_int("training_mode", 0) != 0
        ):
            b.block_node(node, f"{describe(node)} has computed parameters or runs in training mode")
            return
        block_extra_outputs(node, b, f"the running statistics of {describe(node)} are used")
        if b.identity(node, x, y) and x is not None:
            for index in range(1, 5):
                b.weight(node, index, 0, y, "param")
            b.path(node, (x, y), linear=False, homogeneous=False)


class InstanceNormRule(OpRule):
    family = "instancenorm"
    op_types = op_set("InstanceNormalization")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        if const(optional(node, 1)) is None or const(optional(node, 2)) is None:
            b.block_node(node, f"{describe(node)} has computed parameters")
            return
        if b.identity(node, x, y) and x is not None:
            b.weight(node, 1, 0, y, "param")
            b.weight(node, 2, 0, y, "param")
            b.path(node, (x, y), linear=False, homogeneous=False)


class LayerNormRule(OpRule):
    """LayerNormalization over trailing axes that leave the channel axis alone."""

    family = "layernorm"
    op_types = op_set("LayerNormalization")
    channel_axis = None
    cuts_any_axis = True

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x = required(node, 0)
        x_rank = rank(x)
        channel = b.axis(x)
        # It normalizes over every axis from ``axis`` on.
        if x_rank is None or node.attributes.get_int("axis", -1) % x_rank <= channel:
            b.block_node(node, f"{describe(node)} normalizes over the channel axis")
            return
        if not check_side_inputs(node, b):
            return
        block_extra_outputs(node, b, f"the statistics outputs of {describe(node)} are used")
        y = node.outputs[0]
        b.place(y, channel)
        if b.identity(node, x, y) and x is not None:
            b.path(node, (x, y), linear=False, homogeneous=False)


class CrossChannelRule(OpRule):
    family = "cross-channel"
    op_types = op_set("LRN GroupNormalization MeanVarianceNormalization")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        b.block_node(node, f"{describe(node)} normalizes across channels")


class SoftmaxRule(OpRule):
    family = "softmax"
    op_types = op_set("Softmax LogSoftmax Hardmax")
    channel_axis = None
    cuts_any_axis = True

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x = required(node, 0)
        x_rank = rank(x)
        if x_rank is None:
            b.block_node(node, f"{describe(node)} has an input of unknown rank")
            return
        channel = b.axis(x)
        axis = node.attributes.get_int("axis", -1 if b.opset >= 13 else 1) % x_rank
        # Before opset 13 the op flattens every axis from ``axis`` on into one.
        covers_channels = axis == channel or (b.opset < 13 and axis <= channel)
        if covers_channels or axis == 0:
            b.block_node(node, f"{describe(node)} normalizes over the channel axis")
            return
        self.passthrough(node, b, x, node.outputs[0])


class ReduceRule(OpRule):
    family = "reduce"
    op_types = op_set(
        "ReduceMean ReduceMax ReduceMin ReduceSum ReduceProd ReduceL1 ReduceL2 ReduceLogSum "
        "ReduceLogSumExp ReduceSumSquare"
    )
    channel_axis = None
    cuts_any_axis = True
    linear_ops = op_set("ReduceMean ReduceSum")
    homogeneous_ops = op_set("ReduceMax ReduceMin")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x = required(node, 0)
        x_rank = rank(x)
        known, axes = axes_operand(node, 1, "axes")
        if x_rank is None or not known:
            b.block_node(node, f"{describe(node)} reduces over axes that are not constant")
            return
        channel = b.axis(x)
        if not axes:
            if node.attributes.get_int("noop_with_empty_axes", 0):
                b.touch(optional(node, 1))
                self.passthrough(node, b, x, node.outputs[0])
                return
            b.block_node(node, f"{describe(node)} reduces over every axis, channels included")
            return
        normalized = {a % x_rank for a in axes}
        if normalized & {0, channel}:
            b.block_node(node, f"{describe(node)} reduces over the channel (or batch) axis")
            return
        b.touch(optional(node, 1))
        out_axis = channel
        if not node.attributes.get_int("keepdims", 1):
            out_axis -= sum(a < channel for a in normalized)
        self.passthrough(node, b, x, node.outputs[0], axis=out_axis)


class ArgReduceRule(OpRule):
    family = "argreduce"
    op_types = op_set("ArgMax ArgMin")
    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        x_rank = rank(x)
        channel = b.axis(x)
        axis = node.attributes.get_int("axis", 0) % x_rank if x_rank is not None else None
        if axis is None or axis in (0, channel):
            b.block_node(node, f"{describe(node)} reduces over the channel (or batch) axis")
            return
        dropped = not node.attributes.get_int("keepdims", 1) and axis < channel
        b.place(y, channel - 1 if dropped else channel)
        b.identity(node, x, y)
