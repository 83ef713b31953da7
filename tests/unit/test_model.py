"""Tests for trainer.train.model: each hyperparameter reaching the right layer, preprocessing, weights, loading."""

from __future__ import annotations

import importlib.util
import os
import zipfile

import keras
import numpy as np
import pytest
from keras.applications import imagenet_utils

from trainer.backbones import BACKBONES
from trainer.errors import ModelError
from trainer.hyperparameters import Hyperparameters
from trainer.train import model as model_lib


def small(**overrides) -> Hyperparameters:
    values = dict(model="small_cnn", weights="none", image_size=16)
    values.update(overrides)
    return Hyperparameters(**values)


def layer_names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers]


def test_model_structure():
    model = model_lib.build_model(small(), 3)
    assert model.input_shape == (None, 16, 16, 3)
    assert model.output_shape == (None, 3)
    assert layer_names(model) == ["image", "preprocess_scale", "backbone", "head_dropout", "head_dense"]
    probabilities = model(np.random.default_rng(0).uniform(0, 255, (4, 16, 16, 3)).astype(np.float32))
    np.testing.assert_allclose(np.sum(probabilities, axis=1), 1.0, rtol=1e-5)


def test_no_lambda_layers_anywhere():
    model = model_lib.build_model(small(augmentation=True), 3)
    assert not [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Lambda)]


def test_head_takes_dropout_and_l2():
    model = model_lib.build_model(small(dropout_rate=0.35, regularizers_l2=0.02), 4)
    assert model.get_layer("head_dropout").rate == 0.35
    dense = model.get_layer("head_dense")
    assert dense.units == 4 and dense.activation.__name__ == "softmax"
    assert dense.kernel_regularizer.get_config() == {"l2": pytest.approx(0.02)}
    # The regulariser adds its loss: 0.02 * sum(kernel^2).
    expected = 0.02 * float(np.sum(np.square(dense.kernel.numpy())))
    assert float(sum(model.losses)) == pytest.approx(expected, rel=1e-5)


def test_binary_mode_has_one_sigmoid_output():
    model = model_lib.build_model(small(binary_mode=True), 2)
    dense = model.get_layer("head_dense")
    assert dense.units == 1 and dense.activation.__name__ == "sigmoid"
    assert model.output_shape == (None, 1)


def test_binary_mode_needs_two_classes():
    with pytest.raises(ModelError, match="binary_mode=True needs exactly 2 classes, but the data has 3"):
        model_lib.build_model(small(binary_mode=True), 3)


def test_train_only_top_layer_freezes_the_backbone():
    model = model_lib.build_model(small(train_only_top_layer=True), 3)
    assert not model.get_layer("backbone").trainable
    head = model.get_layer("head_dense")
    assert [w.path for w in model.trainable_weights] == [w.path for w in head.trainable_weights]
    assert model_lib.build_model(small(), 3).get_layer("backbone").trainable


def test_head_stays_float32_under_mixed_precision():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = model_lib.build_model(small(), 3)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("backbone").compute_dtype == "float16"
    assert model.get_layer("head_dense").compute_dtype == "float32"
    assert model(np.zeros((1, 16, 16, 3), np.float32)).dtype == "float32"


# --- augmentation ---------------------------------------------------------------------------------

def test_no_augmentation_layers_unless_asked():
    assert model_lib.augmentation_layers(small()) == []
    names = layer_names(model_lib.build_model(small(), 3))
    assert not [n for n in names if n.startswith("augment_")]


def test_augmentation_values_reach_their_layers():
    # Distinct rotation and zoom values: the reference script passes them to each other's layer.
    hp = small(augmentation=True, augmentation_random_flip="vertical", augmentation_random_rotation=0.3,
               augmentation_random_zoom=0.1)
    model = model_lib.build_model(hp, 3)
    assert layer_names(model)[1:4] == ["augment_flip", "augment_rotation", "augment_zoom"]
    assert model.get_layer("augment_flip").mode == "vertical"
    assert tuple(model.get_layer("augment_rotation").factor) == pytest.approx((-0.3, 0.3))
    zoom = model.get_layer("augment_zoom")
    assert (zoom.height_lower, zoom.height_upper) == pytest.approx((-0.1, 0.1))
    assert zoom.width_factor is None  # the same zoom on both axes keeps the aspect ratio


@pytest.mark.parametrize("mode", ["horizontal_and_vertical", "horizontal", "vertical"])
def test_flip_modes(mode):
    layers = model_lib.augmentation_layers(small(augmentation=True, augmentation_random_flip=mode))
    assert layers[0].mode == mode


def test_flip_none_and_zero_factors_add_no_layer():
    hp = small(augmentation=True, augmentation_random_flip="None", augmentation_random_rotation=0.0,
               augmentation_random_zoom=0.0)
    assert model_lib.augmentation_layers(hp) == []


def test_negative_factors_give_the_same_symmetric_range():
    hp = small(augmentation=True, augmentation_random_rotation=-0.2, augmentation_random_zoom=-1.0)
    _, rotation, zoom = model_lib.augmentation_layers(hp)
    assert tuple(rotation.factor) == pytest.approx((-0.2, 0.2))
    # Zooming in by 100% would leave nothing to show; the zoom-in side is capped.
    assert (zoom.height_lower, zoom.height_upper) == pytest.approx((-0.99, 1.0))


def test_keras_sign_conventions_match_the_reference():
    """Positive zoom zooms out and positive rotation turns counter-clockwise, as the reference documents."""
    image = np.zeros((1, 32, 32, 1), np.float32)
    image[:, 12:20, 12:20] = 1.0  # a centred square
    zoomed_out = keras.layers.RandomZoom((0.5, 0.5), fill_mode="constant")(image, training=True)
    zoomed_in = keras.layers.RandomZoom((-0.5, -0.5), fill_mode="constant")(image, training=True)
    assert float(np.sum(zoomed_out)) < image.sum() < float(np.sum(zoomed_in))
    top = np.zeros((1, 32, 32, 1), np.float32)
    top[:, 0:4, 14:18] = 1.0  # a block at the top centre
    turned = np.asarray(keras.layers.RandomRotation((0.25, 0.25), fill_mode="constant")(top, training=True))
    rows, cols = np.nonzero(turned[0, :, :, 0] > 0.5)
    assert cols.mean() < 8 and 12 < rows.mean() < 20  # a quarter turn counter-clockwise: top -> left


def test_augmentation_is_inactive_at_inference():
    hp = small(augmentation=True, augmentation_random_rotation=0.5, augmentation_random_zoom=0.5)
    model = model_lib.build_model(hp, 3)
    plain = model_lib.build_model(small(), 3)
    plain.set_weights(model.get_weights())
    images = np.random.default_rng(1).uniform(0, 255, (2, 16, 16, 3)).astype(np.float32)
    np.testing.assert_allclose(model(images, training=False), plain(images, training=False), rtol=1e-6)
    trained = model.get_layer("augment_rotation")(images, training=True)
    assert not np.allclose(trained, images)


# --- preprocessing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, mode", [("mobilenet_v2", "tf"), ("resnet50", "caffe"), ("densenet121", "torch")])
def test_preprocessing_matches_keras_preprocess_input(name, mode):
    assert BACKBONES[name].preprocessing == mode
    pixels = np.random.default_rng(2).uniform(0, 255, (2, 4, 4, 3)).astype(np.float32)
    layers = model_lib.preprocessing_layers(name)
    out = pixels
    for layer in layers:
        out = layer(out)
    expected = imagenet_utils.preprocess_input(pixels.copy(), mode=mode)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_unit_and_none_preprocessing():
    scale, = model_lib.preprocessing_layers("small_cnn")
    np.testing.assert_allclose(scale(np.array([[0.0, 255.0]])), [[0.0, 1.0]])
    assert model_lib.preprocessing_layers("efficientnet_b0") == []


def test_reverse_channels_layer_round_trips_in_safe_mode(tmp_path):
    inputs = keras.Input((2, 2, 3))
    model = keras.Model(inputs, model_lib.ReverseChannels(name="bgr")(inputs))
    path = str(tmp_path / "bgr.keras")
    model.save(path)
    loaded = model_lib.load_model(path)
    x = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(loaded(x), x[..., ::-1])


def test_models_saved_before_the_regroup_by_stage_still_load(tmp_path):
    """Models in users' registries were saved when the layer lived in trainer/model.py: their config names
    module "trainer.model", which no longer exists. Keras finds the layer by its registered name instead."""
    inputs = keras.Input((2, 2, 3))
    model = keras.Model(inputs, model_lib.ReverseChannels(name="bgr")(inputs))
    new_path, old_path = tmp_path / "new.keras", tmp_path / "old.keras"
    model.save(str(new_path))
    with zipfile.ZipFile(new_path) as new, zipfile.ZipFile(old_path, "w") as old:
        for item in new.infolist():
            content = new.read(item)
            if item.filename == "config.json":
                assert b'"module": "trainer.train.model"' in content
                content = content.replace(b'"module": "trainer.train.model"', b'"module": "trainer.model"')
            old.writestr(item, content)
    assert importlib.util.find_spec("trainer.model") is None
    loaded = model_lib.load_model(str(old_path))
    x = np.arange(12, dtype=np.float32).reshape(1, 2, 2, 3)
    np.testing.assert_array_equal(loaded(x), x[..., ::-1])


# --- backbones and weights ------------------------------------------------------------------------

def test_small_cnn_reduces_to_8_pixels_or_less():
    for size, blocks in [(16, 1), (32, 2), (64, 3)]:
        backbone = model_lib.small_cnn((size, size, 3))
        assert len([la for la in backbone.layers if isinstance(la, keras.layers.MaxPooling2D)]) == blocks


def test_keras_application_backbone_is_named_and_pooled():
    model = model_lib.build_model(Hyperparameters(model="mobilenet_v2", weights="none", image_size=32), 5)
    backbone = model.get_layer("backbone")
    assert backbone.output_shape == (None, 1280)
    assert model.output_shape == (None, 5)


def test_imagenet_download_failure_says_what_to_do(monkeypatch):
    def offline(**kwargs):
        assert kwargs["weights"] == "imagenet" and not kwargs["include_top"]
        raise Exception("URL fetch failure on https://storage.googleapis.com/...: None -- no network")

    monkeypatch.setattr(keras.applications, "MobileNetV2", offline)
    with pytest.raises(ModelError, match=r"pretrained ImageNet weights for mobilenet_v2 \(MobileNetV2\) could not "
                                         r"be downloaded.*URL fetch failure.*path or gs:// URI.*'none'"):
        model_lib.build_model(Hyperparameters(model="mobilenet_v2", weights="imagenet", image_size=32), 3)


def test_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = model_lib.build_backbone(small())
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    model = model_lib.build_model(small(weights=path), 3)
    loaded = model.get_layer("backbone").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(loaded, source.get_weights(), strict=True))


def test_weights_file_on_gcs_is_downloaded(tmp_path, monkeypatch):
    from trainer import storage

    source = model_lib.build_backbone(small())
    path = str(tmp_path / "backbone.weights.h5")
    source.save_weights(path)
    downloads = []

    def download_file(uri, local_path):
        downloads.append(uri)
        with open(path, "rb") as src, open(local_path, "wb") as dst:
            dst.write(src.read())

    monkeypatch.setattr(storage, "download_file", download_file)
    backbone = model_lib.build_backbone(small(weights="gs://bucket/weights/backbone.weights.h5"))
    assert downloads == ["gs://bucket/weights/backbone.weights.h5"]
    assert np.array_equal(backbone.get_weights()[0], source.get_weights()[0])


def test_keras_application_weights_file_is_loaded(tmp_path):
    hp = Hyperparameters(model="mobilenet_v2", weights="none", image_size=32)
    source = model_lib.build_backbone(hp)
    path = str(tmp_path / "mobilenet_v2_no_top.weights.h5")
    source.save_weights(path)
    backbone = model_lib.build_backbone(Hyperparameters(model="mobilenet_v2", weights=path, image_size=32))
    assert np.array_equal(backbone.get_weights()[0], source.get_weights()[0])


def test_weights_file_that_does_not_fit_is_reported(tmp_path):
    path = str(tmp_path / "mobilenet_v2.weights.h5")
    model_lib.build_backbone(Hyperparameters(model="mobilenet_v2", weights="none", image_size=32)).save_weights(path)
    with pytest.raises(ModelError, match=rf"weights file {path} does not fit backbone small_cnn at 16 px"):
        model_lib.build_model(small(weights=path), 3)


def test_missing_weights_file_is_reported(tmp_path):
    missing = str(tmp_path / "nope.h5")
    with pytest.raises(ModelError, match=rf"weights file {missing} does not exist"):
        model_lib.build_model(small(weights=missing), 3)


# --- loading ----------------------------------------------------------------------------------------

def test_load_model_from_a_directory_or_file(tmp_path):
    model = model_lib.build_model(small(), 3)
    model.save(str(tmp_path / "model.keras"))
    for path in (str(tmp_path), str(tmp_path / "model.keras")):
        loaded = model_lib.load_model(path)
        assert layer_names(loaded) == layer_names(model)


def test_load_model_refuses_a_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"this is not a zip file")
    with pytest.raises(ModelError, match=rf"{path}: not a loadable Keras model"):
        model_lib.load_model(str(tmp_path))


def test_load_model_refuses_a_lambda_layer(tmp_path):
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2)(inputs))
    path = str(tmp_path / "lambda.keras")
    model.save(path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(ModelError, match=rf"{path}: refused to load: the model contains a Lambda layer"):
        model_lib.load_model(path)


def test_load_model_names_a_missing_file(tmp_path):
    with pytest.raises(ModelError, match=rf"{os.path.join(tmp_path, 'model.keras')}: no such file"):
        model_lib.load_model(str(tmp_path))


def _batch_norm_statistics(model: keras.Model) -> list[np.ndarray]:
    layers = [layer for layer in model_lib.backbone_of(model)._flatten_layers()
              if isinstance(layer, keras.layers.BatchNormalization)]
    assert layers, "the backbone should have batch normalisation for this test to mean something"
    return [np.array(v) for layer in layers for v in (layer.moving_mean, layer.moving_variance)]


def _one_training_step(model: keras.Model) -> list[np.ndarray]:
    """Train one step on a batch unlike ImageNet; returns the backbone's trainable weights before it."""
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    images = rng.uniform(200, 255, (8, 16, 16, 3)).astype("float32")
    targets = keras.utils.to_categorical(rng.integers(0, 3, 8), 3)
    before = [np.array(w) for w in model_lib.backbone_of(model).trainable_weights]
    model.train_on_batch(images, targets)
    return before


def test_fine_tuning_a_pretrained_backbone_keeps_its_batch_norm_statistics(tmp_path):
    """Keras transfer-learning guidance: pretrained BN stays in inference mode, also when fine-tuning."""
    path = str(tmp_path / "pretrained.weights.h5")  # "pretrained": weights saved from another backbone
    model_lib.build_backbone(small(random_seed=7)).save_weights(path)
    model = model_lib.build_model(small(weights=path, train_only_top_layer=False), 3)
    statistics = _batch_norm_statistics(model)
    trainable_before = _one_training_step(model)
    assert all(np.array_equal(a, b) for a, b in zip(_batch_norm_statistics(model), statistics, strict=True))
    # The backbone is still fine-tuned: every convolution moved.
    after = model_lib.backbone_of(model).trainable_weights
    assert after and all(w.path.split("/")[-2].endswith("_conv") for w in after)
    assert all(not np.array_equal(a, np.array(b)) for a, b in zip(trainable_before, after, strict=True))
    # The choice is part of the saved model, so incremental training keeps it.
    model.save(tmp_path / "model.keras")
    reloaded = model_lib.load_model(str(tmp_path / "model.keras"))
    statistics = _batch_norm_statistics(reloaded)
    _one_training_step(reloaded)
    assert all(np.array_equal(a, b) for a, b in zip(_batch_norm_statistics(reloaded), statistics, strict=True))


def test_a_backbone_trained_from_scratch_updates_its_batch_norm_statistics():
    model = model_lib.build_model(small(weights="none"), 3)
    statistics = _batch_norm_statistics(model)
    _one_training_step(model)
    assert not any(np.array_equal(a, b) for a, b in zip(_batch_norm_statistics(model), statistics, strict=True))
