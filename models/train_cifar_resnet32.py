"""Train `resnet32_cifar10.onnx`: a CIFAR ResNet-32 deepened from the shared ResNet-20, distilled.

Tuning the training passes' defaults on one network fits them to it; this script makes a second
trained CIFAR-10 network cheaply on a 2-core CPU. The ResNet-32 starts as an exact copy of the
function of ``../shared/models/resnet20_cifar10.pt`` (Net2Deeper-style: the 3 blocks of each stage
are copied, the 2 extra blocks per stage start with zero bn2 scale and shift, so they pass their
input through), then trains every weight on the CIFAR-10 JPEG training split with knowledge
distillation from the ResNet-20 plus the labels, within a wall-clock budget.

Usage:
    python models/train_cifar_resnet32.py --minutes 30      # plan the epochs by the clock
    python models/train_cifar_resnet32.py --epochs 9        # reproduce a given plan exactly
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from onnx_export import export_classifier
from torch import nn
from torch.nn import functional as F

from onnxcompress.data import Dataset, Preprocess, load_dataset

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = ROOT.parent / "shared"
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
PREPROCESS = Preprocess(scale=1 / 255, mean=MEAN, std=STD)
NORMALIZE = "mean=0.485,0.456,0.406&std=0.229,0.224,0.225"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
DEPTH, TEACHER_DEPTH = 32, 20
# Blocks per stage: (depth - 2) / 6.
BLOCKS, TEACHER_BLOCKS = (DEPTH - 2) // 6, (TEACHER_DEPTH - 2) // 6
STAGES = ("layer1", "layer2", "layer3")

BATCH_SIZE = 128
PEAK_LR, WARMUP_START_LR = 0.05, 0.005
# Warm-up steps are fixed, so the throughput measured during them can choose the epoch count
# without changing the schedule a later `--epochs N` run replays.
WARMUP_STEPS = 200
# Steps left out of the throughput measurement: the first ones pay for allocator warm-up.
TIMING_SKIP_STEPS = 10
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4
TEMPERATURE, DISTILL_WEIGHT = 4.0, 0.5
CROP_PAD = 4
# Learning-rate multiplier of the new blocks' bn2 scale and shift (see ``train``).
GATE_LR_SCALE = 10.0
# Plan the epochs for this fraction of the budget, leaving room for the machine slowing down.
PLAN_MARGIN = 0.9


@dataclass(frozen=True)
class SharedFiles:
    """The shared files this script reads, all under one ``shared`` folder."""

    root: Path

    @property
    def architecture(self) -> Path:
        return self.root / "models" / "cifar_resnet.py"

    @property
    def teacher_weights(self) -> Path:
        return self.root / "models" / "resnet20_cifar10.pt"

    @property
    def teacher_onnx(self) -> Path:
        return self.root / "models" / "resnet20_cifar10.onnx"

    def cifar_spec(self, split: str, per_class: str | None = None) -> str:
        archive = self.root / "data" / "cifar10-jpeg.tar.gz"
        select = f"per_class={per_class}&" if per_class else ""
        return f"folder:{archive}/cifar10-jpeg/{split}?{select}{NORMALIZE}"


def import_architecture(path: Path) -> ModuleType:
    """Import the shared ``cifar_resnet.py`` by path (it is not a package of this project)."""
    spec = importlib.util.spec_from_file_location("cifar_resnet", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"cannot import the CIFAR ResNet definition from {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def deepen(teacher: nn.Module, architecture: ModuleType, seed: int) -> nn.Module:
    """A ResNet-32 computing exactly the function of the ResNet-20 ``teacher``.

    Stem, head and the first ``TEACHER_BLOCKS`` blocks of each stage are copied; the extra
    blocks keep PyTorch's fresh initialization except their bn2 scale and shift, which are zero,
    so the residual branch adds 0 and the block returns relu(x) = x (x is already a ReLU output).
    """
    torch.manual_seed(seed)
    student: nn.Module = architecture.CifarResNet(DEPTH)
    state = student.state_dict()
    for name, value in teacher.state_dict().items():
        if name not in state or state[name].shape != value.shape:
            raise RuntimeError(f"the ResNet-{DEPTH} has no slot for the teacher's {name}")
        state[name] = value.clone()
    student.load_state_dict(state)
    with torch.no_grad():
        for block in new_blocks(student):
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
    return student


def new_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks the ResNet-20 does not have: the last ``BLOCKS - TEACHER_BLOCKS`` per stage."""
    return [
        block
        for stage in STAGES
        for index, block in enumerate(getattr(model, stage))
        if index >= TEACHER_BLOCKS
    ]


@torch.no_grad()
def check_function_preserving(student: nn.Module, teacher: nn.Module, x: torch.Tensor) -> float:
    """Largest |logit difference| between the deepened network and the teacher, both in eval."""
    student.eval()
    difference = float((student(x) - teacher(x)).abs().max())
    if difference > 1e-5:
        raise RuntimeError(f"the deepened network differs from ResNet-20 by {difference:.3g}")
    return difference


def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop from the image padded by ``CROP_PAD`` black pixels, and random h-flip.

    Both are one gather: each image's row and column indices into the padded batch.
    """
    n, channels, h, w = batch.shape
    # Black before normalization, as torchvision's RandomCrop pads the raw image.
    black = torch.tensor([-m / s for m, s in zip(MEAN, STD, strict=True)]).view(1, -1, 1, 1)
    padded = F.pad(batch - black, [CROP_PAD] * 4) + black
    dy = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * CROP_PAD + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)
    columns = torch.where(flip[:, None], torch.arange(w - 1, -1, -1), torch.arange(w))
    columns = dx[:, None] + columns
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(channels)[None, :, None, None],
        rows[:, None, :, None],
        columns[:, None, None, :],
    ]


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """(1 - a)·CE(labels) + a·T²·KL(teacher ‖ student) at temperature T (Hinton et al. 2015)."""
    hard = F.cross_entropy(logits, labels)
    soft = F.kl_div(
        F.log_softmax(logits / TEMPERATURE, 1),
        F.log_softmax(teacher_logits / TEMPERATURE, 1),
        log_target=True,
        reduction="batchmean",
    )
    return (1 - DISTILL_WEIGHT) * hard + DISTILL_WEIGHT * TEMPERATURE**2 * soft


def learning_rate(step: int, total_steps: int) -> float:
    """Linear warm-up from ``WARMUP_START_LR`` to ``PEAK_LR``, then cosine decay to 0."""
    if step < WARMUP_STEPS:
        return WARMUP_START_LR + (PEAK_LR - WARMUP_START_LR) * step / WARMUP_STEPS
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
    return 0.5 * PEAK_LR * (1 + math.cos(math.pi * progress))


@dataclass
class TrainingRun:
    epochs: int
    steps: int
    seconds: float
    images_per_second: float
    planned_by_clock: bool
    replanned: bool


def train(
    student: nn.Module,
    teacher: nn.Module,
    train_set: Dataset,
    *,
    seed: int,
    epochs: int | None,
    minutes: float,
) -> TrainingRun:
    """Distil ``teacher`` into ``student``; with ``epochs`` None, choose them to fit ``minutes``.

    The plan is made once the warm-up's throughput is known; should the machine slow down so
    much that the plan would overrun the budget, the remaining epochs are cut (logged, and the
    run is then not replayable with ``--epochs``).
    """
    assert train_set.y is not None
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.from_numpy(train_set.x)
    labels = torch.from_numpy(train_set.y)
    steps_per_epoch = len(inputs) // BATCH_SIZE
    # A provisional plan until the throughput is measured: long enough to hold the warm-up.
    planned_epochs = epochs or math.ceil(2 * WARMUP_STEPS / steps_per_epoch)
    total_steps = planned_epochs * steps_per_epoch
    budget = minutes * 60.0
    gates = [parameter for block in new_blocks(student) for parameter in block.bn2.parameters()]
    gate_ids = {id(parameter) for parameter in gates}
    decay, no_decay = [], []
    for parameter in student.parameters():
        if id(parameter) not in gate_ids:
            (no_decay if parameter.ndim == 1 else decay).append(parameter)
    # No weight decay on BatchNorm scales and shifts: it would pull the new blocks' bn2 scales
    # back towards 0, where the block is switched off. Those scales (the gates) start at 0, where
    # the new convs get no gradient, and the distillation term none either (the student equals
    # the teacher), so they take a larger step to open within a short run.
    groups = [
        {"params": decay, "weight_decay": WEIGHT_DECAY, "lr_scale": 1.0},
        {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": gates, "weight_decay": 0.0, "lr_scale": GATE_LR_SCALE},
    ]
    optimizer = torch.optim.SGD(groups, lr=WARMUP_START_LR, momentum=MOMENTUM, nesterov=True)
    student.train()
    teacher.eval()
    started = time.perf_counter()
    timing_started = started
    step, epoch, replanned = 0, 0, False
    while epoch < planned_epochs:
        order = torch.randperm(len(inputs), generator=generator)
        total_loss = 0.0
        correct = 0
        for start in range(0, steps_per_epoch * BATCH_SIZE, BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            batch = augment(inputs[index], generator).contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                teacher_logits = teacher(batch)
            logits = student(batch)
            loss = distillation_loss(logits, teacher_logits, labels[index])
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total_steps) * group["lr_scale"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            total_loss += float(loss.detach()) * len(index)
            correct += int((logits.detach().argmax(1) == labels[index]).sum())
            if step == TIMING_SKIP_STEPS:
                timing_started = time.perf_counter()
            if step == WARMUP_STEPS and epochs is None:
                rate = (step - TIMING_SKIP_STEPS) / (time.perf_counter() - timing_started)
                elapsed = time.perf_counter() - started
                affordable = int((budget * PLAN_MARGIN - elapsed) * rate) + step
                planned_epochs = max(1, affordable // steps_per_epoch)
                total_steps = planned_epochs * steps_per_epoch
                logger.warning(
                    "throughput %.0f images/s over steps %d-%d: planning %d epochs (%d steps) "
                    "for %.1f min; replay with --epochs %d",
                    rate * BATCH_SIZE,
                    TIMING_SKIP_STEPS,
                    step,
                    planned_epochs,
                    total_steps,
                    minutes,
                    planned_epochs,
                )
        epoch += 1
        elapsed = time.perf_counter() - started
        logger.warning(
            "epoch %d/%d  loss %.4f  train top-1 %.2f%%  lr %.4f  %.0f s",
            epoch,
            planned_epochs,
            total_loss / (steps_per_epoch * BATCH_SIZE),
            100.0 * correct / (steps_per_epoch * BATCH_SIZE),
            learning_rate(step, total_steps),
            elapsed,
        )
        if epochs is None and epoch < planned_epochs:
            per_epoch = elapsed / epoch
            if elapsed + per_epoch * (planned_epochs - epoch) > budget:
                affordable = epoch + max(0, int((budget - elapsed) / per_epoch))
                if affordable < planned_epochs:
                    # Cut the plan, and compress the remaining cosine decay into what is left.
                    planned_epochs, replanned = affordable, True
                    total_steps = planned_epochs * steps_per_epoch
                    logger.warning("running late: cutting the plan to %d epochs", planned_epochs)
    seconds = time.perf_counter() - started
    return TrainingRun(
        epochs=planned_epochs,
        steps=step,
        seconds=seconds,
        images_per_second=step * BATCH_SIZE / seconds,
        planned_by_clock=epochs is None,
        replanned=replanned,
    )


def weight_movement(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], new_prefixes: tuple[str, ...]
) -> list[str]:
    """Lines describing how far the weights moved from the deepened starting point.

    Weight decay alone shrinks every conv, and a conv followed by BatchNorm computes the same
    function at any scale, so beside ||W - W0|| / ||W0|| the lines give the norm ratio
    ||W|| / ||W0|| and the angle between W and W0, which is what changes the function.
    """

    def total(names: list[str], weights: dict[str, torch.Tensor]) -> float:
        return math.sqrt(sum(float(weights[n].pow(2).sum()) for n in names))

    def relative(names: list[str]) -> float:
        change = math.sqrt(sum(float((after[n] - before[n]).pow(2).sum()) for n in names))
        return change / total(names, before)

    def angle(name: str) -> float:
        cosine = F.cosine_similarity(after[name].flatten(), before[name].flatten(), dim=0)
        return math.degrees(math.acos(min(1.0, float(cosine))))

    def moved(names: list[str]) -> str:
        ratio = total(names, after) / total(names, before)
        angles = sorted(angle(n) for n in names)
        return (
            f"relative change {relative(names):.3f}, norm ratio {ratio:.3f}, direction turned "
            f"by {angles[0]:.1f}-{angles[-1]:.1f} degrees (median {angles[len(angles) // 2]:.1f})"
        )

    def rms(names: list[str]) -> float:
        values = torch.cat([after[n].flatten() for n in names])
        return float(values.pow(2).mean().sqrt())

    def is_new(name: str) -> bool:
        return name.startswith(new_prefixes)

    convs = [n for n in before if n.endswith(("conv1.weight", "conv2.weight"))]
    copied_convs = [n for n in convs if not is_new(n)]
    new_convs = [n for n in convs if is_new(n)]
    per_layer = sorted(relative([n]) for n in copied_convs)
    block_bn2 = [n for n in before if n.startswith("layer") and ".bn2." in n]
    new_gammas = [n for n in block_bn2 if is_new(n) and n.endswith(".weight")]
    new_betas = [n for n in block_bn2 if is_new(n) and n.endswith(".bias")]
    copied_gammas = [n for n in block_bn2 if not is_new(n) and n.endswith(".weight")]
    return [
        f"copied convs ({len(copied_convs)}): {moved(copied_convs)}; relative change per layer "
        f"min {per_layer[0]:.3f} median {per_layer[len(per_layer) // 2]:.3f} "
        f"max {per_layer[-1]:.3f}",
        f"linear head: {moved(['linear.weight'])}",
        f"new blocks' convs ({len(new_convs)}), from their random init: {moved(new_convs)}",
        "new blocks' bn2 gamma (0 at start): L2 norm per block "
        + ", ".join(f"{float(after[n].norm()):.3f}" for n in new_gammas)
        + f"; RMS {rms(new_gammas):.3f}, bn2 beta RMS {rms(new_betas):.3f} "
        f"(copied blocks' bn2 gamma RMS {rms(copied_gammas):.3f})",
    ]


@torch.no_grad()
def new_blocks_effect(model: nn.Module, dataset: Dataset) -> str:
    """What switching the new blocks off again (bn2 scale and shift to 0) does to the outputs."""
    assert dataset.y is not None
    switched_off = copy.deepcopy(model).eval()
    for block in new_blocks(switched_off):
        block.bn2.weight.zero_()
        block.bn2.bias.zero_()
    x = torch.from_numpy(dataset.x)
    full, without = model.eval()(x), switched_off(x)
    relative = float((full - without).norm() / full.norm())
    top1 = [100.0 * float((out.argmax(1).numpy() == dataset.y).mean()) for out in (full, without)]
    agreement = 100.0 * float((full.argmax(1) == without.argmax(1)).float().mean())
    return (
        f"switching the new blocks off: logits change by {relative:.3f} (relative L2), "
        f"top-1 {top1[0]:.2f}% -> {top1[1]:.2f}%, top-1 agreement {agreement:.2f}%"
    )


def export(model: nn.Module, path: Path, sample: np.ndarray) -> None:
    """Export with BatchNormalization kept as nodes, plus preprocessing metadata."""
    metadata = {
        **PREPROCESS.to_metadata(),
        "onnxcompress.dataset": "cifar10",
        "onnxcompress.classes": ",".join(CLASSES),
    }
    export_classifier(model, path, sample, metadata)


def report_onnx(path: Path, teacher_onnx: Path, halves: dict[str, Dataset]) -> None:
    """ONNX Runtime accuracy of the new file beside the ResNet-20's, its cost, size and hash."""
    from onnxcompress.graph.canonicalize import canonicalize
    from onnxcompress.graph.metrics import model_metrics
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.runtime.evaluate import accuracy, predict

    student = load_model(path)
    teacher = load_model(teacher_onnx)
    for half, dataset in halves.items():
        for name, model in ((path.name, student), (teacher_onnx.name, teacher)):
            result = accuracy(model, dataset)
            print(
                f"ONNX Runtime {name} on the {half} half: top-1 {result.top1:.2f}% "
                f"top-5 {result.top5:.2f}% ({result.samples} images)"
            )
        agreement = predict(student, dataset.x).argmax(1) == predict(teacher, dataset.x).argmax(1)
        print(f"  top-1 agreement of the two on the {half} half: {100 * agreement.mean():.2f}%")
    shipped = model_metrics(student)
    canonicalize(student)
    canonical = model_metrics(student)
    data = path.read_bytes()
    print(
        f"params {shipped.params:,} as shipped, {canonical.params:,} canonical; "
        f"MACs {canonical.macs:,} (batch 1)"
    )
    print(f"file {path}: {len(data):,} bytes, SHA-256 {hashlib.sha256(data).hexdigest()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).with_name("resnet32_cifar10.onnx")
    )
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED, help="the shared folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--minutes", type=float, default=30.0, help="wall-clock budget of the training loop"
    )
    parser.add_argument("--epochs", type=int, help="train this many epochs (ignores --minutes)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    shared = SharedFiles(args.shared)

    architecture = import_architecture(shared.architecture)
    teacher: nn.Module = architecture.load(TEACHER_DEPTH, shared.teacher_weights)
    train_set = load_dataset(shared.cifar_spec("train"))
    halves = {
        "evaluation": load_dataset(shared.cifar_spec("test", "500:1000")),
        "calibration": load_dataset(shared.cifar_spec("test", "0:500")),
    }
    student = deepen(teacher, architecture, args.seed)
    sample = torch.from_numpy(halves["calibration"].x[:256])
    difference = check_function_preserving(student, teacher, sample)
    print(f"deepened ResNet-{DEPTH} equals ResNet-20: max |logit difference| {difference:.2e}")
    before = {name: value.clone() for name, value in student.state_dict().items()}

    student = student.to(memory_format=torch.channels_last)
    teacher = teacher.to(memory_format=torch.channels_last)
    run = train(
        student, teacher, train_set, seed=args.seed, epochs=args.epochs, minutes=args.minutes
    )
    student = student.to(memory_format=torch.contiguous_format).eval()
    print(
        f"trained {run.epochs} epochs ({run.steps} steps of {BATCH_SIZE}) in {run.seconds:.0f} s, "
        f"{run.images_per_second:.0f} images/s, seed {args.seed}"
        + (f"; reproduce with --epochs {run.epochs}" if run.planned_by_clock else "")
        + ("; the plan was cut while running, so --epochs replays it only roughly"
           if run.replanned else "")
    )  # fmt: skip
    prefixes = tuple(
        f"{stage}.{index}." for stage in STAGES for index in range(TEACHER_BLOCKS, BLOCKS)
    )
    for line in weight_movement(before, student.state_dict(), prefixes):
        print(line)
    print(new_blocks_effect(student, halves["evaluation"]) + " (evaluation half, PyTorch)")
    print(f"trainable parameters: {sum(p.numel() for p in student.parameters()):,}")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    export(student, args.out, halves["calibration"].x[:64])
    print(f"wrote {args.out}")
    report_onnx(args.out, shared.teacher_onnx, halves)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
