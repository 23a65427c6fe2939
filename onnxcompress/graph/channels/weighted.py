"""Rules for weighted layers: Conv, ConvTranspose, Gemm and MatMul end one channel coupling
(consuming their input channels) and start another (producing their output channels).

They are also the consumers a compensation folds into, so each knows how to take a bias.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.channels.elementwise import analyze_broadcast
from onnxcompress.graph.channels.groups import (
    CHANNEL_AXIS,
    ChannelAnalysis,
    LayoutFixup,
    WeightSlice,
    describe,
)
from onnxcompress.graph.channels.rule import (
    FixupT,
    OpRule,
    const,
    op_set,
    optional,
    rank,
    required,
    spatial,
)
from onnxcompress.graph.edits import fresh_name, private_initializer, set_initializer

if TYPE_CHECKING:
    from onnxcompress.graph.channels.analysis import Builder


class _WeightedRule(OpRule[FixupT]):
    """A layer that ends the coupling of its input channels."""

    def accepts_axes(self, node: ir.Node, b: Builder) -> bool:
        # The layer reads axis 1. An input whose channels lie elsewhere keeps them frozen, but
        # the layer's outputs are its own channels whatever it reads.
        for value in node.inputs:
            if value is not None and self.moved(b, value):
                b.block_value(
                    value,
                    f"{describe(node)} reads axis {CHANNEL_AXIS} of {value.name!r}, whose "
                    f"channels lie on axis {b.axis(value)}",
                )
        return True

    @staticmethod
    def moved(b: Builder, value: ir.Value | None) -> bool:
        return b.is_channel_tensor(value) and b.axis(value) != CHANNEL_AXIS

    def write_weight(
        self, graph: ir.Graph, analysis: ChannelAnalysis, ws: WeightSlice, array: np.ndarray
    ) -> None:
        """Write the weight; where a quantized weight's scales grew, its int32 bias follows.

        ONNX Runtime stores a QDQ layer's bias at scale ``input_scale * weight_scale`` per
        output, and its fused kernels (QLinearConv, QGemm) add the integers without rescaling:
        a bias left at the old scale would still decode right but run wrong once fused.
        """
        growth = ws.write(graph, array)
        bias = analysis.slice_of(ws.node, 2)
        if growth is None or bias is None or bias.decoder is None or bias.storage is None:
            return
        outputs = ws.out_axis if ws.out_axis is not None else ws.axis
        if any(size != 1 for axis, size in enumerate(growth.shape) if axis != outputs):
            return  # scales along the inputs: the bias has no such scale to follow
        factor = growth.reshape(-1)
        bias_scale = const(bias.decoder.inputs[1])
        if bias_scale is not None and factor.size in (1, bias_scale.size):
            bias.storage.encode(graph, bias.decoder, bias.array(), scale_factor=factor)

    def fold_bias(
        self, model: ir.Model, analysis: ChannelAnalysis, ws: WeightSlice, contribution: np.ndarray
    ) -> None:
        """Add to input 2, the per-output-channel bias (created when absent)."""
        node = ws.node
        dtype = ws.array().dtype
        add_bias_input(model.graph, analysis, node, 2, contribution, dtype, node.outputs[0])


@dataclasses.dataclass(frozen=True, eq=False)
class ConvGroupFixup(LayoutFixup):
    """A grouped Conv's ``group`` attribute: one group per ``per_group`` input channels."""

    kind: ClassVar[str] = "conv_group"

    input: ir.Value
    per_group: int


class ConvRule(_WeightedRule[ConvGroupFixup]):
    family = "conv"
    op_types = op_set("Conv")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, w_value, y = required(node, 0), required(node, 1), node.outputs[0]
        bias_value = optional(node, 2)
        weight = b.constant(w_value)
        if weight is None or (bias_value is not None and b.constant(bias_value) is None):
            b.block_node(node, f"{describe(node)} has a computed weight or bias")
            return
        group = node.attributes.get_int("group", 1)
        cout, per_group = int(weight.shape[0]), int(weight.shape[1])
        steps = spatial(y) or 1
        moved = self.moved(b, x)
        if group == 1:
            xs = None if moved else b.slots(x, declare=per_group)
            ys = b.slots(y, declare=cout)
            if (
                ys is None
                or ys.size != cout
                or (not moved and (xs is None or xs.size != per_group))
            ):
                b.block_node(node, f"the channel counts around {describe(node)} are unknown")
                return
            if not moved:
                b.weight(node, 1, 1, x, "consumer", out_axis=0, macs_factor=steps)
            b.weight(node, 1, 0, y, "producer", macs_factor=steps)
            if bias_value is not None:
                b.weight(node, 2, 0, y, "producer", is_bias=True)
            b.explain(ys)
            return
        if moved:
            b.block_node(node, f"grouped {describe(node)} reads its input off the channel axis")
            return
        cin = b.channels(x)
        if cin == group * per_group and cout % group == 0:
            # Grouped (depthwise when per_group == 1): input channels g*ci .. g*ci+ci-1 feed
            # only outputs g*co .. g*co+co-1, so one conv group is one removable unit. Removing
            # whole groups keeps every group's width, which ONNX requires; ``group`` shrinks.
            per_out = cout // group
            xs = b.slots(x)
            ys = b.slots(y, declare=cout)
            if xs is None or ys is None or ys.size != cout:
                b.block_node(node, f"the channel counts around {describe(node)} are unknown")
                return
            leaders = xs.reshape(group, per_group)[:, :1]
            b.join(np.repeat(leaders, per_out, axis=1).ravel(), ys)
            b.join(
                np.repeat(leaders, per_group - 1, axis=1).ravel(),
                xs.reshape(group, -1)[:, 1:].ravel(),
            )
            b.explain(ys)
            b.weight(node, 1, 0, y, "param", macs_factor=steps)
            if bias_value is not None:
                b.weight(node, 2, 0, y, "param", is_bias=True)
            b.add_fixup(ConvGroupFixup(self, node, (x, y), x, per_group))
            b.path(node, (x, y), linear=False, homogeneous=False)
            return
        b.block_node(
            node,
            f"grouped Conv {node.name or '<unnamed>'} (group={group}) has channel counts that do "
            "not divide into its groups",
        )

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: ConvGroupFixup) -> None:
        count = analysis.channel_count(fixup.input) // fixup.per_group
        fixup.node.attributes["group"] = ir.AttrInt64("group", count)


class ConvTransposeRule(_WeightedRule[LayoutFixup]):
    family = "convtranspose"
    op_types = op_set("ConvTranspose")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, w_value, y = required(node, 0), required(node, 1), node.outputs[0]
        bias_value = optional(node, 2)
        weight = b.constant(w_value)
        if weight is None or (bias_value is not None and b.constant(bias_value) is None):
            b.block_node(node, f"{describe(node)} has a computed weight or bias")
            return
        if node.attributes.get_int("group", 1) != 1:
            b.block_node(node, f"grouped {describe(node)} couples channels group-wise")
            return
        cin, cout = int(weight.shape[0]), int(weight.shape[1])
        moved = self.moved(b, x)
        xs = None if moved else b.slots(x, declare=cin)
        ys = b.slots(y, declare=cout)
        if ys is None or ys.size != cout or (not moved and (xs is None or xs.size != cin)):
            b.block_node(node, f"the channel counts around {describe(node)} are unknown")
            return
        steps = spatial(x) or 1  # every input pixel meets every kernel element once
        if not moved:
            b.weight(node, 1, 0, x, "consumer", out_axis=1, macs_factor=steps)
        b.weight(node, 1, 1, y, "producer", macs_factor=steps)
        if bias_value is not None:
            b.weight(node, 2, 0, y, "producer", is_bias=True)
        b.explain(ys)


class GemmRule(_WeightedRule[LayoutFixup]):
    family = "gemm"
    op_types = op_set("Gemm")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        a, b_value, y = required(node, 0), required(node, 1), node.outputs[0]
        c_value = optional(node, 2)
        weight = b.constant(b_value)
        if weight is None or weight.ndim != 2 or node.attributes.get_int("transA", 0) != 0:
            b.block_node(node, f"{describe(node)} has a computed weight or a transposed input")
            return
        trans_b = node.attributes.get_int("transB", 0)
        k, n = (weight.shape[1], weight.shape[0]) if trans_b else weight.shape
        bias = b.constant(c_value)
        if c_value is not None and bias is None:
            b.block_node(node, f"{describe(node)} adds a computed tensor")
            return
        moved = self.moved(b, a)
        xs = None if moved else b.slots(a, declare=int(k))
        ys = b.slots(y, declare=int(n))
        if ys is None or ys.size != n or (not moved and (xs is None or xs.size != k)):
            b.block_node(node, f"the feature counts around {describe(node)} are unknown")
            return
        if not moved:
            b.weight(
                node,
                1,
                1 if trans_b else 0,
                a,
                "consumer",
                out_axis=0 if trans_b else 1,
                macs_factor=1,
            )
        b.weight(node, 1, 0 if trans_b else 1, y, "producer", macs_factor=1)
        if bias is not None and bias.ndim >= 1 and bias.shape[-1] == n and n != 1:
            b.weight(node, 2, bias.ndim - 1, y, "producer", is_bias=True)
        b.touch(c_value)
        b.explain(ys)

    def fold_bias(
        self, model: ir.Model, analysis: ChannelAnalysis, ws: WeightSlice, contribution: np.ndarray
    ) -> None:
        graph, node = model.graph, ws.node
        dtype = ws.array().dtype
        alpha = node.attributes.get_float("alpha", 1.0)
        beta = node.attributes.get_float("beta", 1.0)
        if beta == 0.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                # C was ignored; zero it rather than drop it so its slices stay valid.
                current = private_initializer(graph, node, 2)
                zeros = np.zeros_like(current.const_value.numpy())  # type: ignore[union-attr]
                set_initializer(graph, current, zeros)
            beta = 1.0
        add_bias_input(
            graph, analysis, node, 2, contribution * alpha / beta, dtype, node.outputs[0]
        )


class MatMulRule(OpRule):
    family = "matmul"
    op_types = op_set("MatMul")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        a, b_value, y = required(node, 0), required(node, 1), node.outputs[0]
        weight = b.constant(b_value)
        a_rank = rank(a)
        if weight is not None and weight.ndim == 2 and a_rank == 2:
            k, n = weight.shape
            xs = b.slots(a, declare=int(k))
            ys = b.slots(y, declare=int(n))
            if xs is None or ys is None or xs.size != k or ys.size != n:
                b.block_node(node, f"the feature counts around {describe(node)} are unknown")
                return
            b.weight(node, 1, 0, a, "consumer", out_axis=1, macs_factor=1)
            b.weight(node, 1, 1, y, "producer", macs_factor=1)
            b.explain(ys)
            return
        if weight is not None and weight.ndim <= 2 and a_rank is not None and a_rank >= 3:
            # Axis 1 is a batch axis of the matrix product: the same matrix for every channel.
            self.passthrough(node, b, a, y)
            return
        if weight is None and a_rank is not None and a_rank >= 3 and rank(b_value) == a_rank:
            analyze_broadcast(node, b)
            return
        b.block_node(node, f"{describe(node)} multiplies computed tensors over the channel axis")

    def fold_bias(
        self, model: ir.Model, analysis: ChannelAnalysis, ws: WeightSlice, contribution: np.ndarray
    ) -> None:
        """A MatMul takes its bias through the ``Add`` that follows it, or a new one."""
        graph, node = model.graph, ws.node
        dtype = ws.array().dtype
        output = node.outputs[0]
        uses = list(output.uses())
        if len(uses) == 1 and not output.is_graph_output() and uses[0].node.op_type == "Add":
            add = uses[0].node
            other = 1 - uses[0].idx
            constant = add.inputs[other]
            if constant is not None and constant.const_value is not None:
                shape = constant.const_value.shape
                if len(shape) <= 2 and (len(shape) == 0 or shape[0] == 1 or len(shape) == 1):
                    add_bias_input(graph, analysis, add, other, contribution, dtype, add.outputs[0])
                    return
        # No bias to extend: insert ``Add(output, bias)`` and move the MatMul's readers onto it.
        readers = [(use.node, use.idx) for use in uses]
        name = fresh_name(graph, f"{node.name or 'MatMul'}.bias")
        array = contribution.astype(dtype)
        bias = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        bias.shape = ir.Shape(array.shape)
        bias.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        graph.register_initializer(bias)
        add = ir.Node(
            "", "Add", [output, bias], name=fresh_name(graph, f"{node.name or 'MatMul'}_bias")
        )
        biased = add.outputs[0]
        biased.name = fresh_name(graph, f"{output.name}_biased")
        biased.shape = output.shape
        biased.type = output.type
        graph.insert_after(node, add)
        for reader, index in readers:
            reader.replace_input_with(index, biased)
        analysis.alias_tensor(biased, like=output)
        _register_bias(analysis, add, 1, 0, biased)


def add_bias_input(
    graph: ir.Graph,
    analysis: ChannelAnalysis,
    node: ir.Node,
    index: int,
    contribution: np.ndarray,
    dtype: np.dtype,
    output: ir.Value,
) -> None:
    """Add ``contribution`` (one value per output channel) to a bias input, creating it."""
    existing = node.inputs[index] if len(node.inputs) > index else None
    stored = analysis.slice_of(node, index) if existing is not None else None
    if stored is not None and stored.decoder is not None:
        current = stored.array()
        if current.shape != (contribution.size,):
            raise ValueError(
                f"cannot fold a compensation into the quantized bias of {describe(node)}, of "
                f"shape {list(current.shape)}"
            )
        stored.write(graph, current + contribution)
        return
    if existing is not None:
        value = private_initializer(graph, node, index)
        array = value.const_value.numpy()  # type: ignore[union-attr]
        if array.ndim == 0 or array.shape[-1] != contribution.size:
            # A broadcast bias becomes per-channel, and now has a channel axis to slice.
            array = np.broadcast_to(array, (*array.shape[:-1], contribution.size)).copy()
            _register_bias(analysis, node, index, array.ndim - 1, output)
        set_initializer(graph, value, (array + contribution).astype(dtype))
        return
    name = fresh_name(graph, f"{node.name or node.op_type}.bias")
    array = contribution.astype(dtype)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    _register_bias(analysis, node, index, 0, output)


def _register_bias(
    analysis: ChannelAnalysis, node: ir.Node, index: int, axis: int, output: ir.Value
) -> None:
    if analysis.is_tracked(output):
        analysis.add_slice(WeightSlice(node, index, axis, output, "producer", is_bias=True))
