"""trainer.evaluate.evaluation: metrics agree with scikit-learn, outputs are labelled right, errors say what to do."""

import json
import re
import xml.etree.ElementTree as ET

import keras
import numpy as np
import pytest
from sklearn import metrics as skm

from tests.unit.test_data import write_arrays
from trainer.errors import DataError, HyperparameterError, ModelError
from trainer.evaluate import evaluation
from trainer.hyperparameters import Hyperparameters

SIZE = 16
COLOURS = ("blue", "green", "red")  # Alphabetical: prediction indices 0, 1, 2.
CHANNEL = {"red": 0, "green": 1, "blue": 2}


# ------------------------------------------------------------------------------------------------
# Builders: a tiny model directory and a tiny converted data set, in the pipeline's layouts
# ------------------------------------------------------------------------------------------------

def save_model_dir(path, model, labels, **hyperparameters):
    """Write model.keras, the label map, hyperparameters.yaml and history.json as training does."""
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    (path / "class_label_to_prediction_index.json").write_text(
        json.dumps({label: index for index, label in enumerate(labels)}))
    hp = Hyperparameters(model="small_cnn", weights="none", image_size=SIZE, **hyperparameters)
    (path / "hyperparameters.yaml").write_text(hp.to_yaml())
    (path / "history.json").write_text(json.dumps({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]}))
    return str(path)


def write_dataset(path, labels, splits):
    """Write ``{split: [(uint8 image [S, S, 3], label), ...]}`` as conversion does (PNG files, one shard a split)."""
    arrays = {split: (np.stack([image for image, _ in examples]), np.array([label for _, label in examples]))
              for split, examples in splits.items() if examples}
    return write_arrays(str(path), tuple(labels), arrays, shards=1)


def colour_model():
    """Softmax over (blue, green, red) from the mean of each channel: a picture's dominant colour wins."""
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(3, activation="softmax")(pooled)
    model = keras.Model(inputs, outputs)
    kernel = np.zeros((3, 3), np.float32)
    for index, colour in enumerate(COLOURS):
        kernel[CHANNEL[colour], index] = 0.04
    model.layers[-1].set_weights([kernel, np.zeros(3, np.float32)])
    return model


def red_minus_green_model():
    """Binary: the probability of class index 1 grows with (red - green)."""
    inputs = keras.Input((SIZE, SIZE, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = keras.layers.Dense(1, activation="sigmoid")(pooled)
    model = keras.Model(inputs, outputs)
    model.layers[-1].set_weights([np.array([[0.03], [-0.03], [0.0]], np.float32), np.zeros(1, np.float32)])
    return model


def tinted(rng, colour):
    """A noisy picture whose dominant channel is ``colour``."""
    image = rng.integers(0, 90, (SIZE, SIZE, 3))
    image[..., CHANNEL[colour]] = rng.integers(150, 256, (SIZE, SIZE))
    return image.astype(np.uint8)


@pytest.fixture(scope="module")
def colour_case(tmp_path_factory):
    """3 classes; two red pictures are labelled green, so the only confusion is green -> red (twice)."""
    root = tmp_path_factory.mktemp("colour")
    rng = np.random.default_rng(0)
    test = [(tinted(rng, c), COLOURS.index(c)) for c in COLOURS for _ in range(4)]
    test += [(tinted(rng, "red"), COLOURS.index("green")) for _ in range(2)]
    model = colour_model()
    model_dir = save_model_dir(root / "model", model, COLOURS)
    dataset_dir = write_dataset(root / "data", COLOURS, {"train": test[:3], "test": test})
    return model, model_dir, dataset_dir, test


@pytest.fixture(scope="module")
def binary_case(tmp_path_factory):
    """2 classes (cat, dog) whose label follows red - green loosely, so AUC is between 0.5 and 1."""
    root = tmp_path_factory.mktemp("binary")
    rng = np.random.default_rng(1)
    test = []
    for _ in range(60):
        image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        mean = image.reshape(-1, 3).mean(axis=0)
        test.append((image, int(mean[0] - mean[1] + rng.normal(0, 3) > 0)))
    model = red_minus_green_model()
    model_dir = save_model_dir(root / "model", model, ("cat", "dog"), binary_mode=True, eval_metric="auc")
    dataset_dir = write_dataset(root / "data", ("cat", "dog"), {"train": test[:5], "test": test})
    return model, model_dir, dataset_dir, test


def model_probabilities(model, examples):
    """The model's own outputs on the pictures, computed without trainer code."""
    return model.predict(np.stack([image for image, _ in examples]).astype(np.float32), verbose=0)


# ------------------------------------------------------------------------------------------------
# End to end on a model directory and a data set
# ------------------------------------------------------------------------------------------------

def test_multiclass_evaluation_matches_sklearn_and_labels_the_confusion_matrix(colour_case, tmp_path):
    model, model_dir, dataset_dir, test = colour_case
    result = evaluation.evaluate(model_dir, dataset_dir, str(tmp_path / "out"), batch_size=4)

    y_true = np.array([label for _, label in test])
    probabilities = model_probabilities(model, test)
    y_pred = probabilities.argmax(axis=1)
    assert result["split"] == "test" and result["count"] == len(test)
    assert result["eval_metric"] == "accuracy"
    assert result["eval_value"] == pytest.approx(skm.accuracy_score(y_true, y_pred)) == pytest.approx(12 / 14)
    assert result["metrics"]["loss"] == pytest.approx(skm.log_loss(y_true, probabilities), rel=1e-4)
    assert result["metrics"]["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert "precision" not in result["metrics"] and "roc" not in result  # binary-only
    assert result["threshold"] is None

    # Rows are the true class, columns the predicted one, both in label-index order.
    assert result["labels"] == ["blue", "green", "red"]
    assert result["confusion_matrix"] == [[4, 0, 0], [0, 4, 2], [0, 0, 4]]
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert result["most_confused"] == [{"true": "green", "predicted": "red", "count": 2, "rate": 2 / 6}]
    precision, recall, _, support = skm.precision_recall_fscore_support(y_true, y_pred, zero_division=0)
    for index, label in enumerate(COLOURS):
        row = result["per_class"][label]
        assert row["precision"] == pytest.approx(precision[index])
        assert row["recall"] == pytest.approx(recall[index])
        assert row["support"] == support[index]

    written = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert written == json.loads(json.dumps(result))
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.startswith("# accuracy on the test split: 0.8571")
    assert "| **green** | 0 | 4 | 2 |" in report
    assert "| green | red | 2 | 33.3% |" in report


def test_images_are_resized_to_the_model_as_its_serving_signature_does(tmp_path):
    """The data set holds larger files; evaluation resizes them to the model's input size with the
    interpolation of its hyperparameters.yaml, as serving will."""
    from trainer.images import resize_image

    rng = np.random.default_rng(2)
    test = [(np.repeat(np.repeat(tinted(rng, c), 2, axis=0), 3, axis=1), COLOURS.index(c)) for c in COLOURS * 3]
    model = colour_model()
    model_dir = save_model_dir(tmp_path / "model", model, COLOURS, image_resize_interpolation="area")
    dataset_dir = write_dataset(tmp_path / "data", COLOURS, {"test": test})  # 48 x 32 files, model 16 x 16
    result = evaluation.evaluate(model_dir, dataset_dir, str(tmp_path / "out"))
    resized = [(resize_image(image, SIZE, "area").numpy(), label) for image, label in test]
    y_true = np.array([label for _, label in test])
    assert result["metrics"]["loss"] == pytest.approx(skm.log_loss(y_true, model_probabilities(model, resized)),
                                                      rel=1e-5)


def test_binary_evaluation_matches_sklearn(binary_case, tmp_path):
    model, model_dir, dataset_dir, test = binary_case
    result = evaluation.evaluate(model_dir, dataset_dir, str(tmp_path), threshold=0.4)

    y_true = np.array([label for _, label in test])
    score = model_probabilities(model, test)[:, 0]
    y_pred = (score > 0.4).astype(int)
    assert 0 < y_true.sum() < len(y_true)
    found = result["metrics"]
    assert result["eval_metric"] == "auc"  # the model's hyperparameters.yaml default
    assert result["eval_value"] == found["auc"] == pytest.approx(skm.roc_auc_score(y_true, score))
    assert 0.5 < found["auc"] < 1.0
    assert found["prc"] == pytest.approx(skm.average_precision_score(y_true, score))
    assert found["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    assert found["precision"] == pytest.approx(skm.precision_score(y_true, y_pred))
    assert found["recall"] == pytest.approx(skm.recall_score(y_true, y_pred))
    assert found["f1"] == pytest.approx(skm.f1_score(y_true, y_pred))
    assert found["loss"] == pytest.approx(skm.log_loss(y_true, score), rel=1e-4)
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    assert result["positive_label"] == "dog" and result["threshold"] == 0.4

    fpr, tpr, _ = skm.roc_curve(y_true, score)  # drops collinear points as evaluation does
    roc = result["roc"]
    assert len(fpr) <= evaluation.MAX_ROC_POINTS
    np.testing.assert_allclose(roc["fpr"], fpr)
    np.testing.assert_allclose(roc["tpr"], tpr)
    assert roc["thresholds"][1] == pytest.approx(score.max()) and np.all(np.diff(roc["thresholds"]) < 0)

    # Another headline on request, and accuracy still available.
    recall = evaluation.evaluate(model_dir, dataset_dir, str(tmp_path), eval_metric="recall")
    assert recall["eval_metric"] == "recall" and recall["eval_value"] == pytest.approx(
        skm.recall_score(y_true, (score > 0.5).astype(int)))


def test_empty_split_says_to_raise_test_split_ratio(colour_case, tmp_path):
    _, model_dir, _, test = colour_case
    dataset_dir = write_dataset(tmp_path / "data", COLOURS, {"train": test})
    with pytest.raises(DataError, match=r"'test' split .* holds no images.*test_split_ratio"):
        evaluation.evaluate(model_dir, dataset_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_model_with_other_number_of_classes_is_refused(colour_case, binary_case, tmp_path):
    _, model_dir, _, _ = colour_case
    _, _, binary_dataset, _ = binary_case
    with pytest.raises(ModelError) as raised:
        evaluation.evaluate(model_dir, binary_dataset, str(tmp_path))
    message = str(raised.value)
    assert "3 outputs" in message and "2 classes (cat, dog)" in message and model_dir in message


def test_model_with_other_class_names_is_refused(colour_case, tmp_path):
    _, model_dir, _, test = colour_case
    dataset_dir = write_dataset(tmp_path / "data", ("ant", "bee", "cow"), {"test": test})
    with pytest.raises(ModelError, match="blue, green, red.*ant, bee, cow"):
        evaluation.evaluate(model_dir, dataset_dir, str(tmp_path / "out"))


def test_binary_only_metric_on_a_multiclass_model_is_refused(colour_case, tmp_path):
    _, model_dir, dataset_dir, _ = colour_case
    with pytest.raises(HyperparameterError, match="eval_metric: got 'auc', which needs .*binary_mode"):
        evaluation.evaluate(model_dir, dataset_dir, str(tmp_path), eval_metric="auc")
    with pytest.raises(HyperparameterError, match=r"threshold: got 1.5"):
        evaluation.evaluate(model_dir, dataset_dir, str(tmp_path), threshold=1.5)


# ------------------------------------------------------------------------------------------------
# Metric functions on synthetic predictions (no model)
# ------------------------------------------------------------------------------------------------

def random_probabilities(rng, count, classes):
    logits = rng.normal(0, 2, (count, classes))
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def test_many_classes_report_top_5_accuracy_and_macro_averages():
    rng = np.random.default_rng(2)
    labels = [f"class_{i}" for i in range(8)]
    probabilities = random_probabilities(rng, 300, len(labels))
    y_true = rng.integers(0, len(labels), 300)
    y_pred = probabilities.argmax(axis=1)
    result = evaluation.build_evaluation(y_true, probabilities, labels, binary=False)

    found = result["metrics"]
    assert found["top_5_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y_true, probabilities, k=5))
    assert found["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
    for average in ("precision", "recall", "f1"):
        expected = getattr(skm, f"{average}_score")(y_true, y_pred, average="macro", zero_division=0)
        assert found[f"macro_{average}"] == pytest.approx(expected)
    assert found["loss"] == pytest.approx(skm.log_loss(y_true, probabilities, labels=range(8)))
    assert len(result["most_confused"]) == evaluation.MAX_CONFUSED_PAIRS
    counts = [pair["count"] for pair in result["most_confused"]]
    assert counts == sorted(counts, reverse=True)
    matrix = np.array(result["confusion_matrix"])
    largest = max((matrix[t, p], t, p) for t in range(8) for p in range(8) if t != p)
    assert counts[0] == largest[0]


def test_few_classes_have_no_top_5_accuracy():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    result = evaluation.build_evaluation(np.array([0, 1]), probabilities, ["a", "b", "c"], binary=False)
    assert "top_5_accuracy" not in result["metrics"]
    assert result["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_binary_metrics_with_tied_scores_and_a_long_roc_curve():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 1000)
    # Rounded scores create ties; many distinct values make a curve longer than MAX_ROC_POINTS.
    score = np.round(np.clip(rng.normal(0.35 + 0.3 * y_true, 0.2), 0, 1), 3)
    result = evaluation.build_evaluation(y_true, np.c_[1 - score, score], ["neg", "pos"], binary=True,
                                         eval_metric="prc")
    assert result["metrics"]["auc"] == pytest.approx(skm.roc_auc_score(y_true, score))
    assert result["eval_value"] == pytest.approx(skm.average_precision_score(y_true, score))
    roc = result["roc"]
    assert len(skm.roc_curve(y_true, score)[0]) > evaluation.MAX_ROC_POINTS
    assert len(roc["fpr"]) == len(roc["tpr"]) == len(roc["thresholds"]) == evaluation.MAX_ROC_POINTS
    assert roc["fpr"][0] == roc["tpr"][0] == 0.0 and roc["fpr"][-1] == roc["tpr"][-1] == 1.0
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    json.dumps(result, allow_nan=False)  # strict JSON: no NaN or Infinity anywhere


def test_binary_split_of_one_class_leaves_auc_out():
    score = np.array([0.2, 0.9, 0.6])
    result = evaluation.build_evaluation(np.ones(3, int), np.c_[1 - score, score], ["neg", "pos"],
                                         binary=True, eval_metric="auc")
    assert "auc" not in result["metrics"] and "prc" not in result["metrics"]
    assert result["eval_value"] is None and result["roc"] is None
    assert "undefined" in evaluation.markdown_report(result)


def test_report_escapes_markdown_in_class_names():
    result = evaluation.build_evaluation(np.array([0, 1]), np.array([[0.2, 0.8], [0.9, 0.1]]),
                                         ["a|b", "c"], binary=False)
    report = evaluation.markdown_report(result)
    assert "| a\\|b | c | 1 | 100.0% |" in report


# ------------------------------------------------------------------------------------------------
# Training curves
# ------------------------------------------------------------------------------------------------

def test_training_curves_have_one_chart_per_metric_and_no_external_resources():
    history = {
        "accuracy": [0.5, 0.7, 0.8], "loss": [1.2, 0.8, float("nan")],
        "val_accuracy": [0.4, 0.6, 0.7], "val_loss": [1.3, 0.9, 0.85],
        "auc": [0.6, 0.7, 0.9], "learning_rate": [0.001, 0.001, 0.0005],
        "val_f1": [0.3, 0.5, 0.6], "notes": "not a series",
    }
    page = evaluation.training_curves_html(history)

    charts = re.findall(r'<div class="chart" data-metric="([^"]+)">', page)
    assert charts == ["loss", "accuracy", "auc", "learning_rate", "f1"]
    for name, lines in (("loss", 2), ("accuracy", 2), ("auc", 1), ("f1", 1)):
        chart = page.split(f'data-metric="{name}"')[1].split("</svg>")[0]
        assert chart.count('class="series"') == lines, name
    assert "training" in page and "validation" in page
    assert not re.search(r"<script|https?://(?!www\.w3\.org/2000/svg)|<link|src=", page)
    for svg in re.findall(r"<svg.*?</svg>", page, flags=re.S):
        ET.fromstring(svg)  # well-formed, so browsers render it inline
    # The diverged last loss leaves a gap: two loss points in the training line, not three.
    loss_chart = page.split('data-metric="loss"')[1].split("</svg>")[0]
    assert loss_chart.count("loss (training), epoch") == 2


def test_training_curves_of_an_empty_history():
    assert "No per-epoch history" in evaluation.training_curves_html({})


def test_constant_binary_scores_give_auc_one_half_and_prc_the_positive_share():
    """A model that answers the same score for every image (one distinct threshold) ranks nothing."""
    y_true = np.array([1, 0, 0, 1, 0, 0, 1, 0])
    score = np.full(y_true.size, 0.37)
    result = evaluation.build_evaluation(y_true, np.c_[1 - score, score], ["neg", "pos"], binary=True,
                                         eval_metric="auc")
    assert result["eval_value"] == result["metrics"]["auc"] == skm.roc_auc_score(y_true, score) == 0.5
    assert result["metrics"]["prc"] == pytest.approx(skm.average_precision_score(y_true, score)) == 3 / 8
    assert (result["roc"]["fpr"], result["roc"]["tpr"]) == ([0.0, 1.0], [0.0, 1.0])
    json.dumps(result, allow_nan=False)


def test_a_model_that_answers_non_finite_probabilities_is_refused(binary_case, tmp_path):
    """NaN compares false everywhere: once it passed as predictions (AUC 0.52, ECE 0.0) and as invalid JSON."""
    _, _, dataset_dir, _ = binary_case
    model = red_minus_green_model()
    model.layers[-1].set_weights([np.array([[0.03], [-0.03], [0.0]], np.float32), np.full(1, np.nan, np.float32)])
    model_dir = save_model_dir(tmp_path / "model", model, ("cat", "dog"), binary_mode=True, eval_metric="auc")
    with pytest.raises(ModelError, match=r"model\.keras answers non-finite probabilities \(NaN or infinity\) for "
                                         r"60 of 60 images of the 'test' split"):
        evaluation.evaluate(model_dir, dataset_dir, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="must be finite"):
        evaluation.build_evaluation(np.array([0, 1]), np.array([[0.0, np.inf], [0.5, 0.5]]), ["a", "b"],
                                    binary=True)
