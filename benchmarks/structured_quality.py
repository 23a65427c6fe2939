"""Top-1 of ResNet-20 on CIFAR-10 after structural compression, without any fine-tuning.

Compares ``lrf`` (both criteria), ``merge`` (when registered) and an L1-norm magnitude-pruning
baseline cut at exactly the channel counts ``lrf`` chose, with no compensation, so the table
shows what the compensation buys at the same budget (issue 3, "Quality benchmark").

Calibration uses the calibration half of the CIFAR-10 test split (files 0000-0499 of every
class; by default the first 100 per class), accuracy the evaluation half (files 0500-0999),
as ``../shared/data/README.md`` defines them.

    .venv/bin/python benchmarks/structured_quality.py            # ~5-15 min on 2 cores
    .venv/bin/python benchmarks/structured_quality.py --targets 0.6 --calibration-per-class 50
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness
import torch_pruning_anchor

from onnxcompress.data import Dataset, load_dataset
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.channels import analyze_channels
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.graph.surgery import remove_channels
from onnxcompress.passes import REGISTRY, create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.runtime.evaluate import accuracy

logger = logging.getLogger(__name__)

NAME = "structured_quality"
DEFAULT_TARGETS = (0.8, 0.7, 0.6, 0.5)
# The magnitude baseline copies the channel counts of this method (the issue's "same budget").
BUDGET_SOURCE = "lrf activations"
# The usual L1 setting (as Torch-Pruning's numbers in METHODS.md): the same fraction of every
# block's inner channels, the fraction chosen so that the MACs meet the target.
UNIFORM_L1 = "L1 magnitude, uniform inner-block ratio (no compensation)"
# Issue 20's anchor: Torch-Pruning itself on the PyTorch weights of the same network.
TORCH_PRUNING = "torch-pruning"
TORCH_PRUNING_L1 = "Torch-Pruning L1, inner block channels (BN kept)"


@dataclasses.dataclass(frozen=True)
class Method:
    """One row family of the table: a pass with fixed options, or the magnitude baseline."""

    label: str
    pass_name: str | None  # None: the L1 baseline; TORCH_PRUNING: the anchor
    options: dict[str, Any]
    # For the same-budget baseline: the method whose channel counts it copies (None with
    # pass_name None: the uniform baseline).
    budget_of: str | None = None


def methods(merge_available: bool, anchor_available: bool = False) -> list[Method]:
    rows = [
        Method("lrf weights", "lrf", {"criterion": "weights", "round_to": 8}),
        Method("lrf activations", "lrf", {"criterion": "activations", "round_to": 8}),
        Method(
            "lrf activations, no reconstruction",
            "lrf",
            {"criterion": "activations", "round_to": 8, "reconstruct": False},
        ),
        Method("lrf synthetic (data-free)", "lrf", {"criterion": "synthetic", "round_to": 8}),
        Method("lrf activations, round_to=1", "lrf", {"criterion": "activations", "round_to": 1}),
        # 16: ONNX Runtime's NCHWc block on AVX-512 CPUs (see results/latency.md).
        Method("lrf activations, round_to=16", "lrf", {"criterion": "activations", "round_to": 16}),
    ]
    if merge_available:
        rows += [
            Method("merge weights", "merge", {"criterion": "weights", "round_to": 8}),
            Method(
                "merge synthetic (data-free)", "merge", {"criterion": "synthetic", "round_to": 8}
            ),
            Method("merge activations", "merge", {"criterion": "activations", "round_to": 8}),
            Method(
                "merge activations, no reconstruction",
                "merge",
                {"criterion": "activations", "round_to": 8, "reconstruct": False},
            ),
        ]
    rows += [
        Method("L1 magnitude (no compensation)", None, {"round_to": 8}, BUDGET_SOURCE),
        Method(
            "L1 magnitude (no compensation), round_to=1",
            None,
            {"round_to": 1},
            "lrf activations, round_to=1",
        ),
        Method(UNIFORM_L1, None, {"round_to": 1}),
    ]
    if anchor_available:
        rows.append(Method(TORCH_PRUNING_L1, TORCH_PRUNING, {}))
    return rows


def magnitude_prune(original: Any, layers: list[dict[str, Any]]) -> Any:
    """Cut each group to the channel count of ``layers`` (an lrf report), keeping the filters
    with the largest L1 norm, with no compensation.

    The norms are taken on the original weights (before any group is cut), as the usual L1
    baseline does; a group's norm sums the rows of all its producers (a residual stream's
    channels are computed by several Convs).
    """
    model = clone_model(original)
    analysis = analyze_channels(model)
    by_name: dict[str, Any] = {}
    for candidate in analysis.prunable:
        if candidate.name in by_name:
            raise RuntimeError(f"two channel groups share the name {candidate.name!r}")
        by_name[candidate.name] = candidate
    plan = []
    for layer in layers:
        group = by_name.get(layer["group"])
        if group is None:
            raise RuntimeError(f"group {layer['group']!r} of the lrf report is not prunable here")
        if group.size != layer["channels_before"]:
            raise RuntimeError(
                f"group {group.name!r}: {group.size} channels here, "
                f"{layer['channels_before']} in the lrf report"
            )
        count = int(layer["channels_before"]) - int(layer["channels_after"])
        norms = np.abs(group.producer_matrix()).sum(axis=1)
        plan.append((group, np.sort(np.argsort(norms, kind="stable")[:count])))
    for group, remove in plan:
        remove_channels(model, group, remove.tolist())
    return model


def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Path(args.shared)
    model_path = Path(args.model) if args.model else harness.resnet20_path(shared)
    if not model_path.exists():
        raise SystemExit(f"{model_path}: not found (give --model, or --shared DIR with models/)")
    state_before = harness.machine_state()
    merge_available = "merge" in REGISTRY
    if not merge_available:
        print("merge: not available (no pass registered as 'merge')")
    network = None
    if args.model:
        print("Torch-Pruning anchor: left out (it runs on the shared ResNet-20's weights only)")
    elif not torch_pruning_anchor.available():
        print("Torch-Pruning anchor: left out (install it: pip install -e '.[anchors]')")
    else:
        network = torch_pruning_anchor.load_resnet(shared)
    chosen = [
        m
        for m in methods(merge_available, network is not None)
        if not args.methods or any(part in m.label for part in args.methods)
    ]
    eval_spec = harness.cifar10_spec(shared, "500:1000")
    calib_spec = harness.cifar10_spec(shared, f"0:{args.calibration_per_class}")
    evaluation = load_dataset(eval_spec)
    calibration = load_dataset(calib_spec)
    teacher = load_model(model_path)
    canonicalize(teacher)
    teacher_metrics = model_metrics(teacher)
    teacher_acc = accuracy(teacher, evaluation)
    print(
        f"teacher: top-1 {teacher_acc.top1:.2f}% on {teacher_acc.samples} evaluation images, "
        f"{teacher_metrics.macs:,} MACs, {teacher_metrics.params:,} params"
    )
    context = PassContext(calibration=calibration.x, calibration_labels=calibration.y)
    rows: list[dict[str, Any]] = []
    for target in args.targets:
        reports: dict[str, list[dict[str, Any]]] = {}
        for method in chosen:
            row = evaluate_method(method, target, teacher, context, evaluation, reports, network)
            row["macs_ratio"] = row["macs"] / teacher_metrics.macs
            row["params_ratio"] = row["params"] / teacher_metrics.params
            rows.append(row)
            print(
                f"target {target:.2f}  {method.label:<44} top-1 {row['top1']:6.2f}%  "
                f"MACs {row['macs_ratio']:.3f}  params {row['params_ratio']:.3f}  "
                f"({row['seconds']:.1f} s)",
                flush=True,
            )
    return {
        "benchmark": NAME,
        "command": harness.command_line(),
        "model": str(model_path),
        "calibration": {"spec": calib_spec, "samples": len(calibration)},
        "evaluation": {"spec": eval_spec, "samples": len(evaluation)},
        "teacher": {
            "top1": teacher_acc.top1,
            "top5": teacher_acc.top5,
            "macs": teacher_metrics.macs,
            "params": teacher_metrics.params,
        },
        "merge_available": merge_available,
        "rows": rows,
        "machine_before": state_before,
        "machine_after": harness.machine_state(),
    }


def inner_groups(analysis: Any) -> list[Any]:
    """Prunable groups made by a single Conv: a residual block's inner channels."""
    return [g for g in analysis.prunable if len(g.producer_nodes) == 1]


def uniform_magnitude_prune(original: Any, target: float, steps: int = 30) -> Any:
    """Remove the same fraction of every inner group's channels (smallest L1 norm first), the
    fraction found by bisection as the smallest that brings the MACs to ``target`` or below.

    Returns the original's copy unchanged if no fraction of the inner channels is enough.
    """
    base = model_metrics(original).macs
    analysis = analyze_channels(original)
    # Layer counts depend only on the fraction; norms are taken on the original weights.
    layers = [
        {"group": g.name, "channels_before": g.size, "channels_after": g.size}
        for g in inner_groups(analysis)
    ]

    def build(fraction: float) -> tuple[Any, int]:
        for layer in layers:
            size = layer["channels_before"]
            layer["channels_after"] = max(1, size - round(size * fraction))
        model = magnitude_prune(original, layers)
        return model, model_metrics(model).macs

    low, high = 0.0, 1.0
    best, best_macs = build(high)
    if best_macs > target * base:
        return clone_model(original)
    for _ in range(steps):
        middle = (low + high) / 2
        model, macs = build(middle)
        if macs <= target * base:
            high, best = middle, model
        else:
            low = middle
    return best


def evaluate_method(
    method: Method,
    target: float,
    teacher: Any,
    context: PassContext,
    evaluation: Dataset,
    reports: dict[str, list[dict[str, Any]]],
    network: Any = None,
) -> dict[str, Any]:
    """Compress a copy of ``teacher`` with ``method`` at ``target`` and score it (``network``:
    the PyTorch module the Torch-Pruning anchor prunes)."""
    start = time.perf_counter()
    summary: dict[str, Any] = {}
    if method.pass_name == TORCH_PRUNING:
        pruned, model, _ = torch_pruning_anchor.prune_to_macs(network, target)
        torch_pruning_anchor.check_export(pruned, model, evaluation.x[:8])
    elif method.pass_name is None and method.budget_of is None:
        model = uniform_magnitude_prune(teacher, target)
    elif method.pass_name is None:
        assert method.budget_of is not None
        if method.budget_of not in reports:
            raise RuntimeError(f"{method.label}: run {method.budget_of!r} first")
        model = magnitude_prune(teacher, reports[method.budget_of])
    else:
        model = clone_model(teacher)
        options = {"target_macs": target, **method.options}
        compression = create_pass(method.pass_name, options, context)
        compression(model)
        report = compression.report.as_dict()
        reports[method.label] = report["layers"]
        summary = report["summary"]
    seconds = time.perf_counter() - start
    metrics = model_metrics(model)
    acc = accuracy(model, evaluation)
    return {
        "method": method.label,
        "pass": method.pass_name or "l1-magnitude",
        "options": method.options,
        "budget_of": method.budget_of,
        "target_macs": target,
        "top1": acc.top1,
        "top5": acc.top5,
        "macs": metrics.macs,
        "params": metrics.params,
        "target_met": summary.get("target_met"),
        "seconds": seconds,
    }


def to_markdown(result: dict[str, Any]) -> str:
    teacher = result["teacher"]
    targets = sorted({row["target_macs"] for row in result["rows"]}, reverse=True)
    labels = list(dict.fromkeys(row["method"] for row in result["rows"]))
    cell = {(row["method"], row["target_macs"]): row for row in result["rows"]}
    pivot = []
    for label in labels:
        cells = []
        for target in targets:
            row = cell.get((label, target))
            cells.append("" if row is None else f"{row['top1']:.1f} ({row['macs_ratio']:.2f})")
        pivot.append([label, *cells])
    detail = [
        [
            row["method"],
            f"{row['target_macs']:.2f}",
            f"{row['macs_ratio']:.3f}",
            f"{row['params_ratio']:.3f}",
            f"{row['top1']:.2f}",
            f"{row['top5']:.2f}" if row["top5"] is not None else "",
            f"{row['seconds']:.1f}",
        ]
        for row in result["rows"]
    ]
    state = result["machine_after"]
    lines = [
        f"# Structural compression quality: `{Path(result['model']).name}` on CIFAR-10, "
        "no fine-tuning",
        "",
        f"Teacher `{Path(result['model']).name}`: top-1 **{teacher['top1']:.2f}%** on the "
        f"evaluation half ({result['evaluation']['samples']} images), "
        f"{teacher['macs']:,} MACs, {teacher['params']:,} params. Calibration: "
        f"{result['calibration']['samples']} images of the calibration half.",
        "",
        "Top-1 % on the evaluation half (MACs actually kept, as a fraction of the teacher's), "
        "by target_macs:",
        "",
        harness.markdown_table(["method", *(f"{t:.1f}" for t in targets)], pivot),
        "",
        "The L1 magnitude (no compensation) rows cut every channel group to exactly the channel "
        "counts of the lrf activations row with the same round_to (same budget), keeping the "
        "filters with the largest L1 norm, without compensation. The uniform row is the usual "
        "L1 setting instead: the same fraction of every residual block's inner channels "
        "(groups made by one Conv), the fraction bisected to meet the MAC target. The "
        "Torch-Pruning row runs the library itself on the PyTorch weights of the same network "
        "(`benchmarks/torch_pruning_anchor.py`): L1 importance, BatchNorm kept, the same "
        "fraction of every block's inner channels, bisected to the MAC target or just below.",
        "",
        "All rows:",
        "",
        harness.markdown_table(
            ["method", "target", "MACs kept", "params kept", "top-1", "top-5", "compress s"],
            detail,
        ),
        "",
        f"Command: `{result['command']}`; {harness.load_text(state)}.",
    ]
    if not result["merge_available"]:
        lines += ["", "merge: not available (not registered when this ran)."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Top-1 of ResNet-20 / CIFAR-10 after lrf, merge and an L1-magnitude baseline "
        "at several MAC budgets, without fine-tuning. Writes results/structured_quality.md/.json.",
    )
    parser.add_argument(
        "--shared",
        default=str(harness.DEFAULT_SHARED),
        help="folder holding models/resnet20_cifar10.onnx and data/cifar10-jpeg.tar.gz "
        "(default: ../shared from the repository root)",
    )
    parser.add_argument(
        "--model",
        help="a CIFAR-10 classifier to compress instead of the shared ResNet-20 (for example "
        "models/resnet32_cifar10.onnx)",
    )
    parser.add_argument(
        "--name",
        default=NAME,
        help=f"results file name, without extension (default {NAME})",
    )
    parser.add_argument(
        "--targets",
        type=lambda text: [float(t) for t in text.split(",")],
        default=list(DEFAULT_TARGETS),
        help="comma-separated target_macs values (default 0.8,0.7,0.6,0.5)",
    )
    parser.add_argument(
        "--calibration-per-class",
        type=int,
        default=100,
        help="calibration images per class, taken from the start of the calibration half "
        "(files 0000-0499 of each class; default 100, i.e. 1,000 images)",
    )
    parser.add_argument(
        "--out-dir",
        default=str(harness.DEFAULT_RESULTS),
        help="where to write structured_quality.md/.json (default benchmarks/results)",
    )
    parser.add_argument(
        "--methods",
        type=lambda text: [part.strip() for part in text.split(",") if part.strip()],
        default=[],
        help="comma-separated parts of row labels to run (default: every row); e.g. "
        "'lrf activations,merge weights,Torch-Pruning'. A same-budget L1 row needs the row "
        "it copies",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the passes do")
    args = parser.parse_args(argv)
    if not 1 <= args.calibration_per_class <= 500:
        parser.error("--calibration-per-class must be in 1..500 (the calibration half)")
    if any(not 0.0 < t <= 1.0 for t in args.targets):
        parser.error("--targets must be fractions in (0, 1]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.setup_logging(args.verbose)
    result = run(args)
    markdown = to_markdown(result)
    harness.write_results(Path(args.out_dir), args.name, markdown, result)
    print()
    print(markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
