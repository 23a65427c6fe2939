"""Fine-tuning with BatchNormalization put back vs on the BN-folded graph, same images.

Chooses ``FinetuneConfig.batchnorm``'s default. Exported graphs have their BatchNorms folded
into the convolutions; ``batchnorm=True`` trains with an identity-initialized BN after every Conv
and folds it back at the end. Two students of ResNet-20 CIFAR-10 (``../shared/models``):

* ``lrf``: ``lrf`` to half the MACs (activation criterion, as ``recovery.py`` builds it);
* ``separable``: every 3x3 conv after the stem replaced by ``cheapconv:kind=separable`` with the
  data-driven init (as ``cheapconv.py`` builds it).

Each trains twice from the same weights with the same images, augmentations and schedule (KD
from the original plus labels, SGD, cosine), once per setting, back to back; top-1 is measured
after every epoch on the calibration half of the test split and, for the result, on the
evaluation half (``../shared/data/README.md``). Throughput is reported too: a BN costs time.

    .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node=2 \\
        benchmarks/batchnorm_training.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    DEFAULT_SHARED,
    cifar10_spec,
    cifar10_train_spec,
    command_line,
    load_text,
    machine_state,
    markdown_table,
    resnet20_path,
    setup_logging,
    write_results,
)
from recovery import _broadcast, _rank

from onnxcompress.graph.model_io import load_model
from onnxcompress.pipeline.run import compress
from onnxcompress.runtime.evaluate import accuracy, dataset_for_model
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
from onnxcompress.torch_bridge.train import finetune

STUDENTS = {
    "lrf": ("lrf", {"target_macs": 0.5, "criterion": "activations"}, "0:100", 1000),
    "separable": (
        "cheapconv",
        {"kind": "separable", "epochs": 0, "init": "activations"},
        "0:500",
        512,
    ),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/onnxcompress-bn"))
    parser.add_argument("--students", default="lrf,separable", help="lrf, separable or both")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--epoch-samples", type=int, default=10_000, help="images per epoch")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="batchnorm_training", help="results file stem")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        dist.init_process_group("gloo")
    main_process = _rank() == 0
    setup_logging(args.verbose and main_process)
    say = print if main_process else (lambda *a, **k: None)
    state_before = machine_state()
    started = time.perf_counter()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    teacher_path = resnet20_path(args.shared)
    if not teacher_path.exists():
        say(f"{teacher_path} is absent: the shared models folder is needed", file=sys.stderr)
        return 2
    names = [name.strip() for name in args.students.split(",") if name.strip()]
    unknown = [name for name in names if name not in STUDENTS]
    if unknown:
        say(f"unknown student(s) {', '.join(unknown)}: use {', '.join(STUDENTS)}", file=sys.stderr)
        return 2

    if main_process:
        for name in names:
            pass_name, options, calibration, size = STUDENTS[name]
            compress(
                teacher_path,
                args.work_dir / f"{name}.onnx",
                [(pass_name, options)],
                data=cifar10_spec(args.shared, calibration),
                calibration_size=size,
                force=True,
                seed=args.seed,
            )
    if dist.is_initialized():
        dist.barrier()
    teacher = load_model(teacher_path)
    validation = dataset_for_model(teacher, cifar10_spec(args.shared, "0:500"))
    evaluation = dataset_for_model(teacher, cifar10_spec(args.shared, "500:1000"))
    train = dataset_for_model(teacher, cifar10_train_spec(args.shared))

    runs: list[dict[str, Any]] = []
    for name in names:
        student = load_model(args.work_dir / f"{name}.onnx")
        for batchnorm in (False, True):
            config = FinetuneConfig(
                epochs=args.epochs,
                epoch_samples=args.epoch_samples,
                lr=args.lr,
                batch_size=args.batch_size,
                seed=args.seed,
                batchnorm=batchnorm,
            )
            tic = time.perf_counter()
            result = finetune(student, teacher, train, validation, config, progress=False)
            seconds = time.perf_counter() - tic
            record = {
                "student": name,
                "batchnorm": batchnorm,
                "seconds": round(seconds, 1),
                "calibration_top1": [r.val_top1 for r in result.history],
                "images_per_second": [r.images_per_second for r in result.history[1:]],
            }
            if main_process:
                record["evaluation_top1"] = accuracy(result.model, evaluation).top1
                say(
                    f"{name}, batchnorm={batchnorm}: calibration half "
                    f"{record['calibration_top1']}, evaluation half "
                    f"{record['evaluation_top1']:.2f} in {seconds:.0f} s"
                )
            runs.append(_broadcast(record))
    if not main_process:
        dist.destroy_process_group()
        return 0

    rows = []
    for record in runs:
        curve = record["calibration_top1"]
        speeds = [s for s in record["images_per_second"] if s]
        rows.append(
            [
                record["student"],
                "yes" if record["batchnorm"] else "no",
                " / ".join(f"{top1:.2f}" for top1 in curve),
                f"{record['evaluation_top1']:.2f}",
                f"{sorted(speeds)[len(speeds) // 2]:.0f}" if speeds else "-",
                f"{record['seconds']:.0f}",
            ]
        )
    total = time.perf_counter() - started
    reproduce = command_line(world_size)
    markdown = "\n\n".join(
        [
            "# Fine-tuning with BatchNormalization put back (ResNet-20 CIFAR-10 students)",
            f"Each student trained twice from the same weights on the same images: "
            f"{args.epochs} epochs of {args.epoch_samples} training images, KD from the "
            f"original (T=4, alpha 0.9) plus labels, SGD lr {args.lr} cosine, batch "
            f"{args.batch_size} per process, {world_size} process(es) of {args.threads} "
            "thread(s). Calibration half: files 0000-0499 of every class, after each epoch "
            "(epoch 0: before training); evaluation half: files 0500-0999, ONNX Runtime, the "
            "best epoch by the calibration half.",
            markdown_table(
                [
                    "student",
                    "BN put back",
                    "calibration-half top-1 by epoch (%)",
                    "evaluation-half top-1 (%)",
                    "img/s (median)",
                    "s",
                ],
                rows,
            ),
            f"Whole run {total / 60:.1f} min. Conditions: {load_text(state_before)} at the "
            f"start, {load_text(machine_state())} at the end; torch {torch.__version__}.",
            f"Reproduce: `{reproduce}`",
        ]
    )
    write_results(args.out_dir, args.name, markdown, {"runs": runs, "args": vars(args)})
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
