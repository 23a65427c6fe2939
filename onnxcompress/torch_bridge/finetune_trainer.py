"""The fine-tuning run behind ``finetune``: builds the networks, trains and picks the best epoch.

One ``Trainer`` per call; it steps the optimizer within the run's deadline and checkpoints.
"""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch
from torch import nn

from onnxcompress.data import Dataset
from onnxcompress.deadline import Deadline
from onnxcompress.errors import DataError, OnnxCompressError, PassConfigError
from onnxcompress.graph.model_io import clone_model
from onnxcompress.torch_bridge.distillation_losses import hint_loss, training_loss
from onnxcompress.torch_bridge.distillation_networks import (
    Cohort,
    FrozenTeacher,
    HintAdapter,
    class_scores,
    classifier_input,
)
from onnxcompress.torch_bridge.distributed import DistributedContext, all_reduce_sum, barrier
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
from onnxcompress.torch_bridge.finetune_result import EpochRecord, FinetuneResult
from onnxcompress.torch_bridge.finetune_validation import (
    BestEpoch,
    Validation,
    autocast_to,
    clone_state,
)
from onnxcompress.torch_bridge.minimum_work import estimate_minimum_work, validation_passes
from onnxcompress.torch_bridge.module import OnnxModule
from onnxcompress.torch_bridge.training_batches import (
    augment_batch,
    batch_loader,
    epoch_order,
    in_fast_layout,
    split_batches,
)
from onnxcompress.torch_bridge.training_checkpoint import (
    CHECKPOINT_FILE,
    checkpoint_payload,
    load_checkpoint,
    restore_checkpoint,
    run_fingerprint,
    save_checkpoint,
)
from onnxcompress.torch_bridge.writeback import write_back

# The training's messages keep the logger of the public entry: the CLI prints its name, and
# callers (benchmarks/resect.py) listen on it.
logger = logging.getLogger("onnxcompress.torch_bridge.train")

# Augmentation is on by default only for images at least this large: shifting an 8x8 digit by
# 4 pixels destroys it.
AUGMENT_MIN_SIZE = 16
# One-cycle: fraction of the steps spent warming up, and the start/end learning-rate divisors.
ONECYCLE_WARMUP = 0.3
ONECYCLE_START_DIV = 25.0
ONECYCLE_END_DIV = 1e4
# Peer copies in mutual learning start from the student's weights plus this much noise (relative
# to each tensor's spread) when augmentation cannot make them see different inputs.
PEER_NOISE = 0.01


# What torch raises when images do not fit a network (channels, sizes, ranks).
MISFIT_ERRORS = (RuntimeError, ValueError, IndexError)


def misfit_error(data: Dataset, model: ir.Model, exc: BaseException) -> DataError:
    """The one line a user gets when the training images do not fit the student."""
    from onnxcompress.graph.model_io import model_label

    return DataError(
        f"finetune: images of shape {tuple(data.x.shape[1:])} from {data.name!r} do not fit "
        f"{model_label(model)} ({str(exc).splitlines()[0][:200]}); fix the data spec "
        "(e.g. resize=, channels=)"
    )


class Trainer:
    """One fine-tuning run; ``finetune`` is its public face."""

    def __init__(
        self,
        student_model: ir.Model,
        teacher: ir.Model | nn.Module | None,
        train: Dataset,
        val: Dataset | None,
        config: FinetuneConfig,
        context: DistributedContext,
        progress: bool,
        deadline: Deadline,
    ) -> None:
        self.deadline = deadline
        self.clock = self.deadline.clock
        self.student_model = student_model
        self.train_data, self.val_data = train, val
        self.config = config
        self.context = context
        self.device = context.device
        self.progress = progress and context.is_main
        self.mutual = config.loss == "mutual"
        self.has_labels = train.y is not None
        self.after_step: Callable[[OnnxModule, float], None] | None = None
        torch.manual_seed(config.seed)

        # Built first so that unsupported ops are reported before anything else happens.
        self.student = OnnxModule(student_model, trainable=config.trainable).to(self.device)
        if len(self.student.input_names) != 1:
            raise PassConfigError(
                f"finetune: the student has {len(self.student.input_names)} inputs "
                f"({', '.join(self.student.input_names)}); only single-input models train here"
            )
        if not self.student.trainable_names:
            raise PassConfigError("finetune: the student has no trainable parameters")
        self.teacher_net = self._build_teacher(teacher)
        if self.teacher_net is None and not self.has_labels:
            raise DataError(
                f"finetune: the training data {train.name!r} has no labels and there is no "
                "teacher; give labelled data or a teacher to learn from"
            )
        self.augment = (
            config.augment
            if config.augment is not None
            else min(train.x.shape[2:]) >= AUGMENT_MIN_SIZE
        )
        self.x = torch.from_numpy(train.x)
        self.y = None if train.y is None else torch.from_numpy(train.y)
        teacher_capture, student_capture = self._hint_names(teacher)
        self.teacher = (
            FrozenTeacher(self.teacher_net, teacher_capture)
            if self.teacher_net is not None
            else None
        )
        adapters = self._probe(student_capture)
        peers = self._build_peers()
        self.cohort = Cohort(self.student, peers, student_capture, adapters).to(self.device)
        self.trained: nn.Module = self.cohort
        if context.distributed:
            self.trained = nn.parallel.DistributedDataParallel(
                self.cohort, device_ids=[self.device] if self.device.type == "cuda" else None
            )
        self.optimizer = self._build_optimizer()
        self.steps_per_epoch = len(
            split_batches(epoch_order(len(train), 0, config, context), config.batch_size)
        )
        # Fraction of the time budget spent, identical on every process (see _spend_time).
        self.time_progress = 0.0
        self.out_of_time = False
        self.clock_before = 0.0  # seconds spent by the runs this one resumes
        # What must still run after the last step, measured as the run goes: the validation
        # (self.validation.seconds), a checkpoint, copying the best state and writing it back.
        self.checkpoint_seconds = 0.0
        self.state_seconds = 0.0
        self.step_seconds = 0.0  # the last training step's
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.amp_dtype = self._amp_dtype()
        self.validation = Validation(val, config, context, self.deadline, self.amp_dtype)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )

    # -- construction ------------------------------------------------------------------------

    def _build_teacher(self, teacher: ir.Model | nn.Module | None) -> nn.Module | None:
        if teacher is None:
            return None
        if isinstance(teacher, ir.Model):
            network: nn.Module = OnnxModule(teacher, trainable="all" if self.mutual else "none")
        elif isinstance(teacher, nn.Module):
            # A teacher that trains in the cohort is a copy: the caller's module stays as given.
            network = copy.deepcopy(teacher) if self.mutual else teacher
        else:
            raise PassConfigError(
                f"finetune: the teacher must be an onnx_ir Model or a torch nn.Module, "
                f"not {type(teacher).__name__}"
            )
        network = network.to(self.device)
        if not self.mutual:
            network.eval()
        return network

    def _hint_names(self, teacher: ir.Model | nn.Module | None) -> tuple[list[str], list[str]]:
        config = self.config
        if config.loss != "hint":
            return [], []
        if self.teacher_net is None:
            raise PassConfigError("finetune: loss 'hint' needs a teacher")
        pairs = list(config.hint_tensors)
        if not pairs:
            teacher_model = teacher if isinstance(teacher, ir.Model) else None
            t_name = classifier_input(teacher_model, self.teacher_net)
            s_name = classifier_input(self.student_model, self.student)
            if t_name is None or s_name is None:
                raise PassConfigError(
                    "finetune: loss 'hint' found no classifier input to match; give "
                    "hint_tensors (--hint TEACHER_TENSOR=STUDENT_TENSOR)"
                )
            pairs = [(t_name, s_name)]
            logger.info("hint distillation at %s (teacher) -> %s (student)", t_name, s_name)
        known = set(self.student._slot_of_name)
        missing = [s for _, s in pairs if s not in known]
        if missing:
            raise PassConfigError(
                f"finetune: the student has no tensor {', '.join(map(repr, missing))} to use as "
                "a hint; name tensors of the student graph"
            )
        if isinstance(self.teacher_net, OnnxModule):
            known = set(self.teacher_net._slot_of_name)
            missing = [t for t, _ in pairs if t not in known]
            if missing:
                raise PassConfigError(
                    f"finetune: the teacher has no tensor {', '.join(map(repr, missing))} to "
                    "use as a hint; name tensors of the teacher graph"
                )
        return [t for t, _ in pairs], [s for _, s in pairs]

    def _probe(self, student_capture: Sequence[str]) -> list[nn.Module]:
        """Run two images through both networks: checks shapes and labels, sizes adapters."""
        x = self.x[:2].to(self.device)
        self.student.eval()
        try:
            with torch.no_grad():
                if student_capture:
                    out, captured = self.student(x, capture=list(student_capture))
                    student_hints = [captured[name] for name in student_capture]
                else:
                    out, student_hints = self.student(x), []
                student_logits = class_scores(out)
                teacher_logits, teacher_hints = (
                    self.teacher(x) if self.teacher is not None else (None, [])
                )
        except OnnxCompressError:
            raise
        except MISFIT_ERRORS as exc:
            raise misfit_error(self.train_data, self.student_model, exc) from exc
        finally:
            self.student.train()
        if student_logits.dim() != 2:
            raise PassConfigError(
                f"finetune: the student's output has shape {tuple(student_logits.shape)}; "
                "fine-tuning needs class scores of shape (N, classes)"
            )
        self.classes = int(student_logits.shape[1])
        if teacher_logits is not None and tuple(teacher_logits.shape) != tuple(
            student_logits.shape
        ):
            raise DataError(
                f"finetune: teacher output {tuple(teacher_logits.shape)} and student output "
                f"{tuple(student_logits.shape)} differ; distillation needs the same classes"
            )
        for data, role in ((self.train_data, "training"), (self.val_data, "validation")):
            if data is None or data.y is None:
                continue
            low, high = int(data.y.min()), int(data.y.max())
            if low < 0 or high >= self.classes:
                raise DataError(
                    f"finetune: labels of the {role} data {data.name!r} span {low}..{high} but "
                    f"the model scores {self.classes} classes (0..{self.classes - 1})"
                )
        return [
            HintAdapter(tuple(s.shape), tuple(t.shape))
            for s, t in zip(student_hints, teacher_hints, strict=True)
        ]

    def _build_peers(self) -> list[nn.Module]:
        if not self.mutual:
            return []
        peers: list[nn.Module] = []
        if self.teacher_net is not None:
            peers.append(self.teacher_net)
        copies = self.config.peers
        if copies is None:
            copies = 0 if self.teacher_net is not None else 1
        if not peers and copies == 0:
            raise PassConfigError("finetune: loss 'mutual' needs a teacher or peers >= 1")
        generator = torch.Generator().manual_seed(self.config.seed + 7919)
        for _ in range(copies):
            peer = OnnxModule(self.student_model, trainable=self.config.trainable).to(self.device)
            if not self.augment:
                # Without augmentation identical copies would follow identical trajectories.
                with torch.no_grad():
                    for _, param in peer.named_onnx_parameters():
                        spread = float(param.std()) if param.numel() > 1 else 0.0
                        noise = torch.randn(param.shape, generator=generator) * PEER_NOISE * spread
                        param.add_(noise.to(param.device))
            peers.append(peer)
        self.teacher = None  # in mutual learning the teacher is a trained peer, not a target
        return peers

    def _build_optimizer(self) -> torch.optim.Optimizer:
        config = self.config
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for param in self.cohort.parameters():
            if param.requires_grad:
                (decay if param.dim() > 1 else no_decay).append(param)
        groups = [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self._trained_params = decay + no_decay
        if config.optimizer == "sgd":
            return torch.optim.SGD(
                groups, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0
            )
        return torch.optim.AdamW(groups, lr=config.lr)

    def _progress(self, step: int) -> float:
        """Fraction of the run done after ``step`` optimizer steps: of the planned steps or of
        the time budget, whichever is further (equal on every process)."""
        total = max(1, self.config.epochs * self.steps_per_epoch)
        return min(1.0, max(step / total, self.time_progress))

    def _lr_factor(self, step: int) -> float:
        progress = self._progress(step)
        if self.config.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        start, end = 1.0 / ONECYCLE_START_DIV, 1.0 / ONECYCLE_END_DIV
        if progress < ONECYCLE_WARMUP:
            return start + (1.0 - start) * progress / ONECYCLE_WARMUP
        tail = (progress - ONECYCLE_WARMUP) / (1.0 - ONECYCLE_WARMUP)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * tail))

    def _amp_dtype(self) -> torch.dtype | None:
        if not self.config.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _autocast(self) -> AbstractContextManager[Any]:
        return autocast_to(self.amp_dtype)

    # -- the run -----------------------------------------------------------------------------

    def run(self) -> FinetuneResult:
        try:
            return self._run()
        finally:
            if self.teacher is not None:
                self.teacher.close()

    def _run(self) -> FinetuneResult:
        config = self.config
        checkpoint = (
            Path(config.checkpoint_dir) / CHECKPOINT_FILE if config.checkpoint_dir else None
        )
        fingerprint = run_fingerprint(config, self.student, self.train_data, self.context)
        payload: dict[str, Any] | None = None
        if config.resume and checkpoint is not None and checkpoint.exists():
            payload = load_checkpoint(checkpoint)
            self.clock_before = float(payload.get("elapsed", 0.0))
        if self.deadline.limited:
            self._require_minimum(resumed=payload is not None)
        if checkpoint is not None and self.context.is_main:
            checkpoint.parent.mkdir(parents=True, exist_ok=True)
        teacher_top1 = self.validation.teacher_top1(self.teacher_net)
        history: list[EpochRecord] = []
        start_epoch = 0
        tic = self.clock()
        best = BestEpoch(0, None, clone_state(self.student))
        self.state_seconds = self.clock() - tic
        if payload is not None:
            assert checkpoint is not None
            restore_checkpoint(
                payload,
                fingerprint,
                checkpoint,
                self.cohort,
                self.optimizer,
                self.scheduler,
                self.scaler,
            )
            start_epoch = int(payload["epoch"])
            history = [EpochRecord(**record) for record in payload["history"]]
            saved = payload["best"]
            best = BestEpoch(int(saved["epoch"]), saved["top1"], saved["student"])
            self.validation.seconds = float(payload.get("validation_seconds", 0.0))
            self._say(f"resumed from {checkpoint} after epoch {start_epoch}")
        else:
            if config.resume:
                self._say(f"no checkpoint at {checkpoint}; starting from the beginning")
            tic = self.clock()
            best.top1 = self._validate()
            seconds = round(self.clock() - tic, 3)
            history.append(
                EpochRecord(0, None, best.top1, seconds, val_images=self.validation.scored())
            )
            if best.top1 is not None:
                self._say(f"before training: validation top-1 {best.top1:.2f}%")

        for epoch in range(start_epoch, config.epochs):
            record = self._train_epoch(epoch)
            history.append(record)
            if record.val_top1 is None or best.top1 is None or record.val_top1 > best.top1:
                best = BestEpoch(record.epoch, record.val_top1, clone_state(self.student))
            if checkpoint is not None and self.context.is_main:
                tic = self.clock()
                payload = checkpoint_payload(
                    epoch + 1,
                    fingerprint,
                    history,
                    best,
                    self.cohort,
                    self.optimizer,
                    self.scheduler,
                    self.scaler,
                    self.clock_before,
                    self.deadline,
                    self.validation.seconds,
                )
                save_checkpoint(checkpoint, payload)
                self.checkpoint_seconds = max(self.checkpoint_seconds, self.clock() - tic)
            barrier(self.context)
            if self.out_of_time:
                assert self.deadline.budget_s is not None
                self._say(
                    f"time budget of {self.deadline.budget_s:.0f} s reached in epoch {epoch + 1} "
                    f"of {config.epochs}"
                )
                break

        self.student.load_state_dict(best.state)
        self.student.eval()
        if best.epoch == 0 and best.top1 is not None and len(history) > 1:
            logger.warning(
                "no epoch beat the starting point on validation (%.2f%%); the weights are "
                "returned unchanged",
                best.top1,
            )
        model = write_back(clone_model(self.student_model), self.student)
        return FinetuneResult(
            model=model,
            module=self.student,
            history=history,
            best_epoch=best.epoch,
            best_top1=best.top1,
            teacher_top1=teacher_top1,
            seconds=self.deadline.spent(),
            world_size=self.context.world_size,
            out_of_time=self.out_of_time,
            validations_cut_short=self.validation.cut_short,
        )

    def _say(self, message: str) -> None:
        logger.info(message)
        if self.progress:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)

    def _train_epoch(self, epoch: int) -> EpochRecord:
        config, context = self.config, self.context
        tic = self.clock()
        # Every epoch derives its randomness from (seed, epoch): a resumed run replays it.
        torch.manual_seed(config.seed * 1_000_003 + epoch)
        augment_rng = torch.Generator().manual_seed(
            (config.seed * 1_000_003 + epoch) * 1009 + context.rank
        )
        batches = split_batches(epoch_order(len(self.x), epoch, config, context), config.batch_size)
        loader = batch_loader(self.x, self.y, batches, config.num_workers)
        self.trained.train()
        if self.teacher is not None:
            self.teacher.network.eval()
        loss_sum, seen = 0.0, 0
        bar = self._bar(len(batches), f"epoch {epoch + 1}/{config.epochs}")
        # A step's time includes fetching its batch.
        tic_step = self.clock()
        for x, y in loader:
            x = x.to(self.device, non_blocking=True)
            y = None if y is None else y.to(self.device, non_blocking=True)
            loss = self._step(x, y, augment_rng)
            self.step_seconds, tic_step = self.clock() - tic_step, self.clock()
            batch = int(x.shape[0])
            loss_sum += loss * batch
            seen += batch
            if self.out_of_time:
                break
            if bar is not None:
                elapsed = max(self.clock() - tic, 1e-9)
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_sum / seen:.4f}",
                    img_s=f"{seen * context.world_size / elapsed:.0f}",
                )
        if bar is not None:
            bar.close()
        train_seconds = self.clock() - tic
        total_loss, total_seen = all_reduce_sum([loss_sum, float(seen)], context)
        top1 = self._validate()
        record = EpochRecord(
            epoch=epoch + 1,
            loss=round(total_loss / max(total_seen, 1.0), 6),
            val_top1=top1,
            seconds=round(self.clock() - tic, 3),
            images_per_second=round(total_seen / max(train_seconds, 1e-9), 1),
            lr=float(self.optimizer.param_groups[0]["lr"]),
            images=int(total_seen),
            val_images=self.validation.scored(),
        )
        shown = f", validation top-1 {top1:.2f}%" if top1 is not None else ""
        self._say(
            f"epoch {record.epoch}/{config.epochs}: loss {record.loss:.4f}{shown}, "
            f"{record.images_per_second:.0f} img/s, {record.seconds:.1f} s"
        )
        return record

    def _bar(self, total: int, description: str) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, unit="batch", leave=False, file=sys.stderr)

    def _views(self, x: torch.Tensor, generator: torch.Generator) -> list[torch.Tensor]:
        count = 1 + len(self.cohort.peers)
        if not self.augment:
            return [self._layout(x)] * count
        padding = self.config.crop_padding
        return [
            self._layout(augment_batch(x, generator, padding, self.config.flip))
            for _ in range(count)
        ]

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return in_fast_layout(x, self.config.channels_last)

    def _step(self, x: torch.Tensor, y: torch.Tensor | None, generator: torch.Generator) -> float:
        config = self.config
        views = self._views(x, generator)
        with self._autocast():
            teacher_logits: torch.Tensor | None = None
            teacher_hints: list[torch.Tensor] = []
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits, teacher_hints = self.teacher(views[0])
            logits, hints = self.trained(views)
            if self.mutual:
                ensemble = torch.stack([out.float() for out in logits]).mean(0).detach()
                losses = [training_loss(out, ensemble, y, config) for out in logits]
                loss = torch.stack(losses).sum()
                student_loss = losses[0]
            else:
                loss = training_loss(logits[0], teacher_logits, y, config)
                if hints:
                    terms = [hint_loss(s, t) for s, t in zip(hints, teacher_hints, strict=True)]
                    loss = loss + config.hint_weight * torch.stack(terms).mean()
                student_loss = loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if config.max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self._trained_params, config.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step is not None:
            with torch.no_grad():
                self.after_step(self.student, self._progress(self.scheduler.last_epoch + 1))
        if self.deadline.limited:
            self._spend_time()
        self.scheduler.step()
        value = float(student_loss.detach())
        if not math.isfinite(value):
            raise DataError(
                f"finetune: the loss became {value}; lower the learning rate (lr={config.lr})"
            )
        return value

    def _spend_time(self) -> None:
        """Update the budget fraction spent; every process adopts the slowest clock.

        The processes must agree, or they would use different learning rates and one would
        stop while another waits for its gradients.
        """
        budget = self.deadline.budget_s
        assert budget is not None
        # Earlier runs of a resumed training spent their part of the budget.
        spent = self.clock_before + self.deadline.spent()
        # Keep room for what follows the last step: its validation, a checkpoint, copying the
        # best weights and writing them back; and stop a step early rather than a step late.
        after = self.validation.seconds + self.checkpoint_seconds + 3 * self.state_seconds
        after += self.step_seconds
        fraction = self._slowest((spent + after) / max(budget, 1e-9))
        self.time_progress = min(1.0, fraction)
        self.out_of_time = fraction >= 1.0

    def _slowest(self, value: float) -> float:
        """The largest ``value`` over all processes."""
        if not self.context.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())

    def _require_minimum(self, resumed: bool) -> None:
        """Refuse a budget that cannot hold the run's minimum work, before any of it starts.

        The minimum: the validations the run makes whatever the budget (the teacher's top-1,
        the starting point's unless resumed, the last epoch's) and one training step. Both
        are estimated from the student's forward pass over one batch, timed after a warm-up:
        a lower bound (a training step also runs the backward pass, and the teacher is seldom
        smaller than the student), so a budget that would work is not refused.
        """
        has_teacher, distills = self.teacher_net is not None, self.teacher is not None
        passes = validation_passes(self.val_data, has_teacher, distills, self.mutual, resumed)
        teacher_net = self.teacher_net
        self.student.eval()
        was_training = teacher_net.training if teacher_net is not None else False
        if teacher_net is not None:
            teacher_net.eval()
        try:
            work = estimate_minimum_work(
                lambda x: self.validation.predict(self.student, x),
                None
                if teacher_net is None
                else (lambda x: self.validation.predict(teacher_net, x)),
                self.clock,
                self.train_data,
                self.val_data,
                self.config,
                passes,
                images=len(self.validation.shard()) if sum(passes) else 0,
                students=1 + len(self.cohort.peers),
                distills=distills,
            )
        finally:
            self.student.train()
            if teacher_net is not None:
                teacher_net.train(was_training)
        need = self._slowest(work.seconds)
        needs = work.needs
        deadline = self.deadline
        if self.clock_before > 0:
            # What the resumed runs spent is gone from the budget.
            deadline = deadline.within(deadline.remaining() - self.clock_before)
        deadline.require(need, needs)

    def _validate(self) -> float | None:
        """Top-1 of the student on the validation data, over all processes."""
        # Without labels the predictions of a teacher stand in for them.
        has_reference = self.teacher is not None or (self.mutual and self.teacher_net is not None)
        return self.validation.student_top1(
            self.student, self.teacher_net if has_reference else None
        )
