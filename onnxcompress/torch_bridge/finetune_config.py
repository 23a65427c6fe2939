"""The options of ``finetune`` and their validation.

``FinetuneConfig`` is what a pass or the CLI fills in; ``validate`` refuses values out of range.
"""

from __future__ import annotations

import dataclasses
import math

from onnxcompress.errors import PassConfigError

LOSSES = ("kd", "hint", "mutual")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")


@dataclasses.dataclass
class FinetuneConfig:
    """Options of ``finetune``.

    Attributes:
        epochs: passes over the training data (or over ``epoch_samples`` of it).
        lr: peak learning rate.
        batch_size: images per step and process.
        optimizer: ``sgd`` (with Nesterov momentum) or ``adamw``.
        momentum: SGD momentum.
        weight_decay: applied to weight tensors only (not to biases or per-channel scales).
        schedule: ``cosine`` decay from ``lr`` to 0, or ``onecycle`` (warm-up then cosine).
        temperature: softmax temperature T of the distillation terms.
        alpha: weight of the distillation term against cross-entropy (1: distillation only).
            Without labels the distillation term gets all the weight.
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
        epoch_samples: train each epoch on this many images, a fresh random subset every epoch
            (None: all); for time-budgeted runs on large data.
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
        batchnorm: train with a BatchNormalization after every Conv that has none (set to the
            identity on ``BATCHNORM_CALIBRATION`` training images), folded back into the convs
            at the end, so the result has the student's nodes and names (see
            ``torch_bridge.batchnorm``): exporters fold BN away, and a BN-free network trains
            worse conditioned than the one that was trained. Only convs that train get one
            (folding a trained BN into a frozen conv would change it); with ``trainable``
            naming nodes a BN trains with its conv, with a pattern only if it matches the BN's
            name too (``<conv>/inserted_bn``).
        batchnorm_between_convs: with ``batchnorm``, also after convs whose output feeds only
            other convs (the depthwise half of a separable pair); False leaves those out
            (``torch_bridge.batchnorm.feeds_only_convs``): half the BatchNorms of a separable
            network, its distillation step 1.1-1.2x faster (``benchmarks/distill_step.py``).
        num_workers: background batch loaders (0: in the training process).
        eval_batch_size: batch size for validation.
        checkpoint_dir: write ``last.pt`` here after every epoch (None: no checkpoints).
        resume: continue from ``checkpoint_dir/last.pt`` when it exists.
        device: ``cpu``, ``cuda``, ``cuda:N``; None: ``cuda:LOCAL_RANK`` if a GPU is visible.
    """

    epochs: int = 3
    lr: float = 0.01
    batch_size: int = 64
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    temperature: float = 4.0
    alpha: float = 0.9
    loss: str = "kd"
    hint_tensors: tuple[tuple[str, str], ...] = ()
    hint_weight: float = 1.0
    peers: int | None = None
    augment: bool | None = None
    crop_padding: int = 4
    flip: bool = True
    epoch_samples: int | None = None
    time_budget_s: float | None = None
    trainable: str | tuple[str, ...] = "all"
    label_smoothing: float = 0.0
    max_grad_norm: float | None = 5.0
    seed: int = 0
    amp: bool = True
    channels_last: bool | None = None
    batchnorm: bool = False
    batchnorm_between_convs: bool = True
    num_workers: int = 0
    eval_batch_size: int = 256
    checkpoint_dir: str | None = None
    resume: bool = False
    device: str | None = None

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

        need(self.epochs >= 1, f"epochs={self.epochs} must be at least 1")
        need(self.lr > 0 and math.isfinite(self.lr), f"lr={self.lr} must be positive")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be positive")
        need(self.optimizer in OPTIMIZERS, f"optimizer={self.optimizer!r}: use sgd or adamw")
        need(0 <= self.momentum < 1, f"momentum={self.momentum} must be in [0, 1)")
        need(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        need(self.schedule in SCHEDULES, f"schedule={self.schedule!r}: use cosine or onecycle")
        need(self.temperature > 0, f"temperature={self.temperature} must be positive")
        need(0 <= self.alpha <= 1, f"alpha={self.alpha} must be in [0, 1]")
        need(self.loss in LOSSES, f"loss={self.loss!r}: use kd, hint or mutual")
        need(self.hint_weight >= 0, f"hint_weight={self.hint_weight} must be >= 0")
        need(self.peers is None or self.peers >= 0, f"peers={self.peers} must be >= 0")
        need(self.crop_padding >= 0, f"crop_padding={self.crop_padding} must be >= 0")
        need(
            self.epoch_samples is None or self.epoch_samples >= 1,
            f"epoch_samples={self.epoch_samples} must be positive",
        )
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
