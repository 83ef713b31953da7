"""How the steps log: one line format that names each line's logger, and the progress lines a person watches.

Every step writes its whole log to stdout (the Kubeflow UI shows it). Lines a person follows while a step
runs (counts with rate and time left, epochs, finished trials) go to a logger whose name ends in
``.progress`` (``progress_logger``), so ``imgclf run-local`` and ``imgclf tune`` can show them, with the
warnings and errors, and leave the rest (TensorFlow's start-up lines, Keras' own epoch lines, the KFP
executor's input) to each step's log file. ``parse_line`` reads a line of ``FORMAT`` back.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from typing import NamedTuple

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
PROGRESS_SUFFIX = ".progress"
_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                   r"(?P<name>[\w.]+): (?P<message>.*)$")


class LogLine(NamedTuple):
    level: int
    name: str
    message: str

    @property
    def is_progress(self) -> bool:
        return self.name.endswith(PROGRESS_SUFFIX)


def configure(level: int = logging.INFO) -> None:
    """Log to stdout in ``FORMAT``, replacing what was set before (the KFP executor sets its own format
    before a component runs); Python's warnings become log lines (logger ``py.warnings``) too."""
    logging.basicConfig(level=level, format=FORMAT, stream=sys.stdout, force=True)
    logging.captureWarnings(True)


def progress_logger(module: str) -> logging.Logger:
    """The logger of ``module``'s progress lines: ``trainer.train.training`` -> ``trainer.train.training.progress``."""
    return logging.getLogger(module + PROGRESS_SUFFIX)


def parse_line(line: str) -> LogLine | None:
    """A line written in ``FORMAT``, taken apart; None for anything else (print output, C++ logs)."""
    match = _LINE.match(line)
    if not match:
        return None
    return LogLine(logging.getLevelName(match["level"]), match["name"], match["message"])


def duration(seconds: float) -> str:
    """``45 s``, ``2 min 05 s``, ``1 h 03 min``; ``unknown time`` for an infinite estimate."""
    if seconds == float("inf"):
        return "unknown time"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressLog:
    """Logs "<what>: done/total (pct), rate, time left" at most every ``interval`` seconds (thread-safe); with
    ``total`` None (a listing that streams) "<what>: done, rate"."""

    def __init__(self, what: str, total: int | None, *, unit: str = "images", interval: float = 5.0,
                 logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.interval = what, total, unit, interval
        self.logger = logger or progress_logger("trainer")
        self.done = 0
        self.start = self._last = time.monotonic()
        self._lock = threading.Lock()

    def advance(self, count: int = 1) -> None:
        """Count finished items and log if ``interval`` seconds have passed since the last line."""
        with self._lock:
            self.done += count
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        if self.total is None:  # a listing that streams: no total yet
            self.logger.info("%s: %d %s, %.1f %s/s", self.what, self.done, self.unit, rate, self.unit)
            return
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        self.logger.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, about %s left", self.what, self.done, self.total,
                         self.unit, 100.0 * self.done / max(self.total, 1), rate, self.unit, duration(left))

    def finish(self) -> float:
        """Log the totals; return the elapsed seconds."""
        elapsed = time.monotonic() - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.logger.info("%s: %d %s in %s (%.1f %s/s)", self.what, self.done, self.unit, duration(elapsed),
                         rate, self.unit)
        return elapsed
