"""Reading a handler's input tensors: required, optional, and shape/index inputs as ints.

Shared by every op family; ONNX marks an absent optional input as missing or empty.
"""

from __future__ import annotations

import torch

from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs


def as_ints(tensor: torch.Tensor) -> list[int]:
    """A shape/index tensor as Python ints (one host read per tensor, not per element)."""
    values = tensor.tolist()
    return [int(v) for v in values] if isinstance(values, list) else [int(values)]


def as_floats(tensor: torch.Tensor) -> list[float]:
    """A scales tensor as Python floats."""
    values = tensor.tolist()
    return [float(v) for v in values] if isinstance(values, list) else [float(values)]


def optional_input(inputs: Inputs, index: int) -> torch.Tensor | None:
    """Input ``index`` when present and non-empty (ONNX marks 'absent' either way)."""
    if index >= len(inputs):
        return None
    tensor = inputs[index]
    if tensor is None or (tensor.numel() == 0 and tensor.dim() > 0):
        return None
    return tensor


def first_input(inputs: Inputs) -> torch.Tensor:
    """Input 0, which every handler requires."""
    tensor = inputs[0]
    if tensor is None:
        raise ValueError("the first input is required")
    return tensor


def required_input(inputs: Inputs, index: int) -> torch.Tensor:
    """Input ``index``, raising when the node does not provide it."""
    tensor = inputs[index] if index < len(inputs) else None
    if tensor is None:
        raise ValueError(f"input #{index} is required")
    return tensor


def normalize_axis(axis: int, rank: int) -> int:
    """``axis`` counted from the front (ONNX allows negative axes)."""
    return axis + rank if axis < 0 else axis


def axes_input_or_attr(attrs: NodeAttrs, inputs: Inputs, index: int) -> list[int] | None:
    """Axes from input ``index`` (newer opsets) or else the ``axes`` attribute."""
    tensor = inputs[index] if index < len(inputs) else None
    if tensor is not None:
        return as_ints(tensor)
    return attrs.get_ints("axes")
