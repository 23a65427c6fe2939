"""``resect``: incremental layer resection with bridge nodes and two-level distillation.

Removes whole residual branches, blocks and layers found on the graph
(``onnxcompress.graph.resection``), least significant first, one stage at a time:

1. Candidates: residual branches with an identity shortcut (the Add disappears), blocks and
   layers with equal input/output shapes (direct connection), and blocks and Conv layers that
   change channels or stride (replaced by a 1x1 Conv bridge with the same stride).
2. Bridges start from a closed-form ridge regression on calibration activations: the bridge
   reproduces the removed part's output from its input, both in the current student.
3. Significance: each candidate alone is cut (closed-form bridge) and the change of the logits
   on calibration data is measured (KL divergence and top-1 agreement); least significant first.
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
that would take more than ``RERANK_SHARE`` of what is left keeps the previous ranking, and
stages stop once another one no longer fits.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import BudgetTooShortError, Clock, Deadline
from onnxcompress.errors import DataError, PassConfigError
from onnxcompress.graph.model import clone_model, infer_shapes
from onnxcompress.graph.resection import (
    KINDS,
    Candidate,
    CandidateSearch,
    Resection,
    compute_layer_count,
    find_candidates,
    resect_candidate,
    resected_copy,
    shared_feature_maps,
)
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.graph.metrics import ModelMetrics

logger = logging.getLogger(__name__)

# Logits are compared at this temperature for the significance ranking (plain softmax).
RANK_TEMPERATURE = 1.0
# A MAC or parameter fraction counts as the target within this much on either side.
TARGET_TOLERANCE = 0.02
# Under a time budget the final distillation is skipped when less than this is left: a
# run that short ends before its first validation.
MIN_FINAL_SECONDS = 2.0
# Epochs planned for a final distillation that runs to the end of the time budget: the
# measured training speed's estimate times this margin (the clock stops the run first), or
# this many when nothing measured the speed yet.
FINAL_EPOCHS_MARGIN = 1.5
FINAL_EPOCHS_UNTIMED = 1000
# Under a time budget a re-ranking is skipped (the previous ranking decides the stage) when it
# would take more than this share of what is left: the training needs the time more.
RERANK_SHARE = 0.25
# Under a time budget a stage's training run gets at least this many times its minimum (its
# validations and one step) while what is left holds it: as much time to train as to validate.
RUN_MARGIN = 2.0
# Kept back at the end of a budget for the report's sizes and handing the graph back.
FINISH_SECONDS = 1.0


@dataclasses.dataclass
class ResectConfig(PassConfig):
    """Options of the ``resect`` pass.

    Attributes:
        target_layers: stop when the model has at most this many compute layers (Conv,
            ConvTranspose, Gemm, MatMul; a bridge counts as one). Below 1: a fraction of the
            input model's layers.
        target_macs: stop when the MACs are at most this fraction of the input model's.
        target_params: stop when the parameters are at most this fraction of the input's.
            Without any target: ``target_macs=0.75``.
        max_drop: stop when validation top-1 falls more than this many points below the input
            model's (agreement with it, when the validation data has no labels); that stage is
            undone.
        kinds: which candidates to consider: ``branch``, ``block``, ``layer``
            (``;``-separated on the command line).
        exclude: node-name patterns (fnmatch) never removed.
        per_stage: candidates cut per stage.
        max_stages: stop after this many stages (0: no limit).
        ridge: ridge term of the bridge fits, relative to the mean input energy.
        rank_samples: calibration images used for the significance ranking and bridge fits
            (a random subset of the calibration batch when it holds more).
        epochs: overall (logit distillation) epochs per stage; 0 skips it.
        layer_epochs: layer-level (hint) epochs per stage; 0 skips it.
        final_epochs: overall distillation epochs after the last stage (0 skips it). With
            ``time_budget_s`` the final distillation instead trains until the budget is spent
            (epochs of the same size, the learning-rate schedule driven by the clock).
        final_lr: learning rate of the final distillation (None: ``lr``).
        final_hint_weight: weight of a hint loss at the feature maps the student shares with
            the input model (the last tensor of each shape: the stage outputs of a CNN) during
            the final distillation; 0: logits only.
        rerank: redo the significance ranking on the current student after every accepted
            stage (False: the ranking of the input model decides every stage).
        epoch_samples: images per epoch (a fresh random subset each epoch; None: all).
        lr: learning rate of overall learning.
        layer_lr: learning rate of layer-level learning.
        batch_size: training batch size.
        hint_weight: weight of the hint loss in layer-level learning.
        temperature: distillation temperature.
        alpha: weight of distillation against cross-entropy when labels exist.
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
    kinds: tuple[str, ...] = KINDS
    exclude: tuple[str, ...] = ()
    per_stage: int = 1
    max_stages: int = 0
    ridge: float = 1e-4
    rank_samples: int = 512
    epochs: int = 1
    layer_epochs: int = 1
    final_epochs: int = 0
    final_lr: float | None = None
    final_hint_weight: float = 0.0
    rerank: bool = True
    epoch_samples: int | None = None
    lr: float = 0.01
    layer_lr: float = 0.01
    batch_size: int = 64
    hint_weight: float = 10.0
    temperature: float = 4.0
    alpha: float = 0.9
    time_budget_s: float | None = None
    device: str | None = None

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
        if self.per_stage < 1 or self.max_stages < 0 or self.rank_samples < 1:
            raise PassConfigError("per_stage and rank_samples must be >= 1, max_stages >= 0")
        if min(self.epochs, self.layer_epochs, self.final_epochs) < 0:
            raise PassConfigError("epochs, layer_epochs and final_epochs must be >= 0")
        if not 0.0 <= self.ridge < 1.0:
            raise PassConfigError(f"ridge={self.ridge} must be in [0, 1)")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise PassConfigError(f"epoch_samples={self.epoch_samples} must be positive")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise PassConfigError(f"time_budget_s={self.time_budget_s} must be positive")
        if self.lr <= 0 or self.layer_lr <= 0 or self.batch_size < 1:
            raise PassConfigError("lr and layer_lr must be positive, batch_size >= 1")
        if self.final_lr is not None and self.final_lr <= 0:
            raise PassConfigError(f"final_lr={self.final_lr} must be positive")
        if (
            min(self.hint_weight, self.final_hint_weight) < 0
            or self.temperature <= 0
            or not 0.0 <= self.alpha <= 1.0
        ):
            raise PassConfigError(
                "hint_weight and final_hint_weight >= 0, temperature > 0 and alpha in [0, 1]"
            )

    @property
    def trains(self) -> bool:
        return self.epochs + self.layer_epochs + self.final_epochs > 0


@dataclasses.dataclass
class _Size:
    layers: int
    macs: int
    params: int


def _size(model: ir.Model) -> _Size:
    from onnxcompress.graph.metrics import model_metrics

    metrics = model_metrics(model)
    return _Size(compute_layer_count(model), metrics.macs, metrics.params)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) / RANK_TEMPERATURE
    z -= z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def logit_change(reference: np.ndarray, logits: np.ndarray) -> tuple[float, float]:
    """(mean KL(reference || logits) of the softmaxes, top-1 agreement in percent)."""
    p_log, q_log = _log_softmax(reference), _log_softmax(logits)
    kl = float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=1)))
    agree = float(np.mean(reference.argmax(1) == logits.argmax(1))) * 100.0
    return kl, agree


def _class_scores(output: np.ndarray, images: int) -> np.ndarray:
    """The first output as ``(images, scores)``; resect compares models by these."""
    if output.ndim < 1 or output.shape[0] != images:
        raise DataError(
            f"resect: the model's first output has shape {list(output.shape)} for {images} "
            "images; ranking and validation need one row of scores per image"
        )
    return output.reshape(images, -1)


def spread_subset(x: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` rows of ``x`` drawn at random without replacement, kept in their order.

    Calibration batches are often grouped by class (an image folder read class by class):
    their first rows would be one or two classes, and a ranking or a bridge fitted on those
    says little about the others.
    """
    if len(x) <= count:
        return np.ascontiguousarray(x)
    index = np.sort(np.random.default_rng(seed).choice(len(x), size=count, replace=False))
    return np.ascontiguousarray(x[index])


def _ranking_brief(row: dict[str, Any]) -> dict[str, Any]:
    """The ranking row of a re-ranking, without the sizes (they are in the first ranking)."""
    return {k: row[k] for k in ("key", "action", "kl", "agreement")}


class IncrementalResection(CompressionPass[ResectConfig]):
    """Cut layers and blocks stage by stage, bridging and distilling after each cut."""

    name = "resect"
    budget_options = ("target_layers", "target_macs", "target_params")
    summary_line = "remove residual blocks/layers, bridge shape changes, distill in stages"
    config_class = ResectConfig
    needs_data = True

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
        infer_shapes(model)
        teacher = clone_model(model)
        before = _size(model)
        self._before = before
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
        self._trial_seconds = 0.0
        self._floor: float | None = None
        with deadline.phase("ranking"):
            ranking, complete = self._rank(teacher, search.candidates, x_rank, first=True)
        # The teacher is a copy of the input model: its trial cuts are the input model's too.
        self._trials_of = model
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
        self._spent_epochs = 0
        self._throughput: float | None = None
        self._planned_epochs = self._plan_epochs(ranking, before)
        current, current_size = model, before
        tried: set[str] = set()
        stage = 0
        stop_reason = ""
        while not self._met(current_size):
            if cfg.max_stages and stage >= cfg.max_stages:
                stop_reason = f"max_stages={cfg.max_stages} reached"
                break
            if not deadline.fits(self._stage_minimum()):
                stop_reason = f"time_budget_s={cfg.time_budget_s} holds no further stage"
                break
            if stage > 0 and cfg.rerank:
                with deadline.phase("ranking"):
                    ranking = self._rerank(current, ranking, x_rank, report)
                self._planned_epochs = self._spent_epochs + self._plan_epochs(ranking, current_size)
            # A cut that does not shrink what the target measures (a layer swapped for its
            # bridge when layers are counted) only costs accuracy.
            order = [row["key"] for row in ranking if self._useful(row)]
            available = self._search(current).by_key()
            picks = [k for k in order if k in available and k not in tried][: cfg.per_stage]
            if not picks:
                stop_reason = "no candidates left"
                break
            stage += 1
            tried.update(picks)
            with deadline.phase("cuts"):
                student, cuts = self._cut(current, picks, x_rank)
            if not cuts:
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
                trained = self._train_stage(student, teacher, cuts, train, val, record, stage)
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
            drop = reference_top1 - top1
            record["accepted"] = drop <= cfg.max_drop
            report.layers.append(record)
            self._say(
                f"stage {stage}: validation top-1 {top1:.2f}% ({drop:+.2f} points below the input "
                f"model), {size.layers} layers, MACs {size.macs / max(before.macs, 1):.1%}, "
                f"params {size.params / max(before.params, 1):.1%}"
                + ("" if record["accepted"] else f"; over max_drop={cfg.max_drop}: undone")
            )
            if not record["accepted"]:
                stop_reason = f"stage {stage} dropped {drop:.2f} points (> max_drop={cfg.max_drop})"
                break
            current, current_size = student, size

        if current is not model and cfg.final_epochs > 0:
            with deadline.phase("training"):
                current = self._final(current, teacher, train, val, report)
            current_size = _size(current)
        changed = current is not model
        if changed:
            # In place: the pass hands back the same Model object with the resected graph.
            model.graph = current.graph
            model.functions.clear()
            model.functions.update(current.functions)
        if not stop_reason:
            stop_reason = "target met"
        with deadline.phase("validation"):
            report.summary["top1_after"] = (
                self._validate(model, val, teacher) if changed else reference_top1
            )
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

    def _met(self, size: _Size) -> bool:
        cfg, before = self.cfg, self._before
        layers = self._layer_target()
        if layers is not None and size.layers > layers:
            return False
        if cfg.target_macs is not None and size.macs > cfg.target_macs * before.macs:
            return False
        params = cfg.target_params
        return params is None or size.params <= params * before.params

    def _useful(self, row: dict[str, Any]) -> bool:
        cfg = self.cfg
        return (
            (cfg.target_layers is not None and row["layers_removed"] > 0)
            or (cfg.target_macs is not None and row["macs_removed"] > 0)
            or (cfg.target_params is not None and row["params_removed"] > 0)
        )

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

    # -- significance ------------------------------------------------------------------------

    def _search(self, model: ir.Model) -> CandidateSearch:
        return find_candidates(model, kinds=self.cfg.kinds, exclude=self.cfg.exclude)

    def _stage_minimum(self) -> float:
        """Seconds a stage needs at the least: a cut with its bridge fit (about a trial cut of
        the ranking), its validation, the final validation and handing the model back."""
        return self._trial_seconds + 2 * self._val_seconds + FINISH_SECONDS

    def _require_minimum(self, candidates: int) -> None:
        """Refuse a budget that cannot hold the minimum work still to do, once the first trial
        cut has timed the ranking (see the module docstring)."""
        deadline = self._deadline
        need = (candidates - 1) * self._trial_seconds + self._stage_minimum()
        done = deadline.phases.get("data", 0.0) + deadline.phases.get("validation", 0.0)
        deadline.require(
            need,
            f"after loading the data and validating the input model ({done:.1f} s), ranking "
            f"{candidates} candidates (~{self._trial_seconds:.1f} s each, timed on the first) "
            f"and one stage: its cut, its validation and the final one "
            f"(~{self._val_seconds:.1f} s each)",
        )

    def _rerank(
        self,
        current: ir.Model,
        ranking: list[dict[str, Any]],
        x: np.ndarray,
        report: PassReport,
    ) -> list[dict[str, Any]]:
        """The ranking redone on ``current``, or ``ranking`` when the time budget cannot hold
        a whole re-ranking (the stage record says so)."""
        deadline = self._deadline
        candidates = self._search(current).candidates
        record = report.layers[-1] if report.layers else {}
        if deadline.limited:
            # Its share of what is left after the stage's own minimum.
            share = deadline.share(RERANK_SHARE, reserve=self._stage_minimum())
            if not share.fits(len(candidates) * self._trial_seconds):
                record["rerank_skipped"] = (
                    f"{len(candidates)} trial cuts (~{self._trial_seconds:.1f} s each) would "
                    f"take more than {RERANK_SHARE:.0%} of the time left"
                )
                return ranking
        else:
            share = deadline
        rows, complete = self._rank(current, candidates, x, within=share)
        if not complete:
            record["rerank_skipped"] = "the time budget ran out during the re-ranking"
            return ranking
        record["ranking_after"] = [_ranking_brief(r) for r in rows]
        return rows

    def _rank(
        self,
        model: ir.Model,
        candidates: list[Candidate],
        x: np.ndarray,
        first: bool = False,
        within: Deadline | None = None,
    ) -> tuple[list[dict[str, Any]], bool]:
        """Each candidate cut alone from ``model``: the change of its logits; and whether every
        candidate was measured before ``within`` (default: the pass's deadline, less a stage's
        minimum) ran out. ``first``: the first ranking, whose first trial cut times the ranking
        for the up-front check of the budget.

        The cut copies of the ``per_stage`` least significant useful candidates are kept for
        ``_cut`` (the stage would redo the very same cut and bridge fit).
        """
        from onnxcompress.runtime.evaluate import predict

        deadline = self._deadline if within is None else within
        clock = deadline.clock
        reference = _class_scores(predict(model, x), len(x))
        rows: list[dict[str, Any]] = []
        kept: list[tuple[tuple[float, float], str, ir.Model, list[Resection]]] = []
        complete = True
        for index, candidate in enumerate(candidates, 1):
            if index > 1 and deadline.limited:
                # Keep a stage's minimum back from the pass's deadline.
                reserve = self._stage_minimum() if within is None else 0.0
                if not deadline.fits(self._trial_seconds + reserve):
                    complete = False
                    break
            tic = clock()
            trial, cuts = resected_copy(
                model,
                [candidate.key],
                calibration=x,
                kinds=self.cfg.kinds,
                exclude=self.cfg.exclude,
                ridge=self.cfg.ridge,
            )
            kl, agreement = logit_change(reference, _class_scores(predict(trial, x), len(x)))
            self._trial_seconds = max(self._trial_seconds, clock() - tic)
            if first and index == 1 and deadline.limited:
                self._require_minimum(len(candidates))
            row = {
                "key": candidate.key,
                "kind": candidate.kind,
                "action": candidate.action,
                "kl": kl,
                "agreement": agreement,
                "layers_removed": candidate.layers_removed,
                "macs_removed": candidate.macs_removed,
                "params_removed": candidate.params_removed,
                "bridge_r2": cuts[0].fit_r2 if cuts else None,
            }
            rows.append(row)
            if cuts and self._useful(row):
                kept.append(((kl, -agreement), candidate.key, trial, cuts))
                kept.sort(key=lambda item: item[0])
                del kept[self.cfg.per_stage :]
            logger.info(
                "significance %d/%d: %s KL %.4g, agreement %.1f%%",
                index,
                len(candidates),
                candidate.key,
                kl,
                agreement,
            )
        # Least significant first; agreement breaks ties of (near) equal KL.
        rows.sort(key=lambda r: (r["kl"], -r["agreement"]))
        self._trials = {key: (trial, cuts) for _, key, trial, cuts in kept}
        self._trials_of = model
        for row in rows[:10]:
            self._say(
                f"  significance {row['key']}: KL {row['kl']:.4f}, top-1 agreement "
                f"{row['agreement']:.1f}%"
            )
        return rows, complete

    def _cut(
        self, current: ir.Model, picks: list[str], x: np.ndarray
    ) -> tuple[ir.Model, list[Resection]]:
        """A copy of ``current`` with ``picks`` cut in order, closed-form bridges fitted.

        Each bridge reproduces the removed part's output in the current student: after earlier
        stages the layers downstream have adapted to the student's tensors, and the original's
        tensor there would no longer be what they expect.
        """
        cfg = self.cfg
        trials = self._trials if self._trials_of is current else {}
        if picks[0] in trials:
            student, first = trials.pop(picks[0])
            cuts, rest = list(first), picks[1:]
        else:
            student, cuts, rest = clone_model(current), [], picks
        for key in rest:
            cut = resect_candidate(
                student, key, calibration=x, kinds=cfg.kinds, exclude=cfg.exclude, ridge=cfg.ridge
            )
            if cut is not None:
                cuts.append(cut)
        return student, cuts

    # -- data and accuracy -------------------------------------------------------------------

    def _load_data(self, teacher: ir.Model) -> tuple[Dataset | None, Dataset]:
        context = self.context
        calibration = context.calibration_set("calibration batch")
        # An empty spec string counts as none, as it always did here.
        val = context.load(teacher, context.validation_spec or None)
        val = calibration if val is None else val
        train: Dataset | None = None
        if self.cfg.trains:
            train = context.load(teacher, context.train_spec or None)
            train = calibration if train is None else train
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
        self._val_seconds: float = seconds if first else max(self._val_seconds, seconds)
        return top1

    @staticmethod
    def _top1(model: ir.Model, val: Dataset, teacher: ir.Model) -> float:
        """Top-1 on ``val`` (with labels), else agreement with the teacher, in percent."""
        from onnxcompress.runtime.evaluate import predict

        predicted = _class_scores(predict(model, val.x), len(val)).argmax(1)
        if val.y is not None:
            truth = val.y
        else:
            truth = _class_scores(predict(teacher, val.x), len(val)).argmax(1)
        return round(float(np.mean(predicted == truth)) * 100.0, 4)

    # -- training ----------------------------------------------------------------------------

    def _time_left(self, validations: int = 2) -> float | None:
        """Seconds left for training (None: no budget), keeping back the ``validations`` that
        follow (a stage's after its training, and the final one) and handing the model back."""
        if not self._deadline.limited:
            return None
        return self._deadline.remaining() - validations * self._val_seconds - FINISH_SECONDS

    def _budget(self, epochs: int, floor: float = 0.0, runs_after: int = 0) -> float | None:
        """A stage run's share of what is left of ``time_budget_s``: in proportion to the
        planned epochs, but at least ``RUN_MARGIN`` times the run's minimum ``floor`` (its
        validations and a step), as far as what is left holds that for this run and the
        ``runs_after`` it in the stage: a run that cannot do its validations and train too is
        wasted, while the final distillation can run shorter."""
        left = self._time_left()
        if left is None:
            return None
        left = max(left, 1.0)
        remaining_epochs = max(self._planned_epochs - self._spent_epochs, epochs)
        share = left * epochs / remaining_epochs
        return max(1.0, share, min(RUN_MARGIN * floor, left / (runs_after + 1)))

    def _run_floor(
        self, student: ir.Model, teacher: ir.Model, train: Dataset, val: Dataset, config: Any
    ) -> float:
        """The minimum of a stage's training run (``finetune``'s estimate), measured once: the
        runs of every stage validate on the same data with the same teacher."""
        if self._floor is None:
            from onnxcompress.torch_bridge.train import minimum_work

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
        minimum (``self._skipped`` says why)."""
        from onnxcompress.torch_bridge.train import FinetuneConfig, finetune

        cfg = self.cfg
        config = FinetuneConfig(
            epochs=epochs,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            alpha=cfg.alpha,
            epoch_samples=cfg.epoch_samples,
            seed=self.context.seed,
            device=cfg.device,
            **options,
        )
        budget = budget_s
        if budget is None and self._deadline.limited:
            floor = self._run_floor(student, teacher, train, val, config)
            budget = self._budget(epochs, floor, runs_after)
        config.time_budget_s = budget if budget is None else max(budget, 1e-3)
        self._spent_epochs += epochs
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
            self._skipped = str(exc)
            self._say(f"resect: training skipped: {exc}")
            return None
        speeds = [r.images_per_second for r in result.history if r.images_per_second]
        if speeds and options.get("trainable", "all") == "all":
            # Whole-network training speed: what the final distillation will run at.
            self._throughput = float(np.median(speeds))
        return result

    def _train_stage(
        self,
        student: ir.Model,
        teacher: ir.Model,
        cuts: list[Resection],
        train: Dataset | None,
        val: Dataset,
        record: dict[str, Any],
        stage: int,
    ) -> ir.Model:
        cfg = self.cfg
        if train is None or not cfg.trains:
            return student
        student_inputs = {v.name for v in student.graph.inputs}
        pairs = tuple(
            (c.teacher_tensor, c.student_tensor)
            for c in cuts
            if c.student_tensor not in student_inputs
        )
        trainable = tuple(dict.fromkeys(name for c in cuts for name in c.neighbours))
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
                record["layer_learning"] = {"skipped": self._skipped}
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
                record["overall_learning"] = {"skipped": self._skipped}
            else:
                student = result.model
                record["overall_learning"] = self._history(result)
                self._say(
                    f"stage {stage}: overall learning, loss {record['overall_learning']['loss']}, "
                    f"validation top-1 {result.best_top1}"
                )
        return student

    def _final(
        self,
        current: ir.Model,
        teacher: ir.Model,
        train: Dataset | None,
        val: Dataset,
        report: PassReport,
    ) -> ir.Model:
        cfg = self.cfg
        if train is None:
            return current
        epochs, budget = cfg.final_epochs, self._time_left(validations=1)
        if budget is not None:
            if budget < MIN_FINAL_SECONDS:
                self._say(f"final distillation skipped: {max(budget, 0):.0f} s of the budget left")
                return current
            # Enough epochs that the clock, not the step count, ends the run and drives the
            # learning-rate schedule: the final distillation is where accuracy comes back.
            images = min(cfg.epoch_samples or len(train), len(train))
            if self._throughput is None:
                epochs = max(epochs, FINAL_EPOCHS_UNTIMED)
            else:
                expected = budget * self._throughput / images
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
            report.summary["final_learning"] = {"skipped": self._skipped}
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

    def _plan_epochs(self, ranking: list[dict[str, Any]], size: _Size) -> int:
        """Training epochs still expected from ``size`` on, for sharing ``time_budget_s``."""
        cfg = self.cfg
        stages = self._expected_stages(ranking, size)
        return stages * (cfg.epochs + cfg.layer_epochs) + cfg.final_epochs

    def _expected_stages(self, ranking: list[dict[str, Any]], start: _Size) -> int:
        per_stage = self.cfg.per_stage
        useful = [row for row in ranking if self._useful(row)]
        size = dataclasses.replace(start)
        stages = 0
        for first in range(0, len(useful), per_stage):
            if self._met(size):
                break
            for row in useful[first : first + per_stage]:
                size.layers -= row["layers_removed"]
                size.macs -= row["macs_removed"]
                size.params -= row["params_removed"]
            stages += 1
        if self.cfg.max_stages:
            stages = min(stages, self.cfg.max_stages)
        return max(stages, 1)

    @staticmethod
    def _history(result: Any) -> dict[str, Any]:
        last = result.history[-1]
        return {
            "loss": last.loss,
            "best_epoch": result.best_epoch,
            "best_top1": result.best_top1,
            "seconds": round(result.seconds, 1),
        }

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.context.progress:
            print(message, file=sys.stderr, flush=True)


__all__ = ["IncrementalResection", "ResectConfig", "logit_change", "spread_subset"]
