"""The dispatch table: every op family's handlers merged into one map from ONNX op type.

The one place the table is assembled; an op type registered by two families is an error.
"""

from __future__ import annotations

from collections.abc import Sequence

from onnxcompress.torch_bridge.ops import (
    constants,
    convolution,
    dtypes,
    elementwise,
    indexing,
    normalization,
    pooling,
    reduction,
    resampling,
    shape,
)
from onnxcompress.torch_bridge.ops.spec import Handler, NodeAttrs, OpGroup, OpSpec

_FAMILIES: tuple[OpGroup, ...] = (
    convolution.OPS,
    normalization.OPS,
    elementwise.OPS,
    pooling.OPS,
    shape.OPS,
    resampling.OPS,
    reduction.OPS,
    constants.OPS,
    indexing.OPS,
    dtypes.OPS,
)


def _assemble(families: Sequence[OpGroup]) -> dict[str, OpSpec]:
    table: dict[str, OpSpec] = {}
    for family in families:
        for op_type, spec in family.specs.items():
            if op_type in table:
                raise ValueError(f"op {op_type} registered twice")
            table[op_type] = spec
    return table


OP_SPECS: dict[str, OpSpec] = _assemble(_FAMILIES)
OP_HANDLERS: dict[str, Handler] = {op_type: spec.handler for op_type, spec in OP_SPECS.items()}


def unsupported_reason(attrs: NodeAttrs, used_outputs: Sequence[int]) -> str | None:
    """Why the bridge cannot run this (default-domain) node, or None when it can."""
    spec = OP_SPECS.get(attrs.op_type)
    if spec is None:
        return "no torch handler for this op"
    if spec.max_outputs is not None and any(i >= spec.max_outputs for i in used_outputs):
        return f"uses output #{max(used_outputs)}, the handler computes {spec.max_outputs}"
    return spec.check(attrs) if spec.check is not None else None
