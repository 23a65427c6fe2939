"""Validation of a fine-tuning run: top-1 of the student and the teacher, the best epoch.

Scores within the run's deadline and over all processes; the best epoch's weights are kept.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn

from onnxcompress.data import Dataset
from onnxcompress.deadline import Deadline
from onnxcompress.torch_bridge.distillation_networks import class_scores
from onnxcompress.torch_bridge.distributed import DistributedContext, all_reduce_sum
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
from onnxcompress.torch_bridge.training_batches import in_fast_layout

# The training's messages keep the logger of the public entry: the CLI prints its name, and
# callers (benchmarks/resect.py) listen on it.
logger = logging.getLogger("onnxcompress.torch_bridge.train")


@dataclasses.dataclass
class BestEpoch:
    """The best epoch so far (0: the starting point) and the student's weights then."""

    epoch: int
    top1: float | None
    state: Mapping[str, torch.Tensor]


def clone_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in module.state_dict().items()}


def autocast_to(amp_dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    """Mixed precision on the GPU in ``amp_dtype``; None: full precision."""
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type="cuda", dtype=amp_dtype)


class Validation:
    """Scores networks on this process's shard of the validation data, within ``deadline``.

    Keeps what the run's time budget needs to know: how long a validation of the student
    takes, how many images the last one scored and how many the deadline cut short.
    """

    def __init__(
        self,
        val: Dataset | None,
        config: FinetuneConfig,
        context: DistributedContext,
        deadline: Deadline,
        amp_dtype: torch.dtype | None,
    ) -> None:
        self.val_data = val
        self.config = config
        self.context = context
        self.device = context.device
        self.deadline = deadline
        self.clock = deadline.clock
        self.amp_dtype = amp_dtype
        # The slowest validation of the student so far: what must still run after the last
        # step.
        self.seconds = 0.0
        # Images the last validation scored; validations the deadline cut short.
        self.images: int | None = None
        self.cut_short = 0

    def predict(self, network: nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), autocast_to(self.amp_dtype):
            x = in_fast_layout(x.to(self.device), self.config.channels_last)
            return class_scores(network(x)).float().argmax(1).cpu()

    def shard(self) -> torch.Tensor:
        """This process's validation images, in a fixed random order: a validation the time
        budget cuts short has scored a spread subset (validation data often comes sorted by
        class), not the first classes."""
        assert self.val_data is not None
        order = torch.randperm(len(self.val_data), generator=torch.Generator().manual_seed(0))
        return order[self.context.rank :: self.context.world_size]

    def student_top1(self, student: nn.Module, reference: nn.Module | None) -> float | None:
        """Top-1 of the student on the validation data, over all processes; without labels,
        agreement with ``reference``'s predictions (None without either)."""
        self.images = None
        tic = self.clock()
        top1 = self._measure_top1(student, reference)
        self.seconds = max(self.seconds, self.clock() - tic)
        return top1

    def _measure_top1(self, student: nn.Module, reference: nn.Module | None) -> float | None:
        val = self.val_data
        if val is None:
            return None
        if val.y is None and reference is None:
            return None
        index = self.shard()
        x = torch.from_numpy(val.x)[index]
        reference_net = reference if val.y is None else None
        if reference_net is not None:
            was_training = reference_net.training
            reference_net.eval()
        student.eval()
        correct = seen = 0
        try:
            for start in range(0, len(index), self.config.eval_batch_size):
                if seen and self.deadline.expired():
                    break
                chunk = x[start : start + self.config.eval_batch_size]
                predicted = self.predict(student, chunk)
                if val.y is not None:
                    truth = torch.from_numpy(val.y)[index[start : start + len(chunk)]]
                else:
                    assert reference_net is not None
                    truth = self.predict(reference_net, chunk)
                correct += int((predicted == truth).sum())
                seen += len(chunk)
        finally:
            student.train()
            if reference_net is not None:
                reference_net.train(was_training)
        return self._top1_of(correct, seen, len(index))

    def scored(self) -> int | None:
        """Images the last validation of the student scored (None: it did not run)."""
        scored, self.images = self.images, None
        return scored

    def _top1_of(self, correct: int, seen: int, images: int) -> float:
        """Top-1 over all processes of the ``seen`` of ``images`` validation images scored."""
        total_correct, total, planned = all_reduce_sum(
            [float(correct), float(seen), float(images)], self.context
        )
        self.images = int(total)
        if total < planned:
            # The deadline passed during the validation: a top-1 on fewer images (a spread
            # subset, see shard) beats running past the budget.
            self.cut_short += 1
            logger.info("validation cut short by the time budget: %d of %d images", total, planned)
        return round(100.0 * total_correct / max(total, 1.0), 4)

    def teacher_top1(self, teacher: nn.Module | None) -> float | None:
        """Top-1 of the teacher on labelled validation data (None otherwise)."""
        val = self.val_data
        if val is None or val.y is None or teacher is None:
            return None
        index = self.shard()
        x = torch.from_numpy(val.x)[index]
        was_training = teacher.training
        teacher.eval()
        correct = seen = 0
        try:
            for start in range(0, len(index), self.config.eval_batch_size):
                if seen and self.deadline.expired():
                    break
                chunk = x[start : start + self.config.eval_batch_size]
                truth = torch.from_numpy(val.y)[index[start : start + len(chunk)]]
                correct += int((self.predict(teacher, chunk) == truth).sum())
                seen += len(chunk)
        finally:
            teacher.train(was_training)
        return self._top1_of(correct, seen, len(index))
