"""The pipeline layer: runs a recipe of passes and finetune steps under a budget, checks each
step, and writes the model, the report, plots and sweeps.

``compress`` (``pipeline.run``) is the entry point of the Python API; it is re-exported here
lazily so that importing a submodule (``pipeline.budget``) does not load the passes.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = ("CompressionResult", "StepRecord", "compress", "write_json_atomic")


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        from onnxcompress.pipeline import run

        return getattr(run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_EXPORTS)
