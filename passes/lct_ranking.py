"""The significance ranking of the ``lct`` pass: the paper's order (the layers the global target
collapses most come first), refined by each layer's measured top-1 drop when ``sensitivity`` asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxcompress.deadline import Deadline
from onnxcompress.passes.lct_layers import Layer
from onnxcompress.passes.lct_projection import Projector
from onnxcompress.passes.lct_scoring import Scorer

if TYPE_CHECKING:
    from onnxcompress.passes.base import PassReport
    from onnxcompress.passes.lct import LctConfig

# Under a time budget: the share of the time left (after the minimum work) the sensitivity
# ranking may take, and the fewest validation images worth measuring it on (fewer: the paper's
# order, from the magnitudes alone).
SENSITIVITY_SHARE = 0.1
MIN_SENSITIVITY_SAMPLES = 100


def rank_layers(
    model: ir.Model,
    layers: list[Layer],
    scorer: Scorer,
    lowrank: bool,
    report: PassReport,
    cfg: LctConfig,
    deadline: Deadline,
    minimum_seconds: float,
) -> None:
    """Sort ``layers`` in place, least significant first (the paper's rule, refined)."""
    if cfg.sensitivity:
        ranking = deadline.share(SENSITIVITY_SHARE, reserve=minimum_seconds, label="lct ranking")
        limit = _sensitivity_samples(layers, scorer, ranking, cfg.sensitivity_samples)
        if limit >= min(MIN_SENSITIVITY_SAMPLES, len(scorer.val)):
            _measure_sensitivity(model, layers, scorer, lowrank, limit, ranking, report)
        else:
            report.summary["sensitivity"] = {
                "samples": 0,
                "skipped": f"the time budget holds fewer than {MIN_SENSITIVITY_SAMPLES} "
                "validation images per layer; the paper's order",
            }
    layers.sort(
        key=lambda layer: (
            layer.sensitivity if layer.sensitivity is not None else 0.0,
            -layer.compression,
        )
    )
    for position, layer in enumerate(layers):
        layer.significance = position


def _sensitivity_samples(
    layers: Sequence[Layer], scorer: Scorer, deadline: Deadline, samples: int
) -> int:
    """Validation images per sensitivity measurement: ``sensitivity_samples``, or as many
    as ``deadline`` holds at the measured scoring speed."""
    limit = min(samples, len(scorer.val))
    if not deadline.limited:
        return limit
    per_image = scorer.full_seconds / max(len(scorer.val), 1)
    # The unchanged model is scored once, then every layer; a tenth is kept back, or a
    # scoring a little slower than the first would end the measurement before its last
    # layer (and a partial one is thrown away).
    share = 0.9 * deadline.remaining()
    return min(limit, int(share / max((len(layers) + 1) * per_image, 1e-12)))


def _measure_sensitivity(
    model: ir.Model,
    layers: list[Layer],
    scorer: Scorer,
    lowrank: bool,
    limit: int,
    deadline: Deadline,
    report: PassReport,
) -> None:
    """Each layer's top-1 drop at its target alone, on ``limit`` validation images; none
    when ``deadline`` runs out half-way (a partial measurement would rank the measured
    layers behind the others)."""
    module = scorer.module_of(model)
    projector = Projector([], {}, layers, 1, lowrank)
    base = scorer.score(module, limit)
    for index, layer in enumerate(layers):
        if deadline.expired():
            for measured in layers:
                measured.sensitivity = None
            report.summary["sensitivity"] = {
                "samples": limit,
                "skipped": f"the time budget ran out after {index} of {len(layers)} layers; "
                "the paper's order",
            }
            return
        param = module.param_for(layer.weight)
        saved = param.data.clone()
        projector.project(module, layer, 1.0)
        layer.sensitivity = round(base - scorer.score(module, limit), 4)
        param.data.copy_(saved)
    report.summary["sensitivity"] = {"samples": limit}
