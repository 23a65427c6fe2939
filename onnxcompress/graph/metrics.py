"""Size and compute of a model: parameters, MACs per layer, file size.

Every report compares these numbers before and after compression, so they are defined once here.

How MACs are counted: one MAC is one multiply-accumulate of the layer's weights with its input,
counted from the tensor shapes ONNX shape inference puts on the graph (symbolic dims, normally
the batch, count as ``batch``). Only the layers that hold the compute of a CNN are counted:

* ``Conv``: output elements x (input channels / groups) x kernel elements. Dilation spreads the
  kernel but does not change how many products each output takes, so it does not count.
* ``ConvTranspose``: input elements x (output channels / groups) x kernel elements (each input
  element is scattered through the kernel once).
* ``Gemm``: M x N x K, with ``transA``/``transB`` deciding where M, N and K live.
* ``MatMul``: broadcast batch x M x N x K, with numpy's rules for 1-D operands.

Bias adds, activations, pooling, normalization and elementwise ops count as 0 MACs: they are
memory-bound, a few percent of a CNN's arithmetic, and the figures torchvision and the papers
publish leave them out, so ours can be compared with those.

Parameters are counted by :mod:`onnxcompress.graph.param_counting`: the elements of the
weights the file stores, whatever their type.

What the counter cannot count, :func:`uncounted_ops` lists: ops outside the default ONNX domain
(their semantics are unknown here) and default-domain ops that multiply-accumulate but are not
modelled (``UNCOUNTED_COMPUTE_OPS``); both count 0 MACs. :func:`channel_mismatches` lists the
convolutions whose weight does not fit their input, a defect ONNX's checker lets through.

Where height and width are symbolic (detectors, segmenters), the shapes on the graph cannot say
how much a layer computes: ``input_shapes.count_macs_at`` records the input shapes to count at
(the pipeline resolves them once per run, from ``--shape`` or the calibration data), and every
:func:`model_metrics` of that model then counts with its inputs fixed to them, leaving the
model's own shapes as they were.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx_ir as ir

# fix_input_shapes and symbolic_dims are used by inspect, which finds them here as before.
from onnxcompress.graph.input_shapes import counted_at, shapes_differ, shapes_fixed
from onnxcompress.graph.input_shapes import fix_input_shapes as fix_input_shapes
from onnxcompress.graph.input_shapes import symbolic_dims as symbolic_dims
from onnxcompress.graph.op_families import COMPUTE_OPS, DEFAULT_DOMAINS
from onnxcompress.graph.param_counting import constant_sources, node_params
from onnxcompress.graph.param_counting import count_params as count_params

logger = logging.getLogger(__name__)

# Default-domain ops that multiply-accumulate like the counted ones but whose MACs are not
# modelled (quantized, deformable and recurrent layers, Einsum, attention, Fourier transforms):
# they count 0, so a model that uses them is understated.
UNCOUNTED_COMPUTE_OPS = frozenset(
    {
        "ConvInteger",
        "QLinearConv",
        "DeformConv",
        "MatMulInteger",
        "QLinearMatMul",
        "Einsum",
        "RNN",
        "GRU",
        "LSTM",
        "Attention",
        "DFT",
        "STFT",
    }
)
# Node names from exporters can be very long paths; the table keeps their informative tail.
_MAX_NAME_WIDTH = 48


@dataclasses.dataclass
class LayerMetrics:
    """Shape and cost of one compute node (Conv, ConvTranspose, Gemm, MatMul).

    Attributes:
        node: the node's name (``<op>_<index>`` when the model leaves it unnamed).
        op: the op type.
        in_channels: input channels (Conv) or input features K (Gemm, MatMul); None if unknown.
        out_channels: output channels (Conv) or output features N (Gemm, MatMul); None if unknown.
        kernel: spatial kernel size (convolutions only).
        stride: strides (convolutions only).
        groups: channel groups (convolutions only).
        params: elements of the stored weights this node reads (weights and bias), directly
            or through their decoding (``DequantizeLinear``, ``sparse_storage``).
        macs: multiply-accumulates of one run at the model's batch.
    """

    node: str
    op: str
    in_channels: int | None
    out_channels: int | None
    kernel: tuple[int, ...] | None
    stride: tuple[int, ...] | None
    groups: int | None
    params: int
    macs: int

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key in ("kernel", "stride"):
            if data[key] is not None:
                data[key] = list(data[key])
        return data


@dataclasses.dataclass
class ModelMetrics:
    """Totals and per-layer costs of a model.

    Attributes:
        params: elements of all stored weights, each counted once (see the module docstring).
        macs: the sum of the layers' MACs.
        layers: every Conv/ConvTranspose/Gemm/MatMul node in graph order.
        file_size: bytes on disk (external data included), when measured from a file.
        batch: the batch size symbolic dims were given.
        input_shapes: the dims of each graph input the counts were made at (symbolic dims
            left open count as ``batch``).
    """

    params: int
    macs: int
    layers: list[LayerMetrics]
    file_size: int | None
    batch: int
    input_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "macs": self.macs,
            "file_size": self.file_size,
            "batch": self.batch,
            "layers": [layer.as_dict() for layer in self.layers],
        }


# ---------------------------------------------------------------------------------------------
# MACs
# ---------------------------------------------------------------------------------------------


def _dims(value: ir.Value | None, batch: int) -> tuple[int, ...] | None:
    """Concrete dims of a value, symbolic ones read as ``batch``; None if the rank is unknown."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape.numpy())
    if value.shape is None:
        return None
    return tuple(d if isinstance(d, int) else batch for d in value.shape)


def _ints_attr(node: ir.Node, name: str) -> tuple[int, ...] | None:
    attr = node.attributes.get(name)
    return tuple(attr.as_ints()) if attr is not None else None


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _conv_output_dims(
    node: ir.Node, in_dims: tuple[int, ...], out_channels: int, kernel: tuple[int, ...]
) -> tuple[int, ...] | None:
    """Conv output dims from its input when shape inference left the output unknown."""
    spatial = len(kernel)
    if len(in_dims) != spatial + 2:
        return None
    strides = _ints_attr(node, "strides") or (1,) * spatial
    dilations = _ints_attr(node, "dilations") or (1,) * spatial
    pads = _ints_attr(node, "pads") or (0,) * (2 * spatial)
    auto_pad_attr = node.attributes.get("auto_pad")
    auto_pad = auto_pad_attr.as_string() if auto_pad_attr is not None else "NOTSET"
    out = []
    for axis in range(spatial):
        size = in_dims[axis + 2]
        if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-size // strides[axis]))
            continue
        padded = size if auto_pad == "VALID" else size + pads[axis] + pads[axis + spatial]
        reach = dilations[axis] * (kernel[axis] - 1) + 1
        out.append((padded - reach) // strides[axis] + 1)
    return (in_dims[0], out_channels, *out)


def _conv_layer(node: ir.Node, batch: int) -> tuple[LayerMetrics, bool]:
    transpose = node.op_type == "ConvTranspose"
    weight = _dims(node.inputs[1] if len(node.inputs) > 1 else None, batch)
    groups = _int_attr(node, "group", 1)
    kernel = _ints_attr(node, "kernel_shape")
    if kernel is None and weight is not None:
        kernel = weight[2:]
    stride = _ints_attr(node, "strides")
    if stride is None and kernel is not None:
        stride = (1,) * len(kernel)
    in_ch = out_ch = None
    if weight is not None and len(weight) >= 2:
        # Conv weights are (Cout, Cin/groups, k...); ConvTranspose weights (Cin, Cout/groups, k...).
        if transpose:
            in_ch, out_ch = weight[0], weight[1] * groups
        else:
            in_ch, out_ch = weight[1] * groups, weight[0]
    layer = LayerMetrics(
        node="",
        op=node.op_type,
        in_channels=in_ch,
        out_channels=out_ch,
        kernel=kernel,
        stride=stride,
        groups=groups,
        params=0,  # filled by _count, which knows what the graph decodes
        macs=0,
    )
    if weight is None or kernel is None or in_ch is None or out_ch is None:
        return layer, False
    kernel_elements = math.prod(kernel)
    if transpose:
        in_dims = _dims(node.inputs[0], batch)
        if in_dims is None:
            return layer, False
        layer.macs = math.prod(in_dims) * (out_ch // groups) * kernel_elements
        return layer, True
    out_dims = _dims(node.outputs[0], batch)
    if out_dims is None:
        in_dims = _dims(node.inputs[0], batch)
        out_dims = _conv_output_dims(node, in_dims, out_ch, kernel) if in_dims else None
    if out_dims is None:
        return layer, False
    layer.macs = math.prod(out_dims) * (in_ch // groups) * kernel_elements
    return layer, True


def _gemm_layer(node: ir.Node, batch: int) -> tuple[LayerMetrics, bool]:
    a = _dims(node.inputs[0], batch)
    b = _dims(node.inputs[1], batch)
    out = _dims(node.outputs[0], batch)
    trans_a = _int_attr(node, "transA", 0)
    trans_b = _int_attr(node, "transB", 0)
    k = n = m = None
    if b is not None and len(b) == 2:
        k, n = (b[1], b[0]) if trans_b else (b[0], b[1])
    if a is not None and len(a) == 2:
        m, k = (a[1], a[0]) if trans_a else (a[0], a[1])
    elif out is not None and len(out) == 2:
        m = out[0]
    layer = LayerMetrics(
        node="",
        op=node.op_type,
        in_channels=k,
        out_channels=n,
        kernel=None,
        stride=None,
        groups=None,
        params=0,  # filled by _count, which knows what the graph decodes
        macs=0,
    )
    if m is None or n is None or k is None:
        return layer, False
    layer.macs = m * n * k
    return layer, True


def _matmul_layer(node: ir.Node, batch: int) -> tuple[LayerMetrics, bool]:
    a = _dims(node.inputs[0], batch)
    b = _dims(node.inputs[1], batch)
    k = n = None
    if b is not None and len(b) >= 1:
        k, n = (b[0], 1) if len(b) == 1 else (b[-2], b[-1])
    layer = LayerMetrics(
        node="",
        op=node.op_type,
        in_channels=k,
        out_channels=n,
        kernel=None,
        stride=None,
        groups=None,
        params=0,  # filled by _count, which knows what the graph decodes
        macs=0,
    )
    if a is not None and b is not None and len(a) >= 1:
        # numpy semantics: a 1-D left operand is a row (M = 1), a 1-D right one a column (N = 1).
        m = 1 if len(a) == 1 else a[-2]
        k = a[-1]
        batch_dims = _broadcast(a[:-2], b[:-2]) if len(b) >= 2 else a[:-2]
        layer.in_channels = k
        layer.macs = math.prod(batch_dims) * m * (n or 1) * k
        return layer, True
    out = _dims(node.outputs[0], batch)
    if out is not None and k is not None:
        # Every output element is one length-K dot product.
        layer.macs = math.prod(out) * k
        return layer, True
    return layer, False


def _broadcast(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    rank = max(len(a), len(b))
    a = (1,) * (rank - len(a)) + tuple(a)
    b = (1,) * (rank - len(b)) + tuple(b)
    return tuple(max(x, y) if 1 in (x, y) else x for x, y in zip(a, b, strict=True))


def _layer(node: ir.Node, batch: int) -> tuple[LayerMetrics, bool] | None:
    """Metrics of a compute node (None for other ops) and whether its shapes were known."""
    if node.domain not in DEFAULT_DOMAINS or node.op_type not in COMPUTE_OPS:
        return None
    if node.op_type in ("Conv", "ConvTranspose"):
        return _conv_layer(node, batch)
    if node.op_type == "Gemm":
        return _gemm_layer(node, batch)
    return _matmul_layer(node, batch)


def node_macs(node: ir.Node, batch: int = 1) -> int:
    """Multiply-accumulates of one node (0 for ops other than Conv/ConvTranspose/Gemm/MatMul).

    Shapes come from the IR values (run ``onnxcompress.graph.canonicalize.infer_shapes`` first);
    a node whose shapes are unknown counts 0.

    Args:
        batch: the value given to symbolic dims.
    """
    result = _layer(node, batch)
    return result[0].macs if result is not None else 0


def _compute_nodes(model: ir.Model) -> Iterable[ir.Node]:
    for node in model.graph.all_nodes():
        if node.domain in DEFAULT_DOMAINS and node.op_type in COMPUTE_OPS:
            yield node


def _batch_fixed_shapes(model: ir.Model, batch: int) -> dict[str, tuple[int, ...]] | None:
    """The inputs at ``batch`` when the graph's computed values carry symbols of their own.

    Exporters name some computed dims with fresh symbols (``unk__1``: the batch times the
    patches of a MobileViT unfold); counted as ``batch`` like the inputs' own symbols, such a
    MatMul's MACs came out 4x low. Fixing the inputs at ``batch`` and inferring again gives
    those dims their values. Only for inputs whose dims past the batch are fixed (open height
    and width are counted at ``--shape``/data sizes by the caller); None when nothing needs it.
    """
    inputs = [value for value in model.graph.inputs if not value.is_initializer()]
    if not inputs or any(value.shape is None for value in inputs):
        return None
    if any(not isinstance(dim, int) for value in inputs for dim in list(value.shape or ())[1:]):
        return None
    own = {str(dim) for value in inputs for dim in (value.shape or ()) if not isinstance(dim, int)}
    foreign = any(
        not isinstance(dim, int) and (getattr(dim, "value", None) is None or str(dim) not in own)
        for node in _compute_nodes(model)
        for value in (*node.inputs, *node.outputs)
        if value is not None and value.shape is not None
        for dim in value.shape
    )
    if not foreign:
        return None
    return {
        str(value.name): (batch, *(d for d in list(value.shape or ())[1:] if isinstance(d, int)))
        for value in inputs
        if value.shape is not None and len(value.shape) and not isinstance(value.shape[0], int)
    } or None


def _shapes_missing(model: ir.Model) -> bool:
    return any(out.shape is None for node in _compute_nodes(model) for out in node.outputs[:1])


def macs_per_weight_element(model: ir.Model) -> dict[ir.Node, float]:
    """How many MACs each weight element of a compute node does per sample at the counting
    shapes (``count_macs_at``), for the nodes whose count there differs from the one their own
    shapes give; empty when the model records no counting shapes.

    A Conv's weight element is used once per output pixel, so this is the factor a pass that
    plans removals in MACs must use where height and width are symbolic.
    """
    shapes = counted_at(model)
    if not shapes or not shapes_differ(model, shapes):
        return {}
    if _shapes_missing(model):
        from onnxcompress.graph.canonicalize import infer_shapes

        infer_shapes(model)
    own = {node: node_macs(node) for node in _compute_nodes(model)}
    with shapes_fixed(model, shapes):
        fixed = {node: node_macs(node) for node in own}
    factors = {}
    for node, macs in fixed.items():
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        if macs == own[node] or weight is None or weight.const_value is None:
            continue
        elements = math.prod(int(d) for d in weight.const_value.shape.numpy())
        if elements:
            factors[node] = macs / elements
    return factors


def model_metrics(
    model: ir.Model,
    *,
    batch: int = 1,
    file_size: int | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> ModelMetrics:
    """Parameters, MACs and per-layer costs of ``model``.

    Runs ONNX shape inference on the model first when a compute node's output has no shape
    (this adds shapes to the model's values; nothing else changes).

    Args:
        batch: the value given to symbolic dims (normally the batch axis).
        file_size: bytes on disk, when the caller measured the file.
        input_shapes: count with these inputs fixed to these dims (default: the shapes
            ``count_macs_at`` recorded on the model, else the model's own); the model's own
            shapes are left as they were.
    """
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    shapes = input_shapes if input_shapes is not None else counted_at(model)
    if not shapes:
        shapes = _batch_fixed_shapes(model, batch)
    if shapes and shapes_differ(model, shapes):
        with shapes_fixed(model, shapes):
            return _count(model, batch, file_size)
    if _shapes_missing(model):
        from onnxcompress.graph.canonicalize import infer_shapes

        infer_shapes(model)
    return _count(model, batch, file_size)


def _count(model: ir.Model, batch: int, file_size: int | None) -> ModelMetrics:
    layers: list[LayerMetrics] = []
    unknown: list[str] = []
    sources = constant_sources(model)
    for index, node in enumerate(_compute_nodes(model)):
        result = _layer(node, batch)
        if result is None:
            continue
        layer, known = result
        layer.node = node.name or f"{node.op_type}_{index}"
        layer.params = node_params(node, sources)
        if not known:
            unknown.append(layer.node)
        layers.append(layer)
    if unknown:
        logger.warning(
            "shapes unknown for %d node(s), counted as 0 MACs: %s",
            len(unknown),
            ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""),
        )
    return ModelMetrics(
        params=count_params(model),
        macs=sum(layer.macs for layer in layers),
        layers=layers,
        file_size=file_size,
        batch=batch,
        input_shapes={
            str(value.name): list(dims)
            for value in model.graph.inputs
            if not value.is_initializer() and (dims := _dims(value, batch)) is not None
        },
    )


# ---------------------------------------------------------------------------------------------
# What the counts cannot be trusted for
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UncountedOp:
    """An op whose MACs the counter cannot count: they are taken as 0.

    Attributes:
        op: the op type.
        domain: the op's domain, ``""`` for the default ONNX domain.
        nodes: how many nodes run it (subgraphs included).
    """

    op: str
    domain: str
    nodes: int

    def message(self) -> str:
        nodes = f"{self.nodes} node" + ("" if self.nodes == 1 else "s")
        return (
            f"{self.op} in domain {self.domain or 'ai.onnx'} is not counted "
            f"({nodes}, taken as 0 MACs)"
        )


def uncounted_ops(model: ir.Model) -> list[UncountedOp]:
    """The ops whose MACs :func:`model_metrics` cannot count, each (op, domain) once.

    Those are every op outside the default ONNX domain (custom ops, calls of model-local
    functions: whatever they compute is unknown here) and the default-domain ops in
    ``UNCOUNTED_COMPUTE_OPS``. Ops with no MACs by this module's definition (activations,
    pooling, normalization, elementwise and shape ops) are not listed.
    """
    counts: dict[tuple[str, str], int] = {}
    for node in model.graph.all_nodes():
        if node.domain in DEFAULT_DOMAINS:
            if node.op_type not in UNCOUNTED_COMPUTE_OPS:
                continue
            key = (node.op_type, "")
        else:
            key = (node.op_type, node.domain)
        counts[key] = counts.get(key, 0) + 1
    return [UncountedOp(op, domain, nodes) for (op, domain), nodes in counts.items()]


@dataclasses.dataclass(frozen=True)
class ChannelMismatch:
    """A convolution whose weight takes a different number of input channels than it gets.

    ONNX's Conv shape inference does not compare the two, so ``onnx.checker`` (even with
    ``full_check``) passes such a model; ONNX Runtime refuses to run it. Its MACs are counted
    from the weight, for a layer that cannot run.

    Attributes:
        node: the node's name, as in :class:`LayerMetrics`.
        op: ``Conv`` or ``ConvTranspose``.
        input_channels: channels of the input tensor.
        weight_channels: input channels the weight and ``group`` take.
    """

    node: str
    op: str
    input_channels: int
    weight_channels: int

    def message(self) -> str:
        return (
            f"{self.op} {self.node!r} gets {self.input_channels} input channels but its weight "
            f"takes {self.weight_channels} (ONNX Runtime will refuse to run it); "
            "its MACs are counted from the weight"
        )


def _static_dims(value: ir.Value | None) -> tuple[int, ...] | None:
    """The dims of a value when all of them are known numbers, else None."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(int(d) for d in value.const_value.shape.numpy())
    if value.shape is None:
        return None
    dims = tuple(d for d in value.shape if isinstance(d, int))
    return dims if len(dims) == len(value.shape) else None


def channel_mismatches(model: ir.Model) -> list[ChannelMismatch]:
    """Conv/ConvTranspose nodes whose input channel count disagrees with their weight.

    Reads the shapes on the values: run it after :func:`model_metrics` (or shape inference).
    Nodes whose input channels or weight shape are unknown are not judged.
    """
    found = []
    for index, node in enumerate(_compute_nodes(model)):
        if node.op_type not in ("Conv", "ConvTranspose") or len(node.inputs) < 2:
            continue
        x = node.inputs[0]
        weight = _static_dims(node.inputs[1])
        if x is None or x.shape is None or len(x.shape) < 2 or not weight or len(weight) < 2:
            continue
        got = x.shape[1]
        if not isinstance(got, int):
            continue
        # Conv weights are (Cout, Cin/groups, k...); ConvTranspose weights (Cin, Cout/groups, k...).
        if node.op_type == "ConvTranspose":
            takes = weight[0]
        else:
            takes = weight[1] * _int_attr(node, "group", 1)
        if got != takes:
            name = node.name or f"{node.op_type}_{index}"
            found.append(ChannelMismatch(name, node.op_type, got, takes))
    return found


# ---------------------------------------------------------------------------------------------
# The inspect table
# ---------------------------------------------------------------------------------------------


def _short_count(value: int) -> str:
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return str(value)


def _macs_total(value: int) -> str:
    if value >= 1e9:
        return f"{value / 1e9:.3f} G"
    return f"{value / 1e6:.1f} M" if value >= 1e5 else f"{value / 1e6:.4f} M"


def _dims_text(dims: tuple[int, ...] | None) -> str:
    return "x".join(str(d) for d in dims) if dims else "-"


def _channels_text(layer: LayerMetrics) -> str:
    left = "?" if layer.in_channels is None else str(layer.in_channels)
    right = "?" if layer.out_channels is None else str(layer.out_channels)
    return f"{left}->{right}"


def _clip(name: str) -> str:
    return name if len(name) <= _MAX_NAME_WIDTH else ".." + name[-(_MAX_NAME_WIDTH - 2) :]


def format_table(metrics: ModelMetrics) -> str:
    """The per-layer table ``onnxcompress inspect`` prints, followed by the totals."""
    header = ("node", "op", "in->out", "kernel", "stride", "groups", "params", "MACs", "% MACs")
    rows = []
    for layer in metrics.layers:
        share = 100.0 * layer.macs / metrics.macs if metrics.macs else 0.0
        rows.append(
            (
                _clip(layer.node),
                layer.op,
                _channels_text(layer),
                _dims_text(layer.kernel),
                _dims_text(layer.stride),
                "-" if layer.groups is None else str(layer.groups),
                f"{layer.params:,}",
                _short_count(layer.macs),
                f"{share:.1f}%",
            )
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    # Text columns read left-aligned, numbers right-aligned so their digits line up.
    numeric = {5, 6, 7, 8}

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.rjust(width) if i in numeric else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in rows)
    if not rows:
        out.append("(no Conv/ConvTranspose/Gemm/MatMul nodes)")
    out.append("")
    out.append(f"layers     {len(metrics.layers)}")
    out.append(f"params     {metrics.params / 1e6:.2f} M ({metrics.params:,})")
    out.append(
        f"MACs       {_macs_total(metrics.macs)} ({metrics.macs:,}) at batch {metrics.batch}"
    )
    if metrics.file_size is not None:
        out.append(f"file size  {metrics.file_size / 1e6:.2f} MB ({metrics.file_size:,} bytes)")
    return "\n".join(out)
