"""Activation statistics on calibration data, gathered through ONNX Runtime.

Passes that fit on activations (``lrf`` and ``merge`` with ``criterion=activations``) need, per
channel group, the second moments of the tensors the group's consumers read. Holding every
activation of a ResNet-50 over 512 images would take tens of GB, so tensors are exposed as extra
graph outputs, the data runs through in batches, and only per-channel sums and Gram matrices
(C x C) are kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.model import clone_model

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class ChannelStats:
    """Second-order statistics of one tensor's channels over all samples and positions.

    Attributes:
        gram: sum over positions of y y^T, shape [C, C] (float64).
        total: sum over positions of y, shape [C].
        count: number of positions (samples x spatial positions).
    """

    gram: np.ndarray
    total: np.ndarray
    count: int

    @property
    def channels(self) -> int:
        return int(self.gram.shape[0])

    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def augmented_gram(self) -> np.ndarray:
        """Gram of [y, 1]: the last row/column carries the intercept for affine fits."""
        c = self.channels
        out = np.empty((c + 1, c + 1))
        out[:c, :c] = self.gram
        out[:c, c] = out[c, :c] = self.total
        out[c, c] = self.count
        return out

    def __add__(self, other: ChannelStats) -> ChannelStats:
        return ChannelStats(
            self.gram + other.gram, self.total + other.total, self.count + other.count
        )


def accumulate(stats: ChannelStats | None, array: np.ndarray) -> ChannelStats:
    """Add a batch ``[N, C, ...]`` (or ``[N, C]``) to ``stats``."""
    channels = array.shape[1]
    # positions x channels; float64 so sums over millions of positions stay exact enough
    flat = np.moveaxis(array, 1, -1).reshape(-1, channels).astype(np.float64, copy=False)
    gram = flat.T @ flat
    total = flat.sum(axis=0)
    update = ChannelStats(gram, total, flat.shape[0])
    return update if stats is None else stats + update


def collect_channel_stats(
    model: ir.Model,
    tensor_names: Iterable[str],
    x: np.ndarray,
    *,
    batch_size: int = 32,
    provider: str | None = None,
    progress: bool = False,
) -> dict[str, ChannelStats]:
    """Run ``x`` through ``model`` and return channel statistics of the named tensors.

    The model is not modified: the tensors are exposed as outputs of a private copy.
    """
    from onnxcompress.runtime import make_session

    names = list(dict.fromkeys(tensor_names))
    if not names:
        return {}
    probe = with_extra_outputs(model, names)
    session = make_session(probe, provider=provider, optimize=False)
    input_name = session.get_inputs()[0].name
    stats: dict[str, ChannelStats] = {}
    batches = range(0, len(x), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="calibration", unit="batch", leave=False)
    for start in batches:
        outputs = session.run(names, {input_name: x[start : start + batch_size]})
        for name, array in zip(names, outputs, strict=True):
            stats[name] = accumulate(stats.get(name), np.asarray(array))
    return stats


def capture_tensors(
    model: ir.Model,
    tensor_names: Sequence[str],
    x: np.ndarray,
    *,
    batch_size: int = 64,
    provider: str | None = None,
) -> dict[str, np.ndarray]:
    """The full values of a few named tensors over ``x`` (for small captures and tests)."""
    from onnxcompress.runtime import make_session

    names = list(dict.fromkeys(tensor_names))
    session = make_session(with_extra_outputs(model, names), provider=provider, optimize=False)
    input_name = session.get_inputs()[0].name
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for start in range(0, len(x), batch_size):
        for name, array in zip(
            names, session.run(names, {input_name: x[start : start + batch_size]}), strict=True
        ):
            parts[name].append(np.asarray(array))
    return {name: np.concatenate(chunks) for name, chunks in parts.items()}


def with_extra_outputs(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose graph also outputs the named intermediate tensors."""
    probe = clone_model(model)
    values = {v.name: v for node in probe.graph for v in node.outputs}
    values.update({v.name: v for v in probe.graph.inputs})
    existing = {v.name for v in probe.graph.outputs}
    for name in names:
        if name in existing:
            continue
        value = values.get(name)
        if value is None:
            raise KeyError(f"no tensor named {name!r} in the model")
        probe.graph.outputs.append(value)
    return probe
