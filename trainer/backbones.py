"""The image backbones imgclf can fine-tune, described without importing TensorFlow."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Backbone:
    """How to build one backbone and feed it pixels.

    ``constructor`` names a class in ``keras.applications`` (None for our own small CNN).
    ``preprocessing`` says what the network expects of 0-255 RGB input:
    "tf" scales to [-1, 1]; "caffe" is BGR minus the ImageNet mean; "torch" is ImageNet
    mean/std normalisation; "none" means the network rescales by itself; "unit" scales to [0, 1].
    """

    constructor: str | None
    preprocessing: str
    native_size: int
    min_size: int = 32
    # Some Keras Applications take an extra keyword to keep their built-in rescaling layer.
    extra_kwargs: tuple[tuple[str, object], ...] = ()


_IN_MODEL = (("include_preprocessing", True),)

BACKBONES: dict[str, Backbone] = {
    # A compact CNN trained from scratch: Keras Applications do not learn from random
    # initialisation on small data sets (batch-norm statistics), and pretrained weights may
    # be unavailable on an air-gapped cluster.
    "small_cnn": Backbone(None, "unit", 32, min_size=16),
    "mobilenet": Backbone("MobileNet", "tf", 224),
    "mobilenet_v2": Backbone("MobileNetV2", "tf", 224),
    "mobilenet_v3_small": Backbone("MobileNetV3Small", "none", 224, extra_kwargs=_IN_MODEL),
    "mobilenet_v3_large": Backbone("MobileNetV3Large", "none", 224, extra_kwargs=_IN_MODEL),
    "inception_v3": Backbone("InceptionV3", "tf", 299, min_size=75),
    "inception_resnet_v2": Backbone("InceptionResNetV2", "tf", 299, min_size=75),
    "xception": Backbone("Xception", "tf", 299, min_size=71),
    "resnet50": Backbone("ResNet50", "caffe", 224),
    "resnet101": Backbone("ResNet101", "caffe", 224),
    "resnet152": Backbone("ResNet152", "caffe", 224),
    "resnet50_v2": Backbone("ResNet50V2", "tf", 224),
    "resnet101_v2": Backbone("ResNet101V2", "tf", 224),
    "resnet152_v2": Backbone("ResNet152V2", "tf", 224),
    "densenet121": Backbone("DenseNet121", "torch", 224),
    "densenet169": Backbone("DenseNet169", "torch", 224),
    "densenet201": Backbone("DenseNet201", "torch", 224),
    "efficientnet_b0": Backbone("EfficientNetB0", "none", 224),
    "efficientnet_b1": Backbone("EfficientNetB1", "none", 240),
    "efficientnet_b2": Backbone("EfficientNetB2", "none", 260),
    "efficientnet_b3": Backbone("EfficientNetB3", "none", 300),
    "efficientnet_b4": Backbone("EfficientNetB4", "none", 380),
    "efficientnet_b5": Backbone("EfficientNetB5", "none", 456),
    "efficientnet_b6": Backbone("EfficientNetB6", "none", 528),
    "efficientnet_b7": Backbone("EfficientNetB7", "none", 600),
    "efficientnet_v2_b0": Backbone("EfficientNetV2B0", "none", 224, extra_kwargs=_IN_MODEL),
    "efficientnet_v2_b1": Backbone("EfficientNetV2B1", "none", 240, extra_kwargs=_IN_MODEL),
    "efficientnet_v2_b2": Backbone("EfficientNetV2B2", "none", 260, extra_kwargs=_IN_MODEL),
    "efficientnet_v2_b3": Backbone("EfficientNetV2B3", "none", 300, extra_kwargs=_IN_MODEL),
    "efficientnet_v2_s": Backbone("EfficientNetV2S", "none", 384, extra_kwargs=_IN_MODEL),
    "convnext_tiny": Backbone("ConvNeXtTiny", "none", 224, extra_kwargs=_IN_MODEL),
    "convnext_small": Backbone("ConvNeXtSmall", "none", 224, extra_kwargs=_IN_MODEL),
}

BACKBONE_NAMES: tuple[str, ...] = tuple(BACKBONES)


def input_size(model: str, image_size: int) -> int:
    """The model's input side in pixels: ``image_size``, or the backbone's own size when it is 0."""
    return image_size or BACKBONES[model].native_size
