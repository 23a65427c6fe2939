"""Tests of ``lct``'s ``fit`` schedule (low-rank): reduced-rank regression, response spectra,
the greedy rank allocation, and the pass end to end on the digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from onnxcompress.errors import PassConfigError
from onnxcompress.fitting.gram import GramAccumulator
from onnxcompress.fitting.lowrank import reduced_rank_fit, response_spectrum, truncate
from onnxcompress.graph.model_io import load_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.lct_layers import Layer, _greedy_ranks

ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = ROOT / "models" / "digits_resnet.onnx"


def _statistics(z: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    accumulator = GramAccumulator(intercept=True)
    accumulator.add(z, y, channel_axis=1)
    stats = accumulator.statistics()
    return stats.gram, stats.cross


def _error(z: np.ndarray, y: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> float:
    return float(np.linalg.norm(y - z @ weight.T - bias))


def test_reduced_rank_fit_recovers_a_rank_r_map_with_its_bias() -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((12, 3)) @ rng.standard_normal((3, 20))
    bias = rng.standard_normal(12)
    z = rng.standard_normal((2000, 20)) + rng.standard_normal(20)  # a mean the bias must absorb
    y = z @ weight.T + bias
    low, low_bias = reduced_rank_fit(*_statistics(z, y), rank=3, ridge=0.0)
    assert np.linalg.matrix_rank(low, tol=1e-8) == 3
    np.testing.assert_allclose(low, weight, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(low_bias, bias, rtol=1e-6, atol=1e-8)


def test_reduced_rank_fit_beats_the_weights_svd_on_correlated_inputs() -> None:
    """The truncated SVD of the weight is the best rank-r matrix, not the best rank-r map on the
    data: with inputs that excite a few directions only, the fit keeps what they carry."""
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((16, 24))
    scales = np.where(np.arange(24) < 4, 10.0, 0.1)  # four strong input directions
    basis, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    z = (rng.standard_normal((4000, 24)) * scales) @ basis.T
    y = z @ weight.T
    low, low_bias = reduced_rank_fit(*_statistics(z, y), rank=4, ridge=1e-6)
    svd = truncate(weight, 4)
    fit_error = _error(z, y, low, low_bias)
    svd_error = _error(z, y, svd, np.zeros(16))
    assert np.linalg.matrix_rank(low, tol=1e-6) <= 4
    assert fit_error < 0.1 * svd_error
    # At full rank it is the least-squares fit (nothing to give up).
    full, full_bias = reduced_rank_fit(*_statistics(z, y), rank=16, ridge=0.0)
    assert _error(z, y, full, full_bias) < 1e-6 * np.linalg.norm(y)


def test_response_spectrum_is_the_weights_spectrum_on_white_inputs() -> None:
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((8, 18))
    np.testing.assert_allclose(
        response_spectrum(weight, np.eye(18)), np.linalg.svd(weight, compute_uv=False), rtol=1e-10
    )
    # Inputs twice as large carry twice the output in every direction.
    np.testing.assert_allclose(
        response_spectrum(weight, 4.0 * np.eye(18)),
        2.0 * np.linalg.svd(weight, compute_uv=False),
        rtol=1e-10,
    )


def _layer(name: str, full_rank: int, rank_cost: int, break_even: int, multiple: int) -> Layer:
    layer = Layer(name, "Conv", f"{name}.w", (full_rank, 1, 3, 3))
    layer.full_rank, layer.rank_cost, layer.positions = full_rank, rank_cost, 1
    layer.macs, layer.break_even, layer.multiple = full_rank * rank_cost, break_even, multiple
    return layer


def test_greedy_ranks_cut_where_the_least_energy_is_lost_per_mac() -> None:
    # Two equal layers: "flat" spreads its energy over all ranks, "steep" holds it in two.
    flat = _layer("flat", 16, 100, 8, 4)
    steep = _layer("steep", 16, 100, 8, 4)
    spectra = [np.ones(16), np.array([10.0, 10.0] + [0.01] * 14)]
    # Enough for the first cut of one layer (16 -> 8 ranks saves 800) and one block more.
    ranks = _greedy_ranks([flat, steep], spectra, needed=1000.0)
    assert ranks == [16, 4]
    # A saving neither layer can give stops at the floors (one block each), never below.
    ranks = _greedy_ranks([flat, steep], spectra, needed=1e9)
    assert ranks == [4, 4]
    # A layer with no break-even rank is never cut.
    dense = _layer("dense", 16, 100, 0, 4)
    assert _greedy_ranks([dense], [np.ones(16)], needed=1e9) == [16]


def _context(validation: str = "digits[600:1000]") -> PassContext:
    from onnxcompress.runtime.evaluate import dataset_for_model

    data = dataset_for_model(DIGITS_MODEL, "digits[:600]")
    context = PassContext(calibration=data.x, calibration_labels=data.y, seed=0)
    context.validation_spec = validation
    return context


def _top1(model: object, spec: str) -> float:
    from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

    return accuracy(model, dataset_for_model(DIGITS_MODEL, spec)).top1


FIT = {"subspace": "lowrank", "target_macs": 0.6, "round_to": 1, "min_saving": 0.0}
FIT.update({"epochs": 1, "epoch_samples": 256, "fit_samples": 200})


def test_fit_is_the_lowrank_default_and_factorizes_within_max_drop() -> None:
    from onnxcompress.graph.metrics import model_metrics

    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    before = model_metrics(load_model(DIGITS_MODEL)).macs
    reference = _top1(load_model(DIGITS_MODEL), "digits[600:1000]")
    lct = create_pass("lct", {**FIT, "max_drop": 3.0}, _context())
    assert lct.cfg.schedule == "fit"
    lct(model)
    summary = lct.report.summary
    assert summary["ranks_from"] == "responses"
    # Every cut layer was fit, and the fit reproduces its output better than the plain SVD.
    fits = summary["fit"]
    assert fits and all(record["error_fit"] <= record["error_svd"] for record in fits)
    assert any(record["error_fit"] < 0.9 * record["error_svd"] for record in fits)
    assert model_metrics(model).macs <= (0.6 + 0.02) * before
    names = [node.name for node in model.graph]
    collapsed = [row for row in lct.report.layers if row["collapsed"]]
    assert collapsed
    for row in collapsed:
        assert row["rank"] < row["full_rank"]
        assert f"{row['node']}/lowrank_kxk" in names or f"{row['node']}/lowrank_in" in names
    # Lossy within its explicit budget, measured by ONNX Runtime on the written graph.
    assert _top1(model, "digits[600:1000]") >= reference - 3.0 - 1e-9


def _weights(model: object) -> dict[str, np.ndarray]:
    return {
        str(name): value.const_value.numpy().copy()
        for name, value in model.graph.initializers.items()  # type: ignore[attr-defined]
    }


def test_a_fit_run_beyond_max_drop_leaves_the_weights_as_they_were() -> None:
    """The fit writes into the model before training decides; a run that is not kept puts
    every weight and bias back (and removes the biases it added)."""
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    original = _weights(load_model(DIGITS_MODEL))
    inputs = {node.name: [v.name if v else None for v in node.inputs] for node in model.graph}
    options = {**FIT, "target_macs": 0.1, "max_drop": 0.0, "epoch_samples": 32}
    lct = create_pass("lct", options, _context())
    lct(model)
    assert not lct.report.modified
    assert "left the model unchanged" in " ".join(lct.report.notes)
    after = _weights(model)
    assert after.keys() == original.keys()
    for name, array in original.items():
        np.testing.assert_array_equal(after[name], array, err_msg=name)
    assert {
        node.name: [v.name if v else None for v in node.inputs] for node in model.graph
    } == inputs


def test_fit_refuses_a_sparse_subspace() -> None:
    with pytest.raises(PassConfigError, match="schedule=fit is for subspace=lowrank"):
        create_pass("lct", {"subspace": "sparse", "schedule": "fit"}, _context())
    with pytest.raises(PassConfigError, match="fit_samples"):
        create_pass("lct", {**FIT, "fit_samples": 0}, _context())
    # sparse keeps the gradual ramp as its default.
    assert create_pass("lct", {"subspace": "sparse"}, _context()).cfg.schedule == "gradual"
