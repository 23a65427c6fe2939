"""The text the commands print: the before/after table, the verify report, the training history.

Pure functions of results to strings, so any command (the demo too) can share them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from onnxcompress.runtime.evaluate import VerifyResult
    from onnxcompress.torch_bridge.finetune_result import FinetuneResult


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


def format_verify_result(result: VerifyResult) -> str:
    """``onnxcompress verify``'s report: checker, session, and the output deviation."""
    lines = [
        f"checker:  {'ok' if result.checker_ok else 'FAILED: ' + str(result.checker_error)}",
        f"session:  {'ok' if result.session_ok else 'FAILED: ' + str(result.session_error)}",
    ]
    if result.deviation is not None:
        dev = result.deviation
        agreement = f"{dev.top1_agreement:.2f}%" if dev.top1_agreement is not None else "n/a"
        lines.append(
            f"deviation: max abs {dev.max_abs:.4g}  mean abs {dev.mean_abs:.4g}  "
            f"max rel {dev.max_rel:.4g}  top-1 agreement {agreement} "
            f"({dev.samples} samples)"
        )
    return "\n".join(lines)


def format_finetune_history(result: FinetuneResult) -> str:
    """One line per epoch of a fine-tuning run, then the best epoch against the start."""
    lines = []
    for record in result.history:
        loss = f"{record.loss:.4f}" if record.loss is not None else "-"
        top1 = f"{record.val_top1:.2f}%" if record.val_top1 is not None else "-"
        speed = f"{record.images_per_second:.0f} img/s" if record.images_per_second else ""
        lines.append(f"epoch {record.epoch}: loss {loss}  val top-1 {top1}  {speed}".rstrip())
    if result.best_top1 is not None:
        teacher_part = (
            f", teacher {result.teacher_top1:.2f}%" if result.teacher_top1 is not None else ""
        )
        lines.append(
            f"best epoch {result.best_epoch}: val top-1 {result.best_top1:.2f}% "
            f"(before {result.initial_top1:.2f}%{teacher_part})"
        )
    return "\n".join(lines)
