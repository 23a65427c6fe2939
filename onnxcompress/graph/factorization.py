"""Low-rank factorization of Conv and Gemm nodes into two cheaper nodes.

A Conv whose weight, seen as a ``Cout x (Cin*kh*kw)`` matrix, has rank r computes the same as a
kxk Conv ``Cin -> r`` followed by a 1x1 Conv ``r -> Cout``; a Gemm's ``K x N`` weight of rank r
splits into two Gemms through r features. ``lct subspace=lowrank`` trains weights onto rank r
and then rewrites them here, so ONNX Runtime runs fewer MACs. The numerics (truncated SVD,
the rank an energy keeps) are in ``onnxcompress.fitting.lowrank``.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.edits import constant_array, fresh_name, new_initializer
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

FACTORIZABLE = ("Conv", "Gemm")


def weight_matrix(node: ir.Node, weight: np.ndarray) -> np.ndarray:
    """The 2-D matrix whose rank the factorization uses: rows are the node's outputs.

    Conv: ``Cout x (Cin*k...)``; Gemm: ``N x K`` (the weight as ``transB=1`` stores it).
    """
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], -1)
    return weight if _int_attr(node, "transB", 0) else weight.T


def rank_cost(node: ir.Node, weight_shape: tuple[int, ...], rank: int | None) -> int:
    """MACs per output position (Conv) or per row (Gemm) at ``rank`` (None: unfactorized)."""
    if node.op_type == "Conv":
        cout, cin_k = weight_shape[0], int(np.prod(weight_shape[1:]))
    else:
        transposed = _int_attr(node, "transB", 0)
        cout, cin_k = (weight_shape[0], weight_shape[1]) if transposed else weight_shape[::-1]
    if rank is None:
        return cout * cin_k
    return rank * (cin_k + cout)


def break_even_rank(node: ir.Node, weight_shape: tuple[int, ...]) -> int:
    """The largest rank whose factorization costs fewer MACs than the dense node (0: none)."""
    dense = rank_cost(node, weight_shape, None)
    per_rank = rank_cost(node, weight_shape, 1)
    return max(0, (dense - 1) // per_rank)


def factorizable_reason(node: ir.Node) -> str | None:
    """Why ``node`` cannot be factorized, or None when it can."""
    if node.op_type not in FACTORIZABLE or node.domain not in DEFAULT_DOMAINS:
        return f"{node.op_type} is not one of {', '.join(FACTORIZABLE)}"
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None:
        return "its weight is not an initializer"
    if node.op_type == "Conv":
        if _int_attr(node, "group", 1) != 1:
            return "grouped/depthwise Conv (only group=1 factorizes into kxk + 1x1)"
        if weight.ndim < 3:
            return f"weight of rank {weight.ndim}"
        return None
    if _int_attr(node, "transA", 0):
        return "Gemm with transA=1"
    if weight.ndim != 2:
        return f"Gemm weight of rank {weight.ndim}"
    return None


def factorize(graph: ir.Graph, node: ir.Node, rank: int) -> tuple[ir.Node, ir.Node]:
    """Replace ``node`` by two nodes through ``rank`` channels; returns (first, second).

    The weight is split by SVD as ``U sqrt(S)`` and ``sqrt(S) V^T`` (balanced magnitudes);
    exact when the weight has rank at most ``rank``. The second node keeps the bias and writes
    the original output tensor (same name).

    Raises:
        ValueError: ``node`` cannot be factorized (see ``factorizable_reason``) or rank < 1.
    """
    reason = factorizable_reason(node)
    if reason is not None:
        raise ValueError(f"{node.name or node.op_type}: {reason}")
    if rank < 1:
        raise ValueError(f"{node.name or node.op_type}: rank {rank} must be at least 1")
    weight = constant_array(node.inputs[1])
    assert weight is not None
    matrix = weight_matrix(node, weight)
    u, s, vt = np.linalg.svd(matrix.astype(np.float64), full_matrices=False)
    rank = min(rank, s.size)
    root = np.sqrt(s[:rank])
    outer = (u[:, :rank] * root).astype(weight.dtype)  # rows: outputs
    inner = (root[:, None] * vt[:rank]).astype(weight.dtype)  # rows: the rank features
    label = node.name or node.op_type
    if node.op_type == "Conv":
        first, second = _conv_pair(graph, node, label, weight, inner, outer)
    else:
        first, second = _gemm_pair(graph, node, label, inner, outer)
    graph.insert_before(node, [first, second])
    old_out, new_out = node.outputs[0], second.outputs[0]
    name = old_out.name
    new_out.type, new_out.shape = old_out.type, old_out.shape
    old_out.name = fresh_name(graph, f"{name}__dense")
    old_out.replace_all_uses_with(new_out, replace_graph_outputs=True)
    new_out.name = name
    old_weight = node.inputs[1]
    graph.remove(node, safe=True)
    if old_weight is not None and not old_weight.uses():
        graph.initializers.pop(str(old_weight.name), None)
    logger.debug("%s: factorized at rank %d", label, rank)
    return first, second


def _conv_pair(
    graph: ir.Graph,
    node: ir.Node,
    label: str,
    weight: np.ndarray,
    inner: np.ndarray,
    outer: np.ndarray,
) -> tuple[ir.Node, ir.Node]:
    rank = inner.shape[0]
    spatial = weight.ndim - 2
    first_weight = new_initializer(
        graph, f"{label}.lowrank_kxk.weight", inner.reshape(rank, *weight.shape[1:])
    )
    second_weight = new_initializer(
        graph, f"{label}.lowrank_1x1.weight", outer.reshape(weight.shape[0], rank, *([1] * spatial))
    )
    # The kxk part keeps the geometry (strides, pads, dilations); the 1x1 part only mixes.
    attributes = [ir.Attr(attr.name, attr.type, attr.value) for attr in node.attributes.values()]
    first = ir.Node(
        "",
        "Conv",
        [node.inputs[0], first_weight],
        attributes=attributes,
        name=f"{label}/lowrank_kxk",
    )
    first.outputs[0].name = fresh_name(graph, f"{label}/lowrank_kxk_output")
    inputs = [first.outputs[0], second_weight]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs.append(node.inputs[2])
    second = ir.Node(
        "",
        "Conv",
        inputs,
        attributes=[ir.AttrInt64s("kernel_shape", [1] * spatial)],
        name=f"{label}/lowrank_1x1",
    )
    return first, second


def _gemm_pair(
    graph: ir.Graph, node: ir.Node, label: str, inner: np.ndarray, outer: np.ndarray
) -> tuple[ir.Node, ir.Node]:
    # Y = alpha * A B + beta * C with B = (inner^T outer^T): A -> rank features -> outputs.
    alpha = _float_attr(node, "alpha", 1.0)
    beta = _float_attr(node, "beta", 1.0)
    first_weight = new_initializer(graph, f"{label}.lowrank_in.weight", inner)
    second_weight = new_initializer(graph, f"{label}.lowrank_out.weight", outer)
    first = ir.Node(
        "",
        "Gemm",
        [node.inputs[0], first_weight],
        attributes=[ir.AttrFloat32("alpha", alpha), ir.AttrInt64("transB", 1)],
        name=f"{label}/lowrank_in",
    )
    first.outputs[0].name = fresh_name(graph, f"{label}/lowrank_in_output")
    inputs = [first.outputs[0], second_weight]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        inputs.append(node.inputs[2])
    second = ir.Node(
        "",
        "Gemm",
        inputs,
        attributes=[ir.AttrFloat32("beta", beta), ir.AttrInt64("transB", 1)],
        name=f"{label}/lowrank_out",
    )
    return first, second


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


__all__ = [
    "FACTORIZABLE",
    "break_even_rank",
    "factorizable_reason",
    "factorize",
    "rank_cost",
    "weight_matrix",
]
