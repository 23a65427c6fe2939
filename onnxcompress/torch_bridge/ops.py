"""ONNX op handlers for the torch bridge: one torch-functional implementation per ONNX op.

Every per-op fact the bridge needs (how to compute it, which inputs are shapes or indices
rather than trainable data, which hold running state, which attribute values it cannot honour)
is declared once, where the handler is registered.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

Tensor = torch.Tensor
Inputs = list[torch.Tensor | None]
Handler = Callable[["NodeAttrs", Inputs], list[torch.Tensor]]
Check = Callable[["NodeAttrs"], "str | None"]


@dataclasses.dataclass
class NodeAttrs:
    """What a handler knows about its node besides the input tensors.

    Attributes:
        name: the node's name (for messages).
        op_type: the ONNX op type.
        opset: the default-domain opset the model imports (semantics change across opsets).
        values: the node's attributes as plain Python values (ints, floats, strings, tuples,
            numpy arrays for tensor attributes).
        num_outputs: how many outputs the node declares (Split divides by it).
        training: the module's train/eval mode (Dropout, BatchNormalization).
        state_inputs: input positions holding module buffers that may be updated in place
            (BatchNormalization's running mean and variance).
    """

    name: str
    op_type: str
    opset: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_outputs: int = 1
    training: bool = False
    state_inputs: frozenset[int] = frozenset()

    def has(self, key: str) -> bool:
        return key in self.values

    def get_int(self, key: str, default: int) -> int:
        value = self.values.get(key)
        return default if value is None else int(value)

    def get_float(self, key: str, default: float) -> float:
        value = self.values.get(key)
        return default if value is None else float(value)

    def get_str(self, key: str, default: str) -> str:
        value = self.values.get(key)
        return default if value is None else str(value)

    def get_ints(self, key: str) -> list[int] | None:
        value = self.values.get(key)
        return None if value is None else [int(v) for v in value]

    def get_floats(self, key: str) -> list[float] | None:
        value = self.values.get(key)
        return None if value is None else [float(v) for v in value]

    def get_array(self, key: str) -> np.ndarray | None:
        value = self.values.get(key)
        return None if value is None else np.asarray(value)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """A registered op: its handler and what the module builder must know about its inputs.

    Attributes:
        handler: computes the outputs from the attributes and input tensors.
        static_inputs: positions read as shapes, indices, scales or bounds; a float initializer
            used only there stays a fixed buffer instead of a trainable parameter.
        state_inputs: positions holding running statistics (buffers updated in train mode and
            written back).
        max_outputs: how many outputs the handler produces; None for variadic (Split).
        check: returns why a node's attributes cannot be honoured, or None.
        build_time: the op has no inputs and is evaluated once when the module is built; its
            output becomes a buffer (Constant).
    """

    handler: Handler
    static_inputs: frozenset[int] = frozenset()
    state_inputs: frozenset[int] = frozenset()
    max_outputs: int | None = 1
    check: Check | None = None
    build_time: bool = False


OP_SPECS: dict[str, OpSpec] = {}
OP_HANDLERS: dict[str, Handler] = {}


def register(
    *op_types: str,
    static: Sequence[int] = (),
    state: Sequence[int] = (),
    max_outputs: int | None = 1,
    check: Check | None = None,
    build_time: bool = False,
) -> Callable[[Handler], Handler]:
    """Register ``handler`` for ``op_types`` with its per-op facts."""

    def wrap(handler: Handler) -> Handler:
        for op_type in op_types:
            if op_type in OP_SPECS:
                raise ValueError(f"op {op_type} registered twice")
            OP_SPECS[op_type] = OpSpec(
                handler, frozenset(static), frozenset(state), max_outputs, check, build_time
            )
            OP_HANDLERS[op_type] = handler
        return handler

    return wrap


def unsupported_reason(attrs: NodeAttrs, used_outputs: Sequence[int]) -> str | None:
    """Why the bridge cannot run this (default-domain) node, or None when it can."""
    spec = OP_SPECS.get(attrs.op_type)
    if spec is None:
        return "no torch handler for this op"
    if spec.max_outputs is not None and any(i >= spec.max_outputs for i in used_outputs):
        return f"uses output #{max(used_outputs)}, the handler computes {spec.max_outputs}"
    return spec.check(attrs) if spec.check is not None else None


# ---------------------------------------------------------------------------------------------
# Small helpers shared by handlers
# ---------------------------------------------------------------------------------------------

_ONNX_TO_TORCH_DTYPE: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    4: torch.uint16,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.uint32,
    13: torch.uint64,
    16: torch.bfloat16,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    """The torch dtype of an ONNX ``TensorProto.DataType`` value."""
    try:
        return _ONNX_TO_TORCH_DTYPE[onnx_type]
    except KeyError:
        raise ValueError(f"ONNX data type {onnx_type} has no torch equivalent") from None


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor owning a copy of ``array`` (bfloat16 through its bit pattern)."""
    if array.dtype.name == "bfloat16":
        bits = np.ascontiguousarray(array).view(np.uint16).astype(np.int16)
        return torch.from_numpy(bits.copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _ints(tensor: torch.Tensor) -> list[int]:
    """A shape/index tensor as Python ints (one host read per tensor, not per element)."""
    values = tensor.tolist()
    return [int(v) for v in values] if isinstance(values, list) else [int(values)]


def _floats(tensor: torch.Tensor) -> list[float]:
    values = tensor.tolist()
    return [float(v) for v in values] if isinstance(values, list) else [float(values)]


def _optional(inputs: Inputs, index: int) -> torch.Tensor | None:
    """Input ``index`` when present and non-empty (ONNX marks 'absent' either way)."""
    if index >= len(inputs):
        return None
    tensor = inputs[index]
    if tensor is None or (tensor.numel() == 0 and tensor.dim() > 0):
        return None
    return tensor


def _first(inputs: Inputs) -> torch.Tensor:
    tensor = inputs[0]
    if tensor is None:
        raise ValueError("the first input is required")
    return tensor


def _need(inputs: Inputs, index: int) -> torch.Tensor:
    tensor = inputs[index] if index < len(inputs) else None
    if tensor is None:
        raise ValueError(f"input #{index} is required")
    return tensor


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _spatial_pads(
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


def _torch_pad_list(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads in F.pad's last-axis-first order."""
    pad: list[int] = []
    for begin, end in zip(reversed(begins), reversed(ends), strict=True):
        pad += [begin, end]
    return pad


def _window_attrs(attrs: NodeAttrs, nd: int, kernel: Sequence[int]) -> tuple[list[int], list[int]]:
    strides = attrs.get_ints("strides") or [1] * nd
    dilations = attrs.get_ints("dilations") or [1] * nd
    if len(kernel) != nd:
        raise ValueError(f"kernel_shape has {len(kernel)} dims, the input has {nd} spatial dims")
    return strides, dilations


# ---------------------------------------------------------------------------------------------
# Convolution and linear algebra
# ---------------------------------------------------------------------------------------------

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@register("Conv")
def conv(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, weight, bias = _first(inputs), _need(inputs, 1), _optional(inputs, 2)
    nd = weight.dim() - 2
    kernel = attrs.get_ints("kernel_shape") or list(weight.shape[2:])
    strides, dilations = _window_attrs(attrs, nd, kernel)
    begins, ends = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
    pointwise_strided = all(k == 1 for k in kernel) and any(s > 1 for s in strides)
    if begins != ends or (pointwise_strided and any(begins)):
        x = F.pad(x, _torch_pad_list(begins, ends))
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


@register("ConvTranspose")
def conv_transpose(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, weight, bias = _first(inputs), _need(inputs, 1), _optional(inputs, 2)
    nd = weight.dim() - 2
    kernel = attrs.get_ints("kernel_shape") or list(weight.shape[2:])
    strides, dilations = _window_attrs(attrs, nd, kernel)
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
    crop = _torch_pad_list(
        [-b for b in begins], [op - e for op, e in zip(out_pad, ends, strict=True)]
    )
    y = F.pad(y, crop)
    if bias is not None:
        y = y + bias.reshape([1, -1] + [1] * nd)
    return [y]


@register("Gemm")
def gemm(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    a, b, c = _first(inputs), _need(inputs, 1), _optional(inputs, 2)
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


@register("MatMul")
def matmul(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [torch.matmul(_first(inputs), _need(inputs, 1))]


@register("Einsum")
def einsum(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    equation = attrs.get_str("equation", "").replace(" ", "")
    return [torch.einsum(equation, *[t for t in inputs if t is not None])]


# ---------------------------------------------------------------------------------------------
# Normalization
# ---------------------------------------------------------------------------------------------


def _check_batchnorm(attrs: NodeAttrs) -> str | None:
    if attrs.opset < 9 and attrs.get_int("spatial", 1) == 0:
        return "spatial=0 (per-element statistics) is not supported"
    return None


@register("BatchNormalization", state=(3, 4), max_outputs=3, check=_check_batchnorm)
def batch_normalization(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, scale, bias = _first(inputs), _need(inputs, 1), _need(inputs, 2)
    mean, var = _need(inputs, 3), _need(inputs, 4)
    eps = attrs.get_float("epsilon", 1e-5)
    if attrs.training:
        stateful = {3, 4} <= attrs.state_inputs
        # torch's momentum weighs the new batch; ONNX's weighs the running value.
        momentum = 1.0 - attrs.get_float("momentum", 0.9)
        y = F.batch_norm(
            x,
            mean if stateful else None,
            var if stateful else None,
            scale,
            bias,
            True,
            momentum,
            eps,
        )
        return [y, mean, var]
    if mean.requires_grad or var.requires_grad:
        # Computed or trainable statistics: the fused kernel has no gradient for them.
        shape = [1, -1] + [1] * (x.dim() - 2)
        inv = torch.rsqrt(var.reshape(shape) + eps) * scale.reshape(shape)
        return [(x - mean.reshape(shape)) * inv + bias.reshape(shape)]
    return [F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)]


@register("InstanceNormalization")
def instance_normalization(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, scale, bias = _first(inputs), _need(inputs, 1), _need(inputs, 2)
    eps = attrs.get_float("epsilon", 1e-5)
    return [F.instance_norm(x, None, None, scale, bias, True, 0.0, eps)]


@register("LayerNormalization")
def layer_normalization(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, scale, bias = _first(inputs), _need(inputs, 1), _optional(inputs, 2)
    eps = attrs.get_float("epsilon", 1e-5)
    axis = _axis(attrs.get_int("axis", -1), x.dim())
    normalized = tuple(x.shape[axis:])
    if tuple(scale.shape) == normalized and (bias is None or tuple(bias.shape) == normalized):
        return [F.layer_norm(x, normalized, scale, bias, eps)]
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * scale
    return [y if bias is None else y + bias]


@register("LRN")
def lrn(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    size = attrs.get_int("size", 1)
    alpha, beta = attrs.get_float("alpha", 1e-4), attrs.get_float("beta", 0.75)
    bias = attrs.get_float("bias", 1.0)
    # ONNX centres the window with the extra element after the channel (torch puts it before).
    front, back = (size - 1) // 2, size - 1 - (size - 1) // 2
    n, c = x.shape[0], x.shape[1]
    squares = x.square().reshape(n, 1, c, -1, 1)
    squares = F.pad(squares, [0, 0, 0, 0, front, back])
    window_mean = F.avg_pool3d(squares, (size, 1, 1), stride=1).reshape(x.shape)
    return [x / (bias + alpha * window_mean).pow(beta)]


# ---------------------------------------------------------------------------------------------
# Activations and elementwise math
# ---------------------------------------------------------------------------------------------


def _unary(op_type: str, fn: Callable[[Tensor], Tensor]) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        return [fn(_first(inputs))]

    handler.__name__ = f"unary_{op_type.lower()}"
    register(op_type)(handler)


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


@register("LeakyRelu")
def leaky_relu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.leaky_relu(_first(inputs), attrs.get_float("alpha", 0.01))]


@register("PRelu")
def prelu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, slope = _first(inputs), _need(inputs, 1)
    # The slope broadcasts numpy-style against x, which F.prelu's channel rule does not cover.
    return [x.clamp(min=0) + slope * x.clamp(max=0)]


@register("Elu")
def elu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.elu(_first(inputs), attrs.get_float("alpha", 1.0))]


@register("Celu")
def celu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.celu(_first(inputs), attrs.get_float("alpha", 1.0))]


@register("Selu")
def selu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    alpha = attrs.get_float("alpha", 1.67326319217681884765625)
    gamma = attrs.get_float("gamma", 1.05070102214813232421875)
    return [gamma * F.elu(_first(inputs), alpha)]


@register("ThresholdedRelu")
def thresholded_relu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    return [torch.where(x > attrs.get_float("alpha", 1.0), x, torch.zeros_like(x))]


@register("HardSigmoid")
def hard_sigmoid(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    alpha, beta = attrs.get_float("alpha", 0.2), attrs.get_float("beta", 0.5)
    return [torch.clamp(_first(inputs) * alpha + beta, 0.0, 1.0)]


@register("Gelu")
def gelu(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [F.gelu(_first(inputs), approximate=attrs.get_str("approximate", "none"))]


@register("Clip", static=(1, 2))
def clip(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
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
        return [fn(_first(inputs), _need(inputs, 1))]

    handler.__name__ = f"binary_{op_type.lower()}"
    register(op_type)(handler)


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


@register("Pow", static=(1,))
def power(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    base, exponent = _first(inputs), _need(inputs, 1)
    # ONNX keeps the base's type whatever the exponent's.
    return [torch.pow(base, exponent).to(base.dtype)]


@register("Mod")
def modulo(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    a, b = _first(inputs), _need(inputs, 1)
    if attrs.get_int("fmod", 0):
        return [torch.fmod(a, b)]
    return [torch.remainder(a, b)]


def _variadic(op_type: str, fn: Callable[[Tensor, Tensor], Tensor], mean: bool = False) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        tensors = [t for t in inputs if t is not None]
        result = functools.reduce(fn, tensors)
        return [result / len(tensors) if mean else result]

    handler.__name__ = f"variadic_{op_type.lower()}"
    register(op_type)(handler)


_variadic("Max", torch.maximum)
_variadic("Min", torch.minimum)
_variadic("Sum", torch.add)
_variadic("Mean", torch.add, mean=True)


@register("Where")
def where(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [torch.where(_first(inputs).bool(), _need(inputs, 1), _need(inputs, 2))]


@register("Softmax", "LogSoftmax")
def softmax(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    fn = F.softmax if attrs.op_type == "Softmax" else F.log_softmax
    if attrs.opset >= 13:
        return [fn(x, _axis(attrs.get_int("axis", -1), x.dim()))]
    # Before opset 13 the input is viewed as 2-D [prod(dims < axis), prod(dims >= axis)].
    axis = _axis(attrs.get_int("axis", 1), x.dim())
    flat = x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))
    return [fn(flat, 1).reshape(x.shape)]


@register("Dropout", static=(1, 2), max_outputs=2)
def dropout(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    if attrs.opset >= 12:
        ratio_t = _optional(inputs, 1)
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


# ---------------------------------------------------------------------------------------------
# Pooling
# ---------------------------------------------------------------------------------------------

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
    strides, dilations = _window_attrs(attrs, nd, kernel)
    begins, ends = _spatial_pads(attrs, x.shape[2:], kernel, strides, dilations)
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


@register("MaxPool", max_outputs=1, check=_check_pool)
def max_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    kernel, strides, dilations, begins, ends, outs, ceil = _pool_geometry(attrs, x)
    fn = _MAX_POOL[len(kernel)]
    if _torch_fits(kernel, begins, ends):
        return [fn(x, kernel, strides, begins, dilations, ceil_mode=ceil)]
    padded_ends = _pad_for_windows(kernel, strides, dilations, x.shape[2:], begins, ends, outs)
    low = -math.inf if x.is_floating_point() else int(torch.iinfo(x.dtype).min)
    x = F.pad(x, _torch_pad_list(begins, padded_ends), value=low)
    return [fn(x, kernel, strides, 0, dilations)]


@register("AveragePool", check=_check_pool)
def average_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    kernel, strides, dilations, begins, ends, outs, ceil = _pool_geometry(attrs, x)
    include_pad = bool(attrs.get_int("count_include_pad", 0))
    fn = _AVG_POOL[len(kernel)]
    if _torch_fits(kernel, begins, ends):
        return [fn(x, kernel, strides, begins, ceil_mode=ceil, count_include_pad=include_pad)]
    overhang = _pad_for_windows(kernel, strides, dilations, x.shape[2:], begins, ends, outs)
    padded = F.pad(x, _torch_pad_list(begins, overhang))
    # Divide by the number of window positions that count: real elements, plus the declared
    # pads when count_include_pad (never the ceil-mode overhang past them).
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    if include_pad:
        mask = F.pad(mask, _torch_pad_list(begins, ends), value=1.0)
        tail = [o - e for o, e in zip(overhang, ends, strict=True)]
        mask = F.pad(mask, _torch_pad_list([0] * len(kernel), tail))
    else:
        mask = F.pad(mask, _torch_pad_list(begins, overhang))
    return [fn(padded, kernel, strides, 0) / fn(mask, kernel, strides, 0)]


@register("GlobalAveragePool")
def global_average_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    return [x.mean(tuple(range(2, x.dim())), keepdim=True)]


@register("GlobalMaxPool")
def global_max_pool(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    return [x.amax(tuple(range(2, x.dim())), keepdim=True)]


# ---------------------------------------------------------------------------------------------
# Shape manipulation
# ---------------------------------------------------------------------------------------------


@register("Flatten")
def flatten(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    axis = _axis(attrs.get_int("axis", 1), x.dim())
    return [x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))]


@register("Reshape", static=(1,))
def reshape(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    shape = _ints(_need(inputs, 1)) if attrs.opset >= 5 else attrs.get_ints("shape") or []
    if not attrs.get_int("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return [x.reshape(shape)]


@register("Concat")
def concat(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    tensors = [t for t in inputs if t is not None]
    return [torch.cat(tensors, dim=_axis(attrs.get_int("axis", 0), tensors[0].dim()))]


@register("Split", static=(1,), max_outputs=None)
def split(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    axis = _axis(attrs.get_int("axis", 0), x.dim())
    split_t = _optional(inputs, 1)
    sizes = _ints(split_t) if split_t is not None else attrs.get_ints("split")
    if sizes is None:
        parts = attrs.get_int("num_outputs", attrs.num_outputs)
        chunk = -(-x.shape[axis] // parts)
        sizes = [chunk] * (parts - 1) + [x.shape[axis] - chunk * (parts - 1)]
    return list(torch.split(x, sizes, dim=axis))


@register("Slice", static=(1, 2, 3, 4))
def slice_(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    if attrs.opset < 10:
        starts = attrs.get_ints("starts") or []
        ends = attrs.get_ints("ends") or []
        axes_list = attrs.get_ints("axes")
        steps = [1] * len(starts)
    else:
        starts, ends = _ints(_need(inputs, 1)), _ints(_need(inputs, 2))
        axes_t, steps_t = _optional(inputs, 3), _optional(inputs, 4)
        axes_list = _ints(axes_t) if axes_t is not None else None
        steps = _ints(steps_t) if steps_t is not None else [1] * len(starts)
    axes = axes_list if axes_list is not None else list(range(len(starts)))
    index: list[slice] = [slice(None)] * x.dim()
    reversed_axes: list[tuple[int, int, int, int]] = []
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = _axis(axis, x.dim())
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


@register("Transpose")
def transpose(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    perm = attrs.get_ints("perm") or list(reversed(range(x.dim())))
    return [x.permute(perm)]


def _axes_input_or_attr(attrs: NodeAttrs, inputs: Inputs, index: int) -> list[int] | None:
    tensor = inputs[index] if index < len(inputs) else None
    if tensor is not None:
        return _ints(tensor)
    return attrs.get_ints("axes")


@register("Squeeze", static=(1,))
def squeeze(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    axes = _axes_input_or_attr(attrs, inputs, 1)
    if not axes:
        return [x.squeeze()]
    return [x.squeeze(tuple(_axis(a, x.dim()) for a in axes))]


@register("Unsqueeze", static=(1,))
def unsqueeze(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    axes = _axes_input_or_attr(attrs, inputs, 1) or []
    rank = x.dim() + len(axes)
    for axis in sorted(_axis(a, rank) for a in axes):
        x = x.unsqueeze(axis)
    return [x]


_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _check_pad(attrs: NodeAttrs) -> str | None:
    mode = attrs.get_str("mode", "constant")
    return None if mode in _PAD_MODES else f"pad mode {mode!r} is not supported"


@register("Pad", static=(1, 2, 3), check=_check_pad)
def pad(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    mode = _PAD_MODES[attrs.get_str("mode", "constant")]
    rank = x.dim()
    if attrs.opset < 11:
        pads = attrs.get_ints("pads") or [0] * (2 * rank)
        value = attrs.get_float("value", 0.0)
        axes = list(range(rank))
    else:
        pads = _ints(_need(inputs, 1))
        value_t = _optional(inputs, 2)
        value = value_t.item() if value_t is not None else 0.0
        axes_t = _optional(inputs, 3)
        axes = [_axis(a, rank) for a in _ints(axes_t)] if axes_t is not None else list(range(rank))
    begins, ends = [0] * rank, [0] * rank
    for i, axis in enumerate(axes):
        begins[axis], ends[axis] = pads[i], pads[i + len(axes)]
    padded = [d for d in range(rank) if begins[d] or ends[d]]
    if not padded:
        return [x]
    first = padded[0]
    torch_pad = _torch_pad_list(begins[first:], ends[first:])
    if mode == "constant":
        return [F.pad(x, torch_pad, value=value)]
    # Non-constant modes pad the last 1-3 dims of a tensor with one or two leading dims.
    lead = x.shape[:first]
    view = x.reshape((-1, *x.shape[first:])) if first > 0 else x.unsqueeze(0)
    if rank - first > 3:
        raise ValueError(f"{mode} padding of {rank - first} dims is not supported")
    y = F.pad(view, torch_pad, mode=mode)
    return [y.reshape((*lead, *y.shape[1:])) if first > 0 else y.squeeze(0)]


@register("Expand", static=(1,))
def expand(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    target = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(_need(inputs, 1))))
    return [x.expand(target)]


@register("Tile", static=(1,))
def tile(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [_first(inputs).repeat(_ints(_need(inputs, 1)))]


@register("DepthToSpace")
def depth_to_space(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    bs = attrs.get_int("blocksize", 1)
    n, c, h, w = x.shape
    if attrs.get_str("mode", "DCR") == "DCR":
        y = x.reshape(n, bs, bs, c // bs**2, h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        y = x.reshape(n, c // bs**2, bs, bs, h, w).permute(0, 1, 4, 2, 5, 3)
    return [y.reshape(n, c // bs**2, h * bs, w * bs)]


@register("SpaceToDepth")
def space_to_depth(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    bs = attrs.get_int("blocksize", 1)
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // bs, bs, w // bs, bs).permute(0, 3, 5, 1, 2, 4)
    return [y.reshape(n, c * bs**2, h // bs, w // bs)]


# ---------------------------------------------------------------------------------------------
# Resampling
# ---------------------------------------------------------------------------------------------

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
    axes = [_axis(a, rank) for a in attrs.get_ints("axes") or range(rank)]
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


@register("Resize", static=(1, 2, 3), check=_check_resize)
def resize(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    if attrs.opset < 11:
        return [_resize(attrs, x, _floats(_need(inputs, 1)), None, "asymmetric", "simple")]
    scales_t, sizes_t = _optional(inputs, 2), _optional(inputs, 3)
    return [
        _resize(
            attrs,
            x,
            _floats(scales_t) if scales_t is not None else None,
            _ints(sizes_t) if sizes_t is not None else None,
            attrs.get_str("coordinate_transformation_mode", "half_pixel"),
            attrs.get_str("nearest_mode", "round_prefer_floor"),
        )
    ]


@register("Upsample", static=(1,), check=_check_resize)
def upsample(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    scales_t = _optional(inputs, 1)
    scales = _floats(scales_t) if scales_t is not None else attrs.get_floats("scales")
    return [_resize(attrs, x, scales, None, "asymmetric", "simple")]


# ---------------------------------------------------------------------------------------------
# Reductions
# ---------------------------------------------------------------------------------------------


def _reduce(op_type: str, fn: Callable[[Tensor, tuple[int, ...], bool], Tensor]) -> None:
    def handler(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
        x = _first(inputs)
        keep = bool(attrs.get_int("keepdims", 1))
        axes = _axes_input_or_attr(attrs, inputs, 1)
        if not axes:
            if attrs.get_int("noop_with_empty_axes", 0):
                return [x]
            axes = list(range(x.dim()))
        return [fn(x, tuple(sorted(_axis(a, x.dim()) for a in axes)), keep)]

    handler.__name__ = f"reduce_{op_type.lower()}"
    register(op_type, static=(1,))(handler)


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


@register("ArgMax", "ArgMin")
def arg_extreme(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    axis = _axis(attrs.get_int("axis", 0), x.dim())
    keep = bool(attrs.get_int("keepdims", 1))
    fn = torch.argmax if attrs.op_type == "ArgMax" else torch.argmin
    if attrs.get_int("select_last_index", 0):
        flipped = fn(x.flip(axis), dim=axis, keepdim=keep)
        return [x.shape[axis] - 1 - flipped]
    return [fn(x, dim=axis, keepdim=keep)]


@register("CumSum", static=(1,))
def cumsum(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    axis = _axis(_ints(_need(inputs, 1))[0], x.dim())
    if attrs.get_int("reverse", 0):
        x = x.flip(axis)
    y = x.cumsum(axis)
    if attrs.get_int("exclusive", 0):
        y = y - x
    return [y.flip(axis) if attrs.get_int("reverse", 0) else y]


@register("TopK", static=(1,), max_outputs=2)
def top_k(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    k = _ints(_need(inputs, 1))[0] if attrs.opset >= 10 else attrs.get_int("k", 1)
    axis = _axis(attrs.get_int("axis", -1), x.dim())
    values, indices = torch.topk(
        x,
        k,
        dim=axis,
        largest=bool(attrs.get_int("largest", 1)),
        sorted=bool(attrs.get_int("sorted", 1)),
    )
    return [values, indices]


# ---------------------------------------------------------------------------------------------
# Constants, shapes, indexing, types
# ---------------------------------------------------------------------------------------------


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


@register("Constant", check=_check_constant, build_time=True)
def constant(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [constant_value(attrs)]


@register("ConstantOfShape", static=(0,))
def constant_of_shape(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    shape_t = _first(inputs)
    array = attrs.get_array("value")
    value = numpy_to_torch(array.reshape(-1)) if array is not None else torch.zeros(1)
    return [
        value.to(shape_t.device).expand(_ints(shape_t)).clone()
        if shape_t.numel()
        else value.to(shape_t.device).reshape(()).clone()
    ]


@register("Shape")
def shape(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    dims = list(x.shape)
    start = attrs.get_int("start", 0)
    end = attrs.get_int("end", len(dims)) if attrs.has("end") else len(dims)
    return [torch.tensor(dims[start:end], dtype=torch.int64, device=x.device)]


@register("Size")
def size(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = _first(inputs)
    return [torch.tensor(x.numel(), dtype=torch.int64, device=x.device)]


@register("Gather", static=(1,))
def gather(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, indices = _first(inputs), _need(inputs, 1)
    axis = _axis(attrs.get_int("axis", 0), x.dim())
    indices = indices.to(device=x.device, dtype=torch.int64)
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    return [picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))]


@register("GatherElements", static=(1,))
def gather_elements(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, indices = _first(inputs), _need(inputs, 1)
    axis = _axis(attrs.get_int("axis", 0), x.dim())
    indices = indices.to(device=x.device, dtype=torch.int64)
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return [torch.gather(x, axis, indices)]


@register("GatherND", static=(1,))
def gather_nd(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, indices = _first(inputs), _need(inputs, 1)
    batch_dims = attrs.get_int("batch_dims", 0)
    depth = indices.shape[-1]
    batch = math.prod(x.shape[:batch_dims])
    data = x.reshape(batch, *x.shape[batch_dims:])
    index = indices.to(device=x.device, dtype=torch.int64).reshape(batch, -1, depth)
    rows = torch.arange(batch, device=x.device).unsqueeze(1).expand(batch, index.shape[1])
    # Advanced indexing with one index tensor per addressed axis (negatives wrap as in ONNX).
    picked = data[(rows, *index.unbind(-1))]
    return [picked.reshape(*indices.shape[:-1], *x.shape[batch_dims + depth :])]


def _check_cast(attrs: NodeAttrs) -> str | None:
    target = attrs.get_int("to", 1)
    return None if target in _ONNX_TO_TORCH_DTYPE else f"cast to ONNX type {target} unsupported"


@register("Cast", check=_check_cast)
def cast(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [_first(inputs).to(torch_dtype(attrs.get_int("to", 1)))]


@register("CastLike")
def cast_like(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [_first(inputs).to(_need(inputs, 1).dtype)]


@register("Range", static=(0, 1, 2))
def range_(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    start, limit, delta = _first(inputs), _need(inputs, 1), _need(inputs, 2)
    return [
        torch.arange(
            start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
        )
    ]


@register("NonZero")
def non_zero(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [torch.nonzero(_first(inputs)).t().contiguous()]
