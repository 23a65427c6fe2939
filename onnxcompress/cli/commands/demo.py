"""``onnxcompress demo``: the main job end to end on the shipped digits model.

Compresses ``models/digits_resnet.onnx`` with the best data-driven pass available, then prints
params, MACs, file size, p50 latency and held-out accuracy before and after.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from onnxcompress.cli.exit_codes import EXIT_OK
from onnxcompress.cli.formatting import format_before_after
from onnxcompress.errors import OnnxCompressError

# The demo's data: calibrate on the training part of digits, report on the held-out part the
# model never saw (the split models/train_digits_cnn.py uses).
CALIBRATION_SPEC = "digits[:1400]"
EVALUATION_SPEC = "digits[1400:]"
DEMO_MODEL = "digits_resnet.onnx"


def default_demo_model() -> Path:
    """The shipped model: ``models/`` beside the package in a source checkout."""
    # This file is onnxcompress/cli/commands/demo.py; models/ sits beside onnxcompress/.
    candidate = Path(__file__).resolve().parents[3] / "models" / DEMO_MODEL
    if not candidate.exists():
        raise OnnxCompressError(
            f"the demo model {DEMO_MODEL} is not at {candidate}; run the demo from a clone of the "
            "repository or pass --model"
        )
    return candidate


def demo_passes() -> list[tuple[str, dict[str, Any]]]:
    """The compression the demo shows: the strongest data-driven pass that is registered."""
    from onnxcompress.passes import REGISTRY

    if "lrf" in REGISTRY:
        return [("lrf", {"target_macs": 0.5, "criterion": "activations", "round_to": 8})]
    return []


def run_demo(model: str | None = None, output: str | None = None) -> int:
    import tempfile

    from onnxcompress.pipeline.run import compress
    from onnxcompress.runtime.bench import benchmark

    source = Path(model) if model else default_demo_model()
    passes = demo_passes()
    names = ", ".join(name for name, _ in passes) or "canonicalize only"
    print(
        f"onnxcompress demo: {source.name}, passes: {names}, data: {CALIBRATION_SPEC}",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(output) if output else Path(tmp) / "compressed.onnx"
        result = compress(
            source,
            out,
            passes,
            data=CALIBRATION_SPEC,
            eval_data=EVALUATION_SPEC,
            force=output is not None,
            log=lambda message: print(message, file=sys.stderr),
        )
        print("measuring latency (ONNX Runtime, CPU, batch 1, interleaved)...", file=sys.stderr)
        rows = benchmark([source, out], provider="cpu", batches=(1,), warmup=20, runs=200)
        latency = (rows[0].p50_ms, rows[1].p50_ms)
        print()
        print(
            format_before_after(
                result.before,
                result.after,
                result.accuracy_before,
                result.accuracy_after,
                latency=latency,
            )
        )
        if output:
            print(f"\nwrote {out}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(model=args.model, output=args.output)
