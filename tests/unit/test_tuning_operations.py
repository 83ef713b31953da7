"""upload, submit and schedule of the tuning pipeline, checked by the requests sent to a fake KFP API server."""

import json
import pathlib

import pytest

from pipelines.compiler import COMPILED_TUNING_PIPELINE
from tests.support.kfp_api import imgclf
from trainer import hyperparameters as hps
from trainer.tune import search_space

RUNS = "/apis/v2beta1/runs"
RECURRING_RUNS = "/apis/v2beta1/recurringruns"
UPLOAD = "/apis/v2beta1/pipelines/upload"
RANGES = {"ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.00001", "MaxValue": "0.1",
                                         "ScalingType": "Logarithmic"}],
          "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "sgd"]}]}


def test_upload_tuning_sends_the_committed_tuning_yaml(kfp_api):
    assert imgclf("upload", "--host", kfp_api.url, "--tuning") == 0
    [upload] = kfp_api.requests_to("POST", UPLOAD)
    assert upload.files["uploadfile"] == ("image_classification_tuning.yaml",
                                          pathlib.Path(COMPILED_TUNING_PIPELINE).read_bytes())
    assert upload.query["name"] == "image-classification-tuning"


def test_submit_tuning_sends_the_search_and_every_hyperparameter(kfp_api, tmp_path):
    params = tmp_path / "search.yaml"
    params.write_text(f"ranges: {json.dumps(RANGES)}\nmax_trials: 8\nepochs: '5'\n")
    assert imgclf("submit", "--host", kfp_api.url, "--tuning", "--params", str(params),
                  "--set", "data_uri=gs://bucket/images", "--set", "parallel_trials=4",
                  "--set", "strategy=Random") == 0
    [create] = kfp_api.requests_to("POST", RUNS)
    sent = create.json["runtime_config"]["parameters"]
    assert json.loads(sent["ranges"]) == RANGES
    assert (sent["max_trials"], sent["parallel_trials"], sent["strategy"]) == (8, 4, "Random")
    assert {k: sent[k] for k in hps.FIELDS} == hps.Hyperparameters(epochs=5).to_dict()
    assert create.json["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["displayName"] == "image-classification-tuning"


@pytest.mark.parametrize(("assignments", "problem"), [
    (["ranges={\"learning_rte\": {\"min\": 0.001, \"max\": 0.1}}"],
     "learning_rte: unknown hyperparameter; did you mean 'learning_rate'?"),
    (["learning_rate=0.01", "ranges={\"learning_rate\": {\"min\": 0.001, \"max\": 0.1}}"],
     "learning_rate: given a fixed value and a range"),
    (["objective=validation:f1"], "objective: got 'validation:f1', expected one of validation:accuracy"),
    (["strategy=Grid"], "strategy: Grid takes only categorical ranges"),
    (["max_trials=0"], "max_trials: got 0, expected a whole number of at least 1"),
])
def test_submit_tuning_refuses_a_bad_search_before_any_request(kfp_api, capsys, assignments, problem):
    argv = ["submit", "--host", kfp_api.url, "--tuning", "--set", "data_uri=gs://bucket/images"]
    for assignment in assignments:
        argv += ["--set", assignment]
    assert imgclf(*argv) == 2
    assert f"  - {problem}" in capsys.readouterr().err
    assert kfp_api.requests == []


def test_schedule_a_tuning_package_checks_it_as_tuning(kfp_api, capsys):
    assert imgclf("schedule", "--host", kfp_api.url, "--package", COMPILED_TUNING_PIPELINE, "--cron", "@weekly",
                  "--set", "data_uri=gs://bucket/images", "--set", "strategy=Sideways") == 2
    assert "strategy: got 'Sideways'" in capsys.readouterr().err
    assert imgclf("schedule", "--host", kfp_api.url, "--package", COMPILED_TUNING_PIPELINE, "--cron", "@weekly",
                  "--set", "data_uri=gs://bucket/images", "--set", "max_trials=3") == 0
    [create] = kfp_api.requests_to("POST", RECURRING_RUNS)
    assert create.json["runtime_config"]["parameters"]["max_trials"] == 3


def test_submit_tuning_without_ranges_sends_the_recommended_ranges_less_the_values_given(kfp_api):
    # The run's setup step gets every hyperparameter and cannot tell a value given equal to its default
    # (learning_rate 0.001 here) from one not given: the ranges it searches are sent, as checked here.
    assert imgclf("submit", "--host", kfp_api.url, "--tuning", "--set", "data_uri=gs://bucket/images",
                  "--set", "learning_rate=0.001", "--set", "optimizer=sgd") == 0
    [create] = kfp_api.requests_to("POST", RUNS)
    sent = create.json["runtime_config"]["parameters"]
    searched = {r["Name"] for kind in json.loads(sent["ranges"]).values() for r in kind}
    assert searched == set(search_space.default_space().names) - {"learning_rate", "optimizer"}
    assert (sent["learning_rate"], sent["optimizer"]) == (0.001, "sgd")
    assert imgclf("submit", "--host", kfp_api.url, "--tuning", "--set", "data_uri=gs://bucket/images",
                  "--set", "epochs=5") == 0
    assert "ranges" not in kfp_api.requests_to("POST", RUNS)[-1].json["runtime_config"]["parameters"]  # default ""
