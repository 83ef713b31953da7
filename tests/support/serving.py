"""Model folders for the serving tests: a real small_cnn exported by trainer.train.export, two that must not serve."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from trainer.hyperparameters import Hyperparameters
from trainer.layout import SAVED_MODEL_DIR
from trainer.train import export
from trainer.train import model as model_lib

SIZE = 16


def small_model_dir(path: str | Path, labels: list[str], *, nan_head: bool = False, seed: int = 0) -> str:
    """An untrained small_cnn (random weights, so every image gets its own probabilities) exported as
    training exports it; with ``nan_head`` its head's bias is NaN, so every probability is NaN."""
    keras.utils.set_random_seed(seed)
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, augmentation=False)
    model = model_lib.build_model(hp, len(labels))
    if nan_head:
        dense = model_lib.head_dense(model)
        kernel, bias = dense.get_weights()
        dense.set_weights([kernel, np.full_like(bias, np.nan)])
    export.export_model(model, str(path), hp=hp, label_map={label: i for i, label in enumerate(labels)},
                        history={"loss": [0.7]})
    return str(path)


def break_signature(model_dir: str | Path) -> str:
    """Replace the folder's SavedModel by one whose serving_default takes pixels, not encoded images (as an
    export from another tool, or a hand-edited one, would): Keras and its label map still load."""

    class Pixels(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.float32, name="pixels")])
        def serve(self, pixels):
            return {"probabilities": tf.reduce_mean(pixels, axis=[1, 2])}

    target = Path(model_dir, SAVED_MODEL_DIR)
    shutil.rmtree(target)
    module = Pixels()
    tf.saved_model.save(module, str(target), signatures={"serving_default": module.serve})
    return str(model_dir)
