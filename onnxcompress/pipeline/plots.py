"""PNG plots of a compression report and of a sweep, drawn with matplotlib (headless).

Each function takes the plain data of ``report.json`` (or a sweep's rows), so ``onnxcompress
report DIR`` can redraw them without the models. Axes carry units, series a legend.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)

BEFORE_COLOR = "#7f8c8d"
AFTER_COLOR = "#2e86de"
DPI = 120
# Past this many layers the x axis shows layer numbers instead of (long) node names.
MAX_NAMED_LAYERS = 32


def _figure(width: float, height: float) -> tuple[Figure, Axes]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=DPI)
    return fig, ax


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _layer_axis(ax: Axes, names: Sequence[str]) -> None:
    positions = range(len(names))
    if len(names) <= MAX_NAMED_LAYERS:
        ax.set_xticks(list(positions))
        ax.set_xticklabels([_short(n) for n in names], rotation=60, ha="right", fontsize=7)
        ax.set_xlabel("layer (Conv / Gemm node, in graph order)")
    else:
        ax.set_xlabel(f"layer index (Conv / Gemm nodes in graph order, {len(names)} layers)")
    ax.set_xlim(-0.7, len(names) - 0.3)


def per_layer_bars(
    layers: Sequence[Mapping[str, Any]],
    key: str,
    path: Path,
    *,
    title: str,
    ylabel: str,
    scale: float = 1.0,
) -> Path:
    """Grouped bars of ``layer[key + "_before"]`` and ``layer[key + "_after"]`` per layer."""
    fig, ax = _figure(max(7.0, 0.32 * len(layers) + 3.0), 4.6)
    names = [str(layer["node"]) for layer in layers]
    before = [(layer.get(f"{key}_before") or 0) / scale for layer in layers]
    after = [(layer.get(f"{key}_after") or 0) / scale for layer in layers]
    width = 0.4
    xs = list(range(len(layers)))
    ax.bar([x - width / 2 for x in xs], before, width, label="original", color=BEFORE_COLOR)
    ax.bar([x + width / 2 for x in xs], after, width, label="compressed", color=AFTER_COLOR)
    _layer_axis(ax, names)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    return _save(fig, path)


def accuracy_vs_macs(
    points: Sequence[Mapping[str, Any]],
    path: Path,
    *,
    original_top1: float | None,
    max_drop: float | None,
    kept_step: int | None,
) -> Path:
    """Top-1 against MACs for the model after each stage, in run order, the kept one marked."""
    fig, ax = _figure(7.5, 4.8)
    xs = [p["macs"] / 1e6 for p in points]
    ys = [p["top1"] for p in points]
    ax.plot(xs, ys, "-o", color=AFTER_COLOR, label="model after each stage")
    for point, x, y in zip(points, xs, ys, strict=True):
        ax.annotate(
            f"{point['step']}: {point['name']}",
            (x, y),
            textcoords="offset points",
            xytext=(5, 6),
            fontsize=8,
        )
    kept = [p for p in points if p["step"] == kept_step]
    if kept:
        ax.plot(
            [kept[0]["macs"] / 1e6],
            [kept[0]["top1"]],
            marker="*",
            markersize=16,
            color="#e67e22",
            linestyle="none",
            label="kept (written) model",
        )
    broken = [p for p in points if not p.get("within_budget", True)]
    if broken:
        ax.plot(
            [p["macs"] / 1e6 for p in broken],
            [p["top1"] for p in broken],
            marker="x",
            markersize=12,
            markeredgewidth=2.5,
            color="#c0392b",
            linestyle="none",
            label="broke the budget (run stopped)",
        )
    if original_top1 is not None:
        ax.axhline(original_top1, color=BEFORE_COLOR, linestyle="--", label="original top-1")
        if max_drop is not None:
            ax.axhline(
                original_top1 - max_drop,
                color="#c0392b",
                linestyle=":",
                label=f"budget: max drop {max_drop:g} points",
            )
    ax.margins(x=0.12, y=0.15)
    ax.set_xlabel("MACs per image (millions)")
    ax.set_ylabel("top-1 accuracy on validation data (%)")
    ax.set_title("Accuracy vs compute over the run")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def latency_before_after(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """p50 latency of the original and the compressed model, one panel per batch size."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    batches = sorted({int(row["batch"]) for row in rows})
    fig, axes = plt.subplots(1, len(batches), figsize=(3.6 * len(batches) + 1, 4.2), dpi=DPI)
    axes_list = list(axes) if len(batches) > 1 else [axes]
    for ax, batch in zip(axes_list, batches, strict=True):
        pair = [row for row in rows if int(row["batch"]) == batch]
        labels = [str(row["label"]) for row in pair]
        values = [float(row["p50_ms"]) for row in pair]
        colors = [BEFORE_COLOR, AFTER_COLOR][: len(pair)]
        bars = ax.bar(labels, values, color=colors, label=labels)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate(
                f"{value:.3g} ms",
                (bar.get_x() + bar.get_width() / 2, value),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        provider = pair[0].get("provider", "") if pair else ""
        ax.set_title(f"batch {batch} ({provider})")
        ax.set_ylabel("p50 latency per run (ms)")
        ax.set_ylim(0, max(values) * 1.2 if values else 1)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("ONNX Runtime latency, original vs compressed")
    return _save(fig, path)


def sweep_curve(rows: Sequence[Mapping[str, Any]], path: Path, *, title: str) -> Path:
    """Accuracy and latency against the kept fraction of MACs, one point per sweep target."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.4), dpi=DPI)
    xs = [100.0 * row["macs_ratio"] for row in rows]
    has_top1 = all(row.get("top1") is not None for row in rows)
    if has_top1:
        ys = [float(row["top1"]) for row in rows]
        left.set_ylabel("top-1 accuracy on validation data (%)")
    else:
        ys = [float(row.get("top1_agreement") or 0.0) for row in rows]
        left.set_ylabel("top-1 agreement with the original (%)")
    left.plot(xs, ys, "-o", color=AFTER_COLOR, label="compressed")
    original = rows[0].get("original_top1") if has_top1 else None
    if original is not None:
        left.axhline(original, color=BEFORE_COLOR, linestyle="--", label="original")
    for row, x, y in zip(rows, xs, ys, strict=True):
        left.annotate(
            f"{row['target']:g}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=8
        )
    left.margins(x=0.08, y=0.15)
    left.set_xlabel("MACs kept (% of the original)")
    left.set_title("Accuracy vs compute (labels: requested target)")
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    if all(row.get("latency_ms") is not None for row in rows):
        right.plot(
            xs, [row["latency_ms"] for row in rows], "-o", color=AFTER_COLOR, label="compressed"
        )
        original_ms = rows[0].get("original_latency_ms")
        if original_ms is not None:
            right.axhline(original_ms, color=BEFORE_COLOR, linestyle="--", label="original")
        batch = rows[0].get("batch", 1)
        right.set_ylabel(f"p50 latency at batch {batch} (ms)")
        right.set_xlabel("MACs kept (% of the original)")
        right.set_title("Latency vs compute")
        right.grid(alpha=0.3)
        right.legend(fontsize=8)
    else:
        right.set_axis_off()
    fig.suptitle(title)
    return _save(fig, path)


__all__ = ["accuracy_vs_macs", "latency_before_after", "per_layer_bars", "sweep_curve"]
