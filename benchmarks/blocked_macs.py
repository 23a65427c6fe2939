"""Conv MACs counted the way a SIMD-blocked CPU kernel pays for them: channels rounded up.

ONNX Runtime's NCHWc convolutions work on blocks of 16 channels on AVX-512 (8 on AVX2), so a
layer cut from 16 to 8 channels costs what it did at 16. This prints, for each compressed model,
the plain MAC ratio against the original and the ratio with every conv's input and output
channels rounded up to the block: the second is what the measured speed-up follows.

    .venv/bin/python benchmarks/blocked_macs.py original.onnx compressed.onnx [...] --block 16
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import onnx
from onnx import shape_inference


def conv_macs(path: Path, block: int) -> tuple[int, int, list[int]]:
    """Plain and blocked conv MACs at batch 1, and every conv's output width."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    graph = model.graph
    values = list(graph.value_info) + list(graph.output) + list(graph.input)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    weights = {init.name: list(init.dims) for init in graph.initializer}

    def padded(channels: int) -> int:
        return math.ceil(channels / block) * block

    plain = blocked = 0
    widths = []
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        out_channels, in_per_group, *kernel = weights[node.input[1]]
        spatial = math.prod(shapes[node.output[0]][2:])
        window = math.prod(kernel)
        plain += out_channels * in_per_group * window * spatial
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        # A depthwise or grouped conv blocks over its groups, not over a per-group input.
        blocked_in = padded(in_per_group) if groups == 1 else in_per_group
        blocked += padded(out_channels) * blocked_in * window * spatial
        widths.append(out_channels)
    return plain, blocked, widths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("original", type=Path)
    parser.add_argument("compressed", type=Path, nargs="+")
    parser.add_argument("--block", type=int, default=16, help="SIMD channel block (16: AVX-512)")
    args = parser.parse_args()
    base_plain, base_blocked, _ = conv_macs(args.original, args.block)
    for path in args.compressed:
        plain, blocked, widths = conv_macs(path, args.block)
        print(
            f"{path.name}: conv MACs kept {plain / base_plain:.3f}, "
            f"blocked by {args.block}: {blocked / base_blocked:.3f}; widths {widths}"
        )


if __name__ == "__main__":
    main()
