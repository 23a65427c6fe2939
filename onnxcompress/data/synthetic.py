"""Synthetic calibration images for data-free fits: noise with the statistics of natural images.

A pass that fits on activations can run without the user's data by probing the network with
inputs it makes itself. White noise is a poor probe: a trained network's first layers respond
to edges and smooth regions, and white noise has neither. Natural images have an amplitude
spectrum that falls as ``1/f`` (Field 1987) and strongly correlated colour channels, so the
probe here is ``1/f`` noise over the spatial axes with one shared component across channels,
standardized to zero mean and unit variance per channel: what a model sees after the usual
per-channel normalization.

Measured on the shared CIFAR-10 ResNet-20 (``merge`` with these fits against the filters-only
criterion, ``docs/methods/lrf_merge.md#data-free-fits``). It assumes normalized inputs; a model
that takes raw 0-255 pixels sees a different range than it was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Share of each colour channel's variance that is common to all channels: natural RGB images
# correlate at about 0.6-0.9 between channels.
SHARED_VARIANCE = 0.7
# Spectral exponent of the amplitude: 1/f^EXPONENT.
EXPONENT = 2.0


def natural_noise(
    shape: Sequence[int], *, seed: int = 0, channels_last: bool = False
) -> np.ndarray:
    """A float32 batch of ``shape`` (``[N, C, H, W]``, or ``[N, H, W, C]`` with
    ``channels_last``) of 1/f noise, zero mean and unit variance per channel.

    Other ranks get standard normal noise (no spatial axes to shape a spectrum on).
    """
    rng = np.random.default_rng(seed)
    dims = tuple(int(d) for d in shape)
    if len(dims) != 4:
        return rng.standard_normal(dims).astype(np.float32)
    if channels_last:
        count, height, width, channels = dims
    else:
        count, channels, height, width = dims
    frequency = np.sqrt(np.fft.fftfreq(height)[:, None] ** 2 + np.fft.rfftfreq(width)[None, :] ** 2)
    amplitude = np.zeros_like(frequency)
    amplitude[frequency > 0] = frequency[frequency > 0] ** -EXPONENT

    def field(n: int) -> np.ndarray:
        phases = rng.standard_normal((n, height, width // 2 + 1)) + 1j * rng.standard_normal(
            (n, height, width // 2 + 1)
        )
        image = np.fft.irfft2(phases * amplitude, s=(height, width))
        image -= image.mean(axis=(1, 2), keepdims=True)
        std = image.std(axis=(1, 2), keepdims=True)
        return np.divide(image, std, out=np.zeros_like(image), where=std > 0)

    shared = field(count)[:, None]
    own = field(count * channels).reshape(count, channels, height, width)
    images = np.sqrt(SHARED_VARIANCE) * shared + np.sqrt(1 - SHARED_VARIANCE) * own
    images -= images.mean(axis=(0, 2, 3), keepdims=True)
    std = images.std(axis=(0, 2, 3), keepdims=True)
    images = np.divide(images, std, out=np.zeros_like(images), where=std > 0)
    if channels_last:
        images = images.transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images, dtype=np.float32)
