"""Parameters of a model: the elements of the weights its file stores.

Parameters are the elements of the weights the file stores, whatever their type; a tensor shared
by several nodes counts once:

* every float initializer and float Constant node (float16, bfloat16, float, double and the
  float8 formats);
* every integer one that holds weight values: a quantization op (``DequantizeLinear``,
  ``QLinearConv``...) reads it, or it reaches a ``Cast`` to float through ops that only move
  values (``Reshape``, ``Gather``'s data, ``ScatterND``'s updates...), as the int8 weights of
  ``sparse_storage`` do;
* a weight stored compactly (``sparse_storage``) counts the values its file holds: its non-zeros
  (plus the one leading zero of a mask encoding and the zero fillers of gaps over 255), not its
  dense shape, so pruning shows in the count once the zeros are no longer stored;
* quantization scales and zero points count as they are stored: one element per tensor, or one
  per channel.

Integer tensors that say where values go are not parameters: shapes (Reshape targets), indices,
axes, slice bounds, element counts, and the masks and gaps of ``sparse_storage``. A layer's
params are those of the stored tensors it reads, directly or through their decoding.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import onnx_ir as ir

from onnxcompress.graph.op_families import DEFAULT_DOMAINS

# Ops that only move, select or reshape the values of their data inputs (listed by position;
# None: every input): a quantized weight's values pass through them unchanged on their way to
# the op that widens them, as in the decoders of ``sparse_storage``. The other inputs of these
# ops (shapes, indices, axes, starts, pads) say where values go, not what they are.
_MOVES_VALUES: dict[str, tuple[int, ...] | None] = {
    "Identity": (0,),
    "Reshape": (0,),
    "Flatten": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Transpose": (0,),
    "Slice": (0,),
    "Gather": (0,),
    "GatherElements": (0,),
    "GatherND": (0,),
    "ScatterND": (0, 2),
    "ScatterElements": (0, 2),
    "Expand": (0,),
    "Tile": (0,),
    "Pad": (0,),
    "Split": (0,),
    "Concat": None,
}
# Quantization ops: every integer input of theirs is a quantized value, a zero point or an int32
# bias, never a shape or an axis.
_QUANTIZED_OPS = frozenset(
    {"DequantizeLinear", "QuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv",
     "QLinearMatMul"}
)  # fmt: skip


def _stored_tensor(value: ir.Value) -> tuple[ir.DataType, int] | None:
    """(dtype, elements) of a tensor the file stores: an initializer or a ``Constant``'s output."""
    tensor = value.const_value
    if tensor is not None:
        # The tensor's shape is known without reading external data, so no weights get loaded.
        return tensor.dtype, math.prod(int(d) for d in tensor.shape.numpy())
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS:
        return None
    for name, attr in node.attributes.items():
        if attr.type == ir.AttributeType.TENSOR:
            stored = attr.as_tensor()
            return stored.dtype, math.prod(int(d) for d in stored.shape.numpy())
        if name == "value_float":
            return ir.DataType.FLOAT, 1
        if name == "value_floats":
            return ir.DataType.FLOAT, len(attr.as_floats())
        if name == "value_int":
            return ir.DataType.INT64, 1
        if name == "value_ints":
            return ir.DataType.INT64, len(attr.as_ints())
    return None


def _becomes_weight_values(value: ir.Value, seen: set[int] | None = None) -> bool:
    """Whether an integer tensor holds weight values: followed through ops that only move
    values (``_MOVES_VALUES``), it reaches a quantization op, or a ``Cast``/``CastLike`` to a
    float type (the int8 decoders of ``sparse_storage``)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return False
    seen.add(id(value))
    for node, index in value.uses():
        if node.domain not in DEFAULT_DOMAINS:
            continue
        if node.op_type in _QUANTIZED_OPS:
            return True
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            if to is not None and ir.DataType(to.as_int()).is_floating_point():
                return True
            continue
        if node.op_type == "CastLike":
            like = node.inputs[1] if len(node.inputs) > 1 else None
            dtype = like.dtype if like is not None else None
            if index == 0 and dtype is not None and dtype.is_floating_point():
                return True
            continue
        if node.op_type not in _MOVES_VALUES:
            continue
        positions = _MOVES_VALUES[node.op_type]
        if positions is not None and index not in positions:
            continue
        if any(_becomes_weight_values(out, seen) for out in node.outputs):
            return True
    return False


def _weight_elements(value: ir.Value) -> int:
    """Elements ``value`` counts as parameters: all of a stored float tensor's, all of a stored
    integer tensor's that holds weight values, else 0."""
    stored = _stored_tensor(value)
    if stored is None:
        return 0
    dtype, elements = stored
    if dtype.is_floating_point():
        return elements
    if dtype.is_integer() and _becomes_weight_values(value):
        return elements
    return 0


def _stored_values(model: ir.Model) -> list[ir.Value]:
    """Every initializer (subgraphs included) and every default-domain Constant's output."""
    values = [value for graph in model.graphs() for value in graph.initializers.values()]
    for node in model.graph.all_nodes():
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.outputs:
            values.append(node.outputs[0])
    return values


def count_params(model: ir.Model) -> int:
    """Elements of the stored weights of the model and its subgraphs, each tensor counted once.

    What counts (the module docstring has the rule): every stored float tensor, and every stored
    integer tensor that holds weight values (it reaches a quantization op or a ``Cast`` to float
    through ops that only move values). Shapes, indices, axes and the masks and gaps of
    ``sparse_storage`` do not. Float ``Constant`` nodes count too: some exporters emit weights
    (and scalars) as Constant nodes, and canonicalization lifts those into initializers, so
    counting both keeps the number the same before and after.
    """
    return sum(_weight_elements(value) for value in _stored_values(model))


def constant_sources(model: ir.Model) -> dict[int, tuple[ir.Value, ...]]:
    """For each value computed from stored tensors alone (a decoder's output, a
    ``DequantizeLinear``'s, a widening ``Cast``'s), the stored tensors it is computed from."""
    sources: dict[int, tuple[ir.Value, ...]] = {}
    for node in model.graph.all_nodes():
        if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
            continue  # its output is a stored tensor itself
        read: dict[int, ir.Value] = {}
        constant = bool(node.inputs)
        for value in node.inputs:
            if value is None:
                continue
            found = _sources_of(value, sources)
            if found is None:
                constant = False
                break
            read.update((id(source), source) for source in found)
        if constant:
            for out in node.outputs:
                sources[id(out)] = tuple(read.values())
    return sources


def _sources_of(
    value: ir.Value, sources: Mapping[int, tuple[ir.Value, ...]]
) -> tuple[ir.Value, ...] | None:
    """The stored tensors ``value`` is (or is computed from); None when it depends on an input."""
    if _stored_tensor(value) is not None:
        return (value,)
    return sources.get(id(value))


def node_params(node: ir.Node, sources: Mapping[int, tuple[ir.Value, ...]]) -> int:
    """Parameters of the stored tensors a node reads, directly or through their decoding."""
    read: dict[int, ir.Value] = {}
    for value in node.inputs:
        if value is not None:
            read.update((id(source), source) for source in _sources_of(value, sources) or ())
    return sum(_weight_elements(value) for value in read.values())
