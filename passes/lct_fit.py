"""The ``fit`` schedule of ``lct subspace=lowrank``: every layer put on its rank at once by a
least-squares fit on calibration data, then distilled at those ranks for the rest of the budget.

The gradual ramp projects each weight onto its best rank-r approximation as a matrix, blind to
the data the layer sees; on ResNet-20 CIFAR-10 at 0.6 of the MACs that projection alone leaves
23 % top-1, and in a 15-minute budget the ramp paused at 41 % of its way
(``docs/methods/lct.md``). Here two uses of the calibration images replace it:

- **Ranks from the responses.** Each layer's spectrum is that of ``W R`` with ``R Rᵀ`` the
  second moment of its inputs (the output energy each rank carries,
  ``fitting.lowrank.response_spectrum``), and the ranks are cut greedily where the least
  relative output energy is lost per MAC saved (``lct_layers.allocate_ranks``).
- **Reduced-rank regression, layer by layer.** In graph order, each layer's rank-r weight and
  free bias are fit to reproduce the original's output at that layer from the partly
  compressed student's own inputs (``reconstruction.refit_layer`` with a rank), so each fit
  absorbs the drift of the layers before it, as ``lrf``'s reconstruction does.

Measured on ResNet-20 CIFAR-10 at 0.59 of the MACs, before any training: 23.1 % with the
weights' SVD at the weight-spectrum ranks, 71.9 % with the inputs' second moments in the
projection and the response ranks, 80.3 % with the layer-by-layer fit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.data.dataset import spread_index
from onnxcompress.deadline import Deadline
from onnxcompress.passes.cheapconv_init import fit_images
from onnxcompress.passes.lct_layers import Layer
from onnxcompress.passes.reconstruction import MAX_FEATURES, refit_layer
from onnxcompress.runtime.probes import input_probe, second_moment

if TYPE_CHECKING:
    from onnxcompress.passes.base import PassReport

# The pass's own logger: ``-v`` lines name ``lct``.
logger = logging.getLogger("onnxcompress.passes.lct")

# Under a time budget the statistics and fits take at most this share of it; the rest trains.
FIT_SHARE = 0.25
# Of that share, the input statistics for the ranks take at most this part (one forward pass
# of each layer's prefix, against two for its fit).
MOMENT_PART = 1.0 / 3.0
# Rows (positions) per input feature for a second moment: its spectrum only ranks the
# directions, so it needs far fewer than a fit (``reconstruction.ROWS_PER_FEATURE``).
MOMENT_ROWS_PER_FEATURE = 8
# Relative ridge of the fits (the reconstruction's default).
FIT_RIDGE = 1e-3
# Images per ONNX Runtime call.
FIT_BATCH = 32


class LayerSnapshot:
    """The inputs (weights, biases) of some nodes as they were, to put back after a fit that
    is not kept: the fit writes into the model before training decides."""

    def __init__(self, model: ir.Model, nodes: Sequence[str]) -> None:
        self._saved: dict[str, list[tuple[ir.Value | None, ir.TensorProtocol | None]]] = {}
        for name in nodes:
            node = model.graph.node(name)
            self._saved[name] = [
                (value, None if value is None else value.const_value) for value in node.inputs
            ]

    def restore(self, model: ir.Model) -> None:
        """Put every saved node's inputs and their values back; initializers the fit added
        and nothing uses any more are removed."""
        graph = model.graph
        for name, saved in self._saved.items():
            node = graph.node(name)
            replaced = [value for value in node.inputs if value is not None]
            node.resize_inputs(len(saved))
            for index, (value, const) in enumerate(saved):
                node.replace_input_with(index, value)
                if value is not None and const is not None:
                    value.const_value = const
            kept = {id(value) for value, _ in saved}
            for value in replaced:
                if id(value) not in kept and not value.uses() and value.name:
                    graph.initializers.pop(value.name, None)


def _features(layer: Layer) -> int:
    """Input features of the layer's weight matrix (its columns)."""
    if layer.op == "Gemm":
        return int(layer.shape[1] if layer.trans_b else layer.shape[0])
    return int(np.prod(layer.shape[1:]))


def input_second_moments(
    model: ir.Model,
    layers: Sequence[Layer],
    x: np.ndarray,
    deadline: Deadline,
    progress: bool = False,
) -> dict[str, np.ndarray] | None:
    """Each layer's input second moment ``E[z zᵀ]`` on ``x`` (by node name), or None when the
    deadline cannot hold them for every layer (the ranks then come from the weights)."""
    moments: dict[str, np.ndarray] = {}
    per_image: float | None = None
    iterator: Sequence[Layer] = layers
    if progress:
        from tqdm import tqdm

        iterator = tqdm(layers, desc="lct ranks", unit="layer", leave=False)
    for done, layer in enumerate(iterator):
        features = _features(layer)
        count = fit_images(deadline, per_image, len(layers) - done, len(x))
        if count == 0 or features > MAX_FEATURES:
            logger.info("lct fit: ranks from the weights (no input statistics for %s)", layer.node)
            return None
        images = x[spread_index(len(x), count)]
        positions = max(1, math.ceil(MOMENT_ROWS_PER_FEATURE * features / len(images)))
        tic = time.perf_counter()
        node = model.graph.node(layer.node)
        moments[layer.node] = second_moment(
            input_probe(model, node), images, FIT_BATCH, positions_per_image=positions
        )
        seconds = (time.perf_counter() - tic) / len(images)
        per_image = seconds if per_image is None else max(per_image, seconds)
    return moments


def fit_ranks(
    student: ir.Model,
    teacher: ir.Model,
    layers: Sequence[Layer],
    x: np.ndarray,
    deadline: Deadline,
    report: PassReport,
    progress: bool = False,
) -> None:
    """Put every layer of ``student`` at its target rank (``layer.rank``), in graph order, by
    reduced-rank regression against ``teacher``'s output at that layer; a layer the deadline
    or its inputs leave unfit gets its weight's truncated SVD from the trainer's projection.
    The relative output errors (truncated SVD -> fit) go to ``report.summary["fit"]``."""
    order = {node.name: index for index, node in enumerate(student.graph)}
    ranked = sorted(layers, key=lambda layer: order.get(layer.node, 0))
    iterator: Sequence[Layer] = ranked
    if progress:
        from tqdm import tqdm

        iterator = tqdm(ranked, desc="lct fit", unit="layer", leave=False)
    records: list[dict[str, object]] = []
    per_image: float | None = None
    for done, layer in enumerate(iterator):
        count = fit_images(deadline, per_image, len(ranked) - done, len(x))
        if count == 0:
            records.append({"node": layer.node, "rank": layer.rank, "fit": "out of time"})
            continue
        images = x[spread_index(len(x), count)]
        tic = time.perf_counter()
        node = student.graph.node(layer.node)
        refit = refit_layer(
            student, teacher, node, images, ridge=FIT_RIDGE, batch=FIT_BATCH, rank=layer.rank
        )
        seconds = (time.perf_counter() - tic) / len(images)
        per_image = seconds if per_image is None else max(per_image, seconds)
        if refit is None:
            records.append({"node": layer.node, "rank": layer.rank, "fit": "not fit"})
            continue
        # The truncated SVD is written where the fit does no better (``refit_layer``).
        written = min(refit.error_before, refit.error_after)
        records.append(
            {
                "node": layer.node,
                "rank": layer.rank,
                "images": len(images),
                "error_svd": round(refit.error_before, 5),
                "error_fit": round(written, 5),
            }
        )
        logger.info(
            "lct fit: %s at rank %d, output error %.4f (truncated SVD) -> %.4f",
            layer.node,
            layer.rank,
            refit.error_before,
            written,
        )
    report.summary["fit"] = records


__all__ = ["FIT_SHARE", "MOMENT_PART", "LayerSnapshot", "fit_ranks", "input_second_moments"]
