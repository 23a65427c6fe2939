"""The argparse tree of ``onnxcompress``: the root parser and one small function per command.

The long option sets of compress, sweep and finetune are in ``parser_pipeline``.
"""

from __future__ import annotations

import argparse

from onnxcompress import __version__
from onnxcompress.cli.arguments import OneLineErrorParser, Subcommands, add_data_argument
from onnxcompress.cli.commands.compress import cmd_report
from onnxcompress.cli.commands.demo import cmd_demo
from onnxcompress.cli.commands.measure import cmd_bench, cmd_eval, cmd_inspect, cmd_verify
from onnxcompress.cli.commands.passes import cmd_passes
from onnxcompress.cli.parser_pipeline import (
    add_compress_parser,
    add_finetune_parser,
    add_sweep_parser,
)

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


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="onnxcompress",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"onnxcompress {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each step does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # The order here is the order of `onnxcompress --help`.
    add_inspect_parser(sub)
    add_bench_parser(sub)
    add_eval_parser(sub)
    add_verify_parser(sub)
    add_compress_parser(sub)
    add_report_parser(sub)
    add_sweep_parser(sub)
    add_finetune_parser(sub)
    add_passes_parser(sub)
    add_demo_parser(sub)
    return parser


def add_inspect_parser(sub: Subcommands) -> None:
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


def add_bench_parser(sub: Subcommands) -> None:
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


def add_eval_parser(sub: Subcommands) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 accuracy on labelled data")
    p.add_argument("model")
    add_data_argument(p, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--provider", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_eval)


def add_verify_parser(sub: Subcommands) -> None:
    p = sub.add_parser("verify", help="check a rewritten model against the original")
    p.add_argument("original")
    p.add_argument("new")
    add_data_argument(p)
    p.add_argument("--samples", type=int, default=64, help="inputs to compare (default 64)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)


def add_report_parser(sub: Subcommands) -> None:
    p = sub.add_parser(
        "report",
        help="re-render a report folder (report.md and plots) from its report.json",
    )
    p.add_argument("folder", help="a folder written by compress --report")
    p.set_defaults(func=cmd_report)


def add_passes_parser(sub: Subcommands) -> None:
    p = sub.add_parser("passes", help="list the available passes")
    p.set_defaults(func=cmd_passes)


def add_demo_parser(sub: Subcommands) -> None:
    p = sub.add_parser("demo", help="compress the shipped digits model end to end")
    p.add_argument(
        "--model", default=None, help="model to use (default: models/digits_resnet.onnx)"
    )
    p.add_argument(
        "--output", default=None, help="where to write the result (default: a temporary folder)"
    )
    p.set_defaults(func=cmd_demo)
