"""Issue 20's anchor: the plain PyTorch route, Torch-Pruning L1 on the shared ResNet-20 weights.

The benchmarks that compare against it (``structured_quality.py`` without fine-tuning,
``recovery_anchor.py`` with it) build the anchor here, so both use one pruning setting:

- the PyTorch module of ``../shared/models/cifar_resnet.py`` with ``resnet20_cifar10.pt``;
- Torch-Pruning's ``MagnitudePruner`` with its L1 importance (``p=1``, the library's defaults
  otherwise), BatchNorm kept;
- only the residual blocks' inner channels (each block's ``conv1``): cutting the option-A
  residual streams builds broken models in Torch-Pruning (``../shared/METHODS.md``);
- the same fraction of every block, bisected until the MACs (counted by this project, on the
  ONNX export) reach the target or just below.

Torch-Pruning is an optional extra (``pip install -e '.[anchors]'``), never a runtime
dependency of onnxcompress; ``available()`` says whether it is installed.
"""

from __future__ import annotations

import copy
import importlib.util
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np

EXAMPLE_SHAPE = (1, 3, 32, 32)
# Bisection steps on the pruning ratio; 12 halvings resolve a ratio to 0.0003 (a fraction of a
# channel on a 64-channel block).
BISECTION_STEPS = 12


def available() -> bool:
    return importlib.util.find_spec("torch_pruning") is not None


def load_resnet(shared: Path, depth: int = 20) -> Any:
    """The shared CIFAR ResNet module with the trained weights, in eval mode."""
    models = shared / "models"
    spec = importlib.util.spec_from_file_location("cifar_resnet", models / "cifar_resnet.py")
    if spec is None or spec.loader is None:
        raise SystemExit(f"{models / 'cifar_resnet.py'}: not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load(depth, models / f"resnet{depth}_cifar10.pt")


def inner_convs(network: Any) -> list[Any]:
    """Each residual block's first conv: the only convs whose outputs the anchor cuts."""
    return [
        block.conv1 for stage in (network.layer1, network.layer2, network.layer3) for block in stage
    ]


def prune_inner_l1(network: Any, ratio: float) -> Any:
    """A copy of ``network`` with ``ratio`` of every block's inner channels cut by L1 norm."""
    import torch
    import torch_pruning as tp

    student = copy.deepcopy(network).eval()
    if ratio <= 0:
        return student
    keep = {id(conv) for conv in inner_convs(student)}
    ignored = [
        module
        for module in student.modules()
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear) and id(module) not in keep
    ]
    pruner = tp.pruner.MagnitudePruner(
        student,
        torch.randn(*EXAMPLE_SHAPE),
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=ignored,
    )
    pruner.step()
    return student.eval()


def to_onnx(network: Any) -> Any:
    """The module as an ``onnx_ir`` model through this project's loader (BatchNorm folded by
    ``canonicalize``, as every model the passes see)."""
    import onnx
    import onnx_ir as ir
    import torch

    from onnxcompress.graph.canonicalize import canonicalize

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            network.eval(),
            (torch.zeros(EXAMPLE_SHAPE),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    model = ir.serde.deserialize_model(onnx.load_from_string(buffer.getvalue()))
    canonicalize(model)
    return model


def prune_to_macs(network: Any, target: float) -> tuple[Any, Any, float]:
    """Bisect the uniform ratio so the export keeps at most ``target`` of the original's MACs
    (the largest such ratio's complement: as many MACs as the target allows).

    Returns the pruned module, its ONNX model and the ratio.
    """
    from onnxcompress.graph.metrics import model_metrics

    base = model_metrics(to_onnx(network)).macs
    low, high = 0.0, 0.95
    best = prune_inner_l1(network, high)
    best_model = to_onnx(best)
    if model_metrics(best_model).macs > target * base:
        raise RuntimeError(f"inner channels alone cannot reach {target} of the MACs")
    best_ratio = high
    for _ in range(BISECTION_STEPS):
        middle = (low + high) / 2
        candidate = prune_inner_l1(network, middle)
        model = to_onnx(candidate)
        if model_metrics(model).macs <= target * base:
            high, best, best_model, best_ratio = middle, candidate, model, middle
        else:
            low = middle
    return best, best_model, best_ratio


def check_export(network: Any, model: Any, x: np.ndarray) -> None:
    """The ONNX model computes what the module does (to 1e-4 relative)."""
    import torch

    from onnxcompress.runtime.session import make_session

    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()
    got = make_session(model).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
