"""The primitives that edit weights for structural passes: remove channels, fold compensation.

Every structural pass (``lrf``, ``merge``) decides *which* channels go and *what* replaces them;
this module applies a channel group's rules so that every member is edited consistently: it
slices the group's weights, lets each op family's rule rewrite its layout constants
(``LayoutFixup.apply``) and fold a compensation bias (``OpRule.fold_bias``).

Typical use, removing channel ``r`` of a group after expressing it through the kept ones::

    analysis = analyze_channels(model)
    group = analysis.prunable[0]
    fold_compensation(model, group, remove=[r], keep=keep, matrix=lam[None, :], bias=beta)
    remove_channels(model, group, [r])

Indices are the group's current channel indices (``0 <= i < group.size``); after a removal the
survivors are renumbered in their original order. The
:class:`~onnxcompress.graph.channels.ChannelAnalysis` the group came from stays valid across
removals (it tracks what is gone), as long as the graph is edited only through this module.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.canonicalize import infer_shapes
from onnxcompress.graph.channels import ChannelAnalysis, ChannelGroup, WeightSlice, rule_for

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
    value. Shared initializers are copied first, so other users keep the original. A weight
    stored quantized (int8 behind a DequantizeLinear) is cut in its stored form, with its
    per-channel scales and zero points when the cut runs along their axis.

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
        ws.cut(graph, positions)
    analysis.mark_removed(components)
    for fix in group.fixups:
        fix.apply(graph, analysis)
    for tensor in group.tensors:
        _set_channel_dim(tensor, group.axis(tensor), analysis.channel_count(tensor))
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


def _set_channel_dim(value: ir.Value, axis: int, count: int) -> None:
    shape = value.shape
    if shape is None or len(shape) <= axis or not isinstance(shape[axis], int):
        return
    dims = list(shape.dims)
    dims[axis] = count
    value.shape = ir.Shape(dims)


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
    slice it); a MatMul gets its bias through the ``Add`` that follows it, or a new one. A
    consumer stored quantized is re-encoded at its scales (grown only where the new values
    overflow), so there the fold is exact only up to half a quantization step per changed weight.

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
    rule = rule_for(ws.node)
    if rule is None:
        raise ValueError(f"cannot fold a compensation into {ws.node.op_type} {ws.node.name}")
    positions = group.positions(ws.tensor)
    rows_removed, rows_kept = positions[removed], positions[kept]
    # Decoded to floats when the weight is stored quantized; the rule re-encodes it.
    original = ws.array()
    weight = original.astype(np.float64)
    moved = np.moveaxis(weight, ws.axis, 0)  # a view: writes land in ``weight``
    taken = moved[rows_removed]  # [R, m, ...], copied before any update
    for block in range(positions.shape[1]):
        moved[rows_kept[:, block]] += np.tensordot(coefficients.T, taken[:, block], axes=1)
    rule.write_weight(model.graph, group.analysis, ws, weight.astype(original.dtype))
    if constant is None or not np.any(constant):
        return
    assert ws.out_axis is not None, "consumer slices always name their output axis"
    # Sum the removed inputs' weights over every axis except the consumer's outputs.
    out_axis = ws.out_axis if ws.out_axis < ws.axis else ws.out_axis - 1
    weighted = np.tensordot(constant, taken, axes=1)  # [m, *rest]
    weighted = np.moveaxis(weighted, out_axis + 1, 0)
    contribution = weighted.reshape(weighted.shape[0], -1).sum(axis=1)
    rule.fold_bias(model, group.analysis, ws, contribution)
