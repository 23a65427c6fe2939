"""Export torchvision models to ONNX at test time (random weights, seeded).

Shared by the zoo tests of several modules so every test sees the same exports; exports are
cached per session in a temp folder because the larger ones take seconds each.
"""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

_CACHE = Path(tempfile.mkdtemp(prefix="onnxcompress-zoo-"))

# name -> constructor kwargs that make it exportable with random weights
ZOO_KWARGS: dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}


def randomize_batchnorm(model) -> None:
    """Give BatchNorm layers trained-looking statistics.

    Fresh BatchNorm is the identity (ones and zeros), so folding it changes nothing and the
    exporters deduplicate the all-zero biases: tests would see an untypical graph.
    """
    import torch

    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


@functools.cache
def export_torchvision(name: str, exporter: str = "torchscript", size: int = 224) -> Path:
    """Export ``torchvision.models.<name>`` in eval mode; returns the .onnx path.

    Args:
        exporter: ``torchscript`` (torch.onnx.export, dynamo=False) or ``dynamo``.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **ZOO_KWARGS.get(name, {}))
    randomize_batchnorm(model)
    model.eval()
    x = torch.randn(1, 3, size, size)
    path = _CACHE / f"{name}-{exporter}-{size}.onnx"
    if exporter == "torchscript":
        torch.onnx.export(
            model,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )
    elif exporter == "dynamo":
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(
            model,
            (x,),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        assert program is not None
        program.save(str(path))
    else:
        raise ValueError(exporter)
    return path
