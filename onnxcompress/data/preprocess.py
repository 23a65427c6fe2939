"""Preprocessing settings (scale, mean, std, resize, channels, layout), their round trip through
a model's metadata, and applying them to raw pixels to get the float32 NCHW tensor."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from onnxcompress.data.messages import data_error
from onnxcompress.data.option_values import parse_float, parse_floats, parse_int, parse_resize
from onnxcompress.errors import DataError

METADATA_PREFIX = "onnxcompress.preprocess."
PREPROCESS_OPTIONS = ("scale", "mean", "std", "resize", "channels")


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
            values["scale"] = parse_float(options["scale"], "scale", where)
        for key in ("mean", "std"):
            if key in options:
                values[key] = parse_floats(options[key], key, where)
        if "resize" in options:
            values["resize"] = parse_resize(options["resize"], where)
        if "channels" in options:
            values["channels"] = parse_int(options["channels"], "channels", where)
        if "layout" in options:
            values["layout"] = options["layout"].strip().upper()
        try:
            return cls(**values)  # type: ignore[arg-type]
        except DataError as exc:
            raise data_error(where, str(exc)) from None

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
            if key in PREPROCESS_OPTIONS and key != "scale"
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


def apply_preprocess(
    raw: np.ndarray | list[np.ndarray], settings: Preprocess, default_scale: float, where: str
) -> np.ndarray:
    """float32, times scale, resize, channel conversion, then per-channel normalization."""
    scale = settings.scale if settings.scale is not None else default_scale
    if isinstance(raw, list):
        shapes = sorted({image.shape for image in raw})
        if len(shapes) > 1 and settings.resize is None:
            raise data_error(
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
        raise data_error(where, f"{bad} values are NaN or infinite after preprocessing")
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
    raise data_error(
        where, f"cannot convert {have} channels to {channels}; only 1 <-> 3 is supported"
    )


def _per_channel(values: tuple[float, ...], channels: int, key: str, where: str) -> np.ndarray:
    if len(values) not in (1, channels):
        raise data_error(
            where,
            f"{key} has {len(values)} values but the images have {channels} channel(s); "
            f"give 1 or {channels}",
        )
    array = np.asarray(values, dtype=np.float32)
    return np.broadcast_to(array, (channels,)).reshape(1, channels, 1, 1)
