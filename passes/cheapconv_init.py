"""The data-driven initialization of the ``cheapconv`` pass: each replacement's 1×1 (and a
separable one's depthwise taps) refit by ridge least squares on calibration activations.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import Deadline
from onnxcompress.fitting.gram import GramStatistics
from onnxcompress.fitting.ridge import ridge_solve
from onnxcompress.runtime.probes import pair_statistics, patch_probe, truncated

if TYPE_CHECKING:
    from onnxcompress.passes.cheapconv import CheapConvConfig

# The pass's own logger, so its log lines read as they always did.
logger = logging.getLogger("onnxcompress.passes.cheapconv")

# Under a time budget, a layer's init fits on fewer calibration images (a spread subset) when
# all of them do not fit its share of the time; below this many it keeps the closed form.
MIN_FIT_IMAGES = 16


def fit_layer(
    cfg: CheapConvConfig,
    model: ir.Model,
    original: ir.Model,
    layer: dict[str, Any],
    nodes: list[ir.Node],
    x: np.ndarray,
) -> None:
    """Refit one replacement's 1×1 and bias (and a separable one's depthwise taps)."""
    refit_spatial = cfg.kind == "separable" and cfg.rounds > 0
    pointwise, spatial = nodes[-1], nodes[0]
    source, target = pointwise.inputs[0], pointwise.outputs[0]
    assert source is not None and source.name and target.name
    weight_value, bias_value = pointwise.inputs[1], pointwise.inputs[2]
    assert weight_value is not None and weight_value.const_value is not None
    assert bias_value is not None and bias_value.const_value is not None
    weight = weight_value.const_value.numpy()
    cout, cin = weight.shape[:2]
    before = np.concatenate(
        [weight.reshape(cout, cin), bias_value.const_value.numpy()[:, None]], axis=1
    ).T.astype(np.float64)
    assert spatial.name is not None
    probe = patch_probe(model, spatial.name) if refit_spatial else truncated(model, source.name)
    stats = pair_statistics(probe, truncated(original, target.name), x, cfg.calibration_batch)
    if refit_spatial:
        spatial_value = spatial.inputs[1]
        assert spatial_value is not None and spatial_value.const_value is not None
        kernel = spatial_value.const_value.numpy()
        taps = kernel.reshape(cin, -1).astype(np.float64)
        fit = _fit_separable(stats, taps, before, cfg.ridge, cfg.rounds)
        layer["act_rel_error_weights"] = fit.error_before
        layer["act_rel_error"] = fit.error
        if fit.error >= fit.error_before:
            return
        _set_constant(spatial_value, fit.taps.reshape(kernel.shape).astype(kernel.dtype))
        solution = fit.pointwise
    else:
        solution = ridge_solve(stats.gram, stats.cross, cfg.ridge, intercept=True)
        layer["act_rel_error_weights"] = stats.relative_error(before)
        layer["act_rel_error"] = stats.relative_error(solution)
        if layer["act_rel_error"] >= layer["act_rel_error_weights"]:
            # Only a huge ridge or degenerate data does this; keep the closed form.
            layer["act_rel_error"] = layer["act_rel_error_weights"]
            return
    dtype = weight.dtype
    _set_constant(weight_value, solution[:cin].T.reshape(weight.shape).astype(dtype))
    _set_constant(bias_value, solution[cin].astype(dtype))
    logger.info(
        "cheapconv: %s activation error %.4f (closed form %.4f)",
        layer["node"],
        layer["act_rel_error"],
        layer["act_rel_error_weights"],
    )


@dataclasses.dataclass
class _SeparableFit:
    """Depthwise taps ``[Cin, K]`` and ``[Cin+1, Cout]`` pointwise-and-bias of a data fit."""

    taps: np.ndarray
    pointwise: np.ndarray
    error_before: float
    error: float


def _fit_separable(
    stats: GramStatistics, taps: np.ndarray, start: np.ndarray, ridge: float, rounds: int
) -> _SeparableFit:
    """Alternating least squares of depthwise taps and pointwise on patch statistics.

    ``stats`` are over ``[patches, 1]`` (channel ``c`` tap ``k`` at ``c*K + k``), so the
    depthwise output's Gram is ``Dᵀ G D`` for the block-diagonal tap matrix ``D``: every
    round runs in Gram space, without touching the data again. Each half-step is an exact
    (ridge) least-squares solve, so the error cannot grow much; the best pair seen is kept.
    """
    cin, size = taps.shape
    width = cin * size

    def lift(d: np.ndarray) -> np.ndarray:
        lifted = np.zeros((width + 1, cin + 1))
        lifted[np.arange(width), np.repeat(np.arange(cin), size)] = d.ravel()
        lifted[width, cin] = 1.0
        return lifted

    def projected(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lifted = lift(d)
        return lifted.T @ stats.gram @ lifted, lifted.T @ stats.cross

    gram, cross = projected(taps)
    error_before = stats.relative_error(start, gram, cross)
    best = (error_before, taps, start)
    d = taps
    patch_gram, patch_sum = stats.gram[:width, :width], stats.gram[:width, width]
    for _ in range(rounds):
        gram, cross = projected(d)
        solution = ridge_solve(gram, cross, ridge, intercept=True)
        error = stats.relative_error(solution, gram, cross)
        if error < best[0]:
            best = (error, d, solution)
        pointwise, bias = solution[:cin].T, solution[cin]  # [Cout, Cin], [Cout]
        # y - b ≈ Σ_c P[:, c] Σ_k d_ck φ_ck: linear in d with the Gram below.
        mixing = np.kron(pointwise.T @ pointwise, np.ones((size, size)))
        rhs_full = (stats.cross[:width] - np.outer(patch_sum, bias)) @ pointwise  # [CK, Cin]
        rhs = rhs_full.reshape(cin, size, cin)[np.arange(cin), :, np.arange(cin)].ravel()
        flat = ridge_solve(patch_gram * mixing, rhs[:, None], ridge, intercept=False)[:, 0]
        d = flat.reshape(cin, size)
        # Unit-norm taps keep the factors balanced; the next pointwise solve absorbs the scale.
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        d = np.where(norms > 0, d / np.maximum(norms, 1e-30), taps)
    gram, cross = projected(d)
    solution = ridge_solve(gram, cross, ridge, intercept=True)
    error = stats.relative_error(solution, gram, cross)
    if error < best[0]:
        best = (error, d, solution)
    return _SeparableFit(taps=best[1], pointwise=best[2], error_before=error_before, error=best[0])


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    assert value.name is not None
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def fit_images(
    deadline: Deadline, per_image: float | None, layers_left: int, available: int
) -> int:
    """Calibration images the next layer's init fits on: all while an even share of what is
    left of ``deadline`` holds them at ``per_image`` seconds each (the slowest fit so far; None
    before the first, which gets all), fewer when not, 0 (the closed form) below
    ``MIN_FIT_IMAGES``."""
    if not deadline.limited or per_image is None:
        return 0 if deadline.expired() else available
    share = deadline.remaining() / max(layers_left, 1)
    count = min(available, int(share / max(per_image, 1e-12)))
    return count if count >= min(MIN_FIT_IMAGES, available) else 0


__all__ = ["MIN_FIT_IMAGES", "fit_images", "fit_layer"]
