"""The options of ``finetune`` and their validation.

``FinetuneConfig`` is what a pass or the CLI fills in; ``validate`` refuses values out of range.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from onnxcompress.errors import PassConfigError
from onnxcompress.torch_bridge.training_options import TRAINING_OPTIONS, TrainingOptions

LOSSES = ("kd", "hint", "mutual")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")


@dataclasses.dataclass
class FinetuneConfig(TrainingOptions):
    """Options of ``finetune``: the shared ``TrainingOptions`` (learning rate, batch size,
    weight decay, distillation temperature and weight, epoch size, BatchNorm, device) and these.

    Attributes:
        epochs: passes over the training data (or over ``epoch_samples`` of it).
        optimizer: ``sgd`` (with Nesterov momentum) or ``adamw``.
        momentum: SGD momentum.
        schedule: ``cosine`` decay from ``lr`` to 0, or ``onecycle`` (warm-up then cosine).
        loss: ``kd``, ``hint`` or ``mutual`` (see ``torch_bridge.train``).
        hint_tensors: (teacher tensor, student tensor) name pairs for ``hint``; for an
            ``nn.Module`` teacher the teacher name is a submodule whose output is taken.
            Empty: the features entering the last Gemm/MatMul of each model.
        hint_weight: weight of the hint term.
        peers: student copies trained beside the student with ``mutual``; None: 0 when a
            teacher joins the cohort, else 1.
        augment: random crop (zero padding ``crop_padding``) and horizontal flip of training
            images; None: on for images of at least 16x16 pixels.
        crop_padding: padding of the random crop.
        flip: horizontal flips when augmenting (off for data where mirroring changes the class).
        time_budget_s: wall time of the whole call, from its start (BatchNorm insertion,
            network building, validations, checkpoints and the write-back included; the last
            validation is kept back for), with the learning-rate schedule driven by whichever
            runs out first, steps or time; a budget that cannot hold the minimum work (the
            validations and one training step) is refused before it starts. Over resumed runs
            the budget is their total. Timing is not reproducible, so neither is a run that the
            budget cut short.
        trainable: which student parameters train (``OnnxModule``'s ``trainable``).
        label_smoothing: of the cross-entropy term.
        max_grad_norm: clip the global gradient norm to this (None: no clipping). Models whose
            BatchNormalization was folded into the convolutions (as ``compress`` leaves them)
            diverged without it at learning rates of 1e-3 and up.
        seed: seeds shuffling, augmentation, peer noise and torch's global generator.
        amp: mixed precision (bfloat16, or float16 with loss scaling) when training on a GPU;
            ignored on CPU.
        channels_last: feed image batches in channels-last memory order (same values, same
            math); None: on for 4-D inputs. ``benchmarks/train_layout.py`` on the 2-core CPU
            (batch 128, one process): a ResNet-20 training step 1.41x faster, its
            depthwise-separable version 1.73x (oneDNN's convolutions, depthwise above all,
            prefer NHWC).
        num_workers: background batch loaders (0: in the training process).
        eval_batch_size: batch size for validation.
        checkpoint_dir: write ``last.pt`` here after every epoch (None: no checkpoints).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
    """

    epochs: int = 3
    optimizer: str = "sgd"
    momentum: float = 0.9
    schedule: str = "cosine"
    loss: str = "kd"
    hint_tensors: tuple[tuple[str, str], ...] = ()
    hint_weight: float = 1.0
    peers: int | None = None
    augment: bool | None = None
    crop_padding: int = 4
    flip: bool = True
    time_budget_s: float | None = None
    trainable: str | tuple[str, ...] = "all"
    label_smoothing: float = 0.0
    max_grad_norm: float | None = 5.0
    seed: int = 0
    amp: bool = True
    channels_last: bool | None = None
    num_workers: int = 0
    eval_batch_size: int = 256
    checkpoint_dir: str | None = None
    resume: bool = False

    def __post_init__(self) -> None:
        self.hint_tensors = tuple((str(t), str(s)) for t, s in self.hint_tensors)
        if not isinstance(self.trainable, str):
            self.trainable = tuple(self.trainable)
        self.validate()

    def validate(self) -> None:
        """Raise PassConfigError for a value out of range."""

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise PassConfigError(f"finetune: {message}")

        self.check_training_options("finetune")
        need(self.epochs >= 1, f"epochs={self.epochs} must be at least 1")
        need(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}: use sgd or adamw")
        need(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: use cosine or onecycle")
        need(self.loss in LOSSES, f"loss={self.loss!r}: use kd, hint or mutual")
        need(self.hint_weight >= 0, f"hint_weight={self.hint_weight} must be >= 0")
        need(self.peers is None or self.peers >= 0, f"peers={self.peers} must be >= 0")
        need(self.crop_padding >= 0, f"crop_padding={self.crop_padding} must be >= 0")
        need(
            self.time_budget_s is None or self.time_budget_s > 0,
            f"time_budget_s={self.time_budget_s} must be positive",
        )
        need(
            0 <= self.label_smoothing < 1,
            f"label_smoothing={self.label_smoothing} must be in [0, 1)",
        )
        need(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm={self.max_grad_norm} must be positive",
        )
        need(self.num_workers >= 0, f"num_workers={self.num_workers} must be >= 0")
        need(self.eval_batch_size >= 1, f"eval_batch_size={self.eval_batch_size} must be >= 1")
        need(
            not self.resume or self.checkpoint_dir is not None,
            "resume needs a checkpoint_dir to resume from",
        )


def finetune_config_from(options: object, **overrides: Any) -> FinetuneConfig:
    """The ``FinetuneConfig`` of one training run (validated, with its messages).

    Args:
        options: a pass's config (a ``TrainingOptions``) or the CLI's arguments; each of
            ``TRAINING_OPTIONS`` it has is taken as it is, the others keep the defaults.
        overrides: what the run sets itself (its epochs, budget, loss, seed...), or a value
            the run derives from one of those options (a final learning rate, a default alpha).
    """
    shared = {name: getattr(options, name) for name in TRAINING_OPTIONS if hasattr(options, name)}
    return FinetuneConfig(**{**shared, **overrides})
