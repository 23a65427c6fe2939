"""Accuracy of a model on a dataset, and how far a rewritten model's outputs drift from the input.

Every number the report gives about quality (top-1/top-5, output deviation, the verification after
each pass) is computed here, through ONNX Runtime, so it measures the file a user will deploy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np

from onnxcompress.data import Dataset, Preprocess, fit_to_input, load_dataset
from onnxcompress.errors import DataError, ModelLoadError, VerificationError
from onnxcompress.runtime.session import make_session, random_feeds, session_inputs

if TYPE_CHECKING:
    import onnx_ir as ir
    import onnxruntime as ort

logger = logging.getLogger(__name__)

ModelLike: TypeAlias = "ir.Model | str | os.PathLike[str] | bytes"

# ONNX Runtime's CPU provider gains little from bigger batches; memory stays small.
DEFAULT_BATCH_SIZE = 256
# Long enough to name the node and the problem; checker messages can embed whole protos.
_MAX_ERROR_CHARS = 500
# The checker sees tensors above this size through a sparse stand-in file, not a copy.
_CHECK_INLINE_BYTES = 1 << 20
_CHECK_STAND_IN = "onnxcompress-stand-in.bin"


# ---------------------------------------------------------------------------------------------
# Running a model in batches
# ---------------------------------------------------------------------------------------------


def _label(model: Any) -> str:
    if isinstance(model, (str, os.PathLike)):
        return str(model)
    if isinstance(model, bytes):
        return "<model bytes>"
    from onnxcompress.graph.model_io import model_label

    return model_label(model)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text[:_MAX_ERROR_CHARS]


def _fixed_batch(session: ort.InferenceSession) -> int | None:
    """The first input's batch size when the model was exported with a fixed one."""
    dim = session.get_inputs()[0].shape[0] if session.get_inputs()[0].shape else None
    return dim if isinstance(dim, int) and dim > 0 else None


def _chunks(count: int, step: int) -> Iterator[slice]:
    for start in range(0, count, step):
        yield slice(start, min(start + step, count))


def _run_batched(
    session: ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    batch_size: int,
    *,
    label: str,
    first_output_only: bool = False,
    progress: bool = False,
) -> list[np.ndarray]:
    """Run ``feeds`` (all sharing axis 0) through ``session`` in chunks; outputs concatenated.

    A model exported with a fixed batch size gets exactly that many samples per call, the last
    chunk padded with zeros and the padding dropped from the outputs.

    Raises:
        DataError: ONNX Runtime rejects the inputs or fails while running them.
    """
    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    counts = {int(array.shape[0]) for array in feeds.values()}
    if len(counts) != 1:
        raise DataError(f"{label}: the inputs disagree on the number of samples ({counts})")
    count = counts.pop()
    if count == 0:
        raise DataError(f"{label}: no samples to run")
    fixed = _fixed_batch(session)
    step = fixed or batch_size
    names = [session.get_outputs()[0].name] if first_output_only else None
    parts: list[list[np.ndarray]] = []
    chunks: Iterable[slice] = _chunks(count, step)
    if progress:
        from tqdm import tqdm

        chunks = tqdm(list(chunks), desc=f"running {label}", unit="batch", leave=False)
    for chunk in chunks:
        batch = {name: array[chunk] for name, array in feeds.items()}
        size = chunk.stop - chunk.start
        if fixed is not None and size < fixed:
            batch = {name: _pad(array, fixed) for name, array in batch.items()}
        try:
            outputs = session.run(names, batch)
        except Exception as exc:  # onnxruntime raises its own exception types per failure
            raise DataError(
                f"{label}: ONNX Runtime cannot run the model on these inputs "
                f"(shapes {_shapes(batch)}): {_first_line(exc)}"
            ) from exc
        parts.append(
            [np.asarray(out)[:size] if np.ndim(out) else np.asarray(out) for out in outputs]
        )
    return [_join([part[i] for part in parts]) for i in range(len(parts[0]))]


def _pad(array: np.ndarray, size: int) -> np.ndarray:
    pad = np.zeros((size - array.shape[0], *array.shape[1:]), dtype=array.dtype)
    return np.concatenate([array, pad])


def _join(pieces: Sequence[np.ndarray]) -> np.ndarray:
    # Scalars (a model that reduces over the batch) cannot be concatenated; keep one per chunk.
    return np.concatenate(pieces) if pieces[0].ndim else np.stack(pieces)


def _shapes(feeds: Mapping[str, np.ndarray]) -> str:
    return ", ".join(f"{name}={list(array.shape)}" for name, array in feeds.items())


def _single_input_feeds(
    session: ort.InferenceSession, x: np.ndarray, label: str
) -> dict[str, np.ndarray]:
    """Feed ``x`` to the model's only (or first) input, cast to the input's dtype."""
    specs = session_inputs(session)
    if not specs:
        raise DataError(f"{label}: the model has no inputs to feed")
    if len(specs) > 1:
        others = ", ".join(spec.name for spec in specs[1:])
        raise DataError(
            f"{label}: the model has {len(specs)} inputs; only one ({specs[0].name!r}) can be fed "
            f"from a dataset (the others: {others})"
        )
    x = np.asarray(x)
    if x.ndim == 0:
        raise DataError(f"{label}: expected a batch of inputs, got a scalar")
    target = specs[0].dtype
    if not np.issubdtype(target, np.floating) and np.issubdtype(x.dtype, np.floating):
        # A cast would silently turn normalised pixels into zeros and ones.
        info = np.iinfo(target) if np.issubdtype(target, np.integer) else None
        integral = bool(np.all(np.mod(x, 1) == 0))
        in_range = info is None or bool(np.all((x >= info.min) & (x <= info.max)))
        if not (integral and in_range):
            raise DataError(
                f"{label}: input {specs[0].name!r} takes {target} values but the data are "
                f"{x.dtype} values that do not fit it; give raw values (e.g. ?scale=1 and no "
                "mean/std) or a model with a float input"
            )
    return {specs[0].name: np.ascontiguousarray(x, dtype=target)}


def predict(
    model: ModelLike,
    x: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    provider: str | None = None,
) -> np.ndarray:
    """The first output of ``model`` on ``x``, computed in batches by ONNX Runtime.

    Args:
        model: an ``ir.Model``, a path to an .onnx file, or serialized model bytes.
        x: the inputs for the model's single graph input, batch first; cast to its dtype.
        provider: ``cpu``, ``cuda``, ... (default: the best available).

    Raises:
        DataError: the model has several inputs, ``x`` is empty, or ONNX Runtime rejects it.
        ModelLoadError: ONNX Runtime cannot build a session for the model.
    """
    label = _label(model)
    session = make_session(model, provider=provider)
    feeds = _single_input_feeds(session, x, label)
    return _run_batched(session, feeds, batch_size, label=label, first_output_only=True)[0]


# ---------------------------------------------------------------------------------------------
# Accuracy
# ---------------------------------------------------------------------------------------------


@dataclass
class Accuracy:
    """Classification accuracy on a labelled dataset.

    Attributes:
        top1: percent of samples whose highest score is the label.
        top5: percent whose label is among the five highest scores; None with fewer than five
            classes, where it would always be 100.
        samples: how many samples were scored.
        seconds: wall time of the inference.
    """

    top1: float
    top5: float | None
    samples: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _class_scores(output: np.ndarray) -> np.ndarray | None:
    """``output`` as (N, classes), squeezing trailing 1s (N, C, 1, 1); None if not that form."""
    if output.ndim < 2:
        return None
    if output.ndim > 2 and any(int(d) != 1 for d in output.shape[2:]):
        return None
    return output.reshape(output.shape[0], output.shape[1])


def _check_labels(labels: np.ndarray, classes: int, where: str) -> None:
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise DataError(
            f"data '{where}': labels range over {int(labels.min())}..{int(labels.max())} but "
            f"the model scores {classes} classes (0..{classes - 1}); this data does not fit "
            "this model's outputs"
        )


def accuracy(
    model: ModelLike,
    dataset: Dataset,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    provider: str | None = None,
    progress: bool = False,
) -> Accuracy:
    """Top-1 (and top-5) accuracy of ``model``'s first output on a labelled dataset.

    Ties between scores go to the lower class index, as with ``argmax``.

    Raises:
        DataError: the dataset has no labels, a label is outside the model's classes, the first
            output is not (N, classes) scores, or the inputs do not fit the model.
        ModelLoadError: ONNX Runtime cannot build a session for the model.
    """
    if dataset.y is None:
        raise DataError(
            f"data '{dataset.name}': has no labels, so accuracy cannot be measured; use labelled "
            "data (an image folder with one subfolder per class, an npz with y, mnist with its "
            "labels file)"
        )
    label = _label(model)
    session = make_session(model, provider=provider)
    declared = session.get_outputs()[0].shape
    # Fail before a long run when the model declares its class count.
    if len(declared) == 2 and isinstance(declared[1], int) and declared[1] > 0:
        _check_labels(dataset.y, declared[1], dataset.name)
    feeds = _single_input_feeds(session, dataset.x, label)
    start = time.perf_counter()
    (output,) = _run_batched(
        session, feeds, batch_size, label=label, first_output_only=True, progress=progress
    )
    seconds = time.perf_counter() - start
    scores = _class_scores(output)
    if scores is None or scores.shape[0] != len(dataset):
        raise DataError(
            f"{label}: the first output has shape {list(output.shape)}; accuracy needs class "
            f"scores shaped (N, classes) for the {len(dataset)} samples"
        )
    classes = scores.shape[1]
    _check_labels(dataset.y, classes, dataset.name)
    labels = dataset.y
    # A stable sort on the negated scores keeps ties in index order, matching argmax.
    ranked = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")
    top1 = float(np.mean(ranked[:, 0] == labels)) * 100.0
    top5 = None
    if classes >= 5:
        top5 = float(np.mean(np.any(ranked[:, :5] == labels[:, None], axis=1))) * 100.0
    logger.info("%s: top-1 %.2f%% on %d samples of %s", label, top1, len(labels), dataset.name)
    return Accuracy(top1=top1, top5=top5, samples=len(labels), seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Output deviation
# ---------------------------------------------------------------------------------------------


@dataclass
class Deviation:
    """How far a candidate's outputs are from a reference's on the same inputs.

    Attributes:
        max_abs: largest absolute difference over every element of every output.
        mean_abs: mean absolute difference over every element of every output.
        max_rel: over the outputs, the largest ``max|a - b| / max|a|`` (``a`` the reference);
            an all-zero reference output counts its absolute difference, so 0 stays 0.
        top1_agreement: percent of samples whose argmax agrees, on the first output shaped
            (N, classes); None when no output has that shape.
        samples: how many samples were compared.
    """

    max_abs: float
    mean_abs: float
    max_rel: float
    top1_agreement: float | None
    samples: int

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def finite(self) -> bool:
        """False when an output held NaN/inf where the other did not, or the two disagree so."""
        return all(np.isfinite(v) for v in (self.max_abs, self.mean_abs, self.max_rel))


def _compare(
    reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray], samples: int
) -> Deviation:
    """Deviation between two output lists, matched by position.

    Raises:
        VerificationError: the lists differ in length or an output pair differs in shape.
    """
    if len(reference) != len(candidate):
        raise VerificationError(
            f"the candidate has {len(candidate)} outputs, the reference {len(reference)}"
        )
    max_abs = 0.0
    max_rel = 0.0
    total_abs = 0.0
    elements = 0
    agreement: float | None = None
    for index, (ref, cand) in enumerate(zip(reference, candidate, strict=True)):
        if ref.shape != cand.shape:
            raise VerificationError(
                f"output {index} has shape {list(cand.shape)} in the candidate, "
                f"{list(ref.shape)} in the reference"
            )
        a = ref.astype(np.float64)
        b = cand.astype(np.float64)
        # Equal infinities (or NaNs in both) are agreement, not an infinite difference.
        same = (a == b) | (np.isnan(a) & np.isnan(b))
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(a - b))
        if diff.size:
            worst = float(diff.max()) if not np.isnan(diff).any() else float("nan")
            scale = float(np.nanmax(np.abs(a))) if not np.isnan(a).all() else 0.0
            max_abs = _nan_max(max_abs, worst)
            max_rel = _nan_max(max_rel, worst / scale if scale > 0 else worst)
            total_abs += float(diff.sum())
            elements += diff.size
        if agreement is None:
            ref_scores, cand_scores = _class_scores(ref), _class_scores(cand)
            if ref_scores is not None and cand_scores is not None and ref_scores.shape[1] > 1:
                same_top1 = ref_scores.argmax(axis=1) == cand_scores.argmax(axis=1)
                agreement = float(np.mean(same_top1)) * 100.0
    mean_abs = total_abs / elements if elements else 0.0
    return Deviation(max_abs, mean_abs, max_rel, agreement, samples)


def _nan_max(a: float, b: float) -> float:
    # NaN must win: a candidate that produces NaN is as far from the reference as can be.
    return float("nan") if np.isnan(a) or np.isnan(b) else max(a, b)


def _feeds_for(
    session: ort.InferenceSession, feeds: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Re-key ``feeds`` for ``session``: by name when the names match, else by position.

    Floating-point inputs are cast to the candidate's input type, so that a float16 rewrite of
    a float32 model is compared on the same data.
    """
    specs = session_inputs(session)
    names = [spec.name for spec in specs]
    if set(names) == set(feeds):
        keyed = dict(feeds)
    elif len(names) != len(feeds):
        raise VerificationError(
            f"the candidate has inputs {names}, the reference {list(feeds)}; they cannot be fed "
            "the same data"
        )
    else:
        keyed = dict(zip(names, feeds.values(), strict=True))
    for spec in specs:
        array = keyed[spec.name]
        if (
            array.dtype != spec.dtype
            and np.issubdtype(array.dtype, np.floating)
            and np.issubdtype(spec.dtype, np.floating)
        ):
            keyed[spec.name] = array.astype(spec.dtype)
    return keyed


def output_deviation(
    reference: ModelLike,
    candidate: ModelLike,
    x: np.ndarray,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    provider: str | None = None,
) -> Deviation:
    """Compare every output of two models on the same inputs ``x`` (fed to the single input).

    Both sessions run with ONNX Runtime's graph optimizations off, so that its fusions do not
    hide (or add) differences: the comparison measures the rewrite.

    Raises:
        VerificationError: the models differ in their number of outputs or output shapes.
        DataError: ``x`` does not fit the models.
        ModelLoadError: a session cannot be built.
    """
    ref_session = make_session(reference, provider=provider, optimize=False)
    cand_session = make_session(candidate, provider=provider, optimize=False)
    feeds = _single_input_feeds(ref_session, x, _label(reference))
    ref_out = _run_batched(ref_session, feeds, batch_size, label=_label(reference))
    cand_feeds = _feeds_for(cand_session, feeds)
    cand_out = _run_batched(cand_session, cand_feeds, batch_size, label=_label(candidate))
    return _compare(ref_out, cand_out, len(x))


# ---------------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    """Whether a rewritten model is valid and runs, and how far it drifted from the original.

    Attributes:
        checker_ok: ``onnx.checker.check_model(full_check=True)`` passes.
        checker_error: its first line when it does not.
        session_ok: ONNX Runtime builds a session, runs it on the inputs, and the outputs are
            shaped like the original's.
        session_error: what went wrong when not.
        deviation: the output deviation, when the candidate ran.
    """

    checker_ok: bool
    checker_error: str | None
    session_ok: bool
    session_error: str | None
    deviation: Deviation | None

    def ok(self, max_rel: float | None = None) -> bool:
        """Valid, runs, outputs finite where the original's are, and within ``max_rel``."""
        if not (self.checker_ok and self.session_ok and self.deviation is not None):
            return False
        if not self.deviation.finite():
            return False
        return max_rel is None or self.deviation.max_rel <= max_rel

    def as_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        result["ok"] = self.ok()
        return result


def check_model(model: ModelLike) -> str | None:
    """Run ``onnx.checker.check_model(full_check=True)``; the error's first line, or None."""
    import onnx

    try:
        if isinstance(model, (str, os.PathLike)):
            # The path form also validates external data files beside the model.
            onnx.checker.check_model(str(model), full_check=True)
        elif isinstance(model, bytes):
            onnx.checker.check_model(onnx.load_from_string(model), full_check=True)
        else:
            _check_ir_model(model)
    except Exception as exc:  # ValidationError, InferenceError, DecodeError and more
        return f"{type(exc).__name__}: {_first_line(exc)}"
    return None


def _check_ir_model(model: ir.Model) -> None:
    """The checker on an in-memory model without copying its weights into a proto.

    Big tensors and tensors still in external files are written as references to a sparse
    stand-in file of the right length in a temporary folder: the checker validates the graph,
    types and shapes (and that each reference fits its file) without reading gigabytes, and
    without looking for external files relative to the working folder, where they are not.
    ``load_model`` validated the real external files (inside the model's folder, long enough).
    """
    import tempfile

    import onnx
    import onnx_ir as ir

    from onnxcompress.graph.model_io import serialize_leaving_out

    def leave_out(tensor: ir.TensorProtocol) -> bool:
        return isinstance(tensor, ir.ExternalTensor) or tensor.nbytes >= _CHECK_INLINE_BYTES

    proto, left_out = serialize_leaving_out(model, leave_out, _CHECK_STAND_IN)
    if not left_out:
        onnx.checker.check_model(proto, full_check=True)
        return
    with tempfile.TemporaryDirectory(prefix="onnxcompress-check-") as folder:
        with open(Path(folder, _CHECK_STAND_IN), "wb") as handle:
            handle.truncate(max(tensor.nbytes for _, tensor in left_out))
        path = Path(folder, "model.onnx")
        path.write_bytes(proto.SerializeToString())
        onnx.checker.check_model(str(path), full_check=True)


def verify(
    original: ModelLike,
    candidate: ModelLike,
    *,
    x: np.ndarray | None = None,
    samples: int = 16,
    seed: int = 0,
    provider: str | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
) -> VerifyResult:
    """Check ``candidate`` (the checker, a session, the outputs) against ``original``.

    Problems with the candidate are reported in the result; problems with the original or
    with ``x`` raise, since no verification is possible then.

    Args:
        x: inputs for the single graph input; None draws ``samples`` seeded standard-normal
            inputs for every input, shaped from the original model.
        seed: for the random inputs.
        shapes: dims of the random inputs whose height and width are symbolic (``--shape``);
            their batch axis takes ``samples`` where the model leaves it open.

    Raises:
        ModelLoadError: ONNX Runtime cannot build a session for the original.
        DataError: ``x`` does not fit the original, or random inputs cannot be shaped (a
            dynamic dimension other than the batch).
    """
    for model in (original, candidate):
        if not isinstance(model, (str, os.PathLike, bytes)):
            from onnxcompress.graph.model_io import drop_resident_external_pages

            drop_resident_external_pages(model)
    checker_error = check_model(candidate)
    # Problems with the candidate go into the result; the caller decides how loud to be.
    if checker_error is not None:
        logger.info("%s: checker failed: %s", _label(candidate), checker_error)
    ref_session = make_session(original, provider=provider, optimize=False)
    if x is not None:
        feeds = _single_input_feeds(ref_session, x, _label(original))
    else:
        if samples < 1:
            raise DataError(f"verification needs at least one sample, got samples={samples}")
        try:
            overrides = _sample_shapes(ref_session, shapes, samples) if shapes else None
            feeds = random_feeds(ref_session, samples, seed=seed, overrides=overrides)
        except DataError as exc:
            raise DataError(f"{_label(original)}: {exc}") from exc
    count = int(next(iter(feeds.values())).shape[0])

    def failed(message: str) -> VerifyResult:
        logger.info("%s: %s", _label(candidate), message)
        return VerifyResult(checker_error is None, checker_error, False, message, None)

    ref_out = _run_batched(ref_session, feeds, DEFAULT_BATCH_SIZE, label=_label(original))
    # One session at a time: each holds its own copy of the weights, a gigabyte for big models.
    del ref_session
    try:
        cand_session = make_session(candidate, provider=provider, optimize=False)
    except ModelLoadError as exc:
        return failed(str(exc))
    try:
        cand_feeds = _feeds_for(cand_session, feeds)
        cand_out = _run_batched(
            cand_session, cand_feeds, DEFAULT_BATCH_SIZE, label=_label(candidate)
        )
        deviation = _compare(ref_out, cand_out, count)
    except (DataError, VerificationError) as exc:
        return failed(str(exc))
    return VerifyResult(checker_error is None, checker_error, True, None, deviation)


def _sample_shapes(
    session: ort.InferenceSession, shapes: Mapping[str, Sequence[int]], samples: int
) -> dict[str, tuple[int, ...]]:
    """``shapes`` with ``samples`` on each open batch axis."""
    result = {}
    for spec in session_inputs(session):
        dims = shapes.get(spec.name)
        if dims is None:
            continue
        open_batch = bool(spec.shape) and not isinstance(spec.shape[0], int)
        result[spec.name] = (samples, *map(int, dims[1:])) if open_batch else tuple(dims)
    return result


# ---------------------------------------------------------------------------------------------
# Data for a model
# ---------------------------------------------------------------------------------------------


def _first_input_shape(model: ir.Model) -> list[int | str | None] | None:
    """The first real (non-initializer) graph input's shape, symbolic dims as names."""
    inputs = [value for value in model.graph.inputs if not value.is_initializer()]
    if not inputs or inputs[0].shape is None:
        return None
    return [
        dim if isinstance(dim, int) else (str(dim.value) if dim.value is not None else None)
        for dim in inputs[0].shape.dims
    ]


def dataset_for_model(
    model: ir.Model | str | os.PathLike[str],
    spec: str,
    *,
    preprocess: Preprocess | None = None,
    cache_dir: Path | None = None,
) -> Dataset:
    """Load ``spec`` preprocessed the way ``model`` expects, checked against its input shape.

    The model's ``onnxcompress.preprocess.*`` metadata gives the defaults, ``preprocess``
    overrides them, and options in the spec override both.

    Raises:
        DataError: the spec is bad, or the images do not fit the model's first input (the
            message says which spec option fixes it).
        ModelLoadError: ``model`` is a path that cannot be loaded.
    """
    if isinstance(model, (str, os.PathLike)):
        from onnxcompress.graph.model_io import load_model

        model = load_model(model)
    defaults = Preprocess.from_metadata(model.metadata_props)
    if preprocess is not None:
        defaults = defaults.merged(preprocess) if defaults is not None else preprocess
    dataset = load_dataset(spec, preprocess=defaults, cache_dir=cache_dir)
    shape = _first_input_shape(model)
    if shape is not None:
        dataset = fit_to_input(dataset, shape)
    return dataset


__all__ = [
    "Accuracy",
    "Deviation",
    "VerifyResult",
    "accuracy",
    "check_model",
    "dataset_for_model",
    "output_deviation",
    "predict",
    "verify",
]
