"""Runs the compiled pipeline on this machine through kfp.local and writes summary.json."""

from __future__ import annotations

import collections
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

from pipelines.compiler import compile_pipeline
from trainer import layout, storage
from trainer.hyperparameters import Hyperparameters

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
# The last line of a Python traceback: "package.module.SomeError: message".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Rejected): .+")


class _LogTail:
    """Passes the steps' logs through to the terminal and keeps the last lines.

    kfp.local runs the steps one after another and stops at the first failure, so the last
    exception printed belongs to the step that failed.
    """

    def __init__(self, stream, keep: int = 400):
        self._stream = stream
        self._partial = ""
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        self.lines.extend(_ANSI.sub("", line).strip() for line in complete)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def last_error(self) -> str | None:
        return next((line for line in reversed(self.lines) if _EXCEPTION_LINE.match(line)), None)


CONTAINER_USER = "1000"


def _docker_runner(data_uri: str, pipeline_root: str) -> local.DockerRunner:
    """Run each step in the project's image as a non-root user, without a network.

    The data folder is mounted read-only at the same path. The pipeline root is bind-mounted by
    kfp.local and must be writable by the container's user. A gs:// data set needs the network:
    the host's, so that a GCS emulator on loopback (STORAGE_EMULATOR_HOST) is reachable too.
    """
    import docker.types

    os.chmod(pipeline_root, 0o777)
    options: dict[str, Any] = {"user": CONTAINER_USER, "network_mode": "none"}
    if storage.is_gcs(data_uri):
        options["network_mode"] = "host"
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            options["environment"] = {"STORAGE_EMULATOR_HOST": os.environ["STORAGE_EMULATOR_HOST"]}
    else:
        options["mounts"] = [docker.types.Mount(target=data_uri, source=data_uri, type="bind", read_only=True)]
    return local.DockerRunner(**options)


class _CacheHits(logging.Handler):
    """Notes the steps kfp.local takes from its cache; it says so at INFO on the root logger, which is
    otherwise quiet. Warnings and errors still reach stderr, as they would without this handler."""

    _HIT = re.compile(r"^Task ([\w-]+) cache hit")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.reused: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        hit = self._HIT.match(message)
        if hit:
            self.reused.append(hit.group(1))
            print(f"step {hit.group(1)}: reused from the cache", flush=True)
        elif record.levelno >= logging.WARNING:
            print(f"{record.levelname}: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _noting_cache_hits() -> Iterator[_CacheHits]:
    root = logging.getLogger()
    handler, level = _CacheHits(), root.level
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def run_local(data_uri: str, output_dir: str, hp: Hyperparameters, *, runner: str = "subprocess",
              image: str | None = None, pipeline_args: dict[str, Any] | None = None,
              cache_dir: str | None = None, pipeline_file: str | None = None) -> dict[str, Any]:
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
    arguments = {"data_uri": data_uri, **hp.to_dict(), "accelerator_count": 0, **(pipeline_args or {})}
    summary: dict[str, Any] = {"data_uri": data_uri, "hyperparameters": hp.to_dict(), "cache_dir": cache_dir}
    earlier_runs = set(os.listdir(pipeline_root))
    task, hits = execute(pipeline, arguments, summary)
    if task is not None:
        summary.update(_describe_outputs(task.outputs))
    summary.update(steps_run=_steps_run(pipeline_root, earlier_runs), steps_reused=hits)
    with open(os.path.join(output_dir, "summary.json"), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def execute(pipeline: Any, arguments: dict[str, Any], summary: dict[str, Any]) -> tuple[Any, list[str]]:
    """Run a loaded pipeline under the kfp.local settings already made (``local.init``).

    Records in ``summary`` the status, the seconds and, on failure, the failed step and its reason
    (the last error line of the step's log). Returns the pipeline task (None when a step failed) and
    the steps kfp.local took from its cache.
    """
    # Steps run in child processes that inherit the environment; keep TensorFlow's start-up noise down.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tail = _LogTail(sys.stdout)
    started = time.monotonic()
    task = None
    try:
        with contextlib.redirect_stdout(tail), warnings.catch_warnings(), _noting_cache_hits() as hits:
            # kfp.local warns that GPU and resource requests are ignored here, and that our image name has
            # no "python" in it; both are expected on a laptop.
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            task = pipeline(**arguments)
    except RuntimeError as err:
        message = _ANSI.sub("", str(err))
        failed = re.search(r"Inner task failed: '([\w-]+)'", message)
        summary.update(status="failed", failed_step=failed.group(1) if failed else "unknown",
                       error=tail.last_error() or message)
    else:
        summary["status"] = "succeeded"
    summary["pipeline_seconds"] = round(time.monotonic() - started, 1)
    return task, sorted(hits.reused)


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
