"""The lrf pass: exact on replaceable filters, valid on every coupling pattern, budgets met."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from channel_models import (
    BUILDERS,
    PRUNABLE,
    Net,
    feeds_for,
    image_input,
    linear_conv_pool_conv,
    linear_flatten_gemm,
    linear_mlp,
    linear_residual,
    run,
)

from onnxcompress.errors import PassConfigError
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext


def lrf(model: ir.Model, calibration: np.ndarray | None = None, **options) -> dict:
    options.setdefault("round_to", 1)  # the test nets are a few channels wide
    compression = create_pass("lrf", options, PassContext(calibration=calibration))
    compression(model)
    return compression.report.as_dict()


def assert_valid(model: ir.Model, original: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    assert [v.name for v in model.graph.inputs] == [v.name for v in original.graph.inputs]
    assert [v.name for v in model.graph.outputs] == [v.name for v in original.graph.outputs]
    feeds = feeds_for(original)
    for new, old in zip(run(model, feeds), run(original, feeds), strict=True):
        assert new.shape == old.shape
        assert np.all(np.isfinite(new))


@pytest.mark.parametrize(
    "builder",
    [linear_conv_pool_conv, linear_flatten_gemm, linear_mlp, linear_residual],
    ids=["conv-pool-conv", "flatten-gemm", "mlp", "residual"],
)
def test_exactly_replaceable_filter_is_removed_without_output_change(builder) -> None:
    """A filter that is a linear combination of others, with only linear ops before its
    consumer, goes (weights criterion, data-free) and the outputs do not move."""
    original = builder(0.0)
    model = clone_model(original)
    before = model_metrics(model)
    # Groups behind a ReLU are left out: there a weight-space dependency (e.g. 9 filters of
    # fan-in 8 always have one) is only the paper's approximation, not an exact one.
    from onnxcompress.graph.channels import analyze_channels

    groups = analyze_channels(model).prunable
    nonlinear = tuple(g.name for g in groups if not g.linear_path)
    linear_sizes = [g.size for g in groups if g.linear_path]
    # one channel from each linear group (every builder makes those replaceable)
    report = lrf(model, ratio=1.0 / min(linear_sizes), criterion="weights", exclude=nonlinear)
    assert report["modified"]
    assert before.macs > model_metrics(model).macs
    removed = [r["channels_before"] - r["channels_after"] for r in report["layers"]]
    assert removed == [1] * len(linear_sizes)
    feeds = feeds_for(original)
    for new, old in zip(run(model, feeds), run(original, feeds), strict=True):
        np.testing.assert_allclose(new, old, rtol=1e-4, atol=1e-5)


def test_activation_criterion_is_exact_for_duplicates_across_relu() -> None:
    """relu(y_j) == relu(y_i) exactly, so the activation fit removes j with no change, even
    though a ReLU sits between the layers (where the weights criterion is approximate)."""
    net = Net(30)
    x = image_input(net)

    def duplicate(w: np.ndarray, b: np.ndarray) -> None:
        w[3], b[3] = w[1], b[1]

    h = net.relu(net.conv(x, 3, 6, edit=duplicate))
    out = net.head(net.relu(net.conv(h, 6, 5)), 5)
    original = net.build([out])
    model = clone_model(original)
    calibration = np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32)
    report = lrf(model, calibration, ratio=0.17, criterion="activations", exclude=("conv_4*",))
    removed = [r for r in report["layers"] if r["channels_after"] < r["channels_before"]]
    assert len(removed) == 1 and removed[0]["channels_after"] == 5
    feeds = feeds_for(original)
    np.testing.assert_allclose(run(model, feeds)[0], run(original, feeds)[0], rtol=1e-4, atol=1e-5)


def test_removing_real_channels_changes_outputs() -> None:
    """Negative control: a lossy budget on a random net does change the outputs."""
    original = BUILDERS["chain"]()
    model = clone_model(original)
    lrf(model, target_macs=0.5)
    feeds = feeds_for(original)
    assert np.abs(run(model, feeds)[0] - run(original, feeds)[0]).max() > 1e-3


def test_noop_budget_changes_nothing() -> None:
    original = BUILDERS["residual"]()
    model = clone_model(original)
    report = lrf(model, target_macs=1.0)
    assert not report["modified"]
    assert model_metrics(model).macs == model_metrics(original).macs
    feeds = feeds_for(original)
    np.testing.assert_array_equal(run(model, feeds)[0], run(original, feeds)[0])


@pytest.mark.parametrize("name", PRUNABLE)
@pytest.mark.parametrize("criterion", ["weights", "activations"])
def test_structures_stay_valid_and_shrink(name: str, criterion: str) -> None:
    original = BUILDERS[name]()
    model = clone_model(original)
    calibration = None
    if criterion == "activations":
        feeds = feeds_for(original, batch=32, seed=3)
        calibration = next(iter(feeds.values()))
    report = lrf(model, calibration, target_macs=0.7, criterion=criterion)
    assert_valid(model, original)
    before, after = model_metrics(original).macs, model_metrics(model).macs
    assert after < before, report
    assert report["summary"]["macs_ratio"] == pytest.approx(after / before)


def test_frozen_groups_are_reported_with_reasons() -> None:
    model = BUILDERS["unknown_op"]()
    report = lrf(model, target_macs=0.8)
    reasons = " ".join(d["reason"] for d in report["declined"])
    assert "TopK" in reasons


def test_exclude_leaves_named_layers_alone() -> None:
    original = BUILDERS["chain"]()
    model = clone_model(original)
    report = lrf(model, target_macs=0.6, exclude=("conv_3",))
    assert any("excluded" in d["reason"] for d in report["declined"])
    assert report["layers"]
    assert all("conv_3" not in row["producers"] for row in report["layers"])


def test_round_to_keeps_multiples() -> None:
    net = Net(7)
    x = image_input(net)
    h = net.relu(net.conv(x, 3, 32))
    h = net.relu(net.conv(h, 32, 24))
    original = net.build([net.head(h, 24)])
    model = clone_model(original)
    report = lrf(model, target_macs=0.6, round_to=8)
    assert report["layers"]
    for row in report["layers"]:
        assert row["channels_after"] % 8 == 0


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"target_macs": 1.5}, "out of range"),
        ({"target_macs": 0.0}, "out of range"),
        ({"criterion": "vibes"}, "criterion"),
        ({"target_macs": 0.5, "ratio": 0.5}, "one of"),
        ({"round_to": -1}, "round_to >= 0"),
        ({"cost": "money"}, "cost"),
        ({"ratio": 0.5, "cost": "latency"}, "global budget"),
        ({"target_latency": 1.5}, "out of range"),
        ({"target_latency": 0.5, "target_macs": 0.5}, "one of"),
    ],
)
def test_bad_options(options: dict, fragment: str) -> None:
    with pytest.raises(PassConfigError, match=fragment):
        create_pass("lrf", options)


def test_activations_without_data_is_a_user_error() -> None:
    model = BUILDERS["chain"]()
    with pytest.raises(PassConfigError, match="--data"):
        lrf(model, criterion="activations")


@pytest.mark.parametrize("criterion", ["weights", "activations"])
def test_resnet20_reaches_the_target(resnet20_path: Path, criterion: str) -> None:
    original = load_model(resnet20_path)
    canonicalize(original)
    model = clone_model(original)
    calibration = None
    if criterion == "activations":
        calibration = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
    report = lrf(model, calibration, target_macs=0.6, criterion=criterion, round_to=8)
    ratio = report["summary"]["macs_ratio"]
    assert 0.58 <= ratio <= 0.6 * 1.02, ratio
    assert_valid(model, original)


def test_channel_samples_follow_the_channel_axis() -> None:
    """Activations of an NHWC tensor give the same channel statistics as their NCHW twin."""
    from onnxcompress.passes.channel_views import _channel_samples

    nchw = np.random.default_rng(0).standard_normal((2, 5, 3, 4))
    positions = np.array([[4], [0], [2]])
    first = _channel_samples(nchw, positions, 1)
    last = _channel_samples(np.moveaxis(nchw, 1, 3), positions, 3)
    assert first.shape == last.shape == (2 * 3 * 4, 3)
    np.testing.assert_allclose(first.T @ first, last.T @ last)
    np.testing.assert_array_equal(first[:, 0], nchw[:, 4].reshape(-1))
