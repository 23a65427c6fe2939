"""Bridge overhead: a training step of resnet18 through ``OnnxModule`` against native torchvision.

The torch bridge runs ONNX graphs node by node with torch functional ops; this measures what
that costs in training (forward + backward + SGD step) on CPU, like for like:

* ``bn``: exported with BatchNormalization kept (TrainingMode.PRESERVE) vs the native module;
* ``folded``: exported as a user gets it (BN folded into the convs) vs the native module with
  conv+BN fused the same way.

Steps of the two models alternate (3 warm-up, then ``--steps`` timed each), so load from other
jobs hits both alike; medians are reported. Target: OnnxModule at least 0.7x as fast.

    .venv/bin/python benchmarks/bridge_overhead.py               # writes benchmarks/results
    .venv/bin/python benchmarks/bridge_overhead.py --size 224 --steps 10
"""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    command_line,
    load_text,
    machine_state,
    markdown_table,
    randomize_batchnorm,
    setup_logging,
    write_results,
)

from onnxcompress.graph.model_io import load_model
from onnxcompress.torch_bridge import OnnxModule

logger = logging.getLogger("bridge_overhead")
TARGET_RATIO = 0.7


def native_resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(weights=None)
    randomize_batchnorm(model)
    return model


def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm into the conv before it, as the ONNX export does (eval statistics)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model.eval()
    for parent in model.modules():
        names = list(parent._modules)
        for first, second in itertools.pairwise(names):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[first] = fuse_conv_bn_eval(conv, bn)
                parent._modules[second] = nn.Identity()
    return model


def export(model: nn.Module, path: Path, size: int, keep_bn: bool) -> Path:
    model.eval()
    extra: dict[str, Any] = (
        {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
        if keep_bn
        else {}
    )
    torch.onnx.export(
        model,
        (torch.randn(1, 3, size, size),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        **extra,
    )
    return path


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], float]:
    """One SGD training step of ``model``; returns its wall time in seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9)
    model.train()

    def step() -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - start

    return step


def compare(
    native: nn.Module, bridged: nn.Module, batch: int, size: int, warmup: int, steps: int
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, size, size, generator=generator)
    y = torch.randint(0, 1000, (batch,), generator=generator)
    native_step, bridged_step = make_step(native, x, y), make_step(bridged, x, y)
    native_times, bridged_times = [], []
    for i in range(warmup + steps):
        # Alternate which goes first so neither always follows the other's cache state.
        order = [(native_step, native_times), (bridged_step, bridged_times)]
        for step, times in order if i % 2 == 0 else reversed(order):
            elapsed = step()
            if i >= warmup:
                times.append(elapsed)
    native_ms = statistics.median(native_times) * 1e3
    bridged_ms = statistics.median(bridged_times) * 1e3
    return {
        "native_ms": round(native_ms, 1),
        "onnx_module_ms": round(bridged_ms, 1),
        "speed_ratio": round(native_ms / bridged_ms, 3),
        "native_ms_all": [round(t * 1e3, 1) for t in native_times],
        "onnx_module_ms_all": [round(t * 1e3, 1) for t in bridged_times],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=112, help="input height = width")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument(
        "--threads", default="2,1", help="comma-separated torch thread counts (default 2,1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    state_before = machine_state()

    rows, results = [], {}
    labels = {
        "bn": "BatchNorm kept (exported with TrainingMode.PRESERVE) vs torchvision",
        "folded": "BN folded (default export) vs torchvision with conv+BN fused",
    }
    with tempfile.TemporaryDirectory() as folder:
        for variant in ("bn", "folded"):
            native = native_resnet18(args.seed)
            path = export(native, Path(folder) / f"{variant}.onnx", args.size, variant == "bn")
            if variant == "folded":
                native = fuse_conv_bn(native)
            bridged = OnnxModule(load_model(path))
            for threads in thread_counts:
                torch.set_num_threads(threads)
                logger.info("%s, %d threads: timing %d steps of each", variant, threads, args.steps)
                result = compare(native, bridged, args.batch, args.size, args.warmup, args.steps)
                results[f"{variant}/threads={threads}"] = result
                rows.append(
                    [
                        labels[variant],
                        str(threads),
                        f"{result['native_ms']:.1f}",
                        f"{result['onnx_module_ms']:.1f}",
                        f"{result['speed_ratio']:.2f}x",
                        "yes" if result["speed_ratio"] >= TARGET_RATIO else "no",
                    ]
                )
                print(
                    f"{variant}, {threads} threads: native {result['native_ms']:.1f} ms, "
                    f"OnnxModule {result['onnx_module_ms']:.1f} ms, "
                    f"ratio {result['speed_ratio']:.3f}"
                )
    state_after = machine_state()
    table = markdown_table(
        [
            "resnet18 training step",
            "torch threads",
            "native (ms)",
            "OnnxModule (ms)",
            "speed (native time / OnnxModule time)",
            f">= {TARGET_RATIO}x",
        ],
        rows,
    )
    markdown = "\n\n".join(
        [
            "# Torch bridge overhead: resnet18 training step on CPU",
            f"One SGD step (forward, cross-entropy, backward, update) of torchvision resnet18 "
            f"(random weights), batch {args.batch}, 3x{args.size}x{args.size}, "
            f"torch threads {args.threads}; {args.warmup} warm-up and {args.steps} timed steps "
            "per model, the two models alternating; medians.",
            table,
            f"Conditions: {load_text(state_before)} before, {load_text(state_after)} after; "
            f"torch {torch.__version__}, torchvision {torchvision.__version__}.",
            f"Reproduce: `{command_line()}`",
        ]
    )
    write_results(
        args.out_dir,
        "bridge_overhead",
        markdown,
        {
            "batch": args.batch,
            "size": args.size,
            "threads": args.threads,
            "warmup": args.warmup,
            "steps": args.steps,
            "target_ratio": TARGET_RATIO,
            "results": results,
            "machine_before": state_before,
            "machine_after": state_after,
            "torch": torch.__version__,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
