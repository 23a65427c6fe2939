"""``finetune`` as a step of a run: recover accuracy by distilling from the original model.

The training is ``torch_bridge.train.finetune``; this pass picks its teacher and the data that
selects the epoch, and keeps the whole step (data loading and the pipeline's checks) in budget.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import onnx_ir as ir
from onnx_ir.passes import PassResult

from onnxcompress.deadline import Deadline
from onnxcompress.errors import PassConfigError
from onnxcompress.passes.base import (
    CompressionPass,
    PassConfig,
    PassReport,
    expand_compact_weights,
)
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig

logger = logging.getLogger(__name__)

TEACHERS = ("original", "none")
SELECTIONS = ("last", "calibration", "validation")


def check_step_choices(teacher: object, select: object) -> None:
    """Raise PassConfigError for a ``teacher`` or ``select`` the step does not know."""
    if teacher not in TEACHERS:
        raise PassConfigError(
            f'finetune teacher = {teacher!r}: use "original" (distill from the input '
            'model) or "none" (labels only)'
        )
    if select not in SELECTIONS:
        raise PassConfigError(
            f'finetune select = {select!r}: keep the "last" epoch, or the best on '
            '"calibration" or "validation" data'
        )


@dataclasses.dataclass
class FinetuneOptions(FinetuneConfig, PassConfig):
    """The options of a finetune step: ``FinetuneConfig``'s, and what it trains against.

    Attributes:
        seed: as ``FinetuneConfig.seed``; None: the run's seed.
        teacher: ``original`` (distill from the model the run started from) or ``none``
            (labels only).
        select: which epoch is kept: the ``last`` (default), or the best on the run's
            ``calibration`` or ``validation`` data. Picking on the validation data biases the
            accuracy the report gives, and calibration data is often part of the training data.
    """

    # A step's seed is the run's unless it names one (``compress --seed``).
    seed: int | None = None  # type: ignore[assignment]
    teacher: str = "original"
    select: str = "last"

    def validate(self) -> None:
        super().validate()
        check_step_choices(self.teacher, self.select)

    def training_config(self, run_seed: int) -> FinetuneConfig:
        """The ``FinetuneConfig`` these options describe, with ``run_seed`` standing in."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(FinetuneConfig)}
        values["seed"] = run_seed if self.seed is None else self.seed
        return FinetuneConfig(**values)


class Finetune(CompressionPass[FinetuneOptions]):
    """Train the model on the run's training data, distilling from the original model.

    The step's time budget (``time_budget_s``) starts before its training data loads and keeps
    back what the pipeline's checks after the step take (``PassContext.checks_seconds``): the
    whole step keeps it. The result's training history is the report's summary.
    """

    name = "finetune"
    summary_line = "recover accuracy: distill from the original in the torch bridge"
    config_class = FinetuneOptions
    needs_data = True
    needs_training_data = True
    compresses = False
    joins_previous_stage = True

    def call(self, model: ir.Model) -> PassResult:
        # Not CompressionPass.call: the training data is the run's training set, not the
        # calibration batch, and the report is the training result.
        deadline = Deadline(self.cfg.time_budget_s, label=self.name)
        config = self.cfg.training_config(self.context.seed)
        self.report = PassReport(
            self.name, {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
        )
        context = self.context
        original = context.original if context.original is not None else model
        # Loaded once per run (the pipeline loads it at the start of the step, and says so).
        train = context.train_set(original, fallback=None)
        if train is None:
            raise PassConfigError(
                f"a {self.name} step needs training data: give --train-data SPEC (or [data] train)"
            )
        selection = None
        if self.cfg.select == "calibration" and context.calibration is not None:
            selection = context.calibration_set(context.calibration_spec or "calibration data")
        elif self.cfg.select == "validation":
            selection = context.validation_set(original, fallback=None)
        if deadline.limited:
            # The step began before this call when the pipeline loaded its data first.
            begun = 0.0 if context.step_started is None else deadline.started - context.step_started
            deadline = deadline.within(deadline.remaining() - begun - context.checks_seconds)
        teacher = None if self.cfg.teacher == "none" else original
        # The report's seconds are the training's (the data load is the run's, shared).
        start = time.perf_counter()
        expand_compact_weights(model, self.report, self.name)
        from onnxcompress.torch_bridge.train import finetune

        result = finetune(
            model,
            teacher,
            train,
            selection,
            config,
            progress=context.progress,
            deadline=deadline,
        )
        # In place: the model keeps its identity and takes the trained graph.
        model.graph = result.model.graph
        model.functions.clear()
        model.functions.update(result.model.functions)
        self.report.modified = True
        self.report.summary = result.as_dict()
        self.report.seconds = time.perf_counter() - start
        return PassResult(model, modified=True)
