"""PassContext's data: one rule for every role (the spec's dataset, else the calibration batch),
and each dataset loaded once per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxcompress.data import Dataset
from onnxcompress.errors import DataError
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.passes.base import PassContext
from onnxcompress.pipeline.run import compress

DEMO = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The specs PassContext.load was asked for, in order (each call is one real load)."""
    real_load = PassContext.load
    calls: list[str | None] = []

    def load(model: ir.Model, spec: str | None) -> Dataset | None:
        calls.append(spec)
        return real_load(model, spec)

    monkeypatch.setattr(PassContext, "load", staticmethod(load))
    return calls


def _calibrated(**specs: str | None) -> PassContext:
    x = np.random.default_rng(0).standard_normal((8, 1, 8, 8)).astype(np.float32)
    return PassContext(calibration=x, calibration_labels=np.arange(8) % 10, **specs)


def test_a_role_with_a_spec_gets_its_dataset_loaded_once(loads: list[str | None]) -> None:
    model = load_model(DEMO)
    context = _calibrated(train_spec="digits[:64]", validation_spec="digits[64:96]")
    train = context.train_set(model)
    assert len(train) == 64 and train.name.startswith("digits")
    # Later steps (which receive copies of the model) and a second lookup do not load again.
    assert context.train_set(clone_model(model)) is train
    assert context.train_set(model, fallback=None) is train
    val = context.validation_set(model)
    assert len(val) == 32
    assert context.validation_set(model) is val
    assert loads == ["digits[:64]", "digits[64:96]"]


def test_roles_naming_one_spec_share_one_load(loads: list[str | None]) -> None:
    model = load_model(DEMO)
    context = _calibrated(train_spec="digits[:64]", validation_spec="digits[:64]")
    assert context.train_set(model) is context.validation_set(model)
    assert loads == ["digits[:64]"]


def test_a_model_preprocessed_differently_loads_its_own_copy(loads: list[str | None]) -> None:
    model = load_model(DEMO)
    other = clone_model(model)
    other.metadata_props["onnxcompress.preprocess.mean"] = "0.0"
    context = PassContext(train_spec="digits[:16]")
    first, second = context.train_set(model, fallback=None), context.train_set(other, fallback=None)
    assert first is not None and second is not None
    assert not np.array_equal(first.x, second.x)
    assert loads == ["digits[:16]", "digits[:16]"]


def test_without_a_spec_the_calibration_batch_stands_in(loads: list[str | None]) -> None:
    model = load_model(DEMO)
    context = _calibrated()
    train, val = context.train_set(model), context.validation_set(model)
    assert context.calibration is not None
    np.testing.assert_array_equal(train.x, context.calibration)
    np.testing.assert_array_equal(train.y, context.calibration_labels)
    assert train.name == "calibration data"
    # One object for both roles, as ``train = val = calibration`` gave.
    assert val is train
    named = context.validation_set(model, fallback="calibration batch")
    assert named.name == "calibration batch"
    # A caller that must not use the calibration batch gets nothing.
    assert context.train_set(model, fallback=None) is None
    assert context.validation_set(model, fallback=None) is None
    # A missing spec is looked up once too (the lookup is what a time budget is charged for).
    assert loads == [None]


def test_a_new_calibration_batch_replaces_the_stand_in() -> None:
    model = load_model(DEMO)
    context = _calibrated()
    before = context.train_set(model)
    assert context.calibration is not None and context.calibration_labels is not None
    context.calibration = context.calibration[:4]
    context.calibration_labels = context.calibration_labels[:4]
    after = context.train_set(model)
    assert after is not before and len(after) == 4


def test_an_empty_spec_is_an_error_unless_the_caller_counts_it_as_none() -> None:
    model = load_model(DEMO)
    context = _calibrated(train_spec="", validation_spec="")
    with pytest.raises(DataError, match="data spec is empty"):
        context.train_set(model)
    with pytest.raises(DataError, match="data spec is empty"):
        context.validation_set(model, fallback=None)
    stand_in = context.train_set(model, fallback="calibration batch", blank_is_none=True)
    assert stand_in.name == "calibration batch"
    assert context.validation_set(model, fallback=None, blank_is_none=True) is None


def test_a_run_loads_each_dataset_once(tmp_path: Path, loads: list[str | None]) -> None:
    """Calibration, validation and the finetune steps' training data (the calibration spec
    here) come from one load each, however many steps use them."""
    result = compress(
        DEMO,
        None,
        [("finetune", {"epochs": 1, "epoch_samples": 32}), ("finetune", {"epochs": 1})],
        data="digits[:64]",
        eval_data="digits[1400:1432]",
        calibration_size=16,
    )
    assert [step.name for step in result.steps] == ["canonicalize", "finetune", "finetune"]
    assert loads == ["digits[:64]", "digits[1400:1432]"]


def test_passes_get_the_training_data_without_calibration_data(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--train-data`` alone reaches the passes too: a pass that trains without calibration
    data (cheapconv's data-free init) must not skip its training silently."""
    from onnxcompress.passes.lrf import LinearlyReplaceableFilters

    seen: list[str | None] = []

    def record(self, model: ir.Model, report) -> None:
        seen.append(self.context.train_spec)

    monkeypatch.setattr(LinearlyReplaceableFilters, "run", record)
    compress(DEMO, None, [("lrf", {"criterion": "weights"})], train_data="digits[:32]")
    assert seen == ["digits[:32]"]
