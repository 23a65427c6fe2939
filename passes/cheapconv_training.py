"""The training of the ``cheapconv`` pass: distillation (online among students, or offline from
the network as the pass received it) of the substituted network through the torch bridge.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxcompress.deadline import BudgetTooShortError, Deadline

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.passes.base import PassContext, PassReport
    from onnxcompress.passes.cheapconv import CheapConvConfig
    from onnxcompress.torch_bridge.finetune_config import FinetuneConfig

# The pass's own logger, so its log lines read as they always did.
logger = logging.getLogger("onnxcompress.passes.cheapconv")


@dataclasses.dataclass
class Training:
    """The training, set up before the init fits: its data, options and minimum time."""

    train: Dataset
    val: Dataset | None
    config: FinetuneConfig
    teacher: ir.Model | None
    alpha: float
    minimum_seconds: float = 0.0


def hint_pairs(
    cfg: CheapConvConfig,
    teacher: ir.Model | None,
    student: ir.Model,
    replaced_outputs: Sequence[str],
) -> tuple[tuple[str, str], ...]:
    """The (teacher, student) tensor pairs of the hint loss (none when its weight is 0)."""
    if cfg.hint_weight <= 0 or teacher is None:
        return ()
    if cfg.hints == "convs":
        # The replacement's last node keeps the replaced conv's output name in both graphs.
        return tuple((name, name) for name in replaced_outputs if name)
    from onnxcompress.graph.resection import shared_feature_maps

    return tuple(shared_feature_maps(teacher, student))


def prepare_training(
    cfg: CheapConvConfig,
    context: PassContext,
    model: ir.Model,
    teacher: ir.Model | None,
    fixed_nodes: Sequence[str],
    replaced_outputs: Sequence[str],
    deadline: Deadline,
) -> Training:
    """Load the data and set the training up; under a time budget, refuse one that cannot
    hold the training's minimum (before the init fits spend any of it)."""
    from onnxcompress.torch_bridge.finetune_config import finetune_config_from
    from onnxcompress.torch_bridge.minimum_work import minimum_work

    with deadline.phase("data"):
        # The calibration batch stands in for neither: the pass trains only on training data
        # (``run`` checked there is a spec) and validates only on validation data.
        train = context.train_set(model, fallback=None)
        assert train is not None
        val = context.validation_set(model, fallback=None)
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
                v is not None and v.const_value is not None and v.name in model.graph.initializers
                for v in n.inputs
            )
        )
    online = cfg.distill == "online"
    alpha = cfg.alpha if cfg.alpha is not None else (0.5 if online else 0.9)
    # The replacement's last node keeps the replaced conv's output name in both graphs.
    hints = hint_pairs(cfg, teacher, model, replaced_outputs) if not online else ()
    config = finetune_config_from(
        cfg,
        epochs=cfg.epoch_count,
        alpha=alpha,
        loss="mutual" if online else ("hint" if hints else "kd"),
        hint_tensors=hints,
        hint_weight=cfg.hint_weight,
        peers=cfg.students - 1 if online else None,
        trainable=trainable,
        seed=context.seed,
    )
    training = Training(train, val, config, None if online else teacher, alpha)
    if deadline.limited:
        with deadline.phase("estimate"):
            work = minimum_work(model, training.teacher, train, val, config, deadline.clock)
        training.minimum_seconds = work.seconds
        deadline.require(
            work.seconds,
            f"after loading the data ({deadline.phases['data']:.1f} s), training: {work.needs}",
        )
    return training


def train_substituted(
    cfg: CheapConvConfig,
    context: PassContext,
    model: ir.Model,
    training: Training,
    report: PassReport,
    deadline: Deadline,
) -> None:
    """Train the substituted network as ``training`` says and write the (first) student back;
    a budget that runs out before the training's minimum leaves the model as initialized."""
    from onnxcompress.torch_bridge.train import finetune
    from onnxcompress.torch_bridge.writeback import write_back

    config = training.config
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
            context.progress,
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
        "hints": [student for _, student in training.config.hint_tensors],
        **result.as_dict(),
    }


__all__ = ["Training", "hint_pairs", "prepare_training", "train_substituted"]
