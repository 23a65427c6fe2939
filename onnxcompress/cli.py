"""The ``onnxcompress`` command line: parses arguments, calls the API, prints.

Exit codes: 0 success, 2 a user error (one line on stderr saying what and how to fix it),
1 a bug (traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxcompress import __version__
from onnxcompress.errors import OnnxCompressError

EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_MISSED = 0, 1, 2, 3

DESCRIPTION = """\
Make trained CNNs smaller and faster by rewriting their ONNX graphs.

Typical session:
  onnxcompress inspect model.onnx                      # per-layer params and MACs
  onnxcompress compress model.onnx -o small.onnx --pass lrf:target_macs=0.6 --data digits
  onnxcompress verify model.onnx small.onnx --data digits
  onnxcompress bench model.onnx small.onnx --batch 1,32
  onnxcompress eval small.onnx --data digits[1400:]
  onnxcompress compress model.onnx -o small.onnx --recipe accurate-halving \
      --data digits[:500] --train-data digits[:1400] --val-data digits[1400:] --report out/
  onnxcompress sweep model.onnx --pass lrf --targets 0.9,0.7,0.5 --data digits[:500] \
      --eval-data digits[1400:] --out sweep/

Exit codes: 0 done; 1 a bug (a traceback: please report it); 2 a user error (one line on
stderr: a missing file, a bad option, data that does not fit the model); 3 compress --strict
only: a step missed a target it was given or left the model unchanged, or the result misses
the budget (the output is still written; each miss is a `warning:` line on stderr).
"""

DATA_HELP = """dataset spec: KIND[:PATH][SLICE][?key=value&...]. KIND is digits (built in),
mnist:DIR, npz:FILE, folder:DIR or folder:ARCHIVE.tar.gz[/sub/dir]; SLICE like [:500];
options scale, mean, std, resize, channels, layout, per_class, split (quote the spec in a shell)"""


def _add_data_arg(parser: argparse.ArgumentParser, required: bool = False, **kw: Any) -> None:
    parser.add_argument("--data", metavar="SPEC", required=required, help=DATA_HELP, **kw)


class _StepAction(argparse.Action):
    """Collect --pass and --finetune flags into one ordered list of steps."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        steps = list(getattr(namespace, self.dest, None) or [])
        steps.append((self.const, values))
        setattr(namespace, self.dest, steps)


def _add_compress_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="where to write the compressed model")
    p.add_argument(
        "--recipe",
        metavar="FILE.toml|NAME",
        help="a TOML recipe (steps, [data], [budget], [latency]) or a shipped recipe's name "
        "(fast-halving, accurate-halving, max-compression-1pt)",
    )
    steps = p.add_argument_group("steps (in the order given; replace the recipe's steps)")
    steps.add_argument(
        "--pass",
        dest="steps",
        action=_StepAction,
        const="pass",
        metavar="NAME[:k=v,..]",
        help="a pass and its options, e.g. lrf:target_macs=0.6,criterion=activations; "
        "repeat for several ([[step]] pass = ... in a recipe)",
    )
    steps.add_argument(
        "--finetune",
        dest="steps",
        action=_StepAction,
        const="finetune",
        metavar="k=v,..",
        help="a fine-tuning step distilling from the original, e.g. epochs=1,lr=0.01 "
        "([[step]] finetune = {...}; options as `onnxcompress finetune`, plus teacher=none)",
    )
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
    latency = p.add_argument_group("latency (recipe [latency])")
    latency.add_argument("--provider", default=None, help="cpu, cuda, ... (default: best)")
    latency.add_argument(
        "--latency-batch", type=int, default=None, help="batch of the latency budget (default 1)"
    )
    latency.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
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
        help="exit with code 3 when a step misses a target it was given or changes nothing, or "
        "the result misses the budget (default: warn on stderr and exit 0)",
    )


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other user error.

    Sub-command parsers inherit the class, so ``onnxcompress bench --bogus`` answers the same way.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(
        prog="onnxcompress",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"onnxcompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("inspect", help="per-layer table of channels, params and MACs")
    p.add_argument("model", help="ONNX model file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--batch", type=int, default=1, help="batch size for MACs (default 1)")
    p.add_argument("--raw", action="store_true", help="count the model as is (no canonicalize)")
    p.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DIMS",
        help="fix an input's dims, e.g. input=1x3x224x224 (needed when height and width are "
        "symbolic: MACs are counted with them at the batch value otherwise)",
    )
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "bench",
        help="ONNX Runtime latency, models side by side",
        description="Latency of one or more models, run interleaved so drift hits all equally; "
        "the speed-up is against the first model.",
    )
    p.add_argument("models", nargs="+", help="ONNX model files (the first is the baseline)")
    p.add_argument(
        "--provider",
        default=None,
        help="cpu, cuda or tensorrt (default: cuda if onnxruntime-gpu sees a GPU, else cpu)",
    )
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default 1)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ORT's)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per model (default 10)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per model (default 50)")
    p.add_argument(
        "--shape",
        action="append",
        metavar="NAME=DxDxD",
        help="shape of an input with dynamic non-batch dims, e.g. input=1x3x224x224",
    )
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON ('-': stdout)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="top-1/top-5 accuracy on labelled data")
    p.add_argument("model")
    _add_data_arg(p, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--provider", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("verify", help="check a rewritten model against the original")
    p.add_argument("original")
    p.add_argument("new")
    _add_data_arg(p)
    p.add_argument("--samples", type=int, default=64, help="inputs to compare (default 64)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser(
        "compress",
        help="run compression passes and write the smaller model",
        description="Canonicalize, run each --pass/--finetune step in order (or a --recipe's "
        "steps), verify every step against the original, check the budget after each stage, and "
        "write OUT atomically. Every flag has a recipe key; flags override the recipe. Passes: "
        + _pass_list(),
    )
    _add_compress_args(p)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "report",
        help="re-render a report folder (report.md and plots) from its report.json",
    )
    p.add_argument("folder", help="a folder written by compress --report")
    p.set_defaults(func=cmd_report)

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
    _add_data_arg(p)
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
    _add_data_arg(p, required=True)
    p.add_argument("--val", metavar="SPEC", help="validation data: picks the best epoch")
    p.add_argument("-o", "--output", required=True, help="where to write the trained model")
    p.add_argument("--epochs", type=int, default=3, help="epochs (default 3)")
    p.add_argument("--lr", type=float, default=0.01, help="peak learning rate (default 0.01)")
    p.add_argument(
        "--max-grad-norm",
        type=float,
        default=5.0,
        help="clip the gradient norm (default 5; 0 turns clipping off)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="per process (default 64)")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd")
    p.add_argument("--schedule", choices=("cosine", "onecycle"), default="cosine")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--loss", choices=("kd", "hint", "mutual"), default="kd")
    p.add_argument("--temperature", type=float, default=4.0, help="distillation T (default 4)")
    p.add_argument(
        "--alpha", type=float, default=0.9, help="weight of distillation vs labels (default 0.9)"
    )
    p.add_argument(
        "--hint",
        action="append",
        default=[],
        metavar="TEACHER_TENSOR[=STUDENT_TENSOR]",
        help="tensor pair for --loss hint (repeat; default: the classifier's input)",
    )
    p.add_argument("--peers", type=int, default=None, help="student copies for --loss mutual")
    p.add_argument(
        "--batchnorm",
        action="store_true",
        help="train with a BatchNormalization after every Conv that has none (exporters fold "
        "BN away), folded back into the convs when training ends: same graph, better "
        "conditioned training",
    )
    p.add_argument(
        "--batchnorm-between-convs",
        action=argparse.BooleanOptionalAction,
        default=True,
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
    p.add_argument("--workers", type=int, default=0, help="batch loader processes (default 0)")
    p.add_argument("--report", metavar="FILE.json", help="write the training history as JSON")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="print only errors")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("passes", help="list the available passes")
    p.set_defaults(func=cmd_passes)

    p = sub.add_parser("demo", help="compress the shipped digits model end to end")
    p.add_argument(
        "--model", default=None, help="model to use (default: models/digits_resnet.onnx)"
    )
    p.add_argument(
        "--output", default=None, help="where to write the result (default: a temporary folder)"
    )
    p.set_defaults(func=cmd_demo)
    return parser


def _pass_list() -> str:
    from onnxcompress.passes import available_passes

    return "; ".join(f"{entry.name} ({entry.summary})" for entry in available_passes())


# A checker message longer than this is cut: the warning stays one readable line.
_MAX_CHECKER_MESSAGE = 240


def _checker_failure(path: str) -> str | None:
    """What ``onnx.checker`` with full shape inference finds wrong in the file, in one line.

    Loading ran the plain checker already; ``full_check`` adds strict shape inference, which
    catches shapes that contradict each other (a declared shape that inference disagrees with,
    operands that do not broadcast). Such a model still loads and is counted, so inspect only
    warns. It does not catch a Conv weight with the wrong input channels: see
    ``metrics.channel_mismatches``.
    """
    import onnx

    try:
        # Given the path, the checker finds external data beside the model.
        onnx.checker.check_model(path, full_check=True)
    except Exception as exc:  # the checker and shape inference raise several unrelated types
        # "[ShapeInferenceError] Inference error(s): (op_type:Conv, node name: c): [Shape...":
        # the bracketed class names repeat what the warning says; the rest names the node.
        text = " ".join(re.sub(r"\[\w*Error\]", " ", str(exc)).split()) or type(exc).__name__
        if len(text) > _MAX_CHECKER_MESSAGE:
            text = text[: _MAX_CHECKER_MESSAGE - 3].rstrip() + "..."
        return text
    return None


def cmd_inspect(args: argparse.Namespace) -> int:
    from onnxcompress.metrics import (
        channel_mismatches,
        fix_input_shapes,
        format_table,
        model_metrics,
        symbolic_dims,
        uncounted_ops,
    )
    from onnxcompress.model import canonicalize, load_model
    from onnxcompress.runtime import parse_shape_overrides

    overrides = parse_shape_overrides(args.shape)
    model = load_model(args.model)
    # Inspect reports what it can: a defect the counts cannot be trusted for is a warning on
    # stderr (and in the JSON), the exit code stays 0; an unreadable file failed above (exit 2).
    warnings = []
    failure = _checker_failure(args.model)
    if failure is not None:
        warnings.append(f"{args.model} fails onnx.checker: {failure}")
    if overrides:
        fix_input_shapes(model, overrides, args.model)
    if not args.raw:
        canonicalize(model)
    for name, dims in symbolic_dims(model).items():
        print(
            f"note: input {name!r} has symbolic dims {', '.join(dims)} beyond the batch axis; "
            f"MACs count them as {args.batch} (give --shape {name}=1x...)",
            file=sys.stderr,
        )
    metrics = model_metrics(model, batch=args.batch, file_size=Path(args.model).stat().st_size)
    warnings += [f"{args.model}: {found.message()}" for found in channel_mismatches(model)]
    warnings += [op.message() for op in uncounted_ops(model)]
    if args.json:
        print(json.dumps({**metrics.as_dict(), "warnings": warnings}, indent=2))
    else:
        print(format_table(metrics))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        batches = []
    if not batches or any(b <= 0 for b in batches):
        raise OnnxCompressError(f"--batch {text!r}: give positive integers, e.g. --batch 1,32")
    return batches


def cmd_bench(args: argparse.Namespace) -> int:
    from onnxcompress.bench import benchmark, format_bench_table
    from onnxcompress.runtime import parse_shape_overrides

    for name in ("warmup", "runs", "threads"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "warmup" else 0):
            raise OnnxCompressError(f"--{name} {value}: must be positive")
    rows = benchmark(
        args.models,
        provider=args.provider,
        batches=_parse_batches(args.batch),
        threads=args.threads,
        warmup=args.warmup,
        runs=args.runs,
        shape_overrides=parse_shape_overrides(args.shape),
        progress=sys.stderr.isatty(),
    )
    payload = [row.as_dict() for row in rows]
    if args.json == "-":
        print(json.dumps(payload, indent=2))
        return EXIT_OK
    print(format_bench_table(rows))
    if args.json:
        from onnxcompress.pipeline import write_json_atomic

        write_json_atomic(args.json, payload)
    return EXIT_OK


def _model_data_spec(model_path: str, spec: str | None) -> str:
    """The --data spec, or the dataset the model's metadata names (shipped models)."""
    if spec:
        return spec
    from onnxcompress.model import load_model

    named = load_model(model_path).metadata_props.get("onnxcompress.dataset")
    if not named:
        raise OnnxCompressError(
            f"{model_path}: no --data given and the model names no dataset; "
            "give --data SPEC (e.g. --data 'folder:images/val')"
        )
    return named


def cmd_eval(args: argparse.Namespace) -> int:
    from onnxcompress.evaluate import accuracy, dataset_for_model
    from onnxcompress.model import load_model

    model = load_model(args.model)
    spec = _model_data_spec(args.model, args.data)
    dataset = dataset_for_model(model, spec)
    result = accuracy(
        model,
        dataset,
        batch_size=args.batch_size,
        provider=args.provider,
        progress=sys.stderr.isatty(),
    )
    if args.json:
        print(json.dumps({"model": args.model, "data": spec, **result.as_dict()}, indent=2))
    else:
        top5 = f"  top-5 {result.top5:.2f}%" if result.top5 is not None else ""
        print(f"{args.model}: top-1 {result.top1:.2f}%{top5} on {result.samples} samples of {spec}")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    from onnxcompress.evaluate import dataset_for_model, verify
    from onnxcompress.model import load_model

    original = load_model(args.original)
    candidate = load_model(args.new)
    x = None
    if args.data:
        x = dataset_for_model(original, args.data).spread(args.samples).x
    result = verify(original, candidate, x=x, samples=args.samples)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(f"checker:  {'ok' if result.checker_ok else 'FAILED: ' + str(result.checker_error)}")
        print(f"session:  {'ok' if result.session_ok else 'FAILED: ' + str(result.session_error)}")
        if result.deviation is not None:
            dev = result.deviation
            agreement = f"{dev.top1_agreement:.2f}%" if dev.top1_agreement is not None else "n/a"
            print(
                f"deviation: max abs {dev.max_abs:.4g}  mean abs {dev.mean_abs:.4g}  "
                f"max rel {dev.max_rel:.4g}  top-1 agreement {agreement} "
                f"({dev.samples} samples)"
            )
    if result.ok():
        return EXIT_OK
    from onnxcompress.errors import VerificationError

    if not result.checker_ok:
        detail = f"fails onnx.checker: {result.checker_error}"
    elif not result.session_ok:
        detail = str(result.session_error)
    else:
        detail = "its outputs hold NaN or infinity where the original's do not"
    if not detail.startswith(str(args.new)):
        detail = f"{args.new}: {detail}"
    # The report above went to stdout; the verdict is the one line on stderr.
    raise VerificationError(detail)


def _parse_pass_args(specs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
    from onnxcompress.passes import parse_pass_spec

    return [parse_pass_spec(spec) for spec in specs]


def _compress_recipe(args: argparse.Namespace) -> Any:
    """The run the flags describe: the --recipe (if any) with every given flag overriding it."""
    from onnxcompress.budget import Budget
    from onnxcompress.recipe import DataSpecs, Recipe, load_recipe, parse_step_flag, with_overrides

    base = load_recipe(args.recipe) if args.recipe else Recipe()
    steps = [parse_step_flag(kind, spec) for kind, spec in (args.steps or [])]
    return with_overrides(
        base,
        steps=steps,
        data=DataSpecs(
            calibration=args.data,
            train=args.train_data,
            validation=args.eval_data,
            calibration_size=args.calibration_size,
        ),
        budget=Budget(
            target_macs=args.target_macs,
            target_params=args.target_params,
            target_latency=args.target_latency,
            max_drop=args.max_drop,
        ),
        latency={"provider": args.provider, "batch": args.latency_batch, "threads": args.threads},
        seed=args.seed,
    )


def cmd_compress(args: argparse.Namespace) -> int:
    from onnxcompress.pipeline import DEFAULT_CALIBRATION_SIZE, compress, write_json_atomic
    from onnxcompress.recipe import check_pass_options

    if args.calibration_size is not None and args.calibration_size <= 0:
        raise OnnxCompressError("--calibration-size must be positive")
    recipe = _compress_recipe(args)
    for index, step in enumerate(recipe.steps, start=1):
        check_pass_options(step.name, step.options, f"step {index}")
    report_batches = _parse_batches(args.report_batches) if args.report else []
    quiet = args.quiet or args.json
    log = None if quiet else (lambda message: print(message, file=sys.stderr))
    progress = not quiet and sys.stderr.isatty()
    result = compress(
        args.model,
        args.output,
        [step.as_pair() for step in recipe.steps],
        data=recipe.data.calibration,
        calibration_size=recipe.data.calibration_size or DEFAULT_CALIBRATION_SIZE,
        eval_data=recipe.data.validation,
        train_data=recipe.data.train,
        budget=recipe.budget,
        latency=recipe.latency,
        recipe=recipe.as_dict(),
        force=args.force,
        seed=recipe.seed if recipe.seed is not None else 0,
        progress=progress,
        log=log,
    )
    payload: dict[str, Any] = result.as_dict()
    latency = None
    if args.report and str(args.report).endswith(".json"):
        write_json_atomic(args.report, payload)
    elif args.report:
        from onnxcompress.report import build_report, write_report

        if log:
            log(f"benchmarking the input and output for the report (batch {args.report_batches})")
        payload = build_report(
            result,
            latency_batches=report_batches,
            provider=recipe.latency.provider,
            threads=recipe.latency.threads,
            progress=progress,
        )
        written = write_report(payload, args.report)
        if log:
            log(f"report: {', '.join(str(path) for path in written)}")
        rows = {(r["label"], r["batch"]): r["p50_ms"] for r in payload["latency"]}
        if ("original", 1) in rows and ("compressed", 1) in rows:
            latency = (rows[("original", 1)], rows[("compressed", 1)])
    if args.json:
        print(json.dumps(payload, indent=2, default=str))
    elif not args.quiet:
        # BatchNorm folding is not compression: compare with the canonicalized original.
        before = {**result.before, "params": result.steps[0].metrics["params"]}
        print(
            format_before_after(
                before, result.after, result.accuracy_before, result.accuracy_after, latency
            )
        )
        if result.stopped:
            print(f"note: {result.stopped}")
        print(f"wrote {result.output_path}")
    # Always on stderr, whatever --quiet or --json say: a miss must not pass unnoticed.
    for line in result.missed:
        print(f"warning: {line}", file=sys.stderr)
    return EXIT_MISSED if args.strict and not result.targets_met else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from onnxcompress.report import render_report

    for path in render_report(args.folder):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from onnxcompress.budget import LatencySettings
    from onnxcompress.passes import parse_pass_spec
    from onnxcompress.sweep import format_sweep_table, parse_targets, sweep, write_sweep

    name, options = parse_pass_spec(args.sweep_pass)
    targets = parse_targets(args.targets)
    quiet = args.quiet or args.json
    log = None if quiet else (lambda message: print(message, file=sys.stderr))
    rows = sweep(
        args.model,
        name,
        options,
        targets,
        key=args.key,
        data=args.data,
        calibration_size=args.calibration_size,
        eval_data=args.eval_data,
        latency=LatencySettings(
            provider=args.provider, batch=args.latency_batch, threads=args.threads
        ),
        seed=args.seed,
        progress=not quiet and sys.stderr.isatty(),
        log=log,
    )
    if args.out:
        written = write_sweep(rows, args.out, model=args.model, pass_name=name, key=args.key)
        if log:
            log(f"wrote {', '.join(str(p) for p in written)}")
    if args.json:
        print(json.dumps([row.as_dict() for row in rows], indent=2))
    else:
        print(format_sweep_table(rows, args.key))
    return EXIT_OK if all(row.error is None for row in rows) else EXIT_USER


def _hint_pairs(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    pairs = []
    for spec in specs:
        teacher, _, student = spec.partition("=")
        if not teacher.strip():
            raise OnnxCompressError(f"--hint {spec!r}: give TEACHER_TENSOR[=STUDENT_TENSOR]")
        pairs.append((teacher.strip(), (student or teacher).strip()))
    return tuple(pairs)


def cmd_finetune(args: argparse.Namespace) -> int:
    import contextlib

    from onnxcompress.data import Preprocess
    from onnxcompress.errors import ModelSaveError
    from onnxcompress.evaluate import dataset_for_model
    from onnxcompress.model import load_model, save_model
    from onnxcompress.torch_bridge.distributed import is_main_process
    from onnxcompress.torch_bridge.train import CHECKPOINT_FILE, FinetuneConfig, finetune

    output = Path(args.output)
    inputs = [Path(args.student)] + ([Path(args.teacher)] if args.teacher else [])
    if any(output.resolve() == path.resolve() for path in inputs):
        raise ModelSaveError(f"{output}: refusing to overwrite an input model; choose another -o")
    if output.exists() and not args.force:
        raise ModelSaveError(f"{output}: already exists (pass --force to replace it)")
    if not output.parent.exists():
        raise ModelSaveError(f"{output}: the folder {output.parent} does not exist")
    default_checkpoints = args.checkpoint_dir is None
    checkpoint_dir = Path(args.checkpoint_dir or f"{output}.ckpt")
    config = FinetuneConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        optimizer=args.optimizer,
        schedule=args.schedule,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm or None,
        loss=args.loss,
        temperature=args.temperature,
        alpha=args.alpha,
        hint_tensors=_hint_pairs(args.hint),
        peers=args.peers,
        augment=args.augment,
        batchnorm=args.batchnorm,
        batchnorm_between_convs=args.batchnorm_between_convs,
        epoch_samples=args.epoch_samples,
        time_budget_s=args.time_budget * 60 if args.time_budget is not None else None,
        seed=args.seed,
        num_workers=args.workers,
        checkpoint_dir=str(checkpoint_dir),
        resume=args.resume,
        device=args.device,
    )
    student = load_model(args.student)
    teacher = load_model(args.teacher) if args.teacher else None
    # A student written by another tool may lack the preprocessing metadata its teacher has.
    fallback = Preprocess.from_metadata(teacher.metadata_props) if teacher is not None else None
    train = dataset_for_model(student, args.data, preprocess=fallback)
    val = dataset_for_model(student, args.val, preprocess=fallback) if args.val else None
    main_process = is_main_process()
    result = finetune(
        student,
        teacher,
        train,
        val,
        config,
        progress=not args.quiet and main_process and sys.stderr.isatty(),
    )
    if not main_process:
        return EXIT_OK
    written = save_model(result.model, output, overwrite=args.force, protect=tuple(inputs))
    if args.report:
        from onnxcompress.pipeline import write_json_atomic

        write_json_atomic(
            args.report,
            {
                "student": args.student,
                "teacher": args.teacher,
                "output": str(written),
                "data": args.data,
                "val": args.val,
                **result.as_dict(),
            },
        )
    if default_checkpoints:
        # The default folder is ours and the run is complete: nothing left to resume.
        (checkpoint_dir / CHECKPOINT_FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            checkpoint_dir.rmdir()
    if not args.quiet:
        for record in result.history:
            loss = f"{record.loss:.4f}" if record.loss is not None else "-"
            top1 = f"{record.val_top1:.2f}%" if record.val_top1 is not None else "-"
            speed = f"{record.images_per_second:.0f} img/s" if record.images_per_second else ""
            print(f"epoch {record.epoch}: loss {loss}  val top-1 {top1}  {speed}".rstrip())
        if result.best_top1 is not None:
            teacher_part = (
                f", teacher {result.teacher_top1:.2f}%" if result.teacher_top1 is not None else ""
            )
            print(
                f"best epoch {result.best_epoch}: val top-1 {result.best_top1:.2f}% "
                f"(before {result.initial_top1:.2f}%{teacher_part})"
            )
        print(f"wrote {written}")
    return EXIT_OK


def format_before_after(
    before: dict[str, Any],
    after: dict[str, Any],
    acc_before: dict[str, Any] | None = None,
    acc_after: dict[str, Any] | None = None,
    latency: tuple[float, float] | None = None,
) -> str:
    """The before/after table the user reads at the end of a run."""

    def ratio(a: float, b: float) -> str:
        return f"{b / a:.3f}x" if a else "-"

    rows = [
        (
            "params",
            f"{before['params']:,}",
            f"{after['params']:,}",
            ratio(before["params"], after["params"]),
        ),
        ("MACs", f"{before['macs']:,}", f"{after['macs']:,}", ratio(before["macs"], after["macs"])),
    ]
    if before.get("file_size") and after.get("file_size"):
        rows.append(
            (
                "file size (bytes)",
                f"{before['file_size']:,}",
                f"{after['file_size']:,}",
                ratio(before["file_size"], after["file_size"]),
            )
        )
    if latency is not None:
        rows.append(
            (
                "p50 latency (ms)",
                f"{latency[0]:.3f}",
                f"{latency[1]:.3f}",
                ratio(latency[0], latency[1]),
            )
        )
    if acc_before is not None and acc_after is not None:
        rows.append(
            (
                "top-1 accuracy (%)",
                f"{acc_before['top1']:.2f}",
                f"{acc_after['top1']:.2f}",
                f"{acc_after['top1'] - acc_before['top1']:+.2f} pts",
            )
        )
    widths = [
        max(len(r[i]) for r in [*rows, ("", "before", "after", "after/before")]) for i in range(4)
    ]
    header = ("", "before", "after", "after/before")
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append(
            "  ".join(
                cell.rjust(w) if i else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)


def cmd_passes(args: argparse.Namespace) -> int:
    import dataclasses

    from onnxcompress.passes import available_passes, pass_class

    for entry in available_passes():
        cls = pass_class(entry.name)
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.config_class))
        data = " [needs --data]" if cls.needs_data else ""
        print(f"{entry.name}{data}: {entry.summary}")
        if fields:
            print(f"    options: {fields}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from onnxcompress.demo import run_demo

    return run_demo(model=args.model, output=args.output)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USER
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except OnnxCompressError as exc:
        message = " ".join(str(exc).split())
        print(f"onnxcompress {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"onnxcompress {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `onnxcompress inspect m.onnx | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
