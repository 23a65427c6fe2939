"""Parameters count the weights a model stores, whatever their type (``graph.metrics``).

int8 weights (``lct:values=int8``, quantized models) are parameters; shapes, indices, axes and
the masks and gaps of the compact storage are not. Tiny graphs built here pin each rule.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.graph.canonicalize import infer_shapes
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import model_to_bytes
from onnxcompress.graph.param_counting import count_params
from onnxcompress.graph.sparse_storage import encode_gaps, encode_mask, quantize_int8, store_sparse

RNG = np.random.default_rng(0)


def _model(
    nodes: list[onnx.NodeProto],
    initializers: list[onnx.TensorProto],
    outputs: list[str],
    input_shape: tuple[int, ...] = (1, 3, 6, 6),
) -> ir.Model:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_shape))],
        [helper.make_tensor_value_info(name, TensorProto.UNDEFINED, None) for name in outputs],
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    return model


def _run(model: ir.Model, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model_to_bytes(model), options, ["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _qdq_conv(zero_point: bool = True) -> ir.Model:
    """x -> Conv(DequantizeLinear(int8 w, per-channel scale, zero point), float bias)."""
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    q, scale = quantize_int8(w)
    inputs = ["w_q", "w_scale"] + (["w_zp"] if zero_point else [])
    initializers = [
        numpy_helper.from_array(q, "w_q"),
        numpy_helper.from_array(scale, "w_scale"),
        numpy_helper.from_array(RNG.standard_normal(8).astype(np.float32), "b"),
    ]
    if zero_point:
        initializers.append(numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"))
    nodes = [
        helper.make_node("DequantizeLinear", inputs, ["w"], axis=0, name="dq"),
        helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    return _model(nodes, initializers, ["y"])


def test_int8_weights_behind_dequantize_linear_are_parameters() -> None:
    model = _qdq_conv()
    # 216 int8 weights, 8 float scales, 8 int8 zero points (counted as stored), 8 float biases.
    assert count_params(model) == 8 * 27 + 8 + 8 + 8
    metrics = model_metrics(model)
    assert metrics.params == 240
    # The conv reads its weight through the DequantizeLinear: the layer counts what it decodes.
    assert [(layer.node, layer.params) for layer in metrics.layers] == [("conv", 240)]
    # Per-tensor quantization without a zero point: the scale is one element.
    assert count_params(_qdq_conv(zero_point=False)) == 8 * 27 + 8 + 8


@pytest.mark.parametrize("sparsity", [0.95, 0.7, 0.0])
def test_int8_compact_storage_counts_the_values_it_stores(sparsity: float) -> None:
    """What ``lct:values=int8`` writes: each weight as int8 values (a mask, gaps or dense8
    encoding) plus a float scale per output channel."""
    w1 = RNG.standard_normal((16, 3, 3, 3)).astype(np.float32)
    w2 = RNG.standard_normal((24, 16, 3, 3)).astype(np.float32)
    w2[RNG.random(w2.shape) < sparsity] = 0
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["y"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    initializers = [
        numpy_helper.from_array(w1, "w1"),
        numpy_helper.from_array(np.zeros(16, np.float32), "b1"),
        numpy_helper.from_array(w2, "w2"),
    ]
    model = _model(nodes, initializers, ["y"])
    dense = count_params(model)
    assert dense == w1.size + 16 + w2.size
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    (record,) = store_sparse(model, ["w2"], min_saving=0, values="int8")
    assert record.encoding != "dense"
    q, scale = quantize_int8(w2)
    stored = {
        "mask": encode_mask(q)[1].size,  # the non-zeros behind one leading zero
        "gaps": encode_gaps(q)[1].size,  # the non-zeros and the fillers of long gaps
        "dense8": q.size,
    }[record.encoding]
    expected = w1.size + 16 + stored + scale.size
    assert count_params(model) == expected
    metrics = model_metrics(model)
    assert metrics.params == expected
    assert {layer.node: layer.params for layer in metrics.layers} == {
        "conv1": w1.size + 16,
        "conv2": stored + scale.size,
    }
    if sparsity == 0.95:
        # Nothing like the 0.005x int8 weights read as "no parameters" gave.
        assert 0.05 < (stored + scale.size) / w2.size < 0.1
    # The decoding ran: the graph holds uint8 masks or gaps, int64 shapes and counts, none of
    # them counted, and it still computes.
    assert any(
        value.const_value is not None and value.const_value.dtype == ir.DataType.INT8
        for value in model.graph.initializers.values()
    )
    assert _run(model, x)[0].shape == (1, 24, 6, 6)


def test_float_compact_storage_counts_the_values_it_stores() -> None:
    w = RNG.standard_normal((24, 16, 3, 3)).astype(np.float32)
    w[RNG.random(w.shape) < 0.9] = 0
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], ["y"], (1, 16, 6, 6))
    (record,) = store_sparse(model, ["w"], min_saving=0)
    values = {"mask": encode_mask(w)[1].size, "gaps": encode_gaps(w)[1].size}
    assert count_params(model) == values[record.encoding] < w.size // 5


def test_integer_shapes_indices_and_axes_are_not_parameters() -> None:
    """Negative: every integer tensor here says where values go, or is integer arithmetic."""
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"], name="reshape"),
        helper.make_node("Gather", ["flat", "index"], ["picked"], axis=1, name="gather"),
        helper.make_node("Unsqueeze", ["picked", "axes"], ["wide"], name="unsqueeze"),
        helper.make_node("Slice", ["wide", "starts", "ends", "slice_axes"], ["y"], name="slice"),
        # uint8 bit arithmetic cast to int64 (the mask decoder's kind): not weight values.
        helper.make_node("BitShift", ["bits", "shift"], ["moved"], direction="LEFT", name="bs"),
        helper.make_node("Cast", ["moved"], ["wide_bits"], to=TensorProto.INT64, name="cast"),
        helper.make_node(
            "Constant",
            [],
            ["count"],
            name="count",
            value=numpy_helper.from_array(np.array([4], np.int64)),
        ),
        helper.make_node("Expand", ["wide_bits", "count"], ["z"], name="expand"),
    ]
    initializers = [
        numpy_helper.from_array(np.array([1, -1], np.int64), "shape"),
        numpy_helper.from_array(np.array([0, 5, 7], np.int64), "index"),
        numpy_helper.from_array(np.array([0], np.int64), "axes"),
        numpy_helper.from_array(np.array([0], np.int64), "starts"),
        numpy_helper.from_array(np.array([2], np.int64), "ends"),
        numpy_helper.from_array(np.array([2], np.int64), "slice_axes"),
        numpy_helper.from_array(RNG.integers(0, 255, 4).astype(np.uint8), "bits"),
        numpy_helper.from_array(np.array([1], np.uint8), "shift"),
    ]
    model = _model(nodes, initializers, ["y", "z"])
    assert count_params(model) == 0
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    assert _run(model, x)[0].shape == (1, 1, 2)
    # The same graph with a float weight added counts exactly that weight.
    model.graph.initializers["w"] = ir.Value(
        name="w", const_value=ir.tensor(np.ones((2, 3), np.float32), name="w")
    )
    assert count_params(model) == 6


def test_integer_constants_cast_to_float_are_parameters() -> None:
    """An int8 Constant node widened by a Cast holds weight values, as an initializer would;
    the int64 Reshape target on its way does not."""
    weight = helper.make_node(
        "Constant",
        [],
        ["w_q"],
        name="w_q",
        value=numpy_helper.from_array(RNG.integers(-127, 127, (4, 3, 1, 1)).astype(np.int8)),
    )
    nodes = [
        weight,
        helper.make_node("Reshape", ["w_q", "shape"], ["w_flat"], name="reshape"),
        helper.make_node("Cast", ["w_flat"], ["w_float"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Reshape", ["w_float", "back"], ["w"], name="back"),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv"),
    ]
    initializers = [
        numpy_helper.from_array(np.array([-1], np.int64), "shape"),
        numpy_helper.from_array(np.array([4, 3, 1, 1], np.int64), "back"),
    ]
    model = _model(nodes, initializers, ["y"])
    assert count_params(model) == 12
    assert [layer.params for layer in model_metrics(model).layers] == [12]
