"""pipelines.local_console: what a local run shows on the terminal, and what goes to each step's log.

These tests stand in for kfp.local 2.17 by writing the lines it writes, as it writes them: the task
framing that ``kfp/local/task_dispatcher.py`` (run_single_task_implementation) logs to sys.stdout, the
step's output that ``kfp/local/subprocess_task_handler.py`` (run_local_subprocess) print()s indented
by ``logging_utils.indented_print``, and the messages ``kfp/local/orchestrator/task_executor.py`` and
``enhanced_dag_orchestrator.py`` log between tasks. The lines were copied from a real run
(tests/integration/test_local_pipeline.py runs the real thing).
"""

from __future__ import annotations

import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor

from pipelines.local_console import StepConsole
from trainer import layout

RULE = "-" * 80


def _task(console, name, task_dir, body, *, status="SUCCESS", indent="    "):
    """What kfp.local writes for one task: framing, executor input, the step's lines, the end."""
    console.write(f"12:24:12.289 - INFO - Executing task \x1b[96m'{name}'\x1b[0m\n")
    console.write("12:24:12.289 - INFO - Streamed logs:\n\n")
    executor_input = json.dumps({"outputs": {"outputFile": f"{task_dir}/executor_output.json"}}, indent=4)
    for line in ["[KFP Executor 2026-12-03 12:24:12,332 INFO]: Got executor_input:", *executor_input.split("\n"),
                 *body]:
        console.write(indent)
        console.write(line + "\n")
    colour = "\x1b[92m" if status == "SUCCESS" else "\x1b[91m"
    level = "INFO" if status == "SUCCESS" else "ERROR"
    console.write(f"12:24:13.326 - {level} - Task \x1b[96m'{name}'\x1b[0m finished with status "
                  f"{colour}{status}\x1b[0m\n")
    if status == "SUCCESS":
        console.write(f"12:24:13.327 - INFO - Task \x1b[96m'{name}'\x1b[0m outputs:\n    accepted: 1797\n")
    console.write(RULE + "\n")


TRAIN_OUTPUT = [
    "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
    "I0000 00:00:1796300655.314008   10460 port.cc:153] oneDNN custom operations are on.",
    "2026-12-03 12:24:21,228 INFO trainer.train.training: Training small_cnn at 32 px on 1259 images",
    "2026-12-03 12:24:21,220 WARNING trainer.train.checkpoints: No durable backup location: set checkpoint_root",
    "Epoch 1/15",
    "2026-12-03 12:24:34,127 INFO trainer.train.training.progress: Epoch 1/15: accuracy 0.5457 | about 2 min left",
    "40/40 - 10s - 246ms/step - accuracy: 0.5457 - loss: 1.7087",
    "2026-12-03 12:24:35,000 WARNING trainer.evaluate.gallery: Error gallery without heat maps: boom",
    "Traceback (most recent call last):",
    '  File "gallery.py", line 3, in build',
    "ValueError: boom",
    "2026-12-03 12:24:54,866 INFO tensorflow: Assets written to: /tmp/model/assets",
]


def _shown(terminal):
    """The terminal's lines without their time stamp."""
    return [line[10:].rstrip() for line in terminal.getvalue().splitlines()]


def test_a_step_shows_its_start_end_progress_and_warnings_and_logs_everything(tmp_path):
    terminal = io.StringIO()
    console = StepConsole(terminal, fallback_dir=str(tmp_path), name_width=8)
    task_dir = tmp_path / "run-1" / "train"
    _task(console, "train", task_dir, TRAIN_OUTPUT)
    console.close_steps()

    shown = _shown(terminal)
    assert shown[0] == "train     started"
    assert shown[1:] == [
        "train     WARNING: No durable backup location: set checkpoint_root",
        "train     Epoch 1/15: accuracy 0.5457 | about 2 min left",
        "train     WARNING: Error gallery without heat maps: boom",
        "train     Traceback (most recent call last):",
        'train       File "gallery.py", line 3, in build',
        "train     ValueError: boom",
        "train     succeeded in 0 s"]  # no executor input, TensorFlow start-up line, Keras epoch line or INFO
    log = (task_dir / layout.STEP_LOG_FILE).read_text()
    for line in TRAIN_OUTPUT + ['"outputFile": "' + str(task_dir) + '/executor_output.json"', "accepted: 1797"]:
        assert line in log
    [step] = console.steps
    assert (step.status, step.attempts, step.task_dir) == ("succeeded", 1, str(task_dir))
    assert step.to_dict()["log"] == str(task_dir / layout.STEP_LOG_FILE)


def test_verbose_shows_every_line_of_the_step(tmp_path):
    terminal = io.StringIO()
    console = StepConsole(terminal, fallback_dir=str(tmp_path), verbose=True, name_width=8)
    _task(console, "train", tmp_path / "train", TRAIN_OUTPUT)
    shown = _shown(terminal)
    assert all(f"train     {line}" in shown for line in TRAIN_OUTPUT)


def test_a_retried_failure_is_one_step_whose_reason_is_the_error_it_ended_with(tmp_path):
    terminal = io.StringIO()
    console = StepConsole(terminal, fallback_dir=str(tmp_path), name_width=14)
    failure = ["Traceback (most recent call last):", '  File "validation.py", line 235, in validate_dataset',
               "trainer.errors.DataError: the data set at /d cannot be used (1 problem(s)):",
               "  - only one class folder ('only') under /d; add one sub-folder of images per class"]
    task_dir = tmp_path / "run-1" / "validate-data"
    _task(console, "validate-data", task_dir, failure, status="FAILURE")
    console.orchestrator_message(logging.INFO, "Task validate-data failed (attempt 1/3). Retrying in 30.0s...")
    _task(console, "validate-data", task_dir, failure, status="FAILURE")
    console.close_steps()

    [step] = console.steps
    assert (step.status, step.attempts) == ("failed", 2)
    assert step.reason() == "\n".join(failure[2:])
    shown = _shown(terminal)
    log_path = task_dir / layout.STEP_LOG_FILE
    assert shown == ["validate-data   started",
                     f"validate-data   failed after 0 s; log: {log_path}",
                     "validate-data   failed (attempt 1 of 3); retrying in 30 s",
                     "validate-data   started (attempt 2)",
                     f"validate-data   failed after 0 s; log: {log_path}"]
    assert log_path.read_text().count("trainer.errors.DataError") == 2  # both attempts, appended


def test_cache_hits_and_skipped_branches_are_one_line_each(tmp_path):
    """A reused step points at the earlier run's folder, found through kfp.local's cache entry
    (kfp/local/cache.py writes ``<key>.json`` with each output's URI)."""
    cache = tmp_path / "cache"
    cache.mkdir()
    earlier = tmp_path / "earlier" / "validate-data"
    (cache / "0123456789abcdef.json").write_text(json.dumps(
        {"report": {"__kfp_artifact__": True, "uri": str(earlier / "report"), "metadata": {}}, "accepted": 3}))
    terminal = io.StringIO()
    console = StepConsole(terminal, fallback_dir=str(tmp_path), cache_root=str(cache), name_width=14,
                          groups={"condition-2": ("registry-set", ["push-model"])})
    console.orchestrator_message(logging.INFO, "Task validate-data cache hit (key=0123456789ab); skipping execution.")
    console.orchestrator_message(logging.INFO, "Skipping conditional task condition-2 (condition evaluated to False)")
    console.orchestrator_message(logging.INFO, "Skipping task evaluate: upstream task(s) ['train'] failed.")
    console.orchestrator_message(logging.WARNING, "Failed to write cache entry for task train: disk full")
    assert _shown(terminal) == [f"validate-data   reused from the cache ({earlier})",
                                "push-model      skipped: condition registry-set is false",
                                "evaluate        skipped: an earlier step failed",
                                "kfp.local       WARNING: Failed to write cache entry for task train: disk full"]
    assert [(s.name, s.status, s.task_dir) for s in console.steps] == [
        ("validate-data", "reused", str(earlier)), ("push-model", "skipped", None), ("evaluate", "skipped", None)]


def test_parallel_tasks_keep_their_own_logs_even_when_kfp_stacks_its_indentation(tmp_path):
    """Two lanes of a loop run side by side in worker threads; kfp.local's indenting print is not
    thread-safe and can indent a lane's lines twice."""
    terminal = io.StringIO()
    console = StepConsole(terminal, fallback_dir=str(tmp_path), name_width=18)
    lanes = [ThreadPoolExecutor(max_workers=1) for _ in range(2)]
    dirs = [tmp_path / f"for-loop-1-iteration-{i}" / "tuning-trials" for i in range(2)]

    def in_lane(index, text):
        lanes[index].submit(console.write, text).result()

    for index in range(2):
        in_lane(index, "12:00:00.000 - INFO - Executing task 'tuning-trials'\n")
        in_lane(index, f'        "outputFile": "{dirs[index]}/executor_output.json"\n')
    for index in (1, 0):
        in_lane(index, f"        2026-12-03 12:00:01,000 INFO trainer.tune.tuning.progress: Trial {index} completed\n")
    for index in range(2):
        in_lane(index, "12:00:02.000 - INFO - Task 'tuning-trials' finished with status SUCCESS\n" + RULE + "\n")
    for lane in lanes:
        lane.shutdown()

    assert _shown(terminal) == ["tuning-trials       started", "tuning-trials #2    started",
                                "tuning-trials #2    Trial 1 completed", "tuning-trials       Trial 0 completed",
                                "tuning-trials       succeeded in 0 s", "tuning-trials #2    succeeded in 0 s"]
    for index in range(2):
        log = (dirs[index] / layout.STEP_LOG_FILE).read_text()
        assert f"Trial {index} completed" in log and f"Trial {1 - index} completed" not in log
