"""Pooling ops for the torch bridge.

Max, average and global pooling, matching ONNX Runtime's padding and ceil-mode rules.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from onnxcompress.torch_bridge.ops.inputs import first_input
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor
from onnxcompress.torch_bridge.ops.windows import spatial_pads, torch_pad_list, window_attrs

OPS = OpGroup()

_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVG_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_out_size(size: int, k: int, s: int, d: int, begin: int, end: int, ceil: bool) -> int:
    """Output length as ONNX Runtime computes it.

    In ceil mode a last window that would start inside the end padding is dropped.
    """
    span = size + begin + end - ((k - 1) * d + 1)
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + begin:
        out -= 1
    return out


def _check_pool(attrs: NodeAttrs) -> str | None:
    if attrs.get_int("storage_order", 0) != 0:
        return "storage_order=1 is not supported"
    if attrs.op_type == "AveragePool" and any(d != 1 for d in attrs.get_ints("dilations") or []):
        return "dilated AveragePool is not supported"
    return None


def _pool_geometry(
    attrs: NodeAttrs, x: Tensor
) -> tuple[list[int], list[int], list[int], list[int], list[int], list[int], bool]:
    nd = x.dim() - 2
    kernel = attrs.get_ints("kernel_shape")
    if kernel is None:
        raise ValueError("kernel_shape is required")
    strides, dilations = window_attrs(attrs, nd, kernel)
    begins, ends = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    ceil = bool(attrs.get_int("ceil_mode", 0))
    outs = [
        _pool_out_size(n, k, s, d, b, e, ceil)
        for n, k, s, d, b, e in zip(
            x.shape[2:], kernel, strides, dilations, begins, ends, strict=True
        )
    ]
    return kernel, strides, dilations, begins, ends, outs, ceil


def _torch_fits(kernel: Sequence[int], begins: Sequence[int], ends: Sequence[int]) -> bool:
    """Whether torch's own padding can express the pads.

    Torch needs symmetric pads of at most half the kernel; its ceil-mode rule (drop a window
    that starts in the end padding) and its divisor for count_include_pad (pads counted,
    ceil-mode overhang not) are the same as ONNX Runtime's.
    """
    return begins == ends and all(b <= k // 2 for b, k in zip(begins, kernel, strict=True))


def _pad_for_windows(
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    in_sizes: Sequence[int],
    begins: Sequence[int],
    ends: Sequence[int],
    outs: Sequence[int],
) -> list[int]:
    """End padding (pads plus ceil-mode overhang) that floor-mode pooling needs for ``outs``."""
    padded_ends = []
    for n, k, s, d, b, e, out in zip(
        in_sizes, kernel, strides, dilations, begins, ends, outs, strict=True
    ):
        needed = (out - 1) * s + (k - 1) * d + 1
        padded_ends.append(max(e, needed - n - b))
    return padded_ends


@OPS.register("MaxPool", max_outputs=1, check=_check_pool)
def max_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    kernel, strides, dilations, begins, ends, outs, ceil = _pool_geometry(attrs, x)
    fn = _MAX_POOL[len(kernel)]
    if _torch_fits(kernel, begins, ends):
        return [fn(x, kernel, strides, begins, dilations, ceil_mode=ceil)]
    padded_ends = _pad_for_windows(kernel, strides, dilations, x.shape[2:], begins, ends, outs)
    low = -math.inf if x.is_floating_point() else int(torch.iinfo(x.dtype).min)
    x = F.pad(x, torch_pad_list(begins, padded_ends), value=low)
    return [fn(x, kernel, strides, 0, dilations)]


@OPS.register("AveragePool", check=_check_pool)
def average_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    kernel, strides, dilations, begins, ends, outs, ceil = _pool_geometry(attrs, x)
    include_pad = bool(attrs.get_int("count_include_pad", 0))
    fn = _AVG_POOL[len(kernel)]
    if _torch_fits(kernel, begins, ends):
        return [fn(x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include_pad)]
    overhang = _pad_for_windows(kernel, strides, dilations, x.shape[2:], begins, ends, outs)
    padded = F.pad(x, torch_pad_list(begins, overhang))
    # Divide by the number of window positions that count: real elements, plus the declared
    # pads when count_include_pad (never the ceil-mode overhang past them).
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if include_pad:
        mask = F.pad(mask, torch_pad_list(begins, ends), value=1.0)
        tail = [o - e for o, e in zip(overhang, ends, strict=True)]
        mask = F.pad(mask, torch_pad_list([0] * len(kernel), tail))
    else:
        mask = F.pad(mask, torch_pad_list(begins, overhang))
    return [fn(padded, kernel, strides, 0) / fn(mask, kernel, strides, 0)]


@OPS.register("GlobalAveragePool")
def global_average_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    return [x.mean(tuple(range(2, x.dim())), keepdim=True)]


@OPS.register("GlobalMaxPool")
def global_max_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    return [x.amax(tuple(range(2, x.dim())), keepdim=True)]
