"""Significance of the ``resect`` pass's candidates: each one cut alone from the current student
and ranked by how much the logits on calibration data change, within the pass's time budget.

The trial cuts of the least significant candidates are kept: the stage that makes the very same
cut takes them instead of redoing the cut and its bridge fit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import Deadline
from onnxcompress.errors import DataError
from onnxcompress.graph.model_io import clone_model
from onnxcompress.graph.resection import (
    Candidate,
    Resection,
    find_candidates,
    resect_candidate,
    resected_copy,
)
from onnxcompress.passes.resect_bridge import bridge_fitter

if TYPE_CHECKING:
    from onnxcompress.passes.base import PassReport
    from onnxcompress.passes.resect import ResectConfig
    from onnxcompress.passes.resect_training import WorkTimes

# A child of the pass's logger: the ranking's lines are part of the pass's progress stream
# (benchmarks/resect.py follows that logger).
logger = logging.getLogger("onnxcompress.passes.resect.ranking")

# Logits are compared at this temperature for the significance ranking (plain softmax).
RANK_TEMPERATURE = 1.0
# Under a time budget a re-ranking is skipped (the previous ranking decides the stage) when it
# would take more than this share of what is left: the training needs the time more.
RERANK_SHARE = 0.25


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


def class_scores(output: np.ndarray, images: int) -> np.ndarray:
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


class TrialCuts:
    """The trial cuts of one resect pass: its ranking, its re-rankings, and the stage cuts that
    reuse them.

    Args:
        cfg: the pass's options.
        deadline: the pass's deadline.
        times: the pass's measured work; the slowest trial cut is recorded here.
        useful: whether a ranking row shrinks what the pass's target measures.
        say: the pass's progress lines.
        priority: the order the stages take useful rows in (smallest first); the trial cuts
            of the first ``per_stage`` are kept for the stage that takes them.
    """

    def __init__(
        self,
        cfg: ResectConfig,
        deadline: Deadline,
        times: WorkTimes,
        useful: Callable[[dict[str, Any]], bool],
        say: Callable[[str], None],
        priority: Callable[[dict[str, Any]], tuple[float, float]],
    ) -> None:
        self.cfg = cfg
        self._deadline = deadline
        self._times = times
        self._useful = useful
        self._say = say
        self._priority = priority
        self._trials: dict[str, tuple[ir.Model, list[Resection]]] = {}
        # The model the kept trial cuts were cut from.
        self.trials_of: ir.Model | None = None

    def _require_minimum(self, candidates: int) -> None:
        """Refuse a budget that cannot hold the minimum work still to do, once the first trial
        cut has timed the ranking (see the ``resect`` module docstring)."""
        deadline = self._deadline
        need = (candidates - 1) * self._times.trial + self._times.stage_minimum()
        done = deadline.phases.get("data", 0.0) + deadline.phases.get("validation", 0.0)
        deadline.require(
            need,
            f"after loading the data and validating the input model ({done:.1f} s), ranking "
            f"{candidates} candidates (~{self._times.trial:.1f} s each, timed on the first) "
            f"and one stage: its cut, its validation and the final one "
            f"(~{self._times.validation:.1f} s each)",
        )

    def rerank(
        self,
        current: ir.Model,
        ranking: list[dict[str, Any]],
        x: np.ndarray,
        report: PassReport,
    ) -> list[dict[str, Any]]:
        """The ranking redone on ``current``, or ``ranking`` when the time budget cannot hold
        a whole re-ranking (the stage record says so)."""
        deadline = self._deadline
        cfg = self.cfg
        candidates = find_candidates(current, kinds=cfg.kinds, exclude=cfg.exclude).candidates
        record = report.layers[-1] if report.layers else {}
        if deadline.limited:
            # Its share of what is left after the stage's own minimum.
            share = deadline.share(RERANK_SHARE, reserve=self._times.stage_minimum())
            if not share.fits(len(candidates) * self._times.trial):
                record["rerank_skipped"] = (
                    f"{len(candidates)} trial cuts (~{self._times.trial:.1f} s each) would "
                    f"take more than {RERANK_SHARE:.0%} of the time left"
                )
                return ranking
        else:
            share = deadline
        rows, complete = self.rank(current, candidates, x, within=share)
        if not complete:
            record["rerank_skipped"] = "the time budget ran out during the re-ranking"
            return ranking
        record["ranking_after"] = [_ranking_brief(r) for r in rows]
        return rows

    def rank(
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

        The cut copies of the ``per_stage`` useful candidates the stages take first
        (``priority``) are kept for ``cut`` (the stage would redo the very same cut and bridge
        fit).
        """
        from onnxcompress.runtime.evaluate import predict

        deadline = self._deadline if within is None else within
        clock = deadline.clock
        fitter = bridge_fitter(x, ridge=self.cfg.ridge)
        reference = class_scores(predict(model, x), len(x))
        rows: list[dict[str, Any]] = []
        kept: list[tuple[tuple[float, float], str, ir.Model, list[Resection]]] = []  # priority
        complete = True
        for index, candidate in enumerate(candidates, 1):
            if index > 1 and deadline.limited:
                # Keep a stage's minimum back from the pass's deadline.
                reserve = self._times.stage_minimum() if within is None else 0.0
                if not deadline.fits(self._times.trial + reserve):
                    complete = False
                    break
            tic = clock()
            trial, cuts = resected_copy(
                model,
                [candidate.key],
                bridge_fitter=fitter,
                kinds=self.cfg.kinds,
                exclude=self.cfg.exclude,
            )
            kl, agreement = logit_change(reference, class_scores(predict(trial, x), len(x)))
            self._times.trial = max(self._times.trial, clock() - tic)
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
                kept.append((self._priority(row), candidate.key, trial, cuts))
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
        self.trials_of = model
        for row in rows[:10]:
            self._say(
                f"  significance {row['key']}: KL {row['kl']:.4f}, top-1 agreement "
                f"{row['agreement']:.1f}%"
            )
        return rows, complete

    def cut(
        self, current: ir.Model, picks: list[str], x: np.ndarray
    ) -> tuple[ir.Model, list[Resection]]:
        """A copy of ``current`` with ``picks`` cut in order, closed-form bridges fitted.

        Each bridge reproduces the removed part's output in the current student: after earlier
        stages the layers downstream have adapted to the student's tensors, and the original's
        tensor there would no longer be what they expect.
        """
        cfg = self.cfg
        trials = self._trials if self.trials_of is current else {}
        if picks[0] in trials:
            student, first = trials.pop(picks[0])
            cuts, rest = list(first), picks[1:]
        else:
            student, cuts, rest = clone_model(current), [], picks
        fitter = bridge_fitter(x, ridge=cfg.ridge)
        for key in rest:
            cut = resect_candidate(
                student, key, bridge_fitter=fitter, kinds=cfg.kinds, exclude=cfg.exclude
            )
            if cut is not None:
                cuts.append(cut)
        return student, cuts


__all__ = ["TrialCuts", "class_scores", "logit_change", "spread_subset"]
