"""Grad-CAM heat maps: which part of an image made the model predict a class.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a convolutional feature map by the mean
gradient of a class score with respect to it, sums the channels and keeps the positive part. Here
the feature map is the backbone's last one (the last layer inside the nested "backbone" model
whose output is still a [B, H, W, C] map, e.g. small_cnn's last ReLU or EfficientNet's
top_activation) and the class score is the head's logit (pre-softmax, so a confident prediction
still has a gradient). It works for every backbone of ``trainer.backbones`` because models built
by ``trainer.train.model.build_model`` are a chain: input -> augmentation/preprocessing layers ->
backbone -> head dropout -> head dense.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import ModelError
from trainer.train import model as model_lib


def last_feature_layer(backbone: keras.Model) -> keras.layers.Layer:
    """The last layer of ``backbone`` whose output is a 4-D feature map (not a pooling layer)."""
    for layer in reversed(backbone.layers):
        if isinstance(layer, keras.layers.InputLayer) or "Pooling" in type(layer).__name__:
            continue
        try:
            output = layer.output
        except (AttributeError, ValueError):  # A layer used at several places has no single output.
            continue
        if not isinstance(output, list | tuple) and len(output.shape) == 4:
            return layer
    raise ModelError(f"backbone {backbone.name!r} has no layer with a 4-D output to explain")


class GradCam:
    """Heat maps for a model built by ``trainer.train.model.build_model`` (float32 0-255 images in)."""

    def __init__(self, model: keras.Model):
        self.backbone = model_lib.backbone_of(model)  # ModelError when the model has no backbone
        self.dense = model_lib.head_dense(model)
        self.layer = last_feature_layer(self.backbone)
        # A model over the backbone's own graph that also hands out the feature map.
        self._inner = keras.Model(self.backbone.inputs[0], [self.layer.output, self.backbone.output])
        chain = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
        index = chain.index(self.backbone)
        self._before, self._after = chain[:index], chain[index + 1:]
        if not self._after or self._after[-1] is not self.dense:
            raise ModelError(f"model {model.name!r}: the head dense layer is not the last layer")
        self._after = self._after[:-1]
        self._binary = self.dense.units == 1

    def heatmaps(self, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Maps float32 [B, h, w] in [0, 1] (h x w: the feature map's size) for each image's class.

        ``images``: [B, S, S, 3] 0-255; ``classes``: the class index to explain per image (in binary
        mode 0 or 1; class 0's score is minus the positive logit). An image whose map has no positive
        part gets zeros.
        """
        features, gradients = self._gradients(tf.convert_to_tensor(images, tf.float32),
                                              tf.convert_to_tensor(np.asarray(classes), tf.int32))
        weights = tf.reduce_mean(gradients, axis=(1, 2), keepdims=True)
        maps = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1)).numpy()
        peak = maps.reshape(maps.shape[0], -1).max(axis=1)
        scale = np.where(peak > 0, peak, 1.0)
        return (maps / scale[:, None, None]).astype(np.float32)

    def _gradients(self, images: tf.Tensor, classes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        with tf.GradientTape() as tape:
            x = images
            for layer in self._before:
                x = layer(x, training=False)
            features, x = self._inner(x, training=False)
            tape.watch(features)
            for layer in self._after:
                x = layer(x, training=False)
            logits = tf.matmul(tf.cast(x, tf.float32), tf.cast(self.dense.kernel, tf.float32))
            if self.dense.use_bias:
                logits += tf.cast(self.dense.bias, tf.float32)
            if self._binary:
                score = logits[:, 0] * tf.where(classes == 1, 1.0, -1.0)
            else:
                score = tf.gather(logits, classes, axis=1, batch_dims=1)
        gradients = tape.gradient(score, features)
        return tf.cast(features, tf.float32), tf.cast(gradients, tf.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """``image`` uint8 [S, S, 3] with ``heatmap`` [h, w] in [0, 1] resized over it in a blue-to-red scale."""
    size = image.shape[:2]
    resized = tf.image.resize(heatmap[..., None], size, method="bilinear").numpy()[..., 0]
    colours = _colour_scale(np.clip(resized, 0.0, 1.0))
    blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
    return np.clip(blended, 0, 255).astype(np.uint8)


def _colour_scale(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> RGB 0-255: dark blue, cyan, yellow, red (a jet-like scale)."""
    red = np.clip(1.5 - np.abs(4 * values - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * values - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * values - 1), 0, 1)
    return np.stack([red, green, blue], axis=-1) * 255.0
