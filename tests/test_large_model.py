"""A 1 GB+ model with external data is compressed with peak memory under 3x its size.

The model (a wide VGG-style stack of 3x3 convolutions, random weights) is built by
``benchmarks/memory.py`` in a temporary folder; ``onnxcompress compress`` runs in a child
process whose peak RSS is read with ``getrusage(RUSAGE_CHILDREN)`` in a wrapper that runs only
that child. Slow (about a minute of compute, 2 GB of disk): ``pytest -m slow``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import memory  # benchmarks/memory.py

pytestmark = pytest.mark.slow


def test_one_gigabyte_model_compresses_within_three_times_its_size(tmp_path: Path) -> None:
    model = memory.build_wide_vgg(tmp_path, width=2048, layers=8, size=4)
    size = memory.model_bytes(model)
    assert size > 1e9
    output = tmp_path / "compressed.onnx"
    result = memory.measure(
        memory.compress_command(model, output, memory.DEFAULT_PASS), timeout=1800
    )
    peak = result["peak_rss"]
    print(
        f"\nmodel {size / 1e9:.3f} GB, peak RSS {peak / 1e9:.3f} GB "
        f"({peak / size:.2f}x), {result['seconds']:.0f} s"
    )
    assert result["returncode"] == 0
    assert peak < memory.LIMIT_FACTOR * size, f"peak RSS {peak / size:.2f}x the model's size"
    # the output keeps its weights in a data file of its own and runs
    assert (tmp_path / "compressed.onnx.data").exists()
    assert memory.model_bytes(output) < size
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": np.ones((1, 3, 4, 4), np.float32)})[0]
    assert out.shape == (1, 10) and np.isfinite(out).all()
