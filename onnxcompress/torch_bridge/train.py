"""Fine-tune a compressed ONNX model in PyTorch, distilling from the original, and write it back.

Passes that lose accuracy (``lrf``, ``merge``...) recover it here: the student graph trains
through ``OnnxModule`` and its trained initializers go back into the same graph by name.

Losses (``FinetuneConfig.loss``):

``kd``
    Logit distillation: ``alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE``.
    Without labels it is pure distillation; without a teacher, plain cross-entropy.
``hint``
    ``kd`` plus ``hint_weight`` times the relative MSE (``||s - t||^2 / ||t||^2``) between named
    tensors of teacher and student, through a trained 1x1 adapter where widths differ (the
    adapter is not part of the written model).
``mutual``
    Online mutual distillation: the student, ``peers`` copies of it and, when given, the
    teacher all train together; each learns from the labels and from the ensemble's averaged
    logits at temperature T (the online teacher).

The same ``finetune`` call runs as one process or under ``torchrun --nproc_per_node=N``
(DistributedDataParallel, one writer); checkpoints are written every epoch, and a resumed run
ends with the same weights as an uninterrupted one.

A time budget (``time_budget_s``, or a ``Deadline`` a pass hands over) covers the whole call:
BatchNorm insertion, building the networks, every validation, checkpoints and the write-back.
The minimum work (the validations the run must make and one training step) is estimated from a
timed batch before any of it starts; a budget that cannot hold it is refused with
``BudgetTooShortError`` (a ``PassConfigError``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import onnx_ir as ir
from torch import nn

from onnxcompress.data import Dataset
from onnxcompress.deadline import Deadline
from onnxcompress.errors import UnsupportedOpError
from onnxcompress.graph.model_io import clone_model
from onnxcompress.torch_bridge.distributed import setup_distributed, teardown_distributed
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
from onnxcompress.torch_bridge.finetune_result import FinetuneResult
from onnxcompress.torch_bridge.finetune_trainer import Trainer
from onnxcompress.torch_bridge.module import OnnxModule
from onnxcompress.torch_bridge.training_batches import check_dataset

# Training images (spread over the set) whose statistics initialize inserted BatchNorms.
BATCHNORM_CALIBRATION = 512


def _check_float_input(student: Any) -> None:
    """The bridge feeds float32 images; a float16 model would fail deep inside torch."""
    if not isinstance(student, ir.Model):
        return
    from onnxcompress.graph.model_io import model_label

    for value in student.graph.inputs:
        if value.is_initializer() or value.type is None:
            continue
        dtype = value.type.dtype
        if dtype != ir.DataType.FLOAT:
            raise UnsupportedOpError(
                f"{model_label(student)}: input {value.name!r} is {dtype.name.lower()}; "
                "finetune trains float32 models (fine-tune the float32 model, convert after)"
            )


def run_deadline(config: FinetuneConfig, deadline: Deadline | None = None) -> Deadline:
    """The deadline of one ``finetune`` call: ``config.time_budget_s``, the caller's
    ``deadline``, whichever ends first (unlimited without either).

    Without ``config.time_budget_s``, a caller's deadline that is not a share of another
    (``Deadline.is_share``) is the user's budget for the run, started before the caller loaded
    the models and data (``onnxcompress finetune``): it is used as it is, so that messages
    name it as the user's."""
    if deadline is None or not deadline.limited:
        # The budget is the user's own: messages name it as such.
        clock = None if deadline is None else deadline.clock
        return Deadline(config.time_budget_s, clock=clock, label="finetune")
    if config.time_budget_s is None and not deadline.is_share:
        return deadline
    label = f"{deadline.label} training" if deadline.label else "finetune"
    return deadline.within(config.time_budget_s, label=label)


def finetune(
    student: ir.Model,
    teacher: ir.Model | nn.Module | None,
    train: Dataset,
    val: Dataset | None = None,
    config: FinetuneConfig | None = None,
    progress: bool = True,
    after_step: Callable[[OnnxModule, float], None] | None = None,
    deadline: Deadline | None = None,
) -> FinetuneResult:
    """Train ``student`` (optionally distilling from ``teacher``) and write the weights back.

    Under ``torchrun`` every process calls this with the same arguments; each trains on its
    shard of ``train`` and all end with the same weights. Only rank 0 prints and writes
    checkpoints; the caller should write outputs on rank 0 only (``is_main_process()``).

    Args:
        student: the model to train; it is not modified (the result holds a copy).
        teacher: the original ONNX model (run frozen through ``OnnxModule``), any
            ``nn.Module`` mapping the same images to the same classes (it is moved to the
            training device and put in eval mode; with ``mutual`` a copy trains), or None.
        train: training images, with labels or without (then a teacher is needed).
        val: validation images; the best epoch is chosen on them (with labels: top-1; without:
            top-1 agreement with the teacher). None keeps the last epoch.
        config: options; defaults when None.
        progress: draw a progress bar (rank 0 only).
        after_step: called with the student and the run's progress (the fraction of the
            planned steps or of ``time_budget_s`` spent, whichever is further; the same number
            on every process) after every optimizer step (under ``no_grad``), e.g. to project
            its weights back onto a constraint set (projected SGD); it must act identically on
            every process.
        deadline: the time the run may take, from a caller's budget (a pass's sub-deadline);
            with ``config.time_budget_s`` too, whichever ends first. Its clock times the run.

    Raises:
        UnsupportedOpError: a model uses ops the bridge cannot run (before any training).
        DataError: empty data, labels out of range, images that do not fit the model, or an
            unreadable checkpoint.
        PassConfigError: options out of range, unknown hint tensors, a checkpoint from another
            run.
        BudgetTooShortError: the time budget cannot hold the minimum work (before it starts).
    """
    config = config if config is not None else FinetuneConfig()
    config.validate()
    # Started first: everything below (BatchNorm insertion included) is part of the run.
    deadline = run_deadline(config, deadline)
    _check_float_input(student)
    check_dataset(train, "training")
    if val is not None:
        check_dataset(val, "validation")
    from onnxcompress.graph.sparse_storage import STORED_KEY, expand_stored

    if STORED_KEY in student.metadata_props:
        # Weights an earlier step stored compactly are computed by the graph: train them as
        # plain initializers (the result is dense).
        student = clone_model(student)
        expand_stored(student)
    inserted: list[str] = []
    trainable = config.trainable
    if config.batchnorm:
        from onnxcompress.torch_bridge.batchnorm import insert_batchnorms, selected_by
        from onnxcompress.torch_bridge.finetune_trainer import MISFIT_ERRORS, misfit_error
        from onnxcompress.torch_bridge.module import require_supported

        # Checked on the caller's model, so the message names its file, not the copy's graph.
        require_supported(student)
        # Deterministic (the same images, eval mode): every process inserts the same.
        original, student = student, clone_model(student)
        try:
            inserted = insert_batchnorms(
                student,
                train.spread(BATCHNORM_CALIBRATION).x,
                select=selected_by(trainable),
                between_convs=config.batchnorm_between_convs,
            )
        except MISFIT_ERRORS as exc:
            # The BN statistics are the first pass of the images through the student.
            raise misfit_error(train, original, exc) from exc
        if isinstance(trainable, tuple):
            # A BN trains with the conv it follows.
            config = dataclasses.replace(config, trainable=trainable + tuple(inserted))
    context = setup_distributed(config.device)
    try:
        trainer = Trainer(student, teacher, train, val, config, context, progress, deadline)
        trainer.after_step = after_step
        result = trainer.run()
        if inserted:
            from onnxcompress.torch_bridge.batchnorm import fold_batchnorms

            result.trained_graph, result.inserted = student, tuple(inserted)
            fold_batchnorms(result.model, inserted)
            result.module = OnnxModule(result.model, trainable=trainable)
            result.module = result.module.to(trainer.device).eval()
    except BaseException:
        # No barrier on the way out: the other processes may be gone or stuck elsewhere.
        teardown_distributed(context, clean=False)
        raise
    teardown_distributed(context)
    return result


__all__ = ["finetune", "run_deadline"]
