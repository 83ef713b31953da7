"""Wiring shared by the pipelines: from a data URI to a converted data set (cached across runs), and from a
trained model to a released one (evaluated, gated, pushed, used for batch prediction)."""

from __future__ import annotations

from typing import Any, NamedTuple

from kfp import dsl

from components.batch_predict import batch_predict
from components.convert_to_tfrecords import convert_to_tfrecords
from components.deploy_model import deploy_model
from components.evaluate import evaluate
from components.gate import bless_model
from components.look_at_data import look_at_data
from components.push_model import push_model
from components.validate_data import validate_data
from pipelines.cluster import ClusterSettings


class DataSteps(NamedTuple):
    """The tasks ``prepare_data`` added; ``conversion.outputs["dataset"]`` is what training reads."""

    look: Any
    validation: Any
    conversion: Any


def prepare_data(data_uri: Any, *, binary_mode: Any, max_rejected_fraction: Any, validation_split_ratio: Any,
                 test_split_ratio: Any, random_seed: Any, settings: ClusterSettings) -> DataSteps:
    """Look at the data (never cached), validate it and convert it (both cached on the content).

    Call inside a ``@dsl.pipeline`` function; the arguments are its parameters. The look's content
    fingerprint is an input of validation, so a run on unchanged content reuses validation, and with
    it conversion and whatever consumes the data set (their inputs are then the same artifacts);
    one file added, removed or replaced changes the fingerprint and everything runs again.
    """
    look = look_at_data(data_uri=data_uri)
    # The one step that must see the folder as it is now: the folder behind data_uri changes between runs.
    look.set_caching_options(False)
    look.set_retry(num_retries=2, backoff_duration="30s")
    settings.apply(look, "look", display_name="Look at data")

    validation = validate_data(data_uri=data_uri, content_fingerprint=look.outputs["fingerprint"],
                               listed_files=look.outputs["files"],
                               binary_mode=binary_mode, max_rejected_fraction=max_rejected_fraction)
    validation.set_retry(num_retries=2, backoff_duration="30s")
    settings.apply(validation, "validate", display_name="Validate data")

    conversion = convert_to_tfrecords(
        data_uri=data_uri, validation=validation.outputs["validation"],
        data_fingerprint=validation.outputs["fingerprint"], validation_split_ratio=validation_split_ratio,
        test_split_ratio=test_split_ratio, random_seed=random_seed)
    conversion.set_retry(num_retries=2, backoff_duration="30s")
    settings.apply(conversion, "convert", display_name="Convert to TFRecords")
    return DataSteps(look, validation, conversion)


class ReleaseSteps(NamedTuple):
    """The tasks ``release`` added (push and batch prediction run only under their conditions)."""

    evaluation: Any
    gate: Any


def release(model: Any, dataset: Any, *, eval_metric: Any, min_eval_value: Any, baseline_model_uri: Any,
            model_registry_uri: Any, batch_data_uri: Any, settings: ClusterSettings, serving_namespace: Any = "",
            serving_model_name: Any = "", serving_gpus: Any = 0,
            serving_canary_traffic_percent: Any = 0) -> ReleaseSteps:
    """Evaluate ``model`` on the test split, gate it (metrics and infra validation), and push and batch-predict
    it when blessed; a pushed version is deployed as a KServe InferenceService when ``serving_namespace`` is set.

    Call inside a ``@dsl.pipeline`` function. Evaluation is cached (same model and data set, same
    result); the gate, the push and batch prediction decide again in every run.
    """
    evaluation = evaluate(trained_model=model, dataset=dataset, eval_metric=eval_metric)
    settings.apply(evaluation, "evaluate", display_name="Evaluate")

    gate = bless_model(trained_model=model, dataset=dataset, eval_metric=evaluation.outputs["eval_metric"],
                       eval_value=evaluation.outputs["eval_value"], min_eval_value=min_eval_value,
                       baseline_model_uri=baseline_model_uri)
    # The baseline (e.g. the registry's newest version) can change between runs: decide every time.
    gate.set_caching_options(False)
    settings.apply(gate, "bless", display_name="Quality gate")

    # An unblessed model skips what follows and the run ends green; the gate's log and
    # blessing.json say why ("not blessed: accuracy 0.91 < threshold 0.95").
    with dsl.If(gate.outputs["Output"] == True, name="blessed"):  # noqa: E712 - a KFP condition, not Python
        with dsl.If(model_registry_uri != "", name="registry-set"):
            push = push_model(trained_model=model, registry_uri=model_registry_uri, blessing=gate.outputs["blessing"])
            # The registry can change between runs (another run may have pushed): decide every time.
            push.set_caching_options(False)
            push.set_retry(num_retries=2, backoff_duration="30s")
            settings.apply(push, "push", display_name="Push to registry")
            with dsl.If(serving_namespace != "", name="serving-set"):
                deployment = deploy_model(version_uri=push.output, serving_namespace=serving_namespace,
                                          serving_model_name=serving_model_name, serving_gpus=serving_gpus,
                                          serving_canary_traffic_percent=serving_canary_traffic_percent)
                # Applying is idempotent, and the cluster's state is what counts: ask it every time.
                deployment.set_caching_options(False)
                settings.apply(deployment, "deploy", display_name="Deploy")
        with dsl.If(batch_data_uri != "", name="batch-data-set"):
            predictions = batch_predict(trained_model=model, data_uri=batch_data_uri)
            # The folder behind batch_data_uri can change between runs; always look at it again.
            predictions.set_caching_options(False)
            settings.apply(predictions, "batch_predict", display_name="Batch predict")
    return ReleaseSteps(evaluation, gate)
