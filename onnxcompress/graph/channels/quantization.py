"""Rules for QuantizeLinear and DequantizeLinear: QDQ activations pass channels through, and a
DequantizeLinear of stored integers is a weight its reader (Conv, Gemm...) can cut.

ONNX Runtime's static quantization (QDQ format) writes each weight as an int8 initializer
decoded by ``DequantizeLinear(w_q, scale, zero_point, axis=0)`` (one scale per output channel)
and each bias as int32 at scale ``input_scale * weight_scale``; activations go through a
per-tensor ``QuantizeLinear -> DequantizeLinear`` pair. Cutting a channel slices the integers
along the cut axis, and the scale and zero point too when that is their axis.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.channels.groups import describe
from onnxcompress.graph.channels.rule import (
    OpRule,
    Unsupported,
    const,
    op_set,
    optional,
    rank,
    required,
    static_dim,
)
from onnxcompress.graph.edits import private_initializer, set_initializer

if TYPE_CHECKING:
    from onnxcompress.graph.channels.analysis import Builder

# The stored types a weight may be cut and re-encoded in: numpy holds them as they are (4-bit
# and float8 values would need unpacking and their own rounding rules).
_STORED_TYPES = frozenset(
    {ir.DataType.INT8, ir.DataType.UINT8, ir.DataType.INT16, ir.DataType.UINT16, ir.DataType.INT32}
)


class _QuantizationRule(OpRule):
    """A (de)quantization of activations: channel k in, channel k out.

    Neither op is linear: QuantizeLinear rounds and saturates (ONNX Runtime writes a Relu into
    the saturation of an unsigned zero point and drops the Relu). With one scale for the tensor
    both count as positively homogeneous, as that Relu is: ``q(a x) = a q(x)`` for ``a > 0`` up
    to rounding and to saturation beyond the calibrated range, which calibration sets at the
    largest values seen, so the scale relations between channels that ``merge`` and ``lrf`` fit
    on the filters survive as well as through the float model. A per-channel scale (``axis`` on
    the channel axis) rounds each channel on its own grid, so it counts as neither; it is a
    per-channel parameter, sliced with the channels. Per-tensor scales are untouched by a cut.
    """

    channel_axis = None

    def analyze(self, node: ir.Node, b: Builder) -> None:
        x, y = required(node, 0), node.outputs[0]
        scale_value, zero_point = required(node, 1), optional(node, 2)
        scale = const(scale_value)
        if scale is None or (zero_point is not None and const(zero_point) is None):
            b.block_node(node, f"{describe(node)} has a computed scale or zero point")
            return
        if node.attributes.get_int("block_size", 0):
            b.block_node(
                node, f"{describe(node)} quantizes in blocks (block_size), which is not cut"
            )
            return
        if not b.is_channel_tensor(x):
            b.block_node(node, f"{describe(node)} reads a constant that is not an initializer")
            return
        b.touch(scale_value)
        b.touch(zero_point)
        per_channel = scale.size != 1
        if per_channel:
            x_rank = rank(x)
            axis = node.attributes.get_int("axis", 1)
            if x_rank is None or axis % x_rank != b.axis(x):
                b.block_node(
                    node,
                    f"{describe(node)} has one scale per position along axis {axis}, which is "
                    "not the channel axis",
                )
                return
            if static_dim(x, b.axis(x)) != scale.size:
                b.block_node(node, f"{describe(node)} has {scale.size} scales for its channels")
                return
        b.place(y, b.axis(x))
        if not b.identity(node, x, y):
            return
        b.path(node, (x, y), linear=False, homogeneous=not per_channel)
        if per_channel:
            b.weight(node, 1, 0, y, "param")
            if zero_point is not None:
                b.weight(node, 2, 0, y, "param")


class QuantizeLinearRule(_QuantizationRule):
    family = "quantize"
    op_types = op_set("QuantizeLinear")


class DequantizeLinearRule(_QuantizationRule):
    """Also the storage of weights: ``DequantizeLinear(integer initializer, scale, zero point)``.

    Its output is a constant to the analysis; the layer reading it records its weight slices
    with this rule as their ``storage``, and cuts, reads and re-encodes through it.
    """

    family = "dequantize"
    op_types = op_set("DequantizeLinear")

    def analyze(self, node: ir.Node, b: Builder) -> None:
        if self.stores(node):
            return  # a weight: the layer that reads it records and cuts it
        super().analyze(node, b)

    # -- stored weights --------------------------------------------------------------------------

    def stores(self, node: ir.Node) -> bool:
        return bool(node.inputs) and all(
            value is None or value.const_value is not None for value in node.inputs
        )

    def check_stored(self, node: ir.Node) -> None:
        output = node.outputs[0]
        readers = {id(use.node) for use in output.uses()}
        if len(readers) != 1 or output.is_graph_output():
            raise Unsupported(
                f"{describe(node)} decodes a weight that {len(readers)} nodes read (or a graph "
                "output); a shared quantized weight is not cut"
            )
        if node.attributes.get_int("block_size", 0):
            raise Unsupported(
                f"{describe(node)} quantizes a weight in blocks (block_size); cutting blocked "
                "quantization is not supported"
            )
        stored = self.stored_value(node).const_value
        assert stored is not None
        if stored.dtype not in _STORED_TYPES:
            raise Unsupported(
                f"{describe(node)} stores its weight as {stored.dtype.name}; only 8-, 16- and "
                "32-bit integer weights are cut"
            )
        scale = const(node.inputs[1])
        assert scale is not None
        if scale.size != 1 and (
            scale.ndim != 1 or scale.size != stored.shape[self._axis(node, len(stored.shape))]
        ):
            raise Unsupported(f"{describe(node)} has a scale of shape {list(scale.shape)}")

    def decode(self, node: ir.Node) -> np.ndarray:
        values, scale, zero_point = self._operands(node)
        decoded = (values.astype(np.float64) - zero_point) * scale
        return decoded.astype(scale.dtype)

    def stored_value(self, node: ir.Node) -> ir.Value:
        value = node.inputs[0]
        assert value is not None and value.const_value is not None
        return value

    def cut_stored(self, graph: ir.Graph, node: ir.Node, axis: int, positions: np.ndarray) -> None:
        stored = private_initializer(graph, node, 0)
        values = stored.const_value.numpy()  # type: ignore[union-attr]
        cut = np.delete(values, positions, axis=axis)
        set_initializer(graph, stored, cut)
        node.outputs[0].shape = ir.Shape(cut.shape)  # the decoded weight's, for shape checks
        if self._quantization_axis(node, values.ndim) != axis:
            return  # a per-tensor scale, or scales along another axis: unchanged
        for index in (1, 2):
            if optional(node, index) is None:
                continue
            value = private_initializer(graph, node, index)
            array = value.const_value.numpy()  # type: ignore[union-attr]
            set_initializer(graph, value, np.delete(array, positions))

    def encode(
        self,
        graph: ir.Graph,
        node: ir.Node,
        array: np.ndarray,
        scale_factor: np.ndarray | None = None,
    ) -> np.ndarray | None:
        """Store ``array`` at the current scales, growing a scale only where it must.

        Compensation changes the decoded weight, so the integers are recomputed. Keeping the
        scales (``scale_factor`` multiplies them first, for a bias following its weight) leaves
        every untouched integer exactly as it was, so only the changed entries are rounded, each
        by at most half a step: the error ONNX Runtime's quantizer already made once. A channel
        whose new values no longer fit the integer range gets the smallest scale that holds
        them (saturating instead would silently cut the compensation off).

        Returns:
            How much each scale grew, shaped to broadcast against the weight, or None when no
            scale grew (``scale_factor`` aside).
        """
        values, scale, zero_point = self._operands(node)
        ndim = values.ndim
        info = np.iinfo(values.dtype)
        low, high = float(info.min), float(info.max)
        if info.min < 0 and not np.any(zero_point):
            # Symmetric signed weights keep to [-127, 127], as ONNX Runtime writes them.
            low = -high
        target = scale.astype(np.float64)
        if scale_factor is not None:
            target = target * self._broadcast(node, scale_factor, ndim)
        axis = self._quantization_axis(node, ndim)
        others = tuple(a for a in range(ndim) if a != axis)
        data = np.asarray(array, dtype=np.float64)
        top = np.max(data, axis=others, keepdims=True) if data.size else np.zeros_like(target)
        bottom = np.min(data, axis=others, keepdims=True) if data.size else np.zeros_like(target)
        needed = np.maximum(
            np.where(high > zero_point, top / np.maximum(high - zero_point, 1.0), 0.0),
            np.where(low < zero_point, bottom / np.minimum(low - zero_point, -1.0), 0.0),
        )
        grown = np.maximum(target, needed)
        scale_array = const(node.inputs[1])
        assert scale_array is not None
        stored_scale = grown.reshape(scale_array.shape).astype(scale_array.dtype)
        if scale_factor is not None or np.any(grown > target):
            value = private_initializer(graph, node, 1)
            set_initializer(graph, value, stored_scale)
        exact_scale = self._broadcast(node, stored_scale.astype(np.float64), ndim)
        integers = np.clip(np.round(data / exact_scale + zero_point), low, high)
        stored = private_initializer(graph, node, 0)
        set_initializer(graph, stored, integers.astype(values.dtype))
        growth = grown / target
        return growth if np.any(growth > 1.0) else None

    # -- reading the operands ----------------------------------------------------------------------

    @staticmethod
    def _axis(node: ir.Node, ndim: int) -> int:
        return node.attributes.get_int("axis", 1) % max(ndim, 1)

    def _quantization_axis(self, node: ir.Node, ndim: int) -> int | None:
        """The axis the scales run along, or None for one scale."""
        scale = const(node.inputs[1])
        assert scale is not None
        return None if scale.size == 1 else self._axis(node, ndim)

    def _broadcast(self, node: ir.Node, per_axis: np.ndarray, ndim: int) -> np.ndarray:
        """Scales (or zero points) shaped to broadcast against the stored values."""
        array = np.asarray(per_axis, dtype=np.float64)
        axis = self._quantization_axis(node, ndim)
        if axis is None or array.size == 1:
            return array.reshape((1,) * ndim)
        shape = [1] * ndim
        shape[axis] = array.size
        return array.reshape(shape)

    def _operands(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stored integers, scale, zero point), the last two broadcastable to the first."""
        values = self.stored_value(node).const_value.numpy()  # type: ignore[union-attr]
        scale = const(node.inputs[1])
        assert scale is not None
        zero_point = const(optional(node, 2))
        shaped_scale = self._broadcast(node, scale, values.ndim).astype(scale.dtype)
        shaped_zero = (
            np.zeros(1) if zero_point is None else self._broadcast(node, zero_point, values.ndim)
        )
        return values, shaped_scale, shaped_zero
