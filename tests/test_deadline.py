"""The Deadline every budgeted step draws from, on a clock the test moves by hand."""

from __future__ import annotations

import math

import pytest

from onnxcompress.deadline import BudgetTooShortError, Deadline, ManualClock
from onnxcompress.errors import PassConfigError


def test_remaining_spent_and_expiry_follow_the_clock() -> None:
    clock = ManualClock(100.0)
    deadline = Deadline(10.0, clock=clock, label="step")
    assert deadline.limited and deadline.budget_s == 10.0
    assert deadline.remaining() == 10.0 and deadline.spent() == 0.0
    clock.advance(4.0)
    assert deadline.remaining() == 6.0 and deadline.spent() == 4.0
    assert deadline.fraction_spent() == pytest.approx(0.4)
    assert deadline.fits(6.0) and not deadline.fits(6.5)
    assert not deadline.expired()
    clock.advance(7.0)
    assert deadline.expired() and deadline.remaining() == 0.0 and deadline.spent() == 11.0


def test_without_a_budget_nothing_expires() -> None:
    clock = ManualClock()
    deadline = Deadline(None, clock=clock)
    clock.advance(1e9)
    assert not deadline.limited and deadline.budget_s is None
    assert deadline.remaining() == math.inf and not deadline.expired()
    assert deadline.fraction_spent() == 0.0
    deadline.require(1e12, "anything")  # an unlimited budget refuses nothing
    assert deadline.within(5.0).budget_s == 5.0
    assert not deadline.share(0.5).limited


def test_a_sub_deadline_never_outlasts_its_parent() -> None:
    clock = ManualClock()
    parent = Deadline(10.0, clock=clock)
    clock.advance(6.0)
    longer = parent.within(100.0, label="training")
    assert longer.end == parent.end and longer.budget_s == 4.0 and longer.label == "training"
    shorter = parent.within(1.5)
    assert shorter.budget_s == 1.5 and shorter.started == 6.0
    same = parent.within(None)
    assert same.end == parent.end
    # A share of what is left after a reserve for the phases that follow.
    half = parent.share(0.5, reserve=2.0)
    assert half.budget_s == pytest.approx(1.0)
    assert parent.share(1.0, reserve=10.0).budget_s == 0.0
    with pytest.raises(ValueError):
        parent.share(1.5)
    clock.advance(4.0)
    assert longer.expired() and parent.expired() and shorter.expired()


def test_require_refuses_up_front_with_what_the_minimum_needs() -> None:
    clock = ManualClock()
    deadline = Deadline(30.0, clock=clock, label="lct")
    deadline.require(30.0, "everything")  # exactly fits
    clock.advance(12.0)
    with pytest.raises(BudgetTooShortError) as caught:
        deadline.require(25.0, "one training attempt")
    message = str(caught.value)
    assert isinstance(caught.value, PassConfigError)  # the CLI's one line and exit code 2
    assert message.startswith("lct: time_budget_s=30 cannot hold the minimum work")
    assert "one training attempt, about 25.0 s" in message
    assert "12.0 s already spent" in message and "at least 37 s" in message
    # A share says it is one, and does not advise a budget the user never gave.
    with pytest.raises(BudgetTooShortError, match=r"training: the 18\.0 s left of its time"):
        deadline.within(None, label="training").require(20.0, "a step")
    with pytest.raises(BudgetTooShortError, match=r"^cheapconv: "):
        deadline.require(20.0, "a step", step="cheapconv")


def test_phases_add_up_and_the_report_says_where_the_time_went() -> None:
    clock = ManualClock()
    deadline = Deadline(20.0, clock=clock)
    for seconds in (1.0, 2.0):
        with deadline.phase("data"):
            clock.advance(seconds)
    with pytest.raises(RuntimeError), deadline.phase("training"):
        clock.advance(5.0)
        raise RuntimeError("a phase that fails still counts")
    assert deadline.phases == {"data": 3.0, "training": 5.0}
    assert deadline.report() == {
        "budget_s": 20.0,
        "spent_s": 8.0,
        "phases_s": {"data": 3.0, "training": 5.0},
    }
    assert Deadline(None, clock=clock).report()["budget_s"] is None


def test_the_default_clock_is_monotonic_and_bad_values_are_refused() -> None:
    deadline = Deadline(1000.0)
    assert 0.0 <= deadline.spent() < 1000.0 and not deadline.expired()
    with pytest.raises(ValueError):
        Deadline(-1.0)
    with pytest.raises(ValueError):
        ManualClock().advance(-1.0)
