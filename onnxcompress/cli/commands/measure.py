"""The commands that measure models without changing them: inspect, bench, eval, verify."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from onnxcompress.cli.arguments import parse_batches
from onnxcompress.cli.exit_codes import EXIT_OK
from onnxcompress.cli.formatting import format_verify_result
from onnxcompress.errors import OnnxCompressError, VerificationError

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
    from onnxcompress.graph.canonicalize import canonicalize
    from onnxcompress.graph.metrics import (
        channel_mismatches,
        fix_input_shapes,
        format_table,
        model_metrics,
        symbolic_dims,
        uncounted_ops,
    )
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.runtime.session import parse_shape_overrides

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


def cmd_bench(args: argparse.Namespace) -> int:
    from onnxcompress.runtime.bench import benchmark, format_bench_table
    from onnxcompress.runtime.session import parse_shape_overrides

    for name in ("warmup", "runs", "threads"):
        value = getattr(args, name)
        if value is not None and value < (1 if name != "warmup" else 0):
            raise OnnxCompressError(f"--{name} {value}: must be positive")
    rows = benchmark(
        args.models,
        provider=args.provider,
        batches=parse_batches(args.batch),
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
        from onnxcompress.pipeline.run import write_json_atomic

        write_json_atomic(args.json, payload)
    return EXIT_OK


def _model_data_spec(model_path: str, spec: str | None) -> str:
    """The --data spec, or the dataset the model's metadata names (shipped models)."""
    if spec:
        return spec
    from onnxcompress.graph.model_io import load_model

    named = load_model(model_path).metadata_props.get("onnxcompress.dataset")
    if not named:
        raise OnnxCompressError(
            f"{model_path}: no --data given and the model names no dataset; "
            "give --data SPEC (e.g. --data 'folder:images/val')"
        )
    return named


def cmd_eval(args: argparse.Namespace) -> int:
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

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
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.runtime.evaluate import dataset_for_model, verify

    original = load_model(args.original)
    candidate = load_model(args.new)
    x = None
    if args.data:
        x = dataset_for_model(original, args.data).spread(args.samples).x
    result = verify(original, candidate, x=x, samples=args.samples)
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(format_verify_result(result))
    if result.ok():
        return EXIT_OK
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
