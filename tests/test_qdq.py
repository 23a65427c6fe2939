"""Quantized graphs (QDQ): channels flow through QuantizeLinear/DequantizeLinear, int8 weights
behind a DequantizeLinear are cut and re-encoded, and what is not understood is frozen.

The models are tiny CNNs built here and quantized with ONNX Runtime's own tool
(``quantize_static``, QDQ format, per-channel int8 weights, uint8 activations).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from channel_models import Net, feeds_for
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)

from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.channels import ChannelAnalysis, ChannelGroup, analyze_channels
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model
from onnxcompress.graph.surgery import remove_channels
from onnxcompress.passes import create_pass

INPUT_SHAPE = (1, 3, 16, 16)
CALIBRATION_BATCHES = 16


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def repeat_filters(factors: list[float]) -> Callable[[np.ndarray, np.ndarray], None]:
    """Make the last ``len(factors)`` filters positive multiples of the first ones.

    A positive multiple survives ReLU (relu(a z) = a relu(z) for a > 0), so lrf removes such a
    filter and folds it into the next layer with no error in float: what the quantized result
    loses beyond that is the quantization's doing, which is what these tests measure.
    """

    def edit(w: np.ndarray, b: np.ndarray) -> None:
        first = w.shape[0] - len(factors)
        for offset, factor in enumerate(factors):
            w[first + offset] = factor * w[offset]
            b[first + offset] = factor * b[offset]

    return edit


def redundant_cnn(*, zero_columns: tuple[int, ...] = ()) -> ir.Model:
    """conv-relu-maxpool-conv-relu-conv-relu-gap-flatten-gemm, a third of each conv's filters
    positive multiples of others; ``zero_columns`` are channels of the first conv that the
    second conv does not read (all-zero input columns)."""
    net = Net(5)
    x = net.input("x", list(INPUT_SHAPE))
    h = net.relu(net.conv(x, 3, 12, edit=repeat_filters([0.5, 2.0, 1.0, 1.5])))
    h = net.op("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    repeat_second = repeat_filters([0.5, 2.0, 1.0, 1.5, 0.75, 1.25, 2.5, 0.6])

    def second(w: np.ndarray, b: np.ndarray) -> None:
        w[:, list(zero_columns)] = 0.0
        repeat_second(w, b)

    h = net.relu(net.conv(h, 12, 24, edit=second))
    h = net.relu(net.conv(h, 24, 16, edit=repeat_filters([0.5, 2.0, 1.0, 1.5, 0.8])))
    return net.build([net.head(h, 16, 5)])


class RandomImages(CalibrationDataReader):
    """Calibration batches of standard normal images, seeded."""

    def __init__(self, count: int = CALIBRATION_BATCHES, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self._batches = iter(
            [{"x": rng.standard_normal(INPUT_SHAPE).astype(np.float32)} for _ in range(count)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def quantize(model: ir.Model, tmp_path: Path, name: str = "model") -> ir.Model:
    """The model quantized by ONNX Runtime (QDQ, per-channel int8 weights), canonicalized."""
    source, target = tmp_path / f"{name}.float.onnx", tmp_path / f"{name}.qdq.onnx"
    onnx.save(ir.serde.serialize_model(model), str(source))
    quantize_static(
        str(source),
        str(target),
        RandomImages(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    quantized = ir.serde.deserialize_model(onnx.load(str(target)))
    canonicalize(quantized)
    return quantized


def run(model: ir.Model, x: np.ndarray, *, fused: bool = False) -> np.ndarray:
    """The model's output; ``fused`` lets ONNX Runtime fuse QDQ groups into integer kernels."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if fused
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def sample_batch() -> np.ndarray:
    return np.random.default_rng(1).standard_normal((1, *INPUT_SHAPE[1:])).astype(np.float32)


def fused_op_types(model: ir.Model, tmp_path: Path) -> list[str]:
    """The ops ONNX Runtime runs after fusing QDQ groups into integer kernels (QLinearConv...).

    Its fusion checks that a bias is stored at ``input_scale * weight_scale``; a layer whose
    scales disagree stays a float Conv between DequantizeLinear and QuantizeLinear.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    proto = ir.serde.serialize_model(model)
    ort.InferenceSession(proto.SerializeToString(), options, ["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def check_valid(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def group_of(analysis: ChannelAnalysis, producer: str) -> ChannelGroup:
    return next(g for g in analysis.groups if [n.name for n in g.producer_nodes] == [producer])


def stored_int8_weights(model: ir.Model) -> dict[str, str]:
    """Each Conv/Gemm's weight input -> the type of what stores it (int8 behind a DQ, or not)."""
    kinds: dict[str, str] = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            weight = node.inputs[1]
            assert weight is not None
            producer = weight.producer()
            if producer is not None and producer.op_type == "DequantizeLinear":
                stored = producer.inputs[0]
                assert stored is not None and stored.const_value is not None
                kinds[node.name or ""] = stored.const_value.dtype.name
            else:
                kinds[node.name or ""] = "float"
    return kinds


# ---------------------------------------------------------------------------------------------
# The analysis and the cut
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> ir.Model:
    return quantize(redundant_cnn(), tmp_path_factory.mktemp("qdq"))


def test_channels_flow_through_qdq_and_int8_weights_are_members(quantized: ir.Model) -> None:
    analysis = analyze_channels(quantized)
    assert len(analysis.prunable) == 3, analysis.summary()
    first = group_of(analysis, "conv_3")
    # The conv's int8 weight and int32 bias (both behind a DequantizeLinear) produce the group;
    # the next conv's int8 weight reads it along axis 1.
    assert [(ws.node.name, ws.input_index, ws.axis) for ws in first.producers] == [
        ("conv_3", 1, 0),
        ("conv_3", 2, 0),
    ]
    assert [(ws.node.name, ws.axis) for ws in first.consumers] == [("conv_8", 1)]
    assert all(ws.storage is not None for ws in first.slices)
    assert first.producer_matrix().dtype == np.float64
    # Rows are the decoded filters, not raw integers: the repeated filters show as multiples.
    filters = first.producer_matrix()
    assert np.allclose(filters[8], 0.5 * filters[0], atol=np.abs(filters[0]).max() / 100)
    # QuantizeLinear and DequantizeLinear are on the path: they round, so they are not linear,
    # but with one scale per tensor a positive scale relation survives them (as through Relu).
    assert {"QuantizeLinear", "DequantizeLinear", "MaxPool"} <= {
        n.op_type for n in first.path_nodes
    }
    assert not first.linear_path
    assert first.homogeneous_path


def test_cutting_slices_int8_weights_scales_and_int32_bias_exactly(tmp_path: Path) -> None:
    # Channels 1 and 4 of the first conv are not read by the second one, so removing them
    # without compensation must leave the output exactly as it was: any mis-sliced scale, zero
    # point or bias entry would shift a surviving channel.
    model = quantize(redundant_cnn(zero_columns=(1, 4)), tmp_path)
    original = clone_model(model)
    analysis = analyze_channels(model)
    remove_channels(model, group_of(analysis, "conv_3"), [1, 4])
    check_valid(model)
    dq_weight = next(n for n in model.graph if n.name == "conv_3").inputs[1].producer()  # type: ignore[union-attr]
    assert dq_weight is not None and dq_weight.op_type == "DequantizeLinear"
    assert [list(v.const_value.shape) for v in dq_weight.inputs if v is not None] == [  # type: ignore[union-attr]
        [10, 3, 3, 3],
        [10],
        [10],
    ]
    assert stored_int8_weights(model)["conv_8"] == "INT8"
    x = sample_batch()
    for fused in (False, True):
        np.testing.assert_allclose(
            run(model, x, fused=fused), run(original, x, fused=fused), rtol=1e-4, atol=1e-5
        )


def test_compensation_that_overflows_int8_grows_the_scale_and_the_bias_follows(
    tmp_path: Path, quantized: ir.Model
) -> None:
    from onnxcompress.graph.surgery import fold_compensation

    model = clone_model(quantized)
    analysis = analyze_channels(model)
    group = group_of(analysis, "conv_8")
    consumer = group.consumers[0]
    assert consumer.node.name == "conv_12" and consumer.decoder is not None
    weight_dq = consumer.decoder
    bias_dq = consumer.node.inputs[2].producer()  # type: ignore[union-attr]
    assert bias_dq is not None

    def scales() -> tuple[np.ndarray, np.ndarray]:
        return (
            weight_dq.inputs[1].const_value.numpy().copy(),  # type: ignore[union-attr]
            bias_dq.inputs[1].const_value.numpy().copy(),  # type: ignore[union-attr]
        )

    weight_scale, bias_scale = scales()
    before = consumer.array().astype(np.float64)
    bias_before = analysis.slice_of(consumer.node, 2).array()  # type: ignore[union-attr]
    # Channel 0 folded into channel 1 three times over: column 1 outgrows most int8 ranges.
    fold_compensation(model, group, remove=[0], keep=[1], matrix=np.array([[3.0]]))
    new_weight_scale, new_bias_scale = scales()
    grown = new_weight_scale > weight_scale
    assert grown.any() and not (new_weight_scale < weight_scale).any()
    # The int32 bias keeps scale = input scale * weight scale per output, which ONNX Runtime's
    # fused QLinearConv assumes, and still decodes to the same float bias.
    np.testing.assert_allclose(
        new_bias_scale / new_weight_scale, bias_scale / weight_scale, rtol=1e-6
    )
    np.testing.assert_allclose(
        analysis.slice_of(consumer.node, 2).array(),  # type: ignore[union-attr]
        bias_before,
        atol=float(new_bias_scale.max()),
    )
    # Every weight is the float compensation to within half a step of its (new) scale.
    expected = before.copy()
    expected[:, 1] += 3.0 * before[:, 0]
    step = new_weight_scale[:, None, None, None].astype(np.float64)
    assert np.all(np.abs(consumer.array() - expected) <= step / 2 + 1e-7)
    # Channels whose scale held keep every untouched integer exactly.
    untouched = consumer.array()[~grown][:, 2:]
    np.testing.assert_array_equal(untouched, before[~grown][:, 2:].astype(np.float32))
    check_valid(model)
    assert fused_op_types(model, tmp_path).count("QLinearConv") == 3
    assert "Conv" not in fused_op_types(model, tmp_path)


@pytest.mark.parametrize("method", ["lrf", "merge"])
def test_pruning_a_quantized_model_reaches_the_target(
    tmp_path: Path, quantized: ir.Model, method: str
) -> None:
    model = clone_model(quantized)
    compression = create_pass(method, {"criterion": "weights", "target_macs": 0.7, "round_to": 1})
    compression(model)
    report = compression.report.as_dict()
    assert report["modified"]
    assert not [d for d in report["declined"] if "DequantizeLinear" in d["reason"]]
    check_valid(model)
    ratio = model_metrics(model).macs / model_metrics(quantized).macs
    assert abs(ratio - 0.7) <= 0.02, ratio  # lrf's default tolerance
    # Still an int8 model: every layer reads int8 weights through a DequantizeLinear.
    assert set(stored_int8_weights(model).values()) == {"INT8"}
    # Lossy, with a budget: the repeated filters go with no error in float (positive multiples
    # survive ReLU), so what remains is rounding -- the compensated weights re-encoded to int8
    # and activations quantized at the original scales. Pruning must cost no more than
    # quantizing cost in the first place: the quantized model's own distance to the float one.
    float_model = redundant_cnn()
    x = np.random.default_rng(1).standard_normal((8, *INPUT_SHAPE[1:])).astype(np.float32)

    def outputs(m: ir.Model, fused: bool = False) -> np.ndarray:
        return np.concatenate([run(m, x[i : i + 1], fused=fused) for i in range(len(x))])

    reference = outputs(quantized)
    budget = float(np.abs(reference - outputs(float_model)).max())
    for fused in (False, True):
        error = float(np.abs(outputs(model, fused) - reference).max())
        assert error <= budget, (fused, error, budget)
    # And ONNX Runtime still runs every conv as an integer kernel.
    ops = fused_op_types(model, tmp_path)
    assert ops.count("QLinearConv") == 3 and "Conv" not in ops, ops


def test_a_pruned_float_model_quantizes(tmp_path: Path) -> None:
    float_model = redundant_cnn()
    pruned = clone_model(float_model)
    create_pass("lrf", {"criterion": "weights", "target_macs": 0.7, "round_to": 1})(pruned)
    assert model_metrics(pruned).macs < model_metrics(float_model).macs
    quantized = quantize(pruned, tmp_path, "pruned")
    check_valid(quantized)
    assert set(stored_int8_weights(quantized).values()) == {"INT8"}
    x = sample_batch()
    # Quantizing the pruned model costs about what quantizing the original costs (twice that
    # at most on this batch; the calibration data and the layers' ranges are the same).
    original_error = np.abs(run(quantize(float_model, tmp_path), x) - run(float_model, x)).max()
    assert np.abs(run(quantized, x) - run(pruned, x)).max() <= 2 * original_error
    assert np.abs(run(quantized, x, fused=True) - run(pruned, x)).max() <= 2 * original_error


# ---------------------------------------------------------------------------------------------
# Hand-built QDQ patterns
# ---------------------------------------------------------------------------------------------


def per_channel_activation_qdq(axis: int) -> ir.Model:
    """conv -> QuantizeLinear/DequantizeLinear with one scale per position on ``axis`` (sharing
    their scale and zero point, as quantizers write them) -> relu -> conv -> head. The second
    conv does not read channels 2 and 5."""
    net = Net(11)
    x = net.input("x", ["N", 3, 6, 6])
    h = net.conv(x, 3, 6)
    scale = net.const(np.linspace(0.02, 0.05, 6).astype(np.float32), "scale")
    zero_point = net.const(np.array([128, 120, 131, 128, 100, 140], np.uint8), "zero_point")
    q = net.op("QuantizeLinear", [h, scale, zero_point], axis=axis)
    d = net.op("DequantizeLinear", [q, scale, zero_point], axis=axis)

    def unread(w: np.ndarray, b: np.ndarray) -> None:
        w[:, [2, 5]] = 0.0

    h = net.relu(net.conv(d, 6, 4, edit=unread))
    return net.build([net.head(h, 4)])


def test_per_channel_activation_qdq_slices_its_scales_with_the_channels() -> None:
    model = per_channel_activation_qdq(axis=1)
    original = clone_model(model)
    analysis = analyze_channels(model)
    group = group_of(analysis, "conv_3")
    assert {(ws.node.op_type, ws.input_index) for ws in group.params} == {
        ("QuantizeLinear", 1),
        ("QuantizeLinear", 2),
        ("DequantizeLinear", 1),
        ("DequantizeLinear", 2),
    }
    remove_channels(model, group, [2, 5])
    check_valid(model)
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = node.inputs[2]
            assert zero_point is not None and zero_point.const_value is not None
            assert zero_point.const_value.numpy().tolist() == [128, 120, 128, 100]
    feeds = feeds_for(original)
    x = feeds["x"]
    np.testing.assert_allclose(run(model, x), run(original, x), rtol=1e-4, atol=1e-5)


def test_per_position_qdq_off_the_channel_axis_is_frozen_not_cut() -> None:
    model = per_channel_activation_qdq(axis=2)
    analysis = analyze_channels(model)
    group = group_of(analysis, "conv_3")
    assert group.frozen_reason is not None
    assert "one scale per position along axis 2, which is not the channel axis" in (
        group.frozen_reason
    )
    compression = create_pass("lrf", {"ratio": 0.5, "round_to": 1})
    compression(model)
    declined = {d["node"]: d["reason"] for d in compression.report.as_dict()["declined"]}
    assert "not the channel axis" in declined["conv_3"]
    check_valid(model)
    assert next(n for n in model.graph if n.name == "conv_3").inputs[1].shape[0] == 6  # type: ignore[union-attr,index]


def shared_quantized_weight() -> ir.Model:
    """Two convs read one DequantizeLinear'd int8 weight, summed, then conv -> head."""
    net = Net(12)
    x = net.input("x", ["N", 3, 6, 6])
    weight = net.weight(6, 3, 3, 3)
    scale = (np.abs(weight).max(axis=(1, 2, 3)) / 127).astype(np.float32)
    stored = np.round(weight / scale[:, None, None, None]).astype(np.int8)
    w = net.op(
        "DequantizeLinear",
        [net.const(stored, "w_q"), net.const(scale, "w_scale"), net.const(np.zeros(6, np.int8))],
        axis=0,
    )
    a = net.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    b = net.op("Conv", [x, w], kernel_shape=[3, 3], pads=[1, 1, 1, 1], dilations=[1, 1])
    h = net.relu(net.op("Add", [a, b]))
    h = net.relu(net.conv(h, 6, 4))
    return net.build([net.head(h, 4)])


def test_a_quantized_weight_two_convs_share_is_frozen_not_cut() -> None:
    model = shared_quantized_weight()
    analysis = analyze_channels(model)
    shared = next(g for g in analysis.groups if {n.op_type for n in g.path_nodes} >= {"Add"})
    assert shared.frozen_reason is not None
    assert "a shared quantized weight is not cut" in shared.frozen_reason
    assert "DequantizeLinear" in shared.frozen_reason
    before = {v.name: v.const_value.numpy().copy() for v in model.graph.initializers.values()}  # type: ignore[union-attr]
    create_pass("lrf", {"ratio": 0.5, "round_to": 1})(model)
    check_valid(model)
    after = model.graph.initializers
    for name in ("w_q_1", "w_scale_2"):
        np.testing.assert_array_equal(after[name].const_value.numpy(), before[name])  # type: ignore[union-attr]
