"""``resect``: incremental layer resection with bridge nodes and two-level distillation.

Removes whole residual branches, blocks and layers found on the graph
(``onnxcompress.graph.resection``), least significant first, one stage at a time:

1. Candidates: residual branches with an identity shortcut (the Add disappears), blocks and
   layers with equal input/output shapes (direct connection), and blocks and Conv layers that
   change channels or stride (replaced by a 1x1 Conv bridge with the same stride).
2. Bridges start from a closed-form ridge regression on calibration activations: the bridge
   reproduces the removed part's output from its input, both in the current student.
3. Significance: each candidate alone is cut (closed-form bridge) and the change of the logits
   on calibration data is measured (KL divergence and top-1 agreement). Stages take the
   candidates with the least KL per unit of what the target counts (MACs, params or layers
   removed) first: a greedy knapsack, so a cheap cut that saves little does not spend a stage
   a 15-minute budget cannot spare (on ResNet-20 at target_macs=0.7, ranking by KL alone
   picked two 1x1 bridges saving 2.6% of the MACs each before any residual branch, 11.6%).
   The ranking is redone on the current student after every accepted stage: a cut changes what
   the rest of the network contributes (after one block goes, its neighbour may matter more).
4. Stages: cut ``per_stage`` candidates; layer-level learning (the bridge and the compute layers
   next to the cut learn the original's tensor at the cut: hint loss, teacher = the input
   model); overall learning (logit distillation of the whole student, plus labels when the
   data has them). Both run through ``onnxcompress.torch_bridge.train.finetune``. Stages go
   on until the budget (``target_layers``, ``target_macs``, ``target_params``) is met or the
   validation top-1 falls more than ``max_drop`` points below the input model's; the stage that
   broke the accuracy budget is undone.
5. Final distillation of the whole student (optionally with hints at the feature maps both
   networks share); under ``time_budget_s`` it gets all the time the stages left.

With ``epochs=0`` and ``layer_epochs=0`` nothing trains: the cuts and closed-form bridges alone
(data-free apart from the calibration batch).

``time_budget_s`` covers the whole pass from its start: loading the data, validating the input
model, ranking, cuts and bridge fits, every training run with its validations, the final
distillation and the last validation. The minimum work, refused up front
(``BudgetTooShortError``, right after the first trial cut times the ranking) when the budget
cannot hold it: loading the data and validating the input model (measured: they come first),
ranking every candidate once, and one stage's cut with its validation and the final one.
Training is not part of it: a run whose share of the time cannot hold its own minimum (its
validations and one step, see ``finetune``) is skipped and the stage records why. A re-ranking
that would take more than ``RERANK_SHARE`` (``resect_ranking``) of what is left keeps the
previous ranking, and stages stop once another one no longer fits.

This module holds the options and the stage loop; the ranking and the trial cuts are in
``resect_ranking``, the training runs in ``resect_training``, the bridge fits in
``resect_bridge``.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import Clock, Deadline
from onnxcompress.errors import PassConfigError
from onnxcompress.graph.canonicalize import infer_shapes
from onnxcompress.graph.model_io import clone_model
from onnxcompress.graph.resection import (
    KINDS,
    CandidateSearch,
    compute_layer_count,
    find_candidates,
)
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction
from onnxcompress.passes.resect_ranking import TrialCuts, class_scores, spread_subset
from onnxcompress.passes.resect_training import StageTraining, WorkTimes
from onnxcompress.torch_bridge.training_options import TrainingOptions

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.graph.metrics import ModelMetrics

logger = logging.getLogger(__name__)

# A MAC or parameter fraction counts as the target within this much on either side.
TARGET_TOLERANCE = 0.02


@dataclasses.dataclass
class ResectConfig(PassConfig, TrainingOptions):
    """Options of the ``resect`` pass, and the shared ``TrainingOptions`` of its training runs.

    Attributes:
        target_layers: stop when the model has at most this many compute layers (Conv,
            ConvTranspose, Gemm, MatMul; a bridge counts as one). Below 1: a fraction of the
            input model's layers.
        target_macs: stop when the MACs are at most this fraction of the input model's.
        target_params: stop when the parameters are at most this fraction of the input's.
            Without any target: ``target_macs=0.75``.
        max_drop: the result's validation top-1 stays within this many points of the input
            model's (agreement with it, when the validation data has no labels). A stage that
            falls further (beyond ``slack``) is undone.
        slack: when a final distillation follows (``final_epochs``), a stage may fall up to
            this many points beyond ``max_drop`` and the run goes on from it: a stage judged
            right after its short training under-rates what the final distillation wins back.
            If the result still ends beyond ``max_drop``, the pass keeps the last stage that
            was within it (said on the console). Without a final distillation: 0.
        retries: undone stages in a row before the run stops. After an undone stage the run
            tries a smaller step: half the candidates of a multi-candidate stage, or the next
            candidate in the ranking after a single one.
        final_share: with ``time_budget_s`` and a final distillation, this fraction of the
            budget is kept for the final distillation: once a stage has been taken, no stage
            starts that would leave it less, and stage training runs share only what lies
            before it. A stage taken within ``slack`` is only won back by that distillation;
            a run whose stages spend the whole budget keeps an earlier, larger state.
        kinds: which candidates to consider: ``branch``, ``block``, ``layer``
            (``;``-separated on the command line).
        exclude: node-name patterns (fnmatch) never removed.
        per_stage: candidates cut per stage, at the least. Under ``time_budget_s``, once a
            stage's wall time is measured, a stage cuts more when the time before the final
            distillation's share holds fewer stages than the ranking says the target needs.
        max_stages: stop after this many stages (0: no limit).
        ridge: ridge term of the bridge fits, relative to the mean input energy.
        rank_samples: calibration images used for the significance ranking and bridge fits
            (a random subset of the calibration batch when it holds more).
        epochs: overall (logit distillation) epochs per stage; 0 skips it.
        layer_epochs: layer-level (hint) epochs per stage; 0 skips it.
        final_epochs: overall distillation epochs after the last stage (0 skips it). With
            ``time_budget_s`` the final distillation instead trains until the budget is spent
            (epochs of the same size, the learning-rate schedule driven by the clock). None
            (default): with ``time_budget_s``, a final distillation with whatever the stages
            leave; without, none.
        final_lr: learning rate of the final distillation (None: ``lr``).
        final_hint_weight: weight of a hint loss at the feature maps the student shares with
            the input model (the last tensor of each shape: the stage outputs of a CNN) during
            the final distillation; 0: logits only.
        rerank: redo the significance ranking on the current student after every accepted
            stage (False: the ranking of the input model decides every stage).
        lr: (shared) learning rate of overall learning.
        layer_lr: learning rate of layer-level learning.
        hint_weight: weight of the hint loss in layer-level learning.
        time_budget_s: wall-clock budget of the whole pass (see the module docstring): each
            stage's training run gets at most its share of what is left (in proportion to the
            planned epochs), the final distillation all that the stages leave (None: no
            limit).
        device: torch device for training (None: a GPU when visible, else the CPU).
    """

    target_layers: float | None = None
    target_macs: float | None = None
    target_params: float | None = None
    max_drop: float = 1.5
    slack: float = 1.0
    retries: int = 2
    final_share: float = 0.2
    kinds: tuple[str, ...] = KINDS
    exclude: tuple[str, ...] = ()
    per_stage: int = 1
    max_stages: int = 0
    ridge: float = 1e-4
    rank_samples: int = 512
    epochs: int = 1
    layer_epochs: int = 1
    final_epochs: int | None = None
    final_lr: float | None = None
    final_hint_weight: float = 0.0
    rerank: bool = True
    layer_lr: float = 0.01
    hint_weight: float = 10.0
    time_budget_s: float | None = None

    def validate(self) -> None:
        if all(t is None for t in (self.target_layers, self.target_macs, self.target_params)):
            self.target_macs = 0.75
        if self.target_layers is not None and self.target_layers <= 0:
            raise PassConfigError(
                f"target_layers={self.target_layers}: give a layer count (>= 1) or a fraction"
            )
        check_fraction("target_macs", self.target_macs)
        check_fraction("target_params", self.target_params)
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown or not self.kinds:
            raise PassConfigError(f"kinds={';'.join(self.kinds)}: choose among {', '.join(KINDS)}")
        if self.max_drop < 0:
            raise PassConfigError(f"max_drop={self.max_drop} must be >= 0 (points of top-1)")
        if self.slack < 0 or self.retries < 0:
            raise PassConfigError(
                f"slack={self.slack} (points of top-1) and retries={self.retries} must be >= 0"
            )
        if not 0.0 <= self.final_share < 1.0:
            raise PassConfigError(f"final_share={self.final_share} must be in [0, 1)")
        if self.per_stage < 1 or self.max_stages < 0 or self.rank_samples < 1:
            raise PassConfigError("per_stage and rank_samples must be >= 1, max_stages >= 0")
        if min(self.epochs, self.layer_epochs, self.final_epoch_count) < 0:
            raise PassConfigError("epochs, layer_epochs and final_epochs must be >= 0")
        if not 0.0 <= self.ridge < 1.0:
            raise PassConfigError(f"ridge={self.ridge} must be in [0, 1)")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise PassConfigError(f"time_budget_s={self.time_budget_s} must be positive")
        self.check_training_options("resect")
        if self.layer_lr <= 0:
            raise PassConfigError(f"layer_lr={self.layer_lr} must be positive")
        if self.final_lr is not None and self.final_lr <= 0:
            raise PassConfigError(f"final_lr={self.final_lr} must be positive")
        if min(self.hint_weight, self.final_hint_weight) < 0:
            raise PassConfigError("hint_weight and final_hint_weight must be >= 0")

    @property
    def final_epoch_count(self) -> int:
        """The final distillation's epochs without a time budget (with one, the clock's)."""
        return 0 if self.final_epochs is None else self.final_epochs

    @property
    def final_distillation(self) -> bool:
        """Whether a final distillation follows the stages."""
        if self.final_epochs is None:
            return self.time_budget_s is not None
        return self.final_epochs > 0

    @property
    def trains(self) -> bool:
        return self.epochs + self.layer_epochs + self.final_epoch_count > 0 or (
            self.final_distillation
        )

    @property
    def stage_slack(self) -> float:
        """Points a stage may fall beyond ``max_drop``: ``slack`` when a final distillation can
        win them back, else none."""
        return self.slack if self.final_distillation else 0.0


@dataclasses.dataclass
class _Feasible:
    """A state of the run within max_drop: the model, its size, its stage (0: the input
    model) and its validation top-1."""

    model: ir.Model
    size: _Size
    stage: int
    top1: float


@dataclasses.dataclass
class _Size:
    layers: int
    macs: int
    params: int


def _size(model: ir.Model) -> _Size:
    from onnxcompress.graph.metrics import model_metrics

    metrics = model_metrics(model)
    return _Size(compute_layer_count(model), metrics.macs, metrics.params)


class IncrementalResection(CompressionPass[ResectConfig]):
    """Cut layers and blocks stage by stage, bridging and distilling after each cut."""

    name = "resect"
    budget_options = ("target_layers", "target_macs", "target_params")
    summary_line = "remove residual blocks/layers, bridge shape changes, distill in stages"
    config_class = ResectConfig
    needs_data = True
    # What the target still needs removed (``_priority``): set when the run starts and before
    # every stage; None (outside a run) counts every cut's whole saving.
    _needed: float | None = None

    # -- the run -----------------------------------------------------------------------------

    # The clock of ``time_budget_s`` (None: ``time.monotonic``); tests inject a ManualClock.
    clock: Clock | None = None

    def run(self, model: ir.Model, report: PassReport) -> None:
        # One deadline for the whole pass, started before anything else.
        self._deadline = Deadline(self.cfg.time_budget_s, clock=self.clock, label="resect")
        try:
            self._resect(model, report)
        finally:
            report.summary["time"] = self._deadline.report()

    def _resect(self, model: ir.Model, report: PassReport) -> None:
        cfg, deadline = self.cfg, self._deadline
        x = self.context.calibration
        assert x is not None  # CompressionPass.call checked
        self._times = WorkTimes()
        infer_shapes(model)
        teacher = clone_model(model)
        before = _size(model)
        self._before = before
        self._needed = self._still_needed(before)
        report.summary.update(
            {
                "layers_before": before.layers,
                "macs_before": before.macs,
                "params_before": before.params,
                "target": self._target_text(),
            }
        )
        search = find_candidates(model, kinds=cfg.kinds, exclude=cfg.exclude)
        for node, reason in search.declined:
            report.decline(node, reason)
        report.summary["candidates"] = [c.as_dict() for c in search.candidates]
        if self._met(before):
            self._finish(report, before, before, "the model already meets the target")
            return
        if not search.candidates:
            self._finish(report, before, before, "no candidates: nothing can be resected")
            return

        x_rank = spread_subset(x, cfg.rank_samples, self.context.seed)
        with deadline.phase("data"):
            train, val = self._load_data(teacher)
        with deadline.phase("validation"):
            reference_top1 = self._validate(teacher, val, teacher, first=True)
        report.summary["validation"] = val.name
        report.summary["top1_before"] = reference_top1
        trials = TrialCuts(cfg, deadline, self._times, self._useful, self._say, self._priority)
        with deadline.phase("ranking"):
            ranking, complete = trials.rank(teacher, search.candidates, x_rank, first=True)
        # The teacher is a copy of the input model: its trial cuts are the input model's too.
        trials.trials_of = model
        report.summary["ranking"] = ranking
        if not complete:
            report.summary["ranking_cut_short"] = (
                f"the time budget held {len(ranking)} of {len(search.candidates)} trial cuts; "
                "the stages choose among those"
            )
        self._say(
            f"resect: {len(ranking)} candidates ranked; validation top-1 of the input model "
            f"{reference_top1:.2f}% on {len(val)} images ({val.name})"
        )
        training = StageTraining(cfg, self.context, deadline, self._times, self._say)
        training.reserve_s = self._final_reserve()
        training.planned_epochs = self._plan_epochs(ranking, before)
        current, current_size = model, before
        # The last state within max_drop: what the pass keeps if the result ends beyond it.
        feasible = _Feasible(model, before, 0, reference_top1)
        tried: set[str] = set()
        stage = 0
        step = cfg.per_stage
        undone_in_a_row = 0
        stop_reason = ""
        while not self._met(current_size):
            if cfg.max_stages and stage >= cfg.max_stages:
                stop_reason = f"max_stages={cfg.max_stages} reached"
                break
            # Once a stage is taken, the final distillation's share is not the stages' to spend:
            # it is what wins back the points a stage took within slack.
            reserve = training.reserve_s if current is not model else 0.0
            if not deadline.fits(self._times.stage_minimum() + reserve):
                stop_reason = f"time_budget_s={cfg.time_budget_s} holds no further stage" + (
                    f" before the final distillation's share ({reserve:.0f} s)" if reserve else ""
                )
                break
            stage_start = deadline.spent()
            if stage > 0 and cfg.rerank and undone_in_a_row == 0:
                with deadline.phase("ranking"):
                    ranking = trials.rerank(current, ranking, x_rank, report)
            # A cut that does not shrink what the target measures (a layer swapped for its
            # bridge when layers are counted) only costs accuracy.
            self._needed = self._still_needed(current_size)
            if undone_in_a_row == 0:
                step = self._stage_step(ranking, current_size, training.reserve_s)
                if stage > 0:
                    training.planned_epochs = training.spent_epochs + self._plan_epochs(
                        ranking, current_size, step
                    )
            order = [row["key"] for row in self._ordered(ranking)]
            available = self._search(current).by_key()
            picks = _disjoint([k for k in order if k not in tried], available, step)
            if not picks:
                # After undone stages, the last rejection is why the run stopped.
                stop_reason = "; ".join(r for r in (stop_reason, "no candidates left") if r)
                break
            stage += 1
            with deadline.phase("cuts"):
                student, cuts = trials.cut(current, picks, x_rank)
            if not cuts:
                tried.update(picks)
                continue
            infer_shapes(student)
            record: dict[str, Any] = {"stage": stage, "cuts": [dataclasses.asdict(c) for c in cuts]}
            with deadline.phase("validation"):
                record["top1_cut"] = self._validate(student, val, teacher)
            self._say(
                f"stage {stage}: cut {', '.join(c.key for c in cuts)}; validation top-1 "
                f"{record['top1_cut']:.2f}% before training"
            )
            with deadline.phase("training"):
                trained = training.train_stage(student, teacher, cuts, train, val, record, stage)
            size = _size(trained)
            with deadline.phase("validation"):
                top1 = (
                    record["top1_cut"]
                    if trained is student
                    else self._validate(trained, val, teacher)
                )
            student = trained
            record.update(
                top1=top1,
                layers=size.layers,
                macs=size.macs,
                params=size.params,
                seconds=round(deadline.spent(), 1),
            )
            self._times.stage = deadline.spent() - stage_start
            drop = reference_top1 - top1
            record["accepted"] = drop <= cfg.max_drop + cfg.stage_slack
            record["within_max_drop"] = drop <= cfg.max_drop
            report.layers.append(record)
            if record["accepted"]:
                verdict = "" if record["within_max_drop"] else "; within slack, the run goes on"
            else:
                guard = f"max_drop={cfg.max_drop}" + (
                    f" + slack={cfg.stage_slack}" if cfg.stage_slack else ""
                )
                verdict = f"; over {guard}: undone"
            self._say(
                f"stage {stage}: validation top-1 {top1:.2f}% ({drop:+.2f} points below the input "
                f"model), {size.layers} layers, MACs {size.macs / max(before.macs, 1):.1%}, "
                f"params {size.params / max(before.params, 1):.1%}{verdict}"
            )
            if not record["accepted"]:
                undone_in_a_row += 1
                stop_reason = f"stage {stage} dropped {drop:.2f} points (> {guard})"
                if undone_in_a_row > cfg.retries:
                    break
                # A smaller step: half of these candidates, or the next one after a single one.
                if len(picks) > 1:
                    step = max(1, len(picks) // 2)
                else:
                    tried.update(picks)
                self._say(f"stage {stage} undone; retrying with {step} candidate(s) per stage")
                continue
            tried.update(picks)
            undone_in_a_row = 0
            stop_reason = ""
            current, current_size = student, size
            if record["within_max_drop"]:
                feasible = _Feasible(current, size, stage, top1)

        if current is not model and cfg.final_distillation:
            with deadline.phase("training"):
                current = training.final(current, teacher, train, val, report)
            current_size = _size(current)
        if not stop_reason:
            stop_reason = "target met" if self._met(current_size) else "no stage left to try"
        top1_after = reference_top1
        if current is not model:
            with deadline.phase("validation"):
                top1_after = self._validate(current, val, teacher)
        if reference_top1 - top1_after > cfg.max_drop and current is not feasible.model:
            # The stages taken within slack were not won back: keep the last state that was
            # within max_drop (the input model when no stage was).
            kept = f"stage {feasible.stage}" if feasible.stage else "the input model"
            stop_reason += (
                f"; the result ended {reference_top1 - top1_after:.2f} points below the input "
                f"model (> max_drop={cfg.max_drop}), so the pass kept {kept} "
                f"({feasible.top1:.2f}%)"
            )
            self._say(f"resect: fell back to {kept}: the final result was beyond max_drop")
            report.summary["fell_back_to_stage"] = feasible.stage
            current, current_size, top1_after = feasible.model, feasible.size, feasible.top1
        changed = current is not model
        if changed:
            # In place: the pass hands back the same Model object with the resected graph.
            model.graph = current.graph
            model.functions.clear()
            model.functions.update(current.functions)
        report.summary["top1_after"] = top1_after
        self._finish(report, before, current_size, stop_reason)

    def _finish(self, report: PassReport, before: _Size, after: _Size, reason: str) -> None:
        report.modified = after.layers != before.layers or after.macs != before.macs
        report.summary.update(
            {
                "layers_after": after.layers,
                "macs_after": after.macs,
                "params_after": after.params,
                "macs_ratio": after.macs / before.macs if before.macs else 1.0,
                "params_ratio": after.params / before.params if before.params else 1.0,
                "target_met": self._met(after),
                "stopped": reason,
                "stages_accepted": sum(1 for r in report.layers if r.get("accepted")),
            }
        )
        self._say(f"resect: {reason}; {after.layers} layers, {after.macs:,} MACs")

    # -- budget ------------------------------------------------------------------------------

    def _layer_target(self) -> float | None:
        t = self.cfg.target_layers
        if t is None:
            return None
        return t * self._before.layers if t < 1 else t

    def check_targets(self, before: ModelMetrics, after: ModelMetrics, report: PassReport) -> None:
        cfg, summary = self.cfg, report.summary
        why = str(summary.get("stopped", ""))
        if why == "target met":
            why = ""
        coarse = (
            "whole blocks and layers go at once: the last stage's cut took the model past the "
            "target by more than the tolerance (a smaller per_stage, or kinds=layer, cuts finer)"
        )
        layers = self._layer_target()
        if layers is not None and "layers_after" in summary:
            reached = float(summary["layers_after"])
            report.check_target(
                "target_layers", layers, reached, met=reached <= layers, reason=why or coarse
            )
        for option, total in (("target_macs", "macs"), ("target_params", "params")):
            goal = getattr(cfg, option)
            if goal is None:
                continue
            reached = getattr(after, total) / max(getattr(before, total), 1)
            short = reached > goal + TARGET_TOLERANCE
            report.check_target(
                option, goal, reached, tolerance=TARGET_TOLERANCE, reason=why if short else coarse
            )

    def _met(self, size: _Size, tolerance: float = 0.0) -> bool:
        """Whether ``size`` meets every target; ``tolerance``: a MAC or parameter fraction
        counts within this much above its target (layer counts are exact)."""
        cfg, before = self.cfg, self._before
        layers = self._layer_target()
        if layers is not None and size.layers > layers:
            return False
        macs = cfg.target_macs
        if macs is not None and size.macs > (macs + tolerance) * before.macs:
            return False
        params = cfg.target_params
        return params is None or size.params <= (params + tolerance) * before.params

    def _useful(self, row: dict[str, Any]) -> bool:
        cfg = self.cfg
        return (
            (cfg.target_layers is not None and row["layers_removed"] > 0)
            or (cfg.target_macs is not None and row["macs_removed"] > 0)
            or (cfg.target_params is not None and row["params_removed"] > 0)
        )

    def _priority(self, row: dict[str, Any]) -> tuple[float, float]:
        """How cheaply a candidate buys progress: its KL per unit it removes of the first
        target given (layers, MACs, params), counting no more than the target still needs
        (``_needed``: a cut past it buys nothing towards it, so a big cut does not outrank a
        small, harmless one that closes the gap), then the larger saving first on ties."""
        unit = self._first_unit()
        removed = row[f"{unit}_removed"] if unit is not None else 0
        if removed <= 0:
            return (float("inf"), 0.0)
        progress = removed if self._needed is None else min(removed, max(self._needed, 1e-9))
        return (row["kl"] / progress, -float(removed))

    def _first_unit(self) -> str | None:
        """What the first target given counts: ``layers``, ``macs`` or ``params`` (None: no
        target)."""
        cfg = self.cfg
        if cfg.target_layers is not None:
            return "layers"
        if cfg.target_macs is not None:
            return "macs"
        return "params" if cfg.target_params is not None else None

    def _still_needed(self, size: _Size) -> float | None:
        """What the first target given still needs removed from ``size`` (in the unit
        ``_priority`` counts), None when no target is set."""
        cfg, before = self.cfg, self._before
        unit = self._first_unit()
        if unit == "layers":
            layers = self._layer_target()
            assert layers is not None
            return size.layers - layers
        if unit == "macs":
            assert cfg.target_macs is not None
            return size.macs - cfg.target_macs * before.macs
        if unit == "params":
            assert cfg.target_params is not None
            return size.params - cfg.target_params * before.params
        return None

    def _ordered(self, ranking: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The useful rows of ``ranking``, the cheapest progress first (``_priority``)."""
        return sorted((row for row in ranking if self._useful(row)), key=self._priority)

    def _target_text(self) -> str:
        cfg = self.cfg
        parts = []
        if cfg.target_layers is not None:
            parts.append(f"layers <= {cfg.target_layers:g}")
        if cfg.target_macs is not None:
            parts.append(f"MACs <= {cfg.target_macs:g}")
        if cfg.target_params is not None:
            parts.append(f"params <= {cfg.target_params:g}")
        return ", ".join(parts)

    def _search(self, model: ir.Model) -> CandidateSearch:
        return find_candidates(model, kinds=self.cfg.kinds, exclude=self.cfg.exclude)

    # -- data and accuracy -------------------------------------------------------------------

    def _load_data(self, teacher: ir.Model) -> tuple[Dataset | None, Dataset]:
        context = self.context
        # An empty spec string counts as none, as it always did here.
        val = context.validation_set(teacher, fallback="calibration batch", blank_is_none=True)
        train: Dataset | None = None
        if self.cfg.trains:
            train = context.train_set(teacher, fallback="calibration batch", blank_is_none=True)
        return train, val

    def _validate(
        self, model: ir.Model, val: Dataset, teacher: ir.Model, first: bool = False
    ) -> float:
        """``_top1``, timed: the slowest validation so far is what is kept back for the ones
        that must follow (the machine's load may change)."""
        clock = self._deadline.clock
        tic = clock()
        top1 = self._top1(model, val, teacher)
        seconds = clock() - tic
        self._times.validation = seconds if first else max(self._times.validation, seconds)
        return top1

    @staticmethod
    def _top1(model: ir.Model, val: Dataset, teacher: ir.Model) -> float:
        """Top-1 on ``val`` (with labels), else agreement with the teacher, in percent."""
        from onnxcompress.runtime.evaluate import predict

        predicted = class_scores(predict(model, val.x), len(val)).argmax(1)
        if val.y is not None:
            truth = val.y
        else:
            truth = class_scores(predict(teacher, val.x), len(val)).argmax(1)
        return round(float(np.mean(predicted == truth)) * 100.0, 4)

    # -- planning ----------------------------------------------------------------------------

    def _plan_epochs(
        self, ranking: list[dict[str, Any]], size: _Size, per_stage: int | None = None
    ) -> int:
        """Training epochs still expected from ``size`` on, for sharing ``time_budget_s``."""
        cfg = self.cfg
        stages = self._expected_stages(ranking, size, per_stage or cfg.per_stage)
        final = max(cfg.final_epoch_count, 1) if cfg.final_distillation else 0
        return stages * (cfg.epochs + cfg.layer_epochs) + final

    def _final_reserve(self) -> float:
        """Seconds of ``time_budget_s`` kept for the final distillation (0: none follows)."""
        cfg = self.cfg
        if cfg.time_budget_s is None or not cfg.final_distillation:
            return 0.0
        return cfg.final_share * cfg.time_budget_s

    def _stage_step(self, ranking: list[dict[str, Any]], size: _Size, reserve: float) -> int:
        """Candidates the next stage cuts: ``per_stage``, or more when the time before the
        final distillation's share holds fewer stages (at the last stage's measured wall time)
        than the ranking says the target still needs, one candidate a stage. A stage's wall
        time hardly depends on its cuts (its training runs get a share of the time), so fewer,
        larger stages are how a budget reaches its target."""
        per_stage = self.cfg.per_stage
        seconds = self._times.stage
        if not self._deadline.limited or seconds <= 0:
            return per_stage
        affordable = max(1, int((self._deadline.remaining() - reserve) // seconds))
        # Counted to the target within its tolerance (as check_targets judges the result):
        # the stages after may still go further when time is left.
        needed = self._expected_stages(ranking, size, 1, TARGET_TOLERANCE)
        step = max(per_stage, -(-needed // affordable))
        if step > per_stage:
            self._say(
                f"resect: the target needs about {needed} more cuts and the budget holds "
                f"{affordable} more stage(s) of ~{seconds:.0f} s: {step} cuts a stage"
            )
        return step

    def _expected_stages(
        self,
        ranking: list[dict[str, Any]],
        start: _Size,
        per_stage: int | None = None,
        tolerance: float = 0.0,
    ) -> int:
        per_stage = per_stage or self.cfg.per_stage
        useful = self._ordered(ranking)
        size = dataclasses.replace(start)
        stages = 0
        for first in range(0, len(useful), per_stage):
            if self._met(size, tolerance):
                break
            for row in useful[first : first + per_stage]:
                size.layers -= row["layers_removed"]
                size.macs -= row["macs_removed"]
                size.params -= row["params_removed"]
            stages += 1
        if self.cfg.max_stages:
            stages = min(stages, self.cfg.max_stages)
        return max(stages, 1)

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.context.progress:
            print(message, file=sys.stderr, flush=True)


def _disjoint(order: list[str], available: dict[str, Any], count: int) -> list[str]:
    """The first ``count`` keys of ``order`` that are candidates now and share no node with
    an earlier pick: a layer inside a block cut in the same stage would be counted twice, and
    each was ranked alone."""
    picks: list[str] = []
    taken: set[int] = set()
    for key in order:
        candidate = available.get(key)
        if candidate is None:
            continue
        nodes = {id(node) for node in candidate.nodes}
        if nodes & taken:
            continue
        picks.append(key)
        taken |= nodes
        if len(picks) == count:
            break
    return picks


__all__ = ["IncrementalResection", "ResectConfig"]
