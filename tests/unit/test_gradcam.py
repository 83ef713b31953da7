"""Grad-CAM for every backbone of the schema, and the error gallery built from it."""

from __future__ import annotations

import base64
import io

import keras
import numpy as np
import pytest
from PIL import Image

from trainer.backbones import BACKBONE_NAMES, BACKBONES
from trainer.errors import ModelError
from trainer.evaluate import gallery, gradcam
from trainer.hyperparameters import Hyperparameters
from trainer.train import model as model_lib


def built(name: str, classes: int = 3, **overrides) -> tuple[Hyperparameters, keras.Model]:
    """The backbone with random weights at its smallest input of at least 32 px."""
    hp = Hyperparameters(model=name, weights="none", image_size=max(32, BACKBONES[name].min_size), **overrides)
    return hp, model_lib.build_model(hp, classes)


@pytest.mark.parametrize("name", BACKBONE_NAMES)
def test_every_backbone_gets_a_heat_map_from_its_last_feature_map(name):
    hp, model = built(name)
    cam = gradcam.GradCam(model)
    # The explained layer is inside the nested backbone and is its last 4-D feature map.
    assert cam.layer in cam.backbone.layers
    later = cam.backbone.layers[cam.backbone.layers.index(cam.layer) + 1:]
    assert all(len(layer.output.shape) != 4 or "Pooling" in type(layer).__name__ for layer in later)
    image = np.random.default_rng(0).integers(0, 256, (1, hp.input_size, hp.input_size, 3)).astype(np.float32)
    # The chain Grad-CAM runs is the model: its logits give the model's probabilities.
    features, gradients = cam._gradients(image, np.array([1]))
    assert np.any(gradients.numpy() != 0)
    maps = cam.heatmaps(image, np.array([1]))
    assert maps.shape == (1, *features.shape[1:3])
    assert np.all(np.isfinite(maps)) and maps.min() >= 0 and maps.max() <= 1


def test_the_explained_class_changes_the_map():
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=32)
    keras.utils.set_random_seed(1)
    model = model_lib.build_model(hp, 3)
    cam = gradcam.GradCam(model)
    image = np.random.default_rng(2).integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    maps = [cam.heatmaps(image, np.array([k]))[0] for k in range(3)]
    assert maps[0].shape == (8, 8)
    assert not np.allclose(maps[0], maps[1]) or not np.allclose(maps[1], maps[2])


def test_binary_model_explains_either_class():
    _, model = built("small_cnn", classes=2, binary_mode=True)
    cam = gradcam.GradCam(model)
    image = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    _, positive = cam._gradients(image, np.array([1]))
    _, negative = cam._gradients(image, np.array([0]))
    np.testing.assert_allclose(positive.numpy(), -negative.numpy(), rtol=1e-5, atol=1e-7)


def test_a_model_without_a_backbone_is_refused_by_name():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    with pytest.raises(ModelError, match="backbone"):
        gradcam.GradCam(model)


def test_overlay_keeps_the_image_size():
    image = np.full((20, 20, 3), 128, np.uint8)
    heat = np.zeros((4, 4), np.float32)
    heat[0, 0] = 1.0
    out = gradcam.overlay(image, heat)
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0, 0], out[-1, -1])  # the hot corner is coloured differently


# --- the gallery ----------------------------------------------------------------------------------

def test_selection_puts_confident_mistakes_first_and_caps_each_class():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 40, 2000)
    y_pred = np.where(rng.uniform(size=2000) < 0.5, y_true, (y_true + 1) % 40)
    confidence = rng.uniform(size=2000)
    mistakes, correct = gallery.select(y_true, y_pred, confidence)
    assert len(mistakes) == gallery.MAX_MISTAKES and len(correct) == gallery.MAX_CORRECT
    assert all(y_pred[i] != y_true[i] for i in mistakes) and all(y_pred[i] == y_true[i] for i in correct)
    assert list(confidence[mistakes]) == sorted(confidence[mistakes], reverse=True)
    assert max(np.bincount(y_true[mistakes])) <= gallery.MISTAKES_PER_CLASS
    assert max(np.bincount(y_true[correct])) <= gallery.CORRECT_PER_CLASS
    # The most confident mistake of all is shown first.
    wrong = np.flatnonzero(y_pred != y_true)
    assert mistakes[0] == wrong[np.argmax(confidence[wrong])]


def test_gallery_entries_hold_small_jpeg_thumbnails_and_heat_maps():
    _, model = built("small_cnn")
    rng = np.random.default_rng(0)
    pictures = {i: rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)}
    y_true, y_pred = np.array([0, 1, 2]), np.array([1, 1, 0])
    entries, note = gallery.build_entries(model, pictures, [0, 2, 1], y_true, y_pred, np.array([0.9, 0.8, 0.7]),
                                         ("a", "b", "c"))
    assert "Grad-CAM" in note and "block" in note
    assert [e["true"] for e in entries] == ["a", "c", "b"] and entries[0]["predicted"] == "b"
    for entry in entries:
        for uri in (entry["image"], entry["heatmap"]):
            assert uri.startswith("data:image/jpeg;base64,")
            data = base64.b64decode(uri.split(",", 1)[1])
            assert len(data) < 20_000
            assert Image.open(io.BytesIO(data)).size == (gallery.THUMBNAIL, gallery.THUMBNAIL)
    page = gallery.gallery_html(entries[:2], entries[2:], note, total_mistakes=2)
    assert page.count("<figure") == 3 and page.count("<img") == 6


def test_gallery_of_a_model_without_backbone_shows_images_and_says_why_no_heat_maps():
    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    pictures = {0: np.zeros((8, 8, 3), np.uint8)}
    entries, note = gallery.build_entries(model, pictures, [0], np.array([0]), np.array([1]), np.array([0.6]),
                                          ("x", "y"))
    assert entries[0]["heatmap"] is None and entries[0]["image"]
    assert note.startswith("No heat maps") and "backbone" in note
