"""Closed-form fits of the ``resect`` pass's bridges: a 1x1 Conv that reproduces a removed
part's output from its input, by ridge regression on activations captured with ONNX Runtime.

It sits next to the pass rather than in ``onnxcompress.graph.resection`` (the graph layer runs
no model) or in ``onnxcompress.runtime`` (which runs models but fits nothing): it needs both a
runtime session and the regression, and the resect pass is its one user, as ``lrf`` fits its
compensation on captured activations in its own pass module.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.fitting.gram import GramAccumulator
from onnxcompress.fitting.ridge import ridge_solve
from onnxcompress.graph.resection import BridgeFit, BridgeFitter

if TYPE_CHECKING:
    import onnxruntime as ort


def _session_for(model: ir.Model, names: Sequence[str]) -> ort.InferenceSession:
    from onnxcompress.runtime.capture import with_extra_outputs
    from onnxcompress.runtime.session import make_session

    return make_session(with_extra_outputs(model, list(names)), optimize=False)


def fit_bridge(
    source: ir.Model,
    entry: str,
    target: ir.Model,
    exit_: str,
    stride: tuple[int, int],
    x: np.ndarray,
    *,
    ridge: float = 1e-4,
    batch_size: int = 64,
) -> BridgeFit:
    """Ridge regression of ``target``'s tensor ``exit_`` on ``source``'s tensor ``entry``.

    At output position (i, j) the 1x1 bridge with stride s reads input position (s i, s j),
    so the fit pairs those positions. Only the normal equations (``[Cin+1]^2`` and
    ``[Cin+1] x Cout``) are accumulated, in float64, batch by batch.

    Args:
        source: the model whose ``entry`` tensor the bridge will read (the student).
        target: the model whose ``exit_`` tensor the bridge should reproduce (the original).
        ridge: the ridge term relative to the mean input energy (the bias is not penalized).
    """
    same = source is target
    names_source = [entry, exit_] if same else [entry]
    session_source = _session_for(source, names_source)
    session_target = None if same else _session_for(target, [exit_])
    accumulator = GramAccumulator(intercept=True)
    sh, sw = stride
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        feeds_s = {session_source.get_inputs()[0].name: batch}
        outs = session_source.run(names_source, feeds_s)
        inputs = np.asarray(outs[0])
        if same:
            outputs = np.asarray(outs[1])
        else:
            assert session_target is not None
            feeds_t = {session_target.get_inputs()[0].name: batch}
            outputs = np.asarray(session_target.run([exit_], feeds_t)[0])
        sampled = inputs[:, :, ::sh, ::sw]
        if sampled.shape[2:] != outputs.shape[2:]:
            raise ValueError(
                f"bridge {entry!r} -> {exit_!r}: stride {stride} gives {sampled.shape[2:]}, "
                f"the target is {outputs.shape[2:]}"
            )
        accumulator.add(sampled, outputs, channel_axis=1)
    if accumulator.empty:
        raise ValueError("fit_bridge needs at least one calibration image")
    stats = accumulator.statistics()
    gram, cross, rows = stats.gram, stats.cross, stats.count
    target_energy, target_sum = stats.target_sq, stats.target_sum
    cin = gram.shape[0] - 1
    # LU, and a singular system raises, as the bridges were always fitted.
    solution = ridge_solve(
        gram,
        cross,
        ridge,
        intercept=True,
        scale_floor=1e-12,
        factorization="lu",
        fallback="raise",
    )
    residual = target_energy - 2 * np.einsum("ij,ij->j", solution, cross)
    residual += np.einsum("ij,ik,kj->j", solution, gram, solution)
    variance = target_energy - target_sum**2 / max(rows, 1)
    total_variance = float(variance.sum())
    r2 = 1.0 - float(np.maximum(residual, 0).sum()) / total_variance if total_variance > 0 else 1.0
    weight = solution[:cin].T.reshape(-1, cin, 1, 1).astype(np.float32)
    bias = solution[cin].astype(np.float32)
    return BridgeFit(weight=weight, bias=bias, r2=r2, positions=rows)


def bridge_fitter(
    calibration: np.ndarray, *, ridge: float = 1e-4, batch_size: int = 64
) -> BridgeFitter:
    """The ``BridgeFitter`` of ``onnxcompress.graph.resection`` that fits on ``calibration``."""

    def fit(
        source: ir.Model, entry: str, target: ir.Model, exit_: str, stride: tuple[int, int]
    ) -> BridgeFit:
        return fit_bridge(
            source, entry, target, exit_, stride, calibration, ridge=ridge, batch_size=batch_size
        )

    return fit


__all__ = ["bridge_fitter", "fit_bridge"]
