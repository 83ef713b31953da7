"""images.model_input: big JPEGs are decoded scaled down in the DCT domain by one rule (``jpeg_scale``), and
training, evaluation, the SavedModel's serving signature, predict / batch prediction and the TFLite host-side
decode (``model_input_array``) give the same pixels, for photos of several sizes and EXIF orientations.

The expected pixels come from ``datasets.pillow_model_input``: Pillow's ``draft`` (libjpeg's DCT scaling) at
the scale the stated rule gives, Pillow's EXIF turn and the shared resize; none of trainer.images' decoders.
"""

from __future__ import annotations

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.support import datasets as ds
from trainer import images
from trainer.data import reader
from trainer.data.conversion import convert_dataset
from trainer.data.validation import validate_dataset
from trainer.hyperparameters import Hyperparameters
from trainer.images import ImageRejected
from trainer.serve import prediction
from trainer.train import export
from trainer.train import model as model_lib

SIZE = 32
INTERPOLATION = "bilinear"
# (width, height): the shorter side just under and at 2x, 4x and 8x the model's input, and beyond 8x.
SIZES = ((63, 80), (90, 64), (127, 140), (128, 128), (255, 300), (256, 270), (520, 300))
ORIENTATIONS = (1, 6, 8)


def photo(width: int, height: int, seed: int) -> np.ndarray:
    """A smooth picture with texture: JPEG-friendly, and every scale of it differs from the others."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin((x + 2 * y) / 7)], axis=-1)
    return np.clip(base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)


def jpeg(width: int, height: int, orientation: int, seed: int, subsampling: int = 2) -> bytes:
    """A JPEG stored ``width`` x ``height``, with an EXIF orientation tag unless it is 1."""
    pixels = photo(width, height, seed)
    if orientation == 1:
        return ds.encode(pixels, "JPEG", quality=90, subsampling=subsampling)
    tags = Image.Exif()
    tags[0x0112] = orientation
    return ds.encode(pixels, "JPEG", quality=90, subsampling=subsampling, exif=tags)


@pytest.mark.parametrize(("short", "scale"), [(1, 1), (63, 1), (64, 2), (127, 2), (128, 4), (255, 4), (256, 8),
                                              (4000, 8)])
def test_the_rule_scales_by_the_largest_power_of_two_that_leaves_the_input_size(short, scale):
    assert int(images.jpeg_scale(short, short + 37, SIZE)) == scale
    assert int(images.jpeg_scale(short + 37, short, SIZE)) == scale  # a quarter turn changes nothing
    # The same function in a graph, on tensors (what the serving signature runs).
    graph = tf.function(lambda h, w: images.jpeg_scale(h, w, SIZE))
    assert int(graph(tf.constant(short, tf.int32), tf.constant(short + 1, tf.int32))) == scale


@pytest.mark.parametrize("subsampling", [0, 2], ids=["4:4:4", "4:2:0"])
@pytest.mark.parametrize(("width", "height"), SIZES)
def test_jpegs_decode_at_the_rules_scale_to_pillows_draft_pixels(width, height, subsampling):
    blob = jpeg(width, height, 1, seed=width, subsampling=subsampling)
    scale = int(images.jpeg_scale(height, width, SIZE))
    decoded = images.decode_tensor(tf.constant(blob), image_size=SIZE).numpy()
    assert decoded.shape == (-(-height // scale), -(-width // scale), 3)
    assert min(decoded.shape[:2]) >= SIZE  # the resize that follows only ever shrinks
    np.testing.assert_array_equal(images.model_input(tf.constant(blob), SIZE, INTERPOLATION).numpy(),
                                  ds.pillow_model_input(blob, SIZE, INTERPOLATION))
    # Without the model's size, the full picture, as validation compares it with Pillow's.
    assert images.decode_tensor(tf.constant(blob)).shape == (height, width, 3)


def write_folder(root, kind: str) -> dict[str, bytes]:
    """Two classes of photos; ``kind``: "mixed" (every size, EXIF 1, 6 and 8, and a PNG), "upright" (every
    size, EXIF 1: the training pipeline's control-flow-free decode) or "small" (no JPEG large enough to scale)."""
    sizes = [s for s in SIZES if min(s) < 2 * SIZE] if kind == "small" else SIZES
    orientations = ORIENTATIONS if kind == "mixed" else (1,)
    files = {}
    for index, (width, height) in enumerate(sizes):
        for orientation in orientations:
            files[f"{'ab'[index % 2]}/photo-{width}x{height}-exif{orientation}.jpg"] = jpeg(
                width, height, orientation, seed=index * 10 + orientation)
    if kind == "mixed":
        files["a/plain.png"] = ds.encode(photo(300, 280, 99), "PNG")
    if kind == "small":
        files["b/extra.jpg"] = jpeg(40, 50, 1, seed=77)
    for relative, blob in files.items():
        os.makedirs(os.path.dirname(os.path.join(root, relative)), exist_ok=True)
        with open(os.path.join(root, relative), "wb") as handle:
            handle.write(blob)
    return files


def pixel_model() -> keras.Model:
    """A "model" whose output is its input pixels, so the SavedModel's answer shows the pixels it was served."""
    inputs = keras.Input((SIZE, SIZE, 3))
    return keras.Model(inputs, keras.layers.Flatten()(inputs))


@pytest.fixture(scope="module")
def served_pixels(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pixels") / "saved_model")
    export.write_saved_model(pixel_model(), path, image_size=SIZE, interpolation=INTERPOLATION, binary=False)
    signature = tf.saved_model.load(path).signatures[export.SERVING_SIGNATURE]

    def serve(blobs: list[bytes]) -> np.ndarray:
        flat = signature(**{export.SERVING_INPUT: tf.constant(blobs)})[export.SERVING_OUTPUT].numpy()
        return flat.reshape(len(blobs), SIZE, SIZE, 3).astype(np.uint8)

    return serve


@pytest.mark.parametrize("kind", ["mixed", "upright", "small"])
def test_training_evaluation_serving_and_predict_see_the_same_pixels(tmp_path, served_pixels, kind):
    files = write_folder(tmp_path / "photos", kind)
    validate_dataset(str(tmp_path / "photos"), str(tmp_path / "validation"), workers=1)
    dataset_dir = str(tmp_path / "dataset")
    manifest = convert_dataset(str(tmp_path / "photos"), str(tmp_path / "validation" / "validation.json"),
                               dataset_dir, validation_split_ratio=0, test_split_ratio=0, workers=1)
    largest = max(min(w, h) for w, h in (SIZES if kind != "small" else [s for s in SIZES if min(s) < 2 * SIZE]))
    assert manifest["splits"]["train"]["largest_jpeg_short_side"] == largest
    assert reader._any_scaled_jpeg(dataset_dir, "train", SIZE) == (kind != "small")
    assert reader._upright_jpegs(dataset_dir, "train") == (kind != "mixed")

    # The records' paths in file order: read_split and an unshuffled make_dataset keep it.
    paths = [tf.io.parse_single_example(record, {"path": tf.io.FixedLenFeature([], tf.string)})["path"].numpy()
             .decode() for name in manifest["splits"]["train"]["files"]
             for record in tf.data.TFRecordDataset(os.path.join(dataset_dir, "train", name))]
    assert sorted(paths) == sorted(files)
    evaluation = np.stack([pixels for pixels, _ in reader.read_split(
        dataset_dir, "train", image_size=SIZE, interpolation=INTERPOLATION).as_numpy_iterator()])
    training = np.concatenate([batch for batch, _ in reader.make_dataset(
        dataset_dir, "train", batch_size=8, training=False, seed=None, num_classes=2, binary_mode=False,
        image_size=SIZE, interpolation=INTERPOLATION).as_numpy_iterator()])
    blobs = [files[path] for path in paths]
    served = served_pixels(blobs)
    predicted = np.stack([images.model_input_array(blob, path, SIZE, INTERPOLATION)
                          for path, blob in zip(paths, blobs, strict=True)])

    for index, path in enumerate(paths):
        expected = ds.pillow_model_input(files[path], SIZE, INTERPOLATION)
        for name, got in (("training", training), ("evaluation", evaluation), ("serving", served),
                          ("predict", predicted)):
            np.testing.assert_array_equal(got[index], expected, err_msg=f"{name}: {path}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A model folder as training exports it (SavedModel and model.tflite included), two classes."""
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE)
    keras.utils.set_random_seed(0)
    path = str(tmp_path_factory.mktemp("model") / "model")
    export.export_model(model_lib.build_model(hp, 2), path, hp=hp, label_map={"a": 0, "b": 1}, history={})
    return path


def test_files_the_decoders_disagree_on_are_decoded_by_predict_as_served(tmp_path, served_pixels, model_dir):
    """A 16-bit PNG with a transparent colour: validation rejects it (Pillow reads it without its transparency),
    and predict, batch prediction and the SavedModel all decode it with TensorFlow, to the same pixels."""
    blob = ds.png16_gray_transparent_key()
    with pytest.raises(ImageRejected, match="different pixels"):
        images.check_image(blob, "key.png")
    predicted = images.model_input_array(blob, "key.png", SIZE, INTERPOLATION)
    np.testing.assert_array_equal(predicted, served_pixels([blob])[0])
    # Not Pillow's pixels (what predict computed before, 0.45 apart in probability from the served model's).
    pillow = images.resize_image(images.decode_image(blob, "key.png"), SIZE, INTERPOLATION).numpy()
    assert not np.array_equal(predicted, pillow)

    (tmp_path / "batch").mkdir()
    (tmp_path / "batch" / "key.png").write_bytes(blob)
    [answer] = prediction.predict(model_dir, [str(tmp_path / "batch" / "key.png")])
    prediction.batch_predict(model_dir, str(tmp_path / "batch"), str(tmp_path / "out.jsonl"))
    [line] = [json.loads(text) for text in (tmp_path / "out.jsonl").read_text().splitlines()]
    served = prediction.serve_saved_model(model_dir, [blob])[0]
    np.testing.assert_allclose(answer["probabilities"], served, atol=1e-6)
    np.testing.assert_allclose(line["probabilities"], served, atol=1e-6)


def test_files_tensorflow_cannot_decode_are_refused_by_predict_naming_them(served_pixels):
    blob = ds.too_wide_png()  # Pillow reads it; TensorFlow's libpng refuses sides above 1,000,000 pixels
    with pytest.raises(ImageRejected, match=r"wide\.png: TensorFlow cannot decode it .*baseline JPEG or PNG"):
        images.model_input_array(blob, "wide.png", SIZE, INTERPOLATION)
    with pytest.raises(tf.errors.InvalidArgumentError):
        served_pixels([blob])  # the served model refuses it too
    truncated = ds.truncate(jpeg(300, 200, 1, seed=3))
    with pytest.raises(ImageRejected, match=r"cut\.jpg: TensorFlow cannot decode it"):
        images.model_input_array(truncated, "cut.jpg", SIZE, INTERPOLATION)
    with pytest.raises(ImageRejected, match="content is PNG but the extension says JPEG"):
        images.model_input_array(ds.encode(photo(40, 30, 1), "PNG"), "fake.jpg", SIZE, INTERPOLATION)


def test_the_tflite_file_is_fed_the_scaled_decode(tmp_path, model_dir):
    """predict's TFLite engine decodes on the host with model_input_array: for a big photo turned by its EXIF
    orientation, its answer is the served model's (the same pixels; the same weights, converted)."""
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg(520, 300, 6, seed=5))
    served = prediction.serve_saved_model(model_dir, [path.read_bytes()])[0]
    [answer] = prediction.predict(model_dir, [str(path)], engine="tflite")
    np.testing.assert_allclose(answer["probabilities"], served, atol=1e-5)
