"""Canonicalize an exporter's graph into the plain form the passes expect.

Constants are folded, BatchNormalization is folded into the Conv/Gemm before it and shapes are
inferred, while the user's tensor names, opset and metadata are kept.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as ir_common

from onnxcompress.graph.edits import (
    constant_array,
    drop_unused_initializers,
    fresh_name,
    private_initializer,
    replace_with_initializer,
    set_initializer,
)
from onnxcompress.graph.model_io import load_model
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

# Folding a node whose output is bigger than this would bloat the file; leave it to the runtime.
MAX_FOLDED_ELEMENTS = 1 << 26
# Rounds of shape inference + folding: each round can resolve the shapes the next one needs.
MAX_FOLD_ROUNDS = 32
# Ops that widen a stored weight to the compute type: folded only when that costs no space.
_WIDENING_OPS = frozenset({"Cast", "CastLike", "DequantizeLinear"})
# Ops whose outputs are not a function of their inputs: never folded.
_NON_DETERMINISTIC_OPS = frozenset(
    {
        "RandomNormal",
        "RandomNormalLike",
        "RandomUniform",
        "RandomUniformLike",
        "Multinomial",
        "Bernoulli",
        "Dropout",
    }
)


@dataclasses.dataclass
class CanonicalizeSummary:
    """What canonicalization changed, for the report."""

    initializer_inputs_removed: int = 0
    constants_folded: int = 0
    batchnorms_folded: int = 0
    identities_removed: int = 0
    reshapes_to_flatten: int = 0
    nodes_before: int = 0
    nodes_after: int = 0

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def canonicalize(
    model: ir.Model,
    *,
    fold_constants: bool = True,
    fold_batchnorm: bool = True,
    keep_initializer_inputs: tuple[str, ...] = (),
) -> CanonicalizeSummary:
    """Rewrite ``model`` in place into the canonical form the passes work on.

    Args:
        fold_constants: evaluate every node whose inputs are all constant and store the result
            as an initializer (weights built by ``Constant``/``ConstantOfShape``/``Identity``,
            shape arithmetic on static shapes).
        fold_batchnorm: fold inference-mode BatchNormalization into the Conv/Gemm before it
            when that Conv/Gemm feeds nothing else.
        keep_initializer_inputs: legacy models (opset <= 9, Caffe2) list initializers as graph
            inputs too; these are treated as constants unless named here (the user feeds them).
    """
    graph = model.graph
    summary = CanonicalizeSummary(nodes_before=graph.num_nodes())
    summary.initializer_inputs_removed = _drop_initializer_inputs(graph, keep_initializer_inputs)
    if summary.initializer_inputs_removed and (model.ir_version or 0) < 4:
        # Before IR 4 every initializer had to be a graph input; the checker rejects the result.
        model.ir_version = 4
    ir_common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    # Identities go before folding: folding Identity(weight) would copy a shared weight.
    summary.identities_removed = _remove_identities(graph)
    infer_shapes(model)
    if fold_constants:
        folded = _fold_constant_nodes(model)
        summary.constants_folded = folded
        # Folding a shape computation can make the next Reshape's output shape known, which lets
        # the shape computations after it fold in turn (TorchScript channel shuffles).
        for _ in range(MAX_FOLD_ROUNDS):
            if not folded:
                break
            infer_shapes(model)
            folded = _fold_constant_nodes(model)
            summary.constants_folded += folded
    if fold_batchnorm:
        summary.batchnorms_folded = _fold_batchnorms(graph)
    summary.reshapes_to_flatten = _reshapes_to_flatten(graph)
    ir_common.RemoveUnusedNodesPass()(model)
    drop_unused_initializers(graph)
    infer_shapes(model)
    ir_common.TopologicalSortPass()(model)
    summary.nodes_after = graph.num_nodes()
    return summary


def infer_shapes(model: ir.Model) -> None:
    """Run ONNX shape inference and merge the inferred shapes into the IR.

    Shape inference is best-effort: a model it cannot handle (unknown domain ops) keeps the
    shapes it had.
    """
    try:
        ir_common.ShapeInferencePass(strict_mode=False)(model)
    except Exception as exc:  # onnx raises InferenceError and others for exotic graphs
        logger.warning("shape inference failed, keeping the shapes the model had: %s", exc)


def _remove_identities(graph: ir.Graph) -> int:
    """Remove ``Identity`` nodes of the main graph; subgraphs (If/Loop/Scan bodies) stay as is.

    onnx_ir's IdentityEliminationPass also rewrites subgraphs, where an Identity that forwards
    an outer-scope value to a branch output cannot go (the branch would output a value it does
    not produce), and the checker then rejects the model.
    """
    removed = 0
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in DEFAULT_DOMAINS:
            continue
        if len(node.inputs) != 1 or len(node.outputs) != 1 or node.inputs[0] is None:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if out.is_graph_output() and (
            source.is_graph_input() or source.is_initializer() or source.is_graph_output()
        ):
            continue  # renaming the source would rename a graph input, weight or other output
        if source.type is None:
            source.type = out.type
        if source.shape is None:
            source.shape = out.shape
        if out.is_graph_output():
            name = out.name
            out.name = f"{name}__identity"
            out.replace_all_uses_with(source, replace_graph_outputs=True)
            source.name = name
        else:
            out.replace_all_uses_with(source)
        graph.remove(node, safe=True)
        removed += 1
    return removed


def _drop_initializer_inputs(graph: ir.Graph, keep: tuple[str, ...]) -> int:
    dropped = 0
    for value in list(graph.inputs):
        if value.is_initializer() and value.name not in keep:
            graph.inputs.remove(value)
            dropped += 1
    return dropped


def _fold_constant_nodes(model: ir.Model) -> int:
    """Evaluate nodes whose inputs are all constants; returns how many were folded."""
    from onnx.reference import ReferenceEvaluator  # heavy import, only when folding

    graph = model.graph
    opset = model.opset_imports.get("", 17)
    folded = 0
    for node in list(graph):
        if node.domain not in DEFAULT_DOMAINS or node.op_type in _NON_DETERMINISTIC_OPS:
            continue
        if any(
            attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
            for attr in node.attributes.values()
        ):
            continue
        if any(out.is_graph_output() for out in node.outputs):
            continue
        results = _static_shape_result(node)
        if results is None:
            if not node.inputs or not all(
                inp is None or inp.const_value is not None for inp in node.inputs
            ):
                continue
            try:
                results = evaluate_node(node, opset, ReferenceEvaluator)
            except Exception as exc:
                logger.debug("not folding %s (%s): %s", node.name, node.op_type, exc)
                continue
        if results is None or any(r.size > MAX_FOLDED_ELEMENTS for r in results):
            continue
        if node.op_type in _WIDENING_OPS and sum(r.nbytes for r in results) > sum(
            inp.const_value.nbytes for inp in node.inputs if inp is not None and inp.const_value
        ):
            # bfloat16/int8 weights behind a Cast or DequantizeLinear stay as narrow as the
            # file stores them; folding would double or quadruple their size.
            continue
        for out, array in zip(node.outputs, results, strict=True):
            replace_with_initializer(graph, out, array)
        graph.remove(node, safe=True)
        folded += 1
    return folded


def _static_shape_result(node: ir.Node) -> list[np.ndarray] | None:
    """``Shape``/``Size`` of a tensor whose shape is fully static fold without evaluation."""
    if node.op_type == "Gather":
        return _static_gathered_dims(node)
    if node.op_type not in ("Shape", "Size") or not node.inputs or node.inputs[0] is None:
        return None
    shape = node.inputs[0].shape
    if shape is None or not all(isinstance(d, int) for d in shape.dims):
        return None
    dims = np.array([d for d in shape.dims if isinstance(d, int)], dtype=np.int64)
    if node.op_type == "Size":
        return [np.array(int(np.prod(dims)), dtype=np.int64)]
    rank = len(dims)
    start_attr = node.attributes.get("start")
    end_attr = node.attributes.get("end")
    start = start_attr.as_int() if start_attr is not None else 0
    end = end_attr.as_int() if end_attr is not None else rank
    return [dims[slice(start, end)]]


def _static_gathered_dims(node: ir.Node) -> list[np.ndarray] | None:
    """``Gather(Shape(x), i)`` folds when the dims it picks are static, even if the batch is not.

    TorchScript exports compute reshape targets this way (channel shuffles, ``x.view(n, -1)``);
    left unfolded, shape inference loses every dim after the Reshape and the MACs downstream
    count as if the spatial dims were 1.
    """
    data, indices = [*node.inputs, None, None][:2]
    shape_node = data.producer() if data is not None else None
    if shape_node is None or shape_node.op_type != "Shape" or shape_node.inputs[0] is None:
        return None
    axis = node.attributes.get("axis")
    if (axis is not None and axis.as_int() != 0) or indices is None:
        return None
    if indices.const_value is None or shape_node.inputs[0].shape is None:
        return None
    dims = list(shape_node.inputs[0].shape.dims)
    start_attr, end_attr = shape_node.attributes.get("start"), shape_node.attributes.get("end")
    start = start_attr.as_int() if start_attr is not None else 0
    end = end_attr.as_int() if end_attr is not None else len(dims)
    picked = np.array(dims[slice(start, end)], dtype=object)[indices.const_value.numpy()]
    if not all(isinstance(d, int) for d in np.atleast_1d(picked)):
        return None
    return [np.array(picked, dtype=np.int64)]


def evaluate_node(node: ir.Node, opset: int, evaluator_cls: type) -> list[np.ndarray]:
    """The outputs of ``node``, whose inputs are all constants, by onnx's reference evaluator."""
    input_names = [f"in{i}" if inp is not None else "" for i, inp in enumerate(node.inputs)]
    output_names = [f"out{i}" for i in range(len(node.outputs))]
    attrs = [ir.serde.serialize_attribute(attr) for attr in node.attributes.values()]
    onnx_node = onnx.helper.make_node(node.op_type, input_names, output_names)
    onnx_node.attribute.extend(attrs)
    # A bare NodeProto is evaluated at the newest opset whatever ``opsets`` says; a one-node
    # model pins the model's opset (Unsqueeze with ``axes`` as an attribute before opset 13...).
    graph = onnx.helper.make_graph(
        [onnx_node],
        "fold",
        [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in input_names if name],
        [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in output_names],
    )
    wrapper = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=10
    )
    evaluator = evaluator_cls(wrapper)
    feeds = {
        name: inp.const_value.numpy()
        for name, inp in zip(input_names, node.inputs, strict=True)
        if inp is not None and inp.const_value is not None
    }
    return [np.asarray(r) for r in evaluator.run(None, feeds)]


def fold_batchnorm(graph: ir.Graph, bn: ir.Node) -> bool:
    """Fold one inference-mode BatchNormalization into the Conv/Gemm before it, in place; the
    producer takes over the BN's output name. False (graph unchanged) when it cannot."""
    return _fold_one_batchnorm(graph, bn)


def _fold_batchnorms(graph: ir.Graph) -> int:
    folded = 0
    for bn in list(graph):
        if bn.op_type != "BatchNormalization" or bn.domain not in DEFAULT_DOMAINS:
            continue
        if _fold_one_batchnorm(graph, bn):
            folded += 1
    return folded


def _fold_one_batchnorm(graph: ir.Graph, bn: ir.Node) -> bool:
    training = bn.attributes.get("training_mode")
    if (training is not None and training.as_int() != 0) or len(
        [o for o in bn.outputs if o.uses() or o.is_graph_output()]
    ) > 1:
        return False
    source = bn.inputs[0]
    producer = source.producer() if source is not None else None
    if producer is None or producer.op_type not in ("Conv", "Gemm") or source is None:
        return False
    if len(source.uses()) != 1 or source.is_graph_output():
        return False
    params = [constant_array(v) for v in bn.inputs[1:5]]
    if any(p is None for p in params):
        return False
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    eps_attr = bn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    scale = gamma / np.sqrt(var + eps)
    weight = constant_array(producer.inputs[1])
    if weight is None:
        return False
    if producer.op_type == "Conv":
        if weight.shape[0] != scale.shape[0]:
            return False
        new_weight = weight * scale.reshape(-1, *([1] * (weight.ndim - 1)))
    else:
        # BN over a Gemm's output features; Gemm(alpha, transB) decides where features live.
        if (
            _gemm_attr(producer, "transA", 0)
            or weight.ndim != 2
            or source.shape is None
            or len(source.shape) != 2
        ):
            return False
        alpha = _gemm_attr_float(producer, "alpha", 1.0)
        beta_gemm = _gemm_attr_float(producer, "beta", 1.0)
        if alpha != 1.0 or beta_gemm != 1.0:
            return False
        trans_b = _gemm_attr(producer, "transB", 0)
        features = weight.shape[0] if trans_b else weight.shape[1]
        if features != scale.shape[0]:
            return False
        new_weight = weight * (scale[:, None] if trans_b else scale[None, :])
    out_channels = scale.shape[0]
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = constant_array(bias_value)
    if bias_value is not None and bias is None:
        return False
    if bias is None:
        bias = np.zeros(out_channels)
    bias = np.broadcast_to(bias, (out_channels,)) if bias.size in (1, out_channels) else None
    if bias is None:
        return False
    new_bias = (bias - mean) * scale + beta
    dtype = weight.dtype
    weight_value = private_initializer(graph, producer, 1)
    set_initializer(graph, weight_value, new_weight.astype(dtype))
    if bias_value is not None:
        bias_value = private_initializer(graph, producer, 2)
        set_initializer(graph, bias_value, new_bias.astype(dtype))
    else:
        name = fresh_name(graph, f"{producer.name or 'conv'}.bias")
        bias_value = ir.Value(name=name, const_value=ir.tensor(new_bias.astype(dtype), name=name))
        bias_value.shape = ir.Shape([out_channels])
        bias_value.type = ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
        graph.register_initializer(bias_value)
        if len(producer.inputs) == 2:
            producer.resize_inputs(3)
        producer.replace_input_with(2, bias_value)
    # The BN's output keeps its (user-visible) name; the producer now writes it directly.
    bn_out = bn.outputs[0]
    out_name = bn_out.name
    bn_out.name = f"{out_name}__bn_folded"
    bn_out.replace_all_uses_with(source, replace_graph_outputs=True)
    source.name = out_name
    graph.remove(bn, safe=True)
    return True


def _reshapes_to_flatten(graph: ir.Graph) -> int:
    """Turn the exporters' dynamic-batch flatten into ``Flatten(axis=1)``.

    ``torch.flatten(x, 1)`` under a dynamic batch exports as
    ``Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))``: shape inference loses the
    feature count and channel analysis cannot see that channels map to column blocks. A
    Reshape whose target is provably ``[N, -1]`` (or a constant ``[0, -1]``) is a Flatten.
    """
    rewritten = 0
    for node in list(graph):
        if node.op_type != "Reshape" or len(node.inputs) < 2:
            continue
        data, target = node.inputs[0], node.inputs[1]
        if data is None or target is None or not _is_batch_then_minus_one(target, data):
            continue
        allowzero = node.attributes.get("allowzero")
        if allowzero is not None and allowzero.as_int() != 0:
            constant = constant_array(target)
            if constant is not None:  # with allowzero a literal 0 means a zero-sized dim
                continue
        flatten = ir.Node(
            "", "Flatten", [data], attributes=[ir.AttrInt64("axis", 1)], name=node.name
        )
        graph.insert_before(node, flatten)
        out = node.outputs[0]
        new_out = flatten.outputs[0]
        name = out.name
        out.name = f"{name}__reshape"
        new_out.name = name
        new_out.type = out.type
        out.replace_all_uses_with(new_out, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        rewritten += 1
    return rewritten


def _is_batch_then_minus_one(target: ir.Value, data: ir.Value) -> bool:
    constant = constant_array(target)
    if constant is not None:
        return constant.tolist() == [0, -1]
    concat = target.producer()
    if concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2:
        return False
    first, second = concat.inputs
    tail = constant_array(second)
    if first is None or tail is None or tail.reshape(-1).tolist() != [-1]:
        return False
    unsqueeze = first.producer()
    if unsqueeze is not None and unsqueeze.op_type == "Unsqueeze":
        first = unsqueeze.inputs[0]
        unsqueeze_source = first.producer() if first is not None else None
    else:
        unsqueeze_source = unsqueeze
    gather = unsqueeze_source
    if gather is None or first is None:
        return False
    if gather.op_type == "Gather":
        index = constant_array(gather.inputs[1])
        shape_node = gather.inputs[0].producer() if gather.inputs[0] is not None else None
        if index is None or index.reshape(-1).tolist() != [0]:
            return False
    elif gather.op_type == "Slice":
        starts, ends = constant_array(gather.inputs[1]), constant_array(gather.inputs[2])
        shape_node = gather.inputs[0].producer() if gather.inputs[0] is not None else None
        if starts is None or ends is None or starts.tolist() != [0] or ends.tolist() != [1]:
            return False
    else:
        return False
    if shape_node is None or shape_node.op_type != "Shape":
        return False
    start = shape_node.attributes.get("start")
    return shape_node.inputs[0] is data and (start is None or start.as_int() == 0)


def _gemm_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return attr.as_int() if attr is not None else default


def _gemm_attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return attr.as_float() if attr is not None else default


def load_canonical(path: str | os.PathLike[str]) -> tuple[ir.Model, CanonicalizeSummary]:
    """Load a model and canonicalize it (the usual way into the passes)."""
    model = load_model(path)
    summary = canonicalize(model)
    return model, summary
