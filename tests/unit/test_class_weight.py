"""class_weight: 'none' keeps the reference's plain loss, 'balanced' weighs classes by inverse frequency."""

from __future__ import annotations

import numpy as np
import pytest

from tests.unit.test_data import write_arrays
from trainer.errors import HyperparameterError
from trainer.evaluate import evaluation
from trainer.hyperparameters import Hyperparameters
from trainer.serve import prediction
from trainer.train import training

SIZE = 16
CLASSES = ("common", "rare")


def imbalanced(root: str, train: dict[str, int], seed: int = 0) -> str:
    """The same grey picture (with a little noise) in every class: there is no class signal, so a model
    can only learn the class prior. ``train`` counts per class; the test split is balanced."""
    rng = np.random.default_rng(seed)

    def noise(count: int) -> np.ndarray:
        return rng.integers(126, 130, (count, SIZE, SIZE, 3), dtype=np.uint8)

    labels = np.repeat([0, 1], [train["common"], train["rare"]])
    test = np.repeat([0, 1], [20, 20])
    return write_arrays(root, CLASSES, {"train": (noise(labels.size), labels), "test": (noise(test.size), test)},
                        shards=1)


def run(dataset: str, model_dir: str, class_weight: str) -> np.ndarray:
    # A frozen backbone (batch norm in inference mode in training too) leaves the head to learn the prior.
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, epochs=5, batch_size=20,
                         learning_rate=0.1, validation_split_ratio=0.0, train_only_top_layer=True,
                         class_weight=class_weight)
    training.train(hp, dataset, model_dir)
    loaded = prediction.load_model(model_dir)
    _, probabilities, _ = evaluation._predict_split(loaded, dataset, "test", 64)
    return probabilities


def test_balanced_weights_are_inverse_class_frequency(tmp_path):
    dataset = imbalanced(str(tmp_path / "data"), {"common": 90, "rare": 10})
    label_map = {"common": 0, "rare": 1}
    assert training.class_weights(Hyperparameters(class_weight="none"), dataset, label_map) is None
    weights = training.class_weights(Hyperparameters(class_weight="balanced"), dataset, label_map)
    assert weights == pytest.approx({0: 100 / (2 * 90), 1: 100 / (2 * 10)})
    # Weighted, each class contributes the same total to the loss.
    assert 90 * weights[0] == pytest.approx(10 * weights[1])


def test_balanced_weighting_lifts_the_minority_class(tmp_path):
    """With no signal in the images a model can only learn the class prior: the plain loss learns
    "mostly common" (90%, 86% with label smoothing 0.1), the balanced loss sees both classes as equally likely."""
    dataset = imbalanced(str(tmp_path / "data"), {"common": 90, "rare": 10})
    plain = run(dataset, str(tmp_path / "none"), "none")
    balanced = run(dataset, str(tmp_path / "balanced"), "balanced")
    rare_plain, rare_balanced = plain[:, 1].mean(), balanced[:, 1].mean()
    assert rare_plain < 0.3
    assert 0.35 < rare_balanced < 0.65
    # The plain model never calls an image rare. (The balanced model's calls sit near 0.5 on images
    # without signal, so which side of 0.5 they fall is chance: its recall is not asserted.)
    assert (plain.argmax(1) == 1).sum() == 0


def test_unknown_class_weight_is_refused_with_the_choices():
    with pytest.raises(HyperparameterError, match="class_weight.*'none', 'balanced'"):
        Hyperparameters.from_mapping({"class_weight": "inverse"})
