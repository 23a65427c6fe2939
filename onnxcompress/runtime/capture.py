"""Intermediate tensors on calibration data, gathered through ONNX Runtime.

Passes that fit on activations (``lrf`` and ``merge`` with ``criterion=activations``, resection
bridges) read tensors inside the graph: they are exposed as extra graph outputs of a private copy
of the model (:func:`with_extra_outputs`), and the data runs through in batches.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.model_io import clone_model

logger = logging.getLogger(__name__)


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
