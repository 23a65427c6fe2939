"""Typed values of a data spec's textual options and slices: numbers (fractions such as 1/255
allowed), per-channel lists, sizes, integers and Python slices."""

from __future__ import annotations

import builtins
import re

from onnxcompress.data.messages import data_error

_SLICE_RE = re.compile(r"\s*([+-]?\d+)?\s*:\s*([+-]?\d+)?\s*(?::\s*([+-]?\d+)?\s*)?")


def parse_float(text: str, key: str, where: str) -> float:
    """A float, also written as a fraction such as ``1/255``."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise data_error(where, f"{key}={text!r} is not a number") from None
    return value


def parse_floats(text: str, key: str, where: str) -> tuple[float, ...]:
    items = [item for item in text.replace(" ", "").split(",") if item]
    if not items:
        raise data_error(where, f"{key} is empty; give one number or one per channel")
    return tuple(parse_float(item, key, where) for item in items)


def parse_resize(text: str, where: str) -> tuple[int, int]:
    items = re.split(r"[x,X*]", text.strip())
    try:
        sizes = [int(item) for item in items]
    except ValueError:
        raise data_error(where, f"resize={text!r} is not N or HxW (e.g. resize=32x32)") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2:
        raise data_error(where, f"resize={text!r} is not N or HxW (e.g. resize=32x32)")
    return sizes[0], sizes[1]


def parse_int(text: str, key: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise data_error(where, f"{key}={text!r} is not an integer") from None


def parse_slice(text: str, key: str, where: str) -> builtins.slice:
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    match = _SLICE_RE.fullmatch(body)
    if match is None:
        raise data_error(where, f"{key} {text!r} is not a Python slice such as 0:500 or :100")
    start, stop, step = (int(group) if group is not None else None for group in match.groups())
    if step == 0:
        raise data_error(where, f"{key} {text!r} has a zero step")
    return builtins.slice(start, stop, step)
