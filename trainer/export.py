"""Write a trained model directory: Keras model, serving SavedModel, label map, hyperparameters, history.

The layout (pinned; prediction, evaluation and serving code read it)::

    model_dir/model.keras                            the Keras model (float32 RGB 0-255 in, probabilities out)
    model_dir/saved_model/                           TF SavedModel, signature "serving_default":
                                                       image_bytes: tf.string [None] (encoded JPEG/PNG,
                                                       any size) -> probabilities: float32 [None, K]
    model_dir/class_label_to_prediction_index.json   {class: index}; index = column of probabilities
    model_dir/hyperparameters.yaml                   the resolved hyperparameters of the run
    model_dir/history.json                           Keras History: {"loss": [...], "val_loss": [...], ...}

The SavedModel carries the pre-processing, so a client sends the file's bytes: JPEG and PNG are
decoded the way conversion decoded the training images (``trainer.images.decode_image``, Pillow):
JPEG with the accurate integer IDCT that Pillow's libjpeg uses, PNG transparency composited onto
white with Pillow's integer arithmetic, 16-bit PNG reduced to its high byte, and the EXIF
orientation (JPEG APP1, PNG eXIf) applied as Pillow's ``exif_transpose`` does. Then the image is
resized with ``trainer.images.resize_image``, the same function conversion used. Binary models
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

from trainer import images
from trainer.hyperparameters import Hyperparameters, write_resolved

log = logging.getLogger(__name__)

KERAS_MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
LABEL_MAP_FILE = "class_label_to_prediction_index.json"
HYPERPARAMETERS_FILE = "hyperparameters.yaml"
HISTORY_FILE = "history.json"
SERVING_SIGNATURE = "serving_default"
SERVING_INPUT = "image_bytes"
SERVING_OUTPUT = "probabilities"


def export_model(model: keras.Model, model_dir: str, *, hp: Hyperparameters, label_map: Mapping[str, int],
                 history: Mapping[str, Sequence[float]]) -> None:
    """Write every file of the model directory (a local path or gs:// URI); errors propagate.

    ``model`` must take float32 [B, S, S, 3] (0-255, S = ``hp.input_size``) and return K
    probabilities, or one sigmoid output in binary mode; ``label_map`` maps each of the K class
    names to its output index.
    """
    _check_outputs(model, hp, label_map)
    if model_dir.startswith("gs://"):
        from trainer import storage  # Only needed for gs:// outputs.

        with tempfile.TemporaryDirectory(prefix="imgclf-export-") as local:
            _write(model, local, hp, label_map, history)
            storage.upload_tree(local, model_dir)
    else:
        _write(model, model_dir, hp, label_map, history)
    log.info("Exported the model to %s", model_dir)


def _write(model: keras.Model, directory: str, hp: Hyperparameters, label_map: Mapping[str, int],
           history: Mapping[str, Sequence[float]]) -> None:
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, KERAS_MODEL_FILE))
    saved_model = os.path.join(directory, SAVED_MODEL_DIR)
    # A SavedModel left by an earlier export could keep files the new one does not overwrite.
    shutil.rmtree(saved_model, ignore_errors=True)
    write_saved_model(model, saved_model, image_size=hp.input_size,
                      interpolation=hp.image_resize_interpolation, binary=hp.binary_mode)
    ordered = dict(sorted(label_map.items(), key=lambda item: item[1]))
    _write_text(os.path.join(directory, LABEL_MAP_FILE), json.dumps(ordered, indent=1, ensure_ascii=False))
    write_resolved(hp, os.path.join(directory, HYPERPARAMETERS_FILE))
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
        return images.resize_image(decode_for_serving(data), image_size, interpolation)

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


def decode_for_serving(data: tf.Tensor) -> tf.Tensor:
    """Encoded JPEG/PNG bytes (scalar tf.string) -> RGB uint8 [H, W, 3], pixel for pixel as Pillow
    decodes them at conversion (see the module docstring); other formats fail."""
    def jpeg() -> tf.Tensor:
        # INTEGER_ACCURATE is libjpeg's JDCT_ISLOW, the IDCT Pillow uses; TF's default is faster
        # but differs by a level here and there.
        return tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE")

    def png() -> tf.Tensor:
        # A tRNS chunk (a transparent colour or palette entry) comes before the first IDAT chunk;
        # libpng turns it into a real alpha channel when asked for 4 channels.
        header = tf.strings.split(data, sep="IDAT", maxsplit=1)[0]
        # Byte-wise search (a regex would read the binary header as UTF-8).
        has_transparency = tf.size(tf.strings.split(header, sep="tRNS", maxsplit=1)) > 1
        return tf.cond(has_transparency, lambda: composite_on_white(tf.io.decode_png(data, channels=4)),
                       opaque_or_alpha_png)

    def opaque_or_alpha_png() -> tf.Tensor:
        # Without tRNS, decode with the file's own channels: asking for 4 makes libpng add an alpha
        # "filler" that is not 255 for 1-, 2- and 4-bit grayscale and palette files.
        decoded = tf.io.decode_png(data, channels=0, dtype=tf.uint8)
        gray, alpha = decoded[..., :1], decoded[..., -1:]
        return tf.switch_case(tf.shape(decoded)[-1] - 1, [
            lambda: tf.image.grayscale_to_rgb(decoded),
            lambda: composite_on_white(tf.concat([gray, gray, gray, alpha], axis=-1)),
            lambda: decoded,
            lambda: composite_on_white(decoded),
        ])

    image = tf.cond(tf.io.is_jpeg(data), jpeg, png)
    image.set_shape([None, None, 3])
    return apply_orientation(image, exif_orientation(data))


# EXIF orientation, as conversion applies it (Pillow's ImageOps.exif_transpose) and TensorFlow's
# decoders do not: phone cameras store pictures sideways and record the turn in this tag.
_ORIENTATION_TAG = 0x0112
# Where the TIFF block of EXIF data starts: after "Exif\0\0" in a JPEG's APP1 segment (within the
# first 64 KiB, the largest a segment can be), after the chunk type of a PNG "eXIf" chunk.
_JPEG_EXIF_MARKER = b"Exif\x00\x00"
_PNG_EXIF_MARKER = b"eXIf"
_TIFF_LITTLE_ENDIAN = (0x49, 0x49, 0x2A, 0x00)
_TIFF_BIG_ENDIAN = (0x4D, 0x4D, 0x00, 0x2A)
# IFD0 entries examined; tags are sorted and orientation comes early (cameras write about 10-20).
_MAX_IFD_ENTRIES = 128


def exif_orientation(data: tf.Tensor) -> tf.Tensor:
    """The EXIF orientation (int32 1-8) of encoded JPEG/PNG bytes; 1 when absent or unreadable."""
    def tiff_offset(haystack: tf.Tensor, marker: bytes) -> tf.Tensor:
        parts = tf.strings.split(haystack, sep=marker, maxsplit=1)
        found = tf.size(parts) > 1
        offset = tf.cast(tf.strings.length(parts[0]), tf.int64) + len(marker)
        return tf.where(found, offset, tf.constant(-1, tf.int64))

    start = tf.cond(tf.io.is_jpeg(data),
                    lambda: tiff_offset(tf.strings.substr(data, 0, 1 << 16), _JPEG_EXIF_MARKER),
                    lambda: tiff_offset(data, _PNG_EXIF_MARKER))
    tiff = tf.strings.substr(data, tf.maximum(start, 0), 1 << 16)
    header = _read_bytes(tiff, 0, 4)
    little = tf.reduce_all(tf.equal(header, _TIFF_LITTLE_ENDIAN))
    big = tf.reduce_all(tf.equal(header, _TIFF_BIG_ENDIAN))

    def number(raw: tf.Tensor) -> tf.Tensor:
        # Unsigned integer from bytes along the last axis, in the TIFF block's byte order.
        weights = tf.cast(256, tf.int64) ** tf.range(tf.shape(raw, out_type=tf.int64)[-1])
        weights = tf.where(little, weights, tf.reverse(weights, [0]))
        return tf.reduce_sum(raw * weights, axis=-1)

    ifd = number(_read_bytes(tiff, 4, 4))
    count = number(_read_bytes(tiff, ifd, 2))
    entries = tf.reshape(_read_bytes(tiff, ifd + 2, 12 * _MAX_IFD_ENTRIES), [_MAX_IFD_ENTRIES, 12])
    is_orientation = tf.logical_and(tf.equal(number(entries[:, 0:2]), _ORIENTATION_TAG),
                                    tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count)
    # An orientation is a SHORT stored in the first two bytes of the entry's value field.
    values = tf.boolean_mask(number(entries[:, 8:10]), is_orientation)
    value = tf.cond(tf.size(values) > 0, lambda: values[0], lambda: tf.constant(1, tf.int64))
    usable = tf.logical_and(tf.logical_and(start >= 0, tf.logical_or(little, big)),
                            tf.logical_and(value >= 1, value <= 8))
    return tf.cast(tf.where(usable, value, 1), tf.int32)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turn/mirror [H, W, C] so that it is upright for EXIF ``orientation`` 1-8 (as Pillow does)."""
    def transpose() -> tf.Tensor:
        return tf.transpose(image, [1, 0, 2])

    branches = [
        lambda: image,  # 1: upright
        lambda: tf.image.flip_left_right(image),  # 2: mirrored
        lambda: tf.image.rot90(image, 2),  # 3: upside down
        lambda: tf.image.flip_up_down(image),  # 4: mirrored upside down
        transpose,  # 5: mirrored along the main diagonal
        lambda: tf.image.rot90(image, 3),  # 6: turn 90 degrees clockwise
        lambda: tf.image.rot90(transpose(), 2),  # 7: mirrored along the other diagonal
        lambda: tf.image.rot90(image, 1),  # 8: turn 90 degrees counter-clockwise
    ]
    oriented = tf.switch_case(orientation - 1, branches)
    oriented.set_shape([None, None, image.shape[-1]])
    return oriented


def _read_bytes(blob: tf.Tensor, position: tf.Tensor, length: int) -> tf.Tensor:
    """``length`` bytes of ``blob`` from ``position`` as int64 [length]; zeros past its end."""
    size = tf.cast(tf.strings.length(blob), tf.int64)
    position = tf.clip_by_value(tf.cast(position, tf.int64), 0, size)
    padded = tf.strings.join([tf.strings.substr(blob, position, length), b"\x00" * length])
    return tf.cast(tf.io.decode_raw(tf.strings.substr(padded, 0, length), tf.uint8), tf.int64)


def composite_on_white(rgba: tf.Tensor) -> tf.Tensor:
    """RGBA uint8 [H, W, 4] -> RGB uint8 [H, W, 3] over an opaque white background.

    The integer arithmetic of Pillow's ``Image.alpha_composite`` (7 fractional bits and its
    shift-based division by 255), so the result equals conversion's pixels exactly; opaque pixels
    come out unchanged.
    """
    rgba = tf.cast(rgba, tf.int32)
    color, alpha = rgba[..., :3], rgba[..., 3:]
    # With an opaque background Pillow's blend weights are alpha * 128 and (255 - alpha) * 128.
    total = (color * alpha + 255 * (255 - alpha)) * 128 + (0x80 << 7)
    divided = tf.bitwise.right_shift(tf.bitwise.right_shift(total, 8) + total, 8)
    return tf.cast(tf.bitwise.right_shift(divided, 7), tf.uint8)


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
