"""Run a list of passes on a model: canonicalize, compress, verify after every step, save.

This is what ``onnxcompress compress`` and the Python API call. Nothing is written unless every
step verified; the output appears atomically and the input file is never touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress import __version__
from onnxcompress.errors import OnnxCompressError, PassConfigError, VerificationError
from onnxcompress.graph.model_io import (
    clone_model,
    drop_resident_external_pages,
    load_model,
    publish,
    save_model,
)
from onnxcompress.pipeline.budget import (
    Budget,
    BudgetCheck,
    LatencyMeter,
    LatencySettings,
    check_budget,
)
from onnxcompress.runtime.latency_table import LatencyTarget

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SIZE = 512
# Validation samples the verification gate compares with the original after every step.
DEFAULT_VERIFY_SAMPLES = 256
# Budget on the deviation a rewrite may cause before the pipeline refuses it: only used when the
# user asks for a lossless run (max_rel_deviation); lossy passes report their deviation instead.
LOSSLESS_RTOL = 1e-4


@dataclasses.dataclass
class StepRecord:
    """One step of the run as it goes into the report."""

    name: str
    report: dict[str, Any]
    verification: dict[str, Any]
    metrics: dict[str, Any]
    seconds: float
    # Set on the last step of a stage (a pass and the steps that join it, such as finetune): the
    # budget check.
    budget: dict[str, Any] | None = None


@dataclasses.dataclass
class CompressionResult:
    input_path: str
    output_path: str | None
    steps: list[StepRecord]
    before: dict[str, Any]
    after: dict[str, Any]
    accuracy_before: dict[str, Any] | None = None
    accuracy_after: dict[str, Any] | None = None
    seconds: float = 0.0
    # Index into ``steps`` of the model that was kept (the best one meeting every constraint).
    kept_step: int | None = None
    stopped: str | None = None
    budget: dict[str, Any] | None = None
    budget_check: dict[str, Any] | None = None
    recipe: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    # What the user must hear: kept steps that missed a target or changed nothing, and budget
    # targets the result misses. Empty when every target was met.
    missed: list[str] = dataclasses.field(default_factory=list)
    # The dims of each graph input every MAC count, budget and target of the run was made at.
    macs_counted_at: dict[str, list[int]] | None = None
    # The dims ``--static-shape`` fixed the inputs to (None: the output keeps the input's dims).
    static_shape: dict[str, list[int]] | None = None

    @property
    def targets_met(self) -> bool:
        return not self.missed

    def as_dict(self) -> dict[str, Any]:
        return {
            "tool": f"onnxcompress {__version__}",
            "input": self.input_path,
            "output": self.output_path,
            "before": self.before,
            "after": self.after,
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "steps": [dataclasses.asdict(step) for step in self.steps],
            "seconds": round(self.seconds, 3),
            "kept_step": self.kept_step,
            "stopped": self.stopped,
            "budget": self.budget,
            "budget_check": self.budget_check,
            "recipe": self.recipe,
            "data": self.data,
            "targets_met": self.targets_met,
            "missed": self.missed,
            "macs_counted_at": self.macs_counted_at,
            "static_shape": self.static_shape,
        }


def sha256_of(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: str | os.PathLike[str], payload: Any) -> None:
    """Write JSON through a temp file and a rename, so readers never see half a report."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
            handle.write("\n")
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def compress(
    input_path: str | os.PathLike[str],
    output_path: str | os.PathLike[str] | None,
    passes: Sequence[tuple[str, dict[str, Any]]],
    *,
    data: str | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    eval_data: str | None = None,
    train_data: str | None = None,
    budget: Budget | None = None,
    latency: LatencySettings | None = None,
    recipe: dict[str, Any] | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    static_shape: bool = False,
    verify_samples: int = DEFAULT_VERIFY_SAMPLES,
    force: bool = False,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CompressionResult:
    """Compress ``input_path`` with ``passes`` and write the result to ``output_path``.

    Steps run in order and every one is verified against the original (checker, session, output
    deviation and top-1 agreement). A stage is a pass plus the steps after it that join its
    stage (``joins_previous_stage``: ``finetune``); after each stage the budget is checked: the
    run stops at the first stage that breaks ``max_drop`` (or once every target is met) and
    keeps the last model that met all constraints.

    Args:
        passes: (name, options) pairs from the registry in ``onnxcompress.passes`` (such as
            ``("finetune", FinetuneConfig options)``); canonicalization runs first unless listed.
        data: dataset spec for calibration (``calibration_size`` samples spread evenly over
            it).
        eval_data: labelled validation data: accuracy before/after and per stage, budgets, and
            the inputs of the verification gate.
        train_data: training data of the steps that train (default: ``data``).
        budget: targets and the accuracy constraint; a pass given no budget option of its own
            gets the budget's MACs/params target, converted to the model it receives.
        latency: how ``target_latency`` is measured.
        recipe: the recipe as data, recorded in the output's metadata and the report.
        input_shapes: the dims to count MACs at for inputs with symbolic height and width
            (``--shape``); without them, the calibration data's. MACs, budgets and every
            step's targets are counted there; the written model keeps its symbolic dims.
        static_shape: fix the inputs to ``input_shapes`` (every dim, batch included) before
            the first step, so shape arithmetic folds to constants and the written model is
            static at that size.
        force: replace an existing output file.
    """
    from onnxcompress.passes import create_pass, pass_class
    from onnxcompress.passes.base import PassContext, parse_options

    def say(message: str) -> None:
        if log is not None:
            from tqdm import tqdm

            # Clears the progress bars while the line is printed, so they do not garble it.
            with tqdm.external_write_mode():
                log(message)

    start = time.perf_counter()
    input_path = Path(input_path)
    budget = budget if budget is not None else Budget()
    if output_path is not None:
        _check_output_path(Path(output_path), input_path, force)
    original = load_model(input_path)
    model = clone_model(original)

    steps = list(passes)
    if not steps or steps[0][0] != "canonicalize":
        steps.insert(0, ("canonicalize", {}))
    # Validate every pass and option before any work, so a typo fails in a second, with the
    # budget each step will be handed (its value depends on the model then; the goal stands in).
    macs_budgets = ["target_macs"] if budget.target_macs is not None else []
    for name, options in steps:
        injected = _injected_budget(name, options, budget)
        config = parse_options(pass_class(name).config_class, {**options, **injected}, name)
        if getattr(config, "target_macs", None) is not None:
            macs_budgets.append(f"{name} target_macs")
    if budget.max_drop is not None and eval_data is None:
        raise PassConfigError(
            "budget max_drop needs labelled validation data: give --val-data SPEC "
            "(or [data] validation in the recipe)"
        )
    if static_shape and not input_shapes:
        raise PassConfigError(
            "--static-shape fixes the inputs to the dims --shape gives: add --shape NAME=DIMS "
            "(e.g. images=1x3x640x640)"
        )
    _refuse_training_after_quantization(steps)
    trains = [name for name, _ in steps if pass_class(name).needs_training_data]
    if trains and (train_data or data) is None:
        raise PassConfigError(
            f"a {trains[0]} step needs training data: give --train-data SPEC (or [data] train)"
        )

    # Every step is verified against the original in ONNX Runtime: a model it cannot run (an
    # unknown op, mismatched weights) fails here in one line, before any work is done.
    from onnxcompress.runtime.session import make_session

    make_session(input_path, optimize=False)

    from onnxcompress.runtime.evaluate import accuracy

    # Every dataset of the run is loaded once, through the context, and shared by the steps.
    # Training data reaches every pass, with or without calibration data (a pass that also
    # needs calibration data says so itself).
    settings = latency or LatencySettings()
    context = PassContext(
        seed=seed,
        progress=progress,
        train_spec=train_data or data,
        validation_spec=eval_data,
        original=original,
        calibration_spec=data,
        # Passes that price channels by latency price them where the budget measures it.
        latency=LatencyTarget(settings.provider, settings.batch, settings.threads),
    )
    calibration = None
    if data is not None:
        dataset = context.dataset(original, data)
        assert dataset is not None
        count = min(calibration_size, len(dataset))
        # Spread over the data, not its first images: image folders come class by class.
        calibration = dataset.spread(count)
        context.calibration = calibration.x
        context.calibration_labels = calibration.y
        say(f"calibration: {count} samples from {data}")
    _count_macs_at_real_shapes(
        original,
        model,
        input_shapes,
        calibration.x.shape if calibration is not None else None,
        macs_budgets,
        input_path,
    )
    validation = context.validation_set(original, fallback=None)
    if validation is not None:
        say(f"validation: {len(validation)} samples from {eval_data}")
    if static_shape:
        from onnxcompress.graph.input_shapes import shapes_text

        assert input_shapes is not None  # refused above
        _fix_static_shape(model, input_shapes, [calibration, validation], input_path)
        say(f"static shape: {shapes_text(input_shapes)} (the output runs at this size only)")
    # The gate compares with the original on validation data when there is some: top-1
    # agreement there is what a user will see.
    if validation is not None:
        verify_x: np.ndarray | None = validation.spread(verify_samples).x
    else:
        verify_x = calibration.spread(verify_samples).x if calibration is not None else None

    from onnxcompress.graph.input_shapes import counted_at
    from onnxcompress.graph.metrics import model_metrics

    counted = model_metrics(original, file_size=input_path.stat().st_size)
    before = counted.as_dict()
    tic = time.perf_counter()
    accuracy_before = accuracy(original, validation).as_dict() if validation is not None else None
    # What the pipeline itself runs after every step (verification, accuracy): a step's time
    # budget keeps it back (the original's accuracy run stands in for it).
    context.checks_seconds = time.perf_counter() - tic
    meter = None
    if budget.target_latency is not None:
        meter = LatencyMeter(original, settings, seed=seed)
    announced_training = False
    records: list[StepRecord] = []
    kept: ir.Model | None = None
    kept_step: int | None = None
    kept_accuracy: dict[str, Any] | None = accuracy_before
    last_check: BudgetCheck | None = None
    stopped: str | None = None
    from tqdm import tqdm

    bar = tqdm(total=len(steps), desc="compress", unit="step", disable=not progress, leave=False)
    for index, (name, options) in enumerate(steps):
        step_start = time.perf_counter()
        # A step's time budget starts here, before its training data loads, and keeps back the
        # checks below: the whole step keeps it.
        context.step_started = time.monotonic()
        bar.set_postfix_str(name)
        if pass_class(name).needs_training_data and not announced_training:
            train_set = context.train_set(original, fallback=None)
            assert train_set is not None  # a run without training data was refused above
            say(f"training data: {len(train_set)} samples from {context.train_spec}")
            announced_training = True
        if meter is not None and _searches_latency(name, options, budget):
            say(f"running {name} {_format_options(options)} (searching target_macs for latency)")
            model, report = _latency_search(name, options, model, context, meter, budget, say)
        else:
            options = _options_with_budget(name, options, budget, before, model, meter)
            compression_pass = create_pass(name, options, context)
            say(f"running {name} {_format_options(options)}".rstrip())
            compression_pass(model)
            report = compression_pass.report.as_dict()
        # The reference runs from the input file (never modified, equal to ``original``): ONNX
        # Runtime maps its external data instead of copying a gigabyte of weights per step,
        # and the pages the pass read through our own mapping are let go first.
        drop_resident_external_pages(original)
        verification = verify_step(
            input_path, model, name, verify_x, seed, shapes=counted_at(original)
        )
        metrics = model_metrics(model).as_dict()
        step_metrics: dict[str, Any] = {k: metrics[k] for k in ("params", "macs")}
        step_accuracy = None
        if validation is not None:
            step_accuracy = accuracy(model, validation).as_dict()
            step_metrics["accuracy"] = step_accuracy
        stage_end = (
            index == 0
            or index + 1 == len(steps)
            or not pass_class(steps[index + 1][0]).joins_previous_stage
        )
        check = None
        if stage_end:
            latency_ratio = None
            if meter is not None:
                reference_ms, candidate_ms = meter.compare(model)
                step_metrics["latency_ms"] = candidate_ms
                step_metrics["latency_original_ms"] = reference_ms
                latency_ratio = candidate_ms / reference_ms
            drop = None
            if step_accuracy is not None and accuracy_before is not None:
                drop = accuracy_before["top1"] - step_accuracy["top1"]
            check = check_budget(
                budget,
                macs_ratio=metrics["macs"] / before["macs"] if before["macs"] else 1.0,
                params_ratio=metrics["params"] / before["params"] if before["params"] else 1.0,
                latency_ratio=latency_ratio,
                drop=drop,
            )
        records.append(
            StepRecord(
                name=name,
                report=report,
                verification=verification,
                metrics=step_metrics,
                seconds=round(time.perf_counter() - step_start, 3),
                budget=check.as_dict() if check is not None else None,
            )
        )
        bar.update(1)
        deviation = verification["deviation"]
        agreement = deviation.get("top1_agreement")
        say(
            f"  {name}: params {metrics['params']:,}  MACs {metrics['macs']:,}  "
            f"max rel. deviation {deviation['max_rel']:.3g}"
            + (f"  top-1 agreement {agreement:.2f}%" if agreement is not None else "")
            + (f"  top-1 {step_accuracy['top1']:.2f}%" if step_accuracy is not None else "")
        )
        for note in report.get("notes", ()):
            say(f"  note: {note}")
        if check is None:
            continue
        if not check.constraints_met:
            stopped = (
                f"step {index} ({name}) broke the budget: {'; '.join(check.broken)}; kept the "
                f"model after step {kept_step} ({steps[kept_step or 0][0]})"
            )
            say(stopped)
            break
        kept, kept_step, kept_accuracy, last_check = clone_model(model), index, step_accuracy, check
        if index > 0 and budget.targets and check.targets_met and index + 1 < len(steps):
            # Quantizing is how the model is stored, not a way to a MACs target: it still runs.
            # The steps list is cut in place (the loop reads it by position), so records, step
            # indices and provenance keep describing the steps that ran.
            encodings = [step for step in steps[index + 1 :] if pass_class(step[0]).quantizes]
            stopped = f"every target met after step {index} ({name}); later steps skipped"
            if encodings:
                stopped += f" but {', '.join(step[0] for step in encodings)}"
            say(stopped)
            if not encodings:
                break
            steps[index + 1 :] = encodings
    bar.close()
    assert kept is not None and kept_step is not None  # step 0 always ends a stage
    model = kept

    _stamp_provenance(model, input_path, steps[: kept_step + 1], budget, recipe)
    after = model_metrics(model).as_dict()
    result = CompressionResult(str(input_path), None, records, before, after)
    result.kept_step, result.stopped = kept_step, stopped
    result.macs_counted_at = counted.input_shapes
    if static_shape and input_shapes:
        result.static_shape = {name: list(dims) for name, dims in input_shapes.items()}
    for record in records[: kept_step + 1]:
        result.missed.extend(record.report.get("warnings", ()))
    if last_check is not None:
        result.missed.extend(f"budget target missed: {m}" for m in last_check.missed)
    result.budget = budget.as_dict()
    result.budget_check = last_check.as_dict() if last_check is not None else None
    result.recipe = recipe
    result.data = {
        "calibration": data,
        "calibration_size": calibration_size,
        "train": train_data,
        "validation": eval_data,
    }
    if validation is not None:
        result.accuracy_before = accuracy_before
        result.accuracy_after = kept_accuracy
    if output_path is not None:
        written = save_model(model, output_path, overwrite=force, protect=(input_path,))
        result.output_path = str(written)
        result.after["file_size"] = written.stat().st_size
    result.seconds = time.perf_counter() - start
    return result


def _refuse_training_after_quantization(steps: Sequence[tuple[str, Mapping[str, Any]]]) -> None:
    """A training step after a quantizing one would fail deep in the torch bridge (it trains
    float models); say so before any work, with the order that works."""
    from onnxcompress.passes import pass_class

    quantizing = [i for i, (name, _) in enumerate(steps) if pass_class(name).quantizes]
    if not quantizing:
        return
    first = quantizing[0]
    later = [name for name, _ in steps[first + 1 :] if pass_class(name).needs_training_data]
    if later:
        raise PassConfigError(
            f"a {later[0]} step cannot follow {steps[first][0]}: training runs on float models; "
            f"put {steps[first][0]} last (prune, fine-tune, then quantize)"
        )


def _count_macs_at_real_shapes(
    original: ir.Model,
    model: ir.Model,
    given: Mapping[str, Sequence[int]] | None,
    data_dims: Sequence[int] | None,
    macs_budgets: Sequence[str],
    input_path: Path,
) -> None:
    """Resolve once the input shapes every MAC count of the run is made at, and record them on
    both models (the pipeline's, the passes' and the budget's counts all read them there).

    A MACs budget on a model whose height and width stay symbolic would be counted at 1x1:
    that is refused, with how to give the size.
    """
    from onnxcompress.graph.input_shapes import count_macs_at, counting_shapes, spatial_dims_open

    shapes = counting_shapes(original, given, data_dims, input_path)
    for target in (original, model):
        count_macs_at(target, shapes)
    open_dims = spatial_dims_open(original)
    if open_dims and macs_budgets:
        name, dims = next(iter(open_dims.items()))
        value = next(v for v in original.graph.inputs if v.name == name)
        template = "x".join(
            "1" if axis == 0 else str(d) for axis, d in enumerate(value.shape or ())
        )
        raise PassConfigError(
            f"{input_path}: input {name!r} has symbolic dims {', '.join(dims)}, so "
            f"{macs_budgets[0]} cannot be counted: give --shape {name}={template} with the "
            "size it runs at, or --data SPEC"
        )


def _fix_static_shape(
    model: ir.Model,
    shapes: Mapping[str, Sequence[int]],
    datasets: Sequence[Any],
    input_path: Path,
) -> None:
    """Fix ``model``'s inputs to ``shapes`` for good (``--static-shape``); canonicalization then
    folds the shape arithmetic that read them.

    The run's data must be of that size past the batch axis: the verification gate and the
    accuracy runs feed it to the static model.

    Raises:
        DataError: a name that is not an input, dims of the wrong rank, or data of another size.
    """
    from onnxcompress.errors import DataError
    from onnxcompress.graph.input_shapes import fix_input_shapes

    inputs = [value for value in model.graph.inputs if not value.is_initializer()]
    for dataset in datasets:
        if dataset is None or not inputs:
            continue
        name = str(inputs[0].name)
        dims = shapes.get(name)
        if dims is not None and tuple(dataset.x.shape[1:]) != tuple(dims[1:]):
            raise DataError(
                f"{input_path}: --static-shape {name}={'x'.join(map(str, dims))} does not match "
                f"the data, whose samples are {'x'.join(map(str, dataset.x.shape[1:]))}: give "
                "the data's size or data of that size"
            )
    fix_input_shapes(model, {name: tuple(dims) for name, dims in shapes.items()}, input_path)


def _injected_budget(name: str, options: dict[str, Any], budget: Budget) -> dict[str, float]:
    """The budget option the pipeline hands step ``name``: the first of the run's targets the
    pass can aim at, unless its options already say how much it removes (as the goal of the
    whole run: ``_options_with_budget`` converts it to the model the step receives)."""
    from onnxcompress.passes import pass_class

    cls = pass_class(name)
    if any(key.replace("-", "_") in cls.budget_options for key in options):
        return {}
    for key in cls.budget_targets(options):
        goal = getattr(budget, key, None)
        if goal is not None:
            return {key: float(goal)}
    return {}


def _options_with_budget(
    name: str,
    options: dict[str, Any],
    budget: Budget,
    before: dict[str, Any],
    model: ir.Model,
    meter: LatencyMeter | None = None,
) -> dict[str, Any]:
    """Give a pass without a budget option the run's target, as a fraction of ``model``.

    Passes measure their targets against the model they receive, the budget against the
    original; a target the model already meets becomes 1 (remove nothing). A latency target
    is converted by timing ``model`` against the original (once an earlier step changed it).
    """
    from onnxcompress.graph.metrics import model_metrics

    for key, goal in _injected_budget(name, options, budget).items():
        if key == "target_latency":
            fraction = goal
            if meter is not None and model_metrics(model).macs != before["macs"]:
                reference_ms, current_ms = meter.compare(model)
                fraction = min(1.0, goal * reference_ms / current_ms) if current_ms else 1.0
            logger.info("%s: target_latency=%.4f from the budget", name, fraction)
            return {**options, key: round(fraction, 6)}
        total = key.removeprefix("target_")
        if not before[total]:
            continue
        current = getattr(model_metrics(model), total)
        fraction = min(1.0, goal * before[total] / current) if current else 1.0
        logger.info("%s: %s=%.4f from the budget", name, key, fraction)
        return {**options, key: round(fraction, 6)}
    return options


# Tries of the latency search; each runs the pass on a fresh copy and times the result.
LATENCY_SEARCH_TRIES = 4
# A try that meets the goal this close (relative) ends the search: a gentler cut buys nothing.
LATENCY_SEARCH_SLACK = 0.05


def _searches_latency(name: str, options: dict[str, Any], budget: Budget) -> bool:
    """A pass with no budget option of its own, under a latency-only budget, searches its MACs."""
    from onnxcompress.passes import pass_class

    if budget.target_latency is None or budget.target_macs is not None:
        return False
    if budget.target_params is not None:
        return False
    cls = pass_class(name)
    explicit = any(key.replace("-", "_") in cls.budget_options for key in options)
    # A pass that prices channels by latency plans for the target itself, in one run.
    targets = cls.budget_targets(options)
    return "target_macs" in targets and "target_latency" not in targets and not explicit


def _latency_search(
    name: str,
    options: dict[str, Any],
    model: ir.Model,
    context: Any,
    meter: LatencyMeter,
    budget: Budget,
    say: Callable[[str], None],
) -> tuple[ir.Model, dict[str, Any]]:
    """Run the pass at the ``target_macs`` whose measured latency meets ``target_latency``.

    Latency is not proportional to MACs (ONNX Runtime's kernels favour some widths), so the
    pass runs on a copy, the copy is timed against the original, and the next try scales the
    MACs fraction by how far the latency missed; the largest fraction that met the goal wins,
    else the fastest try.
    """
    from onnxcompress.passes import create_pass

    goal = float(budget.target_latency or 1.0)
    reference_ms, current_ms = meter.compare(model)
    fraction = min(1.0, goal * reference_ms / current_ms)
    tries: list[dict[str, Any]] = []
    best: tuple[bool, float, ir.Model, dict[str, Any]] | None = None
    for _ in range(LATENCY_SEARCH_TRIES):
        candidate = clone_model(model)
        compression_pass = create_pass(name, {**options, "target_macs": fraction}, context)
        compression_pass(candidate)
        reference_ms, candidate_ms = meter.compare(candidate)
        ratio = candidate_ms / reference_ms
        tries.append({"target_macs": round(fraction, 4), "latency_ratio": round(ratio, 4)})
        say(f"    target_macs={fraction:.3f}: latency {ratio:.3f} of the original")
        met = ratio <= goal
        # Met beats missed; among met the gentlest cut, among missed the fastest.
        key = (met, fraction if met else -ratio)
        if best is None or key > (best[0], best[1]):
            best = (met, key[1], candidate, compression_pass.report.as_dict())
        if met and ratio >= goal * (1.0 - LATENCY_SEARCH_SLACK):
            break
        fraction = max(0.05, min(1.0, fraction * (goal / ratio) ** (1.0 if ratio > goal else 0.5)))
    assert best is not None
    report = best[3]
    report["summary"] = {**report.get("summary", {}), "latency_search": tries}
    return best[2], report


def _check_output_path(output: Path, input_path: Path, force: bool) -> None:
    if output.resolve() == input_path.resolve():
        raise PassConfigError(f"{output}: the output would overwrite the input model")
    if output.exists() and not force:
        raise PassConfigError(f"{output}: already exists (pass --force to replace it)")
    if not output.parent.exists():
        raise PassConfigError(f"{output}: the folder {output.parent} does not exist")


def _format_options(options: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def verify_step(
    original: ir.Model | Path,
    model: ir.Model,
    step: str,
    x: np.ndarray | None,
    seed: int,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Checker, session build and output deviation against the original, after one step.

    Without ``x``, random inputs take ``shapes`` for inputs with symbolic height and width.
    """
    from onnxcompress.runtime.evaluate import verify

    result = verify(original, model, x=x, seed=seed, shapes=shapes)
    if not result.checker_ok:
        raise VerificationError(
            f"step {step!r} produced a model that fails onnx.checker: {result.checker_error}"
        )
    if not result.session_ok:
        raise VerificationError(
            f"step {step!r} produced a model ONNX Runtime cannot run: {result.session_error}"
        )
    if result.deviation is not None and not result.deviation.finite():
        raise VerificationError(
            f"step {step!r} produced a model whose outputs are not finite (NaN or inf) where the "
            "original's are; nothing was written"
        )
    return result.as_dict()


def _stamp_provenance(
    model: ir.Model,
    input_path: Path,
    steps: Sequence[tuple[str, dict]],
    budget: Budget | None = None,
    recipe: dict[str, Any] | None = None,
) -> None:
    """Record how the model was made, so a deployed file explains itself.

    ``onnxcompress.recipe`` lists the steps that made this file (not the ones a budget cut off),
    each as a recipe writes it.
    """
    from onnxcompress.pipeline.recipe import Step

    model.metadata_props["onnxcompress.version"] = __version__
    model.metadata_props["onnxcompress.source_sha256"] = sha256_of(input_path)
    model.metadata_props["onnxcompress.recipe"] = json.dumps(
        [Step(name, dict(options)).as_dict() for name, options in steps],
        default=str,
    )
    if budget is not None and not budget.is_empty():
        model.metadata_props["onnxcompress.budget"] = json.dumps(budget.as_dict())
    if recipe is not None and recipe.get("source"):
        model.metadata_props["onnxcompress.recipe_file"] = Path(recipe["source"]).name


__all__ = ["CompressionResult", "OnnxCompressError", "compress", "write_json_atomic"]
