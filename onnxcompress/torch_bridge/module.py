"""Run an ONNX graph as a ``torch.nn.Module`` whose float initializers are trainable parameters.

The module executes the nodes in topological order through the handlers in ``ops``; parameters
are keyed by their ONNX names, so trained values go back into the same graph (``writeback``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from onnxcompress.errors import ModelLoadError, PassConfigError, UnsupportedOpError
from onnxcompress.graph.op_families import DEFAULT_DOMAINS
from onnxcompress.torch_bridge import ops

logger = logging.getLogger(__name__)

TrainableSpec = str | Sequence[str] | None
_NO_SLOT = -1


def _default_opset(model: ir.Model) -> int:
    for domain in DEFAULT_DOMAINS:
        version = model.opset_imports.get(domain)
        if version is not None:
            return int(version)
    return int(model.graph.opset_imports.get("", 1))


def node_label(node: ir.Node, index: int) -> str:
    """The node's name, or a stable stand-in for unnamed nodes (``#index:OpType``)."""
    return node.name or f"#{index}:{node.op_type}"


def _attribute_values(node: ir.Node) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name, attr in node.attributes.items():
        kind = attr.type
        if kind == ir.AttributeType.TENSOR:
            values[name] = attr.value.numpy()
        elif kind == ir.AttributeType.TENSORS:
            values[name] = [t.numpy() for t in attr.value]
        elif kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS, ir.AttributeType.STRINGS):
            values[name] = tuple(attr.value)
        else:
            values[name] = attr.value
    return values


def _node_attrs(node: ir.Node, index: int, opset: int) -> ops.NodeAttrs:
    return ops.NodeAttrs(
        name=node_label(node, index),
        op_type=node.op_type,
        opset=opset,
        values=_attribute_values(node),
        num_outputs=len(node.outputs),
    )


def _used_outputs(node: ir.Node) -> list[int]:
    return [i for i, out in enumerate(node.outputs) if out.uses() or out.is_graph_output()]


def _as_model(model: ir.Model | str | os.PathLike[str]) -> tuple[ir.Model, str]:
    from onnxcompress.graph.model_io import load_model, model_label

    if isinstance(model, ir.Model):
        return model, model_label(model)

    return load_model(model), str(model)


def _find_unsupported(model: ir.Model) -> list[tuple[str, str, str]]:
    """(node label, op type, reason) for every node the bridge cannot run."""
    opset = _default_opset(model)
    problems = []
    for index, node in enumerate(model.graph):
        if node.domain not in DEFAULT_DOMAINS:
            op = f"{node.domain}::{node.op_type}"
            problems.append((node_label(node, index), op, f"custom domain {node.domain!r}"))
            continue
        reason = ops.unsupported_reason(_node_attrs(node, index, opset), _used_outputs(node))
        if reason is not None:
            problems.append((node_label(node, index), node.op_type, reason))
    return problems


def check_supported(model: ir.Model | str | os.PathLike[str]) -> list[tuple[str, str]]:
    """The (node name, op type) of every node ``OnnxModule`` cannot run; empty when all can.

    Custom-domain ops are reported as ``domain::OpType``; unnamed nodes as ``#index:OpType``.
    """
    loaded, _ = _as_model(model)
    return [(name, op) for name, op, _ in _find_unsupported(loaded)]


def require_supported(model: ir.Model) -> None:
    """Raise UnsupportedOpError, naming ``model`` and every node the bridge cannot run."""
    problems = _find_unsupported(model)
    if problems:
        raise UnsupportedOpError(_unsupported_message(_as_model(model)[1], problems))


def _unsupported_message(label: str, problems: Sequence[tuple[str, str, str]]) -> str:
    by_op: dict[str, list[str]] = {}
    reasons: dict[str, str] = {}
    for name, op, reason in problems:
        by_op.setdefault(op, []).append(name)
        reasons.setdefault(op, reason)
    parts = []
    for op, names in by_op.items():
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        parts.append(f"{op} [{reasons[op]}] at {shown}")
    return (
        f"{label}: the torch bridge cannot run {len(problems)} node(s): "
        + "; ".join(parts)
        + "; rewrite or remove these nodes before fine-tuning"
    )


def _topological_order(graph: ir.Graph, label: str) -> list[tuple[int, ir.Node]]:
    """Nodes (with their index in the file) so that every producer runs before its consumers."""
    nodes = list(graph)
    position = {id(node): i for i, node in enumerate(nodes)}
    waiting = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        producers = {
            position[id(value.producer())]
            for value in node.inputs
            if value is not None
            and value.producer() is not None
            and id(value.producer()) in position
        }
        waiting[i] = len(producers)
        for p in producers:
            consumers[p].append(i)
    ready = [i for i in range(len(nodes)) if waiting[i] == 0]
    order: list[int] = []
    while ready:
        # Keep the file's order among ready nodes: most graphs are already sorted.
        ready.sort(reverse=True)
        current = ready.pop()
        order.append(current)
        for c in consumers[current]:
            waiting[c] -= 1
            if waiting[c] == 0:
                ready.append(c)
    if len(order) != len(nodes):
        raise ModelLoadError(f"{label}: the graph has a cycle; it cannot be executed")
    return [(i, nodes[i]) for i in order]


def _safe_key(name: str, taken: set[str]) -> str:
    """A ``ParameterDict``/buffer key for an ONNX name ('.', '/', ':' are not allowed there)."""
    base = re.sub(r"\W", "_", name) or "tensor"
    if base[0].isdigit():
        base = f"t_{base}"
    key, counter = base, 1
    while key in taken or hasattr(nn.ParameterDict, key) or hasattr(_BufferStore, key):
        key = f"{base}_{counter}"
        counter += 1
    taken.add(key)
    return key


class _BufferStore(nn.Module):
    """Holds non-trainable tensors (shapes, indices, constants, running stats) as buffers."""

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.register_buffer(key, tensor)

    def get(self, key: str) -> torch.Tensor:
        tensor = self._buffers[key]
        assert tensor is not None
        return tensor


@dataclasses.dataclass
class _Step:
    """One node of the execution plan: slots in, slots out, slots to drop afterwards."""

    handler: ops.Handler
    attrs: ops.NodeAttrs
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    free: tuple[int, ...] = ()


class OnnxModule(nn.Module):
    """An ONNX graph executed with torch functional ops, trainable end to end.

    Float initializers become ``nn.Parameter`` objects in ``onnx_params`` (keyed by a safe form
    of their ONNX name, see ``param_for``/``onnx_name_of``), except those used only as shapes,
    indices, scales or bounds, scalars (0-d constants an exporter wrote), and
    BatchNormalization running statistics, which are buffers in ``onnx_buffers``. Integer and
    boolean tensors and ``Constant`` node outputs are buffers too. Like any torch module it
    starts in train mode: call ``eval()`` for inference semantics (BatchNormalization with
    running statistics, Dropout off).

    Args:
        model: an ``onnx_ir`` model or the path of an ONNX file.
        trainable: which parameters get ``requires_grad``: ``"all"``, ``"none"`` / None, a
            list of node names (the parameters those nodes consume), or a regular expression
            searched in node names.

    Raises:
        UnsupportedOpError: some nodes use ops the bridge cannot run (all are listed).
        PassConfigError: ``trainable`` names unknown nodes or matches none.
    """

    def __init__(
        self,
        model: ir.Model | str | os.PathLike[str],
        *,
        trainable: TrainableSpec = "all",
    ) -> None:
        super().__init__()
        loaded, label = _as_model(model)
        require_supported(loaded)
        self._label = label
        self.onnx_params = nn.ParameterDict()
        self.onnx_buffers = _BufferStore()
        self._key_of: dict[str, str] = {}
        self._name_of: dict[str, str] = {}
        self._state_names: list[str] = []
        self._params_of_node: dict[str, list[str]] = {}
        self._build(loaded, label)
        self.set_trainable(trainable)

    # -- construction ------------------------------------------------------------------------

    def _build(self, model: ir.Model, label: str) -> None:
        graph = model.graph
        opset = _default_opset(model)
        order = _topological_order(graph, label)
        taken: set[str] = set()
        slots: dict[int, int] = {}
        slot_of_name: dict[str, int] = {}

        def new_slot(value: ir.Value) -> int:
            slot = len(slots)
            slots[id(value)] = slot
            if value.name:
                slot_of_name[value.name] = slot
            return slot

        self.input_names: list[str] = []
        self._input_slots: list[int] = []
        for value in graph.inputs:
            if value.const_value is None or value.name not in graph.initializers:
                self.input_names.append(value.name or "")
                self._input_slots.append(new_slot(value))

        kinds = self._initializer_kinds(order, graph)
        self._param_slots: list[tuple[int, str]] = []
        self._buffer_slots: list[tuple[int, str]] = []
        for name, value in graph.initializers.items():
            if id(value) in slots or value.const_value is None:
                continue
            if not value.uses() and not value.is_graph_output():
                continue
            tensor = _initializer_tensor(value, label)
            key = _safe_key(name, taken)
            self._key_of[name], self._name_of[key] = key, name
            used_as = kinds.get(name, set())
            if tensor.is_floating_point() and tensor.dim() > 0 and "param" in used_as:
                self.onnx_params[key] = nn.Parameter(tensor)
                self._param_slots.append((new_slot(value), key))
            else:
                if tensor.is_floating_point() and used_as == {"state"}:
                    self._state_names.append(name)
                self.onnx_buffers.add(key, tensor)
                self._buffer_slots.append((new_slot(value), key))

        self._steps: list[_Step] = []
        state_names = set(self._state_names)
        for index, node in order:
            attrs = _node_attrs(node, index, opset)
            attrs.training = self.training
            spec = ops.OP_SPECS[node.op_type]
            if spec.build_time:
                produced = node.outputs[0]
                name = produced.name or attrs.name
                key = _safe_key(name, taken)
                self._key_of[name], self._name_of[key] = key, name
                self.onnx_buffers.add(key, spec.handler(attrs, [])[0])
                self._buffer_slots.append((new_slot(produced), key))
                continue
            input_slots = []
            for position, consumed in enumerate(node.inputs):
                if consumed is None:
                    input_slots.append(_NO_SLOT)
                    continue
                if id(consumed) not in slots:
                    raise ModelLoadError(
                        f"{label}: node {attrs.name} reads {consumed.name!r}, which no node, "
                        "input or initializer provides"
                    )
                input_slots.append(slots[id(consumed)])
                name = consumed.name or ""
                if name in state_names and position in spec.state_inputs:
                    attrs.state_inputs = attrs.state_inputs | {position}
                is_param = self._key_of.get(name, "") in self.onnx_params
                if is_param and position not in spec.static_inputs:
                    self._params_of_node.setdefault(attrs.name, []).append(name)
            self._params_of_node.setdefault(attrs.name, [])
            output_slots = tuple(
                new_slot(out) if (out.uses() or out.is_graph_output()) else _NO_SLOT
                for out in node.outputs
            )
            self._steps.append(_Step(spec.handler, attrs, tuple(input_slots), output_slots))

        self.output_names = [value.name or "" for value in graph.outputs]
        self._output_slots = []
        for value in graph.outputs:
            if id(value) not in slots:
                raise ModelLoadError(f"{label}: graph output {value.name!r} is never computed")
            self._output_slots.append(slots[id(value)])
        self._num_slots = len(slots)
        self._slot_of_name = slot_of_name
        self._plan_frees()

    def _initializer_kinds(
        self, order: Sequence[tuple[int, ir.Node]], graph: ir.Graph
    ) -> dict[str, set[str]]:
        """How each initializer is read: as trainable data, static shape/index, or state."""
        kinds: dict[str, set[str]] = {}
        for _, node in order:
            spec = ops.OP_SPECS[node.op_type]
            for position, value in enumerate(node.inputs):
                if value is None or value.name is None or value.name not in graph.initializers:
                    continue
                if position in spec.static_inputs:
                    kind = "static"
                elif position in spec.state_inputs:
                    kind = "state"
                else:
                    kind = "param"
                kinds.setdefault(value.name, set()).add(kind)
        return kinds

    def _plan_frees(self) -> None:
        """Drop each intermediate right after its last reader so memory stays bounded."""
        keep = set(self._output_slots)
        last_use: dict[int, int] = {}
        for i, step in enumerate(self._steps):
            for slot in step.inputs:
                if slot != _NO_SLOT:
                    last_use[slot] = i
        frees: list[list[int]] = [[] for _ in self._steps]
        for slot, i in last_use.items():
            if slot not in keep:
                frees[i].append(slot)
        for step, free in zip(self._steps, frees, strict=True):
            step.free = tuple(free)

    # -- names and selection -----------------------------------------------------------------

    def onnx_name_of(self, key: str) -> str:
        """The ONNX tensor name behind a parameter/buffer key."""
        return self._name_of[key]

    def key_of(self, onnx_name: str) -> str:
        """The parameter/buffer key of an ONNX tensor name."""
        return self._key_of[onnx_name]

    def param_for(self, onnx_name: str) -> nn.Parameter:
        """The parameter holding the ONNX initializer ``onnx_name``."""
        key = self._key_of.get(onnx_name)
        if key is None or key not in self.onnx_params:
            raise KeyError(f"{onnx_name!r} is not a trainable-capable initializer of this model")
        return self.onnx_params[key]

    def buffer_for(self, onnx_name: str) -> torch.Tensor:
        """The buffer holding a non-parameter initializer or Constant output ``onnx_name``."""
        key = self._key_of.get(onnx_name)
        if key is None or key not in self.onnx_buffers._buffers:
            raise KeyError(f"{onnx_name!r} is not a buffer of this module")
        return self.onnx_buffers.get(key)

    def named_onnx_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """(ONNX name, parameter) for every parameter, trainable or not."""
        for key, param in self.onnx_params.items():
            yield self._name_of[key], param

    def named_onnx_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(ONNX name, buffer) for running statistics that training updates."""
        for name in self._state_names:
            yield name, self.onnx_buffers.get(self._key_of[name])

    @property
    def trainable_names(self) -> list[str]:
        """ONNX names of the parameters that currently require gradients."""
        return sorted(name for name, p in self.named_onnx_parameters() if p.requires_grad)

    @property
    def node_names(self) -> list[str]:
        """Names of the executed nodes (unnamed ones as ``#index:OpType``)."""
        return list(self._params_of_node)

    def set_trainable(self, trainable: TrainableSpec) -> list[str]:
        """Choose which parameters get ``requires_grad``; returns their ONNX names.

        Raises:
            PassConfigError: a listed node does not exist, or the pattern matches no node.
        """
        if trainable == "all":
            chosen = set(self._name_of[k] for k in self.onnx_params)
        elif trainable is None or trainable == "none":
            chosen = set()
        elif isinstance(trainable, str):
            try:
                pattern = re.compile(trainable)
            except re.error as exc:
                raise PassConfigError(f"trainable pattern {trainable!r} is invalid: {exc}") from exc
            nodes = [n for n in self._params_of_node if pattern.search(n)]
            if not nodes:
                raise PassConfigError(
                    f"{self._label}: trainable pattern {trainable!r} matches no node name"
                )
            chosen = {p for n in nodes for p in self._params_of_node[n]}
        else:
            unknown = [n for n in trainable if n not in self._params_of_node]
            if unknown:
                raise PassConfigError(
                    f"{self._label}: trainable names unknown node(s): {', '.join(unknown[:10])}"
                )
            chosen = {p for n in trainable for p in self._params_of_node[n]}
        for key, param in self.onnx_params.items():
            param.requires_grad_(self._name_of[key] in chosen)
        return sorted(chosen)

    # -- execution ---------------------------------------------------------------------------

    def train(self, mode: bool = True) -> OnnxModule:
        super().train(mode)
        for step in self._steps:
            step.attrs.training = mode
        return self

    def forward(self, *inputs: Any, capture: Sequence[str] | None = None) -> Any:
        """Run the graph.

        Args:
            inputs: one tensor (or numpy array) per graph input, in order, or a single mapping
                from input name to tensor.
            capture: names of intermediate tensors to return as well (for hint distillation).

        Returns:
            The output tensor (one graph output) or a tuple of them; with ``capture``, a pair
            ``(outputs, {name: tensor})``.
        """
        tensors = self._bind_inputs(inputs)
        capture_slots: dict[int, list[str]] = {}
        for name in capture or ():
            slot = self._slot_of_name.get(name)
            if slot is None:
                raise KeyError(f"{self._label}: no tensor named {name!r} to capture")
            capture_slots.setdefault(slot, []).append(name)
        outputs, captured = self._run(tensors, capture_slots)
        result: Any = outputs[0] if len(outputs) == 1 else tuple(outputs)
        return (result, captured) if capture is not None else result

    def forward_with(
        self, inputs: Sequence[Any] | Mapping[str, Any], capture: Sequence[str]
    ) -> tuple[Any, dict[str, torch.Tensor]]:
        """``forward`` that also returns the tensors named in ``capture``."""
        args = (inputs,) if isinstance(inputs, Mapping) else tuple(inputs)
        result = self(*args, capture=list(capture))
        return result[0], result[1]

    def _bind_inputs(self, inputs: Sequence[Any]) -> list[torch.Tensor]:
        if len(inputs) == 1 and isinstance(inputs[0], Mapping):
            by_name = inputs[0]
            missing = [n for n in self.input_names if n not in by_name]
            if missing:
                raise KeyError(f"{self._label}: missing input(s) {', '.join(missing)}")
            inputs = tuple(by_name[n] for n in self.input_names)
        if len(inputs) != len(self.input_names):
            raise TypeError(
                f"{self._label}: expected {len(self.input_names)} input(s) "
                f"({', '.join(self.input_names)}), got {len(inputs)}"
            )
        return [
            t if isinstance(t, torch.Tensor) else torch.as_tensor(np.asarray(t)) for t in inputs
        ]

    def _run(
        self, inputs: Sequence[torch.Tensor], capture_slots: Mapping[int, list[str]]
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        env: list[torch.Tensor | None] = [None] * self._num_slots
        for slot, tensor in zip(self._input_slots, inputs, strict=True):
            env[slot] = tensor
        params = self.onnx_params._parameters
        for slot, key in self._param_slots:
            env[slot] = params[key]
        buffers = self.onnx_buffers._buffers
        for slot, key in self._buffer_slots:
            env[slot] = buffers[key]
        captured: dict[str, torch.Tensor] = {}
        for slot, names in capture_slots.items():
            if env[slot] is not None:
                for name in names:
                    captured[name] = env[slot]  # type: ignore[assignment]
        for step in self._steps:
            results = step.handler(step.attrs, [env[i] if i >= 0 else None for i in step.inputs])
            for slot, tensor in zip(step.outputs, results, strict=False):
                if slot >= 0:
                    env[slot] = tensor
                    if slot in capture_slots:
                        for name in capture_slots[slot]:
                            captured[name] = tensor
            for slot in step.free:
                env[slot] = None
        outputs = []
        for slot in self._output_slots:
            result = env[slot]
            if result is None:
                raise RuntimeError(f"{self._label}: an output was not produced (handler bug)")
            outputs.append(result)
        return outputs, captured

    def extra_repr(self) -> str:
        trainable = sum(p.numel() for p in self.onnx_params.values() if p.requires_grad)
        return (
            f"{self._label!r}, nodes={len(self._steps)}, params={len(self.onnx_params)}, "
            f"trainable_elements={trainable}"
        )


def _initializer_tensor(value: ir.Value, label: str) -> torch.Tensor:
    const = value.const_value
    assert const is not None
    if const.dtype == ir.DataType.STRING:
        raise UnsupportedOpError(
            f"{label}: initializer {value.name!r} holds strings, which torch cannot represent"
        )
    try:
        array = const.numpy()
    except Exception as exc:
        raise ModelLoadError(f"{label}: initializer {value.name!r} cannot be read: {exc}") from exc
    return ops.numpy_to_torch(array)
