"""The training runs of the ``resect`` pass under its time budget: each stage's layer-level and
overall learning and the final distillation, each given its share of the time that is left.

``WorkTimes`` holds what the pass measured of its repeated work (validations, trial cuts): what
the budget keeps back for the work still to come.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import BudgetTooShortError, Deadline
from onnxcompress.graph.resection import Resection, shared_feature_maps

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.passes.base import PassContext, PassReport
    from onnxcompress.passes.resect import ResectConfig

# Under a time budget the final distillation is skipped when less than this is left: a
# run that short ends before its first validation.
MIN_FINAL_SECONDS = 2.0
# Epochs planned for a final distillation that runs to the end of the time budget: the
# measured training speed's estimate times this margin (the clock stops the run first), or
# this many when nothing measured the speed yet.
FINAL_EPOCHS_MARGIN = 1.5
FINAL_EPOCHS_UNTIMED = 1000
# Under a time budget a stage's training run gets at least this many times its minimum (its
# validations and one step) while what is left holds it: as much time to train as to validate.
RUN_MARGIN = 2.0
# Kept back at the end of a budget for the report's sizes and handing the graph back.
FINISH_SECONDS = 1.0


@dataclasses.dataclass
class WorkTimes:
    """Seconds of the pass's repeated work, measured as it runs.

    Attributes:
        validation: the slowest validation so far (the machine's load may change): what is
            kept back for each validation that must follow.
        trial: the slowest trial cut (with its bridge fit and logits) of the rankings so far.
        stage: the wall time of the last stage (re-ranking, cuts, training, validations); 0
            before the first.
    """

    validation: float = 0.0
    trial: float = 0.0
    stage: float = 0.0

    def stage_minimum(self) -> float:
        """Seconds a stage needs at the least: a cut with its bridge fit (about a trial cut of
        the ranking), its validation, the final validation and handing the model back."""
        return self.trial + 2 * self.validation + FINISH_SECONDS


class StageTraining:
    """The training runs of one resect pass, through ``finetune`` within the pass's deadline.

    Args:
        cfg: the pass's options.
        context: the pass's context (seed, progress).
        deadline: the pass's deadline.
        times: the pass's measured work (its validations).
        say: the pass's progress lines.

    Attributes:
        planned_epochs: training epochs the pass still expects, counted from the start, for
            sharing ``time_budget_s`` (the pass plans them).
        spent_epochs: epochs of the runs started so far.
        throughput: the whole-network training speed (images/s) last measured, or None.
        skipped: why the last run that was skipped could not hold its minimum.
        reserve_s: seconds at the end of the budget kept for the final distillation: the
            stages' training runs share only what lies before them.
    """

    def __init__(
        self,
        cfg: ResectConfig,
        context: PassContext,
        deadline: Deadline,
        times: WorkTimes,
        say: Callable[[str], None],
    ) -> None:
        self.cfg = cfg
        self.context = context
        self._deadline = deadline
        self._times = times
        self._say = say
        self.planned_epochs = 0
        self.spent_epochs = 0
        self.throughput: float | None = None
        self.skipped = ""
        self.reserve_s = 0.0
        self._floor: float | None = None

    def time_left(self, validations: int = 2, final: bool = False) -> float | None:
        """Seconds left for training (None: no budget), keeping back the ``validations`` that
        follow (a stage's after its training, and the final one) and handing the model back;
        for a stage (not ``final``) also the final distillation's share."""
        if not self._deadline.limited:
            return None
        kept = validations * self._times.validation + FINISH_SECONDS
        return self._deadline.remaining() - kept - (0.0 if final else self.reserve_s)

    def _budget(self, epochs: int, floor: float = 0.0, runs_after: int = 0) -> float | None:
        """A stage run's share of what is left of ``time_budget_s``: in proportion to the
        planned epochs, but at least ``RUN_MARGIN`` times the run's minimum ``floor`` (its
        validations and a step), as far as what is left holds that for this run and the
        ``runs_after`` it in the stage: a run that cannot do its validations and train too is
        wasted, while the final distillation can run shorter."""
        left = self.time_left()
        if left is None:
            return None
        left = max(left, 1.0)
        remaining_epochs = max(self.planned_epochs - self.spent_epochs, epochs)
        share = left * epochs / remaining_epochs
        return max(1.0, share, min(RUN_MARGIN * floor, left / (runs_after + 1)))

    def _run_floor(
        self, student: ir.Model, teacher: ir.Model, train: Dataset, val: Dataset, config: Any
    ) -> float:
        """The minimum of a stage's training run (``finetune``'s estimate), measured once: the
        runs of every stage validate on the same data with the same teacher."""
        if self._floor is None:
            from onnxcompress.torch_bridge.minimum_work import minimum_work

            deadline = self._deadline
            with deadline.phase("estimate"):
                work = minimum_work(student, teacher, train, val, config, deadline.clock)
            self._floor = work.seconds
        return self._floor

    def _finetune(
        self,
        student: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        val: Dataset,
        epochs: int,
        budget_s: float | None = None,
        runs_after: int = 0,
        **options: Any,
    ) -> Any:
        """A training run through ``finetune``, within the pass's deadline (``budget_s``: its
        budget; default: its share, see ``_budget``); None when what it gets cannot hold its
        minimum (``skipped`` says why)."""
        from onnxcompress.torch_bridge.finetune_config import finetune_config_from
        from onnxcompress.torch_bridge.train import finetune

        # Every caller sets lr (overall, layer-level or final) and hint_weight where it hints.
        config = finetune_config_from(self.cfg, epochs=epochs, seed=self.context.seed, **options)
        budget = budget_s
        if budget is None and self._deadline.limited:
            floor = self._run_floor(student, teacher, train, val, config)
            budget = self._budget(epochs, floor, runs_after)
        config.time_budget_s = budget if budget is None else max(budget, 1e-3)
        self.spent_epochs += epochs
        try:
            result = finetune(
                student,
                teacher,
                train,
                val,
                config,
                progress=self.context.progress,
                deadline=self._deadline,
            )
        except BudgetTooShortError as exc:
            # The stage goes on untrained (and is likely undone by max_drop).
            self.skipped = str(exc)
            self._say(f"resect: training skipped: {exc}")
            return None
        speeds = [r.images_per_second for r in result.history if r.images_per_second]
        if speeds and options.get("trainable", "all") == "all":
            # Whole-network training speed: what the final distillation will run at.
            self.throughput = float(np.median(speeds))
        return result

    def train_stage(
        self,
        student: ir.Model,
        teacher: ir.Model,
        cuts: list[Resection],
        train: Dataset | None,
        val: Dataset,
        record: dict[str, Any],
        stage: int,
    ) -> ir.Model:
        """A stage's layer-level learning, then its overall learning, of ``student``; each
        run's history (or why it was skipped) goes into ``record``."""
        cfg = self.cfg
        if train is None or not cfg.trains:
            return student
        # Several cuts in one stage: one cut's neighbours (or hinted tensor) may be what
        # another cut of the stage removed.
        student_inputs = {v.name for v in student.graph.inputs}
        nodes = {n.name for n in student.graph}
        produced = {v.name for n in student.graph for v in n.outputs}
        pairs = tuple(
            (c.teacher_tensor, c.student_tensor)
            for c in cuts
            if c.student_tensor not in student_inputs and c.student_tensor in produced
        )
        trainable = tuple(
            dict.fromkeys(name for c in cuts for name in c.neighbours if name in nodes)
        )
        if cfg.layer_epochs > 0 and pairs and trainable:
            result = self._finetune(
                student,
                teacher,
                train,
                val,
                cfg.layer_epochs,
                runs_after=int(cfg.epochs > 0),
                loss="hint",
                hint_tensors=pairs,
                hint_weight=cfg.hint_weight,
                trainable=trainable,
                lr=cfg.layer_lr,
            )
            if result is None:
                record["layer_learning"] = {"skipped": self.skipped}
            else:
                student = result.model
                record["layer_learning"] = self._history(result)
                self._say(
                    f"stage {stage}: layer-level learning of {len(trainable)} layers, loss "
                    f"{record['layer_learning']['loss']}, validation top-1 {result.best_top1}"
                )
        if cfg.epochs > 0:
            result = self._finetune(student, teacher, train, val, cfg.epochs, loss="kd", lr=cfg.lr)
            if result is None:
                record["overall_learning"] = {"skipped": self.skipped}
            else:
                student = result.model
                record["overall_learning"] = self._history(result)
                self._say(
                    f"stage {stage}: overall learning, loss {record['overall_learning']['loss']}, "
                    f"validation top-1 {result.best_top1}"
                )
        return student

    def final(
        self,
        current: ir.Model,
        teacher: ir.Model,
        train: Dataset | None,
        val: Dataset,
        report: PassReport,
    ) -> ir.Model:
        """The final distillation of ``current``, with all that the stages left of the budget;
        its history goes into the report's summary."""
        cfg = self.cfg
        if train is None:
            return current
        epochs, budget = max(cfg.final_epoch_count, 1), self.time_left(validations=1, final=True)
        if budget is not None:
            if budget < MIN_FINAL_SECONDS:
                self._say(f"final distillation skipped: {max(budget, 0):.0f} s of the budget left")
                return current
            # Enough epochs that the clock, not the step count, ends the run and drives the
            # learning-rate schedule: the final distillation is where accuracy comes back.
            images = min(cfg.epoch_samples or len(train), len(train))
            if self.throughput is None:
                epochs = max(epochs, FINAL_EPOCHS_UNTIMED)
            else:
                expected = budget * self.throughput / images
                epochs = max(epochs, int(np.ceil(expected * FINAL_EPOCHS_MARGIN)) + 1)
        options: dict[str, Any] = {"loss": "kd", "lr": cfg.final_lr or cfg.lr}
        hints = shared_feature_maps(teacher, current) if cfg.final_hint_weight > 0 else []
        if hints:
            options.update(
                loss="hint", hint_tensors=tuple(hints), hint_weight=cfg.final_hint_weight
            )
        self._say(
            f"final distillation: up to {epochs} epochs"
            + (f" in {budget:.0f} s" if budget is not None else "")
            + (f", hints at {', '.join(t for t, _ in hints)}" if hints else "")
        )
        result = self._finetune(current, teacher, train, val, epochs, budget_s=budget, **options)
        if result is None:
            report.summary["final_learning"] = {"skipped": self.skipped}
            return current
        report.summary["final_learning"] = self._history(result)
        report.summary["final_learning"]["epochs"] = len(result.history) - 1
        report.summary["final_learning"]["budget_s"] = None if budget is None else round(budget, 1)
        report.summary["final_learning"]["curve"] = [r.val_top1 for r in result.history]
        if hints:
            report.summary["final_learning"]["hints"] = [t for t, _ in hints]
        self._say(f"final distillation: validation top-1 {result.best_top1}")
        model: ir.Model = result.model
        return model

    @staticmethod
    def _history(result: Any) -> dict[str, Any]:
        last = result.history[-1]
        return {
            "loss": last.loss,
            "best_epoch": result.best_epoch,
            "best_top1": result.best_top1,
            "seconds": round(result.seconds, 1),
        }


__all__ = ["StageTraining", "WorkTimes"]
