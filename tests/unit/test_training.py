"""Tests for trainer.train.training: every hyperparameter's effect on a run, incremental training, resuming,
distribution, and small_cnn's accuracy on real data (scikit-learn's handwritten digits)."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import subprocess
import sys
import textwrap
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.unit.test_data import write_arrays, write_dataset
from trainer.data import reader
from trainer.errors import DataError, HyperparameterError, ImgclfError, ModelError
from trainer.hyperparameters import OPTIMIZERS, Hyperparameters
from trainer.images import resize_image
from trainer.train import model as model_lib
from trainer.train import training

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small(**overrides) -> Hyperparameters:
    """Hyperparameters for a fast run: small_cnn at 16 px, 1 epoch, batch 8."""
    values = dict(model="small_cnn", weights="none", image_size=16, epochs=1, batch_size=8)
    values.update(overrides)
    return Hyperparameters(**values)


def write_digits(root: str, size: int = 32, seed: int = 0) -> str:
    """scikit-learn's 1,797 handwritten digits (8x8, 0-16) as a data set of ``size``-px RGB images,
    split per class 70/20/10 into train/validation/test like conversion's defaults."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    pixels = np.stack([resize_image(np.repeat(g[:, :, None], 3, axis=2), size, "bilinear").numpy() for g in gray])
    rng = np.random.default_rng(seed)
    parts: dict[str, list[int]] = {"train": [], "validation": [], "test": []}
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(digits.target == digit))
        n_validation, n_test = round(0.2 * len(members)), round(0.1 * len(members))
        parts["validation"] += list(members[:n_validation])
        parts["test"] += list(members[n_validation:n_validation + n_test])
        parts["train"] += list(members[n_validation + n_test:])
    splits = {}
    for split, indices in parts.items():
        indices = rng.permutation(indices)
        splits[split] = (pixels[indices], digits.target[indices].astype(np.int64))
    return write_arrays(root, tuple(str(d) for d in range(10)), splits, shards=2)


class Recorder(keras.callbacks.Callback):
    """Counts epochs and steps, and keeps the weights the network starts training with."""

    def __init__(self):
        super().__init__()
        self.epochs: list[int] = []
        self.steps = 0
        self.initial: dict[str, list[np.ndarray]] = {}

    def on_train_begin(self, logs=None):
        for name in (model_lib.BACKBONE_LAYER, model_lib.HEAD_DENSE_LAYER):
            self.initial[name] = [np.array(w) for w in self.model.get_layer(name).get_weights()]

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1


def weights_of(model_dir: str, layer: str) -> list[np.ndarray]:
    return model_lib.load_model(model_dir).get_layer(layer).get_weights()


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data") / "ds")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """One finished run (2 epochs) shared by the export-layout and incremental-training tests."""
    model_dir = str(tmp_path_factory.mktemp("model") / "model")
    result = training.train(small(epochs=2), dataset, model_dir)
    return model_dir, result


# --- optimizer, loss, metrics ----------------------------------------------------------------

@pytest.mark.parametrize("name, cls, expected", [
    ("adam", keras.optimizers.Adam, {"beta_1": 0.8, "beta_2": 0.98, "epsilon": 0.01}),
    ("sgd", keras.optimizers.SGD, {"momentum": 0.5, "nesterov": False}),
    ("nesterov", keras.optimizers.SGD, {"momentum": 0.5, "nesterov": True}),
    ("rmsprop", keras.optimizers.RMSprop, {"rho": 0.7, "momentum": 0.5, "epsilon": 0.01}),
    ("adagrad", keras.optimizers.Adagrad, {"initial_accumulator_value": 0.3, "epsilon": 0.01}),
    ("adadelta", keras.optimizers.Adadelta, {"rho": 0.7, "epsilon": 0.01}),
])
def test_optimizer_gets_its_own_parameters(name, cls, expected):
    hp = small(optimizer=name, learning_rate=0.05, beta_1=0.8, beta_2=0.98, epsilon=0.01, momentum=0.5, rho=0.7,
               initial_accumulator_value=0.3)
    optimizer = training.make_optimizer(hp)
    assert type(optimizer) is cls
    config = optimizer.get_config()
    assert config["learning_rate"] == pytest.approx(0.05)
    for key, value in expected.items():
        assert config[key] == pytest.approx(value), key


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_ignores_other_optimizers_parameters(name):
    own = training.make_optimizer(small(optimizer=name)).get_config()
    others = training.make_optimizer(small(optimizer=name, beta_1=0.1, beta_2=0.2, epsilon=0.3, momentum=0.4,
                                           rho=0.5, initial_accumulator_value=0.6)).get_config()
    used = {"adam": {"beta_1", "beta_2", "epsilon"}, "sgd": {"momentum"}, "nesterov": {"momentum"},
            "rmsprop": {"rho", "momentum", "epsilon"}, "adagrad": {"initial_accumulator_value", "epsilon"},
            "adadelta": {"rho", "epsilon"}}[name]
    differing = {key for key in own if own[key] != others[key]} - {"name"}  # names are made unique
    assert differing == used


def test_loss_applies_label_smoothing():
    loss = training.make_loss(small(label_smoothing=0.3))
    assert isinstance(loss, keras.losses.CategoricalCrossentropy)
    assert loss.get_config()["label_smoothing"] == pytest.approx(0.3)
    # 0.3 smoothing over 3 classes: targets 0.8 / 0.1 / 0.1, so a perfect one-hot prediction is penalised.
    one_hot = np.array([[1.0, 0.0, 0.0]], np.float32)
    assert float(loss(one_hot, np.array([[0.8, 0.1, 0.1]], np.float32))) < float(loss(one_hot, one_hot * 0.9999 + 1e-5))
    binary = training.make_loss(small(binary_mode=True, label_smoothing=0.2))
    assert isinstance(binary, keras.losses.BinaryCrossentropy)
    assert binary.get_config()["label_smoothing"] == pytest.approx(0.2)


def test_metrics():
    assert [m.name for m in training.make_metrics(small())] == ["accuracy"]
    metrics = training.make_metrics(small(binary_mode=True))
    assert [m.name for m in metrics] == ["accuracy", "precision", "recall", "auc", "prc"]
    assert metrics[4].curve.name == "PR"


def test_default_strategy_without_several_gpus():
    assert training.choose_strategy().num_replicas_in_sync == 1


# --- a whole run -----------------------------------------------------------------------------

def test_run_exports_the_model_and_reports_the_run(trained, caplog):
    model_dir, result = trained
    assert sorted(os.listdir(model_dir)) == ["class_label_to_prediction_index.json", "history.json",
                                             "hyperparameters.yaml", "model.keras", "model.tflite", "saved_model"]
    assert result["epochs_completed"] == 2 and not result["stopped_early"] and result["best_epoch"] is None
    assert result["num_classes"] == 3 and result["train_count"] == 48 and result["validation_count"] == 12
    assert set(result["history"]) == {"loss", "accuracy", "val_loss", "val_accuracy"}
    assert all(len(values) == 2 for values in result["history"].values())
    assert result["final_metrics"]["val_loss"] == result["history"]["val_loss"][-1]
    assert result["validation_metrics"] == {"loss": result["history"]["val_loss"][-1],
                                            "accuracy": result["history"]["val_accuracy"][-1]}
    assert result["images_per_second"] > 0
    with open(os.path.join(model_dir, "history.json")) as handle:
        assert json.load(handle) == result["history"]
    json.dumps(result)  # the pipeline logs it as metrics


def test_progress_is_logged_per_epoch(tmp_path, dataset, caplog):
    caplog.set_level(logging.INFO, logger="trainer.train.training")
    training.train(small(epochs=2), dataset, str(tmp_path / "model"))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch ")]
    assert len(lines) == 2
    assert lines[0].startswith("Epoch 1/2: ") and "images/s" in lines[0] and "left" in lines[0]
    assert "val_accuracy" in lines[1]


def test_tensorboard_logs(tmp_path, dataset):
    tensorboard_dir = str(tmp_path / "tb")
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(ImgclfError, match="tensorboard package is not installed"):
            training.train(small(), dataset, str(tmp_path / "model"), tensorboard_dir=tensorboard_dir)
        assert not os.path.exists(tmp_path / "model")  # refused before training
        return
    training.train(small(), dataset, str(tmp_path / "model"), tensorboard_dir=tensorboard_dir)
    assert [f for _, _, files in os.walk(tensorboard_dir) for f in files if f.startswith("events.out")]


class Inspect(keras.callbacks.Callback):
    """Notes how the network was compiled, as training starts."""

    def on_train_begin(self, logs=None):
        self.optimizer = type(self.model.optimizer).__name__
        self.jit_compile = self.model.jit_compile
        self.dtypes = {name: self.model.get_layer(name).compute_dtype
                       for name in (model_lib.BACKBONE_LAYER, model_lib.HEAD_DENSE_LAYER)}


def test_mixed_precision_when_a_gpu_is_present(tmp_path, dataset, monkeypatch):
    real = tf.config.list_logical_devices
    gpu = [tf.config.LogicalDevice("/device:GPU:0", "GPU")]
    monkeypatch.setattr(tf.config, "list_logical_devices", lambda kind=None: gpu if kind == "GPU" else real(kind))
    inspect = Inspect()
    result = training.train(small(), dataset, str(tmp_path / "model"), callbacks=[inspect])
    monkeypatch.undo()
    assert result["mixed_precision"] and result["replicas"] == 1  # one GPU: no MirroredStrategy
    assert inspect.optimizer == "LossScaleOptimizer"
    assert inspect.dtypes == {"backbone": "float16", "head_dense": "float32"}
    # The exported model is float32, and the global policy is restored.
    assert model_lib.load_model(str(tmp_path / "model")).get_layer("backbone").compute_dtype == "float32"
    assert keras.config.dtype_policy().name == "float32"


def test_no_mixed_precision_on_cpu(tmp_path, dataset):
    inspect = Inspect()
    result = training.train(small(), dataset, str(tmp_path / "model"), callbacks=[inspect])
    assert not result["mixed_precision"]
    assert inspect.dtypes == {"backbone": "float32", "head_dense": "float32"}
    assert inspect.optimizer == "Adam" and inspect.jit_compile is False


@pytest.mark.slow
def test_jit_compile_reaches_compile(tmp_path, dataset):
    inspect = Inspect()
    training.train(small(), dataset, str(tmp_path / "model"), jit_compile=True, callbacks=[inspect])
    assert inspect.jit_compile is True


def test_batch_size_is_the_global_batch(tmp_path, dataset):
    recorder = Recorder()
    training.train(small(batch_size=10), dataset, str(tmp_path / "model"), callbacks=[recorder])
    assert recorder.steps == math.ceil(48 / 10)


def test_early_stopping_stops_and_exports_the_best_epoch(tmp_path, dataset):
    # min_delta 1.0: no epoch after the first counts as an improvement.
    hp = small(epochs=5, early_stopping=True, early_stopping_patience=1, early_stopping_min_delta=1.0)
    result = training.train(hp, dataset, str(tmp_path / "model"))
    assert result["stopped_early"]
    assert result["epochs_completed"] == 2
    assert result["best_epoch"] == 1
    assert result["final_metrics"]["val_loss"] == result["history"]["val_loss"][0]


def test_without_validation_split_training_loss_is_monitored(tmp_path, caplog):
    dataset = write_dataset(tmp_path / "ds", counts={"train": 24})
    caplog.set_level(logging.WARNING, logger="trainer.train.training")
    hp = small(epochs=2, early_stopping=True, early_stopping_min_delta=1.0, early_stopping_patience=1)
    result = training.train(hp, dataset, str(tmp_path / "model"))
    assert result["validation_count"] == 0 and result["validation_metrics"] == {}
    assert "val_loss" not in result["history"]
    assert result["stopped_early"]  # watched "loss", which exists
    assert any("no validation split" in r.getMessage() and "training loss" in r.getMessage()
               for r in caplog.records)


def test_train_only_top_layer_freezes_the_backbone(tmp_path, dataset):
    recorder = Recorder()
    model_dir = str(tmp_path / "model")
    training.train(small(train_only_top_layer=True, epochs=2), dataset, model_dir, callbacks=[recorder])
    # Batch-norm moving statistics included: a frozen backbone runs in inference mode.
    assert same(weights_of(model_dir, model_lib.BACKBONE_LAYER), recorder.initial[model_lib.BACKBONE_LAYER])
    assert not same(weights_of(model_dir, model_lib.HEAD_DENSE_LAYER), recorder.initial[model_lib.HEAD_DENSE_LAYER])


def test_whole_network_trains_by_default(trained, tmp_path, dataset):
    recorder = Recorder()
    model_dir = str(tmp_path / "model")
    training.train(small(), dataset, model_dir, callbacks=[recorder])
    assert not same(weights_of(model_dir, model_lib.BACKBONE_LAYER), recorder.initial[model_lib.BACKBONE_LAYER])


def test_binary_mode_reports_binary_metrics(tmp_path):
    dataset = write_dataset(tmp_path / "ds", classes=("blue", "red"))
    result = training.train(small(binary_mode=True, eval_metric="auc"), dataset, str(tmp_path / "model"))
    assert {"precision", "recall", "auc", "prc", "val_auc", "val_prc"} <= set(result["history"])
    assert model_lib.load_model(str(tmp_path / "model")).output_shape == (None, 1)


def test_binary_mode_needs_two_classes(tmp_path, dataset):
    with pytest.raises(HyperparameterError, match="binary_mode: True needs exactly 2 classes.*has 3"):
        training.train(small(binary_mode=True), dataset, str(tmp_path / "model"))


@pytest.mark.slow
def test_seed_makes_runs_repeatable(tmp_path, dataset):
    first = training.train(small(augmentation=True), dataset, str(tmp_path / "a"))
    second = training.train(small(augmentation=True), dataset, str(tmp_path / "b"))
    assert first["history"] == second["history"]


def test_one_data_set_trains_models_of_any_image_size(tmp_path, dataset):
    """The records hold image files: a run resizes them to its own input size and method."""
    result = training.train(small(image_size=24, image_resize_interpolation="area"), dataset, str(tmp_path / "model"))
    assert result["epochs_completed"] == 1
    assert model_lib.load_model(str(tmp_path / "model")).input_shape == (None, 24, 24, 3)


def test_data_set_of_the_old_pixel_format_is_refused(tmp_path):
    dataset = write_dataset(tmp_path / "ds", counts={"train": 6})
    manifest_path = os.path.join(dataset, reader.MANIFEST_FILE)
    with open(manifest_path) as handle:
        manifest = json.load(handle)
    with open(manifest_path, "w") as handle:
        json.dump({**manifest, "format_version": 1}, handle)
    with pytest.raises(DataError, match="format version 1.*re-run the conversion step"):
        training.train(small(), dataset, str(tmp_path / "model"))


# --- incremental training ----------------------------------------------------------------------

@pytest.mark.parametrize("reinitialize, head_kept", [("Auto", True), ("False", True), ("True", False)])
def test_incremental_training_continues_from_the_earlier_model(trained, tmp_path, dataset, reinitialize,
                                                               head_kept):
    earlier_dir, _ = trained
    recorder = Recorder()
    hp = small(reinitialize_top_layer=reinitialize, dropout_rate=0.5)
    training.train(hp, dataset, str(tmp_path / "model"), initial_model_dir=earlier_dir, callbacks=[recorder])
    assert same(recorder.initial[model_lib.BACKBONE_LAYER], weights_of(earlier_dir, model_lib.BACKBONE_LAYER))
    earlier_head = weights_of(earlier_dir, model_lib.HEAD_DENSE_LAYER)
    assert same(recorder.initial[model_lib.HEAD_DENSE_LAYER], earlier_head) == head_kept
    # The network follows this run's hyperparameters, not the earlier run's.
    rebuilt = model_lib.load_model(str(tmp_path / "model"))
    assert rebuilt.get_layer(model_lib.HEAD_DROPOUT_LAYER).rate == 0.5


def test_incremental_training_refuses_another_class_set(trained, tmp_path):
    earlier_dir, _ = trained
    other = write_dataset(tmp_path / "ds", classes=("blue", "green", "yellow"))
    with pytest.raises(ModelError, match=r"same classes.*\['blue', 'green', 'red'\].*\['blue', 'green', "
                                         r"'yellow'\].*new in the data: \['yellow'\]; only in the model: \['red'\]"):
        training.train(small(), other, str(tmp_path / "model"), initial_model_dir=earlier_dir)


def test_incremental_training_refuses_another_backbone(trained, tmp_path):
    earlier_dir, _ = trained
    hp = small(model="mobilenet_v2", image_size=32)
    dataset = write_dataset(tmp_path / "ds", size=32)
    with pytest.raises(ModelError, match=r"initial model's backbone \(small_cnn\) does not match this run's "
                                         r"\(mobilenet_v2\)"):
        training.train(hp, dataset, str(tmp_path / "model"), initial_model_dir=earlier_dir)


def test_incremental_training_needs_a_model_directory(tmp_path, dataset):
    with pytest.raises(ModelError, match="class_label_to_prediction_index.json is missing or unreadable"):
        training.train(small(), dataset, str(tmp_path / "model"), initial_model_dir=str(tmp_path))


# --- resuming an interrupted run ------------------------------------------------------------------

class Interrupt(keras.callbacks.Callback):
    """Fails the run at the end of an epoch, after the backup of that epoch was written."""

    def __init__(self, after_epoch: int):
        super().__init__()
        self.after_epoch = after_epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.after_epoch:
            raise RuntimeError("simulated preemption")


@pytest.mark.slow
def test_interrupted_run_resumes_from_the_backup(tmp_path, dataset):
    hp = small(epochs=3)
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        training.train(hp, dataset, str(tmp_path / "model"), backup_dir=backup_dir, callbacks=[Interrupt(0)])
    assert os.listdir(backup_dir)
    recorder = Recorder()
    result = training.train(hp, dataset, str(tmp_path / "model"), backup_dir=backup_dir, callbacks=[recorder])
    assert recorder.epochs == [1, 2]  # only the epochs that had not run
    assert result["epochs_completed"] == 3
    assert all(len(values) == 3 for values in result["history"].values())
    assert not os.path.exists(backup_dir)  # removed once the run completed
    # The resumed run started from the backed-up weights, not from a fresh initialisation.
    fresh = Recorder()
    training.train(small(epochs=1), dataset, str(tmp_path / "fresh"), callbacks=[fresh])
    assert not same(recorder.initial[model_lib.BACKBONE_LAYER], fresh.initial[model_lib.BACKBONE_LAYER])


# --- distribution ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_mirrored_strategy_splits_the_global_batch(tmp_path, dataset):
    """Two logical CPU devices stand in for two GPUs; a subprocess, because devices are fixed at TF start."""
    script = textwrap.dedent(f"""
        import json, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        from tests.unit.test_training import Recorder, small
        from trainer.train import training
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        recorder = Recorder()
        result = training.train(small(batch_size=10, epochs=2), {str(dataset)!r}, {str(tmp_path / "model")!r},
                                strategy=strategy, callbacks=[recorder])
        print(json.dumps({{"replicas": result["replicas"], "steps": recorder.steps,
                          "loss": result["history"]["loss"]}}))
    """)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2
    assert report["steps"] == 2 * math.ceil(48 / 10)  # batch_size is global: 5 images per device per step
    assert report["loss"][1] < report["loss"][0]
    # The exported model is a plain single-device model.
    assert model_lib.load_model(str(tmp_path / "model")).output_shape == (None, 3)


def test_batch_smaller_than_the_device_count_is_refused():
    with pytest.raises(HyperparameterError, match="batch_size: got 1, but training runs on 2 devices"):
        training._check_batch_size(1, 2)


# --- small_cnn learns real data ---------------------------------------------------------------------

@pytest.mark.slow
def test_small_cnn_learns_handwritten_digits(tmp_path):
    """Default hyperparameters except epochs/batch: >= 0.97 test accuracy in well under a minute on 2 cores."""
    dataset = write_digits(str(tmp_path / "digits"))
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=32, epochs=15, batch_size=32)
    start = time.perf_counter()
    result = training.train(hp, dataset, str(tmp_path / "model"))
    seconds = time.perf_counter() - start
    model = model_lib.load_model(str(tmp_path / "model"))
    test_split = reader.read_split(dataset, "test", image_size=32, interpolation="bilinear")
    images, labels = zip(*test_split.as_numpy_iterator(), strict=True)
    predicted = model.predict(np.stack(images).astype(np.float32), verbose=0).argmax(axis=1)
    accuracy = float(np.mean(predicted == np.array(labels)))
    print(f"digits: test accuracy {accuracy:.4f} on {len(labels)} images, validation "
          f"{result['validation_metrics']['accuracy']:.4f}, train() {seconds:.1f} s, "
          f"{result['images_per_second']:.0f} images/s")
    assert accuracy >= 0.97
    assert seconds < 120  # generous for a shared machine; 13-20 s measured on 2 cores


class WeightsPerEpoch(keras.callbacks.Callback):
    """The network's weights at the end of each epoch (before any later callback changes them)."""

    def __init__(self):
        super().__init__()
        self.weights: dict[int, list[np.ndarray]] = {}

    def on_epoch_end(self, epoch, logs=None):
        self.weights[epoch] = [np.array(w) for w in self.model.get_weights()]


class Sabotage(keras.callbacks.Callback):
    """Before each validation, makes the head predict class 0 for every image: validation gets far worse."""

    def on_test_begin(self, logs=None):
        dense = model_lib.head_dense(self.model)
        kernel, bias = dense.get_weights()
        dense.set_weights([np.zeros_like(kernel), np.where(np.arange(bias.size) == 0, 8.0, -8.0).astype(bias.dtype)])


@pytest.mark.slow
def test_after_a_resume_the_best_epoch_before_the_interruption_is_exported(tmp_path, dataset):
    hp = small(epochs=4, early_stopping=True, early_stopping_patience=10, early_stopping_min_delta=0.0)
    backup_dir, model_dir = str(tmp_path / "backup"), str(tmp_path / "model")
    first = WeightsPerEpoch()
    with pytest.raises(RuntimeError, match="simulated preemption"):
        training.train(hp, dataset, model_dir, backup_dir=backup_dir, callbacks=[first, Interrupt(1)])
    result = training.train(hp, dataset, model_dir, backup_dir=backup_dir, callbacks=[Sabotage()])

    with open(os.path.join(model_dir, "history.json")) as handle:
        val_loss = json.load(handle)["val_loss"]
    assert len(val_loss) == 4 and min(val_loss[:2]) < min(val_loss[2:])  # the best is before the interruption
    best = int(np.argmin(val_loss))
    assert result["best_epoch"] == best + 1
    assert result["final_metrics"]["val_loss"] == val_loss[best]
    assert same(model_lib.load_model(model_dir).get_weights(), first.weights[best])


@pytest.mark.slow
def test_patience_counts_the_epochs_before_the_interruption(tmp_path, dataset):
    # min_delta 1.0: no epoch after the first counts as an improvement, so patience 2 stops after epoch 3.
    hp = small(epochs=6, early_stopping=True, early_stopping_patience=2, early_stopping_min_delta=1.0)
    uninterrupted = training.train(hp, dataset, str(tmp_path / "straight"))
    backup_dir = str(tmp_path / "backup")
    with pytest.raises(RuntimeError, match="simulated preemption"):
        training.train(hp, dataset, str(tmp_path / "model"), backup_dir=backup_dir, callbacks=[Interrupt(1)])
    resumed = training.train(hp, dataset, str(tmp_path / "model"), backup_dir=backup_dir)
    assert (uninterrupted["epochs_completed"], uninterrupted["best_epoch"]) == (3, 1)
    assert (resumed["epochs_completed"], resumed["best_epoch"], resumed["stopped_early"]) == (3, 1, True)
    assert resumed["history"]["val_loss"][0] == resumed["final_metrics"]["val_loss"]


def test_early_stopping_state_of_an_epoch_whose_backup_was_not_written_is_not_used(tmp_path):
    """Stopped after early stopping saved epoch 2 but before the model backup: the rerun repeats epoch 2."""
    backup_dir = str(tmp_path / "backup")
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    first = training.ResumableEarlyStopping(backup_dir, monitor="val_loss", restore_best_weights=True)
    first.set_model(model)
    first.on_train_begin()
    for epoch, value in enumerate([0.5, 0.4, 0.1]):  # epoch 2 (0.1) is the one whose backup is missing
        first.on_epoch_begin(epoch)
        model.set_weights([np.full((1, 1), value, np.float32), np.zeros(1, np.float32)])
        first.on_epoch_end(epoch, {"val_loss": value})
    again = training.ResumableEarlyStopping(backup_dir, monitor="val_loss", restore_best_weights=True)
    again.set_model(model)
    again.on_train_begin()
    again.on_epoch_begin(2)
    assert (again.best, again.best_epoch, again.wait) == (pytest.approx(0.4), 1, 0)
    assert again.best_weights[0][0, 0] == pytest.approx(0.4)
    assert sorted(os.listdir(backup_dir)) == ["imgclf_best_weights-epoch-00001.npz",
                                              "imgclf_best_weights-epoch-00002.npz", "imgclf_early_stopping.json"]


@pytest.mark.slow
def test_backups_and_tensorboard_logs_on_gcs_go_through_trainer_storage(tmp_path, dataset, gcs_bucket):
    """tf.io.gfile's GCS client ignores STORAGE_EMULATOR_HOST; the emulator sees these writes only
    if they go through trainer.storage, as every other gs:// write does."""
    from tests.support.gcs import emulator_client

    hp = small(epochs=3, early_stopping=True, early_stopping_patience=5)
    backup_dir, logs = f"gs://{gcs_bucket}/backup", f"gs://{gcs_bucket}/tensorboard"

    def names(prefix):
        return sorted(b.name for b in emulator_client().list_blobs(gcs_bucket, prefix=prefix + "/"))

    with pytest.raises(RuntimeError, match="simulated preemption"):
        training.train(hp, dataset, str(tmp_path / "model"), backup_dir=backup_dir, tensorboard_dir=logs,
                       callbacks=[Interrupt(0)])
    assert {"backup/latest.weights.h5", "backup/training_metadata.json", "backup/imgclf_history.json",
            "backup/imgclf_early_stopping.json"} <= set(names("backup"))
    recorder = Recorder()
    result = training.train(hp, dataset, str(tmp_path / "model"), backup_dir=backup_dir, tensorboard_dir=logs,
                            callbacks=[recorder])
    assert recorder.epochs == [1, 2] and result["epochs_completed"] == 3
    assert names("backup") == []  # removed once the run completed
    assert any("events.out.tfevents" in name for name in names("tensorboard"))


class _OrderRecorder(keras.Model):
    """A model that records, per epoch, the first pixel of every training image it is fed."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)
        self.seen: dict[int, list[tuple]] = {}
        self.epoch = 0

    def call(self, inputs):
        return self.dense(keras.ops.mean(inputs, axis=(1, 2)))

    def train_step(self, batch):
        images, _ = batch
        self.seen.setdefault(self.epoch, []).extend(tuple(px) for px in images.numpy()[:, 0, 0, :])
        return {"images": tf.constant(float(len(images)))}


def test_a_resumed_fit_feeds_each_epoch_in_the_uninterrupted_order(tmp_path):
    """Through Keras' fit (which opens an epoch's iterator before that epoch's callbacks run), with
    training's epoch callback: a run started at epoch k, as a resume does, sees epoch k and the ones
    after it in the images' order of an uninterrupted run."""
    dataset = write_dataset(tmp_path / "ds", counts={"train": 12})

    def fit(initial_epoch):
        epoch = reader.epoch_variable()
        train = reader.make_dataset(dataset, "train", batch_size=4, training=True, seed=5, num_classes=3,
                                  binary_mode=False, image_size=16, interpolation="bilinear", epoch=epoch)
        network = _OrderRecorder()
        network.compile(run_eagerly=True)
        track = keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: setattr(network, "epoch", e))
        network.fit(train, epochs=4, initial_epoch=initial_epoch, verbose=0, shuffle=False,
                    callbacks=[track, training._InputEpoch(epoch)])
        return network.seen

    uninterrupted = fit(0)
    assert len({tuple(order) for order in uninterrupted.values()}) == 4  # a new order every epoch
    resumed = fit(2)
    assert resumed == {e: uninterrupted[e] for e in (2, 3)}
