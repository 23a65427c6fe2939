"""Training-step speed of the torch bridge by memory layout and precision, on CPU.

Chooses how ``finetune`` feeds batches (``FinetuneConfig.channels_last``): one forward +
backward + SGD step of ResNet-20 (CIFAR-10, ``../shared/models``) and of its depthwise-separable
version (``cheapconv:kind=separable``, closed form, no data) through ``OnnxModule``, with

* ``nchw``: the batch as it comes (contiguous NCHW);
* ``channels_last``: the same values in NHWC memory order;
* ``bf16``: NCHW under CPU bfloat16 autocast;
* ``compile``: ``torch.compile`` of the module (NCHW), opt-in with ``--compile`` (minutes of
  compilation).

Steps of all variants alternate after a warm-up, so load from other jobs hits them alike;
medians are reported, with the ratio to ``nchw``.

    .venv/bin/python benchmarks/train_layout.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    DEFAULT_SHARED,
    command_line,
    load_text,
    machine_state,
    markdown_table,
    resnet20_path,
    setup_logging,
    time_alternating,
    write_results,
)

from onnxcompress.graph.canonicalize import load_canonical
from onnxcompress.passes import create_pass
from onnxcompress.torch_bridge import OnnxModule


def training_step(model: Any, variant: str, batch: int, seed: int) -> Callable[[], None]:
    """One SGD step of ``model`` through the bridge, fed as ``variant`` says."""
    torch.manual_seed(seed)
    module = OnnxModule(model).train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    network: Any = torch.compile(module) if variant == "compile" else module
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    if variant == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        if variant == "bf16":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = network(x)
        else:
            out = network(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    torch.set_num_threads(args.threads)
    path = resnet20_path(args.shared)
    if not path.exists():
        print(f"{path} is absent: the shared models folder is needed", file=sys.stderr)
        return 2
    state = machine_state()
    original, _ = load_canonical(path)
    separable, _ = load_canonical(path)
    create_pass("cheapconv", {"kind": "separable", "init": "weights"})(separable)
    variants = ["nchw", "channels_last", "bf16"] + (["compile"] if args.compile else [])
    rows: list[list[str]] = []
    payload: dict[str, Any] = {"batch": args.batch, "threads": args.threads, "models": {}}
    for name, model in (("resnet20", original), ("resnet20 separable", separable)):
        steps = {v: training_step(model, v, args.batch, seed=0) for v in variants}
        times, warmup = time_alternating(steps, args.steps)
        base = statistics.median(times["nchw"])
        payload["models"][name] = {
            v: {"median_s": statistics.median(t), "warmup_s": warmup[v], "times": t}
            for v, t in times.items()
        }
        for variant in variants:
            median = statistics.median(times[variant])
            rows.append(
                [
                    name,
                    variant,
                    f"{1000 * median:.0f}",
                    f"{args.batch / median:.0f}",
                    f"{base / median:.2f}x",
                ]
            )
            print(rows[-1])
    state_after = machine_state()
    markdown = "\n\n".join(
        [
            "# Bridge training step by memory layout and precision (CPU)",
            f"One SGD step (forward, backward, update) at batch {args.batch}, {args.threads} "
            f"torch threads, one process; {args.steps} alternating timed steps per variant "
            "after 3 warm-up steps, medians.",
            markdown_table(["model", "variant", "ms/step", "img/s", "speed vs nchw"], rows),
            f"Conditions: {load_text(state)} at the start, {load_text(state_after)} at the end; "
            f"torch {torch.__version__}.",
            f"Reproduce: `{command_line()}`",
        ]
    )
    payload.update(machine_before=state, machine_after=state_after)
    write_results(args.out_dir, "train_layout", markdown, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
