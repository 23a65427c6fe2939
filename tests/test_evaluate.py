"""Tests for onnxcompress.runtime.evaluate: exact accuracies, output deviation, verification,
data fit.

Fixtures are tiny classifiers built here whose scores are the input itself (permuted), so every
expected top-1/top-5 and deviation follows from the test's own numbers.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.data import Dataset, Preprocess, load_dataset
from onnxcompress.errors import DataError, VerificationError
from onnxcompress.runtime.evaluate import (
    accuracy,
    check_model,
    dataset_for_model,
    output_deviation,
    predict,
    verify,
)

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "digits_resnet.onnx"


def classifier_proto(
    weight: np.ndarray,
    bias: np.ndarray | None = None,
    *,
    batch: int | str = "N",
    feature_scale: float | None = None,
    metadata: dict[str, str] | None = None,
) -> onnx.ModelProto:
    """input [batch, K, 1, 1] -> Flatten -> Gemm(weight (C, K), bias) -> logits [batch, C].

    With ``feature_scale`` a second output ``features`` = flattened input * scale is added.
    """
    classes, features = weight.shape
    bias = np.zeros(classes, np.float32) if bias is None else bias
    nodes = [
        helper.make_node("Flatten", ["input"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "W", "B"], ["logits"], transB=1),
    ]
    initializers = [
        numpy_helper.from_array(weight.astype(np.float32), "W"),
        numpy_helper.from_array(bias.astype(np.float32), "B"),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, classes])]
    if feature_scale is not None:
        nodes.append(helper.make_node("Mul", ["flat", "S"], ["features"]))
        initializers.append(numpy_helper.from_array(np.float32(feature_scale), "S"))
        outputs.append(
            helper.make_tensor_value_info("features", TensorProto.FLOAT, [batch, features])
        )
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, features, 1, 1])],
        outputs,
        initializers,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    if metadata:
        helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def to_ir(proto: onnx.ModelProto) -> ir.Model:
    return ir.serde.deserialize_model(proto)


def permutation_matrix(perm: list[int]) -> np.ndarray:
    """W with (x @ W.T)[:, j] == x[:, perm[j]]."""
    weight = np.zeros((len(perm), len(perm)), np.float32)
    weight[np.arange(len(perm)), perm] = 1.0
    return weight


def images(scores: np.ndarray) -> np.ndarray:
    return scores.astype(np.float32)[:, :, None, None]


# Six classes, scores 0..5 per sample; LABEL_RANKS[i] is where sample i's label ranks (0 = best).
PERM = [2, 0, 5, 1, 4, 3]
LABEL_RANKS = [0, 0, 0, 1, 2, 4, 5, 5, 3, 0]


def ranked_dataset(seed: int = 0) -> tuple[np.ndarray, Dataset]:
    """Inputs whose logits (after PERM) put each sample's label at LABEL_RANKS[i]."""
    rng = np.random.default_rng(seed)
    inverse = np.argsort(PERM)
    logits = np.stack([rng.permutation(6).astype(np.float32) for _ in LABEL_RANKS])
    labels = np.array(
        [int(np.argsort(-row)[rank]) for row, rank in zip(logits, LABEL_RANKS, strict=True)]
    )
    x = logits[:, inverse]
    np.testing.assert_array_equal(x @ permutation_matrix(PERM).T, logits)
    return logits, Dataset(images(x), labels.astype(np.int64), "ranked")


# ---------------------------------------------------------------------------------------------
# predict / accuracy
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["ir", "bytes", "path"])
def test_predict_returns_the_first_output_for_every_model_form(form: str, tmp_path: Path) -> None:
    logits, dataset = ranked_dataset()
    proto = classifier_proto(permutation_matrix(PERM), feature_scale=3.0)
    model: ir.Model | bytes | Path
    if form == "ir":
        model = to_ir(proto)
    elif form == "bytes":
        model = proto.SerializeToString()
    else:
        model = tmp_path / "m.onnx"
        onnx.save(proto, model)
    got = predict(model, dataset.x, batch_size=3)
    np.testing.assert_array_equal(got, logits)


def test_predict_pads_the_last_batch_of_a_fixed_batch_model() -> None:
    logits, dataset = ranked_dataset()
    model = to_ir(classifier_proto(permutation_matrix(PERM), batch=4))
    got = predict(model, dataset.x)  # 10 samples = 4 + 4 + 2 (padded to 4)
    assert got.shape == (10, 6)
    np.testing.assert_array_equal(got, logits)


def test_predict_refuses_a_model_with_two_inputs() -> None:
    proto = onnx.parser.parse_model(
        """<ir_version: 10, opset_import: ["" : 17]>
        g (float[N, 2, 1, 1] a, float[N, 2, 1, 1] b) => (float[N, 2, 1, 1] c) { c = Add(a, b) }"""
    )
    with pytest.raises(DataError, match="2 inputs"):
        predict(to_ir(proto), np.zeros((3, 2, 1, 1), np.float32))


def test_predict_wraps_an_input_shape_mismatch_as_data_error() -> None:
    model = to_ir(classifier_proto(permutation_matrix(PERM)))
    with pytest.raises(DataError, match="cannot run the model"):
        predict(model, np.zeros((3, 5, 1, 1), np.float32))


def test_accuracy_top1_and_top5_are_exact() -> None:
    _, dataset = ranked_dataset()
    result = accuracy(to_ir(classifier_proto(permutation_matrix(PERM))), dataset, batch_size=4)
    ranks = np.array(LABEL_RANKS)
    assert result.samples == 10
    assert result.top1 == pytest.approx(100.0 * np.mean(ranks == 0))  # 40 %
    assert result.top5 == pytest.approx(100.0 * np.mean(ranks < 5))  # 80 %
    assert result.top1 == pytest.approx(40.0) and result.top5 == pytest.approx(80.0)
    assert result.seconds >= 0
    assert set(result.as_dict()) == {"top1", "top5", "samples", "seconds"}


def test_accuracy_breaks_ties_towards_the_lower_class_like_argmax() -> None:
    x = images(np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]]))
    model = to_ir(classifier_proto(np.eye(3, dtype=np.float32)))
    assert accuracy(model, Dataset(x, np.array([0, 1]), "ties")).top1 == 100.0
    assert accuracy(model, Dataset(x, np.array([1, 2]), "ties")).top1 == 0.0


def test_accuracy_has_no_top5_below_five_classes() -> None:
    x = images(np.array([[0.0, 3.0, 1.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0]]))
    model = to_ir(classifier_proto(np.eye(3, dtype=np.float32)))
    result = accuracy(model, Dataset(x, np.array([1, 1, 2]), "three"))
    assert result.top1 == pytest.approx(200.0 / 3.0)
    assert result.top5 is None


def test_accuracy_refuses_labels_beyond_the_model_outputs() -> None:
    _, dataset = ranked_dataset()
    dataset.y[3] = 6  # the model scores classes 0..5
    with pytest.raises(DataError, match="6 classes"):
        accuracy(to_ir(classifier_proto(permutation_matrix(PERM))), dataset)


def test_accuracy_refuses_out_of_range_labels_when_the_class_count_is_symbolic() -> None:
    proto = classifier_proto(np.eye(3, dtype=np.float32))
    proto.graph.output[0].type.tensor_type.shape.dim[1].dim_param = "C"
    dataset = Dataset(images(np.eye(3)), np.array([0, 1, 3]), "symbolic")
    with pytest.raises(DataError, match=r"labels range over 0\.\.3"):
        accuracy(proto.SerializeToString(), dataset)


def test_accuracy_refuses_unlabelled_data() -> None:
    _, dataset = ranked_dataset()
    with pytest.raises(DataError, match="no labels"):
        accuracy(to_ir(classifier_proto(permutation_matrix(PERM))), Dataset(dataset.x, None, "u"))


# ---------------------------------------------------------------------------------------------
# output_deviation
# ---------------------------------------------------------------------------------------------


def test_deviation_of_a_model_against_itself_is_zero() -> None:
    _, dataset = ranked_dataset()
    model = to_ir(classifier_proto(permutation_matrix(PERM), feature_scale=2.0))
    deviation = output_deviation(model, model, dataset.x)
    assert (deviation.max_abs, deviation.mean_abs, deviation.max_rel) == (0.0, 0.0, 0.0)
    assert deviation.top1_agreement == 100.0
    assert deviation.samples == 10


def test_deviation_of_a_perturbed_bias_is_the_perturbation() -> None:
    eye = np.eye(4, dtype=np.float32)
    # Class 2 gets +0.5: it overtakes the winner in rows 1 and 3 only.
    scores = np.array(
        [[0.0, 1.0, 3.0, 2.0], [2.0, 0.0, 1.75, 1.0], [4.0, 0.0, 3.0, 1.0], [0.0, 1.0, 0.875, 0.0]]
    )
    bias = np.array([0.0, 0.0, 0.5, 0.0], np.float32)
    reference = to_ir(classifier_proto(eye))
    candidate = to_ir(classifier_proto(eye, bias))
    deviation = output_deviation(reference, candidate, images(scores), batch_size=3)
    assert deviation.max_abs == pytest.approx(0.5, rel=1e-6)
    assert deviation.mean_abs == pytest.approx(0.5 / 4, rel=1e-6)  # one column in four
    assert deviation.max_rel == pytest.approx(0.5 / 4.0, rel=1e-6)  # max |reference| is 4
    assert deviation.top1_agreement == 50.0
    assert deviation.samples == 4


def test_deviation_covers_every_output_not_only_the_first() -> None:
    _, dataset = ranked_dataset()
    weight = permutation_matrix(PERM)
    reference = to_ir(classifier_proto(weight, feature_scale=2.0))
    candidate = to_ir(classifier_proto(weight, feature_scale=2.5))
    deviation = output_deviation(reference, candidate, dataset.x)
    # features = x * scale with x in 0..5: the difference peaks at 5 * 0.5; logits are equal.
    assert deviation.max_abs == pytest.approx(2.5)
    assert deviation.max_rel == pytest.approx(2.5 / 10.0)
    assert deviation.mean_abs == pytest.approx(0.5 * dataset.x.mean() / 2)  # half the elements
    assert deviation.top1_agreement == 100.0


def test_deviation_refuses_outputs_of_different_shapes() -> None:
    _, dataset = ranked_dataset()
    reference = to_ir(classifier_proto(permutation_matrix(PERM)))
    candidate = to_ir(classifier_proto(np.ones((5, 6), np.float32)))
    with pytest.raises(VerificationError, match="shape"):
        output_deviation(reference, candidate, dataset.x)


# ---------------------------------------------------------------------------------------------
# verify
# ---------------------------------------------------------------------------------------------


def test_verify_passes_an_identical_model_on_random_inputs() -> None:
    proto = classifier_proto(permutation_matrix(PERM), feature_scale=1.5)
    result = verify(to_ir(proto), to_ir(proto), samples=8, seed=3)
    assert result.ok() and result.ok(max_rel=0.0)
    assert result.checker_ok and result.checker_error is None
    assert result.session_ok and result.session_error is None
    assert result.deviation is not None and result.deviation.max_abs == 0.0
    assert result.deviation.samples == 8
    assert result.as_dict()["ok"] is True


def test_verify_measures_a_lossy_candidate_and_applies_a_budget() -> None:
    _, dataset = ranked_dataset()
    eye = np.eye(6, dtype=np.float32)
    result = verify(to_ir(classifier_proto(eye)), to_ir(classifier_proto(eye * 1.01)), x=dataset.x)
    assert result.deviation is not None
    assert result.deviation.max_rel == pytest.approx(0.01, rel=1e-5)
    assert result.ok() and result.ok(max_rel=0.02) and not result.ok(max_rel=1e-4)


def test_verify_flags_a_graph_that_fails_the_checker() -> None:
    proto = classifier_proto(permutation_matrix(PERM))
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    # Gemm reads a tensor that nothing produces.
    broken.graph.node[1].input[0] = "missing"
    result = verify(to_ir(proto), broken.SerializeToString(), samples=4)
    assert not result.checker_ok
    assert result.checker_error is not None and "missing" in result.checker_error
    assert not result.session_ok and result.session_error is not None
    assert result.deviation is None
    assert not result.ok()


def test_verify_flags_a_declared_shape_that_contradicts_inference() -> None:
    proto = classifier_proto(permutation_matrix(PERM))
    wrong = onnx.ModelProto()
    wrong.CopyFrom(proto)
    wrong.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 7
    assert check_model(wrong.SerializeToString()) is not None
    result = verify(to_ir(proto), wrong.SerializeToString(), samples=4)
    assert not result.checker_ok and not result.ok()


def test_verify_reports_a_candidate_whose_outputs_change_shape() -> None:
    reference = to_ir(classifier_proto(permutation_matrix(PERM)))
    candidate = to_ir(classifier_proto(np.ones((5, 6), np.float32)))
    result = verify(reference, candidate, samples=4)
    assert result.checker_ok
    assert not result.session_ok and "shape" in str(result.session_error)
    assert not result.ok()


def test_verify_fails_a_candidate_that_produces_nan() -> None:
    eye = np.eye(6, dtype=np.float32)
    bias = np.zeros(6, np.float32)
    bias[1] = np.nan
    result = verify(to_ir(classifier_proto(eye)), to_ir(classifier_proto(eye, bias)), samples=4)
    assert result.checker_ok and result.session_ok
    assert result.deviation is not None and np.isnan(result.deviation.max_abs)
    assert not result.ok()


# ---------------------------------------------------------------------------------------------
# dataset_for_model
# ---------------------------------------------------------------------------------------------


def digits_input_model(channels: int = 1) -> ir.Model:
    """A model with input [N, channels, 8, 8] and the demo model's preprocessing metadata."""
    features = channels * 64
    proto = classifier_proto(np.ones((10, features), np.float32))
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    dims[1].dim_value, dims[2].dim_value, dims[3].dim_value = channels, 8, 8
    metadata = Preprocess(scale=1 / 16, mean=(0.5,), std=(0.5,)).to_metadata()
    helper.set_model_props(proto, metadata)
    return to_ir(proto)


def test_dataset_for_model_applies_the_metadata_preprocessing() -> None:
    from sklearn.datasets import load_digits

    dataset = dataset_for_model(digits_input_model(), "digits[:5]")
    raw = load_digits().images[:5, None].astype(np.float32)
    np.testing.assert_allclose(dataset.x, (raw / 16 - 0.5) / 0.5, rtol=1e-6, atol=1e-6)
    assert dataset.y is not None and dataset.y.tolist() == [0, 1, 2, 3, 4]


def test_dataset_for_model_lets_the_spec_and_the_caller_override_the_metadata() -> None:
    plain = load_dataset("digits[:5]")
    spec_override = dataset_for_model(digits_input_model(), "digits[:5]?mean=0&std=1")
    np.testing.assert_allclose(spec_override.x, plain.x, rtol=1e-6)
    caller = dataset_for_model(
        digits_input_model(), "digits[:5]", preprocess=Preprocess(mean=(0.0,), std=(2.0,))
    )
    np.testing.assert_allclose(caller.x, plain.x / 2, rtol=1e-6)


def test_dataset_for_model_refuses_images_that_do_not_fit_the_input() -> None:
    with pytest.raises(DataError, match="channels=3"):
        dataset_for_model(digits_input_model(channels=3), "digits[:5]")


# ---------------------------------------------------------------------------------------------
# the shipped demo model
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_model() -> ir.Model:
    if not DEMO_MODEL.exists():
        pytest.fail(f"{DEMO_MODEL} is missing; run models/train_digits_cnn.py")
    from onnxcompress.graph.model_io import load_model

    return load_model(DEMO_MODEL)


def test_demo_model_reaches_97_percent_on_held_out_digits(demo_model: ir.Model) -> None:
    dataset = dataset_for_model(demo_model, "digits[1400:]")
    result = accuracy(demo_model, dataset)
    assert result.samples == 397
    assert result.top1 >= 97.0
    assert result.top5 is not None and result.top5 >= result.top1


def test_demo_model_keeps_batchnorm_residuals_and_metadata(demo_model: ir.Model) -> None:
    ops = [node.op_type for node in demo_model.graph]
    assert ops.count("BatchNormalization") >= 5
    assert ops.count("Add") >= 3
    assert demo_model.ir_version <= 10
    assert demo_model.metadata_props["onnxcompress.dataset"] == "digits"
    expected = Preprocess(scale=1 / 16, mean=(0.5,), std=(0.5,)).to_metadata()
    assert {key: demo_model.metadata_props.get(key) for key in expected} == expected
    read = Preprocess.from_metadata(demo_model.metadata_props)
    assert read is not None and (read.mean, read.std) == ((0.5,), (0.5,))


def test_demo_model_is_unchanged_by_canonicalization(demo_model: ir.Model) -> None:
    from onnxcompress.graph.canonicalize import canonicalize
    from onnxcompress.graph.model_io import clone_model

    folded = clone_model(demo_model)
    canonicalize(folded)
    assert not any(node.op_type == "BatchNormalization" for node in folded.graph)
    x = dataset_for_model(demo_model, "digits[1400:1464]").x
    deviation = output_deviation(demo_model, folded, x)
    assert deviation.max_rel < 1e-4
    assert deviation.top1_agreement == 100.0
