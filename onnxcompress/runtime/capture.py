"""Intermediate tensors on calibration data, gathered through ONNX Runtime.

Passes that fit on activations (``lrf`` and ``merge`` with ``criterion=activations``, resection
bridges) read tensors inside the graph: they are exposed as extra graph outputs of a private copy
of the model (:func:`with_extra_outputs`), and the data runs through in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.model_io import clone_model

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)


def run_batches(
    session: ort.InferenceSession, x: np.ndarray, batch: int, names: Sequence[str] | None = None
) -> Iterator[list[np.ndarray]]:
    """The outputs ``names`` (None: all) of ``session`` on ``x``, one list per batch.

    A model exported with a fixed batch size (often 1) only accepts batches of that size: it is
    run in batches of exactly that many, the last one padded with zeros and its outputs cut back
    to the real images (each image's outputs are its own in inference), so callers see the
    same batches whatever the export fixed.
    """
    shape = session.get_inputs()[0].shape
    fixed = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    step = fixed or batch
    input_name = session.get_inputs()[0].name
    for start in range(0, len(x), step):
        chunk = x[start : start + step]
        size = len(chunk)
        if fixed is not None and size < fixed:
            padding = np.zeros((fixed - size, *chunk.shape[1:]), dtype=chunk.dtype)
            chunk = np.concatenate([chunk, padding])
        outputs = [np.asarray(o) for o in session.run(names, {input_name: chunk})]
        if fixed is not None and size < fixed:
            outputs = [o[:size] if o.ndim and o.shape[0] == fixed else o for o in outputs]
        yield outputs


def capture_tensors(
    model: ir.Model,
    tensor_names: Sequence[str],
    x: np.ndarray,
    *,
    batch_size: int = 64,
    provider: str | None = None,
) -> dict[str, np.ndarray]:
    """The full values of a few named tensors over ``x`` (for small captures and tests)."""
    from onnxcompress.runtime.session import make_session

    names = list(dict.fromkeys(tensor_names))
    session = make_session(with_extra_outputs(model, names), provider=provider, optimize=False)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for outputs in run_batches(session, x, batch_size, names):
        for name, array in zip(names, outputs, strict=True):
            parts[name].append(array)
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
