"""User-facing errors: anything a user can cause is an OnnxCompressError.

The CLI prints such an error as one line and exits with code 2; any other exception is a bug.
"""

from __future__ import annotations


class OnnxCompressError(Exception):
    """An error caused by the user's input (file, option, data), not by a bug."""


class ModelLoadError(OnnxCompressError):
    """The model file cannot be read, parsed or trusted."""


class ModelSaveError(OnnxCompressError):
    """The output cannot be written where the user asked."""


class DataError(OnnxCompressError):
    """A dataset spec is malformed, or the data does not fit the model."""


class PassConfigError(OnnxCompressError):
    """Unknown pass, unknown option, or an option value out of range."""


class ProviderUnavailableError(OnnxCompressError):
    """An ONNX Runtime execution provider was requested that is not installed."""


class VerificationError(OnnxCompressError):
    """A rewritten model failed verification (checker, session build, deviation budget)."""


class UnsupportedOpError(OnnxCompressError):
    """The model uses ops (or op attributes) that a component, e.g. the torch bridge, cannot run."""
