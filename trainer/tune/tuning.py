"""Hyperparameter tuning: SageMaker's automatic model tuning, as a shared Optuna study that trials join.

How a search runs (the tuning pipeline, ``imgclf tune``, or by hand):

1. ``create_study`` checks the settings and writes a *study folder* (local path, mounted volume or
   gs:// URI): ``study.json`` (the search space, objective, strategy, budget and the fixed
   hyperparameters) and the study's journal.
2. Each trial (``run_trial``, one per slot ``0 .. n_trials-1``, any number at once, on any machine that
   sees the folder; ``run_lane`` runs one lane's slots one after another) asks the study for
   hyperparameters, trains on the converted data set, reports the objective after every epoch (so a
   trial worse than the others at the same epoch is stopped, pruned: see ``early_stopping_type``
   below), and tells the study its result. A trial that fails is recorded with its reason and the
   search goes on. The trial's model is written to ``trials/<slot>/model``; its training state is
   backed up after every epoch to ``trials/<slot>/backup/<trial number>`` and removed when it ends.
   A slot retried after its pod was killed (preempted) continues the trial that was running there,
   with the same number and hyperparameters, from that backup's last epoch; only a trial killed
   before it had its hyperparameters is recorded as failed ("interrupted") and replaced.
3. ``summarize`` reads the study: every trial's hyperparameters, objective, status, epochs and
   duration, and the best one; ``select_best`` also copies the best trial's model out and writes the
   reports. A study in which every trial failed raises ``TuningError`` listing the reasons.

The journal is Optuna's ``JournalStorage`` over ``ObjectJournal``: every batch of log entries is a new
file or object, claimed with create-if-absent, so concurrent trials on GCS or a shared volume never
overwrite each other, without a database or a lock server.

Strategies (SageMaker's names): Bayesian = Optuna's TPE (``constant_liar`` so parallel trials spread
out), Random, Grid (categorical ranges only, as SageMaker; every point of the grid once, so max_trials
must cover it), Hyperband = TPE with Optuna's Hyperband pruner over the epochs (its budget is the fixed
``epochs``, which it therefore takes as one value, not a range). ``early_stopping_type`` Auto
(SageMaker's ``TrainingJobEarlyStoppingType``, with SageMaker's rule: ``MedianRulePruner``) stops a
trial whose objective at an epoch is worse than the median of the other trials' running averages up to
that epoch, from epoch 2 on and once 3 other trials have reported that epoch; Off never stops one
except under Hyperband, whose strategy it is. A trial whose objective becomes NaN or infinite stops at
once and is recorded as failed, with the reason. Without ranges the recommended ones are searched,
less every hyperparameter given a value.
Each trial's sampler is seeded with ``random_seed`` and its slot, so a search is repeatable when its
trials run one at a time, and parallel trials never draw the same values from the same seed.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import secrets
import statistics
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from trainer import hyperparameters as hps
from trainer import storage
from trainer.errors import HyperparameterError, ImgclfError, StorageError
from trainer.logs import progress_logger
from trainer.tune import search_space

log = logging.getLogger(__name__)
progress_log = progress_logger(__name__)

# objective -> (Keras metric on the validation split, direction, needs binary_mode)
OBJECTIVES: dict[str, tuple[str, str, bool]] = {
    "validation:accuracy": ("accuracy", "maximize", False),
    "validation:loss": ("loss", "minimize", False),
    "validation:precision": ("precision", "maximize", True),
    "validation:recall": ("recall", "maximize", True),
    "validation:auc": ("auc", "maximize", True),
    "validation:prc": ("prc", "maximize", True),
}
DEFAULT_OBJECTIVE = "validation:accuracy"
STRATEGIES = ("Bayesian", "Random", "Grid", "Hyperband")
EARLY_STOPPING_TYPES = ("Auto", "Off")
STUDY_NAME = "imgclf"
CONFIG_FILE = "study.json"
JOURNAL_DIR = "journal"
TRIALS_DIR = "trials"
MODEL_DIR = "model"
BACKUP_DIR = "backup"
# Auto early stopping judges a trial from the epoch after these (its warm-up) ...
PRUNE_WARMUP_EPOCHS = 1
# ... once at least this many other trials have reported that epoch.
PRUNE_MIN_TRIALS = 3


class TuningError(ImgclfError):
    """A search cannot go on or has no result (e.g. every trial failed); the message says why."""


# --- Settings ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TuningConfig:
    """Everything a search is: space, objective, strategy, budget and the hyperparameters it keeps fixed."""

    space: search_space.SearchSpace
    fixed: hps.Hyperparameters
    objective: str = DEFAULT_OBJECTIVE
    strategy: str = "Bayesian"
    max_trials: int = 10
    parallel_trials: int = 2
    early_stopping_type: str = "Auto"

    @property
    def metric(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][1]

    @property
    def n_trials(self) -> int:
        """Trials the search runs: max_trials, or fewer when a grid has fewer points."""
        if self.strategy == "Grid":
            return min(self.max_trials, self.space.grid_size())
        return self.max_trials

    @property
    def lanes(self) -> int:
        """Trials running at once: parallel_trials, never more than there are trials."""
        return max(1, min(self.parallel_trials, self.n_trials))

    def lane_slots(self, lane: int) -> list[int]:
        """The trial slots one lane runs one after another: lane, lane + lanes, lane + 2 * lanes, ..."""
        return list(range(lane, self.n_trials, self.lanes))

    def to_dict(self) -> dict[str, Any]:
        return {"ranges": self.space.to_sagemaker(), "fixed": self.fixed.to_dict(), "objective": self.objective,
                "strategy": self.strategy, "max_trials": self.max_trials, "parallel_trials": self.parallel_trials,
                "early_stopping_type": self.early_stopping_type, "n_trials": self.n_trials,
                "direction": self.direction}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TuningConfig:
        return cls(space=search_space.parse_ranges(data["ranges"]),
                   fixed=hps.Hyperparameters.from_mapping(data["fixed"]), objective=data["objective"],
                   strategy=data["strategy"], max_trials=int(data["max_trials"]),
                   parallel_trials=int(data["parallel_trials"]), early_stopping_type=data["early_stopping_type"])


def make_config(ranges: str | Mapping[str, Any] | search_space.SearchSpace | None, fixed: Mapping[str, Any], *,
                objective: str = DEFAULT_OBJECTIVE, strategy: str = "Bayesian", max_trials: int = 10,
                parallel_trials: int = 2, early_stopping_type: str = "Auto",
                fixed_given: Iterable[str] = ()) -> TuningConfig:
    """Check every tuning setting at once and build the config, or raise HyperparameterError (one line each).

    ``ranges`` is JSON/YAML text, a parsed mapping, a SearchSpace, or empty for the recommended ranges.
    ``fixed`` holds the hyperparameters every trial keeps (values as given; defaults fill the rest);
    ``fixed_given`` names those the user set explicitly, which must not also be ranged.
    """
    problems: list[str] = []
    hp = None
    try:
        hp = hps.Hyperparameters.from_mapping(fixed)
    except HyperparameterError as err:
        problems.extend(err.problems)
    space = None
    try:
        if isinstance(ranges, search_space.SearchSpace):
            space = ranges
            search_space.check_not_fixed(space, fixed_given)
        elif isinstance(ranges, Mapping):
            space = search_space.parse_ranges(ranges, fixed=fixed_given)
        else:
            # Without ranges, the recommended ones less every hyperparameter given a value: those named in
            # fixed_given and, where the caller cannot tell (a pipeline step gets every value), those whose
            # value is not the default.
            changed = [] if hp is None else [k for k, v in hp.to_dict().items() if v != hps.DEFAULTS[k]]
            space = search_space.load_ranges(ranges or "", fixed=[*fixed_given, *changed])
    except HyperparameterError as err:
        problems.extend(err.problems)
    problems.extend(_setting_problems(objective, strategy, max_trials, parallel_trials, early_stopping_type,
                                      hp, space))
    if problems:
        raise search_space.RangeError(problems)
    return TuningConfig(space, hp, objective, strategy, max_trials, parallel_trials, early_stopping_type)


def _setting_problems(objective: str, strategy: str, max_trials: Any, parallel_trials: Any,
                      early_stopping_type: str, hp: hps.Hyperparameters | None,
                      space: search_space.SearchSpace | None) -> list[str]:
    problems = []
    if objective not in OBJECTIVES:
        problems.append(f"objective: got {objective!r}, expected one of {', '.join(OBJECTIVES)}")
    elif OBJECTIVES[objective][2] and hp is not None and not hp.binary_mode:
        problems.append(f"objective: {objective} needs binary_mode=True; use validation:accuracy or "
                        "validation:loss, or set binary_mode to True")
    if strategy not in STRATEGIES:
        problems.append(f"strategy: got {strategy!r}, expected one of {', '.join(STRATEGIES)}")
    elif strategy == "Grid" and space is not None:
        numeric = [r.name for r in space.ranges if r.kind != search_space.CATEGORICAL]
        if numeric:
            problems.append(f"strategy: Grid takes only categorical ranges (as SageMaker), but {', '.join(numeric)} "
                            f"{'is' if len(numeric) == 1 else 'are'} ranged; give them as lists of values or use "
                            "Bayesian or Random")
        elif isinstance(max_trials, int) and 0 < max_trials < space.grid_size():
            sizes = " x ".join(f"{len(r.values)} {r.name}" for r in space.ranges)
            problems.append(f"max_trials: Grid tries every point of its grid, {space.grid_size()} here ({sizes}), "
                            f"but max_trials is {max_trials}; raise max_trials to {space.grid_size()} or give fewer "
                            "values")
    elif strategy == "Hyperband" and space is not None and "epochs" in space.names:
        problems.append("epochs: Hyperband gives each trial its epochs itself (from 1 up to the fixed epochs, its "
                        "largest budget), so epochs cannot be ranged; give epochs one value (e.g. --set epochs=27) "
                        "or use Bayesian or Random")
    for name, value in (("max_trials", max_trials), ("parallel_trials", parallel_trials)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            problems.append(f"{name}: got {value!r}, expected a whole number of at least 1")
    if early_stopping_type not in EARLY_STOPPING_TYPES:
        problems.append(f"early_stopping_type: got {early_stopping_type!r}, expected Auto or Off")
    if hp is not None and hp.validation_split_ratio == 0:
        problems.append("validation_split_ratio: got 0, but trials are judged on the validation split; "
                        "give it a share above 0 (e.g. 0.2)")
    return problems


# --- The study folder ---------------------------------------------------------------------------------------


class ObjectJournal(BaseJournalBackend):
    """Optuna journal whose entries are files or objects below ``root``, each claimed with create-if-absent.

    ``root/00000000.json``, ``00000001.json``, ... each hold one batch of log entries (the batch that one
    ``append_logs`` call wrote, so a batch is never split) and a random id. A writer claims the next
    number; when another writer got there first it reads that batch and tries the next one. Batches
    are only ever created after their predecessors exist, so the sequence has no gaps.
    """

    def __init__(self, root: str):
        self.root = root
        self._batches: list[list[dict[str, Any]]] = []
        self._ids: list[str] = []

    def _path(self, number: int) -> str:
        return storage.join(self.root, f"{number:08d}.json")

    def _catch_up(self) -> None:
        while (data := storage.read_bytes_if_exists(self._path(len(self._batches)))) is not None:
            batch = json.loads(data)
            self._batches.append(batch["logs"])
            self._ids.append(batch["id"])

    def read_logs(self, log_number_from: int) -> Iterable[dict[str, Any]]:
        self._catch_up()
        flat = [entry for batch in self._batches for entry in batch]
        return flat[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        batch_id = secrets.token_hex(8)
        payload = json.dumps({"id": batch_id, "logs": logs}).encode()
        while True:
            self._catch_up()
            number = len(self._batches)
            if storage.create_if_absent(self._path(number), payload):
                self._batches.append(logs)
                self._ids.append(batch_id)
                return
            # Someone else's batch, or ours when a retried upload had already landed: catching up tells.
            self._catch_up()
            if len(self._ids) > number and self._ids[number] == batch_id:
                return


def create_study(config: TuningConfig, study_uri: str) -> dict[str, Any]:
    """Write the study folder for a new search; returns the config as written."""
    if storage.read_bytes_if_exists(storage.join(study_uri, CONFIG_FILE)) is not None:
        existing = load_config(study_uri)
        if existing.to_dict() != config.to_dict():
            raise TuningError(f"{study_uri} already holds a different search; give the new search a folder "
                              "of its own")
        log.info("Continuing the search already in %s", study_uri)
    else:
        storage.write_bytes(storage.join(study_uri, CONFIG_FILE), json.dumps(config.to_dict(), indent=2).encode())
    _open(config, study_uri, sampler=optuna.samplers.RandomSampler(seed=0))
    log.info("Study %s: %s search of %s over %s, %d trials, %d at a time", study_uri, config.strategy,
             config.objective, ", ".join(config.space.names), config.n_trials, config.lanes)
    return config.to_dict()


def study_location(study_root: str, run_id: str, artifact_uri: str) -> str:
    """Where a run's study lives: ``study_root/<run id>``, else the setup step's own artifact location.

    ``run_id`` "" (backends before 2.5.0 cannot give it): a fresh random id, so every run has its own study
    (the setup step calls this once per run: it is neither cached nor retried).

    Every trial writes to the study, so it must be a location all of them reach and write: a gs:// URI
    or a shared volume. A pipeline root on MinIO or S3 (the open-source backend's default) is neither,
    for trainer.storage, and then study_root must be given.
    """
    if study_root:
        return storage.join(study_root, run_id or uuid.uuid4().hex)
    if storage.is_gcs(artifact_uri) or "://" not in artifact_uri:
        return artifact_uri
    raise TuningError(f"the pipeline root puts the study at {artifact_uri}, which the trials cannot share; "
                      "set study_root to a gs:// path or a volume mounted by every step")


def load_config(study_uri: str) -> TuningConfig:
    data = storage.read_bytes_if_exists(storage.join(study_uri, CONFIG_FILE))
    if data is None:
        raise TuningError(f"{study_uri} holds no {CONFIG_FILE}: it is not a study folder written by tuning's "
                          "setup step")
    return TuningConfig.from_dict(json.loads(data))


def make_sampler(config: TuningConfig, slot: int) -> optuna.samplers.BaseSampler:
    """The strategy's sampler for one trial, seeded with random_seed and the trial's slot."""
    seed = (config.fixed.random_seed * 7919 + slot) % (2**31)
    if config.strategy == "Random":
        return optuna.samplers.RandomSampler(seed=seed)
    if config.strategy == "Grid":
        return _SlotGridSampler(config.space.grid(), slot)
    # Bayesian and Hyperband: TPE; with few trials, start modelling after a third of them.
    startup = max(2, min(10, config.n_trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)


class _SlotGridSampler(optuna.samplers.BaseSampler):
    """Grid search where trial slot k takes the grid's k-th point (in the space's order).

    Optuna's GridSampler picks unvisited points at random in each process and stops the study from
    inside ``optimize``; with trials in separate processes, which ask one at a time, tying the point to
    the slot visits every point exactly once without coordination.
    """

    def __init__(self, grid: Mapping[str, list[Any]], slot: int):
        self._names = list(grid)
        self._points = list(itertools.product(*grid.values()))
        self._slot = slot

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        point = self._points[self._slot % len(self._points)]
        return point[self._names.index(param_name)]


class MedianRulePruner(optuna.pruners.BasePruner):
    """Auto early stopping: SageMaker's median rule for ``TrainingJobEarlyStoppingType`` Auto.

    After epoch e, take the running average of the objective over epochs 1..e of every other trial
    that has reported epoch e (finished, stopped or still running, not failed), and the median of those
    averages; a trial whose objective at epoch e is worse than that median (lower when maximizing, higher
    when minimizing) is stopped. Never at an epoch up to ``warmup_epochs``, nor before ``min_trials`` other
    trials have reported the epoch. Failed trials do not count: a trial that failed (out of memory at
    epoch 3, diverged, or interrupted and continued as another trial) says nothing sound about its
    hyperparameters at the epochs it reported, and would set the bar for the others. Only finite values
    count.
    """

    def __init__(self, warmup_epochs: int = PRUNE_WARMUP_EPOCHS, min_trials: int = PRUNE_MIN_TRIALS):
        self.warmup_epochs = warmup_epochs
        self.min_trials = min_trials

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        epoch = trial.last_step
        if epoch is None or epoch <= self.warmup_epochs:
            return False
        value = trial.intermediate_values[epoch]
        averages = []
        for other in study.get_trials(deepcopy=False):
            if other.number == trial.number or other.state == TrialState.FAIL or epoch not in other.intermediate_values:
                continue
            values = [v for e, v in other.intermediate_values.items() if e <= epoch and math.isfinite(v)]
            if values:
                averages.append(sum(values) / len(values))
        if len(averages) < self.min_trials:
            return False
        median = statistics.median(averages)
        return value < median if study.direction == optuna.study.StudyDirection.MAXIMIZE else value > median


def make_pruner(config: TuningConfig) -> optuna.pruners.BasePruner:
    if config.strategy == "Hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(config.fixed.epochs, 1),
                                              reduction_factor=3)
    if config.early_stopping_type == "Auto":
        return MedianRulePruner()
    return optuna.pruners.NopPruner()


def _open(config: TuningConfig, study_uri: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    journal = JournalStorage(ObjectJournal(storage.join(study_uri, JOURNAL_DIR)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(study_name=STUDY_NAME, storage=journal, direction=config.direction,
                               sampler=sampler, pruner=make_pruner(config), load_if_exists=True)


def open_study(study_uri: str, slot: int = 0) -> tuple[optuna.Study, TuningConfig]:
    config = load_config(study_uri)
    return _open(config, study_uri, make_sampler(config, slot)), config


def trial_model_uri(study_uri: str, slot: int) -> str:
    return storage.join(study_uri, TRIALS_DIR, str(slot), MODEL_DIR)


def trial_backup_uri(study_uri: str, slot: int, number: int) -> str:
    """Where a trial's training state is backed up after every epoch, so a retried slot resumes it.

    Keyed by the trial's number as well as its slot: a trial that replaces a failed one in the same
    slot must never resume the other's state.
    """
    return storage.join(study_uri, TRIALS_DIR, str(slot), BACKUP_DIR, str(number))


# --- One trial ----------------------------------------------------------------------------------------------


class _Pruning:
    """Keras callback: report the objective after every epoch; stop training when the pruner says so.

    A resumed trial already holds the values its interrupted attempt reported: epochs it reported are
    not reported again (Optuna would ignore them, with a warning), and ``resumed`` (the epochs at which
    earlier attempts resumed) gets the epoch this attempt starts at, recorded on the trial at once.
    """

    def __new__(cls, trial: optuna.Trial, key: str, reported: Iterable[int] = (),
                resumed: Sequence[int] | None = None):
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.pruned = False
                self.diverged: str | None = None
                self.known = set(reported)
                self.reported = max(self.known, default=0)
                self.resumed = None if resumed is None else list(resumed)
                self._started = False

            def on_train_begin(self, logs=None):
                self._started = False

            def on_epoch_begin(self, epoch, logs=None):
                if self._started or self.resumed is None:
                    return
                self._started = True
                self.resumed.append(epoch + 1)
                trial.set_user_attr("resumed_at_epochs", self.resumed)
                log.info("Trial %d resumed at epoch %d (%d epoch(s) were backed up before the interruption)",
                         trial.number, epoch + 1, epoch)

            def on_epoch_end(self, epoch, logs=None):
                value = (logs or {}).get(key)
                if value is None:
                    return
                if not math.isfinite(float(value)):
                    # Nothing to compare or continue: the trial fails with the reason (no NaN is reported).
                    self.diverged = diverged_reason(key.removeprefix("val_"), float(value), epoch + 1)
                    self.model.stop_training = True
                    return
                if epoch + 1 not in self.known:
                    trial.report(float(value), epoch + 1)
                    self.known.add(epoch + 1)
                self.reported = epoch + 1
                if trial.should_prune():
                    log.info("Trial %d stopped after epoch %d: %s %.4f is worse than the other trials at this "
                             "epoch", trial.number, epoch + 1, key, float(value))
                    self.pruned = True
                    self.model.stop_training = True

        return Callback()


def diverged_reason(metric: str, value: float, epoch: int) -> str:
    """Why a trial whose objective (``metric``, e.g. accuracy) is not a number failed: one line for the reports."""
    return (f"validation {metric} is {value} after epoch {epoch}: training diverged; try a lower learning_rate "
            "or another optimizer")


def run_trial(study_uri: str, slot: int, dataset_dir: str, *, jit_compile: bool = False,
              train_fn: Any = None) -> dict[str, Any]:
    """Ask the study for hyperparameters (or continue this slot's interrupted trial), train on
    ``dataset_dir``, tell the study; returns the trial's record.

    A failure of the trial itself (a bad combination, out of memory, a training error) is recorded
    with its reason and returned, not raised: the search goes on. ``train_fn`` replaces
    ``trainer.train.training.train`` (tests).
    """
    if train_fn is None:
        from trainer.train.training import train as train_fn
    study, config = open_study(study_uri, slot)
    interrupted = _take_over_interrupted(study, slot)
    resumed: list[int] | None = None
    reported: Iterable[int] = ()
    if interrupted is not None:
        # Same trial, same hyperparameters: training picks up its backup, the pruner its reported epochs.
        trial = optuna.trial.Trial(study, interrupted._trial_id)
        resumed = list(interrupted.user_attrs.get("resumed_at_epochs", []))
        reported = interrupted.intermediate_values
    else:
        trial = study.ask()
        trial.set_user_attr("slot", slot)
    model_uri = trial_model_uri(study_uri, slot)
    backup_uri = trial_backup_uri(study_uri, slot, trial.number)
    started = time.monotonic()
    tuned: dict[str, Any] = {}
    state, value, epochs, error = TrialState.FAIL, None, 0, None
    pruning = None
    try:
        if interrupted is not None:
            tuned = dict(interrupted.user_attrs["hyperparameters"])
            log.info("Trial %d (slot %d) was interrupted; continuing it from its last backup: %s", trial.number,
                     slot, ", ".join(f"{k}={v!r}" for k, v in tuned.items()))
        else:
            tuned = config.space.suggest(trial)
            trial.set_user_attr("hyperparameters", {k: search_space._plain(v) for k, v in tuned.items()})
            log.info("Trial %d (slot %d): %s", trial.number, slot,
                     ", ".join(f"{k}={v!r}" for k, v in tuned.items()))
        hp = hps.Hyperparameters.from_mapping({**config.fixed.to_dict(), **tuned})
        pruning = _Pruning(trial, f"val_{config.metric}", reported=reported, resumed=resumed)
        result = train_fn(hp, dataset_dir, model_uri, jit_compile=jit_compile, callbacks=[pruning],
                          backup_dir=backup_uri)
        epochs = result["epochs_completed"]
        value = result["validation_metrics"].get(config.metric)
        if pruning.diverged or (value is not None and not math.isfinite(value)):
            error = pruning.diverged or diverged_reason(config.metric, value, epochs)
            value = None
        elif pruning.pruned and epochs < hp.epochs:
            state = TrialState.PRUNED
        elif value is None:
            error = f"training reported no validation {config.metric}"
        else:
            state = TrialState.COMPLETE
    except Exception as err:  # noqa: BLE001 - any failure of one trial is recorded and the search goes on
        if isinstance(err, HyperparameterError):
            error = "invalid hyperparameters: " + "; ".join(err.problems)  # one line for the report
        else:
            error = f"{type(err).__name__}: {err}"
        epochs = pruning.reported if pruning is not None else 0
        log.warning("Trial %d (slot %d) failed: %s", trial.number, slot, error)
    # The trial is over either way: nothing will resume it (training removes the backup of a run that
    # ends; one that raised leaves its epochs behind).
    _remove_backup(backup_uri)
    seconds = round(time.monotonic() - started, 2)
    trial.set_user_attr("epochs", epochs)
    trial.set_user_attr("seconds", seconds)
    trial.set_user_attr("model_uri", model_uri)
    if error:
        trial.set_user_attr("error", error)
    if state == TrialState.COMPLETE:
        study.tell(trial, float(value))
    else:
        study.tell(trial, state=state)
    resumed_at = pruning.resumed if pruning is not None else resumed
    record = {"trial": trial.number, "slot": slot, "status": _STATUS[state], "value": value,
              "hyperparameters": {k: search_space._plain(v) for k, v in tuned.items()}, "epochs": epochs,
              "seconds": seconds, "error": error, "model_uri": model_uri, "resumed_at_epochs": resumed_at or []}
    progress_log.info("Trial %d %s after %d epoch(s) in %.0f s: %s = %s", trial.number, record["status"], epochs,
                      seconds, config.objective, "n/a" if value is None else f"{value:.4f}")
    return record


def run_lane(study_uri: str, lane: int, dataset_dir: str, *, jit_compile: bool = False,
             train_fn: Any = None) -> list[dict[str, Any]]:
    """Run one lane's trial slots one after another; a retried lane skips the slots it already finished."""
    config = load_config(study_uri)
    if not 0 <= lane < config.lanes:
        raise TuningError(f"lane {lane} does not exist: the search runs {config.lanes} lane(s)")
    study, _ = open_study(study_uri, lane)
    finished = {t.user_attrs.get("slot") for t in study.get_trials(deepcopy=False)
                if t.state.is_finished() and not str(t.user_attrs.get("error", "")).startswith("interrupted")}
    records = []
    for slot in config.lane_slots(lane):
        if slot in finished:
            log.info("Slot %d already ran (this lane was retried); skipping it", slot)
            continue
        record = run_trial(study_uri, slot, dataset_dir, jit_compile=jit_compile, train_fn=train_fn)
        records.append({**record, "direction": config.direction})
        if train_fn is None:
            # Trials share this process: free the last model's graph and memory before the next one.
            import keras

            keras.backend.clear_session()
    return records


def _take_over_interrupted(study: optuna.Study, slot: int) -> optuna.trial.FrozenTrial | None:
    """This slot's trial that a killed (preempted) attempt left running, to be continued; or None.

    Only a trial that had recorded its hyperparameters can be continued. One killed before that is
    recorded as failed ("interrupted"), and the slot gets a new trial, as does any other stale one.
    """
    running = sorted((t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                      if t.user_attrs.get("slot") == slot), key=lambda t: t.number)
    resumable = [t for t in running if "hyperparameters" in t.user_attrs]
    chosen = resumable[-1] if resumable else None
    for frozen in running:
        if frozen is not chosen:
            why = ("another trial of this slot was continued" if "hyperparameters" in frozen.user_attrs
                   else "the slot was retried as a new trial, since it was killed before it had its "
                   "hyperparameters")
            study._storage.set_trial_user_attr(frozen._trial_id, "error",
                                               f"interrupted (the pod was preempted or killed); {why}")
            study.tell(frozen.number, state=TrialState.FAIL)
    return chosen


def _remove_backup(backup_uri: str) -> None:
    """Remove a finished trial's backup folder (model weights of its last and best epochs)."""
    try:
        storage.delete_tree(backup_uri)
    except StorageError as err:  # a leftover backup costs space, not the search
        log.warning("Could not remove the trial backup %s: %s", backup_uri, err)


_STATUS = {TrialState.COMPLETE: "completed", TrialState.PRUNED: "stopped early", TrialState.FAIL: "failed",
           TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}


# --- Results ------------------------------------------------------------------------------------------------


def summarize(study_uri: str) -> dict[str, Any]:
    """The search's outcome: the tuning.json layout (objective, direction, strategy, best, trials)."""
    study, config = open_study(study_uri)
    trials = []
    for frozen in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        attrs = frozen.user_attrs
        value = frozen.value
        if frozen.state == TrialState.PRUNED and frozen.intermediate_values:
            # A stopped trial is shown with the last value it reported.
            value = frozen.intermediate_values[max(frozen.intermediate_values)]
        trials.append({"trial": frozen.number, "status": _STATUS[frozen.state], "value": value,
                       "hyperparameters": attrs.get("hyperparameters", {}), "epochs": attrs.get("epochs", 0),
                       "seconds": attrs.get("seconds"), "slot": attrs.get("slot"), "error": attrs.get("error"),
                       "model_uri": attrs.get("model_uri"), "resumed_at_epochs": attrs.get("resumed_at_epochs", []),
                       "intermediate": {str(k): v for k, v in sorted(frozen.intermediate_values.items())}})
    completed = [t for t in trials if t["status"] == "completed"]
    best = None
    if completed:
        pick = max if config.direction == "maximize" else min
        chosen = pick(completed, key=lambda t: t["value"])
        best = {"trial": chosen["trial"], "value": chosen["value"],
                "hyperparameters": hps.Hyperparameters.from_mapping(
                    {**config.fixed.to_dict(), **chosen["hyperparameters"]}).to_dict(),
                "model_uri": chosen["model_uri"]}
    return {"objective": config.objective, "direction": config.direction, "strategy": config.strategy,
            "early_stopping_type": config.early_stopping_type, "max_trials": config.max_trials,
            "parallel_trials": config.parallel_trials, "tuned": list(config.space.names),
            "ranges": config.space.to_sagemaker(), "best": best, "trials": trials}


def trial_metrics(trials: Sequence[Mapping[str, Any]], direction: str) -> dict[str, float]:
    """What a step logs as KFP Metrics for some trials: the count by status and the best completed value."""
    metrics = {f"trials_{status.replace(' ', '_')}": float(sum(1 for t in trials if t["status"] == status))
               for status in ("completed", "stopped early", "failed")}
    values = [t["value"] for t in trials if t["status"] == "completed"]
    if values:
        metrics["best_objective"] = float(max(values) if direction == "maximize" else min(values))
    return metrics


def require_best(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The best trial, or TuningError listing why every trial failed."""
    if summary["best"] is not None:
        return summary["best"]
    if not summary["trials"]:
        raise TuningError("the search ran no trial; check max_trials and the trial steps' logs")
    reasons = [f"trial {t['trial']}: {t['status']}" + (f" ({t['error']})" if t["error"] else "")
               for t in summary["trials"]]
    raise TuningError(f"no trial completed, so there is no best model; {len(reasons)} trial(s):\n  - "
                      + "\n  - ".join(reasons))


def best_hyperparameters_yaml(summary: Mapping[str, Any]) -> str:
    """The best trial's whole set of hyperparameters, as a file ``--params`` takes as it is."""
    best = require_best(summary)
    header = (f"# Best of {len(summary['trials'])} trials ({summary['strategy']}): {summary['objective']} = "
              f"{best['value']:.6g} (trial {best['trial']})\n")
    return header + hps.Hyperparameters.from_mapping(best["hyperparameters"]).to_yaml()


def select_best(study_uri: str, model_dir: str, report_dir: str) -> dict[str, Any]:
    """Copy the best trial's model to ``model_dir`` and write the reports to ``report_dir``.

    Writes ``tuning.json``, ``best_hyperparameters.yaml``, ``report.md`` and ``report.html``; the reports
    are written even when every trial failed, and then TuningError is raised with the reasons.
    """
    from trainer.tune import tuning_report

    summary = summarize(study_uri)
    storage.write_bytes(storage.join(report_dir, "tuning.json"), json.dumps(summary, indent=2).encode())
    storage.write_bytes(storage.join(report_dir, "report.md"), tuning_report.markdown(summary).encode())
    storage.write_bytes(storage.join(report_dir, "report.html"), tuning_report.html(summary).encode())
    best = require_best(summary)
    storage.write_bytes(storage.join(report_dir, "best_hyperparameters.yaml"),
                        best_hyperparameters_yaml(summary).encode())
    if storage.is_gcs(model_dir):
        raise ValueError("select_best copies the model to a local folder (the pipeline's output path)")
    storage.download_tree(best["model_uri"], model_dir)
    log.info("Best trial %d: %s = %.4f; model copied from %s", best["trial"], summary["objective"], best["value"],
             best["model_uri"])
    return summary
