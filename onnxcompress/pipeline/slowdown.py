"""Whether the compressed model runs slower than the original, judged from measured p50 latency.

A compression tool must never hand back a slower model unnoticed: ``compress`` warns on stderr
for each such batch size, the report lists them and ``--strict`` fails on them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

# "Slower" means a p50 more than this fraction above the original's at the same batch size.
# Both p50s come from runs interleaved with each other (runtime/bench.py), so drift in the
# machine's speed hits both; what is left is the spread of two medians, which stayed within 1%
# for the demo model timed against itself on a shared 2-core machine (30 runs; batch 1, and
# batch 32 on one thread).
# Twice that keeps identical models from being called slower, and equals the budgets'
# TARGET_TOLERANCE, so `target_latency = 1.0` and this check agree on what slower is. Another
# process competing with ONNX Runtime's threads for the cores can swing the ratio far beyond
# any margin; the cure for that is `--threads 1` or an idle machine, not a wider margin.
SLOWER_MARGIN = 0.02


def slower_batches(
    latency: Iterable[Mapping[str, Any]], margin: float = SLOWER_MARGIN
) -> list[dict[str, Any]]:
    """The batch sizes at which the compressed model's p50 exceeds the original's by > ``margin``.

    Args:
        latency: rows like the report's ``latency``: ``label`` (``original`` or
            ``compressed``), ``batch`` and ``p50_ms``; a batch missing either label is skipped.
        margin: the relative excess that counts as slower (see ``SLOWER_MARGIN``).

    Returns:
        One entry per slower batch, ascending: ``batch``, ``original_p50_ms``,
        ``compressed_p50_ms`` and ``ratio`` (compressed over original).
    """
    p50 = {(row["label"], int(row["batch"])): float(row["p50_ms"]) for row in latency}
    entries: list[dict[str, Any]] = []
    for batch in sorted({batch for _, batch in p50}):
        original = p50.get(("original", batch))
        compressed = p50.get(("compressed", batch))
        if original is None or compressed is None or original <= 0:
            continue
        ratio = compressed / original
        if ratio > 1.0 + margin:
            entries.append(
                {
                    "batch": batch,
                    "original_p50_ms": original,
                    "compressed_p50_ms": compressed,
                    "ratio": round(ratio, 4),
                }
            )
    return entries


def slowdown_message(entry: Mapping[str, Any]) -> str:
    """One entry of ``slower_batches`` as the line ``compress`` prints after ``warning:``."""
    return (
        f"the compressed model is slower than the original at batch {entry['batch']}: "
        f"p50 {entry['compressed_p50_ms']:.3f} ms vs {entry['original_p50_ms']:.3f} ms "
        f"({entry['ratio']:.3f}x)"
    )


__all__ = ["SLOWER_MARGIN", "slowdown_message", "slower_batches"]
