"""The deploy step: the InferenceService it writes is valid against KServe's CRD schema, and it is applied and
awaited through the Kubernetes API (a stand-in API server, tests/support/kube_api.py), failing with the
service's own reason."""

import json
import logging
from pathlib import Path

import jsonschema
import pytest

from components.deploy_model import deploy_model
from tests.support.kube_api import FakeKubernetesAPI
from trainer.serve import deploy
from trainer.serve.deploy import DeployError

SCHEMA_FILE = Path(__file__).parent.parent / "data" / "kserve_inferenceservice_v1beta1_schema.json"
URI = "gs://models/flowers/000003"
IMAGE = "registry.example/imgclf:0.1.0"


@pytest.fixture(scope="module")
def schema():
    saved = json.loads(SCHEMA_FILE.read_text())
    assert saved["kind"] == "InferenceService" and saved["version"] == "v1beta1" and saved["kserve_version"]
    return saved["openAPIV3Schema"]


def validate(schema, manifest):
    jsonschema.Draft7Validator(schema).validate(manifest)


@pytest.mark.parametrize("options", [{}, {"gpus": 2, "canary_traffic_percent": 10, "cpu": "4", "memory": "8Gi"}])
def test_the_manifest_is_valid_against_kserves_crd_schema(schema, options):
    manifest = deploy.inference_service("flowers", "serving", URI, image=IMAGE, **options)
    validate(schema, manifest)
    predictor = manifest["spec"]["predictor"]
    [container] = predictor["containers"]
    assert container["image"] == IMAGE and container["command"] == ["imgclf"]
    assert container["args"] == ["serve", URI, "--host", "0.0.0.0", "--port", "8080", "--name", "flowers"]
    assert predictor.get("canaryTrafficPercent") == options.get("canary_traffic_percent")
    assert container["resources"]["limits"].get("nvidia.com/gpu") == (str(options["gpus"]) if options else None)


def test_the_schema_check_catches_a_wrong_manifest(schema):
    """The saved schema is strict enough to matter: a misspelt canary field of the wrong type is refused."""
    manifest = deploy.inference_service("flowers", "serving", URI, image=IMAGE)
    manifest["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(jsonschema.ValidationError, match="canaryTrafficPercent|'ten'"):
        validate(schema, manifest)


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "Flowers_1"}, "serving_model_name 'Flowers_1' is not a valid InferenceService name"),
    ({"namespace": ""}, "serving_namespace '' is not a valid Kubernetes namespace"),
    ({"uri": "/mnt/registry/000003"}, "not a gs:// URI"),
    ({"canary_traffic_percent": 100}, "serving_canary_traffic_percent must be 0 (no canary) to 99, got 100"),
    ({"gpus": -1}, "serving_gpus must be a whole number 0 or more, got -1"),
])
def test_bad_settings_are_named(kwargs, message):
    args = {"name": "flowers", "namespace": "serving", "uri": URI, **kwargs}
    with pytest.raises(DeployError, match=message.replace("(", r"\(").replace(")", r"\)")):
        deploy.inference_service(args.pop("name"), args.pop("namespace"), args.pop("uri"), image=IMAGE, **args)


def ready_after(reads_needed, url="http://flowers.serving.example.com"):
    def script(obj, reads):
        generation = obj["metadata"]["generation"]
        if reads < reads_needed:
            return {"observedGeneration": generation, "conditions": [
                {"type": "PredictorReady", "status": "False", "reason": "RevisionMissing",
                 "message": "Configuration is waiting for a Revision to become ready."},
                {"type": "Ready", "status": "False", "reason": "RevisionMissing"}]}
        return {"observedGeneration": generation, "url": url,
                "conditions": [{"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}
    return script


def test_create_then_wait_for_ready(caplog):
    caplog.set_level(logging.INFO, logger="trainer.serve.deploy")
    with FakeKubernetesAPI(ready_after(3)) as api:
        result = _deploy(api)
        stored = api.objects[("serving", "flowers")]
    assert result["action"] == "created" and result["url"] == "http://flowers.serving.example.com"
    assert stored["spec"] == result["manifest"]["spec"]
    assert [m for m, _, _ in api.requests] == ["GET", "POST", "GET", "GET", "GET"]
    assert "not Ready yet: PredictorReady False: RevisionMissing (Configuration is waiting" in caplog.text


def _deploy(api, **options):
    manifest = deploy.inference_service("flowers", "serving", options.pop("uri", URI), image=IMAGE, **options)
    result = deploy.apply_and_wait(manifest, api_client=api.api_client(), timeout_s=20, poll_s=0.01)
    return {**result, "manifest": manifest}


def test_an_existing_service_is_patched_and_the_new_generation_awaited():
    """A canary rollout: the second version patches the service; Ready of the old generation does not count."""
    def script(obj, reads):
        generation = obj["metadata"]["generation"]
        # KServe reconciles the new generation only on the third read; until then it still shows the old one Ready.
        observed = generation if reads >= 3 or generation == 1 else generation - 1
        return {"observedGeneration": observed, "url": "http://flowers.serving.example.com",
                "conditions": [{"type": "Ready", "status": "True"}]}

    with FakeKubernetesAPI(script) as api:
        _deploy(api)
        api.reads.clear()
        result = _deploy(api, uri="gs://models/flowers/000004", canary_traffic_percent=10)
        stored = api.objects[("serving", "flowers")]
    assert result["action"] == "updated" and result["generation"] == 2
    assert stored["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert stored["spec"]["predictor"]["containers"][0]["args"][1] == "gs://models/flowers/000004"
    patches = [content for method, _, content in api.requests if method == "PATCH"]
    assert patches == ["application/merge-patch+json"]
    assert api.reads[("serving", "flowers")] == 3


def test_a_canary_split_ends_when_the_next_deploy_asks_for_none():
    """Updates are JSON merge patches (RFC 7386): a field left out keeps its old value, so 0% must send null."""
    with FakeKubernetesAPI(ready_after(1)) as api:
        _deploy(api, canary_traffic_percent=10)
        _deploy(api, uri="gs://models/flowers/000004", canary_traffic_percent=0)
        stored = api.objects[("serving", "flowers")]
    assert "canaryTrafficPercent" not in stored["spec"]["predictor"]
    assert stored["spec"]["predictor"]["containers"][0]["args"][1] == "gs://models/flowers/000004"


def test_a_model_that_fails_to_load_fails_with_kserves_reason():
    def script(obj, reads):
        return {"observedGeneration": obj["metadata"]["generation"],
                "conditions": [{"type": "Ready", "status": "False", "reason": "RevisionFailed",
                                "message": "Revision \"flowers-predictor-00001\" failed with message: Container "
                                           "failed with: error: cannot read gs://models/flowers/000003"}],
                "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                                "lastFailureInfo": {"reason": "ModelLoadFailed", "exitCode": 1,
                                                    "message": "Container failed with: error: cannot read "
                                                               "gs://models/flowers/000003"}}}

    with FakeKubernetesAPI(script) as api, pytest.raises(DeployError) as failure:
        _deploy(api)
    assert str(failure.value) == (
        "InferenceService serving/flowers cannot become Ready: model status BlockedByFailedLoad (reason "
        "ModelLoadFailed, message Container failed with: error: cannot read gs://models/flowers/000003, exitCode 1)")


def test_a_service_that_never_becomes_ready_times_out_with_its_last_reason():
    def script(obj, reads):
        return {"observedGeneration": obj["metadata"]["generation"], "conditions": [
            {"type": "Ready", "status": "False", "reason": "RevisionMissing",
             "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."}]}

    with FakeKubernetesAPI(script) as api:
        manifest = deploy.inference_service("flowers", "serving", URI, image=IMAGE, gpus=1)
        with pytest.raises(DeployError, match=r"was not Ready after 0 s: Ready False: RevisionMissing \(0/3 nodes "
                                              r"are available: 3 Insufficient nvidia.com/gpu.\)"):
            deploy.apply_and_wait(manifest, api_client=api.api_client(), timeout_s=0.2, poll_s=0.05)


def test_missing_rbac_is_named_with_what_to_grant():
    with FakeKubernetesAPI(ready_after(1), forbidden={"create"}) as api, \
            pytest.raises(DeployError, match=r"refused to create InferenceService serving/flowers: 403 Forbidden: .*"
                                             r"cannot create resource .*needs get, create and patch on "
                                             r"inferenceservices.serving.kserve.io"):
        _deploy(api)


def test_the_pipeline_component_returns_the_url(monkeypatch):
    with FakeKubernetesAPI(ready_after(1)) as api:
        monkeypatch.setattr(deploy, "kubernetes_api", api.api_client)
        url = deploy_model.python_func(version_uri=URI, serving_namespace="serving", serving_model_name="flowers",
                                       image=IMAGE)
    assert url == "http://flowers.serving.example.com"


def test_without_a_model_name_the_service_is_named_after_the_registry_folder(monkeypatch):
    """serving_namespace alone deploys: the name comes from the registry folder, made a valid name."""
    with FakeKubernetesAPI(ready_after(1)) as api:
        monkeypatch.setattr(deploy, "kubernetes_api", api.api_client)
        deploy_model.python_func(version_uri="gs://models/Flowers_V2/000004", serving_namespace="serving",
                                 serving_model_name="", image=IMAGE)
        stored = api.objects[("serving", "flowers-v2")]
    assert stored["spec"]["predictor"]["containers"][0]["args"][-1] == "flowers-v2"


@pytest.mark.parametrize("uri, name", [("gs://m/2026 Cats & Dogs!/000001", "cats-dogs"),
                                       ("gs://m/" + "a" * 70 + "/000001", "a" * 63)])
def test_the_default_name_is_a_valid_inferenceservice_name(uri, name):
    assert deploy.default_service_name(uri) == name


def test_a_registry_folder_without_letters_needs_a_model_name():
    with pytest.raises(DeployError, match=r"registry folder's name '2026' gives no InferenceService name.*set "
                                          r"serving_model_name"):
        deploy.default_service_name("gs://m/2026/000001")
