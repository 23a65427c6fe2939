"""Channel-dependency analysis: groups, members, offsets and frozen reasons on small graphs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import channel_models as cm
import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.graph.canonicalize import load_canonical
from onnxcompress.graph.channels import ChannelAnalysis, ChannelGroup, analyze_channels, registry


def group_by_producer(analysis: ChannelAnalysis, *names: str) -> ChannelGroup:
    """The group whose producer nodes are exactly ``names``."""
    wanted = set(names)
    found = [g for g in analysis.groups if {n.name for n in g.producer_nodes} == wanted]
    assert len(found) == 1, f"{names}: {[g.name for g in analysis.groups]}"
    return found[0]


def node(model: ir.Model, name: str) -> ir.Node:
    return next(n for n in model.graph if n.name == name)


def frozen_reasons(analysis: ChannelAnalysis) -> str:
    return " | ".join(reason for _, reason in analysis.frozen)


def test_chain_groups_and_flatten_blocks() -> None:
    model = cm.chain()
    analysis = analyze_channels(model)
    assert [g.size for g in analysis.groups] == [3, 8, 6, 5]
    assert [g.is_frozen for g in analysis.groups] == [True, False, False, True]
    assert "graph input 'x'" in (analysis.groups[0].frozen_reason or "")
    assert "reaches graph output" in (analysis.groups[3].frozen_reason or "")
    assert [g.id for g in analysis.prunable] == [1, 2]

    first = group_by_producer(analysis, "conv_3")
    assert [(ws.node.name, ws.input_index, ws.axis) for ws in first.producers] == [
        ("conv_3", 1, 0),
        ("conv_3", 2, 0),
    ]
    assert [(ws.node.name, ws.axis) for ws in first.consumers] == [("conv_8", 1)]
    assert first.producer_matrix().shape == (8, 3 * 9)
    assert first.producer_matrix(include_bias=True).shape == (8, 3 * 9 + 1)
    assert first.consumer_matrix().shape == (8, 6 * 9)
    # Relu and MaxPool pass the channels through: 3 tensors carry them.
    assert len(first.tensors) == 3
    assert {n.op_type for n in first.path_nodes} == {"Relu", "MaxPool"}

    second = group_by_producer(analysis, "conv_8")
    gemm = second.consumers[0]
    assert gemm.node.op_type == "Gemm" and gemm.axis == 1
    # After Flatten each channel owns a contiguous block of 4*4 columns of the Gemm weight.
    assert second.multiplicity(gemm.tensor) == 16
    np.testing.assert_array_equal(second.positions(gemm.tensor), np.arange(6 * 16).reshape(6, 16))
    assert second.consumer_matrix().shape == (6, 5 * 16)
    weight = gemm.array()
    np.testing.assert_allclose(second.consumer_matrix()[2], weight[:, 32:48].T.reshape(-1))


def test_macs_and_params_per_channel_from_shapes() -> None:
    analysis = analyze_channels(cm.chain())
    first = group_by_producer(analysis, "conv_3")
    # Producer conv_3 [8,3,3,3] at 8x8 outputs, consumer conv_8 [6,8,3,3] at 4x4 outputs.
    assert first.macs_per_channel() == 27 * 64 + 6 * 9 * 16
    assert first.params_per_channel() == 27 + 1 + 6 * 9
    second = group_by_producer(analysis, "conv_8")
    assert second.macs_per_channel() == 8 * 9 * 16 + 5 * 16


def test_residual_add_joins_producers() -> None:
    model = cm.residual()
    analysis = analyze_channels(model)
    stream = group_by_producer(analysis, "conv_3", "conv_11")
    assert stream.size == 8 and not stream.is_frozen
    assert {ws.node.name for ws in stream.consumers} == {"conv_7", "conv_16"}
    # Filters of both producers are stacked: 3*9 from the stem, 12*9 from the block's conv2.
    assert stream.producer_matrix().shape == (8, 3 * 9 + 12 * 9)
    assert "Add" in {n.op_type for n in stream.path_nodes}
    assert stream.linear_path is False  # Relu on the stream
    inner = group_by_producer(analysis, "conv_7")
    assert inner.size == 12 and [ws.node.name for ws in inner.consumers] == ["conv_11"]


def test_option_a_shortcut_zero_channels_form_their_own_group() -> None:
    analysis = analyze_channels(cm.option_a())
    carried = group_by_producer(analysis, "conv_3", "conv_11")
    padded = next(g for g in analysis.groups if g.zero_padding)
    assert carried.size == 4 and padded.size == 4
    assert [n.op_type for n in padded.zero_padding] == ["Pad"]
    assert [n.name for n in padded.producer_nodes] == ["conv_11"]
    add_out = next(n for n in analysis.model.graph if n.op_type == "Add").outputs[0]
    # Stage-1 channels land at 2..5 of the 8-channel stage, padding at 0,1 and 6,7.
    np.testing.assert_array_equal(carried.positions(add_out).ravel(), [2, 3, 4, 5])
    np.testing.assert_array_equal(padded.positions(add_out).ravel(), [0, 1, 6, 7])
    assert {f.kind for f in padded.fixups} >= {"pad"}


def test_concat_offsets_densenet_style() -> None:
    model = cm.concat_dense()
    analysis = analyze_channels(model)
    cat1 = node(model, "concat_8").outputs[0]
    cat2 = node(model, "concat_18").outputs[0]
    first = group_by_producer(analysis, "conv_3")
    second = group_by_producer(analysis, "conv_7")
    third = group_by_producer(analysis, "conv_17")
    np.testing.assert_array_equal(first.positions(cat1).ravel(), np.arange(6))
    np.testing.assert_array_equal(second.positions(cat1).ravel(), np.arange(6, 10))
    np.testing.assert_array_equal(second.positions(cat2).ravel(), np.arange(6, 10))
    np.testing.assert_array_equal(third.positions(cat2).ravel(), np.arange(10, 14))
    # The BatchNormalization after the concat is sliced per group at the group's offsets.
    bn = [ws for ws in second.params if ws.node.op_type == "BatchNormalization"]
    assert sorted(ws.input_index for ws in bn) == [1, 2, 3, 4]
    assert {ws.node.name for ws in first.consumers} == {"conv_7", "conv_17", "gemm_24"}


def test_concat_inception_branches() -> None:
    model = cm.inception()
    analysis = analyze_channels(model)
    cat = next(n for n in model.graph if n.op_type == "Concat").outputs[0]
    offsets = {
        name: group_by_producer(analysis, name).positions(cat).ravel().tolist()
        for name in ("conv_3", "conv_11", "conv_16")
    }
    assert offsets == {"conv_3": [0, 1, 2], "conv_11": list(range(3, 9)), "conv_16": [9, 10]}
    # The input feeds three branches and a MaxPool: still one (frozen, graph input) group.
    assert analysis.groups[0].size == 4 and analysis.groups[0].is_frozen


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_inverted_residual(multiplier: int) -> None:
    model = cm.inverted_residual(multiplier)
    analysis = analyze_channels(model)
    expand = group_by_producer(analysis, "conv_6")
    assert expand.size == 12 and not expand.is_frozen
    depthwise = [ws for ws in expand.params if ws.node.name == "conv_12"]
    assert sorted((ws.input_index, ws.axis) for ws in depthwise) == [(1, 0), (2, 0)]
    assert [ws.node.name for ws in expand.consumers] == ["conv_18"]
    dw_out = node(model, "conv_12").outputs[0]
    assert expand.multiplicity(dw_out) == multiplier
    assert [f.kind for f in expand.fixups] == ["conv_group"]
    # The projection and the stem write the residual stream together.
    stream = group_by_producer(analysis, "conv_3", "conv_18")
    assert stream.size == 6


def test_grouped_conv_prunes_whole_groups() -> None:
    model = cm.grouped()
    analysis = analyze_channels(model)
    grouped_conv = node(model, "conv_7")
    feeding = group_by_producer(analysis, "conv_3")
    # Two conv groups of 4 input and 4 output channels: two removable units of 4 channels.
    assert feeding.size == 2 and not feeding.is_frozen
    assert feeding.multiplicity(grouped_conv.inputs[0]) == 4
    assert feeding.multiplicity(grouped_conv.outputs[0]) == 4
    np.testing.assert_array_equal(
        feeding.positions(grouped_conv.outputs[0]), [[0, 1, 2, 3], [4, 5, 6, 7]]
    )
    assert [(ws.node.name, ws.role) for ws in feeding.slices if ws.node is grouped_conv] == [
        ("conv_7", "param"),
        ("conv_7", "param"),
    ]
    assert [ws.node.name for ws in feeding.consumers] == ["conv_11"]
    assert [f.kind for f in feeding.fixups] == ["conv_group"]


def test_squeeze_excite_gate_joins_features() -> None:
    model = cm.squeeze_excite()
    analysis = analyze_channels(model)
    features = group_by_producer(analysis, "conv_3", "conv_12")
    assert features.size == 8
    consumers = {ws.node.name for ws in features.consumers}
    assert consumers == {"conv_8", "conv_17"}  # the SE squeeze conv reads the pooled features
    squeeze = group_by_producer(analysis, "conv_8")
    assert squeeze.size == 3 and [ws.node.name for ws in squeeze.consumers] == ["conv_12"]
    gap_out = node(model, "globalaveragepool_5").outputs[0]
    assert gap_out in features.consumer_inputs


def test_reshape_flatten_feeds_gemm_in_blocks() -> None:
    model = cm.flatten_gemm()
    analysis = analyze_channels(model)
    conv = group_by_producer(analysis, "conv_3")
    gemm = conv.consumers[0]
    assert gemm.node.name == "gemm_9" and conv.multiplicity(gemm.tensor) == 16
    hidden = group_by_producer(analysis, "gemm_9")
    assert hidden.size == 7
    last = hidden.consumers[0]
    assert (last.node.name, last.axis) == ("gemm_13", 0)  # transB=0: inputs on axis 0


def test_mlp_neurons_and_matmul_bias() -> None:
    analysis = analyze_channels(cm.mlp())
    first = group_by_producer(analysis, "gemm_3")
    assert first.size == 10
    assert [(ws.node.op_type, ws.axis) for ws in first.consumers] == [("MatMul", 0)]
    second = group_by_producer(analysis, "matmul_6")
    assert second.size == 9
    assert [(ws.node.op_type, ws.input_index) for ws in second.params] == [("Add", 1)]


def test_split_slice_gather_resize_reshape() -> None:
    model = cm.split_slice()
    analysis = analyze_channels(model)
    parts = [
        g for g in analysis.groups if g.producer_nodes and g.producer_nodes[0].name == "conv_3"
    ]
    # Split 5|7, then Slice 1:6 of the 7: three groups, one of them (2 channels) unused.
    assert sorted(g.size for g in parts) == [2, 5, 5]
    unused = next(g for g in parts if g.size == 2)
    assert unused.consumers == [] and not unused.is_frozen
    kinds = {f.kind for g in parts for f in g.fixups}
    assert kinds == {"split", "slice"}
    after = group_by_producer(analysis, "conv_9")
    assert {f.kind for f in after.fixups} == {"gather", "shape_entry"}
    assert not after.is_frozen


def test_transposed_conv_and_prelu() -> None:
    analysis = analyze_channels(cm.transposed())
    up = group_by_producer(analysis, "convtranspose_7")
    assert up.size == 5
    assert [(ws.node.op_type, ws.input_index) for ws in up.params] == [("PRelu", 1)]
    assert [(ws.axis) for ws in up.producers] == [1, 0]  # ConvTranspose W is [Cin, Cout, ...]
    before = group_by_producer(analysis, "conv_3")
    assert [(ws.node.op_type, ws.axis) for ws in before.consumers] == [("ConvTranspose", 0)]


def test_graph_output_channels_never_removable() -> None:
    analysis = analyze_channels(cm.multi_output())
    feature = group_by_producer(analysis, "conv_3")
    assert feature.is_frozen and "reaches graph output 'relu_4_out'" in (
        feature.frozen_reason or ""
    )
    assert [g.name for g in analysis.prunable] == ["conv_7"]


def test_unknown_op_freezes_with_its_name() -> None:
    analysis = analyze_channels(cm.unknown_op())
    feeding = group_by_producer(analysis, "conv_3")
    assert feeding.frozen_reason == (
        "consumed by an op with unknown channel semantics: TopK topk_6"
    )
    assert [g.name for g in analysis.prunable] == ["conv_9"]


def test_channel_shuffle_reshape_is_frozen() -> None:
    analysis = analyze_channels(cm.odd_reshape())
    feeding = group_by_producer(analysis, "conv_3")
    assert "Reshape reshape_6" in (feeding.frozen_reason or "")
    assert "not a flatten-style merge" in (feeding.frozen_reason or "")


def test_shape_reading_channel_count_freezes() -> None:
    net = cm.Net(30)
    x = cm.image_input(net)
    feat = net.relu(net.conv(x, 3, 6))
    shape = net.op("Shape", [feat])
    channels = net.op("Gather", [shape, net.const(np.array(1, np.int64))], axis=0)
    as_float = net.op("Cast", [channels], to=1)
    scaled = net.op("Div", [feat, as_float])
    analysis = analyze_channels(net.build([net.head(scaled, 6)]))
    reason = group_by_producer(analysis, "conv_3").frozen_reason or ""
    assert "its shape is read by Shape shape_5" in reason


def test_linear_and_homogeneous_paths() -> None:
    linear = analyze_channels(cm.linear_conv_pool_conv(0.0))
    group = group_by_producer(linear, "conv_3")
    assert group.linear_path and group.homogeneous_path
    relu = group_by_producer(analyze_channels(cm.chain()), "conv_3")
    assert not relu.linear_path and relu.homogeneous_path  # Relu and MaxPool are homogeneous
    clip = group_by_producer(analyze_channels(cm.inverted_residual()), "conv_6")
    assert not clip.homogeneous_path  # Clip (ReLU6) and a depthwise conv


def test_channels_last_region_is_carried_on_axis_3() -> None:
    """Through Transpose(0,2,3,1) and back, the channels are one group; NHWC tensors on axis 3."""
    model = cm.channels_last()
    analysis = analyze_channels(model)
    group = group_by_producer(analysis, "conv_3")
    assert {t.name: group.axis(t) for t in group.tensors} == {
        "conv_3_out": 1,
        "transpose_4_out": 3,
        "mul_6_out": 3,
        "add_8_out": 3,
        "relu_9_out": 3,
        "transpose_10_out": 1,
    }
    assert group.size == 6 and group.multiplicity(node(model, "mul_6").outputs[0]) == 1
    # The per-channel constants of shape [6] scale the last axis: they are the group's params.
    assert [(ws.node.op_type, ws.input_index, ws.axis) for ws in group.params] == [
        ("Mul", 1, 0),
        ("Add", 1, 0),
    ]
    assert [ws.node.name for ws in group.consumers] == ["conv_13"]
    assert not group.linear_path  # per-channel affine and Relu on the way
    # Elementwise, broadcast and Transpose ops cut on any axis: the group is prunable.
    assert group.frozen_reason is None
    assert [g.name for g in analysis.prunable] == ["conv_3", "conv_13"]


def test_channels_last_reduce_head_reaches_the_gemm() -> None:
    """ReduceMean over H, W of an NHWC tensor (keepdims=0) puts the channels back on axis 1."""
    model = cm.channels_last_head()
    analysis = analyze_channels(model)
    group = group_by_producer(analysis, "conv_3")
    pooled = node(model, "reducemean_6").outputs[0]
    assert group.axis(node(model, "transpose_5").outputs[0]) == 3
    assert group.axis(pooled) == 1
    np.testing.assert_array_equal(group.positions(pooled).ravel(), np.arange(6))
    assert [(ws.node.name, ws.axis) for ws in group.consumers] == [("gemm_9", 1)]
    assert group.frozen_reason is None


def test_tf2onnx_squeeze_excite_in_nhwc_is_one_prunable_group() -> None:
    """The features, their NHWC copy, the gate and the gated product share one group; the
    squeeze conv reads its channels back on axis 1 (after the second Transpose)."""
    model = cm.channels_last_se()
    analysis = analyze_channels(model)
    group = group_by_producer(analysis, "conv_3", "conv_14")
    assert group.frozen_reason is None and group.size == 8
    assert {ws.node.name for ws in group.producers} == {"conv_3", "conv_14"}  # features, gate
    assert {ws.node.name for ws in group.consumers} == {"conv_10", "conv_21"}  # squeeze, next
    assert group.axis(node(model, "mul_17").outputs[0]) == 3
    assert sorted(g.name for g in analysis.prunable) == ["conv_10", "conv_21", "conv_3, conv_14"]


@pytest.mark.parametrize(
    ("build", "op"), [(cm.channels_last_concat, "Concat concat_11"), (cm.channels_last_matmul, "")]
)
def test_ops_that_assume_axis_1_freeze_channels_moved_off_it(build: Any, op: str) -> None:
    """Negative: a Concat on the NHWC channel axis rewrites layout constants that assume
    axis 1, and a MatMul contracts the moved channel axis; neither is cut."""
    analysis = analyze_channels(build())
    group = group_by_producer(analysis, "conv_3")
    assert group.is_frozen
    reason = group.frozen_reason or ""
    assert (op in reason and "channels-last" in reason) if op else "MatMul matmul_7" in reason


def test_fixed_axis_ops_freeze_channels_that_lie_elsewhere() -> None:
    """A Conv or MaxPool reading an NHWC tensor takes its H axis for channels."""
    model = cm.channels_last_misread()
    analysis = analyze_channels(model)
    reason = group_by_producer(analysis, "conv_3").frozen_reason or ""
    assert "Conv conv_8 reads axis 1 of 'transpose_5_out', whose channels lie on axis 3" in reason
    assert "MaxPool maxpool_10 works on channel axis 1, but 'transpose_5_out' holds" in reason
    # The Conv's own output channels do not depend on what it reads: still prunable.
    assert [g.name for g in analysis.prunable] == ["conv_8"]
    pooled = node(model, "maxpool_10").outputs[0]
    assert all(g.is_frozen for g in analysis.groups_of(pooled))


def test_transpose_keeping_channels_on_axis_1_stays_prunable() -> None:
    analysis = analyze_channels(cm.spatial_transpose())
    group = group_by_producer(analysis, "conv_3")
    assert not group.is_frozen and {group.axis(t) for t in group.tensors} == {1}
    assert "Transpose" in {n.op_type for n in group.path_nodes} and group.homogeneous_path


def test_no_slot_is_lost() -> None:
    """Every tracked tensor's channels are covered exactly once by the groups."""
    for build in [*cm.BUILDERS.values(), *cm.CHANNEL_AXIS_BUILDERS.values()]:
        analysis = analyze_channels(build())
        for value in analysis.tensors:
            covered = np.concatenate(
                [g.positions(value).ravel() for g in analysis.groups_of(value)]
            )
            assert np.array_equal(np.sort(covered), np.arange(analysis.channel_count(value)))


def test_resnet20_groups(resnet20_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_canonical(resnet20_path)
    # The analysis's work is counted, not timed (a clock fails on a loaded machine): every node
    # goes through its channel rule exactly once (no fixed-point rounds, no re-analysis per
    # group), so the rule work is linear in the graph.
    visits: Counter[int] = Counter()

    def counted(rule: Callable[[ir.Node, Any], None]) -> Callable[[ir.Node, Any], None]:
        def visit(node: ir.Node, builder: Any) -> None:
            visits[id(node)] += 1
            rule(node, builder)

        return visit

    for rule in [*registry.FAMILIES, registry.UNKNOWN_OP]:
        monkeypatch.setattr(rule, "analyze", counted(rule.analyze))
    analysis = analyze_channels(model)
    print(analysis.summary())
    assert visits == Counter(id(n) for n in model.graph)
    assert set(visits.values()) == {1}
    assert len(analysis.groups) == 14 and len(analysis.prunable) == 12
    inner = [g for g in analysis.prunable if len(g.producer_nodes) == 1]
    assert [g.size for g in inner] == [16, 16, 16, 32, 32, 32, 64, 64, 64]
    assert all(g.producer_nodes[0].name.endswith("conv1/Conv") for g in inner)
    residual = [g for g in analysis.prunable if len(g.producer_nodes) > 1]
    # Stage-1 channels run through all stages; stage 2 and 3 add their zero-padded channels.
    assert [(g.size, len(g.producer_nodes), len(g.zero_padding)) for g in residual] == [
        (16, 10, 0),
        (16, 6, 1),
        (32, 3, 1),
    ]
    assert sum(g.size for g in residual) == 64
    stem = residual[0]
    assert stem.producer_nodes[0].name == "/conv1/Conv"
    assert stem.consumer_nodes[-1].name == "/linear/Gemm"
    assert analysis.groups[-1].frozen_reason == "reaches graph output 'logits'"
