"""The pipeline: passes in order, verification after each, provenance, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from onnxcompress.errors import PassConfigError, VerificationError
from onnxcompress.graph.metrics import model_metrics
from onnxcompress.graph.model_io import load_model
from onnxcompress.pipeline.run import compress, sha256_of
from onnxcompress.runtime.evaluate import accuracy, dataset_for_model

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "models" / "digits_resnet.onnx"


def test_lrf_on_the_demo_model(tmp_path: Path) -> None:
    out = tmp_path / "small.onnx"
    source_bytes = DEMO.read_bytes()
    result = compress(
        DEMO,
        out,
        [("lrf", {"target_macs": 0.5, "criterion": "activations"})],
        data="digits[:1400]",
        eval_data="digits[1400:]",
    )
    assert DEMO.read_bytes() == source_bytes
    assert [step.name for step in result.steps] == ["canonicalize", "lrf"]
    # canonicalization is lossless; every step was verified against the original
    assert result.steps[0].verification["deviation"]["max_rel"] < 1e-4
    assert result.steps[1].verification["checker_ok"] and result.steps[1].verification["session_ok"]
    written = load_model(out)
    metrics = model_metrics(written)
    assert metrics.macs == result.after["macs"]
    assert metrics.params == result.after["params"]
    assert 0.48 <= metrics.macs / result.before["macs"] <= 0.52
    # the reported accuracy is what `eval` measures on the written file
    measured = accuracy(written, dataset_for_model(written, "digits[1400:]"))
    assert result.accuracy_after is not None and result.accuracy_before is not None
    assert measured.top1 == pytest.approx(result.accuracy_after["top1"])
    assert result.accuracy_after["top1"] >= result.accuracy_before["top1"] - 3.0
    props = written.metadata_props
    assert props["onnxcompress.source_sha256"] == sha256_of(DEMO)
    assert json.loads(props["onnxcompress.recipe"])[1]["pass"] == "lrf"
    # the user's preprocessing metadata survives, so `eval` needs no flags on the output
    assert props["onnxcompress.preprocess.mean"] == DEMO_MEAN


DEMO_MEAN = load_model(DEMO).metadata_props["onnxcompress.preprocess.mean"]


def test_options_are_validated_before_any_work(tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    with pytest.raises(PassConfigError, match="target_macs"):
        compress(DEMO, out, [("canonicalize", {}), ("lrf", {"target_macs": "2"})])
    assert not out.exists()


def test_a_step_producing_an_invalid_model_stops_the_run(tmp_path: Path, monkeypatch) -> None:
    from onnxcompress.passes.canonical import Canonicalize

    def corrupt(self, model, report):
        node = next(iter(model.graph))
        node.op_type = "NoSuchOp"  # the checker and ORT will refuse this
        report.modified = True

    monkeypatch.setattr(Canonicalize, "run", corrupt)
    out = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match="canonicalize"):
        compress(DEMO, out, [])
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
