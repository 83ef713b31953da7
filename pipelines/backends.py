"""The open-source KFP backends a compiled pipeline can target, and what each one reads of it.

One YAML cannot serve every backend our users run, so the oldest backend is a compile-time choice
(``imgclf compile --min-backend``). Each fact below was read in kubeflow/pipelines at the release tag
named (and the ``api``/``kubernetes_platform`` module versions its ``go.mod`` pins); the conformance
tier (``tests/conformance``) encodes the same facts per release and checks the compiled YAMLs:

- GPU count from the run form: ``backend/src/v2/driver/driver.go`` ``initPodSpecPatch`` reads
  ``accelerator.resourceCount`` (resolved by ``resolvePodSpecInputRuntimeParameter`` with
  ``GetStringValue()``, so the pipeline parameter must be a string) from 2.4.0; up to 2.3.0 only the
  numeric ``accelerator.count``, which the SDK fills only for a constant. Worse, the 2.2.0 driver
  parses each task's container spec strictly (``backend/src/v2/cmd/driver/main.go``,
  ``jsonpb.UnmarshalString``) with ``api`` pinned at 58ce09e (kfp-pipeline-spec 0.2.2), which has none
  of the string resource fields (``resourceCount``, ``resourceCpuRequest``, ...): every task carrying
  them fails before its pod starts. So for 2.2.0 the GPU count is fixed when compiling (``--gpus``).
- Unknown fields: the driver refuses a field of a task's container spec or Kubernetes config that its
  protos do not know up to 2.4.0 (``jsonpb.UnmarshalString``); from 2.4.1 it ignores it
  (``util.UnmarshalString``, ``backend/src/common/util/json.go``: ``AllowUnknownFields: true``, kfp #11662),
  so the task runs without that setting. The API server refuses an unknown field of the PipelineSpec
  itself at every release (protojson, ``backend/src/apiserver/template/v2_template.go``); the executors
  and the Kubernetes config are free-form there.
- Display names: up to 2.5.0 the driver records a task under ``taskInfo.name`` but looks producers up
  by task key (``driver.go``: ``ecfg.TaskName = opts.Task.GetTaskInfo().GetName()``; kfp #11173), so
  a consumer of a renamed task fails; fixed in 2.14.0. Below 2.14.0 no task gets a display name (the
  task keys, e.g. ``look-at-data``, are what the UI shows).
- ``/dev/shm``: ``emptyDirMounts`` is not in kfp-kubernetes 1.2.0, the ``kubernetes_platform`` 2.2.0
  pins, and its driver refuses it; it is from 2.4.x (1.3.0).
- A secret volume's ``secretNameParameter``: from 2.5.0 (kfp-kubernetes 1.5.0); the 2.2.0 driver refuses
  it and 2.4.1's ignores it, so below 2.5.0 it is dropped (``secretName`` says the same thing as a constant).
- ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``: resolved by the driver from 2.5.0 (``driver.go``, the
  ``{{$.pipeline_job_uuid}}`` case); older ones pass the literal text, so the tuning study is named
  by the setup step instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from kfp.pipeline_spec import pipeline_spec_pb2


@dataclasses.dataclass(frozen=True)
class Backend:
    """What the oldest backend a YAML is compiled for reads of it."""

    version: str
    kubeflow: str
    gpu_count_from_form: bool
    string_resources: bool
    display_names: bool
    empty_dir_mounts: bool
    secret_name_parameter: bool
    pipeline_job_id: bool


BACKENDS = {
    "2.2.0": Backend("2.2.0", "1.9", gpu_count_from_form=False, string_resources=False, display_names=False,
                     empty_dir_mounts=False, secret_name_parameter=False, pipeline_job_id=False),
    "2.4.1": Backend("2.4.1", "1.10.0", gpu_count_from_form=True, string_resources=True, display_names=False,
                     empty_dir_mounts=True, secret_name_parameter=False, pipeline_job_id=False),
    "2.5.0": Backend("2.5.0", "1.10.2", gpu_count_from_form=True, string_resources=True, display_names=False,
                     empty_dir_mounts=True, secret_name_parameter=True, pipeline_job_id=True),
    "2.14.0": Backend("2.14.0", "1.11 (2.15.0)", gpu_count_from_form=True, string_resources=True,
                      display_names=True, empty_dir_mounts=True, secret_name_parameter=True, pipeline_job_id=True),
}
# What the committed YAMLs target: the oldest backend that takes the GPU count from the run form.
DEFAULT_BACKEND = "2.4.1"
# The GPUs a 2.2.0 YAML asks for (that backend cannot read the run form's count).
DEFAULT_FIXED_GPUS = 1

# The string twins of the numeric resource fields (kfp-pipeline-spec 0.3.0 on); 2.2.0's driver refuses them.
_STRING_RESOURCE_FIELDS = ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest", "resourceMemoryLimit")


def backend(version: str) -> Backend:
    """The target named ``version``; ValueError lists the ones there are."""
    try:
        return BACKENDS[version]
    except KeyError:
        raise ValueError(f"--min-backend {version!r}: expected one of {', '.join(BACKENDS)} (the oldest KFP "
                         "backend the YAML must run on; see the README's supported backends)") from None


def parse_gpu_count(text: str, name: str = "accelerator_count") -> int:
    """A GPU count as the run form gives it (a string of digits); ValueError says what was wrong."""
    stripped = str(text).strip()
    if not stripped.isdigit():
        raise ValueError(f"{name}: got {text!r}, expected a whole number of GPUs such as '1' ('0' runs on "
                         "CPUs); the backend reads it as text")
    return int(stripped)


def fixed_gpu_count(pipeline_spec: Mapping[str, Any]) -> int | None:
    """The GPUs a compiled pipeline gives its GPU steps whatever the run form's ``accelerator_count`` says, or
    None when the form's count reaches the pod.

    A YAML compiled for 2.2.0 (``--gpus N``) carries only the numeric ``accelerator.count`` (none at all for
    ``--gpus 0``), without the ``resourceCount`` placeholder that drivers from 2.4.0 read: every backend then
    gives the pod N GPUs. ``pipeline_spec`` is the PipelineSpec document, or the API server's
    ``{"pipeline_spec", "platform_spec"}`` of an uploaded version.
    """
    spec = pipeline_spec.get("pipeline_spec", pipeline_spec)
    executors = (spec.get("deploymentSpec") or {}).get("executors") or {}
    accelerators = [((executor.get("container") or {}).get("resources") or {}).get("accelerator")
                    for executor in executors.values()]
    accelerators = [accelerator for accelerator in accelerators if accelerator]
    if any(accelerator.get("resourceCount") for accelerator in accelerators):
        return None
    return max((int(accelerator.get("count") or 0) for accelerator in accelerators), default=0)


def check_gpu_count(pipeline_spec: Mapping[str, Any], accelerator_count: str) -> None:
    """ValueError when the run form asks for another GPU count than the one ``pipeline_spec`` fixes."""
    fixed = fixed_gpu_count(pipeline_spec)
    wanted = parse_gpu_count(accelerator_count)
    if fixed is not None and wanted != fixed:
        raise ValueError(f"accelerator_count: got {accelerator_count!r}, but this package was compiled for KFP 2.2.0 "
                         f"with {fixed} GPU(s) fixed, which its pods get whatever the form says; recompile with "
                         f"--gpus {wanted} (imgclf compile --min-backend 2.2.0 --gpus {wanted}), or leave "
                         f"accelerator_count at {fixed!r}")


def fit_to_backend(spec: pipeline_spec_pb2.PipelineSpec, platform: pipeline_spec_pb2.PlatformSpec,
                   target: Backend) -> None:
    """Remove, in place, what the SDK always writes but ``target``'s driver refuses (2.2.0) or ignores (2.4.1).

    Only fields whose meaning survives elsewhere go: the string resource twins of the numeric ones, and a
    secret volume's ``secretNameParameter`` beside its ``secretName``.
    """
    if not target.string_resources:
        for executor in spec.deployment_spec.fields["executors"].struct_value.fields.values():
            container = executor.struct_value.fields.get("container")
            resources = container.struct_value.fields.get("resources") if container else None
            if resources is None:
                continue
            for field in _STRING_RESOURCE_FIELDS:
                resources.struct_value.fields.pop(field, None)
            accelerator = resources.struct_value.fields.get("accelerator")
            if accelerator is not None:
                accelerator.struct_value.fields.pop("resourceType", None)
                accelerator.struct_value.fields.pop("resourceCount", None)
    if not target.secret_name_parameter and "kubernetes" in platform.platforms:
        for config in platform.platforms["kubernetes"].deployment_spec.executors.values():
            if "secretAsVolume" in config.fields:
                for volume in config.fields["secretAsVolume"].list_value.values:
                    volume.struct_value.fields.pop("secretNameParameter", None)
