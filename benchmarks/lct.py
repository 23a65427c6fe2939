"""lct benchmark: ResNet-20 CIFAR-10 collapsed by layer-wise compressive training, on a CPU budget.

The README's claims: (a) ``subspace=sparse`` gives a file at least 5x smaller within 1 point of
the teacher's top-1; (b) ``subspace=lowrank`` gives at least 1.5x fewer MACs within 1.5 points,
with the measured ONNX Runtime CPU latency. Each mode is one compression run under 30 minutes of
wall clock on the 2-core machine (loading and evaluation included); run them one at a time.

Sparse mode is trained with ``compact=False`` and the benchmark then stores the collapsed
weights three times with the function the pass itself calls (``store_sparse``): with exact
float32 values (the pass's default), with float16 values (``values=float16``, lossy) and with
int8 values quantized per output channel (``values=int8``, lossy); every file is evaluated.

Training uses the CIFAR-10 training split; stages are accepted on the calibration half of the
test split (files 0000-0499 of every class); accuracy is reported on the evaluation half only
(files 0500-0999, ``../shared/data/README.md``).

    flock /tmp/onnxcompress_heavy.lock .venv/bin/python benchmarks/lct.py
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

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

from onnxcompress.graph.canonicalize import load_canonical
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model, save_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.runtime.bench import benchmark
from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

logger = logging.getLogger("lct")

TEACHER_TOP1 = 87.8  # ../shared/models/README.md, evaluation half
TARGETS = {
    "sparse": {"file_ratio": 5.0, "max_gap": 1.0},
    "lowrank": {"mac_ratio": 1.5, "max_gap": 1.5},
}
HISTORY = (
    "History: the first run (4 stages, all-or-nothing: the run stopped at the first rejected "
    "stage) kept the original model in both modes: sparse stage 1 (sparsity 0.87) lost 1.34 "
    "points on the calibration half (86.52 vs 87.86, max_drop 1.0), lowrank stage 1 "
    "(target_macs 0.55) lost 2.68 (85.18 vs 87.86, max_drop 1.5), so both rows read 87.80 %, "
    "1.00x file and 1.00x MACs. That run's sensitivity ranking used class-sorted images, and "
    "its lowrank latency was compared against the wrong teacher timing; both were fixed before "
    "this run, which also backs off a rejected stage (half the increment, up to --retries "
    "times, from the last accepted weights) and goes on with the next stage. The second run "
    "(both modes sharing one 29-minute budget, stages accepted only within max_drop, no final "
    "fine-tune) reached sparse: 46.1 % of the weights zero, a 1.69x smaller file at 87.80 %; "
    "lowrank (target_macs=0.55, starved by another job): 1.10x fewer MACs at 86.48 %, 0.89x the "
    "teacher's speed, its partly cut layers factorized into slower pairs. This run adds the "
    "slack on stages, the final fine-tune, ranks in multiples of the CPU's channel block that "
    "save at least min_saving, float16 values as a storage option, and one budget per mode."
)
# Per mode, kept back from its training budget: ranking, stage scoring, saving, evaluation.
RESERVE_SECONDS = 120.0
# Sparse files written from one trained model: exact first (the pass's default), then lossy.
VALUE_VARIANTS = ("float32", "float16", "int8")


def _below(gap: float) -> str:
    """``gap`` (teacher minus model, points) in words."""
    return f"{abs(gap):.2f} points {'below' if gap >= 0 else 'above'} the teacher"


@dataclasses.dataclass
class ModeResult:
    mode: str
    options: dict[str, Any]
    path: Path
    top1: float
    params: int
    macs: int
    file_bytes: int
    p50_ms: float
    seconds: float
    report: dict[str, Any]


def run_mode(
    mode: str,
    options: dict[str, Any],
    teacher: Path,
    context: PassContext,
    evaluation: Any,
    work_dir: Path,
) -> tuple[Path, dict[str, Any], float]:
    tic = time.perf_counter()
    model, _ = load_canonical(teacher)
    compression = create_pass("lct", options, context)
    compression(model)
    path = save_model(model, work_dir / f"resnet20_lct_{mode}.onnx")
    return path, compression.report.as_dict(), time.perf_counter() - tic


def store_variants(
    dense_path: Path, report: dict[str, Any], evaluation: Any, teacher: Path
) -> tuple[Path, dict[str, Any]]:
    """Store the collapsed weights with each kind of values; evaluate every file.

    Returns the float32 file (the pass's default output) and a record of every variant.
    """
    from onnxcompress.graph.sparse_storage import store_sparse

    names = [row["weight"] for row in report["layers"] if row["collapsed"]]
    variants: dict[str, Any] = {}
    first: Path | None = None
    for values in VALUE_VARIANTS:
        model = load_model(dense_path)
        records = store_sparse(model, names, values=values)
        path = save_model(model, dense_path.with_name(f"{dense_path.stem}_{values}.onnx"))
        first = first or path
        variants[values] = {
            "path": str(path),
            "file_bytes": path.stat().st_size,
            "file_ratio": round(teacher.stat().st_size / path.stat().st_size, 3),
            "top1": accuracy(load_model(path), evaluation).top1,
            "storage": {record.name: record.as_dict() for record in records},
        }
        print(
            f"sparse, {values} values: {path.stat().st_size:,} B, "
            f"top-1 {variants[values]['top1']:.2f}%"
        )
    # The per-layer storage rows of the report are those of the float32 file.
    by_name = variants["float32"]["storage"]
    for row in report["layers"]:
        stored = by_name.get(row["weight"])
        if stored is not None:
            row["encoding"] = stored["encoding"]
            row["stored_bytes"] = stored["stored_bytes"]
    assert first is not None
    return first, variants


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/onnxcompress-lct"))
    parser.add_argument(
        "--budget-minutes", type=float, default=29.0, help="per mode, loading included"
    )
    parser.add_argument("--modes", default="sparse", help="sparse, lowrank or both (in turn)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--sparsity", type=float, default=0.87)
    parser.add_argument("--max-layer-sparsity", type=float, default=0.95)
    parser.add_argument(
        "--epochs-per-stage",
        type=int,
        default=2,
        help="upper bound; the time budget usually ends a stage first (schedules follow it)",
    )
    parser.add_argument("--target-macs", type=float, default=0.6)
    parser.add_argument("--round-to", type=int, default=16, help="lowrank rank multiple")
    parser.add_argument("--slack", type=float, default=1.0)
    parser.add_argument("--final-share", type=float, default=0.3)
    parser.add_argument("--final-lr", type=float, default=0.01)
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument(
        "--schedule", default="staged", help="staged (the paper) or gradual (one cubic run)"
    )
    parser.add_argument("--stagger", type=float, default=0.5, help="gradual: ramp offsets")
    parser.add_argument("--checks", type=int, default=10, help="gradual: checks on the ramp")
    parser.add_argument(
        "--check-samples", type=int, default=5000, help="gradual: images scored per check"
    )
    parser.add_argument(
        "--retries", type=int, default=2, help="back-offs (halved increment) per rejected stage"
    )
    parser.add_argument("--lr", type=float, default=0.003)
    parser.add_argument(
        "--batchnorm",
        action="store_true",
        help="train with BatchNormalization after every Conv, folded back after each fine-tune",
    )
    parser.add_argument("--train-images", type=int, default=None, help="subset (quick runs)")
    parser.add_argument(
        "--test-per-class", type=int, default=500, help="images per class of each test half"
    )
    parser.add_argument("--reserve-seconds", type=float, default=RESERVE_SECONDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="lct", help="results file stem")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    setup_logging(args.verbose)
    if args.verbose:
        logging.getLogger("onnxcompress").setLevel(logging.INFO)
    state_before = machine_state()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    teacher_path = resnet20_path(args.shared)
    if not teacher_path.exists():
        print(f"{teacher_path} is absent: the shared models folder is needed", file=sys.stderr)
        return 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    tic = time.perf_counter()
    canonical, _ = load_canonical(teacher_path)
    canonical_path = save_model(canonical, args.work_dir / "resnet20_canonical.onnx")
    half = args.test_per_class
    validation_spec = cifar10_spec(args.shared, f"0:{half}")
    evaluation = dataset_for_model(canonical, cifar10_spec(args.shared, f"500:{500 + half}"))
    validation = dataset_for_model(canonical, validation_spec)
    teacher_top1 = accuracy(canonical, evaluation).top1
    teacher_metrics = model_metrics(canonical)
    load_seconds = time.perf_counter() - tic
    print(f"teacher: top-1 {teacher_top1:.2f}% on the evaluation half ({load_seconds:.0f} s)")
    spec = cifar10_train_spec(args.shared)
    if args.train_images is not None:
        spec += f"&per_class=0:{max(1, args.train_images // 10)}"

    results: list[ModeResult] = []
    extra: dict[str, dict[str, Any]] = {}
    for index, mode in enumerate(modes):
        # Each mode has the whole budget; the first one also pays for loading the data.
        mode_started = started if index == 0 else time.perf_counter()
        left = args.budget_minutes * 60 - (time.perf_counter() - mode_started)
        training = left - args.reserve_seconds
        if training < 20:
            print(f"{mode}: only {training:.0f} s left for training; stopping", file=sys.stderr)
            break
        options: dict[str, Any] = {
            "subspace": mode,
            "schedule": args.schedule,
            "stagger": args.stagger,
            "checks": args.checks,
            "check_samples": args.check_samples,
            "stages": args.stages,
            "retries": args.retries,
            "epochs_per_stage": args.epochs_per_stage,
            "lr": args.lr,
            "time_budget_s": round(training, 1),
            "sensitivity": True,
            "sensitivity_samples": min(500, len(validation)),
            "max_drop": TARGETS[mode]["max_gap"],
            "slack": args.slack,
            "final_share": args.final_share,
            "final_lr": args.final_lr,
            "batchnorm": args.batchnorm,
        }
        if mode == "sparse":
            options["sparsity"] = args.sparsity
            options["max_layer_sparsity"] = args.max_layer_sparsity
            options["compact"] = False
        else:
            options["target_macs"] = args.target_macs
            options["round_to"] = args.round_to
        calibration = validation.spread(512)
        context = PassContext(
            calibration=calibration.x,
            calibration_labels=calibration.y,
            train_spec=spec,
            validation_spec=validation_spec,
            seed=args.seed,
        )
        print(f"{mode}: training budget {training:.0f} s, options {options}")
        path, report, seconds = run_mode(
            mode, options, teacher_path, context, evaluation, args.work_dir
        )
        if mode == "sparse":
            path, variants = store_variants(path, report, evaluation, canonical_path)
            extra[mode] = variants
        compressed = load_model(path)
        metrics = model_metrics(compressed)
        top1 = accuracy(compressed, evaluation).top1
        rows = benchmark(
            [canonical_path, path], provider="cpu", batches=(1,), threads=1, warmup=20, runs=300
        )
        results.append(
            ModeResult(
                mode=mode,
                options=options,
                path=path,
                top1=top1,
                params=metrics.params,
                macs=metrics.macs,
                file_bytes=path.stat().st_size,
                p50_ms=rows[1].p50_ms,
                seconds=seconds,
                report=report,
            )
        )
        results[-1].report["teacher_p50_ms"] = rows[0].p50_ms
        print(
            f"{mode}: top-1 {top1:.2f}%, file {path.stat().st_size:,} B, MACs {metrics.macs:,}, "
            f"p50 {rows[1].p50_ms:.3f} ms (teacher {rows[0].p50_ms:.3f}) in {seconds:.0f} s"
        )

    total = time.perf_counter() - started
    state_after = machine_state()
    write_report(
        args,
        teacher_path,
        canonical_path,
        teacher_top1,
        teacher_metrics,
        results,
        extra,
        total,
        state_before,
        state_after,
    )
    return 0


def write_report(
    args: argparse.Namespace,
    teacher_path: Path,
    canonical_path: Path,
    teacher_top1: float,
    teacher_metrics: Any,
    results: list[ModeResult],
    extra: dict[str, dict[str, Any]],
    total: float,
    state_before: dict[str, Any],
    state_after: dict[str, Any],
) -> None:
    teacher_bytes = teacher_path.stat().st_size
    teacher_p50 = results[0].report["teacher_p50_ms"] if results else float("nan")
    rows = [
        [
            "teacher (original)",
            f"{teacher_top1:.2f}",
            "-",
            f"{teacher_bytes / 1024:.0f} KiB",
            "1.00x",
            f"{teacher_metrics.macs / 1e6:.2f} M",
            f"{teacher_metrics.params:,}",
            f"{teacher_p50:.3f}",
        ]
    ]
    verdicts: list[str] = []
    payload_modes: dict[str, Any] = {}
    for result in results:
        summary = result.report["summary"]
        gap = teacher_top1 - result.top1
        file_ratio = teacher_bytes / result.file_bytes
        mac_ratio = teacher_metrics.macs / max(result.macs, 1)
        sparsity = summary.get("candidate_sparsity")
        label = (
            f"lct sparse (sparsity={result.options.get('sparsity')})"
            if result.mode == "sparse"
            else f"lct lowrank (target_macs={result.options.get('target_macs')})"
        )
        rows.append(
            [
                label,
                f"{result.top1:.2f}",
                f"{sparsity:.1%}" if sparsity is not None else "-",
                f"{result.file_bytes / 1024:.0f} KiB",
                f"{file_ratio:.2f}x",
                f"{result.macs / 1e6:.2f} M",
                f"{result.params:,}",
                f"{result.p50_ms:.3f}",
            ]
        )
        target = TARGETS[result.mode]
        lossy = [
            (values, extra[result.mode][values])
            for values in VALUE_VARIANTS[1:]
            if values in extra.get(result.mode, {})
        ]
        for values, variant in lossy:
            rows.append(
                [
                    f"{label}, {values} values",
                    f"{variant['top1']:.2f}",
                    f"{sparsity:.1%}" if sparsity is not None else "-",
                    f"{variant['file_bytes'] / 1024:.0f} KiB",
                    f"{variant['file_ratio']:.2f}x",
                    f"{result.macs / 1e6:.2f} M",
                    f"{result.params:,}",
                    "-",
                ]
            )
        if result.mode == "sparse":
            met = file_ratio >= target["file_ratio"] and gap <= target["max_gap"]
            verdicts.append(
                f"sparse, float32 values (exact storage): file {file_ratio:.2f}x smaller, "
                f"{_below(gap)} (target >= {target['file_ratio']}x within "
                f"{target['max_gap']}: {'met' if met else 'not met'})"
            )
            for values, variant in lossy:
                variant_gap = teacher_top1 - variant["top1"]
                variant_met = (
                    variant["file_ratio"] >= target["file_ratio"]
                    and variant_gap <= target["max_gap"]
                )
                verdicts.append(
                    f"sparse, {values} values (lossy storage, beyond the paper): file "
                    f"{variant['file_ratio']:.2f}x smaller, {_below(variant_gap)} "
                    f"({'met' if variant_met else 'not met'} with {values} values)"
                )
        else:
            met = mac_ratio >= target["mac_ratio"] and gap <= target["max_gap"]
            verdicts.append(
                f"lowrank: {mac_ratio:.2f}x fewer MACs, {_below(gap)}, "
                f"latency {result.report['teacher_p50_ms'] / result.p50_ms:.2f}x faster than the "
                f"teacher timed beside it (target >= "
                f"{target['mac_ratio']}x within {target['max_gap']}: {'met' if met else 'not met'})"
            )
        payload_modes[result.mode] = {
            "options": result.options,
            "top1": result.top1,
            "gap_points": round(gap, 3),
            "file_bytes": result.file_bytes,
            "file_ratio": round(file_ratio, 3),
            "macs": result.macs,
            "mac_ratio": round(mac_ratio, 3),
            "params": result.params,
            "p50_ms": result.p50_ms,
            "teacher_p50_ms": result.report.get("teacher_p50_ms"),
            "seconds": round(result.seconds, 1),
            "target_met": met,
            "report": result.report,
            "variants": {
                key: {k: v for k, v in value.items() if k != "storage"}
                for key, value in extra.get(result.mode, {}).items()
            },
        }
    sections = [
        "# lct: layer-wise compressive training on ResNet-20 CIFAR-10 (CPU budget)",
        f"Top-1 on the evaluation half of the JPEG test split (files 0500-0999 of every class, "
        f"5000 images), ONNX Runtime CPU; latency p50 at batch 1, 1 thread, interleaved with "
        f"the teacher. Sparsity is over the candidate layers (every Conv/Gemm weight). File "
        f"ratio against the original file ({teacher_bytes:,} bytes).",
        markdown_table(
            [
                "model",
                "top-1 (%)",
                "weight sparsity",
                "file",
                "file ratio",
                "MACs",
                "params",
                "p50 (ms)",
            ],
            rows,
        ),
        "\n".join(f"- {line}" for line in verdicts),
    ]
    for result in results:
        stages = result.report["summary"].get("stages", [])
        if result.report["summary"].get("schedule") == "gradual":
            floors = {s["floor"] for s in stages if "floor" in s}
            floor = f"; a check passes at or above {min(floors):.2f}" if floors else ""
            sections.append(
                f"## {result.mode}: gradual ramp, checked on the calibration half{floor} "
                "(increment: fraction of the ramp)"
            )
        else:
            sections.append(f"## {result.mode}: stages (accepted on the calibration half)")
        sections.append(
            markdown_table(
                [
                    "stage",
                    "attempt",
                    "increment",
                    "layers",
                    "calibration-half top-1 (%)",
                    "kept",
                    "steps",
                    "seconds",
                ],
                [
                    [
                        str(s["stage"]),
                        str(s.get("attempt", 1)),
                        f"{s.get('increment', 1.0):g}",
                        str(len(s["layers"])),
                        f"{s['top1']:.2f} (ref {s['reference_top1']:.2f})",
                        "yes" if s["accepted"] else "no",
                        str(s["steps"]),
                        f"{s['seconds']:.0f}",
                    ]
                    for s in stages
                ],
            )
        )
        layer_rows = []
        for layer in result.report["layers"]:
            if result.mode == "sparse":
                detail = (
                    f"{layer['sparsity']:.1%}",
                    layer.get("encoding", "dense"),
                    f"{layer.get('stored_bytes', layer['elements'] * 4):,}",
                )
            else:
                detail = (
                    f"{layer['rank']}/{layer['full_rank']}",
                    f"{layer['macs_before']:,}",
                    f"{layer['macs_after']:,}",
                )
            sensitivity = layer["sensitivity"]
            layer_rows.append(
                [
                    layer["node"],
                    str(layer["significance"]),
                    "-" if sensitivity is None else f"{sensitivity:.2f}",
                    f"{layer.get('level', 0.0):g}",
                    *detail,
                ]
            )
        header = (
            ["layer", "rank order", "sensitivity (pts)", "level", "sparsity", "storage", "bytes"]
            if result.mode == "sparse"
            else [
                "layer",
                "rank order",
                "sensitivity (pts)",
                "level",
                "rank",
                "MACs before",
                "MACs after",
            ]
        )
        sections.append(markdown_table(header, layer_rows))
        stopped = result.report["summary"].get("stopped")
        if stopped:
            sections.append(f"Stopped early: {stopped}.")
    sections.append(HISTORY)
    sections += [
        f"Whole run {total / 60:.1f} min for {len(results)} mode(s) (budget 30 min per mode: "
        f"{'met' if total <= 1800 * max(1, len(results)) else 'exceeded'}); "
        f"canonical teacher {canonical_path.stat().st_size:,} bytes.",
        f"Conditions: {load_text(state_before)} at the start, {load_text(state_after)} at the "
        f"end; torch {torch.__version__}, {args.threads} torch thread(s), pid {os.getpid()}.",
        f"Reproduce: `flock /tmp/onnxcompress_heavy.lock {command_line()}`",
    ]
    write_results(
        args.out_dir,
        args.name,
        "\n\n".join(sections),
        {
            "teacher_top1": teacher_top1,
            "teacher_top1_published": TEACHER_TOP1,
            "teacher_file_bytes": teacher_bytes,
            "teacher_macs": teacher_metrics.macs,
            "teacher_params": teacher_metrics.params,
            "modes": payload_modes,
            "total_s": round(total, 1),
            "threads": args.threads,
            "machine_before": state_before,
            "machine_after": state_after,
        },
    )


if __name__ == "__main__":
    sys.exit(main())
