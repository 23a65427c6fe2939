"""Reduction ops for the torch bridge.

The Reduce* family, ArgMax/ArgMin, CumSum and TopK.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onnxcompress.torch_bridge.ops.inputs import (
    as_ints,
    axes_input_or_attr,
    first_input,
    normalize_axis,
    required_input,
)
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor

OPS = OpGroup()


def _reduce(op_type: str, fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        x = first_input(inputs)
        keep = bool(attrs.get_int("keepdims", 1))
        axes = axes_input_or_attr(attrs, inputs, 1)
        if not axes:
            if attrs.get_int("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, tuple(sorted(normalize_axis(a, x.dim()) for a in axes)), keep)]

    handler.__name__ = f"reduce_{op_type.lower()}"
    OPS.register(op_type, static=(1,))(handler)


def _reduce_prod(x: Tensor, dims: tuple[int, ...], keep: bool) -> Tensor:
    for dim in sorted(dims, reverse=True):
        x = x.prod(dim, keepdim=keep)
    return x


_reduce("ReduceMean", lambda x, d, k: x.mean(d, keepdim=k))
_reduce("ReduceSum", lambda x, d, k: x.sum(d, keepdim=k))
_reduce("ReduceMax", lambda x, d, k: x.amax(d, keepdim=k))
_reduce("ReduceMin", lambda x, d, k: x.amin(d, keepdim=k))
_reduce("ReduceProd", _reduce_prod)
_reduce("ReduceSumSquare", lambda x, d, k: x.square().sum(d, keepdim=k))
_reduce("ReduceL1", lambda x, d, k: x.abs().sum(d, keepdim=k))
_reduce("ReduceL2", lambda x, d, k: x.square().sum(d, keepdim=k).sqrt())
_reduce("ReduceLogSumExp", lambda x, d, k: torch.logsumexp(x, d, keepdim=k))


@OPS.register("ArgMax", "ArgMin")
def arg_extreme(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    axis = normalize_axis(attrs.get_int("axis", 0), x.dim())
    keep = bool(attrs.get_int("keepdims", 1))
    fn = torch.argmax if attrs.op_type == "ArgMax" else torch.argmin
    if attrs.get_int("select_last_index", 0):
        flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
        return [x.shape[axis] - 1 - flipped]
    return [fn(x, dim=axis, keepdim=keep)]


@OPS.register("CumSum", static=(1,))
def cumsum(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    axis = normalize_axis(as_ints(required_input(inputs, 1))[0], x.dim())
    if attrs.get_int("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if attrs.get_int("exclusive", 0):
        y = y - x
    return [y.flip(axis) if attrs.get_int("reverse", 0) else y]


@OPS.register("TopK", static=(1,), max_outputs=2)
def top_k(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    k = as_ints(required_input(inputs, 1))[0] if attrs.opset >= 10 else attrs.get_int("k", 1)
    axis = normalize_axis(attrs.get_int("axis", -1), x.dim())
    values, indices = torch.topk(
        x,
        k,
        dim=axis,
        largest=bool(attrs.get_int("largest", 1)),
        sorted=bool(attrs.get_int("sorted", 1)),
    )
    return [values, indices]
