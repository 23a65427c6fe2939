"""Op families and domains that graph code tests nodes against, each defined once.

One definition keeps what counts as a standard op or a MAC-bearing layer from drifting apart.
"""

from __future__ import annotations

# The domains of the standard ONNX ops: "ai.onnx" is the explicit spelling of "".
DEFAULT_DOMAINS: tuple[str, ...] = ("", "ai.onnx")
# The ops that hold a CNN's weights and MACs: the layers resection counts and the only ones whose
# MACs metrics counts (every other op contributes 0 and is not listed as a layer).
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})
