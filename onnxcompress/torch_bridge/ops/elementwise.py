"""Activation and elementwise-math ops for the torch bridge.

Unary, binary and variadic math, activations, Softmax and Dropout.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from onnxcompress.torch_bridge.ops.inputs import (
    first_input,
    normalize_axis,
    optional_input,
    required_input,
)
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor

OPS = OpGroup()


def _unary(op_type: str, fn: Callable[[Tensor], Tensor]) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        return [fn(first_input(inputs))]

    handler.__name__ = f"unary_{op_type.lower()}"
    OPS.register(op_type)(handler)


def _identity(x: Tensor) -> Tensor:
    return x


_UNARY: dict[str, Callable[[Tensor], Tensor]] = {
    "Relu": F.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "HardSwish": F.hardswish,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Mish": F.mish,
    "Erf": torch.erf,
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,
    "Sign": torch.sign,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Not": torch.logical_not,
    "IsNaN": torch.isnan,
    "Identity": _identity,
}
for _op, _fn in _UNARY.items():
    _unary(_op, _fn)


@OPS.register("LeakyRelu")
def leaky_relu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.leaky_relu(first_input(inputs), attrs.get_float("alpha", 0.01))]


@OPS.register("PRelu")
def prelu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, slope = first_input(inputs), required_input(inputs, 1)
    # The slope broadcasts numpy-style against x, which F.prelu's channel rule does not cover.
    return [x.clamp(min=0) + slope * x.clamp(max=0)]


@OPS.register("Elu")
def elu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.elu(first_input(inputs), attrs.get_float("alpha", 1.0))]


@OPS.register("Celu")
def celu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.celu(first_input(inputs), attrs.get_float("alpha", 1.0))]


@OPS.register("Selu")
def selu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    alpha = attrs.get_float("alpha", 1.67326319217681884765625)
    gamma = attrs.get_float("gamma", 1.05070102214813232421875)
    return [gamma * F.elu(first_input(inputs), alpha)]


@OPS.register("ThresholdedRelu")
def thresholded_relu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    return [torch.where(x > attrs.get_float("alpha", 1.0), x, torch.zeros_like(x))]


@OPS.register("HardSigmoid")
def hard_sigmoid(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    alpha, beta = attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5)
    return [torch.clamp(first_input(inputs) * alpha + beta, 0.0, 1.0)]


@OPS.register("Gelu")
def gelu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.gelu(first_input(inputs), approximate=attrs.get_str("approximate", "none"))]


@OPS.register("Clip", static=(1, 2))
def clip(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    if attrs.opset < 11:
        low = attrs.get_float("min", -math.inf)
        high = attrs.get_float("max", math.inf)
        return [
            torch.clamp(x, None if low == -math.inf else low, None if high == math.inf else high)
        ]
    low_t = inputs[1] if len(inputs) > 1 else None
    high_t = inputs[2] if len(inputs) > 2 else None
    if low_t is None and high_t is None:
        return [x]
    return [torch.clamp(x, low_t, high_t)]


def _binary(op_type: str, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        return [fn(first_input(inputs), required_input(inputs, 1))]

    handler.__name__ = f"binary_{op_type.lower()}"
    OPS.register(op_type)(handler)


def _divide(a: Tensor, b: Tensor) -> Tensor:
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


_BINARY: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "Add": torch.add,
    "Sub": torch.sub,
    "Mul": torch.mul,
    "Div": _divide,
    "Equal": torch.eq,
    "Less": torch.lt,
    "LessOrEqual": torch.le,
    "Greater": torch.gt,
    "GreaterOrEqual": torch.ge,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}
for _op, _bfn in _BINARY.items():
    _binary(_op, _bfn)


@OPS.register("Pow", static=(1,))
def power(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    base, exponent = first_input(inputs), required_input(inputs, 1)
    # ONNX keeps the base's type whatever the exponent's.
    return [torch.pow(base, exponent).to(base.dtype)]


@OPS.register("Mod")
def modulo(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    a, b = first_input(inputs), required_input(inputs, 1)
    if attrs.get_int("fmod", 0):
        return [torch.fmod(a, b)]
    return [torch.remainder(a, b)]


def _variadic(op_type: str, fn: Callable[[Tensor, Tensor], Tensor], mean: bool = False) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        tensors = [t for t in inputs if t is not None]
        result = functools.reduce(fn, tensors)
        return [result / len(tensors) if mean else result]

    handler.__name__ = f"variadic_{op_type.lower()}"
    OPS.register(op_type)(handler)


_variadic("Max", torch.maximum)
_variadic("Min", torch.minimum)
_variadic("Sum", torch.add)
_variadic("Mean", torch.add, mean=True)


@OPS.register("Where")
def where(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [
        torch.where(
            first_input(inputs).bool(), required_input(inputs, 1), required_input(inputs, 2)
        )
    ]


@OPS.register("Softmax", "LogSoftmax")
def softmax(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    fn = F.softmax if attrs.op_type == "Softmax" else F.log_softmax
    if attrs.opset >= 13:
        return [fn(x, normalize_axis(attrs.get_int("axis", -1), x.dim()))]
    # Before opset 13 the input is viewed as 2-D [prod(dims < axis), prod(dims >= axis)].
    axis = normalize_axis(attrs.get_int("axis", 1), x.dim())
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return [fn(flat, 1).reshape(x.shape)]


@OPS.register("Dropout", static=(1, 2), max_outputs=2)
def dropout(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
    if attrs.opset >= 12:
        ratio_t = optional_input(inputs, 1)
        ratio = float(ratio_t.item()) if ratio_t is not None else 0.5
    else:
        ratio = attrs.get_float("ratio", 0.5)
    if not attrs.training or ratio == 0.0:
        outputs = [x]
        if attrs.num_outputs > 1:
            outputs.append(torch.ones_like(x, dtype=torch.bool))
        return outputs
    if attrs.num_outputs > 1:
        mask = torch.rand_like(x, dtype=torch.float32) >= ratio
        return [x * mask / (1.0 - ratio), mask]
    return [F.dropout(x, ratio, True)]
