"""The KFP backend releases our users run, their schemas from PyPI, and a stand-in for their drivers.

A STAND-IN for the backend: no cluster runs here. Each rule below was read in kubeflow/pipelines at the
release tags (file named beside it); the conformance tests apply them to our compiled YAMLs.

Schemas: each release's API server and driver are built against the ``api`` and ``kubernetes_platform``
Go modules its ``go.mod`` pins (2.2.0: 58ce09e and 8b2a099; 2.4.x: 873e9de and d911c8b; from 2.5.0 the
tree itself). The PyPI wheels below carry the same messages, field for field (compared against the
``.proto`` files at those commits); for 2.5.0, kfp-pipeline-spec 0.6.0 lacks three fields of its tree's
proto (``mutex_name``, ``semaphore_key``, ``resource_ttl``), which our pipelines never write.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "conformance"
PARSER = pathlib.Path(__file__).with_name("strict_parse.py")
# Inside an install folder, written before it is renamed into place: the wheels it holds.
MARKER = ".installed"


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@dataclasses.dataclass(frozen=True)
class Release:
    version: str
    kubeflow: str
    wheels: tuple[str, ...]

    def at_least(self, version: str) -> bool:
        return _key(self.version) >= _key(version)


RELEASES = (
    Release("2.2.0", "1.9", ("kfp-pipeline-spec==0.2.2", "kfp-kubernetes==1.2.0", "protobuf==3.20.3",
                             "googleapis-common-protos==1.59.1")),
    Release("2.4.1", "1.10.0", ("kfp-pipeline-spec==0.6.0", "kfp-kubernetes==1.3.0", "protobuf==4.25.9",
                                "googleapis-common-protos==1.75.0")),
    Release("2.5.0", "1.10.2", ("kfp-pipeline-spec==0.6.0", "kfp-kubernetes==1.5.0", "protobuf==4.25.9",
                                "googleapis-common-protos==1.75.0")),
    Release("2.15.0", "1.11", ("kfp-pipeline-spec==2.15.0", "kfp-kubernetes==2.15.0", "protobuf==6.33.6",
                               "googleapis-common-protos==1.76.0")),
    Release("2.17.3", "standalone", ("kfp-pipeline-spec==2.17.3", "kfp-kubernetes==2.17.3", "protobuf==6.33.6",
                                     "googleapis-common-protos==1.76.0")),
)

# Kubeflow 1.8's backend, not supported: kept to show why (its schema, api 758c91f and kubernetes_platform bd9f74e).
UNSUPPORTED = Release("2.0.3", "1.8", ("kfp-pipeline-spec==0.2.1", "kfp-kubernetes==0.0.1", "protobuf==3.20.3",
                                       "googleapis-common-protos==1.59.1"))


# --- Schemas ------------------------------------------------------------------------------------------------


def schema_dir(release: Release) -> pathlib.Path:
    """The release's wheels, installed once outside the project's environment (.cache is git-ignored).

    Installed into a temporary folder beside the cache's and renamed into place with its marker inside, so
    a run never sees half an install, even while another run (another tier, another checkout's CI job on
    the same cache) installs the same release. The folder is named by its wheels: one that is in place is
    never replaced, so no run's files move under another that is reading them.
    """
    wanted = "\n".join(release.wheels)
    target = CACHE / f"{release.version}-{hashlib.sha256(wanted.encode()).hexdigest()[:12]}"
    if _installed(target, wanted):
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix=f".{target.name}.") as scratch:
        staging = pathlib.Path(scratch) / "site"
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                   "--target", str(staging), *release.wheels]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"cannot install the schema of KFP {release.version} ({' '.join(release.wheels)}) "
                               f"into {target}; PyPI must be reachable once:\n{done.stderr[-2000:]}")
        (staging / MARKER).write_text(wanted)
        try:
            os.replace(staging, target)
        except OSError:
            # Another run put the same install in place first (a folder that is there is not replaced): use it.
            if not _installed(target, wanted):
                raise
    return target


def _installed(target: pathlib.Path, wanted: str) -> bool:
    marker = target / MARKER
    return marker.is_file() and marker.read_text() == wanted


def load(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The PipelineSpec and the platform spec (None without one) of a compiled YAML."""
    documents = list(yaml.safe_load_all(pathlib.Path(path).read_text(encoding="utf-8")))
    return documents[0], (documents[1] if len(documents) > 1 else None)


def driver_refuses_unknown_fields(release: Release) -> bool:
    """Up to 2.4.0 the driver parses a task's container spec and Kubernetes config with
    ``jsonpb.UnmarshalString``, which fails the task on a field it does not know; from 2.4.1 with
    ``util.UnmarshalString`` (``backend/src/common/util/json.go``: ``AllowUnknownFields: true``, kfp #11662),
    which drops the field and runs the task without it (``backend/src/v2/cmd/driver/main.go``)."""
    return not release.at_least("2.4.1")


def strict_parse(release: Release, path: str | os.PathLike) -> list[str]:
    """The fields of the YAML at ``path`` that the release's API server or driver does not know, each said
    as the release treats it: "refused" (the upload or the task fails) or "ignored" (the setting is lost
    without a word); nothing: every field is read."""
    spec, platform = load(path)
    # -S: none of the project's site-packages (its protobuf and kfp) in the way of the release's own.
    done = subprocess.run([sys.executable, "-S", str(PARSER), str(schema_dir(release))],
                          input=json.dumps({"pipeline_spec": spec, "platform_spec": platform}),
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"the strict parse for KFP {release.version} did not run:\n{done.stderr[-2000:]}")
    problems = []
    for reader, problem in json.loads(done.stdout):
        if reader == "driver" and not driver_refuses_unknown_fields(release):
            problems.append(f"ignored by the {release.version} driver (the setting is lost): {problem}")
        else:
            problems.append(f"refused by the {release.version} {reader}: {problem}")
    return problems


# --- The driver, rule by rule -------------------------------------------------------------------------------


def dags(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(name, tasks) of the root DAG and of every sub-DAG (sub-pipelines, loops, conditions)."""
    yield "root", spec["root"]["dag"]["tasks"]
    for name, component in spec["components"].items():
        if "dag" in component:
            yield name, component["dag"]["tasks"]


def renamed_producers(spec: Mapping[str, Any], release: Release) -> list[str]:
    """Consumers the driver cannot resolve: up to 2.5.0 it records a task under its display name but looks
    producers up by task key (2.5.0 ``backend/src/v2/driver/driver.go``:
    ``ecfg.TaskName = opts.Task.GetTaskInfo().GetName()``; "cannot find producer task"; kfp #11173,
    fixed for 2.14.0 by #11938 and #12061)."""
    if release.at_least("2.14.0"):
        return []
    problems = []
    for dag, tasks in dags(spec):
        for consumer, task in tasks.items():
            inputs = task.get("inputs", {})
            for kind in ("parameters", "artifacts"):
                for name, value in inputs.get(kind, {}).items():
                    source = value.get("taskOutputParameter") or value.get("taskOutputArtifact") or {}
                    producer = source.get("producerTask")
                    shown = tasks.get(producer, {}).get("taskInfo", {}).get("name", producer)
                    if producer and shown != producer:
                        problems.append(f"{dag}: {consumer}.{name} reads producer task {producer!r}, recorded as "
                                        f"{shown!r}: cannot find producer task")
    return problems


def loop_dependencies(spec: Mapping[str, Any], release: Release) -> list[str]:
    """``.after()`` on a ParallelFor: up to 2.3.0 no Argo task carries the loop's name ("invalid dependency
    for-loop-N", kfp #10050); 2.4.0 names it ``for-loop-N-loop``; fixed in 2.4.1
    (``backend/src/v2/compiler/argocompiler/dag.go``)."""
    if release.at_least("2.4.1"):
        return []
    problems = []
    for dag, tasks in dags(spec):
        loops = {name for name, task in tasks.items() if "parameterIterator" in task or "artifactIterator" in task}
        for name, task in tasks.items():
            for dependency in set(task.get("dependentTasks", [])) & loops:
                problems.append(f"{dag}: {name} depends on the loop {dependency!r}: invalid dependency {dependency}")
    return problems


def literal_placeholders(spec: Mapping[str, Any], release: Release) -> list[str]:
    """Run placeholders the driver resolves only from 2.5.0 (``driver.go``, ``{{$.pipeline_job_uuid}}`` and
    its siblings); before, the literal text reaches the component."""
    if release.at_least("2.5.0"):
        return []
    found = sorted(set(re.findall(r"\{\{\$\.pipeline_(?:job|task)_[a-z_]+\}\}", json.dumps(spec))))
    return [f"{placeholder} is passed as literal text" for placeholder in found]


def retried(spec: Mapping[str, Any], dag: str, task: str, release: Release) -> bool:
    """Whether the backend applies the task's retryPolicy: never up to 2.4.0; root-DAG tasks in 2.4.1 and
    2.5.0 (``argocompiler/container.go`` ``getTaskRetryPolicySpec`` reads ``spec.Root.GetDag().Tasks``); any
    task from 2.14.0. Argo's default retryPolicy (OnFailure) then applies (see the README)."""
    tasks = dict(dags(spec))[dag]
    if "retryPolicy" not in tasks[task] or not release.at_least("2.4.1"):
        return False
    return dag == "root" or release.at_least("2.14.0")


def _run_value(spec: Mapping[str, Any], name: str, form: Mapping[str, Any]) -> Any:
    """A root input as the API server hands it to the driver: typed by the parameter's declared type."""
    declared = spec["root"]["inputDefinitions"]["parameters"][name]
    value = form.get(name, declared.get("defaultValue"))
    if declared["parameterType"] == "STRING":
        return str(value)
    return float(value) if declared["parameterType"].startswith("NUMBER") else value


def task_path(spec: Mapping[str, Any], executor: str) -> list[tuple[str, Mapping[str, Any]]]:
    """The chain of (task name, task) from the root DAG down to the task that runs ``executor``."""
    def search(tasks: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]] | None:
        for name, task in tasks.items():
            component = spec["components"][task["componentRef"]["name"]]
            if component.get("executorLabel") == executor:
                return [(name, task)]
            if "dag" in component:
                below = search(component["dag"]["tasks"])
                if below:
                    return [(name, task), *below]
        return None

    return search(spec["root"]["dag"]["tasks"]) or []


def executor_parameters(spec: Mapping[str, Any], executor: str, form: Mapping[str, Any]) -> dict[str, Any]:
    """The executor input's parameter values of the task running ``executor``, for a run with ``form``,
    following component inputs up through the sub-DAGs to the root (what the driver's resolve.go does)."""
    def resolve(path: list[tuple[str, Mapping[str, Any]]], spec_value: Mapping[str, Any]) -> Any:
        if "componentInputParameter" in spec_value:
            if len(path) == 1:
                return _run_value(spec, spec_value["componentInputParameter"], form)
            parent = path[-2][1]["inputs"]["parameters"].get(spec_value["componentInputParameter"])
            return resolve(path[:-1], parent) if parent is not None else None
        if "runtimeValue" in spec_value:
            return spec_value["runtimeValue"]["constant"]
        return None

    path = task_path(spec, executor)
    return {name: resolve(path, value) for name, value in path[-1][1]["inputs"].get("parameters", {}).items()}


def gpu_limits(spec: Mapping[str, Any], executor: str, form: Mapping[str, Any], release: Release) -> dict[str, str]:
    """The extended-resource limits ``initPodSpecPatch`` (``backend/src/v2/driver/driver.go``) puts on the pod.

    From 2.4.0: ``resourceType``/``resourceCount`` resolved by ``resolvePodSpecInputRuntimeParameter``
    (``util.go``, later ``resolve.go``), which returns ``GetStringValue()``: "" for a number, and then no
    limit. Up to 2.3.0: only ``type`` and the numeric ``count`` (set when ``count > 0``).
    """
    accelerator = spec["deploymentSpec"]["executors"][executor]["container"].get("resources", {}).get("accelerator")
    if not accelerator:
        return {}
    params = executor_parameters(spec, executor, form)

    def runtime(text: str) -> str:
        match = re.fullmatch(r"\{\{\$\.inputs\.parameters\['([^']+)'\]\}\}", text)
        if not match:
            return text
        value = params.get(match.group(1))
        return value if isinstance(value, str) else ""  # GetStringValue(): "" for any other kind

    if release.at_least("2.4.0") and accelerator.get("resourceType"):
        kind = runtime(accelerator["resourceType"])
    else:
        kind = accelerator.get("type", "")
    if release.at_least("2.4.0") and accelerator.get("resourceCount"):
        count = runtime(accelerator["resourceCount"])
    else:
        count = str(int(accelerator["count"])) if int(accelerator.get("count", 0)) > 0 else ""
    return {kind: count} if kind and count else {}


def cache_identity(spec: Mapping[str, Any], task: str) -> dict[str, Any]:
    """What a root task's cache lookup depends on, apart from the run's values: the scope
    (``"pipeline/" + pipelineInfo.name``, ``backend/src/v2/driver/cache.go``) and the key's parts
    (``backend/src/v2/cacheutils/cache.go`` ``GenerateCacheKey``: input parameter values and artifact
    names, output artifact and parameter specs, command and arguments, image), here as the YAML states
    them: where each input comes from (with its default) and the component's definitions."""
    task_spec = spec["root"]["dag"]["tasks"][task]
    component = spec["components"][task_spec["componentRef"]["name"]]
    container = spec["deploymentSpec"]["executors"][component["executorLabel"]]["container"]
    root_inputs = spec["root"]["inputDefinitions"]["parameters"]
    sources = {}
    for name, value in task_spec.get("inputs", {}).get("parameters", {}).items():
        root_name = value.get("componentInputParameter")
        sources[name] = (root_name, root_inputs[root_name].get("defaultValue")) if root_name else value
    return {"scope": f"pipeline/{spec['pipelineInfo']['name']}", "image": container["image"],
            "cmd_args": [*container.get("command", []), *container.get("args", [])],
            "inputs": sources, "input_artifacts": task_spec.get("inputs", {}).get("artifacts", {}),
            "definitions": {key: component.get(key) for key in ("inputDefinitions", "outputDefinitions")}}
