"""Datasets for calibration, retraining and evaluation, named by one short spec string.

Every command that needs data takes such a spec, so passes, trainers and the evaluator see the
same images with the same preprocessing, whatever format the user keeps them in.

Spec grammar::

    KIND[:PATH][SLICE][?key=value&key=value...]

Kinds:

``digits``
    scikit-learn's built-in 8x8 handwritten digits: 1797 grey images with values 0..16 (default
    scale 1/16), labels 0..9. No file, no download; the default when no data is given.
``mnist:DIR``
    A folder with MNIST idx files, gzipped or not: ``t10k-images-idx3-ubyte[.gz]`` and
    ``t10k-labels-idx1-ubyte[.gz]`` (test split) and/or ``train-images-idx3-ubyte[.gz]`` and
    ``train-labels-idx1-ubyte[.gz]``. Option ``split=test|train`` (default: test when present).
    ``mnist:FILE`` names an images file directly. Pixels are uint8 (default scale 1/255).
``npz:FILE``
    A NumPy ``.npz`` with an array ``x`` of shape (N, C, H, W), (N, H, W, C) with
    ``layout=NHWC``, or (N, H, W) for grey images; optional integer labels ``y`` (N,) and
    class names ``classes`` (K,). uint8 ``x`` gets default scale 1/255, float ``x`` scale 1.
    Pickled (object) arrays are refused.
``folder:DIR``
    An image-folder tree: one subfolder per class (sorted names give labels 0..K-1), image
    files sorted by name inside each; a folder holding only images is read without labels.
    Images are decoded with Pillow as RGB, or as grey (Pillow's luma) with ``channels=1``;
    default scale 1/255. ``folder:ARCHIVE.tar.gz[/SUB/DIR]`` reads such a tree from a tar
    archive (``.tar``, ``.tar.gz``, ``.tgz``, ``.tar.bz2``, ``.tar.xz``) whose folder
    ``SUB/DIR`` is the tree's root: that folder is extracted once, safely (plain files and
    folders only, no absolute or '..' paths, size and member caps), into a cache folder:
    ``$ONNXCOMPRESS_CACHE/datasets`` (default ``~/.cache/onnxcompress/datasets``, or the
    ``cache_dir`` argument), keyed by the archive's path, size and mtime.

``SLICE`` is Python slice syntax, ``[a:b]``, ``[a:b:c]`` or ``[:n]``, applied to the image list
after ``per_class`` and before decoding or preprocessing, so only the chosen images are read.

Options (``?key=value&...``):

- ``scale=F`` multiply raw pixels by F first (``1/255`` style fractions allowed);
- ``mean=0.485,0.456,0.406`` and ``std=0.229,0.224,0.225``: per channel, or one value for all;
- ``resize=32`` or ``resize=32x32`` (H x W): bilinear, with Pillow's antialiasing when shrinking;
- ``channels=1|3``: 1 -> 3 repeats the grey channel, 3 -> 1 averages (images: Pillow's luma);
- ``layout=NCHW|NHWC`` (npz only): layout of the stored array, the result is always NCHW;
- ``split=test|train`` (mnist only);
- ``per_class=a:b`` (or ``per_class=n`` for ``0:n``): slice taken within each class, in order,
  e.g. ``per_class=500:1000`` keeps files 0500..0999 of every CIFAR-10 test class;
- ``limit=N``: keep the first N images after every other selection (same as a trailing ``[:N]``).

Preprocessing runs in this order: to float32, times scale, resize, channel conversion, then
``(x - mean) / std`` per channel. A ``Preprocess`` given to ``load_dataset`` (for instance read
from a model's metadata) supplies defaults; options in the spec override it.

Examples: ``digits[:1400]``; ``mnist:data/mnist[8000:]?mean=0.5&std=0.5`` (the slice comes
before the options); ``npz:calib.npz?layout=NHWC&resize=224``;
``folder:cifar10-jpeg.tar.gz/cifar10-jpeg/test?per_class=500:1000&mean=0.485,0.456,0.406&std=0.229,0.224,0.225``.
A ``?`` always starts the options, so it cannot appear in a path.
"""

from __future__ import annotations

import builtins
import dataclasses
import gzip
import hashlib
import logging
import math
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcompress.errors import DataError

logger = logging.getLogger(__name__)

DEFAULT_SPEC = "digits"
METADATA_PREFIX = "onnxcompress.preprocess."
KINDS = ("digits", "mnist", "npz", "folder")

# An archive that decompresses past this is more likely a bomb than a dataset; raise the cap
# deliberately for ImageNet-sized trees.
MAX_ARCHIVE_BYTES = 4 * 2**30
# Ten times CIFAR-10's 60,000 files; tar headers alone could otherwise exhaust inodes.
MAX_ARCHIVE_MEMBERS = 1_000_000
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".ppm", ".pgm", ".pbm", ".tif", ".tiff", ".webp"}
)

_PREPROCESS_OPTIONS = ("scale", "mean", "std", "resize", "channels")
_COMMON_OPTIONS = (*_PREPROCESS_OPTIONS, "per_class", "limit")
_KIND_OPTIONS: dict[str, tuple[str, ...]] = {
    "digits": (),
    "mnist": ("split",),
    "npz": ("layout",),
    "folder": (),
}
_ALL_OPTIONS = tuple(sorted({*_COMMON_OPTIONS, "split", "layout"}))
_MNIST_SPLITS = {"test": "t10k", "train": "train"}
_SLICE_RE = re.compile(r"\s*([+-]?\d+)?\s*:\s*([+-]?\d+)?\s*(?::\s*([+-]?\d+)?\s*)?")


def _error(where: str, message: str) -> DataError:
    """A one-line DataError that names the spec (or file) it is about."""
    return DataError(f"data '{where}': {message}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Preprocessing settings
# ---------------------------------------------------------------------------------------------


def _parse_float(text: str, key: str, where: str) -> float:
    """A float, also written as a fraction such as ``1/255``."""
    try:
        if "/" in text:
            numerator, denominator = text.split("/", 1)
            value = float(numerator) / float(denominator)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise _error(where, f"{key}={text!r} is not a number") from None
    return value


def _parse_floats(text: str, key: str, where: str) -> tuple[float, ...]:
    items = [item for item in text.replace(" ", "").split(",") if item]
    if not items:
        raise _error(where, f"{key} is empty; give one number or one per channel")
    return tuple(_parse_float(item, key, where) for item in items)


def _parse_resize(text: str, where: str) -> tuple[int, int]:
    items = re.split(r"[x,X*]", text.strip())
    try:
        sizes = [int(item) for item in items]
    except ValueError:
        raise _error(where, f"resize={text!r} is not N or HxW (e.g. resize=32x32)") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2:
        raise _error(where, f"resize={text!r} is not N or HxW (e.g. resize=32x32)")
    return sizes[0], sizes[1]


def _parse_int(text: str, key: str, where: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise _error(where, f"{key}={text!r} is not an integer") from None


@dataclass(frozen=True)
class Preprocess:
    """How raw pixels become the float32 NCHW tensor a model expects.

    Attributes:
        scale: multiply raw pixels by this first; None picks it from the source (1/255 for
            uint8 images, 1/16 for digits, 1 for float arrays).
        mean: subtracted per channel after scaling, resizing and channel conversion.
        std: divides per channel after the mean.
        resize: (H, W) target, bilinear.
        channels: 1 or 3; 1 -> 3 repeats grey, 3 -> 1 averages.
        layout: layout of the source arrays ("NCHW" or "NHWC"); the output is always NCHW.
    """

    scale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    resize: tuple[int, int] | None = None
    channels: int | None = None
    layout: str = "NCHW"

    def __post_init__(self) -> None:
        # Callers may pass lists; tuples keep the dataclass hashable and comparable.
        for name in ("mean", "std", "resize"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        if self.scale is not None and (not math.isfinite(self.scale) or self.scale == 0):
            raise DataError(f"preprocess scale={self.scale} must be a finite non-zero number")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and (not values or not all(map(math.isfinite, values))):
                raise DataError(f"preprocess {name}={values} must be finite numbers")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise DataError(f"preprocess std={self.std} must be positive")
        if self.resize is not None and (len(self.resize) != 2 or min(self.resize) < 1):
            raise DataError(f"preprocess resize={self.resize} must be two positive sizes (H, W)")
        if self.channels is not None and self.channels not in (1, 3):
            raise DataError(f"preprocess channels={self.channels} must be 1 or 3")
        if self.layout not in ("NCHW", "NHWC"):
            raise DataError(f"preprocess layout={self.layout!r} must be NCHW or NHWC")

    @classmethod
    def from_options(cls, options: Mapping[str, str], where: str) -> Preprocess:
        """Build from textual options (``scale``, ``mean``, ``std``, ``resize``, ``channels``,
        ``layout``); other keys are ignored.

        Raises:
            DataError: a value does not parse or is out of range; the message names ``where``.
        """
        values: dict[str, object] = {}
        if "scale" in options:
            values["scale"] = _parse_float(options["scale"], "scale", where)
        for key in ("mean", "std"):
            if key in options:
                values[key] = _parse_floats(options[key], key, where)
        if "resize" in options:
            values["resize"] = _parse_resize(options["resize"], where)
        if "channels" in options:
            values["channels"] = _parse_int(options["channels"], "channels", where)
        if "layout" in options:
            values["layout"] = options["layout"].strip().upper()
        try:
            return cls(**values)  # type: ignore[arg-type]
        except DataError as exc:
            raise _error(where, str(exc)) from None

    @classmethod
    def from_metadata(cls, props: Mapping[str, str]) -> Preprocess | None:
        """Read the ``onnxcompress.preprocess.*`` keys of a model's metadata.

        A stored ``scale`` is ignored: the raw pixel range belongs to the data source (uint8
        images 1/255, digits 1/16), while the model only fixes what follows (mean, std, size,
        channels). Honouring it would make a digits-trained model scale MNIST bytes by 1/16.

        Returns:
            The settings, or None when the metadata has none of the keys.

        Raises:
            DataError: a key is present but its value does not parse.
        """
        options = {
            key[len(METADATA_PREFIX) :]: value
            for key, value in props.items()
            if key.startswith(METADATA_PREFIX)
        }
        options = {
            key: value
            for key, value in options.items()
            if key in _PREPROCESS_OPTIONS and key != "scale"
        }
        if not options:
            return None
        return cls.from_options(options, "model metadata")

    def to_metadata(self) -> dict[str, str]:
        """The set fields as ``onnxcompress.preprocess.*`` metadata entries (exact round trip).

        ``scale`` is not stored: it belongs to the data source (see ``from_metadata``).
        """
        props: dict[str, str] = {}
        if self.mean is not None:
            props["mean"] = ",".join(repr(float(v)) for v in self.mean)
        if self.std is not None:
            props["std"] = ",".join(repr(float(v)) for v in self.std)
        if self.resize is not None:
            props["resize"] = f"{self.resize[0]},{self.resize[1]}"
        if self.channels is not None:
            props["channels"] = str(self.channels)
        return {METADATA_PREFIX + key: value for key, value in props.items()}

    def merged(self, other: Preprocess | None) -> Preprocess:
        """These settings with every field that ``other`` sets taking precedence.

        ``layout`` counts as set in ``other`` only when it differs from the default "NCHW".
        """
        if other is None:
            return self
        changes: dict[str, object] = {
            field.name: getattr(other, field.name)
            for field in dataclasses.fields(other)
            if field.name != "layout" and getattr(other, field.name) is not None
        }
        if other.layout != "NCHW":
            changes["layout"] = other.layout
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Spec parsing
# ---------------------------------------------------------------------------------------------


@dataclass
class DataSpec:
    """A parsed data spec (see the module docstring for the grammar).

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
        return _parse_int(self.options["limit"], "limit", self.text)

    def preprocess(self) -> Preprocess:
        """The preprocessing options the spec sets (unset fields stay None)."""
        return Preprocess.from_options(self.options, self.text)


def _parse_slice(text: str, key: str, where: str) -> builtins.slice:
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    match = _SLICE_RE.fullmatch(body)
    if match is None:
        raise _error(where, f"{key} {text!r} is not a Python slice such as 0:500 or :100")
    start, stop, step = (int(group) if group is not None else None for group in match.groups())
    if step == 0:
        raise _error(where, f"{key} {text!r} has a zero step")
    return builtins.slice(start, stop, step)


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
        slice_ = _parse_slice(slice_match.group(2), "slice", text)
    kind, colon, path_text = head.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        hint = ""
        if not colon and Path(head).expanduser().exists():
            hint = f" (for a path write the kind first, e.g. folder:{head} or npz:{head})"
        raise _error(
            text, f"unknown kind {kind!r}; use digits, mnist:DIR, npz:FILE or folder:DIR{hint}"
        )
    path: Path | None = None
    if kind == "digits":
        if path_text.strip():
            raise _error(text, "digits is built in and takes no path; write just 'digits'")
    else:
        if not path_text.strip():
            raise _error(text, f"{kind} needs a path, e.g. {kind}:/data/{kind}")
        path = Path(path_text.strip()).expanduser()

    options: dict[str, str] = {}
    for item in query.split("&") if query else []:
        if not item.strip():
            continue
        key, eq, value = item.partition("=")
        key = key.strip().lower()
        if not eq:
            raise _error(text, f"option {item!r} has no value; write key=value")
        if key not in _ALL_OPTIONS:
            raise _error(text, f"unknown option {key!r}; valid options: {', '.join(_ALL_OPTIONS)}")
        if key not in _COMMON_OPTIONS and key not in _KIND_OPTIONS[kind]:
            owner = next(k for k, keys in _KIND_OPTIONS.items() if key in keys)
            raise _error(text, f"option {key!r} applies to {owner} data only")
        if key in options:
            raise _error(text, f"option {key!r} is given twice")
        options[key] = value.strip()

    per_class = None
    if "per_class" in options:
        raw = options.pop("per_class")
        per_class = (
            builtins.slice(0, _parse_int(raw, "per_class", text))
            if ":" not in raw
            else _parse_slice(raw, "per_class", text)
        )
    if "split" in options and options["split"].lower() not in _MNIST_SPLITS:
        raise _error(text, f"split={options['split']!r} must be test or train")
    parsed = DataSpec(kind, path, slice_, per_class, options, text)
    if parsed.limit is not None and parsed.limit < 0:
        raise _error(text, f"limit={parsed.limit} must be zero or more")
    parsed.preprocess()  # validates the preprocessing values now, before any file is read
    return parsed


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Preprocessed images (float32, NCHW, contiguous) with optional int64 labels.

    Attributes:
        x: the images, shape (N, C, H, W).
        y: labels in 0..K-1, shape (N,), or None for unlabeled data.
        name: the spec the data came from.
        classes: class names indexed by label, when known.
    """

    x: np.ndarray
    y: np.ndarray | None
    name: str
    classes: list[str] | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.x.dtype != np.float32:
            raise ValueError(f"Dataset.x must be float32 NCHW, got {self.x.dtype} {self.x.shape}")
        if self.y is not None and self.y.shape != (self.x.shape[0],):
            raise ValueError(f"Dataset.y has shape {self.y.shape}, x has {self.x.shape[0]} images")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        """Consecutive (images, labels) batches in order; the last one may be shorter."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        for start in range(0, len(self), batch_size):
            stop = start + batch_size
            yield self.x[start:stop], None if self.y is None else self.y[start:stop]

    def subset(self, index: slice | np.ndarray) -> Dataset:
        """A copy holding the images picked by a slice, an index array or a boolean mask."""
        x = np.ascontiguousarray(self.x[index])
        y = None if self.y is None else np.ascontiguousarray(self.y[index])
        return Dataset(x, y, self.name, self.classes)

    def spread(self, count: int | None) -> Dataset:
        """``count`` images spread evenly over the data set (itself when it holds no more).

        Use this, not the first ``count``, wherever a few images must stand for the whole set:
        image folders are read class by class, so the first 512 CIFAR-10 test images are all
        airplanes.
        """
        if count is None or count >= len(self):
            return self
        return self.subset(spread_index(len(self), count))


def spread_index(total: int, count: int | None) -> np.ndarray:
    """``count`` strictly increasing indices spread evenly over ``range(total)``.

    All of ``range(total)`` when ``count`` is None or not smaller. Every run of ``total/count``
    consecutive items contributes one, so a data set sorted by class keeps every class in its
    proportion.
    """
    if count is None or count >= total:
        return np.arange(total)
    if count < 1:
        raise ValueError(f"count must be positive, got {count}")
    return (np.arange(count, dtype=np.int64) * total) // count


@dataclass
class _Source:
    """Raw data before selection: labels are known up front, pixels are fetched on demand."""

    count: int
    labels: np.ndarray | None
    classes: list[str] | None
    default_scale: float
    # Given indices, returns an NCHW array (any dtype) or a list of CHW arrays (mixed sizes).
    fetch: Callable[[np.ndarray], np.ndarray | list[np.ndarray]]


def load_dataset(
    spec: str, *, preprocess: Preprocess | None = None, cache_dir: Path | None = None
) -> Dataset:
    """Load and preprocess the data a spec names.

    Args:
        spec: see the module docstring.
        preprocess: defaults (e.g. from the model's metadata); the spec's options override it.
        cache_dir: where tar archives are extracted (default: ``$ONNXCOMPRESS_CACHE/datasets``
            or ``~/.cache/onnxcompress/datasets``).

    Raises:
        DataError: the spec is invalid, a file is missing or unreadable, the selection is
            empty, or preprocessing yields non-finite values.
    """
    parsed = parse_spec(spec)
    settings = (preprocess or Preprocess()).merged(parsed.preprocess())
    where = parsed.text
    started = time.perf_counter()
    if parsed.kind == "digits":
        source = _digits_source()
    elif parsed.kind == "mnist":
        assert parsed.path is not None
        source = _mnist_source(parsed.path, parsed.options.get("split"), where)
    elif parsed.kind == "npz":
        assert parsed.path is not None
        source = _npz_source(parsed.path, settings.layout, where)
    else:
        assert parsed.path is not None
        root = _resolve_folder(parsed.path, cache_dir, where)
        source = _folder_source(root, settings.channels, where)
    if source.count == 0:
        raise _error(where, "the data holds no images")
    index = _select(source, parsed, where)
    raw = source.fetch(index)
    x = _apply_preprocess(raw, settings, source.default_scale, where)
    y = None if source.labels is None else source.labels[index].astype(np.int64)
    elapsed = time.perf_counter() - started
    logger.info("data %s: %d images %s in %.1f s", where, x.shape[0], x.shape[1:], elapsed)
    return Dataset(x, y, parsed.text, source.classes)


def _select(source: _Source, spec: DataSpec, where: str) -> np.ndarray:
    index = np.arange(source.count)
    if spec.per_class is not None:
        if source.labels is None:
            raise _error(where, "per_class needs labels, and this data has none")
        keep = np.zeros(source.count, dtype=bool)
        for label in np.unique(source.labels):
            keep[np.flatnonzero(source.labels == label)[spec.per_class]] = True
        index = np.flatnonzero(keep)
    if spec.slice is not None:
        index = index[spec.slice]
    if spec.limit is not None:
        index = index[: spec.limit]
    if index.size == 0:
        raise _error(where, f"the selection is empty (the data holds {source.count} images)")
    return index


def _apply_preprocess(
    raw: np.ndarray | list[np.ndarray], settings: Preprocess, default_scale: float, where: str
) -> np.ndarray:
    """float32, times scale, resize, channel conversion, then per-channel normalization."""
    scale = settings.scale if settings.scale is not None else default_scale
    if isinstance(raw, list):
        shapes = sorted({image.shape for image in raw})
        if len(shapes) > 1 and settings.resize is None:
            raise _error(
                where,
                f"images differ in size ({_hw(shapes[0])} and {_hw(shapes[-1])}); add ?resize=HxW",
            )
        if len(shapes) == 1:
            raw = np.stack(raw)
    if isinstance(raw, list):
        assert settings.resize is not None
        x = np.stack([_resize(_scaled(image[None], scale), settings.resize)[0] for image in raw])
    else:
        x = _scaled(raw, scale)
        if settings.resize is not None and x.shape[2:] != settings.resize:
            x = _resize(x, settings.resize)
    x = _convert_channels(x, settings.channels, where)
    if settings.mean is not None or settings.std is not None:
        channels = x.shape[1]
        mean = _per_channel(settings.mean or (0.0,), channels, "mean", where)
        std = _per_channel(settings.std or (1.0,), channels, "std", where)
        x -= mean
        x /= std
    if not np.isfinite(x).all():
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise _error(where, f"{bad} values are NaN or infinite after preprocessing")
    return np.ascontiguousarray(x, dtype=np.float32)


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[-2]}x{shape[-1]}"


def _scaled(raw: np.ndarray, scale: float) -> np.ndarray:
    x = np.array(raw, dtype=np.float32, order="C")  # always a copy: callers edit in place
    if scale != 1.0:
        x *= np.float32(scale)
    return x


def _resize(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of every (image, channel) plane with Pillow's float mode.

    Pillow widens the filter when shrinking (antialiasing), as torchvision's Resize does on
    PIL images, so a model trained with that pipeline sees the same pixels.
    """
    from PIL import Image

    height, width = size
    out = np.empty((*x.shape[:2], height, width), dtype=np.float32)
    for i in range(x.shape[0]):
        for c in range(x.shape[1]):
            plane = Image.fromarray(np.ascontiguousarray(x[i, c]))
            out[i, c] = np.asarray(plane.resize((width, height), Image.Resampling.BILINEAR))
    return out


def _convert_channels(x: np.ndarray, channels: int | None, where: str) -> np.ndarray:
    have = x.shape[1]
    if channels is None or channels == have:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if have == 3 and channels == 1:
        return x.mean(axis=1, keepdims=True, dtype=np.float32)
    raise _error(where, f"cannot convert {have} channels to {channels}; only 1 <-> 3 is supported")


def _per_channel(values: tuple[float, ...], channels: int, key: str, where: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise _error(
            where,
            f"{key} has {len(values)} values but the images have {channels} channel(s); "
            f"give 1 or {channels}",
        )
    array = np.asarray(values, dtype=np.float32)
    return np.broadcast_to(array, (channels,)).reshape(1, channels, 1, 1)


def fit_to_input(ds: Dataset, input_shape: Sequence[int | str | None]) -> Dataset:
    """Check that the images match a model input shape [N, C, H, W]; never resizes.

    Symbolic dims (strings, None, non-positive ints) match anything.

    Returns:
        ``ds`` itself when it fits.

    Raises:
        DataError: the input is not 4-D, or C/H/W disagree; the message says which option to
            add to the spec (``?channels=3``, ``?resize=32x32``).
    """
    dims = list(input_shape)
    shown = "[" + ", ".join(str(d) if d is not None else "?" for d in dims) + "]"
    if len(dims) != 4:
        raise _error(
            ds.name,
            f"the model input has shape {shown}; onnxcompress feeds images as (N, C, H, W)",
        )
    _, channels, height, width = (_static_dim(d) for d in dims)
    have_c, have_h, have_w = (int(v) for v in ds.x.shape[1:])
    fixes: list[str] = []
    if channels is not None and channels != have_c:
        fixes.append(f"channels={channels}")
    if (height is not None and height != have_h) or (width is not None and width != have_w):
        want_h = height if height is not None else have_h
        want_w = width if width is not None else have_w
        fixes.append(f"resize={want_h}" if want_h == want_w else f"resize={want_h}x{want_w}")
    if fixes:
        joiner = "&" if "?" in ds.name else "?"
        raise _error(
            ds.name,
            f"images are {have_c}x{have_h}x{have_w} (CxHxW) but the model input is {shown}; "
            f"add {joiner}{'&'.join(fixes)} to the data spec",
        )
    return ds


def _static_dim(dim: object) -> int | None:
    """A fixed size, or None for a symbolic one (a name, None, -1, onnx_ir's SymbolicDim)."""
    if isinstance(dim, (int, np.integer)) and not isinstance(dim, bool) and dim > 0:
        return int(dim)
    return None


# ---------------------------------------------------------------------------------------------
# Sources
# ---------------------------------------------------------------------------------------------


def _array_source(
    x: np.ndarray, labels: np.ndarray | None, classes: list[str] | None, scale: float
) -> _Source:
    return _Source(len(x), labels, classes, scale, lambda index: x[index])


def _digits_source() -> _Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    return _array_source(images, labels, [str(d) for d in range(10)], 1.0 / 16.0)


def _default_scale(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 1.0 / 255.0
    if dtype == np.uint16:
        return 1.0 / 65535.0
    return 1.0


# -- MNIST idx ---------------------------------------------------------------------------------


def _find_idx(folder: Path, prefix: str, what: str) -> Path | None:
    kind = "idx3" if what == "images" else "idx1"
    for sep in ("-", "."):
        for suffix in ("", ".gz"):
            candidate = folder / f"{prefix}-{what}{sep}{kind}-ubyte{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, ndim: int, where: str) -> np.ndarray:
    """Read an idx file of unsigned bytes (the MNIST format: magic, big-endian dims, data)."""
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as stream:
                blob = stream.read()
        else:
            blob = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise _error(where, f"cannot read {path} ({_first_line(exc)})") from exc
    header = 4 + 4 * ndim
    if len(blob) < header or blob[:2] != b"\0\0" or blob[2] != 0x08 or blob[3] != ndim:
        raise _error(where, f"{path} is not an idx file of {ndim}-D unsigned bytes")
    dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(blob) != expected:
        raise _error(
            where, f"{path} holds {len(blob)} bytes, its header {dims} needs {expected}; truncated?"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def _mnist_source(path: Path, split: str | None, where: str) -> _Source:
    if path.is_file():
        images_path: Path | None = path
        labels_path = path.parent / path.name.replace("images", "labels").replace("idx3", "idx1")
        labels_file = labels_path if labels_path != path and labels_path.is_file() else None
    elif path.is_dir():
        splits = [split.lower()] if split else ["test", "train"]
        images_path = labels_file = None
        for name in splits:
            images_path = _find_idx(path, _MNIST_SPLITS[name], "images")
            if images_path is not None:
                labels_file = _find_idx(path, _MNIST_SPLITS[name], "labels")
                break
        if images_path is None:
            wanted = " or ".join(f"{_MNIST_SPLITS[name]}-images-idx3-ubyte[.gz]" for name in splits)
            raise _error(where, f"no {wanted} in {path}")
    else:
        raise _error(where, f"no such file or folder: {path}")
    assert images_path is not None
    images = _read_idx(images_path, 3, where)
    labels = None
    if labels_file is not None:
        labels = _read_idx(labels_file, 1, where).astype(np.int64)
        if len(labels) != len(images):
            raise _error(where, f"{labels_file} has {len(labels)} labels for {len(images)} images")
    else:
        logger.warning("data %s: no labels next to %s; loading without", where, images_path)
    classes = [str(d) for d in range(10)] if labels is not None else None
    return _array_source(images[:, None], labels, classes, 1.0 / 255.0)


# -- npz ---------------------------------------------------------------------------------------


def _npz_source(path: Path, layout: str, where: str) -> _Source:
    if not path.is_file():
        raise _error(where, f"no such file: {path}")
    import zipfile

    # np.load calls anything that is neither zip nor .npy "pickled data": say what it is not.
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if not zipfile.is_zipfile(path) and magic != b"\x93NUMPY":
        raise _error(
            where, f"{path} is not a readable .npz (not a zip archive); save one with np.savez"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise _error(where, f"{path} is not a readable .npz ({_first_line(exc)})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise _error(
            where, f"{path} is a single array; save with np.savez(path, x=images, y=labels)"
        )
    with archive:
        keys = sorted(archive.files)
        if "x" not in keys:
            raise _error(
                where,
                f"{path} has arrays {keys} but needs 'x' (images) and optionally 'y' (labels)",
            )
        try:
            x = archive["x"]
            y = archive["y"] if "y" in keys else None
            classes = [str(c) for c in archive["classes"]] if "classes" in keys else None
        except (ValueError, OSError) as exc:
            raise _error(where, f"{path}: {_first_line(exc)}") from exc
    if x.dtype.kind not in "biuf":
        raise _error(where, f"{path}: x has dtype {x.dtype}; images must be numbers")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
    else:
        raise _error(
            where,
            f"{path}: x has shape {x.shape}; expected (N, C, H, W), (N, H, W, C) or (N, H, W)",
        )
    labels = None if y is None else _npz_labels(y, len(x), path, where)
    return _array_source(x, labels, classes, _default_scale(x.dtype))


def _npz_labels(y: np.ndarray, count: int, path: Path, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (count,):
        raise _error(where, f"{path}: y has shape {y.shape}, expected ({count},) class indices")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise _error(where, f"{path}: y has dtype {y.dtype}; labels must be integer class indices")
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise _error(where, f"{path}: y has negative labels; labels must be 0..K-1")
    return labels


# -- image folders and archives ----------------------------------------------------------------


def _resolve_folder(path: Path, cache_dir: Path | None, where: str) -> Path:
    """The image-folder root a ``folder:`` path names, extracting an archive when it is one."""
    if path.is_dir():
        return path
    parts = path.parts
    for end in range(1, len(parts) + 1):
        prefix = Path(*parts[:end])
        if prefix.is_file():
            archive, inside = prefix, parts[end:]
            break
        if not prefix.exists():
            raise _error(where, f"no such file or folder: {prefix}")
    else:  # pragma: no cover - a path whose every prefix exists is a file or folder above
        raise _error(where, f"no such file or folder: {path}")
    if not archive.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise _error(
            where,
            f"{archive} is a file, not a folder or a tar archive ({', '.join(ARCHIVE_SUFFIXES)})",
        )
    if ".." in inside:
        raise _error(where, "the path inside the archive may not contain '..'")
    root = extract_archive(archive, cache_dir, inside=inside, where=where).joinpath(*inside)
    if not root.is_dir():
        raise _error(where, f"{'/'.join(inside)!r} inside {archive.name} is a file, not a folder")
    return root


def _visible(entries: Sequence[os.DirEntry[str]]) -> list[os.DirEntry[str]]:
    return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _image_files(folder: str) -> list[str]:
    with os.scandir(folder) as it:
        return [
            e.path
            for e in _visible(list(it))
            if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
        ]


def _folder_source(root: Path, channels: int | None, where: str) -> _Source:
    with os.scandir(root) as it:
        entries = _visible(list(it))
    class_dirs = [e for e in entries if e.is_dir()]
    files: list[str] = []
    labels_list: list[int] = []
    classes: list[str] | None = None
    if class_dirs:
        classes = [e.name for e in class_dirs]
        for label, entry in enumerate(class_dirs):
            found = _image_files(entry.path)
            files.extend(found)
            labels_list.extend([label] * len(found))
    if not files:
        files = _image_files(str(root))
        classes, labels_list = None, []
    if not files:
        nested = (
            f"; its subfolders hold folders, not images: point the spec one level deeper, e.g. "
            f"{root / class_dirs[0].name}"
            if class_dirs
            else ""
        )
        raise _error(where, f"no images in {root} (one subfolder of images per class){nested}")
    labels = np.asarray(labels_list, dtype=np.int64) if classes is not None else None
    mode = "L" if channels == 1 else "RGB"

    def fetch(index: np.ndarray) -> np.ndarray | list[np.ndarray]:
        return _decode_images([files[i] for i in index], mode, where)

    return _Source(len(files), labels, classes, 1.0 / 255.0, fetch)


def _decode_images(paths: Sequence[str], mode: str, where: str) -> list[np.ndarray]:
    """Decode image files to uint8 CHW arrays; Pillow in a loop is ~0.2 ms per CIFAR JPEG."""
    from PIL import Image

    started = time.perf_counter()
    images: list[np.ndarray] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert(mode))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise _error(where, f"cannot read image {path} ({_first_line(exc)})") from exc
        images.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    logger.debug("decoded %d images in %.2f s", len(images), time.perf_counter() - started)
    return images


def default_cache_dir() -> Path:
    """Where archives are extracted: ``$ONNXCOMPRESS_CACHE/datasets``, else
    ``$XDG_CACHE_HOME/onnxcompress/datasets``, else ``~/.cache/onnxcompress/datasets``."""
    root = os.environ.get("ONNXCOMPRESS_CACHE")
    if root:
        return Path(root).expanduser() / "datasets"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "onnxcompress" / "datasets"


def extract_archive(
    archive: Path, cache_dir: Path | None = None, *, inside: Sequence[str] = (), where: str = ""
) -> Path:
    """Extract a tar archive (or only its folder ``inside``) once into the cache.

    Members keep their paths, so the wanted folder is ``result.joinpath(*inside)``. The cache
    entry is named after the archive's absolute path, size and mtime (a changed archive is
    extracted afresh) and the folder extracted; an entry holding an enclosing folder, or the
    whole archive, is reused. Extraction goes to a temp folder renamed into place at the end:
    a crash leaves no half-filled entry, and concurrent extractions both succeed. Every member
    is checked, also those outside ``inside``.

    Raises:
        DataError: the archive is unreadable, has no folder ``inside``, or holds a member that
            is not a plain file or folder, whose path is absolute or climbs out with '..', or
            it exceeds MAX_ARCHIVE_BYTES or MAX_ARCHIVE_MEMBERS; or the cache is not writable.
    """
    where = where or str(archive)
    archive = archive.expanduser().resolve()
    stat = archive.stat()
    key = _sha(f"{archive}\0{stat.st_size}\0{stat.st_mtime_ns}")
    root = (cache_dir if cache_dir is not None else default_cache_dir()).expanduser()
    prefix = tuple(part for part in inside if part not in ("", "."))

    def entry(depth: int) -> Path:
        return root / (key if depth == 0 else f"{key}-{_sha('/'.join(prefix[:depth]))[:12]}")

    for depth in range(len(prefix) + 1):
        if entry(depth).is_dir():
            logger.debug("data %s: reusing %s", where, entry(depth))
            return entry(depth)
    final = entry(len(prefix))
    shown = "/".join((archive.name, *prefix))
    logger.info("data %s: extracting %s into %s (once)", where, shown, final)
    started = time.perf_counter()
    partial: Path | None = None
    try:
        root.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=root))
        _extract_into(archive, partial, prefix, where)
        try:
            os.rename(partial, final)
        except OSError:
            if not final.is_dir():
                raise
            logger.debug("data %s: another process extracted %s first", where, shown)
    except OSError as exc:
        raise _error(
            where,
            f"cannot write the extraction cache {root} ({_first_line(exc)}); set "
            "ONNXCOMPRESS_CACHE to a writable folder",
        ) from exc
    finally:
        if partial is not None and partial.exists():
            shutil.rmtree(partial, ignore_errors=True)
    logger.info("data %s: extracted in %.1f s", where, time.perf_counter() - started)
    return final


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _member_kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "FIFO"
    if member.issparse():
        return "sparse file"
    return "special member"


def _member_parts(name: str, where: str) -> tuple[str, ...]:
    """The path components of a member, refusing any path that could leave the target folder."""
    # Plain string splitting: PurePosixPath costs seconds on a 60,000-member archive.
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name):
        raise _error(where, f"archive member {name!r} has an absolute path; refusing to extract")
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise _error(where, f"archive member {name!r} climbs out with '..'; refusing to extract")
    return parts


def _extract_into(archive: Path, dest: Path, prefix: tuple[str, ...], where: str) -> None:
    """Stream the members under ``prefix`` into ``dest``, creating only folders and files.

    Links and devices are refused rather than skipped: a dataset never needs them, and an
    archive that has them was not made for this.
    """
    members = 0
    total = 0
    extracted = 0
    top_level: set[str] = set()
    made: set[Path] = set()
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                members += 1
                if members > MAX_ARCHIVE_MEMBERS:
                    raise _error(
                        where, f"{archive.name} has more than {MAX_ARCHIVE_MEMBERS} members"
                    )
                parts = _member_parts(member.name, where)
                if parts:
                    top_level.add(parts[0])
                if member.isdir():
                    # Made even when empty: an empty class folder still takes a label.
                    if parts[: len(prefix)] == prefix:
                        dest.joinpath(*parts).mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isreg() or member.issparse() or not parts:
                    raise _error(
                        where,
                        f"archive member {member.name!r} is a {_member_kind(member)}; only "
                        "plain files and folders are extracted",
                    )
                total += member.size
                if total > MAX_ARCHIVE_BYTES:
                    raise _error(
                        where,
                        f"{archive.name} unpacks to more than {MAX_ARCHIVE_BYTES} bytes "
                        "(onnxcompress.data.MAX_ARCHIVE_BYTES)",
                    )
                if parts[: len(prefix)] != prefix:
                    continue
                if parts == prefix:
                    raise _error(
                        where, f"{'/'.join(prefix)!r} inside {archive.name} is a file, not a folder"
                    )
                target = dest.joinpath(*parts)
                if target.parent not in made:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    made.add(target.parent)
                source = tar.extractfile(member)
                if source is None:  # pragma: no cover - isreg() members always have data
                    continue
                with source, open(target, "wb") as sink:
                    shutil.copyfileobj(source, sink)
                extracted += 1
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise _error(
            where, f"{archive} is not a readable tar archive ({_first_line(exc)})"
        ) from exc
    if prefix and not extracted:
        raise _error(
            where,
            f"no folder {'/'.join(prefix)!r} with files inside {archive.name}; its top level "
            f"holds {sorted(top_level)[:10]}",
        )
