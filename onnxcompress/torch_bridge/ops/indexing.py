"""Gather and index ops for the torch bridge.

Gather, GatherElements, GatherND and NonZero.
"""

from __future__ import annotations

import math

import torch

from onnxcompress.torch_bridge.ops.inputs import first_input, normalize_axis, required_input
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor

OPS = OpGroup()


@OPS.register("Gather", static=(1,))
def gather(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, indices = first_input(inputs), required_input(inputs, 1)
    axis = normalize_axis(attrs.get_int("axis", 0), x.dim())
    indices = indices.to(device=x.device, dtype=torch.int64)
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    picked = x.index_select(axis, indices.reshape(-1))
    return [picked.reshape((*x.shape[:axis], *indices.shape, *x.shape[axis + 1 :]))]


@OPS.register("GatherElements", static=(1,))
def gather_elements(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, indices = first_input(inputs), required_input(inputs, 1)
    axis = normalize_axis(attrs.get_int("axis", 0), x.dim())
    indices = indices.to(device=x.device, dtype=torch.int64)
    indices = torch.where(indices < 0, indices + x.shape[axis], indices)
    return [torch.gather(x, axis, indices)]


@OPS.register("GatherND", static=(1,))
def gather_nd(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    x, indices = first_input(inputs), required_input(inputs, 1)
    batch_dims = attrs.get_int("batch_dims", 0)
    depth = indices.shape[-1]
    batch = math.prod(x.shape[:batch_dims])
    data = x.reshape(batch, *x.shape[batch_dims:])
    index = indices.to(device=x.device, dtype=torch.int64).reshape(batch, -1, depth)
    rows = torch.arange(batch, device=x.device).unsqueeze(1).expand(batch, index.shape[1])
    # Advanced indexing with one index tensor per addressed axis (negatives wrap as in ONNX).
    picked = data[(rows, *index.unbind(-1))]
    return [picked.reshape(*indices.shape[:-1], *x.shape[batch_dims + depth :])]


@OPS.register("NonZero")
def non_zero(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [torch.nonzero(first_input(inputs)).t().contiguous()]
