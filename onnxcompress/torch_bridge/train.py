"""Fine-tune a compressed ONNX model in PyTorch, distilling from the original, and write it back.

Passes that lose accuracy (``lrf``, ``merge``...) recover it here: the student graph trains
through ``OnnxModule`` and its trained initializers go back into the same graph by name.

Losses (``FinetuneConfig.loss``):

``kd``
    Logit distillation: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE``.
    Without labels it is pure distillation; without a teacher, plain cross-entropy.
``hint``
    ``kd`` plus ``hint_weight`` times the relative MSE (``||s - t||^2 / ||t||^2``) between named
    tensors of teacher and student, through a trained 1x1 adapter where widths differ (the
    adapter is not part of the written model).
``mutual``
    Online mutual distillation: the student, ``peers`` copies of it and, when given, the
    teacher all train together; each learns from the labels and from the ensemble's averaged
    logits at temperature T (the online teacher).

The same ``finetune`` call runs as one process or under ``torchrun --nproc_per_node=N``
(DistributedDataParallel, one writer); checkpoints are written every epoch, and a resumed run
ends with the same weights as an uninterrupted one.

A time budget (``time_budget_s``, or a ``Deadline`` a pass hands over) covers the whole call:
BatchNorm insertion, building the networks, every validation, checkpoints and the write-back.
The minimum work (the validations the run must make and one training step) is estimated from a
timed batch before any of it starts; a budget that cannot hold it is refused with
``BudgetTooShortError`` (a ``PassConfigError``).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.nn.functional as F
from torch import nn

from onnxcompress.data import Dataset
from onnxcompress.deadline import Clock, Deadline
from onnxcompress.errors import (
    DataError,
    OnnxCompressError,
    PassConfigError,
    UnsupportedOpError,
)
from onnxcompress.graph.model import clone_model
from onnxcompress.torch_bridge.distributed import (
    DistributedContext,
    all_reduce_sum,
    barrier,
    setup_distributed,
    teardown_distributed,
)
from onnxcompress.torch_bridge.module import OnnxModule
from onnxcompress.torch_bridge.writeback import write_back

logger = logging.getLogger(__name__)

LOSSES = ("kd", "hint", "mutual")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "onecycle")
CHECKPOINT_FILE = "last.pt"
CHECKPOINT_VERSION = 1
# Augmentation is on by default only for images at least this large: shifting an 8x8 digit by
# 4 pixels destroys it.
AUGMENT_MIN_SIZE = 16
# One-cycle: fraction of the steps spent warming up, and the start/end learning-rate divisors.
ONECYCLE_WARMUP = 0.3
ONECYCLE_START_DIV = 25.0
ONECYCLE_END_DIV = 1e4
# Peer copies in mutual learning start from the student's weights plus this much noise (relative
# to each tensor's spread) when augmentation cannot make them see different inputs.
PEER_NOISE = 0.01
# Training images (spread over the set) whose statistics initialize inserted BatchNorms.
BATCHNORM_CALIBRATION = 512
# Forward passes timed to estimate a budgeted run's minimum work; the first one warms up
# (oneDNN builds its kernels for a new shape then), the fastest one counts.
MINIMUM_PROBES = 2


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
        loss: ``kd``, ``hint`` or ``mutual`` (see the module docstring).
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


@dataclasses.dataclass
class EpochRecord:
    """One row of the training history (epoch 0: the model as given, before training).

    Attributes:
        epoch: 1-based epoch number; 0 for the starting point.
        loss: mean training loss of the student over the epoch (None for epoch 0).
        val_top1: validation top-1 in percent (agreement with the teacher when the validation
            data has no labels; None without validation data).
        seconds: wall time of the epoch, validation included.
        images_per_second: training throughput over all processes.
        lr: learning rate at the end of the epoch.
        images: training images seen in the epoch, over all processes.
        val_images: images the validation scored: fewer than the validation data holds when
            the time budget ran out during it.
    """

    epoch: int
    loss: float | None
    val_top1: float | None
    seconds: float
    images_per_second: float | None = None
    lr: float | None = None
    images: int | None = None
    val_images: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class FinetuneResult:
    """What ``finetune`` returns.

    Attributes:
        model: a copy of the student with the best epoch's weights written back.
        module: the trained student as an ``OnnxModule`` holding those weights (eval mode).
        history: epoch 0 (before training) and every trained epoch.
        best_epoch: the epoch whose weights ``model`` holds; 0 means no epoch beat the
            starting point on validation and the weights are the ones given.
        best_top1: validation top-1 of that epoch.
        teacher_top1: the teacher's validation top-1, when both exist.
        seconds: time of the whole run (on the deadline's clock).
        world_size: processes that trained.
        out_of_time: ``time_budget_s`` ended the run before all epochs were done.
        validations_cut_short: validations (the teacher's included) the deadline ended before
            they had scored every image; their top-1 is over a spread subset.
        trained_graph: with ``batchnorm``, the graph that trained (BatchNorms inserted), whose
            state an ``after_step`` hook saw; None without.
        inserted: the BatchNormalization nodes inserted into ``trained_graph``.
    """

    model: ir.Model
    module: OnnxModule
    history: list[EpochRecord]
    best_epoch: int
    best_top1: float | None
    teacher_top1: float | None
    seconds: float
    world_size: int = 1
    out_of_time: bool = False
    validations_cut_short: int = 0
    trained_graph: ir.Model | None = dataclasses.field(default=None, repr=False)
    inserted: tuple[str, ...] = ()

    def model_from_state(self, state: Mapping[str, torch.Tensor]) -> tuple[ir.Model, OnnxModule]:
        """The student's graph holding the weights of ``state`` (a ``state_dict`` of the module
        that trained, as an ``after_step`` hook sees it: with ``batchnorm`` the BatchNorms are
        folded away like in ``model``), and its module in eval mode."""
        if self.trained_graph is None:
            module = copy.deepcopy(self.module)
            module.load_state_dict(state)
            return write_back(clone_model(self.model), module), module.eval()
        from onnxcompress.torch_bridge.batchnorm import fold_batchnorms

        trained = OnnxModule(self.trained_graph)
        trained.load_state_dict(state)
        model = write_back(clone_model(self.trained_graph), trained)
        fold_batchnorms(model, self.inserted)
        device = next(self.module.parameters(), torch.empty(0)).device
        return model, OnnxModule(model).to(device).eval()

    @property
    def initial_top1(self) -> float | None:
        return self.history[0].val_top1 if self.history else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "best_epoch": self.best_epoch,
            "best_top1": self.best_top1,
            "initial_top1": self.initial_top1,
            "teacher_top1": self.teacher_top1,
            "seconds": round(self.seconds, 3),
            "world_size": self.world_size,
            "out_of_time": self.out_of_time,
            "validations_cut_short": self.validations_cut_short,
            "history": [record.as_dict() for record in self.history],
        }


# ---------------------------------------------------------------------------------------------
# Losses and augmentation
# ---------------------------------------------------------------------------------------------


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


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, padding: int, flip: bool
) -> torch.Tensor:
    """Random crop of each image from its zero-padded copy, then a random horizontal flip.

    Offsets and flips come from ``generator`` (on the CPU), so runs are reproducible whatever
    the device. Zero is the mean pixel after normalization.
    """
    n, c, h, w = x.shape
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator).to(x.device)
        rows = oy[:, None] + torch.arange(h, device=x.device)
        cols = ox[:, None] + torch.arange(w, device=x.device)
        x = padded[
            torch.arange(n, device=x.device)[:, None, None, None],
            torch.arange(c, device=x.device)[None, :, None, None],
            rows[:, None, :, None],
            cols[:, None, None, :],
        ]
    if flip:
        mirror = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


def _logits(output: Any) -> torch.Tensor:
    """The first output of a network: the class scores."""
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise PassConfigError("finetune: the network's first output is not a tensor")
    return output


# ---------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------


class _HintAdapter(nn.Module):
    """Maps a student tensor onto the teacher's shape: 1x1 conv (or linear) plus pooling."""

    def __init__(self, student_shape: Sequence[int], teacher_shape: Sequence[int]) -> None:
        super().__init__()
        self.out_hw: tuple[int, int] | None = None
        cs, ct = student_shape[1], teacher_shape[1]
        if len(student_shape) == 4 and len(teacher_shape) == 4:
            self.project: nn.Module = (
                nn.Conv2d(cs, ct, kernel_size=1, bias=False) if cs != ct else nn.Identity()
            )
            if tuple(student_shape[2:]) != tuple(teacher_shape[2:]):
                self.out_hw = (int(teacher_shape[2]), int(teacher_shape[3]))
        elif len(student_shape) == 2 and len(teacher_shape) == 2:
            self.project = nn.Linear(cs, ct, bias=False) if cs != ct else nn.Identity()
        else:
            raise PassConfigError(
                f"finetune: hint tensors of shapes {tuple(student_shape)} (student) and "
                f"{tuple(teacher_shape)} (teacher) cannot be matched; pick tensors of equal rank "
                "(NCHW or NC)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.out_hw is not None:
            x = F.adaptive_avg_pool2d(x, self.out_hw)
        return self.project(x)


class _Cohort(nn.Module):
    """Everything that trains, in one module so DDP synchronizes all of it.

    Network 0 is the student; the others are mutual-learning peers. Adapters map the student's
    hint tensors onto the teacher's.
    """

    def __init__(
        self,
        student: OnnxModule,
        peers: Sequence[nn.Module],
        student_capture: Sequence[str],
        adapters: Sequence[nn.Module],
    ) -> None:
        super().__init__()
        self.student = student
        self.peers = nn.ModuleList(peers)
        self.adapters = nn.ModuleList(adapters)
        self.student_capture = list(student_capture)

    def forward(
        self, views: Sequence[torch.Tensor]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        if self.student_capture:
            output, captured = self.student(views[0], capture=self.student_capture)
            hints = [
                adapter(captured[name])
                for adapter, name in zip(self.adapters, self.student_capture, strict=True)
            ]
        else:
            output, hints = self.student(views[0]), []
        logits = [_logits(output)]
        for peer, view in zip(self.peers, views[1:], strict=True):
            logits.append(_logits(peer(view)))
        return logits, hints


class _Teacher:
    """Runs the frozen teacher and returns its logits and hint tensors."""

    def __init__(self, network: nn.Module, capture: Sequence[str]) -> None:
        self.network = network
        self.capture = list(capture)
        self._hooked: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        if capture and not isinstance(network, OnnxModule):
            modules = dict(network.named_modules())
            missing = [name for name in capture if name not in modules]
            if missing:
                raise PassConfigError(
                    f"finetune: the teacher has no submodule {', '.join(map(repr, missing))} "
                    "for hint_tensors; name submodules of the teacher nn.Module"
                )
            for name in capture:
                self._handles.append(modules[name].register_forward_hook(self._keeper(name)))

    def _keeper(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self._hooked[name] = _logits(output)

        return hook

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.capture:
            return _logits(self.network(x)), []
        if isinstance(self.network, OnnxModule):
            output, captured = self.network(x, capture=self.capture)
            return _logits(output), [captured[name] for name in self.capture]
        self._hooked.clear()
        output = self.network(x)
        return _logits(output), [self._hooked[name] for name in self.capture]

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _penultimate(model: ir.Model | None, module: nn.Module) -> str | None:
    """The tensor entering the last Gemm/MatMul: the features the classifier reads."""
    if model is None or not isinstance(module, OnnxModule):
        return None
    name = None
    for node in model.graph:
        if node.op_type in ("Gemm", "MatMul") and node.inputs and node.inputs[0] is not None:
            name = node.inputs[0].name
    return name


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class _ArrayData(torch.utils.data.Dataset):
    """Batched access to in-memory arrays for ``DataLoader`` workers (``__getitems__``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> Any:
        return self.__getitems__([index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.x[index], None if self.y is None else self.y[index]


def _keep_batch(batch: Any) -> Any:
    return batch


def _epoch_order(
    count: int, epoch: int, config: FinetuneConfig, context: DistributedContext
) -> list[int]:
    """This process's sample indices for ``epoch``: a seeded shuffle, sharded by rank."""
    sampler: torch.utils.data.DistributedSampler[int] = torch.utils.data.DistributedSampler(
        range(count),  # type: ignore[arg-type]
        num_replicas=context.world_size,
        rank=context.rank,
        shuffle=True,
        seed=config.seed,
    )
    sampler.set_epoch(epoch)
    order = list(sampler)
    if config.epoch_samples is not None:
        order = order[: max(1, math.ceil(config.epoch_samples / context.world_size))]
    return order


def _batches(order: Sequence[int], batch_size: int) -> list[list[int]]:
    """Consecutive batches; a short last batch is dropped (a batch of 1 breaks batch norm)."""
    batches = [list(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def _loader(
    x: torch.Tensor, y: torch.Tensor | None, batches: list[list[int]], workers: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor | None]]:
    if workers == 0:
        data = _ArrayData(x, y)
        return (data.__getitems__(batch) for batch in batches)
    return torch.utils.data.DataLoader(
        _ArrayData(x, y),
        batch_sampler=batches,
        num_workers=workers,
        collate_fn=_keep_batch,
        persistent_workers=False,
    )


def _check_dataset(data: Dataset, role: str) -> None:
    if len(data) == 0:
        raise DataError(f"finetune: the {role} data {data.name!r} holds no images")
    if not np.isfinite(data.x).all():
        raise DataError(f"finetune: the {role} data {data.name!r} holds NaN or infinite values")


def _check_float_input(student: Any) -> None:
    """The bridge feeds float32 images; a float16 model would fail deep inside torch."""
    if not isinstance(student, ir.Model):
        return
    from onnxcompress.graph.model import model_label

    for value in student.graph.inputs:
        if value.is_initializer() or value.type is None:
            continue
        dtype = value.type.dtype
        if dtype != ir.DataType.FLOAT:
            raise UnsupportedOpError(
                f"{model_label(student)}: input {value.name!r} is {dtype.name.lower()}; "
                "finetune trains float32 models (fine-tune the float32 model, convert after)"
            )


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _fingerprint(
    config: FinetuneConfig, student: OnnxModule, train: Dataset, context: DistributedContext
) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed: everything that shapes the run."""
    ignored = {"checkpoint_dir", "resume", "device", "num_workers", "eval_batch_size"}
    fields = {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in ignored
    }
    shapes = sorted((name, list(p.shape)) for name, p in student.named_onnx_parameters())
    return {
        "config": json.dumps(fields, sort_keys=True, default=str),
        "student": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
        "train_images": len(train),
        "world_size": context.world_size,
    }


def _save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """``torch.save`` to a temp file, then rename: a crash never leaves half a checkpoint."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        # weights_only: a checkpoint is data; unpickling arbitrary objects would run code.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DataError(
            f"{path}: cannot read the checkpoint ({str(exc).splitlines()[0][:200]}); delete it "
            "to start over"
        ) from exc
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise DataError(f"{path}: not a finetune checkpoint of this version; delete it")
    return payload


@dataclasses.dataclass
class _Best:
    """The best epoch so far (0: the starting point) and the student's weights then."""

    epoch: int
    top1: float | None
    state: Mapping[str, torch.Tensor]


def _clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Minimum work of a budgeted run
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class MinimumWork:
    """What a ``finetune`` run must do whatever its budget, estimated before it starts.

    Attributes:
        seconds: the estimate, a lower bound.
        needs: what that is, in words, for a message.
    """

    seconds: float
    needs: str


def _validation_passes(
    val: Dataset | None, has_teacher: bool, distills: bool, mutual: bool, resumed: bool = False
) -> tuple[int, int]:
    """(student, teacher) network passes over the validation data that every run makes: the
    teacher's top-1 (labelled data), the starting point's validation unless resumed and the
    last epoch's; without labels each validation also runs the reference (the teacher) whose
    predictions stand in for them (as ``_measure_top1``)."""
    if val is None:
        return 0, 0
    validations = 1 if resumed else 2
    if val.y is not None:
        return validations, int(has_teacher)
    if distills or (mutual and has_teacher):
        return validations, validations
    return 0, 0


def _fastest(forward: Callable[[torch.Tensor], Any], x: torch.Tensor, clock: Clock) -> float:
    """Seconds per image of ``forward`` over ``x``: the fastest of ``MINIMUM_PROBES`` timed
    calls (the first warms up: oneDNN builds its kernels for a new shape then)."""
    timings = []
    for _ in range(MINIMUM_PROBES):
        tic = clock()
        forward(x)
        timings.append(clock() - tic)
    return min(timings) / max(len(x), 1)


def _minimum_work(
    student: Callable[[torch.Tensor], Any],
    teacher: Callable[[torch.Tensor], Any] | None,
    clock: Clock,
    train: Dataset,
    val: Dataset | None,
    config: FinetuneConfig,
    passes: tuple[int, int],
    images: int,
    students: int,
    distills: bool,
) -> MinimumWork:
    """The validations' ``passes`` (student's, teacher's) over ``images`` validation images
    and one training step of ``students`` trained networks (and the teacher, when it
    ``distills``), from timed forward passes of the student and the teacher over one batch.

    A lower bound: a training step also runs the backward pass; so a budget that would work
    is not refused.
    """
    probe = val if sum(passes) and val is not None else train
    size = config.eval_batch_size if probe is val else config.batch_size
    x = torch.from_numpy(probe.x[: min(size, len(probe))])
    per_student = _fastest(student, x, clock)
    timed_teacher = teacher is not None and (passes[1] > 0 or distills)
    per_teacher = _fastest(teacher, x, clock) if teacher is not None and timed_teacher else 0.0
    student_pass, teacher_pass = per_student * images, per_teacher * images
    step = config.batch_size * (per_student * students + (per_teacher if distills else 0.0))
    needs = f"one training step (~{step:.2f} s)"
    if sum(passes):
        parts = [f"{passes[0]} of the student (~{student_pass:.1f} s each)"]
        if passes[1]:
            parts.append(f"{passes[1]} of the teacher (~{teacher_pass:.1f} s each)")
        needs = f"validations over {images} images, {' and '.join(parts)}, and {needs}"
    return MinimumWork(passes[0] * student_pass + passes[1] * teacher_pass + step, needs)


def _forward_on(
    module: nn.Module, device: torch.device, config: FinetuneConfig
) -> Callable[[torch.Tensor], Any]:
    """A validation forward pass of ``module``, as the trainer runs it (layout, autocast)."""
    amp = config.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if amp and torch.cuda.is_bf16_supported() else torch.float16

    def forward(x: torch.Tensor) -> Any:
        x = x.to(device)
        if x.dim() == 4 and config.channels_last in (None, True):
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=amp_dtype) if amp else nullcontext()
        with torch.no_grad(), autocast:
            return _logits(module(x)).float().argmax(1).cpu()

    return forward


def minimum_work(
    student: ir.Model,
    teacher: ir.Model | None,
    train: Dataset,
    val: Dataset | None,
    config: FinetuneConfig,
    clock: Clock | None = None,
) -> MinimumWork:
    """The minimum work of ``finetune(student, teacher, train, val, config)``, estimated
    without running it: for a caller that must know before its own earlier phases whether the
    training it will start fits.

    Builds the networks on the training device and times their forward passes; the estimate
    is the one ``finetune`` itself checks its budget against.
    """
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mutual = config.loss == "mutual"
    has_teacher = teacher is not None
    distills = has_teacher and not mutual
    student_module = OnnxModule(student, trainable="none").to(device).eval()
    teacher_forward = None
    if teacher is not None:
        teacher_module = OnnxModule(teacher, trainable="none").to(device).eval()
        teacher_forward = _forward_on(teacher_module, device, config)
    passes = _validation_passes(val, has_teacher, distills, mutual)
    students = 1
    if mutual:
        students += config.peers if config.peers is not None else (0 if has_teacher else 1)
        students += int(has_teacher)
    return _minimum_work(
        _forward_on(student_module, device, config),
        teacher_forward,
        clock or time.monotonic,
        train,
        val,
        config,
        passes,
        images=len(val) if sum(passes) and val is not None else 0,
        students=students,
        distills=distills,
    )


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def run_deadline(config: FinetuneConfig, deadline: Deadline | None = None) -> Deadline:
    """The deadline of one ``finetune`` call: ``config.time_budget_s``, the caller's
    ``deadline``, whichever ends first (unlimited without either).

    Without ``config.time_budget_s``, a caller's deadline that is not a share of another
    (``Deadline.is_share``) is the user's budget for the run, started before the caller loaded
    the models and data (``onnxcompress finetune``): it is used as it is, so that messages
    name it as the user's."""
    if deadline is None or not deadline.limited:
        # The budget is the user's own: messages name it as such.
        clock = None if deadline is None else deadline.clock
        return Deadline(config.time_budget_s, clock=clock, label="finetune")
    if config.time_budget_s is None and not deadline.is_share:
        return deadline
    label = f"{deadline.label} training" if deadline.label else "finetune"
    return deadline.within(config.time_budget_s, label=label)


def finetune(
    student: ir.Model,
    teacher: ir.Model | nn.Module | None,
    train: Dataset,
    val: Dataset | None = None,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    after_step: Callable[[OnnxModule, float], None] | None = None,
    deadline: Deadline | None = None,
) -> FinetuneResult:
    """Train ``student`` (optionally distilling from ``teacher``) and write the weights back.

    Under ``torchrun`` every process calls this with the same arguments; each trains on its
    shard of ``train`` and all end with the same weights. Only rank 0 prints and writes
    checkpoints; the caller should write outputs on rank 0 only (``is_main_process()``).

    Args:
        student: the model to train; it is not modified (the result holds a copy).
        teacher: the original ONNX model (run frozen through ``OnnxModule``), any
            ``nn.Module`` mapping the same images to the same classes (it is moved to the
            training device and put in eval mode; with ``mutual`` a copy trains), or None.
        train: training images, with labels or without (then a teacher is needed).
        val: validation images; the best epoch is chosen on them (with labels: top-1; without:
            top-1 agreement with the teacher). None keeps the last epoch.
        config: options; defaults when None.
        progress: draw a progress bar (rank 0 only).
        after_step: called with the student and the run's progress (the fraction of the
            planned steps or of ``time_budget_s`` spent, whichever is further; the same number
            on every process) after every optimizer step (under ``no_grad``), e.g. to project
            its weights back onto a constraint set (projected SGD); it must act identically on
            every process.
        deadline: the time the run may take, from a caller's budget (a pass's sub-deadline);
            with ``config.time_budget_s`` too, whichever ends first. Its clock times the run.

    Raises:
        UnsupportedOpError: a model uses ops the bridge cannot run (before any training).
        DataError: empty data, labels out of range, images that do not fit the model, or an
            unreadable checkpoint.
        PassConfigError: options out of range, unknown hint tensors, a checkpoint from another
            run.
        BudgetTooShortError: the time budget cannot hold the minimum work (before it starts).
    """
    config = config if config is not None else FinetuneConfig()
    config.validate()
    # Started first: everything below (BatchNorm insertion included) is part of the run.
    deadline = run_deadline(config, deadline)
    _check_float_input(student)
    _check_dataset(train, "training")
    if val is not None:
        _check_dataset(val, "validation")
    from onnxcompress.graph.sparse_storage import STORED_KEY, expand_stored

    if STORED_KEY in student.metadata_props:
        # Weights an earlier step stored compactly are computed by the graph: train them as
        # plain initializers (the result is dense).
        student = clone_model(student)
        expand_stored(student)
    inserted: list[str] = []
    trainable = config.trainable
    if config.batchnorm:
        from onnxcompress.torch_bridge.batchnorm import insert_batchnorms, selected_by

        # Deterministic (the same images, eval mode): every process inserts the same.
        student = clone_model(student)
        inserted = insert_batchnorms(
            student,
            train.spread(BATCHNORM_CALIBRATION).x,
            select=selected_by(trainable),
            between_convs=config.batchnorm_between_convs,
        )
        if isinstance(trainable, tuple):
            # A BN trains with the conv it follows.
            config = dataclasses.replace(config, trainable=trainable + tuple(inserted))
    context = setup_distributed(config.device)
    try:
        trainer = _Trainer(student, teacher, train, val, config, context, progress, deadline)
        trainer.after_step = after_step
        result = trainer.run()
        if inserted:
            from onnxcompress.torch_bridge.batchnorm import fold_batchnorms

            result.trained_graph, result.inserted = student, tuple(inserted)
            fold_batchnorms(result.model, inserted)
            result.module = OnnxModule(result.model, trainable=trainable)
            result.module = result.module.to(trainer.device).eval()
    except BaseException:
        # No barrier on the way out: the other processes may be gone or stuck elsewhere.
        teardown_distributed(context, clean=False)
        raise
    teardown_distributed(context)
    return result


class _Trainer:
    """One fine-tuning run; ``finetune`` is its public face."""

    def __init__(
        self,
        student_model: ir.Model,
        teacher: ir.Model | nn.Module | None,
        train: Dataset,
        val: Dataset | None,
        config: FinetuneConfig,
        context: DistributedContext,
        progress: bool,
        deadline: Deadline | None = None,
    ) -> None:
        self.deadline = deadline if deadline is not None else run_deadline(config)
        self.clock = self.deadline.clock
        self.student_model = student_model
        self.train_data, self.val_data = train, val
        self.config = config
        self.context = context
        self.device = context.device
        self.progress = progress and context.is_main
        self.mutual = config.loss == "mutual"
        self.has_labels = train.y is not None
        self.after_step: Callable[[OnnxModule, float], None] | None = None
        torch.manual_seed(config.seed)

        # Built first so that unsupported ops are reported before anything else happens.
        self.student = OnnxModule(student_model, trainable=config.trainable).to(self.device)
        if len(self.student.input_names) != 1:
            raise PassConfigError(
                f"finetune: the student has {len(self.student.input_names)} inputs "
                f"({', '.join(self.student.input_names)}); only single-input models train here"
            )
        if not self.student.trainable_names:
            raise PassConfigError("finetune: the student has no trainable parameters")
        self.teacher_net = self._build_teacher(teacher)
        if self.teacher_net is None and not self.has_labels:
            raise DataError(
                f"finetune: the training data {train.name!r} has no labels and there is no "
                "teacher; give labelled data or a teacher to learn from"
            )
        self.augment = (
            config.augment
            if config.augment is not None
            else min(train.x.shape[2:]) >= AUGMENT_MIN_SIZE
        )
        self.x = torch.from_numpy(train.x)
        self.y = None if train.y is None else torch.from_numpy(train.y)
        teacher_capture, student_capture = self._hint_names(teacher)
        self.teacher = (
            _Teacher(self.teacher_net, teacher_capture) if self.teacher_net is not None else None
        )
        adapters = self._probe(student_capture)
        peers = self._build_peers()
        self.cohort = _Cohort(self.student, peers, student_capture, adapters).to(self.device)
        self.trained: nn.Module = self.cohort
        if context.distributed:
            self.trained = nn.parallel.DistributedDataParallel(
                self.cohort, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = len(
            _batches(_epoch_order(len(train), 0, config, context), config.batch_size)
        )
        # Fraction of the time budget spent, identical on every process (see _spend_time).
        self.time_progress = 0.0
        self.out_of_time = False
        self.clock_before = 0.0  # seconds spent by the runs this one resumes
        # What must still run after the last step, measured as the run goes: the validation,
        # a checkpoint, copying the best state and writing it back.
        self.validation_seconds = 0.0
        self.checkpoint_seconds = 0.0
        self.state_seconds = 0.0
        self.step_seconds = 0.0  # the last training step's
        # Images the last validation scored; validations the deadline cut short.
        self.validation_images: int | None = None
        self.validations_cut_short = 0
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )

    # -- construction ------------------------------------------------------------------------

    def _build_teacher(self, teacher: ir.Model | nn.Module | None) -> nn.Module | None:
        if teacher is None:
            return None
        if isinstance(teacher, ir.Model):
            network: nn.Module = OnnxModule(teacher, trainable="all" if self.mutual else "none")
        elif isinstance(teacher, nn.Module):
            # A teacher that trains in the cohort is a copy: the caller's module stays as given.
            network = copy.deepcopy(teacher) if self.mutual else teacher
        else:
            raise PassConfigError(
                f"finetune: the teacher must be an onnx_ir Model or a torch nn.Module, "
                f"not {type(teacher).__name__}"
            )
        network = network.to(self.device)
        if not self.mutual:
            network.eval()
        return network

    def _hint_names(self, teacher: ir.Model | nn.Module | None) -> tuple[list[str], list[str]]:
        config = self.config
        if config.loss != "hint":
            return [], []
        if self.teacher_net is None:
            raise PassConfigError("finetune: loss 'hint' needs a teacher")
        pairs = list(config.hint_tensors)
        if not pairs:
            teacher_model = teacher if isinstance(teacher, ir.Model) else None
            t_name = _penultimate(teacher_model, self.teacher_net)
            s_name = _penultimate(self.student_model, self.student)
            if t_name is None or s_name is None:
                raise PassConfigError(
                    "finetune: loss 'hint' found no classifier input to match; give "
                    "hint_tensors (--hint TEACHER_TENSOR=STUDENT_TENSOR)"
                )
            pairs = [(t_name, s_name)]
            logger.info("hint distillation at %s (teacher) -> %s (student)", t_name, s_name)
        known = set(self.student._slot_of_name)
        missing = [s for _, s in pairs if s not in known]
        if missing:
            raise PassConfigError(
                f"finetune: the student has no tensor {', '.join(map(repr, missing))} to use as "
                "a hint; name tensors of the student graph"
            )
        if isinstance(self.teacher_net, OnnxModule):
            known = set(self.teacher_net._slot_of_name)
            missing = [t for t, _ in pairs if t not in known]
            if missing:
                raise PassConfigError(
                    f"finetune: the teacher has no tensor {', '.join(map(repr, missing))} to "
                    "use as a hint; name tensors of the teacher graph"
                )
        return [t for t, _ in pairs], [s for _, s in pairs]

    def _probe(self, student_capture: Sequence[str]) -> list[nn.Module]:
        """Run two images through both networks: checks shapes and labels, sizes adapters."""
        x = self.x[:2].to(self.device)
        self.student.eval()
        try:
            with torch.no_grad():
                if student_capture:
                    out, captured = self.student(x, capture=list(student_capture))
                    student_hints = [captured[name] for name in student_capture]
                else:
                    out, student_hints = self.student(x), []
                student_logits = _logits(out)
                teacher_logits, teacher_hints = (
                    self.teacher(x) if self.teacher is not None else (None, [])
                )
        except OnnxCompressError:
            raise
        except (RuntimeError, ValueError, IndexError) as exc:
            from onnxcompress.graph.model import model_label

            raise DataError(
                f"finetune: images of shape {tuple(self.x.shape[1:])} from "
                f"{self.train_data.name!r} do not fit {model_label(self.student_model)} "
                f"({str(exc).splitlines()[0][:200]}); fix the data spec (e.g. resize=, channels=)"
            ) from exc
        finally:
            self.student.train()
        if student_logits.dim() != 2:
            raise PassConfigError(
                f"finetune: the student's output has shape {tuple(student_logits.shape)}; "
                "fine-tuning needs class scores of shape (N, classes)"
            )
        self.classes = int(student_logits.shape[1])
        if teacher_logits is not None and tuple(teacher_logits.shape) != tuple(
            student_logits.shape
        ):
            raise DataError(
                f"finetune: teacher output {tuple(teacher_logits.shape)} and student output "
                f"{tuple(student_logits.shape)} differ; distillation needs the same classes"
            )
        for data, role in ((self.train_data, "training"), (self.val_data, "validation")):
            if data is None or data.y is None:
                continue
            low, high = int(data.y.min()), int(data.y.max())
            if low < 0 or high >= self.classes:
                raise DataError(
                    f"finetune: labels of the {role} data {data.name!r} span {low}..{high} but "
                    f"the model scores {self.classes} classes (0..{self.classes - 1})"
                )
        return [
            _HintAdapter(tuple(s.shape), tuple(t.shape))
            for s, t in zip(student_hints, teacher_hints, strict=True)
        ]

    def _build_peers(self) -> list[nn.Module]:
        if not self.mutual:
            return []
        peers: list[nn.Module] = []
        if self.teacher_net is not None:
            peers.append(self.teacher_net)
        copies = self.config.peers
        if copies is None:
            copies = 0 if self.teacher_net is not None else 1
        if not peers and copies == 0:
            raise PassConfigError("finetune: loss 'mutual' needs a teacher or peers >= 1")
        generator = torch.Generator().manual_seed(self.config.seed + 7919)
        for _ in range(copies):
            peer = OnnxModule(self.student_model, trainable=self.config.trainable).to(self.device)
            if not self.augment:
                # Without augmentation identical copies would follow identical trajectories.
                with torch.no_grad():
                    for _, param in peer.named_onnx_parameters():
                        spread = float(param.std()) if param.numel() > 1 else 0.0
                        noise = torch.randn(param.shape, generator=generator) * PEER_NOISE * spread
                        param.add_(noise.to(param.device))
            peers.append(peer)
        self.teacher = None  # in mutual learning the teacher is a trained peer, not a target
        return peers

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.cohort.parameters():
            if param.requires_grad:
                (decay if param.dim() > 1 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self._trained_params = decay + no_decay
        if config.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
            )
        return torch.optim.AdamW(groups, lr=config.lr)

    def _progress(self, step: int) -> float:
        """Fraction of the run done after ``step`` optimizer steps: of the planned steps or of
        the time budget, whichever is further (equal on every process)."""
        total = max(1, self.config.epochs * self.steps_per_epoch)
        return min(1.0, max(step / total, self.time_progress))

    def _lr_factor(self, step: int) -> float:
        progress = self._progress(step)
        if self.config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        start, end = 1.0 / ONECYCLE_START_DIV, 1.0 / ONECYCLE_END_DIV
        if progress < ONECYCLE_WARMUP:
            return start + (1.0 - start) * progress / ONECYCLE_WARMUP
        tail = (progress - ONECYCLE_WARMUP) / (1.0 - ONECYCLE_WARMUP)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * tail))

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.config.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        try:
            return self._run()
        finally:
            if self.teacher is not None:
                self.teacher.close()

    def _run(self) -> FinetuneResult:
        config = self.config
        checkpoint = (
            Path(config.checkpoint_dir) / CHECKPOINT_FILE if config.checkpoint_dir else None
        )
        fingerprint = _fingerprint(config, self.student, self.train_data, self.context)
        payload: dict[str, Any] | None = None
        if config.resume and checkpoint is not None and checkpoint.exists():
            payload = _load_checkpoint(checkpoint)
            self.clock_before = float(payload.get("elapsed", 0.0))
        if self.deadline.limited:
            self._require_minimum(resumed=payload is not None)
        if checkpoint is not None and self.context.is_main:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        teacher_top1 = self._teacher_top1()
        history: list[EpochRecord] = []
        start_epoch = 0
        tic = self.clock()
        best = _Best(0, None, _clone_state(self.student))
        self.state_seconds = self.clock() - tic
        if payload is not None:
            assert checkpoint is not None
            self._restore(payload, fingerprint, checkpoint)
            start_epoch = int(payload["epoch"])
            history = [EpochRecord(**record) for record in payload["history"]]
            saved = payload["best"]
            best = _Best(int(saved["epoch"]), saved["top1"], saved["student"])
            self.validation_seconds = float(payload.get("validation_seconds", 0.0))
            self._say(f"resumed from {checkpoint} after epoch {start_epoch}")
        else:
            if config.resume:
                self._say(f"no checkpoint at {checkpoint}; starting from the beginning")
            tic = self.clock()
            best.top1 = self._validate()
            seconds = round(self.clock() - tic, 3)
            history.append(EpochRecord(0, None, best.top1, seconds, val_images=self._scored()))
            if best.top1 is not None:
                self._say(f"before training: validation top-1 {best.top1:.2f}%")

        for epoch in range(start_epoch, config.epochs):
            record = self._train_epoch(epoch)
            history.append(record)
            if record.val_top1 is None or best.top1 is None or record.val_top1 > best.top1:
                best = _Best(record.epoch, record.val_top1, _clone_state(self.student))
            if checkpoint is not None and self.context.is_main:
                tic = self.clock()
                payload = self._checkpoint_payload(epoch + 1, fingerprint, history, best)
                _save_checkpoint(checkpoint, payload)
                self.checkpoint_seconds = max(self.checkpoint_seconds, self.clock() - tic)
            barrier(self.context)
            if self.out_of_time:
                assert self.deadline.budget_s is not None
                self._say(
                    f"time budget of {self.deadline.budget_s:.0f} s reached in epoch {epoch + 1} "
                    f"of {config.epochs}"
                )
                break

        self.student.load_state_dict(best.state)
        self.student.eval()
        if best.epoch == 0 and best.top1 is not None and len(history) > 1:
            logger.warning(
                "no epoch beat the starting point on validation (%.2f%%); the weights are "
                "returned unchanged",
                best.top1,
            )
        model = write_back(clone_model(self.student_model), self.student)
        return FinetuneResult(
            model=model,
            module=self.student,
            history=history,
            best_epoch=best.epoch,
            best_top1=best.top1,
            teacher_top1=teacher_top1,
            seconds=self.deadline.spent(),
            world_size=self.context.world_size,
            out_of_time=self.out_of_time,
            validations_cut_short=self.validations_cut_short,
        )

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _train_epoch(self, epoch: int) -> EpochRecord:
        config, context = self.config, self.context
        tic = self.clock()
        # Every epoch derives its randomness from (seed, epoch): a resumed run replays it.
        torch.manual_seed(config.seed * 1_000_003 + epoch)
        augment_rng = torch.Generator().manual_seed(
            (config.seed * 1_000_003 + epoch) * 1009 + context.rank
        )
        batches = _batches(_epoch_order(len(self.x), epoch, config, context), config.batch_size)
        loader = _loader(self.x, self.y, batches, config.num_workers)
        self.trained.train()
        if self.teacher is not None:
            self.teacher.network.eval()
        loss_sum, seen = 0.0, 0
        bar = self._bar(len(batches), f"epoch {epoch + 1}/{config.epochs}")
        # A step's time includes fetching its batch.
        tic_step = self.clock()
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = None if y is None else y.to(self.device, non_blocking=True)
            loss = self._step(x, y, augment_rng)
            self.step_seconds, tic_step = self.clock() - tic_step, self.clock()
            batch = int(x.shape[0])
            loss_sum += loss * batch
            seen += batch
            if self.out_of_time:
                break
            if bar is not None:
                elapsed = max(self.clock() - tic, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.4f}",
                    img_s=f"{seen * context.world_size / elapsed:.0f}",
                )
        if bar is not None:
            bar.close()
        train_seconds = self.clock() - tic
        total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], context)
        top1 = self._validate()
        record = EpochRecord(
            epoch=epoch + 1,
            loss=round(total_loss / max(total_seen, 1.0), 6),
            val_top1=top1,
            seconds=round(self.clock() - tic, 3),
            images_per_second=round(total_seen / max(train_seconds, 1e-9), 1),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            images=int(total_seen),
            val_images=self._scored(),
        )
        shown = f", validation top-1 {top1:.2f}%" if top1 is not None else ""
        self._say(
            f"epoch {record.epoch}/{config.epochs}: loss {record.loss:.4f}{shown}, "
            f"{record.images_per_second:.0f} img/s, {record.seconds:.1f} s"
        )
        return record

    def _bar(self, total: int, description: str) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, unit="batch", leave=False, file=sys.stderr)

    def _views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        count = 1 + len(self.cohort.peers)
        if not self.augment:
            return [self._layout(x)] * count
        padding = self.config.crop_padding
        return [
            self._layout(augment_batch(x, generator, padding, self.config.flip))
            for _ in range(count)
        ]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` in the memory order the convolutions run fastest in (values unchanged)."""
        wanted = self.config.channels_last
        if x.dim() == 4 and (wanted or wanted is None):
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def _step(self, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator) -> float:
        config = self.config
        views = self._views(x, generator)
        with self._autocast():
            teacher_logits: torch.Tensor | None = None
            teacher_hints: list[torch.Tensor] = []
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits, teacher_hints = self.teacher(views[0])
            logits, hints = self.trained(views)
            if self.mutual:
                ensemble = torch.stack([out.float() for out in logits]).mean(0).detach()
                losses = [self._objective(out, ensemble, y) for out in logits]
                loss = torch.stack(losses).sum()
                student_loss = losses[0]
            else:
                loss = self._objective(logits[0], teacher_logits, y)
                if hints:
                    terms = [hint_loss(s, t) for s, t in zip(hints, teacher_hints, strict=True)]
                    loss = loss + config.hint_weight * torch.stack(terms).mean()
                student_loss = loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._trained_params, config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step(self.student, self._progress(self.scheduler.last_epoch + 1))
        if self.deadline.limited:
            self._spend_time()
        self.scheduler.step()
        value = float(student_loss.detach())
        if not math.isfinite(value):
            raise DataError(
                f"finetune: the loss became {value}; lower the learning rate (lr={config.lr})"
            )
        return value

    def _spend_time(self) -> None:
        """Update the budget fraction spent; every process adopts the slowest clock.

        The processes must agree, or they would use different learning rates and one would
        stop while another waits for its gradients.
        """
        budget = self.deadline.budget_s
        assert budget is not None
        # Earlier runs of a resumed training spent their part of the budget.
        spent = self.clock_before + self.deadline.spent()
        # Keep room for what follows the last step: its validation, a checkpoint, copying the
        # best weights and writing them back; and stop a step early rather than a step late.
        after = self.validation_seconds + self.checkpoint_seconds + 3 * self.state_seconds
        after += self.step_seconds
        fraction = self._slowest((spent + after) / max(budget, 1e-9))
        self.time_progress = min(1.0, fraction)
        self.out_of_time = fraction >= 1.0

    def _slowest(self, value: float) -> float:
        """The largest ``value`` over all processes."""
        if not self.context.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())

    def _require_minimum(self, resumed: bool) -> None:
        """Refuse a budget that cannot hold the run's minimum work, before any of it starts.

        The minimum: the validations the run makes whatever the budget (the teacher's top-1,
        the starting point's unless resumed, the last epoch's) and one training step. Both
        are estimated from the student's forward pass over one batch, timed after a warm-up:
        a lower bound (a training step also runs the backward pass, and the teacher is seldom
        smaller than the student), so a budget that would work is not refused.
        """
        has_teacher, distills = self.teacher_net is not None, self.teacher is not None
        passes = _validation_passes(self.val_data, has_teacher, distills, self.mutual, resumed)
        teacher_net = self.teacher_net
        self.student.eval()
        was_training = teacher_net.training if teacher_net is not None else False
        if teacher_net is not None:
            teacher_net.eval()
        try:
            work = _minimum_work(
                lambda x: self._predict(self.student, x),
                None if teacher_net is None else (lambda x: self._predict(teacher_net, x)),
                self.clock,
                self.train_data,
                self.val_data,
                self.config,
                passes,
                images=len(self._shard()) if sum(passes) else 0,
                students=1 + len(self.cohort.peers),
                distills=distills,
            )
        finally:
            self.student.train()
            if teacher_net is not None:
                teacher_net.train(was_training)
        need = self._slowest(work.seconds)
        needs = work.needs
        deadline = self.deadline
        if self.clock_before > 0:
            # What the resumed runs spent is gone from the budget.
            deadline = deadline.within(deadline.remaining() - self.clock_before)
        deadline.require(need, needs)

    def _objective(
        self, student: torch.Tensor, target: torch.Tensor | None, y: torch.Tensor | None
    ) -> torch.Tensor:
        """Distillation towards ``target`` logits and/or cross-entropy with labels ``y``."""
        config = self.config
        terms = []
        if target is not None:
            weight = config.alpha if y is not None else 1.0
            if weight > 0:
                terms.append(weight * distillation_loss(student, target, config.temperature))
        if y is not None:
            weight = 1.0 - config.alpha if target is not None else 1.0
            if weight > 0:
                terms.append(
                    weight
                    * F.cross_entropy(student.float(), y, label_smoothing=config.label_smoothing)
                )
        if not terms:
            return student.float().sum() * 0.0
        return torch.stack(terms).sum()

    # -- validation --------------------------------------------------------------------------

    def _predict(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            return _logits(network(self._layout(x.to(self.device)))).float().argmax(1).cpu()

    def _shard(self) -> torch.Tensor:
        """This process's validation images, in a fixed random order: a validation the time
        budget cuts short has scored a spread subset (validation data often comes sorted by
        class), not the first classes."""
        assert self.val_data is not None
        order = torch.randperm(len(self.val_data), generator=torch.Generator().manual_seed(0))
        return order[self.context.rank :: self.context.world_size]

    def _validate(self) -> float | None:
        """Top-1 of the student on the validation data, over all processes."""
        self.validation_images = None
        tic = self.clock()
        top1 = self._measure_top1()
        self.validation_seconds = max(self.validation_seconds, self.clock() - tic)
        return top1

    def _measure_top1(self) -> float | None:
        val = self.val_data
        if val is None:
            return None
        if (
            val.y is None
            and self.teacher is None
            and not (self.mutual and self.teacher_net is not None)
        ):
            return None
        index = self._shard()
        x = torch.from_numpy(val.x)[index]
        reference_net = self.teacher_net if val.y is None else None
        if reference_net is not None:
            was_training = reference_net.training
            reference_net.eval()
        self.student.eval()
        correct = seen = 0
        try:
            for start in range(0, len(index), self.config.eval_batch_size):
                if seen and self.deadline.expired():
                    break
                chunk = x[start : start + self.config.eval_batch_size]
                predicted = self._predict(self.student, chunk)
                if val.y is not None:
                    truth = torch.from_numpy(val.y)[index[start : start + len(chunk)]]
                else:
                    assert reference_net is not None
                    truth = self._predict(reference_net, chunk)
                correct += int((predicted == truth).sum())
                seen += len(chunk)
        finally:
            self.student.train()
            if reference_net is not None:
                reference_net.train(was_training)
        return self._top1_of(correct, seen, len(index))

    def _scored(self) -> int | None:
        """Images the last validation of the student scored (None: it did not run)."""
        scored, self.validation_images = self.validation_images, None
        return scored

    def _top1_of(self, correct: int, seen: int, images: int) -> float:
        """Top-1 over all processes of the ``seen`` of ``images`` validation images scored."""
        total_correct, total, planned = all_reduce_sum(
            [float(correct), float(seen), float(images)], self.context
        )
        self.validation_images = int(total)
        if total < planned:
            # The deadline passed during the validation: a top-1 on fewer images (a spread
            # subset, see _shard) beats running past the budget.
            self.validations_cut_short += 1
            logger.info("validation cut short by the time budget: %d of %d images", total, planned)
        return round(100.0 * total_correct / max(total, 1.0), 4)

    def _teacher_top1(self) -> float | None:
        val = self.val_data
        if val is None or val.y is None or self.teacher_net is None:
            return None
        index = self._shard()
        x = torch.from_numpy(val.x)[index]
        was_training = self.teacher_net.training
        self.teacher_net.eval()
        correct = seen = 0
        try:
            for start in range(0, len(index), self.config.eval_batch_size):
                if seen and self.deadline.expired():
                    break
                chunk = x[start : start + self.config.eval_batch_size]
                truth = torch.from_numpy(val.y)[index[start : start + len(chunk)]]
                correct += int((self._predict(self.teacher_net, chunk) == truth).sum())
                seen += len(chunk)
        finally:
            self.teacher_net.train(was_training)
        return self._top1_of(correct, seen, len(index))

    # -- checkpoints -------------------------------------------------------------------------

    def _checkpoint_payload(
        self,
        epochs_done: int,
        fingerprint: dict[str, Any],
        history: Sequence[EpochRecord],
        best: _Best,
    ) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "fingerprint": fingerprint,
            "epoch": epochs_done,
            "cohort": self.cohort.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
            "history": [record.as_dict() for record in history],
            "elapsed": self.clock_before + self.deadline.spent(),
            "validation_seconds": self.validation_seconds,
            "best": {"epoch": best.epoch, "top1": best.top1, "student": dict(best.state)},
        }

    def _restore(self, payload: dict[str, Any], fingerprint: dict[str, Any], path: Path) -> None:
        saved = payload.get("fingerprint", {})
        differ = sorted(key for key in fingerprint if saved.get(key) != fingerprint[key])
        if differ:
            raise PassConfigError(
                f"{path}: the checkpoint comes from a different run ({', '.join(differ)} "
                "differ); start without --resume or use another checkpoint folder"
            )
        self.cohort.load_state_dict(payload["cohort"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        rng = payload["rng"]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])


__all__ = [
    "EpochRecord",
    "FinetuneConfig",
    "FinetuneResult",
    "MinimumWork",
    "augment_batch",
    "distillation_loss",
    "finetune",
    "hint_loss",
    "minimum_work",
    "run_deadline",
]
