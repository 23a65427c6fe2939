"""The ``mnist`` source: MNIST idx files (gzipped or not), a folder holding the test and/or train
split, or one images file with its labels file next to it."""

from __future__ import annotations

import gzip
import logging
import math
import zlib
from pathlib import Path

import numpy as np

from onnxcompress.data.messages import data_error, first_line
from onnxcompress.data.source import Source, array_source
from onnxcompress.data.spec import MNIST_SPLITS

logger = logging.getLogger(__name__)


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
        raise data_error(where, f"cannot read {path} ({first_line(exc)})") from exc
    header = 4 + 4 * ndim
    if len(blob) < header or blob[:2] != b"\0\0" or blob[2] != 0x08 or blob[3] != ndim:
        raise data_error(where, f"{path} is not an idx file of {ndim}-D unsigned bytes")
    dims = tuple(int.from_bytes(blob[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(blob) != expected:
        raise data_error(
            where, f"{path} holds {len(blob)} bytes, its header {dims} needs {expected}; truncated?"
        )
    return np.frombuffer(blob, dtype=np.uint8, offset=header).reshape(dims)


def mnist_source(path: Path, split: str | None, where: str) -> Source:
    if path.is_file():
        images_path: Path | None = path
        labels_path = path.parent / path.name.replace("images", "labels").replace("idx3", "idx1")
        labels_file = labels_path if labels_path != path and labels_path.is_file() else None
    elif path.is_dir():
        splits = [split.lower()] if split else ["test", "train"]
        images_path = labels_file = None
        for name in splits:
            images_path = _find_idx(path, MNIST_SPLITS[name], "images")
            if images_path is not None:
                labels_file = _find_idx(path, MNIST_SPLITS[name], "labels")
                break
        if images_path is None:
            wanted = " or ".join(f"{MNIST_SPLITS[name]}-images-idx3-ubyte[.gz]" for name in splits)
            raise data_error(where, f"no {wanted} in {path}")
    else:
        raise data_error(where, f"no such file or folder: {path}")
    assert images_path is not None
    images = _read_idx(images_path, 3, where)
    labels = None
    if labels_file is not None:
        labels = _read_idx(labels_file, 1, where).astype(np.int64)
        if len(labels) != len(images):
            raise data_error(
                where, f"{labels_file} has {len(labels)} labels for {len(images)} images"
            )
    else:
        logger.warning("data %s: no labels next to %s; loading without", where, images_path)
    classes = [str(d) for d in range(10)] if labels is not None else None
    return array_source(images[:, None], labels, classes, 1.0 / 255.0)
