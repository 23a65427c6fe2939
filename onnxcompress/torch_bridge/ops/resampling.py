"""Resampling ops for the torch bridge.

Resize and Upsample, with ONNX Runtime's coordinate transforms and interpolation modes.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from onnxcompress.torch_bridge.ops.inputs import (
    as_floats,
    as_ints,
    first_input,
    normalize_axis,
    optional_input,
    required_input,
)
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor

OPS = OpGroup()

_COORDINATE_MODES = frozenset(
    {
        "half_pixel",
        "half_pixel_symmetric",
        "pytorch_half_pixel",
        "align_corners",
        "asymmetric",
        "tf_half_pixel_for_nn",
    }
)
_NEAREST_MODES = frozenset({"round_prefer_floor", "round_prefer_ceil", "floor", "ceil", "simple"})


def _check_resize(attrs: NodeAttrs) -> str | None:
    mode = attrs.get_str("mode", "nearest")
    if mode not in ("nearest", "linear", "bilinear", "cubic"):
        return f"resize mode {mode!r} is not supported"
    coordinate = attrs.get_str("coordinate_transformation_mode", "half_pixel")
    if coordinate not in _COORDINATE_MODES:
        return f"coordinate_transformation_mode {coordinate!r} is not supported"
    if attrs.get_str("nearest_mode", "round_prefer_floor") not in _NEAREST_MODES:
        return f"nearest_mode {attrs.get_str('nearest_mode', '')!r} is not supported"
    if attrs.get_int("antialias", 0):
        return "antialias=1 is not supported"
    if attrs.get_str("keep_aspect_ratio_policy", "stretch") != "stretch":
        return "keep_aspect_ratio_policy other than 'stretch' is not supported"
    return None


def _source_coords(out: int, size: int, scale: float, mode: str, device: torch.device) -> Tensor:
    """Input coordinate of each output position, in float32 as ONNX Runtime computes it."""
    x = torch.arange(out, dtype=torch.float32, device=device)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    if mode == "asymmetric":
        return x / scale_t
    if mode == "align_corners":
        if out == 1:
            return torch.zeros_like(x)
        return x * float(size - 1) / float(out - 1)
    if mode == "pytorch_half_pixel":
        return (x + 0.5) / scale_t - 0.5 if out > 1 else torch.zeros_like(x)
    if mode == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale_t
    if mode == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2.0 * (1.0 - adjustment)
        return offset + (x + 0.5) / scale_t - 0.5
    return (x + 0.5) / scale_t - 0.5


def _nearest_index(coords: Tensor, mode: str, scale: float, size: int) -> Tensor:
    if mode == "round_prefer_ceil":
        index = torch.floor(coords + 0.5)
    elif mode == "floor":
        index = torch.floor(coords)
    elif mode == "ceil":
        index = torch.ceil(coords)
    elif mode == "simple":
        index = torch.ceil(coords) if scale < 1.0 else torch.trunc(coords)
    else:
        index = torch.ceil(coords - 0.5)
    return index.clamp(0, size - 1).long()


def _cubic_weights(t: Tensor, a: float) -> list[Tensor]:
    """Keys cubic convolution weights for the taps at offsets -1, 0, 1, 2."""

    def near(d: Tensor) -> Tensor:
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d: Tensor) -> Tensor:
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(t + 1), near(t), near(1 - t), far(2 - t)]


def _resample_axis(
    x: Tensor,
    axis: int,
    out: int,
    scale: float,
    attrs: NodeAttrs,
    coordinate_mode: str,
    nearest_mode: str,
) -> Tensor:
    size = x.shape[axis]
    coords = _source_coords(out, size, scale, coordinate_mode, x.device)
    mode = attrs.get_str("mode", "nearest")
    if mode == "nearest":
        return x.index_select(axis, _nearest_index(coords, nearest_mode, scale, size))
    shape = [1] * x.dim()
    shape[axis] = out
    if mode == "cubic":
        base = torch.floor(coords)
        weights = _cubic_weights(coords - base, attrs.get_float("cubic_coeff_a", -0.75))
        taps = [base.long() + offset for offset in (-1, 0, 1, 2)]
        if attrs.get_int("exclude_outside", 0):
            weights = [w * ((t >= 0) & (t < size)) for w, t in zip(weights, taps, strict=True)]
            total = functools.reduce(torch.add, weights)
            weights = [w / total for w in weights]
        result = None
        for weight, tap in zip(weights, taps, strict=True):
            term = x.index_select(axis, tap.clamp(0, size - 1)) * weight.to(x.dtype).reshape(shape)
            result = term if result is None else result + term
        assert result is not None
        return result
    coords = coords.clamp(0, size - 1)
    low = torch.floor(coords)
    high = (low + 1).clamp(max=size - 1)
    frac = (coords - low).to(x.dtype).reshape(shape)
    a = x.index_select(axis, low.long())
    b = x.index_select(axis, high.long())
    return a + (b - a) * frac


def _resize(
    attrs: NodeAttrs,
    x: Tensor,
    scales: list[float] | None,
    sizes: list[int] | None,
    coordinate_mode: str,
    nearest_mode: str,
) -> Tensor:
    rank = x.dim()
    axes = [normalize_axis(a, rank) for a in attrs.get_ints("axes") or range(rank)]
    y = x
    for i, axis in enumerate(axes):
        size = x.shape[axis]
        if sizes is not None:
            out = sizes[i]
            scale = out / size
        elif scales is not None:
            scale = scales[i]
            out = int(np.floor(np.float32(size) * np.float32(scale)))
        else:
            raise ValueError("Resize needs scales or sizes")
        if out == size and scale == 1.0:
            continue
        y = _resample_axis(y, axis, out, scale, attrs, coordinate_mode, nearest_mode)
    return y


@OPS.register("Resize", static=(1, 2, 3), check=_check_resize)
def resize(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    if attrs.opset < 11:
        return [
            _resize(attrs, x, as_floats(required_input(inputs, 1)), None, "asymmetric", "simple")
        ]
    scales_t, sizes_t = optional_input(inputs, 2), optional_input(inputs, 3)
    return [
        _resize(
            attrs,
            x,
            as_floats(scales_t) if scales_t is not None else None,
            as_ints(sizes_t) if sizes_t is not None else None,
            attrs.get_str("coordinate_transformation_mode", "half_pixel"),
            attrs.get_str("nearest_mode", "round_prefer_floor"),
        )
    ]


@OPS.register("Upsample", static=(1,), check=_check_resize)
def upsample(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    scales_t = optional_input(inputs, 1)
    scales = as_floats(scales_t) if scales_t is not None else attrs.get_floats("scales")
    return [_resize(attrs, x, scales, None, "asymmetric", "simple")]
