"""The data spec string ``KIND[:PATH][SLICE][?key=value&...]`` (grammar in ``onnxcompress.data``)
parsed into a ``DataSpec``, every option's value checked before any file is read."""

from __future__ import annotations

import builtins
import re
from dataclasses import dataclass
from pathlib import Path

from onnxcompress.data.messages import data_error
from onnxcompress.data.option_values import parse_int, parse_slice
from onnxcompress.data.preprocess import PREPROCESS_OPTIONS, Preprocess
from onnxcompress.errors import DataError

DEFAULT_SPEC = "digits"
KINDS = ("digits", "mnist", "npz", "folder")
_COMMON_OPTIONS = (*PREPROCESS_OPTIONS, "per_class", "limit")
_KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "mnist": ("split",),
    "npz": ("layout",),
    "folder": (),
}
_ALL_OPTIONS = tuple(sorted({*_COMMON_OPTIONS, "split", "layout"}))
# The split option names the prefix of the MNIST idx files it reads.
MNIST_SPLITS = {"test": "t10k", "train": "train"}


@dataclass
class DataSpec:
    """A parsed data spec (see the ``onnxcompress.data`` docstring for the grammar).

    Attributes:
        kind: one of ``KINDS``.
        path: the file or folder, None for ``digits``.
        slice: the ``[a:b:c]`` part, None when absent.
        per_class: the ``per_class=a:b`` option as a slice, None when absent.
        options: every other option, as text, keyed by lower-case name.
        text: the spec as the user wrote it.
    """

    kind: str
    path: Path | None
    slice: builtins.slice | None
    per_class: builtins.slice | None
    options: dict[str, str]
    text: str = ""

    @property
    def limit(self) -> int | None:
        """The ``limit=N`` option, None when absent."""
        if "limit" not in self.options:
            return None
        return parse_int(self.options["limit"], "limit", self.text)

    def preprocess(self) -> Preprocess:
        """The preprocessing options the spec sets (unset fields stay None)."""
        return Preprocess.from_options(self.options, self.text)


def parse_spec(spec: str) -> DataSpec:
    """Parse ``KIND[:PATH][SLICE][?key=value&...]`` and validate every option's value.

    Raises:
        DataError: unknown kind, missing or superfluous path, bad slice, unknown, repeated or
            inapplicable option, or an option value that does not parse.
    """
    text = spec.strip()
    if not text:
        raise DataError("data spec is empty; use e.g. digits, mnist:DIR, npz:FILE, folder:DIR")
    head, _, query = text.partition("?")
    slice_: builtins.slice | None = None
    slice_match = re.fullmatch(r"(.*?)\[([^\[\]]*)\]\s*", head)
    if slice_match is not None:
        head = slice_match.group(1)
        slice_ = parse_slice(slice_match.group(2), "slice", text)
    kind, colon, path_text = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        hint = ""
        if not colon and Path(head).expanduser().exists():
            hint = f" (for a path write the kind first, e.g. folder:{head} or npz:{head})"
        raise data_error(
            text, f"unknown kind {kind!r}; use digits, mnist:DIR, npz:FILE or folder:DIR{hint}"
        )
    path: Path | None = None
    if kind == "digits":
        if path_text.strip():
            raise data_error(text, "digits is built in and takes no path; write just 'digits'")
    else:
        if not path_text.strip():
            raise data_error(text, f"{kind} needs a path, e.g. {kind}:/data/{kind}")
        path = Path(path_text.strip()).expanduser()

    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            raise data_error(text, f"option {item!r} has no value; write key=value")
        if key not in _ALL_OPTIONS:
            raise data_error(
                text, f"unknown option {key!r}; valid options: {', '.join(_ALL_OPTIONS)}"
            )
        if key not in _COMMON_OPTIONS and key not in _KIND_OPTIONS[kind]:
            owner = next(k for k, keys in _KIND_OPTIONS.items() if key in keys)
            raise data_error(text, f"option {key!r} applies to {owner} data only")
        if key in options:
            raise data_error(text, f"option {key!r} is given twice")
        options[key] = value.strip()

    per_class = None
    if "per_class" in options:
        raw = options.pop("per_class")
        per_class = (
            builtins.slice(0, parse_int(raw, "per_class", text))
            if ":" not in raw
            else parse_slice(raw, "per_class", text)
        )
    if "split" in options and options["split"].lower() not in MNIST_SPLITS:
        raise data_error(text, f"split={options['split']!r} must be test or train")
    parsed = DataSpec(kind, path, slice_, per_class, options, text)
    if parsed.limit is not None and parsed.limit < 0:
        raise data_error(text, f"limit={parsed.limit} must be zero or more")
    parsed.preprocess()  # validates the preprocessing values now, before any file is read
    return parsed
