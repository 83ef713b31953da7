"""The upload, submit and schedule commands, checked by the requests they send to a fake KFP API server."""

import hashlib
import json
import pathlib
import re
import socket

import pytest
import yaml

from pipelines import backends, operations
from pipelines.compiler import COMMITTED, COMPILED_PIPELINE
from tests.support.kfp_api import imgclf
from trainer import hyperparameters as hps

UPLOAD = "/apis/v2beta1/pipelines/upload"
UPLOAD_VERSION = "/apis/v2beta1/pipelines/upload_version"
RUNS = "/apis/v2beta1/runs"
RECURRING_RUNS = "/apis/v2beta1/recurringruns"
EXPERIMENTS = "/apis/v2beta1/experiments"
COMMITTED_YAML = pathlib.Path(COMPILED_PIPELINE).read_bytes()


# --- upload -------------------------------------------------------------------------------------------------


def test_first_upload_sends_the_committed_yaml_as_a_new_pipeline(kfp_api, capsys):
    assert imgclf("upload", "--host", kfp_api.url) == 0

    [upload] = kfp_api.requests_to("POST", UPLOAD)
    filename, content = upload.files["uploadfile"]
    assert (filename, content) == ("image_classification.yaml", COMMITTED_YAML)
    assert upload.query["name"] == "image-classification"
    assert upload.query["description"].startswith("SageMaker's Image Classification - TensorFlow")
    assert not kfp_api.requests_to("POST", UPLOAD_VERSION)
    [pipeline] = kfp_api.pipelines.values()
    [version] = kfp_api.versions[pipeline["pipeline_id"]]
    out = capsys.readouterr().out
    assert f"pipeline 'image-classification' (id {pipeline['pipeline_id']}) created" in out
    assert f"(id {version['pipeline_version_id']})" in out


def test_second_upload_adds_a_version_to_the_existing_pipeline(kfp_api, capsys):
    assert imgclf("upload", "--host", kfp_api.url) == 0
    assert imgclf("upload", "--host", kfp_api.url) == 0

    assert len(kfp_api.requests_to("POST", UPLOAD)) == 1, "the second upload must not create another pipeline"
    [pipeline] = kfp_api.pipelines.values()
    [new_version] = kfp_api.requests_to("POST", UPLOAD_VERSION)
    assert new_version.query["pipelineid"] == pipeline["pipeline_id"]
    assert new_version.files["uploadfile"][1] == COMMITTED_YAML
    digest = hashlib.sha256(COMMITTED_YAML).hexdigest()
    assert re.fullmatch(rf"v\d{{8}}-\d{{6}}-{digest[:8]}", new_version.query["name"])
    assert new_version.query["description"] == f"sha256:{digest} of image_classification.yaml"
    assert len(kfp_api.versions[pipeline["pipeline_id"]]) == 2
    assert f"uploaded a new version: '{new_version.query['name']}'" in capsys.readouterr().out


def test_an_upload_the_server_refuses_is_one_line_with_its_message(kfp_api, capsys):
    assert imgclf("upload", "--host", kfp_api.url) == 0
    # The first version carries the pipeline's name, so asking for that name again conflicts.
    assert imgclf("upload", "--host", kfp_api.url, "--version-name", "image-classification") == 1
    err = capsys.readouterr().err
    assert f"error: the KFP API at {kfp_api.url} answered 409 Conflict:" in err
    assert "version image-classification of pipeline" in err and "already exists" in err


# --- submit -------------------------------------------------------------------------------------------------


def test_submit_sends_every_resolved_hyperparameter_with_its_type(kfp_api, tmp_path):
    # SageMaker's hyperparameters.json: every value a string, its own spelling of one name.
    params = tmp_path / "hyperparameters.json"
    params.write_text(json.dumps({"epochs": "2", "train_only_on_top_layer": "True", "learning_rate": "0.01",
                                  "data_uri": "gs://bucket/old"}))
    assert imgclf("submit", "--host", kfp_api.url, "--params", str(params), "--set", "data_uri=gs://bucket/images",
                  "--set", "batch_size=16", "--set", "accelerator_count=0", "--set", "jit_compile=true",
                  "--experiment", "nightly", "--run-name", "first") == 0

    [create] = kfp_api.requests_to("POST", RUNS)
    body = create.json
    expected = {**hps.Hyperparameters(epochs=2, train_only_top_layer=True, learning_rate=0.01,
                                      batch_size=16).to_dict(),
                "data_uri": "gs://bucket/images", "accelerator_count": "0", "jit_compile": True}
    sent = body["runtime_config"]["parameters"]
    assert sent == expected
    for name, value in sent.items():
        assert type(value) is type(expected[name]), f"{name} sent as {type(value).__name__}"
    assert body["display_name"] == "first"
    # Without --pipeline the committed package travels inside the run, with its Kubernetes settings.
    spec = body["pipeline_spec"]
    assert spec["pipeline_spec"]["pipelineInfo"]["name"] == "image-classification"
    assert "exec-train" in spec["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert "pipeline_version_reference" not in body
    [experiment] = kfp_api.experiments.values()
    assert (experiment["display_name"], body["experiment_id"]) == ("nightly", experiment["experiment_id"])


def test_submit_an_uploaded_pipeline_runs_its_newest_version(kfp_api, capsys):
    client = operations.connect(kfp_api.url)
    operations.upload_pipeline(client)
    newest = operations.upload_pipeline(client, version_name="v2")

    assert imgclf("submit", "--host", kfp_api.url, "--pipeline", "image-classification",
                  "--set", "data_uri=gs://bucket/images") == 0
    [create] = kfp_api.requests_to("POST", RUNS)
    assert create.json["pipeline_version_reference"] == {"pipeline_id": newest.pipeline_id,
                                                         "pipeline_version_id": newest.version_id}
    assert "pipeline_spec" not in create.json
    out = capsys.readouterr().out
    assert f"version 'v2' (id {newest.version_id})" in out
    assert f"(id {create.json['experiment_id']})" in out and "in experiment 'Default'" in out


@pytest.mark.parametrize(("assignment", "problem"), [
    ("learning_rte=0.1", "learning_rte: unknown pipeline parameter; did you mean 'learning_rate'?"),
    ("acelerator_count=0", "acelerator_count: unknown pipeline parameter; did you mean 'accelerator_count'?"),
    ("accelerator_count=two", "accelerator_count: got 'two', expected a whole number of GPUs such as '1'"),
    ("epochs=0", "epochs: got '0', expected an integer in [1, 100000]"),
    ("max_rejected_fraction=2", "max_rejected_fraction: got '2', expected a number in [0, 1]"),
    ("accelerator_count=-1", "accelerator_count: got '-1', expected a whole number of GPUs such as '1'"),
    ("accelerator_count=1.5", "accelerator_count: got '1.5', expected a whole number of GPUs such as '1'"),
])
def test_submit_refuses_a_bad_parameter_before_any_request(kfp_api, capsys, assignment, problem):
    assert imgclf("submit", "--host", kfp_api.url, "--set", "data_uri=gs://bucket/images",
                  "--set", assignment) == 2
    assert f"  - {problem}" in capsys.readouterr().err
    assert kfp_api.requests == []


def test_submit_without_data_uri_says_how_to_give_it(kfp_api, capsys):
    assert imgclf("submit", "--host", kfp_api.url) == 2
    assert "data_uri: required; give it with --set data_uri=... or in a --params file" in capsys.readouterr().err
    assert kfp_api.requests == []


@pytest.mark.parametrize(("state", "status"), [("SUCCEEDED", 0), ("FAILED", 1)])
def test_submit_wait_exits_with_the_runs_outcome(kfp_api, capsys, state, status):
    kfp_api.run_state = state
    assert imgclf("submit", "--host", kfp_api.url, "--set", "data_uri=gs://b/d", "--wait", "30") == status
    assert f"ended: {state}" in capsys.readouterr().out


FIXED_GPU_PACKAGES = COMMITTED["2.2.0"]  # compiled for KFP 2.2.0: one GPU, fixed


@pytest.mark.parametrize("package", FIXED_GPU_PACKAGES, ids=["main", "tuning"])
def test_a_package_with_a_fixed_gpu_count_refuses_another_count_before_any_request(kfp_api, capsys, package):
    """The 2.2.0 YAML shows accelerator_count on the form, but every backend gives its pods the compiled count."""
    assert imgclf("submit", "--host", kfp_api.url, "--package", package, "--set", "data_uri=gs://b/d",
                  "--set", "accelerator_count=2") == 2
    assert ("accelerator_count: got '2', but this package was compiled for KFP 2.2.0 with 1 GPU(s) fixed, which "
            "its pods get whatever the form says; recompile with --gpus 2 (imgclf compile --min-backend 2.2.0 "
            "--gpus 2)") in capsys.readouterr().err
    assert kfp_api.requests == []
    # The fixed count itself, or no count at all (the package's default), runs.
    for count in (["--set", "accelerator_count=1"], []):
        assert imgclf("submit", "--host", kfp_api.url, "--package", package, "--set", "data_uri=gs://b/d",
                      *count) == 0


def test_an_uploaded_version_with_a_fixed_gpu_count_is_not_scheduled_with_another(kfp_api, capsys):
    client = operations.connect(kfp_api.url)
    operations.upload_pipeline(client, FIXED_GPU_PACKAGES[0], pipeline_name="kubeflow-1.9")
    assert imgclf("schedule", "--host", kfp_api.url, "--pipeline", "kubeflow-1.9", "--cron", "@daily",
                  "--set", "data_uri=gs://b/d", "--set", "accelerator_count=0") == 2
    assert "with 1 GPU(s) fixed" in capsys.readouterr().err
    assert not kfp_api.requests_to("POST", RECURRING_RUNS)
    # The committed package reads the form's count: any count is sent as given.
    assert imgclf("submit", "--host", kfp_api.url, "--set", "data_uri=gs://b/d", "--set", "accelerator_count=3") == 0
    [create] = kfp_api.requests_to("POST", RUNS)
    assert create.json["runtime_config"]["parameters"]["accelerator_count"] == "3"


def test_the_fixed_gpu_count_is_read_from_the_compiled_accelerator():
    committed = next(yaml.safe_load_all(pathlib.Path(COMPILED_PIPELINE).read_text()))
    fixed = next(yaml.safe_load_all(pathlib.Path(FIXED_GPU_PACKAGES[0]).read_text()))
    assert backends.fixed_gpu_count(committed) is None  # resourceCount: the form's count reaches the pod
    assert backends.fixed_gpu_count(fixed) == 1
    assert backends.fixed_gpu_count({"pipeline_spec": fixed, "platform_spec": {}}) == 1  # an uploaded version's
    fixed["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]["accelerator"]["count"] = "4"
    assert backends.fixed_gpu_count(fixed) == 4
    for executor in fixed["deploymentSpec"]["executors"].values():  # --gpus 0: no accelerator anywhere
        executor["container"].get("resources", {}).pop("accelerator", None)
    assert backends.fixed_gpu_count(fixed) == 0


# --- schedule -----------------------------------------------------------------------------------------------


def test_schedule_sends_cron_concurrency_and_no_catchup(kfp_api, capsys):
    assert imgclf("schedule", "--host", kfp_api.url, "--cron", "0 0 2 * * *", "--max-concurrency", "2",
                  "--set", "data_uri=gs://bucket/images", "--set", "epochs=5", "--name", "nightly training") == 0

    [create] = kfp_api.requests_to("POST", RECURRING_RUNS)
    body = create.json
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert (body["max_concurrency"], body["no_catchup"], body["mode"]) == (2, True, "ENABLE")
    assert body["display_name"] == "nightly training"
    assert body["runtime_config"]["parameters"]["epochs"] == 5
    assert body["runtime_config"]["parameters"]["data_uri"] == "gs://bucket/images"
    [recurring] = kfp_api.recurring_runs.values()
    out = capsys.readouterr().out
    assert f"recurring run 'nightly training' (id {recurring['recurring_run_id']})" in out
    assert "cron '0 0 2 * * *', at most 2 at once, no catch-up, enabled" in out


def test_schedule_catchup_and_disabled_flags(kfp_api):
    assert imgclf("schedule", "--host", kfp_api.url, "--cron", "@daily", "--catchup", "--disabled",
                  "--set", "data_uri=gs://b/d") == 0
    [create] = kfp_api.requests_to("POST", RECURRING_RUNS)
    assert (create.json["no_catchup"], create.json["mode"]) == (False, "DISABLE")


@pytest.mark.parametrize(("options", "problem"), [
    (["--cron", "0 2 * * *"], "5 fields, but Kubeflow Pipelines reads 6 with seconds first"),
    (["--cron", "0 2 * *"], "expected 6 fields"),
    (["--cron", "0 0 2 * * *", "--max-concurrency", "11"], "--max-concurrency: got 11, but Kubeflow Pipelines "
                                                           "accepts 1 to 10"),
])
def test_schedule_refuses_what_kfp_would_misread_before_any_request(kfp_api, capsys, options, problem):
    assert imgclf("schedule", "--host", kfp_api.url, "--set", "data_uri=gs://b/d", *options) == 2
    err = capsys.readouterr().err
    assert problem in err
    if options[1] == "0 2 * * *":
        assert "use '0 0 2 * * *'" in err
    assert kfp_api.requests == []


# --- parameters and connection ------------------------------------------------------------------------------


def test_pipeline_settings_come_from_the_pipeline_signature():
    settings = operations.pipeline_settings()
    documented = {"data_uri": str, "max_rejected_fraction": float, "accelerator_count": str,
                  "initial_model_uri": str, "checkpoint_root": str, "jit_compile": bool}
    assert documented.items() <= settings.items()
    assert not set(settings) & set(hps.FIELDS), "hyperparameters go through the schema, not as settings"


def test_parameter_file_may_hold_settings_and_sagemaker_strings(tmp_path):
    params = tmp_path / "run.yaml"
    params.write_text(yaml.safe_dump({"data_uri": "/mnt/data", "accelerator_count": "2", "augmentation": "True",
                                      "checkpoint_root": "gs://b/ckpt"}))
    resolved = operations.pipeline_parameters(operations.load_parameters([str(params)], ["augmentation=False"]))
    assert (resolved["accelerator_count"], resolved["augmentation"]) == ("2", False)
    assert (resolved["data_uri"], resolved["checkpoint_root"]) == ("/mnt/data", "gs://b/ckpt")


def test_missing_host_says_where_to_give_it(kfp_api, capsys):
    assert imgclf("upload") == 1
    assert f"pass --host (e.g. http://localhost:8888) or set {operations.HOST_ENV}" in capsys.readouterr().err


def test_unreachable_host_is_one_clear_line(capsys):
    with socket.socket() as probe:  # a port nothing listens on once the probe closes
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert imgclf("upload", "--host", f"http://127.0.0.1:{port}") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot reach the KFP API at http://127.0.0.1:{port}")


def test_token_and_namespace_reach_the_api(kfp_api, monkeypatch):
    monkeypatch.setenv(operations.TOKEN_ENV, "secret-token")
    assert imgclf("upload", "--host", kfp_api.url, "--namespace", "team-a") == 0
    [upload] = kfp_api.requests_to("POST", UPLOAD)
    assert upload.headers["authorization"] == "Bearer secret-token"
    assert upload.query["namespace"] == "team-a"
    # With a namespace the client needs no health check to find out whether the cluster is multi-user.
    assert not kfp_api.requests_to("GET", "/apis/v2beta1/healthz")


def test_version_without_pipeline_is_a_usage_error(kfp_api, capsys):
    assert imgclf("submit", "--host", kfp_api.url, "--version", "v2", "--set", "data_uri=gs://b/d") == 2
    assert "--version 'v2': needs --pipeline NAME" in capsys.readouterr().err
    assert kfp_api.requests == []
