"""Training steps in sequence, in one process, on every CPU.

Regression tests for the abort of issue 17: oneDNN's 1x1 backward-weights kernel, given a
strided channels-last input with fewer input channels than its vector block (a pruned ResNet's
downsample shortcut), writes past its buffer (https://github.com/uxlfoundation/oneDNN/issues/6035).
With one torch thread the heap is corrupted and a later training step aborts; with more, weight
gradients can be silently wrong. The bug is in the AVX2 kernels (and, for some widths, the
AVX-512 ones), so the tests run in a child process with ``ONEDNN_MAX_CPU_ISA=AVX2``: that takes
the AVX2 kernels on an AVX-512 machine too, and the child reports a crash instead of being one.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

from onnxcompress.torch_bridge import OnnxModule

ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = ROOT / "models" / "digits_resnet.onnx"


def run_child(code: str, threads: int, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter on oneDNN's AVX2 kernels with ``threads`` threads."""
    env = {
        **os.environ,
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    prologue = f"import torch\ntorch.set_num_threads({threads})\n"
    try:
        return subprocess.run(
            [sys.executable, "-c", prologue + textwrap.dedent(code)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(
            f"the child hung for {timeout} s (the oneDNN bug hangs with threads > 1): {exc}"
        )


def assert_clean_exit(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"exit code {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
        f"--- stderr\n{result.stderr[-3000:]}"
    )


def pointwise_model(
    in_channels: int, out_channels: int, stride: int, pads: list[int], size: int = 16
) -> onnx.ModelProto:
    """x -> Conv 1x1 (``stride``, ``pads``) -> y, with a dynamic batch."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out_channels, in_channels, 1, 1)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    node = helper.make_node(
        "Conv", ["x", "w", "b"], ["y"], kernel_shape=[1, 1], strides=[stride] * 2, pads=pads
    )
    graph = helper.make_graph(
        [node],
        "pointwise",
        [
            helper.make_tensor_value_info(
                "x", onnx.TensorProto.FLOAT, ["n", in_channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


# The child computes the weight gradient of a strided 1x1 conv through the bridge on a
# channels-last batch, and compares it with float64 arithmetic (no oneDNN). Without the
# workaround, on an AMD EPYC with oneDNN's AVX2 kernels (torch 2.14.1): one thread aborts
# ("free(): invalid size"); two threads hang at 16x16 and are 60-130 % wrong at 8x8.
GRADIENT_CHECK = """
import numpy as np, onnx_ir as ir
from test_process_state import pointwise_model
from onnxcompress.torch_bridge import OnnxModule

for in_channels, size in ((4, 8), (2, 8), (7, 8), (4, 16), (12, 16)):
    model = ir.serde.deserialize_model(pointwise_model(in_channels, 8, 2, [0] * 4, size))
    module = OnnxModule(model)
    weight, bias = module.param_for("w"), module.param_for("b")
    for _ in range(5):
        x = torch.randn(16, in_channels, size, size).contiguous(memory_format=torch.channels_last)
        module.zero_grad()
        module(x).square().sum().backward()
        w64 = weight.detach().double().requires_grad_()
        y64 = torch.nn.functional.conv2d(x.double(), w64, bias.detach().double(), stride=2)
        y64.square().sum().backward()
        err = (weight.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()
        assert err < 1e-4, (in_channels, size, float(err))
print("gradients exact")
"""


@pytest.mark.parametrize("threads", [1, 2])
def test_strided_pointwise_conv_gradients_are_exact_on_avx2_kernels(threads: int) -> None:
    """Before the fix: an abort (1 thread), a hang or wrong gradients (2 threads)."""
    result = run_child(GRADIENT_CHECK, threads, timeout=120)
    assert_clean_exit(result)
    assert "gradients exact" in result.stdout


@pytest.mark.parametrize("pads", [[0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 1, 0]])
@pytest.mark.parametrize("stride", [2, 3])
def test_the_bridge_hands_torch_no_strided_pointwise_conv(pads: list[int], stride: int) -> None:
    """The workaround (subsample, then a stride-1 conv) matches ONNX Runtime, and no strided
    1x1 convolution reaches torch's kernels, forward or backward."""
    from torch.utils._python_dispatch import TorchDispatchMode

    proto = pointwise_model(4, 8, stride, pads)
    module = OnnxModule(ir.serde.deserialize_model(proto))
    x = np.random.default_rng(1).standard_normal((3, 4, 16, 16)).astype(np.float32)
    convolutions: list[tuple[list[int], list[int]]] = []

    class RecordConvolutions(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            if func.__name__.startswith(("convolution", "convolution_backward")):
                weight = args[1] if func.__name__.startswith("convolution.") else args[2]
                stride_arg = args[3] if func.__name__.startswith("convolution.") else args[4]
                convolutions.append((list(weight.shape[2:]), list(stride_arg)))
            return func(*args, **(kwargs or {}))

    inputs = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
    with RecordConvolutions():
        y = module(inputs)
        y.sum().backward()
    assert convolutions, "no convolution was recorded: the check saw nothing"
    assert all(not (kernel == [1, 1] and max(s) > 1) for kernel, s in convolutions), convolutions
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"x": x})
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def narrow_shortcut_resnet() -> ir.Model:
    """stem (3->4) -> one downsampling block whose 1x1 stride-2 shortcut reads 4 channels."""
    from channel_models import Net, image_input

    net = Net(3)
    x = image_input(net, channels=3, size=16)
    h = net.relu(net.conv(x, 3, 4))
    branch = net.conv(net.relu(net.conv(h, 4, 8, stride=2)), 8, 8)
    shortcut = net.conv(h, 4, 8, k=1, stride=2)
    h = net.relu(net.op("Add", [branch, shortcut]))
    return net.build([net.head(h, 8)])


# A user's recipe: two training steps, one process, one torch thread (the setting the abort
# needed), on a model whose strided 1x1 shortcut is narrower than oneDNN's vector block.
SEQUENCE = """
from onnxcompress.pipeline.run import compress

options = {{
    "lct": {{
        "schedule": "staged", "stages": 2, "epoch_samples": 128, "max_drop": 100.0,
        "final_epochs": 0,
    }},
    "lrf": {{"target_macs": 0.5, "round_to": 1}},
    "cheapconv": {{"epochs": 1, "epoch_samples": 128, "min_channels": 1}},
    "resect": {{"target_layers": 1, "epochs": 1, "epoch_samples": 128, "max_drop": 100.0}},
    "finetune": {{"epochs": 1, "epoch_samples": 256, "batch_size": 32}},
}}
steps = [(name, options[name]) for name in {sequence!r}]
result = compress({model!r}, None, steps, data={data!r})
print("ran", [step.name for step in result.steps])
"""


@pytest.mark.parametrize(
    "sequence", [("lct", "resect"), ("cheapconv", "finetune"), ("lrf", "finetune")]
)
def test_training_steps_run_in_sequence_in_one_process(
    tmp_path: Path, sequence: tuple[str, str]
) -> None:
    model_path = tmp_path / "narrow.onnx"
    ir.save(narrow_shortcut_resnet(), model_path)
    images = np.random.default_rng(0).standard_normal((256, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "images.npz", x=images)
    code = SEQUENCE.format(
        sequence=list(sequence), model=str(model_path), data=f"npz:{tmp_path / 'images.npz'}"
    )
    result = run_child(code, threads=1, timeout=300)
    assert_clean_exit(result)
    assert f"'canonicalize', '{sequence[0]}', '{sequence[1]}'" in result.stdout
