"""Runs the compiled pipeline on this machine through kfp.local and writes summary.json."""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from kfp import components, local

from pipelines import run_page
from pipelines.compiler import compile_pipeline
from pipelines.local_console import TAIL_LINES, StepConsole
from trainer import layout, storage
from trainer.hyperparameters import Hyperparameters

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


CONTAINER_USER = "1000"


def _run_container(client: Any, image: str, command: list[str], volumes: dict[str, Any],
                   **container_run_args: Any) -> int:
    """Run one step's container, print its output, and return its real exit code; then remove it."""
    container = client.containers.run(image=image, command=command, detach=True, stdout=True, stderr=True,
                                      volumes=volumes, **container_run_args)
    try:
        for line in container.logs(stream=True):
            print(line.decode(errors="replace"), end="")
        return container.wait()["StatusCode"]
    finally:
        container.remove(force=True)


def _docker_runner(data_uri: str, pipeline_root: str) -> local.DockerRunner:
    """Run each step in the project's image as a non-root user, without a network.

    The data folder is mounted read-only at the same path. The pipeline root is bind-mounted by
    kfp.local and must be writable by the container's user. A gs:// data set needs the network:
    the host's, so that a GCS emulator on loopback (STORAGE_EMULATOR_HOST) is reachable too.
    """
    import docker.types
    from kfp.local import docker_task_handler

    # kfp.local's own run_docker_container starts the container with auto_remove and, when the container is
    # already gone by the time it asks for the exit code (a fast failure while the logs are still being
    # read), assumes success: a failed step then "succeeds" with no outputs. Ours keeps the container until
    # its exit code is read.
    docker_task_handler.run_docker_container = _run_container
    os.chmod(pipeline_root, 0o777)
    options: dict[str, Any] = {"user": CONTAINER_USER, "network_mode": "none"}
    if storage.is_gcs(data_uri):
        options["network_mode"] = "host"
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            options["environment"] = {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    else:
        options["mounts"] = [docker.types.Mount(target=data_uri, source=data_uri, type="bind", read_only=True)]
    return local.DockerRunner(**options)


@contextlib.contextmanager
def _console(console: StepConsole) -> Iterator[None]:
    """During the run, sys.stdout and the root logger go to ``console``; both are restored after.

    kfp.local's warnings that GPU and resource requests are ignored here, and that our image name has
    no "python" in it, are expected on a laptop and silenced.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    # kfp.local swaps builtins.print for an indenting one around each task, which parallel tasks can
    # leave behind (one thread restores what another had swapped in).
    original_print = builtins.print
    root.handlers = [console.handler()]
    root.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(console), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        console.close_steps()
        root.handlers = handlers
        root.setLevel(level)
        builtins.print = original_print


def run_local(data_uri: str, output_dir: str, hp: Hyperparameters, *, runner: str = "subprocess",
              image: str | None = None, pipeline_args: dict[str, Any] | None = None,
              cache_dir: str | None = None, pipeline_file: str | None = None,
              verbose: bool = False) -> dict[str, Any]:
    """Compile the pipeline, run it with kfp.local, and return (and write) the run summary.

    ``runner`` is "subprocess" (steps run as processes of this Python environment) or "docker"
    (steps run in the component image, ``image`` or the project's own). ``cache_dir`` turns on
    kfp.local's cache, kept in that folder: a step whose component, image and inputs (values, and
    artifacts by URI and metadata) match an earlier run's is not run again, and its outputs are the
    earlier run's (as long as their files still exist). ``pipeline_file`` runs an already compiled
    pipeline instead of compiling one (``image`` is then ignored).
    """
    output_dir = os.path.abspath(output_dir)
    pipeline_root = os.path.join(output_dir, "artifacts")
    os.makedirs(pipeline_root, exist_ok=True)
    if not storage.is_gcs(data_uri):
        data_uri = os.path.abspath(data_uri)
    pipeline_yaml = pipeline_file or compile_pipeline(os.path.join(output_dir, "pipeline.yaml"), image=image)
    pipeline = components.load_component_from_file(pipeline_yaml)

    caching: dict[str, Any] = {}
    if cache_dir:
        cache_dir = os.path.abspath(cache_dir)
        caching = {"enable_caching": True, "cache_root": cache_dir}
    if runner == "subprocess":
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root, **caching)
    elif runner == "docker":
        local.init(runner=_docker_runner(data_uri, pipeline_root), pipeline_root=pipeline_root, **caching)
    else:
        raise ValueError(f"unknown runner {runner!r}; use 'subprocess' or 'docker'")
    arguments = {"data_uri": data_uri, **hp.to_dict(), "accelerator_count": "0", **(pipeline_args or {})}
    summary: dict[str, Any] = {"data_uri": data_uri, "hyperparameters": hp.to_dict(), "cache_dir": cache_dir}
    earlier_runs = set(os.listdir(pipeline_root))
    spec = run_page.load_spec(pipeline_yaml)
    task, hits = execute(pipeline, arguments, summary, spec=spec, output_dir=output_dir, cache_dir=cache_dir,
                         verbose=verbose)
    headline = []
    if task is not None:
        summary.update(_describe_outputs(task.outputs))
        headline = [f"{summary['eval_metric']} = {summary['eval_value']:.4f} on the test split",
                    summary["blessing"],
                    "images: " + ", ".join(f"{split} {count}" for split, count in summary["counts"].items())]
    summary.update(steps_run=_steps_run(pipeline_root, earlier_runs), steps_reused=hits)
    write_run_page(output_dir, spec, summary, arguments, headline)
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def write_run_page(output_dir: str, spec: dict[str, Any], summary: dict[str, Any], arguments: dict[str, Any],
                   headline: list[str]) -> None:
    """Write OUTPUT/index.html and name it in ``summary`` (``run_page``)."""
    if summary["status"] == "failed":
        headline = [*headline, f"failed in step {summary['failed_step']}: {summary['error']}"]
    summary["run_page"] = run_page.write(output_dir, title=f"Run of {spec['pipelineInfo']['name']}", summary=summary,
                                         spec=spec, arguments=arguments, steps=summary["steps"], headline=headline)


def execute(pipeline: Any, arguments: dict[str, Any], summary: dict[str, Any], *, spec: dict[str, Any],
            output_dir: str, cache_dir: str | None = None, verbose: bool = False) -> tuple[Any, list[str]]:
    """Run a loaded pipeline under the kfp.local settings already made (``local.init``), its output
    going through a ``StepConsole`` (a line per step on the terminal, each step's log beside its artifacts).

    Records in ``summary`` the status, the seconds, the steps (``steps``: status, seconds, log) and, on
    failure, the failed step, its reason (the error its log ends with), its log's path (``failed_log``)
    and last lines (``log_tail``). Returns the pipeline task (None when a step failed) and the steps
    kfp.local took from its cache.
    """
    # Steps run in child processes that inherit the environment; keep TensorFlow's start-up noise down.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    planned, groups = run_page.planned_steps(spec)
    console = StepConsole(sys.stdout, verbose=verbose, groups=groups, cache_root=cache_dir,
                          fallback_dir=os.path.join(output_dir, "artifacts"),
                          name_width=max(len(step.name) for step in planned) + 3)
    started = time.monotonic()
    task = None
    try:
        with _console(console):
            task = pipeline(**arguments)
    except RuntimeError as err:
        message = _ANSI.sub("", str(err))
        named = re.search(r"Inner task failed: '([\w-]+)'", message)
        failed = next((step for step in console.steps if step.status == "failed"), None)
        summary.update(status="failed", failed_step=failed.name if failed else (named.group(1) if named else "unknown"),
                       error=(failed.reason() if failed else None) or message,
                       failed_log=failed.log_path if failed else None,
                       log_tail=list(failed.tail)[-TAIL_LINES:] if failed else [])
    else:
        summary["status"] = "succeeded"
    summary["pipeline_seconds"] = round(time.monotonic() - started, 1)
    summary["steps"] = [step.to_dict() for step in console.steps]
    return task, sorted(step.name for step in console.steps if step.status == "reused")


def _steps_run(pipeline_root: str, earlier_runs: set[str]) -> list[str]:
    """The steps this run executed: kfp.local gives each a folder in the run's new folder (a step taken
    from the cache gets none; its outputs stay where the earlier run wrote them)."""
    steps: set[str] = set()
    for run in set(os.listdir(pipeline_root)) - earlier_runs:
        if os.path.isdir(os.path.join(pipeline_root, run)):
            steps.update(name for name in os.listdir(os.path.join(pipeline_root, run))
                         if os.path.isdir(os.path.join(pipeline_root, run, name)))
    return sorted(steps)


def _read_json(*parts: str) -> dict[str, Any]:
    with open(os.path.join(*parts), encoding="utf-8") as handle:
        return json.load(handle)


def _describe_outputs(outputs: dict[str, Any]) -> dict[str, Any]:
    """Pull the figures a person wants first out of the pipeline's output artifacts."""
    manifest = _read_json(outputs["dataset"].path, layout.MANIFEST_FILE)
    validation = _read_json(outputs["validation"].path, layout.VALIDATION_FILE)["counts"]
    evaluation = _read_json(outputs["evaluation"].path, "evaluation.json")
    blessing = _read_json(outputs["blessing"].path, layout.BLESSING_FILE)
    return {
        "blessed": blessing["blessed"],
        "blessing": blessing["reason"],
        "eval_metric": evaluation["eval_metric"],
        "eval_value": evaluation["eval_value"],
        "metrics": evaluation["metrics"],
        "classes": manifest["classes"],
        "counts": {split: info["count"] for split, info in manifest["splits"].items()},
        "listed": validation["listed"],
        "rejected": validation["rejected"],
        "skipped": validation["skipped"],
        "model_path": outputs["model"].path,
        "dataset_path": outputs["dataset"].path,
        "evaluation_path": outputs["evaluation"].path,
    }
