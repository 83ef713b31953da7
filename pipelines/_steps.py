"""Wiring shared by the pipelines: from a data URI to a converted data set, cached across runs."""

from __future__ import annotations

from typing import Any, NamedTuple

from components.convert_to_tfrecords import convert_to_tfrecords
from components.look_at_data import look_at_data
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
    look.set_display_name("Look at data").set_retry(num_retries=2, backoff_duration="30s")
    settings.apply(look, "look")

    validation = validate_data(data_uri=data_uri, content_fingerprint=look.outputs["fingerprint"],
                               binary_mode=binary_mode, max_rejected_fraction=max_rejected_fraction)
    validation.set_display_name("Validate data").set_retry(num_retries=2, backoff_duration="30s")
    settings.apply(validation, "validate")

    conversion = convert_to_tfrecords(
        data_uri=data_uri, validation=validation.outputs["validation"],
        data_fingerprint=validation.outputs["fingerprint"], validation_split_ratio=validation_split_ratio,
        test_split_ratio=test_split_ratio, random_seed=random_seed)
    conversion.set_display_name("Convert to TFRecords").set_retry(num_retries=2, backoff_duration="30s")
    settings.apply(conversion, "convert")
    return DataSteps(look, validation, conversion)
