"""The training runs of the ``lct`` pass: the staged schedule (stage by stage, each backed off on
rejection) or the gradual one, then the final fine-tune, each within its share of the time budget.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from onnxcompress.deadline import BudgetTooShortError, Deadline
from onnxcompress.passes.lct_layers import Layer
from onnxcompress.passes.lct_projection import GradualProjector, Projector
from onnxcompress.passes.lct_scoring import Scorer

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.passes.base import PassContext, PassReport
    from onnxcompress.passes.lct import LctConfig
    from onnxcompress.torch_bridge.module import OnnxModule

# The pass's own logger, as before its modules were split: ``-v`` lines still name ``lct``.
logger = logging.getLogger("onnxcompress.passes.lct")

# An attempt with less training time than this is not started (the budget is spent): the
# trainer's own setup (building the networks, timing its minimum work) takes about a second of
# it on the 2-core CPU, more under load, and an attempt refused for want of one step wastes it.
MIN_ATTEMPT_SECONDS = 3.0
# Under a time budget the gradual ramp's checks (scoring ``check_samples`` images each) take at
# most this share of its time; fewer checks are run when ``checks`` would take more.
CHECK_SHARE = 0.25


class LctTraining:
    """The training runs of one ``lct`` pass, through ``finetune`` within the pass's deadline.

    Args:
        cfg: the pass's options.
        context: the pass's context (seed, progress).
        deadline: the pass's deadline.
        report: the pass's report (a cut in the gradual ramp's checks is noted in its summary).
        finish_seconds: kept back at the end of the budget for writing the result.
    """

    def __init__(
        self,
        cfg: LctConfig,
        context: PassContext,
        deadline: Deadline,
        report: PassReport,
        finish_seconds: float,
    ) -> None:
        self.cfg, self.context = cfg, context
        self._deadline, self._report, self._finish_seconds = deadline, report, finish_seconds

    def _training_share(self, scorer: Scorer) -> float | None:
        """Seconds for the stages or the ramp, with their scoring (None: no budget):
        ``1 - final_share`` of what is left after the write-out, but at least one attempt
        (``MIN_ATTEMPT_SECONDS`` and its scoring) when what is left holds one."""
        if not self._deadline.limited:
            return None
        left = self._deadline.remaining() - self._finish_seconds
        least = min(left, scorer.full_seconds + MIN_ATTEMPT_SECONDS)
        return max(left * (1.0 - self.cfg.final_share), least, 0.0)

    def train_stages(
        self,
        model: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: Scorer,
        stages: list[list[Layer]],
        lowrank: bool,
        reference: float,
    ) -> tuple[Accepted | None, list[dict[str, Any]], str | None]:
        """Collapse the stages in order, backing off on rejection, then fine-tune at the end.

        Returns the accepted student (None when nothing met the budget), one record per
        attempt (the final fine-tune's has ``stage="final"``), and why the stages stopped early
        (None when every stage ran).
        """
        cfg = self.cfg
        # The stages' share of what is left; the final fine-tune gets what they leave.
        stage_deadline = self._deadline.within(self._training_share(scorer), label="lct stages")
        every = [layer for stage in stages for layer in stage]
        accepted: Accepted | None = None
        # The last accepted model that was within max_drop by itself: the fallback.
        within: Accepted | None = None
        within_stage = 0
        student = model
        history: list[dict[str, Any]] = []
        stopped: str | None = None
        scoring = scorer.full_seconds
        for number, stage in enumerate(stages, start=1):
            for layer in stage:
                layer.stage = number
            increment = 1.0
            for retry in range(cfg.retries + 1):
                budget: float | None = None
                spent = (
                    f"the stages' share of time_budget_s={cfg.time_budget_s} was spent before "
                    f"stage {number} (attempt {retry + 1})"
                )
                if stage_deadline.limited:
                    # What is left, shared by the stages left (retries eat into later stages),
                    # less the scoring that follows the training; when the stages left do not
                    # all fit, shared by as many as do (the later ones will not run).
                    left = stage_deadline.remaining()
                    fit = int(left // (scoring + MIN_ATTEMPT_SECONDS))
                    if fit == 0 and not history and left > scoring:
                        fit = 1  # the one attempt the budget was checked to hold
                    share = min(len(stages) - number + 1, fit)
                    if share < 1:
                        stopped = spent
                        break
                    budget = left / share - scoring
                goal = {layer.node: min(1.0, layer.level + increment) for layer in stage}
                fixed = [layer for layer in every if layer.level > 0 and layer.node not in goal]
                config = cfg.finetune_config(budget)
                projector = Projector(fixed, goal, stage, cfg.ramp, lowrank)
                attempt = self._attempt(
                    student, teacher, train, scorer, config, projector, len(history) + 1
                )
                if attempt is None:
                    stopped = spent
                    break
                # The slowest scoring so far is kept back for the next (the load may change).
                result, top1, seconds = attempt
                scoring = max(scoring, seconds)
                ok = top1 >= reference - cfg.max_drop - cfg.stage_slack
                logger.info(
                    "lct stage %d/%d attempt %d (%d layers, increment %.3g): top-1 %.2f vs "
                    "%.2f -> %s",
                    number,
                    len(stages),
                    retry + 1,
                    len(stage),
                    increment,
                    top1,
                    reference,
                    "kept" if ok else "rejected",
                )
                if ok:
                    for layer in stage:
                        layer.level = goal[layer.node]
                    accepted = Accepted(result.module, result.model, top1, every)
                    student = result.model
                    if top1 >= reference - cfg.max_drop:
                        within, within_stage = accepted, number
                history.append(
                    {
                        "stage": number,
                        "attempt": retry + 1,
                        "increment": increment,
                        "layers": [layer.node for layer in stage],
                        "top1": top1,
                        "reference_top1": reference,
                        "accepted": ok,
                        "accepted_top1": accepted.top1 if accepted else reference,
                        "steps": projector.steps,
                        "seconds": round(result.seconds, 1),
                    }
                )
                if ok:
                    break
                increment /= 2.0
            if stopped is not None:
                logger.info("lct: %s", stopped)
                break
        if accepted is not None:
            accepted = self._final(
                accepted, teacher, train, scorer, every, lowrank, reference, history
            )
        if accepted is None or accepted.top1 < reference - cfg.max_drop:
            # Nothing after the last model within budget held up: fall back to it.
            if accepted is not None and within is not None:
                self._report.notes.append(
                    f"lct kept stage {within_stage} (top-1 {within.top1:.2f}), the last one "
                    f"within max_drop={cfg.max_drop}: the run ended at top-1 "
                    f"{accepted.top1:.2f}, {reference - accepted.top1:.2f} points below the "
                    f"original's {reference:.2f}"
                )
            accepted = within
            if within is not None:
                within.restore(every)
            else:
                for layer in every:
                    layer.level = 0.0
        return accepted, history, stopped

    def train_gradual(
        self,
        model: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: Scorer,
        layers: list[Layer],
        lowrank: bool,
        reference: float,
    ) -> tuple[Accepted | None, list[dict[str, Any]], str | None]:
        """A projected fine-tune with every layer on its own cubic ramp, checked along the way,
        then a recovery fine-tune at the levels reached.

        Returns the student (when it ends more than ``max_drop`` below the original: the
        weights of the best check on the way, ``GradualProjector.keep``, if they are within it
        on the whole validation set, else None), one record per check plus one for the end of
        the ramp, one for the recovery (and one for the fallback), and why the schedule ended
        short or the result is not its end (None when neither).
        """
        cfg = self.cfg
        ranked = sorted(layers, key=lambda layer: layer.significance)
        for layer in ranked:
            layer.stage = 1
        floor = reference - cfg.max_drop - cfg.stage_slack
        deadline = self._deadline

        def check(module: OnnxModule) -> float:
            # On the whole set's scale: the floor and keep_above are whole-set numbers, and
            # the check's images are a subset (Scorer.score_on_teacher_scale).
            top1 = scorer.score_on_teacher_scale(module, cfg.check_samples, self._deadline)
            module.train()
            return top1

        budget = None
        checks = cfg.checks
        ramp_epochs, final_epochs = cfg.gradual_epochs()
        ramp = self._training_share(scorer)
        if ramp is not None:
            # The ramp's share, less the whole-set scoring at its end; the recovery gets what
            # is left.
            budget = max(ramp - scorer.full_seconds, 1e-3)
            # The checks run inside the ramp's time: no more than CHECK_SHARE of it.
            check_seconds = scorer.full_seconds * min(cfg.check_samples, len(scorer.val))
            check_seconds /= max(len(scorer.val), 1)
            fit = int(CHECK_SHARE * budget / max(check_seconds, 1e-12))
            if fit < checks:
                checks = max(1, fit)
                self._report.summary["checks"] = {
                    "planned": cfg.checks,
                    "run": checks,
                    "why": f"{CHECK_SHARE:.0%} of the ramp's {budget:.0f} s holds {fit} checks "
                    f"of ~{check_seconds:.1f} s",
                }
        # The ramp is a fine-tune of its own (its progress 0..1 is the schedule's), so that
        # the recovery can restart its learning rate.
        projector = GradualProjector(
            ranked,
            1.0,
            cfg.stagger,
            checks,
            lowrank,
            check,
            floor,
            keep_above=reference - cfg.max_drop,
            clock=deadline.clock,
        )
        config = cfg.finetune_config(budget, epochs=ramp_epochs)
        attempt = self._attempt(model, teacher, train, scorer, config, projector, 1)
        if attempt is None:
            for layer in ranked:
                layer.level = 0.0
            return None, projector.history, f"time_budget_s={cfg.time_budget_s} was spent"
        result, top1, _ = attempt
        for layer, level in zip(ranked, projector.levels(), strict=True):
            layer.level = level
        history = projector.history
        for record in history:
            record.update(reference_top1=reference, floor=floor)
        within = top1 >= reference - cfg.max_drop
        logger.info(
            "lct gradual: top-1 %.2f vs %.2f at the end of the ramp (%s) in %.0f s",
            top1,
            reference,
            "within max_drop" if within else "beyond max_drop",
            deadline.spent(),
        )
        history.append(
            {
                "stage": "end",
                "attempt": 1,
                "increment": round(projector.share(), 4),
                "layers": [layer.node for layer in ranked if layer.accepted],
                "top1": top1,
                "reference_top1": reference,
                "accepted": within,
                "accepted_top1": top1 if within else reference,
                "steps": projector.steps,
                "seconds": round(result.seconds, 1),
            }
        )
        accepted = Accepted(result.module, result.model, top1, ranked)
        if any(layer.accepted for layer in ranked):
            accepted = self._final(
                accepted,
                teacher,
                train,
                scorer,
                ranked,
                lowrank,
                reference,
                history,
                epochs=final_epochs,
            )
        if accepted.top1 >= reference - cfg.max_drop:
            return accepted, history, projector.halted
        missed = (
            f"the run ended at top-1 {accepted.top1:.2f}, {reference - accepted.top1:.2f} points "
            f"below the original's {reference:.2f} (max_drop={cfg.max_drop})"
        )
        if projector.snapshot is not None:
            return self._gradual_fallback(result, projector, scorer, reference, history, missed)
        for layer in ranked:
            layer.level = 0.0
        self._report.summary["fallback"] = None
        stopped = (
            f"{missed}, and no check on the way passed (top-1 at or above {floor:.2f}) to fall "
            "back to: the model is left as it was"
        )
        return None, history, _joined(projector.halted, stopped)

    def train_fitted(
        self,
        model: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: Scorer,
        layers: list[Layer],
        reference: float,
    ) -> tuple[Accepted | None, list[dict[str, Any]], str | None]:
        """The ``fit`` schedule's training: ``model`` already has every layer at its rank
        (``lct_fit``); it is scored, then distilled at those ranks for the rest of the budget
        (or ``epochs``), the better of the two kept. None when that ends more than ``max_drop``
        below the original (nothing on the way held either: there is no way between)."""
        cfg = self.cfg
        for layer in layers:
            layer.level, layer.stage = 1.0, 1
        module = scorer.module_of(model)
        top1 = scorer.score_on_teacher_scale(module, deadline=self._deadline)
        logger.info("lct fit: top-1 %.2f vs %.2f before training", top1, reference)
        history: list[dict[str, Any]] = [
            {
                "stage": "fit",
                "attempt": 1,
                "increment": 1.0,
                "layers": [layer.node for layer in layers],
                "top1": top1,
                "reference_top1": reference,
                "accepted": top1 >= reference - cfg.max_drop,
                "accepted_top1": top1,
                "steps": 0,
                "seconds": 0.0,
            }
        ]
        accepted = Accepted(module, model, top1, layers)
        accepted = self._final(
            accepted, teacher, train, scorer, layers, True, reference, history, epochs=cfg.epochs
        )
        if accepted.top1 >= reference - cfg.max_drop:
            return accepted, history, None
        for layer in layers:
            layer.level = 0.0
        return (
            None,
            history,
            f"the run ended at top-1 {accepted.top1:.2f}, {reference - accepted.top1:.2f} "
            f"points below the original's {reference:.2f} (max_drop={cfg.max_drop}); the "
            "model is left as it was",
        )

    def _gradual_fallback(
        self,
        result: Any,
        projector: GradualProjector,
        scorer: Scorer,
        reference: float,
        history: list[dict[str, Any]],
        missed: str,
    ) -> tuple[Accepted | None, list[dict[str, Any]], str | None]:
        """The weights of the best check on the way (``GradualProjector.keep``), scored again on
        the whole validation set (the check scored ``check_samples`` of it): the result if they
        are within ``max_drop`` there. What was kept, and why, goes to the console (a note) and
        to the report (``fallback`` in the summary)."""
        assert projector.snapshot is not None
        cfg = self.cfg
        at, state, check_top1 = projector.snapshot
        result.model, result.module = result.model_from_state(state)
        top1 = scorer.score_on_teacher_scale(result.module, deadline=self._deadline)
        within = top1 >= reference - cfg.max_drop
        share = projector.share(at)
        for layer, level in zip(projector.ranked, projector.levels(at), strict=True):
            layer.level = level if within else 0.0
        logger.info(
            "lct gradual: fallback to the check at %.0f%% of the schedule: top-1 %.2f (%s)",
            100 * share,
            top1,
            "kept" if within else "beyond max_drop too",
        )
        history.append(
            {
                "stage": "fallback",
                "attempt": 1,
                "increment": round(share, 4),
                "layers": [layer.node for layer in projector.ranked if layer.accepted],
                "top1": top1,
                "reference_top1": reference,
                "accepted": within,
                "accepted_top1": top1 if within else reference,
                "steps": 0,
                "seconds": 0.0,
            }
        )
        which = (
            "the furthest check within max_drop"
            if projector.keep_above is not None and check_top1 >= projector.keep_above
            else "the best-scoring check that passed"
        )
        point = (
            f"{which}, at {100 * share:.0f}% of the schedule (top-1 {check_top1:.2f} on its "
            f"check, {top1:.2f} on the whole validation set)"
        )
        self._report.summary["fallback"] = {
            "schedule_share": round(share, 4),
            "check_top1": check_top1,
            "top1": top1,
            "kept": within,
        }
        if not within:
            stopped = f"{missed}, and {point} is beyond it too: the model is left as it was"
            return None, history, _joined(projector.halted, stopped)
        stopped = f"{missed}; the result is {point}"
        self._report.notes.append(f"lct kept {point}: {missed}")
        accepted = Accepted(result.module, result.model, top1, projector.ranked)
        return accepted, history, _joined(projector.halted, stopped)

    def _attempt(
        self,
        student: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: Scorer,
        config: Any,
        projector: Projector,
        number: int,
    ) -> tuple[Any, float, float] | None:
        """One projected fine-tune from ``student``: (result, validation top-1, scoring s), or
        None when what is left of the time budget cannot hold its minimum (one step)."""
        import torch

        from onnxcompress.torch_bridge.train import finetune
        from onnxcompress.torch_bridge.writeback import write_back

        # Each attempt draws its own images and augmentations (epoch_samples subsets).
        config.seed = self.context.seed * 1009 + number
        clock = self._deadline.clock
        try:
            result = finetune(
                student,
                teacher,
                train,
                None,
                config,
                progress=self.context.progress,
                after_step=projector,
                # Never past the pass's deadline, whatever share the attempt was given.
                deadline=self._deadline,
            )
        except BudgetTooShortError as exc:
            logger.info("lct: attempt %d not started: %s", number, exc)
            return None
        with torch.no_grad():
            projector.finish(result.module)
        write_back(result.model, result.module)
        tic = clock()
        top1 = scorer.score_on_teacher_scale(result.module, deadline=self._deadline)
        return result, top1, clock() - tic

    def _final(
        self,
        accepted: Accepted,
        teacher: ir.Model,
        train: Dataset,
        scorer: Scorer,
        every: list[Layer],
        lowrank: bool,
        reference: float,
        history: list[dict[str, Any]],
        epochs: int | None = None,
    ) -> Accepted:
        """Fine-tune the accepted model at its constraints; the better of before and after.

        ``epochs`` (without a time budget): default ``final_epochs``."""
        cfg, deadline = self.cfg, self._deadline
        epochs = cfg.final_epochs if epochs is None else epochs
        budget: float | None = None
        if deadline.limited:
            if cfg.final_share <= 0.0:
                return accepted
            # Keep back its scoring, a second one for a gradual run's fallback, and the
            # write-out.
            scorings = 2 if cfg.schedule == "gradual" else 1
            keep = scorings * scorer.full_seconds + self._finish_seconds
            budget = deadline.remaining() - keep
            if budget < MIN_ATTEMPT_SECONDS:
                return accepted
        elif epochs == 0:
            return accepted
        held = [layer for layer in every if layer.level > 0]
        projector = Projector(held, {}, every, 0.0, lowrank)
        config = cfg.finetune_config(budget, final=True, epochs=epochs)
        attempt = self._attempt(
            accepted.model, teacher, train, scorer, config, projector, len(history) + 1
        )
        if attempt is None:
            return accepted
        result, top1, _ = attempt
        better = top1 >= accepted.top1
        logger.info(
            "lct final fine-tune: top-1 %.2f (before %.2f, reference %.2f) -> %s",
            top1,
            accepted.top1,
            reference,
            "kept" if better else "the model before it is kept",
        )
        history.append(
            {
                "stage": "final",
                "attempt": 1,
                "increment": 0.0,
                "layers": [layer.node for layer in held],
                "top1": top1,
                "reference_top1": reference,
                "accepted": better,
                "accepted_top1": max(top1, accepted.top1),
                "steps": projector.steps,
                "seconds": round(result.seconds, 1),
            }
        )
        if not better:
            return accepted
        return Accepted(result.module, result.model, top1, every)


def _joined(*reasons: str | None) -> str | None:
    """The reasons given, in one line (None when there are none)."""
    given = [reason for reason in reasons if reason]
    return "; ".join(given) if given else None


class Accepted:
    """An accepted student, its validation top-1 and every layer's level when it was accepted."""

    def __init__(
        self, module: OnnxModule, model: ir.Model, top1: float, layers: Sequence[Layer]
    ) -> None:
        self.module, self.model, self.top1 = module, model, top1
        self.levels: dict[str, float] = {layer.node: layer.level for layer in layers}

    def restore(self, layers: Sequence[Layer]) -> None:
        """Put every layer back at the level it had in this model."""
        for layer in layers:
            layer.level = self.levels.get(layer.node, 0.0)


def split_stages(layers: list[Layer], stages: int, lowrank: bool) -> list[list[Layer]]:
    """Consecutive runs of the ranking, each collapsing a similar share of the total."""
    amounts = [
        float(layer.macs - layer.target_macs) if lowrank else float(layer.target_zeros)
        for layer in layers
    ]
    total = sum(amounts) or 1.0
    groups: list[list[Layer]] = [[] for _ in range(stages)]
    done = 0.0
    for layer, amount in zip(layers, amounts, strict=True):
        # The layer joins the stage its midpoint falls in.
        index = min(stages - 1, int((done + amount / 2) / total * stages))
        groups[index].append(layer)
        done += amount
    return [group for group in groups if group]
