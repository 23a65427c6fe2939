"""``cheapconv``: replace standard convolutions by cheap ones, then recover by distillation.

Xie et al., "Training convolutional neural networks with cheap convolutions and online
distillation". Every selected standard Conv (group 1, kernel larger than 1x1) becomes

* ``separable``: a depthwise k×k Conv (group = Cin, same strides, pads, dilations) and a 1×1
  Conv (Cin→Cout) carrying the bias;
* ``group``: a k×k Conv with ``groups`` groups and a 1×1 mixing Conv, or (``mix=shuffle``) a
  channel permutation (``Gather`` on the channel axis) instead of the 1×1;
* ``shift``: a parameter-free per-channel spatial shift and a 1×1 Conv. The shift is ``Gather``
  (channels sorted by shift) + ``Pad`` + one ``Slice`` per shift + ``Concat``: zero MACs, no
  weights (``shift_op=conv``: a depthwise Conv with fixed one-hot kernels instead, which the
  training never updates).

The factors start from the closed-form, data-free fits of ``onnxcompress.fitting.cheap_kernels``
(per-channel rank-1 SVD, block-diagonal part plus least-squares 1×1, energy peak plus
least-squares 1×1); the report lists each layer's relative approximation error. With
calibration data (``init=activations``, the default when the pipeline has ``--data``) the 1×1
of every replaced conv (and its bias) is then refit, in graph order, by ridge least squares
from the replacement's input in the network compressed so far to the original network's
output of that conv, so each fit also corrects the drift the layers before it left; the
depthwise, grouped or shift part keeps its closed form. When the
pipeline has training data (``--data``) and ``epochs > 0`` the substituted network is trained
through the torch bridge: online distillation (``students`` copies trained together, each
learning from the labels and from their ensemble's logits at temperature T, the paper's
online teacher) or offline KD from the network as the pass received it; the first student
is written back.

``time_budget_s`` covers the whole pass, from its start: the rewrite, loading the data, the
data-driven init and the training with its validations. The minimum work, refused up front
(``BudgetTooShortError``) when the budget cannot hold it: the closed-form rewrite and, when the
pass trains, loading the data and the training run's own minimum (its validations and one
step, estimated from a timed batch before the init fits start). The data-driven init is fitted
layer by layer while its share of the budget lasts (``FIT_SHARE`` of what the training's
minimum leaves): a layer whose even share of it cannot hold a fit on every calibration image
fits on fewer (a spread subset), one that cannot hold ``MIN_FIT_IMAGES`` keeps the closed form,
and the summary's ``init_shortened`` lists them. The training gets the rest; ``time`` in the
summary says where the budget went.

This module holds the options, the selection and the pass's sequence; the rewrite is in
``cheapconv_rewrite``, the data-driven init in ``cheapconv_init``, the training in
``cheapconv_training``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from onnxcompress.deadline import Clock, Deadline
from onnxcompress.errors import PassConfigError
from onnxcompress.graph.canonicalize import infer_shapes
from onnxcompress.graph.model_io import clone_model
from onnxcompress.graph.op_families import DEFAULT_DOMAINS
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport, check_fraction
from onnxcompress.passes.cheapconv_init import fit_images, fit_layer
from onnxcompress.passes.cheapconv_rewrite import ConvRewriter, ConvSite
from onnxcompress.passes.cheapconv_training import Training, prepare_training, train_substituted
from onnxcompress.torch_bridge.training_options import TrainingOptions

if TYPE_CHECKING:
    from onnxcompress.graph.metrics import ModelMetrics

logger = logging.getLogger(__name__)

KINDS = ("separable", "group", "shift")
MIXES = ("conv", "shuffle")
SHIFT_OPS = ("slice", "conv")
ASSIGNMENTS = ("energy", "interleave")
DISTILL = ("online", "offline")
INITS = ("auto", "activations", "weights")
HINTS = ("stages", "convs")
# Under a time budget that trains, the share of the time left (after loading the data and
# keeping back the training's minimum) the data-driven init may take. Its head start is large
# and cheap: ResNet-20 separable on the 2-core CPU, top-1 60.3% after the init on 512 images
# (28 s), 55.5% on 128 (8 s), 47.0% on 32 (2.5 s), 10.8% from the closed form alone.
FIT_SHARE = 0.5
# The training's estimated minimum is kept back from the init this many times over: the
# estimate is a lower bound, timed on a machine whose load may change by the time it trains.
TRAINING_MARGIN = 1.5
# target_macs counts as met this far above it (as the other passes' MAC targets).
TARGET_TOLERANCE = 0.02
# Epochs without a time budget (``epochs`` left at None).
DEFAULT_EPOCHS = 3
# With a time budget and ``epochs`` left at None: more epochs than any budget holds, so the
# clock ends the run and its learning-rate schedule follows the clock (``finetune``).
CLOCK_EPOCHS = 10_000


@dataclasses.dataclass
class CheapConvConfig(PassConfig, TrainingOptions):
    """Options of the ``cheapconv`` pass, and the shared ``TrainingOptions`` of its training.

    Attributes:
        kind: ``separable``, ``group`` or ``shift``.
        groups: groups of the k×k conv with ``kind=group``; layers whose channel counts it
            does not divide are left alone (and listed).
        mix: with ``kind=group``: ``conv`` (a 1×1 mixing conv) or ``shuffle`` (a channel
            permutation, no extra MACs).
        assignment: with ``mix=shuffle``: ``energy`` (each output channel reads the input
            block that keeps the most kernel energy, blocks balanced) or ``interleave``
            (ShuffleNet's fixed shuffle).
        shift_op: with ``kind=shift``: ``slice`` (Gather + Pad + Slice + Concat, zero MACs) or
            ``conv`` (depthwise Conv with fixed one-hot kernels).
        include: node-name patterns (fnmatch, ``;``-separated on the command line); only
            matching Convs are replaced (empty: every eligible Conv).
        exclude: node-name patterns never replaced.
        target_macs: the model's MACs after the rewrite, as a fraction of before (None: every
            eligible Conv is replaced). The eligible Convs are replaced in order of their
            closed-form approximation error per MAC saved, lowest first, until the target
            holds; the ones whose replacement would cost the most accuracy per MAC stay dense
            (declined, with why). A target that replacing all of them cannot reach is a miss
            the console reports.
        keep_first: leave the first Conv of the graph (the stem) alone.
        min_channels: leave Convs with fewer input channels alone.
        smoothness: correlation ρ of neighbouring input pixels assumed by the data-free fits
            (0: plain least squares on the kernel weights, the paper's closed forms).
        init: ``weights`` (the data-free closed forms only), ``activations`` (then refit each
            1×1 and bias on calibration data, layer by layer) or ``auto`` (activations when the
            pipeline has calibration data).
        ridge: ridge of the activation fit, relative to the mean diagonal of the input Gram.
        rounds: with ``kind=separable`` and activation init: alternating least-squares rounds
            that also refit the depthwise taps given the 1×1 (0: the 1×1 and bias only).
        calibration_batch: images per ONNX Runtime call while gathering activation statistics.
        refine: alternating least-squares rounds of the group fit (0: block-diagonal part
            plus least-squares 1×1 only).
        epochs: training epochs when the pipeline has training data (0: no training). None
            (default): with ``time_budget_s``, as many as the budget holds (the clock ends the
            run and drives the learning-rate schedule: a user who gives 15 minutes expects
            them used; on ResNet-20 a fixed 3 epochs stopped after 409 s of 900); without
            one, ``DEFAULT_EPOCHS``.
        distill: ``offline`` (KD from the network as the pass received it; the default: on
            CIFAR-10 ResNet-20 it reached 82.0% where online distillation reached 32.8%, see
            benchmarks/results/cheapconv*.md) or ``online`` (students trained together
            against their ensemble, the paper's setting when no trained teacher exists).
        students: cohort size of online distillation (at least 2).
        hint_weight: with ``distill=offline``: weight of a hint loss (relative MSE) between the
            original's and the student's tensors at ``hints`` (0: logits only). 10 by default:
            with stage hints, ResNet-20 CIFAR-10's separable student reached 85.00 and 84.78
            in two ~25-minute runs (``benchmarks/results/cheapconv.md``,
            ``cheapconv_bn_stagehints.md``), against 83.58 with a hint at every replaced conv.
        hints: where the hints are: ``stages`` (the last feature map of each shape a conv
            makes that both networks compute, found on the graph: the outputs of a CNN's
            stages, the residual stream where one runs) or ``convs`` (every replaced conv's
            output).
        lr: peak learning rate (SGD with Nesterov momentum, cosine decay).
        batch_size: images per step.
        temperature: softmax temperature T of the distillation term.
        alpha: weight of the distillation term against cross-entropy with the labels (None:
            0.5 online, where the cohort's ensemble starts as ignorant as its students and the
            labels must carry weight (0.9 left ResNet-20's cross-entropy at chance for two
            epochs); 0.9 offline, where the teacher is the trained original).
        epoch_samples: images per epoch (None: the whole training set).
        time_budget_s: wall time of the whole pass: rewrite, data loading, data-driven init
            and training (None: no limit); see the module docstring for what it must hold.
        batchnorm: train with a BatchNormalization after every Conv, folded back at the end
            (``FinetuneConfig.batchnorm``; ``benchmarks/batchnorm_training.py``: 3.1 points
            more for ResNet-20's separable version after the same 30,000 images).
        batchnorm_between_convs: with ``batchnorm``, a BN after the depthwise half of each
            separable pair too (False, the default here: only after the convs that feed more
            than other convs; ``FinetuneConfig.batchnorm_between_convs``, a distillation step
            1.1-1.2x faster, and the best separable runs trained so).
        device: torch device for training (None: a GPU when visible).
    """

    kind: str = "separable"
    groups: int = 4
    mix: str = "conv"
    assignment: str = "energy"
    shift_op: str = "slice"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    target_macs: float | None = None
    keep_first: bool = True
    min_channels: int = 8
    smoothness: float = 0.0
    refine: int = 5
    init: str = "auto"
    ridge: float = 1e-4
    rounds: int = 10
    calibration_batch: int = 64
    epochs: int | None = None
    distill: str = "offline"
    students: int = 4
    hint_weight: float = 10.0
    hints: str = "stages"
    # Off, unlike the shared default: a BN between the depthwise and pointwise halves slowed a
    # step 1.1-1.2x and the best separable runs trained without it (see above).
    batchnorm_between_convs: bool = False
    # None: derived from ``distill`` (see above), where the shared default is one number.
    alpha: float | None = None  # type: ignore[assignment]
    time_budget_s: float | None = None

    def validate(self) -> None:
        choices = (
            ("kind", self.kind, KINDS),
            ("mix", self.mix, MIXES),
            ("assignment", self.assignment, ASSIGNMENTS),
            ("shift_op", self.shift_op, SHIFT_OPS),
            ("distill", self.distill, DISTILL),
            ("init", self.init, INITS),
            ("hints", self.hints, HINTS),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise PassConfigError(
                    f"cheapconv: {name}={value!r} is not one of {', '.join(allowed)}"
                )
        if self.groups < 2:
            raise PassConfigError(f"cheapconv: groups={self.groups} must be at least 2")
        if self.min_channels < 1 or self.refine < 0 or self.epoch_count < 0:
            raise PassConfigError("cheapconv: min_channels must be >= 1, refine and epochs >= 0")
        if not 0.0 <= self.smoothness < 1.0:
            raise PassConfigError(f"cheapconv: smoothness={self.smoothness} must be in [0, 1)")
        if self.students < 2 and self.distill == "online":
            raise PassConfigError(
                f"cheapconv: students={self.students}: online distillation needs at least 2"
            )
        if self.ridge < 0 or self.rounds < 0 or self.calibration_batch < 1 or self.hint_weight < 0:
            raise PassConfigError(
                "cheapconv: ridge, rounds and hint_weight must be >= 0, calibration_batch >= 1"
            )
        check_fraction("target_macs", self.target_macs)
        self.check_training_options("cheapconv")

    @property
    def epoch_count(self) -> int:
        """The training epochs: ``epochs``, or (None) enough that ``time_budget_s`` ends the
        run, or ``DEFAULT_EPOCHS`` without a budget."""
        if self.epochs is not None:
            return self.epochs
        return CLOCK_EPOCHS if self.time_budget_s is not None else DEFAULT_EPOCHS


class CheapConvolutions(CompressionPass[CheapConvConfig]):
    """Substitute separable, group or shift convolutions; optionally train the result."""

    name = "cheapconv"
    config_class = CheapConvConfig
    budget_options = ("target_macs",)
    _fit_data: bool = False
    # The clock of ``time_budget_s`` (None: ``time.monotonic``); tests inject a ManualClock.
    clock: Clock | None = None

    def run(self, model: ir.Model, report: PassReport) -> None:
        # One deadline for the whole pass, started before anything else.
        deadline = Deadline(self.cfg.time_budget_s, clock=self.clock, label="cheapconv")
        try:
            self._substitute(model, report, deadline)
        finally:
            report.summary["time"] = deadline.report()

    def _substitute(self, model: ir.Model, report: PassReport, deadline: Deadline) -> None:
        from onnxcompress.graph.input_shapes import at_counted_shapes
        from onnxcompress.graph.metrics import node_macs

        cfg = self.cfg
        infer_shapes(model)
        sites = self._select(model, report)
        if cfg.target_macs is not None and sites:
            sites = self._sites_for_target(model, sites, cfg.target_macs, report)
        will_train = bool(sites) and cfg.epoch_count > 0 and self.context.train_spec is not None
        teacher = clone_model(model) if will_train and cfg.distill == "offline" else None
        self._fit_data = bool(sites) and self._wants_data_fit()
        original = None
        if self._fit_data:
            original = teacher if teacher is not None else clone_model(model)
        rewriter = ConvRewriter(cfg, self._fit_data)
        fixed_nodes: list[str] = []
        rewritten: list[tuple[dict[str, Any], list[ir.Node]]] = []
        # The fits are many small matrix products: multi-threaded BLAS measured 4x slower than
        # one thread on a busy 2-core machine (thread hand-offs dominate).
        from threadpoolctl import threadpool_limits

        # MACs at the size the run counts them at (symbolic height and width would count 1x1).
        with at_counted_shapes(model):
            macs_before = [node_macs(site.node) for site in sites]
        with threadpool_limits(limits=1, user_api="blas"), deadline.phase("rewrite"):
            for site, site_macs in zip(sites, macs_before, strict=True):
                layer: dict[str, Any] = {
                    "node": site.node.name,
                    "kind": cfg.kind,
                    "in_channels": int(site.weight.shape[1]),
                    "out_channels": int(site.weight.shape[0]),
                    "kernel": list(site.kernel),
                    "stride": list(site.strides),
                    "macs_before": site_macs,
                    "params_before": int(
                        site.weight.size + (0 if site.bias is None else site.bias.size)
                    ),
                }
                rewritten.append((layer, rewriter.rewrite(model, site, layer, fixed_nodes)))
        infer_shapes(model)
        with at_counted_shapes(model):
            macs_after = [sum(node_macs(node) for node in nodes) for _, nodes in rewritten]
        for (layer, new_nodes), layer_macs in zip(rewritten, macs_after, strict=True):
            layer["macs_after"] = layer_macs
            layer["params_after"] = sum(
                int(value.const_value.size)
                for node in new_nodes
                for value in node.inputs
                if value is not None
                and value.const_value is not None
                and value.const_value.dtype.is_floating_point()
            )
            report.layers.append(layer)
        report.modified = bool(sites)
        training: Training | None = None
        outputs = [nodes[-1].outputs[0].name or "" for _, nodes in rewritten]
        if will_train:
            training = prepare_training(
                cfg, self.context, model, teacher, fixed_nodes, outputs, deadline
            )
        if original is not None:
            # The training's minimum (with a margin: the machine may be busier by then) stays
            # out of the init's share.
            reserve = TRAINING_MARGIN * training.minimum_seconds if training is not None else 0.0
            share = FIT_SHARE if training is not None else 1.0
            fit_deadline = deadline.share(share, reserve=reserve, label="cheapconv init")
            with threadpool_limits(limits=1, user_api="blas"), deadline.phase("init"):
                self._fit_activations(model, original, rewritten, fit_deadline, report)
        errors = [layer["rel_error"] for layer in report.layers]
        before = sum(layer["macs_before"] for layer in report.layers)
        after = sum(layer["macs_after"] for layer in report.layers)
        report.summary.update(
            {
                "kind": cfg.kind,
                "replaced": len(report.layers),
                "mean_rel_error": float(np.mean(errors)) if errors else 0.0,
                "max_rel_error": float(np.max(errors)) if errors else 0.0,
                "replaced_macs_before": before,
                "replaced_macs_after": after,
                "replaced_macs_ratio": after / before if before else 1.0,
                "init": "activations" if original is not None else "weights",
            }
        )
        fitted = [layer for layer in report.layers if "act_rel_error" in layer]
        if fitted:
            report.summary["mean_act_rel_error_weights"] = float(
                np.mean([layer["act_rel_error_weights"] for layer in fitted])
            )
            report.summary["mean_act_rel_error"] = float(
                np.mean([layer["act_rel_error"] for layer in fitted])
            )
        if not sites:
            return
        if training is not None:
            with deadline.phase("training"):
                train_substituted(cfg, self.context, model, training, report, deadline)
        else:
            reason = "epochs=0" if cfg.epoch_count == 0 else "no training data (give --data)"
            report.summary["training"] = {"ran": False, "reason": reason}
            logger.info("cheapconv: not training (%s); accuracy rests on the closed form", reason)

    def _wants_data_fit(self) -> bool:
        init, has_data = self.cfg.init, self.context.calibration is not None
        if init == "activations" and not has_data:
            raise PassConfigError(
                "cheapconv init=activations fits on calibration data: give --data SPEC "
                "(or init=weights)"
            )
        return init == "activations" or (init == "auto" and has_data)

    # -- data-driven initialization ----------------------------------------------------------

    def _fit_activations(
        self,
        model: ir.Model,
        original: ir.Model,
        rewritten: Sequence[tuple[dict[str, Any], list[ir.Node]]],
        deadline: Deadline,
        report: PassReport,
    ) -> None:
        """Refit every replacement's 1×1 and bias on calibration data, in graph order.

        The input of each 1×1 comes from the model as compressed so far (earlier layers
        already refit), the target from the original model, so each fit also absorbs the
        error the replaced layers before it left. Only Gram matrices are kept per batch.

        Layer by layer while ``deadline`` lasts (``_fit_images``): a layer whose even share of
        what is left cannot hold a fit on every calibration image fits on fewer, and one that
        cannot hold ``MIN_FIT_IMAGES`` keeps the closed form; ``init_shortened`` lists them.
        """
        from onnxcompress.data import spread_index

        x = self.context.calibration
        assert x is not None
        order = {id(node): index for index, node in enumerate(model.graph)}
        steps = sorted(
            (pair for pair in rewritten if pair[1][-1].op_type == "Conv"),
            key=lambda pair: order[id(pair[1][-1])],
        )
        # The slowest fit so far, per image (the later layers are the wider ones).
        per_image: float | None = None
        fewer: dict[str, int] = {}
        closed_form: list[str] = []
        for index, (layer, nodes) in enumerate(steps):
            count = fit_images(deadline, per_image, len(steps) - index, len(x))
            layer["init_images"] = count
            if count == 0:
                closed_form.append(layer["node"])
                continue
            if count < len(x):
                fewer[layer["node"]] = count
            tic = deadline.clock()
            self._fit_layer(model, original, layer, nodes, x[spread_index(len(x), count)])
            seconds = (deadline.clock() - tic) / count
            per_image = seconds if per_image is None else max(per_image, seconds)
        if fewer or closed_form:
            assert deadline.budget_s is not None  # an unlimited deadline shortens nothing
            report.summary["init_shortened"] = {
                "reason": f"the init's share of the time budget ({deadline.budget_s:.1f} s) could "
                f"not hold a fit on all {len(x)} calibration images per layer",
                "fewer_images": fewer,
                "closed_form": closed_form,
            }
            logger.info(
                "cheapconv: init cut short by the time budget: %d layers fitted on fewer "
                "images, %d kept the closed form",
                len(fewer),
                len(closed_form),
            )

    def _fit_layer(
        self,
        model: ir.Model,
        original: ir.Model,
        layer: dict[str, Any],
        nodes: list[ir.Node],
        x: np.ndarray,
    ) -> None:
        """Refit one replacement's 1×1 and bias (and a separable one's depthwise taps)."""
        fit_layer(self.cfg, model, original, layer, nodes, x)

    # -- selection ---------------------------------------------------------------------------

    def check_targets(self, before: ModelMetrics, after: ModelMetrics, report: PassReport) -> None:
        goal = self.cfg.target_macs
        if goal is None:
            return
        reached = after.macs / before.macs if before.macs else 1.0
        # A budget: at or under it is met (each Conv is replaced whole, so the plan lands
        # under the target by up to one layer's saving).
        report.check_target(
            "target_macs",
            goal,
            reached,
            tolerance=TARGET_TOLERANCE,
            met=reached <= goal + TARGET_TOLERANCE,
            reason=report.summary.get("target_plan", {}).get("note", "")
            or "replacing every eligible Conv does not save that much",
        )

    def _sites_for_target(
        self, model: ir.Model, sites: list[ConvSite], goal: float, report: PassReport
    ) -> list[ConvSite]:
        """The sites to replace so that the model's MACs land at or under ``goal`` of now:
        every one, less those whose closed-form error per MAC saved is highest while the
        target still holds without them. Planned on a copy rewritten with the same closed
        forms, so the MACs are the rewrite's own."""
        from onnxcompress.graph.input_shapes import at_counted_shapes
        from onnxcompress.graph.metrics import model_metrics, node_macs

        trial = clone_model(model)
        order = {id(node): index for index, node in enumerate(model.graph)}
        trial_nodes = list(trial.graph)
        rewriter = ConvRewriter(self.cfg, fit_data=False)
        with at_counted_shapes(model):
            total = model_metrics(model).macs
            before = [node_macs(site.node) for site in sites]
        errors: list[float] = []
        replaced: list[list[ir.Node]] = []
        for site in sites:
            layer: dict[str, Any] = {}
            trial_site = ConvSite.of(trial_nodes[order[id(site.node)]])
            replaced.append(rewriter.rewrite(trial, trial_site, layer, []))
            errors.append(float(layer["rel_error"]))
        infer_shapes(trial)
        with at_counted_shapes(trial):
            after = [sum(node_macs(node) for node in nodes) for nodes in replaced]
        saved = [b - a for b, a in zip(before, after, strict=True)]
        planned = total - sum(saved)
        budget = goal * total
        keep = set()
        # Most harmful per MAC saved first: each stays dense while the target still holds.
        for index in sorted(range(len(sites)), key=lambda i: -errors[i] / max(saved[i], 1)):
            if planned + saved[index] <= budget:
                keep.add(index)
                planned += saved[index]
        plan: dict[str, Any] = {
            "target_macs": goal,
            "planned_macs": round(planned / max(total, 1), 4),
            "kept_dense": [sites[i].node.name for i in sorted(keep)],
        }
        if planned > budget:
            plan["note"] = (
                f"replacing every eligible Conv leaves {planned / max(total, 1):.3f} of the MACs "
                "(the rest is in layers cheapconv does not replace)"
            )
        report.summary["target_plan"] = plan
        for index in sorted(keep):
            node = sites[index].node
            report.decline(
                node.name or f"Conv:{node.outputs[0].name}",
                f"kept dense: target_macs={goal:g} holds without replacing it (closed-form "
                f"error {errors[index]:.3f}, among the highest per MAC saved)",
            )
        return [site for index, site in enumerate(sites) if index not in keep]

    def _select(self, model: ir.Model, report: PassReport) -> list[ConvSite]:
        sites: list[ConvSite] = []
        first = True
        for node in list(model.graph):
            if node.op_type != "Conv" or node.domain not in DEFAULT_DOMAINS:
                continue
            label = node.name or f"Conv:{node.outputs[0].name}"
            is_first, first = first, False
            reason = self._decline_reason(node, is_first)
            if reason is not None:
                report.decline(label, reason)
                continue
            sites.append(ConvSite.of(node))
        if not sites:
            logger.warning("cheapconv: no Conv was eligible (see the declined list)")
        return sites

    def _decline_reason(self, node: ir.Node, is_first: bool) -> str | None:
        cfg = self.cfg
        name = node.name or ""
        if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
            return "not matched by include="
        pattern = next((p for p in cfg.exclude if fnmatch.fnmatchcase(name, p)), None)
        if pattern is not None:
            return f"excluded by the user (exclude={pattern})"
        group_attr = node.attributes.get("group")
        if group_attr is not None and group_attr.as_int() != 1:
            return f"already a grouped/depthwise conv (group={group_attr.as_int()})"
        weight_value = node.inputs[1] if len(node.inputs) > 1 else None
        if weight_value is None or weight_value.const_value is None:
            return "the weight is computed, not an initializer"
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if bias_value is not None and bias_value.const_value is None:
            return "the bias is computed, not an initializer"
        shape: tuple[int, ...] = tuple(weight_value.const_value.shape.numpy())
        if len(shape) < 3:
            return f"weight of rank {len(shape)} has no spatial axes"
        if math.prod(shape[2:]) <= 1:
            return "a 1x1 conv is already pointwise"
        if not weight_value.const_value.dtype.is_floating_point():
            return "the weight is not a float tensor"
        if is_first and self.cfg.keep_first and not cfg.include:
            return "the first convolution (stem) is kept (keep_first=false replaces it)"
        cin, cout = shape[1], shape[0]
        if cin < cfg.min_channels:
            return f"{cin} input channels, fewer than min_channels={cfg.min_channels}"
        if cfg.kind == "group" and (cin % cfg.groups or cout % cfg.groups):
            return f"groups={cfg.groups} does not divide {cin} inputs and {cout} outputs"
        return None
