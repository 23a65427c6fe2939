"""The commands that run the pipeline and show its results: compress, sweep, report."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from onnxcompress.cli.arguments import parse_batches
from onnxcompress.cli.exit_codes import EXIT_MISSED, EXIT_OK, EXIT_USER
from onnxcompress.cli.formatting import format_before_after
from onnxcompress.errors import OnnxCompressError


def _compress_recipe(args: argparse.Namespace) -> Any:
    """The run the flags describe: the --recipe (if any) with every given flag overriding it."""
    from onnxcompress.pipeline.budget import Budget
    from onnxcompress.pipeline.recipe import (
        DataSpecs,
        Recipe,
        load_recipe,
        parse_step_flag,
        with_overrides,
    )

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
    from onnxcompress.graph.input_shapes import shapes_text
    from onnxcompress.pipeline.recipe import check_pass_options
    from onnxcompress.pipeline.run import DEFAULT_CALIBRATION_SIZE, compress, write_json_atomic
    from onnxcompress.runtime.session import parse_shape_overrides

    if args.calibration_size is not None and args.calibration_size <= 0:
        raise OnnxCompressError("--calibration-size must be positive")
    recipe = _compress_recipe(args)
    for index, step in enumerate(recipe.steps, start=1):
        check_pass_options(step.name, step.options, f"step {index}")
    report_batches = parse_batches(args.report_batches) if args.report else []
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
        input_shapes=parse_shape_overrides(args.shape),
        static_shape=args.static_shape,
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
        from onnxcompress.pipeline.report import build_report, write_report

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
        print(f"MACs counted at {shapes_text(result.macs_counted_at)}")
        if result.static_shape:
            print(f"output fixed at {shapes_text(result.static_shape)} (--static-shape)")
        if result.stopped:
            print(f"note: {result.stopped}")
        print(f"wrote {result.output_path}")
    # Always on stderr, whatever --quiet or --json say: a miss must not pass unnoticed. The
    # report's misses are the run's plus any batch size its benchmark found slower.
    for line in payload["missed"]:
        print(f"warning: {line}", file=sys.stderr)
    return EXIT_MISSED if args.strict and payload["missed"] else EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from onnxcompress.pipeline.report import render_report

    for path in render_report(args.folder):
        print(f"wrote {path}")
    return EXIT_OK


def cmd_sweep(args: argparse.Namespace) -> int:
    from onnxcompress.passes import parse_pass_spec
    from onnxcompress.pipeline.budget import LatencySettings
    from onnxcompress.pipeline.sweep import format_sweep_table, parse_targets, sweep, write_sweep

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
