"""ONNX element types in torch: the dtype table, numpy conversion, and the Cast ops.

``numpy_to_torch`` also serves the module builder for initializers.
"""

from __future__ import annotations

import numpy as np
import torch

from onnxcompress.torch_bridge.ops.inputs import first_input, required_input
from onnxcompress.torch_bridge.ops.spec import Inputs, NodeAttrs, OpGroup, Tensor

OPS = OpGroup()

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


def _check_cast(attrs: NodeAttrs) -> str | None:
    target = attrs.get_int("to", 1)
    return None if target in _ONNX_TO_TORCH_DTYPE else f"cast to ONNX type {target} unsupported"


@OPS.register("Cast", check=_check_cast)
def cast(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [first_input(inputs).to(torch_dtype(attrs.get_int("to", 1)))]


@OPS.register("CastLike")
def cast_like(attrs: NodeAttrs, inputs: Inputs) -> list[Tensor]:
    return [first_input(inputs).to(required_input(inputs, 1).dtype)]
