"""The ``quantize`` step: ONNX Runtime's static int8 quantization (QDQ) as the last step of a run.

Numerical checks run in ONNX Runtime: the quantized model stays within an explicit budget of
the float model's outputs (int8 is lossy), and the negative checks show the step refuses what
it must (a quantized model, a model with two inputs, bad options, no data).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from channel_models import Net

from onnxcompress.cli import main
from onnxcompress.errors import PassConfigError
from onnxcompress.graph.canonicalize import canonicalize
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import clone_model
from onnxcompress.passes import create_pass
from onnxcompress.passes.base import PassContext

ROOT = Path(__file__).resolve().parent.parent
DEMO_MODEL = ROOT / "models" / "digits_resnet.onnx"


def small_cnn(batch: int | str = "N") -> ir.Model:
    """conv-relu-conv-relu-gap-flatten-gemm on 3×12×12 images."""
    net = Net(3)
    x = net.input("x", [batch, 3, 12, 12])
    h = net.relu(net.conv(x, 3, 32))
    h = net.relu(net.conv(h, 32, 64))
    model = net.build([net.head(h, 64, 5)])
    canonicalize(model)
    return model


def images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, 12, 12)).astype(np.float32)


def outputs(model: ir.Model, x: np.ndarray) -> np.ndarray:
    proto = ir.serde.serialize_model(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    rows = []
    batch = session.get_inputs()[0].shape[0]
    step = batch if isinstance(batch, int) else len(x)
    for i in range(0, len(x), step):
        rows.append(np.asarray(session.run(None, {"x": x[i : i + step]})[0]))
    return np.concatenate(rows)


def quantized(model: ir.Model, x: np.ndarray, **options: object) -> tuple[ir.Model, object]:
    step = create_pass("quantize", dict(options), PassContext(calibration=x))
    result = clone_model(model)
    step(result)
    return result, step.report


def op_count(model: ir.Model, op_type: str) -> int:
    return sum(1 for node in model.graph.all_nodes() if node.op_type == op_type)


def test_the_quantized_model_stores_int8_weights_and_stays_close_to_the_float_one() -> None:
    model = small_cnn()
    calibration, held_out = images(64), images(32, seed=1)
    result, report = quantized(model, calibration)

    # Every Conv and the Gemm read an int8 weight through a DequantizeLinear.
    assert report.summary["int8_weights"] == 3
    assert op_count(result, "QuantizeLinear") >= 3
    assert report.modified and report.notes and "int8 QDQ" in report.notes[0]
    assert report.summary["calibration_samples"] == 64
    # MACs are the float model's; the stored parameters count once (plus scales and zero
    # points); the file is about a quarter of the float one.
    assert model_metrics(result).macs == model_metrics(model).macs
    params_before, params_after = model_metrics(model).params, model_metrics(result).params
    assert params_before <= params_after <= 1.05 * params_before
    size_before = ir.serde.serialize_model(model).ByteSize()
    size_after = ir.serde.serialize_model(result).ByteSize()
    assert size_after < 0.5 * size_before
    # Lossy within a budget: on held-out inputs the outputs move by at most 5% of their range
    # (int8 steps are 1/255 of each range; a few layers add up).
    reference, got = outputs(model, held_out), outputs(result, held_out)
    scale = float(np.abs(reference).max())
    assert float(np.abs(got - reference).max()) <= 0.05 * scale
    assert float(np.mean(np.argmax(got, 1) == np.argmax(reference, 1))) >= 0.9


def weight_scale_sizes(model: ir.Model) -> list[int]:
    """The size of each int8 weight's scale (1: one per tensor)."""
    sizes = []
    for node in model.graph.all_nodes():
        stored = node.inputs[0] if node.op_type == "DequantizeLinear" else None
        if stored is not None and stored.is_initializer() and stored.dtype == ir.DataType.INT8:
            scale = node.inputs[1]
            assert scale is not None and scale.const_value is not None
            sizes.append(int(scale.const_value.numpy().size))
    return sizes


def test_weights_get_one_scale_per_output_channel_unless_asked_per_tensor() -> None:
    """Compensation folds scaled copies of removed filters into kept ones and spreads their
    ranges; per-channel scales (the default) keep each filter's own."""
    model, calibration = small_cnn(), images(16)
    per_channel, _ = quantized(model, calibration)
    per_tensor, _ = quantized(model, calibration, per_channel=False)
    assert sorted(weight_scale_sizes(per_channel)) == [5, 32, 64]  # the Gemm's rows: 5 classes
    assert weight_scale_sizes(per_tensor) == [1, 1, 1]


def test_a_fixed_batch_size_is_fed_batches_of_that_size() -> None:
    model = small_cnn(batch=1)
    result, report = quantized(model, images(10), batch=4)
    assert report.summary["calibration_samples"] == 10
    assert op_count(result, "QuantizeLinear") >= 3
    held_out = images(4, seed=2)
    assert np.argmax(outputs(result, held_out), 1).shape == (4,)


def test_an_already_quantized_model_is_left_alone_and_says_why() -> None:
    once, _ = quantized(small_cnn(), images(32))
    again, report = quantized(once, images(32))
    assert not report.modified
    assert report.unchanged is not None and "quantized already" in report.unchanged
    assert op_count(again, "QuantizeLinear") == op_count(once, "QuantizeLinear")
    assert report.warnings == [f"quantize left the model unchanged: {report.unchanged}"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"activations": "fp8"}, "activations='fp8'"),
        ({"calibrate": "median"}, "calibrate='median'"),
        ({"samples": "0"}, "samples=0"),
        ({"per_channel": "maybe"}, "per_channel"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, str], fragment: str) -> None:
    with pytest.raises(PassConfigError, match=fragment):
        create_pass("quantize", options, PassContext(calibration=images(4)))


def test_without_data_it_asks_for_data() -> None:
    step = create_pass("quantize", {}, PassContext())
    with pytest.raises(PassConfigError, match="--data"):
        step(clone_model(small_cnn()))


def test_a_model_with_two_inputs_is_refused_by_name() -> None:
    net = Net(4)
    a = net.input("a", ["N", 3, 8, 8])
    b = net.input("b", ["N", 3, 8, 8])
    h = net.relu(net.conv(net.op("Add", [a, b]), 3, 8))
    model = net.build([net.head(h, 8, 5)])
    step = create_pass("quantize", {}, PassContext(calibration=images(4)[:, :, :8, :8]))
    with pytest.raises(PassConfigError, match="one input; this one has 2"):
        step(model)


def test_prune_then_quantize_from_the_command_line(tmp_path: Path, capsys) -> None:
    """The recipe end to end: lrf with compensation, then quantize; top-1 after every step."""
    if not DEMO_MODEL.exists():
        pytest.skip("models/digits_resnet.onnx has not been trained yet")
    output, report = tmp_path / "int8.onnx", tmp_path / "report"
    code = main(
        [
            "compress", str(DEMO_MODEL), "-o", str(output), "--data", "digits",
            "--val", "digits", "--pass", "lrf:target_macs=0.7", "--pass", "quantize",
            "--report", str(report), "--report-batches", "1",
        ]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "int8 QDQ" in out + err
    result = json.loads((report / "report.json").read_text())
    steps = [record["name"] for record in result["steps"]]
    assert steps == ["canonicalize", "lrf", "quantize"]
    top1 = [record["metrics"]["accuracy"]["top1"] for record in result["steps"]]
    macs = [record["metrics"]["macs"] for record in result["steps"]]
    # Quantizing keeps the pruned MACs and costs at most 2 points of top-1 on digits.
    assert macs[2] == macs[1] < 0.75 * macs[0]
    assert top1[2] >= top1[1] - 2.0
    written = ir.load(output)
    assert op_count(written, "QuantizeLinear") > 0
    assert output.stat().st_size < 0.5 * DEMO_MODEL.stat().st_size


def test_a_training_step_after_quantize_is_a_user_error(tmp_path: Path, capsys) -> None:
    if not DEMO_MODEL.exists():
        pytest.skip("models/digits_resnet.onnx has not been trained yet")
    code = main(
        [
            "compress", str(DEMO_MODEL), "-o", str(tmp_path / "out.onnx"), "--data", "digits",
            "--pass", "quantize", "--finetune", "epochs=1",
        ]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err
    assert "quantize" in lines[0]
    assert not (tmp_path / "out.onnx").exists()


def test_a_met_budget_skips_later_passes_but_not_the_quantize_step(tmp_path: Path, capsys) -> None:
    """Once every budget target is met, later compression steps are skipped; quantizing is how
    the model is stored, so it still runs (and the provenance lists the steps that ran)."""
    if not DEMO_MODEL.exists():
        pytest.skip("models/digits_resnet.onnx has not been trained yet")
    output, report = tmp_path / "int8.onnx", tmp_path / "report"
    code = main(
        [
            "compress", str(DEMO_MODEL), "-o", str(output), "--data", "digits",
            "--target-macs", "0.75", "--pass", "lrf:target_macs=0.7", "--pass",
            "merge:target_macs=0.9", "--pass", "quantize", "--report", str(report),
            "--report-batches", "1",
        ]
    )  # fmt: skip
    _, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads((report / "report.json").read_text())
    assert [record["name"] for record in result["steps"]] == ["canonicalize", "lrf", "quantize"]
    assert "later steps skipped but quantize" in result["stopped"]
    assert result["kept_step"] == 2
    written = ir.load(output)
    assert op_count(written, "QuantizeLinear") > 0
    recipe = json.loads(written.metadata_props["onnxcompress.recipe"])
    assert "merge" not in json.dumps(recipe)
