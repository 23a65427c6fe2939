"""Reconstruction after channel removal: consumers refit against the original's outputs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from channel_models import BUILDERS, Net, feeds_for, image_input, run

from onnxcompress.errors import PassConfigError
from onnxcompress.graph.model_io import clone_model
from onnxcompress.passes import create_pass
from onnxcompress.passes import reconstruction as reconstruction_module
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.reconstruction import reconstruct


def rank_deficient_pair() -> ir.Model:
    """x -> 1x1 conv A (3 -> 6, no bias, outputs 3..5 linear in 0..2) -> 3x3 conv B (6 -> 4).

    Nothing nonlinear and no constant sits between A and B, so B's output is an exact linear
    function of A's first three channels, zero padding included.
    """
    net = Net(3)
    x = image_input(net)

    def dependent_rows(w: np.ndarray, _: np.ndarray) -> None:
        mixing = np.random.default_rng(5).standard_normal((3, 3)).astype(np.float32)
        w[3:, :, 0, 0] = mixing @ w[:3, :, 0, 0]

    h = net.conv(x, 3, 6, 1, bias=False, edit=dependent_rows)
    return net.build([net.conv(h, 6, 4)])


def convs(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Conv"]


def weight(node: ir.Node, index: int = 1) -> np.ndarray:
    value = node.inputs[index]
    assert value is not None and value.const_value is not None
    return value.const_value.numpy()


def cut_without_compensation(model: ir.Model, kept: np.ndarray) -> None:
    """Drop A's outputs outside ``kept`` and B's matching input columns, folding nothing."""
    producer, consumer = convs(model)
    for node, axis in ((producer, 0), (consumer, 1)):
        value = node.inputs[1]
        assert value is not None and value.name is not None
        array = np.take(weight(node), kept, axis=axis)
        value.const_value = ir.tensor(np.ascontiguousarray(array), name=value.name)
        value.shape = ir.Shape(array.shape)


def relative_error(model: ir.Model, original: ir.Model, seed: int) -> float:
    feeds = feeds_for(original, batch=32, seed=seed)
    (new,), (old,) = run(model, feeds), run(original, feeds)
    return float(np.linalg.norm(new - old) / np.linalg.norm(old))


def test_refit_recovers_an_exactly_recoverable_cut() -> None:
    """B reads three channels that determine the three cut ones: the refit finds B's weights
    on them, and the output matches the original's (ONNX Runtime) to 1e-4."""
    original = rank_deficient_pair()
    student = clone_model(original)
    kept = np.arange(3)
    cut_without_compensation(student, kept)
    assert relative_error(student, original, seed=1) > 0.1  # the cut alone loses a lot
    producer, consumer = convs(student)
    x = feeds_for(original, batch=64, seed=0)["x"]

    refits = reconstruct(student, original, {producer.name or "": kept}, x, ridge=1e-9, batch=16)

    assert [r.node for r in refits] == [consumer.name]
    assert refits[0].kept and refits[0].error_after < 1e-4
    feeds = feeds_for(original, batch=8, seed=2)  # images the fit never saw
    np.testing.assert_allclose(
        run(student, feeds)[0], run(original, feeds)[0], rtol=1e-4, atol=1e-4
    )


def test_a_refit_that_does_not_lower_the_error_is_not_kept(monkeypatch) -> None:
    """A solution worse than the weights the layer has is reported and left unapplied."""
    original = rank_deficient_pair()
    student = clone_model(original)
    cut_without_compensation(student, np.arange(3))
    producer, consumer = convs(student)
    before = weight(consumer).copy()

    def zeros(gram: np.ndarray, cross: np.ndarray, *_: object, **__: object) -> np.ndarray:
        return np.zeros_like(cross)

    monkeypatch.setattr(reconstruction_module, "ridge_solve", zeros)
    x = feeds_for(original, batch=64, seed=0)["x"]
    refits = reconstruct(
        student, original, {producer.name or "": np.arange(3)}, x, ridge=1e-3, batch=16
    )

    assert len(refits) == 1 and not refits[0].kept
    assert refits[0].error_after > refits[0].error_before
    np.testing.assert_array_equal(weight(consumer), before)


@pytest.mark.parametrize("pass_name", ["lrf", "merge"])
@pytest.mark.parametrize("builder", ["chain", "residual", "inverted_residual"])
def test_reconstruction_lowers_the_output_error_on_held_out_inputs(pass_name, builder) -> None:
    """The same cut with and without reconstruction: refit layers bring the output closer to
    the original's on inputs the fits never saw."""
    original = BUILDERS[builder]()
    calibration = feeds_for(original, batch=256, seed=0)["x"]
    errors = {}
    summaries = {}
    for reconstruct_on in (False, True):
        model = clone_model(original)
        options = {
            "ratio": 0.5,
            "criterion": "activations",
            "round_to": 1,
            "reconstruct": reconstruct_on,
        }
        compression = create_pass(pass_name, options, PassContext(calibration=calibration))
        compression(model)
        errors[reconstruct_on] = relative_error(model, original, seed=7)
        summaries[reconstruct_on] = compression.report.summary
    refits = summaries[True]["reconstruction"]
    assert refits and any(r["kept"] for r in refits)
    assert "reconstruction" not in summaries[False]
    assert errors[True] < errors[False]


def test_convs_that_were_grouped_are_not_refit() -> None:
    """A grouped conv's inputs are tied to its groups (cutting a whole group may even leave it
    with one): it keeps the weights the cut gave it, while the layers after it are refit."""
    original = BUILDERS["grouped"]()
    grouped = [n.name for n in convs(original) if n.attributes.get_int("group", 1) > 1]
    assert len(grouped) == 1
    calibration = feeds_for(original, batch=128, seed=0)["x"]
    weights = {}
    for reconstruct_on in (False, True):
        model = clone_model(original)
        options = {"ratio": 0.5, "criterion": "activations", "reconstruct": reconstruct_on}
        compression = create_pass(
            "lrf", options | {"round_to": 1}, PassContext(calibration=calibration)
        )
        compression(model)
        weights[reconstruct_on] = next(weight(n) for n in convs(model) if n.name == grouped[0])
    refit = {r["node"] for r in compression.report.summary["reconstruction"]}
    assert refit and grouped[0] not in refit
    np.testing.assert_array_equal(weights[True], weights[False])


def test_reconstruct_needs_calibration_data() -> None:
    with pytest.raises(PassConfigError, match="reconstruct=true"):
        create_pass("lrf", {"criterion": "weights", "reconstruct": True}, PassContext())


def chain_with_batch(batch: int | str) -> ir.Model:
    """conv-relu-conv-relu-conv-head with the input's batch dim ``batch`` (fixed or symbolic)."""
    net = Net(11)
    x = net.input("x", [batch, 3, 8, 8])
    h = net.relu(net.conv(x, 3, 12))
    h = net.relu(net.conv(h, 12, 10))
    return net.build([net.head(net.relu(net.conv(h, 10, 8)), 8)])


@pytest.mark.parametrize("fixed", [1, 4])
def test_a_model_exported_with_a_fixed_batch_is_fit_as_its_dynamic_twin(fixed: int) -> None:
    """Exports often fix the batch to 1. Asked for batches of 32, the fits run such a model in
    batches of its size (padding the last one) and reach the same weights as the same model
    with a symbolic batch fit in batches of that size; 50 images leave a partial batch of 4."""
    calibration = np.random.default_rng(0).standard_normal((50, 3, 8, 8)).astype(np.float32)
    results = []
    for batch in (fixed, "N"):
        model = chain_with_batch(batch)
        options = {
            "ratio": 0.5,
            "criterion": "activations",
            "round_to": 1,
            "calibration_batch": 32 if batch == fixed else fixed,
        }
        compression = create_pass("lrf", options, PassContext(calibration=calibration))
        compression(model)
        assert compression.report.summary["reconstruction"]
        results.append({n.name: weight(n) for n in convs(model)})
    assert results[0].keys() == results[1].keys()
    for name, array in results[0].items():
        np.testing.assert_allclose(array, results[1][name], rtol=1e-4, atol=1e-5)
