"""Channel surgery: removals and compensation leave ONNX Runtime outputs unchanged when exact."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import channel_models as cm
import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxcompress.graph.canonicalize import load_canonical
from onnxcompress.graph.channels import ChannelAnalysis, ChannelGroup, analyze_channels
from onnxcompress.graph.model_io import clone_model
from onnxcompress.graph.surgery import fold_compensation, remove_channels

RTOL, ATOL = 1e-4, 1e-5


def zero_channels(group: ChannelGroup, channels: list[int]) -> None:
    """Make channels carry exact zeros: zero their producer rows and per-channel params."""
    for ws in group.producers + group.params:
        value = ws.value
        array = value.const_value.numpy().copy()  # type: ignore[union-attr]
        index: list[object] = [slice(None)] * array.ndim
        index[ws.axis] = group.positions(ws.tensor)[channels].ravel()
        array[tuple(index)] = 0
        value.const_value = ir.tensor(array, name=value.name)


def check_valid(model: ir.Model, reference: ir.Model) -> None:
    """Full checker, same input/output names and output shapes, IR shapes match inference."""
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert [v.name for v in model.graph.inputs] == [v.name for v in reference.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in reference.graph.outputs]
    for ours, theirs in zip(model.graph.outputs, reference.graph.outputs, strict=True):
        assert ours.shape == theirs.shape
    # The channel dims surgery wrote must agree with what ONNX infers from the new weights.
    del proto.graph.value_info[:]
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
    values = {v.name: v for n in model.graph for v in n.outputs}
    for info in inferred.graph.value_info:
        dims = [
            d.dim_value if d.HasField("dim_value") else None
            for d in info.type.tensor_type.shape.dim
        ]
        value = values.get(info.name)
        if value is None or value.shape is None:
            continue
        for ours_dim, inferred_dim in zip(value.shape.dims, dims, strict=True):
            if isinstance(ours_dim, int) and inferred_dim is not None:
                assert ours_dim == inferred_dim, info.name


def assert_same(before: list[np.ndarray], after: list[np.ndarray]) -> None:
    for x, y in zip(before, after, strict=True):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=RTOL, atol=ATOL)


def prunable_ids(build: Callable[[], ir.Model]) -> list[int]:
    return [g.id for g in analyze_channels(build()).prunable]


BUILDERS = {**cm.BUILDERS, **cm.CHANNEL_AXIS_BUILDERS}
CASES = [(name, gid) for name, build in BUILDERS.items() for gid in prunable_ids(build)]


@pytest.mark.parametrize(("name", "gid"), CASES, ids=[f"{n}-g{g}" for n, g in CASES])
def test_removing_zero_channels_is_exact(name: str, gid: int) -> None:
    model = BUILDERS[name]()
    reference = clone_model(model)
    analysis = analyze_channels(model)
    group = analysis.groups[gid]
    chosen = sorted({0, group.size // 2, group.size - 1})[: group.size - 1]
    zero_channels(group, chosen)
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)
    size = group.size
    remove_channels(model, group, chosen)
    assert group.size == size - len(chosen)
    check_valid(model, reference)
    assert_same(before, cm.run(model, feeds))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_successive_removals_across_groups_stay_exact(name: str) -> None:
    """Removals in one group must not invalidate another group's positions (Concat, Split...)."""
    model = BUILDERS[name]()
    reference = clone_model(model)
    analysis = analyze_channels(model)
    rng = np.random.default_rng(1)
    plan = {}
    for group in analysis.prunable:
        count = max(1, group.size // 3)
        plan[group.id] = sorted(rng.choice(group.size, size=count, replace=False).tolist())
        zero_channels(group, plan[group.id])
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)
    # Remove in two rounds, in reverse group order, renumbering the second half each time.
    for group in reversed(analysis.prunable):
        half = plan[group.id][: len(plan[group.id]) // 2 + 1]
        remove_channels(model, group, half)
        plan[group.id] = [c - sum(h < c for h in half) for c in plan[group.id] if c not in half]
    for group in analysis.groups:
        if plan.get(group.id):
            remove_channels(model, group, plan[group.id])
    check_valid(model, reference)
    assert_same(before, cm.run(model, feeds))


def test_pads_slices_and_split_sizes_are_rewritten() -> None:
    model = cm.option_a()
    analysis = analyze_channels(model)
    padded = next(g for g in analysis.prunable if g.zero_padding)
    pad = padded.zero_padding[0]
    remove_channels(model, padded, [0, 3])  # one leading and one trailing zero channel
    assert pad.inputs[1].const_value.numpy().tolist() == [0, 1, 0, 0, 0, 1, 0, 0]  # type: ignore[union-attr]

    model = cm.split_slice()
    analysis = analyze_channels(model)
    split = next(n for n in model.graph if n.op_type == "Split")
    slicer = next(n for n in model.graph if n.op_type == "Slice")
    first_part = next(g for g in analysis.prunable if split.outputs[0] in g.tensors)
    sliced = next(g for g in analysis.prunable if slicer.outputs[0] in g.tensors)
    unused = next(g for g in analysis.prunable if split.outputs[1] in g.tensors and g is not sliced)

    def bounds() -> tuple[list[int], int, int]:
        sizes = split.inputs[1].const_value.numpy().tolist()  # type: ignore[union-attr]
        start = int(slicer.inputs[1].const_value.numpy()[0])  # type: ignore[union-attr]
        end = int(slicer.inputs[2].const_value.numpy()[0])  # type: ignore[union-attr]
        return sizes, start, end

    assert bounds() == ([5, 7], 1, 6)
    remove_channels(model, unused, [0])  # the channel in front of the Slice window
    assert bounds() == ([5, 6], 0, 5)
    remove_channels(model, first_part, [2, 4])
    assert bounds() == ([3, 6], 0, 5)
    remove_channels(model, sliced, [0, 3])
    assert bounds() == ([3, 4], 0, 3)


def test_depthwise_group_attribute_follows_channels() -> None:
    model = cm.inverted_residual(2)
    analysis = analyze_channels(model)
    expand = next(g for g in analysis.prunable if g.producer_nodes[0].name == "conv_6")
    depthwise = next(n for n in model.graph if n.name == "conv_12")
    remove_channels(model, expand, [1, 5, 7])
    assert depthwise.attributes["group"].as_int() == 9
    assert depthwise.inputs[1].const_value.shape == (18, 1, 3, 3)  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------
# Compensation
# ---------------------------------------------------------------------------------------------


def replaceable_group(analysis: ChannelAnalysis, producer: str) -> ChannelGroup:
    return next(g for g in analysis.groups if producer in {n.name for n in g.producer_nodes})


LINEAR_CASES: dict[str, tuple[Callable[[float], ir.Model], str]] = {
    "conv_pool_conv": (cm.linear_conv_pool_conv, "conv_3"),
    "flatten_gemm": (cm.linear_flatten_gemm, "conv_3"),
    "gemm_matmul_no_bias": (cm.linear_mlp, "gemm_3"),
    "gemm_alpha_beta": (cm.linear_mlp, "gemm_9"),
    "residual_add": (cm.linear_residual, "conv_3"),
}


@pytest.mark.parametrize("case", list(LINEAR_CASES))
@pytest.mark.parametrize("beta", [0.0, 0.37])
def test_compensated_linear_combination_is_exact(case: str, beta: float) -> None:
    build, producer = LINEAR_CASES[case]
    model = build(beta)
    reference = clone_model(model)
    analysis = analyze_channels(model)
    group = replaceable_group(analysis, producer)
    assert group.linear_path
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)
    keep = [k for k in range(group.size) if k != cm.REPLACED]
    matrix = np.zeros((1, len(keep)))
    for coefficient, k in zip(cm.COEFFS, cm.KEEP, strict=True):
        matrix[0, keep.index(k)] = coefficient
    fold_compensation(model, group, [cm.REPLACED], keep, matrix, np.array([beta]))
    remove_channels(model, group, [cm.REPLACED])
    check_valid(model, reference)
    assert_same(before, cm.run(model, feeds))


def test_compensation_bias_created_then_sliced_by_later_removal() -> None:
    """A bias made by compensation belongs to the consumer's own group from then on."""
    model = cm.linear_mlp(0.5)
    reference = clone_model(model)
    analysis = analyze_channels(model)
    group = replaceable_group(analysis, "gemm_3")
    keep = [k for k in range(group.size) if k != cm.REPLACED]
    matrix = np.zeros((1, len(keep)))
    matrix[0, [keep.index(k) for k in cm.KEEP]] = cm.COEFFS
    fold_compensation(model, group, [cm.REPLACED], keep, matrix, np.array([0.5]))
    remove_channels(model, group, [cm.REPLACED])
    adds = [n for n in model.graph if n.op_type == "Add"]
    assert len(adds) == 1  # the MatMul had no bias: one was inserted
    matmul_group = replaceable_group(analysis, "matmul_5")
    assert any(ws.node is adds[0] for ws in matmul_group.producers)
    zero_channels(matmul_group, [2, 3])
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)
    remove_channels(model, matmul_group, [2, 3])
    assert adds[0].inputs[1].const_value.shape == (7,)  # type: ignore[union-attr]
    check_valid(model, reference)
    assert_same(before, cm.run(model, feeds))


def test_conv_consumer_without_bias_gets_one() -> None:
    model = cm.linear_conv_pool_conv(0.25)
    analysis = analyze_channels(model)
    group = replaceable_group(analysis, "conv_3")
    consumer = group.consumers[0].node
    assert len(consumer.inputs) == 2
    keep = [0, 2]
    fold_compensation(model, group, [cm.REPLACED], keep, np.array([cm.COEFFS]), np.array([0.25]))
    assert consumer.inputs[2] is not None
    assert any(
        ws.node is consumer and ws.is_bias
        for ws in analysis.groups_produced_by(consumer)[0].producers
    )


def test_padded_consumer_bias_fold_is_exact_inside_only() -> None:
    """With zero padding the constant part is missing at the borders: documented approximation."""
    model = cm.linear_conv_pool_conv(0.5, consumer_pad=1)
    analysis = analyze_channels(model)
    group = replaceable_group(analysis, "conv_3")
    consumer = group.consumers[0].node
    consumer_out = consumer.outputs[0]
    model.graph.outputs.append(consumer_out)  # look at the consumer's output directly
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)[-1]
    keep = [k for k in range(group.size) if k != cm.REPLACED]
    matrix = np.zeros((1, len(keep)))
    matrix[0, [keep.index(k) for k in cm.KEEP]] = cm.COEFFS
    fold_compensation(model, group, [cm.REPLACED], keep, matrix, np.array([0.5]))
    remove_channels(model, group, [cm.REPLACED])
    after = cm.run(model, feeds)[-1]
    np.testing.assert_allclose(
        after[:, :, 1:-1, 1:-1], before[:, :, 1:-1, 1:-1], rtol=RTOL, atol=ATOL
    )
    assert not np.allclose(after[:, :, 0, :], before[:, :, 0, :], rtol=RTOL, atol=ATOL)


def test_fold_only_selected_consumers() -> None:
    model = cm.residual()
    analysis = analyze_channels(model)
    stream = replaceable_group(analysis, "conv_11")
    first, second = stream.consumers
    before_first, before_second = first.array().copy(), second.array().copy()
    fold_compensation(model, stream, [1], [0, 2], np.array([[0.5, 0.25]]), consumers=[first])
    np.testing.assert_array_equal(second.array(), before_second)
    expected = before_first.copy()
    expected[:, 0] += 0.5 * before_first[:, 1]
    expected[:, 2] += 0.25 * before_first[:, 1]
    np.testing.assert_allclose(first.array(), expected, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Safety
# ---------------------------------------------------------------------------------------------


def test_shared_initializer_stays_intact_for_its_other_user() -> None:
    model = cm.shared_weights()
    analysis = analyze_channels(model)
    tied = next(v for name, v in model.graph.initializers.items() if name.startswith("tied"))
    original = tied.const_value.numpy().copy()  # type: ignore[union-attr]
    users = [use.node for use in tied.uses()]
    assert len(users) == 2
    # The first branch's conv output feeds users[0] only; remove from that group.
    branch = next(
        g
        for g in analysis.prunable
        if any(ws.node is users[0] and ws.role == "consumer" for ws in g.consumers)
    )
    zero_channels(branch, [1])
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)
    remove_channels(model, branch, [1])
    np.testing.assert_array_equal(tied.const_value.numpy(), original)  # type: ignore[union-attr]
    assert users[1].inputs[1] is tied
    assert users[0].inputs[1] is not tied
    assert users[0].inputs[1].const_value.shape == (6, 5, 3, 3)  # type: ignore[union-attr]
    assert_same(before, cm.run(model, feeds))


def test_cutting_a_group_to_zero_raises() -> None:
    model = cm.chain()
    group = analyze_channels(model).prunable[0]
    with pytest.raises(ValueError, match="at least one channel must stay"):
        remove_channels(model, group, list(range(group.size)))
    remove_channels(model, group, list(range(group.size - 1)))  # down to one is allowed
    assert group.size == 1
    with pytest.raises(ValueError, match="at least one channel must stay"):
        remove_channels(model, group, [0])


def test_bad_requests_raise() -> None:
    model = cm.unknown_op()
    analysis = analyze_channels(model)
    frozen = next(g for g in analysis.groups if g.is_frozen and g.producer_nodes)
    with pytest.raises(ValueError, match="frozen"):
        remove_channels(model, frozen, [0])
    group = analysis.prunable[0]
    with pytest.raises(ValueError, match="out of range"):
        remove_channels(model, group, [group.size])
    with pytest.raises(ValueError, match="repeat"):
        remove_channels(model, group, [0, 0])
    with pytest.raises(ValueError, match="another model"):
        remove_channels(cm.unknown_op(), group, [0])
    with pytest.raises(ValueError, match="shape"):
        fold_compensation(model, group, [0], [1, 2], np.ones((2, 2)))
    with pytest.raises(ValueError, match="share"):
        fold_compensation(model, group, [0], [0, 1], np.ones((1, 2)))


def test_channels_on_a_moved_axis_are_cut_with_their_nhwc_constants() -> None:
    """Through a Transpose to NHWC, per-channel Mul/Add constants on the last axis are sliced
    with the channels, and the NHWC tensors lose them on axis 3 (exact for zeroed channels)."""
    model = cm.channels_last()
    reference = clone_model(model)
    group = replaceable_group(analyze_channels(model), "conv_3")
    zero_channels(group, [1, 4])
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)
    remove_channels(model, group, [1, 4])
    check_valid(model, reference)
    assert_same(before, cm.run(model, feeds))
    constants = [model.graph.node(name).inputs[1] for name in ("mul_6", "add_8")]
    assert [c.const_value.numpy().shape for c in constants] == [(4,), (4,)]  # type: ignore[union-attr]
    assert list(model.graph.node("relu_9").outputs[0].shape or [])[-1] == 4


def test_channels_moved_into_a_concat_are_not_cut() -> None:
    """Negative: Concat's layout constants assume axis 1; surgery refuses the frozen group."""
    model = cm.channels_last_concat()
    group = replaceable_group(analyze_channels(model), "conv_3")
    with pytest.raises(ValueError, match="frozen: Concat concat_11 meets channels moved"):
        remove_channels(model, group, [0])
    with pytest.raises(ValueError, match="frozen"):
        fold_compensation(model, group, [0], [1], np.ones((1, 1)))


def test_removing_a_live_channel_without_compensation_changes_the_output() -> None:
    model = cm.chain()
    group = analyze_channels(model).prunable[0]
    feeds = cm.feeds_for(model)
    before = cm.run(model, feeds)[0]
    remove_channels(model, group, [3])
    after = cm.run(model, feeds)[0]
    assert after.shape == before.shape
    assert np.abs(after - before).max() > 1e-2


def test_resnet20_zero_channels_removed_exactly(resnet20_path: Path) -> None:
    model, _ = load_canonical(resnet20_path)
    reference = clone_model(model)
    analysis = analyze_channels(model)
    plan = {g.id: [0, g.size // 2, g.size - 1] for g in analysis.prunable}
    for group in analysis.prunable:
        zero_channels(group, plan[group.id])
    feeds = {"input": np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)}
    before = cm.run(model, feeds)
    for group in analysis.prunable:
        remove_channels(model, group, plan[group.id])
    check_valid(model, reference)
    assert_same(before, cm.run(model, feeds))
    pads = [n for n in model.graph if n.op_type == "Pad"]
    assert [p.inputs[1].const_value.numpy()[[1, 5]].tolist() for p in pads] == [[7, 6], [15, 14]]  # type: ignore[union-attr]


ZOO = [
    "resnet18",
    "resnext50_32x4d",
    "mobilenet_v2",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "googlenet",
    "squeezenet1_1",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
]


@pytest.mark.slow
@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
@pytest.mark.parametrize("name", ZOO)
def test_zoo_zero_channels_removed_exactly(name: str, exporter: str) -> None:
    """On real exports every prunable group can lose channels and the model stays exact."""
    from zoo import export_torchvision

    model, _ = load_canonical(export_torchvision(name, exporter, 64))
    reference = clone_model(model)
    analysis = analyze_channels(model)
    assert len(analysis.prunable) >= 10
    plan = {g.id: sorted({0, g.size // 2}) for g in analysis.prunable}
    for group in analysis.prunable:
        zero_channels(group, plan[group.id])
    feeds = {"input": np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)}
    before = cm.run(model, feeds)
    for group in analysis.prunable:
        remove_channels(model, group, plan[group.id])
    check_valid(model, reference)
    after = cm.run(model, feeds)
    scale = float(np.abs(before[0]).max())
    np.testing.assert_allclose(after[0], before[0], rtol=RTOL, atol=ATOL * max(scale, 1.0))
