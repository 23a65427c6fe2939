"""Recipes: TOML parsing and checking, CLI overrides, budgets, shipped recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxcompress.cli import main
from onnxcompress.errors import PassConfigError
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model
from onnxcompress.pipeline.budget import Budget, LatencySettings, check_budget
from onnxcompress.pipeline.recipe import (
    DataSpecs,
    Step,
    find_recipe,
    load_recipe,
    parse_recipe,
    parse_step_flag,
    shipped_recipes,
    with_overrides,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "digits_resnet.onnx"

ISSUE_EXAMPLE = """
[data]
calibration = "digits[:500]"
train = "digits[:1400]"
validation = "digits[1400:]"

[budget]
target_macs = 0.5
max_drop = 1.0

[[step]]
pass = "lrf"
target_macs = 0.7
criterion = "activations"

[[step]]
finetune = { epochs = 3, lr = 0.01 }
"""


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_issue_example_parses() -> None:
    recipe = parse_recipe(ISSUE_EXAMPLE, "example.toml")
    assert recipe.data == DataSpecs("digits[:500]", "digits[:1400]", "digits[1400:]")
    assert recipe.budget == Budget(target_macs=0.5, max_drop=1.0)
    assert [s.name for s in recipe.steps] == ["lrf", "finetune"]
    assert recipe.steps[0].options == {"target_macs": 0.7, "criterion": "activations"}
    assert recipe.steps[1].options == {"epochs": 3, "lr": 0.01}
    assert recipe.steps[1].as_dict() == {"finetune": {"epochs": 3, "lr": 0.01}}


def test_finetune_written_as_a_sub_table_is_the_same_step() -> None:
    recipe = parse_recipe('[[step]]\n[step.finetune]\nepochs = 2\nteacher = "none"\n')
    assert recipe.steps == [Step("finetune", {"epochs": 2, "teacher": "none"})]


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("[budget]\ntarget_mac = 0.5\n", ["r.toml", "target_mac", "target_macs"]),
        ("[budget]\ntarget_macs = 1.5\n", ["target_macs=1.5", "(0, 1]"]),
        ("[budget]\nmax_drop = -1\n", ["max_drop"]),
        ("[budget]\nmax_drop = 'one'\n", ["max_drop", "number"]),
        ("[dta]\ncalibration = 'digits'\n", ["'dta'", "data"]),
        ("[data]\ncalibration = 5\n", ["[data] calibration", "spec"]),
        ("[data]\ncalibration_size = 0\n", ["calibration_size"]),
        ("[[step]]\npass = 'lrf'\ntarget = 0.5\n", ["step 1", "'target'", "target_macs"]),
        ("[[step]]\npass = 'nosuch'\n", ["step 1", "unknown pass 'nosuch'", "lrf"]),
        ("[[step]]\npass = 'lrf'\nfinetune = {epochs = 1}\n", ["step 1", "either"]),
        ("[[step]]\ncriterion = 'weights'\n", ["step 1", "either"]),
        ("[[step]]\nfinetune = {teacher = 'mine.onnx'}\n", ["teacher", "original"]),
        ("[[step]]\nfinetune = {select = 'best'}\n", ["select", "last"]),
        ("[[step]]\nfinetune = 3\n", ["finetune must be a table"]),
        ("[latency]\nbatch = 0\n", ["batch"]),
        ("seed = 'zero'\n", ["seed"]),
        ("[budget\n", ["not valid TOML"]),
    ],
)
def test_bad_recipes_name_the_file_and_the_key(text: str, fragments: list[str]) -> None:
    with pytest.raises(PassConfigError) as info:
        parse_recipe(text, "r.toml")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message


def test_a_recipe_is_data_nothing_in_it_runs(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    text = f"[[step]]\npass = \"__import__('os').system('touch {marker}')\"\n"
    with pytest.raises(PassConfigError, match="unknown pass"):
        parse_recipe(text)
    assert not marker.exists()


def test_shipped_recipes_parse_and_resolve_by_name() -> None:
    shipped = shipped_recipes()
    assert {"fast-halving", "accurate-halving", "max-compression-1pt"} <= set(shipped)
    for name, path in shipped.items():
        recipe = load_recipe(name)
        assert recipe.source == str(path)
        assert recipe.steps, name
        assert recipe.description
    fast = load_recipe("fast-halving")
    assert [s.name for s in fast.steps] == ["lrf"]
    assert fast.steps[0].options["criterion"] == "weights"  # data-free
    assert fast.data == DataSpecs()
    accurate = load_recipe("accurate-halving")
    assert [s.name for s in accurate.steps] == ["lrf", "finetune"]
    assert accurate.budget.max_drop == 1.0
    deep = load_recipe("max-compression-1pt")
    assert deep.budget.max_drop == 1.0 and not deep.budget.targets
    assert [s.name for s in deep.steps][:2] == ["lrf", "finetune"]
    assert find_recipe(str(shipped["fast-halving"])) == shipped["fast-halving"]
    with pytest.raises(PassConfigError, match="fast-halving"):
        find_recipe("no-such-recipe")


def test_flags_override_the_recipe_key_by_key() -> None:
    recipe = parse_recipe(ISSUE_EXAMPLE + "\n[latency]\nbatch = 4\nprovider = 'cpu'\n")
    merged = with_overrides(
        recipe,
        data=DataSpecs(calibration="digits[:100]"),
        budget=Budget(max_drop=2.0),
        latency={"batch": None, "threads": 1},
        seed=7,
    )
    assert merged.data == DataSpecs("digits[:100]", "digits[:1400]", "digits[1400:]")
    assert merged.budget == Budget(target_macs=0.5, max_drop=2.0)
    assert merged.latency == LatencySettings(provider="cpu", batch=4, threads=1)
    assert merged.seed == 7
    assert merged.steps == recipe.steps  # no step flags: the recipe's steps
    steps = [
        parse_step_flag("pass", "merge:target_macs=0.8"),
        parse_step_flag("finetune", "epochs=1"),
    ]
    replaced = with_overrides(recipe, steps=steps)
    assert [(s.name, s.options) for s in replaced.steps] == [
        ("merge", {"target_macs": "0.8"}),
        ("finetune", {"epochs": "1"}),
    ]


def test_budget_checks_targets_and_constraints() -> None:
    budget = Budget(target_macs=0.5, target_params=0.6, max_drop=1.0)
    met = check_budget(budget, macs_ratio=0.49, params_ratio=0.6, drop=0.5)
    assert met.targets_met and met.constraints_met
    assert met.ratios == {"macs": 0.49, "params": 0.6}
    short = check_budget(budget, macs_ratio=0.7, params_ratio=0.5, drop=1.5)
    assert len(short.missed) == 1 and "macs at 0.700" in short.missed[0]
    assert short.broken and "1.50 points" in short.broken[0]
    latency = check_budget(Budget(target_latency=0.8), macs_ratio=1, params_ratio=1)
    assert latency.missed == ["latency: not measured"]
    assert Budget().is_empty() and not budget.is_empty()
    assert Budget(target_macs=0.5).merged(Budget(target_params=0.4)).targets == {
        "target_macs": 0.5,
        "target_params": 0.4,
    }


def test_recipe_on_the_command_line_data_free(tmp_path: Path, capsys) -> None:
    out = tmp_path / "half.onnx"
    code, stdout, err = run_cli(
        ["compress", str(DEMO), "-o", str(out), "--recipe", "fast-halving", "--json"], capsys
    )
    assert code == 0, err
    payload = json.loads(stdout)
    assert [step["name"] for step in payload["steps"]] == ["canonicalize", "lrf"]
    written = load_model(out)
    macs = model_metrics(written).macs
    assert macs == payload["after"]["macs"]
    assert 0.45 <= macs / payload["before"]["macs"] <= 0.52
    assert payload["budget_check"]["targets_met"]
    assert written.metadata_props["onnxcompress.recipe_file"] == "fast-halving.toml"
    assert json.loads(written.metadata_props["onnxcompress.budget"])["target_macs"] == 0.5


def test_budget_flag_gives_a_pass_without_target_its_goal(tmp_path: Path, capsys) -> None:
    out = tmp_path / "small.onnx"
    code, stdout, err = run_cli(
        [
            "compress",
            str(DEMO),
            "-o",
            str(out),
            "--recipe",
            "fast-halving",
            "--pass",
            "lrf:criterion=weights,round_to=1",
            "--target-macs",
            "0.7",
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    payload = json.loads(stdout)
    lrf = payload["steps"][1]
    assert lrf["report"]["options"]["target_macs"] == pytest.approx(0.7)
    assert payload["budget"]["target_macs"] == 0.7
    assert 0.66 <= payload["after"]["macs"] / payload["before"]["macs"] <= 0.71


def test_bad_recipe_on_the_command_line_is_a_one_line_error(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[[step]]\npass = 'lrf'\ncriterion = 'nope'\n")
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(["compress", str(DEMO), "-o", str(out), "--recipe", str(recipe)], capsys)
    assert code == 2
    assert "bad.toml" in err and "criterion" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_max_drop_without_validation_data_fails_before_work(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.onnx"
    code, _, err = run_cli(
        ["compress", str(DEMO), "-o", str(out), "--pass", "lrf", "--max-drop", "1"], capsys
    )
    assert code == 2 and "--val-data" in err
    assert not out.exists()
