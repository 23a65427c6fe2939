"""Property tests: every data-free pass either rewrites a random small CNN into a valid, runnable
model with the same output shape, or declines with a reason; it never crashes.

Hypothesis draws the graphs: widths, kernels, strides, residual adds, concatenations and
depthwise convolutions, in any order. The passes are taken from the registry, so a data-free
pass added later is covered without editing this file.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import OnnxCompressError
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.model_io import load_model
from onnxcompress.passes import available_passes, create_pass, pass_class
from onnxcompress.runtime.session import make_session

# Options that make each pass actually cut something in a graph this small.
PASS_OPTIONS: dict[str, dict[str, Any]] = {
    "lrf": {"ratio": 0.5, "round_to": 1},
    "merge": {"ratio": 0.5, "round_to": 1},
}


def data_free_passes() -> list[str]:
    return [entry.name for entry in available_passes() if not pass_class(entry.name).needs_data]


def pass_options(name: str) -> dict[str, Any]:
    options = dict(PASS_OPTIONS.get(name, {}))
    fields = {f.name for f in dataclasses.fields(pass_class(name).config_class)}
    if "epochs" in fields:
        options.setdefault("epochs", 0)  # a data-free run: no retraining
    return {k: v for k, v in options.items() if k in fields}


# ---------------------------------------------------------------------------------------------
# Random CNNs
# ---------------------------------------------------------------------------------------------

BLOCKS = ("conv", "depthwise", "residual", "concat")


@dataclasses.dataclass
class Builder:
    rng: np.random.Generator
    nodes: list[onnx.NodeProto] = dataclasses.field(default_factory=list)
    inits: list[onnx.TensorProto] = dataclasses.field(default_factory=list)
    count: int = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def conv(
        self, x: str, c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> str:
        name = self.name("conv")
        fan_in = c_in // groups * kernel * kernel
        weight = (
            self.rng.standard_normal((c_out, c_in // groups, kernel, kernel)) / np.sqrt(fan_in)
        ).astype(np.float32)
        self.inits.append(numpy_helper.from_array(weight, f"{name}.w"))
        self.inits.append(
            numpy_helper.from_array(
                self.rng.standard_normal(c_out).astype(np.float32) * 0.1, f"{name}.b"
            )
        )
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.w", f"{name}.b"],
                [name],
                name=name,
                kernel_shape=[kernel, kernel],
                pads=[kernel // 2] * 4,
                strides=[stride, stride],
                group=groups,
            )
        )
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        name = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [name], name=name, **attrs))
        return name


@st.composite
def cnn_models(draw: st.DrawFn) -> onnx.ModelProto:
    seed = draw(st.integers(0, 2**16))
    b = Builder(np.random.default_rng(seed))
    channels = draw(st.sampled_from([1, 3]))
    size = 12
    widths = st.sampled_from([4, 6, 8, 12, 16])
    kernels = st.sampled_from([1, 3, 5])
    x, c = "input", channels
    for kind in draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5)):
        if kind == "conv" or c == channels:
            # stride 2 while the feature map is at least 4x4 (12 -> 6 -> 3)
            stride = draw(st.sampled_from([1, 2])) if size >= 4 else 1
            width = draw(widths)
            x = b.op("Relu", [b.conv(x, c, width, draw(kernels), stride)])
            c, size = width, (size + stride - 1) // stride
        elif kind == "depthwise":
            x = b.op("Relu", [b.conv(x, c, c, 3, groups=c)])
        elif kind == "residual":
            inner = b.op("Relu", [b.conv(x, c, draw(widths), draw(kernels))])
            inner_width = int(b.inits[-1].dims[0])
            x = b.op("Relu", [b.op("Add", [x, b.conv(inner, inner_width, c, draw(kernels))])])
        else:
            left, right = draw(widths), draw(widths)
            a = b.op("Relu", [b.conv(x, c, left, draw(kernels))])
            d = b.op("Relu", [b.conv(x, c, right, draw(kernels))])
            x, c = b.op("Concat", [a, d], axis=1), left + right
    pooled = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    classes = 5
    b.inits.append(
        numpy_helper.from_array(
            (b.rng.standard_normal((classes, c)) / np.sqrt(c)).astype(np.float32), "fc.w"
        )
    )
    b.inits.append(numpy_helper.from_array(np.zeros(classes, np.float32), "fc.b"))
    b.nodes.append(
        helper.make_node("Gemm", [pooled, "fc.w", "fc.b"], ["output"], transB=1, name="fc")
    )
    graph = helper.make_graph(
        b.nodes,
        "random_cnn",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", channels, 12, 12])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", classes])],
        b.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    onnx.checker.check_model(model, full_check=True)
    return model


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------


def output_shape(model: Any, x: np.ndarray) -> tuple[int, ...]:
    session = make_session(model, optimize=False)
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    assert np.isfinite(out).all()
    return tuple(out.shape)


@pytest.mark.parametrize("pass_name", data_free_passes())
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(proto=cnn_models())
def test_data_free_pass_rewrites_validly_or_declines(
    pass_name: str, proto: onnx.ModelProto
) -> None:
    channels = proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    x = np.random.default_rng(0).standard_normal((2, channels, 12, 12)).astype(np.float32)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        expected = output_shape(str(path), x)
        model = load_model(path)
    canonicalize(model)
    compression = create_pass(pass_name, pass_options(pass_name))
    try:
        compression(model)
    except OnnxCompressError as exc:
        # declining the whole model is fine when it says why, in one line
        message = str(exc)
        assert message.strip() and "\n" not in message
        return
    report = compression.report
    # a pass cleans up after itself: the gate after it found nothing to remove
    assert report.leftover_initializers == [], report.leftover_initializers
    if not report.modified:
        # nothing changed: the pass must say why for every candidate it left alone
        assert report.declined or pass_name in ("canonicalize", "simplify"), report.as_dict()
    result = onnx.load_from_string(
        onnx.ModelProto.FromString(_serialize(model)).SerializeToString()
    )
    onnx.checker.check_model(result, full_check=True)
    ort.InferenceSession(result.SerializeToString(), providers=["CPUExecutionProvider"])
    assert output_shape(model, x) == expected


def _serialize(model: Any) -> bytes:
    import onnx_ir as ir

    return ir.serde.serialize_model(model).SerializeToString()
