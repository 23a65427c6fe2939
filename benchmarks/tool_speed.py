"""How long the tool takes on a real-size network: torchvision ResNet-50 (25.6 M params) through
load -> canonicalize -> compress -> verify -> save (issue 3, "Speed of the tool": < 30 s).

Two measurements per pass, each in a fresh process so the numbers include Python start-up and
imports as a user sees them, and so that peak memory is that command's alone:

* end to end: ``onnxcompress compress resnet50.onnx -o out.onnx --pass PASS:target_macs=0.5``
  (which verifies after every step on 16 seeded random inputs);
* per stage, through the API: load, canonicalize, copy of the original (kept for verify),
  compress, verify on 4 random inputs, save.

Wall time, CPU time (user + system) and peak RSS come from ``os.wait4`` on that child, run
from a bare launcher process so the peak is the command's own. The
export of the model (torch, random weights, seeded) is done once beforehand and not counted.

    .venv/bin/python benchmarks/tool_speed.py                 # lrf and merge
    .venv/bin/python benchmarks/tool_speed.py --passes lrf --skip-cli
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

logger = logging.getLogger(__name__)

NAME = "tool_speed"
TARGET_SECONDS = 30.0
DEFAULT_OPTIONS = "target_macs=0.5,criterion=weights"


# A minimal launcher between this process and the measured command: a child's ru_maxrss starts
# from its parent's RSS at fork (Linux keeps the high-water mark across exec), and this script
# holds torch and the exported model, while the launcher holds a bare interpreter.
_LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
wall = time.perf_counter() - start
sys.stdout.flush()
print("RUSAGE " + json.dumps([wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss]))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_child(command: list[str]) -> dict[str, Any]:
    """Run ``command``; its wall time, CPU time, peak RSS, exit code and output.

    ``command[0]`` must be an absolute path (it is exec'd directly).
    """
    completed = subprocess.run(
        [sys.executable, "-S", "-c", _LAUNCHER, *command],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=harness.REPO_ROOT,
        check=False,
    )
    lines = completed.stdout.rstrip("\n").splitlines()
    if not lines or not lines[-1].startswith("RUSAGE "):
        raise RuntimeError(f"the launcher did not report: {completed.stdout[-2000:]}")
    wall, cpu, max_rss_kib = json.loads(lines[-1][len("RUSAGE ") :])
    return {
        "command": " ".join(command),
        "returncode": completed.returncode,
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "peak_rss_mib": max_rss_kib / 1024.0,  # Linux reports KiB
        "output": "\n".join(lines[:-1]),
    }


def cli_path() -> list[str]:
    """The ``onnxcompress`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "onnxcompress"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from onnxcompress.cli import main; sys.exit(main())"]


def measure_cli(model: Path, pass_name: str, options: str, work: Path) -> dict[str, Any]:
    output = work / f"cli-{pass_name}.onnx"
    output.unlink(missing_ok=True)
    command = [*cli_path(), "compress", str(model), "-o", str(output)]
    command += ["--pass", f"{pass_name}:{options}"]
    result = run_child(command)
    result["output_exists"] = output.exists()
    return result


def measure_api(model: Path, pass_name: str, options: str, work: Path) -> dict[str, Any]:
    output = work / f"api-{pass_name}.onnx"
    output.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker"]
    command += [str(model), pass_name, options, str(output)]
    result = run_child(command)
    stages: dict[str, Any] = {}
    for line in result["output"].splitlines():
        if line.startswith("STAGES "):
            stages = json.loads(line[len("STAGES ") :])
    result["stages"] = stages
    return result


def worker(model_path: str, pass_name: str, options: str, output: str) -> int:
    """Run the stages in this process and print their times as one ``STAGES {json}`` line."""
    start_all = time.perf_counter()
    stages: dict[str, float] = {}

    def timed(name: str, since: float) -> float:
        now = time.perf_counter()
        stages[name] = now - since
        return now

    t = time.perf_counter()
    from onnxcompress.graph.canonicalize import canonicalize
    from onnxcompress.graph.metrics import model_metrics
    from onnxcompress.graph.model_io import clone_model, load_model, save_model
    from onnxcompress.passes import create_pass, parse_pass_spec
    from onnxcompress.runtime.evaluate import verify

    t = timed("import", t)
    model = load_model(model_path)
    t = timed("load", t)
    canonicalize(model)
    t = timed("canonicalize", t)
    original = clone_model(model)
    t = timed("copy for verify", t)
    _, raw_options = parse_pass_spec(f"{pass_name}:{options}")
    compression = create_pass(pass_name, raw_options)
    compression(model)
    t = timed("compress", t)
    result = verify(original, model, samples=4, seed=0)
    t = timed("verify (4 inputs)", t)
    save_model(model, output)
    timed("save", t)
    before, after = model_metrics(original), model_metrics(model)
    info = {
        "stages": stages,
        "total": time.perf_counter() - start_all,
        "verify_ok": result.ok(),
        "max_rel_deviation": result.deviation.max_rel if result.deviation else None,
        "macs_ratio": after.macs / before.macs,
        "params_before": before.params,
        "params_ratio": after.params / before.params,
        "pass_seconds": compression.report.seconds,
    }
    print("STAGES " + json.dumps(info), flush=True)
    return 0


def run(args: argparse.Namespace) -> dict[str, Any]:
    from onnxcompress.passes import REGISTRY

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="tool-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    export_start = time.perf_counter()
    model = harness.export_torchvision("resnet50", work / "resnet50.onnx")
    print(f"resnet50 export: {time.perf_counter() - export_start:.1f} s (not counted)")
    rows = []
    for pass_name in args.passes:
        if pass_name not in REGISTRY:
            print(f"{pass_name}: not available (no pass registered under that name)")
            continue
        for kind in ("cli", "api"):
            if (kind == "cli" and args.skip_cli) or (kind == "api" and args.skip_api):
                continue
            state = harness.machine_state()
            measure = measure_cli if kind == "cli" else measure_api
            result = measure(model, pass_name, args.options, work)
            result.update(
                {
                    "pass": pass_name,
                    "kind": kind,
                    "options": args.options,
                    "load_before": state["load_average"],
                    "target_met": result["returncode"] == 0
                    and result["wall_seconds"] < TARGET_SECONDS,
                }
            )
            if result["returncode"] != 0:
                print(result["output"][-3000:])
            print(
                f"{pass_name} {kind}: {result['wall_seconds']:.1f} s wall, "
                f"{result['cpu_seconds']:.1f} s CPU, peak RSS {result['peak_rss_mib']:.0f} MiB, "
                f"exit {result['returncode']} ({harness.load_text(state)})",
                flush=True,
            )
            for stage, seconds in result.get("stages", {}).get("stages", {}).items():
                print(f"    {stage:<20} {seconds:8.2f} s")
            rows.append(result)
    return {
        "benchmark": NAME,
        "command": harness.command_line(),
        "model": "torchvision resnet50, random weights (seed 0), TorchScript export at 224",
        "target_seconds": TARGET_SECONDS,
        "rows": rows,
        "machine_after": harness.machine_state(),
    }


def to_markdown(result: dict[str, Any]) -> str:
    summary = []
    stage_rows: list[list[str]] = []
    for row in result["rows"]:
        summary.append(
            [
                f"{row['pass']} ({row['kind']})",
                row["options"],
                f"{row['wall_seconds']:.1f}",
                f"{row['cpu_seconds']:.1f}",
                f"{row['peak_rss_mib']:.0f}",
                f"{row['load_before'][0]:.1f}",
                "yes" if row["target_met"] else "**no**",
            ]
        )
        info = row.get("stages") or {}
        if info:
            stage_rows.extend(
                [f"{row['pass']}: {stage}", f"{seconds:.2f}"]
                for stage, seconds in info["stages"].items()
            )
            stage_rows.append(
                [
                    f"{row['pass']}: MACs kept / params kept / max rel. deviation",
                    f"{info['macs_ratio']:.3f} / {info['params_ratio']:.3f} / "
                    f"{info['max_rel_deviation']:.3g}",
                ]
            )
    met = all(row["target_met"] for row in result["rows"]) and bool(result["rows"])
    state = result["machine_after"]
    lines = [
        "# Speed of the tool: ResNet-50 (25.6 M params) load -> compress -> verify -> save",
        "",
        harness.markdown_table(
            ["run", "options", "wall s", "CPU s", "peak RSS MiB", "load", "< 30 s"], summary
        ),
        "",
        f"Target (< {result['target_seconds']:.0f} s wall per run): "
        + ("**met**." if met else "**not met**."),
        "",
        "cli: `onnxcompress compress resnet50.onnx -o out.onnx --pass PASS:OPTIONS` in a fresh "
        "process (verifies after canonicalize and after the pass on 16 random inputs); api: "
        "the stages below in a fresh process, verify on 4 random inputs. load: 1-minute load "
        "average when the run started (the machine is shared; CPU s is less sensitive to it).",
    ]
    if stage_rows:
        lines += ["", "Stages (api):", "", harness.markdown_table(["stage", "s"], stage_rows)]
    lines += ["", f"Command: `{result['command']}`; {harness.load_text(state)} at the end."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Wall time, CPU time and peak memory of load -> canonicalize -> compress -> "
        "verify -> save on torchvision ResNet-50, via the CLI and per stage via the API. "
        "Writes results/tool_speed.md/.json.",
    )
    parser.add_argument(
        "--passes",
        type=lambda text: text.split(","),
        default=["lrf", "merge"],
        help="comma-separated passes to time (default lrf,merge; unregistered ones are skipped)",
    )
    parser.add_argument(
        "--options",
        default=DEFAULT_OPTIONS,
        help=f"options given to every pass (default {DEFAULT_OPTIONS})",
    )
    parser.add_argument("--skip-cli", action="store_true", help="only the per-stage API run")
    parser.add_argument("--skip-api", action="store_true", help="only the CLI run")
    parser.add_argument(
        "--work-dir", default=None, help="where the models go (default: a temporary folder)"
    )
    parser.add_argument(
        "--out-dir",
        default=str(harness.DEFAULT_RESULTS),
        help="where to write tool_speed.md/.json (default benchmarks/results)",
    )
    parser.add_argument(
        "--worker",
        nargs=4,
        metavar=("MODEL", "PASS", "OPTIONS", "OUT"),
        help=argparse.SUPPRESS,  # the per-stage child process
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.setup_logging(args.verbose)
    if args.worker:
        return worker(*args.worker)
    result = run(args)
    for row in result["rows"]:
        row["output"] = row["output"][-2000:]  # the CLI's table, not a log
    markdown = to_markdown(result)
    harness.write_results(Path(args.out_dir), NAME, markdown, result)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
