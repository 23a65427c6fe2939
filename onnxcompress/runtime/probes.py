"""Probe models: copies of a model cut down to compute one tensor (or a conv's im2col
patches), and the Gram statistics between two of them over calibration batches.

The activation fits that refit a layer against the original model (``cheapconv``'s data
init, the structured passes' reconstruction) read a student's inputs and the original's
outputs at the same place; ONNX Runtime computes both, so every geometry a Conv allows
(pads, strides, dilations, ``auto_pad``, 1-D to 3-D) is handled by the runtime, not by a
hand-written im2col.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.fitting.gram import GramAccumulator, GramStatistics
from onnxcompress.graph.edits import fresh_node_name, new_initializer
from onnxcompress.graph.model_io import clone_model


def patch_probe(model: ir.Model, conv_name: str) -> ir.Model:
    """A copy of ``model`` whose only output is the im2col patches the Conv ``conv_name`` reads.

    A Conv with one group per input channel and one-hot kernels (the same pads, strides,
    dilations) puts tap ``k`` of input channel ``c`` in output channel ``c*K + k``: the
    layout of the conv's weight ``[Cout, Cin, *kernel]`` flattened to ``[Cout, Cin*K]``.
    """
    probe = clone_model(model)
    node = next(n for n in probe.graph if n.name == conv_name)
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    _, cin_per_group, *kernel = weight.const_value.numpy().shape
    cin = cin_per_group * node.attributes.get_int("group", 1)
    size = int(np.prod(kernel))
    one_hot = np.tile(np.eye(size, dtype=np.float32), (cin, 1)).reshape(cin * size, 1, *kernel)
    attributes = [
        ir.Attr(a.name, a.type, a.value) for a in node.attributes.values() if a.name != "group"
    ]
    patches = ir.Node(
        "",
        "Conv",
        [node.inputs[0], new_initializer(probe.graph, "probe.patches", one_hot)],
        [*attributes, ir.AttrInt64("group", cin)],
        name=fresh_node_name(probe.graph, "probe/patches"),
    )
    probe.graph.insert_after(node, patches)
    probe.graph.outputs.clear()
    probe.graph.outputs.append(patches.outputs[0])
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(probe)
    return probe


def truncated(model: ir.Model, name: str) -> ir.Model:
    """A copy of ``model`` that computes only the tensor ``name`` (its only output).

    Raises:
        KeyError: no node output and no graph input is called ``name``.
    """
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    probe = clone_model(model)
    values = [v for node in probe.graph for v in node.outputs] + list(probe.graph.inputs)
    value = next((v for v in values if v.name == name), None)
    if value is None:
        raise KeyError(f"no tensor named {name!r} in the model")
    probe.graph.outputs.clear()
    probe.graph.outputs.append(value)
    RemoveUnusedNodesPass()(probe)
    return probe


def input_probe(model: ir.Model, node: ir.Node) -> ir.Model:
    """A copy of ``model`` computing what ``node`` multiplies by its weight: a Conv's im2col
    patches (``patch_probe``), a Gemm's or MatMul's input (``truncated``)."""
    if node.op_type == "Conv":
        assert node.name is not None
        return patch_probe(model, node.name)
    source = node.inputs[0]
    assert source is not None and source.name is not None
    return truncated(model, source.name)


def pair_statistics(
    source_model: ir.Model,
    target_model: ir.Model,
    x: np.ndarray,
    batch: int,
    target_channels: Sequence[int] | np.ndarray | None = None,
    positions_per_image: int | None = None,
    seed: int = 0,
) -> GramStatistics:
    """Gram statistics (with an intercept) between the only outputs of two models over the
    batches of ``x``; ``target_channels``: keep only these channels of the target.

    ``positions_per_image``: sample this many spatial positions of each image (the same ones
    in both outputs, drawn afresh per batch) instead of all of them. Neighbouring positions
    say nearly the same; on 224x224 inputs the Gram products over every position, not the
    forward passes, are most of a fit's time (ThiNet and He et al. 2017 sample 10 per image).

    Raises:
        ValueError: the two outputs have different numbers of positions.
    """
    from onnxcompress.runtime.capture import run_batches
    from onnxcompress.runtime.session import make_session

    sessions = [make_session(m, optimize=False) for m in (source_model, target_model)]
    accumulator = GramAccumulator(intercept=True)
    keep = None if target_channels is None else np.asarray(target_channels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    batches = zip(*(run_batches(session, x, batch) for session in sessions), strict=True)
    for (z, *_), (y, *_) in batches:
        if keep is not None:
            y = np.take(y, keep, axis=1)
        if z.size // z.shape[1] != y.size // y.shape[1]:
            raise ValueError(f"positions differ: {z.shape} (source) vs {y.shape} (target)")
        if positions_per_image is not None and z.ndim > 2 and z.shape[2:] == y.shape[2:]:
            z, y = _sample_positions(z, y, positions_per_image, rng)
        accumulator.add(z, y, channel_axis=1)
    return accumulator.statistics()


def second_moment(
    model: ir.Model,
    x: np.ndarray,
    batch: int,
    positions_per_image: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """``E[z zᵀ]`` of the only output of ``model`` (channels on axis 1) over the batches of
    ``x``, one sample per position (``positions_per_image``: as in ``pair_statistics``)."""
    from onnxcompress.runtime.capture import run_batches
    from onnxcompress.runtime.session import make_session

    session = make_session(model, optimize=False)
    accumulator = GramAccumulator(intercept=False)
    rng = np.random.default_rng(seed)
    for z, *_ in run_batches(session, x, batch):
        if positions_per_image is not None and z.ndim > 2:
            z, _ = _sample_positions(z, z, positions_per_image, rng)
        accumulator.add(z, channel_axis=1)
    stats = accumulator.statistics()
    return stats.gram / max(stats.count, 1)


def _sample_positions(
    z: np.ndarray, y: np.ndarray, count: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random spatial positions of ``z`` and ``y`` ([N, C, *spatial], same spatial
    shape), the same ones in both, as [N, C, count] arrays."""
    spatial = int(np.prod(z.shape[2:]))
    if count >= spatial:
        return z, y
    chosen = np.sort(rng.choice(spatial, size=count, replace=False))
    return (
        z.reshape(*z.shape[:2], spatial)[:, :, chosen],
        y.reshape(*y.shape[:2], spatial)[:, :, chosen],
    )


__all__ = ["input_probe", "pair_statistics", "patch_probe", "second_moment", "truncated"]
