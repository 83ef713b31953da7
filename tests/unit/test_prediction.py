"""trainer.serve.prediction: the reference JSON answers, batch files, clear errors, and SavedModel parity."""

import io
import json

import keras
import numpy as np
import pytest
from PIL import Image

from tests.support import datasets as ds
from trainer.errors import DataError, ImgclfError, ModelError
from trainer.hyperparameters import Hyperparameters
from trainer.serve import prediction
from trainer.train import export

SIZE = 16
FLOWERS = ("dandelion", "roses", "tulips")
INTERPOLATION = "bicubic"  # not the default, to see that hyperparameters.yaml's value is used


def tiny_model(outputs, activation):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(outputs, activation=activation)(x))


def save_model_dir(path, model, label_map, **hyperparameters):
    path.mkdir(parents=True)
    model.save(path / "model.keras")
    (path / "class_label_to_prediction_index.json").write_text(json.dumps(label_map))
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE,
                         image_resize_interpolation=INTERPOLATION, **hyperparameters)
    (path / "hyperparameters.yaml").write_text(hp.to_yaml())
    return str(path)


def export_saved_model(model, model_dir, binary=False):
    """The SavedModel as training exports it (its serving signature decodes and resizes in its graph)."""
    export.write_saved_model(model, f"{model_dir}/saved_model", image_size=SIZE, interpolation=INTERPOLATION,
                             binary=binary)


def encode(image, fmt, **options):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def photo(width, height, seed):
    """A smooth picture with some texture, like a small photo (JPEG-friendly)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """A 3-class model directory (label map stored out of index order) with a SavedModel, and images."""
    root = tmp_path_factory.mktemp("flowers")
    model = tiny_model(3, "softmax")
    # Stored out of index order: answers must follow the indices, not the file's order.
    model_dir = save_model_dir(root / "model", model, {"tulips": 2, "dandelion": 0, "roses": 1})
    export_saved_model(model, model_dir)
    images = root / "images"
    images.mkdir()
    files = {
        "big.jpg": encode(photo(120, 90, 1), "JPEG", quality=90),  # decoded at 1/4 (90 >= 4 x 16)
        "small.jpeg": encode(photo(10, 12, 2), "JPEG"),  # smaller than the model input: upscaled
        "wide.png": encode(photo(64, 20, 3), "PNG"),
        "gray.png": encode(photo(30, 30, 4).convert("L"), "PNG"),
        "transparent.png": encode(photo(24, 24, 5).convert("RGBA"), "PNG"),
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    return model, model_dir, {name: str(images / name) for name in files}


def expected_probabilities(model, path):
    """The model's answer computed without trainer.serve.prediction: Pillow decode (big JPEGs scaled down while
    decoding, as the rule says), shared resize, Keras."""
    with open(path, "rb") as handle:
        pixels = ds.pillow_model_input(handle.read(), SIZE, INTERPOLATION)
    return model.predict(pixels[None].astype(np.float32), verbose=0)[0]


def test_predict_answers_in_the_reference_format(flowers):
    model, model_dir, paths = flowers
    names = ["big.jpg", "small.jpeg", "wide.png", "gray.png", "transparent.png"]
    plain = prediction.predict(model_dir, [paths[n] for n in names], batch_size=2)
    verbose = prediction.predict(model_dir, [paths[n] for n in names], verbose=True)

    assert len(plain) == len(verbose) == len(names)
    for name, short, long in zip(names, plain, verbose, strict=True):
        assert set(short) == {"probabilities"}
        assert set(long) == {"probabilities", "labels", "predicted_label"}
        probabilities = short["probabilities"]
        assert len(probabilities) == 3 and all(type(p) is float for p in probabilities)
        assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
        assert long["probabilities"] == pytest.approx(probabilities, abs=1e-6)  # batching does not matter
        assert long["labels"] == list(FLOWERS)
        assert long["predicted_label"] == FLOWERS[int(np.argmax(probabilities))]
        if name != "transparent.png":  # Pillow's own RGBA -> RGB drops alpha; decode_image uses white
            np.testing.assert_allclose(probabilities, expected_probabilities(model, paths[name]), atol=1e-6)
    json.dumps(verbose)  # plain Python types


def test_predict_binary_model_answers_for_both_labels(tmp_path, flowers):
    model = tiny_model(1, "sigmoid")
    model_dir = save_model_dir(tmp_path / "model", model, {"cat": 0, "dog": 1}, binary_mode=True)
    _, _, paths = flowers
    [answer] = prediction.predict(model_dir, [paths["big.jpg"]], verbose=True)
    p = float(expected_probabilities(model, paths["big.jpg"])[0])
    assert answer["labels"] == ["cat", "dog"]
    assert answer["probabilities"] == pytest.approx([1 - p, p], abs=1e-6)
    assert answer["predicted_label"] == ("dog" if p > 0.5 else "cat")


def test_predict_of_nothing_is_empty(flowers):
    assert prediction.predict(flowers[1], []) == []


@pytest.mark.parametrize(("name", "data", "reason"), [
    ("broken.jpg", b"this is not a picture", "not a readable JPEG"),
    ("fake.png", None, "content is JPEG but the extension says PNG"),
    ("clip.gif", b"GIF89a", "unsupported file type"),
])
def test_bad_image_error_names_the_file(tmp_path, flowers, name, data, reason):
    _, model_dir, paths = flowers
    path = tmp_path / name
    path.write_bytes(data if data is not None else open(paths["big.jpg"], "rb").read())
    with pytest.raises(DataError) as raised:
        prediction.predict(model_dir, [paths["wide.png"], str(path)])
    assert str(path) in str(raised.value) and reason in str(raised.value)


def test_missing_image_error_names_the_file(tmp_path, flowers):
    missing = str(tmp_path / "nowhere.jpg")
    with pytest.raises(ImgclfError, match=missing):
        prediction.predict(flowers[1], [missing])


def test_model_dir_problems_are_model_errors(tmp_path, flowers):
    with pytest.raises(ModelError, match="label map"):
        prediction.predict(str(tmp_path), [flowers[2]["big.jpg"]])
    model_dir = save_model_dir(tmp_path / "model", tiny_model(3, "softmax"), {"a": 0, "b": 1})
    with pytest.raises(ModelError, match=r"predicts 3 classes but .* lists 2"):
        prediction.predict(model_dir, [flowers[2]["big.jpg"]])


def test_batch_predict_writes_a_line_per_image_and_reports_bad_ones(tmp_path, flowers):
    _, model_dir, paths = flowers
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    (data / "b" / "nested").mkdir(parents=True)
    (data / "a" / "one.jpg").write_bytes(open(paths["big.jpg"], "rb").read())
    (data / "a" / "two.PNG").write_bytes(open(paths["wide.png"], "rb").read())
    (data / "b" / "nested" / "three.jpeg").write_bytes(open(paths["small.jpeg"], "rb").read())
    (data / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (data / "notes.txt").write_text("not an image")
    output = tmp_path / "out" / "predictions.jsonl"

    counts = prediction.batch_predict(model_dir, str(data), str(output), batch_size=2)

    assert counts == {"images": 4, "predicted": 3, "errors": 1, "skipped": 1, "output": str(output)}
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert [line["file"] for line in lines] == [
        "a/one.jpg", "a/two.PNG", "b/broken.png", "b/nested/three.jpeg"]
    assert set(lines[2]) == {"file", "error"} and "broken.png" in lines[2]["error"]
    direct = prediction.predict(model_dir, [paths["big.jpg"], paths["wide.png"], paths["small.jpeg"]],
                                verbose=True)
    for line, answer in zip([lines[0], lines[1], lines[3]], direct, strict=True):
        assert set(line) == {"file", "probabilities", "labels", "predicted_label"}
        assert line["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-6)
        assert line["labels"] == list(FLOWERS) and line["predicted_label"] == answer["predicted_label"]


def test_batch_predict_of_a_folder_without_images_says_so(tmp_path, flowers):
    (tmp_path / "readme.txt").write_text("no pictures here")
    with pytest.raises(DataError, match=r"no \.jpg, \.jpeg or \.png files"):
        prediction.batch_predict(flowers[1], str(tmp_path), str(tmp_path / "out.jsonl"))


@pytest.mark.parametrize("name", ["big.jpg", "small.jpeg", "wide.png", "gray.png"])
def test_saved_model_answers_equal_predict(flowers, name):
    _, model_dir, paths = flowers
    data = open(paths[name], "rb").read()
    served = prediction.serve_saved_model(model_dir, [data, data])
    [answer] = prediction.predict(model_dir, [paths[name]])
    assert served.shape == (2, 3)
    np.testing.assert_allclose(served[0], answer["probabilities"], atol=1e-5)


def test_serving_a_directory_without_saved_model_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match="saved_model"):
        prediction.serve_saved_model(str(tmp_path), [b""])
