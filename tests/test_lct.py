"""Tests of the ``lct`` pass, its projections, the compact sparse storage and the factorization."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.deadline import BudgetTooShortError, ManualClock
from onnxcompress.errors import PassConfigError
from onnxcompress.fitting.lowrank import truncate
from onnxcompress.graph.factorization import factorizable_reason, factorize
from onnxcompress.graph.model_io import load_model, model_to_bytes, save_model
from onnxcompress.graph.sparse_storage import (
    decode_gaps,
    decode_mask,
    encode_gaps,
    encode_mask,
    encoded_sizes,
    store_sparse,
)
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.lct_layers import Layer
from onnxcompress.passes.lct_projection import project_rank, project_sparse

ROOT = Path(__file__).resolve().parent.parent
DIGITS_MODEL = ROOT / "models" / "digits_resnet.onnx"


def _session(model: ir.Model | onnx.ModelProto, optimize: bool = True) -> ort.InferenceSession:
    data = model_to_bytes(model) if isinstance(model, ir.Model) else model.SerializeToString()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(model: ir.Model | onnx.ModelProto, x: np.ndarray, optimize: bool = True) -> np.ndarray:
    session = _session(model, optimize)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _conv_model(
    weights: dict[str, np.ndarray], opset: int = 17, stride: int = 1, gemm_trans_b: int = 1
) -> onnx.ModelProto:
    """x -> Conv(w1, b1, stride) -> Relu -> Conv(w2) -> GlobalAveragePool -> Flatten -> Gemm."""
    c1, c2, fc = weights["w1"], weights["w2"], weights["fc"]
    nodes = [
        helper.make_node(
            "Conv", ["x", "w1", "b1"], ["h1"], name="conv1", pads=[1, 1, 1, 1], strides=[stride] * 2
        ),
        helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["h2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("GlobalAveragePool", ["h2"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node(
            "Gemm", ["f", "fc", "fcb"], ["y"], name="fc", transB=gemm_trans_b, alpha=0.5, beta=2.0
        ),
    ]
    inits = [
        numpy_helper.from_array(c1, "w1"),
        numpy_helper.from_array(weights["b1"], "b1"),
        numpy_helper.from_array(c2, "w2"),
        numpy_helper.from_array(fc, "fc"),
        numpy_helper.from_array(weights["fcb"], "fcb"),
    ]
    graph = helper.make_graph(
        nodes,
        "small",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c1.shape[1], 12, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", weights["fcb"].size])],
        initializer=inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def _weights(rng: np.random.Generator, trans_b: int = 1) -> dict[str, np.ndarray]:
    fc = rng.standard_normal((10, 24)).astype(np.float32)
    return {
        "w1": rng.standard_normal((16, 3, 3, 3)).astype(np.float32),
        "b1": rng.standard_normal(16).astype(np.float32),
        "w2": rng.standard_normal((24, 16, 3, 3)).astype(np.float32) * 0.1,
        "fc": fc if trans_b else np.ascontiguousarray(fc.T),
        "fcb": rng.standard_normal(10).astype(np.float32),
    }


def _prune(array: np.ndarray, sparsity: float, rng: np.random.Generator) -> np.ndarray:
    out = array.copy()
    out[rng.random(array.shape) < sparsity] = 0
    return out


# ---------------------------------------------------------------------------------------------
# Projections
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zeros", [0, 1, 100, 431, 432])
def test_sparse_projection_keeps_exactly_the_promised_zeros(zeros: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 3, 3, 3, generator=generator)
    before = weight.clone()
    project_sparse(weight, zeros)
    assert int((weight == 0).sum()) == zeros
    kept = before[weight != 0].abs()
    dropped = before[weight == 0].abs()
    if zeros and kept.numel():
        # sigma_l separates the collapsed weights from the kept ones.
        assert float(dropped.max()) <= float(kept.min())
    assert torch.equal(weight[weight != 0], before[weight != 0])


def test_sparse_projection_counts_ties_exactly() -> None:
    weight = torch.ones(100)
    project_sparse(weight, 37)
    assert int((weight == 0).sum()) == 37


@pytest.mark.parametrize(
    ("op", "shape", "trans_b"),
    [("Conv", (24, 16, 3, 3), True), ("Gemm", (10, 24), True), ("Gemm", (24, 10), False)],
)
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_rank_projection_gives_exactly_the_rank(
    op: str, shape: tuple[int, ...], trans_b: bool, rank: int
) -> None:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(*shape, generator=generator)
    full = min(shape[0], int(np.prod(shape[1:])))
    layer = Layer("n", op, "w", shape, rank=rank, full_rank=full, trans_b=trans_b)
    original = weight.numpy().copy()
    project_rank(weight, layer, rank)
    rows = original.reshape(shape[0], -1) if trans_b else original.T
    projected = weight.numpy().reshape(shape[0], -1) if trans_b else weight.numpy().T
    assert np.linalg.matrix_rank(projected, tol=1e-4 * np.abs(projected).max()) == rank
    # It is the best rank-r approximation (Eckart-Young), the same as numpy's.
    np.testing.assert_allclose(projected, truncate(rows, rank), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Compact storage
# ---------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 3000),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_encodings_round_trip(size: int, density: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    array = rng.standard_normal(size).astype(np.float32)
    array[rng.random(size) >= density] = 0
    shape = (size,)
    bits, values = encode_mask(array)
    assert np.array_equal(decode_mask(bits, values, shape), array)
    gaps, gap_values = encode_gaps(array)
    assert np.array_equal(decode_gaps(gaps, gap_values, shape), array)
    sizes = encoded_sizes(array)
    assert sizes["mask"] == bits.nbytes + values.nbytes
    if np.count_nonzero(array):
        assert sizes["gaps"] == gaps.nbytes + gap_values.nbytes


def test_long_zero_runs_get_fillers() -> None:
    array = np.zeros(2000, np.float32)
    array[[0, 700, 1999]] = [1.0, 2.0, 3.0]
    gaps, values = encode_gaps(array)
    assert gaps.max() <= 255 and np.array_equal(decode_gaps(gaps, values, (2000,)), array)


@pytest.mark.parametrize("encoding", [None, "mask", "gaps"])
@pytest.mark.parametrize("opset", [11, 17])
def test_sparse_storage_round_trips_through_save_load_and_ort(
    tmp_path: Path, encoding: str | None, opset: int
) -> None:
    rng = np.random.default_rng(0)
    weights = _weights(rng)
    weights["w2"] = _prune(weights["w2"], 0.9, rng)
    weights["fc"] = _prune(weights["fc"], 0.5, rng)
    dense = _conv_model(weights, opset=opset)
    dense_path = tmp_path / "dense.onnx"
    onnx.save(dense, str(dense_path))
    model = load_model(dense_path)
    records = store_sparse(model, ["w2", "w1"], min_saving=0, encoding=encoding)
    by_name = {r.name: r for r in records}
    assert by_name["w2"].encoding == (encoding or "gaps")  # 10 % density: gaps are smaller
    assert by_name["w2"].stored_bytes < by_name["w2"].dense_bytes / 3
    # A dense tensor never grows: w1 has no zeros.
    assert by_name["w1"].encoding == "dense"
    assert "w2" not in model.graph.initializers
    out_path = save_model(model, tmp_path / "sparse.onnx")
    assert out_path.stat().st_size < dense_path.stat().st_size - 3 * 24 * 16 * 9 * 0.8
    onnx.checker.check_model(onnx.load(str(out_path)), full_check=True)
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    expected = _run(dense, x, optimize=False)
    reloaded = load_model(out_path)
    for optimize in (False, True):
        np.testing.assert_allclose(_run(reloaded, x, optimize), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("values", ["float32", "float16", "int8"])
def test_stored_weights_expand_back_to_the_decoded_initializers(
    tmp_path: Path, values: str
) -> None:
    """A later step that edits weights gets them back as initializers, equal to what ONNX
    Runtime decodes; a pass run on a compactly stored model expands first and says so."""
    from onnxcompress.graph.sparse_storage import STORED_KEY, expand_stored
    from onnxcompress.passes.base import PassReport, expand_compact_weights

    rng = np.random.default_rng(3)
    weights = _weights(rng)
    weights["w2"] = _prune(weights["w2"], 0.9, rng)
    model = ir.serde.deserialize_model(_conv_model(weights))
    store_sparse(model, ["w2"], min_saving=0, values=values)
    assert json.loads(model.metadata_props[STORED_KEY]) == ["w2"]
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    decoded = _run(model, x, optimize=False)
    plain = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    assert expand_stored(plain) == ["w2"]
    assert STORED_KEY not in plain.metadata_props
    assert [n.op_type for n in plain.graph] == [n.op_type for n in _conv_model(weights).graph.node]
    assert plain.graph.initializers["w2"].const_value is not None
    np.testing.assert_array_equal(_run(plain, x, optimize=False), decoded)
    assert expand_stored(plain) == []  # a plain model is left alone
    report = PassReport("lrf", {})
    assert expand_compact_weights(model, report, "pass 'lrf'")
    assert "expanded 1 weights" in report.notes[0]
    assert not expand_compact_weights(model, report, "pass 'lrf'")
    assert len(report.notes) == 1


def test_sparse_storage_leaves_small_savings_and_graph_inputs_dense() -> None:
    rng = np.random.default_rng(1)
    weights = _weights(rng)
    weights["fc"] = _prune(weights["fc"], 0.5, rng)  # 240 elements: saves < 600 bytes
    weights["w2"] = _prune(weights["w2"], 0.9, rng)
    proto = _conv_model(weights)
    proto.graph.input.append(helper.make_tensor_value_info("w2", TensorProto.FLOAT, [24, 16, 3, 3]))
    model = ir.serde.deserialize_model(proto)
    records = {r.name: r for r in store_sparse(model)}
    assert records["fc"].encoding == "dense" and "decoder" in records["fc"].reason
    assert "w1" not in records or records["w1"].encoding == "dense"  # no zeros: nothing to gain
    assert records["w2"].encoding == "dense" and "graph input" in records["w2"].reason


def test_float16_values_halve_the_bytes_and_decode_to_the_float16_rounding(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weights = _weights(rng)
    weights["w2"] = _prune(weights["w2"], 0.6, rng)  # 40 % density: the mask encoding
    dense = _conv_model(weights)
    exact = ir.serde.deserialize_model(dense)
    narrow = ir.serde.deserialize_model(dense)
    exact_records = {r.name: r for r in store_sparse(exact, ["w1", "w2"], min_saving=0)}
    records = {
        r.name: r for r in store_sparse(narrow, ["w1", "w2"], min_saving=0, values="float16")
    }
    assert records["w2"].encoding == exact_records["w2"].encoding == "mask"
    # Values at 2 bytes instead of 4; the mask itself does not shrink.
    mask_bytes = (weights["w2"].size + 7) // 8
    nonzeros = int(np.count_nonzero(weights["w2"])) + 1
    assert records["w2"].stored_bytes == mask_bytes + 2 * nonzeros
    assert exact_records["w2"].stored_bytes == mask_bytes + 4 * nonzeros
    # A tensor with no zeros is still halved: float16 with one Cast.
    assert exact_records["w1"].encoding == "dense" and records["w1"].encoding == "dense16"
    path = save_model(narrow, tmp_path / "narrow.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    # Outputs are those of the dense model with w1 and w2 rounded to float16: not the originals.
    rounded = {**weights}
    for name in ("w1", "w2"):
        rounded[name] = weights[name].astype(np.float16).astype(np.float32)
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    out = _run(load_model(path), x)
    np.testing.assert_allclose(out, _run(_conv_model(rounded), x), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(out, _run(dense, x))
    with pytest.raises(ValueError, match="values"):
        store_sparse(narrow, values="int4")


@pytest.mark.parametrize("sparsity", [0.9, 0.6, 0.0])
def test_int8_values_store_a_byte_per_value_and_decode_to_the_per_channel_quantization(
    tmp_path: Path, sparsity: float
) -> None:
    from onnxcompress.graph.sparse_storage import dequantize_int8, quantize_int8

    rng = np.random.default_rng(5)
    weights = _weights(rng)
    weights["w2"] = _prune(weights["w2"], sparsity, rng)
    dense = _conv_model(weights)
    model = ir.serde.deserialize_model(dense)
    records = {r.name: r for r in store_sparse(model, ["w2"], min_saving=0, values="int8")}
    record = records["w2"]
    q, scale = quantize_int8(weights["w2"])
    # Zeros stay zeros; every weight moves by at most half a step of its output channel.
    assert np.array_equal(q == 0, (weights["w2"] == 0) | (q == 0))
    step = scale.reshape(-1, 1, 1, 1)
    assert np.all(np.abs(dequantize_int8(q, scale) - weights["w2"]) <= step / 2 + 1e-7)
    nonzeros = int(np.count_nonzero(q))
    expected = {
        "mask": (q.size + 7) // 8 + nonzeros + 1,
        "dense8": q.size,
    }
    if sparsity == 0.9:
        assert record.encoding in ("mask", "gaps")
        assert record.stored_bytes < q.size // 4  # under a quarter of int8 dense
    else:
        assert record.encoding == min(expected, key=lambda key: expected[key])
        assert record.stored_bytes == expected[record.encoding] + scale.nbytes
    path = save_model(model, tmp_path / "int8.onnx")
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = rng.standard_normal((4, 3, 12, 12)).astype(np.float32)
    quantized = {**weights, "w2": dequantize_int8(q, scale)}
    out = _run(load_model(path), x)
    np.testing.assert_allclose(out, _run(_conv_model(quantized), x), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(out, _run(dense, x))


def test_old_opsets_keep_weights_dense() -> None:
    rng = np.random.default_rng(2)
    weights = _weights(rng)
    weights["w2"] = _prune(weights["w2"], 0.9, rng)
    model = ir.serde.deserialize_model(_conv_model(weights, opset=10))
    records = {r.name: r for r in store_sparse(model)}
    assert records["w2"].encoding == "dense" and "opset" in records["w2"].reason


# ---------------------------------------------------------------------------------------------
# Low-rank factorization
# ---------------------------------------------------------------------------------------------


def _rank_r(rng: np.random.Generator, shape: tuple[int, ...], rank: int) -> np.ndarray:
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    left = rng.standard_normal((rows, rank))
    right = rng.standard_normal((rank, cols))
    return (left @ right / np.sqrt(cols)).reshape(shape).astype(np.float32)


@pytest.mark.parametrize("trans_b", [1, 0])
@pytest.mark.parametrize("stride", [1, 2])
def test_factorizing_exactly_low_rank_layers_is_exact(trans_b: int, stride: int) -> None:
    rng = np.random.default_rng(3)
    weights = _weights(rng, trans_b)
    weights["w1"] = _rank_r(rng, (16, 3, 3, 3), 4)
    weights["w2"] = _rank_r(rng, (24, 16, 3, 3), 5)
    fc = _rank_r(rng, (10, 24), 3)
    weights["fc"] = fc if trans_b else np.ascontiguousarray(fc.T)
    proto = _conv_model(weights, stride=stride, gemm_trans_b=trans_b)
    model = ir.serde.deserialize_model(proto)
    for name, rank in (("conv1", 4), ("conv2", 5), ("fc", 3)):
        first, second = factorize(model.graph, model.graph.node(name), rank)
        assert first.outputs[0] is second.inputs[0]
    ops = [node.op_type for node in model.graph]
    assert ops.count("Conv") == 4 and ops.count("Gemm") == 2
    # The kxk part maps Cin -> r with the original geometry, the 1x1 part r -> Cout.
    kxk = model.graph.node("conv2/lowrank_kxk")
    assert kxk.inputs[1].const_value.shape == (5, 16, 3, 3)
    assert model.graph.node("conv2/lowrank_1x1").inputs[1].const_value.shape == (24, 5, 1, 1)
    assert model.graph.outputs[0].name == "y"
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    x = rng.standard_normal((3, 3, 12, 12)).astype(np.float32)
    np.testing.assert_allclose(_run(model, x), _run(proto, x), rtol=1e-4, atol=1e-5)


def test_factorizing_below_the_rank_is_lossy_and_grouped_convs_are_refused() -> None:
    rng = np.random.default_rng(4)
    weights = _weights(rng)
    proto = _conv_model(weights)
    model = ir.serde.deserialize_model(proto)
    factorize(model.graph, model.graph.node("conv2"), 2)
    x = rng.standard_normal((2, 3, 12, 12)).astype(np.float32)
    assert not np.allclose(_run(model, x), _run(proto, x), rtol=1e-3)
    grouped = ir.serde.deserialize_model(proto)
    node = grouped.graph.node("conv2")
    node.attributes["group"] = ir.AttrInt64("group", 2)
    assert "group" in (factorizable_reason(node) or "")
    with pytest.raises(ValueError, match="group"):
        factorize(grouped.graph, node, 2)


# ---------------------------------------------------------------------------------------------
# The pass
# ---------------------------------------------------------------------------------------------


def _digits_context() -> PassContext:
    from onnxcompress.runtime.evaluate import dataset_for_model

    data = dataset_for_model(DIGITS_MODEL, "digits[:600]")
    return PassContext(calibration=data.x, calibration_labels=data.y, seed=0)


# The mechanics of stages and back-off are tested without the final fine-tune, with exact ranks.
FAST = {
    "schedule": "staged",
    "stages": 2,
    "epoch_samples": 256,
    "max_drop": 100.0,
    "final_epochs": 0,
}
EXACT_RANKS = {"round_to": 1, "min_saving": 0.0}


def test_sparse_mode_collapses_layers_and_shrinks_the_file() -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    original = load_model(DIGITS_MODEL)
    lct = create_pass("lct", {**FAST, "sparsity": 0.8}, _digits_context())
    result = lct(model)
    report = lct.report
    assert result.modified and report.modified
    summary = report.summary
    assert summary["file_bytes_after"] < summary["file_bytes_before"] / 2.5
    layers = {row["node"]: row for row in report.layers}
    assert all(row["collapsed"] for row in layers.values())  # max_drop=100 accepts all
    # The ranking is the paper's rule: sparser under the global threshold = less significant.
    ranked = sorted(layers.values(), key=lambda row: row["significance"])
    targets = [row["target_sparsity"] for row in ranked]
    assert targets == sorted(targets, reverse=True)
    assert summary["ranking"] == [row["node"] for row in ranked]
    # Exactly the promised zeros in every collapsed layer.
    for row in ranked:
        assert row["zeros"] == row["target_zeros"] > 0
    zeros = sum(row["target_sparsity"] * row["elements"] for row in ranked)
    assert zeros / sum(row["elements"] for row in ranked) == pytest.approx(0.8, abs=0.01)
    x = _digits_context().calibration
    assert x is not None
    y = _run(model, x[:64])
    teacher = _run(original, x[:64])
    assert y.shape == teacher.shape and np.isfinite(y).all()
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


@pytest.mark.parametrize(("values", "target"), [("int8", 0.2), ("float32", 0.5)])
def test_target_file_aims_the_sparsity_at_the_file_asked_for(values: str, target: float) -> None:
    """The sparsity comes from the file target: the written model lands on it (within the
    target tolerance) with fewer zeros than the 0.9 default, and the console says what it aims
    at."""
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    options = {**FAST, "target_file": target, "values": values}
    lct = create_pass("lct", options, _digits_context())
    lct(model)
    summary = lct.report.summary
    plan = summary["file_plan"]
    assert plan["predicted_file"] <= target
    assert 0.0 < plan["sparsity"] < 0.9
    reached = summary["file_bytes_after"] / summary["file_bytes_before"]
    assert abs(reached - target) <= 0.02, (reached, plan)
    assert abs(reached - plan["predicted_file"]) <= 0.005  # the plan stores a copy once
    assert [t.option for t in lct.report.targets] == ["target_file"]
    assert lct.report.targets_met
    assert any(note.startswith("lct aims at sparsity") for note in lct.report.notes)


def test_a_file_target_no_sparsity_reaches_is_reported_missed() -> None:
    """float32 values need 4 bytes per kept weight plus the mask: 5% of the file is out of
    reach under max_layer_sparsity, and the report says so rather than claiming it."""
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    lct = create_pass("lct", {**FAST, "target_file": 0.05}, _digits_context())
    lct(model)
    plan = lct.report.summary["file_plan"]
    assert plan["sparsity"] == pytest.approx(0.98) and plan["predicted_file"] > 0.05
    assert not lct.report.targets_met
    assert lct.report.warnings and "target_file=0.05" in lct.report.warnings[0]


def test_lowrank_mode_factorizes_and_cuts_macs() -> None:
    from onnxcompress.graph.metrics import model_metrics

    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    before = model_metrics(load_model(DIGITS_MODEL)).macs
    options = {**FAST, **EXACT_RANKS, "subspace": "lowrank", "target_macs": 0.5}
    lct = create_pass("lct", options, _digits_context())
    lct(model)
    after = model_metrics(model).macs
    assert after <= 0.52 * before
    names = [node.name for node in model.graph]
    collapsed = [row for row in lct.report.layers if row["collapsed"]]
    assert collapsed
    for row in collapsed:
        assert row["rank"] < row["full_rank"]
        assert f"{row['node']}/lowrank_kxk" in names or f"{row['node']}/lowrank_in" in names
    x = _digits_context().calibration
    assert x is not None
    assert np.isfinite(_run(model, x[:32])).all()


def test_without_retries_a_rejected_stage_leaves_its_layers_dense() -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    options = {
        "schedule": "staged",
        "stages": 2,
        "epoch_samples": 64,
        "max_drop": 0.0,
        "sparsity": 0.99,
    }
    options.update({"max_layer_sparsity": 0.99, "retries": 0, "slack": 0.0, "final_epochs": 0})
    lct = create_pass("lct", options, _digits_context())
    lct(model)
    stages = lct.report.summary["stages"]
    # One attempt per stage, and the run goes on after a rejection.
    assert [record["attempt"] for record in stages] == [1, 1]
    assert not all(record["accepted"] for record in stages)
    dense = [row for row in lct.report.layers if not row["collapsed"]]
    assert dense and all(row["zeros"] == 0 and row["level"] == 0 for row in dense)
    declined = {d.node for d in lct.report.declined}
    assert {row["node"] for row in dense} <= declined


def _held_out_context() -> PassContext:
    context = _digits_context()
    context.validation_spec = "digits[600:1000]"
    return context


def _top1(model: ir.Model, spec: str) -> float:
    from onnxcompress.runtime.evaluate import dataset_for_model

    data = dataset_for_model(DIGITS_MODEL, spec)
    assert data.y is not None
    return 100.0 * float(np.mean(_run(model, data.x).argmax(1) == data.y))


# A target far beyond what 64 images of training can recover: the full increment breaks
# max_drop, so only backed-off increments can be accepted.
BACK_OFF = {
    "schedule": "staged",
    "stages": 2,
    "epoch_samples": 64,
    "max_drop": 1.0,
    "retries": 3,
    "slack": 0.0,
}
BACK_OFF["final_epochs"] = 0


def test_a_rejected_stage_backs_off_and_keeps_the_largest_accepted_compression(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    teacher = load_model(DIGITS_MODEL)
    options = {**BACK_OFF, "sparsity": 0.99, "max_layer_sparsity": 0.99}
    lct = create_pass("lct", options, _held_out_context())
    lct(model)
    summary = lct.report.summary
    records = summary["stages"]
    reference = summary["reference_top1"]
    # Stage 1's full increment is rejected; a retry halves the increment each time.
    first = [record for record in records if record["stage"] == 1]
    assert not first[0]["accepted"] and first[0]["increment"] == 1.0
    assert [record["increment"] for record in first] == [0.5**i for i in range(len(first))]
    accepted = [record for record in records if record["accepted"]]
    assert accepted, "no backed-off increment was accepted"
    assert all(record["top1"] >= reference - 1.0 for record in accepted)
    assert all(record["attempt"] <= 4 for record in records)
    # Partial levels: every collapsed layer holds exactly the zeros of its accepted level.
    collapsed = [row for row in lct.report.layers if row["collapsed"]]
    assert collapsed and all(0 < row["level"] < 1 for row in collapsed)
    for row in collapsed:
        assert row["zeros"] == round(row["level"] * row["target_zeros"]) > 0
    # The partially compressed model is what is written: smaller file, within max_drop on the
    # held-out images through ONNX Runtime (a sliver of slack for torch/ORT rounding).
    assert summary["file_bytes_after"] < summary["file_bytes_before"]
    saved = save_model(model, tmp_path / "partial.onnx")
    assert saved.stat().st_size < len(model_to_bytes(teacher))
    restored = load_model(saved)
    assert _top1(restored, "digits[600:1000]") >= _top1(teacher, "digits[600:1000]") - 1.0 - 0.5


def test_lowrank_back_off_cuts_part_of_the_way_and_still_saves_macs() -> None:
    from onnxcompress.graph.metrics import model_metrics

    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    before = model_metrics(model).macs
    options = {**BACK_OFF, **EXACT_RANKS, "subspace": "lowrank", "target_macs": 0.2}
    lct = create_pass("lct", options, _held_out_context())
    lct(model)
    summary = lct.report.summary
    reference = summary["reference_top1"]
    assert summary["stages"][0]["increment"] == 1.0 and not summary["stages"][0]["accepted"]
    assert all(r["top1"] >= reference - 1.0 for r in summary["stages"] if r["accepted"])
    collapsed = [row for row in lct.report.layers if row["collapsed"]]
    assert collapsed
    for row in collapsed:
        # A backed-off rank sits between the target and the full rank, and is factorized.
        assert row["target_rank"] <= row["rank"] < row["full_rank"]
        assert row["macs_after"] < row["macs_before"]
    assert any(row["level"] < 1 for row in collapsed)
    after = model_metrics(model).macs
    assert after < before
    assert after == before - sum(row["macs_before"] - row["macs_after"] for row in collapsed)
    x = _digits_context().calibration
    assert x is not None
    assert np.isfinite(_run(model, x[:32])).all()


def test_lowrank_ranks_are_block_multiples_that_save_at_least_min_saving() -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    options = {**FAST, "subspace": "lowrank", "target_macs": 0.5, "round_to": 8}
    options["min_saving"] = 0.3
    lct = create_pass("lct", options, _digits_context())
    lct(model)
    collapsed = [row for row in lct.report.layers if row["collapsed"]]
    assert collapsed
    for row in collapsed:
        if row["full_rank"] > 8:
            assert row["rank"] % 8 == 0 and row["target_rank"] % 8 == 0
        assert row["macs_after"] <= 0.7 * row["macs_before"]


def _scripted_scores(monkeypatch: pytest.MonkeyPatch, offsets: list[float]) -> None:
    """Every validation score of the pass, in order, as points relative to the teacher's."""
    from onnxcompress.passes import lct_scoring

    remaining = list(offsets)

    def score(
        self: object, module: object, limit: int | None = None, deadline: Any = None
    ) -> float:
        return float(self.teacher_score) + remaining.pop(0)  # type: ignore[attr-defined]

    monkeypatch.setattr(lct_scoring.Scorer, "score", score)
    # Checks and attempts read scores on the teacher's scale: the same script.
    monkeypatch.setattr(lct_scoring.Scorer, "score_on_teacher_scale", score)


def _assert_left_as_it_was(model: ir.Model, original: ir.Model, rows: list[dict]) -> None:
    """Every weight as in ``original``, and every reported layer dense."""
    for name, value in original.graph.initializers.items():
        assert value.const_value is not None
        kept = model.graph.initializers[name].const_value
        assert kept is not None and np.array_equal(kept.numpy(), value.const_value.numpy())
    assert all(row["level"] == 0 and not row["collapsed"] for row in rows)


SCRIPTED = {
    "schedule": "staged",
    "stages": 2,
    "epoch_samples": 64,
    "retries": 0,
    "max_drop": 1.0,
    "slack": 1.0,
}
SCRIPTED.update({"sparsity": 0.8, "final_epochs": 1})


@pytest.mark.parametrize(
    ("final", "expected_levels", "expected_top1"),
    [
        # The final fine-tune brings stage 2 back within max_drop: both stages are kept.
        (-0.8, [1.0, 1.0], -0.8),
        # It does not: the result falls back to stage 1, the last model within max_drop.
        (-1.2, [1.0, 0.0], -0.5),
    ],
)
def test_final_fine_tune_keeps_slack_stages_only_when_it_wins_them_back(
    monkeypatch: pytest.MonkeyPatch,
    final: float,
    expected_levels: list[float],
    expected_top1: float,
) -> None:
    torch.set_num_threads(1)
    # Stage 1 within max_drop, stage 2 only within max_drop + slack, then the final fine-tune.
    _scripted_scores(monkeypatch, [-0.5, -1.5, final])
    model = load_model(DIGITS_MODEL)
    lct = create_pass("lct", SCRIPTED, _held_out_context())
    lct(model)
    summary = lct.report.summary
    assert [r["stage"] for r in summary["stages"]] == [1, 2, "final"]
    assert [r["accepted"] for r in summary["stages"][:2]] == [True, True]
    assert summary["final_top1"] == pytest.approx(summary["reference_top1"] + expected_top1)
    levels = {}
    for row in lct.report.layers:
        levels.setdefault(row["stage"], set()).add(row["level"])
        assert row["zeros"] == round(row["level"] * row["target_zeros"])
    assert [levels[stage] for stage in (1, 2)] == [{level} for level in expected_levels]


def test_nothing_within_max_drop_leaves_the_model_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.set_num_threads(1)
    _scripted_scores(monkeypatch, [-1.5, -1.8, -1.1])
    model = load_model(DIGITS_MODEL)
    original = load_model(DIGITS_MODEL)
    lct = create_pass("lct", SCRIPTED, _held_out_context())
    result = lct(model)
    assert not result.modified
    _assert_left_as_it_was(model, original, lct.report.layers)


def _work_clock(
    monkeypatch: pytest.MonkeyPatch, step_s: float = 0.05, image_s: float = 0.001
) -> ManualClock:
    """A clock that moves ``step_s`` per training step and ``image_s`` per validation image
    scored (the teacher's scoring, sensitivity, checks and each attempt's)."""
    from onnxcompress.passes import lct_scoring
    from onnxcompress.torch_bridge import finetune_trainer as trainer_module

    clock = ManualClock()
    real_step, real_predict = trainer_module.Trainer._step, lct_scoring.Scorer._predict

    def step(self: Any, *args: Any) -> float:
        clock.advance(step_s)
        return real_step(self, *args)

    def predict(self: Any, module: Any, index: np.ndarray) -> np.ndarray:
        clock.advance(image_s * index.size)
        return real_predict(self, module, index)

    monkeypatch.setattr(trainer_module.Trainer, "_step", step)
    monkeypatch.setattr(lct_scoring.Scorer, "_predict", predict)
    return clock


def _budgeted(options: dict[str, Any], clock: ManualClock) -> Any:
    lct = create_pass("lct", options, _digits_context())
    lct.clock = clock
    return lct


def test_the_time_budget_holds_across_stages_and_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.set_num_threads(1)
    clock = _work_clock(monkeypatch, step_s=0.2)
    budget = 20.0
    options = {"schedule": "staged", "stages": 4, "retries": 2, "max_drop": 0.0, "sparsity": 0.99}
    options.update({"max_layer_sparsity": 0.99, "time_budget_s": budget, "epochs_per_stage": 50})
    options["epoch_samples"] = 64
    lct = _budgeted(options, clock)
    lct(load_model(DIGITS_MODEL))
    summary = lct.report.summary
    records = summary["stages"]
    # 50 epochs per stage would be thousands of steps: the budget cut every attempt short,
    # and the whole pass (scoring the original, the attempts, their scoring, the final
    # fine-tune) ended within it on the clock that moved with the work.
    assert len(records) >= 2 and all(record["steps"] > 0 for record in records)
    assert sum(record["seconds"] for record in records) <= budget
    assert summary["time"]["spent_s"] <= budget
    assert summary["time"]["budget_s"] == budget


def test_a_budget_that_cannot_hold_one_attempt_is_refused_before_training(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from onnxcompress.torch_bridge import train as train_module

    torch.set_num_threads(1)
    # Scoring the 600 validation images takes 6 s: the original's, then each attempt's.
    clock = _work_clock(monkeypatch, image_s=0.01)
    trained: list[object] = []
    monkeypatch.setattr(train_module, "finetune", lambda *a, **k: trained.append(a))
    lct = _budgeted({**FAST, "time_budget_s": 8.0}, clock)
    with pytest.raises(BudgetTooShortError) as caught:
        lct(load_model(DIGITS_MODEL))
    message = str(caught.value)
    assert message.startswith("lct: time_budget_s=8 cannot hold the minimum work")
    assert "scoring the original (6.0 s)" in message
    assert "scoring it on 600 images (~6.0 s)" in message and "at least 13 s" in message
    assert trained == []
    # Enough for one attempt: it runs, within the budget.
    monkeypatch.undo()
    clock = _work_clock(monkeypatch, image_s=0.01)
    lct = _budgeted({**FAST, "time_budget_s": 16.0}, clock)
    lct(load_model(DIGITS_MODEL))
    assert lct.report.summary["stages"] and lct.report.summary["time"]["spent_s"] <= 16.0


@pytest.mark.parametrize(("budget", "measured"), [(100.0, True), (20.0, True), (4.0, False)])
def test_sensitivity_is_measured_on_what_its_share_of_the_budget_holds(
    monkeypatch: pytest.MonkeyPatch, budget: float, measured: bool
) -> None:
    from onnxcompress.passes import lct_ranking

    torch.set_num_threads(1)
    # 600 validation images scored in 0.6 s, 9 layers: a tenth of what a 20 s budget leaves
    # after the minimum holds 160 images per measurement (less a tenth), of 4 s none.
    clock = _work_clock(monkeypatch, step_s=0.5)
    options = {**FAST, "stages": 1, "sensitivity": True, "sensitivity_samples": 500}
    lct = _budgeted({**options, "time_budget_s": budget}, clock)
    lct(load_model(DIGITS_MODEL))
    summary, layers = lct.report.summary, lct.report.layers
    sensitivity = summary["sensitivity"]
    if not measured:
        assert sensitivity["samples"] == 0 and "paper's order" in sensitivity["skipped"]
        assert all(row["sensitivity"] is None for row in layers)
    else:
        assert all(row["sensitivity"] is not None for row in layers)
        # Scored once unchanged, then once per layer, within the ranking's share.
        share = lct_ranking.SENSITIVITY_SHARE * budget
        samples = sensitivity["samples"]
        assert samples == 500 if budget == 100.0 else 100 <= samples < 500
        assert summary["time"]["phases_s"]["ranking"] <= share
        assert (len(layers) + 1) * samples * 0.001 == pytest.approx(
            summary["time"]["phases_s"]["ranking"]
        )
    assert summary["time"]["spent_s"] <= budget


def test_the_gradual_ramp_checks_at_most_once_a_step_and_fewer_times_under_a_short_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from onnxcompress.passes.lct_projection import GradualProjector

    monkeypatch.setattr(GradualProjector, "_project_at", lambda self, module: None)
    layers: Any = [SimpleNamespace(node=f"layer{i}") for i in range(3)]
    checked: list[float] = []
    projector = GradualProjector(
        layers, 1.0, 0.5, 10, False, lambda m: checked.append(0.0) or 0.0, -1.0
    )
    # A slow step (or a check) moved a time-driven progress past six check points at once.
    for progress in (0.05, 0.65, 0.68, 0.71):
        projector(None, progress)
    assert len(checked) == 2  # one at 0.65 for the six points passed, one at 0.71 (0.7)
    # In a pass: a check scores the 600 validation images (0.6 s), and a quarter of a ramp of
    # about 12 s holds 4 of the 20 asked for.
    torch.set_num_threads(1)
    clock = _work_clock(monkeypatch, step_s=0.2)
    options = {**GRADUAL, "checks": 20, "check_samples": 2000, "time_budget_s": 20.0}
    lct = _budgeted(options, clock)
    lct(load_model(DIGITS_MODEL))
    checks = lct.report.summary["checks"]
    assert checks["planned"] == 20 and checks["run"] == 4
    assert lct.report.summary["time"]["spent_s"] <= 20.0


def test_sensitivity_refines_the_ranking() -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    options = {**FAST, "sensitivity": True, "sensitivity_samples": 200, "stages": 1}
    lct = create_pass("lct", options, _digits_context())
    lct(model)
    ranked = sorted(lct.report.layers, key=lambda row: row["significance"])
    drops = [row["sensitivity"] for row in ranked]
    assert all(d is not None for d in drops) and drops == sorted(drops)


def test_after_step_hook_runs_after_every_optimizer_step() -> None:
    from onnxcompress.torch_bridge.finetune_config import FinetuneConfig
    from onnxcompress.torch_bridge.train import finetune

    context = _digits_context()
    from onnxcompress.data import Dataset

    assert context.calibration is not None
    train = Dataset(context.calibration[:256], context.calibration_labels[:256], "digits")
    calls: list[int] = []

    progress: list[float] = []

    def zero_fc(module, done: float) -> None:
        calls.append(1)
        progress.append(done)
        module.param_for("fc.weight").data.zero_()

    config = FinetuneConfig(epochs=1, batch_size=64, augment=False)
    result = finetune(load_model(DIGITS_MODEL), None, train, None, config, False, zero_fc)
    assert len(calls) == 4
    # The run's progress: one epoch of four steps, a quarter per step.
    assert progress == pytest.approx([0.25, 0.5, 0.75, 1.0])
    fc = result.model.graph.initializers["fc.weight"].const_value
    assert fc is not None and not fc.numpy().any()


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"subspace": "pruned"}, "subspace"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 0}, "sparsity"),
        ({"sparsity": 0.5, "target_file": 0.2}, "not both"),
        ({"subspace": "lowrank", "target_file": 0.2}, "target_file is a sparse target"),
        ({"target_file": 1.5}, "target_file"),
        ({"subspace": "lowrank", "target_macs": 0.5, "energy": 0.9}, "not both"),
        ({"subspace": "lowrank", "target_macs": 1.5}, "target_macs"),
        ({"max_drop": -1}, "max_drop"),
        ({"stages": 0}, "stages"),
        ({"retries": -1}, "retries"),
        ({"ramp": 2}, "ramp"),
        ({"schedule": "cubic"}, "schedule"),
        ({"stagger": 1}, "stagger"),
        ({"checks": 0}, "checks"),
        ({"lr": 0}, "lr"),
        ({"colour": "red"}, "no option"),
    ],
)
def test_bad_options(options: dict, fragment: str) -> None:
    with pytest.raises(PassConfigError, match=fragment):
        create_pass("lct", options)


def test_without_data_is_a_user_error() -> None:
    with pytest.raises(PassConfigError, match="needs data"):
        create_pass("lct", {})(load_model(DIGITS_MODEL))


@pytest.mark.slow
@pytest.mark.parametrize("subspace", ["sparse", "lowrank"])
def test_resnet18_from_the_zoo(tmp_path: Path, subspace: str) -> None:
    from zoo import export_torchvision

    from onnxcompress.graph.canonicalize import load_canonical

    torch.set_num_threads(2)
    path = export_torchvision("resnet18", size=64)
    model, _ = load_canonical(path)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 3, 64, 64)).astype(np.float32)
    context = PassContext(calibration=x, seed=0)
    options = {
        "schedule": "staged",
        "stages": 2,
        "epoch_samples": 32,
        "batch_size": 16,
        "subspace": subspace,
    }
    options["max_drop"] = 100.0
    lct = create_pass("lct", options, context)
    lct(model)
    assert lct.report.modified
    saved = save_model(model, tmp_path / "out.onnx")
    onnx.checker.check_model(onnx.load(str(saved)), full_check=True)
    y = _run(load_model(saved), x[:8])
    assert y.shape == (8, 1000) and np.isfinite(y).all()
    if subspace == "sparse":
        assert saved.stat().st_size < path.stat().st_size / 4


def test_limited_scoring_spreads_over_class_sorted_data() -> None:
    from onnxcompress.data import Dataset
    from onnxcompress.passes.lct_scoring import Scorer

    context = _digits_context()
    assert context.calibration is not None and context.calibration_labels is not None
    order = np.argsort(context.calibration_labels, kind="stable")
    data = Dataset(context.calibration[order], context.calibration_labels[order], "sorted")
    scorer = Scorer(load_model(DIGITS_MODEL), data, "cpu")
    index = scorer.subset(50)
    assert index.size == 50 and len(set(data.y[index].tolist())) == 10
    assert scorer.score(Scorer.module_of(scorer, load_model(DIGITS_MODEL))) == scorer.teacher_score


def test_a_check_on_a_subset_is_read_on_the_whole_sets_scale() -> None:
    """A check scores a spread subset; read against the whole-set reference, a subset harder
    than the set counted as lost accuracy (0.46 points of ResNet-20's 0.5-point slack). On the
    teacher's scale, the teacher checked against itself loses nothing, whatever the subset."""
    from onnxcompress.data import Dataset
    from onnxcompress.passes.lct_scoring import Scorer

    context = _digits_context()
    assert context.calibration is not None and context.calibration_labels is not None
    labels = context.calibration_labels.copy()
    scorer_probe = Scorer(
        load_model(DIGITS_MODEL), Dataset(context.calibration, labels, "x"), "cpu"
    )
    # Make the checked images harder: mislabel every other one the check takes.
    checked = scorer_probe.subset(100)
    labels[checked[::2]] = (labels[checked[::2]] + 1) % 10
    data = Dataset(context.calibration, labels, "harder subset")
    scorer = Scorer(load_model(DIGITS_MODEL), data, "cpu")
    teacher = Scorer.module_of(scorer, load_model(DIGITS_MODEL))
    raw, on_subset = scorer.score_paired(teacher, 100)
    assert raw == on_subset < scorer.teacher_score - 20  # the subset is far harder
    assert scorer.score(teacher, 100) == raw
    assert scorer.score_on_teacher_scale(teacher, 100) == scorer.teacher_score


def test_scoring_stops_at_the_deadline_on_a_spread_subset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scoring the deadline ends after its first batch (256 of 600 class-sorted images)
    gives the top-1 of a subset with every class in it, and counts the cut."""
    from onnxcompress.data import Dataset
    from onnxcompress.deadline import Deadline
    from onnxcompress.passes.lct_scoring import Scorer

    context = _digits_context()
    assert context.calibration is not None and context.calibration_labels is not None
    order = np.argsort(context.calibration_labels, kind="stable")
    data = Dataset(context.calibration[order], context.calibration_labels[order], "sorted")
    scorer = Scorer(load_model(DIGITS_MODEL), data, "cpu")
    clock = ManualClock()
    seen: list[np.ndarray] = []
    real = Scorer._predict

    def predict(self: Any, module: Any, index: np.ndarray) -> np.ndarray:
        seen.append(index)
        clock.advance(1.0)
        return real(self, module, index)

    monkeypatch.setattr(Scorer, "_predict", predict)
    module = scorer.module_of(load_model(DIGITS_MODEL))
    top1 = scorer.score(module, deadline=Deadline(0.5, clock=clock))
    (scored,) = seen
    assert scored.size == 256 and len(set(data.y[scored].tolist())) == 10  # type: ignore[index]
    assert scorer.cut_short == 1 and top1 == scorer._top1(real(scorer, module, scored), scored)
    # With time to spare, every image.
    assert scorer.score(module, deadline=Deadline(100.0, clock=clock)) == scorer.teacher_score
    assert scorer.cut_short == 1


# -- the gradual schedule ---------------------------------------------------------------------

# Three epochs of four steps: the ramp gets two (1 - final_share of three), a fine-tune of its
# own whose progress is the schedule's (1/8 per step), checked four times: after steps 2, 4, 6
# and 8 (progress 0.25, 0.5, 0.75, 1); the recovery gets the third epoch.
GRADUAL = {"schedule": "gradual", "epochs": 3, "epoch_samples": 256, "checks": 4}
GRADUAL.update({"final_share": 1 / 3, "stagger": 0.5, "sparsity": 0.8})


def _gradual_level(index: int, count: int, progress: float) -> float:
    """The level of the ``index``-th least significant of ``count`` layers, by the docstring's
    rule: a cubic ramp from ``0.5 * index / (count - 1)`` to 1."""
    start = 0.5 * index / (count - 1)
    done = min(1.0, max(0.0, (progress - start) / (1.0 - start)))
    return 1.0 - (1.0 - done) ** 3


def test_gradual_schedule_reaches_every_target_when_every_check_passes() -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    original = load_model(DIGITS_MODEL)
    lct = create_pass("lct", {**GRADUAL, "max_drop": 100.0}, _digits_context())
    assert lct(model).modified
    summary = lct.report.summary
    assert summary["schedule"] == "gradual" and "stopped" not in summary
    assert [r["stage"] for r in summary["stages"]] == ["ramp"] * 4 + ["end", "final"]
    for row in lct.report.layers:
        assert row["level"] == 1.0 and row["zeros"] == row["target_zeros"] > 0
    assert summary["file_bytes_after"] < summary["file_bytes_before"]
    # The compact file runs in ONNX Runtime and differs from the original (it was trained).
    x = _digits_context().calibration[:32]
    assert _run(model, x).shape == _run(original, x).shape
    assert not np.allclose(_run(model, x), _run(original, x))


@pytest.mark.parametrize(
    ("checks", "schedule_at"),
    [
        # Pass, fail (pause at 0.5), pass (resume at step 6), pass (two steps more: 0.75).
        ([-0.5, -2.5, -1.5, -0.5], 0.75),
        # Pass, fail, fail again (back to 0.25, where the first check passed), pass (at the
        # last step: the ramp is over, nothing more to resume).
        ([-0.5, -2.5, -2.6, -0.5], 0.25),
    ],
)
def test_gradual_schedule_pauses_below_the_floor_and_backs_off_after_two_failures(
    monkeypatch: pytest.MonkeyPatch, checks: list[float], schedule_at: float
) -> None:
    torch.set_num_threads(1)
    # max_drop 1 + slack 1: a check passes at -2 or above; the end of the ramp is beyond
    # max_drop, the recovery brings it within.
    _scripted_scores(monkeypatch, [*checks, -1.2, -0.6])
    model = load_model(DIGITS_MODEL)
    lct = create_pass("lct", {**GRADUAL, "max_drop": 1.0, "slack": 1.0}, _held_out_context())
    assert lct(model).modified
    summary = lct.report.summary
    assert [r["accepted"] for r in summary["stages"]] == [o >= -2 for o in checks] + [
        False,
        True,
    ]
    assert "paused" in summary["stopped"]
    end = summary["stages"][-2]
    assert end["stage"] == "end" and end["increment"] == pytest.approx(schedule_at)
    assert summary["final_top1"] == pytest.approx(summary["reference_top1"] - 0.6)
    rows = sorted(lct.report.layers, key=lambda row: row["significance"])
    expected = [_gradual_level(i, len(rows), schedule_at) for i in range(len(rows))]
    assert [row["level"] for row in rows] == pytest.approx(expected)
    assert expected[0] > expected[-1]  # the least significant layer went furthest
    for row in rows:
        assert row["zeros"] == round(row["level"] * row["target_zeros"])


def test_gradual_recovery_is_a_fine_tune_of_its_own_from_final_lr(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from onnxcompress.torch_bridge import train as train_module

    torch.set_num_threads(1)
    runs: list[tuple[int, float, float]] = []
    real = train_module.finetune

    def spy(student: Any, teacher: Any, data: Any, val: Any, config: Any, **kw: Any) -> Any:
        sparsity = []
        result = real(student, teacher, data, val, config, **kw)
        for name, value in result.model.graph.initializers.items():
            if name.endswith("weight") and value.const_value is not None:
                sparsity.append(float(np.mean(value.const_value.numpy() == 0)))
        runs.append((config.epochs, config.lr, max(sparsity)))
        return result

    monkeypatch.setattr(train_module, "finetune", spy)
    options = {**GRADUAL, "max_drop": 100.0, "lr": 0.002, "final_lr": 0.02}
    lct = create_pass("lct", options, _digits_context())
    assert lct(load_model(DIGITS_MODEL)).modified
    # The ramp (two epochs at lr) reaches the targets, the recovery (one epoch) restarts
    # at final_lr and holds them.
    assert [run[:2] for run in runs] == [(2, 0.002), (1, 0.02)]
    assert runs[0][2] > 0.5 and runs[1][2] == runs[0][2]


def test_gradual_projector_completes_a_running_schedule_when_the_clock_ends_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from types import SimpleNamespace

    from onnxcompress.passes.lct_projection import GradualProjector

    # Only the schedule's arithmetic: no weights are projected.
    monkeypatch.setattr(GradualProjector, "_project_at", lambda self, module: None)
    layers: Any = [SimpleNamespace(node=f"layer{i}") for i in range(3)]
    scores = iter([0.0, -5.0])
    projector = GradualProjector(layers, 1.0, 0.5, 2, False, lambda m: next(scores), -1.0)
    for progress in (0.3, 0.6, 0.97):  # a time budget: the last step short of 1
        projector(None, progress)
    projector.finish(None)
    assert projector.at == 1.0 and projector.levels() == [1.0, 1.0, 1.0]
    assert projector.halted is None
    # Paused at the end (the first check, passed at progress 0.6, was below the floor; the
    # second, due at 1, never came): it stays where it paused.
    scores = iter([-5.0])
    paused = GradualProjector(layers, 1.0, 0.5, 2, False, lambda m: next(scores), -1.0)
    for progress in (0.3, 0.6, 0.97):
        paused(None, progress)
    paused.finish(None)
    assert paused.at == pytest.approx(0.6) and paused.halted is not None


def test_gradual_schedule_ending_beyond_max_drop_leaves_the_model_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.set_num_threads(1)
    # Every check within max_drop (the last, at the end of the ramp, is the fallback), the end
    # of the ramp and the recovery beyond it, and the fallback beyond it too on the whole
    # validation set.
    _scripted_scores(monkeypatch, [-0.5, -0.5, -0.5, -0.5, -1.5, -1.2, -1.2])
    model = load_model(DIGITS_MODEL)
    original = load_model(DIGITS_MODEL)
    lct = create_pass("lct", {**GRADUAL, "max_drop": 1.0}, _held_out_context())
    assert not lct(model).modified
    _assert_left_as_it_was(model, original, lct.report.layers)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_gradual_schedule_falls_back_to_the_furthest_check_within_max_drop(
    monkeypatch: pytest.MonkeyPatch, batchnorm: bool, batchnorm_insertions: list[list[str]]
) -> None:
    torch.set_num_threads(1)
    # Only the first check (schedule at 0.25) is within max_drop; the end of the ramp and the
    # recovery are not; the weights of that check, scored again on the whole validation set,
    # are. With BatchNorms put back for the training, the check's weights come back folded.
    from onnxcompress.graph.canonicalize import load_canonical

    _scripted_scores(monkeypatch, [-0.5, -1.5, -1.5, -1.5, -1.5, -1.4, -0.8])
    # Canonical: the demo model's BatchNorms folded into its convs, as exporters leave them.
    model, _ = load_canonical(DIGITS_MODEL)
    assert "BatchNormalization" not in [node.op_type for node in model.graph]
    options = {**GRADUAL, "max_drop": 1.0, "slack": 1.0, "batchnorm": batchnorm}
    lct = create_pass("lct", options, _held_out_context())
    assert lct(model).modified
    summary = lct.report.summary
    assert [r["stage"] for r in summary["stages"]][-3:] == ["end", "final", "fallback"]
    assert summary["final_top1"] == pytest.approx(summary["reference_top1"] - 0.8)
    assert "furthest check" in summary["stopped"]
    rows = sorted(lct.report.layers, key=lambda row: row["significance"])
    expected = [_gradual_level(i, len(rows), 0.25) for i in range(len(rows))]
    assert [row["level"] for row in rows] == pytest.approx(expected)
    # The written weights are the check's: each layer at that level's count of zeros.
    for row in rows:
        assert row["zeros"] == round(row["level"] * row["target_zeros"])
    # Ramp and recovery each trained with a BN after every conv (or none), folded away.
    convs = sum(1 for node in load_canonical(DIGITS_MODEL)[0].graph if node.op_type == "Conv")
    assert [len(names) for names in batchnorm_insertions] == ([convs, convs] if batchnorm else [])
    assert "BatchNormalization" not in [node.op_type for node in model.graph]


def test_gradual_lowrank_reaches_the_target_ranks() -> None:
    torch.set_num_threads(1)
    model = load_model(DIGITS_MODEL)
    options = {**GRADUAL, **EXACT_RANKS, "subspace": "lowrank", "max_drop": 100.0}
    options["target_macs"] = 0.6
    lct = create_pass("lct", options, _digits_context())
    assert lct(model).modified
    for row in lct.report.layers:
        assert row["level"] == 1.0 and row["rank"] == row["target_rank"]
    assert lct.report.summary["macs_after"] < lct.report.summary["macs_before"]


@pytest.mark.parametrize(
    ("reached", "words"),
    [(0.5427, "removed more than asked"), (0.75, "ranks are multiples of round_to")],
)
def test_a_lowrank_miss_says_which_side_of_target_macs_it_fell(reached: float, words: str) -> None:
    """Landing below target_macs is the allocation's coarse steps, not a shortfall; the warning
    says so instead of explaining why it could not get down to the target."""
    from onnxcompress.graph.metrics import ModelMetrics
    from onnxcompress.passes.base import PassReport

    lct = create_pass("lct", {"subspace": "lowrank", "target_macs": 0.6}, _digits_context())
    report = PassReport("lct", {})
    before = ModelMetrics(params=1, macs=10_000, layers=[], file_size=None, batch=1)
    after = dataclasses.replace(before, macs=round(reached * before.macs))
    lct.check_targets(before, after, report)
    (warning,) = report.warnings
    assert warning.startswith(f"lct missed target_macs=0.6 (reached {reached:.4g})")
    assert words in warning
