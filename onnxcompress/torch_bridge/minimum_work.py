"""The minimum work of a time-budgeted ``finetune`` run, estimated before it starts.

A budget that cannot hold the validations and one training step is refused up front.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from onnxcompress.data import Dataset
from onnxcompress.deadline import Clock
from onnxcompress.torch_bridge.distillation_networks import class_scores
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
from onnxcompress.torch_bridge.module import OnnxModule

# Forward passes timed to estimate a budgeted run's minimum work; the first one warms up
# (oneDNN builds its kernels for a new shape then), the fastest one counts.
MINIMUM_PROBES = 2


@dataclasses.dataclass
class MinimumWork:
    """What a ``finetune`` run must do whatever its budget, estimated before it starts.

    Attributes:
        seconds: the estimate, a lower bound.
        needs: what that is, in words, for a message.
    """

    seconds: float
    needs: str


def validation_passes(
    val: Dataset | None, has_teacher: bool, distills: bool, mutual: bool, resumed: bool = False
) -> tuple[int, int]:
    """(student, teacher) network passes over the validation data that every run makes: the
    teacher's top-1 (labelled data), the starting point's validation unless resumed and the
    last epoch's; without labels each validation also runs the reference (the teacher) whose
    predictions stand in for them (as ``Validation.student_top1``)."""
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


def estimate_minimum_work(
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
            return class_scores(module(x)).float().argmax(1).cpu()

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
    passes = validation_passes(val, has_teacher, distills, mutual)
    students = 1
    if mutual:
        students += config.peers if config.peers is not None else (0 if has_teacher else 1)
        students += int(has_teacher)
    return estimate_minimum_work(
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
