"""What a structured-pruning pass reads about a channel group: one Gram view per tensor read.

A view pairs the channels' second moments (from filters, or from calibration activations) with
the outgoing weights of the consumers reading that tensor; ``lrf`` and ``merge`` fit on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.fitting.gram import GramAccumulator
from onnxcompress.graph.channels import ChannelGroup, WeightSlice


@dataclasses.dataclass
class View:
    """One place the group's channels are read: its Gram and the consumers reading there."""

    gram: np.ndarray
    outgoing_gram: np.ndarray
    consumers: list[WeightSlice]


def consumers_by_tensor(group: ChannelGroup) -> dict[str, list[WeightSlice]]:
    """The group's consumers keyed by the tensor they read (in first-seen order)."""
    by_tensor: dict[str, list[WeightSlice]] = {}
    for ws in group.consumers:
        by_tensor.setdefault(ws.tensor.name or "", []).append(ws)
    return by_tensor


def activation_views(
    model: ir.Model, groups: Sequence[ChannelGroup], x: np.ndarray, batch: int
) -> dict[int, list[View]]:
    """Per group, one view per distinct tensor its consumers read, on calibration data.

    Each view's Gram is augmented ``[C+1, C+1]`` (last: the constant) so the fit has an
    intercept, which lands in the consumers' biases.

    Args:
        model: the model, run as it is now.
        groups: the groups to capture.
        x: the calibration batch for the model's first input.
        batch: images per ONNX Runtime call.
    """
    from onnxcompress.runtime.capture import run_batches, with_extra_outputs
    from onnxcompress.runtime.session import make_session

    readers = {group.id: consumers_by_tensor(group) for group in groups}
    names = list(dict.fromkeys(n for by in readers.values() for n in by))
    session = make_session(with_extra_outputs(model, names), optimize=False)
    accumulators = {
        (g.id, n): GramAccumulator(intercept=True) for g in groups for n in readers[g.id]
    }
    positions = {
        (g.id, n): (g.positions(slices[0].tensor), g.axis(slices[0].tensor))
        for g in groups
        for n, slices in readers[g.id].items()
    }
    for outputs in run_batches(session, x, batch, names):
        arrays = dict(zip(names, outputs, strict=True))
        for key, (pos, axis) in positions.items():
            accumulators[key].add(_channel_samples(arrays[key[1]], pos, axis), channel_axis=-1)
    # No calibration image (an empty array) leaves the Grams at zero.
    grams = {
        (g.id, n): accumulators[(g.id, n)].statistics().gram
        if not accumulators[(g.id, n)].empty
        else np.zeros((g.size + 1, g.size + 1))
        for g in groups
        for n in readers[g.id]
    }
    views: dict[int, list[View]] = {}
    for group in groups:
        # Channels no weighted layer reads (dropped by a Slice, say) cost nothing to remove.
        views[group.id] = (
            []
            if readers[group.id]
            else [View(np.eye(group.size + 1), np.zeros((group.size, group.size)), [])]
        )
        for name, slices in readers[group.id].items():
            rows = group.slice_matrix(slices)
            views[group.id].append(View(grams[(group.id, name)], rows @ rows.T, slices))
    return views


def _channel_samples(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Rows = samples × positions × other axes, columns = the group's channels (float64).

    ``positions[i]`` lists channel ``i``'s places on the channel ``axis`` (several after a
    Flatten, where channel i owns a block of columns: each block position is paired across
    channels).
    """
    size, multiplicity = positions.shape
    array = np.moveaxis(array, axis, 1)
    taken = np.take(array, positions.reshape(-1), axis=1)
    shaped = taken.reshape(array.shape[0], size, multiplicity, *array.shape[2:])
    moved = np.moveaxis(shaped, 1, -1)
    return moved.reshape(-1, size).astype(np.float64)
