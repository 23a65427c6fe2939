"""Matching a data set to a model's input: checks channels and size against the input shape and
says which spec option fixes a mismatch; it never resizes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from onnxcompress.data.dataset import Dataset
from onnxcompress.data.messages import data_error


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
        raise data_error(
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
        raise data_error(
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
