"""Deploy a pushed registry version as a KServe InferenceService running ``imgclf serve``, and wait until it is Ready.

``inference_service`` writes the manifest (``serving.kserve.io/v1beta1``): a predictor with one custom
container, our image running ``imgclf serve <version URI>`` on port 8080 (KServe's and SageMaker's port), its
CPU, memory and optional GPUs, a readiness probe on the V2 ready endpoint and, for a rollout beside the
version already served, ``canaryTrafficPercent`` (honoured by KServe's Serverless (Knative) mode). The
server reads the version itself through ``trainer.storage``, so the URI must be one the serving pod
reaches: a gs:// URI (credentials as for the pipeline: Workload Identity or a key secret).

``apply_and_wait`` creates the InferenceService, or patches the spec of the one of that name, through the
Kubernetes API (the ``kubernetes`` client: in-cluster credentials in a pipeline pod, else kubeconfig), then
polls it until its ``Ready`` condition is True for this generation. It fails with the service's own
reason: the Ready (or another failing) condition's reason and message, and ``status.modelStatus``'s
``lastFailureInfo`` when KServe reports the model ``BlockedByFailedLoad`` or ``InvalidSpec`` (which end the
wait at once), or whatever it said last when ``timeout_s`` runs out.

RBAC the step's service account needs in the serving namespace: ``get``, ``create`` and ``patch`` on
``inferenceservices.serving.kserve.io`` (README, "Deploy").
"""

from __future__ import annotations

import logging
import posixpath
import re
import time
from collections.abc import Callable
from typing import Any

from trainer import storage
from trainer.errors import ImgclfError

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
CONTAINER_NAME = "kserve-container"  # the name KServe gives a custom predictor container
PORT = 8080
DEFAULT_CPU = "1"
DEFAULT_MEMORY = "2Gi"
GPU_RESOURCE = "nvidia.com/gpu"
DEFAULT_TIMEOUT_S = 900.0
# KServe's modelStatus.transitionStatus values after which waiting longer does not help.
FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")
# A Kubernetes object name (DNS-1035 label: KServe's InferenceService names are host names).
_NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class DeployError(ImgclfError):
    """The InferenceService could not be written, applied or made Ready; the message says why."""


def default_service_name(model_uri: str) -> str:
    """The InferenceService name for a registry version when none is set: the registry folder's name
    (``gs://models/Flowers_v2/000004`` -> ``flowers-v2``) made a name KServe takes: lower case, runs of other
    characters as one '-', starting with a letter, at most 63 characters. DeployError when nothing is left."""
    registry = posixpath.basename(posixpath.dirname(model_uri.rstrip("/")))
    name = re.sub(r"^[^a-z]+", "", re.sub(r"[^a-z0-9]+", "-", registry.lower()))[:63].rstrip("-")
    if not _NAME.fullmatch(name):
        raise DeployError(f"serving_model_name is not set and the registry folder's name {registry!r} gives no "
                          "InferenceService name (lower-case letters, digits and '-', starting with a letter); "
                          "set serving_model_name")
    return name


def inference_service(name: str, namespace: str, model_uri: str, *, image: str, cpu: str = DEFAULT_CPU,
                      memory: str = DEFAULT_MEMORY, gpus: int = 0, canary_traffic_percent: int = 0) -> dict[str, Any]:
    """The InferenceService manifest that serves ``model_uri`` (a registry version) with ``imgclf serve``.

    ``canary_traffic_percent`` 1-99 sends that share of the traffic to this version and the rest to the
    version served before (0: all traffic to this one). DeployError naming the value when one is invalid.
    """
    problems = []
    if not _NAME.fullmatch(name or ""):
        problems.append(f"serving_model_name {name!r} is not a valid InferenceService name: lower-case letters, "
                        "digits and '-', starting with a letter, at most 63 characters")
    if not _NAMESPACE.fullmatch(namespace or ""):
        problems.append(f"serving_namespace {namespace!r} is not a valid Kubernetes namespace name")
    if not storage.is_gcs(model_uri):
        problems.append(f"the pushed version {model_uri!r} is not a gs:// URI, which the serving pod could read; "
                        "set model_registry_uri to a gs:// URI to deploy")
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        problems.append(f"serving_gpus must be a whole number 0 or more, got {gpus!r}")
    if isinstance(canary_traffic_percent, bool) or not isinstance(canary_traffic_percent, int) \
            or not 0 <= canary_traffic_percent <= 99:
        problems.append(f"serving_canary_traffic_percent must be 0 (no canary) to 99, got {canary_traffic_percent!r}")
    if problems:
        raise DeployError("; ".join(problems))

    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
    container = {
        "name": CONTAINER_NAME,
        "image": image,
        "command": ["imgclf"],
        "args": ["serve", model_uri, "--host", "0.0.0.0", "--port", str(PORT), "--name", name],
        "ports": [{"containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": {"cpu": cpu, "memory": memory}, "limits": limits},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": PORT},
                           "periodSeconds": 5, "failureThreshold": 3},
    }
    predictor: dict[str, Any] = {"minReplicas": 1, "containers": [container]}
    if canary_traffic_percent:
        predictor["canaryTrafficPercent"] = canary_traffic_percent
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": KIND,
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/name": name, "app.kubernetes.io/managed-by": "imgclf"},
                     "annotations": {"imgclf.dev/model-uri": model_uri}},
        "spec": {"predictor": predictor},
    }


def kubernetes_api():
    """A Kubernetes API client: in-cluster credentials when running in a pod, else the kubeconfig."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        try:
            config.load_kube_config()
        except (config.ConfigException, OSError) as err:
            raise DeployError(f"no Kubernetes credentials: not in a pod and no usable kubeconfig ({err})") from None
    return client.ApiClient()


def apply_and_wait(manifest: dict[str, Any], *, api_client=None, timeout_s: float = DEFAULT_TIMEOUT_S,
                   poll_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Create the InferenceService or patch its spec, then wait until it is Ready; returns its last state.

    Returns ``{"name", "namespace", "url", "generation", "action"}`` ("created" or "updated").
    DeployError with the API's answer when the request is refused (e.g. 403: the RBAC in the README), and
    with the service's own reason when it does not become Ready.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    api = client.CustomObjectsApi(api_client or kubernetes_api())
    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    where = f"InferenceService {namespace}/{name}"
    verb = "read"
    try:
        try:
            api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
            exists = True
        except ApiException as err:
            if err.status != 404:
                raise
            exists = False
        verb = "patch" if exists else "create"
        if exists:
            # A merge patch (RFC 7386) keeps what it leaves out: null ends an earlier canary split.
            predictor = {"canaryTrafficPercent": None, **manifest["spec"]["predictor"]}
            patch = {"metadata": {"labels": manifest["metadata"]["labels"],
                                  "annotations": manifest["metadata"]["annotations"]},
                     "spec": {**manifest["spec"], "predictor": predictor}}
            applied = api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, patch)
        else:
            applied = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except ApiException as err:
        raise DeployError(f"the Kubernetes API refused to {verb} {where}: "
                          f"{err.status} {err.reason}: {_api_message(err)}{_rbac_hint(err.status)}") from None
    action = "updated" if exists else "created"
    generation = int(applied.get("metadata", {}).get("generation") or 0)
    log.info("%s %s (generation %d); waiting for Ready (at most %.0f s)", where, action, generation, timeout_s)

    deadline = clock() + timeout_s
    last = "no status yet"
    while True:
        try:
            current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as err:
            raise DeployError(f"reading {where} failed: {err.status} {err.reason}: {_api_message(err)}"
                              f"{_rbac_hint(err.status)}") from None
        state = _state(current, generation)
        if state["ready"]:
            url = current.get("status", {}).get("url", "")
            log.info("%s is Ready at %s", where, url or "(no URL reported)")
            return {"name": name, "namespace": namespace, "url": url, "generation": generation, "action": action}
        if state["failed"]:
            raise DeployError(f"{where} cannot become Ready: {state['reason']}")
        if state["reason"] != last:
            last = state["reason"]
            log.info("%s not Ready yet: %s", where, last)
        if clock() >= deadline:
            raise DeployError(f"{where} was not Ready after {timeout_s:.0f} s: {last}")
        time.sleep(poll_s)


def _state(service: dict[str, Any], generation: int) -> dict[str, Any]:
    """Whether the service is Ready for ``generation``, has failed for good, and the reason it gives."""
    status = service.get("status") or {}
    observed = int(status.get("observedGeneration") or 0)
    conditions = {c.get("type"): c for c in status.get("conditions") or [] if isinstance(c, dict)}
    model = status.get("modelStatus") or {}
    failure = model.get("lastFailureInfo") or {}
    if model.get("transitionStatus") in FAILED_TRANSITIONS:
        detail = ", ".join(f"{k} {failure[k]}" for k in ("reason", "message", "exitCode", "location") if failure.get(k))
        return {"ready": False, "failed": True,
                "reason": f"model status {model['transitionStatus']}" + (f" ({detail})" if detail else "")}
    if observed < generation:
        return {"ready": False, "failed": False,
                "reason": f"KServe has not reconciled generation {generation} yet (observed {observed})"}
    ready = conditions.get("Ready") or {}
    if ready.get("status") == "True":
        return {"ready": True, "failed": False, "reason": "Ready"}
    not_ready = [c for c in conditions.values() if c.get("status") == "False"]
    if not not_ready:
        return {"ready": False, "failed": False, "reason": "the Ready condition is not reported yet"}
    reason = "; ".join(f"{c.get('type')} False: {c.get('reason') or 'no reason'}"
                       + (f" ({c['message']})" if c.get("message") else "") for c in not_ready)
    return {"ready": False, "failed": False, "reason": reason}


def _api_message(err) -> str:
    import json

    try:
        return json.loads(err.body).get("message") or str(err.body)
    except (TypeError, ValueError, AttributeError):
        return str(err.body or "")


def _rbac_hint(status: int | None) -> str:
    if status in (401, 403):
        return ("; the step's service account needs get, create and patch on inferenceservices.serving.kserve.io "
                "in this namespace (README, Deploy)")
    return ""


def deploy(model_uri: str, *, name: str, namespace: str, image: str, cpu: str = DEFAULT_CPU,
           memory: str = DEFAULT_MEMORY, gpus: int = 0, canary_traffic_percent: int = 0,
           timeout_s: float = DEFAULT_TIMEOUT_S, api_client=None) -> dict[str, Any]:
    """Write the InferenceService for ``model_uri`` and apply it, waiting for Ready; the pipeline's deploy step.

    An empty ``name`` is ``default_service_name(model_uri)``. Returns ``apply_and_wait``'s result with the
    ``manifest``.
    """
    if not name:
        name = default_service_name(model_uri)
        log.info("serving_model_name not set: the InferenceService is named %r after the registry folder", name)
    manifest = inference_service(name, namespace, model_uri, image=image, cpu=cpu, memory=memory, gpus=gpus,
                                 canary_traffic_percent=canary_traffic_percent)
    result = apply_and_wait(manifest, api_client=api_client, timeout_s=timeout_s)
    return {**result, "manifest": manifest}
