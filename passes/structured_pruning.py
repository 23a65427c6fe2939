"""The budget loop every channel-removing pass shares (``lrf``, ``merge``): options and rounds.

Candidate groups, allocation against ``target_macs``/``target_params``/``ratio``, the aim within
the tolerance, the target check and its miss reasons; a method supplies only the fit and the edit.
"""

from __future__ import annotations

import abc
import dataclasses
import fnmatch
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import PassConfigError
from onnxcompress.fitting.allocation import ExactSavings, GroupPath, allocate, chunk_ends
from onnxcompress.fitting.replaceability import RemovalPlan
from onnxcompress.graph.channels import ChannelAnalysis, ChannelGroup, analyze_channels
from onnxcompress.graph.model_io import clone_model, drop_resident_external_pages
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction
from onnxcompress.passes.channel_views import View, activation_views
from onnxcompress.passes.latency_pricing import LatencyPricing
from onnxcompress.runtime.latency_table import LatencyTarget

logger = logging.getLogger(__name__)

CRITERIA = ("weights", "activations", "synthetic")
# Criteria that fit on activations: the user's data, or inputs the pass makes itself.
ACTIVATION_CRITERIA = ("activations", "synthetic")
COSTS = ("macs", "latency")
ALLOCATIONS = ("global", "uniform")
# criterion=synthetic probes the network with this many images it makes itself.
SYNTHETIC_SAMPLES = 512
# The default round_to: the target's vector block on groups of at least WIDE_GROUP_BLOCKS
# blocks, at most DEFAULT_ROUND_TO on narrower ones. A coarse step costs little accuracy on a
# wide layer, where the time is, and much on a narrow one: measured on ResNet-20 (groups of 16,
# 32 and 64 channels) on an AVX-512 CPU at half the MACs, widths on 16 instead of 8 lost 4.6
# to 10.5 points of top-1 without fine-tuning at 0.8 to 0.6 of the MACs (benchmarks/results/
# structured_quality.md; a 16-channel layer cannot be cut at all), for 1.10x at batch 1 and
# 0.91x at batch 32 against the model on 8 (it kept more MACs: 0.58 instead of 0.50).
DEFAULT_ROUND_TO = 8
WIDE_GROUP_BLOCKS = 4
# With target_latency, the share of the way to the target the first round plans for, before
# any measurement has calibrated the latency model. Measured on ResNet-20 (AVX-512, batch 32),
# planning the whole way at once predicted 0.505 of the original and measured 0.433.
FIRST_LATENCY_STEP = 0.6


@dataclasses.dataclass
class StructuredPruningConfig(PassConfig):
    """Options every structured-pruning pass shares (how much to remove, how to fit).

    Attributes:
        target_macs: keep this fraction of the model's MACs (global allocation).
        target_params: keep this fraction of the parameters (instead of target_macs).
        ratio: remove this fraction of every prunable group (per-layer, no allocation).
        criterion: ``weights`` (data-free, the paper: filters compared by their weights),
            ``activations`` (fits on the activations of --data), or ``synthetic``
            (data-free: the same fits on activations of images the pass makes itself,
            smooth noise with natural-image statistics, ``onnxcompress.data.synthetic``).
        allocation: how the budget is shared between groups. ``global``: channels ranked
            across all groups by estimated output change per unit saved. ``uniform``: the
            same fraction of every group made by a single producer (a block's inner
            channels), groups made by several producers (residual streams) left whole, the
            fraction searched to meet the target, as magnitude pruners usually do. Default:
            ``uniform`` with ``criterion=synthetic`` (whose estimates rank channels well
            within a layer but not across layers), ``global`` otherwise.
        target_latency: keep this fraction of the model's measured ONNX Runtime latency on the
            run's target (``--provider``, ``--latency-batch``, ``--threads``): channels are
            priced by a latency model of the target (each conv timed at a few widths, cached),
            cut in rounds, and the model is measured between rounds.
        cost: what a removed channel is worth when channels are ranked: ``macs`` (its MACs) or
            ``latency`` (the time it saves on the target, from the latency model). The budget
            is still counted in the unit of the target option (MACs for ``target_macs``).
        round_to: keep channel counts at multiples of this. It matters for speed: ONNX
            Runtime's CPU convolutions work on blocks of channels (8 with AVX2, 16 with
            AVX-512, detected), and a model pruned to odd widths measured slower than the
            original at half the MACs. 0 (default): the target's block for groups of at least
            ``WIDE_GROUP_BLOCKS`` blocks, and at most 8 for narrower ones (see
            ``DEFAULT_ROUND_TO``). Groups of that many channels or fewer are left alone; use 1
            for exact budgets.
        exclude: node-name patterns (fnmatch, ``;``-separated on the command line) whose
            output channels are never removed.
        min_channels: never leave a group with fewer channels than this.
        ridge: relative ridge term of the least-squares fits.
        tolerance: the target counts as met when the result lands within this fraction of
            the original total on either side (below it, the cut spent accuracy nobody asked
            to spend). The pass aims at the target from above, stopping within a quarter of
            the tolerance; when coarse chunks (``round_to`` on narrow groups) cannot land that
            near, it stops at the closest point it finds and says so when that is outside.
        max_rounds: re-plan at most this many times against the measured total.
        reconstruct: after the cut, refit every layer whose input channels were cut by least
            squares on the calibration data, in graph order on the pruned model's own inputs,
            against the original layer's output (kept only where it lowers that layer's error).
            Needs data: on by default with ``criterion=activations``, off with ``weights``.
        reconstruct_ridge: relative ridge term of those refits.
    """

    target_macs: float | None = None
    target_params: float | None = None
    ratio: float | None = None
    target_latency: float | None = None
    cost: str = "macs"
    criterion: str = "weights"
    allocation: str | None = None
    round_to: int = 0
    exclude: tuple[str, ...] = ()
    min_channels: int = 1
    ridge: float = 1e-6
    tolerance: float = 0.02
    max_rounds: int = 8
    calibration_batch: int = 32
    reconstruct: bool | None = None
    reconstruct_ridge: float = 1e-3

    def validate(self) -> None:
        budgets = [
            b
            for b in (self.target_macs, self.target_params, self.ratio, self.target_latency)
            if b is not None
        ]
        if len(budgets) > 1:
            raise PassConfigError(
                "give one of target_macs, target_params, target_latency or ratio, not several"
            )
        if not budgets:
            self.target_macs = 0.7
        check_fraction("target_macs", self.target_macs)
        check_fraction("target_params", self.target_params)
        check_fraction("target_latency", self.target_latency)
        if self.cost not in COSTS:
            raise PassConfigError(f"cost={self.cost!r} is not one of {', '.join(COSTS)}")
        if self.cost == "latency" and self.ratio is not None:
            raise PassConfigError(
                "cost=latency ranks channels against a global budget; ratio cuts every group "
                "alike: give target_macs, target_params or target_latency with it"
            )
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PassConfigError(f"ratio={self.ratio} is out of range: give a fraction in [0, 1)")
        if self.criterion not in CRITERIA:
            raise PassConfigError(
                f"criterion={self.criterion!r} is not one of {', '.join(CRITERIA)}"
            )
        if self.round_to < 0 or self.min_channels < 1 or self.max_rounds < 1:
            raise PassConfigError(
                "min_channels and max_rounds must be >= 1, and round_to >= 0 (0: the vector "
                "block of the target)"
            )
        if not 0.0 <= self.ridge < 1.0 or not 0.0 < self.tolerance < 0.5:
            raise PassConfigError("ridge must be in [0, 1) and tolerance in (0, 0.5)")
        if self.calibration_batch < 1:
            raise PassConfigError("calibration_batch must be >= 1")
        if self.allocation is None:
            self.allocation = "uniform" if self.criterion == "synthetic" else "global"
        if self.allocation not in ALLOCATIONS:
            raise PassConfigError(
                f"allocation={self.allocation!r} is not one of {', '.join(ALLOCATIONS)}"
            )
        if self.allocation == "uniform" and (
            self.ratio is not None or self.target_latency is not None or self.cost != "macs"
        ):
            raise PassConfigError(
                "allocation=uniform searches one fraction for every group against target_macs "
                "or target_params; ratio already cuts every group alike, and latency pricing "
                "ranks channels globally"
            )
        if self.reconstruct is None:
            self.reconstruct = self.criterion in ACTIVATION_CRITERIA
        elif self.reconstruct and self.criterion not in ACTIVATION_CRITERIA:
            raise PassConfigError(
                "reconstruct=true refits layers on calibration data: use criterion=activations "
                "(and --data) or criterion=synthetic, or leave reconstruct off"
            )
        if not 0.0 <= self.reconstruct_ridge < 1.0:
            raise PassConfigError("reconstruct_ridge must be in [0, 1)")


@dataclasses.dataclass
class GroupFit:
    """What one round knows about one group: its views and greedy plan."""

    group: ChannelGroup
    views: list[View]
    plan: RemovalPlan
    intercept: bool


PruningConfigT = TypeVar("PruningConfigT", bound=StructuredPruningConfig)


class StructuredPruningPass(CompressionPass[PruningConfigT], abc.ABC):
    """Remove whole channels in rounds against a budget; a method says how to fit and cut.

    A subclass implements :meth:`fit_group` (fit one group and plan its removals) and
    :meth:`fold_and_remove` (cut the planned channels, compensating in the consumers).
    """

    budget_options: ClassVar[tuple[str, ...]] = (
        "target_macs",
        "target_params",
        "target_latency",
        "ratio",
    )

    def run(self, model: ir.Model, report: PassReport) -> None:
        from onnxcompress.graph.metrics import macs_per_weight_element, model_metrics

        cfg = self.cfg
        if cfg.criterion == "activations" and self.context.calibration is None:
            raise PassConfigError(
                f"{self.name} criterion=activations fits on calibration data: give --data SPEC "
                "(or use criterion=synthetic or weights, which need none)"
            )
        self._calibration = self._calibration_batch(model, report)
        analysis = analyze_channels(model)
        candidates = self._candidates(analysis, report)
        before = model_metrics(model)
        # Where height and width are symbolic, the channel analysis counts a layer's MACs at
        # 1x1; the run's input shapes give the real count the plan must be made in.
        self._macs_factors: dict[ir.Node, float] = {}
        self._pricing = self._latency_pricing(model)
        self._block = self._pricing.block if self._pricing is not None else None
        option, fraction = self._target_option()
        measure = self._measure(option)
        start_total = measure(model)
        self._start_total = float(start_total)
        target = None if self._per_layer() else start_total * float(fraction or 1.0)
        sizes_before = {g.id: g.size for g in candidates}
        reference = clone_model(model) if cfg.reconstruct else None
        refits: list[dict[str, Any]] = []
        errors: dict[int, list[float]] = {}
        rounds = 0
        current = start_total
        while candidates:
            # Close enough from above (a quarter of the tolerance: "at most the target" is what
            # a budget usually means), or past it (removed channels do not come back). Landing
            # anywhere within the tolerance on either side counts as meeting the target; the
            # allocator picks the closest point when chunks cannot land that near.
            if target is not None and current <= target + start_total * cfg.tolerance / 4:
                break
            if rounds >= (1 if self._per_layer() else cfg.max_rounds):
                break
            rounds += 1
            fits = self._fit_groups(model, candidates)
            if cfg.target_params is None:
                self._macs_factors = macs_per_weight_element(model)
            removals = self._choose(fits, current, target)
            if not removals:
                break
            predicted = None
            if option == "target_latency":
                predicted = current - self._latency_savings(fits)(removals)
            for fit in fits:
                count = removals.get(fit.group.id, 0)
                if count:
                    residual = self.fold_and_remove(model, fit, count)
                    errors.setdefault(fit.group.id, []).extend(residual.tolist())
                    # Weights read from a memory-mapped external file stay resident until let
                    # go: a 1 GB model would otherwise hold every old layer beside the new ones.
                    drop_resident_external_pages(model)
            if predicted is not None and self._pricing is not None:
                current = self._pricing.measure(model, predicted)
            else:
                current = measure(model)
            logger.info(
                "%s round %d: %s now %s (target %s)", self.name, rounds, option, current, target
            )
            candidates = [g for g in candidates if g.size > self._min_keep(g)]
        if reference is not None and rounds:
            refits = self._reconstruct(model, reference, analysis, report)
        after = model_metrics(model)
        for group in analysis.groups:  # not .prunable: a group cut to 1 channel leaves it
            if group.id not in sizes_before:
                continue
            if group.size != sizes_before[group.id]:
                fit_errors = errors.get(group.id, [])
                report.layers.append(
                    {
                        "group": group.name,
                        "producers": [n.name for n in group.producer_nodes],
                        "channels_before": sizes_before[group.id],
                        "channels_after": group.size,
                        "fit_error": float(np.mean(fit_errors)) if fit_errors else 0.0,
                    }
                )
        report.modified = after.macs != before.macs or after.params != before.params
        if target is not None:
            reached = (
                (current if option == "target_latency" else measure(model)) / start_total
                if start_total
                else 1.0
            )
            report.check_target(
                option,
                float(fraction or 1.0),
                reached,
                tolerance=cfg.tolerance,
                reason=self._miss_reason(reached, float(fraction or 1.0), candidates, rounds),
            )
        report.summary = {
            "criterion": cfg.criterion,
            "macs_before": before.macs,
            "macs_after": after.macs,
            "params_before": before.params,
            "params_after": after.params,
            "macs_ratio": after.macs / before.macs if before.macs else 1.0,
            "params_ratio": after.params / before.params if before.params else 1.0,
            "target": None if self._per_layer() else fraction,
            "target_met": report.targets_met,
            "rounds": rounds,
            "groups_prunable": len(analysis.prunable),
            "groups_frozen": len(analysis.frozen),
        }
        if cfg.reconstruct:
            report.summary["reconstruction"] = refits
        if self._pricing is not None:
            self._report_latency(report, option)
        report.summary.update(self.summary_extras())

    def _reconstruct(
        self, model: ir.Model, reference: ir.Model, analysis: ChannelAnalysis, report: PassReport
    ) -> list[dict[str, Any]]:
        """Refit the layers whose inputs were cut; one report entry per layer tried."""
        from onnxcompress.passes.reconstruction import reconstruct

        calibration = self._calibration
        assert calibration is not None
        # A refit's target is the original layer's output at the channels the layer still
        # computes (a tensor's channels may belong to several groups).
        kept_outputs = {
            node.name: np.flatnonzero(analysis.alive(node.outputs[0]))
            for node in model.graph
            if node.name and node.outputs and analysis.is_tracked(node.outputs[0])
        }
        refits = reconstruct(
            model,
            reference,
            kept_outputs,
            calibration,
            ridge=self.cfg.reconstruct_ridge,
            batch=self.cfg.calibration_batch,
            say=report.notes.append,
            progress=self.context.progress,
        )
        return [{**dataclasses.asdict(r), "kept": r.kept} for r in refits]

    # -- what the budget counts -------------------------------------------------------------

    def _target_option(self) -> tuple[str, float | None]:
        """The budget option in force and its fraction (``ratio`` for the per-layer mode)."""
        cfg = self.cfg
        for option in ("target_params", "target_latency", "ratio"):
            if getattr(cfg, option) is not None:
                return option, getattr(cfg, option)
        return "target_macs", cfg.target_macs

    def _measure(self, option: str) -> Callable[[ir.Model], float]:
        """How the budget's total is counted on a model: params, MACs, or (latency) the
        original's measured latency before any cut; rounds measure through ``LatencyPricing``."""
        from onnxcompress.graph.metrics import model_metrics

        if option == "target_params":
            return lambda m: float(model_metrics(m).params)
        if option == "target_latency":
            pricing = self._pricing
            assert pricing is not None
            return lambda m: pricing.model.original_ms
        return lambda m: float(model_metrics(m).macs)

    def _multiple(self, group: ChannelGroup) -> int:
        """The group's ``round_to``: the option, or by default the target's vector block on a
        wide group and at most ``DEFAULT_ROUND_TO`` on a narrow one (by its original width,
        so the step does not change as the group is cut)."""
        if self.cfg.round_to:
            return self.cfg.round_to
        if self._block is None:
            self._block = self._latency_target().block()
        block = self._block
        wide = group.original_size >= WIDE_GROUP_BLOCKS * block
        return block if wide else min(block, DEFAULT_ROUND_TO)

    def _round_to_text(self) -> str:
        if self.cfg.round_to:
            return f"round_to={self.cfg.round_to}"
        block = self._block or DEFAULT_ROUND_TO
        return f"round_to (the default: {block} on wide groups, at most {DEFAULT_ROUND_TO} else)"

    def _latency_target(self) -> LatencyTarget:
        return self.context.latency or LatencyTarget()

    def _latency_pricing(self, model: ir.Model) -> LatencyPricing | None:
        cfg = self.cfg
        if cfg.cost != "latency" and cfg.target_latency is None:
            return None
        pricing = LatencyPricing(
            model,
            self._latency_target(),
            measure=cfg.target_latency is not None,
            progress=self.context.progress,
        )
        built = pricing.model
        self.report.notes.append(
            f"latency model: {len(built.curves)} convs priced on {pricing.target.provider_name()}"
            f" (batch {pricing.target.batch}, block {built.block}): {built.measured} widths "
            f"timed, {built.cached} from the cache, {built.seconds:.1f} s"
        )
        return pricing

    def _latency_savings(self, fits: Sequence[GroupFit]) -> Callable[[Mapping[int, int]], float]:
        assert self._pricing is not None
        return self._pricing.plan_savings([fit.group for fit in fits])

    def _report_latency(self, report: PassReport, option: str) -> None:
        pricing = self._pricing
        assert pricing is not None
        predicted = pricing.model.predicted_ms()
        report.summary["latency"] = pricing.summary(predicted)
        if option == "target_latency" and pricing.rounds:
            last = pricing.rounds[-1]
            report.notes.append(
                f"latency: predicted {last['predicted_ratio']:.3f}, measured "
                f"{last['measured_ratio']:.3f} of the original (target {self.cfg.target_latency})"
            )
        elif option != "target_latency":
            report.notes.append(
                f"latency (predicted by the model, not measured here): "
                f"{predicted / pricing.model.original_ms:.3f} of the original"
            )

    def summary_extras(self) -> dict[str, Any]:
        """The method's own entries for the report's summary, after the shared ones."""
        return {}

    def _miss_reason(
        self, reached: float, goal: float, candidates: Sequence[ChannelGroup], rounds: int
    ) -> str:
        """Why the result is outside the tolerance (read only when it is)."""
        cfg = self.cfg
        step = self._round_to_text()
        if self._pricing is not None and not self._pricing.model.curves:
            return (
                "no Conv with a float weight and a known input size could be timed, so no "
                "channel has a price in latency (give --shape for symbolic sizes)"
            )
        if reached < goal:
            return (
                f"{step} moves whole chunks of channels, and the closest point found lies below "
                "the target; a smaller round_to lands closer"
            )
        if not any(g.size > max(self._multiple(g), self._min_keep(g)) for g in candidates):
            return (
                f"no group left can lose a chunk of {step} channels (the rest are that narrow, "
                "at min_channels, or frozen: the report lists why)"
            )
        if rounds >= cfg.max_rounds:
            return f"max_rounds={cfg.max_rounds} re-plans were not enough"
        return (
            f"the next chunk of {step} channels would overshoot the target by more than it "
            "falls short; a smaller round_to lands closer"
        )

    # -- what a method implements ------------------------------------------------------------

    @abc.abstractmethod
    def fit_group(self, model: ir.Model, group: ChannelGroup, views: list[View] | None) -> GroupFit:
        """Fit one group as it is this round and plan its removals.

        Args:
            model: the model as it is now (for letting mapped weights go after reading them).
            group: a candidate group, at least one channel above its minimum.
            views: with ``criterion=activations``, the group's views on calibration data (one
                per tensor its consumers read, augmented Grams ``[C+1, C+1]``, last the
                constant); None with ``criterion=weights``, where the method builds its own
                data-free views from the filters.

        Returns:
            The group's fit. ``plan.order`` lists the steps in the order they are taken (at
            most ``size - min_keep`` channels), ``plan.costs`` what each step adds to the
            estimated relative change of the output, comparable across groups: the global
            allocation reads only these, and :meth:`fold_and_remove` takes a prefix of them.
        """

    @abc.abstractmethod
    def fold_and_remove(self, model: ir.Model, fit: GroupFit, count: int) -> np.ndarray:
        """Cut the first ``count`` steps of ``fit``'s plan from ``model``, in place.

        What the removed channels carried is folded into the consumers' weights (and biases)
        so the network computes nearly the same; the group's size shrinks by ``count``.

        Returns:
            The relative fit error of each removed channel (the report averages them).
        """

    # -- selection ---------------------------------------------------------------------------

    def _per_layer(self) -> bool:
        """Whether the budget is per layer (one round, no global target)."""
        return self.cfg.ratio is not None

    def _min_keep(self, group: ChannelGroup) -> int:
        return max(1, min(self.cfg.min_channels, group.size))

    def _candidates(self, analysis: ChannelAnalysis, report: PassReport) -> list[ChannelGroup]:
        for group, reason in analysis.frozen:
            report.decline(group.name, reason)
        chosen = []
        for group in analysis.prunable:
            # A layer named here keeps its output channels; its inputs may still shrink when
            # the layer before it is pruned (as Torch-Pruning's ignored_layers).
            names = [n.name or "" for n in group.producer_nodes]
            names.append(group.name)
            pattern = next(
                (p for p in self.cfg.exclude if any(fnmatch.fnmatchcase(n, p) for n in names)), None
            )
            if pattern is not None:
                report.decline(group.name, f"excluded by the user (exclude={pattern})")
                continue
            if not group.producer_nodes:
                report.decline(group.name, "no producer weights (channels made by Pad only)")
                continue
            chosen.append(group)
        return chosen

    def _choose(
        self, fits: Sequence[GroupFit], current: float, target: float | None
    ) -> dict[int, int]:
        cfg = self.cfg
        if cfg.ratio is not None:
            return self._fraction_counts(fits, cfg.ratio)
        assert target is not None
        if cfg.allocation == "uniform":
            return self._uniform(fits, current, target)
        latency_goal = cfg.target_latency is not None
        worth = (
            self._pricing.worth_curves([f.group for f in fits], self._min_keep)
            if self._pricing is not None
            else {}
        )
        paths = []
        for fit in fits:
            if cfg.target_params is not None:
                saving = float(fit.group.params_per_channel())
            elif latency_goal:
                curve = worth[fit.group.id]
                # The running estimate's saving per channel; the stop reads the exact plan.
                saving = curve[-1] / (len(curve) - 1) if len(curve) > 1 else 0.0
            else:
                saving = float(fit.group.macs_per_channel(self._macs_factors))
            paths.append(
                GroupPath(
                    key=fit.group.id,
                    size=fit.group.size,
                    costs=fit.plan.costs,
                    saving=saving,
                    min_keep=self._min_keep(fit.group),
                    multiple=self._multiple(fit.group),
                    worth_curve=worth.get(fit.group.id),
                )
            )
        exact: Callable[[Mapping[int, int]], float]
        if latency_goal:
            exact = self._latency_savings(fits)
        else:
            exact = ExactSavings(
                [fit.group for fit in fits],
                params=cfg.target_params is not None,
                factors=self._macs_factors,
            )
        needed = current - target
        if latency_goal and self._pricing is not None and not self._pricing.rounds:
            # Before the first measurement the model's scale is a guess (convs timed alone),
            # and channels cut do not come back: the first round goes part of the way, the
            # measurement after it calibrates the model, the next rounds go the rest.
            needed *= FIRST_LATENCY_STEP
        return allocate(
            paths,
            needed,
            round_to=cfg.round_to,
            slack=cfg.tolerance * self._start_total,
            shortfall=cfg.tolerance * self._start_total / 4,
            exact=exact,
        )

    def _calibration_batch(self, model: ir.Model, report: PassReport) -> np.ndarray | None:
        """The inputs the activation criteria fit on: the user's calibration batch, or with
        ``criterion=synthetic`` images made here at the model's first input's shape."""
        if self.cfg.criterion != "synthetic":
            return self.context.calibration
        from onnxcompress.data.synthetic import natural_noise
        from onnxcompress.graph.input_shapes import counted_at, spatial_dims_open

        first = model.graph.inputs[0]
        name = str(first.name)
        shape = (counted_at(model) or {}).get(name)
        if shape is None:
            if name in spatial_dims_open(model) or first.shape is None:
                raise PassConfigError(
                    f"{self.name} criterion=synthetic makes images at the input's size, and "
                    f"{name!r} has symbolic dims: give --shape {name}=1x3xHxW"
                )
            shape = tuple(d if isinstance(d, int) else 1 for d in first.shape)
        dims = [SYNTHETIC_SAMPLES, *(int(d) for d in shape[1:])]
        # NHWC when the last axis looks like colour channels and the second does not.
        channels_last = len(dims) == 4 and dims[3] in (1, 3, 4) and dims[1] not in (1, 3, 4)
        report.notes.append(
            f"criterion=synthetic: fitted on {SYNTHETIC_SAMPLES} synthetic images of "
            f"{'x'.join(str(d) for d in dims[1:])} (smooth noise, zero mean and unit variance "
            "per channel: it assumes normalized inputs), no data"
        )
        return natural_noise(dims, seed=self.context.seed, channels_last=channels_last)

    def _fraction_counts(self, fits: Sequence[GroupFit], fraction: float) -> dict[int, int]:
        """Channels to cut from each group to remove ``fraction`` of it: whole multiples of
        its ``round_to`` kept, never below its minimum nor past its plan."""
        counts = {}
        for fit in fits:
            size = fit.group.size
            keep = max(self._min_keep(fit.group), size - int(size * fraction))
            multiple = self._multiple(fit.group)
            if multiple > 1 and size > multiple:
                keep = min(size, int(np.ceil(keep / multiple) * multiple))
            counts[fit.group.id] = min(size - keep, len(fit.plan.order))
        return {k: v for k, v in counts.items() if v > 0}

    def _uniform(self, fits: Sequence[GroupFit], current: float, target: float) -> dict[int, int]:
        """``allocation=uniform``: cut every single-producer group by the same fraction, as
        far as the total must fall to land within a quarter of the tolerance above ``target``.

        A group stops only where its width is a multiple of its ``round_to`` (the global
        allocator's chunk ends), so "the same fraction" is a staircase: each chunk is taken at
        the fraction of its group it completes, lowest first, until the exact saving suffices.
        Groups made by several producers (residual streams) stay whole unless there is no
        other group; groups no wider than their step are left alone, as by the allocator.
        """
        cfg = self.cfg
        inner = [fit for fit in fits if len(fit.group.producer_nodes) == 1] or list(fits)
        exact = ExactSavings(
            [fit.group for fit in inner],
            params=cfg.target_params is not None,
            factors=self._macs_factors,
        )
        needed = current - target - cfg.tolerance * self._start_total / 4
        ends: dict[int, list[int]] = {}
        steps = []  # (fraction of its group a chunk end reaches, group, index of the end)
        for fit in inner:
            key, size, multiple = fit.group.id, fit.group.size, self._multiple(fit.group)
            if multiple > 1 and size <= multiple:
                continue
            most = min(size - self._min_keep(fit.group), len(fit.plan.order))
            ends[key] = chunk_ends(size, most, multiple)
            steps += [(end / size, key, index) for index, end in enumerate(ends[key])]
        steps.sort()
        taken: dict[int, int] = {}  # group -> index of its last chunk end taken
        order = []
        for level, key, index in steps:
            if exact({k: ends[k][i] for k, i in taken.items()}) >= needed:
                break
            taken[key] = index
            order.append((level, key))
        # The last chunk may overshoot by far on a coarse staircase: give back chunks taken
        # earlier (the highest fractions first) while the saving still suffices.
        for _, key in sorted(order, reverse=True):
            smaller = {**taken, key: taken[key] - 1}
            if exact({k: ends[k][i] for k, i in smaller.items() if i >= 0}) >= needed:
                taken = smaller
        return {k: ends[k][i] for k, i in taken.items() if i >= 0}

    def _fit_groups(self, model: ir.Model, groups: Sequence[ChannelGroup]) -> list[GroupFit]:
        if self.cfg.criterion not in ACTIVATION_CRITERIA:
            return [self.fit_group(model, group, None) for group in groups]
        calibration = self._calibration
        assert calibration is not None
        views = activation_views(model, groups, calibration, self.cfg.calibration_batch)
        return [self.fit_group(model, group, views[group.id]) for group in groups]
