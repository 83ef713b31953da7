"""TFLite export: the float file follows the SavedModel, the quantised one agrees on top-1; predict and
evaluate use them."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.unit.test_training import write_digits
from trainer.data import reader
from trainer.errors import ModelError
from trainer.evaluate import evaluation
from trainer.hyperparameters import Hyperparameters
from trainer.serve import prediction
from trainer.train import tflite, training

SIZE = 16


@pytest.fixture(scope="module")
def digits_model(tmp_path_factory):
    """small_cnn trained 2 epochs on scikit-learn's digits at 16 px, exported with both TFLite files."""
    root = tmp_path_factory.mktemp("tflite")
    dataset = write_digits(str(root / "digits"), size=SIZE)
    model_dir = str(root / "model")
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, epochs=2, batch_size=32,
                         learning_rate=0.005, tflite_quantization="dynamic_range")
    training.train(hp, dataset, model_dir)
    loaded = prediction.load_model(model_dir)
    _, keras_probabilities, lite = evaluation._predict_split(
        loaded, dataset, "test", 64, prediction.load_tflite_models(model_dir))
    pixels = np.concatenate([images.numpy() for images, _ in
                             reader.read_split(dataset, "test", image_size=SIZE,
                                               interpolation="bilinear").batch(256)])
    return dataset, model_dir, pixels, keras_probabilities, lite


def png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


def test_model_folder_holds_both_files(digits_model):
    _, model_dir, *_ = digits_model
    assert os.path.getsize(os.path.join(model_dir, tflite.FLOAT_FILE)) > 0
    quantised = os.path.getsize(os.path.join(model_dir, tflite.DYNAMIC_RANGE_FILE))
    assert 0 < quantised < os.path.getsize(os.path.join(model_dir, tflite.FLOAT_FILE))


def test_float_tflite_matches_the_saved_model_on_the_test_split(digits_model):
    _, model_dir, pixels, _, lite = digits_model
    served = prediction.serve_saved_model(model_dir, [png(image) for image in pixels])
    float_probabilities = lite[tflite.FLOAT_FILE]
    assert float_probabilities.shape == served.shape == (len(pixels), 10)
    assert np.max(np.abs(float_probabilities - served)) <= 1e-3
    np.testing.assert_allclose(float_probabilities.sum(axis=1), 1.0, atol=1e-5)


def test_quantised_tflite_agrees_on_top_1_with_the_saved_model(digits_model):
    _, model_dir, pixels, _, lite = digits_model
    served = prediction.serve_saved_model(model_dir, [png(image) for image in pixels])
    agreement = np.mean(np.argmax(lite[tflite.DYNAMIC_RANGE_FILE], axis=1) == np.argmax(served, axis=1))
    assert agreement >= 0.99
    # Quantisation changes the numbers: the test would not notice a copy of the float file.
    assert np.max(np.abs(lite[tflite.DYNAMIC_RANGE_FILE] - served)) > 0


def test_evaluation_reports_the_parity_figures(digits_model, tmp_path):
    dataset, model_dir, pixels, *_ = digits_model
    result = evaluation.evaluate(model_dir, dataset, str(tmp_path))
    assert set(result["tflite"]) == {tflite.FLOAT_FILE, tflite.DYNAMIC_RANGE_FILE}
    assert result["tflite"][tflite.FLOAT_FILE]["max_abs_difference"] <= evaluation.TFLITE_FLOAT_TOLERANCE
    assert result["tflite"][tflite.DYNAMIC_RANGE_FILE]["top1_agreement"] >= evaluation.TFLITE_QUANTIZED_MIN_AGREEMENT
    saved = json.loads((tmp_path / "evaluation.json").read_text())
    assert saved["tflite"] == result["tflite"]
    for name in ("report.md", "report.html"):
        text = (tmp_path / name).read_text()
        assert tflite.DYNAMIC_RANGE_FILE in text and "top-1 agreement" in text


def test_predict_runs_either_file(digits_model, tmp_path):
    _, model_dir, pixels, *_ = digits_model
    paths = []
    for index in range(3):
        path = tmp_path / f"digit{index}.png"
        path.write_bytes(png(pixels[index]))
        paths.append(str(path))
    answers = {engine: np.array([a["probabilities"] for a in prediction.predict(model_dir, paths, engine=engine)])
               for engine in prediction.ENGINES}
    assert np.max(np.abs(answers["tflite"] - answers["keras"])) <= evaluation.TFLITE_FLOAT_TOLERANCE
    assert np.array_equal(answers["tflite_dynamic_range"].argmax(1), answers["keras"].argmax(1))


def test_predict_with_a_missing_quantised_file_says_how_to_get_it(digits_model, tmp_path):
    _, model_dir, pixels, *_ = digits_model
    copy = tmp_path / "model"
    copy.mkdir()
    for name in os.listdir(model_dir):
        if name.endswith((".json", ".yaml", ".keras")):
            (copy / name).write_bytes(open(os.path.join(model_dir, name), "rb").read())
    image = tmp_path / "x.png"
    image.write_bytes(png(pixels[0]))
    with pytest.raises(ModelError, match="tflite_quantization=dynamic_range"):
        prediction.predict(str(copy), [str(image)], engine="tflite_dynamic_range")


def test_binary_tflite_answers_both_probabilities():
    from trainer.train import model as model_lib

    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, binary_mode=True)
    model = model_lib.build_model(hp, 2)
    pixels = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float32)
    lite = tflite.TfliteModel(tflite.convert(model, binary=True)).probabilities(pixels)
    positive = model(pixels, training=False).numpy()[:, 0]
    np.testing.assert_allclose(lite[:, 1], positive, atol=1e-5)
    np.testing.assert_allclose(lite.sum(axis=1), 1.0, atol=1e-6)
