"""Issue 20's recovery comparison, side by side in one run: this tool against the PyTorch route.

1. ``onnxcompress compress`` with ``lrf:target_macs=0.5`` (activations, calibrated on the first
   100 images per class of the calibration half), then ``onnxcompress finetune`` with its
   **default options** and ``--epochs 3`` on the CIFAR-10 training split, validated on the
   calibration half; both run as a user would, through the command line.
2. The anchor: Torch-Pruning L1 on ``resnet20_cifar10.pt`` (inner block channels, BatchNorm
   kept; ``torch_pruning_anchor.py``) to at most the MACs step 1 kept, then 3 epochs with the
   anchor's recipe from the issue: one-cycle SGD (peak lr 0.02, Nesterov, weight decay 1e-4),
   loss 0.5 CE + 0.5 T^2 KL at T=4 from the unpruned network, random crop (pad 4) + flip,
   batch 128, the last epoch kept.

Both are scored on the evaluation half (files 0500-0999 of every class) by ONNX Runtime.

    .venv/bin/python benchmarks/recovery_anchor.py                 # ~15 min on 2 cores
    .venv/bin/python benchmarks/recovery_anchor.py --processes 1   # finetune in one process

Needs Torch-Pruning (``pip install -e '.[anchors]'``); without it only step 1 runs.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import torch_pruning_anchor as anchor

from onnxcompress.data import load_dataset
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model
from onnxcompress.runtime.evaluate import accuracy

NAME = "recovery_anchor"
TEACHER_TOP1 = 87.8
# Issue 20: half the anchor's drop (87.80 -> 85.48) below the teacher.
TARGET_TOP1 = 86.64
EPOCHS = 3


def cli(*args: str, processes: int = 1) -> None:
    """Run ``onnxcompress`` as a user would (under torchrun for several processes)."""
    python = str(Path(sys.executable))
    if processes > 1:
        command = [
            python, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={processes}", "-m", "onnxcompress.cli", *args,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    else:
        command, env = [python, "-m", "onnxcompress.cli", *args], dict(os.environ)
    print("$ " + " ".join(command[2:] if processes == 1 else command[1:]), flush=True)
    subprocess.run(command, check=True, env=env)


def ours(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    teacher = harness.resnet20_path(args.shared)
    pruned, tuned = work / "lrf50.onnx", work / "lrf50_finetuned.onnx"
    calibration = harness.cifar10_spec(args.shared, "0:100")
    tic = time.perf_counter()
    cli(
        "compress", str(teacher), "-o", str(pruned), "--data", calibration,
        "--pass", "lrf:target_macs=0.5,criterion=activations", "--force", "--quiet",
    )  # fmt: skip
    compress_s = time.perf_counter() - tic
    tic = time.perf_counter()
    cli(
        "finetune", str(pruned), "--teacher", str(teacher),
        "--data", harness.cifar10_train_spec(args.shared),
        "--val", harness.cifar10_spec(args.shared, "0:500"),
        "-o", str(tuned), "--epochs", str(EPOCHS), "--force",
        processes=args.processes,
    )  # fmt: skip
    finetune_s = time.perf_counter() - tic
    return {
        "pruned": pruned,
        "tuned": tuned,
        "compress_s": compress_s,
        "finetune_s": finetune_s,
    }


def train_anchor(
    student: Any, teacher: Any, x: np.ndarray, y: np.ndarray, seed: int
) -> tuple[float, float]:
    """The issue's anchor recipe; returns (seconds, images per second)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    generator = np.random.default_rng(seed)
    batch, temperature = 128, 4.0
    steps_per_epoch = math.ceil(len(x) / batch)
    optimizer = torch.optim.SGD(
        student.parameters(), lr=0.02, momentum=0.9, nesterov=True, weight_decay=1e-4
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.02, total_steps=EPOCHS * steps_per_epoch
    )
    padded = np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4)))
    teacher.eval()
    tic = time.perf_counter()
    for epoch in range(EPOCHS):
        student.train()
        order = generator.permutation(len(x))
        for step in range(steps_per_epoch):
            index = order[step * batch : (step + 1) * batch]
            dx, dy = generator.integers(0, 9, size=2)
            images = padded[index, :, dy : dy + 32, dx : dx + 32]
            flip = generator.random(len(index)) < 0.5
            images = np.where(flip[:, None, None, None], images[..., ::-1], images)
            inputs = torch.from_numpy(np.ascontiguousarray(images))
            labels = torch.from_numpy(y[index])
            with torch.no_grad():
                soft = F.softmax(teacher(inputs) / temperature, dim=1)
            logits = student(inputs)
            kd = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="batchmean")
            loss = 0.5 * F.cross_entropy(logits, labels) + 0.5 * temperature**2 * kd
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        print(f"anchor epoch {epoch + 1}/{EPOCHS}: loss {float(loss):.3f}", flush=True)
    seconds = time.perf_counter() - tic
    return seconds, EPOCHS * len(x) / seconds


def run(args: argparse.Namespace) -> dict[str, Any]:
    state_before = harness.machine_state()
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    evaluation = load_dataset(harness.cifar10_spec(args.shared, "500:1000"))
    teacher_model = load_model(harness.resnet20_path(args.shared))
    teacher_macs = model_metrics(teacher_model).macs
    teacher_top1 = accuracy(teacher_model, evaluation).top1
    result: dict[str, Any] = {
        "benchmark": NAME,
        "command": harness.command_line(),
        "teacher": {"top1": teacher_top1, "macs": teacher_macs},
        "epochs": EPOCHS,
        "processes": args.processes,
    }
    mine = ours(args, work)
    pruned, tuned = load_model(mine["pruned"]), load_model(mine["tuned"])
    macs = model_metrics(pruned).macs
    result["ours"] = {
        "macs_ratio": macs / teacher_macs,
        "before_top1": accuracy(pruned, evaluation).top1,
        "after_top1": accuracy(tuned, evaluation).top1,
        "compress_s": mine["compress_s"],
        "finetune_s": mine["finetune_s"],
    }
    print(f"onnxcompress: {result['ours']}", flush=True)
    if not anchor.available():
        result["anchor"] = None
        print("Torch-Pruning is not installed: the anchor is left out", flush=True)
    else:
        import torch

        torch.set_num_threads(args.threads)
        network = anchor.load_resnet(args.shared)
        # The anchor may keep at most the MACs our model kept.
        student, model, ratio = anchor.prune_to_macs(network, macs / teacher_macs)
        anchor.check_export(student, model, evaluation.x[:8])
        before = accuracy(model, evaluation).top1
        train = load_dataset(harness.cifar10_train_spec(args.shared))
        assert train.y is not None
        seconds, speed = train_anchor(student, network, train.x, train.y, args.seed)
        trained = anchor.to_onnx(student.eval())
        result["anchor"] = {
            "ratio": ratio,
            "macs_ratio": model_metrics(trained).macs / teacher_macs,
            "before_top1": before,
            "after_top1": accuracy(trained, evaluation).top1,
            "train_s": seconds,
            "images_per_second": speed,
            "threads": args.threads,
        }
        print(f"Torch-Pruning anchor: {result['anchor']}", flush=True)
    result["machine_before"] = state_before
    result["machine_after"] = harness.machine_state()
    return result


def to_markdown(result: dict[str, Any]) -> str:
    ours_row, anchor_row = result["ours"], result["anchor"]
    rows = [
        [
            "`lrf:target_macs=0.5` + `onnxcompress finetune --epochs 3` (defaults)",
            f"{ours_row['macs_ratio']:.3f}",
            f"{ours_row['before_top1']:.2f}",
            f"**{ours_row['after_top1']:.2f}**",
            f"{ours_row['finetune_s']:.0f}",
        ]
    ]
    if anchor_row is not None:
        rows.append(
            [
                "Torch-Pruning L1 (inner channels) + the anchor's recipe, 3 epochs",
                f"{anchor_row['macs_ratio']:.3f}",
                f"{anchor_row['before_top1']:.2f}",
                f"**{anchor_row['after_top1']:.2f}**",
                f"{anchor_row['train_s']:.0f}",
            ]
        )
    verdict = (
        f"Target (issue 20): at least {TARGET_TOP1} and above the anchor of this run. "
        f"onnxcompress: {ours_row['after_top1']:.2f} "
        f"({'met' if ours_row['after_top1'] >= TARGET_TOP1 else 'missed'} the {TARGET_TOP1}"
    )
    if anchor_row is not None:
        ahead = ours_row["after_top1"] - anchor_row["after_top1"]
        verdict += f"; {ahead:+.2f} against the anchor"
    verdict += ")."
    return "\n\n".join(
        [
            "# Recovery side by side: onnxcompress against Torch-Pruning, ResNet-20 CIFAR-10",
            f"Teacher top-1 {result['teacher']['top1']:.2f} on the evaluation half (5000 "
            "images); both students trained 3 epochs on the 50,000-image training split.",
            harness.markdown_table(
                ["route", "MACs kept", "top-1 before", "top-1 after", "training s"], rows
            ),
            verdict,
            f"`finetune` ran in {result['processes']} process(es); the anchor in one process "
            f"of {anchor_row['threads'] if anchor_row else '-'} torch thread(s).",
            f"Command: `{result['command']}`; {harness.load_text(result['machine_after'])}.",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=harness.DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=harness.DEFAULT_RESULTS)
    parser.add_argument("--name", default=NAME, help=f"results file name (default {NAME})")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/onnxcompress-recovery-anchor"))
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="finetune under torchrun with this many processes of one thread (default 2)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the anchor")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = run(args)
    markdown = to_markdown(result)
    harness.write_results(args.out_dir, args.name, markdown, result)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
