"""The report of a compression run: ``report.json`` (everything), ``report.md`` and PNG plots.

``compress --report DIR`` builds it from the run (plus a latency benchmark of the input and the
output files); ``onnxcompress report DIR`` re-renders the Markdown and plots from the JSON.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from onnxcompress.errors import DataError, OnnxCompressError
from onnxcompress.pipeline.slowdown import slowdown_message, slower_batches

if TYPE_CHECKING:
    from onnxcompress.pipeline.run import CompressionResult

logger = logging.getLogger(__name__)

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
PLOT_FILES = {
    "channels": "channels.png",
    "macs": "macs.png",
    "accuracy": "accuracy_vs_macs.png",
    "latency": "latency.png",
}
DEFAULT_LATENCY_BATCHES = (1, 32)
DEFAULT_LATENCY_RUNS = 30
# The Markdown lists this many declined nodes per step; report.json has them all.
MAX_DECLINED_SHOWN = 12


def build_report(
    result: CompressionResult,
    *,
    latency_batches: Sequence[int] = DEFAULT_LATENCY_BATCHES,
    provider: str | None = None,
    threads: int | None = None,
    runs: int = DEFAULT_LATENCY_RUNS,
    warmup: int = 5,
    progress: bool = False,
) -> dict[str, Any]:
    """The report's data: the run as ``result.as_dict()`` plus comparisons and latency.

    ``original`` counts the input after canonicalization (BatchNorm folded, which is not
    compression), so its params compare like with like; ``params_as_given`` is the file's own.
    Latency is measured on the input and output files, interleaved, when the output was written;
    a batch size at which the output is slower is listed in ``slower_than_original`` and added
    to ``missed`` (so ``targets_met`` is false), like a missed target.
    """
    payload = result.as_dict()
    canonical = result.steps[0].metrics if result.steps else result.before
    payload["original"] = {
        "params": canonical["params"],
        "macs": canonical["macs"],
        "params_as_given": result.before["params"],
        "file_size": result.before.get("file_size"),
    }
    payload["compressed"] = {
        "params": result.after["params"],
        "macs": result.after["macs"],
        "file_size": result.after.get("file_size"),
    }
    payload["layers"] = compare_layers(result.before["layers"], result.after["layers"])
    payload["stages"] = stage_points(payload)
    payload["latency"] = []
    if result.output_path is not None and latency_batches:
        payload["latency"] = measure_latency(
            result.input_path,
            result.output_path,
            latency_batches,
            provider=provider,
            threads=threads,
            runs=runs,
            warmup=warmup,
            progress=progress,
        )
    payload["slower_than_original"] = slower_batches(payload["latency"])
    if payload["slower_than_original"]:
        lines = [slowdown_message(entry) for entry in payload["slower_than_original"]]
        payload["missed"] = [*payload["missed"], *lines]
        payload["targets_met"] = False
    return payload


def compare_layers(
    before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Per compute layer, by node name: output channels and MACs before and after.

    A layer a pass removed has ``*_after`` None; one it added has ``*_before`` None.
    """
    after_by_name = {layer["node"]: layer for layer in after}
    rows: list[dict[str, Any]] = []
    seen = set()
    for layer in before:
        new = after_by_name.get(layer["node"])
        seen.add(layer["node"])
        rows.append(_layer_row(layer, new))
    rows.extend(_layer_row(None, layer) for layer in after if layer["node"] not in seen)
    return rows


def _layer_row(old: Mapping[str, Any] | None, new: Mapping[str, Any] | None) -> dict[str, Any]:
    either = old if old is not None else new
    assert either is not None
    return {
        "node": either["node"],
        "op": either["op"],
        "channels_before": old["out_channels"] if old is not None else None,
        "channels_after": new["out_channels"] if new is not None else None,
        "macs_before": old["macs"] if old is not None else None,
        "macs_after": new["macs"] if new is not None else None,
        "params_before": old["params"] if old is not None else None,
        "params_after": new["params"] if new is not None else None,
    }


def stage_points(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The model after each stage (the steps with a budget check) with its MACs and accuracy."""
    points = []
    for index, step in enumerate(payload["steps"]):
        if step.get("budget") is None:
            continue
        accuracy = step["metrics"].get("accuracy")
        points.append(
            {
                "step": index,
                "name": step["name"],
                "macs": step["metrics"]["macs"],
                "params": step["metrics"]["params"],
                "top1": accuracy["top1"] if accuracy else None,
                "top1_agreement": step["verification"]["deviation"].get("top1_agreement"),
                "within_budget": step["budget"].get("constraints_met", True),
            }
        )
    return points


def measure_latency(
    original: str | os.PathLike[str],
    compressed: str | os.PathLike[str],
    batches: Sequence[int],
    *,
    provider: str | None = None,
    threads: int | None = None,
    runs: int = DEFAULT_LATENCY_RUNS,
    warmup: int = 5,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """p50/p90 latency of both files per batch size; a batch a model cannot run is skipped."""
    from onnxcompress.runtime.bench import benchmark

    rows: list[dict[str, Any]] = []
    for batch in batches:
        try:
            measured = benchmark(
                [Path(original), Path(compressed)],
                provider=provider,
                batches=[batch],
                threads=threads,
                warmup=warmup,
                runs=runs,
                progress=progress,
            )
        except DataError as exc:
            logger.warning("latency at batch %d not measured: %s", batch, exc)
            continue
        for label, row in zip(("original", "compressed"), measured, strict=True):
            rows.append({"label": label, **row.as_dict()})
    return rows


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def write_report(payload: Mapping[str, Any], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write report.json, report.md and the plots into ``out_dir`` (created if missing)."""
    from onnxcompress.pipeline.run import write_json_atomic

    folder = Path(out_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxCompressError(f"{folder}: cannot create the report folder ({exc})") from exc
    json_path = folder / REPORT_JSON
    write_json_atomic(json_path, payload)
    return [json_path, *render_files(payload, folder)]


def render_report(out_dir: str | os.PathLike[str]) -> list[Path]:
    """Re-render report.md and the plots from ``out_dir/report.json``."""
    folder = Path(out_dir)
    json_path = folder / REPORT_JSON
    try:
        payload = json.loads(json_path.read_text())
    except FileNotFoundError:
        raise OnnxCompressError(
            f"{json_path}: no report here; write one with compress --report {folder}"
        ) from None
    except (OSError, json.JSONDecodeError) as exc:
        raise OnnxCompressError(f"{json_path}: cannot read the report ({exc})") from exc
    if not isinstance(payload, dict) or "steps" not in payload or "layers" not in payload:
        raise OnnxCompressError(f"{json_path}: not an onnxcompress report")
    return render_files(payload, folder)


def render_files(payload: Mapping[str, Any], folder: Path) -> list[Path]:
    """The Markdown and the plots of ``payload``."""
    from onnxcompress.pipeline import plots

    written: list[Path] = []
    layers = payload["layers"]
    if layers:
        written.append(
            plots.per_layer_bars(
                layers,
                "channels",
                folder / PLOT_FILES["channels"],
                title="Output channels per layer",
                ylabel="output channels",
            )
        )
        written.append(
            plots.per_layer_bars(
                layers,
                "macs",
                folder / PLOT_FILES["macs"],
                title="MACs per layer (batch 1)",
                ylabel="MACs per image (millions)",
                scale=1e6,
            )
        )
    points = [p for p in payload.get("stages", []) if p.get("top1") is not None]
    if points:
        budget = payload.get("budget") or {}
        before = payload.get("accuracy_before") or {}
        written.append(
            plots.accuracy_vs_macs(
                points,
                folder / PLOT_FILES["accuracy"],
                original_top1=before.get("top1"),
                max_drop=budget.get("max_drop"),
                kept_step=payload.get("kept_step"),
            )
        )
    if payload.get("latency"):
        written.append(
            plots.latency_before_after(payload["latency"], folder / PLOT_FILES["latency"])
        )
    md_path = folder / REPORT_MD
    md_path.write_text(format_markdown(payload, {p.name for p in written}))
    written.insert(0, md_path)
    return written


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
    return "\n".join(lines)


def _ratio(before: float | None, after: float | None) -> str:
    return f"{after / before:.3f}x" if before and after is not None else "-"


def _count(value: float | None) -> str:
    return f"{value:,}" if value is not None else "-"


def _millions(value: float | None) -> str:
    return f"{value / 1e6:.2f} M" if value is not None else "-"


def summary_rows(payload: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    """The before/after table: params, MACs, file size, latency per batch, accuracy."""
    original, compressed = payload["original"], payload["compressed"]
    rows = [
        (
            "params",
            _count(original["params"]),
            _count(compressed["params"]),
            _ratio(original["params"], compressed["params"]),
        ),
        (
            "MACs (batch 1)",
            _millions(original["macs"]),
            _millions(compressed["macs"]),
            _ratio(original["macs"], compressed["macs"]),
        ),
        (
            "file size",
            f"{original['file_size'] / 1024:,.1f} KiB" if original.get("file_size") else "-",
            f"{compressed['file_size'] / 1024:,.1f} KiB" if compressed.get("file_size") else "-",
            _ratio(original.get("file_size"), compressed.get("file_size")),
        ),
    ]
    latency = payload.get("latency") or []
    for batch in sorted({row["batch"] for row in latency}):
        pair = {row["label"]: row for row in latency if row["batch"] == batch}
        if "original" in pair and "compressed" in pair:
            a, b = pair["original"]["p50_ms"], pair["compressed"]["p50_ms"]
            provider = pair["original"].get("provider", "")
            speed = f"{a / b:.2f}x faster" if b <= a else f"{b / a:.2f}x slower"
            rows.append(
                (
                    f"latency p50, batch {batch} ({provider})",
                    f"{a:.3f} ms",
                    f"{b:.3f} ms",
                    f"{_ratio(a, b)} ({speed})",
                )
            )
    acc_before, acc_after = payload.get("accuracy_before"), payload.get("accuracy_after")
    if acc_before and acc_after:
        rows.append(
            (
                f"top-1 accuracy ({acc_after['samples']} validation samples)",
                f"{acc_before['top1']:.2f}%",
                f"{acc_after['top1']:.2f}%",
                f"{acc_after['top1'] - acc_before['top1']:+.2f} points",
            )
        )
    return rows


def format_markdown(payload: Mapping[str, Any], plot_names: set[str] | None = None) -> str:
    """The human summary of a report."""
    plot_names = plot_names if plot_names is not None else set(PLOT_FILES.values())
    recipe = payload.get("recipe") or {}
    out = [f"# Compression report: {Path(str(payload['input'])).name}", ""]
    out.append(f"- input: `{payload['input']}`")
    out.append(f"- output: `{payload['output']}`")
    out.append(f"- tool: {payload['tool']}; run took {payload['seconds']:.1f} s")
    if recipe.get("source"):
        out.append(f"- recipe: `{recipe['source']}`")
    if recipe.get("description"):
        out.append(f"- goal: {recipe['description']}")
    data = payload.get("data") or {}
    for key in ("calibration", "train", "validation"):
        if data.get(key):
            out.append(f"- {key} data: `{data[key]}`")
    out += ["", "## Before and after", ""]
    out.append(_table(("", "original", "compressed", "after/before"), summary_rows(payload)))
    out.append("")
    out.append(
        f"Params and MACs of the original are counted after canonicalization (BatchNorm folded); "
        f"the file as given holds {_count(payload['original']['params_as_given'])} params."
    )
    if payload.get("macs_counted_at"):
        from onnxcompress.graph.input_shapes import shapes_text

        out.append(f"MACs are counted at input `{shapes_text(payload['macs_counted_at'])}`.")
        if payload.get("static_shape"):
            out.append(
                f"The output's inputs are fixed at `{shapes_text(payload['static_shape'])}` "
                "(`--static-shape`): it runs at that size only."
            )
    out += ["", "## Budget", ""]
    budget = {k: v for k, v in (payload.get("budget") or {}).items() if v is not None}
    out.append(
        "- budget: " + (", ".join(f"{k} = {v:g}" for k, v in budget.items()) or "none given")
    )
    check = payload.get("budget_check") or {}
    if check.get("missed"):
        out.append(f"- **targets not met**: {'; '.join(check['missed'])}")
    elif budget:
        out.append("- every target met" if check.get("ratios") else "- no targets set")
    for entry in payload.get("slower_than_original") or []:
        out.append(f"- **{slowdown_message(entry)}**")
    if payload.get("stopped"):
        out.append(f"- stopped: {payload['stopped']}")
    kept = payload.get("kept_step")
    if kept is not None:
        out.append(f"- written model: the one after step {kept} ({payload['steps'][kept]['name']})")
    out += ["", "## Steps", ""]
    out.append(_steps_table(payload["steps"]))
    declined = _declined_lines(payload["steps"])
    if declined:
        out += ["", "### Left alone (frozen or declined), with reasons", "", *declined]
    out += ["", "## Layers", ""]
    out.append(
        _table(
            ("layer", "op", "channels before", "channels after", "MACs before", "MACs after"),
            [
                (
                    f"`{row['node']}`",
                    row["op"],
                    _count(row["channels_before"]),
                    _count(row["channels_after"]),
                    _count(row["macs_before"]),
                    _count(row["macs_after"]),
                )
                for row in payload["layers"]
            ],
        )
    )
    shown = [(key, name) for key, name in PLOT_FILES.items() if name in plot_names]
    if shown:
        out += ["", "## Plots", ""]
        out += [f"![{key}]({name})" for key, name in shown]
    return "\n".join(out) + "\n"


def _steps_table(steps: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for index, step in enumerate(steps):
        metrics = step["metrics"]
        accuracy = metrics.get("accuracy")
        deviation = step["verification"].get("deviation") or {}
        agreement = deviation.get("top1_agreement")
        options = step["report"].get("options") or {}
        shown = ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, (), []))
        rows.append(
            (
                index,
                step["name"],
                shown[:80] + ("…" if len(shown) > 80 else ""),
                _count(metrics["params"]),
                _millions(metrics["macs"]),
                f"{accuracy['top1']:.2f}%" if accuracy else "-",
                f"{agreement:.2f}%" if agreement is not None else "-",
                f"{deviation.get('max_rel', float('nan')):.3g}",
                f"{step['seconds']:.1f}",
            )
        )
    return _table(
        (
            "step",
            "name",
            "options",
            "params",
            "MACs",
            "top-1",
            "top-1 agreement",
            "max rel. deviation",
            "seconds",
        ),
        rows,
    )


def _declined_lines(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    lines = []
    for index, step in enumerate(steps):
        declined = step["report"].get("declined") or []
        for item in declined[:MAX_DECLINED_SHOWN]:
            lines.append(f"- step {index} ({step['name']}): `{item['node']}`: {item['reason']}")
        if len(declined) > MAX_DECLINED_SHOWN:
            more = len(declined) - MAX_DECLINED_SHOWN
            lines.append(f"- step {index}: {more} more in report.json")
    return lines


__all__ = [
    "build_report",
    "compare_layers",
    "format_markdown",
    "measure_latency",
    "render_report",
    "summary_rows",
    "write_report",
]
