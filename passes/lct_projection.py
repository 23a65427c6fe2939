"""The projections of the ``lct`` pass after every optimizer step: each layer collapsed onto its
constraint set (its zeros, or its rank), on the staged schedule or on the gradual one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from onnxcompress.deadline import Clock
from onnxcompress.passes.lct_layers import Layer

if TYPE_CHECKING:
    import torch

    from onnxcompress.torch_bridge.module import OnnxModule

# The pass's own logger, as before its modules were split: ``-v`` lines still name ``lct``.
logger = logging.getLogger("onnxcompress.passes.lct")


class Projector:
    """The projection after every optimizer step: collapse each layer onto its constraint set.

    Layers already accepted sit at their accepted level; the stage's layers move from their
    accepted level to the attempt's level over the first ``ramp`` of the attempt with a cubic
    schedule (fast first, gentle last, as in gradual magnitude pruning), which is sigma_l
    growing.
    """

    def __init__(
        self,
        fixed: Sequence[Layer],
        growing: dict[str, float],
        layers: Sequence[Layer],
        ramp: float,
        lowrank: bool,
    ) -> None:
        """Args:
        fixed: accepted layers outside the stage, projected at their ``level``.
        growing: the stage's layers (by node name) and the level this attempt reaches.
        layers: every layer the stage may name.
        ramp: the fraction of the attempt (of its steps or its time budget, as the trainer
            counts it, so that every process agrees) after which the stage is at its level.
        lowrank: project onto a rank (else onto a count of zeros).
        """
        self.fixed = list(fixed)
        by_name = {layer.node: layer for layer in layers}
        self.growing = [(by_name[name], level) for name, level in growing.items()]
        self.ramp = ramp
        self.lowrank = lowrank
        self.steps = 0

    def fraction(self, progress: float) -> float:
        done = min(1.0, progress / self.ramp) if self.ramp > 0 else 1.0
        return 1.0 - (1.0 - done) ** 3

    def __call__(self, module: OnnxModule, progress: float) -> None:
        self.steps += 1
        grown = self.fraction(progress)
        for layer in self.fixed:
            self.project(module, layer, layer.level)
        for layer, level in self.growing:
            start, end = layer.count_at(layer.level), layer.count_at(level)
            self.project_count(module, layer, start + round(grown * (end - start)))

    def finish(self, module: OnnxModule) -> None:
        """Put every layer exactly at its level for this attempt, however far the ramp got."""
        for layer in self.fixed:
            self.project(module, layer, layer.level)
        for layer, level in self.growing:
            self.project(module, layer, level)

    def project(self, module: OnnxModule, layer: Layer, level: float) -> None:
        self.project_count(module, layer, layer.count_at(level))

    def project_count(self, module: OnnxModule, layer: Layer, count: int) -> None:
        param = module.param_for(layer.weight)
        if self.lowrank:
            project_rank(param.data, layer, count)
        else:
            project_sparse(param.data, count)


class GradualProjector(Projector):
    """Every layer moves from dense to its target on one cubic schedule; sigma_l grows along
    the ranking, the less significant layers starting earlier.

    The schedule advances with the run until ``ramp_end``, and is checked ``checks`` times on
    validation images on the way: a check below ``floor`` pauses it (the constraints hold and
    the network trains to recover), the next check that passes resumes it, and a second failed
    check in a row moves it back to where the last passing check stood (zeroed weights may
    grow back under the lower count). After ``ramp_end`` the constraints hold where the
    schedule got to.
    """

    def __init__(
        self,
        ranked: Sequence[Layer],
        ramp_end: float,
        stagger: float,
        checks: int,
        lowrank: bool,
        check: Any,
        floor: float,
        keep_above: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        """Args:
        ranked: the layers, least significant first.
        ramp_end: the fraction of the run after which the schedule no longer advances; a
            schedule never paused reaches every target there.
        stagger: the last layer starts this fraction of the way to ``ramp_end``.
        checks: validation checks, evenly spaced over the run up to ``ramp_end``.
        lowrank: project onto a rank (else onto a count of zeros).
        check: scores the student (validation top-1) and leaves it in training mode.
        floor: the lowest top-1 a check may pass with.
        keep_above: None: no check keeps weights. Else a check that passes keeps a copy of the
            weights when it is the best so far: the fallback if the run ends below this top-1
            (``max_drop``). The best is the furthest check at or above ``keep_above``; while
            none is, the highest-scoring check that passed (ties: the furthest), which the
            whole validation set may still find within it (a check scores a sample).
        clock: times the checks' records (default ``time.monotonic``).
        """
        super().__init__([], {}, ranked, ramp_end, lowrank)
        self.ranked = list(ranked)
        last = max(1, len(self.ranked) - 1)
        self.starts = [stagger * ramp_end * index / last for index in range(len(self.ranked))]
        self.ramp_end = ramp_end
        self.check_at = [ramp_end * (k + 1) / checks for k in range(checks)]
        self.check, self.floor = check, floor
        self.at = 0.0  # where the schedule stands, in run progress (at most ramp_end)
        self.passed = 0.0  # where it stood at the last check that passed
        self.paused = False
        self.failed_in_a_row = 0
        self.progress = 0.0
        self.history: list[dict[str, Any]] = []
        self.clock = clock if clock is not None else time.monotonic
        self.started = self.clock()
        self.keep_above = keep_above
        # (schedule position, weights, check top-1) of the best check (see keep_above).
        self.snapshot: tuple[float, dict[str, Any], float] | None = None

    def level(self, index: int, at: float) -> float:
        """Layer ``index``'s level with the schedule at ``at`` (cubic: fast first)."""
        start, end = self.starts[index], self.ramp_end
        done = 1.0 if end <= start else min(1.0, max(0.0, (at - start) / (end - start)))
        return 1.0 - (1.0 - done) ** 3

    def share(self, at: float | None = None) -> float:
        """How far along its way to the targets the schedule is at ``at`` (default: now)."""
        # ramp_end = 1 - final_share > 0 (final_share < 1 is validated).
        return (self.at if at is None else at) / self.ramp_end

    def levels(self, at: float | None = None) -> list[float]:
        """Every layer's level where the schedule stands (or at ``at``)."""
        at = self.at if at is None else at
        return [self.level(index, at) for index in range(len(self.ranked))]

    @property
    def halted(self) -> str | None:
        """Why the schedule ended short of the targets (None when it reached them)."""
        if self.at >= self.ramp_end:
            return None
        # The pass appends its own records (end of the ramp, recovery) to the same history.
        checks = [record for record in self.history if record["stage"] == "ramp"]
        paused = sum(1 for record in checks if not record["accepted"])
        return (
            f"the schedule reached {100 * self.share():.0f}% of its way to the "
            f"targets: {paused} of {len(checks)} checks fell below {self.floor:.2f} and "
            "paused it"
        )

    def _project_at(self, module: OnnxModule) -> None:
        for index, layer in enumerate(self.ranked):
            self.project(module, layer, self.level(index, self.at))

    def __call__(self, module: OnnxModule, progress: float) -> None:
        self.steps += 1
        if not self.paused:
            step = min(progress, self.ramp_end) - min(self.progress, self.ramp_end)
            self.at = min(self.ramp_end, self.at + max(0.0, step))
        self.progress = progress
        due = False
        while self.check_at and progress >= self.check_at[0]:
            self.check_at.pop(0)
            due = True
        if due:
            # One check however many points the step went past: under a time budget a check
            # moves the clock, and a check per point passed would cascade past the budget.
            self._project_at(module)
            self._check(module)
        self._project_at(module)

    def keep(self, module: OnnxModule, top1: float) -> None:
        """Keep a copy of the weights as the fallback if this check is the best so far (see
        ``keep_above``); a check at the start of the schedule has nothing to keep."""
        if self.at > 0 and self._better(top1):
            state = {name: value.detach().clone() for name, value in module.state_dict().items()}
            self.snapshot = (self.at, state, top1)

    def _better(self, top1: float) -> bool:
        """Whether a check scoring ``top1`` here beats the kept one as the fallback."""
        if self.snapshot is None:
            return True
        at, _, kept = self.snapshot
        bar = self.floor if self.keep_above is None else self.keep_above
        within, kept_within = top1 >= bar, kept >= bar
        if within != kept_within:
            return within
        if within:
            return self.at >= at
        return (top1, self.at) >= (kept, at)

    def _check(self, module: OnnxModule) -> None:
        top1 = self.check(module)
        ok = top1 >= self.floor
        if self.keep_above is not None and ok:
            self.keep(module, top1)
        if ok:
            self.passed, self.paused, self.failed_in_a_row = self.at, False, 0
            action = "go on"
        else:
            self.paused = True
            self.failed_in_a_row += 1
            action = "pause"
            if self.failed_in_a_row >= 2 and self.at > self.passed:
                self.at = self.passed
                action = "back to the last check that passed"
        self.history.append(
            {
                "stage": "ramp",
                "attempt": len(self.history) + 1,
                "increment": round(self.share(), 4),
                "layers": [
                    layer.node
                    for index, layer in enumerate(self.ranked)
                    if self.level(index, self.at) > 0
                ],
                "top1": top1,
                "accepted": ok,
                "accepted_top1": top1,
                "steps": self.steps,
                "seconds": round(self.clock() - self.started, 1),
            }
        )
        logger.info(
            "lct gradual check %d: schedule at %.0f%%, top-1 %.2f (floor %.2f) -> %s",
            len(self.history),
            100 * self.share(),
            top1,
            self.floor,
            action,
        )

    def finish(self, module: OnnxModule) -> None:
        """Put every layer exactly at its final level. The run is over: a schedule running
        then also advances over what the last step left of the progress (a time budget ends
        short of progress 1)."""
        if not self.paused:
            left = max(0.0, self.ramp_end - min(self.progress, self.ramp_end))
            self.at = min(self.ramp_end, self.at + left)
        self._project_at(module)


def project_sparse(weight: torch.Tensor, zeros: int) -> None:
    """Set the ``zeros`` smallest-magnitude entries of ``weight`` to zero, in place.

    This is sigma-constrained projection with sigma_l the magnitude at that rank: the count is
    exact whatever the ties, so the promised sparsity holds at every step.
    """
    import torch

    if zeros <= 0:
        return
    flat = weight.view(-1)
    zeros = min(zeros, flat.numel())
    index = torch.topk(flat.abs(), zeros, largest=False, sorted=False).indices
    flat[index] = 0


def project_rank(weight: torch.Tensor, layer: Layer, rank: int) -> None:
    """Replace ``weight`` by its best rank-``rank`` approximation (as the layer's matrix)."""
    import torch

    if rank >= layer.full_rank:
        return
    transposed = layer.op == "Gemm" and not layer.trans_b
    matrix = weight.t() if transposed else weight.reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    low = ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)
    weight.copy_((low.t() if transposed else low).reshape(weight.shape))
