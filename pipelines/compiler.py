"""Compiles the pipelines to YAML for the oldest KFP backend they must run on, optionally for another image."""

from __future__ import annotations

import os
import tempfile

from kfp.compiler import pipeline_spec_builder

from components._image import IMAGE
from pipelines.backends import DEFAULT_BACKEND, fit_to_backend
from pipelines.cluster import ClusterSettings
from pipelines.image_classification import build_pipeline

_HERE = os.path.dirname(os.path.abspath(__file__))
COMPILED_PIPELINE = os.path.join(_HERE, "image_classification.yaml")
COMPILED_TUNING_PIPELINE = os.path.join(_HERE, "image_classification_tuning.yaml")
# Two committed pairs: the default target (the run form's GPU count reaches the pod, from 2.4.1), and one
# for Kubeflow 1.9's backend 2.2.0 (one GPU fixed at compile time, no /dev/shm), which also runs on every
# newer backend: the one YAML for a cluster fleet that mixes versions.
COMMITTED = {
    DEFAULT_BACKEND: (COMPILED_PIPELINE, COMPILED_TUNING_PIPELINE),
    "2.2.0": (os.path.join(_HERE, "kfp-2.2.0", "image_classification.yaml"),
              os.path.join(_HERE, "kfp-2.2.0", "image_classification_tuning.yaml")),
}


def compile_pipeline(output_path: str = COMPILED_PIPELINE, image: str | None = None,
                     settings: ClusterSettings | None = None, builder=build_pipeline) -> str:
    """Write the compiled pipeline to ``output_path``.

    ``image`` replaces the project's image everywhere; ``settings`` fits the pipeline to a cluster and
    to the oldest backend it must run on (the committed YAML uses the defaults). ``builder`` builds the
    pipeline: the main one by default. What the SDK always writes but that backend's driver refuses or
    ignores is taken out (``pipelines.backends.fit_to_backend``).
    """
    settings = settings or ClusterSettings()
    os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
    pipeline = builder(settings)
    spec, platform = pipeline.pipeline_spec, pipeline.platform_spec
    fit_to_backend(spec, platform, settings.backend)
    with tempfile.TemporaryDirectory() as scratch:
        compiled = os.path.join(scratch, "pipeline.yaml")
        pipeline_spec_builder.write_pipeline_spec_to_file(pipeline_spec=spec, pipeline_description=pipeline.description,
                                                          platform_spec=platform, package_path=compiled)
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
