"""Operating the pipeline on a Kubeflow Pipelines cluster: upload it, submit runs and schedule recurring runs."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import difflib
import hashlib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import kfp
import kfp_server_api
import urllib3
import yaml

from pipelines import backends
from pipelines.compiler import COMPILED_PIPELINE, COMPILED_TUNING_PIPELINE
from pipelines.image_classification import image_classification
from trainer import hyperparameters as hps
from trainer.errors import HyperparameterError, ImgclfError
from trainer.tune import search_space

# The KFP SDK's own variable for the API address, so one setting serves imgclf and plain SDK scripts.
HOST_ENV = "KF_PIPELINES_ENDPOINT"
TOKEN_ENV = "KF_PIPELINES_TOKEN"
DEFAULT_EXPERIMENT = "Default"
# The API server refuses recurring runs outside this range (backend validation of max_concurrency).
MAX_CONCURRENCY_RANGE = (1, 10)
# robfig/cron descriptors, which the KFP scheduled-workflow controller accepts besides 6 fields.
_CRON_DESCRIPTORS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")
_KFP_TYPES = {"String": str, "Integer": int, "Float": float, "Boolean": bool, "List": list, "Struct": dict}
_TERMINAL_STATES = ("SUCCEEDED", "FAILED", "SKIPPED", "CANCELED")


class OperationError(ImgclfError):
    """The cluster cannot do what was asked (not reachable, refused, missing pipeline); the message says why."""


class ParameterError(HyperparameterError):
    """Pipeline parameters (hyperparameters or the pipeline's own settings) are invalid; one line each."""

    def __str__(self) -> str:
        return "invalid pipeline parameters:\n" + "\n".join(f"  - {p}" for p in self.problems)


# --- Parameters -------------------------------------------------------------------------------------------


def pipeline_for(name: str | None) -> Any:
    """The pipeline whose parameters a run of ``name`` takes: the tuning pipeline by its name, else the main one."""
    from pipelines.tuning import PIPELINE_NAME, image_classification_tuning

    return image_classification_tuning if name == PIPELINE_NAME else image_classification


def pipeline_settings(pipeline: Any = None) -> dict[str, type]:
    """The pipeline's parameters that are not hyperparameters (data_uri, accelerator_count, ...) and their types.

    Read from the pipeline's signature (the main pipeline's unless ``pipeline`` is given), so a setting
    added there is accepted here without a second list.
    """
    pipeline = pipeline or image_classification
    return {name: _KFP_TYPES[spec.type] for name, spec in pipeline.component_spec.inputs.items()
            if name not in hps.FIELDS}


def pipeline_defaults(pipeline: Any = None) -> dict[str, Any]:
    """Every pipeline parameter that has a default, with it (data_uri has none)."""
    pipeline = pipeline or image_classification
    return {name: spec.default for name, spec in pipeline.component_spec.inputs.items() if spec.optional}


def load_parameters(files: Iterable[str] = (), assignments: Iterable[str] = ()) -> dict[str, Any]:
    """Merge YAML/JSON files in turn, then ``name=value`` assignments, into raw (unchecked) values."""
    try:
        return hps.merge_sources(files, assignments)
    except HyperparameterError as err:
        raise ParameterError(err.problems) from None


def pipeline_parameters(values: Mapping[str, Any], pipeline: Any = None, *,
                        package: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check and type the values of a run: every hyperparameter, resolved, plus the pipeline settings given.

    Hyperparameters go through the schema (``Hyperparameters.from_mapping``, where ``resolve`` ends too;
    ``resolve`` itself would refuse data_uri and the other settings that share the files). Settings are
    checked by name and type against the pipeline's signature. For the tuning pipeline the search is
    checked too: the ranges, objective, strategy and budget, and that no hyperparameter given here is
    also ranged. With ``package``, the compiled PipelineSpec the run executes, an ``accelerator_count`` other
    than the GPU count it fixes (a YAML compiled for KFP 2.2.0) is refused. Every problem is reported at once.
    """
    settings = pipeline_settings(pipeline)
    problems: list[str] = []
    hyperparameters: dict[str, Any] = {}
    chosen: dict[str, Any] = {}
    for name, value in values.items():
        if hps.ALIASES.get(name, name) in hps.FIELDS:
            hyperparameters[name] = value
        elif name in settings:
            try:
                chosen[name] = _coerce_setting(name, settings[name], value)
                if name == "accelerator_count" and package is not None:
                    backends.check_gpu_count(package, chosen[name])
            except ValueError as err:
                problems.append(str(err))
        else:
            problems.append(_unknown_parameter(name, settings))
    for name in sorted(set(settings) - set(pipeline_defaults(pipeline)) - set(values)):
        problems.append(f"{name}: required; give it with --set {name}=... or in a --params file")
    resolved: dict[str, Any] = {}
    try:
        resolved = hps.Hyperparameters.from_mapping(hyperparameters).to_dict()
    except HyperparameterError as err:
        problems.extend(err.problems)
    if "ranges" in settings and (resolved or not hyperparameters):
        search = {**pipeline_defaults(pipeline), **chosen}
        try:
            config = _search_config(hyperparameters, search)
        except HyperparameterError as err:
            problems.extend(err.problems)
        else:
            given = {hps.ALIASES.get(name, name) for name in hyperparameters}
            if not str(search["ranges"]).strip() and given & set(search_space.default_space().names):
                # The run gets every hyperparameter, so its setup step cannot tell which ones were given:
                # send the recommended ranges less those, as checked here.
                chosen["ranges"] = config.space.to_json()
    if problems:
        raise ParameterError(problems)
    return {**resolved, **chosen}


def _search_config(hyperparameters: Mapping[str, Any], settings: Mapping[str, Any]) -> Any:
    """A tuning run's search, checked (HyperparameterError lists every problem, one line each)."""
    from trainer.tune import tuning

    return tuning.make_config(settings["ranges"], hyperparameters, objective=settings["objective"],
                              strategy=settings["strategy"], max_trials=settings["max_trials"],
                              parallel_trials=settings["parallel_trials"],
                              early_stopping_type=settings["early_stopping_type"], fixed_given=hyperparameters)


def _coerce_setting(name: str, kind: type, value: Any) -> Any:
    """Convert a setting as given (typed, or a string from --set or an all-string file) to its type."""
    if name == "ranges" and isinstance(value, Mapping):
        # A --params file may hold the search as YAML; the pipeline takes it as a JSON string.
        return json.dumps(value)
    text = value.strip() if isinstance(value, str) else None
    if kind in (list, dict):
        with contextlib.suppress(ValueError):
            value = json.loads(text) if text is not None else value
        if isinstance(value, kind):
            return value
        raise ValueError(f"{name}: got {text if text is not None else value!r}, expected a JSON "
                         f"{'list' if kind is list else 'object'}")
    if name == "accelerator_count" and kind is str and not isinstance(value, bool):
        # The backend's driver reads the GPU count as text and sets no limit at all for a number.
        return str(backends.parse_gpu_count(text if text is not None else value))
    if kind is str and text is not None:
        if name == "data_uri" and not text:
            raise ValueError("data_uri: got '', expected a gs:// URI or a mounted path of the class folders")
        return text
    if kind is bool:
        if isinstance(value, bool):
            return value
        if text is not None and text.lower() in ("true", "false"):
            return text.lower() == "true"
    elif not isinstance(value, bool):  # bool is an int in Python, but True is no GPU count
        number = _number(value if text is None else text)
        if number is not None and kind is float:
            return _check_setting(name, number, shown=value)
        if number is not None and kind is int and number.is_integer():
            return _check_setting(name, int(number), shown=value)
    noun = {bool: "True or False", int: "an integer", float: "a number", str: "a string"}[kind]
    raise ValueError(f"{name}: got {value!r}, expected {noun}")


def _number(value: Any) -> float | None:
    """A finite float from an int, float or numeric string, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _check_setting(name: str, value: int | float, shown: Any) -> int | float:
    """Range rules of the settings that have one; past them a run would fail late, at pod creation."""
    if name == "accelerator_count" and value < 0:
        raise ValueError(f"accelerator_count: got {shown!r}, expected 0 (CPU only) or a number of GPUs")
    if name == "max_rejected_fraction" and not 0 <= value <= 1:
        raise ValueError(f"max_rejected_fraction: got {shown!r}, expected a number in [0, 1]")
    return value


def _unknown_parameter(name: str, settings: Mapping[str, type]) -> str:
    known = [*hps.FIELDS, *hps.ALIASES, *settings]
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    suggestion = (f"did you mean {hint[0]!r}?" if hint else
                  "the names are in 'imgclf hyperparameters --list' and the README's pipeline settings")
    return f"{name}: unknown pipeline parameter; {suggestion}"


def check_cron(cron: str) -> str:
    """Return the cron expression if Kubeflow Pipelines reads it as meant, or raise ParameterError.

    KFP's scheduler takes 6 fields with seconds first; a common 5-field crontab line would be read
    shifted by one field (its minute taken as seconds), so it is refused with the corrected form.
    """
    text = " ".join(cron.split())
    fields = text.split(" ")
    if text in _CRON_DESCRIPTORS or (text.startswith("@every ") and len(fields) == 2):
        return text
    if len(fields) == 5:
        raise ParameterError([f"--cron {cron!r}: 5 fields, but Kubeflow Pipelines reads 6 with seconds first "
                              f"(second minute hour day-of-month month day-of-week); use '0 {text}'"])
    if len(fields) != 6:
        raise ParameterError([f"--cron {cron!r}: expected 6 fields (second minute hour day-of-month month "
                              "day-of-week), e.g. '0 0 2 * * *' for 02:00 every day, or one of "
                              + ", ".join(_CRON_DESCRIPTORS) + ", '@every 6h'"])
    return text


def check_max_concurrency(value: int) -> int:
    """Return ``value`` if the API server accepts it as a recurring run's concurrency, or raise ParameterError."""
    low, high = MAX_CONCURRENCY_RANGE
    if not low <= value <= high:
        raise ParameterError([f"--max-concurrency: got {value}, but Kubeflow Pipelines accepts {low} to {high}"])
    return value


# --- The cluster ------------------------------------------------------------------------------------------


def connect(host: str, *, namespace: str | None = None, existing_token: str | None = None) -> kfp.Client:
    """A KFP client for ``host`` (scheme required); ``namespace`` for multi-user (profile) deployments."""
    if not host.startswith(("http://", "https://")):
        raise OperationError(f"KFP host {host!r} has no scheme; give e.g. http://localhost:8888 (a port-forward "
                             "of svc/ml-pipeline) or https://kubeflow.example.com/pipeline")
    with warnings.catch_warnings():
        # Every construction warns that the client needs KFP 2.0.0-beta.2 or later; this project already does.
        warnings.simplefilter("ignore", FutureWarning)
        # "kubeflow" is the client's value for "no namespace given" (single-user deployments).
        return kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=existing_token)


@contextlib.contextmanager
def api_errors(host: str) -> Iterator[None]:
    """Turn the API client's exceptions into one line naming the host and the server's own message."""
    try:
        yield
    except kfp_server_api.ApiException as err:
        if err.status == 0:  # the client's marker for TLS failures
            raise OperationError(f"cannot talk to the KFP API at {host}: {err.reason}") from None
        raise OperationError(f"the KFP API at {host} answered {err.status} {err.reason}: "
                             f"{_server_message(err.body)}") from None
    except urllib3.exceptions.HTTPError as err:
        raise OperationError(f"cannot reach the KFP API at {host} ({type(err).__name__}); check the address and "
                             "that the API is reachable, e.g. kubectl -n kubeflow port-forward svc/ml-pipeline "
                             "8888:8888") from None
    except TimeoutError:  # the client's health check gave up after its retries
        raise OperationError(f"the KFP API at {host} did not pass its health check (GET /apis/v2beta1/healthz); "
                             "check that the address points at the API server, not at another service") from None


def _server_message(body: Any) -> str:
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body or "")
    with contextlib.suppress(ValueError, AttributeError):
        payload = json.loads(text)
        # gRPC-gateway errors carry "message"; the upload endpoints answer with "error_message".
        return str(payload.get("message") or payload.get("error_message") or payload.get("error") or text)
    return text.strip()[:500] or "(no message)"


def _name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"key": "display_name", "operation": "EQUALS", "string_value": name}]})


def find_pipeline(client: kfp.Client, name: str, namespace: str | None = None) -> Any | None:
    """The pipeline named ``name`` (in ``namespace``, or shared), or None."""
    found = client.list_pipelines(filter=_name_filter(name), namespace=namespace, page_size=2).pipelines or []
    if len(found) > 1:
        raise OperationError(f"several pipelines are named {name!r}; rename or delete the extra ones in the "
                             "Kubeflow UI so the name picks one")
    return found[0] if found else None


def find_version(client: kfp.Client, pipeline_id: str, version_name: str | None = None) -> Any:
    """The version named ``version_name`` of a pipeline, or its newest version when no name is given."""
    if version_name:
        response = client.list_pipeline_versions(pipeline_id, filter=_name_filter(version_name), page_size=1)
    else:
        response = client.list_pipeline_versions(pipeline_id, sort_by="created_at desc", page_size=1)
    versions = response.pipeline_versions or []
    if not versions:
        wanted = f"a version named {version_name!r}" if version_name else "any version"
        raise OperationError(f"pipeline {pipeline_id} has no {wanted}; list them in the Kubeflow UI or "
                             "upload one with 'imgclf upload'")
    return versions[0]


@dataclasses.dataclass(frozen=True)
class _Package:
    name: str
    description: str
    sha256: str
    spec: dict[str, Any]


def _read_package(path: str) -> _Package:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise OperationError(f"cannot read the pipeline package {path}: {err.strerror}; compile it with "
                             "'imgclf compile'") from None
    try:
        spec = next(yaml.safe_load_all(data), None) or {}
    except yaml.YAMLError as err:
        raise OperationError(f"{path} is not valid YAML ({str(err).splitlines()[0]}); compile it with "
                             "'imgclf compile'") from None
    info = spec.get("pipelineInfo") if isinstance(spec, dict) else None
    if not isinstance(info, dict) or not info.get("name"):
        raise OperationError(f"{path} is not a compiled KFP pipeline (no pipelineInfo.name); compile it with "
                             "'imgclf compile'")
    # The tuning pipeline shares the main one's name (its cache scope) and is told apart by its display name.
    return _Package(info.get("displayName") or info["name"], info.get("description", ""),
                    hashlib.sha256(data).hexdigest(), spec)


def default_version_name(package_sha256: str, now: datetime.datetime | None = None) -> str:
    """A unique, traceable version name: the UTC upload time and the start of the package's sha256.

    Lower-case letters, digits and '-' only, because KFP's Kubernetes-native pipeline store keeps
    versions as Kubernetes objects, whose names allow nothing else.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    return f"v{now:%Y%m%d-%H%M%S}-{package_sha256[:8]}"


# --- Upload ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UploadedPipeline:
    pipeline_id: str
    pipeline_name: str
    version_id: str
    version_name: str
    created_pipeline: bool  # True: this upload created the pipeline; False: it added a version


def upload_pipeline(client: kfp.Client, package_path: str = COMPILED_PIPELINE, *, pipeline_name: str | None = None,
                    version_name: str | None = None, description: str | None = None,
                    namespace: str | None = None) -> UploadedPipeline:
    """Upload a compiled pipeline, or a new version of it when a pipeline of that name exists.

    The first upload creates the pipeline, whose first version KFP names after the pipeline;
    later ones add a version named ``version_name`` (default: ``default_version_name``).
    """
    package = _read_package(package_path)
    name = pipeline_name or package.name
    existing = find_pipeline(client, name, namespace)
    if existing is None:
        pipeline = client.upload_pipeline(package_path, pipeline_name=name,
                                          description=description or package.description, namespace=namespace)
        version = find_version(client, pipeline.pipeline_id)
        return UploadedPipeline(pipeline.pipeline_id, name, version.pipeline_version_id,
                                version.display_name or version.name, created_pipeline=True)
    version = client.upload_pipeline_version(
        package_path, pipeline_version_name=version_name or default_version_name(package.sha256),
        pipeline_id=existing.pipeline_id,
        description=description or f"sha256:{package.sha256} of {os.path.basename(package_path)}")
    return UploadedPipeline(existing.pipeline_id, name, version.pipeline_version_id,
                            version.display_name or version.name, created_pipeline=False)


# --- Runs and recurring runs -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Source:
    """What a run executes: an uploaded pipeline version, or a package file sent with the run."""

    label: str
    name: str
    package_path: str | None = None
    pipeline_id: str | None = None
    version_id: str | None = None
    # The PipelineSpec it runs (the API server's {"pipeline_spec", "platform_spec"} for a version), if known.
    spec: Mapping[str, Any] | None = None


def _resolve_source(client: kfp.Client, pipeline_name: str | None, version_name: str | None,
                    package_path: str | None, namespace: str | None) -> _Source:
    if pipeline_name is None:
        path = package_path or COMPILED_PIPELINE
        package = _read_package(path)
        return _Source(f"package {path}", package.name, package_path=path, spec=package.spec)
    pipeline = find_pipeline(client, pipeline_name, namespace)
    if pipeline is None:
        raise OperationError(f"no pipeline named {pipeline_name!r} on this cluster; upload it first with "
                             f"'imgclf upload --pipeline-name {pipeline_name}'")
    version = find_version(client, pipeline.pipeline_id, version_name)
    label = (f"pipeline {pipeline_name!r} (id {pipeline.pipeline_id}) version "
             f"{version.display_name or version.name!r} (id {version.pipeline_version_id})")
    return _Source(label, pipeline_name, pipeline_id=pipeline.pipeline_id,
                   version_id=version.pipeline_version_id, spec=getattr(version, "pipeline_spec", None))


def _checked_source(client: kfp.Client, parameters: Mapping[str, Any], pipeline: Any, pipeline_name: str | None,
                    version_name: str | None, package_path: str | None,
                    namespace: str | None) -> tuple[dict[str, Any], _Source]:
    """The typed parameters and what the run executes, the parameters checked against it too (its GPU count).

    The parameters are checked before any request; an uploaded version's spec again once it is found.
    """
    if pipeline_name is None:  # a package file, read here without a request
        source = _resolve_source(client, pipeline_name, version_name, package_path, namespace)
        return pipeline_parameters(parameters, pipeline, package=source.spec), source
    typed = pipeline_parameters(parameters, pipeline)
    source = _resolve_source(client, pipeline_name, version_name, package_path, namespace)
    if source.spec:
        pipeline_parameters(parameters, pipeline, package=source.spec)
    return typed, source


def _check_source_arguments(pipeline_name: str | None, version_name: str | None, package_path: str | None) -> None:
    if pipeline_name and package_path:
        raise ValueError("give either pipeline_name (an uploaded pipeline) or package_path, not both")
    if version_name and not pipeline_name:
        raise ValueError("version_name needs pipeline_name: it names a version of an uploaded pipeline")


@dataclasses.dataclass(frozen=True)
class SubmittedRun:
    run_id: str
    run_name: str
    experiment_id: str
    experiment_name: str
    source: str
    parameters: dict[str, Any]


def submit_run(client: kfp.Client, parameters: Mapping[str, Any], *, experiment: str = DEFAULT_EXPERIMENT,
               run_name: str | None = None, pipeline_name: str | None = None, version_name: str | None = None,
               package_path: str | None = None, namespace: str | None = None, pipeline_root: str | None = None,
               service_account: str | None = None, enable_caching: bool | None = None,
               pipeline: Any = None) -> SubmittedRun:
    """Start a run of an uploaded pipeline version (newest unless named) or of a package file.

    ``parameters`` are checked first (see ``pipeline_parameters``), so a bad name or value sends nothing; an
    uploaded version's fixed GPU count is checked once the version is found.
    Without ``pipeline_name`` or ``package_path`` the committed compiled pipeline is sent with the run.
    ``pipeline`` is the pipeline whose signature checks the parameters (default: the main one).
    """
    _check_source_arguments(pipeline_name, version_name, package_path)
    typed, source = _checked_source(client, parameters, pipeline, pipeline_name, version_name, package_path,
                                    namespace)
    chosen_experiment = client.create_experiment(name=experiment, namespace=namespace)
    name = run_name or f"{source.name} {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M:%S} UTC"
    run = client.run_pipeline(
        experiment_id=chosen_experiment.experiment_id, job_name=name, pipeline_package_path=source.package_path,
        params=typed, pipeline_id=source.pipeline_id, version_id=source.version_id, pipeline_root=pipeline_root,
        enable_caching=enable_caching, service_account=service_account)
    return SubmittedRun(run.run_id, name, chosen_experiment.experiment_id, experiment, source.label, typed)


def wait_for_run(client: kfp.Client, run_id: str, timeout_s: float, poll_s: float = 10.0) -> Any:
    """Poll a run until it ends or ``timeout_s`` passes (OperationError); return the final run."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = client.get_run(run_id)
        if str(run.state).upper() in _TERMINAL_STATES:
            return run
        if time.monotonic() >= deadline:
            raise OperationError(f"run {run_id} is still {run.state} after {timeout_s:.0f} s; follow it in the "
                                 "Kubeflow UI or wait longer with a larger --wait")
        time.sleep(poll_s)


@dataclasses.dataclass(frozen=True)
class ScheduledRun:
    recurring_run_id: str
    name: str
    experiment_id: str
    experiment_name: str
    cron: str
    max_concurrency: int
    catchup: bool
    enabled: bool
    source: str
    parameters: dict[str, Any]


def schedule_run(client: kfp.Client, parameters: Mapping[str, Any], *, cron: str, name: str | None = None,
                 max_concurrency: int = 1, catchup: bool = False, enabled: bool = True,
                 experiment: str = DEFAULT_EXPERIMENT, pipeline_name: str | None = None,
                 version_name: str | None = None, package_path: str | None = None, namespace: str | None = None,
                 pipeline_root: str | None = None, service_account: str | None = None,
                 enable_caching: bool | None = None, pipeline: Any = None) -> ScheduledRun:
    """Create a recurring run on a cron schedule (6 fields, seconds first).

    Catch-up is off by default: after a pause only the latest missed run starts, not one per missed
    slot, which for a training pipeline would start a burst of identical GPU jobs. An uploaded
    pipeline's version is resolved now, so the schedule stays on that version until replaced.
    """
    _check_source_arguments(pipeline_name, version_name, package_path)
    cron = check_cron(cron)
    check_max_concurrency(max_concurrency)
    typed, source = _checked_source(client, parameters, pipeline, pipeline_name, version_name, package_path,
                                    namespace)
    chosen_experiment = client.create_experiment(name=experiment, namespace=namespace)
    name = name or f"{source.name} ({cron})"
    recurring = client.create_recurring_run(
        experiment_id=chosen_experiment.experiment_id, job_name=name, description=f"imgclf schedule of {source.label}",
        cron_expression=cron, max_concurrency=max_concurrency, no_catchup=not catchup, params=typed,
        pipeline_package_path=source.package_path, pipeline_id=source.pipeline_id, version_id=source.version_id,
        enabled=enabled, pipeline_root=pipeline_root, enable_caching=enable_caching,
        service_account=service_account)
    return ScheduledRun(recurring.recurring_run_id, name, chosen_experiment.experiment_id, experiment, cron,
                        max_concurrency, catchup, enabled, source.label, typed)


# --- Command line ------------------------------------------------------------------------------------------


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the upload, submit and schedule commands on the ``imgclf`` sub-command parsers."""
    cmd = commands.add_parser("upload", help="upload the compiled pipeline, or a new version of it, to Kubeflow")
    cmd.add_argument("--package", default=None,
                     help="compiled pipeline YAML (default: the committed pipelines/image_classification.yaml)")
    cmd.add_argument("--tuning", action="store_true",
                     help="upload the committed tuning pipeline, pipelines/image_classification_tuning.yaml")
    cmd.add_argument("--pipeline-name", help="name in the Kubeflow UI (default: the name compiled into the package)")
    cmd.add_argument("--version-name", help="name of the new version when the pipeline exists "
                                            "(default: v<UTC time>-<first 8 hex digits of the package's sha256>)")
    cmd.add_argument("--description", help="pipeline description (first upload) or version description")
    _add_connection_arguments(cmd)
    cmd.set_defaults(func=_cmd_upload)

    cmd = commands.add_parser("submit", help="start a run on Kubeflow, from an uploaded pipeline or a package file")
    _add_run_arguments(cmd)
    cmd.add_argument("--run-name", help="name of the run in the UI (default: pipeline name and UTC time)")
    cmd.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                     help="wait up to SECONDS for the run to end; exit 0 only if it succeeded")
    cmd.set_defaults(func=_cmd_submit)

    cmd = commands.add_parser("schedule", help="create a recurring run on Kubeflow (cron schedule)")
    _add_run_arguments(cmd)
    cmd.add_argument("--cron", required=True,
                     help="6 fields, seconds first: '0 0 2 * * *' is 02:00 every day (UTC by default in KFP); "
                          "or @daily, @hourly, '@every 6h'")
    cmd.add_argument("--name", help="name of the recurring run in the UI (default: pipeline name and cron)")
    cmd.add_argument("--max-concurrency", type=int, default=1, help="runs of this schedule allowed at once (1-10)")
    cmd.add_argument("--catchup", action="store_true",
                     help="after a pause, start one run per missed slot (default: only the latest)")
    cmd.add_argument("--disabled", action="store_true", help="create the schedule paused; enable it in the UI")
    cmd.set_defaults(func=_cmd_schedule)


def _add_connection_arguments(cmd: argparse.ArgumentParser) -> None:
    group = cmd.add_argument_group("Kubeflow Pipelines API")
    group.add_argument("--host", help="API address, e.g. http://localhost:8888 (kubectl -n kubeflow port-forward "
                                      f"svc/ml-pipeline 8888:8888) or https://kubeflow.example.com/pipeline; "
                                      f"default: ${HOST_ENV}")
    group.add_argument("--namespace", help="Kubeflow profile namespace in multi-user deployments; "
                                           "leave out for standalone Kubeflow Pipelines")
    group.add_argument("--existing-token", metavar="TOKEN",
                       help=f"bearer token for the API; ${TOKEN_ENV} does the same and stays out of the process list")


def _add_run_arguments(cmd: argparse.ArgumentParser) -> None:
    source = cmd.add_argument_group("what to run (default: the committed compiled pipeline, sent with the run)")
    choice = source.add_mutually_exclusive_group()
    choice.add_argument("--pipeline", help="name of an uploaded pipeline")
    choice.add_argument("--package", help="compiled pipeline YAML sent with the run")
    source.add_argument("--tuning", action="store_true",
                        help="a run of the tuning pipeline: its parameters are checked (ranges included) and, "
                             "without --pipeline or --package, the committed image_classification_tuning.yaml "
                             "is sent; implied by --pipeline/--package naming image-classification-tuning")
    source.add_argument("--version", help="version of --pipeline (default: its newest)")
    params = cmd.add_argument_group("parameters (data_uri is required)")
    params.add_argument("--params", action="append", default=[], metavar="FILE",
                        help="YAML or JSON file of pipeline parameters: hyperparameters (SageMaker's "
                             "hyperparameters.json works as it is) and data_uri, accelerator_count, ...; "
                             "may be repeated, later files win")
    params.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE",
                        help="one parameter, e.g. --set data_uri=gs://bucket/images; wins over --params")
    run = cmd.add_argument_group("run options")
    run.add_argument("--experiment", default=DEFAULT_EXPERIMENT,
                     help="experiment to file the run under; created when missing (default: %(default)s)")
    run.add_argument("--pipeline-root", help="where the run's artifacts go (default: the cluster's, e.g. "
                                             "minio://mlpipeline/v2/artifacts)")
    run.add_argument("--service-account", help="Kubernetes service account of the run's pods")
    run.add_argument("--disable-caching", action="store_true",
                     help="run every step even when an identical earlier step could be reused")
    _add_connection_arguments(cmd)


def _check_version_argument(args: argparse.Namespace) -> None:
    if args.version and not args.pipeline:
        raise ParameterError([f"--version {args.version!r}: needs --pipeline NAME, the uploaded pipeline it "
                              "belongs to"])


def _client_from_args(args: argparse.Namespace) -> tuple[kfp.Client, str]:
    host = args.host or os.environ.get(HOST_ENV)
    if not host:
        raise OperationError(f"no KFP API address: pass --host (e.g. http://localhost:8888) or set {HOST_ENV}")
    with api_errors(host):
        client = connect(host, namespace=args.namespace,
                         existing_token=args.existing_token or os.environ.get(TOKEN_ENV))
    return client, host


def _chosen_pipeline(args: argparse.Namespace) -> Any:
    """The pipeline a submit or schedule runs, for checking its parameters; reads a given package's name."""
    from pipelines.tuning import image_classification_tuning

    if args.tuning:
        if args.package is None and args.pipeline is None:
            args.package = COMPILED_TUNING_PIPELINE
        return image_classification_tuning
    if args.pipeline:
        return pipeline_for(args.pipeline)
    return pipeline_for(_read_package(args.package).name) if args.package else image_classification


def _package_spec(args: argparse.Namespace) -> dict[str, Any] | None:
    """The PipelineSpec of the package a submit or schedule sends (None for an uploaded pipeline: not read yet)."""
    return None if args.pipeline else _read_package(args.package or COMPILED_PIPELINE).spec


def _run_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"experiment": args.experiment, "pipeline_name": args.pipeline, "version_name": args.version,
            "package_path": args.package, "namespace": args.namespace, "pipeline_root": args.pipeline_root,
            "service_account": args.service_account, "enable_caching": False if args.disable_caching else None}


def _changed(parameters: Mapping[str, Any], pipeline: Any = None) -> str:
    defaults = pipeline_defaults(pipeline)
    changed = {k: v for k, v in parameters.items() if k not in defaults or defaults[k] != v}
    return ", ".join(f"{k}={v!r}" for k, v in changed.items()) or "all defaults"


def _cmd_upload(args: argparse.Namespace) -> int:
    client, host = _client_from_args(args)
    package = args.package or (COMPILED_TUNING_PIPELINE if args.tuning else COMPILED_PIPELINE)
    with api_errors(host):
        result = upload_pipeline(client, package, pipeline_name=args.pipeline_name,
                                 version_name=args.version_name, description=args.description,
                                 namespace=args.namespace)
    what = "created with its first version" if result.created_pipeline else "exists; uploaded a new version"
    print(f"pipeline {result.pipeline_name!r} (id {result.pipeline_id}) {what}: "
          f"{result.version_name!r} (id {result.version_id})")
    print(f"start a run with: imgclf submit --pipeline {result.pipeline_name} --version {result.version_name} "
          "--set data_uri=...")
    return 0


def _cmd_submit(args: argparse.Namespace) -> int:
    _check_version_argument(args)
    # Checked before connecting, so a typo costs no request to the cluster.
    pipeline = _chosen_pipeline(args)
    # The values as given: submit_run checks them again, and a search must know which were set explicitly.
    parameters = load_parameters(args.params, args.assignments)
    pipeline_parameters(parameters, pipeline, package=_package_spec(args))
    client, host = _client_from_args(args)
    with api_errors(host):
        run = submit_run(client, parameters, run_name=args.run_name, pipeline=pipeline, **_run_options(args))
    print(f"run {run.run_name!r} (id {run.run_id}) submitted in experiment {run.experiment_name!r} "
          f"(id {run.experiment_id})")
    print(f"  from: {run.source}")
    print(f"  parameters other than the defaults: {_changed(run.parameters, pipeline)}")
    if args.wait <= 0:
        return 0
    with api_errors(host):
        final = wait_for_run(client, run.run_id, args.wait)
    print(f"run {run.run_id} ended: {final.state}")
    if str(final.state).upper() != "SUCCEEDED":
        error = getattr(final.error, "message", None) if final.error else None
        print(f"error: run {run.run_id} did not succeed{f': {error}' if error else ''}; see the failed step's "
              "logs in the Kubeflow UI", file=sys.stderr)
        return 1
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    _check_version_argument(args)
    cron = check_cron(args.cron)
    check_max_concurrency(args.max_concurrency)
    pipeline = _chosen_pipeline(args)
    parameters = load_parameters(args.params, args.assignments)
    pipeline_parameters(parameters, pipeline, package=_package_spec(args))
    client, host = _client_from_args(args)
    with api_errors(host):
        scheduled = schedule_run(client, parameters, cron=cron, name=args.name,
                                 max_concurrency=args.max_concurrency, catchup=args.catchup,
                                 enabled=not args.disabled, pipeline=pipeline, **_run_options(args))
    print(f"recurring run {scheduled.name!r} (id {scheduled.recurring_run_id}) created in experiment "
          f"{scheduled.experiment_name!r} (id {scheduled.experiment_id})")
    print(f"  cron {scheduled.cron!r}, at most {scheduled.max_concurrency} at once, "
          f"{'catch-up' if scheduled.catchup else 'no catch-up'}, {'enabled' if scheduled.enabled else 'disabled'}")
    print(f"  from: {scheduled.source}")
    print(f"  parameters other than the defaults: {_changed(scheduled.parameters, pipeline)}")
    return 0
