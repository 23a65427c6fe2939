"""Reconstruction after channel removal: the layers that read removed channels are refit by
least squares so that, on the pruned model's own inputs, they reproduce the original model's
outputs.

Compensation (``lrf``'s λ, ``merge``'s sums) rebuilds each removed channel from the kept ones;
what a consumer computes from them is then only as good as that rebuild, and the errors of the
layers before it add up. Refitting the consumer's whole weight against the original's output
(He et al., "Channel Pruning for Accelerating Very Deep Neural Networks", 2017; ThiNet, Luo et
al. 2017) is not limited to λ columns, and, done layer by layer in graph order on the partly
compressed model's activations, each fit absorbs the drift of the layers before it. The
intercept goes into the bias, which corrects the mean shift.

A layer is refit only when its fit lowers its output error on the calibration data; the
report records both errors per layer.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx_ir as ir
import scipy.linalg

from onnxcompress.fitting.lowrank import reduced_rank_fit, truncate
from onnxcompress.fitting.ridge import ridge_solve
from onnxcompress.graph.edits import (
    constant_array,
    new_initializer,
    private_initializer,
    set_initializer,
)
from onnxcompress.runtime.probes import input_probe, pair_statistics, truncated

logger = logging.getLogger(__name__)

# A refit solves a (features + 1)-square system in float64: 8,192 features is 0.5 GB. Wider
# layers (a VGG's 25,088-input classifier) keep their compensated weights.
MAX_FEATURES = 8192
# Float32 elements of one batch of a layer's patches: ONNX Runtime's output, and the float64
# copies the Gram accumulation makes of it, stay within a few hundred MB at 224x224.
PATCH_ELEMENTS_PER_BATCH = 16_000_000
# Rows (image positions) a refit reads per unknown: far more than the system needs to be well
# determined, and far fewer than every position of every image on large inputs, where the Gram
# products dominate the time. Positions are sampled per image when there are more.
ROWS_PER_FEATURE = 64


@dataclasses.dataclass
class Refit:
    """One layer's reconstruction: its output error relative to the original's output spread,
    with the compensated weights and with the refit ones (kept only when lower)."""

    node: str
    error_before: float
    error_after: float

    @property
    def kept(self) -> bool:
        return self.error_after < self.error_before


def reconstruct(
    student: ir.Model,
    original: ir.Model,
    kept_outputs: Mapping[str, np.ndarray],
    x: np.ndarray,
    *,
    ridge: float,
    batch: int,
    say: Callable[[str], None] | None = None,
    progress: bool = False,
) -> list[Refit]:
    """Refit, in graph order, every Conv (one group) and Gemm of ``student`` whose input
    channels were cut, against the same-named node's output in ``original``.

    Args:
        kept_outputs: for a node whose own output channels were cut, the original channel
            index of each channel it still computes (its target is those channels of the
            original's output); nodes not named keep all of theirs.
        x: calibration inputs (the student's first graph input).
        ridge: relative ridge of the fits.
        batch: images per ONNX Runtime call.
        progress: draw a progress bar over the layers (two forward passes of the model's
            prefix each, the long part).
    """
    originals = {node.name: node for node in original.graph if node.name}
    layers: Iterable[ir.Node] = [
        node
        for node in student.graph
        if node.name in originals and _inputs_were_cut(node, originals[node.name])
    ]
    if progress:
        from tqdm import tqdm

        layers = tqdm(list(layers), desc="reconstruction", unit="layer", leave=False)
    refits = []
    for node in layers:
        refit = refit_layer(
            student,
            original,
            node,
            x,
            ridge=ridge,
            batch=batch,
            keep=kept_outputs.get(node.name or ""),
        )
        if refit is None:
            continue
        refits.append(refit)
        logger.info(
            "reconstruction: %s output error %.4f -> %.4f%s",
            refit.node,
            refit.error_before,
            refit.error_after,
            "" if refit.kept else " (kept the compensated weights)",
        )
    if say is not None and refits:
        kept = [r for r in refits if r.kept]
        before = float(np.mean([r.error_before for r in refits]))
        after = float(np.mean([min(r.error_before, r.error_after) for r in refits]))
        say(
            f"reconstruction: {len(kept)} of {len(refits)} layers refit, mean output error "
            f"{before:.3f} -> {after:.3f}"
        )
    return refits


def _weight(node: ir.Node) -> np.ndarray | None:
    return constant_array(node.inputs[1]) if len(node.inputs) > 1 else None


def _inputs_were_cut(node: ir.Node, reference: ir.Node) -> bool:
    """A Conv with one group, or a plain Gemm, that reads fewer input channels than the
    original's node of the same name."""
    weight, original_weight = _weight(node), _weight(reference)
    if weight is None or original_weight is None or weight.ndim != original_weight.ndim:
        return False
    if node.op_type == "Conv" and reference.op_type == "Conv":
        groups = (node.attributes.get_int("group", 1), reference.attributes.get_int("group", 1))
        if groups != (1, 1) or weight.ndim < 3:
            return False
        return weight.shape[1] < original_weight.shape[1]
    if node.op_type == "Gemm" and reference.op_type == "Gemm":
        if node.attributes.get_int("transA", 0) or weight.ndim != 2:
            return False
        if node.attributes.get_float("alpha", 1.0) != 1.0:
            return False
        axis = 1 if node.attributes.get_int("transB", 0) else 0
        return weight.shape[axis] < original_weight.shape[axis]
    return False


def refit_layer(
    student: ir.Model,
    original: ir.Model,
    node: ir.Node,
    x: np.ndarray,
    *,
    ridge: float,
    batch: int,
    keep: np.ndarray | None = None,
    rank: int | None = None,
) -> Refit | None:
    """Refit one Conv (one group) or Gemm of ``student`` against the same-named output of
    ``original`` on ``student``'s own inputs; None when the node cannot be refit (a computed or
    broadcast bias, too many input features, inputs all but constant, a different node).

    Args:
        keep: the original's output channels this node still computes (None: all).
        rank: fit a weight of at most this rank (``lct``'s low-rank fit: reduced-rank
            regression, ``fitting.lowrank.reduced_rank_fit``). The rank-``rank`` weight is
            always written: the fit, or the weight's truncated SVD when that reproduces the
            output better (``error_before`` is the truncated SVD's error).
    """
    source, output = node.inputs[0], node.outputs[0]
    if source is None or not source.name or not output.name or not node.name:
        return None
    weight = _weight(node)
    assert weight is not None
    conv = node.op_type == "Conv"
    trans_b = bool(node.attributes.get_int("transB", 0)) if not conv else True
    # [Cout, features]: a Conv's [Cout, Cin, *kernel] flattened matches the patch layout.
    matrix = weight.reshape(weight.shape[0], -1) if trans_b else weight.T
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    bias = constant_array(bias_value)
    if bias_value is not None and bias is None:
        return None  # a computed bias: nothing to refit into
    if bias is None:
        bias = np.zeros(matrix.shape[0], dtype=weight.dtype)
    if not conv and node.attributes.get_float("beta", 1.0) != 1.0 and bias_value is not None:
        return None
    if bias.shape != (matrix.shape[0],):
        return None  # a Gemm bias broadcast from another shape: left alone
    features = matrix.shape[1]
    if features > MAX_FEATURES:
        logger.info("reconstruction: %s skipped (%d input features)", node.name, features)
        return None
    probe = input_probe(student, node)
    batch = _patch_batch(output, features, batch)
    positions = max(1, -(-ROWS_PER_FEATURE * (features + 1) // len(x)))
    try:
        stats = pair_statistics(
            probe,
            truncated(original, output.name),
            x,
            batch,
            keep,
            positions_per_image=positions,
        )
    except ValueError as exc:  # positions differ: the original's node is not this one
        logger.info("reconstruction: %s skipped (%s)", node.name, exc)
        return None
    if stats.cross.shape != (matrix.shape[1] + 1, matrix.shape[0]):
        return None
    if rank is not None:
        matrix = truncate(matrix, rank)
    before = np.concatenate([matrix, bias[:, None]], axis=1).T.astype(np.float64)
    try:
        with warnings.catch_warnings():
            # Inputs that are (nearly) all zero leave nothing to fit from; the solve says so.
            warnings.simplefilter("error", scipy.linalg.LinAlgWarning)
            if rank is None:
                solution = ridge_solve(stats.gram, stats.cross, ridge, intercept=True)
            else:
                low, low_bias = reduced_rank_fit(stats.gram, stats.cross, rank, ridge)
                solution = np.concatenate([low, low_bias[:, None]], axis=1).T
    except scipy.linalg.LinAlgWarning:
        logger.info("reconstruction: %s skipped (its inputs are all but constant)", node.name)
        if rank is not None:
            solution = before  # the rank still holds: the truncated SVD
        else:
            return None
    refit = Refit(node.name, stats.relative_error(before), stats.relative_error(solution))
    if not refit.kept:
        if rank is None:
            return refit
        solution = before
    new_matrix = solution[:-1].T
    new_weight = new_matrix.reshape(weight.shape) if trans_b else new_matrix.T
    graph = student.graph
    new_weight = np.ascontiguousarray(new_weight.astype(weight.dtype))
    set_initializer(graph, private_initializer(graph, node, 1), new_weight)
    new_bias = solution[-1].astype(weight.dtype)
    if bias_value is None:
        while len(node.inputs) < 3:
            node.resize_inputs(len(node.inputs) + 1)
        node.replace_input_with(2, new_initializer(graph, f"{node.name}.bias", new_bias))
    else:
        set_initializer(graph, private_initializer(graph, node, 2), new_bias)
    return refit


def _patch_batch(output: ir.Value, features: int, batch: int) -> int:
    """Images per call that keep one batch of patches within ``PATCH_ELEMENTS_PER_BATCH``
    (``batch`` where the output's spatial size is not known)."""
    dims = output.shape.dims[2:] if output.shape is not None else ()
    if not all(isinstance(d, int) for d in dims):
        return batch
    positions = int(np.prod([int(d) for d in dims])) if dims else 1  # type: ignore[arg-type]
    return max(1, min(batch, PATCH_ELEMENTS_PER_BATCH // max(features * positions, 1)))


__all__ = ["Refit", "reconstruct", "refit_layer"]
