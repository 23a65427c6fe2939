"""Latency benchmark of ONNX models in ONNX Runtime, side by side.

Compression is only worth it if the rewritten model is measurably faster where it will run;
this measures several models under the same conditions and reports percentiles and speed-ups.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxcompress.errors import DataError, PassConfigError
from onnxcompress.runtime import session as runtime

if TYPE_CHECKING:
    import onnxruntime as ort

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class BenchRow:
    """Latency of one model at one batch size.

    Attributes:
        model: the model path as given.
        provider: the execution provider that ran it (``cpu``, ``cuda``, ...).
        batch: images per run.
        p50_ms: median latency of one run, in milliseconds.
        p90_ms: 90th percentile latency, in milliseconds.
        p99_ms: 99th percentile latency, in milliseconds.
        throughput: images per second at the median latency.
        speedup: the first model's median latency divided by this one's, at the same batch.
    """

    model: str
    provider: str
    batch: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput: float
    speedup: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _provider_label(session: ort.InferenceSession) -> str:
    full = session.get_providers()[0]
    for alias, name in runtime.PROVIDER_ALIASES.items():
        if name == full:
            return alias
    return full


def _batch_overrides(
    specs: Sequence[runtime.InputSpec],
    batch: int,
    shape_overrides: Mapping[str, Sequence[int]] | None,
    label: str,
) -> dict[str, tuple[int, ...]]:
    """Overrides for one batch size: the batch axis always comes from ``batch``.

    A user gives ``--shape`` for the dims the model leaves dynamic besides the batch; replacing
    its first dim keeps the images per run equal to the batch the throughput is computed for.
    A model whose batch axis is fixed to another size cannot run this batch.
    """
    overrides: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        first = spec.shape[0] if spec.shape else None
        if isinstance(first, int) and first > 0 and first != batch:
            raise DataError(
                f"{label}: input {spec.name!r} has a fixed batch of {first}; benchmark it with "
                f"batch {first} or re-export the model with a dynamic batch axis"
            )
        if shape_overrides and spec.name in shape_overrides:
            dims = tuple(int(d) for d in shape_overrides[spec.name])
            overrides[spec.name] = (batch, *dims[1:]) if dims else dims
    return overrides


def _check_override_names(
    sessions: Sequence[ort.InferenceSession], shape_overrides: Mapping[str, Sequence[int]] | None
) -> None:
    """A ``--shape`` for an input no model has is a typo that would otherwise go unnoticed."""
    names = {spec.name for session in sessions for spec in runtime.session_inputs(session)}
    for name in shape_overrides or {}:
        if name not in names:
            raise DataError(
                f"--shape names input {name!r}, which none of the models has "
                f"(inputs: {', '.join(sorted(names))})"
            )


def _run_once(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], label: str) -> int:
    """Run the model once and return the wall time in nanoseconds."""
    start = time.perf_counter_ns()
    try:
        session.run(None, feeds)
    except Exception as exc:  # ORT raises its own types for shape/type mismatches in the feeds
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{label}: ONNX Runtime failed to run the model: {text[:300]}") from exc
    return time.perf_counter_ns() - start


def benchmark(
    models: Sequence[str | Path],
    *,
    provider: str | None = None,
    batches: Sequence[int] = (1,),
    threads: int | None = None,
    warmup: int = 10,
    runs: int = 50,
    shape_overrides: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[BenchRow]:
    """Measure the latency of ``models`` side by side, for each batch size.

    The models run in the same process, on the same random inputs where their inputs match, and
    their timed runs are interleaved (run i of every model before run i + 1 of any), so drift in
    the machine's speed (thermal throttling, other processes) hits all of them equally.

    Args:
        models: ONNX files; the first is the baseline the speed-ups are relative to.
        provider: ``cpu``, ``cuda``, ``tensorrt`` or a full ORT provider name; None picks CUDA
            when onnxruntime-gpu sees a GPU, else the CPU.
        batches: batch sizes to measure; each needs a dynamic (or matching) batch axis.
        threads: intra-op threads of ONNX Runtime (None: its default, all cores).
        warmup: untimed runs per model before timing (allocations, kernel selection).
        runs: timed runs per model and batch size.
        shape_overrides: full shapes for inputs with dynamic dims besides the batch, by input
            name; their first dim is replaced by each batch size.
        seed: seed of the random inputs.
        progress: show a progress bar on stderr.

    Returns:
        One row per batch size and model, batch-major, in the order the models were given.

    Raises:
        ModelLoadError: a file is missing or not a valid ONNX model.
        ProviderUnavailableError: the provider is unknown or not installed.
        DataError: an input has a dynamic non-batch dim and no override, or a fixed batch that
            differs from a requested one.
        PassConfigError: no models, or a non-positive batch, run or warm-up count.
    """
    from onnxcompress.graph.model_io import load_model

    if not models:
        raise PassConfigError("bench: give at least one model")
    if not batches or any(int(b) < 1 for b in batches):
        raise PassConfigError(f"bench: batch sizes must be positive integers, got {list(batches)}")
    if runs < 1 or warmup < 0:
        raise PassConfigError(f"bench: runs must be >= 1 and warmup >= 0 (got {runs}, {warmup})")
    labels = [str(m) for m in models]
    for path in models:
        load_model(path)  # a clear ModelLoadError before ORT's less readable one
    runtime.resolve_providers(provider)
    sessions = [runtime.make_session(path, provider=provider, threads=threads) for path in models]
    _check_override_names(sessions, shape_overrides)
    from tqdm import tqdm

    bar = tqdm(
        total=len(batches) * (warmup + runs),
        desc="bench",
        unit="round",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    rows: list[BenchRow] = []
    try:
        for batch in (int(b) for b in batches):
            rows.extend(
                _bench_batch(sessions, labels, batch, warmup, runs, shape_overrides, seed, bar)
            )
    finally:
        bar.close()
    return rows


def _bench_batch(
    sessions: Sequence[ort.InferenceSession],
    labels: Sequence[str],
    batch: int,
    warmup: int,
    runs: int,
    shape_overrides: Mapping[str, Sequence[int]] | None,
    seed: int,
    bar: Any,
) -> list[BenchRow]:
    # Models with the same inputs share one feed dict, so they see identical data.
    feeds_by_signature: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}
    feeds: list[dict[str, np.ndarray]] = []
    for session, label in zip(sessions, labels, strict=True):
        specs = runtime.session_inputs(session)
        overrides = _batch_overrides(specs, batch, shape_overrides, label)
        try:
            signature = tuple(
                (s.name, s.dtype.str, runtime.concrete_shape(s, batch, overrides)) for s in specs
            )
        except DataError as exc:
            raise DataError(f"{label}: {exc}") from exc
        if signature not in feeds_by_signature:
            feeds_by_signature[signature] = runtime.random_feeds(
                session, batch, seed=seed, overrides=overrides
            )
        feeds.append(feeds_by_signature[signature])
    pairs = list(zip(sessions, feeds, labels, strict=True))
    for _ in range(warmup):
        for session, feed, label in pairs:
            _run_once(session, feed, label)
        bar.update(1)
    times_ns = np.zeros((len(pairs), runs), dtype=np.int64)
    for run in range(runs):
        for index, (session, feed, label) in enumerate(pairs):
            times_ns[index, run] = _run_once(session, feed, label)
        bar.update(1)
    rows = []
    for index, (session, _, label) in enumerate(pairs):
        ms = times_ns[index] / 1e6
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        baseline = float(np.percentile(times_ns[0] / 1e6, 50))
        rows.append(
            BenchRow(
                model=label,
                provider=_provider_label(session),
                batch=batch,
                p50_ms=p50,
                p90_ms=p90,
                p99_ms=p99,
                throughput=batch / (p50 / 1e3),
                speedup=baseline / p50,
            )
        )
        logger.info("%s batch %d: p50 %.3f ms", label, batch, p50)
    return rows


def format_bench_table(rows: list[BenchRow]) -> str:
    """The table ``onnxcompress bench`` prints: one line per model and batch size."""
    header = ("model", "provider", "batch", "p50 ms", "p90 ms", "p99 ms", "img/s", "speedup")
    body = [
        (
            row.model,
            row.provider,
            str(row.batch),
            f"{row.p50_ms:.3f}",
            f"{row.p90_ms:.3f}",
            f"{row.p99_ms:.3f}",
            f"{row.throughput:,.1f}",
            f"{row.speedup:.2f}x",
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        # Model and provider names read left-aligned; numbers right-aligned.
        return "  ".join(
            cell.ljust(w) if i < 2 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body)
    return "\n".join(out)
