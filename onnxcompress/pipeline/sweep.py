"""Sweep one pass over several targets: the accuracy-MACs-latency curve to pick an operating point.

Each target runs the pass on its own copy of the canonicalized model, so points are independent;
every point is verified against the original and timed beside it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from onnxcompress.errors import OnnxCompressError, PassConfigError
from onnxcompress.pipeline.budget import LatencyMeter, LatencySettings

logger = logging.getLogger(__name__)

SWEEP_JSON = "sweep.json"
SWEEP_MD = "sweep.md"
SWEEP_PNG = "sweep.png"


@dataclasses.dataclass
class SweepRow:
    """One point of the curve.

    Attributes:
        target: the value given to the pass's ``key`` option.
        macs / params: of the compressed model; ``*_ratio`` relative to the canonical original.
        top1: validation top-1 (%), when labelled validation data was given.
        top1_agreement: with the original on the verification inputs (%).
        max_rel: largest relative output deviation from the original.
        latency_ms / original_latency_ms: p50 at ``batch``, measured interleaved.
        error: why the point failed (verification or the pass), else None.
        warnings: the pass's missed targets (``lrf missed target_macs=0.5 ...``).
    """

    target: float
    macs: int | None = None
    params: int | None = None
    macs_ratio: float | None = None
    params_ratio: float | None = None
    top1: float | None = None
    original_top1: float | None = None
    top1_agreement: float | None = None
    max_rel: float | None = None
    latency_ms: float | None = None
    original_latency_ms: float | None = None
    batch: int = 1
    seconds: float = 0.0
    error: str | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_targets(text: str) -> list[float]:
    """``0.9,0.8,0.7`` as floats; each must be in (0, 1]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or any(not 0.0 < v <= 1.0 for v in values):
        raise PassConfigError(
            f"--targets {text!r}: give comma-separated fractions in (0, 1], e.g. 0.9,0.7,0.5"
        )
    return values


def sweep(
    model_path: str | os.PathLike[str],
    pass_name: str,
    options: Mapping[str, Any],
    targets: Sequence[float],
    *,
    key: str = "target_macs",
    data: str | None = None,
    calibration_size: int = 512,
    eval_data: str | None = None,
    latency: LatencySettings | None = None,
    verify_samples: int = 256,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[SweepRow]:
    """Run ``pass_name`` once per target and measure each result.

    Raises:
        PassConfigError: unknown pass, bad options, or ``key`` is not an option of the pass.
    """
    from tqdm import tqdm

    from onnxcompress.graph.metrics import model_metrics
    from onnxcompress.graph.model_io import clone_model, load_model
    from onnxcompress.passes import create_pass, pass_class
    from onnxcompress.passes.base import PassContext, parse_options
    from onnxcompress.pipeline.run import verify_step
    from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

    say = log or (lambda message: None)
    fields = {f.name for f in dataclasses.fields(pass_class(pass_name).config_class)}
    if key not in fields:
        raise PassConfigError(
            f"pass {pass_name!r} has no option {key!r} to sweep "
            f"(options: {', '.join(sorted(fields))})"
        )
    # The swept option replaces whatever else the options say about how much to remove.
    budget_options = pass_class(pass_name).budget_options
    base = {k: v for k, v in options.items() if k.replace("-", "_") not in budget_options}
    for target in targets:
        parse_options(pass_class(pass_name).config_class, {**base, key: target}, pass_name)
    original = load_model(model_path)
    canonical = clone_model(original)
    create_pass("canonicalize", {})(canonical)
    context = PassContext(seed=seed, progress=False)
    calibration = None
    if data is not None:
        calibration = dataset_for_model(original, data).spread(calibration_size)
        context.calibration, context.calibration_labels = calibration.x, calibration.y
        context.train_spec = data
    validation = dataset_for_model(original, eval_data) if eval_data is not None else None
    verify_x = None
    if validation is not None:
        verify_x = validation.spread(verify_samples).x
    elif calibration is not None:
        verify_x = calibration.spread(verify_samples).x
    reference = model_metrics(canonical)
    original_top1 = accuracy(original, validation).top1 if validation is not None else None
    settings = latency or LatencySettings()
    meter = LatencyMeter(original, settings, seed=seed)
    rows: list[SweepRow] = []
    for target in tqdm(targets, desc=f"sweep {pass_name}", unit="point", disable=not progress):
        start = time.perf_counter()
        row = SweepRow(target=target, original_top1=original_top1, batch=settings.batch)
        model = clone_model(canonical)
        try:
            compression = create_pass(pass_name, {**base, key: target}, context)
            compression(model)
            row.warnings = compression.report.warnings
            for warning in row.warnings:
                say(f"warning: {warning}")
            verification = verify_step(original, model, pass_name, verify_x, seed)
        except OnnxCompressError as exc:
            row.error = str(exc)
            say(f"  {key}={target:g}: failed: {exc}")
            rows.append(row)
            continue
        metrics = model_metrics(model)
        row.macs, row.params = metrics.macs, metrics.params
        row.macs_ratio = metrics.macs / reference.macs if reference.macs else 1.0
        row.params_ratio = metrics.params / reference.params if reference.params else 1.0
        deviation = verification["deviation"]
        row.top1_agreement, row.max_rel = deviation.get("top1_agreement"), deviation["max_rel"]
        if validation is not None:
            row.top1 = accuracy(model, validation).top1
        row.original_latency_ms, row.latency_ms = meter.compare(model)
        row.seconds = round(time.perf_counter() - start, 3)
        rows.append(row)
        top1 = f"  top-1 {row.top1:.2f}%" if row.top1 is not None else ""
        say(
            f"  {key}={target:g}: MACs {row.macs_ratio:.3f}x  params {row.params_ratio:.3f}x"
            f"{top1}  p50 {row.latency_ms:.3f} ms (original {row.original_latency_ms:.3f} ms)"
        )
    return rows


def format_sweep_table(rows: Sequence[SweepRow], key: str = "target_macs") -> str:
    """A Markdown table of the sweep, one row per target."""
    header = [key, "MACs", "params", "top-1 (%)", "top-1 agreement (%)", "p50 latency (ms)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    if rows:
        first = rows[0]
        top1 = f"{first.original_top1:.2f}" if first.original_top1 is not None else "-"
        ms = f"{first.original_latency_ms:.3f}" if first.original_latency_ms else "-"
        lines.append(f"| original | 1.000x | 1.000x | {top1} | 100.00 | {ms} |")
    for row in rows:
        if row.error is not None:
            lines.append(f"| {row.target:g} | failed: {row.error[:80]} | | | | |")
            continue
        top1 = f"{row.top1:.2f}" if row.top1 is not None else "-"
        agreement = f"{row.top1_agreement:.2f}" if row.top1_agreement is not None else "-"
        lines.append(
            f"| {row.target:g} | {row.macs_ratio:.3f}x | {row.params_ratio:.3f}x | {top1} | "
            f"{agreement} | {row.latency_ms:.3f} |"
        )
    return "\n".join(lines)


def write_sweep(
    rows: Sequence[SweepRow],
    out_dir: str | os.PathLike[str],
    *,
    model: str,
    pass_name: str,
    key: str,
) -> list[Path]:
    """sweep.json, sweep.md (the table) and sweep.png (the curve) in ``out_dir``."""
    from onnxcompress.pipeline import plots
    from onnxcompress.pipeline.run import write_json_atomic

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    payload = {"model": model, "pass": pass_name, "key": key, "rows": [r.as_dict() for r in rows]}
    write_json_atomic(folder / SWEEP_JSON, payload)
    table = format_sweep_table(rows, key)
    written = [folder / SWEEP_JSON]
    good = [row.as_dict() for row in rows if row.error is None]
    title = f"{Path(model).name}: {pass_name} swept over {key}"
    md = [f"# Sweep: {title}", "", table, ""]
    if good:
        written.append(plots.sweep_curve(good, folder / SWEEP_PNG, title=title))
        md.append(f"![sweep]({SWEEP_PNG})")
    (folder / SWEEP_MD).write_text("\n".join(md) + "\n")
    written.insert(1, folder / SWEEP_MD)
    return written


__all__ = ["SweepRow", "format_sweep_table", "parse_targets", "sweep", "write_sweep"]
