"""Budgets a compression run must meet (MACs, params, latency, accuracy drop) and how to check them.

A recipe or the command line sets them; the pipeline checks them after every stage, stops at the
first one a stage breaks and keeps the best model that met them all.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from onnxcompress.errors import PassConfigError
from onnxcompress.pipeline.slowdown import SLOWER_MARGIN

logger = logging.getLogger(__name__)

# Latency comparisons on a shared machine drift; the original and the candidate are timed
# interleaved, in this many rounds, and the medians compared.
DEFAULT_LATENCY_RUNS = 30
DEFAULT_LATENCY_WARMUP = 5
# A budget target counts as met up to this fraction of the original above it (the passes'
# default tolerance). Overshooting is judged where it happens: a pass handed the budget checks
# its own result on both sides, while steps the user sized explicitly may cut further.
TARGET_TOLERANCE = 0.02


@dataclasses.dataclass
class Budget:
    """What the compressed model must meet, relative to the original.

    Attributes:
        target_macs: at most this fraction of the original's MACs.
        target_params: at most this fraction of the original's parameters.
        target_latency: at most this fraction of the original's p50 latency in ONNX Runtime
            (provider and batch of ``LatencySettings``), measured on this machine.
        max_drop: top-1 accuracy on the validation data may fall at most this many points below
            the original's.
    """

    target_macs: float | None = None
    target_params: float | None = None
    target_latency: float | None = None
    max_drop: float | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise PassConfigError for a value out of range."""
        for name in ("target_macs", "target_params", "target_latency"):
            value = getattr(self, name)
            if value is not None and not (0.0 < float(value) <= 1.0):
                raise PassConfigError(
                    f"budget {name}={value} is out of range: give a fraction in (0, 1] of the "
                    "original (e.g. 0.5 for half)"
                )
        if self.max_drop is not None and not (math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise PassConfigError(
                f"budget max_drop={self.max_drop} must be >= 0 (accuracy points, e.g. 1.0)"
            )

    @property
    def targets(self) -> dict[str, float]:
        """The size/speed targets that are set, by name."""
        names = ("target_macs", "target_params", "target_latency")
        return {n: float(getattr(self, n)) for n in names if getattr(self, n) is not None}

    def is_empty(self) -> bool:
        return not self.targets and self.max_drop is None

    def merged(self, overrides: Budget) -> Budget:
        """This budget with every field ``overrides`` sets replaced (CLI over recipe)."""
        values = dataclasses.asdict(self)
        values.update({k: v for k, v in dataclasses.asdict(overrides).items() if v is not None})
        return Budget(**values)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], where: str) -> Budget:
        """Build from a recipe's ``[budget]`` table; unknown keys and non-numbers raise."""
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs: dict[str, float] = {}
        for key, value in values.items():
            if key not in fields:
                raise PassConfigError(
                    f"{where}: [budget] has no key {key!r} (keys: {', '.join(sorted(fields))})"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise PassConfigError(f"{where}: [budget] {key} = {value!r} must be a number")
            kwargs[key] = float(value)
        return cls(**kwargs)


@dataclasses.dataclass
class BudgetCheck:
    """How one model stands against a budget.

    Attributes:
        ratios: the measured fraction of the original per target (``macs``, ``params``,
            ``latency``), for the targets that are set.
        drop: accuracy points lost against the original (None without validation data).
        missed: targets not reached yet, as readable text.
        broken: constraints broken (``max_drop``), as readable text.
    """

    ratios: dict[str, float]
    drop: float | None
    missed: list[str]
    broken: list[str]

    @property
    def targets_met(self) -> bool:
        return not self.missed

    @property
    def constraints_met(self) -> bool:
        return not self.broken

    def as_dict(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "drop": self.drop,
            "missed": self.missed,
            "broken": self.broken,
            "targets_met": self.targets_met,
            "constraints_met": self.constraints_met,
        }


def check_budget(
    budget: Budget,
    *,
    macs_ratio: float,
    params_ratio: float,
    latency_ratio: float | None = None,
    drop: float | None = None,
) -> BudgetCheck:
    """Compare measured ratios and the accuracy drop with ``budget``.

    Targets are goals a run works towards (missing one is reported, not fatal), met up to
    ``TARGET_TOLERANCE`` of the original above them; ``max_drop`` is a constraint a kept model
    must never break.
    """
    ratios: dict[str, float] = {}
    missed: list[str] = []
    measured = {"macs": macs_ratio, "params": params_ratio, "latency": latency_ratio}
    for name, target in budget.targets.items():
        key = name.removeprefix("target_")
        value = measured[key]
        if value is None:
            missed.append(f"{key}: not measured")
            continue
        ratios[key] = value
        if value > target + TARGET_TOLERANCE:
            text = f"{key} at {value:.3f} of the original (target {target:.3f})"
            if key == "latency" and value > 1.0 + SLOWER_MARGIN:
                text += ": slower than the original"
            missed.append(text)
    broken: list[str] = []
    if budget.max_drop is not None and drop is not None and drop > budget.max_drop:
        broken.append(f"accuracy dropped {drop:.2f} points (max_drop {budget.max_drop:.2f})")
    return BudgetCheck(ratios, drop, missed, broken)


# ---------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LatencySettings:
    """Where and how latency budgets are measured.

    Attributes:
        provider: ONNX Runtime provider (``cpu``, ``cuda``, ...); None picks the best available.
        batch: images per run.
        threads: intra-op threads (None: ONNX Runtime's default).
        warmup: untimed runs of each model first.
        runs: timed runs of each model, interleaved.
    """

    provider: str | None = None
    batch: int = 1
    threads: int | None = None
    warmup: int = DEFAULT_LATENCY_WARMUP
    runs: int = DEFAULT_LATENCY_RUNS

    def __post_init__(self) -> None:
        if self.batch < 1 or self.runs < 1 or self.warmup < 0:
            raise PassConfigError(
                f"latency settings: batch and runs must be >= 1, warmup >= 0 (got batch "
                f"{self.batch}, runs {self.runs}, warmup {self.warmup})"
            )


class LatencyMeter:
    """Times candidates against the original, interleaved so machine drift cancels out.

    The original's session is built once; every ``compare`` call times the original again beside
    the candidate (``settings.runs`` runs each), and the ratio of their medians is what budgets
    use. The timing loop is ``runtime.latency_table.InterleavedTimer``.
    """

    def __init__(self, original: Any, settings: LatencySettings, seed: int = 0) -> None:
        from onnxcompress.runtime.latency_table import InterleavedTimer, LatencyTarget

        self.settings = settings
        target = LatencyTarget(settings.provider, settings.batch, settings.threads)
        self._timer = InterleavedTimer(
            original,
            target,
            warmup=settings.warmup,
            min_runs=settings.runs,
            max_runs=settings.runs,
            min_seconds=0.0,
            seed=seed,
        )

    def compare(self, candidate: Any) -> tuple[float, float]:
        """p50 latency (ms) of the original and of ``candidate``, measured interleaved."""
        reference_ms, candidate_ms = self._timer.medians(candidate)
        logger.info("latency p50: original %.3f ms, candidate %.3f ms", reference_ms, candidate_ms)
        return reference_ms, candidate_ms


__all__ = ["Budget", "BudgetCheck", "LatencyMeter", "LatencySettings", "check_budget"]
