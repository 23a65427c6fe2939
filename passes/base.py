"""What every compression pass shares: its config, context, report, and option parsing.

A pass is an ``onnx_ir`` in-place pass (``call(model) -> PassResult``) with a validated config
dataclass. It records what it did per layer, and every node it declined with the reason, in a
``PassReport`` the pipeline turns into the user's report.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import typing
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar, overload

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import InPlacePass, PassResult

from onnxcompress.errors import PassConfigError

if TYPE_CHECKING:
    from onnxcompress.data import Dataset
    from onnxcompress.graph.metrics import ModelMetrics
    from onnxcompress.runtime.latency_table import LatencyTarget

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Declined:
    """A node (or channel group) a pass left alone, and why."""

    node: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"node": self.node, "reason": self.reason}


@dataclasses.dataclass
class TargetOutcome:
    """How far a pass got towards one target it was given (``target_macs=0.5``...).

    Attributes:
        option: the option that set the target.
        goal: the value asked for.
        reached: the value the result has, on the same scale (None when nothing was measured).
        met: within the target's tolerance (on both sides: overshooting a size target spends
            accuracy the user did not agree to spend).
        reason: why it was missed; empty when met.
    """

    option: str
    goal: float
    reached: float | None
    met: bool
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def warning(self, pass_name: str) -> str:
        reached = "nothing" if self.reached is None else f"{self.reached:.4g}"
        return f"{pass_name} missed {self.option}={self.goal:g} (reached {reached}): {self.reason}"


@dataclasses.dataclass
class PassReport:
    """What a pass did, in data the report can print."""

    name: str
    options: dict[str, Any]
    modified: bool = False
    layers: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    declined: list[Declined] = dataclasses.field(default_factory=list)
    summary: dict[str, Any] = dataclasses.field(default_factory=dict)
    seconds: float = 0.0
    # Lines the console prints after the step: what a user must know without opening the report.
    notes: list[str] = dataclasses.field(default_factory=list)
    targets: list[TargetOutcome] = dataclasses.field(default_factory=list)
    # Why the pass left the model as it was (set by CompressionPass.call when run changed nothing).
    unchanged: str | None = None
    # Initializers the pass left that nothing reads, removed after it (``CompressionPass.ensures``).
    leftover_initializers: list[str] = dataclasses.field(default_factory=list)

    def decline(self, node: str, reason: str) -> None:
        logger.info("%s: leaving %s alone: %s", self.name, node, reason)
        self.declined.append(Declined(node, reason))

    def check_target(
        self,
        option: str,
        goal: float,
        reached: float | None,
        *,
        tolerance: float = 0.0,
        met: bool | None = None,
        reason: str = "",
    ) -> TargetOutcome:
        """Record how the result stands against ``option=goal``.

        ``met`` defaults to ``|reached - goal| <= tolerance``; ``reason`` explains a miss (a
        generic one is written when the pass gives none).
        """
        if met is None:
            met = reached is not None and abs(reached - goal) <= tolerance + 1e-12
        if not met and not reason:
            if reached is None:
                reason = "nothing was measured"
            elif reached > goal:
                reason = f"short of the target by more than the tolerance {tolerance:g}"
            else:
                reason = f"overshot the target by more than the tolerance {tolerance:g}"
        outcome = TargetOutcome(option, float(goal), reached, bool(met), "" if met else reason)
        self.targets = [t for t in self.targets if t.option != option] + [outcome]
        return outcome

    @property
    def warnings(self) -> list[str]:
        """One line per missed target, or why the model came back unchanged."""
        lines = [t.warning(self.name) for t in self.targets if not t.met]
        if self.unchanged is not None and not lines:
            lines.append(f"{self.name} left the model unchanged: {self.unchanged}")
        return lines

    @property
    def targets_met(self) -> bool:
        return all(t.met for t in self.targets)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": _jsonable(self.options),
            "modified": self.modified,
            "layers": _jsonable(self.layers),
            "declined": [d.as_dict() for d in self.declined],
            "summary": _jsonable(self.summary),
            "seconds": round(self.seconds, 4),
            "notes": list(self.notes),
            "targets": [t.as_dict() for t in self.targets],
            "targets_met": self.targets_met,
            "warnings": self.warnings,
            "leftover_initializers": list(self.leftover_initializers),
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


@dataclasses.dataclass
class PassContext:
    """What the pipeline hands a pass besides the model.

    Attributes:
        calibration: input batch for the model's first input (preprocessed, NCHW), used by
            passes that fit on activations. None when the user gave no data.
        calibration_labels: labels of that batch, when known.
        train_spec / validation_spec: the specs of the run's training and validation data;
            passes read the datasets through ``train_set`` and ``validation_set``.
        seed: for every random choice a pass makes.
        progress: whether long steps may draw progress bars.
        loaded: the datasets loaded so far in this run, by spec and by the preprocessing a
            model asks for (see ``dataset``); contexts of one run may share it.
        original: the model the run started from: the teacher of steps that distill from it.
        calibration_spec: the spec the calibration batch was drawn from (its name as data).
        checks_seconds: what the pipeline spends on its own checks after a step (verification,
            accuracy); a step with a time budget keeps it back, so the whole step keeps it.
        step_started: ``time.monotonic()`` when the pipeline began the current step, before it
            loaded the step's training data: a step's time budget counts from then (None: from
            the pass's own start).
        latency: where latency is priced and measured (provider, threads, batch), for passes
            that price channels by latency (None: the CPU defaults, batch 1).

    The data rule, the same for every role (``train_set``, ``validation_set``): a role's data
    is the dataset its spec names, loaded on first use (inside the step that first asks, so
    that step's time budget pays for it) and cached for the rest of the run. Without a spec,
    the calibration batch stands in, under the name the caller gives as ``fallback``; a caller
    that must not train or validate on the calibration batch passes ``fallback=None`` and gets
    None.
    """

    calibration: np.ndarray | None = None
    calibration_labels: np.ndarray | None = None
    train_spec: str | None = None
    validation_spec: str | None = None
    seed: int = 0
    progress: bool = False
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    loaded: dict[tuple[str | None, str], Dataset | None] = dataclasses.field(
        default_factory=dict, repr=False, compare=False
    )
    original: ir.Model | None = dataclasses.field(default=None, repr=False, compare=False)
    calibration_spec: str | None = None
    checks_seconds: float = 0.0
    step_started: float | None = None
    latency: LatencyTarget | None = None
    # The calibration batch standing in for a role, by name, with the arrays it wraps.
    _stand_ins: dict[str, tuple[Any, Any, Dataset]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def calibration_set(self, name: str = "calibration data") -> Dataset:
        """The calibration batch (and its labels, when known) as a Dataset."""
        from onnxcompress.data import Dataset

        assert self.calibration is not None
        return Dataset(
            np.ascontiguousarray(self.calibration, dtype=np.float32),
            self.calibration_labels,
            name,
        )

    @overload
    def train_set(
        self, model: ir.Model, *, fallback: str = ..., blank_is_none: bool = ...
    ) -> Dataset: ...

    @overload
    def train_set(
        self, model: ir.Model, *, fallback: None, blank_is_none: bool = ...
    ) -> Dataset | None: ...

    def train_set(
        self,
        model: ir.Model,
        *,
        fallback: str | None = "calibration data",
        blank_is_none: bool = False,
    ) -> Dataset | None:
        """The training data for ``model``, by the class's data rule.

        Args:
            fallback: the name the calibration batch takes when it stands in for a missing
                spec; None: nothing stands in.
            blank_is_none: an empty spec counts as none (else it is an error, as any bad spec).
        """
        return self._role_set(model, self.train_spec, fallback, blank_is_none)

    @overload
    def validation_set(
        self, model: ir.Model, *, fallback: str = ..., blank_is_none: bool = ...
    ) -> Dataset: ...

    @overload
    def validation_set(
        self, model: ir.Model, *, fallback: None, blank_is_none: bool = ...
    ) -> Dataset | None: ...

    def validation_set(
        self,
        model: ir.Model,
        *,
        fallback: str | None = "calibration data",
        blank_is_none: bool = False,
    ) -> Dataset | None:
        """The validation data for ``model``, by the class's data rule (arguments as in
        ``train_set``)."""
        return self._role_set(model, self.validation_spec, fallback, blank_is_none)

    def _role_set(
        self, model: ir.Model, spec: str | None, fallback: str | None, blank_is_none: bool
    ) -> Dataset | None:
        dataset = self.dataset(model, None if blank_is_none and not spec else spec)
        if dataset is None and fallback is not None:
            # Both roles get one object, as when a pass wrote ``train = val = calibration``:
            # code that asks ``probe is val`` (minimum_work) answers as it did.
            source, labels, stand_in = self._stand_ins.get(fallback, (None, None, None))
            current = source is self.calibration and labels is self.calibration_labels
            if stand_in is None or not current:
                stand_in = self.calibration_set(fallback)
                self._stand_ins[fallback] = (self.calibration, self.calibration_labels, stand_in)
            return stand_in
        return dataset

    def dataset(self, model: ir.Model, spec: str | None) -> Dataset | None:
        """The dataset ``spec`` names, preprocessed for ``model``: loaded (``load``) on the
        first call for that spec and preprocessing, from ``loaded`` after."""
        key = (spec, _preprocessing_key(model))
        if key not in self.loaded:
            self.loaded[key] = self.load(model, spec)
        return self.loaded[key]

    @staticmethod
    def load(model: ir.Model, spec: str | None) -> Dataset | None:
        """The dataset ``spec`` names, preprocessed for ``model``; None without a spec.

        Loads every time it is called: read data through ``dataset`` or the role methods,
        which load once per run.
        """
        if spec is None:
            return None
        from onnxcompress.runtime.evaluate import dataset_for_model

        return dataset_for_model(model, spec)


def _preprocessing_key(model: ir.Model) -> str:
    """What the preprocessing of a dataset for ``model`` depends on (``dataset_for_model``): the
    model's preprocessing metadata and its first real input's shape. Passes keep both, so every
    step of a run shares one load of each spec."""
    from onnxcompress.data import METADATA_PREFIX

    metadata = sorted(
        (key, value)
        for key, value in model.metadata_props.items()
        if key.startswith(METADATA_PREFIX)
    )
    inputs = [value for value in model.graph.inputs if not value.is_initializer()]
    shape = None if not inputs or inputs[0].shape is None else str(inputs[0].shape)
    return repr((metadata, shape))


@dataclasses.dataclass
class PassConfig:
    """Base of every pass config; subclasses add fields and validate in ``validate``."""

    def validate(self) -> None:
        """Raise PassConfigError for an out-of-range value."""

    def __post_init__(self) -> None:
        self.validate()


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class CompressionPass(InPlacePass, Generic[ConfigT]):
    """Base class: subclasses set ``name``, ``config_class`` and implement ``run``.

    A subclass names its config type (``CompressionPass[LrfConfig]``) and reads its options
    as ``self.cfg``, typed.
    """

    name: ClassVar[str] = ""
    summary_line: ClassVar[str] = ""
    config_class: ClassVar[type[PassConfig]] = PassConfig
    needs_data: ClassVar[bool] = False
    # Options that say how much the pass removes. A step given one of them keeps it; otherwise
    # the pipeline hands it the run's budget through ``budget_targets``.
    budget_options: ClassVar[tuple[str, ...]] = ()
    # Whether the pass exists to change the model (a compression pass that changes nothing
    # says why on the console); canonicalization may rightly find nothing to do.
    compresses: ClassVar[bool] = True
    # Trains on the run's training data (``--train-data``, else ``--data``): the pipeline
    # refuses a run without any before it starts, and loads it at the start of the step.
    needs_training_data: ClassVar[bool] = False
    # Leaves an integer (QDQ) model the torch bridge cannot train: no training step may follow.
    quantizes: ClassVar[bool] = False
    # Refines what the step before it made (finetune): the two are one stage, and the budget
    # is checked at the end of the stage, not between them.
    joins_previous_stage: ClassVar[bool] = False

    @classmethod
    def budget_targets(cls, options: Mapping[str, Any]) -> tuple[str, ...]:
        """The run budget's targets (``target_macs``, ``target_params``, ``target_latency``) this
        step can aim at, given its options; the pipeline injects the first one the budget sets."""
        targets = ("target_macs", "target_params", "target_latency")
        return tuple(t for t in targets if t in cls.budget_options)

    def __init__(self, config: PassConfig | None = None, context: PassContext | None = None):
        super().__init__()
        self.config = config if config is not None else self.config_class()
        self.context = context if context is not None else PassContext()
        self.report = PassReport(self.name, dataclasses.asdict(self.config))

    @property
    def cfg(self) -> ConfigT:
        """The config, as the subclass's own config type."""
        if not isinstance(self.config, self.config_class):
            raise PassConfigError(
                f"pass {self.name!r} got a {type(self.config).__name__} config, "
                f"not a {self.config_class.__name__}"
            )
        return typing.cast(ConfigT, self.config)

    def call(self, model: ir.Model) -> PassResult:
        if self.needs_data and self.context.calibration is None:
            raise PassConfigError(
                f"pass {self.name!r} needs data: give --data SPEC (e.g. --data digits)"
            )
        start = time.perf_counter()
        self.report = PassReport(self.name, dataclasses.asdict(self.config))
        expanded = expand_compact_weights(model, self.report, f"pass {self.name!r}")
        before = self._metrics(model)
        self.run(model, self.report)
        after = self._metrics(model) if before is not None else None
        if before is not None and after is not None:
            self.check_targets(before, after, self.report)
        if self.compresses and not self.report.modified:
            self.report.unchanged = unchanged_reason(self.report)
        self.report.modified = self.report.modified or expanded
        self.report.seconds = time.perf_counter() - start
        return PassResult(model, modified=self.report.modified)

    def run(self, model: ir.Model, report: PassReport) -> None:
        raise NotImplementedError

    def ensures(self, model: ir.Model) -> None:
        """After every pass: no initializer is left that nothing reads.

        ONNX Runtime prints a warning for each one whenever it loads the model. A leftover is a
        bug in the pass: the model is cleaned, and the console and the report say so.
        """
        from onnxcompress.graph.edits import drop_unused_initializers, unused_initializers

        leftovers = unused_initializers(model.graph)
        if not leftovers:
            return
        drop_unused_initializers(model.graph)
        self.report.leftover_initializers = leftovers
        shown = ", ".join(leftovers[:3]) + (", ..." if len(leftovers) > 3 else "")
        self.report.notes.append(
            f"{self.name} left {len(leftovers)} initializer(s) nothing reads ({shown}); removed "
            "them (a bug in the pass: please report it)"
        )

    def check_targets(self, before: ModelMetrics, after: ModelMetrics, report: PassReport) -> None:
        """Record in ``report`` how the result stands against the targets the options set
        (``report.check_target``), for passes that do not do so in ``run``."""

    def _metrics(self, model: ir.Model) -> ModelMetrics | None:
        if type(self).check_targets is CompressionPass.check_targets:
            return None
        from onnxcompress.graph.metrics import model_metrics

        return model_metrics(model)


def unchanged_reason(report: PassReport) -> str:
    """Why a pass changed nothing, from what it recorded (its stop reason, its declines)."""
    stopped = report.summary.get("stopped")
    if stopped:
        return str(stopped)
    if report.declined:
        reasons: dict[str, int] = {}
        for declined in report.declined:
            reasons[declined.reason] = reasons.get(declined.reason, 0) + 1
        common = max(reasons, key=lambda r: reasons[r])
        return (
            f"{len(report.declined)} candidate(s) declined, e.g. {common!r}"
            + (f" ({reasons[common]}x)" if reasons[common] > 1 else "")
            + "; the report lists every one"
        )
    return "it found nothing it could change"


def expand_compact_weights(model: ir.Model, report: PassReport, step: str) -> bool:
    """Give ``step`` plain initializers where an earlier step (``lct``) stored weights compactly.

    Slicing or training a weight needs it as an initializer; the file then returns to its dense
    size, which the user is told, with how to keep it compact.
    """
    from onnxcompress.graph.sparse_storage import STORED_KEY, expand_stored

    if STORED_KEY not in model.metadata_props:
        return False
    names = expand_stored(model)
    if names:
        report.notes.append(
            f"{step} expanded {len(names)} weights an earlier step stored compactly, to edit "
            "them; the file is dense again (run lct last to keep it compact)"
        )
    return bool(names)


def parse_options(
    config_class: type[PassConfig], options: Mapping[str, Any], pass_name: str
) -> Any:
    """Build a config from ``key=value`` strings (CLI) or typed values (recipes).

    Values are coerced to the field's annotated type; unknown keys and bad values raise
    PassConfigError naming the valid options.
    """
    fields = {f.name: f for f in dataclasses.fields(config_class)}
    hints = typing.get_type_hints(config_class)
    kwargs: dict[str, Any] = {}
    for key, raw in options.items():
        field_name = key.replace("-", "_")
        if field_name not in fields:
            valid = ", ".join(sorted(fields)) or "(none)"
            raise PassConfigError(f"pass {pass_name!r} has no option {key!r} (options: {valid})")
        try:
            kwargs[field_name] = _coerce(raw, hints[field_name])
        except (TypeError, ValueError):
            raise PassConfigError(
                f"pass {pass_name!r}: option {key}={raw!r} is not a valid "
                f"{_type_label(hints[field_name])}"
            ) from None
    try:
        return config_class(**kwargs)
    except PassConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise PassConfigError(f"pass {pass_name!r}: {exc}") from None


def _type_label(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(raw: Any, annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in ("none", ""))
        if is_none and type(None) in args:
            return None
        errors: list[Exception] = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(raw, arg)
            except (TypeError, ValueError) as exc:
                errors.append(exc)
        raise ValueError(errors)
    if origin is typing.Literal:
        if raw in args:
            return raw
        raise ValueError(f"expected one of {args}")
    if origin in (tuple, list):
        items = raw.split(";") if isinstance(raw, str) else list(raw)
        item_type = args[0] if args else str
        values = [
            _coerce(item.strip() if isinstance(item, str) else item, item_type)
            for item in items
            if item != ""
        ]
        return tuple(values) if origin is tuple else values
    if annotation is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(raw)
    if annotation is int:
        if isinstance(raw, bool):
            raise ValueError(raw)
        value = float(raw)
        if value != int(value):
            raise ValueError(raw)
        return int(value)
    if annotation is float:
        if isinstance(raw, bool):
            raise ValueError(raw)
        result = float(raw)
        if not np.isfinite(result):
            raise ValueError(raw)
        return result
    if annotation is str:
        if not isinstance(raw, str):
            raise ValueError(raw)
        return raw
    return raw


def check_fraction(name: str, value: float | None, *, allow_one: bool = True) -> None:
    """Budgets are fractions of the original: 0 < value <= 1."""
    if value is None:
        return
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (value > 0.0 and upper_ok):
        raise PassConfigError(f"{name}={value} is out of range: give a fraction in (0, 1]")
