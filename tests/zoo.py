"""Real CNN architectures for the zoo tests: torchvision exports and onnx's light model zoo.

Shared by the zoo tests of several modules so every test sees the same models (random weights,
seeded); results are cached per session in a temp folder because the larger ones take seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

_CACHE = Path(tempfile.mkdtemp(prefix="onnxcompress-zoo-"))

# name -> constructor kwargs that make it exportable with random weights
ZOO_KWARGS: dict[str, dict] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}

# The torchvision classifiers of the zoo sweeps, with the smallest input size each exports at
# cheaply: VGG and AlexNet end in a fixed 7x7 / 6x6 adaptive pool that the TorchScript exporter
# only handles when it is a plain pool (input 224); Inception v3 needs at least 75 pixels.
TORCHVISION_CLASSIFIERS: list[tuple[str, int]] = [
    ("resnet18", 64),
    ("resnet34", 64),
    ("resnet50", 64),
    ("resnext50_32x4d", 64),
    ("wide_resnet50_2", 64),
    ("vgg11_bn", 224),
    ("vgg16", 224),
    ("alexnet", 224),
    ("densenet121", 64),
    ("mobilenet_v2", 64),
    ("mobilenet_v3_large", 64),
    ("mobilenet_v3_small", 64),
    ("efficientnet_b0", 64),
    ("regnet_x_400mf", 64),
    ("regnet_y_400mf", 64),
    ("shufflenet_v2_x1_0", 64),
    ("squeezenet1_1", 64),
    ("googlenet", 64),
    ("inception_v3", 96),
    ("mnasnet1_0", 64),
    ("convnext_tiny", 64),
]


@dataclasses.dataclass(frozen=True)
class PruningLimit:
    """Why the channel passes cannot cut a zoo model by 20%, and how their report shows it.

    Attributes:
        reason_words: each appears in at least one of the reasons the pass report declines with.
        prunable_groups: the number of prunable channel groups, where that is the point.
        explanation: one sentence for the README's prunability table.
    """

    reason_words: tuple[str, ...]
    prunable_groups: int | None
    explanation: str


# What is known not to prune (lrf and merge alike, both exporters, target_macs=0.7).
KNOWN_LIMITS: dict[str, PruningLimit] = {
    "convnext_tiny": PruningLimit(
        ("LayerNormalization", "normalizes over the channel axis"),
        0,
        "channels-last blocks: every LayerNorm normalizes over the channels (removing one "
        "changes every other's normalization, so it is not cut) and the MLP's MatMuls contract "
        "them, so no group is prunable",
    ),
    "light_shufflenet": PruningLimit(
        # The shuffle's Reshape to 5-D, and the moved channel axis a Reshape then misreads.
        ("Reshape", "holds its channels on axis"),
        0,
        "channel shuffle (Reshape to 5-D, Transpose) after every grouped 1x1 conv, and grouped "
        "convs tie their input channels to their shuffled outputs: every group is frozen",
    ),
    "light_bvlc_alexnet": PruningLimit(
        ("LRN",),
        3,
        "LRN after conv1/conv2 (47% of the MACs) is frozen; conv3-5 are tied by group=2 convs "
        "into 2 units of 192 channels, which round_to=8 leaves alone; only the FC layers shrink",
    ),
}

# The model-zoo models (Caffe2 era: opset 9, IR 3) that onnx ships for its backend tests. Their
# weights are ConstantOfShape placeholders (every weight 0.02); light_model() draws real ones.
LIGHT_DIR = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data" / "light"


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
                if module.weight is None or module.bias is None:
                    continue  # affine=False: no scale and shift to draw
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(n, generator=generator) * 0.1)
                if module.running_mean is not None and module.running_var is not None:
                    module.running_mean.copy_(torch.randn(n, generator=generator) * 0.1)
                    module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)


@functools.cache
def export_torchvision(name: str, exporter: str = "torchscript", size: int = 224) -> Path:
    """Export ``torchvision.models.<name>`` in eval mode; returns the .onnx path.

    Both exporters give the model a dynamic batch axis named ``batch``, input ``input`` and
    output ``output``.

    Args:
        exporter: ``torchscript`` (torch.onnx.export, dynamo=False) or ``dynamo``.
        size: height and width of the example input.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **ZOO_KWARGS.get(name, {}))
    randomize_batchnorm(model)
    model.eval()
    path = _CACHE / f"{name}-{exporter}-{size}.onnx"
    if exporter == "torchscript":
        # The legacy exporter is deprecated but it is the one most deployed models came from.
        _export_module(model, path, size, dynamic_hw=False)
    elif exporter == "dynamo":
        # An example batch of 1 lets torch.export specialize the batch to 1 wherever a size-1
        # dim takes part in broadcasting (convnext_tiny's LayerNorm permutes), which then
        # contradicts the dynamic Dim ("Invalid ranges [2:1]"); an example batch of 2 does not.
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(
            model,
            (torch.randn(2, 3, size, size),),
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


# torchvision's segmentation models (random weights, no backbone download), with the input size
# they export at cheaply. Segmenters and detectors are usually exported with symbolic height
# and width: each is swept at a fixed size and with dynamic H/W, counted at the same size.
SEGMENTATION_MODELS: list[tuple[str, int]] = [
    ("lraspp_mobilenet_v3_large", 128),
    ("deeplabv3_mobilenet_v3_large", 128),
    ("fcn_resnet50", 96),
]
DYNAMIC_HW = "torchscript-dynamic-hw"


@functools.cache
def export_segmentation(name: str, exporter: str = "torchscript", size: int = 128) -> Path:
    """Export ``torchvision.models.segmentation.<name>`` (its ``out`` map) in eval mode.

    Input ``input`` (batch dynamic; height and width too with ``DYNAMIC_HW``), output
    ``output``.
    """
    import torch
    import torchvision

    torch.manual_seed(0)
    factory = getattr(torchvision.models.segmentation, name)
    network = factory(weights=None, weights_backbone=None)
    randomize_batchnorm(network)
    network.eval()

    class MainOutput(torch.nn.Module):
        """The segmentation map alone (torchvision returns a dict)."""

        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.network(x)["out"]

    if exporter not in ("torchscript", DYNAMIC_HW):
        raise ValueError(exporter)
    path = _CACHE / f"{name}-{exporter}-{size}.onnx"
    return _export_module(MainOutput().eval(), path, size, exporter == DYNAMIC_HW)


# timm classifiers and segmentation-models-pytorch segmenters: the ``zoo`` extra (``pip install
# -e '.[zoo]'``), never a runtime or test dependency; tests of them skip without it. Random
# weights (``pretrained=False``, ``encoder_weights=None``): nothing is downloaded.
TIMM_CLASSIFIERS: list[tuple[str, int]] = [
    ("hrnet_w18_small", 64),
    ("dla34", 64),
    ("dpn68", 64),
    ("res2net50_14w_8s", 64),
    ("repvgg_a0", 64),
    ("ghostnet_100", 64),
    ("mobilevit_xxs", 64),
    ("convnext_nano", 64),
    ("cspdarknet53", 64),
    ("rexnet_100", 64),
]
SMP_SEGMENTERS: list[tuple[str, int]] = [
    ("smp_Unet_resnet34", 128),
    ("smp_FPN_resnet34", 128),
    ("smp_DeepLabV3Plus_resnet34", 128),
]


# Ultralytics detectors and segmenters, built from their YAML configs (random weights) and
# exported by ultralytics' own ``export`` (as users do), at a fixed size and with dynamic H/W.
ULTRALYTICS_MODELS: list[tuple[str, int]] = [
    ("yolov8n", 160),
    ("yolo11n", 160),
    ("yolov8n-seg", 160),
]


@functools.cache
def export_ultralytics(name: str, exporter: str = "torchscript", size: int = 160) -> Path:
    """``YOLO("<name>.yaml").export(format="onnx")`` offline; ``DYNAMIC_HW`` for dynamic=True.

    Input ``images``; outputs as ultralytics names them. Nothing is downloaded or installed
    (``YOLO_OFFLINE``, ``YOLO_AUTOINSTALL``).
    """
    import os
    import shutil

    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "False")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    from ultralytics import YOLO

    work = _CACHE / f"ultralytics-{name}-{exporter}"
    work.mkdir(exist_ok=True)
    here = os.getcwd()
    os.chdir(work)  # ultralytics writes the export beside the (virtual) weights file
    try:
        written = YOLO(f"{name}.yaml").export(
            format="onnx",
            imgsz=size,
            dynamic=exporter == DYNAMIC_HW,
            simplify=False,
            opset=17,
            verbose=False,
        )
    finally:
        os.chdir(here)
    path = _CACHE / f"{name}-{exporter}-{size}.onnx"
    shutil.move(str(work / written), path)
    return path


def _export_module(module, path: Path, size: int, dynamic_hw: bool) -> Path:
    """TorchScript export (opset 17): input ``input``, output ``output``; batch dynamic, and
    height and width too with ``dynamic_hw``."""
    import torch

    axes = {0: "batch", 2: "height", 3: "width"} if dynamic_hw else {0: "batch"}
    output_axes = axes if dynamic_hw and module_is_dense(module, size) else {0: "batch"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.randn(1, 3, size, size),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": axes, "output": output_axes},
        )
    return path


def module_is_dense(module, size: int) -> bool:
    """Whether the module's output is a map of the input's height and width (a segmenter)."""
    import torch

    with torch.no_grad():
        out = module(torch.randn(1, 3, size, size))
    return out.dim() == 4 and tuple(out.shape[2:]) == (size, size)


@functools.cache
def export_timm(name: str, exporter: str = "torchscript", size: int = 64) -> Path:
    """Export ``timm.create_model(name)`` with random weights; ``DYNAMIC_HW`` for symbolic H/W."""
    import timm
    import torch

    torch.manual_seed(0)
    module = timm.create_model(name, pretrained=False)
    randomize_batchnorm(module)
    module.eval()
    return _export_module(
        module, _CACHE / f"timm-{name}-{exporter}-{size}.onnx", size, exporter == DYNAMIC_HW
    )


@functools.cache
def export_smp(name: str, exporter: str = "torchscript", size: int = 128) -> Path:
    """Export ``smp.<Arch>(encoder_name=...)`` named ``smp_<Arch>_<encoder>``, random weights."""
    import segmentation_models_pytorch as smp
    import torch

    _, architecture, encoder = name.split("_", 2)
    torch.manual_seed(0)
    module = getattr(smp, architecture)(encoder_name=encoder, encoder_weights=None, classes=3)
    randomize_batchnorm(module)
    module.eval()
    return _export_module(
        module, _CACHE / f"{name}-{exporter}-{size}.onnx", size, exporter == DYNAMIC_HW
    )


# ---------------------------------------------------------------------------------------------
# onnx's light model zoo
# ---------------------------------------------------------------------------------------------


def light_model_names() -> list[str]:
    """The light models installed with onnx (``light_resnet50``, ...), sorted."""
    return sorted(p.stem for p in LIGHT_DIR.glob("light_*.onnx"))


@functools.cache
def light_model(name: str, seed: int = 0) -> Path:
    """A light model-zoo model with seeded random weights; returns the .onnx path.

    Every weight that the file builds with ``ConstantOfShape`` from a constant shape becomes an
    initializer, and every float initializer is drawn at its shape with a scale fit for its
    role (He for Conv/Gemm weights, positive variances and scales), so activations neither
    vanish nor explode through the depth of the net. The model otherwise stays as shipped:
    opset 9, IR version 3, every initializer also listed as a graph input.
    """
    proto = onnx.load(str(LIGHT_DIR / f"{name}.onnx"))
    graph = proto.graph
    rng = np.random.default_rng(seed)
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, input_name in enumerate(node.input):
            readers.setdefault(input_name, []).append((node, index))
    initializers = {t.name: t for t in graph.initializer}
    fresh: dict[str, onnx.TensorProto] = {}
    kept = []
    for node in graph.node:
        shape = initializers.get(node.input[0]) if node.op_type == "ConstantOfShape" else None
        if shape is None:
            kept.append(node)
            continue
        dims = tuple(int(d) for d in numpy_helper.to_array(shape))
        fresh[node.output[0]] = _random_weight(node.output[0], dims, readers, rng)
        # IR 3 requires every initializer to be a graph input as well.
        graph.input.append(
            onnx.helper.make_tensor_value_info(node.output[0], onnx.TensorProto.FLOAT, dims)
        )
    for tensor in graph.initializer:
        if tensor.data_type == onnx.TensorProto.FLOAT:
            fresh[tensor.name] = _random_weight(tensor.name, tuple(tensor.dims), readers, rng)
    used = {input_name for node in kept for input_name in node.input}
    used |= {o.name for o in graph.output}
    tensors = [fresh.get(t.name, t) for t in graph.initializer if t.name in used]
    tensors += [t for name, t in fresh.items() if name not in initializers]
    inputs = [i for i in graph.input if i.name in used]
    del graph.node[:], graph.initializer[:], graph.input[:]
    graph.node.extend(kept)
    graph.initializer.extend(tensors)
    graph.input.extend(inputs)
    path = _CACHE / f"{name}-seed{seed}.onnx"
    onnx.save(proto, str(path))
    return path


# Ops that pass a weight on unchanged to the node that uses it (densenet's BN scale is
# Unsqueeze'd before its Mul).
_PASS_THROUGH = frozenset({"Unsqueeze", "Reshape", "Identity", "Squeeze", "Flatten"})


def _role(
    name: str, readers: dict[str, list[tuple[onnx.NodeProto, int]]]
) -> tuple[onnx.NodeProto | None, int]:
    """The first node that uses ``name`` as a weight, and at which input."""
    for node, index in readers.get(name, []):
        if node.op_type in _PASS_THROUGH and index == 0:
            return _role(node.output[0], readers)
        return node, index
    return None, -1


def _random_weight(
    name: str,
    shape: tuple[int, ...],
    readers: dict[str, list[tuple[onnx.NodeProto, int]]],
    rng: np.random.Generator,
) -> onnx.TensorProto:
    node, index = _role(name, readers)
    op = node.op_type if node is not None else ""
    if (op, index) in (("Conv", 1), ("Gemm", 1)) and len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        if node is not None and op == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            fan_in = shape[1] if trans_b else shape[0]
        array = rng.standard_normal(shape, np.float32) * np.float32(math.sqrt(2.0 / fan_in))
    elif (op, index) in (("BatchNormalization", 1), ("BatchNormalization", 4)) or op == "Mul":
        array = rng.random(shape, np.float32) + np.float32(0.5)
    else:  # biases, BN shifts and means, added constants
        array = rng.standard_normal(shape, np.float32) * np.float32(0.1)
    return numpy_helper.from_array(array, name)
