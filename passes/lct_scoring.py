"""Validation scoring of the ``lct`` pass: a student's top-1 (agreement with the teacher without
labels) on evenly spread validation images, cut short when the pass's deadline passes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import Clock, Deadline

if TYPE_CHECKING:
    import torch

    from onnxcompress.data import Dataset
    from onnxcompress.torch_bridge.module import OnnxModule

# The pass's own logger, as before its modules were split: ``-v`` lines still name ``lct``.
logger = logging.getLogger("onnxcompress.passes.lct")

EVAL_BATCH = 256


class Scorer:
    """Top-1 of a torch-bridge module on the validation data (agreement with the teacher when
    the data has no labels).

    A limited count scores evenly spaced images, not the first ones: data sets are often sorted
    by class (an image folder is), and the first 500 CIFAR-10 images are all airplanes.
    """

    def __init__(
        self, teacher: ir.Model, val: Dataset, device: str | None, clock: Clock | None = None
    ) -> None:
        import torch

        from onnxcompress.torch_bridge.module import OnnxModule

        self.val = val
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher_module = OnnxModule(teacher, trainable="none").to(self.device)
        everything = np.arange(len(val))
        clock = clock if clock is not None else time.monotonic
        tic = clock()
        self.teacher_predictions = self._predict(teacher_module, everything)
        # What scoring the whole validation set costs (kept back from a time budget).
        self.full_seconds = clock() - tic
        self.labels = val.y if val.y is not None else self.teacher_predictions
        self.teacher_score = self._top1(self.teacher_predictions, everything)
        # Scorings a deadline ended before they had seen every image they were to score.
        self.cut_short = 0

    def module_of(self, model: ir.Model) -> OnnxModule:
        from onnxcompress.torch_bridge.module import OnnxModule

        return OnnxModule(model).to(self.device)

    def subset(self, limit: int | None) -> np.ndarray:
        from onnxcompress.data import spread_index

        return spread_index(len(self.val), limit)

    def _predict(self, module: torch.nn.Module, index: np.ndarray) -> np.ndarray:
        import torch

        module.eval()
        predictions: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, index.size, EVAL_BATCH):
                chunk = index[start : start + EVAL_BATCH]
                x = torch.from_numpy(np.ascontiguousarray(self.val.x[chunk])).to(self.device)
                output = module(x)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                predictions.append(output.float().argmax(1).cpu().numpy())
        return np.concatenate(predictions)

    def _top1(self, predictions: np.ndarray, index: np.ndarray) -> float:
        truth = np.asarray(self.labels)[index]
        return round(100.0 * float(np.mean(predictions == truth)), 4)

    def score(
        self,
        module: torch.nn.Module,
        limit: int | None = None,
        deadline: Deadline | None = None,
    ) -> float:
        """Top-1 on ``limit`` images (None: all); on fewer when ``deadline`` passes first (a
        spread subset: the images are scored in a fixed random order), counted in
        ``cut_short``."""
        return self.score_paired(module, limit, deadline)[0]

    def score_on_teacher_scale(
        self,
        module: torch.nn.Module,
        limit: int | None = None,
        deadline: Deadline | None = None,
    ) -> float:
        """``score`` moved onto the whole set's scale: the teacher's whole-set top-1 less what
        the student loses against the teacher on the images scored.

        A subset is easier or harder than the whole set: on ResNet-20 CIFAR-10 the teacher
        scores 87.40 on the 2,000 images a check takes and 87.86 on all 5,000, so a check read
        against the whole-set reference lost 0.46 points it never lost (the 0.5-point slack of
        the gradual schedule was all but spent before the student changed).
        """
        top1, teacher_top1 = self.score_paired(module, limit, deadline)
        return round(self.teacher_score - (teacher_top1 - top1), 4)

    def score_paired(
        self,
        module: torch.nn.Module,
        limit: int | None = None,
        deadline: Deadline | None = None,
    ) -> tuple[float, float]:
        """(student, teacher) top-1 on the same images: ``limit`` of them (None: all), fewer
        when ``deadline`` passes first (see ``score``)."""
        index = self.subset(limit)
        if deadline is None or not deadline.limited:
            student = self._top1(self._predict(module, index), index)
            return student, self._top1(self.teacher_predictions[index], index)
        index = index[np.random.default_rng(0).permutation(index.size)]
        predictions: list[np.ndarray] = []
        for start in range(0, index.size, EVAL_BATCH):
            if predictions and deadline.expired():
                index = index[:start]
                self.cut_short += 1
                logger.info("lct: scoring cut short by the time budget: %d images", start)
                break
            predictions.append(self._predict(module, index[start : start + EVAL_BATCH]))
        student = self._top1(np.concatenate(predictions), index)
        return student, self._top1(self.teacher_predictions[index], index)
