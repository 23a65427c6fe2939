"""Constant and shape-query ops for the torch bridge.

Constant, ConstantOfShape, Shape, Size and Range.
"""

from __future__ import annotations

import numpy as np
import torch

from onnxcompress.torch_bridge.ops.dtypes import numpy_to_torch
from onnxcompress.torch_bridge.ops.inputs import as_ints, first_input, required_input
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor

OPS = OpGroup()


def constant_value(attrs: NodeAttrs) -> Tensor:
    """The tensor a ``Constant`` node produces (evaluated once by the module builder)."""
    array = attrs.get_array("value")
    if array is not None:
        return numpy_to_torch(array)
    for key, dtype in (
        ("value_float", np.float32),
        ("value_floats", np.float32),
        ("value_int", np.int64),
        ("value_ints", np.int64),
    ):
        if attrs.has(key):
            return torch.from_numpy(np.array(attrs.values[key], dtype=dtype))
    raise ValueError("Constant has no supported value attribute")


def _check_constant(attrs: NodeAttrs) -> str | None:
    if not any(
        attrs.has(k) for k in ("value", "value_float", "value_floats", "value_int", "value_ints")
    ):
        return "only tensor, float(s) and int(s) constants are supported"
    return None


@OPS.register("Constant", check=_check_constant, build_time=True)
def constant(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [constant_value(attrs)]


@OPS.register("ConstantOfShape", static=(0,))
def constant_of_shape(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    shape_t = first_input(inputs)
    array = attrs.get_array("value")
    value = numpy_to_torch(array.reshape(-1)) if array is not None else torch.zeros(1)
    return [
        value.to(shape_t.device).expand(as_ints(shape_t)).clone()
        if shape_t.numel()
        else value.to(shape_t.device).reshape(()).clone()
    ]


@OPS.register("Shape")
def shape(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    dims = list(x.shape)
    start = attrs.get_int("start", 0)
    end = attrs.get_int("end", len(dims)) if attrs.has("end") else len(dims)
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)]


@OPS.register("Size")
def size(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    return [torch.tensor(x.numel(), dtype=torch.int64, device=x.device)]


@OPS.register("Range", static=(0, 1, 2))
def range_(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    start, limit, delta = first_input(inputs), required_input(inputs, 1), required_input(inputs, 2)
    return [
        torch.arange(
            start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
        )
    ]
