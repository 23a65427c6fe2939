"""Prune, fine-tune, then quantize: the shared ResNet-20 at each step of the recipe (issue 19).

Every step runs through the command line as a user would:

1. ``compress --pass lrf:target_macs=0.5,criterion=activations`` (calibration half, 1,000 images);
2. ``finetune --epochs 3`` with its defaults on the CIFAR-10 training split (under torchrun);
3. ``compress --pass quantize`` (defaults: QDQ, per-channel int8 weights, uint8 activations,
   min-max ranges on 256 calibration images);

and, for comparison, ``quantize`` straight on the original and straight on the pruned model.
Each file is then scored on the evaluation half (top-1), counted (MACs, parameters, bytes) and
timed in ONNX Runtime side by side (all models in one process, runs interleaved, medians, one
thread by default), at batch 1 and 32.

Writes results/quantize_recipe.md/.json. Takes about 10 minutes on a 2-core CPU, most of it
the fine-tuning.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
from latency_priced import cpu_name
from recovery_anchor import cli

from onnxcompress.data import load_dataset
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model
from onnxcompress.runtime.bench import benchmark
from onnxcompress.runtime.evaluate import accuracy
from onnxcompress.runtime.vector_block import detect_isa

NAME = "quantize_recipe"
BATCHES = (1, 32)


def build(args: argparse.Namespace, work: Path) -> tuple[list[tuple[str, Path]], dict[str, float]]:
    """The recipe's files, in order, with a label each; and the seconds each command took."""
    teacher = harness.resnet20_path(args.shared)
    calibration = harness.cifar10_spec(args.shared, "0:100")
    pruned, tuned = work / "pruned.onnx", work / "finetuned.onnx"
    tuned_int8, pruned_int8, teacher_int8 = (
        work / "finetuned_int8.onnx",
        work / "pruned_int8.onnx",
        work / "original_int8.onnx",
    )
    seconds: dict[str, float] = {}

    def timed(label: str, *command: str, processes: int = 1) -> None:
        tic = time.perf_counter()
        cli(*command, processes=processes)
        seconds[label] = round(time.perf_counter() - tic, 1)

    timed(
        "prune",
        "compress", str(teacher), "-o", str(pruned), "--data", calibration,
        "--pass", "lrf:target_macs=0.5,criterion=activations", "--force", "--quiet",
    )  # fmt: skip
    timed(
        "finetune",
        "finetune", str(pruned), "--teacher", str(teacher),
        "--data", harness.cifar10_train_spec(args.shared),
        "--val", harness.cifar10_spec(args.shared, "0:500"),
        "-o", str(tuned), "--epochs", str(args.epochs), "--force",
        processes=args.processes,
    )  # fmt: skip
    for label, source, target in (
        ("quantize fine-tuned", tuned, tuned_int8),
        ("quantize pruned", pruned, pruned_int8),
        ("quantize original", teacher, teacher_int8),
    ):
        timed(
            label,
            "compress", str(source), "-o", str(target), "--data", calibration,
            "--pass", "quantize", "--force", "--quiet",
        )  # fmt: skip
    files = [
        ("fp32 original", teacher),
        ("pruned: `lrf:target_macs=0.5` (activations)", pruned),
        (f"fine-tuned: `finetune --epochs {args.epochs}` (defaults)", tuned),
        ("int8: `quantize` (defaults) of the fine-tuned model", tuned_int8),
        ("int8 of the pruned model, not fine-tuned", pruned_int8),
        ("int8 of the original, not pruned", teacher_int8),
    ]
    return files, seconds


def int8_dot_product() -> str:
    """The CPU's int8 dot-product instructions (VNNI), which ONNX Runtime's U8S8 kernels use."""
    try:
        flags = next(
            line.split(":", 1)[1].split()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        )
    except (OSError, StopIteration):
        return "unknown"
    found = [f for f in ("avx512_vnni", "avx_vnni") if f in flags]
    return ", ".join(found) or "none (no VNNI)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = args.work_dir
    work.mkdir(parents=True, exist_ok=True)
    files, seconds = build(args, work)
    evaluation = load_dataset(harness.cifar10_spec(args.shared, "500:1000"))
    rows = []
    for label, path in files:
        model = load_model(path)
        metrics = model_metrics(model)
        top1 = accuracy(model, evaluation).top1
        rows.append(
            {
                "step": label,
                "file": path.name,
                "top1": round(top1, 2),
                "macs": metrics.macs,
                "params": metrics.params,
                "file_bytes": path.stat().st_size,
            }
        )
        print(f"{label}: top-1 {top1:.2f}", flush=True)
    state = harness.machine_state()
    for batch in BATCHES:
        timings = benchmark(
            [path for _, path in files],
            provider="cpu",
            batches=[batch],
            threads=args.threads,
            runs=args.runs if batch == 1 else max(10, args.runs // 4),
            warmup=5,
        )
        for row, timing in zip(rows, timings, strict=True):
            row[f"p50_ms_b{batch}"] = round(timing.p50_ms, 3)
            row[f"speedup_b{batch}"] = round(timing.speedup, 3)
    return {
        "rows": rows,
        "seconds": seconds,
        "epochs": args.epochs,
        "processes": args.processes,
        "threads": args.threads,
        "cpu": cpu_name(),
        "isa": detect_isa(),
        "vnni": int8_dot_product(),
        "machine": state,
        "command": harness.command_line(),
    }


def to_markdown(result: dict[str, Any]) -> str:
    first = result["rows"][0]
    table = harness.markdown_table(
        ["step", "top-1", "MACs", "params", "file", "batch 1 ms", "batch 32 ms"],
        [
            [
                row["step"],
                f"{row['top1']:.2f}",
                f"{row['macs'] / 1e6:.2f} M ({row['macs'] / first['macs']:.3f})",
                f"{row['params']:,}",
                f"{row['file_bytes'] / 1024:.0f} KiB "
                f"({first['file_bytes'] / row['file_bytes']:.2f}× smaller)",
                f"{row['p50_ms_b1']:.3f} ({row['speedup_b1']:.2f}×)",
                f"{row['p50_ms_b32']:.2f} ({row['speedup_b32']:.2f}×)",
            ]
            for row in result["rows"]
        ],
    )
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result["seconds"].items())
    return "\n\n".join(
        [
            "# Prune, fine-tune, quantize: ResNet-20 on CIFAR-10 at each step",
            "Top-1 on the evaluation half (5,000 images). MACs and file size in parentheses are "
            "against the fp32 original; latency is ONNX Runtime's median on the CPU, "
            f"{result['threads']} thread(s), every model timed in one process with runs "
            "interleaved; the speed-up in parentheses is against the original in the same run.",
            table,
            f"CPU: {result['cpu']} ({result['isa']}, int8 dot product: {result['vnni']}); "
            "ONNX Runtime "
            f"{result['machine']['onnxruntime']}; {harness.load_text(result['machine'])}. "
            f"Fine-tuning ran {result['epochs']} epochs in {result['processes']} process(es). "
            f"Wall time per command: {seconds}.",
            f"Command: `{result['command']}`.",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=harness.DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=harness.DEFAULT_RESULTS)
    parser.add_argument("--name", default=NAME, help=f"results file name (default {NAME})")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/onnxcompress-quantize-recipe"))
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs (default 3)")
    parser.add_argument(
        "--processes",
        type=int,
        default=2,
        help="finetune under torchrun with this many processes of one thread (default 2)",
    )
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (default 1)")
    parser.add_argument("--runs", type=int, default=200, help="timed runs at batch 1 (default 200)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    markdown = to_markdown(result)
    harness.write_results(args.out_dir, args.name, markdown, result)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
