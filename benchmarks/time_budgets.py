"""Time budgets: wall time of each training step against its ``time_budget_s``, on ResNet-20.

The claim (issue 17, "time budgets are promises"): a step given ``time_budget_s`` takes at most
``1.1 x budget + 10 s`` of wall time, data loading, init fits, ranking, training, scoring and
the final evaluation included, for every training pass at every budget; a budget too short for
a step's minimum work is refused before that work starts (exit code 2, one line).

Each (step, budget) runs in a fresh process through ``onnxcompress.pipeline.run.compress``, the
path ``onnxcompress compress`` takes: the pretrained ResNet-20, calibration on 512 images of
the calibration half of CIFAR-10's test split (files 0000-0499 of every class), the passes'
validation on that half (``--val-data``), training on the training split. Steps:

``resect``       ``target_macs=0.7, kinds=branch;block, epoch_samples=10000, final_epochs=12,
                 max_drop=8`` (the settings of ``benchmarks/resect.py``)
``cheapconv``    ``kind=separable, batchnorm=true, epochs=1000`` (the clock ends training)
``lct-sparse``   ``schedule=gradual, sparsity=0.8, sensitivity=true`` (as ``lct_sparse_gradual3``)
``lct-lowrank``  ``target_macs=0.6, round_to=8, sensitivity=true`` (staged, as ``lct_lowrank``)
``finetune``     a ``finetune`` step (``epochs=1000``) after ``lrf target_macs=0.5
                 criterion=weights``, timed alone

The wall time judged is the step's as the pipeline records it (``StepRecord.seconds``: the pass,
or the finetune step with its training-data load, plus the verification and validation after
it); the table also gives the whole ``compress`` call (loading the model and the calibration
and validation data, canonicalization) and the child process. Accuracy (top-1 on the
evaluation half, files 0500-0999) is measured after the timing, for orientation only.

    flock /tmp/onnxcompress_heavy.lock .venv/bin/python benchmarks/time_budgets.py
    .venv/bin/python benchmarks/time_budgets.py --device cuda --budgets 30,60,120
    .venv/bin/python benchmarks/time_budgets.py --passes cheapconv,finetune --budgets 30
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    DEFAULT_SHARED,
    cifar10_spec,
    cifar10_train_spec,
    command_line,
    load_text,
    machine_state,
    markdown_table,
    resnet20_path,
    setup_logging,
    write_results,
)

logger = logging.getLogger("time_budgets")

NAME = "time_budgets"
# The step under test: (pipeline steps before it, untimed by the judgement; the step itself).
STEPS: dict[str, tuple[list[tuple[str, dict[str, Any]]], tuple[str, dict[str, Any]]]] = {
    "resect": (
        [],
        (
            "resect",
            {
                "target_macs": 0.7,
                "kinds": "branch;block",
                "epoch_samples": 10000,
                "final_epochs": 12,
                "max_drop": 8.0,
            },
        ),
    ),
    "cheapconv": (
        [],
        ("cheapconv", {"kind": "separable", "batchnorm": True, "epochs": 1000}),
    ),
    "lct-sparse": (
        [],
        (
            "lct",
            {
                "subspace": "sparse",
                "schedule": "gradual",
                "sparsity": 0.8,
                "lr": 0.005,
                "slack": 0.5,
                "checks": 20,
                "sensitivity": True,
                "sensitivity_samples": 500,
            },
        ),
    ),
    "lct-lowrank": (
        [],
        (
            "lct",
            {
                "subspace": "lowrank",
                "target_macs": 0.6,
                "round_to": 8,
                "max_drop": 1.5,
                "epochs_per_stage": 2,
                "sensitivity": True,
                "sensitivity_samples": 500,
            },
        ),
    ),
    "finetune": (
        [("lrf", {"target_macs": 0.5, "criterion": "weights"})],
        ("finetune", {"epochs": 1000}),
    ),
}
CALIBRATION = 512
SLACK_FACTOR = 1.1
SLACK_SECONDS = 10.0


def target_seconds(budget: float) -> float:
    return SLACK_FACTOR * budget + SLACK_SECONDS


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one) and the cores this process sees."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def device_name(device: str | None) -> str:
    if device is None or not device.startswith("cuda"):
        return f"CPU ({cpu_name()})"
    import torch

    index = int(device.split(":")[1]) if ":" in device else 0
    return f"{torch.cuda.get_device_name(index)} (host CPU: {cpu_name()})"


# ---------------------------------------------------------------------------------------------
# One run, in a child process
# ---------------------------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    """Compress once with the step ``args.child`` at ``args.budget`` and write what happened."""
    import torch

    from onnxcompress.errors import OnnxCompressError
    from onnxcompress.graph.model_io import load_model
    from onnxcompress.pipeline.run import compress
    from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

    if args.threads:
        torch.set_num_threads(args.threads)
    before, (name, options) = STEPS[args.child]
    options = {**options, "time_budget_s": args.budget}
    if args.device:
        options["device"] = args.device
    steps = [*before, (name, options)]
    teacher = resnet20_path(args.shared)
    output = args.work_dir / f"{args.child}_{args.budget:g}.onnx"
    # The step under test starts where the one before it ended (the pipeline prints each
    # step's result line; a finetune step loads its training data before it says "running"),
    # and an error (a refusal) ends it.
    marks: dict[str, float] = {}

    def log(message: str) -> None:
        if message.startswith("  ") and ": params " in message:
            marks["step_start"] = time.monotonic()
        logger.info(message)

    record: dict[str, Any] = {"step": args.child, "pass": name, "budget_s": args.budget}
    record["options"] = options
    started = time.monotonic()
    try:
        result = compress(
            teacher,
            output,
            steps,
            data=cifar10_spec(args.shared, "0:500"),
            calibration_size=CALIBRATION,
            eval_data=cifar10_spec(args.shared, f"0:{args.val_per_class}"),
            train_data=cifar10_train_spec(args.shared),
            force=True,
            seed=args.seed,
            log=log,
        )
    except OnnxCompressError as exc:
        ended = time.monotonic()
        record.update(
            outcome="refused",
            error=f"{type(exc).__name__}: {exc}",
            step_seconds=round(ended - marks.get("step_start", started), 2),
            compress_seconds=round(ended - started, 2),
        )
    else:
        record["compress_seconds"] = round(time.monotonic() - started, 2)
        step = result.steps[-1]
        report = step.report
        summary = report.get("summary", {})
        record.update(
            outcome="ran",
            step_seconds=step.seconds,
            pass_seconds=report.get("seconds"),
            time=summary.get("time"),
            stopped=summary.get("stopped"),
            init_shortened=_init_brief(summary.get("init_shortened")),
            sensitivity=summary.get("sensitivity"),
            training=_training_brief(name, summary),
            runs=_runs(name, report),
            modified=report.get("modified"),
            warnings=report.get("warnings", []),
        )
        evaluation = dataset_for_model(teacher, cifar10_spec(args.shared, "500:1000"))
        record["top1_eval"] = round(accuracy(load_model(output), evaluation).top1, 2)
    args.child_out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return 0


def _init_brief(shortened: dict[str, Any] | None) -> str | None:
    """cheapconv's init cut short by the budget, in a few words."""
    if not shortened:
        return None
    fewer = list(shortened.get("fewer_images", {}).values())
    text = f"{len(fewer)} layer(s) fitted on fewer images"
    if fewer:
        text += f" ({min(fewer)}-{max(fewer)})"
    return text + f", {len(shortened.get('closed_form', []))} kept the closed form"


def _runs(name: str, report: dict[str, Any]) -> list[str]:
    """Each training run of the step and its seconds, to see where a budget went."""
    summary = report.get("summary", {})

    def history(run: dict[str, Any]) -> str:
        epochs = [
            f"{r['seconds']:.0f}s" + (f"/{r['val_images']}img" if r.get("val_images") else "")
            for r in run.get("history", [])
        ]
        return f"{run.get('seconds', 0):.1f} s ({', '.join(epochs)})"

    if name == "finetune":
        return [history(summary)]
    if name == "cheapconv":
        training = summary.get("training", {})
        return [history(training)] if training.get("ran") else []
    if name == "lct":
        return [
            f"{r['stage']}/{r['attempt']}: {r['steps']} steps {r['seconds']} s"
            for r in summary.get("stages", [])
        ]
    if name == "resect":
        runs = []
        for layer in report.get("layers", []):
            for key in ("layer_learning", "overall_learning"):
                run = layer.get(key)
                if run is not None:
                    runs.append(f"stage {layer['stage']} {key}: {run.get('seconds', run)}")
        final = summary.get("final_learning")
        if final:
            runs.append(f"final: {final.get('seconds', final)}")
        return runs
    return []


def _training_brief(name: str, summary: dict[str, Any]) -> str:
    """What training ran, in a few words, from the step's summary."""
    if name == "finetune":
        epochs = len(summary.get("history", [])) - 1
        return f"{epochs} epoch(s), out of time: {summary.get('out_of_time')}"
    if name == "cheapconv":
        training = summary.get("training", {})
        if not training.get("ran"):
            return f"not trained: {training.get('reason', '')}"
        return f"{len(training.get('history', [])) - 1} epoch(s)"
    if name == "lct":
        stages = summary.get("stages", [])
        return f"{len(stages)} attempt record(s)"
    if name == "resect":
        final = summary.get("final_learning", {})
        accepted = summary.get("stages_accepted")
        return f"{accepted} stage(s) kept, final: {final.get('epochs', final.get('skipped', '-'))}"
    return ""


# ---------------------------------------------------------------------------------------------
# The parent: every step at every budget, one at a time
# ---------------------------------------------------------------------------------------------


def run_one(args: argparse.Namespace, step: str, budget: float) -> dict[str, Any]:
    out = args.work_dir / f"{step}_{budget:g}.json"
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        step,
        "--budget",
        str(budget),
        "--child-out",
        str(out),
        "--shared",
        str(args.shared),
        "--work-dir",
        str(args.work_dir),
        "--val-per-class",
        str(args.val_per_class),
        "--seed",
        str(args.seed),
    ]
    if args.device:
        command += ["--device", args.device]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.verbose:
        command.append("-v")
    tic = time.monotonic()
    completed = subprocess.run(command, check=False)
    process_seconds = time.monotonic() - tic
    if completed.returncode != 0 or not out.exists():
        return {
            "step": step,
            "budget_s": budget,
            "outcome": f"crashed (exit {completed.returncode})",
            "process_seconds": round(process_seconds, 1),
        }
    record: dict[str, Any] = json.loads(out.read_text())
    record["process_seconds"] = round(process_seconds, 1)
    wall = float(record["step_seconds"])
    record["ratio"] = round(wall / budget, 3)
    record["target_s"] = round(target_seconds(budget), 1)
    record["met"] = wall <= target_seconds(budget)
    return record


def phases_text(record: dict[str, Any]) -> str:
    time_report = record.get("time") or {}
    phases = time_report.get("phases_s") or {}
    return ", ".join(f"{name} {seconds:.0f}" for name, seconds in phases.items()) or "-"


def render(records: list[dict[str, Any]], args: argparse.Namespace, state: dict[str, Any]) -> str:
    rows = []
    for r in records:
        wall = r.get("step_seconds")
        rows.append(
            [
                r["step"],
                f"{r['budget_s']:g}",
                "-" if wall is None else f"{wall:.1f}",
                "-" if wall is None else f"{r['ratio']:.2f}",
                r.get("target_s", "-"),
                "yes" if r.get("met") else "NO",
                r["outcome"],
                "-" if r.get("compress_seconds") is None else f"{r['compress_seconds']:.1f}",
                f"{r['process_seconds']:.1f}",
                "-" if r.get("top1_eval") is None else f"{r['top1_eval']:.2f}",
            ]
        )
    table = markdown_table(
        [
            "step",
            "budget (s)",
            "step wall (s)",
            "wall / budget",
            "target (s)",
            "met",
            "outcome",
            "compress() (s)",
            "process (s)",
            "top-1 (%)",
        ],
        rows,
    )
    details = []
    for r in records:
        lines = [f"- **{r['step']} @ {r['budget_s']:g} s**: {r['outcome']}"]
        if r.get("error"):
            lines.append(f"  - {r['error']}")
        if r.get("time"):
            spent = r["time"].get("spent_s")
            lines.append(f"  - pass clock: {spent:.1f} s spent; phases (s): {phases_text(r)}")
        for key in ("training", "runs", "stopped", "init_shortened", "sensitivity"):
            if r.get(key):
                lines.append(f"  - {key}: {r[key]}")
        details.append("\n".join(lines))
    met = sum(1 for r in records if r.get("met"))
    return f"""# Time budgets: wall time of each training step against ``time_budget_s``

ResNet-20 on CIFAR-10 (JPEG), each step in a fresh process through
`onnxcompress.pipeline.compress` on {device_name(args.device)}.
Target: step wall <= {SLACK_FACTOR} x budget + {SLACK_SECONDS:g} s.
**{met} of {len(records)} runs met it.**

Step wall: the step as the pipeline times it (`StepRecord.seconds`: the pass with its own data
loading, or the finetune step with its training-data load, then the pipeline's verification and
validation of its output); compress(): the whole call (model, calibration and validation data,
canonicalization, earlier steps); process: the child process, imports included. A refused run
ended with the step's one-line error (exit code 2 on the command line); its wall is the time to
that error. Top-1 on the evaluation half (files 0500-0999), measured after the timing.

{table}

## Per run

{chr(10).join(details)}

## Settings

Calibration: {CALIBRATION} images spread over the calibration half (files 0000-0499 of every
class); passes validate on files 0000-{args.val_per_class - 1:04d} of every test class
(`--val-data`); training on the training split (50,000 images). Step options: see the module
docstring of `benchmarks/time_budgets.py` (`time_budget_s` added to each); torch threads:
{args.threads or "torch's default"}.

Conditions: {load_text(state["before"])} at the start, {load_text(state["after"])} at the end.

Reproduce: `{command_line()}`
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--budgets", default="30,60,120", help="seconds, comma-separated")
    parser.add_argument(
        "--passes", default=",".join(STEPS), help=f"steps, comma-separated: {', '.join(STEPS)}"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: auto)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's own)"
    )
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=500,
        help="validation images per class of the calibration half (500: all of it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default=NAME, help="results file stem")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.verbose:
        logger.setLevel(logging.INFO)
    if args.work_dir is None:
        args.work_dir = Path(tempfile.mkdtemp(prefix="onnxcompress-time-budgets-"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        return run_child(args)

    if not resnet20_path(args.shared).exists():
        print(f"{resnet20_path(args.shared)} is absent: ../shared is needed", file=sys.stderr)
        return 2
    steps = [s.strip() for s in args.passes.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown step(s) {', '.join(unknown)}: choose among {', '.join(STEPS)}")
    budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    state = {"before": machine_state()}
    records: list[dict[str, Any]] = []
    for step in steps:
        for budget in budgets:
            print(f"{step} @ {budget:g} s ...", flush=True)
            record = run_one(args, step, budget)
            records.append(record)
            wall = record.get("step_seconds")
            shown = "-" if wall is None else f"{wall:.1f} s"
            print(
                f"  {record['outcome']}: step wall {shown} (target "
                f"{target_seconds(budget):.0f} s), process {record['process_seconds']} s",
                flush=True,
            )
    state["after"] = machine_state()
    markdown = render(records, args, state)
    payload = {
        "device": device_name(args.device),
        "records": records,
        "budgets": budgets,
        "steps": {name: STEPS[name] for name in steps},
        "machine_before": state["before"],
        "machine_after": state["after"],
        "command": command_line(),
    }
    path = write_results(args.out_dir, args.name, markdown, payload)
    print(markdown)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
