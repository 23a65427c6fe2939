"""Tests for onnxcompress.graph.metrics: parameter and MAC counts, per layer and in total.

Hand-built graphs pin the formulas with numbers worked out by hand; torchvision exports pin the
totals against the published figures for resnet18 and mobilenet_v2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnx.numpy_helper as onh
import onnx_ir as ir
import pytest

from onnxcompress.graph.canonicalize import canonicalize, infer_shapes
from onnxcompress.graph.metrics import (
    ChannelMismatch,
    ModelMetrics,
    UncountedOp,
    channel_mismatches,
    count_params,
    format_table,
    model_metrics,
    node_macs,
    uncounted_ops,
)
from onnxcompress.graph.model_io import load_model

RNG = np.random.default_rng(0)


def _weight(name: str, shape: tuple[int, ...], dtype: type = np.float32) -> onnx.TensorProto:
    return onh.from_array(RNG.standard_normal(shape).astype(dtype), name)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: Sequence[tuple[str, Sequence[int | str]]],
    outputs: list[str],
    initializers: list[onnx.TensorProto],
) -> ir.Model:
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, s) for n, s in inputs],
        [oh.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in outputs],
        initializers,
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    infer_shapes(model)
    return model


def _node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


# ---------------------------------------------------------------------------------------------
# Hand-built graphs: each expected number is written out from the formula
# ---------------------------------------------------------------------------------------------


def test_grouped_dilated_conv_macs() -> None:
    # x: 1x8x10x10, W: 16 x (8/4) x 3x3, groups 4, dilation 2, pad 2, stride 1 -> out 1x16x10x10.
    # MACs = out elements (16*10*10 = 1600) * Cin/groups (2) * kernel (9) = 28800;
    # dilation widens the receptive field but each output still takes 2*9 products.
    model = _model(
        [
            oh.make_node(
                "Conv",
                ["x", "w", "b"],
                ["y"],
                name="conv",
                group=4,
                dilations=[2, 2],
                pads=[2, 2, 2, 2],
                kernel_shape=[3, 3],
            )
        ],
        [("x", [1, 8, 10, 10])],
        ["y"],
        [_weight("w", (16, 2, 3, 3)), _weight("b", (16,))],
    )
    conv = _node(model, "conv")
    assert node_macs(conv) == 16 * 10 * 10 * 2 * 9 == 28800
    metrics = model_metrics(model)
    (layer,) = metrics.layers
    assert (layer.in_channels, layer.out_channels, layer.groups) == (8, 16, 4)
    assert layer.kernel == (3, 3) and layer.stride == (1, 1)
    assert layer.params == 16 * 2 * 9 + 16 == 304
    assert metrics.params == 304


def test_strided_depthwise_conv_and_symbolic_batch() -> None:
    # Depthwise 3x3 stride 2 on 32 channels, 16x16 -> 8x8 (pad 1): 32*8*8 outputs * 1 * 9.
    model = _model(
        [
            oh.make_node(
                "Conv",
                ["x", "w"],
                ["y"],
                name="dw",
                group=32,
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        ],
        [("x", ["N", 32, 16, 16])],
        ["y"],
        [_weight("w", (32, 1, 3, 3))],
    )
    per_image = 32 * 8 * 8 * 1 * 9
    assert node_macs(_node(model, "dw")) == per_image == 18432
    assert node_macs(_node(model, "dw"), batch=8) == 8 * per_image
    metrics = model_metrics(model, batch=3)
    assert metrics.macs == 3 * per_image and metrics.batch == 3
    assert metrics.layers[0].stride == (2, 2)


def test_conv_without_inferred_output_shape_uses_its_input() -> None:
    model = _model(
        [oh.make_node("Conv", ["x", "w"], ["y"], name="conv", strides=[2, 2], pads=[0, 1, 0, 1])],
        [("x", [2, 3, 9, 9])],
        ["y"],
        [_weight("w", (5, 3, 3, 3))],
    )
    conv = _node(model, "conv")
    conv.outputs[0].shape = None
    # H: (9 - 3) // 2 + 1 = 4; W: (9 + 2 - 3) // 2 + 1 = 5 -> 2*5*4*5 outputs * 3 * 9.
    assert node_macs(conv) == 2 * 5 * 4 * 5 * 27 == 5400


def test_conv_transpose_macs() -> None:
    # x: 1x4x5x5, W: Cin 4 x Cout/groups 3 x 2x2, groups 2 -> Cout 6, stride 2 -> 10x10.
    # Each input element scatters through Cout/groups * kernel = 3 * 4 weights: 100 * 12.
    model = _model(
        [oh.make_node("ConvTranspose", ["x", "w"], ["y"], name="up", group=2, strides=[2, 2])],
        [("x", [1, 4, 5, 5])],
        ["y"],
        [_weight("w", (4, 3, 2, 2))],
    )
    up = _node(model, "up")
    assert node_macs(up) == 4 * 5 * 5 * 3 * 4 == 1200
    layer = model_metrics(model).layers[0]
    assert (layer.in_channels, layer.out_channels, layer.groups) == (4, 6, 2)
    assert layer.kernel == (2, 2) and layer.stride == (2, 2)


@pytest.mark.parametrize(("trans_a", "trans_b"), [(0, 0), (0, 1), (1, 1)])
def test_gemm_macs_respect_transposes(trans_a: int, trans_b: int) -> None:
    m, k, n = 6, 20, 7
    a_shape = [k, m] if trans_a else [m, k]
    b_shape = (n, k) if trans_b else (k, n)
    model = _model(
        [oh.make_node("Gemm", ["a", "b", "c"], ["y"], name="fc", transA=trans_a, transB=trans_b)],
        [("a", a_shape)],
        ["y"],
        [_weight("b", b_shape), _weight("c", (n,))],
    )
    assert node_macs(_node(model, "fc")) == 6 * 20 * 7 == 840
    layer = model_metrics(model).layers[0]
    assert (layer.in_channels, layer.out_channels) == (k, n)
    assert layer.params == k * n + n
    assert layer.kernel is None and layer.groups is None


@pytest.mark.parametrize(
    ("a_shape", "b_shape", "expected"),
    [
        ([2, 3, 4, 5], [2, 3, 5, 6], 2 * 3 * 4 * 6 * 5),  # matching batch dims
        ([2, 1, 4, 5], [3, 5, 6], 2 * 3 * 4 * 6 * 5),  # broadcast batch 2x1 with 3
        ([4, 5], [5, 6], 4 * 6 * 5),  # plain 2-D
        ([5], [2, 5, 6], 2 * 1 * 6 * 5),  # 1-D left: a row, M = 1
        ([2, 4, 5], [5], 2 * 4 * 1 * 5),  # 1-D right: a column, N = 1
        ([5], [5], 5),  # dot product
    ],
)
def test_batched_matmul_macs(a_shape: list[int], b_shape: list[int], expected: int) -> None:
    model = _model(
        [oh.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
        [("a", a_shape), ("b", b_shape)],
        ["y"],
        [],
    )
    assert node_macs(_node(model, "mm")) == expected
    assert model_metrics(model).macs == expected


def test_matmul_with_symbolic_batch_counts_batch() -> None:
    model = _model(
        [oh.make_node("MatMul", ["a", "w"], ["y"], name="mm")],
        [("a", ["batch", 10, 16])],
        ["y"],
        [_weight("w", (16, 4))],
    )
    assert node_macs(_node(model, "mm"), batch=5) == 5 * 10 * 4 * 16


def test_params_count_floats_once_and_skip_integer_tensors() -> None:
    # One 3x3 weight shared by two Convs, an int64 Reshape target, a float16 MatMul weight
    # (3 * 4 elements), a float Constant node (2 elements) and a double bias.
    shared = _weight("w", (4, 4, 3, 3))
    shape = onh.from_array(np.array([1, -1], dtype=np.int64), "shape")
    nodes = [
        oh.make_node("Conv", ["x", "w"], ["c1"], name="c1", pads=[1, 1, 1, 1]),
        oh.make_node("Conv", ["c1", "w"], ["c2"], name="c2", pads=[1, 1, 1, 1]),
        oh.make_node("Reshape", ["c2", "shape"], ["flat"], name="flat"),
        oh.make_node(
            "Constant",
            [],
            ["k"],
            name="k",
            value=onh.from_array(np.array([1.0, 2.0], dtype=np.float32)),
        ),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4, 5, 5])],
        [
            oh.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, None),
            oh.make_tensor_value_info("k", onnx.TensorProto.FLOAT, None),
        ],
        [
            shared,
            shape,
            _weight("h", (3, 4), np.float16),
            _weight("d", (7,), np.float64),
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    assert count_params(model) == 4 * 4 * 9 + 3 * 4 + 7 + 2
    metrics = model_metrics(model)
    assert [layer.node for layer in metrics.layers] == ["c1", "c2"]
    # Both convs read the shared weight; the model total counts it once.
    assert [layer.params for layer in metrics.layers] == [144, 144]
    assert metrics.params == 144 + 12 + 7 + 2
    assert metrics.macs == 2 * (4 * 5 * 5 * 4 * 9)


def test_other_ops_count_zero_and_are_not_listed() -> None:
    model = _model(
        [
            oh.make_node("Relu", ["x"], ["r"], name="relu"),
            oh.make_node("Add", ["r", "x"], ["y"], name="add"),
        ],
        [("x", [1, 3, 4, 4])],
        ["y"],
        [],
    )
    assert node_macs(_node(model, "relu")) == 0
    metrics = model_metrics(model)
    assert metrics.layers == [] and metrics.macs == 0
    assert "no Conv" in format_table(metrics)


def test_uncounted_ops_lists_custom_domains_and_unmodelled_compute_once() -> None:
    nodes = [
        oh.make_node("Fancy", ["x"], ["f1"], name="f1", domain="com.example"),
        oh.make_node("Fancy", ["f1"], ["f2"], name="f2", domain="com.example"),
        oh.make_node("Relu", ["f2"], ["r"], name="relu"),
        oh.make_node("Einsum", ["r", "r"], ["y"], name="einsum", equation="nchw,nchw->nc"),
    ]
    graph = oh.make_graph(
        nodes,
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    opsets = [oh.make_opsetid("", 17), oh.make_opsetid("com.example", 1)]
    model = ir.serde.deserialize_model(oh.make_model(graph, opset_imports=opsets, ir_version=10))
    found = uncounted_ops(model)
    # Relu has no MACs by definition: not listed; the two Fancy nodes are one entry.
    assert found == [UncountedOp("Fancy", "com.example", 2), UncountedOp("Einsum", "", 1)]
    assert found[0].message() == (
        "Fancy in domain com.example is not counted (2 nodes, taken as 0 MACs)"
    )
    assert found[1].message().startswith("Einsum in domain ai.onnx is not counted (1 node,")


def test_channel_mismatches_find_a_weight_that_does_not_fit_its_input() -> None:
    model = _model(
        [
            # 8 channels in; weight (6, 4) with group 2 takes 8: fits.
            oh.make_node("Conv", ["x", "w_ok"], ["a"], name="grouped", group=2),
            # 6 channels in; a weight (4, 5) takes 5: does not fit.
            oh.make_node("Conv", ["a", "w_bad"], ["b"], name="bad"),
            # 4 channels in; ConvTranspose weight (3, 2) takes 3: does not fit.
            oh.make_node("ConvTranspose", ["b", "w_up"], ["y"]),
        ],
        [("x", [1, 8, 9, 9])],
        ["y"],
        [
            _weight("w_ok", (6, 4, 1, 1)),
            _weight("w_bad", (4, 5, 1, 1)),
            _weight("w_up", (3, 2, 2, 2)),
        ],
    )
    assert channel_mismatches(model) == [
        ChannelMismatch("bad", "Conv", 6, 5),
        ChannelMismatch("ConvTranspose_2", "ConvTranspose", 4, 3),
    ]
    # The layer table names the unnamed node the same way.
    assert model_metrics(model).layers[2].node == "ConvTranspose_2"


def test_a_well_formed_model_has_nothing_uncounted_or_mismatched() -> None:
    model = _model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], name="conv", group=2),
            oh.make_node("Relu", ["c"], ["r"], name="relu"),
            oh.make_node("ConvTranspose", ["r", "up"], ["y"], name="up"),
        ],
        [("x", ["N", 4, 6, 6])],
        ["y"],
        [_weight("w", (6, 2, 3, 3)), _weight("up", (6, 2, 2, 2))],
    )
    assert uncounted_ops(model) == [] and channel_mismatches(model) == []


def test_model_metrics_infers_missing_shapes() -> None:
    graph = oh.make_graph(
        [
            oh.make_node("Conv", ["x", "w"], ["y"], name="conv"),
            oh.make_node("Relu", ["y"], ["z"], name="relu"),
        ],
        "g",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2, 6, 6])],
        [oh.make_tensor_value_info("z", onnx.TensorProto.FLOAT, None)],
        [_weight("w", (3, 2, 3, 3))],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=10)
    model = ir.serde.deserialize_model(proto)
    assert _node(model, "conv").outputs[0].shape is None
    assert model_metrics(model).macs == 3 * 4 * 4 * 2 * 9


def test_as_dict_is_json_and_table_lists_every_layer() -> None:
    model = _model(
        [
            oh.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            oh.make_node("Flatten", ["c"], ["f"], name="flat"),
            oh.make_node("Gemm", ["f", "fc"], ["y"], name="fc", transB=1),
        ],
        [("x", [1, 3, 4, 4])],
        ["y"],
        [_weight("w", (8, 3, 3, 3)), _weight("fc", (10, 128))],
    )
    metrics = model_metrics(model, file_size=123_456)
    data = json.loads(json.dumps(metrics.as_dict()))
    assert set(data) == {"params", "macs", "file_size", "batch", "layers"}
    assert data["macs"] == 8 * 16 * 27 + 1280 == sum(layer["macs"] for layer in data["layers"])
    assert data["layers"][0]["kernel"] == [3, 3]
    table = format_table(metrics)
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["node", "op", "in->out"]
    conv_line = next(line for line in lines if line.startswith("conv "))
    assert "3->8" in conv_line and "3x3" in conv_line
    # conv has 3456 of the 4736 MACs.
    assert "73.0%" in conv_line
    assert "128->10" in next(line for line in lines if line.startswith("fc "))
    assert "0.12 MB" in table and "params" in table and "at batch 1" in table


# ---------------------------------------------------------------------------------------------
# torchvision zoo: totals must match the published figures
# ---------------------------------------------------------------------------------------------

# (params, MACs) at 1x3x224x224 as torchvision and the papers report them.
PUBLISHED = {"resnet18": (11.69e6, 1.814e9), "mobilenet_v2": (3.50e6, 300.8e6)}


def _export(arch: str, path: Path, dynamo: bool) -> None:
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    module = getattr(torchvision.models, arch)(weights=None).eval()
    # Freshly initialised BatchNorms are all ones/zeros, so the folded Conv biases are all zero
    # and the exporters deduplicate them: the stored parameters would be up to 1% fewer than a
    # trained model's. Random BatchNorm statistics make the export look like a trained one.
    with torch.no_grad():
        for bn in module.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
                bn.running_mean.normal_(0.0, 0.1)
                bn.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, 224, 224)
    if dynamo:
        program = torch.onnx.export(
            module,
            (x,),
            dynamo=True,
            opset_version=18,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},),
            verbose=False,
        )
        assert program is not None
        program.save(str(path))
    else:
        torch.onnx.export(
            module,
            (x,),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("zoo")


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
@pytest.mark.parametrize(
    ("arch", "exporter"),
    [
        ("resnet18", "torchscript"),
        ("resnet18", "dynamo"),
        ("mobilenet_v2", "torchscript"),
        # The dynamo export of mobilenet_v2 alone takes 15-20 s here.
        pytest.param("mobilenet_v2", "dynamo", marks=pytest.mark.slow),
    ],
)
def test_torchvision_totals_match_published(arch: str, exporter: str, zoo_dir: Path) -> None:
    path = zoo_dir / f"{arch}_{exporter}.onnx"
    _export(arch, path, dynamo=exporter == "dynamo")
    params, macs = PUBLISHED[arch]
    raw = load_model(path)
    raw_metrics = model_metrics(raw)
    canonical = load_model(path)
    canonicalize(canonical)
    canonical_metrics = model_metrics(canonical)
    for metrics in (raw_metrics, canonical_metrics):
        assert metrics.params == pytest.approx(params, rel=0.005)
        assert metrics.macs == pytest.approx(macs, rel=0.005)
        assert sum(1 for layer in metrics.layers if layer.op == "Conv") == (
            20 if arch == "resnet18" else 52
        )
    # Folding BatchNorm moves no compute into or out of the counted layers.
    assert raw_metrics.macs == canonical_metrics.macs
    # The batch axis is symbolic, so MACs scale with the batch asked for.
    assert model_metrics(canonical, batch=4).macs == 4 * canonical_metrics.macs
    assert isinstance(raw_metrics, ModelMetrics)
    # Real exports hold nothing the counter cannot count and no mis-sized weight.
    assert uncounted_ops(raw) == [] and uncounted_ops(canonical) == []
    assert channel_mismatches(raw) == [] and channel_mismatches(canonical) == []


def test_a_computed_dim_the_exporter_named_afresh_is_counted_at_its_value() -> None:
    """TorchScript exports name some computed dims with fresh symbols (``unk__1``: batch times
    the patches of a MobileViT unfold). Counted as 1 like the batch, such a MatMul came out
    4x low; the count now infers the dim from the inputs at batch 1."""
    graph = oh.make_graph(
        [
            oh.make_node("Reshape", ["x", "target"], ["tokens"]),
            oh.make_node("MatMul", ["tokens", "w"], ["y"]),
        ],
        "patches",
        [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4, 16, 32])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["unk__1", 16, 8])],
        initializer=[
            onh.from_array(np.array([-1, 16, 32], dtype=np.int64), "target"),
            _weight("w", (32, 8)),
        ],
        value_info=[
            oh.make_tensor_value_info("tokens", onnx.TensorProto.FLOAT, ["unk__1", 16, 32])
        ],
    )
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(proto)
    # 4 patches x 16 tokens x 32 -> 8 per image.
    assert model_metrics(model).macs == 4 * 16 * 32 * 8
    assert model_metrics(model, batch=2).macs == 2 * 4 * 16 * 32 * 8
    # The model keeps its own (symbolic) shapes.
    tokens = next(node for node in model.graph if node.op_type == "MatMul").inputs[0]
    assert tokens is not None and tokens.shape is not None and str(tokens.shape[0]) == "unk__1"
