"""Compile-time settings that fit the pipeline to a cluster: GPU nodes, credentials, shared memory, sizes."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from kfp import dsl, kubernetes

from pipelines import backends

STEPS = ("look", "validate", "convert", "train", "evaluate", "bless", "push", "batch_predict", "deploy")

# Requests sized for one GPU node; override per step with --resources.
DEFAULT_RESOURCES: dict[str, tuple[str, str]] = {
    "look": ("1", "2G"),
    "validate": ("2", "4G"),
    "convert": ("4", "8G"),
    "train": ("8", "32G"),
    "evaluate": ("2", "8G"),
    "bless": ("2", "8G"),
    "push": ("1", "2G"),
    "batch_predict": ("4", "8G"),
    "deploy": ("0.5", "1G"),
}

# The extended resource GPU nodes advertise (NVIDIA's device plugin).
ACCELERATOR_TYPE = "nvidia.com/gpu"
# The run form's GPU count when nothing is given: a string, because the driver reads the count as text.
DEFAULT_GPU_COUNT = "1"

GCS_KEY_MOUNT = "/var/secrets/google"
GCS_KEY_FILE = "key.json"


@dataclasses.dataclass(frozen=True)
class Toleration:
    key: str
    effect: str = "NoSchedule"
    value: str = ""

    @classmethod
    def parse(cls, text: str) -> Toleration:
        """KEY[=VALUE]:EFFECT, the way kubectl taint writes a taint."""
        match = re.fullmatch(r"([\w./-]+)(?:=([\w./-]*))?:(NoSchedule|PreferNoSchedule|NoExecute)", text)
        if not match:
            raise ValueError(f"toleration {text!r}: expected KEY[=VALUE]:EFFECT with EFFECT NoSchedule, "
                             "PreferNoSchedule or NoExecute, e.g. nvidia.com/gpu:NoSchedule")
        return cls(key=match.group(1), value=match.group(2) or "", effect=match.group(3))


@dataclasses.dataclass(frozen=True)
class ClusterSettings:
    """How the compiled pipeline asks Kubernetes for nodes, credentials and memory.

    Credentials never travel as pipeline parameters: either the run's service account carries
    them (GKE Workload Identity: `imgclf submit --service-account`), or ``gcs_secret`` names a
    Kubernetes secret holding a service-account key file ``key.json`` that every step mounts.
    """

    # Labels a GPU node must carry, e.g. {"cloud.google.com/gke-accelerator": "nvidia-l4"}.
    gpu_node_selector: tuple[tuple[str, str], ...] = ()
    # GPU nodes are usually tainted so that only GPU work lands there (GKE and the NVIDIA operator
    # use nvidia.com/gpu); the training step tolerates that taint.
    gpu_tolerations: tuple[Toleration, ...] = (Toleration("nvidia.com/gpu"),)
    gcs_secret: str = ""
    # Kubernetes gives a pod 64 MiB of /dev/shm; NCCL across GPUs and tf.data need far more.
    shm_size: str = "16Gi"
    resources: tuple[tuple[str, str, str], ...] = tuple((step, *sizes) for step, sizes in DEFAULT_RESOURCES.items())
    env: tuple[tuple[str, str], ...] = ()
    # The oldest KFP backend the YAML must run on (pipelines/backends.py says what each one reads).
    backend: backends.Backend = backends.BACKENDS[backends.DEFAULT_BACKEND]
    # The GPUs of the training step (and each tuning lane) where the backend cannot read the run form's count.
    fixed_gpus: int = backends.DEFAULT_FIXED_GPUS

    def apply(self, task: dsl.PipelineTask, step: str, display_name: str = "") -> dsl.PipelineTask:
        """Fit ``task`` to the cluster; ``display_name`` is shown where the backend resolves renamed tasks."""
        if display_name and self.backend.display_names:
            task.set_display_name(display_name)
        sizes = {name: (cpu, memory) for name, cpu, memory in self.resources}
        cpu, memory = sizes[step]
        task.set_cpu_request(cpu).set_memory_request(memory)
        for name, value in self.env:
            task.set_env_variable(name, value)
        if self.gcs_secret:
            kubernetes.use_secret_as_volume(task, secret_name=self.gcs_secret, mount_path=GCS_KEY_MOUNT)
            task.set_env_variable("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_MOUNT}/{GCS_KEY_FILE}")
        if step == "train":
            for key, value in self.gpu_node_selector:
                kubernetes.add_node_selector(task, label_key=key, label_value=value)
            for toleration in self.gpu_tolerations:
                kubernetes.add_toleration(task, key=toleration.key, value=toleration.value or None,
                                          operator="Equal" if toleration.value else "Exists",
                                          effect=toleration.effect)
            if self.shm_size and self.backend.empty_dir_mounts:
                kubernetes.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                           size_limit=self.shm_size)
        return task

    @property
    def gpu_count_default(self) -> str:
        """The default of the accelerator_count parameter: the fixed count where the form's is not read."""
        return DEFAULT_GPU_COUNT if self.backend.gpu_count_from_form else str(self.fixed_gpus)

    def request_gpus(self, task: dsl.PipelineTask, form_count: Any) -> dsl.PipelineTask:
        """Ask for ``form_count`` GPUs (the string parameter) where the backend reads it, else ``fixed_gpus``.

        From 2.4.0 the driver sets the ``nvidia.com/gpu`` limit to the form's value ("0" gives a zero
        limit: no GPU); 2.2.0 reads only a count fixed here, and 0 then asks for no accelerator at all.
        """
        if self.backend.gpu_count_from_form:
            task.set_accelerator_type(ACCELERATOR_TYPE).set_accelerator_limit(form_count)
        elif self.fixed_gpus:
            task.set_accelerator_type(ACCELERATOR_TYPE).set_accelerator_limit(self.fixed_gpus)
        return task

    @classmethod
    def from_options(cls, *, node_selector: list[str] = (), tolerations: list[str] | None = None,
                     gcs_secret: str = "", shm_size: str | None = None, resources: list[str] = (),
                     env: list[str] = (), min_backend: str = backends.DEFAULT_BACKEND,
                     gpus: int | None = None) -> ClusterSettings:
        """Build from command-line strings; ValueError names the option and the bad value."""
        sizes = dict(DEFAULT_RESOURCES)
        for item in resources:
            step, _, value = item.partition("=")
            cpu, _, memory = value.partition(",")
            if step not in STEPS or not cpu or not memory:
                raise ValueError(f"--resources {item!r}: expected STEP=CPU,MEMORY with STEP one of "
                                 f"{', '.join(STEPS)}, e.g. train=16,64G")
            sizes[step] = (cpu, memory)
        target = backends.backend(min_backend)
        if gpus is not None and target.gpu_count_from_form:
            raise ValueError(f"--gpus {gpus}: backend {target.version} takes the GPU count from the run form "
                             "(accelerator_count); --gpus is for --min-backend 2.2.0, which cannot read it")
        if gpus is not None and gpus < 0:
            raise ValueError(f"--gpus {gpus}: expected 0 (CPU only) or a number of GPUs")
        if shm_size and not target.empty_dir_mounts:
            raise ValueError(f"--shm-size {shm_size}: backend {target.version} cannot mount /dev/shm (its driver "
                             "refuses emptyDirMounts); use --min-backend 2.4.1 or newer for a larger /dev/shm")
        settings = cls(
            backend=target, fixed_gpus=backends.DEFAULT_FIXED_GPUS if gpus is None else gpus,
            gpu_node_selector=tuple(_pair(item, "--gpu-node-selector") for item in node_selector),
            gcs_secret=gcs_secret,
            resources=tuple((step, *value) for step, value in sizes.items()),
            env=tuple(_pair(item, "--env") for item in env),
        )
        if tolerations is not None:
            settings = dataclasses.replace(settings, gpu_tolerations=tuple(Toleration.parse(t) for t in tolerations))
        if shm_size is not None:
            settings = dataclasses.replace(settings, shm_size=shm_size)
        return settings


def _pair(item: str, option: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"{option} {item!r}: expected NAME=VALUE")
    return key, value
