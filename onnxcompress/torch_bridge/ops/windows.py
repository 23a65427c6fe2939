"""Sliding-window geometry shared by convolution, pooling and Pad: pads, strides, dilations.

Resolves ONNX ``auto_pad`` and converts per-axis pads to ``F.pad``'s order.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxcompress.torch_bridge.ops.spec import NodeAttrs


def spatial_pads(
    attrs: NodeAttrs,
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
) -> tuple[list[int], list[int]]:
    """Begin and end padding per spatial axis, resolving ``auto_pad`` against the input."""
    nd = len(in_sizes)
    auto_pad = attrs.get_str("auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begins, ends = [], []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations, strict=True):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
        return begins, ends
    if auto_pad == "VALID":
        return [0] * nd, [0] * nd
    pads = attrs.get_ints("pads") or [0] * (2 * nd)
    return list(pads[:nd]), list(pads[nd:])


def torch_pad_list(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads in F.pad's last-axis-first order."""
    pad: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        pad += [begin, end]
    return pad


def window_attrs(attrs: NodeAttrs, nd: int, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    """Strides and dilations (default 1), checking the kernel has ``nd`` spatial dims."""
    strides = attrs.get_ints("strides") or [1] * nd
    dilations = attrs.get_ints("dilations") or [1] * nd
    if len(kernel) != nd:
        raise ValueError(f"kernel_shape has {len(kernel)} dims, the input has {nd} spatial dims")
    return strides, dilations
