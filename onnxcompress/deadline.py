"""Time budgets as one clock per step: a ``Deadline`` that every phase of a step draws from.

A step with ``time_budget_s`` makes one deadline when it starts; data loading, fits, scoring and
training take their time from it, and a sub-deadline never outlasts its parent, so the step ends
within its budget whichever phase runs long.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

from onnxcompress.errors import PassConfigError

Clock = Callable[[], float]


class BudgetTooShortError(PassConfigError):
    """A time budget cannot hold the minimum work of a step; raised before that work starts.

    A ``PassConfigError``: the user chose the budget, and the CLI prints it in one line and exits
    with code 2. A pass that starts a sub-run (a fine-tune) may catch it to skip that run.
    """


class ManualClock:
    """A clock that moves only when told to: tests and simulations of a time budget.

    A test advances it per unit of work (a training step, a fit) to prove that a phase stops when
    its deadline is spent, without asserting on the wall clock of a shared machine.
    """

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock does not go back ({seconds} s)")
        self.now += seconds


class Deadline:
    """A time budget started on a clock: what is left, what is spent, sub-deadlines of it.

    ``Deadline(None)`` has no limit (``remaining()`` is infinite and it never expires), so code
    that draws from a deadline runs unchanged without a budget.

    Attributes:
        label: the step the budget belongs to, for messages ("resect", "finetune").
        clock: seconds from an arbitrary origin (``time.monotonic`` unless injected).
        started / end: clock readings when it started and when it ends (``inf``: no limit).
        phases: seconds spent per named phase (``phase()``), for the step's report.
    """

    def __init__(
        self,
        budget_s: float | None,
        *,
        clock: Clock | None = None,
        label: str = "",
    ) -> None:
        if budget_s is not None and not budget_s >= 0:
            raise ValueError(f"a time budget must be >= 0 seconds, not {budget_s}")
        self.clock: Clock = clock if clock is not None else time.monotonic
        self.label = label
        self.started = self.clock()
        self.end = math.inf if budget_s is None else self.started + budget_s
        self.phases: dict[str, float] = {}
        # A sub-deadline is a share of someone's budget, not the budget the user gave.
        self.is_share = False

    def __repr__(self) -> str:
        budget = "unlimited" if self.budget_s is None else f"{self.budget_s:.3g} s"
        return f"Deadline({self.label or 'step'}: {budget}, {self.spent():.3g} s spent)"

    @property
    def budget_s(self) -> float | None:
        """The seconds this deadline was given (None: no limit)."""
        return None if math.isinf(self.end) else self.end - self.started

    @property
    def limited(self) -> bool:
        """Whether the deadline has a budget at all."""
        return self.budget_s is not None

    def spent(self) -> float:
        """Seconds since the deadline started."""
        return self.clock() - self.started

    def remaining(self) -> float:
        """Seconds left (never negative; infinite without a budget)."""
        return max(0.0, self.end - self.clock())

    def expired(self) -> bool:
        return self.clock() >= self.end

    def fits(self, seconds: float) -> bool:
        """Whether ``seconds`` of work would end within the deadline if started now."""
        return seconds <= self.remaining()

    def fraction_spent(self) -> float:
        """Spent over budget (0 without a budget)."""
        if self.budget_s is None:
            return 0.0
        return self.spent() / self.budget_s if self.budget_s > 0 else 1.0

    def within(self, seconds: float | None, label: str | None = None) -> Deadline:
        """A sub-deadline starting now that ends after ``seconds`` or with this one, if sooner.

        ``seconds=None``: the same end as this one (a deadline of its own for a sub-step's
        report). The sub-deadline shares the clock.
        """
        sub = Deadline(None, clock=self.clock, label=self.label if label is None else label)
        if seconds is not None:
            sub.end = min(self.end, sub.started + max(0.0, seconds))
        else:
            sub.end = self.end
        sub.is_share = True
        return sub

    def share(self, fraction: float, reserve: float = 0.0, label: str | None = None) -> Deadline:
        """A sub-deadline of ``fraction`` of what is left after keeping back ``reserve`` seconds
        (for the phases that must follow); without a budget, an unlimited one."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"a share of the time left must be in [0, 1], not {fraction}")
        if not self.limited:
            return self.within(None, label)
        return self.within(max(0.0, self.remaining() - reserve) * fraction, label)

    def require(self, seconds: float, needs: str, step: str | None = None) -> None:
        """Refuse up front, with ``BudgetTooShortError``, when ``seconds`` of minimum work do not
        fit in what is left.

        Args:
            seconds: the estimated minimum still to do (an estimate should err low: a budget
                that would work must not be refused).
            needs: what that minimum is, in words, for the message ("3 validation passes over
                5000 images (~2.1 s each) and one training step").
            step: who refuses (default: ``label``).
        """
        if self.fits(seconds):
            return
        spent = self.spent()
        assert self.budget_s is not None  # an unlimited deadline fits everything
        already = f"; {spent:.1f} s already spent" if spent >= 0.05 else ""
        budget = (
            f"the {self.budget_s:.1f} s left of its time budget"
            if self.is_share
            else f"time_budget_s={self.budget_s:g}"
        )
        advice = (
            "give the step more time"
            if self.is_share
            else f"give a budget of at least {math.ceil(spent + seconds)} s"
        )
        raise BudgetTooShortError(
            f"{step or self.label or 'step'}: {budget} cannot hold the minimum work: {needs}, "
            f"about {seconds:.1f} s{already}; {advice}"
        )

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Count the seconds of the block towards phase ``name`` (added up over calls)."""
        tic = self.clock()
        try:
            yield
        finally:
            self.phases[name] = self.phases.get(name, 0.0) + self.clock() - tic

    def report(self) -> dict[str, Any]:
        """The budget, what was spent, and where it went: for a pass's report summary."""
        return {
            "budget_s": None if self.budget_s is None else round(self.budget_s, 3),
            "spent_s": round(self.spent(), 3),
            "phases_s": {name: round(seconds, 3) for name, seconds in self.phases.items()},
        }


__all__ = ["BudgetTooShortError", "Clock", "Deadline", "ManualClock"]
