"""What an op handler sees and declares: node attributes, per-op facts, handler types.

Each op family collects its handlers in an ``OpGroup``; ``dispatch`` merges the groups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor
Inputs = list[torch.Tensor | None]
Handler = Callable[["NodeAttrs", Inputs], list[torch.Tensor]]
Check = Callable[["NodeAttrs"], "str | None"]


@dataclasses.dataclass
class NodeAttrs:
    """What a handler knows about its node besides the input tensors.

    Attributes:
        name: the node's name (for messages).
        op_type: the ONNX op type.
        opset: the default-domain opset the model imports (semantics change across opsets).
        values: the node's attributes as plain Python values (ints, floats, strings, tuples,
            numpy arrays for tensor attributes).
        num_outputs: how many outputs the node declares (Split divides by it).
        training: the module's train/eval mode (Dropout, BatchNormalization).
        state_inputs: input positions holding module buffers that may be updated in place
            (BatchNormalization's running mean and variance).
    """

    name: str
    op_type: str
    opset: int
    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_outputs: int = 1
    training: bool = False
    state_inputs: frozenset[int] = frozenset()

    def has(self, key: str) -> bool:
        return key in self.values

    def get_int(self, key: str, default: int) -> int:
        value = self.values.get(key)
        return default if value is None else int(value)

    def get_float(self, key: str, default: float) -> float:
        value = self.values.get(key)
        return default if value is None else float(value)

    def get_str(self, key: str, default: str) -> str:
        value = self.values.get(key)
        return default if value is None else str(value)

    def get_ints(self, key: str) -> list[int] | None:
        value = self.values.get(key)
        return None if value is None else [int(v) for v in value]

    def get_floats(self, key: str) -> list[float] | None:
        value = self.values.get(key)
        return None if value is None else [float(v) for v in value]

    def get_array(self, key: str) -> np.ndarray | None:
        value = self.values.get(key)
        return None if value is None else np.asarray(value)


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """A registered op: its handler and what the module builder must know about its inputs.

    Attributes:
        handler: computes the outputs from the attributes and input tensors.
        static_inputs: positions read as shapes, indices, scales or bounds; a float initializer
            used only there stays a fixed buffer instead of a trainable parameter.
        state_inputs: positions holding running statistics (buffers updated in train mode and
            written back).
        max_outputs: how many outputs the handler produces; None for variadic (Split).
        check: returns why a node's attributes cannot be honoured, or None.
        build_time: the op has no inputs and is evaluated once when the module is built; its
            output becomes a buffer (Constant).
    """

    handler: Handler
    static_inputs: frozenset[int] = frozenset()
    state_inputs: frozenset[int] = frozenset()
    max_outputs: int | None = 1
    check: Check | None = None
    build_time: bool = False


class OpGroup:
    """One op family's handlers with their per-op facts, keyed by ONNX op type."""

    def __init__(self) -> None:
        self.specs: dict[str, OpSpec] = {}

    def register(
        self,
        *op_types: str,
        static: Sequence[int] = (),
        state: Sequence[int] = (),
        max_outputs: int | None = 1,
        check: Check | None = None,
        build_time: bool = False,
    ) -> Callable[[Handler], Handler]:
        """Register ``handler`` for ``op_types`` with its per-op facts."""

        def wrap(handler: Handler) -> Handler:
            for op_type in op_types:
                if op_type in self.specs:
                    raise ValueError(f"op {op_type} registered twice")
                self.specs[op_type] = OpSpec(
                    handler, frozenset(static), frozenset(state), max_outputs, check, build_time
                )
            return handler

        return wrap
