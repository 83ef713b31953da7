"""Train the classifier on a converted data set and export the model directory (the pipeline's train step).

Decisions worth knowing:

* Input: the converted data set holds the original image files, so one conversion serves every
  model and image size. ``trainer.data.reader`` decodes and resizes them to ``input_size`` with
  ``image_resize_interpolation`` -- the functions and values the exported serving signature uses --
  during the first epoch, and caches the pixels for the later ones.
* Early stopping watches ``val_loss`` (``loss`` when there is no validation split, which is logged)
  and restores the weights of the best epoch, so the exported model and the reported final
  metrics are those of that epoch.
* ``reinitialize_top_layer``: a new run always gets a fresh head (there is none to keep; "False"
  is logged as having no effect). In incremental training "Auto" and "False" keep the earlier
  model's head and "True" starts a new one. The backbone always comes from the earlier model
  (``weights`` is then not used), and the network is rebuilt from this run's hyperparameters, so
  dropout, L2, augmentation and freezing follow this run.
* Distribution: ``MirroredStrategy`` over all GPUs when there are several; ``batch_size`` is the
  global batch, split evenly across them. Mixed precision (``mixed_float16``) only with a GPU;
  the head's output stays float32 and the exported model is a float32 copy, which serves on CPU
  as well as GPU.
* ``backup_dir``: the state is backed up after every epoch (``BackupAndRestore``), so a rerun of an
  interrupted step resumes and ends with ``epochs`` epochs in total; the per-epoch history is
  backed up with it, so the history covers every epoch. Early stopping's state (best value, best
  epoch and its weights, patience count) is backed up too, so after a resume it still knows the
  epochs before the interruption and the exported model is the best of all epochs. The order of the
  training images in each epoch is a function of ``random_seed`` and the epoch's number
  (``reader.make_dataset``), so a resumed run feeds every epoch exactly as an uninterrupted run does.
* Seeds: ``random_seed`` seeds initialisation, shuffling, dropout and augmentation, so a CPU run is
  repeatable; GPU kernels are not all deterministic.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import logging
import math
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from trainer import layout, storage
from trainer.data import reader
from trainer.errors import DataError, HyperparameterError, ImgclfError, ModelError, StorageError
from trainer.hyperparameters import Hyperparameters
from trainer.logs import duration, progress_logger
from trainer.train import export
from trainer.train import model as model_lib

log = logging.getLogger(__name__)
progress_log = progress_logger(__name__)

HISTORY_BACKUP_FILE = "imgclf_history.json"
EARLY_STOPPING_STATE_FILE = "imgclf_early_stopping.json"
# What keras.callbacks.BackupAndRestore writes in its folder.
BACKUP_WEIGHTS_FILE = "latest.weights.h5"
BACKUP_METADATA_FILE = "training_metadata.json"
BEST_WEIGHTS_PREFIX = "imgclf_best_weights-epoch-"


def train(hp: Hyperparameters, dataset_dir: str, model_dir: str, *, initial_model_dir: str | None = None,
          backup_dir: str | None = None, tensorboard_dir: str | None = None, jit_compile: bool = False,
          strategy: tf.distribute.Strategy | None = None,
          callbacks: Sequence[keras.callbacks.Callback] = ()) -> dict[str, Any]:
    """Train on ``dataset_dir``'s train split, validate on its validation split, export to ``model_dir``.

    Args:
      hp: the run's hyperparameters.
      dataset_dir: a converted data set (local path or gs:// URI).
      model_dir: where the model directory is written (local path or gs:// URI), see trainer.train.export.
      initial_model_dir: a model directory from an earlier run to continue from (incremental training).
      backup_dir: where the training state is backed up each epoch so a rerun resumes (local or gs://).
      tensorboard_dir: where TensorBoard logs are written, if anywhere.
      jit_compile: compile the training step with XLA.
      strategy: a tf.distribute strategy to use instead of the automatic choice (tests).
      callbacks: further Keras callbacks (tests, tooling).

    Returns:
      A JSON-serialisable dict: ``history`` (Keras-style per-epoch lists), ``epochs_completed``,
      ``stopped_early``, ``best_epoch`` (1-based, with early stopping, else None),
      ``images_per_second`` (training throughput), ``final_metrics`` (the Keras logs of the exported
      epoch, e.g. loss, accuracy, val_loss, val_accuracy), ``validation_metrics`` (the same without
      the ``val_`` prefix; empty without a validation split), ``num_classes``, ``train_count``,
      ``validation_count``, ``replicas``, ``mixed_precision``.
    """
    if tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        raise ImgclfError(f"tensorboard_dir={tensorboard_dir!r} was given but the tensorboard package is not "
                          "installed (TensorFlow no longer brings it); install it (pip install tensorboard) or "
                          "leave tensorboard_dir empty")
    keras.utils.set_random_seed(hp.random_seed)
    local_data = reader.local_dataset_dir(dataset_dir, ("train", "validation"))
    label_map = reader.read_label_map(local_data)
    num_classes = len(label_map)
    _check_data(hp, dataset_dir, local_data, label_map)
    train_count = reader.split_count(local_data, "train")
    validation_count = reader.split_count(local_data, "validation")

    strategy = strategy or choose_strategy()
    replicas = strategy.num_replicas_in_sync
    _check_batch_size(hp.batch_size, replicas)
    mixed_precision = bool(tf.config.list_logical_devices("GPU"))
    initial = load_initial_model(initial_model_dir, label_map, dataset_dir) if initial_model_dir else None
    log.info("Training %s at %d px on %d images of %d classes, validating on %d; batch %d over %d replica(s); "
             "%d epochs; optimizer %s, learning rate %g; mixed precision %s; XLA %s",
             hp.model, hp.input_size, train_count, num_classes, validation_count, hp.batch_size, replicas,
             hp.epochs, hp.optimizer, hp.learning_rate, "on" if mixed_precision else "off",
             "on" if jit_compile else "off")

    # The model's own input size and resize method, as its serving signature will use them: the data
    # set holds the original files, decoded and resized during the first epoch and cached.
    pixels = {"image_size": hp.input_size, "interpolation": hp.image_resize_interpolation}
    input_epoch = reader.epoch_variable()
    train_data = reader.make_dataset(local_data, "train", batch_size=hp.batch_size, training=True,
                                   seed=hp.random_seed, num_classes=num_classes, binary_mode=hp.binary_mode,
                                   epoch=input_epoch, **pixels)
    validation_data = None
    if validation_count:
        validation_data = reader.make_dataset(local_data, "validation", batch_size=hp.batch_size, training=False,
                                            seed=None, num_classes=num_classes, binary_mode=hp.binary_mode,
                                            **pixels)
    monitor = "val_loss" if validation_data is not None else "loss"
    if validation_data is None:
        log.warning("The data set has no validation split (validation_split_ratio was 0): no validation "
                    "metrics are reported%s", ", and early stopping watches the training loss"
                    if hp.early_stopping else "")

    previous_policy = keras.config.dtype_policy()
    if mixed_precision:
        keras.config.set_dtype_policy("mixed_float16")
    try:
        with strategy.scope():
            network = _build(hp, num_classes, initial)
            network.compile(optimizer=make_optimizer(hp), loss=make_loss(hp), metrics=make_metrics(hp),
                            jit_compile=jit_compile)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if jit_compile and not network.jit_compile:
        log.warning("jit_compile: Keras turned XLA off because a layer cannot be compiled with it (the random "
                    "rotation and zoom of augmentation cannot); training runs without XLA")
    log.info("%s: %s trainable and %s non-trainable parameters", network.name,
             f"{_count(network.trainable_weights):,}", f"{_count(network.non_trainable_weights):,}")

    recorder = _EpochRecorder(backup_dir)
    progress = ProgressLogger(train_count, hp.epochs)
    early_stopping = None
    all_callbacks: list[keras.callbacks.Callback] = [recorder, progress, _InputEpoch(input_epoch)]
    if hp.early_stopping:
        early_stopping = ResumableEarlyStopping(
            backup_dir, monitor=monitor, min_delta=hp.early_stopping_min_delta,
            patience=hp.early_stopping_patience, restore_best_weights=True, verbose=1)
        all_callbacks.append(early_stopping)
    if backup_dir:
        # Last: the history and early stopping's state are saved before the weights and the epoch
        # count, so a backup never has epochs without them.
        all_callbacks.append(StorageBackupAndRestore(backup_dir))
    if tensorboard_dir:
        all_callbacks.extend(tensorboard_callbacks(tensorboard_dir))
    all_callbacks.extend(callbacks)

    # shuffle=False: the input pipeline shuffles (seeded); Keras cannot shuffle a tf.data.Dataset.
    network.fit(train_data, validation_data=validation_data, epochs=hp.epochs, callbacks=all_callbacks,
                shuffle=False, verbose=2, class_weight=class_weights(hp, local_data, label_map))

    epochs = recorder.epochs
    history = _history(epochs)
    best_epoch = None
    if early_stopping is not None and early_stopping.best_weights is not None:
        best_epoch = early_stopping.best_epoch
    exported_epoch = best_epoch if best_epoch is not None else max(epochs, default=None)
    final_metrics = dict(epochs.get(exported_epoch, {})) if exported_epoch is not None else {}
    stopped_early = bool(early_stopping is not None and early_stopping.stopped_epoch > 0)
    if stopped_early:
        progress_log.info("Early stopping after epoch %d of %d; exporting the weights of epoch %d (best %s %.4f)",
                          early_stopping.stopped_epoch + 1, hp.epochs, best_epoch + 1, monitor, early_stopping.best)

    export.export_model(_inference_copy(network, hp, num_classes), model_dir, hp=hp, label_map=label_map,
                        history=history)
    return {
        "history": history,
        "epochs_completed": len(epochs),
        "stopped_early": stopped_early,
        "best_epoch": None if best_epoch is None else best_epoch + 1,
        "images_per_second": progress.images_per_second,
        "final_metrics": final_metrics,
        "validation_metrics": {k[len("val_"):]: v for k, v in final_metrics.items() if k.startswith("val_")},
        "num_classes": num_classes,
        "train_count": train_count,
        "validation_count": validation_count,
        "replicas": replicas,
        "mixed_precision": mixed_precision,
    }


# ---------------------------------------------------------------------------------------------
# Optimizer, loss, metrics, strategy
# ---------------------------------------------------------------------------------------------

def class_weights(hp: Hyperparameters, dataset_dir: str, label_map: Mapping[str, int]) -> dict[int, float] | None:
    """Keras ``class_weight`` for ``hp.class_weight``: None for "none"; for "balanced" each class index
    gets N / (K * n_c), N images in the training split, K classes, n_c images of the class (scikit-learn's
    "balanced"), so the weights average 1 over the images and every class adds the same to the loss."""
    if hp.class_weight == "none":
        return None
    counts = reader.read_manifest(dataset_dir)["splits"]["train"]["class_counts"]
    total, classes = sum(counts.values()), len(label_map)
    weights = {index: (total / (classes * counts[name]) if counts.get(name) else 1.0)
               for name, index in label_map.items()}
    log.info("class_weight=balanced: %s", ", ".join(f"{name} {weights[index]:.3g}"
                                                     for name, index in sorted(label_map.items(), key=lambda i: i[1])))
    return weights


def make_optimizer(hp: Hyperparameters) -> keras.optimizers.Optimizer:
    """The optimizer ``hp.optimizer`` with only its own parameters (the others are ignored)."""
    lr = hp.learning_rate
    if hp.optimizer == "adam":
        return keras.optimizers.Adam(lr, beta_1=hp.beta_1, beta_2=hp.beta_2, epsilon=hp.epsilon)
    if hp.optimizer == "sgd":
        return keras.optimizers.SGD(lr, momentum=hp.momentum)
    if hp.optimizer == "nesterov":
        return keras.optimizers.SGD(lr, momentum=hp.momentum, nesterov=True)
    if hp.optimizer == "rmsprop":
        return keras.optimizers.RMSprop(lr, rho=hp.rho, momentum=hp.momentum, epsilon=hp.epsilon)
    if hp.optimizer == "adagrad":
        return keras.optimizers.Adagrad(lr, initial_accumulator_value=hp.initial_accumulator_value,
                                        epsilon=hp.epsilon)
    if hp.optimizer == "adadelta":
        return keras.optimizers.Adadelta(lr, rho=hp.rho, epsilon=hp.epsilon)
    raise ValueError(f"unknown optimizer {hp.optimizer!r}")


def make_loss(hp: Hyperparameters) -> keras.losses.Loss:
    """Cross-entropy on probabilities with ``hp.label_smoothing``: binary in binary mode."""
    if hp.binary_mode:
        return keras.losses.BinaryCrossentropy(label_smoothing=hp.label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=hp.label_smoothing)


def make_metrics(hp: Hyperparameters) -> list[keras.metrics.Metric]:
    """accuracy; in binary mode also precision, recall, auc and prc (area under the PR curve)."""
    if not hp.binary_mode:
        return [keras.metrics.CategoricalAccuracy(name="accuracy")]
    return [keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.Precision(name="precision"),
            keras.metrics.Recall(name="recall"), keras.metrics.AUC(name="auc"),
            keras.metrics.AUC(curve="PR", name="prc")]


def choose_strategy() -> tf.distribute.Strategy:
    """MirroredStrategy over all GPUs when there are several, else the default (one device) strategy."""
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


# ---------------------------------------------------------------------------------------------
# Incremental training
# ---------------------------------------------------------------------------------------------

def load_initial_model(initial_model_dir: str, label_map: Mapping[str, int], dataset_dir: str) -> keras.Model:
    """The earlier model to continue from, after checking it was trained on the same classes."""
    layout.check_not_interrupted(initial_model_dir)
    path = storage.join(initial_model_dir, layout.MODEL_LABEL_MAP_FILE)
    try:
        earlier = json.loads(storage.read_bytes(path))
    except StorageError:
        raise ModelError(f"{path} is missing or unreadable: initial_model_dir must be a model directory "
                         "written by imgclf training (it holds model.keras and the label map)") from None
    except ValueError as err:
        raise ModelError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(earlier, dict) or set(earlier) != set(label_map):
        earlier_classes = sorted(earlier) if isinstance(earlier, dict) else earlier
        missing = sorted(set(label_map) - set(earlier)) if isinstance(earlier, dict) else sorted(label_map)
        extra = sorted(set(earlier) - set(label_map)) if isinstance(earlier, dict) else []
        raise ModelError(
            f"incremental training needs the same classes: the initial model {initial_model_dir} was trained "
            f"on {earlier_classes} but the data set {dataset_dir} has {sorted(label_map)} (new in the data: "
            f"{missing or 'none'}; only in the model: {extra or 'none'}). Train without an initial model "
            "to learn a different set of classes")
    if earlier != dict(label_map):
        raise ModelError(f"{path} numbers the classes differently ({earlier}) from the data set "
                         f"{dataset_dir} ({dict(label_map)}); re-convert the data or retrain from scratch")
    return model_lib.load_model(initial_model_dir)


def _build(hp: Hyperparameters, num_classes: int, initial: keras.Model | None) -> keras.Model:
    """A new network for ``hp``; with an initial model, its backbone (and head, unless replaced)."""
    if initial is None:
        if hp.reinitialize_top_layer == "False":
            log.info("reinitialize_top_layer=False has no effect in a new run: there is no earlier head "
                     "to keep, the head starts fresh")
        return model_lib.build_model(hp, num_classes)
    if hp.weights != "none":
        log.info("Incremental training: the backbone's weights come from the initial model; "
                 "weights=%r is not used", hp.weights)
    network = model_lib.build_model(dataclasses.replace(hp, weights="none"), num_classes)
    earlier_name = initial.name.removeprefix("imgclf_")
    _copy_weights(model_lib.backbone_of(initial), model_lib.backbone_of(network),
                  f"the initial model's backbone ({earlier_name}) does not match this run's ({hp.model}); set "
                  f"model (and image_size) to those of the initial model")
    if hp.reinitialize_top_layer == "True":
        log.info("Incremental training: new classification head (reinitialize_top_layer=True)")
    else:
        _copy_weights(model_lib.head_dense(initial), model_lib.head_dense(network),
                      "the initial model's head does not fit this run's (binary_mode differs?); set "
                      "binary_mode as in the initial run, or reinitialize_top_layer to True for a new head")
        log.info("Incremental training: keeping the initial model's classification head "
                 "(reinitialize_top_layer=%s)", hp.reinitialize_top_layer)
    return network


def _copy_weights(source: keras.layers.Layer, target: keras.layers.Layer, mismatch: str) -> None:
    weights = source.get_weights()
    shapes = [w.shape for w in weights]
    expected = [tuple(w.shape) for w in target.weights]
    if shapes != expected:
        raise ModelError(f"{mismatch} ({len(shapes)} weight arrays vs {len(expected)} expected)")
    target.set_weights(weights)


def _inference_copy(network: keras.Model, hp: Hyperparameters, num_classes: int) -> keras.Model:
    """A float32, single-device, uncompiled twin of ``network`` with its weights: what is exported.

    Mixed-precision layers and mirrored variables are training machinery; the exported model
    should serve anywhere, and without an optimizer state it is smaller.
    """
    twin = model_lib.build_model(dataclasses.replace(hp, weights="none"), num_classes)
    twin.set_weights(network.get_weights())
    return twin


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def _check_data(hp: Hyperparameters, dataset_dir: str, local_dir: str, label_map: Mapping[str, int]) -> None:
    if reader.split_count(local_dir, "train") == 0:
        raise DataError(f"{dataset_dir} has no training images; check validation_split_ratio and "
                        "test_split_ratio, and the data set")
    if hp.binary_mode and len(label_map) != 2:
        raise HyperparameterError([f"binary_mode: True needs exactly 2 classes, but {dataset_dir} has "
                                   f"{len(label_map)} ({', '.join(sorted(label_map))}); set binary_mode to False"])


def _check_batch_size(batch_size: int, replicas: int) -> None:
    if batch_size < replicas:
        raise HyperparameterError([f"batch_size: got {batch_size}, but training runs on {replicas} devices and "
                                   "each needs at least one image per step; set batch_size to a multiple of "
                                   f"{replicas}"])
    if batch_size % replicas:
        log.warning("batch_size %d is not a multiple of the %d devices: they get unequal shares of each batch",
                    batch_size, replicas)
    elif replicas > 1:
        log.info("Global batch %d = %d per device x %d devices", batch_size, batch_size // replicas, replicas)


# ---------------------------------------------------------------------------------------------
# Progress and history
# ---------------------------------------------------------------------------------------------

class _InputEpoch(keras.callbacks.Callback):
    """Tells the input pipeline the number of the first epoch of ``fit`` (k after a resume at epoch k),
    so each epoch's order is that of an uninterrupted run (``reader.make_dataset``); the pipeline counts
    the later epochs itself, since Keras starts an epoch's pass before that epoch's callbacks."""

    def __init__(self, variable: tf.Variable):
        super().__init__()
        self.variable = variable
        self._first = True

    def on_train_begin(self, logs=None):
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first:
            self.variable.assign(epoch)
            self._first = False


class ProgressLogger(keras.callbacks.Callback):
    """One log line per epoch: metrics, duration, training throughput, elapsed time and ETA."""

    def __init__(self, train_count: int, epochs: int):
        super().__init__()
        self.train_count = train_count
        self.total_epochs = epochs
        self.rates: list[float] = []
        self.durations: list[float] = []
        self._start = self._epoch_start = 0.0
        self._validation_start: float | None = None

    def on_train_begin(self, logs=None):
        self._start = time.perf_counter()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_start = time.perf_counter()
        self._validation_start = None

    def on_test_begin(self, logs=None):
        # During fit this is the end-of-epoch validation: the training part of the epoch is over.
        if self._validation_start is None:
            self._validation_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        training_seconds = max((self._validation_start or now) - self._epoch_start, 1e-9)
        self.rates.append(self.train_count / training_seconds)
        self.durations.append(now - self._epoch_start)
        # The first epoch includes tracing the graph and decoding the images into the input pipeline's
        # cache; later epochs predict the remaining time better.
        typical = statistics.median(self.durations[1:] or self.durations)
        remaining = self.total_epochs - epoch - 1
        metrics = ", ".join(f"{name} {float(value):.4f}" for name, value in (logs or {}).items())
        progress_log.info("Epoch %d/%d: %s | %.1f s, %.0f images/s | elapsed %s, about %s left", epoch + 1,
                          self.total_epochs, metrics, self.durations[-1], self.rates[-1],
                          duration(now - self._start), duration(remaining * typical))

    @property
    def images_per_second(self) -> float:
        """Median training throughput over the epochs after the first (which includes tracing and decoding)."""
        rates = self.rates[1:] or self.rates
        return float(statistics.median(rates)) if rates else 0.0


class _EpochRecorder(keras.callbacks.Callback):
    """Per-epoch logs by absolute epoch number, backed up next to the training state when there is a
    backup, so that a resumed run still reports the epochs before the interruption."""

    def __init__(self, backup_dir: str | None):
        super().__init__()
        self.path = storage.join(backup_dir, HISTORY_BACKUP_FILE) if backup_dir else None
        self.epochs: dict[int, dict[str, float]] = {}
        self._first_epoch_seen = False
        # None: no backup yet, a fresh run (any other read error raises rather than lose the epochs).
        saved = storage.read_bytes_if_exists(self.path) if self.path else None
        if saved is not None:
            self.epochs = {int(k): v for k, v in json.loads(saved).items()}
            log.info("Resuming: %d epoch(s) were completed before the interruption", len(self.epochs))

    def on_epoch_begin(self, epoch, logs=None):
        if not self._first_epoch_seen:
            # Epochs from this one on are (re)run; a record of them belongs to an abandoned attempt.
            self.epochs = {e: v for e, v in self.epochs.items() if e < epoch}
            self._first_epoch_seen = True

    def on_epoch_end(self, epoch, logs=None):
        self.epochs[epoch] = {name: float(value) for name, value in (logs or {}).items()}
        if self.path:
            storage.write_bytes(self.path, json.dumps(self.epochs).encode("utf-8"))


class StorageBackupAndRestore(keras.callbacks.BackupAndRestore):
    """Keras's BackupAndRestore, with a gs:// folder read and written through ``trainer.storage``.

    Keras writes its backup with ``tf.io.gfile``, whose GCS client has its own credentials and
    settings (it ignores ``STORAGE_EMULATOR_HOST``, for one). For a gs:// ``backup_dir`` Keras works
    on a local folder instead: the backup is copied down before training, each epoch's weights and
    then its epoch count are uploaded, and the remote backup is removed once training has finished.
    """

    def __init__(self, backup_dir: str):
        self.remote = backup_dir if storage.is_gcs(backup_dir) else None
        super().__init__(tempfile.mkdtemp(prefix="imgclf-backup-") if self.remote else backup_dir)

    def on_train_begin(self, logs=None):
        if self.remote:
            try:
                names = storage.list_files(self.remote)
            except StorageError:
                names = []  # nothing backed up yet (an unreadable location fails at the first upload)
            for name in (BACKUP_WEIGHTS_FILE, BACKUP_METADATA_FILE):
                if name in names:
                    storage.download_file(storage.join(self.remote, name), os.path.join(self.backup_dir, name))
        super().on_train_begin(logs)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if self.remote:
            # The weights first: the epoch count never runs ahead of them.
            for name in (BACKUP_WEIGHTS_FILE, BACKUP_METADATA_FILE):
                storage.upload_file(os.path.join(self.backup_dir, name), storage.join(self.remote, name))

    def on_train_end(self, logs=None):
        super().on_train_end(logs)
        if self.remote:
            # Everything in the backup folder (also the history and early stopping's state) served this run.
            try:
                storage.delete_tree(self.remote)
            except StorageError as err:  # a leftover backup costs space, not the finished training
                log.warning("Could not remove the backup %s: %s", self.remote, err)


def tensorboard_callbacks(tensorboard_dir: str) -> list[keras.callbacks.Callback]:
    """Keras's TensorBoard callback; for a gs:// folder it writes locally and ``trainer.storage``
    uploads the logs after every epoch (for the same reason as ``StorageBackupAndRestore``)."""
    if not storage.is_gcs(tensorboard_dir):
        return [keras.callbacks.TensorBoard(log_dir=tensorboard_dir)]
    local = tempfile.mkdtemp(prefix="imgclf-tensorboard-")

    class Upload(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            storage.upload_tree(local, tensorboard_dir)

        def on_train_end(self, logs=None):
            storage.upload_tree(local, tensorboard_dir)
            shutil.rmtree(local, ignore_errors=True)

    # Upload after TensorBoard has written the epoch.
    return [keras.callbacks.TensorBoard(log_dir=local), Upload()]


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's EarlyStopping whose state survives an interruption when there is a backup folder.

    After each epoch the best value, the best epoch, the patience count and (when the best epoch
    changed) the best weights are written to ``backup_dir``. The state written before it, and its
    weights, are kept as well: the backup of the model (written after this) may not have happened
    when the run was stopped, and the rerun then repeats that epoch and needs the state before it.
    """

    def __init__(self, backup_dir: str | None, **kwargs):
        super().__init__(**kwargs)
        self.state_path = storage.join(backup_dir, EARLY_STOPPING_STATE_FILE) if backup_dir else None
        self._resume_checked = False
        self._state: dict[str, Any] | None = None

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._resume_checked = False

    def on_epoch_begin(self, epoch, logs=None):
        if self._resume_checked or not self.state_path:
            return
        self._resume_checked = True
        saved = self._read_state()
        # The newest state from before this epoch: one written for this epoch or later belongs to an
        # attempt whose model backup did not happen.
        for state in (saved, (saved or {}).get("previous")):
            if state and state["epoch"] < epoch:
                self._restore(state)
                return

    def on_epoch_end(self, epoch, logs=None):
        best_epoch = self.best_epoch if self.best_weights is not None else None
        super().on_epoch_end(epoch, logs)
        if not self.state_path or self.best_weights is None:
            return
        previous = self._state
        weights = (previous or {}).get("weights")
        if self.best_epoch != best_epoch or weights is None:
            weights = f"{BEST_WEIGHTS_PREFIX}{self.best_epoch:05d}.npz"
            _write_arrays(storage.join(self.state_path.rsplit("/", 1)[0], weights), self.best_weights)
        state = {"epoch": epoch, "best": float(self.best), "best_epoch": self.best_epoch, "wait": self.wait,
                 "stopped_epoch": self.stopped_epoch, "weights": weights}
        if previous:
            state["previous"] = {k: v for k, v in previous.items() if k != "previous"}
        storage.write_bytes(self.state_path, json.dumps(state).encode("utf-8"))
        self._state = state
        # Weights no state refers to any more.
        stale = {(previous or {}).get("previous", {}).get("weights"), (previous or {}).get("weights")}
        for name in stale - {state["weights"], state.get("previous", {}).get("weights"), None}:
            storage.delete(storage.join(self.state_path.rsplit("/", 1)[0], name))

    def _read_state(self) -> dict[str, Any] | None:
        raw = storage.read_bytes_if_exists(self.state_path)  # None: no backup yet, a fresh run
        return None if raw is None else json.loads(raw)

    def _restore(self, state: Mapping[str, Any]) -> None:
        folder = self.state_path.rsplit("/", 1)[0]
        self.best = state["best"]
        self.best_epoch = state["best_epoch"]
        self.wait = state["wait"]
        self.best_weights = _read_arrays(storage.join(folder, state["weights"])) if self.restore_best_weights \
            else None
        self._state = dict(state)
        log.info("Resuming early stopping: best %s %.4f at epoch %d, %d epoch(s) without improvement",
                 self.monitor, self.best, self.best_epoch + 1, self.wait)


def _write_arrays(uri: str, arrays: Sequence[Any]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    storage.write_bytes(uri, buffer.getvalue())


def _read_arrays(uri: str) -> list[Any]:
    with np.load(io.BytesIO(storage.read_bytes(uri))) as loaded:
        return [loaded[f"arr_{i}"] for i in range(len(loaded.files))]


def _history(epochs: Mapping[int, Mapping[str, float]]) -> dict[str, list[float]]:
    """Keras History layout: one list per metric, in epoch order."""
    history: dict[str, list[float]] = {}
    for epoch in sorted(epochs):
        for name, value in epochs[epoch].items():
            history.setdefault(name, []).append(value)
    return history


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _count(weights) -> int:
    return sum(math.prod(w.shape) for w in weights)


