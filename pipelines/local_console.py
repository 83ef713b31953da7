"""What a local run prints: a line as each step starts and ends, its progress lines, warnings and errors.

Everything a step prints goes, whole, to ``log.txt`` in the folder kfp.local gives the step (beside its
artifacts); the terminal gets a line when the step starts and one when it ends, the step's progress
lines (``trainer.logs``), its warnings and errors, and kfp.local's cache hits, retries and skipped
branches. With ``verbose`` every line of every step reaches the terminal too.

How: kfp.local (2.17) has no hook for a task's output. It runs each task in one thread (the main thread,
or a worker thread per ``dsl.ParallelFor`` iteration, ``orchestrator/enhanced_dag_orchestrator.py``),
where ``task_dispatcher.run_single_task_implementation`` logs "Executing task 'NAME'" to sys.stdout,
``subprocess_task_handler.run_local_subprocess`` (and ``docker_task_handler.run_docker_container``)
print()s the step's output line by line, and it logs "Task 'NAME' finished with status S", the outputs
and a horizontal rule. ``StepConsole`` stands in for sys.stdout during the run and follows, per thread,
the task between those lines. Messages kfp.local logs between tasks (``orchestrator/task_executor.py``:
cache hits and retries; the enhanced orchestrator: skipped conditional branches) reach ``handler``.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import io
import json
import logging
import os
import re
import threading
import time
from typing import Any, TextIO

from trainer import layout, logs

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXECUTING = re.compile(r" - INFO - Executing task '([\w.-]+)'$")
_FINISHED = re.compile(r" - (?:INFO|ERROR) - Task '([\w.-]+)' finished with status (SUCCESS|FAILURE)$")
_RULE = re.compile(r"^-{20,}$")
# The executor input names the files the step writes; their folder is the step's (kfp.local's task root).
_OUTPUT_FILE = re.compile(r'^\s*"outputFile": "(.+)",?$')
_CACHE_HIT = re.compile(r"^Task ([\w.-]+) cache hit \(key=(\w+)\)")
_RETRY = re.compile(r"^Task ([\w.-]+) failed \(attempt (\d+)/(\d+)\)\. Retrying in ([\d.]+)s")
_SKIPPED = re.compile(r"^Skipping (?:conditional )?task ([\w.-]+)")
# The last line of a Python traceback: "package.module.SomeError: message".
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Za-z_]\w*(?:Error|Exception|Rejected|Interrupt): .+")
TAIL_LINES = 20


@dataclasses.dataclass
class StepRecord:
    """One step of the run as the console saw it."""

    name: str
    status: str = "running"  # running, succeeded, failed, reused, skipped
    attempts: int = 0
    started: float = 0.0  # time.time()
    seconds: float | None = None
    task_dir: str | None = None  # the step's folder: its artifacts and log.txt (for a reused step, the earlier run's)
    note: str = ""
    tail: collections.deque = dataclasses.field(default_factory=lambda: collections.deque(maxlen=TAIL_LINES * 10))

    @property
    def log_path(self) -> str | None:
        path = os.path.join(self.task_dir, layout.STEP_LOG_FILE) if self.task_dir else None
        return path if path and os.path.exists(path) else None

    def reason(self) -> str | None:
        """The error a failed step ended with: the last exception line of its log and the lines under it."""
        lines = list(self.tail)
        last = next((i for i in range(len(lines) - 1, -1, -1) if _EXCEPTION_LINE.match(lines[i])), None)
        if last is None:
            return None
        reason = [lines[last]]
        reason += [line for line in lines[last + 1:] if line.startswith(" ")]
        return "\n".join(reason)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "attempts": self.attempts,
                "seconds": None if self.seconds is None else round(self.seconds, 1), "note": self.note,
                "task_dir": self.task_dir, "log": self.log_path}


class _Thread:
    """The task one thread is running and what it has printed so far."""

    def __init__(self) -> None:
        self.partial = ""
        self.step: StepRecord | None = None
        self.last: StepRecord | None = None  # the step this thread ran last, kept for its retry
        self.ended = False
        self.pending: list[str] = []
        self.log: TextIO | None = None
        self.showing_warning = False


class StepConsole(io.TextIOBase):
    """sys.stdout while kfp.local runs a pipeline (see the module docstring).

    ``groups`` maps a DAG task that holds other steps (a condition, a loop) to its display name and the
    steps inside it, so that a skipped branch names its steps. ``cache_root`` is kfp.local's cache folder,
    where a reused step's outputs are recorded. ``fallback_dir`` takes the log of a step that never named
    its folder.
    """

    def __init__(self, terminal: TextIO, *, fallback_dir: str, verbose: bool = False,
                 groups: dict[str, tuple[str, list[str]]] | None = None, cache_root: str | None = None,
                 name_width: int = 20):
        super().__init__()
        self.terminal, self.verbose, self.groups = terminal, verbose, groups or {}
        self.cache_root, self.fallback_dir, self.width = cache_root, fallback_dir, name_width
        self.steps: list[StepRecord] = []
        self._threads: dict[int, _Thread] = {}
        self._lock = threading.RLock()

    # --- sys.stdout -------------------------------------------------------------------------------------

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        with self._lock:
            state = self._threads.setdefault(threading.get_ident(), _Thread())
            state.partial += text
            *complete, state.partial = state.partial.split("\n")
            for line in complete:
                self._line(state, _ANSI.sub("", line))
        return len(text)

    def flush(self) -> None:
        self.terminal.flush()

    def close_steps(self) -> None:
        """After the run: end what a thread left open (a step that died with kfp.local itself)."""
        with self._lock:
            for state in self._threads.values():
                if state.partial:
                    self._line(state, _ANSI.sub("", state.partial))
                    state.partial = ""
                if state.step is not None:
                    if state.step.status == "running":
                        self._end(state, "FAILURE")
                    self._close_log(state)

    # --- what kfp.local logs between tasks ----------------------------------------------------------

    def handler(self) -> logging.Handler:
        console = self

        class _Orchestrator(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                console.orchestrator_message(record.levelno, _ANSI.sub("", record.getMessage()))

        return _Orchestrator(logging.INFO)

    def orchestrator_message(self, level: int, message: str) -> None:
        with self._lock:
            if hit := _CACHE_HIT.match(message):
                step = self._new_step(hit.group(1))
                step.status, step.seconds, step.note = "reused", 0.0, "reused from the cache"
                step.task_dir = self._cached_task_dir(hit.group(2))
                self._say(step.name, "reused from the cache" + (f" ({step.task_dir})" if step.task_dir else ""))
            elif retry := _RETRY.match(message):
                self._say(retry.group(1), f"failed (attempt {retry.group(2)} of {retry.group(3)}); "
                                          f"retrying in {float(retry.group(4)):.0f} s")
            elif skipped := _SKIPPED.match(message):
                branch, names = self.groups.get(skipped.group(1), (skipped.group(1), [skipped.group(1)]))
                for name in names:
                    if any(s.name == name for s in self.steps):
                        continue
                    step = self._new_step(name)
                    step.status = "skipped"
                    step.note = (f"condition {branch} is false" if "condition" in message
                                 else "an earlier step failed")
                    self._say(name, f"skipped: {step.note}")
            elif level >= logging.WARNING:
                self._say("kfp.local", f"{logging.getLevelName(level)}: {message}")

    # --- the lines of a thread ----------------------------------------------------------------------

    def _line(self, state: _Thread, line: str) -> None:
        if started := _EXECUTING.search(line):
            self._start(state, started.group(1))
            return
        if state.step is None:
            return  # kfp.local's own framing of the run ("Running pipeline", rules): nothing to keep
        if finished := _FINISHED.search(line):
            self._write_log(state, line)
            self._end(state, finished.group(2))
            return
        if state.ended:
            if _RULE.match(line):
                self._close_log(state)
                state.step = None
            else:
                self._write_log(state, line)  # kfp.local's list of the step's outputs
            return
        # The step's own output, indented by kfp.local's print.
        text = line[4:] if line.startswith("    ") else line
        if state.step.task_dir is None and (output := _OUTPUT_FILE.match(text)):
            self._open_log(state, os.path.dirname(output.group(1)))
        self._write_log(state, text)
        if text.strip():
            state.step.tail.append(text)
        self._show(state, text)

    def _show(self, state: _Thread, text: str) -> None:
        """The terminal's share of a step's output: progress, warnings and errors (all of it with verbose)."""
        name = state.step.name
        if self.verbose:
            self._say(name, text)
            return
        # Parallel tasks can stack kfp.local's indenting print (4 spaces each): the log line is what follows.
        parsed = logs.parse_line(text.lstrip(" "))
        if parsed is not None:
            state.showing_warning = parsed.level >= logging.WARNING
            if state.showing_warning:
                self._say(name, f"{logging.getLevelName(parsed.level)}: {parsed.message}")
            elif parsed.is_progress:
                self._say(name, parsed.message)
        elif state.showing_warning and (text.startswith((" ", "\t", "Traceback ")) or _EXCEPTION_LINE.match(text)):
            self._say(name, text)  # the rest of a warning: its traceback
        else:
            state.showing_warning = False

    def _start(self, state: _Thread, name: str) -> None:
        if state.step is not None:
            self._close_log(state)
        # A retry runs in the same thread right after the failed attempt; anything else is a new step.
        last = state.last
        if last is not None and last.status == "failed" and (last.name == name or last.name.startswith(name + " #")):
            step = last
            step.status = "running"
        else:
            step = self._new_step(name)
        step.attempts += 1
        step.started = time.time()
        state.step = state.last = step
        state.ended, state.pending, state.showing_warning = False, [], False
        if step.task_dir:
            self._open_log(state, step.task_dir)
        self._write_log(state, f"--- {step.name}: attempt {step.attempts}, started {time.strftime('%H:%M:%S')} ---")
        self._say(step.name, "started" + (f" (attempt {step.attempts})" if step.attempts > 1 else ""))

    def _end(self, state: _Thread, status: str) -> None:
        step = state.step
        step.seconds = time.time() - step.started
        step.status = "succeeded" if status == "SUCCESS" else "failed"
        state.ended = True
        if state.log is None:
            self._open_log(state, self._fallback_task_dir(step.name))
        where = f"; log: {step.log_path}" if step.status == "failed" else ""
        self._say(step.name, f"{step.status} {'in' if step.status == 'succeeded' else 'after'} "
                             f"{logs.duration(step.seconds)}{where}")

    def _new_step(self, name: str) -> StepRecord:
        taken = sum(1 for s in self.steps if s.name == name or s.name.startswith(name + " #"))
        step = StepRecord(name if not taken else f"{name} #{taken + 1}")
        self.steps.append(step)
        return step

    # --- the log file ------------------------------------------------------------------------------

    def _open_log(self, state: _Thread, task_dir: str) -> None:
        state.step.task_dir = task_dir
        _make_shared_dirs(task_dir)
        state.log = open(os.path.join(task_dir, layout.STEP_LOG_FILE), "a", encoding="utf-8")
        for line in state.pending:
            state.log.write(line + "\n")
        state.pending = []
        state.log.flush()

    def _write_log(self, state: _Thread, line: str) -> None:
        if state.log is None:
            state.pending.append(line)
        else:
            state.log.write(line + "\n")
            state.log.flush()

    def _close_log(self, state: _Thread) -> None:
        if state.log is None and state.pending and state.step is not None:
            self._open_log(state, self._fallback_task_dir(state.step.name))
        if state.log is not None:
            state.log.close()
            state.log = None

    def _fallback_task_dir(self, name: str) -> str:
        """Where a step that never named its folder keeps its log: its name under the newest run's folder."""
        runs = [p for p in glob.glob(os.path.join(self.fallback_dir, "*")) if os.path.isdir(p)]
        return os.path.join(max(runs, key=os.path.getmtime) if runs else self.fallback_dir, name.replace(" ", ""))

    def _cached_task_dir(self, key_prefix: str) -> str | None:
        """The folder of the earlier run's step whose outputs the cache hands on (kfp/local/cache.py keeps one
        ``<key>.json`` of serialized outputs per entry; kfp.local logs the key's first 12 characters)."""
        if not self.cache_root:
            return None
        entries = glob.glob(os.path.join(self.cache_root, f"{key_prefix}*.json"))
        if len(entries) != 1:
            return None
        with open(entries[0], encoding="utf-8") as handle:
            outputs = json.load(handle)
        uris = [value["uri"] for value in outputs.values() if isinstance(value, dict) and value.get("uri")]
        return os.path.dirname(uris[0]) if uris and os.path.isabs(uris[0]) else None

    # --- the terminal ------------------------------------------------------------------------------

    def _say(self, name: str, text: str) -> None:
        self.terminal.write(f"{time.strftime('%H:%M:%S')}  {name:<{self.width}}  {text}\n")
        self.terminal.flush()


def _make_shared_dirs(path: str) -> None:
    """Create ``path`` and its missing parents writable by every user, as ``pipeline_root`` itself is.

    The log is opened before the step runs; with the Docker runner the step runs as another user
    (uid 1000) and writes its outputs into this same folder, which it could not if we had created it
    with the default mode.
    """
    missing = []
    folder = os.path.abspath(path)
    while not os.path.isdir(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(path, exist_ok=True)
    for folder in missing:
        os.chmod(folder, 0o777)
