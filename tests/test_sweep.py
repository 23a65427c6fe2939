"""Sweep: one pass at several targets gives the accuracy-MACs-latency curve (table + PNG)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxcompress.cli import main
from onnxcompress.errors import PassConfigError
from onnxcompress.pipeline.sweep import SweepRow, format_sweep_table, parse_targets

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "digits_resnet.onnx"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_sweep_lrf_on_the_demo_model(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sweep"
    code, stdout, err = run_cli(
        [
            "sweep",
            str(DEMO),
            "--pass",
            "lrf:criterion=activations,round_to=1",
            "--targets",
            "0.9,0.7,0.4",
            "--data",
            "digits[:300]",
            "--eval-data",
            "digits[1400:]",
            "--out",
            str(out),
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    rows = json.loads(stdout)
    assert [row["target"] for row in rows] == [0.9, 0.7, 0.4]
    for row in rows:
        assert row["error"] is None
        # lrf lands within its tolerance (2% of the original) of each target, from below
        assert row["target"] - 0.025 <= row["macs_ratio"] <= row["target"] + 0.006
        assert row["latency_ms"] > 0 and row["original_latency_ms"] > 0
        assert 0 <= row["top1"] <= 100 and row["original_top1"] > 90
    macs = [row["macs"] for row in rows]
    assert macs == sorted(macs, reverse=True)
    # the mildest cut keeps (nearly) the original's answers, the hardest the fewest
    assert rows[0]["top1_agreement"] >= rows[-1]["top1_agreement"]
    assert rows[0]["top1_agreement"] >= 97
    assert (out / "sweep.png").read_bytes().startswith(b"\x89PNG")
    table = (out / "sweep.md").read_text()
    assert "| 0.7 |" in table and "| original |" in table and "sweep.png" in table
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["pass"] == "lrf" and saved["rows"] == rows


def test_sweep_user_errors(tmp_path: Path, capsys) -> None:
    code, _, err = run_cli(["sweep", str(DEMO), "--pass", "lrf", "--targets", "0.9,1.5"], capsys)
    assert code == 2 and "--targets" in err
    code, _, err = run_cli(
        ["sweep", str(DEMO), "--pass", "lrf", "--key", "epochs", "--targets", "0.5"], capsys
    )
    assert code == 2 and "'epochs'" in err and "target_macs" in err
    code, _, err = run_cli(["sweep", str(DEMO), "--pass", "nosuch", "--targets", "0.5"], capsys)
    assert code == 2 and "unknown pass" in err


def test_targets_and_table() -> None:
    assert parse_targets("0.9, 0.5,") == [0.9, 0.5]
    for bad in ("", "a,b", "0", "1.2"):
        with pytest.raises(PassConfigError):
            parse_targets(bad)
    rows = [
        SweepRow(0.8, 80, 8, 0.8, 0.79, 95.0, 96.0, 99.0, 0.1, 0.9, 1.0),
        SweepRow(0.5, error="step 'lrf' produced a model that fails onnx.checker"),
    ]
    table = format_sweep_table(rows).splitlines()
    assert table[2] == "| original | 1.000x | 1.000x | 96.00 | 100.00 | 1.000 |"
    assert table[3] == "| 0.8 | 0.800x | 0.790x | 95.00 | 99.00 | 0.900 |"
    assert table[4].startswith("| 0.5 | failed: step 'lrf'")
