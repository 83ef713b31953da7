"""The tuning pipeline: its run form is the schema plus the search, trials ask for GPUs (tests/unit/test_pipeline.py
keeps the committed YAML current)."""

import inspect

import pytest
import yaml

from components.tuning_setup import tuning_setup
from pipelines import compiler, operations
from pipelines.cli import main as imgclf
from pipelines.image_classification import image_classification
from pipelines.tuning import TUNING_DEFAULTS, image_classification_tuning
from trainer import hyperparameters as hps

SEARCH_SETTINGS = set(TUNING_DEFAULTS)
# The main pipeline's settings that a search has no use for: each trial starts fresh, and the study keeps state.
NOT_IN_TUNING = {"initial_model_uri", "checkpoint_root"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "tuning.yaml"
    compiler.compile_tuning_pipeline(str(path))
    return path.read_text()


@pytest.fixture(scope="module")
def spec(compiled):
    return next(yaml.safe_load_all(compiled))


def test_run_form_is_every_hyperparameter_plus_the_main_settings_and_the_search():
    params = inspect.signature(image_classification_tuning.pipeline_func).parameters
    main = set(inspect.signature(image_classification.pipeline_func).parameters)
    assert set(params) == (main - NOT_IN_TUNING) | SEARCH_SETTINGS
    for name, field in hps.FIELDS.items():
        assert params[name].annotation is hps.python_type(field), name
        assert params[name].default == field.default, name
    setup = inspect.signature(tuning_setup.python_func).parameters
    assert set(hps.FIELDS) <= set(setup)


def test_trials_run_in_lanes_that_ask_for_a_gpu_and_are_retried(spec):
    root = spec["root"]["dag"]["tasks"]
    # The loop lives in a sub-pipeline, so that the select step depends on an ordinary task (see pipelines/tuning.py).
    lanes = root["trial-lanes"]
    assert lanes["inputs"]["parameters"]["lanes"]["taskOutputParameter"] == {"outputParameterKey": "Output",
                                                                              "producerTask": "tuning-setup"}
    loop = spec["components"]["comp-trial-lanes"]["dag"]["tasks"]["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--lanes"
    assert "iteratorPolicy" not in loop  # parallel_trials lanes at once, decided at run time
    lane = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["tuning-trials"]
    assert lane["retryPolicy"]["maxRetryCount"] == 3
    assert lane["cachingOptions"] == {}
    # The GPU count is the pipeline's accelerator_count, carried into the loop.
    assert "pipelinechannel--accelerator_count" in spec["components"]["comp-for-loop-1"]["inputDefinitions"][
        "parameters"]
    accelerator = spec["deploymentSpec"]["executors"]["exec-tuning-trials"]["container"]["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert "accelerator_count" in accelerator["resourceCount"]
    # The select step waits for the whole loop and fans in nothing: it reads the shared study.
    assert "trial-lanes" in root["select-best-trial"]["dependentTasks"]
    assert "Collected" not in str(spec) and "artifactIterator" not in str(spec)


def test_the_best_model_goes_through_the_main_pipelines_release_steps(spec):
    root = spec["root"]["dag"]["tasks"]
    evaluate_input = root["evaluate"]["inputs"]["artifacts"]["trained_model"]["taskOutputArtifact"]
    assert evaluate_input == {"outputArtifactKey": "best_model", "producerTask": "select-best-trial"}
    assert {"look-at-data", "validate-data", "convert-to-tfrecords", "tuning-setup", "select-best-trial", "evaluate",
            "bless-model", "condition-1"} <= set(root)
    # The data steps are the main pipeline's: the look runs every time, validation and conversion are
    # reused on unchanged content, and the search itself starts afresh in every run.
    assert root["look-at-data"]["cachingOptions"] == {}
    assert root["validate-data"]["cachingOptions"] == {"enableCache": True}
    assert root["convert-to-tfrecords"]["cachingOptions"] == {"enableCache": True}
    assert root["tuning-setup"]["cachingOptions"] == {}


def test_compile_writes_both_committed_pipelines(tmp_path, capsys):
    main, tuning = tmp_path / "main.yaml", tmp_path / "tuning.yaml"
    assert imgclf(["compile", "--output", str(main), "--tuning-output", str(tuning)]) == 0
    # One cache scope (the backend's cache lookups filter on pipelineInfo.name), two names users see.
    tuning_info = next(yaml.safe_load_all(tuning.read_text()))["pipelineInfo"]
    assert tuning_info == {**tuning_info, "name": "image-classification", "displayName": "image-classification-tuning"}
    assert next(yaml.safe_load_all(main.read_text()))["pipelineInfo"]["name"] == "image-classification"


def test_submit_checks_the_search_before_sending():
    with pytest.raises(operations.ParameterError) as caught:
        operations.pipeline_parameters({"data_uri": "gs://b/d", "learning_rate": "0.01",
                                        "ranges": '{"learning_rate": {"min": 0.001, "max": 0.1}}',
                                        "strategy": "Annealing"}, image_classification_tuning)
    assert [p.split(":")[0] for p in caught.value.problems] == ["learning_rate", "strategy"]
    typed = operations.pipeline_parameters({"data_uri": "gs://b/d", "ranges": {"optimizer": ["adam", "sgd"]},
                                            "max_trials": "4"}, image_classification_tuning)
    assert typed["ranges"] == '{"optimizer": ["adam", "sgd"]}' and typed["max_trials"] == 4
