"""What ``lct`` keeps when its run ends beyond ``max_drop``, and what it says (issue 22).

The validation scores are scripted (``Scorer.score`` patched), so each test decides which
checks pass and what the whole validation set says, fast and deterministically; the training
itself is real (a few hundred digits).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest
import torch

from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.lct_projection import GradualProjector

DIGITS_MODEL = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"
# Four checks, at 25, 50, 75 and 100 % of the ramp; a check passes at or above -2 points
# (max_drop 1 + slack 1), the result must end at or above -1.
LOWRANK = {"subspace": "lowrank", "target_macs": 0.6, "round_to": 1, "min_saving": 0.0}
GRADUAL = {"schedule": "gradual", "epochs": 3, "epoch_samples": 256, "checks": 4}
GRADUAL.update({"final_share": 1 / 3, "stagger": 0.5, "max_drop": 1.0, "slack": 1.0})


def _context() -> PassContext:
    from onnxcompress.runtime.evaluate import dataset_for_model

    data = dataset_for_model(DIGITS_MODEL, "digits[:600]")
    context = PassContext(calibration=data.x, calibration_labels=data.y, seed=0)
    context.validation_spec = "digits[600:1000]"
    return context


def _scripted_scores(monkeypatch: pytest.MonkeyPatch, offsets: list[float]) -> list[float]:
    """Every validation score of the pass, in order, as points relative to the teacher's;
    returns the list the pass consumes (empty once every score was used)."""
    from onnxcompress.passes import lct_scoring

    remaining = list(offsets)

    def score(
        self: object, module: object, limit: int | None = None, deadline: Any = None
    ) -> float:
        return float(self.teacher_score) + remaining.pop(0)  # type: ignore[attr-defined]

    monkeypatch.setattr(lct_scoring.Scorer, "score", score)
    # Checks and attempts read scores on the teacher's scale: the same script.
    monkeypatch.setattr(lct_scoring.Scorer, "score_on_teacher_scale", score)
    return remaining


def _gradual_level(index: int, count: int, progress: float) -> float:
    """The level of the ``index``-th least significant of ``count`` layers (stagger 0.5)."""
    start = 0.5 * index / (count - 1)
    done = min(1.0, max(0.0, (progress - start) / (1.0 - start)))
    return 1.0 - (1.0 - done) ** 3


def _assert_unchanged(model: ir.Model, original: ir.Model) -> None:
    assert [node.op_type for node in model.graph] == [node.op_type for node in original.graph]
    for name, value in original.graph.initializers.items():
        assert value.const_value is not None
        kept = model.graph.initializers[name].const_value
        assert kept is not None and np.array_equal(kept.numpy(), value.const_value.numpy())


# ---------------------------------------------------------------------------------------------
# Which check the projector keeps
# ---------------------------------------------------------------------------------------------


def _projector_after(scores: list[float], keep_above: float = -1.0) -> GradualProjector:
    """A projector (floor -2) after one check per score, evenly spaced; no weights projected."""
    layers: Any = [SimpleNamespace(node=f"layer{i}") for i in range(3)]
    feed = iter(scores)
    projector = GradualProjector(
        layers, 1.0, 0.5, len(scores), False, lambda m: next(feed), -2.0, keep_above=keep_above
    )
    module = torch.nn.Linear(2, 2)
    for step in range(1, len(scores) + 1):
        with torch.no_grad():
            module.weight.fill_(step)  # the weights tell which check they were copied at
        projector(module, step / len(scores))
    return projector


@pytest.mark.parametrize(
    ("scores", "kept_at", "kept_weight"),
    [
        # Within max_drop (-1) at 0.25 and 0.5: the furthest of them, though 0.25 scored higher.
        ([-0.2, -0.9, -1.5, -1.1], 0.5, 2.0),
        # None within: the highest-scoring check that passed (-1.2 at 0.5), not the furthest.
        ([-1.6, -1.2, -1.9, -1.4], 0.5, 2.0),
        # A tie keeps the furthest; a check below the floor (-2.5) is never kept.
        ([-1.3, -1.3, -2.5, -2.6], 0.5, 2.0),
        # A check within max_drop (-0.95) beats those that only passed, before it or after.
        ([-1.1, -1.2, -0.95, -1.9], 0.75, 3.0),
    ],
)
def test_the_projector_keeps_the_best_check_that_passed(
    monkeypatch: pytest.MonkeyPatch, scores: list[float], kept_at: float, kept_weight: float
) -> None:
    monkeypatch.setattr(GradualProjector, "_project_at", lambda self, module: None)
    projector = _projector_after(scores)
    assert projector.snapshot is not None
    at, state, top1 = projector.snapshot
    assert at == pytest.approx(kept_at)
    assert top1 == scores[round(kept_at * 4) - 1]
    assert torch.all(state["weight"] == kept_weight)


def test_the_projector_keeps_nothing_when_no_check_passed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(GradualProjector, "_project_at", lambda self, module: None)
    assert _projector_after([-2.5, -3.0, -2.1, -4.0]).snapshot is None


# ---------------------------------------------------------------------------------------------
# The pass: low-rank gradual run, as in the issue
# ---------------------------------------------------------------------------------------------


def test_lowrank_gradual_keeps_an_early_check_that_holds_and_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's run: the ramp pauses, no check is within max_drop on its sample, the end of
    the ramp and the recovery miss max_drop; the best check (the first: -1.2) is scored again
    on the whole validation set, holds there (-0.9), and is the result."""
    torch.set_num_threads(1)
    # Checks (pass, pass, pause, back to 50 %), end of ramp, recovery, the re-scored check.
    left = _scripted_scores(monkeypatch, [-1.2, -1.9, -2.5, -2.6, -1.5, -1.7, -0.9])
    model = load_model(DIGITS_MODEL)
    macs_before = model_metrics(model).macs
    lct = create_pass("lct", {**GRADUAL, **LOWRANK}, _context())
    assert lct(model).modified
    assert left == []
    report = lct.report
    summary = report.summary
    reference = summary["reference_top1"]
    assert [r["stage"] for r in summary["stages"]][-3:] == ["end", "final", "fallback"]
    assert summary["fallback"] == {
        "schedule_share": 0.25,
        "check_top1": pytest.approx(reference - 1.2),
        "top1": pytest.approx(reference - 0.9),
        "kept": True,
    }
    assert summary["final_top1"] == pytest.approx(reference - 0.9)
    assert "best-scoring check that passed" in summary["stopped"]
    # Two of the four checks paused the schedule (the records after the ramp are no checks).
    assert "2 of 4 checks fell below" in summary["stopped"]
    # The console is told what was kept and why.
    (note,) = [n for n in report.notes if n.startswith("lct kept")]
    assert "25% of the schedule" in note and f"{reference - 0.9:.2f}" in note
    assert "max_drop=1.0" in note
    # The written model is the check's: each layer at that point's rank, factorized.
    rows = sorted(report.layers, key=lambda row: row["significance"])
    expected = [_gradual_level(i, len(rows), 0.25) for i in range(len(rows))]
    assert [row["level"] for row in rows] == pytest.approx(expected)
    assert any(row["rank"] < row["full_rank"] for row in rows)
    assert model_metrics(model).macs < macs_before
    assert summary["macs_after"] == model_metrics(model).macs


@pytest.mark.parametrize(
    ("scores", "fragment"),
    [
        # Checks passed, but the best one is beyond max_drop on the whole set too (-1.3).
        ([-1.2, -1.9, -2.5, -2.6, -1.5, -1.7, -1.3], "is beyond it too"),
        # No check passed (the schedule never moved off 0): nothing to fall back to; no
        # recovery either, with nothing collapsed.
        ([-2.5, -2.6, -2.7, -2.8, -1.5], "no check on the way passed"),
    ],
)
def test_lowrank_gradual_with_nothing_that_holds_leaves_the_model_and_says_so(
    monkeypatch: pytest.MonkeyPatch, scores: list[float], fragment: str
) -> None:
    torch.set_num_threads(1)
    left = _scripted_scores(monkeypatch, scores)
    model = load_model(DIGITS_MODEL)
    original = load_model(DIGITS_MODEL)
    lct = create_pass("lct", {**GRADUAL, **LOWRANK}, _context())
    assert not lct(model).modified
    assert left == []
    _assert_unchanged(model, original)
    report = lct.report
    assert fragment in report.summary["stopped"]
    assert "left as it was" in report.summary["stopped"]
    # Said plainly on the console, not only in the report's JSON.
    (note,) = report.notes
    assert note.startswith("lct left the model unchanged: ") and fragment in note
    assert "below the original's" in note
    assert not any(n.startswith("lct kept") for n in report.notes)
    assert all(row["level"] == 0 and not row["collapsed"] for row in report.layers)
    # The target miss names the reason too.
    (target,) = report.targets
    assert not target.met and fragment in target.reason


# ---------------------------------------------------------------------------------------------
# The staged schedule says the same
# ---------------------------------------------------------------------------------------------

STAGED = {
    "schedule": "staged",
    "stages": 2,
    "epoch_samples": 64,
    "retries": 0,
    "max_drop": 1.0,
    "slack": 1.0,
}
STAGED.update({"sparsity": 0.8, "final_epochs": 1})


def test_staged_fallback_to_an_earlier_stage_is_said_on_the_console(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.set_num_threads(1)
    # Stage 1 within max_drop, stage 2 within slack only, the final fine-tune beyond max_drop.
    _scripted_scores(monkeypatch, [-0.5, -1.5, -1.2])
    lct = create_pass("lct", STAGED, _context())
    assert lct(load_model(DIGITS_MODEL)).modified
    (note,) = lct.report.notes
    assert note.startswith("lct kept stage 1 ") and "1.20 points below" in note


def test_staged_run_with_nothing_within_max_drop_says_the_model_is_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.set_num_threads(1)
    _scripted_scores(monkeypatch, [-1.5, -1.8, -1.1])
    lct = create_pass("lct", STAGED, _context())
    assert not lct(load_model(DIGITS_MODEL)).modified
    (note,) = lct.report.notes
    assert note.startswith("lct left the model unchanged: no stage stayed within max_drop")
