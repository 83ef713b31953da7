"""trainer.logs: the steps' one log format, read back by the local console, and the progress lines."""

import logging
import subprocess
import sys

from trainer import logs


def test_a_line_in_the_format_is_read_back_and_anything_else_is_not():
    record = logging.LogRecord("trainer.train.training.progress", logging.INFO, __file__, 1, "Epoch %d/%d: %s",
                               (1, 3, "a: b"), None)
    line = logging.Formatter(logs.FORMAT).format(record)
    parsed = logs.parse_line(line)
    assert parsed == (logging.INFO, "trainer.train.training.progress", "Epoch 1/3: a: b") and parsed.is_progress
    assert not logs.parse_line(line.replace(".progress", "")).is_progress
    for other in ("Epoch 1/3", "40/40 - 2s - 47ms/step - accuracy: 0.89",
                  "[KFP Executor 2026-12-03 12:24:11,694 INFO]: Got executor_input:",
                  "I0000 00:00:1796300655.314008   10460 port.cc:153] oneDNN custom operations are on."):
        assert logs.parse_line(other) is None, other


def test_a_component_logs_to_stdout_in_the_format_with_warnings_as_log_lines():
    """As in a step: the KFP executor has set up logging its own way before the component configures it."""
    script = ("import logging, warnings\n"
              "logging.basicConfig(format='[KFP Executor %(asctime)s %(levelname)s]: %(message)s')\n"
              "from trainer import logs\nlogs.configure()\n"
              "logs.progress_logger('trainer.data.validation').info('validated: %d images', 3)\n"
              "warnings.warn('odd input', UserWarning)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    first, second = (logs.parse_line(line) for line in out.splitlines() if line)
    assert first == (logging.INFO, "trainer.data.validation.progress", "validated: 3 images")
    assert (second.level, second.name) == (logging.WARNING, "py.warnings")
    assert "UserWarning: odd input" in second.message


def test_durations_read_as_a_person_says_them():
    assert [logs.duration(s) for s in (0.4, 59.6, 125, 3 * 3600 + 180, float("inf"))] == [
        "0 s", "1 min 00 s", "2 min 05 s", "3 h 03 min", "unknown time"]
