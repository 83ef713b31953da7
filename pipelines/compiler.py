"""Compiles the pipeline to YAML, optionally for a user's own image registry."""

from __future__ import annotations

import os
import tempfile

from kfp import compiler

from components._image import IMAGE
from pipelines.cluster import ClusterSettings
from pipelines.image_classification import build_pipeline

COMPILED_PIPELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "image_classification.yaml")
COMPILED_TUNING_PIPELINE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                        "image_classification_tuning.yaml")


def compile_pipeline(output_path: str = COMPILED_PIPELINE, image: str | None = None,
                     settings: ClusterSettings | None = None, builder=build_pipeline) -> str:
    """Write the compiled pipeline to ``output_path``.

    ``image`` replaces the project's image everywhere; ``settings`` fits the pipeline to a cluster
    (the committed YAML uses the defaults). ``builder`` builds the pipeline: the main one by default.
    """
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        compiled = os.path.join(scratch, "pipeline.yaml")
        compiler.Compiler().compile(builder(settings), compiled)
        with open(compiled, encoding="utf-8") as handle:
            text = handle.read()
    if image and image != IMAGE:
        # Each executor names the image on one line; swapping those lines keeps the file's header
        # and layout, so the result reads like the committed YAML.
        text = text.replace(f"image: {IMAGE}\n", f"image: {image}\n")
        # The deploy step's `image` input (the image its InferenceService runs) defaults to the steps' image.
        text = text.replace(f"defaultValue: {IMAGE}\n", f"defaultValue: {image}\n")
    with open(output_path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return output_path


def compile_tuning_pipeline(output_path: str = COMPILED_TUNING_PIPELINE, image: str | None = None,
                            settings: ClusterSettings | None = None) -> str:
    """Write the compiled tuning pipeline (``pipelines/tuning.py``) to ``output_path``."""
    from pipelines.tuning import build_pipeline as build_tuning_pipeline

    return compile_pipeline(output_path, image=image, settings=settings, builder=build_tuning_pipeline)
