"""The Katib Experiment: its structure read by the kubeflow-katib SDK's models, and its trial command run for real."""

import os
import re
import shlex
import subprocess
import sys

import kubernetes.client
import pytest
from kubeflow.katib import models as katib_models

from components._image import IMAGE
from trainer import katib, tuning
from trainer.conversion import convert_dataset
from trainer.validation import validate_dataset

RANGES = {"ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.0005", "MaxValue": "0.01",
                                         "ScalingType": "Logarithmic"}],
          "IntegerParameterRanges": [{"Name": "batch_size", "MinValue": "4", "MaxValue": "16"}],
          "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "rmsprop"]}]}
FIXED = {"model": "small_cnn", "weights": "none", "image_size": 16, "epochs": 2, "validation_split_ratio": 0.25,
         "test_split_ratio": 0.2}
# Katib 0.17 added feasibleSpace.distribution; the SDK that installs beside kfp here (0.14) predates it.
NEWER_THAN_SDK = {("V1beta1FeasibleSpace", "distribution")}


def strict(cls, data, package, path="spec"):
    """Build an SDK model from a manifest dict, refusing any key the model does not declare."""
    if isinstance(cls, str):
        inner = re.fullmatch(r"list\[(.+)\]", cls)
        if inner:
            assert isinstance(data, list), path
            return [strict(inner.group(1), item, package, f"{path}[{i}]") for i, item in enumerate(data)]
        inner = re.fullmatch(r"dict\(str, (.+)\)", cls)
        if inner:
            assert isinstance(data, dict), path
            return {k: strict(inner.group(1), v, package, f"{path}.{k}") for k, v in data.items()}
        if cls in ("str", "int", "bool", "float", "object"):
            return data
        cls = getattr(package, cls, None) or getattr(kubernetes.client, cls)
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        if (cls.__name__, key) in NEWER_THAN_SDK:
            continue
        assert key in by_json, f"{path}.{key} is not a field of {cls.__name__}"
        attr = by_json[key]
        kwargs[attr] = strict(cls.openapi_types[attr], value, package, f"{path}.{key}")
    return cls(**kwargs)


def manifest(strategy="Bayesian", early_stopping_type="Auto"):
    config = tuning.make_config(RANGES, FIXED, strategy=strategy, max_trials=6, parallel_trials=3,
                                early_stopping_type=early_stopping_type)
    return config, katib.experiment_manifest(config, "gs://bucket/dataset", image=IMAGE, gpus=1)


@pytest.mark.parametrize("strategy, algorithm", [("Bayesian", "tpe"), ("Random", "random"),
                                                 ("Hyperband", "hyperband")])
def test_the_experiment_is_a_valid_katib_v1beta1_experiment(strategy, algorithm):
    config, doc = manifest(strategy)
    experiment = strict(katib_models.V1beta1Experiment, doc, katib_models)
    spec = experiment.spec
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1beta1", "Experiment")
    assert spec.algorithm.algorithm_name == algorithm
    assert (spec.parallel_trial_count, spec.max_trial_count, spec.max_failed_trial_count) == (3, 6, 6)
    assert spec.objective.type == "maximize" and spec.objective.objective_metric_name == "validation-accuracy"
    names = {p.name: p for p in spec.parameters}
    assert {"learning_rate", "batch_size", "optimizer"} <= set(names)
    assert names["optimizer"].feasible_space.list == ["adam", "rmsprop"]
    assert doc["spec"]["parameters"][[p["name"] for p in doc["spec"]["parameters"]].index("learning_rate")][
        "feasibleSpace"]["distribution"] == "logUniform"
    # The trial template is a Kubernetes Job running our image with a GPU, every parameter referenced.
    template = spec.trial_template
    job = strict(kubernetes.client.V1Job, template.trial_spec, kubernetes.client, "trialSpec")
    [container] = job.spec.template.spec.containers
    assert container.image == IMAGE and container.name == template.primary_container_name
    assert container.resources.limits == {"nvidia.com/gpu": 1}
    command = " ".join(container.args)
    for parameter in template.trial_parameters:
        assert f"${{trialParameters.{parameter.name}}}" in command
        assert parameter.reference in names
    if strategy == "Hyperband":
        assert "epochs" in names and spec.early_stopping is None
    else:
        assert spec.early_stopping.algorithm_name == "medianstop"


def test_grid_and_off():
    config = tuning.make_config({"optimizer": ["adam", "sgd"]}, FIXED, strategy="Grid", max_trials=9,
                                early_stopping_type="Off")
    doc = katib.experiment_manifest(config, "gs://b/d", image=IMAGE, gpus=0)
    assert doc["spec"]["algorithm"]["algorithmName"] == "grid" and doc["spec"]["maxTrialCount"] == 2
    assert "earlyStopping" not in doc["spec"]
    assert "resources" not in doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.slow
def test_the_trial_command_runs_and_katibs_default_filter_reads_its_metrics(tmp_path, tiny_dataset):
    validate_dataset(str(tiny_dataset), str(tmp_path / "validation"))
    convert_dataset(str(tiny_dataset), str(tmp_path / "validation" / "validation.json"), str(tmp_path / "dataset"),
                    validation_split_ratio=0.25, test_split_ratio=0.2, random_seed=0)
    config, doc = manifest("Random")
    container = doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    # What Katib does: substitute one suggestion into the template, then run the container's command.
    suggestion = {"learningRate": "0.005", "batchSize": "8", "optimizer": "adam"}
    args = [re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: suggestion[m.group(1)], a) for a in container["args"]]
    args[args.index("--dataset") + 1] = str(tmp_path / "dataset")
    args[args.index("--output") + 1] = str(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + shlex.join(args)
    for pattern in (katib.KATIB_DEFAULT_FILTER, katib.METRICS_FORMAT):
        metrics = katib.parse_metrics(done.stdout, pattern)
        accuracy = [value for name, value in metrics if name == "validation-accuracy"]
        assert len(accuracy) == 3  # two epochs and the final line
        assert all(0.0 <= value <= 1.0 for value in accuracy)
        assert [value for name, value in metrics if name == "epoch"] == [1.0, 2.0]
        assert any(name == "validation-loss" for name, _ in metrics)
    assert (tmp_path / "model" / "model.keras").is_file()
