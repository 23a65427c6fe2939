"""Small def-use edits shared by canonicalization, surgery and the passes.

Constants stored as initializers, private copies of shared weights before an edit, and fresh
tensor and node names.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir


def replace_with_initializer(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Replace the node output ``value`` by an initializer holding ``array``, keeping its name."""
    name = value.name
    value.name = f"{name}__folded"
    constant = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    constant.shape = ir.Shape(array.shape)
    constant.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    value.replace_all_uses_with(constant)
    graph.register_initializer(constant)
    return constant


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of a constant (initializer) input, or None if it is computed."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def set_initializer(graph: ir.Graph, value: ir.Value, array: np.ndarray) -> ir.Value:
    """Give an initializer new contents; copies it first if other nodes share it.

    Returns the value that now holds ``array`` for the consumers that asked (the same value when
    unshared, a new initializer otherwise).
    """
    if len(value.uses()) > 1:
        raise ValueError(f"initializer {value.name!r} is shared; use copy_initializer_for")
    value.const_value = ir.tensor(array, name=value.name)
    value.shape = ir.Shape(array.shape)
    return value


def private_initializer(graph: ir.Graph, node: ir.Node, index: int) -> ir.Value:
    """Make input ``index`` of ``node`` an initializer that only this node uses.

    Edits to weights must not leak into other nodes that share the same initializer (tied
    weights, deduplicated exports), so a shared one is copied under a fresh name first.
    """
    value = node.inputs[index]
    if value is None or value.const_value is None:
        raise ValueError(f"input {index} of node {node.name!r} is not an initializer")
    if len(value.uses()) == 1 and not value.is_graph_output():
        return value
    array = value.const_value.numpy().copy()
    name = _fresh_name(graph, f"{value.name}__{node.name or node.op_type}")
    copy = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    copy.shape = ir.Shape(array.shape)
    copy.type = value.type
    graph.register_initializer(copy)
    node.replace_input_with(index, copy)
    return copy


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer named ``base`` (made unique); returns it."""
    name = _fresh_name(graph, base)
    array = np.ascontiguousarray(array)
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
    graph.register_initializer(value)
    return value


def fresh_node_name(graph: ir.Graph, base: str) -> str:
    """A node name not yet used in ``graph`` (node names must be unique for the report)."""
    return _unused(base, {node.name for node in graph})


def _fresh_name(graph: ir.Graph, base: str) -> str:
    taken: set[str | None] = set(graph.initializers)
    taken.update(v.name for n in graph for v in n.outputs if v.name)
    taken.update(v.name for v in graph.inputs if v.name)
    return _unused(base, taken)


def _unused(base: str, taken: set[str | None]) -> str:
    """``base``, or ``base_1``, ``base_2``... the first not in ``taken``."""
    if base not in taken:
        return base
    index = 1
    while f"{base}_{index}" in taken:
        index += 1
    return f"{base}_{index}"


def fresh_name(graph: ir.Graph, base: str) -> str:
    """A tensor name not yet used anywhere in ``graph``."""
    return _fresh_name(graph, base)


def unused_initializers(graph: ir.Graph) -> list[str]:
    """The names of the initializers nothing reads (neither a node nor the graph's outputs)."""
    return [
        name
        for name, value in graph.initializers.items()
        if not value.uses() and not value.is_graph_output() and not value.is_graph_input()
    ]


def drop_unused_initializers(graph: ir.Graph) -> None:
    """Delete initializers nothing reads (they would make ONNX Runtime warn at every load)."""
    for name in unused_initializers(graph):
        del graph.initializers[name]
