"""``lct``: layer-wise compressive training (significance ranking + projected SGD).

Grimaldi et al., "Layer-Wise Compressive Training for Convolutional Neural Networks" (Future
Internet 2019). One global magnitude threshold gives every layer its own sparsity; a layer left
sparser is less significant. The layers are then collapsed stage by stage in that order by
projected SGD: after every optimizer step the weights below each layer's threshold ``sigma_l``
are set to zero, ``sigma_l`` growing from 0 to its target over the stage, while the model
distills from the original. A stage is kept only if validation top-1 stays within ``max_drop``
(plus a ``slack`` that the final fine-tune is expected to win back) of the original; a stage that
breaks it is retried from the last accepted weights with half its increment (a bounded number of
times), and the run goes on with the next stage, so compression grows while accuracy holds; the
significant layers, whose stages are all rejected, stay dense. A final fine-tune at the accepted
constraints (``final_share`` of the time) recovers what the short stages could not; if it still
misses ``max_drop``, the result is the last stage that met it by itself. The collapsed weights
are stored compactly (``onnxcompress.graph.sparse_storage``), so the file really shrinks.

``subspace=lowrank`` (beyond the paper) ranks and trains the same way, but the projection is a
truncated SVD to rank ``r_l`` (ranks from a global spectral-energy threshold that meets
``target_macs``, or from a per-layer ``energy``); at the end each collapsed Conv becomes a kxk
Conv (Cin -> r) plus a 1x1 Conv (r -> Cout) and each Gemm two Gemms, so it runs faster.

``time_budget_s`` covers the whole pass from its start: loading the data, scoring the original,
the sensitivity ranking, every training attempt and its scoring, the final fine-tune and its
scoring, and writing the result. The minimum work, refused up front (``BudgetTooShortError``)
when the budget cannot hold it: loading the data and scoring the original on the validation
data (both measured: they come first) and one training attempt, one step (timed on a batch)
and its scoring. The sensitivity ranking measures the layers on as many validation images as
``SENSITIVITY_SHARE`` of the time allows (the paper's order when fewer than
``MIN_SENSITIVITY_SAMPLES`` fit); the stages, or the gradual ramp, get ``1 - final_share`` of
what is left then, and the final fine-tune the rest, less its scoring and the write-out.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import BudgetTooShortError, Clock, Deadline
from onnxcompress.errors import DataError, PassConfigError
from onnxcompress.fitting.lowrank import (
    break_even_rank,
    factorizable_reason,
    factorize,
    rank_cost,
    weight_matrix,
)
from onnxcompress.graph.model import clone_model, model_to_bytes, private_initializer
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction

if TYPE_CHECKING:
    import torch

    from onnxcompress.data import Dataset
    from onnxcompress.graph.metrics import ModelMetrics
    from onnxcompress.torch_bridge.module import OnnxModule

logger = logging.getLogger(__name__)

SUBSPACES = ("sparse", "lowrank")
SCHEDULES = ("staged", "gradual")
SPARSE_OPS = ("Conv", "Gemm", "MatMul")
DEFAULT_TARGET_MACS = 0.6
# Bisection steps on the log of the global spectral-energy threshold (lowrank by budget).
THRESHOLD_STEPS = 60
EVAL_BATCH = 256
# An attempt with less training time than this is not started (the budget is spent): the
# trainer's own setup (building the networks, timing its minimum work) takes about a second of
# it on the 2-core CPU, more under load, and an attempt refused for want of one step wastes it.
MIN_ATTEMPT_SECONDS = 3.0
# Under a time budget: the share of the time left (after the minimum work) the sensitivity
# ranking may take, and the fewest validation images worth measuring it on (fewer: the paper's
# order, from the magnitudes alone).
SENSITIVITY_SHARE = 0.1
MIN_SENSITIVITY_SAMPLES = 100
# Under a time budget the gradual ramp's checks (scoring ``check_samples`` images each) take at
# most this share of its time; fewer checks are run when ``checks`` would take more.
CHECK_SHARE = 0.25
# Kept back at the end of a budget for writing the result (weights, compact storage, sizes),
# beyond the measured cost of serializing the model once.
FINISH_SECONDS = 1.0
# The sparsity or MAC fraction reached counts as the target within this much on either side.
TARGET_TOLERANCE = 0.02


@dataclasses.dataclass
class LctConfig(PassConfig):
    """Options of the ``lct`` pass.

    Attributes:
        subspace: ``sparse`` (the paper: weights collapse to zero) or ``lowrank`` (weights
            collapse onto rank r_l, then each layer is factorized into two).
        sparsity: sparse: the global fraction of the candidate layers' weights set to zero by
            the one magnitude threshold; each layer's share of it is its target.
        max_layer_sparsity: no layer is pruned beyond this fraction (a layer at 100 % would cut
            the network).
        target_macs: lowrank: keep this fraction of the model's MACs (global allocation of
            ranks by one spectral-energy threshold); the default when ``energy`` is not given.
        energy: lowrank: instead of a budget, keep this fraction of each layer's squared
            singular values.
        max_drop: validation top-1 (points) the result may lose against the original.
        slack: a stage is kept while it is within ``max_drop + slack`` points; the final
            fine-tune must bring the model back within ``max_drop`` (else the last stage that
            was within it by itself is the result). Stages score right after a short fine-tune,
            which under-rates what a longer one recovers.
        sensitivity: refine the ranking by measuring each layer alone at its target on the
            validation data (accuracy drop; ties keep the paper's order).
        sensitivity_samples: validation images used for that measurement.
        schedule: ``staged`` (the paper: the ranked layers are collapsed stage by stage, each
            stage accepted or backed off on its own) or ``gradual`` (one run: every layer
            moves to its target on a cubic schedule that starts earlier the less significant
            the layer is; validation top-1 is checked ``checks`` times along the way, and a
            check more than ``max_drop + slack`` below the original pauses the schedule until
            a check passes again (two failures in a row move it back to the last check that
            passed); after the ramp (``1 - final_share`` of the run) the constraints hold and
            the network recovers in a fine-tune of its own that restarts its cosine at
            ``final_lr``; a run that still ends beyond ``max_drop`` falls back to the weights of
            the furthest check that was within it).
        stagger: gradual: the most significant layer starts its schedule this fraction of
            the way into the ramp (0: all layers start together).
        checks: gradual: validation checks along the ramp.
        check_samples: gradual: validation images scored at each check (spread over the set).
        epochs: gradual: epochs of the whole run when there is no ``time_budget_s``.
        stages: the ranked layers are collapsed in this many stages of similar weight.
        retries: a rejected stage is retried this many times from the last accepted weights,
            each time with half the increment (its layers go half as far towards their
            targets: zeros, or MACs saved by the rank cut), before the run moves on.
        epochs_per_stage: training epochs of each stage.
        epoch_samples: images per epoch (a fresh random subset each time); None: all.
        ramp: fraction of each stage over which sigma_l (or the rank cut) grows to its target.
            Gradual: the ramp ends at ``1 - final_share`` of the run.
        lr, batch_size, temperature, alpha, weight_decay: the distillation fine-tuning
            (``onnxcompress.torch_bridge.train.FinetuneConfig``). The learning rate is lower
            than a recovery fine-tune's because every stage starts from a trained model (at
            0.01, the first one-epoch stage on ResNet-20 CIFAR-10 ended 2.6 points down).
        final_share: share of ``time_budget_s`` kept for the final fine-tune (0: none);
            gradual: the share of the run (time, or ``epochs`` rounded) after the ramp.
        final_epochs: epochs of the final fine-tune without a time budget (0: none).
        final_lr: learning rate of the final fine-tune (a full cosine cycle). Gradual: the
            recovery restarts here because the ramp's own cosine has decayed by its end (on
            ResNet-20 CIFAR-10 a single cosine over ramp and recovery won back about 1 point
            in its last 30 %; restarted, the recovery won back 4.1 points in 7.5 minutes,
            ``benchmarks/results/lct_sparse_gradual2.md``).
        time_budget_s: wall time of the whole pass (see the module docstring); each attempt
            gets what is left of the stages' share divided by the stages left, so retries
            shorten later stages.
        compact: sparse: store the collapsed weights compactly (mask or gap encoding).
        values: sparse: ``float32`` stores the kept values exactly; ``float16`` (opt-in,
            lossy: 11 significant bits) halves their bytes and stores the collapsed layers
            that stay too dense for a mask as float16 too; ``int8`` (opt-in, lossy: symmetric
            per-output-channel quantization, the pruning + quantization of Deep Compression)
            stores one byte per kept value plus a float32 scale per channel.
        batchnorm: train with a BatchNormalization after every Conv, folded back into the
            convs after each fine-tune (``FinetuneConfig.batchnorm``; zeros and ranks survive
            the fold, which scales each output channel). The projection still acts on the
            conv's own weights, blind to the per-channel scale the BN adds, so the smallest
            weights of a layer are not exactly the least effective ones; not benchmarked yet.
        min_saving: lowrank: a layer is factorized only when that saves at least this
            fraction of its MACs (two small convolutions cost more than their MACs say); a
            layer cut less keeps its low-rank weights in one dense layer (same outputs).
        round_to: lowrank: ranks are multiples of this (the channel block of the CPU kernels;
            16 on AVX-512, 8 on AVX2), unless the full rank is smaller.
        exclude: node-name patterns (fnmatch, ``;``-separated on the command line) that stay
            dense.
        device: torch device for training (None: a GPU when visible).

    Data: training on the context's ``train_spec`` (the pipeline's ``--data``), else on the
    calibration batch; stages are accepted on ``validation_spec``, else on the calibration
    batch (then accuracy is measured on images the model trains on: give a held-out set).
    Labels are used when present; without them accuracy means agreement with the original.
    """

    subspace: str = "sparse"
    sparsity: float = 0.9
    max_layer_sparsity: float = 0.98
    target_macs: float | None = None
    energy: float | None = None
    max_drop: float = 1.0
    slack: float = 1.0
    sensitivity: bool = False
    sensitivity_samples: int = 1000
    schedule: str = "staged"
    stagger: float = 0.5
    checks: int = 10
    check_samples: int = 2000
    epochs: int = 10
    stages: int = 8
    retries: int = 2
    epochs_per_stage: int = 1
    epoch_samples: int | None = None
    ramp: float = 0.5
    lr: float = 0.003
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float = 0.9
    weight_decay: float = 5e-4
    final_share: float = 0.3
    final_epochs: int = 1
    final_lr: float = 0.01
    time_budget_s: float | None = None
    compact: bool = True
    values: str = "float32"
    batchnorm: bool = False
    min_saving: float = 0.25
    round_to: int = 8
    exclude: tuple[str, ...] = ()
    device: str | None = None

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise PassConfigError(
                f"schedule={self.schedule!r} is not one of {', '.join(SCHEDULES)}"
            )
        if not 0.0 <= self.stagger < 1.0:
            raise PassConfigError(f"stagger={self.stagger} is out of range: give [0, 1)")
        if self.checks < 1 or self.check_samples < 1 or self.epochs < 1:
            raise PassConfigError("checks, check_samples and epochs must be >= 1")
        if self.subspace not in SUBSPACES:
            raise PassConfigError(
                f"subspace={self.subspace!r} is not one of {', '.join(SUBSPACES)}"
            )
        if not 0.0 < self.sparsity < 1.0:
            raise PassConfigError(f"sparsity={self.sparsity} is out of range: give (0, 1)")
        if not 0.0 < self.max_layer_sparsity < 1.0:
            raise PassConfigError(
                f"max_layer_sparsity={self.max_layer_sparsity} is out of range: give (0, 1)"
            )
        if self.target_macs is not None and self.energy is not None:
            raise PassConfigError("give target_macs or energy, not both")
        if self.subspace == "lowrank" and self.target_macs is None and self.energy is None:
            self.target_macs = DEFAULT_TARGET_MACS
        check_fraction("target_macs", self.target_macs, allow_one=False)
        check_fraction("energy", self.energy, allow_one=False)
        if not (self.max_drop >= 0.0 and math.isfinite(self.max_drop)):
            raise PassConfigError(f"max_drop={self.max_drop} must be >= 0 (top-1 points)")
        if not (self.slack >= 0.0 and math.isfinite(self.slack)):
            raise PassConfigError(f"slack={self.slack} must be >= 0 (top-1 points)")
        if not 0.0 <= self.final_share < 1.0:
            raise PassConfigError(f"final_share={self.final_share} is out of range: give [0, 1)")
        if self.final_epochs < 0:
            raise PassConfigError(f"final_epochs={self.final_epochs} must be >= 0")
        if not self.final_lr > 0:
            raise PassConfigError(f"final_lr={self.final_lr} must be positive")
        from onnxcompress.graph.sparse_storage import VALUE_TYPES

        if self.values not in VALUE_TYPES:
            raise PassConfigError(f"values={self.values!r} is not one of {', '.join(VALUE_TYPES)}")
        if not 0.0 <= self.min_saving < 1.0:
            raise PassConfigError(f"min_saving={self.min_saving} is out of range: give [0, 1)")
        if self.round_to < 1:
            raise PassConfigError(f"round_to={self.round_to} must be >= 1")
        if self.stages < 1 or self.epochs_per_stage < 1 or self.sensitivity_samples < 1:
            raise PassConfigError("stages, epochs_per_stage and sensitivity_samples must be >= 1")
        if self.retries < 0:
            raise PassConfigError(f"retries={self.retries} must be >= 0")
        if self.epoch_samples is not None and self.epoch_samples < 1:
            raise PassConfigError(f"epoch_samples={self.epoch_samples} must be >= 1")
        if not 0.0 <= self.ramp <= 1.0:
            raise PassConfigError(f"ramp={self.ramp} is out of range: give [0, 1]")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise PassConfigError(f"time_budget_s={self.time_budget_s} must be positive")
        # The fine-tuning options are checked by FinetuneConfig itself, with its messages.
        self.finetune_config(None)

    def gradual_epochs(self) -> tuple[int, int]:
        """Gradual without a time budget: the ramp's epochs and the recovery's (maybe 0)."""
        if self.final_share <= 0.0:
            return self.epochs, 0
        ramp = min(self.epochs - 1, round(self.epochs * (1.0 - self.final_share)))
        ramp = max(1, ramp)
        return ramp, max(0, self.epochs - ramp)

    def finetune_config(
        self, stage_budget: float | None, final: bool = False, epochs: int | None = None
    ) -> Any:
        """The fine-tuning of one stage attempt or ramp (``epochs`` of them: default
        ``epochs_per_stage``), or of the final phase (``epochs``: default ``final_epochs``).
        Under a time budget the clock ends the run (the schedule follows the clock)."""
        from onnxcompress.torch_bridge.train import FinetuneConfig

        if stage_budget is not None:
            epochs = 10_000
        elif final:
            epochs = max(1, self.final_epochs if epochs is None else epochs)
        elif epochs is None:
            epochs = self.epochs_per_stage
        return FinetuneConfig(
            epochs=epochs,
            lr=self.final_lr if final else self.lr,
            batch_size=self.batch_size,
            temperature=self.temperature,
            alpha=self.alpha,
            weight_decay=self.weight_decay,
            epoch_samples=self.epoch_samples,
            time_budget_s=stage_budget,
            batchnorm=self.batchnorm,
            device=self.device,
        )


@dataclasses.dataclass
class Layer:
    """A candidate layer and its target.

    Attributes:
        node: the node's name.
        op: its op type.
        weight: the weight initializer's name.
        shape: the weight's shape.
        target_zeros: sparse: weights set to zero at the target.
        rank: lowrank: the target rank; full_rank: the weight matrix's full rank.
        macs / target_macs: the node's MACs now and once factorized at ``rank``.
        significance: the layer's place in the ranking (0: least significant).
        sensitivity: measured top-1 drop with this layer alone at its target.
        stage: the stage that collapses it.
        level: the accepted fraction of the way to the target (0: dense, 1: at the target);
            back-offs leave a layer part of the way.
        zeros: sparse: zeros measured in the written weight.
        trans_b: Gemm: whether the weight is stored (N, K).
        break_even: lowrank: the largest rank (a multiple of ``multiple``) that saves at least
            ``min_saving`` of the layer's MACs once factorized (0: none).
        multiple: lowrank: ranks below the full rank are multiples of this.
        rank_cost / positions: lowrank: MACs per rank and output position, and the positions.
    """

    node: str
    op: str
    weight: str
    shape: tuple[int, ...]
    target_zeros: int = 0
    rank: int = 0
    full_rank: int = 0
    macs: int = 0
    target_macs: int = 0
    significance: int = 0
    sensitivity: float | None = None
    stage: int = 0
    level: float = 0.0
    zeros: int = 0
    trans_b: bool = True
    break_even: int = 0
    rank_cost: int = 0
    positions: int = 1
    multiple: int = 1

    @property
    def elements(self) -> int:
        return math.prod(self.shape)

    @property
    def target_sparsity(self) -> float:
        return self.target_zeros / max(self.elements, 1)

    @property
    def accepted(self) -> bool:
        """Whether the layer ended collapsed (at least part of the way)."""
        return self.count_at(self.level) != self.count_at(0.0)

    def count_at(self, level: float) -> int:
        """The constraint at ``level``: zeros (sparse) or the rank (lowrank).

        A partial rank cut starts at the break-even rank, not at the full rank, so every level
        above 0 saves MACs once factorized, in proportion to the level (MACs are linear in the
        rank).
        """
        level = min(1.0, max(0.0, level))
        if self.full_rank:
            if level <= 0.0:
                return self.full_rank
            top = max(self.rank, min(self.break_even, self.full_rank))
            rank = top - round(level * (top - self.rank))
            # Up to the block multiple: a backed-off level cuts less, never more, and stays at
            # or below ``top`` (itself a multiple, as is the target).
            return min(top, -(-rank // self.multiple) * self.multiple)
        return round(level * self.target_zeros)

    def macs_at(self, level: float) -> int:
        """lowrank: the node's MACs with the rank at ``level`` (factorized when it is cut)."""
        rank = self.count_at(level)
        if rank >= self.full_rank:
            return self.macs
        return rank * self.rank_cost * self.positions

    @property
    def compression(self) -> float:
        """Share of the layer removed at the target: zeros, or MACs saved by the rank."""
        if self.full_rank:
            return 1.0 - self.target_macs / max(self.macs, 1)
        return self.target_sparsity


class _Projector:
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


class _GradualProjector(_Projector):
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
        keep_above: a check at or above this top-1 keeps a copy of the weights (the furthest
            such one is kept): the fallback if the run ends below it.
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
        # (schedule position, weights, check top-1) of the furthest check at keep_above.
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
        paused = sum(1 for record in self.history if not record["accepted"])
        return (
            f"the schedule reached {100 * self.share():.0f}% of its way to the "
            f"targets: {paused} of {len(self.history)} checks fell below {self.floor:.2f} and "
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
        """Keep a copy of the weights as the fallback if they are the furthest so far."""
        if self.at > 0 and (self.snapshot is None or self.at >= self.snapshot[0]):
            state = {name: value.detach().clone() for name, value in module.state_dict().items()}
            self.snapshot = (self.at, state, top1)

    def _check(self, module: OnnxModule) -> None:
        top1 = self.check(module)
        ok = top1 >= self.floor
        if self.keep_above is not None and top1 >= self.keep_above:
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


class LayerwiseCompressiveTraining(CompressionPass[LctConfig]):
    """Rank layers by significance and collapse the less significant ones by projected SGD."""

    name = "lct"
    config_class = LctConfig
    needs_data = True
    budget_options = ("target_macs", "energy")

    @classmethod
    def budget_targets(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        # Only low-rank factorization saves MACs; sparse weights cost ONNX Runtime the same.
        lowrank = str(options.get("subspace", "sparse")) == "lowrank"
        return ("target_macs",) if lowrank else ()

    def check_targets(self, before: ModelMetrics, after: ModelMetrics, report: PassReport) -> None:
        cfg = self.cfg
        summary = report.summary
        why = summary.get("stopped") or (report.declined[-1].reason if report.declined else "")
        if cfg.subspace == "lowrank" and cfg.target_macs is not None:
            reached = after.macs / before.macs if before.macs else 1.0
            report.check_target(
                "target_macs",
                cfg.target_macs,
                reached,
                tolerance=TARGET_TOLERANCE,
                reason=why
                or summary.get("budget_note", "")
                or "ranks are multiples of round_to and a layer is factorized only when that "
                "saves min_saving of its MACs",
            )
        elif cfg.subspace == "sparse":
            report.check_target(
                "sparsity",
                cfg.sparsity,
                float(summary.get("candidate_sparsity", 0.0)),
                tolerance=TARGET_TOLERANCE,
                reason=why or "stages that broke max_drop were left dense",
            )

    # The clock of ``time_budget_s`` (None: ``time.monotonic``); tests inject a ManualClock.
    clock: Clock | None = None

    def run(self, model: ir.Model, report: PassReport) -> None:
        # One deadline for the whole pass, started before anything else.
        self._deadline = Deadline(self.cfg.time_budget_s, clock=self.clock, label="lct")
        try:
            self._compress(model, report)
        finally:
            report.summary["time"] = self._deadline.report()

    def _compress(self, model: ir.Model, report: PassReport) -> None:
        from onnxcompress.graph.metrics import model_metrics
        from onnxcompress.graph.model import infer_shapes

        cfg, deadline = self.cfg, self._deadline
        self._report = report
        lowrank = cfg.subspace == "lowrank"
        teacher = clone_model(model)
        infer_shapes(model)
        tic = deadline.clock()
        bytes_before = len(model_to_bytes(model))
        # Writing the result serializes the model about three times (sizes, compact storage).
        self._finish_seconds = FINISH_SECONDS + 3 * (deadline.clock() - tic)
        macs_before = model_metrics(model).macs
        layers = self._candidates(model, report, lowrank)
        if not layers:
            report.decline("<model>", "no layer to compress (see the declined nodes)")
            return
        if lowrank:
            self._allocate_ranks(model, layers, report, macs_before)
            layers = [layer for layer in layers if 0 < layer.rank <= layer.break_even]
        else:
            self._allocate_sparsity(model, layers)
            layers = [layer for layer in layers if layer.target_zeros > 0]
        if not layers:
            report.decline("<model>", "the global target leaves every candidate layer dense")
            return
        with deadline.phase("data"):
            train, val = self._datasets(model)
        with deadline.phase("scoring"):
            scorer = _Scorer(teacher, val, cfg.device, deadline.clock)
        self._minimum_seconds = self._require_minimum(model, teacher, train, scorer)
        reference = scorer.teacher_score
        with deadline.phase("ranking"):
            self._rank(model, layers, scorer, lowrank, report)
        report.summary.update(
            {
                "subspace": cfg.subspace,
                "validation": val.name,
                "validation_images": len(val),
                "reference_top1": reference,
                "ranking": [layer.node for layer in layers],
                "schedule": cfg.schedule,
            }
        )
        if cfg.batchnorm:
            from onnxcompress.torch_bridge.batchnorm import add_missing_biases

            # The BNs folded after training leave biases (zeros where none were): the same
            # initializers here, so the trained module writes back by name.
            add_missing_biases(model)
        with deadline.phase("training"):
            if cfg.schedule == "gradual":
                accepted, history, stopped = self._train_gradual(
                    model, teacher, train, scorer, layers, lowrank, reference
                )
            else:
                stages = _split_stages(layers, cfg.stages, lowrank)
                accepted, history, stopped = self._train_stages(
                    model, teacher, train, scorer, stages, lowrank, reference
                )
        report.summary["stages"] = history
        if scorer.cut_short:
            report.summary["scorings_cut_short"] = scorer.cut_short
        if stopped is not None:
            report.summary["stopped"] = stopped
        if accepted is None:
            if cfg.schedule == "gradual":
                reason = (
                    f"the gradual run ended more than max_drop={cfg.max_drop} points below the "
                    "original's validation top-1, with no check on the way that held within it "
                    "on the whole validation set; the model is left as it was (raise max_drop "
                    "or the training budget, or lower the target)"
                )
            else:
                reason = (
                    f"no stage stayed within max_drop={cfg.max_drop} points of validation "
                    "top-1, even backed off; the model is left as it was (raise max_drop or "
                    "the training budget)"
                )
            report.decline("<model>", reason)
            self._report_layers(report, layers, {})
            return
        from onnxcompress.torch_bridge.writeback import write_back

        write_back(model, accepted.module)
        report.modified = True
        for layer in layers:
            layer.zeros = int(np.count_nonzero(_weight(model, layer) == 0))
        storage: dict[str, dict[str, Any]] = {}
        if lowrank:
            for layer in layers:
                if layer.accepted:
                    factorize(
                        model.graph, model.graph.node(layer.node), layer.count_at(layer.level)
                    )
            infer_shapes(model)
        elif cfg.compact:
            storage = self._store(model, layers)
        self._report_layers(report, layers, storage)
        after = model_metrics(model)
        collapsed = [layer for layer in layers if layer.accepted]
        elements = sum(layer.elements for layer in layers)
        zeros = sum(layer.count_at(layer.level) for layer in collapsed)
        report.summary.update(
            {
                "collapsed_layers": len(collapsed),
                "dense_layers": len(layers) - len(collapsed),
                "file_bytes_before": bytes_before,
                "file_bytes_after": len(model_to_bytes(model)),
                "macs_before": macs_before,
                "macs_after": after.macs,
                "final_top1": accepted.top1,
                "attempts": len(history),
                "accepted_attempts": sum(1 for record in history if record["accepted"]),
            }
        )
        if not lowrank:
            report.summary["candidate_sparsity"] = round(zeros / max(elements, 1), 6)
        report.summary["file_ratio"] = round(
            report.summary["file_bytes_before"] / max(report.summary["file_bytes_after"], 1), 3
        )

    # -- candidates and targets --------------------------------------------------------------

    def _candidates(self, model: ir.Model, report: PassReport, lowrank: bool) -> list[Layer]:
        graph = model.graph
        layers: list[Layer] = []
        for index, node in enumerate(list(graph)):
            if node.op_type not in SPARSE_OPS or node.domain not in ("", "ai.onnx"):
                continue
            label = node.name or f"{node.op_type}_{index}"
            if not node.name:
                node.name = label
            pattern = next((p for p in self.cfg.exclude if fnmatch.fnmatchcase(label, p)), None)
            if pattern is not None:
                report.decline(label, f"excluded by the user (exclude={pattern})")
                continue
            weight = node.inputs[1] if len(node.inputs) > 1 else None
            if weight is None or weight.const_value is None:
                report.decline(label, "its weight is computed, not an initializer")
                continue
            if weight.name in {v.name for v in graph.inputs}:
                report.decline(label, "its weight is also a graph input (the user may feed it)")
                continue
            if not weight.const_value.dtype.is_floating_point():
                report.decline(label, f"its weight is {weight.const_value.dtype}, not float")
                continue
            if lowrank:
                reason = factorizable_reason(node)
                if reason is not None:
                    report.decline(label, reason)
                    continue
            elif len(weight.const_value.shape) < 2:
                report.decline(label, "its weight is a vector")
                continue
            value = private_initializer(graph, node, 1)
            assert value.name is not None and value.const_value is not None
            shape = tuple(int(d) for d in value.const_value.shape.numpy())
            layer = Layer(label, node.op_type, value.name, shape)
            if node.op_type == "Gemm":
                attr = node.attributes.get("transB")
                layer.trans_b = attr is not None and attr.as_int() != 0
            layers.append(layer)
        return layers

    def _allocate_sparsity(self, model: ir.Model, layers: list[Layer]) -> None:
        """One global magnitude threshold; each layer's zeros below it are its target."""
        cfg = self.cfg
        magnitudes = [np.abs(_weight(model, layer)).reshape(-1) for layer in layers]
        everything = np.sort(np.concatenate(magnitudes))
        count = round(cfg.sparsity * everything.size)
        threshold = everything[count - 1] if count > 0 else -np.inf
        for layer, mags in zip(layers, magnitudes, strict=True):
            below = int(np.count_nonzero(mags <= threshold))
            cap = math.floor(cfg.max_layer_sparsity * mags.size)
            layer.target_zeros = min(below, cap)

    def _allocate_ranks(
        self, model: ir.Model, layers: list[Layer], report: PassReport, macs_before: int
    ) -> None:
        """Ranks from one spectral-energy threshold (budget) or a per-layer energy."""
        from onnxcompress.fitting.lowrank import energy_rank
        from onnxcompress.graph.metrics import node_macs

        cfg = self.cfg
        graph = model.graph
        spectra: list[np.ndarray] = []
        for layer in layers:
            node = graph.node(layer.node)
            matrix = weight_matrix(node, _weight(model, layer))
            singular = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)
            spectra.append(singular)
            layer.full_rank = int(singular.size)
            layer.macs = node_macs(node)
            dense_cost = rank_cost(node, layer.shape, None)
            layer.positions = max(1, layer.macs // max(dense_cost, 1))
            layer.rank_cost = rank_cost(node, layer.shape, 1)
            layer.multiple = cfg.round_to if layer.full_rank > cfg.round_to else 1
            # The largest rank worth factorizing: it saves at least min_saving of the MACs.
            worth = math.floor(
                (1.0 - cfg.min_saving) * layer.macs / max(layer.rank_cost * layer.positions, 1)
            )
            limit = min(break_even_rank(node, layer.shape), worth)
            layer.break_even = max(0, limit - limit % layer.multiple)

        def apply(ranks: Sequence[int]) -> int:
            saved = 0
            for layer, rank in zip(layers, ranks, strict=True):
                if rank <= layer.break_even:
                    layer.rank = rank
                    layer.target_macs = rank * layer.rank_cost * layer.positions
                else:
                    layer.rank, layer.target_macs = layer.full_rank, layer.macs
                saved += layer.macs - layer.target_macs
            return macs_before - saved

        if cfg.energy is not None:
            apply(
                [
                    _round_rank(energy_rank(s, cfg.energy), layer)
                    for s, layer in zip(spectra, layers, strict=True)
                ]
            )
            return
        assert cfg.target_macs is not None
        goal = cfg.target_macs * macs_before
        shares = [s**2 / max(float((s**2).sum()), 1e-30) for s in spectra]

        def ranks_at(log_threshold: float) -> list[int]:
            threshold = math.exp(log_threshold)
            counts = [max(1, int(np.count_nonzero(share >= threshold))) for share in shares]
            return [_round_rank(c, layer) for c, layer in zip(counts, layers, strict=True)]

        low, high = math.log(1e-12), 0.0
        if apply(ranks_at(high)) > goal:
            report.summary["budget_note"] = (
                f"target_macs={cfg.target_macs} is out of reach by factorization alone; every "
                "candidate layer goes to rank 1"
            )
            return
        for _ in range(THRESHOLD_STEPS):
            middle = 0.5 * (low + high)
            if apply(ranks_at(middle)) > goal:
                low = middle
            else:
                high = middle
        apply(ranks_at(high))

    # -- data, ranking, stages ---------------------------------------------------------------

    def _datasets(self, model: ir.Model) -> tuple[Dataset, Dataset]:
        context = self.context
        calibration = context.calibration_set()
        train = context.load(model, context.train_spec)
        val = context.load(model, context.validation_spec)
        train = calibration if train is None else train
        val = calibration if val is None else val
        if len(train) == 0 or len(val) == 0:
            raise DataError(f"{self.name}: the training or validation data holds no images")
        return train, val

    def _require_minimum(
        self, model: ir.Model, teacher: ir.Model, train: Dataset, scorer: _Scorer
    ) -> float:
        """Under a time budget, refuse one that cannot hold the minimum work still to do (one
        training attempt: a step and its scoring, and the write-out); returns that minimum."""
        deadline = self._deadline
        if not deadline.limited:
            return 0.0
        from onnxcompress.torch_bridge.train import minimum_work

        # The budget of the run does not change what one step costs.
        config = self.cfg.finetune_config(None)
        with deadline.phase("estimate"):
            step = minimum_work(model, teacher, train, None, config, deadline.clock)
        need = step.seconds + scorer.full_seconds + self._finish_seconds
        done = deadline.phases.get("data", 0.0) + deadline.phases.get("scoring", 0.0)
        deadline.require(
            need,
            f"after loading the data and scoring the original ({done:.1f} s), one training "
            f"attempt: {step.needs}, scoring it on {len(scorer.val)} images "
            f"(~{scorer.full_seconds:.1f} s) and writing the result",
        )
        return need

    def _sensitivity_samples(
        self, layers: Sequence[Layer], scorer: _Scorer, deadline: Deadline
    ) -> int:
        """Validation images per sensitivity measurement: ``sensitivity_samples``, or as many
        as ``deadline`` holds at the measured scoring speed."""
        limit = min(self.cfg.sensitivity_samples, len(scorer.val))
        if not deadline.limited:
            return limit
        per_image = scorer.full_seconds / max(len(scorer.val), 1)
        # The unchanged model is scored once, then every layer; a tenth is kept back, or a
        # scoring a little slower than the first would end the measurement before its last
        # layer (and a partial one is thrown away).
        share = 0.9 * deadline.remaining()
        return min(limit, int(share / max((len(layers) + 1) * per_image, 1e-12)))

    def _rank(
        self,
        model: ir.Model,
        layers: list[Layer],
        scorer: _Scorer,
        lowrank: bool,
        report: PassReport,
    ) -> None:
        """Sort ``layers`` in place, least significant first (the paper's rule, refined)."""
        if self.cfg.sensitivity:
            deadline = self._deadline.share(
                SENSITIVITY_SHARE, reserve=self._minimum_seconds, label="lct ranking"
            )
            limit = self._sensitivity_samples(layers, scorer, deadline)
            if limit >= min(MIN_SENSITIVITY_SAMPLES, len(scorer.val)):
                self._measure_sensitivity(model, layers, scorer, lowrank, limit, deadline, report)
            else:
                report.summary["sensitivity"] = {
                    "samples": 0,
                    "skipped": f"the time budget holds fewer than {MIN_SENSITIVITY_SAMPLES} "
                    "validation images per layer; the paper's order",
                }
        layers.sort(
            key=lambda layer: (
                layer.sensitivity if layer.sensitivity is not None else 0.0,
                -layer.compression,
            )
        )
        for position, layer in enumerate(layers):
            layer.significance = position

    def _measure_sensitivity(
        self,
        model: ir.Model,
        layers: list[Layer],
        scorer: _Scorer,
        lowrank: bool,
        limit: int,
        deadline: Deadline,
        report: PassReport,
    ) -> None:
        """Each layer's top-1 drop at its target alone, on ``limit`` validation images; none
        when ``deadline`` runs out half-way (a partial measurement would rank the measured
        layers behind the others)."""
        module = scorer.module_of(model)
        projector = _Projector([], {}, layers, 1, lowrank)
        base = scorer.score(module, limit)
        for index, layer in enumerate(layers):
            if deadline.expired():
                for measured in layers:
                    measured.sensitivity = None
                report.summary["sensitivity"] = {
                    "samples": limit,
                    "skipped": f"the time budget ran out after {index} of {len(layers)} layers; "
                    "the paper's order",
                }
                return
            param = module.param_for(layer.weight)
            saved = param.data.clone()
            projector.project(module, layer, 1.0)
            layer.sensitivity = round(base - scorer.score(module, limit), 4)
            param.data.copy_(saved)
        report.summary["sensitivity"] = {"samples": limit}

    def _training_share(self, scorer: _Scorer) -> float | None:
        """Seconds for the stages or the ramp, with their scoring (None: no budget):
        ``1 - final_share`` of what is left after the write-out, but at least one attempt
        (``MIN_ATTEMPT_SECONDS`` and its scoring) when what is left holds one."""
        if not self._deadline.limited:
            return None
        left = self._deadline.remaining() - self._finish_seconds
        least = min(left, scorer.full_seconds + MIN_ATTEMPT_SECONDS)
        return max(left * (1.0 - self.cfg.final_share), least, 0.0)

    def _train_stages(
        self,
        model: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: _Scorer,
        stages: list[list[Layer]],
        lowrank: bool,
        reference: float,
    ) -> tuple[_Accepted | None, list[dict[str, Any]], str | None]:
        """Collapse the stages in order, backing off on rejection, then fine-tune at the end.

        Returns the accepted student (None when nothing met the budget), one record per
        attempt (the final fine-tune's has ``stage="final"``), and why the stages stopped early
        (None when every stage ran).
        """
        cfg = self.cfg
        # The stages' share of what is left; the final fine-tune gets what they leave.
        stage_deadline = self._deadline.within(self._training_share(scorer), label="lct stages")
        every = [layer for stage in stages for layer in stage]
        accepted: _Accepted | None = None
        # The last accepted model that was within max_drop by itself: the fallback.
        within: _Accepted | None = None
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
                projector = _Projector(fixed, goal, stage, cfg.ramp, lowrank)
                attempt = self._attempt(
                    student, teacher, train, scorer, config, projector, len(history) + 1
                )
                if attempt is None:
                    stopped = spent
                    break
                # The slowest scoring so far is kept back for the next (the load may change).
                result, top1, seconds = attempt
                scoring = max(scoring, seconds)
                ok = top1 >= reference - cfg.max_drop - cfg.slack
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
                    accepted = _Accepted(result.module, result.model, top1, every)
                    student = result.model
                    if top1 >= reference - cfg.max_drop:
                        within = accepted
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
            accepted = within
            if within is not None:
                within.restore(every)
            else:
                for layer in every:
                    layer.level = 0.0
        return accepted, history, stopped

    def _train_gradual(
        self,
        model: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: _Scorer,
        layers: list[Layer],
        lowrank: bool,
        reference: float,
    ) -> tuple[_Accepted | None, list[dict[str, Any]], str | None]:
        """A projected fine-tune with every layer on its own cubic ramp, checked along the way,
        then a recovery fine-tune at the levels reached.

        Returns the student (when it ends more than ``max_drop`` below the original: the
        weights of the furthest check within it, if they hold on the whole validation set,
        else None), one record per check plus one for the end of the ramp, one for the
        recovery (and one for the fallback), and why the schedule ended short (None when it
        did not).
        """
        cfg = self.cfg
        ranked = sorted(layers, key=lambda layer: layer.significance)
        for layer in ranked:
            layer.stage = 1
        floor = reference - cfg.max_drop - cfg.slack
        deadline = self._deadline

        def check(module: OnnxModule) -> float:
            top1 = scorer.score(module, cfg.check_samples, self._deadline)
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
        projector = _GradualProjector(
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
        accepted = _Accepted(result.module, result.model, top1, ranked)
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
        if projector.snapshot is not None:
            return self._gradual_fallback(result, projector, scorer, reference, history)
        for layer in ranked:
            layer.level = 0.0
        return None, history, projector.halted

    def _gradual_fallback(
        self,
        result: Any,
        projector: _GradualProjector,
        scorer: _Scorer,
        reference: float,
        history: list[dict[str, Any]],
    ) -> tuple[_Accepted | None, list[dict[str, Any]], str | None]:
        """The weights of the furthest check that was within ``max_drop``, if they still are
        on the whole validation set (the check scored ``check_samples`` of it)."""
        assert projector.snapshot is not None
        at, state, _ = projector.snapshot
        result.model, result.module = result.model_from_state(state)
        top1 = scorer.score(result.module, deadline=self._deadline)
        within = top1 >= reference - self.cfg.max_drop
        for layer, level in zip(projector.ranked, projector.levels(at), strict=True):
            layer.level = level if within else 0.0
        logger.info(
            "lct gradual: fallback to the check at %.0f%% of the schedule: top-1 %.2f (%s)",
            100 * projector.share(at),
            top1,
            "kept" if within else "beyond max_drop too",
        )
        history.append(
            {
                "stage": "fallback",
                "attempt": 1,
                "increment": round(projector.share(at), 4),
                "layers": [layer.node for layer in projector.ranked if layer.accepted],
                "top1": top1,
                "reference_top1": reference,
                "accepted": within,
                "accepted_top1": top1 if within else reference,
                "steps": 0,
                "seconds": 0.0,
            }
        )
        stopped = (
            f"the run ended more than max_drop={self.cfg.max_drop} below the original; the "
            f"result is the furthest check within it ({100 * projector.share(at):.0f}% of "
            "the schedule)"
        )
        if not within:
            return None, history, stopped
        return _Accepted(result.module, result.model, top1, projector.ranked), history, stopped

    def _attempt(
        self,
        student: ir.Model,
        teacher: ir.Model,
        train: Dataset,
        scorer: _Scorer,
        config: Any,
        projector: _Projector,
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
        top1 = scorer.score(result.module, deadline=self._deadline)
        return result, top1, clock() - tic

    def _final(
        self,
        accepted: _Accepted,
        teacher: ir.Model,
        train: Dataset,
        scorer: _Scorer,
        every: list[Layer],
        lowrank: bool,
        reference: float,
        history: list[dict[str, Any]],
        epochs: int | None = None,
    ) -> _Accepted:
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
        projector = _Projector(held, {}, every, 0.0, lowrank)
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
        return _Accepted(result.module, result.model, top1, every)

    # -- output ------------------------------------------------------------------------------

    def _store(self, model: ir.Model, layers: list[Layer]) -> dict[str, dict[str, Any]]:
        from onnxcompress.graph.sparse_storage import store_sparse

        names = [layer.weight for layer in layers if layer.accepted]
        records = store_sparse(model, names, values=self.cfg.values)
        return {record.name: record.as_dict() for record in records}

    def _report_layers(
        self, report: PassReport, layers: list[Layer], storage: dict[str, dict[str, Any]]
    ) -> None:
        lowrank = self.cfg.subspace == "lowrank"
        for layer in sorted(layers, key=lambda item: item.significance):
            row: dict[str, Any] = {
                "node": layer.node,
                "op": layer.op,
                "weight": layer.weight,
                "elements": layer.elements,
                "significance": layer.significance,
                "sensitivity": layer.sensitivity,
                "stage": layer.stage,
                "collapsed": layer.accepted,
                "level": layer.level,
            }
            if lowrank:
                row.update(
                    {
                        "full_rank": layer.full_rank,
                        "target_rank": layer.rank,
                        "rank": layer.count_at(layer.level),
                        "macs_before": layer.macs,
                        "macs_after": layer.macs_at(layer.level),
                    }
                )
            else:
                row["target_zeros"] = layer.target_zeros
                row["zeros"] = layer.zeros
                row["target_sparsity"] = round(layer.target_sparsity, 6)
                row["sparsity"] = round(layer.zeros / max(layer.elements, 1), 6)
                stored = storage.get(layer.weight)
                if stored is not None:
                    row["encoding"] = stored["encoding"]
                    row["dense_bytes"] = stored["dense_bytes"]
                    row["stored_bytes"] = stored["stored_bytes"]
            report.layers.append(row)
            if not layer.accepted:
                if self.cfg.schedule == "gradual":
                    reason = "kept dense: significant (the gradual ramp halted before its turn)"
                else:
                    reason = (
                        "kept dense: significant (its stage "
                        + ("was rejected, backed off too" if layer.stage else "never ran")
                        + f" within max_drop={self.cfg.max_drop})"
                    )
                report.decline(layer.node, reason)


def _round_rank(rank: int, layer: Layer) -> int:
    """``rank`` to the nearest multiple of the layer's block (at least one block)."""
    if layer.multiple <= 1 or rank >= layer.full_rank:
        return rank
    rounded = max(layer.multiple, layer.multiple * round(rank / layer.multiple))
    return min(rounded, layer.full_rank)


def _weight(model: ir.Model, layer: Layer) -> np.ndarray:
    value = model.graph.initializers[layer.weight]
    assert value.const_value is not None
    return value.const_value.numpy()


class _Accepted:
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


def _split_stages(layers: list[Layer], stages: int, lowrank: bool) -> list[list[Layer]]:
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


class _Scorer:
    """Top-1 of a torch-bridge module on the validation data (agreement with the teacher when
    the data has no labels).

    A limited count scores evenly spaced images, not the first ones: data sets are often sorted
    by class (an image folder is), and the first 500 CIFAR-10 images are all airplanes.
    """

    def __init__(
        self, teacher: ir.Model, val: Dataset, device: str | None, clock: Clock | None = None
    ) -> None:
        import torch

        from onnxcompress.torch_bridge.module import OnnxModule

        self.val = val
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        teacher_module = OnnxModule(teacher, trainable="none").to(self.device)
        everything = np.arange(len(val))
        clock = clock if clock is not None else time.monotonic
        tic = clock()
        self.teacher_predictions = self._predict(teacher_module, everything)
        # What scoring the whole validation set costs (kept back from a time budget).
        self.full_seconds = clock() - tic
        self.labels = val.y if val.y is not None else self.teacher_predictions
        self.teacher_score = self._top1(self.teacher_predictions, everything)
        # Scorings a deadline ended before they had seen every image they were to score.
        self.cut_short = 0

    def module_of(self, model: ir.Model) -> OnnxModule:
        from onnxcompress.torch_bridge.module import OnnxModule

        return OnnxModule(model).to(self.device)

    def subset(self, limit: int | None) -> np.ndarray:
        from onnxcompress.data import spread_index

        return spread_index(len(self.val), limit)

    def _predict(self, module: torch.nn.Module, index: np.ndarray) -> np.ndarray:
        import torch

        module.eval()
        predictions: list[np.ndarray] = []
        with torch.no_grad():
            for start in range(0, index.size, EVAL_BATCH):
                chunk = index[start : start + EVAL_BATCH]
                x = torch.from_numpy(np.ascontiguousarray(self.val.x[chunk])).to(self.device)
                output = module(x)
                if isinstance(output, (tuple, list)):
                    output = output[0]
                predictions.append(output.float().argmax(1).cpu().numpy())
        return np.concatenate(predictions)

    def _top1(self, predictions: np.ndarray, index: np.ndarray) -> float:
        truth = np.asarray(self.labels)[index]
        return round(100.0 * float(np.mean(predictions == truth)), 4)

    def score(
        self,
        module: torch.nn.Module,
        limit: int | None = None,
        deadline: Deadline | None = None,
    ) -> float:
        """Top-1 on ``limit`` images (None: all); on fewer when ``deadline`` passes first (a
        spread subset: the images are scored in a fixed random order), counted in
        ``cut_short``."""
        index = self.subset(limit)
        if deadline is None or not deadline.limited:
            return self._top1(self._predict(module, index), index)
        index = index[np.random.default_rng(0).permutation(index.size)]
        predictions: list[np.ndarray] = []
        for start in range(0, index.size, EVAL_BATCH):
            if predictions and deadline.expired():
                index = index[:start]
                self.cut_short += 1
                logger.info("lct: scoring cut short by the time budget: %d images", start)
                break
            predictions.append(self._predict(module, index[start : start + EVAL_BATCH]))
        return self._top1(np.concatenate(predictions), index)


__all__ = [
    "LayerwiseCompressiveTraining",
    "LctConfig",
    "project_rank",
    "project_sparse",
]
