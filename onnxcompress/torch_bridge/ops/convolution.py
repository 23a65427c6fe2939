"""Convolution and linear-algebra ops for the torch bridge.

Conv, ConvTranspose, Gemm, MatMul and Einsum as torch functional calls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxcompress.torch_bridge.ops.inputs import first_input, optional_input, required_input
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor
from onnxcompress.torch_bridge.ops.windows import spatial_pads, torch_pad_list, window_attrs

OPS = OpGroup()

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@OPS.register("Conv")
def conv(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, weight, bias = first_input(inputs), required_input(inputs, 1), optional_input(inputs, 2)
    nd = weight.dim() - 2
    kernel = attrs.get_ints("kernel_shape") or list(weight.shape[2:])
    strides, dilations = window_attrs(attrs, nd, kernel)
    begins, ends = spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    pointwise_strided = all(k == 1 for k in kernel) and any(s > 1 for s in strides)
    if begins != ends or (pointwise_strided and any(begins)):
        x = F.pad(x, torch_pad_list(begins, ends))
        begins = [0] * nd
    if pointwise_strided:
        # A strided 1x1 conv reads every s-th pixel: slice them out and convolve at stride 1
        # (same values, same gradients). Why: oneDNN's 1x1 backward-weights kernel on a
        # strided channels-last input with fewer input channels than its vector block (8 on
        # AVX2, 16 on AVX-512: a pruned ResNet's downsample shortcut) writes past its buffer:
        # heap corruption with one thread, hangs or silently wrong weight gradients with more
        # (torch 2.14.1, oneDNN 3.x; https://github.com/uxlfoundation/oneDNN/issues/6035).
        # At stride 1 oneDNN takes no "reduce to unit stride" path and the bug cannot fire.
        x = x[(slice(None), slice(None), *(slice(None, None, s) for s in strides))]
        strides = [1] * nd
    fn = _CONV[nd]
    return [fn(x, weight, bias, strides, begins, dilations, attrs.get_int("group", 1))]


@OPS.register("ConvTranspose")
def conv_transpose(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, weight, bias = first_input(inputs), required_input(inputs, 1), optional_input(inputs, 2)
    nd = weight.dim() - 2
    kernel = attrs.get_ints("kernel_shape") or list(weight.shape[2:])
    strides, dilations = window_attrs(attrs, nd, kernel)
    groups = attrs.get_int("group", 1)
    out_pad = attrs.get_ints("output_padding") or [0] * nd
    in_sizes = x.shape[2:]
    full = [
        s * (i - 1) + op + (k - 1) * d + 1
        for i, s, k, d, op in zip(in_sizes, strides, kernel, dilations, out_pad, strict=True)
    ]
    output_shape = attrs.get_ints("output_shape")
    auto_pad = attrs.get_str("auto_pad", "NOTSET")
    if output_shape is not None or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        targets = (
            output_shape[-nd:]
            if output_shape is not None
            else [i * s for i, s in zip(in_sizes, strides, strict=True)]
        )
        totals = [f - t for f, t in zip(full, targets, strict=True)]
        # ONNX Runtime puts the odd padding unit at the end only for SAME_UPPER; with SAME_LOWER
        # or an explicit output_shape it goes at the start.
        if auto_pad == "SAME_UPPER":
            begins = [t // 2 for t in totals]
        else:
            begins = [t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins, strict=True)]
    elif auto_pad == "VALID":
        begins, ends = [0] * nd, [0] * nd
    else:
        pads = attrs.get_ints("pads") or [0] * (2 * nd)
        begins, ends = list(pads[:nd]), list(pads[nd:])
    fn = _CONV_T[nd]
    simple = all(op < max(s, d) for op, s, d in zip(out_pad, strides, dilations, strict=True))
    if begins == ends and simple and min(begins) >= 0:
        return [fn(x, weight, bias, strides, begins, out_pad, groups, dilations)]
    y = fn(x, weight, None, strides, 0, 0, groups, dilations)
    # Negative F.pad amounts crop: remove the pads and append the output padding in one call.
    crop = torch_pad_list(
        [-b for b in begins], [op - e for op, e in zip(out_pad, ends, strict=True)]
    )
    y = F.pad(y, crop)
    if bias is not None:
        y = y + bias.reshape([1, -1] + [1] * nd)
    return [y]


@OPS.register("Gemm")
def gemm(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    a, b, c = first_input(inputs), required_input(inputs, 1), optional_input(inputs, 2)
    alpha, beta = attrs.get_float("alpha", 1.0), attrs.get_float("beta", 1.0)
    if attrs.get_int("transA", 0):
        a = a.t()
    trans_b = attrs.get_int("transB", 0)
    weight = b if trans_b else b.t()
    if (
        alpha == 1.0
        and beta == 1.0
        and (c is None or (c.dim() == 1 and c.shape[0] == weight.shape[0]))
    ):
        return [F.linear(a, weight, c)]
    y = a @ (b.t() if trans_b else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return [y]


@OPS.register("MatMul")
def matmul(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [torch.matmul(first_input(inputs), required_input(inputs, 1))]


@OPS.register("Einsum")
def einsum(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    equation = attrs.get_str("equation", "").replace(" ", "")
    return [torch.einsum(equation, *[t for t in inputs if t is not None])]
