"""Normalization ops for the torch bridge.

Batch, instance, layer and local-response normalization as torch functional calls.
"""

from __future__ import annotations

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


def _check_batchnorm(attrs: NodeAttrs) -> str | None:
    if attrs.opset < 9 and attrs.get_int("spatial", 1) == 0:
        return "spatial=0 (per-element statistics) is not supported"
    return None


@OPS.register("BatchNormalization", state=(3, 4), max_outputs=3, check=_check_batchnorm)
def batch_normalization(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, scale, bias = first_input(inputs), required_input(inputs, 1), required_input(inputs, 2)
    mean, var = required_input(inputs, 3), required_input(inputs, 4)
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


@OPS.register("InstanceNormalization")
def instance_normalization(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, scale, bias = first_input(inputs), required_input(inputs, 1), required_input(inputs, 2)
    eps = attrs.get_float("epsilon", 1e-5)
    return [F.instance_norm(x, None, None, scale, bias, True, 0.0, eps)]


@OPS.register("LayerNormalization")
def layer_normalization(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, scale, bias = first_input(inputs), required_input(inputs, 1), optional_input(inputs, 2)
    eps = attrs.get_float("epsilon", 1e-5)
    axis = normalize_axis(attrs.get_int("axis", -1), x.dim())
    normalized = tuple(x.shape[axis:])
    if tuple(scale.shape) == normalized and (bias is None or tuple(bias.shape) == normalized):
        return [F.layer_norm(x, normalized, scale, bias, eps)]
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    var = (x - mean).square().mean(dims, keepdim=True)
    y = (x - mean) * torch.rsqrt(var + eps) * scale
    return [y if bias is None else y + bias]


@OPS.register("LRN")
def lrn(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x = first_input(inputs)
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
