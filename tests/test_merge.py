"""The merge pass: duplicates and scaled copies merge exactly, budgets met, models stay valid."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from channel_models import BUILDERS, PRUNABLE, Net, feeds_for, image_input, random_convnet, run

from onnxcompress.errors import PassConfigError
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.channels import analyze_channels
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext

Edit = Callable[[np.ndarray, np.ndarray], None]


def merge(model: ir.Model, calibration: np.ndarray | None = None, **options) -> dict:
    options.setdefault("round_to", 1)  # the test nets are a few channels wide
    compression = create_pass("merge", options, PassContext(calibration=calibration))
    compression(model)
    return compression.report.as_dict()


def copies(pairs: dict[int, tuple[int, float]]) -> Edit:
    """Make filter j (bias included) ``scale`` times filter i for every ``j: (i, scale)``."""

    def edit(w: np.ndarray, b: np.ndarray) -> None:
        for j, (i, scale) in pairs.items():
            w[j], b[j] = scale * w[i], scale * b[i]

    return edit


def widths(model: ir.Model) -> dict[str, int]:
    """Output channels of every Conv/Gemm, by node name."""
    result = {}
    for node in model.graph:
        if node.op_type in ("Conv", "Gemm"):
            weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
            transposed = node.op_type == "Gemm" and not (
                node.attributes.get("transB") and node.attributes["transB"].as_int()
            )
            result[node.name] = weight.shape[1] if transposed else weight.shape[0]
    return result


def assert_same_outputs(model: ir.Model, original: ir.Model) -> None:
    feeds = feeds_for(original, batch=4)
    for new, old in zip(run(model, feeds), run(original, feeds), strict=True):
        assert new.shape == old.shape
        np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-5)


def assert_valid(model: ir.Model, original: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    feeds = feeds_for(original)
    for new, old in zip(run(model, feeds), run(original, feeds), strict=True):
        assert new.shape == old.shape
        assert np.all(np.isfinite(new))


# ---------------------------------------------------------------------------------------------
# Models with duplicated (or scaled) filters
# ---------------------------------------------------------------------------------------------


def conv_relu_conv(edit: Edit, *, relu: bool = True, consumer_pad: int = 1) -> ir.Model:
    """conv_3 (edited) -> [Relu] -> conv -> Relu -> head."""
    net = Net(40)
    x = image_input(net)
    a = net.conv(x, 3, 8, edit=edit)
    if relu:
        a = net.relu(a)
    b = net.relu(net.conv(a, 8, 6, pad=consumer_pad))
    return net.build([net.head(b, 6)])


def residual_block(edit: Edit) -> ir.Model:
    """Stem and a basic block's second conv share the residual stream; both get the copies."""
    net = Net(41)
    x = image_input(net)
    stem = net.relu(net.conv(x, 3, 8, edit=edit))
    h = net.relu(net.conv(stem, 8, 12))
    h = net.conv(h, 12, 8, edit=edit)
    out = net.relu(net.op("Add", [h, stem]))
    out = net.relu(net.conv(out, 8, 10))
    return net.build([net.head(out, 10)])


def gemm_mlp(edit: Edit) -> ir.Model:
    """Gemm (edited) -> Relu -> Gemm -> Relu -> Gemm on feature vectors."""
    net = Net(42)
    x = net.input("x", ["N", 6])
    h = net.relu(net.gemm(x, 6, 10, edit=edit))
    h = net.relu(net.gemm(h, 10, 7))
    return net.build([net.gemm(h, 7, 4)])


DUPLICATES = {5: (1, 1.0), 6: (2, 1.0), 7: (1, 1.0)}  # three filters that repeat others


@pytest.mark.parametrize(
    ("builder", "layers"),
    [
        (conv_relu_conv, ("conv_3",)),
        (residual_block, ("conv_3", "conv_11")),  # the stem and the block write the stream
        (gemm_mlp, ("gemm_3",)),
    ],
    ids=["conv-relu-conv", "residual", "gemm-mlp"],
)
@pytest.mark.parametrize("criterion", ["weights", "activations"])
def test_duplicates_merge_without_output_change(
    builder: Callable[[Edit], ir.Model], layers: tuple[str, ...], criterion: str
) -> None:
    original = builder(copies(DUPLICATES))
    model = clone_model(original)
    calibration = next(iter(feeds_for(original, batch=32, seed=5).values()))
    report = merge(model, calibration, threshold=1e-6, criterion=criterion)
    before, after = widths(original), widths(model)
    # The copies go; nothing else is a duplicate, so every other layer keeps its width.
    assert after == {k: v - len(DUPLICATES) if k in layers else v for k, v in before.items()}
    assert report["modified"]
    assert_same_outputs(model, original)
    assert_valid(model, original)


def test_duplicates_go_first_under_a_budget() -> None:
    """Duplicates cost nothing, so a budget that needs three channels takes exactly them."""
    original = conv_relu_conv(copies(DUPLICATES))
    model = clone_model(original)
    group = next(g for g in analyze_channels(model).prunable if g.size == 8)
    saving = group.macs_per_channel()
    total = model_metrics(model).macs
    report = merge(model, target_macs=1 - 3 * saving / total, tolerance=0.001)
    assert widths(model)["conv_3"] == 5
    assert report["summary"]["macs_after"] == total - 3 * saving
    assert_same_outputs(model, original)


def test_scaled_filter_merges_exactly_across_relu() -> None:
    """W_j = 2.5 W_i (bias too) gives relu(y_j) = 2.5 relu(y_i): merged with the scale."""
    original = conv_relu_conv(copies({4: (0, 2.5)}))
    model = clone_model(original)
    report = merge(model, threshold=1e-6)
    assert widths(model)["conv_3"] == 7
    assert report["layers"][0]["fit_error"] < 1e-9
    assert_same_outputs(model, original)


def test_scale_unaware_merging_does_not_merge_scaled_copies() -> None:
    """The paper's merging (scale 1) sees a scaled copy as a different filter."""
    original = conv_relu_conv(copies({4: (0, 2.5)}))
    model = clone_model(original)
    report = merge(model, threshold=0.05, scale_aware=False)
    assert not report["modified"]
    assert widths(model) == widths(original)


def test_negative_scale_is_not_merged_across_relu() -> None:
    """W_j = -2.5 W_i: relu(y_j) is not a multiple of relu(y_i), so the threshold leaves it."""
    original = conv_relu_conv(copies({4: (0, -2.5)}))
    model = clone_model(original)
    report = merge(model, threshold=1e-3)
    assert not report["modified"]
    assert widths(model) == widths(original)


def test_negative_scale_merged_under_a_budget_changes_outputs() -> None:
    """Forced by a budget, the negatively scaled filter is merged only approximately."""
    original = conv_relu_conv(copies({4: (0, -2.5)}))
    model = clone_model(original)
    merge(model, ratio=0.125)  # one of the eight channels of each group
    assert widths(model)["conv_3"] == 7
    feeds = feeds_for(original)
    assert np.abs(run(model, feeds)[0] - run(original, feeds)[0]).max() > 1e-3


def test_negative_scale_merges_exactly_on_a_linear_path() -> None:
    """Without a ReLU in between, y_j = -2.5 y_i holds at the consumer and any scale works."""
    original = conv_relu_conv(copies({4: (0, -2.5)}), relu=False)
    model = clone_model(original)
    merge(model, threshold=1e-6)
    assert widths(model)["conv_3"] == 7
    assert_same_outputs(model, original)


def test_linear_path_folds_the_bias_difference() -> None:
    """Same weights, different bias, linear path: y_j = y_i + 0.4, the 0.4 goes to the bias.

    The consumer has no zero padding, where the constant would not be carried.
    """

    def edit(w: np.ndarray, b: np.ndarray) -> None:
        w[3], b[3] = w[1], b[1] + 0.4

    original = conv_relu_conv(edit, relu=False, consumer_pad=0)
    model = clone_model(original)
    merge(model, threshold=1e-6)
    assert widths(model)["conv_3"] == 7
    assert_same_outputs(model, original)


# ---------------------------------------------------------------------------------------------
# Budgets, options, reports
# ---------------------------------------------------------------------------------------------


def test_noop_budget_changes_nothing() -> None:
    original = BUILDERS["residual"]()
    model = clone_model(original)
    report = merge(model, target_macs=1.0)
    assert not report["modified"]
    assert not report["layers"]
    feeds = feeds_for(original)
    np.testing.assert_array_equal(run(model, feeds)[0], run(original, feeds)[0])


@pytest.mark.parametrize("criterion", ["weights", "activations"])
def test_target_macs_is_reached(criterion: str) -> None:
    original = random_convnet()
    model = clone_model(original)
    calibration = next(iter(feeds_for(original, batch=32, seed=7).values()))
    report = merge(model, calibration, target_macs=0.7, criterion=criterion)
    ratio = model_metrics(model).macs / model_metrics(original).macs
    assert abs(ratio - 0.7) <= 0.02, ratio
    assert report["summary"]["macs_ratio"] == pytest.approx(ratio)
    assert report["summary"]["target_met"]
    assert_valid(model, original)
    rows = report["layers"]
    assert rows and all(r["channels_after"] < r["channels_before"] for r in rows)
    assert all(np.isfinite(r["fit_error"]) for r in rows)


def test_activation_fit_beats_weights_on_calibration_data() -> None:
    """The activation criterion fits what the consumers read: closer outputs on that data."""
    original = random_convnet()
    calibration = next(iter(feeds_for(original, batch=64, seed=8).values()))
    errors = {}
    for criterion in ("weights", "activations"):
        model = clone_model(original)
        merge(model, calibration, ratio=0.25, criterion=criterion)
        feeds = {original.graph.inputs[0].name: calibration}
        errors[criterion] = np.abs(run(model, feeds)[0] - run(original, feeds)[0]).mean()
    assert errors["activations"] < errors["weights"]


@pytest.mark.parametrize("name", PRUNABLE)
@pytest.mark.parametrize("criterion", ["weights", "activations"])
def test_structures_stay_valid_and_shrink(name: str, criterion: str) -> None:
    original = BUILDERS[name]()
    model = clone_model(original)
    calibration = next(iter(feeds_for(original, batch=32, seed=3).values()))
    report = merge(model, calibration, target_macs=0.7, criterion=criterion)
    assert_valid(model, original)
    before, after = model_metrics(original).macs, model_metrics(model).macs
    assert after < before, report
    assert report["summary"]["macs_ratio"] == pytest.approx(after / before)


def test_frozen_groups_are_reported_with_reasons() -> None:
    model = BUILDERS["multi_output"]()
    report = merge(model, target_macs=0.8)
    reasons = " ".join(d["reason"] for d in report["declined"])
    assert "graph output" in reasons


def test_exclude_leaves_named_layers_alone() -> None:
    original = random_convnet()
    model = clone_model(original)
    report = merge(model, target_macs=0.6, exclude=("conv_7",))
    assert any("excluded" in d["reason"] and d["node"] == "conv_7" for d in report["declined"]), (
        report["declined"]
    )
    assert widths(model)["conv_7"] == widths(original)["conv_7"]
    assert report["layers"]
    assert all("conv_7" not in row["producers"] for row in report["layers"])


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"threshold": 0.1, "target_macs": 0.5}, "either threshold or a budget"),
        ({"threshold": 2.5}, "out of range"),
        ({"target_macs": 0.0}, "out of range"),
        ({"criterion": "vibes"}, "criterion"),
    ],
)
def test_bad_options(options: dict, fragment: str) -> None:
    with pytest.raises(PassConfigError, match=fragment):
        create_pass("merge", options)


def test_activations_without_data_is_a_user_error() -> None:
    with pytest.raises(PassConfigError, match="merge criterion=activations"):
        merge(BUILDERS["chain"](), criterion="activations")


def test_resnet20_reaches_the_target(resnet20_path: Path) -> None:
    original = load_model(resnet20_path)
    canonicalize(original)
    model = clone_model(original)
    report = merge(model, target_macs=0.7, round_to=8)
    ratio = report["summary"]["macs_ratio"]
    assert 0.68 <= ratio <= 0.7 * 1.02, ratio
    assert_valid(model, original)
