"""Loading the data a spec names: pick its source, select images (per class, slice, limit) before
reading any, then preprocess them into a ``Dataset``."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from onnxcompress.data.dataset import Dataset
from onnxcompress.data.digits import digits_source
from onnxcompress.data.image_folder import folder_source, resolve_folder
from onnxcompress.data.messages import data_error
from onnxcompress.data.mnist import mnist_source
from onnxcompress.data.npz import npz_source
from onnxcompress.data.preprocess import Preprocess, apply_preprocess
from onnxcompress.data.source import Source
from onnxcompress.data.spec import DataSpec, parse_spec

logger = logging.getLogger(__name__)


def load_dataset(
    spec: str, *, preprocess: Preprocess | None = None, cache_dir: Path | None = None
) -> Dataset:
    """Load and preprocess the data a spec names.

    Args:
        spec: see the ``onnxcompress.data`` docstring.
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
        source = digits_source()
    elif parsed.kind == "mnist":
        assert parsed.path is not None
        source = mnist_source(parsed.path, parsed.options.get("split"), where)
    elif parsed.kind == "npz":
        assert parsed.path is not None
        source = npz_source(parsed.path, settings.layout, where)
    else:
        assert parsed.path is not None
        root = resolve_folder(parsed.path, cache_dir, where)
        source = folder_source(root, settings.channels, where)
    if source.count == 0:
        raise data_error(where, "the data holds no images")
    index = _select(source, parsed, where)
    raw = source.fetch(index)
    x = apply_preprocess(raw, settings, source.default_scale, where)
    y = None if source.labels is None else source.labels[index].astype(np.int64)
    elapsed = time.perf_counter() - started
    logger.info("data %s: %d images %s in %.1f s", where, x.shape[0], x.shape[1:], elapsed)
    return Dataset(x, y, parsed.text, source.classes)


def _select(source: Source, spec: DataSpec, where: str) -> np.ndarray:
    index = np.arange(source.count)
    if spec.per_class is not None:
        if source.labels is None:
            raise data_error(where, "per_class needs labels, and this data has none")
        keep = np.zeros(source.count, dtype=bool)
        for label in np.unique(source.labels):
            keep[np.flatnonzero(source.labels == label)[spec.per_class]] = True
        index = np.flatnonzero(keep)
    if spec.slice is not None:
        index = index[spec.slice]
    if spec.limit is not None:
        index = index[: spec.limit]
    if index.size == 0:
        raise data_error(where, f"the selection is empty (the data holds {source.count} images)")
    return index
