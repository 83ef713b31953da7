"""A retried train step resumes from its backup with no run id among its inputs.

KFP retries a preempted task by starting its pod again with the executor input its driver computed
once: the same input values and the same output URIs. The train step finds its backup through its
model output's URI, so this test calls the step's own code twice the way two attempts of one task
would, in fresh processes; the first attempt dies (like a preempted node) right after the backup of
its first epoch.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from components.train import train
from tests.unit.test_data import write_dataset
from trainer.hyperparameters import Hyperparameters
from trainer.train.checkpoints import durable_backup_dir

pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ATTEMPT = textwrap.dedent("""
    import json, os, sys
    import keras
    from kfp import dsl
    from components.train import train

    args = json.loads(sys.argv[1])
    if os.environ.get("PREEMPT_AFTER_FIRST_BACKUP"):
        class Preempted(keras.callbacks.BackupAndRestore):
            def on_epoch_end(self, epoch, logs=None):
                super().on_epoch_end(epoch, logs)
                os._exit(137)  # the node goes away; nothing after this runs
        keras.callbacks.BackupAndRestore = Preempted
    outputs = {name: cls(name=name, uri=args.pop(name)) for name, cls in
               (("trained_model", dsl.Model), ("metrics", dsl.Metrics), ("tensorboard_logs", dsl.Artifact))}
    for artifact in outputs.values():
        os.makedirs(os.path.dirname(artifact.path), exist_ok=True)
    dataset = dsl.Dataset(name="dataset", uri=args.pop("dataset"))
    train.python_func(dataset=dataset, **outputs, **args)
    print("MODEL-METADATA " + json.dumps(outputs["trained_model"].metadata))
""")


def attempt(arguments: dict, preempt: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    if preempt:
        env["PREEMPT_AFTER_FIRST_BACKUP"] = "1"
    return subprocess.run([sys.executable, "-c", ATTEMPT, json.dumps(arguments)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)


def test_retried_train_step_resumes_from_its_backup(tmp_path):
    assert "run_id" not in train.component_spec.inputs
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=16, epochs=3, batch_size=8)
    task_outputs = tmp_path / "pipeline-root" / "run-1" / "train" / "salt-1"
    arguments = {**hp.to_dict(), "dataset": write_dataset(tmp_path / "dataset"),
                 "trained_model": str(task_outputs / "trained_model"), "metrics": str(task_outputs / "metrics"),
                 "tensorboard_logs": str(task_outputs / "tensorboard_logs"), "initial_model_uri": "",
                 "backup_root": str(tmp_path / "volume"), "jit_compile": False}
    backup = durable_backup_dir(arguments["backup_root"], arguments["trained_model"])

    first = attempt(arguments, preempt=True)
    assert first.returncode == 137, first.stderr[-3000:]
    assert os.listdir(backup), "the first attempt left no backup"

    retry = attempt(arguments, preempt=False)
    assert retry.returncode == 0, retry.stderr[-3000:]
    logs = retry.stdout + retry.stderr
    assert "Resuming: 1 epoch(s) were completed before the interruption" in logs
    [metadata] = [json.loads(line.split(" ", 1)[1]) for line in retry.stdout.splitlines()
                  if line.startswith("MODEL-METADATA ")]
    assert metadata["epochs_completed"] == 3
    history = json.loads((task_outputs / "trained_model" / "history.json").read_text())
    assert history["loss"] and all(len(values) == 3 for values in history.values())
    assert not os.path.exists(backup)  # removed once the step completed


def test_backups_of_other_tasks_and_runs_are_apart():
    root = "gs://ckpt/imgclf"
    one_task = durable_backup_dir(root, "gs://root/image-classification/run-1/train/salt-1/trained_model")
    assert one_task == durable_backup_dir(root, "gs://root/image-classification/run-1/train/salt-1/trained_model/")
    assert one_task != durable_backup_dir(root, "gs://root/image-classification/run-2/train/salt-2/trained_model")
    assert one_task.startswith(root + "/") and one_task.endswith("/train")
