"""Write trained torch-bridge values back into the ONNX graph they came from.

Only initializer contents change (by name, dtype and shape preserved); nodes, names, opset and
metadata stay as they were, so no re-export through ``torch.onnx`` is needed.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import torch

from onnxcompress.errors import DataError
from onnxcompress.torch_bridge.module import OnnxModule

logger = logging.getLogger(__name__)


def write_back(model: ir.Model, module: OnnxModule) -> ir.Model:
    """Copy the module's parameters and running statistics into ``model``'s initializers.

    The model is edited in place and returned; pass ``clone_model(model)`` to keep the
    original. Values are cast back to each initializer's own dtype.

    Raises:
        DataError: the module holds a tensor the model lacks, or with another shape (the module
            was built from a different model).
    """
    graph = model.graph
    label = graph.name or "<model>"
    tensors = list(module.named_onnx_parameters()) + list(module.named_onnx_state())
    # Check everything before writing anything, so a mismatch leaves the model untouched.
    targets = []
    for name, tensor in tensors:
        value = graph.initializers.get(name)
        if value is None or value.const_value is None:
            raise DataError(
                f"{label}: the module holds {name!r} but the model has no initializer of that "
                "name; write back into the model the module was built from"
            )
        if tuple(value.const_value.shape) != tuple(tensor.shape):
            raise DataError(
                f"{label}: initializer {name!r} has shape {tuple(value.const_value.shape)} "
                f"in the model but {tuple(tensor.shape)} in the module"
            )
        targets.append((name, value, tensor))
    for name, value, tensor in targets:
        old = value.const_value
        assert old is not None
        value.const_value = ir.Tensor(
            _to_numpy(tensor, old.dtype),
            dtype=old.dtype,
            name=name,
            doc_string=old.doc_string,
            metadata_props=dict(old.metadata_props) or None,
        )
    logger.debug("wrote %d tensors back into %s", len(targets), label)
    return model


def _to_numpy(tensor: torch.Tensor, dtype: ir.DataType) -> np.ndarray:
    """``tensor`` as a numpy array of the ONNX ``dtype`` (bfloat16 through its bit pattern)."""
    data = tensor.detach().cpu()
    if dtype == ir.DataType.BFLOAT16:
        bits = data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits.view(dtype.numpy())
    if data.dtype == torch.bfloat16:
        # numpy has no bfloat16; float32 holds every bfloat16 value exactly.
        data = data.float()
    return np.ascontiguousarray(data.numpy().astype(np.dtype(dtype.numpy()), copy=False))
