"""The pipeline and its components expose exactly the schema's hyperparameters, and the YAML is current."""

import inspect

import pytest
import yaml

from components.train import train
from pipelines import compiler
from pipelines.backends import DEFAULT_BACKEND
from pipelines.cli import main as imgclf
from pipelines.cluster import ClusterSettings
from pipelines.image_classification import image_classification
from trainer import hyperparameters as hps

PIPELINE_ONLY = {"data_uri", "max_rejected_fraction", "accelerator_count", "initial_model_uri",
                 "checkpoint_root", "jit_compile", "min_eval_value", "baseline_model_uri", "model_registry_uri",
                 "batch_data_uri", "serving_namespace", "serving_model_name", "serving_gpus",
                 "serving_canary_traffic_percent"}
KFP_TYPES = {bool: "BOOLEAN", int: "NUMBER_INTEGER", float: "NUMBER_DOUBLE", str: "STRING"}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    path = tmp_path_factory.mktemp("compiled") / "pipeline.yaml"
    compiler.compile_pipeline(str(path))
    return path.read_text()


@pytest.fixture(scope="module")
def spec(compiled):
    return next(yaml.safe_load_all(compiled))


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
    assert spec["root"]["inputDefinitions"]["parameters"]["accelerator_count"]["defaultValue"] == "1"
    for name, executor in executors.items():
        if name != "exec-train":
            assert "accelerator" not in executor["container"].get("resources", {}), name


def _all_tasks(spec):
    tasks = dict(spec["root"]["dag"]["tasks"])
    for component in spec["components"].values():
        tasks.update(component.get("dag", {}).get("tasks", {}))
    return tasks


def test_wiring_retries_caching_and_names(spec):
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {"look-at-data", "validate-data", "convert-to-tfrecords", "train", "evaluate",
                          "bless-model", "condition-1"}
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 3
    assert all(task["taskInfo"]["name"] for task in tasks.values())


def test_caching_reuses_what_depends_only_on_content_and_parameters(spec):
    """Cached: the steps whose inputs are the data's content (through the look's fingerprint) and parameters.
    Never cached: the look at the data, and what must decide in every run (gate, push, batch prediction)."""
    cached = {name for name, task in _all_tasks(spec).items() if task.get("cachingOptions", {}).get("enableCache")}
    assert cached == {"validate-data", "convert-to-tfrecords", "train", "evaluate"}
    tasks = _all_tasks(spec)
    assert {"look-at-data", "bless-model", "push-model", "batch-predict"} <= set(tasks)
    # Validation's cache key holds the content fingerprint, so new content under the same URI re-runs it.
    fingerprint = tasks["validate-data"]["inputs"]["parameters"]["content_fingerprint"]["taskOutputParameter"]
    assert fingerprint == {"producerTask": "look-at-data", "outputParameterKey": "fingerprint"}
    # Nothing that differs between runs of unchanged data reaches a cached step: no run id, no run name, no time.
    for name in cached:
        text = str(tasks[name]["inputs"])
        for placeholder in ("PIPELINE_JOB", "{{$.pipeline_job", "run_id", "create_time"):
            assert placeholder not in text, (name, placeholder)
    assert "run_id" not in spec["components"]["comp-train"]["inputDefinitions"]["parameters"]


@pytest.mark.parametrize("target", sorted(compiler.COMMITTED))
def test_every_committed_pair_is_what_the_code_compiles_to(target, tmp_path):
    """Both committed pairs (the default target and Kubeflow 1.9's 2.2.0) match the code."""
    main, tuning = compiler.COMMITTED[target]
    settings = ClusterSettings.from_options(min_backend=target, shm_size=None)
    fresh = compiler.compile_pipeline(str(tmp_path / "main.yaml"), settings=settings)
    fresh_tuning = compiler.compile_tuning_pipeline(str(tmp_path / "tuning.yaml"), settings=settings)
    command = "imgclf compile" + ("" if target == DEFAULT_BACKEND else f" --min-backend {target}")
    for committed, compiled_now in ((main, fresh), (tuning, fresh_tuning)):
        with open(committed, encoding="utf-8") as left, open(compiled_now, encoding="utf-8") as right:
            assert left.read() == right.read(), f"{committed} is stale: run `{command}`"


def test_compile_without_output_refuses_an_uncommitted_target():
    assert imgclf(["compile", "--min-backend", "2.5.0"]) == 2


def test_compile_for_another_registry(tmp_path):
    path = compiler.compile_pipeline(str(tmp_path / "p.yaml"), image="registry.example.com/team/imgclf:7")
    executors = next(yaml.safe_load_all(open(path)))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example.com/team/imgclf:7"}


def _platform(path):
    documents = list(yaml.safe_load_all(open(path)))
    return documents[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_default_cluster_settings_give_the_training_pod_shm_and_the_gpu_toleration(spec, compiled, tmp_path):
    path = tmp_path / "default.yaml"
    path.write_text(compiled)
    train_pod = _platform(path)["exec-train"]
    assert train_pod["emptyDirMounts"] == [{"medium": "Memory", "mountPath": "/dev/shm", "sizeLimit": "16Gi",
                                            "volumeName": "dshm"}]
    assert train_pod["tolerations"] == [{"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}]
    assert set(_platform(path)) == {"exec-train"}
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert (resources["resourceCpuRequest"], resources["resourceMemoryRequest"]) == ("8", "32G")


def test_cluster_settings_from_compile_options(tmp_path):
    settings = ClusterSettings.from_options(
        node_selector=["cloud.google.com/gke-accelerator=nvidia-l4"], tolerations=["dedicated=ml:NoExecute"],
        gcs_secret="imgclf-gcs-key", shm_size="32Gi", resources=["train=16,64G", "convert=500m,1G"],
        env=["STORAGE_EMULATOR_HOST=http://gcs:9023"])
    path = compiler.compile_pipeline(str(tmp_path / "p.yaml"), settings=settings)
    platform = _platform(path)
    train_pod = platform["exec-train"]
    assert train_pod["nodeSelector"] == {"labels": {"cloud.google.com/gke-accelerator": "nvidia-l4"}}
    assert train_pod["tolerations"] == [{"effect": "NoExecute", "key": "dedicated", "operator": "Equal",
                                         "value": "ml"}]
    assert train_pod["emptyDirMounts"][0]["sizeLimit"] == "32Gi"
    for name in ("exec-look-at-data", "exec-validate-data", "exec-convert-to-tfrecords", "exec-train", "exec-evaluate",
                 "exec-bless-model", "exec-push-model", "exec-batch-predict"):
        assert platform[name]["secretAsVolume"][0]["secretName"] == "imgclf-gcs-key", name
    executors = next(yaml.safe_load_all(open(path)))["deploymentSpec"]["executors"]
    for executor in executors.values():
        env = {item["name"]: item["value"] for item in executor["container"]["env"]}
        assert env == {"STORAGE_EMULATOR_HOST": "http://gcs:9023",
                       "GOOGLE_APPLICATION_CREDENTIALS": "/var/secrets/google/key.json"}
    assert executors["exec-train"]["container"]["resources"]["resourceMemoryRequest"] == "64G"
    assert executors["exec-convert-to-tfrecords"]["container"]["resources"]["resourceCpuRequest"] == "500m"


@pytest.mark.parametrize("options, message", [
    ({"resources": ["training=8,32G"]}, "--resources 'training=8,32G': expected STEP=CPU,MEMORY"),
    ({"tolerations": ["nvidia.com/gpu"]}, "toleration 'nvidia.com/gpu': expected KEY[=VALUE]:EFFECT"),
    ({"env": ["NOVALUE"]}, "--env 'NOVALUE': expected NAME=VALUE"),
    ({"min_backend": "2.3.0"}, "--min-backend '2.3.0': expected one of 2.2.0, 2.4.1, 2.5.0, 2.14.0"),
    ({"gpus": 2}, "--gpus 2: backend 2.4.1 takes the GPU count from the run form"),
    ({"min_backend": "2.2.0", "gpus": -1}, "--gpus -1: expected 0"),
    ({"min_backend": "2.2.0", "shm_size": "8Gi"}, "--shm-size 8Gi: backend 2.2.0 cannot mount /dev/shm"),
])
def test_bad_cluster_options_are_named(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ClusterSettings.from_options(**options)


def test_compile_for_kfp_2_2_0_fixes_the_gpu_count(tmp_path):
    """2.2.0 reads only a numeric accelerator count and refuses the string resource fields (pipelines/backends.py)."""
    assert imgclf(["compile", "--min-backend", "2.2.0", "--gpus", "2", "--output", str(tmp_path / "p.yaml")]) == 0
    spec, platform = yaml.safe_load_all((tmp_path / "p.yaml").read_text())
    resources = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert resources["accelerator"] == {"count": "2", "type": "nvidia.com/gpu"}
    assert set(resources) == {"accelerator", "cpuRequest", "memoryRequest"}
    assert spec["root"]["inputDefinitions"]["parameters"]["accelerator_count"]["defaultValue"] == "2"
    assert "emptyDirMounts" not in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-train"]
