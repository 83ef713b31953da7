"""The classifier network (augmentation, preprocessing, backbone, head) and safe loading of saved models.

``build_model`` returns one Keras functional model that takes float32 RGB images [B, S, S, 3] with
values 0-255 and returns class probabilities::

    image -> [augment_flip] -> [augment_rotation] -> [augment_zoom]        (only with augmentation)
          -> preprocessing for the backbone (Rescaling / ReverseChannels / Normalization)
          -> "backbone" (a Keras Applications model or small_cnn, global average pooled)
          -> "head_dropout" -> "head_dense" (softmax over K classes, or one sigmoid in binary mode)

The layer names are fixed so that incremental training and freezing find the backbone and the
head in any saved model. Everything is built from serialisable built-in layers (plus one small
registered layer), never ``Lambda``, so saved models load with ``safe_mode=True``.

Augmentation follows the reference algorithm's actual behaviour: each hyperparameter is the
largest magnitude of a random transformation drawn uniformly from [-|f|, |f|] for every image
(``keras.layers.RandomRotation(0.2)`` and ``RandomZoom(0.1)`` do the same). Within that range
Keras's sign convention is the reference's, checked in tests: a positive rotation turns the image
counter-clockwise and a positive zoom zooms out (shows more of the scene). The sign of the
hyperparameter itself therefore does not matter (the reference script raises on negative values
for rotation). Rotation and zoom are passed by keyword, so the reference script's bug of swapping
them cannot happen. The random layers are active only in training (``training=True``), so the
exported model never augments.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import keras

from trainer import storage
from trainer.backbones import BACKBONES
from trainer.errors import ModelError
from trainer.hyperparameters import Hyperparameters
from trainer.layout import KERAS_MODEL_FILE

log = logging.getLogger(__name__)

INPUT_NAME = "image"
BACKBONE_LAYER = "backbone"
HEAD_DROPOUT_LAYER = "head_dropout"
HEAD_DENSE_LAYER = "head_dense"
FLIP_LAYER = "augment_flip"
ROTATION_LAYER = "augment_rotation"
ZOOM_LAYER = "augment_zoom"

# The largest zoom-in RandomZoom is given: zooming in by 100% would leave an empty crop (Keras
# divides by 1 - factor), so a hyperparameter of 1.0 means "zoom in by up to 99%".
_MAX_ZOOM_IN = 0.99

# ImageNet statistics of the "caffe" (BGR, 0-255) and "torch" (RGB, 0-1) preprocessing modes,
# the values keras.applications.imagenet_utils.preprocess_input uses.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="imgclf")
class ReverseChannels(keras.layers.Layer):
    """RGB <-> BGR: the channel order "caffe"-style backbones (ResNet50/101/152) were trained on.

    A registered layer rather than a Lambda, because models are loaded with safe_mode=True, which
    refuses Lambda layers (they can carry arbitrary Python code).
    """

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape


CUSTOM_OBJECTS = {"imgclf>ReverseChannels": ReverseChannels}


def build_model(hp: Hyperparameters, num_classes: int) -> keras.Model:
    """The classifier for ``hp`` and ``num_classes``, with a freshly initialised head.

    The input is float32 [B, S, S, 3] RGB in 0-255 with S = ``hp.input_size``. The backbone's
    weights come from ``hp.weights``: "imagenet" (downloaded by Keras), "none" (random) or the
    path / gs:// URI of a Keras weights file for the backbone without its top.
    Under a mixed-precision policy the head's dense layer still computes in float32, so the
    probabilities are float32.
    """
    if num_classes < 2:
        raise ModelError(f"a classifier needs at least 2 classes, got {num_classes}")
    if hp.binary_mode and num_classes != 2:
        raise ModelError(f"binary_mode=True needs exactly 2 classes, but the data has {num_classes}; "
                         "set binary_mode to False")
    size = hp.input_size
    inputs = keras.Input((size, size, 3), dtype="float32", name=INPUT_NAME)
    x = inputs
    for layer in augmentation_layers(hp):
        x = layer(x)
    for layer in preprocessing_layers(hp.model):
        x = layer(x)
    backbone = build_backbone(hp)
    backbone.trainable = not hp.train_only_top_layer
    if backbone_batch_norm_frozen(hp):
        freeze_batch_norm(backbone)
    # training=False asks for inference mode, but in Keras 3 fit's training flag reaches the backbone's
    # layers all the same: what freezes a frozen backbone's batch normalisation is trainable=False
    # (freeze_batch_norm), and dropout inside a frozen backbone (EfficientNet's) still runs in fit.
    x = backbone(x, training=False) if hp.train_only_top_layer else backbone(x)
    dropout, dense = build_head(hp, num_classes)
    outputs = dense(dropout(x))
    return keras.Model(inputs, outputs, name=f"imgclf_{hp.model}")


def backbone_batch_norm_frozen(hp: Hyperparameters) -> bool:
    """Whether the backbone's batch normalisation is frozen (inference mode, weights fixed) in training.

    It is whenever the backbone starts from pretrained weights ("imagenet" or a weights file), also
    when the whole network is fine-tuned, as Keras's transfer-learning guide advises: the moving mean
    and variance stay those learnt on the large pretraining data instead of being pulled towards the
    statistics of small batches of new data, which would shift every feature the head sees and undo
    much of what pretraining gave. A backbone trained from scratch (weights "none") needs batch
    statistics to learn at all, so its BN trains. A frozen backbone is frozen either way.
    """
    return hp.train_only_top_layer or hp.weights != "none"


def freeze_batch_norm(backbone: keras.Model) -> None:
    """Make every BatchNormalization layer of ``backbone`` non-trainable, so it runs in inference mode.

    Keras's BatchNormalization uses batch statistics only when it is called in training mode AND is
    trainable. Calling the backbone with ``training=False`` is not enough on its own: in Keras 3 a
    functional model passes its own ``training`` (True in ``fit``) on to the layers it calls, over
    the value stored in the graph. ``trainable`` is saved with each layer, so a saved model keeps the
    choice when incremental training loads it. Gamma and beta stay fixed too (the guide's choice).
    """
    for layer in backbone._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def augmentation_layers(hp: Hyperparameters) -> list[keras.layers.Layer]:
    """The random flip, rotation and zoom layers ``hp`` asks for (none unless ``hp.augmentation``)."""
    if not hp.augmentation:
        return []
    layers: list[keras.layers.Layer] = []
    # Different seeds per layer: the same seed would correlate flip, rotation and zoom decisions.
    seed = hp.random_seed
    if hp.augmentation_random_flip != "None":
        layers.append(keras.layers.RandomFlip(hp.augmentation_random_flip, seed=seed, name=FLIP_LAYER))
    rotation = abs(hp.augmentation_random_rotation)
    if rotation:
        layers.append(keras.layers.RandomRotation(factor=(-rotation, rotation), seed=seed + 1,
                                                  name=ROTATION_LAYER))
    zoom = abs(hp.augmentation_random_zoom)
    if zoom:
        # Positive factors zoom out, negative factors zoom in (Keras's convention and the reference's).
        layers.append(keras.layers.RandomZoom(height_factor=(-min(zoom, _MAX_ZOOM_IN), zoom), seed=seed + 2,
                                              name=ZOOM_LAYER))
    return layers


def preprocessing_layers(model_name: str) -> list[keras.layers.Layer]:
    """Layers turning 0-255 RGB into what the backbone was trained on (see backbones.Backbone)."""
    mode = BACKBONES[model_name].preprocessing
    if mode == "tf":
        return [keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess_scale")]
    if mode == "unit":
        return [keras.layers.Rescaling(1.0 / 255.0, name="preprocess_scale")]
    if mode == "torch":
        return [keras.layers.Rescaling(1.0 / 255.0, name="preprocess_scale"),
                keras.layers.Normalization(mean=_TORCH_MEAN, variance=[s * s for s in _TORCH_STD],
                                           name="preprocess_normalize")]
    if mode == "caffe":
        return [ReverseChannels(name="preprocess_bgr"),
                keras.layers.Normalization(mean=_CAFFE_MEAN_BGR, variance=(1.0, 1.0, 1.0),
                                           name="preprocess_normalize")]
    if mode == "none":
        return []
    raise ValueError(f"backbone {model_name!r} has unknown preprocessing {mode!r}")


def build_head(hp: Hyperparameters, num_classes: int) -> tuple[keras.layers.Layer, keras.layers.Layer]:
    """The head's layers: Dropout, then Dense with softmax over ``num_classes`` (one sigmoid unit in
    binary mode) and L2 on its kernel.

    The dense layer is kept in float32 under mixed precision: a float16 softmax/sigmoid loses
    precision and can overflow.
    """
    units, activation = (1, "sigmoid") if hp.binary_mode else (num_classes, "softmax")
    return (keras.layers.Dropout(hp.dropout_rate, seed=hp.random_seed, name=HEAD_DROPOUT_LAYER),
            keras.layers.Dense(units, activation=activation, name=HEAD_DENSE_LAYER, dtype="float32",
                               kernel_regularizer=keras.regularizers.L2(hp.regularizers_l2)))


def head_dense(model: keras.Model) -> keras.layers.Layer:
    """The head's dense layer of a model built by ``build_model``; ModelError if it has none."""
    return _named_layer(model, HEAD_DENSE_LAYER)


def backbone_of(model: keras.Model) -> keras.Model:
    """The backbone sub-model of a model built by ``build_model``; ModelError if it has none."""
    return _named_layer(model, BACKBONE_LAYER)


def _named_layer(model: keras.Model, name: str) -> keras.layers.Layer:
    try:
        return model.get_layer(name)
    except ValueError:
        raise ModelError(f"model {model.name!r} has no layer named {name!r}; "
                         "was it built by imgclf?") from None


def build_backbone(hp: Hyperparameters) -> keras.Model:
    """The feature extractor, named "backbone", with the weights ``hp.weights`` asks for."""
    spec = BACKBONES[hp.model]
    shape = (hp.input_size, hp.input_size, 3)
    if spec.constructor is None:
        backbone = small_cnn(shape)
        if hp.weights != "none":
            with _local_weights_file(hp.weights) as path:
                _load_backbone_weights(backbone, path, hp)
    else:
        constructor = getattr(keras.applications, spec.constructor)
        kwargs = dict(include_top=False, pooling="avg", input_shape=shape, **dict(spec.extra_kwargs))
        if hp.weights == "none":
            backbone = constructor(weights=None, **kwargs)
        elif hp.weights == "imagenet":
            try:
                backbone = constructor(weights="imagenet", **kwargs)
            except Exception as err:  # Keras raises a bare Exception for a failed download.
                raise ModelError(
                    f"pretrained ImageNet weights for {hp.model} ({spec.constructor}) could not be "
                    f"downloaded ({type(err).__name__}: {err}). Where the cluster cannot reach "
                    "storage.googleapis.com, set weights to the path or gs:// URI of the Keras "
                    "no-top weights file (e.g. a copy of Keras's *_no_top.h5), or to 'none' to "
                    "train from random initialisation") from err
        else:
            backbone = constructor(weights=None, **kwargs)
            with _local_weights_file(hp.weights) as path:
                _load_backbone_weights(backbone, path, hp)
    backbone.name = BACKBONE_LAYER
    return backbone


def small_cnn(input_shape: tuple[int, int, int]) -> keras.Model:
    """A compact conv-BN-ReLU network that learns from scratch on small data sets.

    Blocks of two 3x3 convolutions halve the resolution until it is at most 8 pixels, with
    16, 32, 64 then 128 filters, and a last block feeds global average pooling. Batch-norm
    momentum is 0.9 rather than Keras's 0.99 so that the moving statistics settle within the
    few hundred steps a small data set gives (validation accuracy is otherwise poor early on).
    """
    inputs = keras.Input(input_shape, name="small_cnn_input")
    x = inputs
    side, filters, block = input_shape[0], 16, 0

    def conv(x, filters: int, name: str):
        x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        return keras.layers.ReLU(name=f"{name}_relu")(x)

    while side > 8:
        block += 1
        x = conv(x, filters, f"block{block}a")
        x = conv(x, filters, f"block{block}b")
        x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
        side, filters = side // 2, min(filters * 2, 128)
    x = conv(x, filters, f"block{block + 1}a")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name="small_cnn")


@contextlib.contextmanager
def _local_weights_file(uri: str) -> Iterator[str]:
    """A local copy of a weights file given as a path or gs:// URI; the name (extension) is kept
    because Keras picks the file format from it."""
    if not uri.startswith("gs://"):
        if not os.path.isfile(uri):
            raise ModelError(f"weights file {uri} does not exist; set weights to an existing Keras weights "
                             "file (.h5 / .weights.h5), 'imagenet' or 'none'")
        yield uri
        return

    tmp = tempfile.mkdtemp(prefix="imgclf-weights-")
    try:
        local = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
        storage.download_file(uri, local)
        yield local
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_backbone_weights(backbone: keras.Model, path: str, hp: Hyperparameters) -> None:
    try:
        backbone.load_weights(path)
    except Exception as err:  # Keras raises ValueError, OSError, KeyError... for a file that does not fit.
        raise ModelError(
            f"weights file {hp.weights} does not fit backbone {hp.model} at {hp.input_size} px "
            f"({type(err).__name__}: {err}); it must hold the weights of that network without its "
            "top (include_top=False)") from err


def load_model(model_dir_or_file: str, *, compile: bool = False) -> keras.Model:
    """Load a model saved by imgclf: a model directory (holding model.keras) or a .keras file.

    Local paths and gs:// URIs. Loading runs in Keras's safe mode, so a file that would execute
    Python code (a Lambda layer) is refused. Any failure is a ModelError naming the file.
    """
    path = model_dir_or_file.rstrip("/")
    if not path.endswith(".keras"):
        path = storage.join(path, KERAS_MODEL_FILE)
    tmp = None
    try:
        local = path
        if path.startswith("gs://"):

            tmp = tempfile.mkdtemp(prefix="imgclf-model-")
            local = os.path.join(tmp, KERAS_MODEL_FILE)
            storage.download_file(path, local)
        if not os.path.isfile(local):
            raise ModelError(f"{path}: no such file; pass a model directory written by imgclf training "
                             f"(it holds {KERAS_MODEL_FILE}) or the .keras file itself")
        try:
            return keras.saving.load_model(local, compile=compile, safe_mode=True,
                                           custom_objects=CUSTOM_OBJECTS)
        except Exception as err:  # Keras raises many types for a corrupt, foreign or unsafe file.
            if "safe_mode" in str(err):
                raise ModelError(
                    f"{path}: refused to load: the model contains a Lambda layer or other Python code, "
                    "which could run arbitrary code when loaded. imgclf models never do; retrain with "
                    "imgclf, or rebuild the model without Lambda layers") from err
            raise ModelError(f"{path}: not a loadable Keras model ({type(err).__name__}: {err}); pass "
                             f"the {KERAS_MODEL_FILE} written by imgclf training") from err
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
