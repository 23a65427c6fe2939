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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxcompress import __version__
from onnxcompress.errors import OnnxCompressError, PassConfigError, VerificationError
from onnxcompress.model import clone_model, load_model, save_model

logger = logging.getLogger(__name__)

DEFAULT_CALIBRATION_SIZE = 512
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
        os.replace(tmp, path)
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
    force: bool = False,
    seed: int = 0,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> CompressionResult:
    """Compress ``input_path`` with ``passes`` and write the result to ``output_path``.

    Args:
        passes: (name, options) pairs from the registry in ``onnxcompress.passes``;
            canonicalization runs first unless listed explicitly.
        data: dataset spec for calibration (first ``calibration_size`` samples).
        eval_data: dataset spec with labels to measure accuracy before and after.
        force: replace an existing output file.
    """
    from onnxcompress.passes import create_pass, pass_class
    from onnxcompress.passes.base import PassContext

    say = log or (lambda message: None)
    start = time.perf_counter()
    input_path = Path(input_path)
    if output_path is not None:
        _check_output_path(Path(output_path), input_path, force)
    original = load_model(input_path)
    model = clone_model(original)

    steps = list(passes)
    if not steps or steps[0][0] != "canonicalize":
        steps.insert(0, ("canonicalize", {}))
    # Validate every pass and option before any work, so a typo fails in a second.
    for name, options in steps:
        from onnxcompress.passes.base import parse_options

        parse_options(pass_class(name).config_class, options, name)

    context = PassContext(seed=seed, progress=progress)
    calibration_x: np.ndarray | None = None
    if data is not None:
        from onnxcompress.evaluate import dataset_for_model

        dataset = dataset_for_model(original, data)
        count = min(calibration_size, len(dataset))
        calibration = dataset.subset(slice(0, count))
        calibration_x = calibration.x
        context.calibration = calibration.x
        context.calibration_labels = calibration.y
        context.train_spec = data
        say(f"calibration: {count} samples from {data}")
    verify_x = calibration_x[:64] if calibration_x is not None else None

    from onnxcompress.metrics import model_metrics

    before = model_metrics(original, file_size=input_path.stat().st_size).as_dict()
    records: list[StepRecord] = []
    for name, options in steps:
        step_start = time.perf_counter()
        compression_pass = create_pass(name, options, context)
        say(f"running {name} {_format_options(options)}".rstrip())
        compression_pass(model)
        verification = verify_step(original, model, name, verify_x, seed)
        metrics = model_metrics(model).as_dict()
        records.append(
            StepRecord(
                name=name,
                report=compression_pass.report.as_dict(),
                verification=verification,
                metrics={k: metrics[k] for k in ("params", "macs")},
                seconds=round(time.perf_counter() - step_start, 3),
            )
        )
        say(
            f"  {name}: params {metrics['params']:,}  MACs {metrics['macs']:,}  "
            f"max rel. deviation {verification['deviation']['max_rel']:.3g}"
        )

    _stamp_provenance(model, input_path, steps)
    after = model_metrics(model).as_dict()
    result = CompressionResult(str(input_path), None, records, before, after)
    if eval_data is not None:
        from onnxcompress.evaluate import accuracy, dataset_for_model

        eval_set = dataset_for_model(original, eval_data)
        result.accuracy_before = accuracy(original, eval_set).as_dict()
        result.accuracy_after = accuracy(model, eval_set).as_dict()
    if output_path is not None:
        written = save_model(model, output_path, overwrite=force, protect=(input_path,))
        result.output_path = str(written)
        result.after["file_size"] = written.stat().st_size
    result.seconds = time.perf_counter() - start
    return result


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
    original: ir.Model, model: ir.Model, step: str, x: np.ndarray | None, seed: int
) -> dict[str, Any]:
    """Checker, session build and output deviation against the original, after one step."""
    from onnxcompress.evaluate import verify

    result = verify(original, model, x=x, seed=seed)
    if not result.checker_ok:
        raise VerificationError(
            f"step {step!r} produced a model that fails onnx.checker: {result.checker_error}"
        )
    if not result.session_ok:
        raise VerificationError(
            f"step {step!r} produced a model ONNX Runtime cannot run: {result.session_error}"
        )
    return result.as_dict()


def _stamp_provenance(model: ir.Model, input_path: Path, steps: Sequence[tuple[str, dict]]) -> None:
    """Record how the model was made, so a deployed file explains itself."""
    model.metadata_props["onnxcompress.version"] = __version__
    model.metadata_props["onnxcompress.source_sha256"] = sha256_of(input_path)
    model.metadata_props["onnxcompress.recipe"] = json.dumps(
        [{"pass": name, **options} for name, options in steps], default=str
    )


__all__ = ["CompressionResult", "OnnxCompressError", "compress", "write_json_atomic"]
