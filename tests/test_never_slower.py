"""Never slower unnoticed: a compressed model measured slower than the original at a report batch
size is a ``warning:`` line on stderr and an entry of ``slower_than_original`` in report.json,
and ``--strict`` exits 3 on it; within ``SLOWER_MARGIN`` it is noise and nothing is said.

Nothing here times a model: the benchmark and the latency meter return scripted p50s.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from onnxcompress.cli import EXIT_MISSED, EXIT_OK, main
from onnxcompress.pipeline.report import REPORT_JSON, REPORT_MD
from onnxcompress.pipeline.slowdown import SLOWER_MARGIN, slower_batches
from onnxcompress.runtime.bench import BenchRow

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "digits_resnet.onnx"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def script_benchmark(
    monkeypatch: pytest.MonkeyPatch, p50_by_batch: dict[int, tuple[float, float]]
) -> None:
    """The report's benchmark returns (original, compressed) p50s per batch from the script."""

    def scripted(models: Sequence[str | Path], *, batches: Sequence[int], **_: Any) -> list:
        rows = []
        for batch in batches:
            for model, p50 in zip(models, p50_by_batch[batch], strict=True):
                first = p50_by_batch[batch][0]
                rows.append(
                    BenchRow(str(model), "cpu", batch, p50, p50, p50, batch / p50, first / p50)
                )
        return rows

    monkeypatch.setattr("onnxcompress.runtime.bench.benchmark", scripted)


def compress_with_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> tuple[int, str, dict[str, Any], str]:
    report = tmp_path / "report"
    args = ["compress", str(DEMO), "-o", str(tmp_path / "out.onnx"), "--report", str(report)]
    code, _, err = run_cli([*args, "--report-batches", "1,32", "--quiet", *extra], capsys)
    payload = json.loads((report / REPORT_JSON).read_text())
    return code, err, payload, (report / REPORT_MD).read_text()


def test_a_slower_batch_is_a_warning_and_a_report_entry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script_benchmark(monkeypatch, {1: (0.5, 0.4), 32: (3.9, 4.1)})
    code, err, payload, markdown = compress_with_report(tmp_path, capsys)
    assert code == EXIT_OK  # without --strict a slowdown is a warning, and the output is written
    line = (
        "the compressed model is slower than the original at batch 32: "
        "p50 4.100 ms vs 3.900 ms (1.051x)"
    )
    assert warnings_in(err) == [f"warning: {line}"]
    assert payload["slower_than_original"] == [
        {"batch": 32, "original_p50_ms": 3.9, "compressed_p50_ms": 4.1, "ratio": 1.0513}
    ]
    assert payload["missed"] == [line] and payload["targets_met"] is False
    assert f"- **{line}**" in markdown
    assert "(1.05x slower)" in markdown and "(1.25x faster)" in markdown


def test_strict_exits_3_on_a_slower_batch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script_benchmark(monkeypatch, {1: (0.5, 0.6), 32: (3.9, 4.1)})
    code, err, payload, _ = compress_with_report(tmp_path, capsys, "--strict")
    assert code == EXIT_MISSED
    assert [entry["batch"] for entry in payload["slower_than_original"]] == [1, 32]
    assert len(warnings_in(err)) == 2


def test_a_faster_model_is_not_warned_about(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    script_benchmark(monkeypatch, {1: (0.5, 0.4), 32: (3.9, 2.0)})
    code, err, payload, markdown = compress_with_report(tmp_path, capsys, "--strict")
    assert code == EXIT_OK, err
    assert warnings_in(err) == []
    assert payload["slower_than_original"] == [] and payload["targets_met"] is True
    assert "slower" not in markdown


def test_within_the_margin_is_noise_not_a_slowdown(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    within = 1.0 + SLOWER_MARGIN * 0.75
    script_benchmark(monkeypatch, {1: (0.5, 0.5 * within), 32: (4.0, 4.0 * within)})
    code, err, payload, _ = compress_with_report(tmp_path, capsys, "--strict")
    assert code == EXIT_OK, err
    assert warnings_in(err) == [] and payload["slower_than_original"] == []


def test_the_margin_is_strict_and_a_batch_needs_both_models() -> None:
    def rows(batch: int, original: float, compressed: float) -> list[dict[str, Any]]:
        return [
            {"label": "original", "batch": batch, "p50_ms": original},
            {"label": "compressed", "batch": batch, "p50_ms": compressed},
        ]

    at_margin = rows(1, 1.0, 1.0 + SLOWER_MARGIN)
    assert slower_batches(at_margin) == []
    assert [e["batch"] for e in slower_batches(at_margin, margin=0.0)] == [1]
    only_original = [{"label": "original", "batch": 8, "p50_ms": 1.0}]
    assert slower_batches([*rows(32, 2.0, 3.0), *only_original]) == [
        {"batch": 32, "original_p50_ms": 2.0, "compressed_p50_ms": 3.0, "ratio": 1.5}
    ]


def test_a_step_timed_slower_under_a_latency_budget_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pipeline's own latency check (``--target-latency``) names a slowdown too."""
    from onnxcompress.pipeline.budget import LatencyMeter

    monkeypatch.setattr(LatencyMeter, "compare", lambda self, candidate: (2.0, 2.2))
    args = ["compress", str(DEMO), "-o", str(tmp_path / "out.onnx"), "--target-latency", "1.0"]
    code, _, err = run_cli([*args, "--pass", "lrf:target_macs=0.9", "--strict", "--quiet"], capsys)
    assert code == EXIT_MISSED
    assert warnings_in(err) == [
        "warning: budget target missed: latency at 1.100 of the original (target 1.000): "
        "slower than the original"
    ]
