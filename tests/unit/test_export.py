"""Tests for trainer.train.export: the model directory layout and the SavedModel serving signature."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import yaml
from PIL import Image

from trainer import images
from trainer.hyperparameters import Hyperparameters
from trainer.train import export
from trainer.train import model as model_lib

LABELS = {"cat": 0, "dog": 1, "emu": 2}
HISTORY = {"loss": [1.0, 0.5], "accuracy": [0.4, float("nan")]}


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt, **options)
    return out.getvalue()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth picture with some noise: realistic enough for JPEG, varied enough to tell images apart."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def pillow_pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=16, image_resize_interpolation="area",
                         dropout_rate=0.5)
    model = model_lib.build_model(hp, len(LABELS))
    model_dir = str(tmp_path_factory.mktemp("export") / "model")
    export.export_model(model, model_dir, hp=hp, label_map=LABELS, history=HISTORY)
    return hp, model, model_dir


@pytest.fixture(scope="module")
def serve(exported):
    _, _, model_dir = exported
    loaded = tf.saved_model.load(os.path.join(model_dir, export.SAVED_MODEL_DIR))
    signature = loaded.signatures[export.SERVING_SIGNATURE]

    def call(blobs: list[bytes]) -> np.ndarray:
        return signature(**{export.SERVING_INPUT: tf.constant(blobs, tf.string)})[export.SERVING_OUTPUT].numpy()

    call.signature = signature
    return call


def test_layout(exported):
    hp, _, model_dir = exported
    assert sorted(os.listdir(model_dir)) == ["class_label_to_prediction_index.json", "history.json",
                                             "hyperparameters.yaml", "model.keras", "model.tflite", "saved_model"]
    with open(os.path.join(model_dir, export.LABEL_MAP_FILE)) as handle:
        assert json.load(handle) == LABELS
    with open(os.path.join(model_dir, export.HYPERPARAMETERS_FILE)) as handle:
        assert Hyperparameters.from_mapping(yaml.safe_load(handle)) == hp
    with open(os.path.join(model_dir, export.HISTORY_FILE)) as handle:
        assert json.load(handle) == {"loss": [1.0, 0.5], "accuracy": [0.4, None]}  # NaN is not JSON
    assert model_lib.load_model(model_dir).output_shape == (None, 3)


def test_signature_contract(serve):
    inputs = serve.signature.structured_input_signature[1]
    assert inputs == {"image_bytes": tf.TensorSpec([None], tf.string, name="image_bytes")}
    outputs = serve.signature.structured_outputs
    assert list(outputs) == ["probabilities"]
    assert outputs["probabilities"].dtype == tf.float32
    assert outputs["probabilities"].shape.as_list() == [None, 3]


def test_saved_model_matches_the_keras_model_on_the_pillow_pixels(exported, serve):
    hp, model, _ = exported
    blobs = [encode(photo(40, 30, 1), "PNG"), encode(photo(9, 50, 2), "JPEG", quality=90),
             encode(photo(16, 16, 3), "PNG"), with_orientation(photo(12, 30, 4), "JPEG", 6)]
    names = ["a.png", "b.jpg", "c.png", "d.jpg"]
    # What validation checked and training reads: images.decode_image's pixels resized by images.resize_image.
    pixels = np.stack([images.resize_image(images.decode_image(b, n), 16, hp.image_resize_interpolation).numpy()
                       for b, n in zip(blobs, names, strict=True)])
    expected = model(pixels.astype(np.float32), training=False).numpy()
    got = serve(blobs)
    assert got.shape == (4, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_empty_request_gives_no_rows(serve):
    assert serve([]).shape == (0, 3)


def test_invalid_image_fails(serve):
    with pytest.raises(tf.errors.InvalidArgumentError):
        serve([b"not an image"])


def test_binary_model_answers_both_probabilities(tmp_path):
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=16, binary_mode=True)
    model = model_lib.build_model(hp, 2)
    export.write_saved_model(model, str(tmp_path), image_size=16, interpolation="bilinear", binary=True)
    signature = tf.saved_model.load(str(tmp_path)).signatures["serving_default"]
    blob = encode(photo(20, 20), "PNG")
    got = signature(image_bytes=tf.constant([blob]))["probabilities"].numpy()
    pixels = images.resize_image(pillow_pixels(blob), 16, "bilinear").numpy()[None].astype(np.float32)
    p = float(model(pixels)[0, 0])
    np.testing.assert_allclose(got, [[1.0 - p, p]], rtol=1e-5)


# --- images.decode_tensor, the serving (and training) decoder, decodes like Pillow ----------------------

def test_jpeg_decoding_matches_pillow():
    for seed, subsampling in [(0, 0), (1, 2)]:  # 4:4:4 and 4:2:0 chroma
        blob = encode(photo(37, 53, seed), "JPEG", quality=85, subsampling=subsampling)
        np.testing.assert_array_equal(images.decode_tensor(tf.constant(blob)).numpy(), pillow_pixels(blob))


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "LA", "P"])
def test_png_decoding_matches_the_pillow_decoder(mode):
    rgba = photo(12, 10).astype(np.uint8)
    alpha = np.random.default_rng(5).integers(0, 256, (12, 10, 1), dtype=np.uint8)
    image = Image.fromarray(np.concatenate([rgba, alpha], axis=-1), "RGBA").convert(mode)
    out = io.BytesIO()
    image.save(out, "PNG")
    blob = out.getvalue()
    expected = images.decode_image(blob, "x.png")
    np.testing.assert_array_equal(images.decode_tensor(tf.constant(blob)).numpy(), expected)


@pytest.mark.parametrize("mode, bits", [("P", 1), ("P", 2), ("P", 4), ("L", 1), ("L", 4), ("L", 8), ("RGB", 8)])
@pytest.mark.parametrize("transparent_key", [False, True])
def test_low_bit_depth_and_transparency_key_pngs_match_the_pillow_decoder(mode, bits, transparent_key):
    """Optimised PNGs use 1-4 bit depths; a tRNS chunk marks one colour transparent."""
    image = Image.new(mode, (8, 3))
    if mode == "P":
        image.putpalette([0, 0, 0, 200, 50, 10] + [0] * 762)
    image.load()[0, 0] = {"P": 1, "L": 1 if bits == 1 else 3, "RGB": (9, 8, 7)}[mode]
    options = {"transparency": (0, 0, 0) if mode == "RGB" else 0} if transparent_key else {}
    out = io.BytesIO()
    image.save(out, "PNG", **({} if mode == "RGB" else {"bits": bits}), **options)
    blob = out.getvalue()
    expected = images.decode_image(blob, "x.png")
    if transparent_key:
        assert (expected == 255).all(axis=-1).any(), "the transparent pixels should be white"
    np.testing.assert_array_equal(images.decode_tensor(tf.constant(blob)).numpy(), expected)


def test_composite_on_white_is_pillows_alpha_composite_for_every_value():
    colour, alpha = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([colour, colour, colour, alpha], axis=-1).astype(np.uint8)
    white = Image.new("RGBA", (256, 256), (255, 255, 255, 255))
    expected = np.asarray(Image.alpha_composite(white, Image.fromarray(rgba, "RGBA")).convert("RGB"))
    np.testing.assert_array_equal(images.composite_on_white(tf.constant(rgba)).numpy(), expected)


# --- errors and storage --------------------------------------------------------------------------------

def test_label_map_that_does_not_fit_the_model_is_an_error(tmp_path):
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=16)
    model = model_lib.build_model(hp, 3)
    with pytest.raises(ValueError, match="3 output.*2 classes"):
        export.export_model(model, str(tmp_path), hp=hp, label_map={"a": 0, "b": 1}, history={})
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_an_export_replaces_every_file_of_an_earlier_one(where, tmp_path, request):
    """An earlier run's quantised TFLite file and a variables shard of a differently sharded SavedModel
    must not survive a new export into the same folder: evaluation, predict and push would take them."""
    from tests.support.gcs import emulator_client
    from trainer import storage

    model_dir = str(tmp_path / "model") if where == "local" else f"gs://{request.getfixturevalue('gcs_bucket')}/model"
    stale = ["model_dynamic_range.tflite", "saved_model/variables/variables.data-00000-of-00002",
             "saved_model/assets/old_vocabulary.txt"]
    for name in [*stale, "notes.txt"]:
        storage.write_bytes(storage.join(model_dir, name), b"from an earlier export")
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=16)  # no quantised file this time
    export.export_model(model_lib.build_model(hp, 3), model_dir, hp=hp, label_map=LABELS, history={})

    listed = storage.list_files(model_dir)
    assert not set(stale) & set(listed)
    assert sorted(listed) == sorted([
        "class_label_to_prediction_index.json", "history.json", "hyperparameters.yaml", "model.keras",
        "model.tflite", "notes.txt",  # notes.txt is not export's: it stays
        "saved_model/fingerprint.pb", "saved_model/saved_model.pb",
        "saved_model/variables/variables.data-00000-of-00001", "saved_model/variables/variables.index"])
    if where == "gcs":  # what the bucket holds, not what trainer.storage says
        names = {blob.name for blob in emulator_client().list_blobs(model_dir.split("/")[2], prefix="model/")}
        assert names == {f"model/{name}" for name in listed}


# --- EXIF orientation ----------------------------------------------------------------------------------

def with_orientation(pixels: np.ndarray, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "imgclf test camera"  # another tag before it, as cameras write
    return encode(pixels, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_pillow(fmt, orientation):
    blob = with_orientation(photo(10, 16, orientation), fmt, orientation)
    assert int(images.exif_orientation(tf.constant(blob))) == orientation
    expected = images.decode_image(blob, "x.jpg" if fmt == "JPEG" else "x.png")
    np.testing.assert_array_equal(images.decode_tensor(tf.constant(blob)).numpy(), expected)


def test_missing_or_broken_exif_means_upright():
    plain = encode(photo(8, 8), "JPEG")
    assert int(images.exif_orientation(tf.constant(plain))) == 1
    broken = plain[:2] + b"\xff\xe1\x00\x0eExif\x00\x00XX\x00\x2a" + plain[2:]  # no valid TIFF header
    assert int(images.exif_orientation(tf.constant(broken))) == 1
    assert int(images.exif_orientation(tf.constant(encode(photo(8, 8), "PNG")))) == 1
