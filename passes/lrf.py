"""``lrf``: remove linearly replaceable filters and fold the replacement into the next layers.

Joo et al., "Linearly Replaceable Filters for Deep Network Channel Pruning" (AAAI 2021). A
channel that is (nearly) a linear combination of the others in its group is removed, and the
combination is added to the consumers' weights (``W_next[:, i] += λ_i W_next[:, j]``), so the
network keeps computing almost the same thing without retraining.

Two ways to fit λ:

* ``criterion=weights`` (the paper, data-free): λ from the producers' filters; exact when only
  linear ops sit between producer and consumer, the paper's approximation across a ReLU.
* ``criterion=activations``: λ (plus an intercept, folded into the consumers' biases) from the
  values the consumers actually read on calibration data, least-squares optimal through the
  non-linearity.

Channels are ranked across the whole network by estimated relative output change per MAC
saved, and removed in rounds until the measured MACs (or params) reach the target.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxcompress.errors import PassConfigError
from onnxcompress.fitting.allocation import ExactSavings, GroupPath, allocate
from onnxcompress.fitting.gram import GramAccumulator
from onnxcompress.fitting.replaceability import (
    Compensation,
    RemovalPlan,
    compensation,
    greedy_removal_views,
)
from onnxcompress.graph.channels import (
    ChannelAnalysis,
    ChannelGroup,
    WeightSlice,
    analyze_channels,
)
from onnxcompress.graph.model_io import drop_resident_external_pages
from onnxcompress.graph.surgery import fold_compensation, remove_channels
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction

logger = logging.getLogger(__name__)

CRITERIA = ("weights", "activations")
# The greedy path removes this fraction of a group's channels per step (at least one):
# one at a time up to 64 channels, 32 at a time in a 2048-wide stage; the allocator's
# granularity is unaffected, and ResNet-50 plans in seconds instead of minutes.
STEP_FRACTION = 1 / 64


@dataclasses.dataclass
class LrfConfig(PassConfig):
    """Options of the ``lrf`` pass.

    Attributes:
        target_macs: keep this fraction of the model's MACs (global allocation).
        target_params: keep this fraction of the parameters (instead of target_macs).
        ratio: remove this fraction of every prunable group (per-layer, no allocation).
        criterion: ``weights`` (data-free, the paper) or ``activations`` (needs --data).
        round_to: keep channel counts at multiples of this. The default 8 matters for speed:
            ONNX Runtime's CPU convolutions work on blocks of 8 (AVX2) or 16 channels, and a
            model pruned to odd widths measured slower than the original at half the MACs.
            Groups of 8 channels or fewer are then left alone; use 1 for exact budgets.
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
    """

    target_macs: float | None = None
    target_params: float | None = None
    ratio: float | None = None
    criterion: str = "weights"
    round_to: int = 8
    exclude: tuple[str, ...] = ()
    min_channels: int = 1
    ridge: float = 1e-6
    tolerance: float = 0.02
    max_rounds: int = 8
    calibration_batch: int = 32

    def validate(self) -> None:
        budgets = [b for b in (self.target_macs, self.target_params, self.ratio) if b is not None]
        if len(budgets) > 1:
            raise PassConfigError("give one of target_macs, target_params or ratio, not several")
        if not budgets:
            self.target_macs = 0.7
        check_fraction("target_macs", self.target_macs)
        check_fraction("target_params", self.target_params)
        if self.ratio is not None and not 0.0 <= self.ratio < 1.0:
            raise PassConfigError(f"ratio={self.ratio} is out of range: give a fraction in [0, 1)")
        if self.criterion not in CRITERIA:
            raise PassConfigError(
                f"criterion={self.criterion!r} is not one of {', '.join(CRITERIA)}"
            )
        if self.round_to < 1 or self.min_channels < 1 or self.max_rounds < 1:
            raise PassConfigError("round_to, min_channels and max_rounds must be >= 1")
        if not 0.0 <= self.ridge < 1.0 or not 0.0 < self.tolerance < 0.5:
            raise PassConfigError("ridge must be in [0, 1) and tolerance in (0, 0.5)")
        if self.calibration_batch < 1:
            raise PassConfigError("calibration_batch must be >= 1")


@dataclasses.dataclass
class View:
    """One place the group's channels are read: its Gram and the consumers reading there."""

    gram: np.ndarray
    outgoing_gram: np.ndarray
    consumers: list[WeightSlice]


@dataclasses.dataclass
class GroupFit:
    """What one round knows about one group: its views and greedy plan."""

    group: ChannelGroup
    views: list[View]
    plan: RemovalPlan
    intercept: bool


class LinearlyReplaceableFilters(CompressionPass[LrfConfig]):
    """Remove channels that the others can replace, compensating in the consumers."""

    name = "lrf"
    config_class = LrfConfig
    budget_options = ("target_macs", "target_params", "ratio")

    def run(self, model: ir.Model, report: PassReport) -> None:
        from onnxcompress.graph.metrics import model_metrics

        cfg = self.cfg
        if cfg.criterion == "activations" and self.context.calibration is None:
            raise PassConfigError(
                f"{self.name} criterion=activations fits on calibration data: give --data SPEC "
                "(or use criterion=weights, which needs none)"
            )
        analysis = analyze_channels(model)
        candidates = self._candidates(analysis, report)
        before = model_metrics(model)
        measure = (lambda m: m.params) if cfg.target_params is not None else (lambda m: m.macs)
        start_total = measure(before)
        self._start_total = float(start_total)
        fraction = cfg.target_params if cfg.target_params is not None else cfg.target_macs
        target = None if self._per_layer() else start_total * float(fraction or 1.0)
        sizes_before = {g.id: g.size for g in candidates}
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
            removals = self._choose(fits, current, target)
            if not removals:
                break
            for fit in fits:
                count = removals.get(fit.group.id, 0)
                if count:
                    residual = self._remove(model, fit, count)
                    errors.setdefault(fit.group.id, []).extend(residual.tolist())
                    # Weights read from a memory-mapped external file stay resident until let
                    # go: a 1 GB model would otherwise hold every old layer beside the new ones.
                    drop_resident_external_pages(model)
            current = measure(model_metrics(model))
            logger.info(
                "%s round %d: %s now %d (target %s)",
                self.name,
                rounds,
                "params" if cfg.target_params else "MACs",
                current,
                target,
            )
            candidates = [g for g in candidates if g.size > self._min_keep(g)]
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
            option = "target_params" if cfg.target_params is not None else "target_macs"
            reached = measure(after) / start_total if start_total else 1.0
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

    def _miss_reason(
        self, reached: float, goal: float, candidates: Sequence[ChannelGroup], rounds: int
    ) -> str:
        """Why the result is outside the tolerance (read only when it is)."""
        cfg = self.cfg
        if reached < goal:
            return (
                f"round_to={cfg.round_to} moves whole chunks of channels, and the closest point "
                "found lies below the target; a smaller round_to lands closer"
            )
        if not any(g.size > max(cfg.round_to, self._min_keep(g)) for g in candidates):
            return (
                f"no group left can lose a chunk of round_to={cfg.round_to} channels (the rest "
                "are that narrow, at min_channels, or frozen: the report lists why)"
            )
        if rounds >= cfg.max_rounds:
            return f"max_rounds={cfg.max_rounds} re-plans were not enough"
        return (
            f"the next chunk of round_to={cfg.round_to} channels would overshoot the target by "
            "more than it falls short; a smaller round_to lands closer"
        )

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
            counts = {}
            for fit in fits:
                size = fit.group.size
                keep = max(self._min_keep(fit.group), size - int(size * cfg.ratio))
                if cfg.round_to > 1 and size > cfg.round_to:
                    keep = min(size, int(np.ceil(keep / cfg.round_to) * cfg.round_to))
                counts[fit.group.id] = min(size - keep, len(fit.plan.order))
            return {k: v for k, v in counts.items() if v > 0}
        assert target is not None
        paths = []
        for fit in fits:
            saving = (
                fit.group.params_per_channel()
                if cfg.target_params is not None
                else fit.group.macs_per_channel()
            )
            paths.append(
                GroupPath(
                    key=fit.group.id,
                    size=fit.group.size,
                    costs=fit.plan.costs,
                    saving=float(saving),
                    min_keep=self._min_keep(fit.group),
                )
            )
        exact = ExactSavings([fit.group for fit in fits], params=cfg.target_params is not None)
        return allocate(
            paths,
            current - target,
            round_to=cfg.round_to,
            slack=cfg.tolerance * self._start_total,
            shortfall=cfg.tolerance * self._start_total / 4,
            exact=exact,
        )

    # -- fitting -----------------------------------------------------------------------------

    def _fit_groups(self, model: ir.Model, groups: Sequence[ChannelGroup]) -> list[GroupFit]:
        intercept = self.cfg.criterion == "activations"
        if intercept:
            all_views = self._activation_views(model, groups)
        else:
            all_views = {}
            for group in groups:
                all_views[group.id] = self._weight_views(group)
                drop_resident_external_pages(model)  # see run(): mapped weights, let go
        fits = []
        for group in groups:
            views = all_views[group.id]
            step = STEP_FRACTION
            plan = greedy_removal_views(
                [(v.gram, v.outgoing_gram) for v in views],
                max_remove=group.size - self._min_keep(group),
                intercept=intercept,
                ridge=self.cfg.ridge,
                step_fraction=step,
            )
            fits.append(GroupFit(group, views, plan, intercept))
        return fits

    @staticmethod
    def _weight_views(group: ChannelGroup) -> list[View]:
        """The paper's data-free fit: one filter Gram, one view per tensor the consumers read.

        Every view shares the Gram (so the λ are the same everywhere); splitting the outgoing
        weights by tensor makes a channel read at seven places cost seven relative errors, as
        with activations, instead of one averaged over all of them.
        """
        filters = group.producer_matrix()
        gram = filters @ filters.T
        by_tensor = consumers_by_tensor(group)
        if not by_tensor:
            return [View(gram, np.zeros((group.size, group.size)), [])]
        views = []
        for slices in by_tensor.values():
            rows = group.slice_matrix(slices)
            views.append(View(gram, rows @ rows.T, slices))
        return views

    def _activation_views(
        self, model: ir.Model, groups: Sequence[ChannelGroup]
    ) -> dict[int, list[View]]:
        """Per group, one view per distinct tensor its consumers read, on calibration data.

        Each view's Gram is augmented ``[C+1, C+1]`` (last: the constant) so the fit has an
        intercept, which lands in the consumers' biases.
        """
        from onnxcompress.runtime.capture import with_extra_outputs
        from onnxcompress.runtime.session import make_session

        x = self.context.calibration
        assert x is not None
        readers = {group.id: consumers_by_tensor(group) for group in groups}
        names = list(dict.fromkeys(n for by in readers.values() for n in by))
        session = make_session(with_extra_outputs(model, names), optimize=False)
        input_name = session.get_inputs()[0].name
        accumulators = {
            (g.id, n): GramAccumulator(intercept=True) for g in groups for n in readers[g.id]
        }
        positions = {
            (g.id, n): (g.positions(slices[0].tensor), g.axis(slices[0].tensor))
            for g in groups
            for n, slices in readers[g.id].items()
        }
        batch = self.cfg.calibration_batch
        for start in range(0, len(x), batch):
            outputs = session.run(names, {input_name: x[start : start + batch]})
            arrays = dict(zip(names, outputs, strict=True))
            for key, (pos, axis) in positions.items():
                accumulators[key].add(_channel_samples(arrays[key[1]], pos, axis), channel_axis=-1)
        # No calibration image (an empty array) leaves the Grams at zero.
        grams = {
            (g.id, n): accumulators[(g.id, n)].statistics().gram
            if not accumulators[(g.id, n)].empty
            else np.zeros((g.size + 1, g.size + 1))
            for g in groups
            for n in readers[g.id]
        }
        views: dict[int, list[View]] = {}
        for group in groups:
            # Channels no weighted layer reads (dropped by a Slice, say) cost nothing to remove.
            views[group.id] = (
                []
                if readers[group.id]
                else [View(np.eye(group.size + 1), np.zeros((group.size, group.size)), [])]
            )
            for name, slices in readers[group.id].items():
                rows = group.slice_matrix(slices)
                views[group.id].append(View(grams[(group.id, name)], rows @ rows.T, slices))
        return views

    # -- editing -----------------------------------------------------------------------------

    def _remove(self, model: ir.Model, fit: GroupFit, count: int) -> np.ndarray:
        group = fit.group
        removed = sorted(fit.plan.order[:count])
        residuals = []
        fitted: dict[int, Compensation] = {}  # views of the weights criterion share one Gram
        for view in fit.views:
            comp = fitted.get(id(view.gram))
            if comp is None:
                comp = fitted[id(view.gram)] = compensation(
                    view.gram,
                    removed,
                    channels=group.size,
                    intercept=fit.intercept,
                    ridge=self.cfg.ridge,
                )
            bias = comp.bias
            if not fit.intercept and group.linear_path:
                # The paper's bias part: b_j - Σ λ_i b_i, exact on a linear path.
                totals = group.producer_bias().sum(axis=1)
                if totals.size:
                    bias = totals[comp.removed] - comp.matrix @ totals[comp.keep]
            fold_compensation(
                model, group, comp.removed, comp.keep, comp.matrix, bias, consumers=view.consumers
            )
            residuals.append(comp.residual)
        remove_channels(model, group, removed)
        return np.mean(residuals, axis=0)


def consumers_by_tensor(group: ChannelGroup) -> dict[str, list[WeightSlice]]:
    """The group's consumers keyed by the tensor they read (in first-seen order)."""
    by_tensor: dict[str, list[WeightSlice]] = {}
    for ws in group.consumers:
        by_tensor.setdefault(ws.tensor.name or "", []).append(ws)
    return by_tensor


def _channel_samples(array: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """Rows = samples × positions × other axes, columns = the group's channels (float64).

    ``positions[i]`` lists channel ``i``'s places on the channel ``axis`` (several after a
    Flatten, where channel i owns a block of columns: each block position is paired across
    channels).
    """
    size, multiplicity = positions.shape
    array = np.moveaxis(array, axis, 1)
    taken = np.take(array, positions.reshape(-1), axis=1)
    shaped = taken.reshape(array.shape[0], size, multiplicity, *array.shape[2:])
    moved = np.moveaxis(shaped, 1, -1)
    return moved.reshape(-1, size).astype(np.float64)
