"""What the benchmark scripts share: torchvision exports, the machine's state, result files.

Each script in ``benchmarks/`` measures one claim of the project; this keeps their exports,
their record of the conditions (load average, versions) and their output format identical.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED = REPO_ROOT.parent / "shared"
DEFAULT_RESULTS = REPO_ROOT / "benchmarks" / "results"

CIFAR_NORMALIZE = "mean=0.485,0.456,0.406&std=0.229,0.224,0.225"


def cifar10_spec(shared: Path, per_class: str) -> str:
    """Dataset spec of the CIFAR-10 JPEG test split, files ``per_class`` of every class.

    ``0:500`` is the calibration half, ``500:1000`` the evaluation half
    (``../shared/data/README.md``).
    """
    archive = shared / "data" / "cifar10-jpeg.tar.gz"
    return f"folder:{archive}/cifar10-jpeg/test?per_class={per_class}&{CIFAR_NORMALIZE}"


def cifar10_train_spec(shared: Path, per_class: str | None = None) -> str:
    """Dataset spec of the CIFAR-10 JPEG training split (``per_class``: a slice of each class)."""
    archive = shared / "data" / "cifar10-jpeg.tar.gz"
    select = f"per_class={per_class}&" if per_class else ""
    return f"folder:{archive}/cifar10-jpeg/train?{select}{CIFAR_NORMALIZE}"


def resnet20_path(shared: Path) -> Path:
    return shared / "models" / "resnet20_cifar10.onnx"


def randomize_batchnorm(model: Any, seed: int = 1) -> None:
    """Give BatchNorm layers trained-looking statistics (fresh ones are the identity)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                assert module.weight is not None and module.bias is not None
                assert module.running_mean is not None and module.running_var is not None
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


def export_torchvision(name: str, path: Path, *, size: int = 224, seed: int = 0) -> Path:
    """Export ``torchvision.models.<name>`` (random weights, seeded) with the TorchScript exporter.

    Same recipe as ``tests/zoo.py``: eval mode, opset 17, input ``input`` with a dynamic batch.
    Reuses ``path`` when it already exists.
    """
    if path.exists():
        return path
    import torch
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None)
    randomize_batchnorm(model)
    model.eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial.onnx")
    torch.onnx.export(
        model,
        (torch.randn(1, 3, size, size),),
        str(partial),
        dynamo=False,
        opset_version=17,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    os.replace(partial, path)
    return path


def machine_state() -> dict[str, Any]:
    """The conditions a timing was taken under: load, cores, versions."""
    import numpy as np
    import onnxruntime as ort

    load1, load5, load15 = os.getloadavg()
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "load_average": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def load_text(state: dict[str, Any]) -> str:
    one, five, fifteen = state["load_average"]
    return f"load average {one} / {five} / {fifteen} (1/5/15 min) on {state['cpu_count']} cores"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub table; the first column reads left-aligned, the others right-aligned."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        padded = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 2) if i == 0 else "-" * (w + 1) + ":" for i, w in enumerate(widths)
    )
    return "\n".join([line(cells[0]), rule + "|", *(line(row) for row in cells[1:])])


def command_line(processes: int = 1) -> str:
    """How this script was run, relative to the repository root where possible; with
    ``processes`` > 1, under ``torch.distributed.run`` with that many processes."""
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(REPO_ROOT))
    except ValueError:
        shown = str(script)
    python = [".venv/bin/python"]
    if processes > 1:
        python += ["-m torch.distributed.run --standalone", f"--nproc_per_node={processes}"]
    return " ".join([*python, shown, *sys.argv[1:]])


def write_results(out_dir: Path, name: str, markdown: str, payload: dict[str, Any]) -> Path:
    """Write ``<name>.md`` and ``<name>.json`` under ``out_dir``; returns the markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path = out_dir / f"{name}.md"
    md_path.write_text(markdown.rstrip() + "\n")
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    logger.info("wrote %s and %s.json", md_path, name)
    return md_path


def time_alternating(
    steps: dict[str, Callable[[], None]], repeats: int, warmup: int = 3
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Seconds of each of ``repeats`` calls per step, the steps taking turns (load from other
    jobs then hits them alike), after ``warmup`` untimed calls each; also the warm-up seconds."""
    warmup_seconds = {}
    for name, step in steps.items():
        tic = time.perf_counter()
        for _ in range(warmup):
            step()
        warmup_seconds[name] = time.perf_counter() - tic
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            tic = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - tic)
    return times, warmup_seconds


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
