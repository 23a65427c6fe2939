"""The ``onnxcompress`` command line: parses arguments, calls the API, prints.

Exit codes: 0 success, 2 a user error (one line on stderr saying what and how to fix it),
1 a bug (traceback), 3 ``compress --strict`` missed a target, 130 interrupted. The argparse tree
is in ``parser``, the commands in ``commands/``, the printed tables in ``formatting``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from onnxcompress.cli.exit_codes import (
    EXIT_BUG,
    EXIT_INTERRUPTED,
    EXIT_MISSED,
    EXIT_OK,
    EXIT_USER,
)
from onnxcompress.cli.formatting import format_before_after
from onnxcompress.cli.parser import build_parser
from onnxcompress.errors import OnnxCompressError

__all__ = [
    "EXIT_BUG",
    "EXIT_INTERRUPTED",
    "EXIT_MISSED",
    "EXIT_OK",
    "EXIT_USER",
    "build_parser",
    "format_before_after",
    "main",
]


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
    except ModuleNotFoundError as exc:
        # ONNX Runtime is an extra ([cpu] or [gpu]): a user may have installed neither.
        if (exc.name or "").partition(".")[0] != "onnxruntime":
            raise
        from onnxcompress.runtime.session import MISSING_RUNTIME

        print(f"onnxcompress {args.command}: error: {MISSING_RUNTIME}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print(f"onnxcompress {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # `onnxcompress inspect m.onnx | head`: the reader left; that is not an error.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
