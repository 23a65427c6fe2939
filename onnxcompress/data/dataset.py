"""The loaded data set: float32 NCHW images with optional labels, batching, subsets, and picking
a few images spread evenly so that a class-sorted set keeps every class."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


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
