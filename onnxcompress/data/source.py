"""What every data source hands the loader: the image count and labels up front, and a fetch
function that reads only the images selected; plus sources over in-memory arrays."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass
class Source:
    """Raw data before selection: labels are known up front, pixels are fetched on demand."""

    count: int
    labels: np.ndarray | None
    classes: list[str] | None
    default_scale: float
    # Given indices, returns an NCHW array (any dtype) or a list of CHW arrays (mixed sizes).
    fetch: Callable[[np.ndarray], np.ndarray | list[np.ndarray]]


def array_source(
    x: np.ndarray, labels: np.ndarray | None, classes: list[str] | None, scale: float
) -> Source:
    return Source(len(x), labels, classes, scale, lambda index: x[index])


def default_scale_for(dtype: np.dtype) -> float:
    if dtype == np.uint8:
        return 1.0 / 255.0
    if dtype == np.uint16:
        return 1.0 / 65535.0
    return 1.0
