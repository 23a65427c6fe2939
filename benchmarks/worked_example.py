"""Worked example for the README: one recipe takes CIFAR-10 ResNet-20 to a smaller model + report.

Writes the recipe (with ``../shared`` paths filled in), runs ``onnxcompress compress --recipe ...
--report ...`` through the real CLI, then checks the report against ``inspect`` and ``eval`` on
the written file, and writes ``benchmarks/results/worked_example/`` (recipe, report, plots,
``worked_example.md`` with the command and the before/after table).

    flock /tmp/onnxcompress_heavy.lock .venv/bin/python benchmarks/worked_example.py
    .venv/bin/python benchmarks/worked_example.py --quick     # a tiny smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    DEFAULT_SHARED,
    REPO_ROOT,
    cifar10_spec,
    cifar10_train_spec,
    load_text,
    machine_state,
    resnet20_path,
    setup_logging,
)

from onnxcompress.cli import main as cli_main
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model
from onnxcompress.pipeline.report import REPORT_JSON, summary_rows
from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

logger = logging.getLogger("worked_example")

NAME = "worked_example"
# Fine-tuning wall-clock budget per stage: the whole example stays under ~15 minutes on the
# shared 2-core machine (loading the training split, evaluations and the report included).
FINETUNE_SECONDS = 210
QUICK_FINETUNE_SECONDS = 20

STAGES = 2
STAGE_CUT = 0.8

RECIPE_HEADER = """\
# CIFAR-10 ResNet-20: as few MACs as the accuracy budget allows. Each stage removes a fifth of
# the remaining MACs with lrf (activation fits on 1,000 calibration images), then distills
# from the original on the training split for a fixed time. The run stops at the first stage
# whose top-1 falls more than {max_drop:g} points below the original's and writes the last
# stage that stayed within.
description = "ResNet-20 on CIFAR-10: fewest MACs within {max_drop:g} points of top-1"
seed = 0

[data]
calibration = "{calibration}"
calibration_size = {calibration_size}
train = "{train}"
validation = "{validation}"

[budget]
max_drop = {max_drop:g}
"""

RECIPE_STAGE = """
[[step]]
pass = "lrf"
criterion = "activations"
target_macs = {cut}

[[step]]
[step.finetune]
epochs = {epochs}
lr = 0.01
epoch_samples = {epoch_samples}
time_budget_s = {seconds}
"""


def shown(path: Path) -> str:
    """A path as the README shows it: relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--quick", action="store_true", help="tiny data and budget (smoke test)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)
    model = resnet20_path(args.shared)
    if not model.exists():
        print(f"{model} not found: this example needs ../shared", file=sys.stderr)
        return 2
    quick = args.quick
    out_dir = args.results / (f"{NAME}_quick" if quick else NAME)
    out_dir.mkdir(parents=True, exist_ok=True)
    recipe_path = out_dir / "recipe.toml"
    header = RECIPE_HEADER.format(
        calibration=cifar10_spec(args.shared, "0:20" if quick else "0:100"),
        calibration_size=200 if quick else 1000,
        train=cifar10_train_spec(args.shared, "0:30" if quick else None),
        # Budget decisions (max_drop) are taken on the calibration half, on files the lrf fits
        # never saw; the evaluation half is kept for the final number only (data/README.md).
        validation=cifar10_spec(args.shared, "100:130" if quick else "100:500"),
        max_drop=2.0,
    )
    stage = RECIPE_STAGE.format(
        cut=STAGE_CUT,
        epochs=1 if quick else 2,
        epoch_samples=300 if quick else 12000,
        seconds=QUICK_FINETUNE_SECONDS if quick else FINETUNE_SECONDS,
    )
    recipe_path.write_text(header + stage * STAGES)
    state_before = machine_state()
    report_dir = out_dir / "report"
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "resnet20_small.onnx"
        argv = [
            "compress",
            str(model),
            "-o",
            str(output),
            "--recipe",
            str(recipe_path),
            "--report",
            str(report_dir),
            "--force",
        ]
        start = time.perf_counter()
        code = cli_main(argv)
        seconds = time.perf_counter() - start
        if code != 0:
            print(f"compress failed with exit code {code}", file=sys.stderr)
            return code
        payload = json.loads((report_dir / REPORT_JSON).read_text())
        checks = check_against_file(payload, output)
        held_out = cifar10_spec(args.shared, "500:530" if quick else "500:1000")
        evaluation = {
            name: accuracy(path, dataset_for_model(load_model(path), held_out)).top1
            for name, path in (("original", model), ("compressed", output))
        }
    state_after = machine_state()
    shown_command = (
        "onnxcompress compress resnet20_cifar10.onnx -o resnet20_small.onnx "
        f"--recipe {shown(recipe_path)} --report {shown(report_dir)}"
    )
    markdown = render(payload, recipe_path, shown_command, report_dir, checks, seconds)
    markdown += (
        "\nTop-1 on the evaluation half (files 0500-0999 of every class, used for no decision): "
        f"original {evaluation['original']:.2f}%, compressed {evaluation['compressed']:.2f}% "
        f"({evaluation['compressed'] - evaluation['original']:+.2f} points). The table's "
        "accuracy is the recipe's validation data (calibration half, files 0100-0499).\n"
    )
    markdown += (
        f"\nConditions: {load_text(state_before)} at the start, {load_text(state_after)} at the "
        "end (other jobs may share the machine).\n\nReproduce: `flock /tmp/onnxcompress_heavy.lock "
        f".venv/bin/python benchmarks/worked_example.py{' --quick' if quick else ''}`\n"
    )
    (out_dir / f"{NAME}.md").write_text(markdown)
    (out_dir / f"{NAME}.json").write_text(
        json.dumps(
            {
                "command": shown_command,
                "seconds": round(seconds, 1),
                "checks": checks,
                "evaluation_half_top1": evaluation,
                "summary": summary_rows(payload),
                "machine": {"start": state_before, "end": state_after},
            },
            indent=2,
        )
        + "\n"
    )
    print(markdown)
    return 0 if all(check["equal"] for check in checks) else 1


def check_against_file(payload: dict, output: Path) -> list[dict]:
    """The report's numbers against what ``inspect`` and ``eval`` say about the written file."""
    written = load_model(output)
    canonicalize(written)  # what `onnxcompress inspect` does
    metrics = model_metrics(written)
    checks = [
        {"what": "params", "report": payload["compressed"]["params"], "file": metrics.params},
        {"what": "MACs", "report": payload["compressed"]["macs"], "file": metrics.macs},
    ]
    validation = payload["data"]["validation"]
    if validation and payload.get("accuracy_after"):
        measured = accuracy(output, dataset_for_model(load_model(output), validation)).top1
        checks.append(
            {"what": "top-1", "report": payload["accuracy_after"]["top1"], "file": measured}
        )
    for check in checks:
        check["equal"] = abs(float(check["report"]) - float(check["file"])) < 1e-9
    return checks


def render(
    payload: dict,
    recipe_path: Path,
    command: str,
    report_dir: Path,
    checks: list[dict],
    seconds: float,
) -> str:
    rows = summary_rows(payload)
    table = ["|  | original | compressed | after/before |", "|---|---:|---:|---:|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    plot = report_dir / "accuracy_vs_macs.png"
    lines = [
        "# Worked example: CIFAR-10 ResNet-20 with a recipe",
        "",
        f"Recipe (`{shown(recipe_path)}`):",
        "",
        "```toml",
        recipe_path.read_text().rstrip(),
        "```",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "Result (report.md's table):",
        "",
        *table,
        "",
    ]
    if payload.get("stopped"):
        lines += [f"Budget: {payload['stopped']}", ""]
    missed = (payload.get("budget_check") or {}).get("missed")
    if missed:
        lines += [f"Budget targets not met: {'; '.join(missed)}", ""]
    lines += [
        f"Whole run (CLI, report included): {seconds / 60:.1f} min. The report's numbers against "
        "`inspect` and `eval` on the written file: "
        + ", ".join(
            f"{c['what']} {'equal' if c['equal'] else 'DIFFERENT'} ({c['report']} vs {c['file']})"
            for c in checks
        ),
        "",
        f"![accuracy vs MACs]({plot.relative_to(report_dir.parent)})" if plot.exists() else "",
        "",
        f"Full report: `{shown(report_dir)}/report.md` (plots beside it).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
