"""The losses of fine-tuning: logit distillation, hint matching and cross-entropy.

``training_loss`` combines them as ``FinetuneConfig`` asks (see ``torch_bridge.train``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from onnxcompress.torch_bridge.finetune_config import FinetuneConfig


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, averaged over the batch.

    The ``T^2`` keeps gradient magnitudes comparable across temperatures (Hinton et al.).
    """
    s = F.log_softmax(student.float() / temperature, dim=1)
    t = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hint_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative MSE ``||s - t||^2 / ||t||^2``: scale-free, so one weight fits every layer.

    Written as ``(s - t).square().sum()`` rather than ``F.mse_loss``: the latter's backward
    returns an NCHW gradient for channels-last activations, and that gradient, added to the
    channels-last one from the next layer, sent BatchNorm's backward down a slow mixed-layout
    path (a hinted step with BatchNorm ~1.8x the time of one without hints on the 2-core CPU;
    ~1.2-1.3x with this form, ``benchmarks/distill_step.py``).
    """
    t = teacher.float()
    return (student.float() - t).square().sum() / t.square().sum().clamp_min(1e-12)


def training_loss(
    student: torch.Tensor,
    target: torch.Tensor | None,
    y: torch.Tensor | None,
    config: FinetuneConfig,
) -> torch.Tensor:
    """Distillation towards ``target`` logits and/or cross-entropy with labels ``y``."""
    terms = []
    if target is not None:
        weight = config.alpha if y is not None else 1.0
        if weight > 0:
            terms.append(weight * distillation_loss(student, target, config.temperature))
    if y is not None:
        weight = 1.0 - config.alpha if target is not None else 1.0
        if weight > 0:
            terms.append(
                weight * F.cross_entropy(student.float(), y, label_smoothing=config.label_smoothing)
            )
    if not terms:
        return student.float().sum() * 0.0
    return torch.stack(terms).sum()
