"""The ``npz`` source: a NumPy ``.npz`` with images ``x`` (NCHW, NHWC or grey NHW), optional
labels ``y`` and class names ``classes``; pickled arrays are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxcompress.data.messages import data_error, first_line
from onnxcompress.data.source import Source, array_source, default_scale_for


def npz_source(path: Path, layout: str, where: str) -> Source:
    if not path.is_file():
        raise data_error(where, f"no such file: {path}")
    import zipfile

    # np.load calls anything that is neither zip nor .npy "pickled data": say what it is not.
    with open(path, "rb") as handle:
        magic = handle.read(6)
    if not zipfile.is_zipfile(path) and magic != b"\x93NUMPY":
        raise data_error(
            where, f"{path} is not a readable .npz (not a zip archive); save one with np.savez"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise data_error(where, f"{path} is not a readable .npz ({first_line(exc)})") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise data_error(
            where, f"{path} is a single array; save with np.savez(path, x=images, y=labels)"
        )
    with archive:
        keys = sorted(archive.files)
        if "x" not in keys:
            raise data_error(
                where,
                f"{path} has arrays {keys} but needs 'x' (images) and optionally 'y' (labels)",
            )
        try:
            x = archive["x"]
            y = archive["y"] if "y" in keys else None
            classes = [str(c) for c in archive["classes"]] if "classes" in keys else None
        except (ValueError, OSError) as exc:
            raise data_error(where, f"{path}: {first_line(exc)}") from exc
    if x.dtype.kind not in "biuf":
        raise data_error(where, f"{path}: x has dtype {x.dtype}; images must be numbers")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if layout == "NHWC":
            x = x.transpose(0, 3, 1, 2)
    else:
        raise data_error(
            where,
            f"{path}: x has shape {x.shape}; expected (N, C, H, W), (N, H, W, C) or (N, H, W)",
        )
    labels = None if y is None else _npz_labels(y, len(x), path, where)
    return array_source(x, labels, classes, default_scale_for(x.dtype))


def _npz_labels(y: np.ndarray, count: int, path: Path, where: str) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (count,):
        raise data_error(where, f"{path}: y has shape {y.shape}, expected ({count},) class indices")
    if y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    if y.dtype.kind not in "iub":
        raise data_error(
            where, f"{path}: y has dtype {y.dtype}; labels must be integer class indices"
        )
    labels = y.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise data_error(where, f"{path}: y has negative labels; labels must be 0..K-1")
    return labels
