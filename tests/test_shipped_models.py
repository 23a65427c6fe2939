"""The trained models shipped in ``models/`` are valid ONNX of the documented shape and run."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

RESNET32 = Path(__file__).resolve().parent.parent / "models" / "resnet32_cifar10.onnx"


def test_resnet32_is_valid_with_documented_layers_and_runs() -> None:
    proto = onnx.load(RESNET32)
    onnx.checker.check_model(proto, full_check=True)
    ops = Counter(node.op_type for node in proto.graph.node)
    # Stem + 15 blocks of two 3x3 convs, BatchNormalization kept; option-A shortcuts, no 1x1.
    assert (ops["Conv"], ops["BatchNormalization"], ops["Gemm"], ops["Add"]) == (31, 31, 1, 15)
    assert proto.ir_version <= 10
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert metadata["onnxcompress.dataset"] == "cifar10"

    session = ort.InferenceSession(str(RESNET32), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = np.random.default_rng(0).standard_normal((5, 3, 32, 32), dtype=np.float32)
    (logits,) = session.run(None, {"input": x})
    assert logits.shape == (5, 10)
    assert np.isfinite(logits).all()
