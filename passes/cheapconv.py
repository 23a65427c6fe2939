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
from onnxcompress.fitting import cheap_kernels
from onnxcompress.graph.model import (
    clone_model,
    fresh_name,
    fresh_node_name,
    infer_shapes,
    new_initializer,
)
from onnxcompress.passes.base import CompressionPass, PassConfig, PassReport

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.torch_bridge.train import FinetuneConfig

logger = logging.getLogger(__name__)

KINDS = ("separable", "group", "shift")
MIXES = ("conv", "shuffle")
SHIFT_OPS = ("slice", "conv")
ASSIGNMENTS = ("energy", "interleave")
DISTILL = ("online", "offline")
INITS = ("auto", "activations", "weights")
_DEFAULT_DOMAINS = ("", "ai.onnx")
# Pad and Slice read their pads/starts from inputs (not attributes) from opset 11 on.
_MIN_SLICE_OPSET = 11
_INT64_MAX = np.iinfo(np.int64).max
# Under a time budget that trains, the share of the time left (after loading the data and
# keeping back the training's minimum) the data-driven init may take. Its head start is large
# and cheap: ResNet-20 separable on the 2-core CPU, top-1 60.3% after the init on 512 images
# (28 s), 55.5% on 128 (8 s), 47.0% on 32 (2.5 s), 10.8% from the closed form alone.
FIT_SHARE = 0.5
# The training's estimated minimum is kept back from the init this many times over: the
# estimate is a lower bound, timed on a machine whose load may change by the time it trains.
TRAINING_MARGIN = 1.5
# Under a time budget, a layer's init fits on fewer calibration images (a spread subset) when
# all of them do not fit its share of the time; below this many it keeps the closed form.
MIN_FIT_IMAGES = 16


@dataclasses.dataclass
class CheapConvConfig(PassConfig):
    """Options of the ``cheapconv`` pass.

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
        epochs: training epochs when the pipeline has training data (0: no training).
        distill: ``offline`` (KD from the network as the pass received it; the default: on
            CIFAR-10 ResNet-20 it reached 82.0% where online distillation reached 32.8%, see
            benchmarks/results/cheapconv*.md) or ``online`` (students trained together
            against their ensemble, the paper's setting when no trained teacher exists).
        students: cohort size of online distillation (at least 2).
        hint_weight: with ``distill=offline``: weight of a hint loss (relative MSE) between the
            original's and the student's outputs of every replaced conv (0: logits only).
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
            separable pair too (False: only after the convs that feed more than other convs;
            ``FinetuneConfig.batchnorm_between_convs``, a distillation step 1.1-1.2x faster).
        device: torch device for training (None: a GPU when visible).
    """

    kind: str = "separable"
    groups: int = 4
    mix: str = "conv"
    assignment: str = "energy"
    shift_op: str = "slice"
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    keep_first: bool = True
    min_channels: int = 8
    smoothness: float = 0.0
    refine: int = 5
    init: str = "auto"
    ridge: float = 1e-4
    rounds: int = 10
    calibration_batch: int = 64
    epochs: int = 3
    distill: str = "offline"
    students: int = 4
    hint_weight: float = 0.0
    lr: float = 0.01
    batch_size: int = 64
    temperature: float = 4.0
    alpha: float | None = None
    epoch_samples: int | None = None
    time_budget_s: float | None = None
    batchnorm: bool = False
    batchnorm_between_convs: bool = True
    device: str | None = None

    def validate(self) -> None:
        choices = (
            ("kind", self.kind, KINDS),
            ("mix", self.mix, MIXES),
            ("assignment", self.assignment, ASSIGNMENTS),
            ("shift_op", self.shift_op, SHIFT_OPS),
            ("distill", self.distill, DISTILL),
            ("init", self.init, INITS),
        )
        for name, value, allowed in choices:
            if value not in allowed:
                raise PassConfigError(
                    f"cheapconv: {name}={value!r} is not one of {', '.join(allowed)}"
                )
        if self.groups < 2:
            raise PassConfigError(f"cheapconv: groups={self.groups} must be at least 2")
        if self.min_channels < 1 or self.refine < 0 or self.epochs < 0:
            raise PassConfigError("cheapconv: min_channels must be >= 1, refine and epochs >= 0")
        if not 0.0 <= self.smoothness < 1.0:
            raise PassConfigError(f"cheapconv: smoothness={self.smoothness} must be in [0, 1)")
        if self.students < 2 and self.distill == "online":
            raise PassConfigError(
                f"cheapconv: students={self.students}: online distillation needs at least 2"
            )
        if self.lr <= 0 or self.batch_size < 1 or self.temperature <= 0:
            raise PassConfigError("cheapconv: lr, batch_size and temperature must be positive")
        if self.ridge < 0 or self.rounds < 0 or self.calibration_batch < 1 or self.hint_weight < 0:
            raise PassConfigError(
                "cheapconv: ridge, rounds and hint_weight must be >= 0, calibration_batch >= 1"
            )
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise PassConfigError(f"cheapconv: alpha={self.alpha} must be in [0, 1]")


@dataclasses.dataclass
class _ConvSite:
    """A Conv chosen for substitution and what the rewrite needs to know about it."""

    node: ir.Node
    weight: np.ndarray
    bias: np.ndarray | None
    kernel: tuple[int, ...]
    dilations: tuple[int, ...]
    strides: tuple[int, ...]


class CheapConvolutions(CompressionPass[CheapConvConfig]):
    """Substitute separable, group or shift convolutions; optionally train the result."""

    name = "cheapconv"
    config_class = CheapConvConfig
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
        from onnxcompress.graph.metrics import node_macs

        cfg = self.cfg
        infer_shapes(model)
        sites = self._select(model, report)
        will_train = bool(sites) and cfg.epochs > 0 and self.context.train_spec is not None
        teacher = clone_model(model) if will_train and cfg.distill == "offline" else None
        self._fit_data = bool(sites) and self._wants_data_fit()
        original = None
        if self._fit_data:
            original = teacher if teacher is not None else clone_model(model)
        fixed_nodes: list[str] = []
        rewritten: list[tuple[dict[str, Any], list[ir.Node]]] = []
        # The fits are many small matrix products: multi-threaded BLAS measured 4x slower than
        # one thread on a busy 2-core machine (thread hand-offs dominate).
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1, user_api="blas"), deadline.phase("rewrite"):
            for site in sites:
                layer: dict[str, Any] = {
                    "node": site.node.name,
                    "kind": cfg.kind,
                    "in_channels": int(site.weight.shape[1]),
                    "out_channels": int(site.weight.shape[0]),
                    "kernel": list(site.kernel),
                    "stride": list(site.strides),
                    "macs_before": node_macs(site.node),
                    "params_before": int(
                        site.weight.size + (0 if site.bias is None else site.bias.size)
                    ),
                }
                rewritten.append((layer, self._rewrite(model, site, layer, fixed_nodes)))
        infer_shapes(model)
        for layer, new_nodes in rewritten:
            layer["macs_after"] = sum(node_macs(node) for node in new_nodes)
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
        training: _Training | None = None
        outputs = [nodes[-1].outputs[0].name or "" for _, nodes in rewritten]
        if will_train:
            training = self._prepare_training(model, teacher, fixed_nodes, outputs, deadline)
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
                self._train(model, training, report, deadline)
        else:
            reason = "epochs=0" if cfg.epochs == 0 else "no training data (give --data)"
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
            count = _fit_images(deadline, per_image, len(steps) - index, len(x))
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
        refit_spatial = self.cfg.kind == "separable" and self.cfg.rounds > 0
        pointwise, spatial = nodes[-1], nodes[0]
        source, target = pointwise.inputs[0], pointwise.outputs[0]
        assert source is not None and source.name and target.name
        weight_value, bias_value = pointwise.inputs[1], pointwise.inputs[2]
        assert weight_value is not None and weight_value.const_value is not None
        assert bias_value is not None and bias_value.const_value is not None
        weight = weight_value.const_value.numpy()
        cout, cin = weight.shape[:2]
        before = np.concatenate(
            [weight.reshape(cout, cin), bias_value.const_value.numpy()[:, None]], axis=1
        ).T.astype(np.float64)
        probe = _patch_probe(model, spatial) if refit_spatial else _truncated(model, source.name)
        stats = _pair_statistics(
            probe, _truncated(original, target.name), x, self.cfg.calibration_batch
        )
        if refit_spatial:
            spatial_value = spatial.inputs[1]
            assert spatial_value is not None and spatial_value.const_value is not None
            kernel = spatial_value.const_value.numpy()
            taps = kernel.reshape(cin, -1).astype(np.float64)
            fit = _fit_separable(stats, taps, before, self.cfg.ridge, self.cfg.rounds)
            layer["act_rel_error_weights"] = fit.error_before
            layer["act_rel_error"] = fit.error
            if fit.error >= fit.error_before:
                return
            _set_constant(spatial_value, fit.taps.reshape(kernel.shape).astype(kernel.dtype))
            solution = fit.pointwise
        else:
            solution = _ridge_solve(stats.gram, stats.cross, self.cfg.ridge)
            layer["act_rel_error_weights"] = stats.rel_error(before)
            layer["act_rel_error"] = stats.rel_error(solution)
            if layer["act_rel_error"] >= layer["act_rel_error_weights"]:
                # Only a huge ridge or degenerate data does this; keep the closed form.
                layer["act_rel_error"] = layer["act_rel_error_weights"]
                return
        dtype = weight.dtype
        _set_constant(weight_value, solution[:cin].T.reshape(weight.shape).astype(dtype))
        _set_constant(bias_value, solution[cin].astype(dtype))
        logger.info(
            "cheapconv: %s activation error %.4f (closed form %.4f)",
            layer["node"],
            layer["act_rel_error"],
            layer["act_rel_error_weights"],
        )

    # -- selection ---------------------------------------------------------------------------

    def _select(self, model: ir.Model, report: PassReport) -> list[_ConvSite]:
        sites: list[_ConvSite] = []
        first = True
        for node in list(model.graph):
            if node.op_type != "Conv" or node.domain not in _DEFAULT_DOMAINS:
                continue
            label = node.name or f"Conv:{node.outputs[0].name}"
            is_first, first = first, False
            reason = self._decline_reason(node, is_first)
            if reason is not None:
                report.decline(label, reason)
                continue
            weight_value = node.inputs[1]
            assert weight_value is not None and weight_value.const_value is not None
            weight = weight_value.const_value.numpy()
            bias_value = node.inputs[2] if len(node.inputs) > 2 else None
            bias = None if bias_value is None else bias_value.const_value.numpy()  # type: ignore[union-attr]
            spatial = weight.ndim - 2
            kernel = tuple(int(k) for k in weight.shape[2:])
            sites.append(
                _ConvSite(
                    node=node,
                    weight=weight,
                    bias=bias,
                    kernel=kernel,
                    dilations=_ints(node, "dilations") or (1,) * spatial,
                    strides=_ints(node, "strides") or (1,) * spatial,
                )
            )
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

    # -- rewriting ---------------------------------------------------------------------------

    def _rewrite(
        self, model: ir.Model, site: _ConvSite, layer: dict[str, Any], fixed_nodes: list[str]
    ) -> list[ir.Node]:
        cfg = self.cfg
        if cfg.kind == "separable":
            sep = cheap_kernels.separable(site.weight, cfg.smoothness, site.dilations)
            layer["rel_error"] = sep.rel_error
            return self._two_convs(model, site, sep.depthwise, site.weight.shape[1], sep.pointwise)
        if cfg.kind == "group":
            if cfg.mix == "conv":
                grp = cheap_kernels.grouped(
                    site.weight, cfg.groups, cfg.refine, cfg.smoothness, site.dilations
                )
                layer["rel_error"] = grp.rel_error
                return self._two_convs(model, site, grp.grouped, cfg.groups, grp.mixing)
            shuf = cheap_kernels.shuffled(
                site.weight, cfg.groups, cfg.assignment, cfg.smoothness, site.dilations
            )
            layer["rel_error"] = shuf.rel_error
            return self._shuffled(model, site, shuf)
        shf = cheap_kernels.shift(site.weight, cfg.smoothness, site.dilations)
        layer["rel_error"] = shf.rel_error
        layer["distinct_shifts"] = len({tuple(p) for p in shf.positions.tolist()})
        pads = self._slice_pads(model, site) if cfg.shift_op == "slice" else None
        if pads is None:
            if cfg.shift_op == "slice":
                layer["shift_op"] = "conv"
            one_hot = shf.one_hot(site.kernel, site.weight.dtype)
            nodes = self._two_convs(model, site, one_hot, site.weight.shape[1], shf.pointwise)
            fixed_nodes.append(nodes[0].name or "")
            return nodes
        return self._shift_slices(model, site, shf, pads)

    def _spatial_attributes(self, site: _ConvSite, group: int) -> list[ir.Attr]:
        """The original Conv's attributes (pads, auto_pad, strides, dilations) with ``group``."""
        attrs = [
            ir.Attr(attr.name, attr.type, attr.value)
            for name, attr in site.node.attributes.items()
            if name not in ("group", "kernel_shape")
        ]
        attrs.append(ir.AttrInt64("group", group))
        attrs.append(ir.AttrInt64s("kernel_shape", list(site.kernel)))
        return attrs

    def _pointwise(
        self, model: ir.Model, site: _ConvSite, source: ir.Value, weight: np.ndarray
    ) -> ir.Node:
        graph, node = model.graph, site.node
        inputs = [source, new_initializer(graph, f"{_base(site)}.pointwise.weight", weight)]
        bias_value = node.inputs[2] if len(node.inputs) > 2 else None
        if self._fit_data:
            # The activation fit rewrites the bias: give the 1×1 one of its own.
            bias = site.bias if site.bias is not None else np.zeros(weight.shape[0], weight.dtype)
            inputs.append(new_initializer(graph, f"{_base(site)}.pointwise.bias", bias.copy()))
        elif bias_value is not None:
            inputs.append(bias_value)
        ones = [1] * len(site.kernel)
        return ir.Node(
            "",
            "Conv",
            inputs,
            [ir.AttrInt64("group", 1), ir.AttrInt64s("kernel_shape", ones)],
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/pointwise"),
        )

    def _two_convs(
        self,
        model: ir.Model,
        site: _ConvSite,
        spatial_weight: np.ndarray,
        group: int,
        pointwise_weight: np.ndarray,
    ) -> list[ir.Node]:
        """k×k Conv (``group`` groups, no bias) then a 1×1 Conv carrying the bias."""
        graph, node = model.graph, site.node
        suffix = {"separable": "depthwise", "group": "grouped", "shift": "shift"}[self.cfg.kind]
        spatial = ir.Node(
            "",
            "Conv",
            [
                node.inputs[0],
                new_initializer(graph, f"{_base(site)}.{suffix}.weight", spatial_weight),
            ],
            self._spatial_attributes(site, int(group)),
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/{suffix}"),
        )
        spatial.outputs[0].name = fresh_name(graph, f"{node.outputs[0].name}.{suffix}")
        pointwise = self._pointwise(model, site, spatial.outputs[0], pointwise_weight)
        self._replace(model, site, [spatial, pointwise])
        return [spatial, pointwise]

    def _shuffled(
        self, model: ir.Model, site: _ConvSite, factors: cheap_kernels.ShuffleFactors
    ) -> list[ir.Node]:
        """Grouped conv (rows in shuffled order, bias with them), then Gather on channels."""
        graph, node = model.graph, site.node
        inputs = [
            node.inputs[0],
            new_initializer(graph, f"{_base(site)}.grouped.weight", factors.grouped),
        ]
        if site.bias is not None:
            inputs.append(
                new_initializer(graph, f"{_base(site)}.grouped.bias", site.bias[factors.order])
            )
        conv = ir.Node(
            "",
            "Conv",
            inputs,
            self._spatial_attributes(site, self.cfg.groups),
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/grouped"),
        )
        conv.outputs[0].name = fresh_name(graph, f"{node.outputs[0].name}.grouped")
        indices = new_initializer(graph, f"{_base(site)}.shuffle", factors.inverse.astype(np.int64))
        gather = ir.Node(
            "",
            "Gather",
            [conv.outputs[0], indices],
            [ir.AttrInt64("axis", 1)],
            name=fresh_node_name(graph, f"{node.name or 'Conv'}/shuffle"),
        )
        self._replace(model, site, [conv, gather])
        return [conv, gather]

    def _slice_pads(self, model: ir.Model, site: _ConvSite) -> tuple[int, ...] | None:
        """Explicit (begin..., end...) pads of the Conv, or None where Slice cannot shift.

        ``auto_pad=SAME_*`` pads depend on the input size: known only for static dims.
        """
        opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
        if opset < _MIN_SLICE_OPSET:
            return None
        node, spatial = site.node, len(site.kernel)
        auto_attr = node.attributes.get("auto_pad")
        auto_pad = auto_attr.as_string() if auto_attr is not None else "NOTSET"
        if auto_pad in ("NOTSET", ""):
            return _ints(node, "pads") or (0,) * (2 * spatial)
        if auto_pad == "VALID":
            return (0,) * (2 * spatial)
        source = node.inputs[0]
        dims = source.shape if source is not None else None
        if dims is None or len(dims) != spatial + 2:
            return None
        begins, ends = [], []
        for axis in range(spatial):
            size = dims[axis + 2]
            if not isinstance(size, int):
                return None
            stride, reach = site.strides[axis], site.dilations[axis] * (site.kernel[axis] - 1) + 1
            total = max((-(-size // stride) - 1) * stride + reach - size, 0)
            small, big = total // 2, total - total // 2
            begins.append(small if auto_pad == "SAME_UPPER" else big)
            ends.append(big if auto_pad == "SAME_UPPER" else small)
        return (*begins, *ends)

    def _shift_slices(
        self,
        model: ir.Model,
        site: _ConvSite,
        factors: cheap_kernels.ShiftFactors,
        pads: tuple[int, ...],
    ) -> list[ir.Node]:
        """Gather (channels sorted by shift), Pad, one Slice per shift, Concat, 1×1 Conv."""
        graph, node = model.graph, site.node
        base, label = _base(site), node.name or "Conv"
        spatial = len(site.kernel)
        flat = np.ravel_multi_index(tuple(factors.positions.T), site.kernel)
        order = np.argsort(flat, kind="stable").astype(np.int64)
        nodes: list[ir.Node] = []
        source = node.inputs[0]
        assert source is not None
        if not np.array_equal(order, np.arange(order.size)):
            gather = ir.Node(
                "",
                "Gather",
                [source, new_initializer(graph, f"{base}.shift.order", order)],
                [ir.AttrInt64("axis", 1)],
                name=fresh_node_name(graph, f"{label}/shift_order"),
            )
            nodes.append(gather)
            source = gather.outputs[0]
        if any(pads):
            pad = ir.Node(
                "",
                "Pad",
                [
                    source,
                    new_initializer(
                        graph,
                        f"{base}.shift.pads",
                        np.array([0, 0, *pads[:spatial], 0, 0, *pads[spatial:]], np.int64),
                    ),
                ],
                [ir.AttrString("mode", "constant")],
                name=fresh_node_name(graph, f"{label}/shift_pad"),
            )
            nodes.append(pad)
            source = pad.outputs[0]
        axes = new_initializer(
            graph, f"{base}.shift.axes", np.arange(1, spatial + 2, dtype=np.int64)
        )
        steps = new_initializer(
            graph, f"{base}.shift.steps", np.array([1, *site.strides], dtype=np.int64)
        )
        pieces: list[ir.Value] = []
        sorted_flat = flat[order]
        for tap in np.unique(sorted_flat):
            channels = np.nonzero(sorted_flat == tap)[0]
            start_c, end_c = int(channels[0]), int(channels[-1]) + 1
            taps = np.unravel_index(int(tap), site.kernel)
            starts, ends = [start_c], [end_c]
            for axis in range(spatial):
                offset = int(taps[axis]) * site.dilations[axis]
                reach = site.dilations[axis] * (site.kernel[axis] - 1) + 1
                # Counting from the end keeps the slice valid for any (dynamic) input size.
                tail = reach - 1 - offset
                starts.append(offset)
                ends.append(-tail if tail > 0 else int(_INT64_MAX))
            piece = ir.Node(
                "",
                "Slice",
                [
                    source,
                    new_initializer(graph, f"{base}.shift.starts", np.array(starts, np.int64)),
                    new_initializer(graph, f"{base}.shift.ends", np.array(ends, np.int64)),
                    axes,
                    steps,
                ],
                name=fresh_node_name(graph, f"{label}/shift_{int(tap)}"),
            )
            nodes.append(piece)
            pieces.append(piece.outputs[0])
        if len(pieces) > 1:
            concat = ir.Node(
                "",
                "Concat",
                pieces,
                [ir.AttrInt64("axis", 1)],
                name=fresh_node_name(graph, f"{label}/shift_concat"),
            )
            nodes.append(concat)
            shifted = concat.outputs[0]
        else:
            shifted = pieces[0]
        shifted.name = fresh_name(graph, f"{node.outputs[0].name}.shifted")
        pointwise = self._pointwise(model, site, shifted, factors.pointwise[:, order])
        nodes.append(pointwise)
        self._replace(model, site, nodes)
        return nodes

    def _replace(self, model: ir.Model, site: _ConvSite, new_nodes: Sequence[ir.Node]) -> None:
        graph, node = model.graph, site.node
        old_weight = node.inputs[1]
        ir.convenience.replace_nodes_and_values(
            graph, node, [node], list(new_nodes), [node.outputs[0]], [new_nodes[-1].outputs[0]]
        )
        if old_weight is None or old_weight.uses() or old_weight.is_graph_output():
            return
        if old_weight.name is not None and old_weight.name in graph.initializers:
            del graph.initializers[old_weight.name]

    # -- training ----------------------------------------------------------------------------

    def _prepare_training(
        self,
        model: ir.Model,
        teacher: ir.Model | None,
        fixed_nodes: Sequence[str],
        replaced_outputs: Sequence[str],
        deadline: Deadline,
    ) -> _Training:
        """Load the data and set the training up; under a time budget, refuse one that cannot
        hold the training's minimum (before the init fits spend any of it)."""
        from onnxcompress.torch_bridge.train import FinetuneConfig, minimum_work

        cfg, context = self.cfg, self.context
        with deadline.phase("data"):
            train = context.load(model, context.train_spec)
            assert train is not None
            val = context.load(model, context.validation_spec)
        trainable: str | tuple[str, ...] = "all"
        if fixed_nodes:
            fixed = set(fixed_nodes)
            # Every node with weights except the fixed one-hot shift kernels.
            trainable = tuple(
                n.name
                for n in model.graph
                if n.name
                and n.name not in fixed
                and any(
                    v is not None
                    and v.const_value is not None
                    and v.name in model.graph.initializers
                    for v in n.inputs
                )
            )
        online = cfg.distill == "online"
        alpha = cfg.alpha if cfg.alpha is not None else (0.5 if online else 0.9)
        # The replacement's last node keeps the replaced conv's output name in both graphs.
        hints = (
            tuple((name, name) for name in replaced_outputs if name)
            if not online and cfg.hint_weight > 0
            else ()
        )
        config = FinetuneConfig(
            epochs=cfg.epochs,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            temperature=cfg.temperature,
            alpha=alpha,
            loss="mutual" if online else ("hint" if hints else "kd"),
            hint_tensors=hints,
            hint_weight=cfg.hint_weight,
            peers=cfg.students - 1 if online else None,
            epoch_samples=cfg.epoch_samples,
            trainable=trainable,
            batchnorm=cfg.batchnorm,
            batchnorm_between_convs=cfg.batchnorm_between_convs,
            seed=context.seed,
            device=cfg.device,
        )
        training = _Training(train, val, config, None if online else teacher, alpha)
        if deadline.limited:
            with deadline.phase("estimate"):
                work = minimum_work(model, training.teacher, train, val, config, deadline.clock)
            training.minimum_seconds = work.seconds
            deadline.require(
                work.seconds,
                f"after loading the data ({deadline.phases['data']:.1f} s), training: {work.needs}",
            )
        return training

    def _train(
        self, model: ir.Model, training: _Training, report: PassReport, deadline: Deadline
    ) -> None:
        from onnxcompress.deadline import BudgetTooShortError
        from onnxcompress.torch_bridge.train import finetune
        from onnxcompress.torch_bridge.writeback import write_back

        cfg, config = self.cfg, training.config
        logger.info(
            "cheapconv: training %s on %d images (%s distillation)",
            f"{cfg.students} students" if cfg.distill == "online" else "the student",
            len(training.train),
            cfg.distill,
        )
        if cfg.batchnorm:
            from onnxcompress.torch_bridge.batchnorm import add_missing_biases, selected_by

            # The folded BNs leave biases on the trained convs: the same ones here.
            add_missing_biases(model, selected_by(config.trainable))
        try:
            result = finetune(
                model,
                training.teacher,
                training.train,
                training.val,
                config,
                self.context.progress,
                deadline=deadline,
            )
        except BudgetTooShortError as exc:
            # The minimum was checked before the init; an init that ran long leaves the model
            # as initialized rather than overrunning the budget.
            report.summary["training"] = {"ran": False, "reason": str(exc)}
            logger.warning("cheapconv: not training: %s", exc)
            return
        write_back(model, result.module)
        report.summary["training"] = {
            "ran": True,
            "distill": cfg.distill,
            "alpha": training.alpha,
            **result.as_dict(),
        }


@dataclasses.dataclass
class _Training:
    """The training, set up before the init fits: its data, options and minimum time."""

    train: Dataset
    val: Dataset | None
    config: FinetuneConfig
    teacher: ir.Model | None
    alpha: float
    minimum_seconds: float = 0.0


@dataclasses.dataclass
class _PairStats:
    """Sums over calibration positions for the fit ``y ≈ Wᵀ [z, 1]``.

    Attributes:
        gram: ``Σ [z,1][z,1]ᵀ``, ``[Cin+1, Cin+1]``.
        cross: ``Σ [z,1] yᵀ``, ``[Cin+1, Cout]``.
        target_sq: ``Σ y²`` per output channel.
        target_sum: ``Σ y`` per output channel.
        count: positions summed.
    """

    gram: np.ndarray
    cross: np.ndarray
    target_sq: np.ndarray
    target_sum: np.ndarray
    count: int

    def rel_error(
        self,
        solution: np.ndarray,
        gram: np.ndarray | None = None,
        cross: np.ndarray | None = None,
    ) -> float:
        """``‖y - Wᵀ[z,1]‖ / ‖y - mean(y)‖`` over all positions and channels.

        ``gram``/``cross`` replace the stored ones for features derived from the stored
        ``z`` by a linear map (the depthwise conv applied to patches).
        """
        gram = self.gram if gram is None else gram
        cross = self.cross if cross is None else cross
        residual = (
            self.target_sq.sum()
            - 2.0 * float((solution * cross).sum())
            + float((solution * (gram @ solution)).sum())
        )
        spread = float((self.target_sq - self.target_sum**2 / max(self.count, 1)).sum())
        if spread <= 0.0:
            return 0.0
        return float(np.sqrt(max(residual, 0.0) / spread))


@dataclasses.dataclass
class _SeparableFit:
    """Depthwise taps ``[Cin, K]`` and ``[Cin+1, Cout]`` pointwise-and-bias of a data fit."""

    taps: np.ndarray
    pointwise: np.ndarray
    error_before: float
    error: float


def _ridge_solve(gram: np.ndarray, rhs: np.ndarray, ridge: float, intercept: bool = True) -> Any:
    """``argmin ‖y - Wᵀz‖² + λ‖W‖²`` from ``Σzzᵀ`` and ``Σzyᵀ``; the intercept row unpenalized."""
    size = gram.shape[0] - (1 if intercept else 0)
    scale = ridge * max(float(np.trace(gram[:size, :size])) / max(size, 1), 1e-30)
    penalty = np.full(gram.shape[0], scale)
    if intercept:
        penalty[-1] = 0.0
    import scipy.linalg

    regular = gram + np.diag(penalty)
    try:
        # Cholesky: several times faster than an SVD-based lstsq on 577x577 patch Grams.
        return scipy.linalg.solve(regular, rhs, assume_a="pos")
    except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
        return np.linalg.lstsq(regular, rhs, rcond=None)[0]


def _fit_separable(
    stats: _PairStats, taps: np.ndarray, start: np.ndarray, ridge: float, rounds: int
) -> _SeparableFit:
    """Alternating least squares of depthwise taps and pointwise on patch statistics.

    ``stats`` are over ``[patches, 1]`` (channel ``c`` tap ``k`` at ``c*K + k``), so the
    depthwise output's Gram is ``Dᵀ G D`` for the block-diagonal tap matrix ``D``: every
    round runs in Gram space, without touching the data again. Each half-step is an exact
    (ridge) least-squares solve, so the error cannot grow much; the best pair seen is kept.
    """
    cin, size = taps.shape
    width = cin * size

    def lift(d: np.ndarray) -> np.ndarray:
        lifted = np.zeros((width + 1, cin + 1))
        lifted[np.arange(width), np.repeat(np.arange(cin), size)] = d.ravel()
        lifted[width, cin] = 1.0
        return lifted

    def projected(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lifted = lift(d)
        return lifted.T @ stats.gram @ lifted, lifted.T @ stats.cross

    gram, cross = projected(taps)
    error_before = stats.rel_error(start, gram, cross)
    best = (error_before, taps, start)
    d = taps
    patch_gram, patch_sum = stats.gram[:width, :width], stats.gram[:width, width]
    for _ in range(rounds):
        gram, cross = projected(d)
        solution = _ridge_solve(gram, cross, ridge)
        error = stats.rel_error(solution, gram, cross)
        if error < best[0]:
            best = (error, d, solution)
        pointwise, bias = solution[:cin].T, solution[cin]  # [Cout, Cin], [Cout]
        # y - b ≈ Σ_c P[:, c] Σ_k d_ck φ_ck: linear in d with the Gram below.
        mixing = np.kron(pointwise.T @ pointwise, np.ones((size, size)))
        rhs_full = (stats.cross[:width] - np.outer(patch_sum, bias)) @ pointwise  # [CK, Cin]
        rhs = rhs_full.reshape(cin, size, cin)[np.arange(cin), :, np.arange(cin)].ravel()
        flat = _ridge_solve(patch_gram * mixing, rhs[:, None], ridge, intercept=False)[:, 0]
        d = flat.reshape(cin, size)
        # Unit-norm taps keep the factors balanced; the next pointwise solve absorbs the scale.
        norms = np.linalg.norm(d, axis=1, keepdims=True)
        d = np.where(norms > 0, d / np.maximum(norms, 1e-30), taps)
    gram, cross = projected(d)
    solution = _ridge_solve(gram, cross, ridge)
    error = stats.rel_error(solution, gram, cross)
    if error < best[0]:
        best = (error, d, solution)
    return _SeparableFit(taps=best[1], pointwise=best[2], error_before=error_before, error=best[0])


def _patch_probe(model: ir.Model, spatial: ir.Node) -> ir.Model:
    """A copy of ``model`` whose only output is the im2col patches ``spatial`` reads.

    A grouped Conv with one-hot kernels (same pads, strides, dilations as ``spatial``) puts
    tap ``k`` of input channel ``c`` in output channel ``c*K + k``.
    """
    probe = clone_model(model)
    node = next(n for n in probe.graph if n.name == spatial.name)
    weight = node.inputs[1]
    assert weight is not None and weight.const_value is not None
    cin, _, *kernel = weight.const_value.numpy().shape
    size = int(np.prod(kernel))
    one_hot = np.tile(np.eye(size, dtype=np.float32), (cin, 1)).reshape(cin * size, 1, *kernel)
    patches = ir.Node(
        "",
        "Conv",
        [node.inputs[0], new_initializer(probe.graph, "cheapconv.patches", one_hot)],
        [ir.Attr(a.name, a.type, a.value) for a in node.attributes.values()],
        name=fresh_node_name(probe.graph, "cheapconv/patches"),
    )
    probe.graph.insert_after(node, patches)
    probe.graph.outputs.clear()
    probe.graph.outputs.append(patches.outputs[0])
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(probe)
    return probe


def _truncated(model: ir.Model, name: str) -> ir.Model:
    """A copy of ``model`` that computes only the tensor ``name`` (its only output)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    probe = clone_model(model)
    value = next(
        (v for node in probe.graph for v in node.outputs if v.name == name),
        None,
    )
    if value is None:
        raise KeyError(f"no tensor named {name!r} in the model")
    probe.graph.outputs.clear()
    probe.graph.outputs.append(value)
    RemoveUnusedNodesPass()(probe)
    return probe


def _pair_statistics(
    source_model: ir.Model, target_model: ir.Model, x: np.ndarray, batch: int
) -> _PairStats:
    """Gram statistics between the (only) outputs of two models over the batches of ``x``."""
    from onnxcompress.runtime.session import make_session

    sessions = [make_session(m, optimize=False) for m in (source_model, target_model)]
    stats: _PairStats | None = None
    for start in range(0, len(x), batch):
        z, y = (
            np.asarray(s.run(None, {s.get_inputs()[0].name: x[start : start + batch]})[0])
            for s in sessions
        )
        zf = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1]).astype(np.float64)
        yf = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]).astype(np.float64)
        if zf.shape[0] != yf.shape[0]:
            raise ValueError(f"positions differ: {z.shape} (replacement) vs {y.shape} (original)")
        za = np.concatenate([zf, np.ones((zf.shape[0], 1))], axis=1)
        update = _PairStats(za.T @ za, za.T @ yf, (yf**2).sum(0), yf.sum(0), zf.shape[0])
        if stats is None:
            stats = update
        else:
            stats.gram += update.gram
            stats.cross += update.cross
            stats.target_sq += update.target_sq
            stats.target_sum += update.target_sum
            stats.count += update.count
    assert stats is not None
    return stats


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    assert value.name is not None
    value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)


def _ints(node: ir.Node, name: str) -> tuple[int, ...] | None:
    attr = node.attributes.get(name)
    return tuple(int(v) for v in attr.as_ints()) if attr is not None else None


def _base(site: _ConvSite) -> str:
    """Stem of the new initializers' names: the replaced weight's name."""
    weight = site.node.inputs[1]
    return (weight.name if weight is not None and weight.name else None) or (
        site.node.name or "conv"
    )


def _fit_images(
    deadline: Deadline, per_image: float | None, layers_left: int, available: int
) -> int:
    """Calibration images the next layer's init fits on: all while an even share of what is
    left of ``deadline`` holds them at ``per_image`` seconds each (the slowest fit so far; None
    before the first, which gets all), fewer when not, 0 (the closed form) below
    ``MIN_FIT_IMAGES``."""
    if not deadline.limited or per_image is None:
        return 0 if deadline.expired() else available
    share = deadline.remaining() / max(layers_left, 1)
    count = min(available, int(share / max(per_image, 1e-12)))
    return count if count >= min(MIN_FIT_IMAGES, available) else 0
