"""A preempted tuning lane continues its interrupted trial from the trial's last per-epoch backup.

Real training (small_cnn on 16-pixel images, a few dozen of them). The first attempt of a lane runs in
a subprocess that dies (os._exit, like a preempted node) right after its first epoch was backed up and
reported; the retry runs the lane again, as KFP retries the task with the same inputs.
"""

import os
import subprocess
import sys
import textwrap
import types
import warnings

import keras
import pytest

from tests.unit.test_data import write_dataset
from trainer import storage
from trainer.errors import StorageError
from trainer.train.training import train
from trainer.tune import tuning, tuning_report

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXED = {"model": "small_cnn", "weights": "none", "image_size": 16, "batch_size": 8, "early_stopping": True,
         "early_stopping_patience": 10}

FIRST_ATTEMPT = textwrap.dedent("""
    import os, sys
    import keras
    from trainer.tune import tuning
    from trainer.train.training import train

    class Preempted(keras.callbacks.Callback):
        # After the callbacks the lane passes (the objective is reported) and the epoch's backup.
        def on_epoch_end(self, epoch, logs=None):
            os._exit(137)  # the node goes away; nothing after this runs

    def train_until_preempted(*args, callbacks=(), **kwargs):
        return train(*args, callbacks=[*callbacks, Preempted()], **kwargs)

    tuning.run_lane(sys.argv[1], 0, sys.argv[2], train_fn=train_until_preempted)
""")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("tuning-resume") / "dataset",
                         counts={"train": 16, "validation": 8})


def new_study(folder, epochs, max_trials=1):
    config = tuning.make_config({"optimizer": ["adam", "sgd"], "learning_rate": {"min": 0.001, "max": 0.05}},
                                {**FIXED, "epochs": epochs}, strategy="Random", max_trials=max_trials,
                                parallel_trials=1, early_stopping_type="Off")
    tuning.create_study(config, str(folder))
    return str(folder)


class EpochSpy(keras.callbacks.Callback):
    """Records the epochs (1-based) that training runs, and what the backup folder holds after each."""

    def __init__(self, backup_dir):
        super().__init__()
        self.backup_dir = backup_dir
        self.epochs = []
        self.backed_up = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch + 1)

    def on_epoch_end(self, epoch, logs=None):
        self.backed_up.append(storage.list_files(self.backup_dir) if self.backup_dir else [])


def spying_train(spies):
    def train_fn(*args, callbacks=(), **kwargs):
        spy = EpochSpy(kwargs.get("backup_dir"))
        spies.append(spy)
        return train(*args, callbacks=[*callbacks, spy], **kwargs)
    return train_fn


def test_a_preempted_lane_continues_its_trial_from_the_last_epoch(tmp_path, dataset):
    study_uri = new_study(tmp_path / "study", epochs=3)
    env = {**os.environ, "PYTHONPATH": REPO, "TF_CPP_MIN_LOG_LEVEL": "2"}
    first = subprocess.run([sys.executable, "-c", FIRST_ATTEMPT, study_uri, dataset], env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 137, first.stderr[-3000:]
    study, _ = tuning.open_study(study_uri)
    [killed] = study.get_trials()
    assert killed.state == tuning.TrialState.RUNNING and list(killed.intermediate_values) == [1]
    hyperparameters = killed.user_attrs["hyperparameters"]

    spies = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        [record] = tuning.run_lane(study_uri, 0, dataset, train_fn=spying_train(spies))
    assert not [w for w in caught if "already reported" in str(w.message)]
    [spy] = spies
    assert spy.epochs == [2, 3]  # epoch 1 came from the backup
    summary = tuning.summarize(study_uri)
    [trial] = summary["trials"]
    assert (trial["trial"], trial["status"], trial["epochs"]) == (killed.number, "completed", 3)
    assert trial["hyperparameters"] == hyperparameters == record["hyperparameters"]
    assert trial["error"] is None
    assert trial["resumed_at_epochs"] == [2]
    # The pruner sees every epoch: the one reported before the interruption and the two after it.
    assert sorted(trial["intermediate"]) == ["1", "2", "3"]
    assert trial["intermediate"]["1"] == killed.intermediate_values[1]
    assert "| completed (resumed at epoch 2) |" in tuning_report.markdown(summary)
    assert not os.path.exists(os.path.join(study_uri, "trials", "0", "backup", str(killed.number)))


def files_below(uri):
    try:
        return storage.list_files(uri)
    except StorageError:  # a folder or gs:// prefix that does not exist (any more)
        return []


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_finished_trials_leave_no_backup_behind(tmp_path, dataset, where, request):
    # Two trials: the first completes; the second fails during its second epoch (say, out of memory).
    folder = f"gs://{request.getfixturevalue('gcs_bucket')}/study" if where == "gcs" else str(tmp_path / "study")
    study_uri = new_study(folder, epochs=2, max_trials=2)
    spies = []
    real = spying_train(spies)

    class OutOfMemory(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:
                raise RuntimeError("out of memory")

    def train_fn(*args, callbacks=(), **kwargs):
        extra = [OutOfMemory()] if len(spies) == 1 else []
        return real(*args, callbacks=[*callbacks, *extra], **kwargs)

    records = tuning.run_lane(study_uri, 0, dataset, train_fn=train_fn)
    assert [(r["status"], r["epochs"]) for r in records] == [("completed", 2), ("failed", 1)]
    assert records[1]["error"] == "RuntimeError: out of memory"
    for spy, record in zip(spies, records, strict=True):
        # Each trial was backed up after every epoch it ran, in a folder of its own ...
        assert spy.backed_up and all("latest.weights.h5" in names for names in spy.backed_up), spy.backed_up
        assert spy.backup_dir == storage.join(study_uri, "trials", str(record["slot"]), "backup", str(record["trial"]))
        # ... which is gone now that the trial is over, whether it completed or failed.
        assert files_below(spy.backup_dir) == []
    assert not [name for name in storage.list_files(study_uri) if "/backup/" in name]
    assert [t["resumed_at_epochs"] for t in tuning.summarize(study_uri)["trials"]] == [[], []]


def test_the_pruner_judges_a_continued_trial_with_the_epochs_it_reported_before(tmp_path):
    # Three trials reach 0.9 at every epoch; slot 3's trial reported 0.1 at epoch 1 and was then killed.
    from tests.unit.test_tuning import RANGES, fake_training

    config = tuning.make_config(RANGES, {"epochs": 3}, strategy="Random", max_trials=4, parallel_trials=1)
    study_uri = str(tmp_path)
    tuning.create_study(config, study_uri)
    for slot in range(3):
        tuning.run_trial(study_uri, slot, "unused", train_fn=fake_training(curve=lambda hp, epoch: 0.9))
    study, config = tuning.open_study(study_uri, 3)
    killed = study.ask()
    killed.set_user_attr("slot", 3)
    killed.set_user_attr("hyperparameters", config.space.suggest(killed))
    killed.report(0.1, 1)
    calls = []

    def resumed_training(hp, dataset_dir, model_dir, *, jit_compile=False, callbacks=(), backup_dir=None):
        # What trainer.train.training.train does with a backup of epoch 1: it runs epochs 2 and 3 only.
        calls.append((hp.optimizer, hp.learning_rate, backup_dir))
        network = types.SimpleNamespace(stop_training=False)
        for callback in callbacks:
            callback.set_model(network)
        for epoch in (1, 2):
            for callback in callbacks:
                callback.on_epoch_begin(epoch)
                callback.on_epoch_end(epoch, {"val_accuracy": 0.1, "val_loss": 0.9})
            if network.stop_training:
                break
        return {"epochs_completed": epoch + 1, "validation_metrics": {"accuracy": 0.1, "loss": 0.9}}

    tuning.run_lane(study_uri, 0, "unused", train_fn=resumed_training)
    trials = tuning.summarize(study_uri)["trials"]
    assert len(trials) == 4
    trial = trials[3]
    assert (trial["trial"], trial["status"], trial["epochs"]) == (killed.number, "stopped early", 2)
    assert calls == [(killed.params["optimizer"], killed.params["learning_rate"],
                      str(tmp_path / "trials" / "3" / "backup" / str(killed.number)))]
    assert trial["intermediate"] == {"1": 0.1, "2": 0.1} and trial["resumed_at_epochs"] == [2]
