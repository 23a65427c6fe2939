"""How data errors read: one line that names the spec or file they are about, with the first
line of the underlying exception where there is one."""

from __future__ import annotations

from onnxcompress.errors import DataError


def data_error(where: str, message: str) -> DataError:
    """A one-line DataError that names the spec (or file) it is about."""
    return DataError(f"data '{where}': {message}")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
