"""Write a trained model directory: Keras model, serving SavedModel, label map, hyperparameters, history.

The layout (pinned; prediction, evaluation and serving code read it)::

    model_dir/model.keras                            the Keras model (float32 RGB 0-255 in, probabilities out)
    model_dir/saved_model/                           TF SavedModel, signature "serving_default":
                                                       image_bytes: tf.string [None] (encoded JPEG/PNG,
                                                       any size) -> probabilities: float32 [None, K]
    model_dir/class_label_to_prediction_index.json   {class: index}; index = column of probabilities
    model_dir/hyperparameters.yaml                   the resolved hyperparameters of the run
    model_dir/history.json                           Keras History: {"loss": [...], "val_loss": [...], ...}
    model_dir/model.tflite                           TFLite, float32 pixels in (see trainer.train.tflite)
    model_dir/model_dynamic_range.tflite             the same, int8 weights (tflite_quantization=dynamic_range)

The SavedModel carries the pre-processing, so a client sends the file's bytes: they go through
``trainer.images.model_input`` (decoded by ``decode_tensor``, JPEGs at least twice the model's input
in both sides scaled down while decoding by ``jpeg_scale``'s rule, then resized by ``resize_image``),
the very function the training input pipeline applied to the training images, with the model's image
size and ``image_resize_interpolation``. (At full size ``decode_tensor`` gives the pixels of
``decode_image``, the Pillow decoder validation checked every training file with.) Binary models
answer [1 - p, p], so every model returns one probability per label.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence

import keras
import tensorflow as tf

from trainer import images, storage
from trainer.hyperparameters import Hyperparameters, write_resolved
from trainer.layout import (  # noqa: F401  (re-exported: the model folder's contract)
    HISTORY_FILE,
    HYPERPARAMETERS_FILE,
    KERAS_MODEL_FILE,
    MODEL_FILES,
    SAVED_MODEL_DIR,
)
from trainer.layout import MODEL_LABEL_MAP_FILE as LABEL_MAP_FILE
from trainer.train import tflite

log = logging.getLogger(__name__)

SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "image_bytes"
SERVING_OUTPUT = "probabilities"


def export_model(model: keras.Model, model_dir: str, *, hp: Hyperparameters, label_map: Mapping[str, int],
                 history: Mapping[str, Sequence[float]]) -> None:
    """Write every file of the model directory (a local path or gs:// URI); errors propagate.

    The files an earlier export left there (``layout.MODEL_FILES`` and ``saved_model/``) are replaced
    or removed, so the folder holds this model only; other files are left alone.

    ``model`` must take float32 [B, S, S, 3] (0-255, S = ``hp.input_size``) and return K
    probabilities, or one sigmoid output in binary mode; ``label_map`` maps each of the K class
    names to its output index.
    """
    _check_outputs(model, hp, label_map)
    if storage.is_gcs(model_dir):
        with tempfile.TemporaryDirectory(prefix="imgclf-export-") as local:
            _write(model, local, hp, label_map, history)
            written = storage.upload_tree(local, model_dir)
        # Then what this export did not write. Not atomic: upload_tree replaces the files one by one, so while
        # it runs the folder mixes this model's files with an earlier export's. Read it once the export has
        # returned (the pipeline's later steps do).
        for name in _owned(storage.list_files(model_dir)):
            if name not in written:
                storage.delete(storage.join(model_dir, name))
    else:
        directory = storage.local_path(model_dir)
        if os.path.isdir(directory):
            for name in _owned(storage.list_files(directory)):
                os.remove(os.path.join(directory, *name.split("/")))
            # A SavedModel left by an earlier export could keep files (or empty folders) the new one lacks.
            shutil.rmtree(os.path.join(directory, SAVED_MODEL_DIR), ignore_errors=True)
        _write(model, directory, hp, label_map, history)
    log.info("Exported the model to %s", model_dir)


def _owned(names: Sequence[str]) -> list[str]:
    """The names of a model folder's listing that export writes: every file of an earlier export, so
    none survives beside the new one (a model_dynamic_range.tflite the new run does not make, a
    variables shard of a differently sharded SavedModel). Other files are not export's to remove."""
    return [name for name in names if name in MODEL_FILES or name.startswith(f"{SAVED_MODEL_DIR}/")]


def _write(model: keras.Model, directory: str, hp: Hyperparameters, label_map: Mapping[str, int],
           history: Mapping[str, Sequence[float]]) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, KERAS_MODEL_FILE))
    saved_model = os.path.join(directory, SAVED_MODEL_DIR)
    write_saved_model(model, saved_model, image_size=hp.input_size,
                      interpolation=hp.image_resize_interpolation, binary=hp.binary_mode)
    ordered = dict(sorted(label_map.items(), key=lambda item: item[1]))
    _write_text(os.path.join(directory, LABEL_MAP_FILE), json.dumps(ordered, indent=1, ensure_ascii=False))
    write_resolved(hp, os.path.join(directory, HYPERPARAMETERS_FILE))
    tflite.write(model, directory, binary=hp.binary_mode, quantization=hp.tflite_quantization)
    plain = {str(name): [_number(v) for v in values] for name, values in history.items()}
    _write_text(os.path.join(directory, HISTORY_FILE), json.dumps(plain, indent=1))


def write_saved_model(model: keras.Model, path: str, *, image_size: int, interpolation: str,
                      binary: bool) -> None:
    """Export ``model`` as a SavedModel whose ``serving_default`` takes encoded images."""
    serve = serving_function(model, image_size=image_size, interpolation=interpolation, binary=binary)
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(name=SERVING_SIGNATURE, fn=serve,
                         input_signature=[tf.TensorSpec([None], tf.string, name=SERVING_INPUT)])
    archive.write_out(path, verbose=False)


def serving_function(model: keras.Model, *, image_size: int, interpolation: str, binary: bool):
    """encoded images tf.string [N] -> {"probabilities": float32 [N, K]}, as the SavedModel serves."""
    pixels_spec = tf.TensorSpec([image_size, image_size, 3], tf.uint8)

    def prepare(data: tf.Tensor) -> tf.Tensor:
        return images.model_input(data, image_size, interpolation)

    outputs = model.output_shape[-1]

    def predict(pixels: tf.Tensor) -> tf.Tensor:
        return tf.cast(model(tf.cast(pixels, tf.float32), training=False), tf.float32)

    def serve(image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        pixels = tf.map_fn(prepare, image_bytes, fn_output_signature=pixels_spec)
        # Some CPU kernels (oneDNN batch norm) fail on an empty batch; an empty request gets no rows.
        probabilities = tf.cond(tf.size(image_bytes) > 0, lambda: predict(pixels),
                                lambda: tf.zeros([0, outputs], tf.float32))
        if binary:
            probabilities = tf.concat([1.0 - probabilities, probabilities], axis=-1)
        return {SERVING_OUTPUT: probabilities}

    return serve


def _check_outputs(model: keras.Model, hp: Hyperparameters, label_map: Mapping[str, int]) -> None:
    outputs = model.output_shape[-1]
    expected = 1 if hp.binary_mode else len(label_map)
    if outputs != expected:
        raise ValueError(f"the model has {outputs} output(s) but the label map has {len(label_map)} classes "
                         f"(binary_mode={hp.binary_mode}, so {expected} expected)")
    if sorted(label_map.values()) != list(range(len(label_map))):
        raise ValueError(f"label map indices must be 0..{len(label_map) - 1}, each once; got {dict(label_map)}")
    size = model.input_shape[1]
    if size != hp.input_size:
        raise ValueError(f"the model takes {size}-pixel images but hp.input_size is {hp.input_size}")


def _number(value: float) -> float | None:
    # JSON has no NaN/Infinity; a diverged run's loss is written as null rather than breaking readers.
    value = float(value)
    return value if math.isfinite(value) else None


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text + "\n")
