"""ONNX op handlers for the torch bridge: one torch-functional implementation per ONNX op.

Every per-op fact the bridge needs (how to compute it, which inputs are shapes or indices
rather than trainable data, which hold running state, which attribute values it cannot honour)
is declared once, where the handler is registered. Handlers live in one module per op family;
``dispatch`` assembles them into ``OP_SPECS``, the table the module builder reads.
"""

from __future__ import annotations

from onnxcompress.torch_bridge.ops.constants import constant_value
from onnxcompress.torch_bridge.ops.dispatch import OP_HANDLERS, OP_SPECS, unsupported_reason
from onnxcompress.torch_bridge.ops.dtypes import numpy_to_torch, torch_dtype
from onnxcompress.torch_bridge.ops.spec import Check, Handler, Inputs, NodeAttrs, OpSpec

__all__ = [
    "OP_HANDLERS",
    "OP_SPECS",
    "Check",
    "Handler",
    "Inputs",
    "NodeAttrs",
    "OpSpec",
    "constant_value",
    "numpy_to_torch",
    "torch_dtype",
    "unsupported_reason",
]
