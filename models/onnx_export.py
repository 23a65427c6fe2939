"""Export a trained PyTorch classifier to the ONNX layout the shipped models share.

Used by the training scripts beside it (run as ``python models/<script>.py``, so this folder is
on ``sys.path``). ``TrainingMode.PRESERVE`` on a module in eval mode, without constant folding,
exports inference-mode BatchNormalization nodes instead of folding them into the convolutions,
so the shipped models exercise canonicalization's BN folding. The file is written to a
temporary name beside the target and renamed when complete.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from onnxcompress.graph.model_io import publish

OPSET = 17
# The ONNX Runtime wheels the project supports read IR version 10 at most.
MAX_IR_VERSION = 10


def export_classifier(
    model: nn.Module, path: Path, sample: np.ndarray, metadata: Mapping[str, str]
) -> None:
    """Write ``model`` to ``path`` with input ``input``, output ``logits``, a dynamic batch and
    ``metadata`` as model properties; checked against the module's own output on ``sample``."""
    model.eval()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter is chosen on purpose: it keeps BatchNormalization nodes.
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            # A strided Slice (option-A shortcuts) cannot be constant-folded; nothing to fold.
            warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
            torch.onnx.export(
                model,
                (torch.from_numpy(sample),),
                tmp_name,
                dynamo=False,
                opset_version=OPSET,
                input_names=["input"],
                output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                training=torch.onnx.TrainingMode.PRESERVE,
                do_constant_folding=False,
            )
        proto = onnx.load(tmp_name)
        proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
        onnx.helper.set_model_props(proto, dict(metadata))
        onnx.checker.check_model(proto, full_check=True)
        if not any(node.op_type == "BatchNormalization" for node in proto.graph.node):
            raise RuntimeError("the export folded BatchNormalization; it should be kept")
        onnx.save(proto, tmp_name)
        check_against_torch(model, tmp_name, sample)
        publish(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


@torch.no_grad()
def check_against_torch(model: nn.Module, onnx_path: str, x: np.ndarray) -> None:
    """The exported file computes what the module does (to 1e-4 relative)."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"input": x})
    expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
