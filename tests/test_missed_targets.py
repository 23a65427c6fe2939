"""Nothing fails silently: a missed target, an overshoot or a step that changes nothing is a
``warning:`` line on stderr and ``targets_met: false`` in the JSON; ``--strict`` makes it exit
code 3; every step's options, the budget the pipeline hands it included, are checked first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxcompress.cli import EXIT_MISSED, EXIT_OK, EXIT_USER, main
from onnxcompress.errors import PassConfigError
from onnxcompress.passes.base import PassReport
from onnxcompress.pipeline.run import compress

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "digits_resnet.onnx"


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_a_target_check_is_met_only_within_the_tolerance_on_both_sides() -> None:
    report = PassReport("lrf", {})
    assert report.check_target("target_macs", 0.5, 0.515, tolerance=0.02).met
    assert report.check_target("target_macs", 0.5, 0.485, tolerance=0.02).met
    short = report.check_target("target_macs", 0.5, 0.53, tolerance=0.02)
    assert not short.met and "short of the target" in short.reason
    over = report.check_target("target_macs", 0.5, 0.386, tolerance=0.02)
    assert not over.met and "overshot" in over.reason
    assert [t.option for t in report.targets] == ["target_macs"]  # the last check stands
    assert report.warnings == [
        "lrf missed target_macs=0.5 (reached 0.386): overshot the target by more than "
        "the tolerance 0.02"
    ]
    assert not report.targets_met


def test_lrf_that_cannot_land_within_the_tolerance_warns_and_strict_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """round_to=32 on the digits model: its 32-wide groups cannot be cut at all, and each of
    the two 64-wide groups loses 32 channels or none, so 0.5 of the MACs is out of reach."""
    out = tmp_path / "small.onnx"
    args = ["compress", str(DEMO), "-o", str(out), "--pass", "lrf:target_macs=0.5,round_to=32"]
    code, stdout, err = run_cli([*args, "--json"], capsys)
    assert code == EXIT_OK and out.exists()  # the model is still written
    payload = json.loads(stdout)
    assert payload["targets_met"] is False
    (missed,) = payload["missed"]
    assert missed.startswith("lrf missed target_macs=0.5 (reached 0.816)")
    assert "round_to=32" in missed
    step = payload["steps"][1]["report"]
    assert step["targets_met"] is False and step["summary"]["target_met"] is False
    assert step["targets"][0]["reached"] == pytest.approx(0.816, abs=1e-3)
    # Even with --json the warning reaches stderr.
    assert warnings_in(err) == [f"warning: {missed}"]
    code, _, err = run_cli([*args, "--force", "--strict", "--quiet"], capsys)
    assert code == EXIT_MISSED and warnings_in(err) == [f"warning: {missed}"]


def test_the_closest_point_is_chosen_and_met_within_the_tolerance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """0.9 with round_to=32: cutting the cheaper-per-MAC group lands at 0.866 (an overshoot of
    0.034); the other group's chunk lands at 0.905, within 0.02: that one is chosen."""
    out = tmp_path / "small.onnx"
    args = ["compress", str(DEMO), "-o", str(out), "--pass", "lrf:target_macs=0.9,round_to=32"]
    code, stdout, err = run_cli([*args, "--json", "--strict"], capsys)
    assert code == EXIT_OK, err
    payload = json.loads(stdout)
    assert payload["targets_met"] is True and payload["missed"] == []
    assert payload["after"]["macs"] / payload["before"]["macs"] == pytest.approx(0.905, abs=2e-3)
    assert not warnings_in(err)


def test_a_pass_that_changes_nothing_says_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "same.onnx"
    args = ["compress", str(DEMO), "-o", str(out), "--pass", "cheapconv:min_channels=512,epochs=0"]
    code, stdout, err = run_cli([*args, "--strict"], capsys)
    assert code == EXIT_MISSED
    (line,) = warnings_in(err)
    assert line.startswith("warning: cheapconv left the model unchanged: ")
    assert "min_channels=512" in line
    assert "wrote" in stdout


def test_a_budget_missed_by_the_result_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "small.onnx"
    args = ["compress", str(DEMO), "-o", str(out), "--pass", "lrf:target_macs=0.9"]
    code, stdout, err = run_cli([*args, "--target-macs", "0.5", "--json", "--strict"], capsys)
    assert code == EXIT_MISSED
    payload = json.loads(stdout)
    assert payload["targets_met"] is False
    assert payload["missed"] == [payload["missed"][0]]
    assert payload["missed"][0].startswith("budget target missed: macs at 0.9")
    assert warnings_in(err) == [f"warning: {payload['missed'][0]}"]


def test_injected_budgets_are_validated_before_any_step_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget the pipeline hands ``lct`` (target_macs=1.0, out of its range) fails before
    ``lrf``, the step before it, does any work."""
    import onnxcompress.passes as registry

    created: list[str] = []
    real = registry.create_pass

    def spy(name: str, *args: object, **kwargs: object) -> object:
        created.append(name)
        return real(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(registry, "create_pass", spy)
    from onnxcompress.pipeline.budget import Budget

    steps = [("lrf", {"target_macs": 0.9}), ("lct", {"subspace": "lowrank"})]
    with pytest.raises(PassConfigError, match=r"target_macs=1\.0"):
        compress(DEMO, tmp_path / "x.onnx", steps, data="digits[:64]", budget=Budget(1.0))
    assert created == []


def test_a_step_sized_by_its_own_options_gets_no_budget() -> None:
    """``energy`` sizes ``lct`` lowrank: the run's target_macs is not added (it used to be, and
    ``give target_macs or energy, not both`` came after the steps before it had run)."""
    from onnxcompress.pipeline.budget import Budget
    from onnxcompress.pipeline.run import _injected_budget

    budget = Budget(target_macs=0.6)
    assert _injected_budget("lct", {"subspace": "lowrank", "energy": 0.9}, budget) == {}
    assert _injected_budget("lct", {"subspace": "lowrank"}, budget) == {"target_macs": 0.6}
    # Sparse weights save no MACs in ONNX Runtime: no MAC budget for them.
    assert _injected_budget("lct", {"subspace": "sparse"}, budget) == {}
    assert _injected_budget("merge", {"threshold": 0.1}, budget) == {}
    assert _injected_budget("resect", {"target_layers": 3}, budget) == {}
    assert _injected_budget("lrf", {}, budget) == {"target_macs": 0.6}


def test_bad_cli_combination_is_exit_2_before_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.onnx"
    args = ["compress", str(DEMO), "-o", str(out), "--pass", "lrf:target_macs=0.9"]
    args += ["--pass", "lct:subspace=lowrank", "--target-macs", "1.0", "--data", "digits[:64]"]
    code, _, err = run_cli(args, capsys)
    assert code == EXIT_USER
    assert "running lrf" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
