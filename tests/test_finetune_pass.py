"""``finetune`` as a registered pass: its options, what it trains against, and the time budget of
its step in a run (it starts before the training data loads and keeps back the pipeline's checks).

The training itself (``torch_bridge.train.finetune``) is replaced by a recorder here; its own
tests are in test_train.py, and test_report.py runs a real finetune step end to end.
"""

from __future__ import annotations

import dataclasses
import time
import types
from pathlib import Path
from typing import Any

import onnx_ir as ir
import pytest

from onnxcompress.data import Dataset
from onnxcompress.errors import PassConfigError
from onnxcompress.graph.model_io import clone_model, load_model
from onnxcompress.passes import REGISTRY, create_pass, pass_class
from onnxcompress.passes.base import PassContext
from onnxcompress.passes.finetune import Finetune, FinetuneOptions
from onnxcompress.pipeline.run import compress
from onnxcompress.torch_bridge import train as train_module
from onnxcompress.torch_bridge.finetune_config import FinetuneConfig

DEMO = Path(__file__).resolve().parent.parent / "models" / "digits_resnet.onnx"


@dataclasses.dataclass
class Call:
    """One call of the training, as the pass made it."""

    student: ir.Model
    teacher: Any
    train: Dataset
    val: Dataset | None
    config: FinetuneConfig
    deadline: Any


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[Call]:
    """Training replaced by a recorder that hands back a copy of the student, untrained."""
    recorded: list[Call] = []

    def finetune(student, teacher, train, val, config, progress=True, deadline=None):
        recorded.append(Call(student, teacher, train, val, config, deadline))
        trained = clone_model(student)
        return types.SimpleNamespace(model=trained, as_dict=lambda: {"history": [], "fake": 1})

    monkeypatch.setattr(train_module, "finetune", finetune)
    return recorded


def test_finetune_is_a_registered_pass_that_joins_the_stage_before_it() -> None:
    assert "finetune" in REGISTRY
    cls = pass_class("finetune")
    assert cls is Finetune and cls.config_class is FinetuneOptions
    assert cls.joins_previous_stage and not cls.compresses
    # It trains: never among the data-free passes test_properties.py runs on random graphs.
    assert cls.needs_training_data and cls.needs_data
    assert not any(pass_class(name).joins_previous_stage for name in REGISTRY if name != "finetune")


def test_its_options_are_finetune_configs_plus_teacher_and_select() -> None:
    training = [f.name for f in dataclasses.fields(FinetuneConfig)]
    assert [f.name for f in dataclasses.fields(FinetuneOptions)] == [*training, "teacher", "select"]
    options = create_pass("finetune", {"epochs": "2", "lr": "0.005"}).cfg
    assert isinstance(options, FinetuneOptions)
    config = options.training_config(run_seed=7)
    assert type(config) is FinetuneConfig
    assert (config.epochs, config.lr, config.seed) == (2, 0.005, 7)
    assert create_pass("finetune", {"seed": 3}).cfg.training_config(run_seed=7).seed == 3


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"teacher": "mine.onnx"}, ["finetune teacher = 'mine.onnx': use \"original\""]),
        ({"select": "best"}, ["finetune select = 'best'", '"last"']),
        ({"epochs": 0}, ["finetune: epochs=0 must be at least 1"]),
        ({"bogus": 1}, ["has no option 'bogus'", "teacher", "select"]),
    ],
)
def test_bad_options_are_refused(options: dict[str, Any], words: list[str]) -> None:
    with pytest.raises(PassConfigError) as caught:
        create_pass("finetune", options)
    for word in words:
        assert word in str(caught.value)


def test_the_pass_trains_on_the_context_data_and_keeps_the_model_object(
    calls: list[Call],
) -> None:
    original = load_model(DEMO)
    model = clone_model(original)
    context = PassContext(
        train_spec="digits[:32]", validation_spec="digits[1400:1416]", original=original, seed=5
    )
    step = create_pass("finetune", {"epochs": 1, "select": "validation"}, context)
    result = step(model)
    assert result.model is model and result.modified
    (call,) = calls
    assert call.student is model and call.teacher is original
    assert call.train is context.train_set(original, fallback=None)
    assert call.val is context.validation_set(original, fallback=None)
    assert call.config.seed == 5 and not call.deadline.limited
    report = step.report.as_dict()
    assert report["summary"] == {"history": [], "fake": 1}
    assert "teacher" not in report["options"] and None not in report["options"].values()

    create_pass("finetune", {"teacher": "none"}, context)(model)
    assert calls[1].teacher is None and calls[1].val is None  # select defaults to the last epoch


def test_without_training_data_the_pass_says_what_to_give() -> None:
    with pytest.raises(PassConfigError, match="needs training data: give --train-data"):
        create_pass("finetune", {})(load_model(DEMO))


def test_a_run_with_a_finetune_step_and_no_data_is_refused_before_any_work(tmp_path) -> None:
    out = tmp_path / "x.onnx"
    with pytest.raises(PassConfigError, match="a finetune step needs training data"):
        compress(DEMO, out, [("finetune", {"epochs": 1})])
    assert not out.exists()


LOAD_SECONDS = 0.2


def test_the_step_budget_starts_before_its_data_loads_and_keeps_back_the_checks(
    calls: list[Call], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A finetune step's time budget (issue 17) counts the training data's load, and the
    pipeline's own checks after the step are kept back from it: the whole step keeps it."""
    real_load = PassContext.load
    loads: list[tuple[str | None, float]] = []

    def slow_load(model: ir.Model, spec: str | None) -> Dataset | None:
        loads.append((spec, time.monotonic()))
        if spec == "digits[:64]":
            time.sleep(LOAD_SECONDS)  # the training data takes a while to read
        return real_load(model, spec)

    contexts: list[PassContext] = []
    real_call = Finetune.call

    def spy(self: Finetune, model: ir.Model):
        contexts.append(self.context)
        return real_call(self, model)

    monkeypatch.setattr(PassContext, "load", staticmethod(slow_load))
    monkeypatch.setattr(Finetune, "call", spy)
    lines: list[str] = []
    budget = 60.0
    compress(
        DEMO,
        None,
        [("lrf", {"target_macs": 0.8}), ("finetune", {"epochs": 1, "time_budget_s": budget})],
        train_data="digits[:64]",
        eval_data="digits[1400:1432]",
        log=lines.append,
    )
    (call,) = calls
    (context,) = contexts
    (train_load,) = [at for spec, at in loads if spec == "digits[:64]"]
    assert context.step_started is not None and context.step_started <= train_load
    assert context.checks_seconds > 0
    deadline = call.deadline
    assert deadline.label == "finetune" and deadline.started >= train_load + LOAD_SECONDS
    expected_end = context.step_started + budget - context.checks_seconds
    # Microseconds pass between reading the time left and starting the share; the load's
    # 0.2 s would show.
    assert deadline.end == pytest.approx(expected_end, abs=0.01)
    # The data is announced before the step's own line, as the step loads it first.
    training = lines.index("training data: 64 samples from digits[:64]")
    assert lines[training + 1] == "running finetune epochs=1,time_budget_s=60.0"
