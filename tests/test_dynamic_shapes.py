"""Dynamic-shape graphs prune as their static twins do (issue 19).

Detectors and segmenters exported with symbolic height and width size their upsamples at run
time: ``Resize(x, sizes=Concat(Shape(x)[:2], H', W'))``. The channel entry of such a size is
``x``'s own channel count, which follows the channels when they are cut, so the group stays
prunable. A channel count that ends anywhere else (another tensor's size, arithmetic) freezes
the group, with the reason.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from channel_models import Net, run

from onnxcompress.graph.channels import analyze_channels
from onnxcompress.graph.model_io import clone_model
from onnxcompress.passes import create_pass


def duplicated_filters(w: np.ndarray, b: np.ndarray) -> None:
    """The second half of the filters repeats the first: exactly replaceable, even after ReLU."""
    half = w.shape[0] // 2
    w[half:] = w[:half]
    b[half:] = b[:half]


def upsampling_net(sizes_from_other: bool = False) -> ir.Model:
    """conv (16, half duplicated) -> ReLU -> Resize x2 with sizes computed from Shape -> conv
    -> head, on an input with symbolic height and width. With ``sizes_from_other``, the
    channel entry of the sizes is another tensor's channel count."""
    net = Net(seed=2)
    x = net.input("x", ["N", 3, "H", "W"])
    y = net.relu(net.conv(x, 3, 16, edit=duplicated_filters))
    other = net.relu(net.conv(x, 3, 16))
    source = other if sizes_from_other else y
    shape = net.op("Shape", [source])
    batch_channels = net.op(
        "Slice", [shape, net.const(np.array([0], np.int64)), net.const(np.array([2], np.int64))]
    )
    spatial = net.op(
        "Slice",
        [
            net.op("Shape", [y]),
            net.const(np.array([2], np.int64)),
            net.const(np.array([4], np.int64)),
        ],
    )
    doubled = net.op("Mul", [spatial, net.const(np.array([2, 2], np.int64))])
    sizes = net.op("Concat", [batch_channels, doubled], axis=0)
    empty = net.const(np.array([], np.float32))
    up = net.op("Resize", [y, "", empty, sizes], mode="nearest")
    merged = net.op("Add", [net.conv(up, 16, 16, k=1, stride=2), other])
    out = net.relu(net.conv(net.relu(merged), 16, 8))
    return net.build([net.head(out, 8)])


def group_of(model: ir.Model, conv_index: int) -> object:
    convs = [n for n in model.graph if n.op_type == "Conv"]
    analysis = analyze_channels(model)
    target = convs[conv_index]
    for group in analysis.groups:
        if target in group.producer_nodes:
            return group
    raise AssertionError("no group")


def test_computed_resize_sizes_keep_the_group_prunable() -> None:
    group = group_of(upsampling_net(), 0)
    assert not group.is_frozen, group.frozen_reason  # type: ignore[attr-defined]


def test_pruning_through_computed_sizes_is_exact_at_any_input_size() -> None:
    """lrf drops the 8 duplicated filters; the Resize sizes follow the new channel count at run
    time, and the outputs match the original's at two input sizes (1e-4 relative)."""
    original = upsampling_net()
    model = clone_model(original)
    # Only the duplicated group is cut (exactly replaceable); the others keep their channels.
    others = tuple(n.name for n in model.graph if n.op_type in ("Conv", "Gemm"))[1:]
    options = {"ratio": 0.5, "round_to": 1, "criterion": "weights", "exclude": others}
    compression = create_pass("lrf", options)
    compression(model)
    cut = [layer for layer in compression.report.layers if layer["channels_before"] == 16]
    assert any(layer["channels_after"] == 8 for layer in cut), compression.report.layers
    rng = np.random.default_rng(0)
    for size in (8, 12):
        feeds = {"x": rng.standard_normal((2, 3, size, size)).astype(np.float32)}
        (new,), (old,) = run(model, feeds), run(original, feeds)
        assert new.shape == old.shape
        np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-4 * np.abs(old).max())


def test_a_channel_count_sizing_another_tensor_freezes_the_group() -> None:
    """Negative: the Resize of ``y`` takes its channel count from ``other``'s shape; cutting
    ``other`` would leave a stale size, so both groups are frozen and say why."""
    model = upsampling_net(sizes_from_other=True)
    reasons = [
        str(group.frozen_reason)  # type: ignore[attr-defined]
        for group in (group_of(model, 0), group_of(model, 1))
    ]
    assert all(reasons), reasons
    assert any("channel count is used by" in r or "computed output sizes" in r for r in reasons)


def test_expand_to_its_own_computed_shape_keeps_channels() -> None:
    net = Net(seed=4)
    x = net.input("x", ["N", 3, "H", "W"])
    y = net.relu(net.conv(x, 3, 16, edit=duplicated_filters))
    expanded = net.op("Expand", [y, net.op("Shape", [y])])
    out = net.relu(net.conv(expanded, 16, 8))
    model = net.build([net.head(out, 8)])
    group = group_of(model, 0)
    assert not group.is_frozen, group.frozen_reason  # type: ignore[attr-defined]
