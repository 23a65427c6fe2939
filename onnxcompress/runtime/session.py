"""ONNX Runtime sessions: provider choice, session options, input shapes and random feeds.

Every module that runs a model (bench, evaluate, verify, calibration) goes through here, so the
provider logic (CUDA whenever ``onnxruntime-gpu`` is installed) lives in one place.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from onnxcompress.errors import DataError, ModelLoadError, ProviderUnavailableError

if TYPE_CHECKING:
    import onnx_ir as ir
    import onnxruntime as ort

PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
# Weights at least this big reach ONNX Runtime as OrtValues over the arrays the model already
# holds (memory-mapped when they come from external data) rather than inside serialized bytes:
# a session then costs no second and third copy of a 1 GB model.
SHARED_INITIALIZER_BYTES = 1 << 20
# The placeholder location of those weights in the serialized graph; ONNX Runtime never reads
# it, since every such initializer is supplied through add_external_initializers.
_SHARED_LOCATION = "onnxcompress-shared-initializer"
# ONNX Runtime is an extra of this package, so a user may have neither build installed.
MISSING_RUNTIME = (
    "ONNX Runtime is not installed: pip install 'onnxcompress[cpu]', or 'onnxcompress[gpu]' "
    "for CUDA (never both: they install the same module)"
)
_INSTALL_HINT = {
    "CUDAExecutionProvider": "pip uninstall -y onnxruntime && pip install 'onnxcompress[gpu]' "
    "(it installs onnxruntime-gpu; a CUDA-capable GPU and driver are needed too)",
    "TensorrtExecutionProvider": "install onnxruntime-gpu built with TensorRT and the TensorRT "
    "libraries",
}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def default_provider() -> str:
    """``cuda`` when onnxruntime-gpu sees a GPU, else ``cpu``."""
    return "cuda" if "CUDAExecutionProvider" in available_providers() else "cpu"


def resolve_providers(provider: str | None) -> list[str]:
    """Map ``cpu``/``cuda``/``tensorrt`` (or a full provider name) to an ORT provider list.

    GPU providers get the CPU provider as a fallback for the ops they do not implement.
    """
    name = provider or default_provider()
    full = PROVIDER_ALIASES.get(name.lower(), name)
    if full not in PROVIDER_ALIASES.values() and not full.endswith("ExecutionProvider"):
        choices = ", ".join(PROVIDER_ALIASES)
        raise ProviderUnavailableError(f"unknown provider {name!r} (choose one of: {choices})")
    available = available_providers()
    if full not in available:
        hint = _INSTALL_HINT.get(full, "install an onnxruntime build that includes it")
        raise ProviderUnavailableError(
            f"ONNX Runtime provider {full} is not available here (available: "
            f"{', '.join(available)}); to get it: {hint}"
        )
    return [full] if full == "CPUExecutionProvider" else [full, "CPUExecutionProvider"]


def make_session(
    model: Any,
    *,
    provider: str | None = None,
    threads: int | None = None,
    optimize: bool = True,
) -> ort.InferenceSession:
    """Build an InferenceSession from a path, serialized bytes or an ``ir.Model``.

    Args:
        optimize: ORT graph optimizations; verification turns them off so that a comparison
            measures our rewrite, not ORT's fusions.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Fatal only: errors come back as exceptions, which the caller turns into one line; ORT's
    # own error log would add a second, coloured one on stderr.
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = resolve_providers(provider)
    source: str | bytes
    label: str
    keep_alive: list[Any] = []
    if isinstance(model, (str, os.PathLike)):
        source, label = str(model), str(model)
    elif isinstance(model, bytes):
        source, label = model, "<model>"
    else:
        from onnxcompress.graph.model_io import model_label

        source, names, arrays = _serialize_sharing_weights(model)
        label = model_label(model)
        if names:
            values = [ort.OrtValue.ortvalue_from_numpy(array) for array in arrays]
            options.add_external_initializers(names, values)
            keep_alive = [arrays, values]
    try:
        session = ort.InferenceSession(source, sess_options=options, providers=providers)
    except Exception as exc:
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ModelLoadError(f"{label}: ONNX Runtime cannot run this model: {text[:300]}") from exc
    if keep_alive:
        # The session reads those buffers for as long as it lives.
        session._onnxcompress_shared_weights = keep_alive
    return session


def _serialize_sharing_weights(model: ir.Model) -> tuple[bytes, list[str], list[np.ndarray]]:
    """The model's bytes with its big weights left out, and those weights as arrays.

    The model is not changed, and tensors in external files stay on disk, memory-mapped.
    """
    import onnx_ir as ir

    from onnxcompress.graph.model_io import serialize_leaving_out

    shareable = {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.INT8,
        ir.DataType.UINT8,
        ir.DataType.INT32,
        ir.DataType.INT64,
    }

    def leave_out(tensor: ir.TensorProtocol) -> bool:
        external = isinstance(tensor, ir.ExternalTensor)
        return tensor.dtype in shareable and (external or tensor.nbytes >= SHARED_INITIALIZER_BYTES)

    proto, left_out = serialize_leaving_out(model, leave_out, _SHARED_LOCATION)
    arrays = [np.ascontiguousarray(tensor.numpy()) for _, tensor in left_out]
    return proto.SerializeToString(), [name for name, _ in left_out], arrays


@dataclass(frozen=True)
class InputSpec:
    """One graph input as ONNX Runtime reports it, with symbolic dims kept as strings."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype[Any]


_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


def session_inputs(session: ort.InferenceSession) -> list[InputSpec]:
    specs = []
    for inp in session.get_inputs():
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise DataError(f"input {inp.name!r} has type {inp.type}, which cannot be fed here")
        specs.append(InputSpec(inp.name, tuple(inp.shape), np.dtype(dtype)))
    return specs


def concrete_shape(
    spec: InputSpec, batch: int, overrides: Mapping[str, Sequence[int]] | None = None
) -> tuple[int, ...]:
    """Resolve an input's dynamic dims: the first is the batch, others need ``--shape``."""
    if overrides and spec.name in overrides:
        shape = tuple(int(d) for d in overrides[spec.name])
        if len(shape) != len(spec.shape):
            raise DataError(
                f"--shape for {spec.name!r} has rank {len(shape)}, the model expects "
                f"{len(spec.shape)}"
            )
        return shape
    dims: list[int] = []
    for axis, dim in enumerate(spec.shape):
        if isinstance(dim, int) and dim > 0:
            dims.append(dim)
        elif axis == 0:
            dims.append(batch)
        else:
            example = "x".join(["1"] + ["N"] * (len(spec.shape) - 1))
            raise DataError(
                f"input {spec.name!r} has a dynamic dimension {dim!r} at axis {axis}, so random "
                f"inputs cannot be shaped: give real inputs with --data SPEC, or (bench) the "
                f"shape with --shape {spec.name}={example}"
            )
    return tuple(dims)


def random_feeds(
    session: ort.InferenceSession,
    batch: int = 1,
    *,
    seed: int = 0,
    overrides: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, np.ndarray]:
    """Seeded random inputs shaped from the model (standard normal for floats)."""
    rng = np.random.default_rng(seed)
    feeds: dict[str, np.ndarray] = {}
    for spec in session_inputs(session):
        shape = concrete_shape(spec, batch, overrides)
        if np.issubdtype(spec.dtype, np.floating):
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype == np.bool_:
            feeds[spec.name] = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            feeds[spec.name] = rng.integers(0, 10, shape).astype(spec.dtype)
    return feeds


def parse_shape_overrides(items: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """Parse ``name=1x3x224x224`` strings from ``--shape``."""
    overrides: dict[str, tuple[int, ...]] = {}
    for item in items or ():
        name, sep, dims = item.partition("=")
        try:
            if not sep or not name:
                raise ValueError
            overrides[name] = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in overrides[name]):
                raise ValueError
        except ValueError:
            raise DataError(
                f"--shape {item!r}: expected NAME=DxDxD with positive integers, "
                "e.g. input=1x3x224x224"
            ) from None
    return overrides


def file_size(path: str | os.PathLike[str]) -> int:
    """Bytes on disk of a model, its external data files included."""
    path = Path(path)
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total
