"""End to end: recipes with fine-tuning on the demo model, budgets, the gate, and the report."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from onnxcompress.cli import main
from onnxcompress.graph.model_io import load_model
from onnxcompress.passes import REGISTRY, register
from onnxcompress.pipeline.report import PLOT_FILES, REPORT_JSON, REPORT_MD, format_markdown

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "digits_resnet.onnx"
VALIDATION = "digits[1400:]"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

RECIPE_WITH_FINETUNE = f"""
description = "test: halve, fine-tune briefly"
seed = 0

[data]
calibration = "digits[:300]"
train = "digits[:300]"
validation = "{VALIDATION}"

[budget]
target_macs = 0.5
max_drop = 10.0

[[step]]
pass = "lrf"
criterion = "activations"
target_macs = 0.5

[[step]]
finetune = {{ epochs = 1, lr = 0.005, batch_size = 64 }}
"""


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def finetuned_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """One recipe run with a fine-tuning step and a report, shared by the tests below."""
    folder = tmp_path_factory.mktemp("run")
    recipe = folder / "recipe.toml"
    recipe.write_text(RECIPE_WITH_FINETUNE)
    out = folder / "small.onnx"
    report = folder / "report"
    code = main(
        ["compress", str(DEMO), "-o", str(out), "--recipe", str(recipe), "--report", str(report)]
    )
    assert code == 0
    return out, report, json.loads((report / REPORT_JSON).read_text())


def test_recipe_with_finetune_writes_a_complete_report(finetuned_run) -> None:
    out, report, payload = finetuned_run
    assert [step["name"] for step in payload["steps"]] == ["canonicalize", "lrf", "finetune"]
    assert payload["kept_step"] == 2 and payload["stopped"] is None
    finetune = payload["steps"][2]
    assert finetune["report"]["summary"]["history"][-1]["epoch"] == 1
    assert 0 < finetune["report"]["summary"]["history"][-1]["images"] <= 300
    # every step went through the gate, against the original on the validation data
    for step in payload["steps"]:
        verification = step["verification"]
        assert verification["checker_ok"] and verification["session_ok"]
        assert verification["deviation"]["samples"] == 256
        assert verification["deviation"]["top1_agreement"] is not None
    assert payload["steps"][0]["verification"]["deviation"]["max_rel"] < 1e-4
    # the finetune step trained: the weights moved, the structure did not
    lrf_metrics, ft_metrics = payload["steps"][1]["metrics"], payload["steps"][2]["metrics"]
    assert (
        ft_metrics["macs"] == lrf_metrics["macs"] and ft_metrics["params"] == lrf_metrics["params"]
    )
    assert (
        payload["steps"][2]["verification"]["deviation"]["max_abs"]
        != payload["steps"][1]["verification"]["deviation"]["max_abs"]
    )
    # stage checks sit on the steps that end a stage (not on the lrf the finetune follows)
    assert payload["steps"][1]["budget"] is None and payload["steps"][2]["budget"] is not None
    assert payload["budget_check"]["targets_met"]
    names = {path.name for path in report.iterdir()}
    assert {REPORT_JSON, REPORT_MD, *PLOT_FILES.values()} <= names
    for plot in PLOT_FILES.values():
        data = (report / plot).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, plot
    latency = payload["latency"]
    assert sorted((row["label"], row["batch"]) for row in latency) == [
        ("compressed", 1),
        ("compressed", 32),
        ("original", 1),
        ("original", 32),
    ]
    assert all(row["p50_ms"] > 0 for row in latency)
    # per-layer changes: some layer lost channels, none gained
    changed = [row for row in payload["layers"] if row["channels_after"] != row["channels_before"]]
    assert changed and all(row["channels_after"] < row["channels_before"] for row in changed)
    assert sum(row["macs_after"] for row in payload["layers"]) == payload["compressed"]["macs"]
    # provenance lists the steps that made the file
    recipe = json.loads(load_model(out).metadata_props["onnxcompress.recipe"])
    assert recipe[2] == {"finetune": {"epochs": 1, "lr": 0.005, "batch_size": 64}}


def test_report_numbers_equal_inspect_and_eval_on_the_output(finetuned_run, capsys) -> None:
    out, _, payload = finetuned_run
    code, stdout, err = run_cli(["inspect", str(out), "--json"], capsys)
    assert code == 0, err
    inspected = json.loads(stdout)
    assert payload["compressed"]["params"] == inspected["params"]
    assert payload["compressed"]["macs"] == inspected["macs"]
    assert payload["compressed"]["file_size"] == out.stat().st_size
    code, stdout, err = run_cli(["eval", str(out), "--data", VALIDATION, "--json"], capsys)
    assert code == 0, err
    evaluated = json.loads(stdout)
    assert payload["accuracy_after"]["top1"] == evaluated["top1"]
    assert payload["accuracy_after"]["samples"] == evaluated["samples"] == 397
    code, stdout, _ = run_cli(["eval", str(DEMO), "--data", VALIDATION, "--json"], capsys)
    assert payload["accuracy_before"]["top1"] == json.loads(stdout)["top1"]
    # the Markdown table shows those same numbers
    markdown = (finetuned_run[1] / REPORT_MD).read_text()
    assert f"| params | {payload['original']['params']:,} | {inspected['params']:,} |" in markdown
    assert f"{evaluated['top1']:.2f}%" in markdown
    assert "latency p50, batch 32" in markdown


def test_report_command_re_renders_from_the_json(finetuned_run, capsys) -> None:
    _, report, payload = finetuned_run
    markdown = (report / REPORT_MD).read_text()
    for name in (REPORT_MD, *PLOT_FILES.values()):
        (report / name).unlink()
    code, _, err = run_cli(["report", str(report)], capsys)
    assert code == 0, err
    assert (report / REPORT_MD).read_text() == markdown
    for plot in PLOT_FILES.values():
        assert (report / plot).read_bytes().startswith(PNG_MAGIC)
    assert format_markdown(payload) == markdown
    code, _, err = run_cli(["report", str(report / "nowhere")], capsys)
    assert code == 2 and "compress --report" in err


def test_max_drop_stops_at_the_first_broken_stage_and_keeps_the_best(
    tmp_path: Path, capsys
) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(
        f"""
[data]
calibration = "digits[:500]"
validation = "{VALIDATION}"
[budget]
max_drop = 3.0
[[step]]
pass = "lrf"
criterion = "activations"
target_macs = 0.8
[[step]]
pass = "lrf"
criterion = "weights"
target_macs = 0.1
round_to = 1
[[step]]
pass = "lrf"
target_macs = 0.9
"""
    )
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(
        ["compress", str(DEMO), "-o", str(out), "--recipe", str(recipe), "--json"], capsys
    )
    assert code == 0, err
    payload = json.loads(stdout)
    steps = payload["steps"]
    # the tenth-of-the-MACs step broke the budget; the third never ran
    assert [s["name"] for s in steps] == ["canonicalize", "lrf", "lrf"]
    before = payload["accuracy_before"]["top1"]
    assert before - steps[1]["metrics"]["accuracy"]["top1"] <= 3.0
    assert before - steps[2]["metrics"]["accuracy"]["top1"] > 3.0
    assert steps[2]["budget"]["broken"]
    assert payload["kept_step"] == 1 and "step 2 (lrf) broke the budget" in payload["stopped"]
    # what was written is the model after step 1, with step 1's numbers
    assert payload["after"]["macs"] == steps[1]["metrics"]["macs"]
    assert payload["accuracy_after"] == steps[1]["metrics"]["accuracy"]
    provenance = json.loads(load_model(out).metadata_props["onnxcompress.recipe"])
    assert [item.get("pass") for item in provenance] == ["canonicalize", "lrf"]


def test_targets_met_early_skip_the_remaining_steps(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(
        [
            "compress",
            str(DEMO),
            "-o",
            str(out),
            "--pass",
            "lrf:target_macs=0.7",
            "--pass",
            "lrf:target_macs=0.5",
            "--target-macs",
            "0.75",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert [s["name"] for s in payload["steps"]] == ["canonicalize", "lrf"]
    assert "every target met" in payload["stopped"]


def test_latency_budget_is_measured_against_the_original(tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    code, stdout, err = run_cli(
        [
            "compress",
            str(DEMO),
            "-o",
            str(out),
            "--recipe",
            "fast-halving",
            "--target-latency",
            "1.0",
            "--latency-batch",
            "8",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    payload = json.loads(stdout)
    metrics = payload["steps"][-1]["metrics"]
    assert metrics["latency_ms"] > 0 and metrics["latency_original_ms"] > 0
    ratio = payload["budget_check"]["ratios"]["latency"]
    assert ratio == pytest.approx(metrics["latency_ms"] / metrics["latency_original_ms"])
    assert payload["recipe"]["latency"]["batch"] == 8


def test_a_step_that_breaks_the_model_stops_with_no_output(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    from onnxcompress.passes.lrf import LinearlyReplaceableFilters

    def corrupt(self, model, report):
        conv = next(node for node in model.graph if node.op_type == "Conv")
        conv.op_type = "NoSuchOp"
        report.modified = True

    monkeypatch.setattr(LinearlyReplaceableFilters, "run", corrupt)
    out = tmp_path / "out.onnx"
    report = tmp_path / "report"
    code, _, err = run_cli(
        [
            "compress",
            str(DEMO),
            "-o",
            str(out),
            "--recipe",
            "fast-halving",
            "--report",
            str(report),
        ],
        capsys,
    )
    assert code == 2
    assert "step 'lrf'" in err and "onnx.checker" in err
    assert not out.exists() and not report.exists()
    assert list(tmp_path.iterdir()) == []


def latency_only_run(tmp_path: Path, capsys, step: str) -> dict:
    """``compress`` with one step under a latency-only budget; the JSON it prints."""
    code, stdout, err = run_cli(
        [
            "compress",
            str(DEMO),
            "-o",
            str(tmp_path / "out.onnx"),
            "--pass",
            step,
            "--target-latency",
            "0.8",
            "--latency-batch",
            "16",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    return json.loads(stdout)


def test_latency_only_budget_is_planned_by_lrf_in_one_pass(tmp_path: Path, capsys) -> None:
    """lrf prices channels with a latency model and plans a latency target itself: no search
    over MAC fractions, and the console says what was predicted and what was measured."""
    payload = latency_only_run(tmp_path, capsys, "lrf:criterion=weights")
    lrf = payload["steps"][1]
    summary = lrf["report"]["summary"]
    assert "latency_search" not in summary
    assert lrf["report"]["options"]["target_latency"] == 0.8
    latency = summary["latency"]
    assert latency["target"]["batch"] == 16 and latency["model"]["convs"] > 0
    assert latency["rounds"] and {"predicted_ratio", "measured_ratio"} <= set(latency["rounds"][0])
    assert any(note.startswith("latency: predicted") for note in lrf["report"]["notes"])
    assert payload["after"]["macs"] < payload["before"]["macs"]
    assert "latency" in payload["budget_check"]["ratios"]


MACS_ONLY_LRF = """
from onnxcompress.passes.lrf import LinearlyReplaceableFilters


class MacsOnlyLrf(LinearlyReplaceableFilters):
    budget_options = ("target_macs", "target_params", "ratio")
"""


@pytest.fixture
def macs_only_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """lrf as a pass that can aim at MACs only, as resect does: what the latency search is for."""
    package = tmp_path / "macs_only_passes"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "lrf_macs_only.py").write_text(MACS_ONLY_LRF)
    monkeypatch.syspath_prepend(str(tmp_path))
    register("lrf-macs-only", "macs_only_passes.lrf_macs_only:MacsOnlyLrf", "MACs-only lrf")
    try:
        yield "lrf-macs-only"
    finally:
        REGISTRY.pop("lrf-macs-only", None)


def test_latency_only_budget_searches_a_macs_only_pass(
    tmp_path: Path, capsys, macs_only_pass: str
) -> None:
    payload = latency_only_run(tmp_path, capsys, f"{macs_only_pass}:criterion=weights")
    step = payload["steps"][1]
    tries = step["report"]["summary"]["latency_search"]
    assert 1 <= len(tries) <= 4
    # the kept try is one of the tries, and the written model is what that try produced
    chosen = step["report"]["options"]["target_macs"]
    assert chosen in [t["target_macs"] for t in tries] or any(
        abs(chosen - t["target_macs"]) < 1e-3 for t in tries
    )
    assert payload["after"]["macs"] < payload["before"]["macs"]
    assert "latency" in payload["budget_check"]["ratios"]
