"""TensorFlow Lite export of a trained model, and inference with it.

Files (in the model directory, beside the SavedModel)::

    model.tflite                 float32 weights
    model_dynamic_range.tflite   weights quantised to int8, activations float (dynamic-range
                                 quantisation); written when tflite_quantization="dynamic_range"

Input contract (what a mobile app feeds it), the same for both files:
  input  "image": float32 [N, S, S, 3], RGB, values 0-255 (not normalised: the model carries its
         backbone's preprocessing), the image already resized to S x S (S = the model's input size,
         ``image_size`` in hyperparameters.yaml) with its ``image_resize_interpolation``; N is 1
         unless the app resizes the input tensor. A JPEG at least twice S in both sides is decoded
         scaled down by libjpeg first, by 1/2, 1/4 or 1/8 (``images.jpeg_scale``: the largest that
         leaves both sides at least S; Android's ``BitmapFactory.Options.inSampleSize`` asks libjpeg
         for the same scaling), as in
         training: ``images.model_input_array`` is this decode on the host (``predict`` uses it).
  output "probabilities": float32 [N, K], one probability per class in the order of
         class_label_to_prediction_index.json (binary models too: [1 - p, p]).
It differs from the SavedModel's only in that decoding and resizing happen in the app: TFLite has
no image decoding ops.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings

import keras
import numpy as np
import tensorflow as tf

from trainer.errors import ModelError
from trainer.layout import TFLITE_DYNAMIC_RANGE_FILE, TFLITE_FILE

log = logging.getLogger(__name__)

FLOAT_FILE = TFLITE_FILE
DYNAMIC_RANGE_FILE = TFLITE_DYNAMIC_RANGE_FILE
QUANTIZATION_FILES = {"none": None, "dynamic_range": DYNAMIC_RANGE_FILE}


def convert(model: keras.Model, *, binary: bool, quantization: str = "none") -> bytes:
    """The TFLite flatbuffer of ``model`` (float32 0-255 pixels in, probabilities [N, K] out)."""
    return _convert(model, binary=binary, quantizations=(quantization,))[quantization]


def _convert(model: keras.Model, *, binary: bool, quantizations: tuple[str, ...]) -> dict[str, bytes]:
    """``{quantization: flatbuffer}`` for each of ``quantizations``, from one export of the model.

    The model goes through a SavedModel with a pixels-in endpoint: converting a Keras 3 model from a
    concrete function can leave its weights as unfrozen resource variables (the file then answers NaN).
    """
    unknown = [q for q in quantizations if q not in QUANTIZATION_FILES]
    if unknown:
        raise ValueError(f"tflite quantization must be one of {', '.join(QUANTIZATION_FILES)}, got {unknown[0]!r}")
    size = model.input_shape[1]

    def serve(image):
        probabilities = tf.cast(model(image, training=False), tf.float32)
        if binary:
            probabilities = tf.concat([1.0 - probabilities, probabilities], axis=-1)
        return {"probabilities": probabilities}

    flatbuffers = {}
    with tempfile.TemporaryDirectory(prefix="imgclf-tflite-") as tmp:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(name="serve", fn=serve,
                             input_signature=[tf.TensorSpec([None, size, size, 3], tf.float32, name="image")])
        archive.write_out(tmp, verbose=False)
        for quantization in quantizations:
            converter = tf.lite.TFLiteConverter.from_saved_model(tmp, signature_keys=["serve"])
            if quantization == "dynamic_range":
                # No representative data set: weights become int8, activations stay float (dynamic range).
                converter.optimizations = [tf.lite.Optimize.DEFAULT]
            flatbuffers[quantization] = converter.convert()
    return flatbuffers


def write(model: keras.Model, directory: str, *, binary: bool, quantization: str = "none") -> list[str]:
    """Write model.tflite (and the quantised file ``quantization`` asks for) into a local directory,
    converting both from one export of the model."""
    kinds = ("none",) if quantization == "none" else ("none", quantization)
    written = []
    for kind, content in _convert(model, binary=binary, quantizations=kinds).items():
        path = os.path.join(directory, QUANTIZATION_FILES[kind] or FLOAT_FILE)
        with open(path, "wb") as handle:
            handle.write(content)
        written.append(path)
    log.info("Wrote %s", ", ".join(os.path.basename(p) for p in written))
    return written


class TfliteModel:
    """A TFLite file loaded into an interpreter: ``probabilities(uint8 or float [B, S, S, 3])``."""

    def __init__(self, content: bytes, name: str = TFLITE_FILE):
        self.name = name
        self.size_bytes = len(content)
        try:
            with warnings.catch_warnings():  # tf.lite.Interpreter warns that LiteRT will replace it.
                warnings.simplefilter("ignore", UserWarning)
                self._interpreter = tf.lite.Interpreter(model_content=content)
            self._interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as err:
            raise ModelError(f"{name}: not a loadable TFLite model ({err})") from None
        inputs, outputs = self._interpreter.get_input_details(), self._interpreter.get_output_details()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"{name}: expected one input and one output, got {len(inputs)} and {len(outputs)}")
        self._input, self._output = inputs[0]["index"], outputs[0]["index"]
        shape = inputs[0]["shape"]
        self.image_size = int(shape[1])
        self._batch = 0

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch, np.float32)
        if batch.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"{self.name} takes images of shape [B, {self.image_size}, {self.image_size}, 3], "
                             f"got {list(batch.shape)}")
        if batch.shape[0] == 0:
            return np.zeros([0, self._interpreter.get_output_details()[0]["shape"][-1]], np.float32)
        if batch.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input, list(batch.shape))
            self._interpreter.allocate_tensors()
            self._batch = batch.shape[0]
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()
        return np.array(self._interpreter.get_tensor(self._output))


def parity(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """How closely ``other``'s probabilities follow ``reference``'s, both [N, K]."""
    difference = np.abs(np.asarray(reference, np.float64) - np.asarray(other, np.float64))
    agree = np.argmax(reference, axis=1) == np.argmax(other, axis=1)
    return {"max_abs_difference": float(difference.max()) if difference.size else 0.0,
            "top1_agreement": float(agree.mean()) if agree.size else 1.0}
