"""Train a BatchNorm-free graph with BatchNormalization put back, then fold it away again.

Exporters fold BatchNormalization into the preceding Conv (``torch.onnx`` in eval mode does, and
``load_canonical`` folds what is left), so the graphs this project fine-tunes usually have none:
every convolution's output scale is whatever its weights make it, and SGD on such a network is
worse conditioned than on the one that was trained (with BN). ``insert_batchnorms`` puts a
BatchNormalization after every eligible Conv for the training, set to the identity on a
calibration batch: its running mean and variance are the channel statistics of the conv's
output there, its scale ``sqrt(var + eps)`` and its bias the mean, so the student starts exactly
where it was in eval mode (and close to it in train mode, where batch statistics normalize).
``fold_batchnorms`` folds them back into their convs afterwards: the graph comes back with its
original nodes and tensor names, the weights changed; a conv that had no bias gets one
(``add_missing_biases``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.graph.canonicalize import fold_batchnorm
from onnxcompress.graph.edits import fresh_name, fresh_node_name, new_initializer
from onnxcompress.graph.op_families import DEFAULT_DOMAINS

logger = logging.getLogger(__name__)

SUFFIX = "/inserted_bn"
EPSILON = 1e-5
# ONNX momentum: the weight of the running value (torch's 0.1 for the new batch).
MOMENTUM = 0.9
STATISTICS_BATCH = 256


def _eligible(node: ir.Node) -> bool:
    """A Conv with an initializer weight whose only output feeds nodes (not the graph's
    outputs, not a BatchNormalization already)."""
    if node.op_type != "Conv" or node.domain not in DEFAULT_DOMAINS or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) < 3:
        return False
    out = node.outputs[0]
    if out.is_graph_output() or not out.uses() or not out.name:
        return False
    return all(user.op_type != "BatchNormalization" for user, _ in out.uses())


def feeds_only_convs(node: ir.Node) -> bool:
    """Whether every consumer of ``node``'s output is a Conv (a linear chain, as the depthwise
    half of a separable pair): the two convs compose to one linear map, so a BatchNorm between
    them changes the optimization's conditioning but adds nothing the next conv's BatchNorm
    could not represent."""
    uses = node.outputs[0].uses()
    return bool(uses) and all(user.op_type == "Conv" for user, _ in uses)


def _selected_convs(
    graph: ir.Graph, select: Callable[[str], bool] | None, between_convs: bool = True
) -> list[ir.Node]:
    """The eligible convs that ``select`` accepts by node name (None: all); without
    ``between_convs``, not those whose output feeds only other convs."""
    return [
        node
        for node in graph
        if _eligible(node)
        and (select is None or select(node.name or ""))
        and (between_convs or not feeds_only_convs(node))
    ]


def channel_statistics(
    model: ir.Model, names: Sequence[str], images: np.ndarray
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel (mean, variance) of the tensors ``names`` (axis 1 is the channel) over
    ``images``, with the model in eval mode."""
    import torch

    from onnxcompress.torch_bridge.module import OnnxModule

    module = OnnxModule(model, trainable="none").eval()
    sums: dict[str, np.ndarray] = {}
    squares: dict[str, np.ndarray] = {}
    counts: dict[str, int] = dict.fromkeys(names, 0)
    with torch.no_grad():
        for start in range(0, len(images), STATISTICS_BATCH):
            batch = torch.from_numpy(np.ascontiguousarray(images[start : start + STATISTICS_BATCH]))
            _, captured = module.forward_with([batch], names)
            for name, tensor in captured.items():
                values = tensor.double().transpose(0, 1).reshape(tensor.shape[1], -1)
                sums[name] = sums.get(name, 0.0) + values.sum(1).numpy()
                squares[name] = squares.get(name, 0.0) + values.square().sum(1).numpy()
                counts[name] += values.shape[1]
    statistics = {}
    for name in names:
        mean = sums[name] / counts[name]
        variance = np.maximum(squares[name] / counts[name] - mean**2, 0.0)
        statistics[name] = (mean, variance)
    return statistics


def selected_by(trainable: str | tuple[str, ...]) -> Callable[[str], bool]:
    """Whether ``OnnxModule``'s ``trainable`` spec selects a node, by its name."""

    def select(node: str) -> bool:
        if trainable == "all":
            return True
        if trainable == "none":
            return False
        if isinstance(trainable, str):
            return re.search(trainable, node) is not None
        return node in trainable

    return select


def add_missing_biases(model: ir.Model, select: Callable[[str], bool] | None = None) -> list[str]:
    """Give every eligible Conv (``select``: as in ``insert_batchnorms``) that has no bias a
    zero one named ``<conv>.bias``, in place; returns the new initializers' names.

    Folding a BN needs a bias (the BN's shift lands there). ``insert_batchnorms`` calls this
    first; a caller that writes the trained module back into its own copy of the graph
    (``write_back``) calls it on that copy too, so that both have the same initializers.
    """
    graph = model.graph
    added = []
    for node in _selected_convs(graph, select):
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            continue
        weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
        zeros = np.zeros(weight.shape[0], weight.dtype)
        bias = new_initializer(graph, f"{node.name or 'conv'}.bias", zeros)
        if len(node.inputs) == 2:
            node.resize_inputs(3)
        node.replace_input_with(2, bias)
        added.append(str(bias.name))
    return added


def insert_batchnorms(
    model: ir.Model,
    images: np.ndarray,
    select: Callable[[str], bool] | None = None,
    between_convs: bool = True,
) -> list[str]:
    """Put an identity-initialized BatchNormalization after every eligible Conv, in place.

    The BN's output takes the conv's output name (consumers, hint tensors and graph outputs see
    the same names as before); the conv writes a fresh ``<name>__pre_bn``. Returns the inserted
    nodes' names (for ``fold_batchnorms``); empty when no Conv qualifies.

    Args:
        select: only convs whose node name it accepts (None: all). Give it the convs whose
            weights train: folding a trained BN into a frozen conv (a fixed shift kernel)
            would change that conv.
        between_convs: also after convs whose output feeds only other convs (False: not
            there, see ``feeds_only_convs``; a separable ResNet-20 then trains with 19
            BatchNorms instead of 37, a distillation step 1.1-1.2x faster,
            ``benchmarks/distill_step.py``).
    """
    graph = model.graph
    add_missing_biases(model, select)
    convs = _selected_convs(graph, select, between_convs)
    if not convs:
        return []
    outputs = [conv.outputs[0].name or "" for conv in convs]
    statistics = channel_statistics(model, outputs, images)
    inserted = []
    for conv, name in zip(convs, outputs, strict=True):
        out = conv.outputs[0]
        mean, variance = statistics[name]
        dtype = conv.inputs[1].const_value.numpy().dtype  # type: ignore[union-attr]
        label = f"{conv.name or name}{SUFFIX}"
        params = [
            new_initializer(graph, f"{label}.{role}", array.astype(dtype))
            for role, array in (
                ("scale", np.sqrt(variance + EPSILON)),
                ("bias", mean),
                ("mean", mean),
                ("var", variance),
            )
        ]
        bn = ir.Node(
            "",
            "BatchNormalization",
            [out, *params],
            attributes=[ir.AttrFloat32("epsilon", EPSILON), ir.AttrFloat32("momentum", MOMENTUM)],
            name=fresh_node_name(graph, label),
        )
        for user, index in list(out.uses()):
            if user is not bn:
                user.replace_input_with(index, bn.outputs[0])
        graph.insert_after(conv, bn)
        out.name = fresh_name(graph, f"{name}__pre_bn")
        bn.outputs[0].name = name
        bn.outputs[0].shape, bn.outputs[0].type = out.shape, out.type
        inserted.append(bn.name or "")
    logger.info("inserted %d BatchNormalization node(s) for the training", len(inserted))
    return inserted


def fold_batchnorms(model: ir.Model, names: Sequence[str]) -> None:
    """Fold the BatchNormalization nodes ``names`` (from ``insert_batchnorms``) into their
    convs, in place, with their running statistics; the conv takes back its output name.

    Raises:
        RuntimeError: one of them cannot be folded (the graph was changed in between).
    """
    graph = model.graph
    by_name = {node.name: node for node in graph if node.op_type == "BatchNormalization"}
    for name in names:
        bn = by_name.get(name)
        params = [value for value in bn.inputs[1:] if value is not None] if bn else []
        if bn is None or not fold_batchnorm(graph, bn):
            raise RuntimeError(f"the inserted BatchNormalization {name!r} could not be folded")
        for value in params:
            if value.name is not None and not value.uses() and value.name in graph.initializers:
                del graph.initializers[value.name]
