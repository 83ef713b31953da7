"""Image decoding and resizing shared by conversion, training and serving."""

from __future__ import annotations

import tensorflow as tf

# TensorFlow's names for the resize methods the reference algorithm offers.
RESIZE_METHODS = (
    "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic",
)


def resize_image(image: tf.Tensor, image_size: int, interpolation: str) -> tf.Tensor:
    """Resize an RGB uint8 image [H, W, 3] to [image_size, image_size, 3] uint8.

    The single resize used at conversion time and inside the serving signature, so that a
    picture reaches the network with the same pixels in training and in production.
    Antialiasing is on: most inputs are larger than the model's input and are shrunk.
    """
    if interpolation not in RESIZE_METHODS:
        raise ValueError(f"unknown image_resize_interpolation {interpolation!r}; use one of {', '.join(RESIZE_METHODS)}")
    resized = tf.image.resize(
        tf.cast(image, tf.float32), (image_size, image_size), method=interpolation,
        antialias=interpolation != "nearest",
    )
    return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)
