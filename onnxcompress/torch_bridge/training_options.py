"""The training options every training run shares, declared once: ``FinetuneConfig`` and the
configs of the training passes (``resect``, ``cheapconv``, ``lct``) derive from them.

A better default here helps ``finetune`` and every training pass at once. A pass that needs a
different default redeclares the field (``lct``'s lower learning rate) and says why there.
"""

from __future__ import annotations

import dataclasses
import math

from onnxcompress.errors import PassConfigError


@dataclasses.dataclass
class TrainingOptions:
    """Options of the distillation training that ``finetune`` runs for every caller.

    Attributes:
        lr: peak learning rate.
        batch_size: images per step and process.
        weight_decay: applied to weight tensors only (not to biases or per-channel scales).
        temperature: softmax temperature T of the distillation terms.
        alpha: weight of the distillation term against cross-entropy (1: distillation only).
            Without labels the distillation term gets all the weight.
        epoch_samples: train each epoch on this many images, a fresh random subset every epoch
            (None: all); for time-budgeted runs on large data.
        batchnorm: train with a BatchNormalization after every Conv that has none (set to the
            identity on ``BATCHNORM_CALIBRATION`` training images), folded back into the convs
            at the end, so the result has the student's nodes and names (see
            ``torch_bridge.batchnorm``): exporters fold BN away, and a BN-free network trains
            worse conditioned than the one that was trained. Only convs that train get one
            (folding a trained BN into a frozen conv would change it); with ``trainable``
            naming nodes a BN trains with its conv, with a pattern only if it matches the BN's
            name too (``<conv>/inserted_bn``). On by default: on ResNet-20 CIFAR-10 students
            it won 1.1 points (channel-pruned) and 3.1 to 4.0 points (separable) in the same
            3 epochs, 1.2 points at equal wall time (``benchmarks/results/batchnorm_*.md``);
            each step costs 1.05-1.3x as long.
        batchnorm_between_convs: with ``batchnorm``, also after convs whose output feeds only
            other convs (the depthwise half of a separable pair); False leaves those out
            (``torch_bridge.batchnorm.feeds_only_convs``): half the BatchNorms of a separable
            network, its distillation step 1.1-1.2x faster (``benchmarks/distill_step.py``).
        device: ``cpu``, ``cuda``, ``cuda:N``; None: ``cuda:LOCAL_RANK`` if a GPU is visible.
    """

    lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    temperature: float = 4.0
    alpha: float = 0.9
    epoch_samples: int | None = None
    batchnorm: bool = True
    batchnorm_between_convs: bool = True
    device: str | None = None

    def check_training_options(self, owner: str) -> None:
        """Raise PassConfigError, prefixed with ``owner``, for a shared option out of range.

        ``alpha`` may be None in a config that derives it when it is not given (cheapconv).
        """

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise PassConfigError(f"{owner}: {message}")

        need(self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be positive")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be positive")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.temperature > 0, f"temperature={self.temperature} must be positive")
        need(self.alpha is None or 0 <= self.alpha <= 1, f"alpha={self.alpha} must be in [0, 1]")
        need(
            self.epoch_samples is None or self.epoch_samples >= 1,
            f"epoch_samples={self.epoch_samples} must be positive",
        )


# The names ``finetune_config_from`` hands over. Not ``epochs`` nor ``time_budget_s``: a
# pass's are those of its whole run; nor ``hint_weight``: resect's weighs its layer-level
# learning only.
TRAINING_OPTIONS = tuple(field.name for field in dataclasses.fields(TrainingOptions))
