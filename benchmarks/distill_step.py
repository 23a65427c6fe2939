"""Cost of one distillation training step through the torch bridge, by loss and BatchNorm.

What ``benchmarks/cheapconv.py`` trains: ResNet-20 (CIFAR-10, ``../shared/models``) with every
3x3 conv after the stem made depthwise-separable (closed form, no data), distilled from the
original. One step = the teacher's forward (no grad), the student's forward and backward, an
SGD update, at the cheapconv benchmark's batch size, channels-last batches (as ``finetune``
feeds them). Variants:

* ``kd``: logits only (``distillation_loss``);
* ``hint``: plus the relative-MSE hint at every replaced conv's output (18 tensors), with the
  bridge's ``hint_loss``;
* ``hint (F.mse_loss)``: the same hint written with ``F.mse_loss``, as ``finetune`` did before
  2026-11-22 (its backward hands channels-last activations an NCHW gradient);
* each with ``+ bn`` (a BatchNormalization after every conv, ``FinetuneConfig.batchnorm``), and
  ``+ bn pointwise``: BN after the 1x1 convs only (none after the depthwise ones);
* ``teacher in ORT``: the teacher's forward in ONNX Runtime (``RuntimeTeacher`` below), the
  others run it through the bridge, as ``finetune`` does.

Steps of all variants alternate after a warm-up, so load from other jobs hits them alike;
medians are reported, with the ratio to ``kd``.

    .venv/bin/python benchmarks/distill_step.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F

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
from onnxcompress.graph.model_io import clone_model, model_to_bytes
from onnxcompress.passes import create_pass
from onnxcompress.runtime.capture import with_extra_outputs
from onnxcompress.torch_bridge import OnnxModule
from onnxcompress.torch_bridge.batchnorm import insert_batchnorms
from onnxcompress.torch_bridge.distillation_losses import distillation_loss, hint_loss

# variant -> (hint form or None, BatchNorm placement or None, teacher runtime)
VARIANTS: dict[str, tuple[str | None, str | None, str]] = {
    "kd": (None, None, "torch"),
    "kd + bn": (None, "all", "torch"),
    "hint (F.mse_loss)": ("mse_loss", None, "torch"),
    "hint": ("bridge", None, "torch"),
    "hint (F.mse_loss) + bn": ("mse_loss", "all", "torch"),
    "hint + bn": ("bridge", "all", "torch"),
    "hint + bn pointwise": ("bridge", "pointwise", "torch"),
    "kd, teacher in ORT": (None, None, "onnxruntime"),
    "hint + bn pointwise, teacher in ORT": ("bridge", "pointwise", "onnxruntime"),
}


class BridgeTeacher:
    """The teacher through the torch bridge, as ``finetune`` runs it: (logits, hints)."""

    def __init__(self, model: Any, hints: list[str]) -> None:
        self.module = OnnxModule(model, trainable="none").eval()
        self.hints = hints

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if not self.hints:
            return self.module(x), []
        logits, captured = self.module(x, capture=self.hints)
        return logits, [captured[name] for name in self.hints]


class RuntimeTeacher:
    """The teacher's forward in ONNX Runtime (hints as extra graph outputs, handed back
    channels-last like the student's activations). Alone, ORT runs ResNet-20 at batch 64 in
    ~30 ms against the bridge's ~45 (2 threads); taking turns with torch's training ops in one
    process it gained nothing (results below), so ``finetune`` keeps the bridge."""

    def __init__(self, model: Any, hints: list[str]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        # No busy-waiting workers: they would hold the cores torch's next ops need (with them
        # the teacher-in-ORT step was 1.6x a bridge one).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        probe = model_to_bytes(with_extra_outputs(model, hints))
        self.session = ort.InferenceSession(probe, options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name
        self.outputs = [model.graph.outputs[0].name, *hints]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        results = self.session.run(self.outputs, {self.input: x.contiguous().numpy()})
        tensors = [torch.from_numpy(array) for array in results]
        hints = [t.contiguous(memory_format=torch.channels_last) for t in tensors[1:]]
        return tensors[0], hints


def mse_loss_hint(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The relative MSE as ``finetune`` wrote it before 2026-11-22 (for comparison only)."""
    t = teacher.float()
    return F.mse_loss(student.float(), t, reduction="sum") / t.pow(2).sum().clamp_min(1e-12)


def distillation_step(
    student_model: Any,
    teacher_model: Any,
    hints: list[str],
    variant: str,
    batch: int,
    seed: int,
) -> Callable[[], None]:
    """One distillation SGD step of ``student_model`` (a copy of its own: BatchNorms go in
    place), as ``variant`` says."""
    hint_form, batchnorm, runtime = VARIANTS[variant]
    teacher: Any = (
        RuntimeTeacher(teacher_model, hints)
        if runtime == "onnxruntime"
        else BridgeTeacher(teacher_model, hints)
    )
    generator = np.random.default_rng(seed)
    if batchnorm is not None:
        images = generator.standard_normal((128, 3, 32, 32)).astype(np.float32)

        def select(name: str) -> bool:
            return batchnorm == "all" or not name.endswith("/depthwise")

        insert_batchnorms(student_model, images, select)
    torch.manual_seed(seed)
    student = OnnxModule(student_model).train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.001, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    term = mse_loss_hint if hint_form == "mse_loss" else hint_loss

    def step() -> None:
        with torch.no_grad():
            teacher_logits, teacher_hints = teacher(x)
        if hint_form:
            logits, student_hints = student(x, capture=hints)
        else:
            logits, student_hints = student(x), {}
        loss = distillation_loss(logits, teacher_logits, 4.0)
        if hint_form:
            terms = [
                term(student_hints[name], hint)
                for name, hint in zip(hints, teacher_hints, strict=True)
            ]
            loss = loss + 10.0 * torch.stack(terms).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shared", type=Path, default=DEFAULT_SHARED)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=15, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
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
    separable = clone_model(original)
    create_pass("cheapconv", {"kind": "separable", "init": "weights"})(separable)
    # The replacement's 1x1 keeps the replaced conv's output name (as cheapconv.py hints).
    hints = [
        node.outputs[0].name
        for node in separable.graph
        if (node.name or "").endswith("/pointwise") and node.outputs[0].name
    ]
    steps: dict[str, Callable[[], None]] = {}
    for variant, (hint_form, _, _) in VARIANTS.items():
        steps[variant] = distillation_step(
            clone_model(separable), original, hints if hint_form else [], variant, args.batch, 0
        )
    times, _ = time_alternating(steps, args.steps)
    base = statistics.median(times["kd"])
    rows = []
    for variant, measured in times.items():
        median = statistics.median(measured)
        rows.append(
            [
                variant,
                f"{1000 * median:.0f}",
                f"{args.batch / median:.0f}",
                f"{median / base:.2f}x",
            ]
        )
        print(rows[-1])
    state_after = machine_state()
    markdown = "\n\n".join(
        [
            "# Distillation step cost: separable ResNet-20 student, ResNet-20 teacher (CPU)",
            f"One step (teacher forward, student forward and backward, SGD update) at batch "
            f"{args.batch}, {args.threads} torch threads, one process, channels-last batches; "
            f"{args.steps} alternating timed steps per variant after 3 warm-up steps, medians. "
            "hint: relative MSE at the 18 replaced convs' outputs, weight 10; bn: a "
            "BatchNormalization after every conv (pointwise: after the 1x1 convs only); the "
            "teacher runs through the bridge unless ORT is named.",
            markdown_table(["variant", "ms/step", "img/s", "time vs kd"], rows),
            f"Conditions: {load_text(state)} at the start, {load_text(state_after)} at the end; "
            f"torch {torch.__version__}.",
            f"Reproduce: `{command_line()}`",
        ]
    )
    payload = {
        "batch": args.batch,
        "threads": args.threads,
        "variants": {v: {"median_s": statistics.median(t), "times": t} for v, t in times.items()},
        "machine_before": state,
        "machine_after": state_after,
    }
    write_results(args.out_dir, "distill_step", markdown, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
