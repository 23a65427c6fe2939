"""Argument pieces the command parsers share: the one-line-error parser, ``--data``, the ordered
``--pass``/``--finetune`` steps, and ``--batch`` lists.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

from onnxcompress.cli.exit_codes import EXIT_USER
from onnxcompress.errors import OnnxCompressError

DATA_HELP = """dataset spec: KIND[:PATH][SLICE][?key=value&...]. KIND is digits (built in),
mnist:DIR, npz:FILE, folder:DIR or folder:ARCHIVE.tar.gz[/sub/dir]; SLICE like [:500];
options scale, mean, std, resize, channels, layout, per_class, split (quote the spec in a shell)"""

# What ``add_subparsers`` returns: the command parsers are added to it.
Subcommands = argparse._SubParsersAction


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other user error.

    Sub-command parsers inherit the class, so ``onnxcompress bench --bogus`` answers the same way.
    """

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class StepAction(argparse.Action):
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


def add_data_argument(parser: argparse.ArgumentParser, required: bool = False, **kw: Any) -> None:
    parser.add_argument("--data", metavar="SPEC", required=required, help=DATA_HELP, **kw)


def parse_batches(text: str) -> list[int]:
    """``--batch 1,32`` as a list of positive batch sizes."""
    try:
        batches = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        batches = []
    if not batches or any(b <= 0 for b in batches):
        raise OnnxCompressError(f"--batch {text!r}: give positive integers, e.g. --batch 1,32")
    return batches
