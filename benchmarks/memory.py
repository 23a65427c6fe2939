"""Memory benchmark: compress a 1 GB+ model kept in external data, peak RSS against its size.

The README's claim (issue 9): a model whose weights live in an external data file is
compressed with a peak resident set under 3x the model's size. The model is a wide VGG-style
stack of 3x3 convolutions built here with random (He-scaled) weights, written layer by layer
so the builder itself never holds the whole model. ``onnxcompress compress`` runs in a child
process; its peak RSS comes from ``getrusage(RUSAGE_CHILDREN)`` of a wrapper that runs only
that child, so nothing else the benchmark does is counted.

    .venv/bin/python benchmarks/memory.py                        # 1.09 GB model, lrf ratio 0.25
    .venv/bin/python benchmarks/memory.py --width 512 --layers 3  # a quick small run
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    DEFAULT_RESULTS,
    command_line,
    machine_state,
    markdown_table,
    setup_logging,
    write_results,
)

logger = logging.getLogger("memory")

LIMIT_FACTOR = 3.0
DEFAULT_PASS = "lrf:ratio=0.25"
# Peak RSS of the wrapper's children, in bytes; ru_maxrss is in KiB on Linux.
_WRAPPER = """
import resource, subprocess, sys, json, time
start = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
print(json.dumps({"returncode": code, "peak_rss": peak, "seconds": seconds}))
"""


def build_wide_vgg(
    folder: Path,
    *,
    width: int = 2048,
    layers: int = 8,
    size: int = 4,
    classes: int = 10,
    seed: int = 0,
) -> Path:
    """Write ``folder/wide_vgg.onnx`` with its weights in ``wide_vgg.onnx.data``.

    ``layers`` convolutions of ``width`` channels (3x3, padding 1, ReLU) on a ``size`` x
    ``size`` RGB input, then global average pooling and a classifier. The default holds
    1.09 GB of float32 weights. Weights are written one tensor at a time.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "wide_vgg.onnx"
    data_name = f"{path.name}.data"
    rng = np.random.default_rng(seed)
    initializers: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []
    offset = 0
    with open(folder / data_name, "wb") as data:

        def external(name: str, array: np.ndarray) -> str:
            nonlocal offset
            raw = np.ascontiguousarray(array, dtype=np.float32)
            data.write(raw.tobytes())
            tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=raw.shape)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (
                ("location", data_name),
                ("offset", str(offset)),
                ("length", str(raw.nbytes)),
            ):
                tensor.external_data.add(key=key, value=value)
            offset += raw.nbytes
            initializers.append(tensor)
            return name

        previous, channels = "input", 3
        for index in range(layers):
            fan_in = channels * 9
            weight = rng.standard_normal((width, channels, 3, 3), dtype=np.float32)
            weight *= np.float32(np.sqrt(2.0 / fan_in))
            w = external(f"conv{index}.weight", weight)
            del weight
            b = external(f"conv{index}.bias", rng.standard_normal(width) * 0.01)
            nodes.append(
                helper.make_node(
                    "Conv", [previous, w, b], [f"conv{index}"], pads=[1] * 4, name=f"conv{index}"
                )
            )
            nodes.append(
                helper.make_node("Relu", [f"conv{index}"], [f"relu{index}"], name=f"relu{index}")
            )
            previous, channels = f"relu{index}", width
        nodes.append(helper.make_node("GlobalAveragePool", [previous], ["pool"], name="pool"))
        nodes.append(helper.make_node("Flatten", ["pool"], ["flat"], name="flatten"))
        fc_w = external("fc.weight", rng.standard_normal((classes, width)) / np.sqrt(width))
        fc_b = external("fc.bias", np.zeros(classes))
        nodes.append(
            helper.make_node("Gemm", ["flat", fc_w, fc_b], ["output"], transB=1, name="fc")
        )
    graph = helper.make_graph(
        nodes,
        "wide_vgg",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3, size, size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", classes])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    # The proto alone is a few KB: initializers hold only their external-data references.
    path.write_bytes(model.SerializeToString())
    return path


def model_bytes(path: Path) -> int:
    """Bytes on disk of the model file plus its external data file(s)."""
    proto = onnx.load(str(path), load_external_data=False)
    locations = {
        entry.value
        for tensor in proto.graph.initializer
        for entry in tensor.external_data
        if entry.key == "location"
    }
    return path.stat().st_size + sum((path.parent / loc).stat().st_size for loc in locations)


def measure(command: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``command`` in a fresh wrapper; its exit code, peak RSS (bytes) and wall seconds."""
    result = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *command],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def compress_command(model: Path, output: Path, pass_spec: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "onnxcompress.cli",
        "compress",
        str(model),
        "-o",
        str(output),
        "--pass",
        pass_spec,
        "--quiet",
        "--force",
    ]


def run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        model = build_wide_vgg(folder, width=args.width, layers=args.layers, size=args.size)
        build_seconds = time.perf_counter() - start
        size = model_bytes(model)
        logger.info("built %s: %.3f GB in %.1f s", model, size / 1e9, build_seconds)
        output = folder / "compressed.onnx"
        result = measure(compress_command(model, output, args.pass_spec))
        if result["returncode"] != 0:
            raise SystemExit(f"compress failed with exit code {result['returncode']}")
        out_size = model_bytes(output)
    return {
        "model": f"wide VGG: {args.layers} x conv3x3 {args.width} channels, input {args.size}x"
        f"{args.size}",
        "pass": args.pass_spec,
        "model_bytes": size,
        "output_bytes": out_size,
        "peak_rss_bytes": result["peak_rss"],
        "peak_over_size": result["peak_rss"] / size,
        "limit_factor": LIMIT_FACTOR,
        "within_limit": result["peak_rss"] < LIMIT_FACTOR * size,
        "seconds": round(result["seconds"], 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--size", type=int, default=4, help="input height and width")
    parser.add_argument("--pass", dest="pass_spec", default=DEFAULT_PASS)
    parser.add_argument("--work", default=None, help="folder for the temporary model")
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    state = machine_state()
    row = run(args)
    markdown = "\n".join(
        [
            "# Peak memory compressing a model with external data",
            "",
            markdown_table(
                ["model", "pass", "model size", "output size", "peak RSS", "peak / size", "time"],
                [
                    [
                        row["model"],
                        row["pass"],
                        f"{row['model_bytes'] / 1e9:.3f} GB",
                        f"{row['output_bytes'] / 1e9:.3f} GB",
                        f"{row['peak_rss_bytes'] / 1e9:.3f} GB",
                        f"{row['peak_over_size']:.2f}x (limit {LIMIT_FACTOR:.0f}x)",
                        f"{row['seconds']:.0f} s",
                    ]
                ],
            ),
            "",
            f"Command: `{command_line()}`; load average {state['load_average']}.",
        ]
    )
    print(markdown)
    if not args.no_write:
        write_results(args.out, "memory", markdown, {"result": row, "machine": state})
    return 0 if row["within_limit"] else 1


if __name__ == "__main__":
    sys.exit(main())
