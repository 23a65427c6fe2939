"""Torch bridge: run ONNX graphs as torch modules, train them, write weights back.

Names are imported lazily so that ``import onnxcompress.torch_bridge`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxcompress.torch_bridge.module import OnnxModule, check_supported
    from onnxcompress.torch_bridge.writeback import write_back

__all__ = ["OnnxModule", "check_supported", "write_back"]

_HOMES = {
    "OnnxModule": "onnxcompress.torch_bridge.module",
    "check_supported": "onnxcompress.torch_bridge.module",
    "write_back": "onnxcompress.torch_bridge.writeback",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
