"""Store mostly-zero weights compactly inside an ONNX graph that ONNX Runtime decodes itself.

Pruned weights (``lct``) shrink the file only if the zeros are not written: each chosen
initializer becomes a few small tensors plus standard ops that rebuild the dense weight.

Why not ONNX ``sparse_initializer``: measured here, ``onnx_ir`` drops sparse initializers on
load (the weights vanish from every model this project loads), ``onnx.checker`` accepts only
int64 indices (12 bytes per non-zero float32, a loss below 67 % sparsity) and ONNX Runtime 1.31
refuses int16/uint8 indices. The in-graph encodings below use 5 bytes per non-zero or less,
pass the full checker, and ONNX Runtime constant-folds the decoding at session creation
(measured: same latency as the dense model), so outputs are bit-identical to the dense ones.

Two encodings; each tensor gets the smaller one:

``mask``
    One bit per element (packed, little bit order) plus the non-zero values behind a leading
    zero. Decoded by ``BitShift`` (bit unpacking), ``CumSum`` of the mask (each element's value
    index, 0 where the mask is off) and ``Gather``: ``N/8 + 4 * nnz`` bytes for float32.
``gaps``
    The non-zero values and the uint8 distance of each from the previous one (a zero-valued
    filler entry every 255 elements of a longer run). Decoded by ``CumSum`` of the gaps
    (positions) and ``ScatterND`` into zeros: ``5 * nnz`` bytes; better below 1/8 density.

``values="float16"`` (opt-in, lossy) stores the non-zero float32 values as float16 and casts
them back in the graph, halving the bytes per value: each weight is rounded to 11 significant
bits (relative error at most 2**-11). A tensor with too few zeros for either encoding is then
stored ``dense16``: the whole tensor as float16 plus one Cast. The decoded weights equal the
float16 rounding of the originals exactly, so accuracy must be measured on the stored model.

``values="int8"`` (opt-in, lossy, as in Deep Compression's pruning + quantization) stores each
weight tensor of two or more dimensions as int8 with one float32 scale per slice of axis 0 (a
Conv's output channel): ``q = round(w / s)``, ``s = max|w| / 127`` over the slice, symmetric, so
zeros stay zeros. The encodings above then carry int8 values (one byte each), or the whole int8
tensor (``dense8``); the decoder ends in ``Cast`` to float and ``Mul`` by the scales. Each weight
moves by at most half a step (``s / 2``); 1-D tensors (biases) stay float32.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.canonicalize import evaluate_node
from onnxcompress.graph.edits import drop_unused_initializers, fresh_name, replace_with_initializer
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

ENCODINGS = ("mask", "gaps")
VALUE_TYPES = ("float32", "float16", "int8")
INT8_LEVELS = 127  # symmetric: -127..127, zero exact
MIN_OPSET = 11  # BitShift, CumSum, ScatterND
MAX_GAP = 255
# Rough serialized size of one decoding subgraph (nodes, small constants, names): a tensor is
# stored compactly only when that saves more than this.
DECODER_BYTES = 600
# Metadata key listing the weights a model stores compactly (JSON list of names), so a later
# step that must edit or train them can turn them back into plain initializers.
STORED_KEY = "onnxcompress.compact_weights"


@dataclasses.dataclass
class StoredTensor:
    """How one initializer was stored.

    Attributes:
        name: the initializer (its name stays the name of the decoded weight).
        shape: its shape.
        elements: its element count.
        nonzeros: its non-zero elements.
        encoding: ``mask``, ``gaps``, ``dense16`` (float16 values only), ``dense8`` (int8
            values only) or ``dense`` (left as it was).
        dense_bytes: raw bytes of the dense tensor.
        stored_bytes: raw bytes of the tensors that replace it (equal to ``dense_bytes`` when
            left dense).
        reason: why it was left dense, when it was.
    """

    name: str
    shape: tuple[int, ...]
    elements: int
    nonzeros: int
    encoding: str
    dense_bytes: int
    stored_bytes: int
    reason: str = ""

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzeros / max(self.elements, 1)

    def as_dict(self) -> dict[str, object]:
        return {**dataclasses.asdict(self), "sparsity": round(self.sparsity, 6)}


def encode_mask(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed uint8 mask, values with a leading zero) of ``array`` in C order."""
    flat = np.ascontiguousarray(array).reshape(-1)
    present = flat != 0
    bits = np.packbits(present.astype(np.uint8), bitorder="little")
    values = np.concatenate([np.zeros(1, flat.dtype), flat[present]])
    return bits, values


def decode_mask(bits: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Numpy reference of the in-graph ``mask`` decoder."""
    count = math.prod(shape)
    present = np.unpackbits(bits, bitorder="little")[:count].astype(np.int64)
    return values[np.cumsum(present) * present].reshape(shape)


def encode_gaps(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 gaps, values) of ``array``: positions are the running sum of the gaps.

    The first gap is the first position itself (0 allowed), later gaps are at least 1; a gap
    over 255 is split by zero-valued fillers at intermediate positions.
    """
    flat = np.ascontiguousarray(array).reshape(-1)
    positions = np.flatnonzero(flat)
    if positions.size == 0:
        return np.zeros(0, np.uint8), np.zeros(0, flat.dtype)
    steps = np.diff(positions, prepend=0)
    fillers = np.maximum(0, (steps - 1) // MAX_GAP)
    total = positions.size + int(fillers.sum())
    gaps = np.full(total, MAX_GAP, np.uint8)
    values = np.zeros(total, flat.dtype)
    # Each real entry lands after its fillers; its gap is what the fillers left over.
    slots = np.cumsum(fillers + 1) - 1
    gaps[slots] = (steps - fillers * MAX_GAP).astype(np.uint8)
    values[slots] = flat[positions]
    return gaps, values


def decode_gaps(gaps: np.ndarray, values: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Numpy reference of the in-graph ``gaps`` decoder."""
    dense = np.zeros(math.prod(shape), values.dtype)
    dense[np.cumsum(gaps.astype(np.int64))] = values
    return dense.reshape(shape)


def quantize_int8(array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int8 tensor, float32 scale per slice of axis 0) of ``array``, symmetric."""
    rows = np.asarray(array, np.float32).reshape(array.shape[0], -1)
    peak = np.abs(rows).max(axis=1)
    scale = np.where(peak > 0, peak / INT8_LEVELS, 1.0).astype(np.float32)
    steps = np.rint(rows / scale[:, None])
    q = np.clip(steps, -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
    return q.reshape(array.shape), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Numpy reference of the in-graph int8 decoding (``Cast`` then ``Mul``)."""
    return q.astype(np.float32) * scale.reshape(-1, *([1] * (q.ndim - 1)))


def encoded_sizes(
    array: np.ndarray, value_bytes: int | None = None, extra_bytes: int = 0
) -> dict[str, int]:
    """Raw bytes of ``array`` under each encoding (and ``dense``).

    Args:
        value_bytes: bytes per stored value (2 for float16 values, 1 for int8); None: the
            array's own.
        extra_bytes: added to every encoding but ``dense`` (int8's scales).
    """
    flat = np.asarray(array).reshape(-1)
    item = flat.dtype.itemsize if value_bytes is None else value_bytes
    nonzero = np.flatnonzero(flat)
    steps = np.diff(nonzero, prepend=0)
    fillers = int(np.maximum(0, (steps - 1) // MAX_GAP).sum())
    return _sizes_by_encoding(
        flat.size, nonzero.size, fillers, item, flat.dtype.itemsize, extra_bytes
    )


def _sizes_by_encoding(
    elements: int, nonzeros: int, fillers: int, item: int, dense_item: int, extra_bytes: int
) -> dict[str, int]:
    """``encoded_sizes`` from counts: ``item`` bytes per stored value, ``dense_item`` per
    element of the tensor as it is, ``fillers`` gap entries for runs of zeros longer than
    ``MAX_GAP``."""
    sizes = {
        "mask": (elements + 7) // 8 + (nonzeros + 1) * item,
        # ScatterND of nothing is left out: an all-zero tensor takes the mask.
        "gaps": (nonzeros + fillers) * (1 + item) if nonzeros else elements * item,
    }
    if item < dense_item:
        sizes[f"dense{8 * item}"] = elements * item
    sizes = {key: size + extra_bytes for key, size in sizes.items()}
    sizes["dense"] = elements * dense_item
    return sizes


def predicted_stored_bytes(shape: Sequence[int], nonzeros: int, values: str = "float32") -> int:
    """The bytes ``store_sparse`` will give a float32 weight of ``shape`` with ``nonzeros``
    non-zero values (its decoder included), without building it: what planning a file size
    needs. The gaps encoding's filler entries (one per run of 255 zeros) are not counted, and
    int8 values are assumed to keep the float zeros (rounding may add a few more).
    """
    elements = math.prod(int(d) for d in shape)
    item, extra = {"float16": 2, "int8": 1}.get(values, 4), 0
    if values == "int8":
        if len(shape) >= 2:
            extra = 4 * int(shape[0])  # one float32 scale per output channel
        else:
            item = 4  # 1-D tensors keep float32 values (store_sparse)
    sizes = _sizes_by_encoding(elements, nonzeros, 0, item, 4, extra)
    # store_sparse's choice: the smallest encoding, unless it saves no more than a decoder.
    best = min(size for key, size in sizes.items() if key != "dense")
    if sizes["dense"] - best <= DECODER_BYTES:
        return sizes["dense"]
    return best + DECODER_BYTES


def _opset(model: ir.Model) -> int:
    for domain in DEFAULT_DOMAINS:
        version = model.opset_imports.get(domain)
        if version is not None:
            return int(version)
    return 0


class _Builder:
    """Adds initializers and nodes for one graph; small constants are shared."""

    def __init__(self, graph: ir.Graph, narrow: bool = False) -> None:
        """Args:
        narrow: store float32 values as float16, cast back to float32 in the graph (int8
            values need no flag: the arrays handed in are int8 already, see ``dequantize``).
        """
        self.graph = graph
        self.narrow = narrow
        self.nodes: list[ir.Node] = []
        self._shared: dict[str, ir.Value] = {}

    def values(self, name: str, values: np.ndarray) -> ir.Value:
        """The stored values, narrowed to float16 and cast back when asked."""
        if not self.narrow or values.dtype != np.float32:
            return self.constant(name, values)
        stored = self.constant(name, values.astype(np.float16))
        return self.op("Cast", [stored], to=int(ir.DataType.FLOAT))

    def constant(self, base: str, array: np.ndarray) -> ir.Value:
        name = fresh_name(self.graph, base)
        value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        self.graph.register_initializer(value)
        return value

    def shared(self, key: str, array: np.ndarray) -> ir.Value:
        if key not in self._shared:
            self._shared[key] = self.constant(f"sparse_storage.{key}", array)
        return self._shared[key]

    def op(self, op_type: str, inputs: list[ir.Value], **attributes: Any) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attributes)
        self.nodes.append(node)
        return node.outputs[0]

    def decode_mask(self, name: str, array: np.ndarray) -> ir.Value:
        bits, values = encode_mask(array)
        packed = self.constant(f"{name}.mask", bits)
        stored = self.values(f"{name}.values", values)
        count = self.constant(f"{name}.count", np.array([array.size], np.int64))
        column = self.op("Reshape", [packed, self.shared("column", np.array([-1, 1], np.int64))])
        # (b << (7 - k)) >> 7 is bit k of b in uint8 arithmetic; BitwiseAnd needs opset 18.
        lifted = self.op(
            "BitShift",
            [column, self.shared("lshift", (7 - np.arange(8, dtype=np.uint8))[None, :])],
            direction="LEFT",
        )
        bit = self.op(
            "BitShift", [lifted, self.shared("seven", np.array(7, np.uint8))], direction="RIGHT"
        )
        flat = self.op("Reshape", [bit, self.shared("flat", np.array([-1], np.int64))])
        trimmed = self.op("Slice", [flat, self.shared("start", np.array([0], np.int64)), count])
        present = self.op("Cast", [trimmed], to=int(ir.DataType.INT64))
        index = self.op("CumSum", [present, self.shared("axis", np.array(0, np.int64))])
        index = self.op("Mul", [index, present])
        dense = self.op("Gather", [stored, index], axis=0)
        return self._reshape(dense, array.shape)

    def decode_gaps(self, name: str, array: np.ndarray) -> ir.Value:
        gaps, values = encode_gaps(array)
        stored_gaps = self.constant(f"{name}.gaps", gaps)
        stored = self.values(f"{name}.values", values)
        count = self.constant(f"{name}.count", np.array([array.size], np.int64))
        wide = self.op("Cast", [stored_gaps], to=int(ir.DataType.INT64))
        positions = self.op("CumSum", [wide, self.shared("axis", np.array(0, np.int64))])
        column = self.op("Reshape", [positions, self.shared("column", np.array([-1, 1], np.int64))])
        zero = ir.tensor(np.zeros(1, array.dtype))
        zeros = self.op("ConstantOfShape", [count], value=zero)
        dense = self.op("ScatterND", [zeros, column, stored])
        return self._reshape(dense, array.shape)

    def decode_dense16(self, name: str, array: np.ndarray) -> ir.Value:
        return self.values(f"{name}.values", array)

    def decode_dense8(self, name: str, array: np.ndarray) -> ir.Value:
        return self.constant(f"{name}.values", array)

    def dequantize(self, name: str, q: ir.Value, scale: np.ndarray, ndim: int) -> ir.Value:
        """float32(q) * scale, the scale broadcast along axis 0 of an ``ndim``-D tensor."""
        column = self.constant(f"{name}.scale", scale.reshape(-1, *([1] * (ndim - 1))))
        wide = self.op("Cast", [q], to=int(ir.DataType.FLOAT))
        return self.op("Mul", [wide, column])

    def _reshape(self, flat: ir.Value, shape: tuple[int, ...]) -> ir.Value:
        key = "shape_" + "x".join(str(d) for d in shape)
        return self.op("Reshape", [flat, self.shared(key, np.array(shape, np.int64))])


def store_sparse(
    model: ir.Model,
    names: Iterable[str] | None = None,
    *,
    min_saving: int = DECODER_BYTES,
    encoding: str | None = None,
    values: str = "float32",
) -> list[StoredTensor]:
    """Replace mostly-zero float initializers of the main graph by compact encodings.

    The decoded tensor keeps the initializer's name, so consumers, reports and later lookups by
    name see the same tensor. Decoding is exact: ONNX Runtime computes bit-identical weights.

    Args:
        names: initializers to consider; None: every float initializer with zeros.
        min_saving: store compactly only when that saves more than this many bytes.
        encoding: force ``mask`` or ``gaps``; None picks the smaller per tensor.
        values: ``float32`` keeps the values exactly; ``float16`` stores float32 values as
            float16 (lossy, see the module docstring), and may store a tensor ``dense16``;
            ``int8`` quantizes float32 tensors of 2+ dimensions per slice of axis 0 (lossy),
            and may store a tensor ``dense8``.

    Returns:
        One record per considered initializer (``encoding="dense"`` with a reason when left).

    Raises:
        ValueError: an unknown ``encoding`` or ``values``.
    """
    if encoding is not None and encoding not in ENCODINGS:
        raise ValueError(f"encoding={encoding!r} is not one of {', '.join(ENCODINGS)}")
    if values not in VALUE_TYPES:
        raise ValueError(f"values={values!r} is not one of {', '.join(VALUE_TYPES)}")
    graph = model.graph
    wanted = list(graph.initializers) if names is None else list(names)
    opset = _opset(model)
    graph_inputs = {v.name for v in graph.inputs}
    builder = _Builder(graph, narrow=values == "float16")
    decoders = {
        "mask": builder.decode_mask,
        "gaps": builder.decode_gaps,
        "dense16": builder.decode_dense16,
        "dense8": builder.decode_dense8,
    }
    records: list[StoredTensor] = []
    replaced: list[tuple[ir.Value, ir.Value]] = []
    for name in wanted:
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            continue
        tensor = value.const_value
        if not tensor.dtype.is_floating_point():
            continue
        array = tensor.numpy()
        narrow = builder.narrow and array.dtype == np.float32
        scale: np.ndarray | None = None
        if values == "int8" and array.dtype == np.float32 and array.ndim >= 2:
            encoded, scale = quantize_int8(array)
            sizes = encoded_sizes(encoded, extra_bytes=scale.nbytes)
            sizes["dense8"] = encoded.nbytes + scale.nbytes
            sizes["dense"] = array.nbytes
        else:
            encoded = array
            sizes = encoded_sizes(array, 2 if narrow else None)
        nonzeros = int(np.count_nonzero(encoded))
        record = StoredTensor(
            name, tuple(array.shape), int(array.size), nonzeros, "dense", sizes["dense"],
            sizes["dense"],
        )  # fmt: skip
        records.append(record)
        choices = [key for key in sizes if key != "dense"]
        choice = encoding or min(choices, key=lambda key: sizes[key])
        if opset < MIN_OPSET:
            record.reason = f"opset {opset} < {MIN_OPSET} lacks the decoding ops"
        elif name in graph_inputs:
            record.reason = "also a graph input (the user may feed it)"
        elif value.is_graph_output():
            record.reason = "a graph output"
        elif tensor.dtype == ir.DataType.BFLOAT16:
            record.reason = "bfloat16 has no numpy dtype to encode"
        elif sizes["dense"] - sizes[choice] <= min_saving:
            record.reason = (
                f"{record.sparsity:.0%} zeros: a {choice} encoding would save "
                f"{sizes['dense'] - sizes[choice]} bytes, not more than the decoder costs"
            )
        if record.reason:
            continue
        decoded = decoders[choice](name, encoded)
        if scale is not None:
            decoded = builder.dequantize(name, decoded, scale, array.ndim)
        record.encoding, record.stored_bytes = choice, sizes[choice]
        replaced.append((value, decoded))
    if builder.nodes:
        # Decoders read only initializers: placed first, they precede every consumer.
        if len(graph):
            graph.insert_before(graph.node(0), builder.nodes)
        else:
            graph.extend(builder.nodes)
    for value, decoded in replaced:
        name = str(value.name)
        decoded.type, decoded.shape = value.type, value.shape
        value.replace_all_uses_with(decoded)
        graph.initializers.pop(name)
        decoded.name = name
    stored = [r for r in records if r.encoding != "dense"]
    if stored:
        known = json.loads(model.metadata_props.get(STORED_KEY, "[]"))
        model.metadata_props[STORED_KEY] = json.dumps(known + [r.name for r in stored])
        saved = sum(r.dense_bytes - r.stored_bytes for r in stored)
        logger.info("stored %d tensors compactly, %d bytes saved", len(stored), saved)
    return records


def expand_stored(model: ir.Model) -> list[str]:
    """Turn the weights ``store_sparse`` encoded back into plain initializers, in place.

    A pass that slices or trains a weight needs it as an initializer; the decoder's arithmetic
    is evaluated once here, so the values are bit-identical to what ONNX Runtime decodes. The
    file grows back to its dense size. Returns the names expanded (none for a plain model).
    """
    from onnx.reference import ReferenceEvaluator  # heavy import, only when there is work

    graph = model.graph
    names = [n for n in json.loads(model.metadata_props.get(STORED_KEY, "[]")) if n]
    wanted: set[int] = set()
    producers = {out.name: node for node in graph for out in node.outputs}
    frontier = [producers.get(name) for name in names]
    while frontier:
        node = frontier.pop()
        if node is None or id(node) in wanted:
            continue
        wanted.add(id(node))
        frontier.extend(inp.producer() for inp in node.inputs if inp is not None)
    opset = _opset(model)
    for node in list(graph):
        if id(node) not in wanted:
            continue
        results = evaluate_node(node, opset, ReferenceEvaluator)
        for out, array in zip(node.outputs, results, strict=True):
            replace_with_initializer(graph, out, array)
        graph.remove(node, safe=True)
    drop_unused_initializers(graph)
    model.metadata_props.pop(STORED_KEY, None)
    if names:
        logger.info("expanded %d compactly stored weights", len(names))
    return names


__all__ = [
    "ENCODINGS",
    "VALUE_TYPES",
    "StoredTensor",
    "decode_gaps",
    "decode_mask",
    "dequantize_int8",
    "encode_gaps",
    "encode_mask",
    "encoded_sizes",
    "expand_stored",
    "quantize_int8",
    "store_sparse",
]
