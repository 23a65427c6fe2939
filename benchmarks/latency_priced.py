"""Channels priced by MACs or by measured latency: realized speed-up at batch 1 and 32 (issue 21).

For each network, and for each batch size (the latency model is built for the batch it will run
at), four models are timed side by side in ONNX Runtime, runs interleaved, medians:

- the original (canonicalized: BatchNorm folded, as every compressed model is);
- ``lrf target_macs=0.5`` with the defaults (channels priced by MACs);
- ``lrf target_macs=0.5,cost=latency``: the same MACs budget, channels ranked by the time they
  save on this machine;
- ``lrf target_latency=0.5``: the latency model plans the cut, the model is measured between
  rounds;
- ``lrf target_macs=F`` (MAC-priced) with ``F`` searched so that its measured latency matches
  the ``target_latency`` model's: top-1 at the same latency.

ResNet-20 (``../shared``) is pruned with ``criterion=activations`` on the CIFAR-10 calibration
half and scored on the evaluation half; ResNet-50 and MobileNetV2 are torchvision's with random
weights (seeded, exported at 224), pruned with ``criterion=weights`` (their accuracy means
nothing, their speed does).

    .venv/bin/python benchmarks/latency_priced.py                 # ~30 min on 2 cores
    .venv/bin/python benchmarks/latency_priced.py --models resnet20 --runs 50
"""

from __future__ import annotations

import argparse
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
from onnxcompress.runtime.latency_table import InterleavedTimer, LatencyTarget
from onnxcompress.runtime.vector_block import detect_isa, vector_block

NAME = "latency_priced"
MODELS = ("resnet20", "resnet50", "mobilenet_v2")
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("MAC-priced", {"target_macs": 0.5}),
    ("cost=latency", {"target_macs": 0.5, "cost": "latency"}),
    ("target_latency=0.5", {"target_latency": 0.5}),
)
# The bars: speed-up at target_latency 0.5, and the share of the ideal speed-up
# (1 / MACs kept) the MAC-priced default realizes.
SPEEDUP_TARGETS = {1: 1.9, 32: 1.8}
IDEAL_SHARE_TARGET = 0.85


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def source_model(name: str, shared: Path, work: Path) -> Path | None:
    if name == "resnet20":
        path = harness.resnet20_path(shared)
        return path if path.exists() else None
    return harness.export_torchvision(name, work / f"{name}-export.onnx")


def compress(
    original: Any, options: dict[str, Any], context: PassContext, path: Path
) -> dict[str, Any]:
    model = clone_model(original)
    compression = create_pass("lrf", options, context)
    tic = time.perf_counter()
    compression(model)
    seconds = time.perf_counter() - tic
    save_model(model, path)
    report = compression.report.as_dict()
    latency = report["summary"].get("latency") or {}
    rounds = latency.get("rounds") or []
    return {
        "path": str(path),
        "options": options,
        "macs_ratio": model_metrics(model).macs / model_metrics(original).macs,
        "seconds": round(seconds, 1),
        "target_met": all(t["met"] for t in report["targets"]),
        "predicted_ratio": rounds[-1]["predicted_ratio"]
        if rounds
        else latency.get("predicted_ratio"),
        "pass_measured_ratio": rounds[-1]["measured_ratio"] if rounds else None,
        "latency_model": latency.get("model"),
        "notes": report["notes"],
    }


def match_macs_priced(
    original: Any,
    reference: dict[str, Any],
    options: dict[str, Any],
    context: PassContext,
    target: LatencyTarget,
    path: Path,
    tries: int = 4,
) -> dict[str, Any]:
    """The MAC-priced model whose measured latency matches ``reference``'s (the
    ``target_latency`` model): ``target_macs`` is rescaled by how far each try's latency ratio
    missed, and the closest try is kept. Accuracy at the same latency is the comparison that
    says whether pricing by latency pays."""
    timer = InterleavedTimer(original, target, min_runs=7)
    goal = timer.ratio(load_model(reference["path"]))
    fraction = reference["macs_ratio"]
    best: tuple[float, dict[str, Any]] | None = None
    for attempt in range(tries):
        trial = path.with_name(f"{path.stem}-try{attempt}.onnx")
        entry = compress(original, {**options, "target_macs": round(fraction, 4)}, context, trial)
        ratio = timer.ratio(load_model(trial))
        entry["matched_goal"], entry["matched_ratio"] = round(goal, 4), round(ratio, 4)
        print(
            f"  match try {attempt}: target_macs {fraction:.3f} -> latency {ratio:.3f} "
            f"(goal {goal:.3f})",
            flush=True,
        )
        if best is None or abs(ratio - goal) < best[0]:
            best = (abs(ratio - goal), entry)
        if abs(ratio - goal) <= 0.02:
            break
        fraction = min(1.0, max(0.05, fraction * goal / ratio))
    assert best is not None
    return best[1]


def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Path(args.shared)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="latency-"))
    work.mkdir(parents=True, exist_ok=True)
    evaluation = calibration = None
    if "resnet20" in args.models and (shared / "data" / "cifar10-jpeg.tar.gz").exists():
        from onnxcompress.data import load_dataset

        calibration = load_dataset(harness.cifar10_spec(shared, "0:50"))
        evaluation = load_dataset(harness.cifar10_spec(shared, "500:1000"))
    rows: list[dict[str, Any]] = []
    for name in args.models:
        source = source_model(name, shared, work)
        if source is None:
            print(f"{name}: skipped (not found under {shared})", flush=True)
            continue
        original = load_model(source)
        canonicalize(original)
        original_path = work / f"{name}-original.onnx"
        save_model(original, original_path)
        data = calibration if name == "resnet20" else None
        criterion = {"criterion": "activations"} if data is not None else {"criterion": "weights"}
        shared_macs: dict[str, Any] | None = None
        for batch in args.batches:
            target = LatencyTarget(provider="cpu", batch=batch, threads=args.threads)
            context = PassContext(
                calibration=data.x if data is not None else None, latency=target, seed=0
            )
            entries: list[tuple[str, dict[str, Any]]] = [("original", {"path": str(original_path)})]
            for label, options in VARIANTS:
                if label == "MAC-priced" and shared_macs is not None:
                    entries.append((label, shared_macs))  # does not depend on the batch
                    continue
                path = work / f"{name}-{label.replace('=', '')}-b{batch}.onnx"
                entry = compress(original, {**options, **criterion}, context, path)
                print(
                    f"{name} batch {batch} {label}: MACs {entry['macs_ratio']:.3f}, "
                    f"{entry['seconds']} s; " + "; ".join(entry["notes"][:3]),
                    flush=True,
                )
                if label == "MAC-priced":
                    shared_macs = entry
                entries.append((label, entry))
            matched = match_macs_priced(
                original,
                entries[-1][1],
                {**criterion},
                context,
                target,
                work / f"{name}-MAC-priced-matched-b{batch}.onnx",
            )
            entries.append(("MAC-priced, same latency", matched))
            state = harness.machine_state()
            bench = benchmark(
                [entry["path"] for _, entry in entries],
                provider="cpu",
                batches=[batch],
                threads=args.threads,
                runs=args.runs if batch == 1 else max(5, args.runs // 4),
                warmup=3,
            )
            for (label, entry), timing in zip(entries, bench, strict=True):
                macs = entry.get("macs_ratio", 1.0)
                row = {
                    "model": name,
                    "batch": batch,
                    "variant": label,
                    "macs_ratio": round(macs, 4),
                    "p50_ms": round(timing.p50_ms, 3),
                    "speedup": round(timing.speedup, 3),
                    "ideal_share": round(timing.speedup * macs, 3),
                    "predicted_ratio": entry.get("predicted_ratio"),
                    "pass_measured_ratio": entry.get("pass_measured_ratio"),
                    "compress_seconds": entry.get("seconds"),
                    "latency_model": entry.get("latency_model"),
                    "load_average": state["load_average"],
                }
                if evaluation is not None and name == "resnet20":
                    from onnxcompress.runtime.evaluate import accuracy

                    row["top1"] = round(accuracy(entry["path"], evaluation).top1, 2)
                rows.append(row)
                print(
                    f"  {label:<20} MACs {macs:.3f}  p50 {timing.p50_ms:8.3f} ms  "
                    f"speed-up {timing.speedup:.2f}x  share of ideal {row['ideal_share']:.2f}"
                    + (f"  top-1 {row['top1']:.2f}" if "top1" in row else ""),
                    flush=True,
                )
    return {
        "name": NAME,
        "cpu": cpu_name(),
        "isa": detect_isa(),
        "block": vector_block("cpu"),
        "threads": args.threads or "default",
        "command": harness.command_line(),
        "machine": harness.machine_state(),
        "rows": rows,
    }


def to_markdown(result: dict[str, Any]) -> str:
    header = [
        "model",
        "batch",
        "pricing",
        "MACs kept",
        "p50 ms",
        "speed-up",
        "share of ideal",
        "latency predicted / measured",
        "top-1",
    ]
    table = []
    originals = {
        (r["model"], r["batch"]): r["p50_ms"] for r in result["rows"] if r["variant"] == "original"
    }
    for row in result["rows"]:
        predicted = row.get("predicted_ratio")
        measured = row["p50_ms"] / originals[(row["model"], row["batch"])]
        table.append(
            [
                row["model"],
                row["batch"],
                row["variant"],
                f"{row['macs_ratio']:.3f}",
                f"{row['p50_ms']:.3f}",
                f"{row['speedup']:.2f}x",
                f"{row['ideal_share']:.2f}" if row["variant"] != "original" else "",
                f"{predicted:.3f} / {measured:.3f}" if predicted is not None else "",
                f"{row['top1']:.2f}" if "top1" in row else "",
            ]
        )
    lines = [
        f"# Channels priced by MACs or by latency ({result['cpu']}, {result['isa']}, block "
        f"{result['block']}, threads {result['threads']})",
        "",
        harness.markdown_table(header, table),
        "",
        f"Command: `{result['command']}`. ONNX Runtime {result['machine']['onnxruntime']}; "
        f"{harness.load_text(result['machine'])} at the end. Speed-up is the original's p50 over "
        "the model's, runs interleaved; share of ideal is the speed-up times the MACs kept. "
        "Predicted is the latency model's ratio for the final widths (for target_latency, the "
        "prediction of the last round, made before it was measured); measured is this "
        "benchmark's ratio of medians.",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared"))
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default all)")
    parser.add_argument(
        "--runs", type=int, default=60, help="timed runs at batch 1 (a quarter at 32)"
    )
    parser.add_argument("--work-dir", default=None, help="keep the models here")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    harness.write_results(Path(args.out), NAME, to_markdown(result), result)
    print(to_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
