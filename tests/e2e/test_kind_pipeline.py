"""The kind tier: the pipeline on Kubeflow Pipelines in a kind cluster, from upload to every artifact.

tests/e2e/run_kind.sh sets the cluster up and writes what this reads (its forward step):
  KFP_HOST                      the KFP API, a port-forward of svc/ml-pipeline (required)
  IMGCLF_E2E_GCS_HOST           the in-cluster GCS emulator as this machine reaches it (a port-forward)
  IMGCLF_E2E_GCS_CLUSTER_HOST   the same emulator as the pipeline's pods reach it (cluster DNS)
  IMGCLF_E2E_GCS_BUCKET         the emulator's bucket for the data set
  IMGCLF_E2E_S3_ENDPOINT, IMGCLF_E2E_S3_ACCESS_KEY, IMGCLF_E2E_S3_SECRET_KEY   KFP's object store
  IMGCLF_E2E_TIMEOUT            seconds to wait for the run (default 1800)
  IMGCLF_E2E_MIN_BACKEND        the --min-backend the pipelines are compiled for (default: the committed
                                YAMLs' target); 2.14.0 on a 2.14 or newer backend, so display names reach it

Where the data comes from: the steps read gs:// URIs through google-cloud-storage, which talks to
whatever STORAGE_EMULATOR_HOST names. So the tiny data set is uploaded from here to a GCS emulator
running in the cluster, and the pipeline is submitted with that variable set on every step. The
real code path (gs:// listing, reads, decoding) runs in the real image on real pods; nothing is baked
into the image and no volume is mounted.

What is submitted is the pipeline compiled with two cluster settings a CI runner needs and nothing
else (see ``kind_package``), the same ones `imgclf compile --env ... --resources ...` gives users:
the STORAGE_EMULATOR_HOST variable on every step, and CPU and memory requests cut to what a 4-core
runner can schedule (the committed ones are sized for a GPU node).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

import pytest
import yaml
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from pipelines import backends, operations
from pipelines.cluster import STEPS, ClusterSettings
from pipelines.compiler import compile_pipeline, compile_tuning_pipeline
from pipelines.tuning import image_classification_tuning
from tests.support.datasets import make_image_folder

pytestmark = pytest.mark.e2e

E2E_PIPELINE = "imgclf-e2e"
E2E_EXPERIMENT = "imgclf-e2e"
# Requests every step gets in the kind copy: the node is a CI runner, and steps run one at a time.
KIND_CPU, KIND_MEMORY = "500m", "1G"
# Kubeflow keeps these artifact types as ML Metadata properties and writes no object for them; their
# numbers are also in the evaluation artifact's files, which are checked.
METADATA_ONLY_ARTIFACTS = ("system.Metrics", "system.ClassificationMetrics")
SMALL_RUN = {"accelerator_count": "0", "model": "small_cnn", "weights": "none", "image_size": 32, "epochs": 1,
             "batch_size": 8}


@dataclasses.dataclass(frozen=True)
class Environment:
    kfp_host: str
    gcs_host: str
    gcs_cluster_host: str
    gcs_bucket: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    timeout_s: float
    min_backend: str


def e2e_environment() -> Environment:
    """The cluster's addresses from the environment; a missing one fails the test with one line."""
    def need(name: str) -> str:
        value = os.environ.get(name)
        if not value:
            pytest.fail(f"{name} is not set: run tests/e2e/run_kind.sh, whose forward step writes it to "
                        "~/.cache/imgclf-e2e/e2e.env (the e2e tier needs a kind cluster with Kubeflow Pipelines)",
                        pytrace=False)
        return value

    return Environment(
        kfp_host=need("KFP_HOST"),
        gcs_host=os.environ.get("IMGCLF_E2E_GCS_HOST", "http://127.0.0.1:9023"),
        gcs_cluster_host=os.environ.get("IMGCLF_E2E_GCS_CLUSTER_HOST",
                                        "http://gcs-emulator.imgclf-e2e.svc.cluster.local:9023"),
        gcs_bucket=os.environ.get("IMGCLF_E2E_GCS_BUCKET", "imgclf-e2e"),
        s3_endpoint=os.environ.get("IMGCLF_E2E_S3_ENDPOINT", "http://127.0.0.1:9000"),
        s3_access_key=need("IMGCLF_E2E_S3_ACCESS_KEY"),
        s3_secret_key=need("IMGCLF_E2E_S3_SECRET_KEY"),
        # The bucket KFP's standalone install configures (pipeline-install-config bucketName).
        s3_bucket=os.environ.get("IMGCLF_E2E_S3_BUCKET", "mlpipeline"),
        timeout_s=float(os.environ.get("IMGCLF_E2E_TIMEOUT", "1800")),
        min_backend=os.environ.get("IMGCLF_E2E_MIN_BACKEND", backends.DEFAULT_BACKEND),
    )


# --- Building blocks (plain functions, so each can be read and checked on its own) ------------------------


def kind_package(target: pathlib.Path, env: Mapping[str, str], cpu: str = KIND_CPU,
                 memory: str = KIND_MEMORY, compile_with=compile_pipeline,
                 min_backend: str = backends.DEFAULT_BACKEND) -> pathlib.Path:
    """Compile the pipeline (``compile_with``) for ``min_backend`` with ``env`` on every step and the given
    CPU/memory requests."""
    settings = ClusterSettings.from_options(env=[f"{k}={v}" for k, v in env.items()], min_backend=min_backend,
                                            resources=[f"{step}={cpu},{memory}" for step in STEPS])
    return pathlib.Path(compile_with(str(target), settings=settings))


def upload_dataset(gcs_host: str, bucket: str, prefix: str, local_root: pathlib.Path) -> str:
    """Write a tiny learnable data set (2 classes, 10 images each) and upload it; return its gs:// URI."""
    make_image_folder(local_root, {"cats": 10, "dogs": 10}, size=(40, 30), fmt="jpg")
    client = storage.Client(project="imgclf-e2e", credentials=AnonymousCredentials(),
                            client_options={"api_endpoint": gcs_host})
    target = client.bucket(bucket)
    for path in sorted(p for p in local_root.rglob("*") if p.is_file()):
        target.blob(f"{prefix}/{path.relative_to(local_root).as_posix()}").upload_from_filename(str(path))
    return f"gs://{bucket}/{prefix}"


def expected_artifacts(spec: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """{task: {output artifact: its type}} for every task of the compiled pipeline's root DAG."""
    expected = {}
    for task, task_spec in spec["root"]["dag"]["tasks"].items():
        component = spec["components"][task_spec["componentRef"]["name"]]
        outputs = component.get("outputDefinitions", {}).get("artifacts", {})
        expected[task] = {name: output["artifactType"]["schemaTitle"] for name, output in outputs.items()}
    return expected


def artifact_bytes(objects: list[tuple[str, int]], run_id: str, task: str, output: str) -> int:
    """Bytes stored for one task output of a run, from the object keys and sizes below the pipeline root.

    Output URIs are <root>/<pipeline>/<run id>/<task>/[...]/<output>[/...]; matching path segments in
    that order keeps this independent of the extra levels different KFP versions add.
    """
    total = 0
    for key, size in objects:
        parts = key.split("/")
        if run_id not in parts:
            continue
        below_run = parts[parts.index(run_id) + 1:]
        if task in below_run and output in below_run[below_run.index(task) + 1:]:
            total += size
    return total


def list_run_objects(env: Environment, run_id: str) -> list[tuple[str, int]]:
    """(key, size) of every object in KFP's artifact bucket that belongs to the run."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        pytest.fail("boto3 is not installed: pip install -r tests/e2e/requirements.txt", pytrace=False)
    s3 = boto3.client("s3", endpoint_url=env.s3_endpoint, aws_access_key_id=env.s3_access_key,
                      aws_secret_access_key=env.s3_secret_key, region_name="us-east-1",
                      config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    objects = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=env.s3_bucket):
        objects.extend((item["Key"], item["Size"]) for item in page.get("Contents", [])
                       if run_id in item["Key"].split("/"))
    return objects


def container_tasks(spec: Mapping[str, Any], tasks: Mapping[str, Any], loop_sizes: Mapping[str, int],
                    runs: int = 1) -> Iterator[tuple[str, Mapping[str, Any], int]]:
    """(name, task, how many times it runs) of every task that runs a container, in ``tasks`` and the
    sub-pipelines and loops below them. A loop over a task's output runs ``loop_sizes[its name]`` times
    (a literal list, its length). Conditions are left out (push and batch prediction are off in these
    runs: no registry, no batch data), and so are the sub-DAGs themselves, whose reported state lags
    (loops show as Running until KFP 2.17.0)."""
    for name, task in tasks.items():
        component = spec["components"][task["componentRef"]["name"]]
        if "triggerPolicy" in task and "condition" in task["triggerPolicy"]:
            continue
        iterator = task.get("parameterIterator") or task.get("artifactIterator")
        iterations = 1
        if iterator:
            raw = iterator.get("items", {}).get("raw")
            iterations = len(json.loads(raw)) if raw else loop_sizes[task["taskInfo"]["name"]]
        if "dag" in component:
            yield from container_tasks(spec, component["dag"]["tasks"], loop_sizes, runs * iterations)
        else:
            yield name, task, runs * iterations


def task_states(run: Any) -> Iterator[tuple[str, str]]:
    """(display name, state) of every task the API reports for a run."""
    details = run.run_details.task_details if run.run_details else None
    for detail in details or []:
        yield detail.display_name, str(detail.state)


# --- The tests ------------------------------------------------------------------------------------------------


def kind_setup(tmp_path: pathlib.Path,
               compile_with=compile_pipeline) -> tuple[Environment, pathlib.Path, dict[str, Any]]:
    """The environment and the kind copy of the pipeline; called in the tests, so a gap fails them."""
    env = e2e_environment()
    package = kind_package(tmp_path / "image_classification_kind.yaml",
                           env={"STORAGE_EMULATOR_HOST": env.gcs_cluster_host}, compile_with=compile_with,
                           min_backend=env.min_backend)
    spec = next(yaml.safe_load_all(package.read_text(encoding="utf-8")))
    return env, package, spec


def run_and_check_every_task(tmp_path: pathlib.Path, compile_with, extra: Mapping[str, Any],
                             pipeline_name: str, pipeline: Any = None,
                             loop_sizes: Mapping[str, int] | None = None) -> None:
    """Upload, run to the end, and assert that every task succeeded (each loop iteration's) and that every
    root task wrote its artifacts. ``loop_sizes``: how many times each loop over a task's output runs."""
    env, package, spec = kind_setup(tmp_path, compile_with)
    tag = uuid.uuid4().hex[:8]
    data_uri = upload_dataset(env.gcs_host, env.gcs_bucket, f"e2e-{tag}/data", tmp_path / "data")

    client = operations.connect(env.kfp_host)
    uploaded = operations.upload_pipeline(client, str(package), pipeline_name=pipeline_name)
    arguments = {"data_uri": data_uri, **SMALL_RUN, **{k: v.format(bucket=env.gcs_bucket, tag=tag)
                                                       if isinstance(v, str) else v for k, v in extra.items()}}
    submitted = operations.submit_run(client, arguments, pipeline_name=pipeline_name, experiment=E2E_EXPERIMENT,
                                      run_name=f"e2e {tag}", enable_caching=False, pipeline=pipeline)
    assert uploaded.version_id in submitted.source, "the run must use the version just uploaded"
    run = operations.wait_for_run(client, submitted.run_id, env.timeout_s, poll_s=15)

    states = sorted(task_states(run))
    error = getattr(run.error, "message", None) if run.error else None
    assert str(run.state) == "SUCCEEDED", f"run {submitted.run_id} ended {run.state}: {error}; tasks: {states}"
    for task, task_spec, runs in container_tasks(spec, spec["root"]["dag"]["tasks"], loop_sizes or {}):
        names = {task, task_spec["taskInfo"]["name"]}
        seen = [state for name, state in states if name in names]
        # One success per run of the task (each loop iteration's); a retried step reports its failed attempts too.
        assert seen.count("SUCCEEDED") >= runs, (f"task {task} runs {runs} time(s): states {seen or 'none reported'};"
                                                 f" all tasks: {states}")

    objects = list_run_objects(env, submitted.run_id)
    assert objects, f"no object in bucket {env.s3_bucket} belongs to run {submitted.run_id}"
    for task, outputs in expected_artifacts(spec).items():
        for output, artifact_type in outputs.items():
            if artifact_type in METADATA_ONLY_ARTIFACTS:
                continue
            stored = artifact_bytes(objects, submitted.run_id, task, output)
            assert stored > 0, (f"{task}.{output} ({artifact_type}) is empty or missing; objects of the run: "
                                f"{[key for key, _ in objects]}")


def test_pipeline_runs_on_kind_and_writes_every_artifact(tmp_path):
    run_and_check_every_task(tmp_path, compile_pipeline, {}, E2E_PIPELINE)


def test_tuning_pipeline_runs_on_kind_and_writes_every_artifact(tmp_path):
    # The study lives on the GCS emulator: KFP's MinIO/SeaweedFS root is not a place trials can share.
    search = {"study_root": "gs://{bucket}/e2e-{tag}/study", "max_trials": 2, "parallel_trials": 2,
              "strategy": "Random", "ranges": json.dumps({"ContinuousParameterRanges": [
                  {"Name": "learning_rate", "MinValue": "0.0001", "MaxValue": "0.01", "ScalingType": "Auto"}]})}
    run_and_check_every_task(tmp_path, compile_tuning_pipeline, search, f"{E2E_PIPELINE}-tuning",
                             pipeline=image_classification_tuning, loop_sizes={"lanes": search["parallel_trials"]})


def kubectl_json(*args: str) -> dict[str, Any]:
    done = subprocess.run(["kubectl", *args, "-o", "json"], capture_output=True, text=True, check=True, timeout=60)
    return json.loads(done.stdout)


def run_pods(run_id: str) -> list[dict[str, Any]]:
    """The run's pods: KFP labels the run's Argo Workflow with pipeline/runid, Argo labels its pods with the
    workflow's name (workflows.argoproj.io/workflow)."""
    workflows = kubectl_json("get", "workflows.argoproj.io", "-A", "-l", f"pipeline/runid={run_id}")["items"]
    pods = []
    for workflow in workflows:
        meta = workflow["metadata"]
        pods += kubectl_json("get", "pods", "-n", meta["namespace"], "-l",
                             f"workflows.argoproj.io/workflow={meta['name']}")["items"]
    return pods


def test_a_gpu_run_asks_kubernetes_for_the_gpu(tmp_path):
    """kind has no GPUs: a training pod that asks for one stays unschedulable, which proves the request
    reached the pod (the run form's "1" through the driver to nvidia.com/gpu); then the run is cancelled."""
    env, package, _ = kind_setup(tmp_path)
    tag = uuid.uuid4().hex[:8]
    data_uri = upload_dataset(env.gcs_host, env.gcs_bucket, f"e2e-{tag}/data", tmp_path / "data")
    client = operations.connect(env.kfp_host)
    submitted = operations.submit_run(client, {"data_uri": data_uri, **SMALL_RUN, "accelerator_count": "1"},
                                      package_path=str(package), experiment=E2E_EXPERIMENT,
                                      run_name=f"e2e gpu {tag}", enable_caching=False)
    try:
        deadline, seen = time.monotonic() + env.timeout_s, []
        while time.monotonic() < deadline:
            seen = [pod for pod in run_pods(submitted.run_id)
                    if any(c.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
                           for c in pod["spec"]["containers"])]
            unschedulable = [pod for pod in seen for condition in pod["status"].get("conditions", [])
                             if condition["type"] == "PodScheduled" and condition.get("reason") == "Unschedulable"
                             and "nvidia.com/gpu" in condition.get("message", "")]
            if unschedulable:
                limits = [c["resources"]["limits"]["nvidia.com/gpu"] for c in unschedulable[0]["spec"]["containers"]
                          if "nvidia.com/gpu" in c.get("resources", {}).get("limits", {})]
                assert limits == ["1"], limits
                assert str(client.get_run(submitted.run_id).state) not in ("SUCCEEDED", "FAILED")
                return
            time.sleep(10)
        pytest.fail(f"no pod of run {submitted.run_id} was left unschedulable for want of nvidia.com/gpu "
                    f"within {env.timeout_s:.0f} s; pods asking for a GPU: {[p['metadata']['name'] for p in seen]}")
    finally:
        client.terminate_run(submitted.run_id)


def test_schedule_is_accepted_with_cron_concurrency_and_no_catchup(tmp_path):
    env, package, _ = kind_setup(tmp_path)
    client = operations.connect(env.kfp_host)
    # Created paused, so it starts no run; the point is what the server stores.
    scheduled = operations.schedule_run(
        client, {"data_uri": f"gs://{env.gcs_bucket}/never-read", **SMALL_RUN}, cron="0 0 3 * * *",
        enabled=False, package_path=str(package), experiment=E2E_EXPERIMENT,
        name=f"e2e schedule {uuid.uuid4().hex[:8]}")
    try:
        stored = client.get_recurring_run(scheduled.recurring_run_id)
        assert stored.trigger.cron_schedule.cron == "0 0 3 * * *"
        assert (int(stored.max_concurrency), stored.no_catchup, str(stored.status)) == (1, True, "DISABLED")
        assert stored.runtime_config.parameters["image_size"] == 32
    finally:
        client.delete_recurring_run(scheduled.recurring_run_id)
