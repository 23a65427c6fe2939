"""onnxcompress: make trained CNNs smaller and faster by rewriting their ONNX graphs.

The public API is re-exported here lazily so that ``import onnxcompress`` stays cheap
(torch and onnxruntime load only when a function that needs them runs).
"""

from __future__ import annotations

__version__ = "0.1.0"

from onnxcompress.errors import OnnxCompressError

__all__ = ["OnnxCompressError", "__version__"]
