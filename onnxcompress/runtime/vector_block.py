"""The vector block of the machine a model will run on: how many channels its kernels do at once.

ONNX Runtime's CPU provider lays convolutions out in blocks of channels (NCHWc) as wide as one
vector register: 16 floats with AVX-512, 8 with AVX2. A layer whose width is not a multiple of
the block runs as slowly as the next multiple, or falls back to a slower kernel: measured on
an AVX-512 CPU, a 64-to-52-channel 3x3 conv took 0.046 ms and 64-to-48 0.035 ms. Widths that
sit on the block are what makes removed MACs turn into saved time.

The block is read from the CPU's feature flags, not assumed. ``ONNXCOMPRESS_VECTOR_BLOCK``
overrides it (the test suite sets it, so results do not depend on which CPU runs the tests).
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path

from onnxcompress.errors import PassConfigError

# Channels per block by instruction set, as ONNX Runtime's MLAS NCHWc kernels use them.
BLOCK_BY_ISA = {"avx512": 16, "avx2": 8, "avx": 8, "neon": 8, "generic": 8}
# GPUs: tensor-core and vectorized loads favour multiples of 8 channels (fp16/fp32 tiles).
GPU_BLOCK = 8
OVERRIDE_ENV = "ONNXCOMPRESS_VECTOR_BLOCK"


def cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> set[str]:
    """The feature flags of the first CPU in ``cpuinfo`` (empty where there is no such file)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def detect_isa(flags: Iterable[str] | None = None, machine: str | None = None) -> str:
    """``avx512``, ``avx2``, ``avx``, ``neon`` or ``generic``, from the CPU's feature flags."""
    machine = (machine or platform.machine()).lower()
    if machine in ("arm64", "aarch64"):
        return "neon"
    found = set(cpu_flags() if flags is None else flags)
    if "avx512f" in found:
        return "avx512"
    if "avx2" in found and "fma" in found:
        return "avx2"
    if "avx" in found:
        return "avx"
    return "generic"


def vector_block(provider: str | None = None, isa: str | None = None) -> int:
    """Channels per block for ``provider`` (``cpu`` unless a GPU provider is named).

    Raises:
        PassConfigError: ``ONNXCOMPRESS_VECTOR_BLOCK`` is set to something other than a positive
            integer.
    """
    override = os.environ.get(OVERRIDE_ENV)
    if override:
        if not override.isdigit() or int(override) < 1:
            raise PassConfigError(f"{OVERRIDE_ENV}={override!r}: give a positive integer")
        return int(override)
    if provider and provider.lower() not in ("cpu", "cpuexecutionprovider"):
        return GPU_BLOCK
    return BLOCK_BY_ISA[isa or detect_isa()]


__all__ = ["BLOCK_BY_ISA", "GPU_BLOCK", "cpu_flags", "detect_isa", "vector_block"]
