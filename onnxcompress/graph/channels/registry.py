"""The registry: one rule object per op family, looked up by (domain, op type).

Adding an op means adding it to a family's ``op_types`` (or a new :class:`OpRule` subclass to
``FAMILIES``); an op found nowhere is handled by ``UNKNOWN_OP``, which freezes what it touches.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from onnxcompress.graph.channels.elementwise import (
    ArgReduceRule,
    BatchNormRule,
    BroadcastRule,
    CrossChannelRule,
    ElementwiseRule,
    InstanceNormRule,
    LayerNormRule,
    PoolingRule,
    ReduceRule,
    SoftmaxRule,
    UnknownOpRule,
)
from onnxcompress.graph.channels.layout import (
    ConcatRule,
    ExpandRule,
    GatherRule,
    PadRule,
    ResizeRule,
    SliceRule,
    SplitRule,
    SqueezeRule,
    TileRule,
    TransposeRule,
)
from onnxcompress.graph.channels.quantization import DequantizeLinearRule, QuantizeLinearRule
from onnxcompress.graph.channels.rule import OpRule
from onnxcompress.graph.channels.shapes import (
    FlattenRule,
    ReshapeRule,
    ShapeRule,
    SizeRule,
    SourceRule,
)
from onnxcompress.graph.channels.weighted import (
    ConvRule,
    ConvTransposeRule,
    GemmRule,
    MatMulRule,
)

FAMILIES: tuple[OpRule[Any], ...] = (
    ElementwiseRule(),
    PoolingRule(),
    BroadcastRule(),
    BatchNormRule(),
    InstanceNormRule(),
    LayerNormRule(),
    CrossChannelRule(),
    SoftmaxRule(),
    ReduceRule(),
    ArgReduceRule(),
    ConvRule(),
    ConvTransposeRule(),
    GemmRule(),
    MatMulRule(),
    QuantizeLinearRule(),
    DequantizeLinearRule(),
    ConcatRule(),
    SplitRule(),
    SliceRule(),
    GatherRule(),
    PadRule(),
    FlattenRule(),
    ReshapeRule(),
    SqueezeRule(),
    TransposeRule(),
    ResizeRule(),
    ExpandRule(),
    TileRule(),
    ShapeRule(),
    SizeRule(),
    SourceRule(),
)

UNKNOWN_OP = UnknownOpRule()


def _index(families: tuple[OpRule[Any], ...]) -> dict[tuple[str, str], OpRule[Any]]:
    rules: dict[tuple[str, str], OpRule[Any]] = {}
    for rule in families:
        for domain in rule.domains:
            for op_type in rule.op_types:
                key = (domain, op_type)
                if key in rules:
                    raise RuntimeError(f"{op_type} is in two op families: {rules[key]}, {rule}")
                rules[key] = rule
    return rules


RULES = _index(FAMILIES)


def rule_for(node: ir.Node) -> OpRule[Any] | None:
    """The rule of ``node``'s op family, or None for ops no rule knows."""
    return RULES.get((node.domain, node.op_type))


def supported_op_types() -> list[str]:
    """The op types the analysis has a rule for (any other op freezes what it touches)."""
    return sorted({op_type for _, op_type in RULES})
