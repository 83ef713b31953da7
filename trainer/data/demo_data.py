"""Writes scikit-learn's handwritten digits as an image-folder data set of PNGs: real data that ships offline."""

from __future__ import annotations

import io
import logging

import numpy as np
from PIL import Image

from trainer import storage

log = logging.getLogger(__name__)

# load_digits holds 8x8 images of 17 gray levels: 0 (white paper) to 16 (full ink).
_DIGIT_MAX = 16


def write_digits(output_dir: str, scale: int = 1) -> dict[str, int]:
    """Write the 1,797 digits of ``sklearn.datasets.load_digits`` as ``output_dir/<digit>/<index>.png``.

    Each picture becomes an 8-bit grayscale PNG, gray levels 0-16 mapped linearly to 0-255 (rounded)
    and enlarged ``scale`` times with nearest-neighbour, so it stays exactly the original grid of
    values. Class folders are named "0" to "9"; file names are the sample's index in the data set.

    Returns:
      {class name: number of images written}.

    Raises:
      ImportError: scikit-learn is not installed (it is a dev/demo dependency only).
      ValueError: ``scale`` is not a positive whole number.
    """
    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive whole number, got {scale!r}")
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("write_digits needs scikit-learn, a development/demo dependency of imgclf: install it"
                          " with `pip install scikit-learn` (or `pip install -e .[dev]`)") from e
    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / _DIGIT_MAX)).astype(np.uint8)
    if scale > 1:
        pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    counts: dict[str, int] = {}
    for index, (image, target) in enumerate(zip(pixels, digits.target, strict=True)):
        label = str(int(target))
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, "PNG")
        storage.write_bytes(storage.join(output_dir, label, f"{index:04d}.png"), buffer.getvalue())
        counts[label] = counts.get(label, 0) + 1
    counts = dict(sorted(counts.items()))
    log.info("Wrote %d digits (%dx%d px) to %s: %s", len(pixels), 8 * scale, 8 * scale, output_dir, counts)
    return counts
