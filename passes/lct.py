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

``subspace=lowrank`` (beyond the paper) by default fits every layer at its rank at once from
the calibration data and distills at those ranks (``schedule=fit``, ``passes/lct_fit.py``); with
``schedule=gradual`` or ``staged`` it ranks and trains as the sparse subspace does, the
projection being a truncated SVD to rank ``r_l`` (ranks from a global spectral-energy threshold
that meets ``target_macs``, or from a per-layer ``energy``). At the end each collapsed Conv
becomes a kxk Conv (Cin -> r) plus a 1x1 Conv (r -> Cout) and each Gemm two Gemms, so it runs
faster.

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
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import Clock, Deadline
from onnxcompress.errors import DataError, PassConfigError
from onnxcompress.graph.factorization import factorize
from onnxcompress.graph.model_io import clone_model, model_to_bytes
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction
from onnxcompress.passes.lct_layers import (
    Layer,
    allocate_ranks,
    allocate_sparsity,
    find_candidates,
    layer_weight,
    sparsity_for_file,
)
from onnxcompress.passes.lct_ranking import rank_layers
from onnxcompress.passes.lct_scoring import Scorer
from onnxcompress.passes.lct_training import LctTraining, split_stages
from onnxcompress.torch_bridge.training_options import TrainingOptions

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.graph.metrics import ModelMetrics
    from onnxcompress.passes.lct_fit import LayerSnapshot

SUBSPACES = ("sparse", "lowrank")
SCHEDULES = ("staged", "gradual", "fit")
DEFAULT_TARGET_MACS = 0.6
# The default ``slack`` of each schedule (the setting each was measured best with).
GRADUAL_SLACK = 0.5
STAGED_SLACK = 1.0
# Kept back at the end of a budget for writing the result (weights, compact storage, sizes),
# beyond the measured cost of serializing the model once.
FINISH_SECONDS = 1.0
DEFAULT_SPARSITY = 0.9
# The sparsity or MAC fraction reached counts as the target within this much on either side.
TARGET_TOLERANCE = 0.02


@dataclasses.dataclass
class LctConfig(PassConfig, TrainingOptions):
    """Options of the ``lct`` pass.

    Attributes:
        subspace: ``sparse`` (the paper: weights collapse to zero) or ``lowrank`` (weights
            collapse onto rank r_l, then each layer is factorized into two).
        sparsity: sparse: the global fraction of the candidate layers' weights set to zero by
            the one magnitude threshold; each layer's share of it is its target. None: 0.9, or
            what ``target_file`` needs.
        target_file: sparse: instead of ``sparsity``, the size of the written file as a
            fraction of the input's (0.2: 5x smaller). The sparsity is the lowest whose compact
            storage, with the chosen ``values``, is predicted at or under it (3% margin for the
            decoders); with ``values=int8`` that is about 0.6 on ResNet-20 for 0.2, where the
            default 0.9 costs a 15-minute budget its whole ramp.
        max_layer_sparsity: no layer is pruned beyond this fraction (a layer at 100 % would cut
            the network).
        target_macs: lowrank: keep this fraction of the model's MACs (``fit``: ranks cut
            greedily where the least output energy on the calibration images is lost per MAC
            saved; ``gradual``/``staged``: one threshold on the weights' spectral energy); the
            default when ``energy`` is not given.
        energy: lowrank: instead of a budget, keep this fraction of each layer's squared
            singular values (``fit``: of its response's).
        max_drop: validation top-1 (points) the result may lose against the original.
        slack: a stage is kept while it is within ``max_drop + slack`` points; the final
            fine-tune must bring the model back within ``max_drop`` (else the last stage that
            was within it by itself is the result). Stages score right after a short fine-tune,
            which under-rates what a longer one recovers. None: 0.5 with ``schedule=gradual``
            (a ramp that pauses at 0.5 ended within ``max_drop`` on ResNet-20 CIFAR-10 where
            one pausing at 1.0 had to fall back, ``benchmarks/results/lct_*_gradual*.md``), 1.0
            with ``staged`` (its measured setting).
        sensitivity: refine the ranking by measuring each layer alone at its target on the
            validation data (accuracy drop; ties keep the paper's order).
        sensitivity_samples: validation images used for that measurement.
        schedule: None: ``fit`` with ``subspace=lowrank``, ``gradual`` with ``sparse``.
            ``fit`` (lowrank only; ``passes/lct_fit.py``): the ranks are allocated on the
            layers' responses to the calibration images and every layer is put on its rank at
            once by a least-squares fit against the original, in graph order on the student's
            own inputs; the rest of the budget distills at those ranks (from ``final_lr``, the
            whole run being the final fine-tune). On ResNet-20 CIFAR-10 at 0.6 of the MACs the
            fit alone kept 80.3 % top-1 where the weights' truncated SVD kept 23.1 %.
            ``staged`` (the paper: the ranked layers are collapsed stage by stage, each
            stage accepted or backed off on its own) or ``gradual`` (the default: measured
            ahead of ``staged`` on ResNet-20 CIFAR-10 for both subspaces, see
            ``docs/benchmarks.md``; one run: every layer
            moves to its target on a cubic schedule that starts earlier the less significant
            the layer is; validation top-1 is checked ``checks`` times along the way, and a
            check more than ``max_drop + slack`` below the original pauses the schedule until
            a check passes again (two failures in a row move it back to the last check that
            passed); after the ramp (``1 - final_share`` of the run) the constraints hold and
            the network recovers in a fine-tune of its own that restarts its cosine at
            ``final_lr``; a run that still ends beyond ``max_drop`` falls back to the weights of
            the best check on the way: the furthest one within ``max_drop``, else the
            highest-scoring one that passed, if the whole validation set finds it within
            ``max_drop``; the console says what was kept, or that nothing held).
        fit_samples: fit: calibration images (a spread subset of ``--data``) the input
            statistics and the fits read; fewer when the fits' share of a time budget
            (``lct_fit.FIT_SHARE``) cannot hold them.
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
        lr (and the other shared ``TrainingOptions``): the distillation fine-tuning
            (``onnxcompress.torch_bridge.finetune_config.FinetuneConfig``). The learning rate is
            lower than a recovery fine-tune's because every stage starts from a trained model (at
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
            weights of a layer are not exactly the least effective ones, and a fold moves
            int8 values off their grid: off by default here (the shared default is on), until
            it is measured for ``lct``.
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
    sparsity: float | None = None
    target_file: float | None = None
    max_layer_sparsity: float = 0.98
    target_macs: float | None = None
    energy: float | None = None
    max_drop: float = 1.0
    # None: derived from ``schedule`` (see above).
    slack: float | None = None
    sensitivity: bool = False
    sensitivity_samples: int = 1000
    # None: derived from ``subspace`` (see above).
    schedule: str | None = None
    fit_samples: int = 512
    stagger: float = 0.5
    checks: int = 10
    check_samples: int = 2000
    epochs: int = 10
    stages: int = 8
    retries: int = 2
    epochs_per_stage: int = 1
    ramp: float = 0.5
    # Lower than the shared default: every stage starts from a trained model (see above).
    lr: float = 0.003
    # Off, unlike the shared default: not measured with the projection yet (see above).
    batchnorm: bool = False
    final_share: float = 0.3
    final_epochs: int = 1
    final_lr: float = 0.01
    time_budget_s: float | None = None
    compact: bool = True
    values: str = "float32"
    min_saving: float = 0.25
    round_to: int = 8
    exclude: tuple[str, ...] = ()

    def validate(self) -> None:
        if self.schedule is None:
            self.schedule = "fit" if self.subspace == "lowrank" else "gradual"
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
        if self.schedule == "fit" and self.subspace != "lowrank":
            raise PassConfigError(
                "schedule=fit is for subspace=lowrank (a rank is fit by least squares; a "
                "sparse pattern is not): use schedule=gradual or staged"
            )
        if self.fit_samples < 1:
            raise PassConfigError(f"fit_samples={self.fit_samples} must be >= 1")
        if self.target_file is not None:
            if self.subspace != "sparse":
                raise PassConfigError(
                    "target_file is a sparse target (subspace=sparse); lowrank takes target_macs"
                )
            if self.sparsity is not None:
                raise PassConfigError("give sparsity or target_file, not both")
            check_fraction("target_file", self.target_file, allow_one=False)
        elif self.sparsity is None:
            self.sparsity = DEFAULT_SPARSITY
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
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
        # Resolved here so that reports show the number the run used.
        self.slack = self.stage_slack
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
        if not 0.0 <= self.ramp <= 1.0:
            raise PassConfigError(f"ramp={self.ramp} is out of range: give [0, 1]")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise PassConfigError(f"time_budget_s={self.time_budget_s} must be positive")
        self.check_training_options("lct")
        # The rest of a fine-tune's options are checked by FinetuneConfig, with its messages.
        self.finetune_config(None)

    @property
    def stage_slack(self) -> float:
        """``slack`` as ``validate`` resolved it (None picks the schedule's default)."""
        if self.slack is not None:
            return self.slack
        if self.schedule == "fit":
            return 0.0  # nothing is judged before the end
        return GRADUAL_SLACK if self.schedule == "gradual" else STAGED_SLACK

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
        from onnxcompress.torch_bridge.finetune_config import finetune_config_from

        if stage_budget is not None:
            epochs = 10_000
        elif final:
            epochs = max(1, self.final_epochs if epochs is None else epochs)
        elif epochs is None:
            epochs = self.epochs_per_stage
        return finetune_config_from(
            self,
            epochs=epochs,
            lr=self.final_lr if final else self.lr,
            time_budget_s=stage_budget,
        )


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
            if reached < cfg.target_macs:
                # Below the goal: the allocation's steps are coarse, not the training short.
                granularity = (
                    "removed more than asked: the nearest allocation at or under the target "
                    "is below it, because ranks move in steps of round_to and a layer saves "
                    "MACs only once factorizing it saves min_saving of them"
                )
            else:
                granularity = (
                    "ranks are multiples of round_to and a layer is factorized only when that "
                    "saves min_saving of its MACs"
                )
            report.check_target(
                "target_macs",
                cfg.target_macs,
                reached,
                tolerance=TARGET_TOLERANCE,
                reason=why or summary.get("budget_note", "") or granularity,
            )
        elif cfg.subspace == "sparse" and cfg.target_file is not None:
            before_bytes = summary.get("file_bytes_before")
            after_bytes = summary.get("file_bytes_after")
            reached = after_bytes / before_bytes if before_bytes and after_bytes else 1.0
            report.check_target(
                "target_file",
                cfg.target_file,
                reached,
                tolerance=TARGET_TOLERANCE,
                reason=why or "the stored encodings came out larger than planned",
            )
        elif cfg.subspace == "sparse":
            assert cfg.sparsity is not None
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
        # The weights as they were before a ``fit`` schedule wrote into the model (put back if
        # the run is not kept).
        self._before_fit: LayerSnapshot | None = None
        # One deadline for the whole pass, started before anything else.
        self._deadline = Deadline(self.cfg.time_budget_s, clock=self.clock, label="lct")
        try:
            self._compress(model, report)
        finally:
            report.summary["time"] = self._deadline.report()

    def _compress(self, model: ir.Model, report: PassReport) -> None:
        from onnxcompress.graph.canonicalize import infer_shapes
        from onnxcompress.graph.metrics import model_metrics

        cfg, deadline = self.cfg, self._deadline
        lowrank = cfg.subspace == "lowrank"
        teacher = clone_model(model)
        infer_shapes(model)
        tic = deadline.clock()
        bytes_before = len(model_to_bytes(model))
        # Writing the result serializes the model about three times (sizes, compact storage).
        self._finish_seconds = FINISH_SECONDS + 3 * (deadline.clock() - tic)
        macs_before = model_metrics(model).macs
        layers = find_candidates(model, report, lowrank, cfg.exclude)
        if not layers:
            report.decline("<model>", "no layer to compress (see the declined nodes)")
            return
        fit = cfg.schedule == "fit"
        if lowrank and not fit:
            # Planned in MACs at the run's input shapes (allocate_ranks sizes the layers there).
            layers = allocate_ranks(model, layers, report, macs_before, cfg)
        elif not lowrank:
            sparsity = cfg.sparsity
            if cfg.target_file is not None:
                sparsity, predicted = sparsity_for_file(
                    model, layers, cfg, bytes_before, cfg.target_file
                )
                report.summary["file_plan"] = {
                    "target_file": cfg.target_file,
                    "sparsity": round(sparsity, 4),
                    "predicted_file": round(predicted, 4),
                }
                report.notes.append(
                    f"lct aims at sparsity {sparsity:.3f}: {cfg.values} values stored compactly "
                    f"make the file {predicted:.3f} of the input's (target_file="
                    f"{cfg.target_file:g})"
                )
            assert sparsity is not None  # resolved in validate
            allocate_sparsity(model, layers, cfg, sparsity)
            layers = [layer for layer in layers if layer.target_zeros > 0]
        if not layers:
            report.decline("<model>", "the global target leaves every candidate layer dense")
            return
        with deadline.phase("data"):
            train, val = self._datasets(model)
        with deadline.phase("scoring"):
            scorer = Scorer(teacher, val, cfg.device, deadline.clock)
        minimum_seconds = self._require_minimum(model, teacher, train, scorer)
        reference = scorer.teacher_score
        if fit:
            with deadline.phase("fit"):
                layers = self._fit(model, teacher, layers, report, macs_before, minimum_seconds)
            if not layers:
                report.decline("<model>", "the global target leaves every candidate layer dense")
                return
        else:
            with deadline.phase("ranking"):
                rank_layers(model, layers, scorer, lowrank, report, cfg, deadline, minimum_seconds)
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
        training = LctTraining(cfg, self.context, deadline, report, self._finish_seconds)
        with deadline.phase("training"):
            if fit:
                accepted, history, stopped = training.train_fitted(
                    model, teacher, train, scorer, layers, reference
                )
            elif cfg.schedule == "gradual":
                accepted, history, stopped = training.train_gradual(
                    model, teacher, train, scorer, layers, lowrank, reference
                )
            else:
                stages = split_stages(layers, cfg.stages, lowrank)
                accepted, history, stopped = training.train_stages(
                    model, teacher, train, scorer, stages, lowrank, reference
                )
        report.summary["stages"] = history
        if scorer.cut_short:
            report.summary["scorings_cut_short"] = scorer.cut_short
        if stopped is not None:
            report.summary["stopped"] = stopped
        if accepted is None:
            if cfg.schedule in ("gradual", "fit"):
                # The run says what it ended at and which check it tried to fall back to.
                reason = (
                    stopped
                    or f"the gradual run ended more than max_drop={cfg.max_drop} points below "
                    "the original's validation top-1, with no check on the way that held within "
                    "it on the whole validation set; the model is left as it was"
                ) + " (raise max_drop or the training budget, or lower the target)"
            else:
                reason = (
                    f"no stage stayed within max_drop={cfg.max_drop} points of validation "
                    "top-1, even backed off; the model is left as it was (raise max_drop or "
                    "the training budget)"
                )
            if self._before_fit is not None:
                self._before_fit.restore(model)
            report.decline("<model>", reason)
            # Said on the console too: an unchanged model after a long run is no silent outcome.
            report.notes.append(f"lct left the model unchanged: {reason}")
            self._report_layers(report, layers, {})
            return
        from onnxcompress.torch_bridge.writeback import write_back

        write_back(model, accepted.module)
        report.modified = True
        for layer in layers:
            layer.zeros = int(np.count_nonzero(layer_weight(model, layer) == 0))
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

    # -- data and the minimum work ----------------------------------------------------------

    def _datasets(self, model: ir.Model) -> tuple[Dataset, Dataset]:
        train = self.context.train_set(model)
        val = self.context.validation_set(model)
        if len(train) == 0 or len(val) == 0:
            raise DataError(f"{self.name}: the training or validation data holds no images")
        return train, val

    def _fit(
        self,
        model: ir.Model,
        teacher: ir.Model,
        layers: list[Layer],
        report: PassReport,
        macs_before: int,
        minimum_seconds: float,
    ) -> list[Layer]:
        """The ``fit`` schedule's start (``lct_fit``): ranks from the layers' responses, then
        every layer fit at its rank; returns the layers that are cut."""
        from onnxcompress.data.dataset import spread_index
        from onnxcompress.passes.lct_fit import (
            FIT_SHARE,
            MOMENT_PART,
            LayerSnapshot,
            fit_ranks,
            input_second_moments,
        )

        cfg, deadline = self.cfg, self._deadline
        calibration = self.context.calibration
        assert calibration is not None  # needs_data
        x = calibration[spread_index(len(calibration), cfg.fit_samples)]
        budget = deadline.share(FIT_SHARE, reserve=minimum_seconds, label="lct fit")
        moments = input_second_moments(
            model, layers, x, budget.share(MOMENT_PART), self.context.progress
        )
        report.summary["ranks_from"] = "responses" if moments is not None else "weights"
        layers = allocate_ranks(model, layers, report, macs_before, cfg, moments)
        if layers:
            self._before_fit = LayerSnapshot(model, [layer.node for layer in layers])
            fit_ranks(model, teacher, layers, x, budget, report, self.context.progress)
            for layer in layers:
                # A weight shared with another node was made private to this one by the fit.
                weight = model.graph.node(layer.node).inputs[1]
                assert weight is not None and weight.name is not None
                layer.weight = weight.name
        return layers

    def _require_minimum(
        self, model: ir.Model, teacher: ir.Model, train: Dataset, scorer: Scorer
    ) -> float:
        """Under a time budget, refuse one that cannot hold the minimum work still to do (one
        training attempt: a step and its scoring, and the write-out); returns that minimum."""
        deadline = self._deadline
        if not deadline.limited:
            return 0.0
        from onnxcompress.torch_bridge.minimum_work import minimum_work

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
                if self.cfg.schedule == "fit":
                    reason = "kept dense: the fit run ended beyond max_drop"
                elif self.cfg.schedule == "gradual":
                    reason = "kept dense: significant (the gradual ramp halted before its turn)"
                else:
                    reason = (
                        "kept dense: significant (its stage "
                        + ("was rejected, backed off too" if layer.stage else "never ran")
                        + f" within max_drop={self.cfg.max_drop})"
                    )
                report.decline(layer.node, reason)


__all__ = [
    "LayerwiseCompressiveTraining",
    "LctConfig",
]
