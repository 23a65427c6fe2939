"""CPU latency of original vs lrf-compressed ResNet-20 and ResNet-50, and whether the speed-up
keeps up with the MAC reduction (issue 3, "Latency": speed-up >= 0.8 x the MAC reduction).

Every model set runs through :func:`onnxcompress.runtime.bench.benchmark` (one ORT session per
model,
timed runs interleaved across models, medians), once with one intra-op thread and once with
ONNX Runtime's default (all cores). ResNet-20 is compressed with ``criterion=activations`` on
the CIFAR-10 calibration half when ``--shared`` has it (else ``criterion=weights``); ResNet-50
is torchvision's with random weights (seeded), exported at 224 (export not timed), compressed
with ``criterion=weights``.

    .venv/bin/python benchmarks/latency.py                  # ~10-20 min on 2 busy cores
    .venv/bin/python benchmarks/latency.py --skip-resnet50 --runs 30 --round-to 8
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness

from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model, load_model, save_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.runtime.bench import benchmark

logger = logging.getLogger(__name__)

NAME = "latency"
# The bar: MACs halved must give at least 1.6x, i.e. speed-up / (1 / MAC ratio) >= 0.8.
EFFICIENCY_TARGET = 0.8


def compress_variants(
    source: Path,
    label: str,
    variants: list[tuple[str, dict[str, Any]]],
    context: PassContext,
    work: Path,
    reuse: bool = False,
) -> list[dict[str, Any]]:
    """Save the canonicalized original and each lrf variant; returns one entry per file.

    The baseline is the canonicalized original (BatchNorm folded, as every compressed model
    is), so the comparison measures the channel cuts, not canonicalization. With ``reuse``,
    a variant already saved in ``work`` is loaded instead of compressed again.
    """
    original = load_model(source)
    canonicalize(original)
    base_macs = model_metrics(original).macs
    entries = [{"model": label, "variant": "original", "macs_ratio": 1.0, "options": {}}]
    save_model(original, work / f"{label}-original.onnx")
    entries[0]["path"] = str(work / f"{label}-original.onnx")
    for name, options in variants:
        path = work / f"{label}-{name}.onnx"
        start = time.perf_counter()
        if reuse and path.exists():
            model = load_model(path)
        else:
            model = clone_model(original)
            create_pass("lrf", options, context)(model)
            save_model(model, path)
        seconds = time.perf_counter() - start
        ratio = model_metrics(model).macs / base_macs
        entries.append(
            {
                "model": label,
                "variant": name,
                "options": options,
                "macs_ratio": ratio,
                "path": str(path),
                "compress_seconds": seconds,
            }
        )
        print(f"{label} {name}: MACs kept {ratio:.3f} (compressed in {seconds:.1f} s)", flush=True)
    return entries


def measure(
    entries: list[dict[str, Any]],
    batches: list[int],
    threads: int | None,
    runs: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Benchmark one model set at one thread setting; one row per model and batch."""
    state = harness.machine_state()
    print(
        f"bench {entries[0]['model']} threads={threads or 'default'} batches={batches} "
        f"runs={runs} ({harness.load_text(state)})",
        flush=True,
    )
    bench_rows = benchmark(
        [e["path"] for e in entries],
        provider="cpu",
        batches=batches,
        threads=threads,
        runs=runs,
        warmup=warmup,
    )
    after = harness.machine_state()
    by_path = {e["path"]: e for e in entries}
    rows = []
    for bench in bench_rows:
        entry = by_path[bench.model]
        reduction = 1.0 / entry["macs_ratio"]
        efficiency = bench.speedup / reduction
        rows.append(
            {
                "model": entry["model"],
                "variant": entry["variant"],
                "round_to": entry["options"].get("round_to"),
                "threads": threads or "default",
                "batch": bench.batch,
                "macs_ratio": entry["macs_ratio"],
                "p50_ms": bench.p50_ms,
                "p90_ms": bench.p90_ms,
                "speedup": bench.speedup,
                "mac_reduction": reduction,
                "efficiency": efficiency,
                "target_met": None
                if entry["variant"] == "original"
                else efficiency >= EFFICIENCY_TARGET,
                "load_before": state["load_average"],
                "load_after": after["load_average"],
            }
        )
    return rows


def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Path(args.shared)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="latency-"))
    work.mkdir(parents=True, exist_ok=True)
    state_before = harness.machine_state()
    model_sets: list[list[dict[str, Any]]] = []

    resnet20 = harness.resnet20_path(shared)
    if resnet20.exists():
        from onnxcompress.data import load_dataset

        criterion = "weights"
        context = PassContext()
        archive = shared / "data" / "cifar10-jpeg.tar.gz"
        if archive.exists():
            calibration = load_dataset(harness.cifar10_spec(shared, "0:100"))
            context = PassContext(calibration=calibration.x)
            criterion = "activations"
        variants: list[tuple[str, dict[str, Any]]] = [
            (f"lrf{target}-r{round_to}", {"target_macs": target, "round_to": round_to})
            for target in (0.7, 0.5)
            for round_to in args.round_to
        ]
        for _, options in variants:
            options["criterion"] = criterion
        model_sets.append(
            compress_variants(resnet20, "resnet20", variants, context, work, args.reuse)
        )
    else:
        print(f"resnet20: skipped ({resnet20} not found; give --shared DIR)")

    if not args.skip_resnet50:
        path = harness.export_torchvision("resnet50", work / "resnet50-export.onnx")
        variants = [
            (
                f"lrf{target}-r{round_to}",
                {"target_macs": target, "round_to": round_to, "criterion": "weights"},
            )
            for target in (0.7, 0.5)
            for round_to in args.round_to_large
        ]
        model_sets.append(
            compress_variants(path, "resnet50", variants, PassContext(), work, args.reuse)
        )

    rows: list[dict[str, Any]] = []
    threads_settings: list[int | None] = [None if t == "default" else int(t) for t in args.threads]
    for entries in model_sets:
        large = entries[0]["model"] == "resnet50"
        runs = args.runs_large if large else args.runs
        warmup = args.warmup_large if large else args.warmup
        for threads in threads_settings:
            rows.extend(measure(entries, args.batches, threads, runs, warmup))
    return {
        "benchmark": NAME,
        "command": harness.command_line(),
        "efficiency_target": EFFICIENCY_TARGET,
        "models": [e for entries in model_sets for e in entries],
        "rows": rows,
        "runs": {"small": args.runs, "large": args.runs_large},
        "machine_before": state_before,
        "machine_after": harness.machine_state(),
    }


def verdict(rows: list[dict[str, Any]]) -> str:
    """Whether the target holds, per model and round_to, in words."""
    compressed = [r for r in rows if r["variant"] != "original"]
    met = sum(1 for r in compressed if r["target_met"])
    lines = [
        f"Target (speed-up >= {EFFICIENCY_TARGET} x MAC reduction) met in {met} of "
        f"{len(compressed)} measurements:"
    ]
    families = dict.fromkeys((r["model"], r["round_to"]) for r in compressed)
    for model, round_to in families:
        family = [r for r in compressed if (r["model"], r["round_to"]) == (model, round_to)]
        hits = sum(1 for r in family if r["target_met"])
        worst = min(family, key=lambda r: r["efficiency"])
        state = "met" if hits == len(family) else ("not met" if hits == 0 else "partly met")
        lines.append(
            f"- {model}, round_to={round_to}: **{state}** ({hits} of {len(family)}; "
            f"ratio {min(r['efficiency'] for r in family):.2f}-"
            f"{max(r['efficiency'] for r in family):.2f}; worst {worst['variant']} "
            f"threads={worst['threads']} batch {worst['batch']}: {worst['speedup']:.2f}x for "
            f"{worst['mac_reduction']:.2f}x fewer MACs)."
        )
    return "\n".join(lines)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Speed-up (and its ratio to the MAC reduction) per variant and setting, one line each."""
    settings = list(dict.fromkeys((r["threads"], r["batch"]) for r in rows))
    variants = list(dict.fromkeys((r["model"], r["variant"]) for r in rows))
    cell = {(r["model"], r["variant"], r["threads"], r["batch"]): r for r in rows}
    body = []
    for model, variant in variants:
        first = next(r for r in rows if (r["model"], r["variant"]) == (model, variant))
        line = [f"{model} {variant}", f"{first['macs_ratio']:.3f}"]
        for threads, batch in settings:
            r = cell.get((model, variant, threads, batch))
            if r is None:
                line.append("")
            elif variant == "original":
                line.append(f"{r['p50_ms']:.1f} ms")
            else:
                mark = "" if r["target_met"] else " ✗"
                line.append(f"{r['speedup']:.2f}x ({r['efficiency']:.2f}){mark}")
        body.append(line)
    header = ["model", "MACs kept", *(f"threads {t}, batch {b}" for t, b in settings)]
    return harness.markdown_table(header, body)


def to_markdown(result: dict[str, Any]) -> str:
    table = [
        [
            f"{r['model']} {r['variant']}",
            str(r["threads"]),
            str(r["batch"]),
            f"{r['macs_ratio']:.3f}",
            f"{r['p50_ms']:.2f}",
            f"{r['speedup']:.2f}x",
            f"{r['mac_reduction']:.2f}x",
            "" if r["variant"] == "original" else f"{r['efficiency']:.2f}",
            "" if r["target_met"] is None else ("yes" if r["target_met"] else "**no**"),
            f"{r['load_before'][0]:.1f}",
        ]
        for r in result["rows"]
    ]
    header = [
        "model",
        "threads",
        "batch",
        "MACs kept",
        "p50 ms",
        "speed-up",
        "MAC reduction",
        "speed-up / MAC red.",
        ">= 0.8",
        "load",
    ]
    state = result["machine_after"]
    return "\n".join(
        [
            "# CPU latency: original vs lrf-compressed (ONNX Runtime, interleaved runs)",
            "",
            "Speed-up over the original (speed-up / MAC reduction; ✗: below "
            f"{EFFICIENCY_TARGET}); the original's rows give its p50:",
            "",
            summary_table(result["rows"]),
            "",
            verdict(result["rows"]),
            "",
            "All measurements:",
            "",
            harness.markdown_table(header, table),
            "",
            "p50: median of the timed runs; speed-up: the original's p50 / this p50 at the same "
            "batch and threads; MAC reduction: 1 / MACs kept; load: the 1-minute load average "
            "when that set started (the machine is shared with other jobs). ResNet-20 runs: "
            f"{result['runs']['small']}, ResNet-50 runs: {result['runs']['large']} per model.",
            "",
            f"Command: `{result['command']}`; {harness.load_text(state)} at the end; "
            f"ONNX Runtime {state['onnxruntime']}.",
        ]
    )


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="CPU latency of ResNet-20 and ResNet-50 before and after lrf, with the ratio "
        "of speed-up to MAC reduction. Writes results/latency.md/.json.",
    )
    parser.add_argument(
        "--shared",
        default=str(harness.DEFAULT_SHARED),
        help="folder with models/resnet20_cifar10.onnx and data/ (default ../shared)",
    )
    parser.add_argument(
        "--batches",
        type=_int_list,
        default=[1, 32],
        help="comma-separated batch sizes (default 1,32)",
    )
    parser.add_argument(
        "--threads",
        type=lambda text: text.split(","),
        default=["1", "default"],
        help="comma-separated intra-op thread settings; 'default' is ORT's (default 1,default)",
    )
    parser.add_argument(
        "--round-to",
        type=_int_list,
        default=[8, 1, 16],
        help="lrf round_to values for ResNet-20 (default 8,1,16; 16 is ONNX Runtime's NCHWc "
        "block on AVX-512 CPUs, 8 on AVX2)",
    )
    parser.add_argument(
        "--round-to-large",
        type=_int_list,
        default=[8, 16],
        help="lrf round_to values for ResNet-50 (default 8,16)",
    )
    parser.add_argument("--runs", type=int, default=50, help="timed runs, ResNet-20 (default 50)")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up runs, ResNet-20 (10)")
    parser.add_argument(
        "--runs-large", type=int, default=15, help="timed runs, ResNet-50 (default 15)"
    )
    parser.add_argument("--warmup-large", type=int, default=3, help="warm-up runs, ResNet-50 (3)")
    parser.add_argument("--skip-resnet50", action="store_true", help="only ResNet-20")
    parser.add_argument(
        "--work-dir", default=None, help="where to keep the models (default: a temporary folder)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="load compressed models already in --work-dir instead of compressing again",
    )
    parser.add_argument(
        "--out-dir",
        default=str(harness.DEFAULT_RESULTS),
        help="where to write latency.md/.json (default benchmarks/results)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    args = parser.parse_args(argv)
    if any(t != "default" and (not t.isdigit() or int(t) < 1) for t in args.threads):
        parser.error("--threads takes positive integers or 'default'")
    if min(args.batches) < 1 or min(args.runs, args.runs_large) < 1:
        parser.error("batch sizes and run counts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.setup_logging(args.verbose)
    result = run(args)
    markdown = to_markdown(result)
    harness.write_results(Path(args.out_dir), NAME, markdown, result)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
