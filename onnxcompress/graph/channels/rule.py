"""The rule type: everything the project knows about the channels of one op family.

An :class:`OpRule` says how channels flow through its ops (``analyze``), how to rewrite the
layout constants that spell a channel count after a cut (``fix``), how a compensation bias folds
into it as a consumer (``fold_bias``) and which axis holds the channels of the tensors it
touches (``channel_axis``). Shared helpers for reading constants and writing them back live here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar, Generic, TypeVar

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.channels.groups import (
    CHANNEL_AXIS,
    ChannelAnalysis,
    LayoutFixup,
    WeightSlice,
    describe,
)
from onnxcompress.graph.edits import fresh_name, private_initializer, set_initializer
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

if TYPE_CHECKING:
    from onnxcompress.graph.channels.analysis import Builder

FixupT = TypeVar("FixupT", bound=LayoutFixup)


def default_opset(model: ir.Model) -> int:
    """The model's opset of the standard ops (17 when it imports none)."""
    imports = model.opset_imports
    for domain in DEFAULT_DOMAINS:
        if domain in imports:
            return int(imports[domain])
    return 17


def op_set(*names: str) -> frozenset[str]:
    """Op types from space-separated lists (keeps long op lists compact)."""
    return frozenset(op for chunk in names for op in chunk.split())


class OpRule(Generic[FixupT]):
    """One op family's channel knowledge; subclasses fill in what their ops need.

    Attributes:
        family: a short name for reports and registry listings.
        op_types: the ops of the family.
        domains: the op domains it covers.
        channel_axis: the axis that holds the channels of every tensor the ops read and write
            (ONNX fixes axis 1 for Conv, pooling, BatchNormalization, Gemm...), or None when the
            rule follows its inputs' channel axis (elementwise and layout ops) and places its
            outputs itself. The analysis freezes a fixed-axis op whose input carries its
            channels elsewhere.
        linear_ops: ops that apply one linear map to every channel, so a linear relation
            between channels (channel r = sum_k lambda_k channel k) survives them.
        homogeneous_ops: further ops that are positively homogeneous (f(a x) = a f(x), a > 0)
            and the same for every channel, so a scale relation survives them.
        cuts_any_axis: surgery on the family's ops is right whichever axis holds the
            channels (no layout constants, per-channel constants sliced on the axis the rule
            computed), so channels moved off axis 1 (channels-last regions) may be cut
            through them. Families that rewrite layout constants assume axis 1 and freeze a
            moved channel axis until they are taught otherwise.
    """

    family: ClassVar[str] = ""
    op_types: ClassVar[frozenset[str]] = frozenset()
    domains: ClassVar[tuple[str, ...]] = DEFAULT_DOMAINS
    channel_axis: ClassVar[int | None] = CHANNEL_AXIS
    linear_ops: ClassVar[frozenset[str]] = frozenset()
    homogeneous_ops: ClassVar[frozenset[str]] = frozenset()
    cuts_any_axis: ClassVar[bool] = False

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.family})"

    def analyze(self, node: ir.Node, b: Builder) -> None:
        """Couple the channel slots of ``node``'s inputs and outputs, record weights and fixups.

        A rule that cannot prove what the node does to channels blocks them (``b.block_node``)
        with a reason naming the node.
        """
        raise NotImplementedError

    def accepts_axes(self, node: ir.Node, b: Builder) -> bool:
        """Whether ``node``'s inputs hold their channels where the family reads them.

        By default an input whose channels lie off ``channel_axis`` freezes every channel
        tensor around the node, and the rule does not run.
        """
        wanted = self.channel_axis
        if wanted is None:
            return True
        for value in node.inputs:
            if value is None or not b.is_channel_tensor(value) or b.axis(value) == wanted:
                continue
            b.block_node(
                node,
                f"{describe(node)} works on channel axis {wanted}, but {value.name!r} holds its "
                f"channels on axis {b.axis(value)}",
            )
            return False
        return True

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: FixupT) -> None:
        """Rewrite the constant ``fixup`` describes for the channels alive in ``analysis``."""
        raise NotImplementedError(f"{self.family} ops have no layout constants to rewrite")

    def fold_bias(
        self, model: ir.Model, analysis: ChannelAnalysis, ws: WeightSlice, contribution: np.ndarray
    ) -> None:
        """Add ``contribution`` (one value per output of the consumer ``ws.node``) to its bias."""
        raise ValueError(f"cannot fold a bias into {ws.node.op_type} {ws.node.name}")

    def write_weight(
        self, graph: ir.Graph, analysis: ChannelAnalysis, ws: WeightSlice, array: np.ndarray
    ) -> None:
        """Give the weight ``ws`` slices new contents (a compensation folded into a consumer)."""
        ws.write(graph, array)

    # -- weights decoded from stored constants (DequantizeLinear of int8 values) ----------------

    def stores(self, node: ir.Node) -> bool:
        """Whether ``node`` decodes a weight from stored constants, for its reader to cut.

        Such a rule also implements :meth:`check_stored`, :meth:`decode`, :meth:`stored_value`,
        :meth:`cut_stored` and :meth:`encode`; the analysis treats the decoded value as a
        constant and records it on the reader's :class:`WeightSlice` (``storage``).
        """
        return False

    def check_stored(self, node: ir.Node) -> None:
        """Raise :class:`Unsupported` (with the reason) when the stored weight cannot be cut."""

    def decode(self, node: ir.Node) -> np.ndarray:
        """The float weight ``node`` computes from its stored constants."""
        raise NotImplementedError(f"{self.family} ops store no weights")

    def stored_value(self, node: ir.Node) -> ir.Value:
        """The initializer holding the stored values (the decoded weight's shape)."""
        raise NotImplementedError(f"{self.family} ops store no weights")

    def cut_stored(self, graph: ir.Graph, node: ir.Node, axis: int, positions: np.ndarray) -> None:
        """Delete ``positions`` along ``axis`` of the decoded weight from the stored tensors."""
        raise NotImplementedError(f"{self.family} ops store no weights")

    def encode(
        self,
        graph: ir.Graph,
        node: ir.Node,
        array: np.ndarray,
        scale_factor: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Store ``array`` as the new decoded weight (scales first multiplied by
        ``scale_factor``); returns how much each scale grew, or None."""
        raise NotImplementedError(f"{self.family} ops store no weights")

    def uniformity(self, op_type: str) -> tuple[bool, bool]:
        """Whether ``op_type`` is (linear, positively homogeneous) and the same on every channel."""
        linear = op_type in self.linear_ops
        return linear, linear or op_type in self.homogeneous_ops

    def passthrough(
        self,
        node: ir.Node,
        b: Builder,
        x: ir.Value | None,
        y: ir.Value | None,
        *,
        axis: int | None = None,
    ) -> None:
        """Join channel k of ``x`` with channel k of ``y`` and record the step on the path.

        ``y`` holds its channels on ``axis`` (default: the axis of ``x``'s).
        """
        if x is not None:
            b.place(y, b.axis(x) if axis is None else axis)
        if b.identity(node, x, y) and y is not None and x is not None:
            linear, homogeneous = self.uniformity(node.op_type)
            b.path(node, (x, y), linear=linear, homogeneous=homogeneous)


class Unsupported(Exception):
    """Raised by a rule for a node it cannot analyze; the driver freezes the node's channels."""


# ---------------------------------------------------------------------------------------------
# Reading a node
# ---------------------------------------------------------------------------------------------


def const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def rank(value: ir.Value | None) -> int | None:
    if value is None:
        return None
    if value.const_value is not None:
        return len(value.const_value.shape)
    if value.shape is None:
        return None
    return len(value.shape)


def static_dim(value: ir.Value, axis: int) -> int | None:
    shape = value.const_value.shape if value.const_value is not None else value.shape
    if shape is None or axis >= len(shape):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def spatial(value: ir.Value | None) -> int | None:
    """Product of the dims after the channel axis of an NCHW tensor, or None if not static."""
    if value is None or value.shape is None or len(value.shape) < 2:
        return None
    dims = value.shape.dims[CHANNEL_AXIS + 1 :]
    static = [d for d in dims if isinstance(d, int)]
    return math.prod(static) if len(static) == len(dims) else None


def required(node: ir.Node, index: int) -> ir.Value:
    """A required input (absent only in malformed graphs, which are frozen)."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        raise Unsupported(f"{describe(node)} lacks input {index}")
    return value


def optional(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def attr_ints(node: ir.Node, name: str) -> list[int] | None:
    """An ints attribute as a list (comparable with list literals), or None when absent."""
    values = node.attributes.get_ints(name)
    return list(values) if values is not None else None


def axes_operand(node: ir.Node, index: int, attr: str) -> tuple[bool, list[int] | None]:
    """Axes given as an input (newer opsets) or an attribute; (known, axes or None if absent)."""
    value = optional(node, index)
    if value is not None:
        array = const(value)
        if array is None:
            return False, None
        return True, [int(a) for a in array.reshape(-1)]
    return True, attr_ints(node, attr)


def check_side_inputs(node: ir.Node, b: Builder, first: int = 1) -> bool:
    """Side inputs (Clip bounds, Dropout ratio...) must be constants or scalars."""
    for value in node.inputs[first:]:
        if b.is_channel_tensor(value):
            b.block_node(node, f"{describe(node)} takes a computed tensor as a side input")
            return False
        b.touch(value)
    return True


def block_extra_outputs(node: ir.Node, b: Builder, reason: str) -> None:
    for value in node.outputs[1:]:
        if value.uses() or value.is_graph_output():
            b.block_node(node, reason)
            return


# ---------------------------------------------------------------------------------------------
# Writing a node's constants (for fixups)
# ---------------------------------------------------------------------------------------------


def write_ints(graph: ir.Graph, node: ir.Node, index: int, values: Sequence[int]) -> None:
    """Give constant input ``index`` of ``node`` new integer contents (same dtype)."""
    value = private_initializer(graph, node, index)
    dtype = value.const_value.numpy().dtype  # type: ignore[union-attr]
    set_initializer(graph, value, np.asarray(values, dtype=dtype))


def set_entry(graph: ir.Graph, node: ir.Node, index: int, position: int, number: int) -> None:
    """Set one entry of constant input ``index`` of ``node`` (copied first if shared)."""
    value = private_initializer(graph, node, index)
    array = value.const_value.numpy().copy()  # type: ignore[union-attr]
    array.reshape(-1)[position] = number
    set_initializer(graph, value, array)


def new_int_input(graph: ir.Graph, node: ir.Node, index: int, values: Sequence[int]) -> None:
    """Give ``node`` a new int64 initializer as input ``index``."""
    name = fresh_name(graph, f"{node.name or node.op_type}_{index}")
    array = np.asarray(values, dtype=np.int64)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.INT64)
    graph.register_initializer(value)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def set_int_entry(node: ir.Node, name: str, entry: int, number: int) -> None:
    """Set one entry of an ints attribute."""
    values = list(node.attributes[name].as_ints())
    values[entry] = number
    node.attributes[name] = ir.AttrInt64s(name, values)


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelCountFixup(LayoutFixup):
    """A constant entry that spells the channel count of ``tensor`` (a Reshape target...).

    ``address`` is (node, input index, flat position) of the entry.
    """

    kind: ClassVar[str] = "shape_entry"

    tensor: ir.Value
    address: tuple[ir.Node, int, int]


class WritesChannelCount(OpRule[ChannelCountFixup]):
    """Base of the families whose constants may spell a channel count (Reshape, Resize...)."""

    def fix(self, graph: ir.Graph, analysis: ChannelAnalysis, fixup: ChannelCountFixup) -> None:
        node, index, position = fixup.address
        set_entry(graph, node, index, position, analysis.channel_count(fixup.tensor))

    def count_fixup(
        self, b: Builder, node: ir.Node, tensor: ir.Value, address: tuple[ir.Node, int, int]
    ) -> None:
        b.add_fixup(ChannelCountFixup(self, node, (tensor,), tensor, address))
