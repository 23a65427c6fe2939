"""The parsers of the commands that run the compression pipeline: compress, sweep, finetune.

Their option sets are long, so each is split by theme; ``compress``'s groups follow the
sections of a recipe file.
"""

from __future__ import annotations

import argparse

from onnxcompress.cli.arguments import DATA_HELP, StepAction, Subcommands, add_data_argument
from onnxcompress.cli.commands.compress import cmd_compress, cmd_sweep
from onnxcompress.cli.commands.finetune import cmd_finetune
from onnxcompress.torch_bridge.finetune_config import (
    LOSSES,
    OPTIMIZERS,
    SCHEDULES,
    FinetuneConfig,
)

# ``onnxcompress finetune``'s defaults and choices are finetune's own, declared once there.
FINETUNE_DEFAULTS = FinetuneConfig()


def _pass_list() -> str:
    from onnxcompress.passes import available_passes

    return "; ".join(f"{entry.name} ({entry.summary})" for entry in available_passes())


def add_compress_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "compress",
        help="run compression passes and write the smaller model",
        description="Canonicalize, run each --pass/--finetune step in order (or a --recipe's "
        "steps), verify every step against the original, check the budget after each stage, and "
        "write OUT atomically. Every flag has a recipe key; flags override the recipe. Passes: "
        + _pass_list(),
    )
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    p.add_argument(
        "--recipe",
        metavar="FILE.toml|NAME",
        help="a TOML recipe (steps, [data], [budget], [latency]) or a shipped recipe's name "
        "(fast-halving, accurate-halving, max-compression-1pt)",
    )
    _add_step_arguments(p)
    _add_compress_data_arguments(p)
    _add_budget_arguments(p)
    _add_latency_arguments(p)
    _add_compress_output_arguments(p)
    p.set_defaults(func=cmd_compress)


def _add_step_arguments(p: argparse.ArgumentParser) -> None:
    steps = p.add_argument_group("steps (in the order given; replace the recipe's steps)")
    steps.add_argument(
        "--pass",
        dest="steps",
        action=StepAction,
        const="pass",
        metavar="NAME[:k=v,..]",
        help="a pass and its options, e.g. lrf:target_macs=0.6,criterion=activations; "
        "repeat for several ([[step]] pass = ... in a recipe)",
    )
    steps.add_argument(
        "--finetune",
        dest="steps",
        action=StepAction,
        const="finetune",
        metavar="k=v,..",
        help="a fine-tuning step distilling from the original, e.g. epochs=1,lr=0.01 "
        "([[step]] finetune = {...}; options as `onnxcompress finetune`, plus teacher=none)",
    )


def _add_compress_data_arguments(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data (recipe [data])")
    data.add_argument("--data", metavar="SPEC", help=DATA_HELP + "; calibration data (calibration)")
    data.add_argument(
        "--calibration-size",
        type=int,
        default=None,
        help="samples of --data used for calibration (default 512; calibration_size)",
    )
    data.add_argument(
        "--train-data",
        metavar="SPEC",
        help="training data of finetune steps (train; default --data)",
    )
    data.add_argument(
        "--eval-data",
        "--val-data",
        dest="eval_data",
        metavar="SPEC",
        help="labelled validation data: accuracy per stage, max_drop, and the inputs of the "
        "verification gate (validation)",
    )
    data.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DIMS",
        help="count MACs with an input at these dims, e.g. input=1x3x640x640 (for models with "
        "symbolic height and width; default: the --data images' size); the output stays dynamic",
    )
    data.add_argument(
        "--static-shape",
        action="store_true",
        help="fix the inputs to the --shape dims (batch included) before the passes run: shape "
        "arithmetic folds to constants, channel groups it froze can be cut, and the written "
        "model runs at that size only (onnxsim's --overwrite-input-shape)",
    )


def _add_budget_arguments(p: argparse.ArgumentParser) -> None:
    budget = p.add_argument_group("budget (recipe [budget]; fractions of the original)")
    budget.add_argument("--target-macs", type=float, metavar="F", help="e.g. 0.5: half the MACs")
    budget.add_argument("--target-params", type=float, metavar="F", help="e.g. 0.5")
    budget.add_argument(
        "--target-latency",
        type=float,
        metavar="F",
        help="fraction of the original's measured ONNX Runtime p50 latency (see --provider, "
        "--latency-batch)",
    )
    budget.add_argument(
        "--max-drop",
        type=float,
        metavar="POINTS",
        help="top-1 points the validation accuracy may lose; the run stops at the first stage "
        "that loses more and keeps the last one that did not",
    )


def _add_latency_arguments(p: argparse.ArgumentParser) -> None:
    latency = p.add_argument_group("latency (recipe [latency])")
    latency.add_argument("--provider", default=None, help="cpu, cuda, ... (default: best)")
    latency.add_argument(
        "--latency-batch", type=int, default=None, help="batch of the latency budget (default 1)"
    )
    latency.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")


def _add_compress_output_arguments(p: argparse.ArgumentParser) -> None:
    out = p.add_argument_group("output")
    out.add_argument(
        "--report",
        metavar="DIR",
        help="write report.json, report.md and PNG plots into DIR (a path ending in .json "
        "writes only the JSON)",
    )
    out.add_argument(
        "--report-batches", default="1,32", help="latency batches in the report (default 1,32)"
    )
    out.add_argument("--force", action="store_true", help="replace OUT if it exists")
    out.add_argument("--seed", type=int, default=None, help="default 0 (recipe: seed)")
    out.add_argument("--quiet", action="store_true", help="print only errors and warnings")
    out.add_argument("--json", action="store_true", help="print the run's result as JSON")
    out.add_argument(
        "--strict",
        action="store_true",
        help="exit with code 3 when a step misses a target it was given or changes nothing, "
        "the result misses the budget, or the report's benchmark finds it slower than the "
        "original (default: warn on stderr and exit 0)",
    )


def add_sweep_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "sweep",
        help="run one pass at several targets: the accuracy-MACs-latency curve",
        description="Run --pass once per target on copies of the canonicalized model, verify "
        "each, measure accuracy (--eval-data) and latency, and print/write the table and a plot.",
    )
    p.add_argument("model")
    p.add_argument("--pass", dest="sweep_pass", required=True, metavar="NAME[:k=v,..]")
    p.add_argument(
        "--targets",
        default="0.9,0.8,0.7,0.6,0.5",
        help="comma-separated fractions (default 0.9,0.8,0.7,0.6,0.5)",
    )
    p.add_argument(
        "--key",
        default="target_macs",
        help="the pass option swept (default target_macs; e.g. target_params, ratio)",
    )
    add_data_argument(p)
    p.add_argument("--calibration-size", type=int, default=512)
    p.add_argument(
        "--eval-data",
        "--val-data",
        dest="eval_data",
        metavar="SPEC",
        help="labelled data for accuracy",
    )
    p.add_argument("--out", metavar="DIR", help="write sweep.json, sweep.md, sweep.png here")
    p.add_argument("--provider", default=None, help="ONNX Runtime provider for latency")
    p.add_argument("--latency-batch", type=int, default=1, help="batch of the latency (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for latency")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print only the table")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_sweep)


def add_finetune_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "finetune",
        help="recover accuracy: train a compressed model, distilling from the original",
        description="Train STUDENT (run as a torch module) with knowledge distillation from "
        "--teacher, keep the epoch with the best --val accuracy, and write its weights back "
        "into the same graph as OUT. Checkpoints every epoch (--resume continues). Runs under "
        "`torchrun --nproc_per_node=N` too (DDP; nccl on GPUs, gloo on CPU).",
    )
    p.add_argument("student", help="the ONNX model to train (e.g. the output of compress)")
    p.add_argument("--teacher", metavar="ORIGINAL.onnx", help="model to distill from")
    add_data_argument(p, required=True)
    p.add_argument("--val", metavar="SPEC", help="validation data: picks the best epoch")
    p.add_argument("-o", "--output", required=True, help="where to write the trained model")
    _add_optimization_arguments(p)
    _add_distillation_arguments(p)
    _add_training_graph_arguments(p)
    _add_finetune_run_arguments(p)
    p.set_defaults(func=cmd_finetune)


def _add_optimization_arguments(p: argparse.ArgumentParser) -> None:
    d = FINETUNE_DEFAULTS
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"epochs (default {d.epochs})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr:g})")
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=d.max_grad_norm,
        help=f"clip the gradient norm (default {d.max_grad_norm:g}; 0 turns clipping off)",
    )
    p.add_argument(
        "--batch-size", type=int, default=d.batch_size, help=f"per process (default {d.batch_size})"
    )
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)


def _add_distillation_arguments(p: argparse.ArgumentParser) -> None:
    d = FINETUNE_DEFAULTS
    p.add_argument("--loss", choices=LOSSES, default=d.loss)
    p.add_argument(
        "--temperature",
        type=float,
        default=d.temperature,
        help=f"distillation T (default {d.temperature:g})",
    )
    p.add_argument(
        "--alpha",
        type=float,
        default=d.alpha,
        help=f"weight of distillation vs labels (default {d.alpha:g})",
    )
    p.add_argument(
        "--hint",
        action="append",
        default=[],
        metavar="TEACHER_TENSOR[=STUDENT_TENSOR]",
        help="tensor pair for --loss hint (repeat; default: the classifier's input)",
    )
    p.add_argument("--peers", type=int, default=None, help="student copies for --loss mutual")


def _add_training_graph_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--batchnorm",
        action=argparse.BooleanOptionalAction,
        default=FINETUNE_DEFAULTS.batchnorm,
        help="train with a BatchNormalization after every Conv that has none (exporters fold "
        "BN away), folded back into the convs when training ends: same graph, better "
        "conditioned training (1 to 4 points on CIFAR-10 ResNet-20 students in 3 epochs); "
        "--no-batchnorm trains the convs as they are",
    )
    p.add_argument(
        "--batchnorm-between-convs",
        action=argparse.BooleanOptionalAction,
        default=FINETUNE_DEFAULTS.batchnorm_between_convs,
        help="with --batchnorm, also after a conv whose output feeds only other convs (the "
        "depthwise half of a separable pair); --no-batchnorm-between-convs leaves those out, "
        "a separable network's step 1.1-1.2x faster",
    )
    p.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="random crop + flip (default: on for images of 16x16 and larger)",
    )


def _add_finetune_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--epoch-samples", type=int, default=None, help="images per epoch (default: all)"
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        metavar="MINUTES",
        help="stop after this much wall time, annealing the learning rate to fit it",
    )
    p.add_argument(
        "--checkpoint-dir",
        metavar="DIR",
        help="keep per-epoch checkpoints here (default: OUT.ckpt, removed after success)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: auto)")
    d = FINETUNE_DEFAULTS
    p.add_argument(
        "--workers",
        type=int,
        default=d.num_workers,
        help=f"batch loader processes (default {d.num_workers})",
    )
    p.add_argument("--report", metavar="FILE.json", help="write the training history as JSON")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet", action="store_true", help="print only errors")
