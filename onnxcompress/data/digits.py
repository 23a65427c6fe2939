"""The ``digits`` source: scikit-learn's built-in 8x8 handwritten digits, no file and no download;
the default data when none is given."""

from __future__ import annotations

import numpy as np

from onnxcompress.data.source import Source, array_source


def digits_source() -> Source:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.images)[:, None]  # (1797, 1, 8, 8), values 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    return array_source(images, labels, [str(d) for d in range(10)], 1.0 / 16.0)
