"""The primitives that edit weights for structural passes: remove channels, fold compensation.

Every structural pass (``lrf``, ``merge``) decides *which* channels go and *what* replaces them;
this module does the editing so that every member of a channel group is sliced consistently.

Typical use, removing channel ``r`` of a group after expressing it through the kept ones::

    analysis = analyze_channels(model)
    group = analysis.prunable[0]
    fold_compensation(model, group, remove=[r], keep=keep, matrix=lam[None, :], bias=beta)
    remove_channels(model, group, [r])

Indices are the group's current channel indices (``0 <= i < group.size``); after a removal the
survivors are renumbered in their original order. The :class:`~onnxcompress.channels
.ChannelAnalysis` the group came from stays valid across removals (it tracks what is gone), as
long as the graph is edited only through this module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.channels import ChannelAnalysis, ChannelGroup, LayoutFixup, WeightSlice
from onnxcompress.model import fresh_name, infer_shapes, private_initializer, set_initializer

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Removing channels
# ---------------------------------------------------------------------------------------------


def remove_channels(
    model: ir.Model,
    group: ChannelGroup,
    remove: Sequence[int],
    *,
    refresh_shapes: bool = False,
) -> None:
    """Delete channels of ``group`` from every tensor and weight they touch.

    Slices every producer's output axis, every consumer's input axis (whole column blocks after
    a Flatten), every per-channel parameter (BatchNormalization, PRelu, per-channel constants,
    depthwise kernels), rewrites the layout constants that depend on the channel count (Slice
    bounds, Split sizes, Pad amounts for zero channels, Reshape targets that spell a channel
    count, a depthwise Conv's ``group``) and updates the static channel dim of every affected
    value. Shared initializers are copied first, so other users keep the original.

    The output is exactly the input model's output when the removed channels carry no signal
    into any consumer (e.g. all-zero filters and zero bias with a zero-preserving path); in
    general call :func:`fold_compensation` first.

    Args:
        model: the model ``group`` was computed on (edited in place).
        group: a group from ``analyze_channels(model)``; must not be frozen.
        remove: the group's channel indices to delete (current numbering, no duplicates).
        refresh_shapes: re-run ONNX shape inference afterwards (the static channel dims are
            updated either way; inference also refreshes derived dims and costs time).

    Raises:
        ValueError: the group is frozen or comes from another model, an index is out of range
            or repeated, or the removal would leave the group without channels.
    """
    analysis = _check_group(model, group)
    indices = _check_indices(group, remove, "remove")
    if indices.size == 0:
        return
    if indices.size >= group.size:
        raise ValueError(
            f"removing {indices.size} of the {group.size} channels of group {group.id} "
            f"({group.name}) would leave none; at least one channel must stay"
        )
    graph = model.graph
    components = group.components[indices]
    slices = _unique_slices(group.slices)
    # Positions first, from the current layout; every slice is cut before the layout changes.
    cuts = [(ws, group.positions(ws.tensor)[indices].reshape(-1)) for ws in slices]
    for ws, positions in cuts:
        value = private_initializer(graph, ws.node, ws.input_index)
        array = value.const_value.numpy()  # type: ignore[union-attr]
        set_initializer(graph, value, np.delete(array, positions, axis=ws.axis))
    analysis.mark_removed(components)
    for fix in group.fixups:
        _FIXUPS[fix.kind](graph, analysis, fix)
    for tensor in group.tensors:
        _set_channel_dim(tensor, analysis.channel_count(tensor))
    logger.debug("removed %d channels from group %d (%s)", indices.size, group.id, group.name)
    if refresh_shapes:
        infer_shapes(model)


def _check_group(model: ir.Model, group: ChannelGroup) -> ChannelAnalysis:
    analysis = group.analysis
    if analysis.model is not model:
        raise ValueError(f"group {group.id} was computed on another model; re-run analyze_channels")
    if group.frozen_reason is not None:
        raise ValueError(f"group {group.id} ({group.name}) is frozen: {group.frozen_reason}")
    return analysis


def _check_indices(group: ChannelGroup, indices: Sequence[int], label: str) -> np.ndarray:
    array = np.asarray(list(indices), dtype=np.int64).reshape(-1)
    if array.size and (array.min() < 0 or array.max() >= group.size):
        raise ValueError(
            f"{label} index out of range for group {group.id} with {group.size} channels: "
            f"{array.tolist()}"
        )
    if np.unique(array).size != array.size:
        raise ValueError(f"{label} indices repeat: {array.tolist()}")
    return array


def _unique_slices(slices: Sequence[WeightSlice]) -> list[WeightSlice]:
    seen: set[tuple[int, int, int, int]] = set()
    result = []
    for ws in slices:
        key = (id(ws.node), ws.input_index, ws.axis, id(ws.tensor))
        if key not in seen:
            seen.add(key)
            result.append(ws)
    return result


def _set_channel_dim(value: ir.Value, count: int) -> None:
    shape = value.shape
    if shape is None or len(shape) < 2 or not isinstance(shape[1], int):
        return
    dims = list(shape.dims)
    dims[1] = count
    value.shape = ir.Shape(dims)


# ---------------------------------------------------------------------------------------------
# Layout fixups: one handler per LayoutFixup.kind
# ---------------------------------------------------------------------------------------------

_Fixup = Callable[[ir.Graph, ChannelAnalysis, LayoutFixup], None]


def _write_ints(graph: ir.Graph, node: ir.Node, index: int, values: Sequence[int]) -> None:
    """Give constant input ``index`` of ``node`` new integer contents (same dtype)."""
    value = private_initializer(graph, node, index)
    dtype = value.const_value.numpy().dtype  # type: ignore[union-attr]
    set_initializer(graph, value, np.asarray(values, dtype=dtype))


def _set_entry(graph: ir.Graph, node: ir.Node, index: int, position: int, number: int) -> None:
    value = private_initializer(graph, node, index)
    array = value.const_value.numpy().copy()  # type: ignore[union-attr]
    array.reshape(-1)[position] = number
    set_initializer(graph, value, array)


def _new_int_input(graph: ir.Graph, node: ir.Node, index: int, values: Sequence[int]) -> None:
    name = fresh_name(graph, f"{node.name or node.op_type}_{index}")
    array = np.asarray(values, dtype=np.int64)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.INT64)
    graph.register_initializer(value)
    if len(node.inputs) <= index:
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _fix_conv_group(graph: ir.Graph, analysis: ChannelAnalysis, fix: LayoutFixup) -> None:
    count = analysis.channel_count(fix.config["input"]) // fix.config["per_group"]
    fix.node.attributes["group"] = ir.AttrInt64("group", count)


def _fix_split(graph: ir.Graph, analysis: ChannelAnalysis, fix: LayoutFixup) -> None:
    sizes = [analysis.channel_count(out) for out in fix.config["outputs"]]
    node, form = fix.node, fix.config["form"]
    opset = _opset(graph, analysis)
    if form == "input":
        _write_ints(graph, node, 1, sizes)
    elif form == "attr" or opset < 13:
        node.attributes["split"] = ir.AttrInt64s("split", sizes)
    else:
        node.attributes.pop("num_outputs", None)
        _new_int_input(graph, node, 1, sizes)


def _fix_slice(graph: ir.Graph, analysis: ChannelAnalysis, fix: LayoutFixup) -> None:
    x, y = fix.config["input"], fix.config["output"]
    alive_out = np.flatnonzero(analysis.alive(y))
    start = int(analysis.current_positions(x)[fix.config["start"] + alive_out[0]])
    end = start + alive_out.size
    entry = fix.config["entry"]
    if fix.config["form"] == "attr":
        for name, number in (("starts", start), ("ends", end)):
            values = list(fix.node.attributes[name].as_ints())
            values[entry] = number
            fix.node.attributes[name] = ir.AttrInt64s(name, values)
        return
    _set_entry(graph, fix.node, 1, entry, start)
    _set_entry(graph, fix.node, 2, entry, end)


def _fix_gather(graph: ir.Graph, analysis: ChannelAnalysis, fix: LayoutFixup) -> None:
    x, y = fix.config["input"], fix.config["output"]
    picked = fix.config["indices"][analysis.alive(y)]
    _write_ints(graph, fix.node, 1, analysis.current_positions(x)[picked].tolist())


def _fix_pad(graph: ir.Graph, analysis: ChannelAnalysis, fix: LayoutFixup) -> None:
    alive = analysis.alive(fix.config["output"])
    before = int(alive[: fix.config["before"]].sum())
    after = int(alive[alive.size - fix.config["after"] :].sum()) if fix.config["after"] else 0
    entries = ((fix.config["entry_before"], before), (fix.config["entry_after"], after))
    if fix.config["form"] == "attr":
        pads = list(fix.node.attributes["pads"].as_ints())
        for entry, number in entries:
            pads[entry] = number
        fix.node.attributes["pads"] = ir.AttrInt64s("pads", pads)
        return
    for entry, number in entries:
        _set_entry(graph, fix.node, 1, entry, number)


def _fix_shape_entry(graph: ir.Graph, analysis: ChannelAnalysis, fix: LayoutFixup) -> None:
    node, index, position = fix.config["address"]
    _set_entry(graph, node, index, position, analysis.channel_count(fix.config["tensor"]))


_FIXUPS: dict[str, _Fixup] = {
    "conv_group": _fix_conv_group,
    "split": _fix_split,
    "slice": _fix_slice,
    "gather": _fix_gather,
    "pad": _fix_pad,
    "shape_entry": _fix_shape_entry,
}


def _opset(graph: ir.Graph, analysis: ChannelAnalysis) -> int:
    imports = analysis.model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 17)))


# ---------------------------------------------------------------------------------------------
# Compensation
# ---------------------------------------------------------------------------------------------


def fold_compensation(
    model: ir.Model,
    group: ChannelGroup,
    remove: Sequence[int],
    keep: Sequence[int],
    matrix: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    consumers: Sequence[WeightSlice] | None = None,
) -> None:
    """Fold "channel r = sum_k matrix[r, k] * channel k + bias[r]" into the consumers.

    For every consumer weight ``W`` (input axis over the group's channels)::

        W[:, keep] += W[:, remove] @ matrix           (per position, for column blocks)
        b_consumer += sum_r bias[r] * W[:, r].sum(over every other input axis)

    so that after the removed channels are deleted (:func:`remove_channels`, called next by the
    pass) each consumer computes what it computed before, wherever the relation holds. The
    relation is about the channels *as the consumer reads them* (its input tensor,
    ``group.consumer_inputs``); whether a relation fitted on the producers' filters carries over
    is the caller's concern (``group.linear_path``). Nothing is removed here.

    The bias part is exact for Gemm/MatMul consumers; for a Conv with zero padding it is exact
    in the interior and approximate at the borders, where the padded zeros do not carry the
    constant. A consumer without a bias gets one (registered with the analysis so later removals
    slice it); a MatMul gets its bias through the ``Add`` that follows it, or a new one.

    Args:
        model: the model ``group`` was computed on (edited in place).
        group: a non-frozen group.
        remove: channel indices (current numbering) that are about to be removed.
        keep: channel indices the removed ones are expressed in; disjoint from ``remove``.
        matrix: ``[len(remove), len(keep)]`` coefficients.
        bias: ``[len(remove)]`` constant parts, or None.
        consumers: restrict the fold to these consumer slices (default: every consumer of the
            group), e.g. to fold a different relation per consumer input.

    Raises:
        ValueError: frozen group, bad indices, shapes that do not match, non-finite values, or a
            consumer that is not one of the group's.
    """
    _check_group(model, group)
    removed = _check_indices(group, remove, "remove")
    kept = _check_indices(group, keep, "keep")
    if np.intersect1d(removed, kept).size:
        raise ValueError("remove and keep share channels")
    coefficients = np.asarray(matrix, dtype=np.float64)
    if coefficients.shape != (removed.size, kept.size):
        raise ValueError(
            f"matrix has shape {coefficients.shape}, expected ({removed.size}, {kept.size})"
        )
    constant = None if bias is None else np.asarray(bias, dtype=np.float64).reshape(-1)
    if constant is not None and constant.size != removed.size:
        raise ValueError(f"bias has {constant.size} entries, expected {removed.size}")
    if not np.isfinite(coefficients).all() or (
        constant is not None and not np.isfinite(constant).all()
    ):
        raise ValueError("the compensation has non-finite values")
    targets = group.consumers
    if consumers is not None:
        unknown = [ws for ws in consumers if all(ws is not t for t in targets)]
        if unknown:
            raise ValueError(f"not a consumer of group {group.id}: {unknown[0].describe()}")
        targets = list(consumers)
    if removed.size == 0:
        return
    for ws in _unique_slices(targets):
        _fold_into(model, group, ws, removed, kept, coefficients, constant)


def _fold_into(
    model: ir.Model,
    group: ChannelGroup,
    ws: WeightSlice,
    removed: np.ndarray,
    kept: np.ndarray,
    coefficients: np.ndarray,
    constant: np.ndarray | None,
) -> None:
    graph = model.graph
    positions = group.positions(ws.tensor)
    rows_removed, rows_kept = positions[removed], positions[kept]
    value = private_initializer(graph, ws.node, ws.input_index)
    original = value.const_value.numpy()  # type: ignore[union-attr]
    weight = original.astype(np.float64)
    moved = np.moveaxis(weight, ws.axis, 0)  # a view: writes land in ``weight``
    taken = moved[rows_removed]  # [R, m, ...], copied before any update
    for block in range(positions.shape[1]):
        moved[rows_kept[:, block]] += np.tensordot(coefficients.T, taken[:, block], axes=1)
    set_initializer(graph, value, weight.astype(original.dtype))
    if constant is None or not np.any(constant):
        return
    assert ws.out_axis is not None, "consumer slices always name their output axis"
    # Sum the removed inputs' weights over every axis except the consumer's outputs.
    out_axis = ws.out_axis if ws.out_axis < ws.axis else ws.out_axis - 1
    weighted = np.tensordot(constant, taken, axes=1)  # [m, *rest]
    weighted = np.moveaxis(weighted, out_axis + 1, 0)
    contribution = weighted.reshape(weighted.shape[0], -1).sum(axis=1)
    _add_consumer_bias(model, group.analysis, ws, contribution)


def _add_consumer_bias(
    model: ir.Model, analysis: ChannelAnalysis, ws: WeightSlice, contribution: np.ndarray
) -> None:
    graph, node = model.graph, ws.node
    output = node.outputs[0]
    dtype = ws.array().dtype
    if node.op_type in ("Conv", "ConvTranspose"):
        _add_bias_input(graph, analysis, node, 2, contribution, dtype, output)
    elif node.op_type == "Gemm":
        alpha = _float_attr(node, "alpha", 1.0)
        beta = _float_attr(node, "beta", 1.0)
        if beta == 0.0:
            node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                # C was ignored; zero it rather than drop it so its slices stay valid.
                current = private_initializer(graph, node, 2)
                zeros = np.zeros_like(current.const_value.numpy())  # type: ignore[union-attr]
                set_initializer(graph, current, zeros)
            beta = 1.0
        _add_bias_input(graph, analysis, node, 2, contribution * alpha / beta, dtype, output)
    elif node.op_type == "MatMul":
        _add_matmul_bias(model, analysis, node, contribution, dtype)
    else:
        raise ValueError(f"cannot fold a bias into {node.op_type} {node.name}")


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def _add_bias_input(
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


def _add_matmul_bias(
    model: ir.Model,
    analysis: ChannelAnalysis,
    node: ir.Node,
    contribution: np.ndarray,
    dtype: np.dtype,
) -> None:
    graph, output = model.graph, node.outputs[0]
    uses = list(output.uses())
    if len(uses) == 1 and not output.is_graph_output() and uses[0].node.op_type == "Add":
        add = uses[0].node
        other = 1 - uses[0].idx
        constant = add.inputs[other]
        if constant is not None and constant.const_value is not None:
            shape = constant.const_value.shape
            if len(shape) <= 2 and (len(shape) == 0 or shape[0] == 1 or len(shape) == 1):
                _add_bias_input(graph, analysis, add, other, contribution, dtype, add.outputs[0])
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
