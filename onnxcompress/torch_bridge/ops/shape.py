"""Shape-manipulation ops for the torch bridge.

Reshape, Concat, Split, Slice, Transpose, Pad and the other ops that move data around.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxcompress.torch_bridge.ops.inputs import (
    as_ints,
    axes_input_or_attr,
    first_input,
    normalize_axis,
    optional_input,
    required_input,
)
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor
from onnxcompress.torch_bridge.ops.windows import torch_pad_list

OPS = OpGroup()


@OPS.register("Flatten")
def flatten(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    axis = normalize_axis(attrs.get_int("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@OPS.register("Reshape", static=(1,))
def reshape(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    shape = (
        as_ints(required_input(inputs, 1)) if attrs.opset >= 5 else attrs.get_ints("shape") or []
    )
    if not attrs.get_int("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@OPS.register("Concat")
def concat(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    tensors = [t for t in inputs if t is not None]
    return [torch.cat(tensors, dim=normalize_axis(attrs.get_int("axis", 0), tensors[0].dim()))]


@OPS.register("Split", static=(1,), max_outputs=None)
def split(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    axis = normalize_axis(attrs.get_int("axis", 0), x.dim())
    split_t = optional_input(inputs, 1)
    sizes = as_ints(split_t) if split_t is not None else attrs.get_ints("split")
    if sizes is None:
        parts = attrs.get_int("num_outputs", attrs.num_outputs)
        chunk = -(-x.shape[axis] // parts)
        sizes = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    return list(torch.split(x, sizes, dim=axis))


@OPS.register("Slice", static=(1, 2, 3, 4))
def slice_(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    if attrs.opset < 10:
        starts = attrs.get_ints("starts") or []
        ends = attrs.get_ints("ends") or []
        axes_list = attrs.get_ints("axes")
        steps = [1] * len(starts)
    else:
        starts, ends = as_ints(required_input(inputs, 1)), as_ints(required_input(inputs, 2))
        axes_t, steps_t = optional_input(inputs, 3), optional_input(inputs, 4)
        axes_list = as_ints(axes_t) if axes_t is not None else None
        steps = as_ints(steps_t) if steps_t is not None else [1] * len(starts)
    axes = axes_list if axes_list is not None else list(range(len(starts)))
    index: list[slice] = [slice(None)] * x.dim()
    reversed_axes: list[tuple[int, int, int, int]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = normalize_axis(axis, x.dim())
        size = x.shape[axis]
        start = start + size if start < 0 else start
        end = end + size if end < 0 else end
        if step > 0:
            index[axis] = slice(min(max(start, 0), size), min(max(end, 0), size), step)
        else:
            reversed_axes.append(
                (axis, min(max(start, 0), size - 1), min(max(end, -1), size - 1), step)
            )
    y = x[tuple(index)]
    for axis, start, end, step in reversed_axes:
        picks = torch.arange(start, end, step, device=y.device)
        y = y.index_select(axis, picks)
    return [y]


@OPS.register("Transpose")
def transpose(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    perm = attrs.get_ints("perm") or list(reversed(range(x.dim())))
    return [x.permute(perm)]


@OPS.register("Squeeze", static=(1,))
def squeeze(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    axes = axes_input_or_attr(attrs, inputs, 1)
    if not axes:
        return [x.squeeze()]
    return [x.squeeze(tuple(normalize_axis(a, x.dim()) for a in axes))]


@OPS.register("Unsqueeze", static=(1,))
def unsqueeze(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    axes = axes_input_or_attr(attrs, inputs, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(normalize_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _check_pad(attrs: NodeAttrs) -> str | None:
    mode = attrs.get_str("mode", "constant")
    return None if mode in _PAD_MODES else f"pad mode {mode!r} is not supported"


@OPS.register("Pad", static=(1, 2, 3), check=_check_pad)
def pad(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    mode = _PAD_MODES[attrs.get_str("mode", "constant")]
    rank = x.dim()
    if attrs.opset < 11:
        pads = attrs.get_ints("pads") or [0] * (2 * rank)
        value = attrs.get_float("value", 0.0)
        axes = list(range(rank))
    else:
        pads = as_ints(required_input(inputs, 1))
        value_t = optional_input(inputs, 2)
        value = value_t.item() if value_t is not None else 0.0
        axes_t = optional_input(inputs, 3)
        axes = (
            [normalize_axis(a, rank) for a in as_ints(axes_t)]
            if axes_t is not None
            else list(range(rank))
        )
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[i + len(axes)]
    padded = [d for d in range(rank) if begins[d] or ends[d]]
    if not padded:
        return [x]
    first = padded[0]
    torch_pad = torch_pad_list(begins[first:], ends[first:])
    if mode == "constant":
        return [F.pad(x, torch_pad, value=value)]
    # Non-constant modes pad the last 1-3 dims of a tensor with one or two leading dims.
    lead = x.shape[:first]
    view = x.reshape((-1, *x.shape[first:])) if first > 0 else x.unsqueeze(0)
    if rank - first > 3:
        raise ValueError(f"{mode} padding of {rank - first} dims is not supported")
    y = F.pad(view, torch_pad, mode=mode)
    return [y.reshape((*lead, *y.shape[1:])) if first > 0 else y.squeeze(0)]


@OPS.register("Expand", static=(1,))
def expand(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(as_ints(required_input(inputs, 1))))
    return [x.expand(target)]


@OPS.register("Tile", static=(1,))
def tile(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [first_input(inputs).repeat(as_ints(required_input(inputs, 1)))]


@OPS.register("DepthToSpace")
def depth_to_space(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    bs = attrs.get_int("blocksize", 1)
    n, c, h, w = x.shape
    if attrs.get_str("mode", "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // bs**2, h * bs, w * bs)]


@OPS.register("SpaceToDepth")
def space_to_depth(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    bs = attrs.get_int("blocksize", 1)
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * bs**2, h // bs, w // bs)]
