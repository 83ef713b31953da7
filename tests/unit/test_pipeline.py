"""The pipeline and its components expose exactly the schema's hyperparameters, and the YAML is current."""

import inspect

import pytest
import yaml

from components.train import train
from pipelines import compiler
from pipelines.image_classification import image_classification
from trainer import hyperparameters as hps

PIPELINE_ONLY = {"data_uri", "max_rejected_fraction", "accelerator_count", "initial_model_uri",
                 "checkpoint_root", "jit_compile"}
KFP_TYPES = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    compiler.compile_pipeline(str(path))
    return path.read_text()


@pytest.fixture(scope="module")
def spec(compiled):
    return yaml.safe_load(compiled)


def test_pipeline_signature_is_the_schema():
    params = inspect.signature(image_classification.pipeline_func).parameters
    assert set(params) - PIPELINE_ONLY == set(hps.FIELDS)
    for name, field in hps.FIELDS.items():
        assert params[name].annotation is hps.python_type(field), name
        assert params[name].default == field.default, name


def test_train_component_takes_every_hyperparameter():
    params = inspect.signature(train.python_func).parameters
    for name, field in hps.FIELDS.items():
        assert params[name].annotation is hps.python_type(field), name


def test_compiled_pipeline_exposes_every_reference_default(spec):
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert len(hps.REFERENCE_NAMES) == 25
    for name, field in hps.FIELDS.items():
        declared = inputs[name]
        assert declared["parameterType"] == KFP_TYPES[hps.python_type(field)], name
        assert declared["defaultValue"] == field.default, name
    assert "defaultValue" not in inputs["data_uri"]


def test_train_step_asks_for_a_gpu(spec):
    executors = spec["deploymentSpec"]["executors"]
    train_exec = executors["exec-train"]["container"]
    accelerator = train_exec["resources"]["accelerator"]
    assert accelerator["resourceType"] == "nvidia.com/gpu"
    assert "accelerator_count" in accelerator["resourceCount"]
    assert spec["root"]["inputDefinitions"]["parameters"]["accelerator_count"]["defaultValue"] == 1
    for name, executor in executors.items():
        if name != "exec-train":
            assert "accelerator" not in executor["container"].get("resources", {}), name


def test_wiring_retries_caching_and_names(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"validate-data", "convert-to-tfrecords", "train", "evaluate"}
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert tasks["validate-data"]["cachingOptions"] == {}
    assert tasks["train"]["cachingOptions"] == {"enableCache": True}
    assert all(task["taskInfo"]["name"] for task in tasks.values())


def test_committed_yaml_is_what_the_code_compiles_to(compiled):
    with open(compiler.COMPILED_PIPELINE, encoding="utf-8") as handle:
        committed = handle.read()
    assert committed == compiled, "pipelines/image_classification.yaml is stale: run `imgclf compile`"


def test_compile_for_another_registry(tmp_path):
    path = compiler.compile_pipeline(str(tmp_path / "p.yaml"), image="registry.example.com/team/imgclf:7")
    executors = yaml.safe_load(open(path))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example.com/team/imgclf:7"}
