"""Model evaluation on a data-set split: metrics, calibration, confusion matrix, error gallery, TFLite
parity, Markdown and HTML reports, model card and training curves.

Every number is computed here with NumPy from the model's probabilities, so it can be checked
against an independent implementation and does not depend on which Keras metrics training
compiled. Conventions:

* Multi-class: the predicted class is the arg-max of the probabilities.
* Binary mode: class index 1 (second in alphabetical order) is the positive class; an image is
  predicted positive when its probability is above ``threshold`` (strictly, as Keras' metrics do).
  The ROC curve lists for each threshold t the rates of "probability >= t" (the usual ROC
  convention); its first point (0, 0) has a threshold just above the highest probability.
* ``loss`` is the plain cross-entropy of the probabilities (no label smoothing, no L2 term), so
  it is comparable between runs with different regularisation.
* ``prc`` is the area under the precision-recall curve computed as average precision (the
  step-wise sum, without the optimistic interpolation of a trapezoid).
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow as tf

from trainer import storage
from trainer.data import reader
from trainer.errors import DataError, HyperparameterError, ModelError
from trainer.evaluate import calibration, gallery, model_card
from trainer.evaluate.model_card import markdown_cell as _cell
from trainer.hyperparameters import BINARY_ONLY_METRICS, EVAL_METRICS
from trainer.layout import KERAS_MODEL_FILE
from trainer.serve import prediction
from trainer.train import tflite

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"
MODEL_CARD_FILE = "model_card.md"
# The bounds the TFLite export promises against the Keras model (largest difference of the float
# file's probabilities, top-1 agreement of the quantised one); the evaluation report shows the
# measured figures and tests/unit/test_tflite.py holds the export to these.
TFLITE_FLOAT_TOLERANCE = 1e-3
TFLITE_QUANTIZED_MIN_AGREEMENT = 0.99
TOP_K = 5  # Top-5 accuracy is reported when there are more than 5 classes (otherwise it is always 1).
MAX_CONFUSED_PAIRS = 10
MAX_ROC_POINTS = 101
MAX_MATRIX_IN_REPORT = 30  # Larger confusion matrices are unreadable as a Markdown table.
# Keras clips probabilities the same way before taking the log, so an image predicted with
# probability 0 costs -log(1e-7) instead of infinity.
_LOG_EPSILON = 1e-7


def evaluate(model_dir: str, dataset_dir: str, output_dir: str, *, split: str = "test",
             eval_metric: str | None = None, threshold: float = 0.5,
             batch_size: int | None = None) -> dict:
    """Evaluate the model in ``model_dir`` on one split of the converted data set.

    Args:
      model_dir: a training run's model directory (model.keras, label map, hyperparameters.yaml).
      dataset_dir: the converted data set (``{split}/part-*.tfrecord`` and its label map).
      output_dir: where ``evaluation.json``, ``report.md``, ``report.html`` (with the error gallery and
        its Grad-CAM heat maps) and ``model_card.md`` are written (local or gs://).
      split: "test", "validation" or "train".
      eval_metric: the headline metric; None (or "") uses the model's hyperparameters.yaml value.
      threshold: binary mode only; the probability above which an image is predicted positive.
      batch_size: images per model call; None uses the model's training batch size.

    Returns:
      The evaluation dict that is written to ``evaluation.json`` (see ``build_evaluation``), with
      ``"tflite"``: per TFLite file in the model folder, its largest probability difference from the
      Keras model and top-1 agreement on the split, and its size.

    Raises:
      ModelError: the model does not fit the data set (its classes) or cannot be loaded.
      DataError: the split is empty or holds labels outside the label map.
      HyperparameterError: ``eval_metric`` or ``threshold`` is not valid for this model.
    """
    # The data set's metadata first: it is cheap to read, and an empty split is the likeliest problem.
    if reader.split_count(dataset_dir, split) == 0:
        raise _empty_split(split, dataset_dir)
    label_map = reader.read_label_map(dataset_dir)
    dataset_labels = sorted(label_map, key=label_map.__getitem__)

    loaded = prediction.load_model(model_dir)
    metric = _check_arguments(eval_metric or loaded.hyperparameters.eval_metric, threshold, loaded.binary)
    _check_fit(loaded, dataset_labels, dataset_dir)
    lite_models = prediction.load_tflite_models(model_dir)
    y_true, probabilities, lite_probabilities = _predict_split(
        loaded, dataset_dir, split, batch_size or loaded.hyperparameters.batch_size, lite_models)
    if y_true.size == 0:
        raise _empty_split(split, dataset_dir)
    _check_finite(probabilities, storage.join(model_dir, KERAS_MODEL_FILE), split, dataset_dir)
    for name, lite in lite_probabilities.items():
        _check_finite(lite, storage.join(model_dir, name), split, dataset_dir)

    result = build_evaluation(y_true, probabilities, loaded.labels, binary=loaded.binary,
                              threshold=threshold, eval_metric=metric, split=split)
    if result["eval_value"] is None:
        raise DataError(
            f"{metric} cannot be computed on the {split!r} split of {dataset_dir}: it holds images of "
            "only one class; convert the data set again with a larger test_split_ratio or use "
            "eval_metric 'accuracy'")
    result["tflite"] = {name: {**tflite.parity(probabilities, lite), "size_bytes": lite_models[name].size_bytes}
                        for name, lite in lite_probabilities.items()}

    y_pred = predicted_classes(probabilities, binary=loaded.binary, threshold=threshold)
    confidence = probabilities[np.arange(y_true.size), y_pred]
    mistakes, correct = gallery.select(y_true, y_pred, confidence)
    pictures = _images_at(loaded, dataset_dir, split, set(mistakes + correct))
    entries, note = gallery.build_entries(loaded.model, pictures, mistakes + correct, y_true, y_pred, confidence,
                                          loaded.labels)
    gallery_fragment = gallery.gallery_html(entries[:len(mistakes)], entries[len(mistakes):], note,
                                            total_mistakes=int(np.sum(y_pred != y_true)))
    card = model_card.model_card(result, loaded.hyperparameters, reader.read_manifest(dataset_dir), model_dir)

    _write(output_dir, EVALUATION_FILE, json.dumps(result, indent=2, allow_nan=False) + "\n")
    _write(output_dir, REPORT_FILE, markdown_report(result))
    _write(output_dir, MODEL_CARD_FILE, card)
    _write(output_dir, HTML_REPORT_FILE, html_report(result, gallery_fragment, card))
    log.info("%s on the %s split (%d images): %.4f", metric, split, result["count"], result["eval_value"])
    return result


def _check_finite(probabilities: np.ndarray, model_file: str, split: str, dataset_dir: str) -> None:
    """ModelError when a model answers NaN or infinity: no metric of such answers means anything (NaN
    compares false, so it would pass as a confident prediction), and JSON cannot hold them."""
    bad = ~np.isfinite(probabilities).all(axis=1)
    if bad.any():
        raise ModelError(
            f"{model_file} answers non-finite probabilities (NaN or infinity) for {int(bad.sum())} of {bad.size} "
            f"images of the {split!r} split of {dataset_dir} (the first at index {int(np.argmax(bad))}); such a "
            "model cannot be evaluated or blessed: its training diverged or its weights are corrupt (see the "
            "loss in history.json); train again, e.g. with a lower learning_rate")


def _empty_split(split: str, dataset_dir: str) -> DataError:
    ratio = {"test": "test_split_ratio", "validation": "validation_split_ratio"}.get(split)
    remedy = (f"convert the data set again with a larger {ratio} (each class needs at least one {split} "
              "image) or evaluate another split") if ratio else "convert the data set again"
    return DataError(f"the {split!r} split of {dataset_dir} holds no images, so there is nothing to "
                     f"evaluate; {remedy}")


def _check_arguments(metric: str, threshold: float, binary: bool) -> str:
    problems = []
    if metric not in EVAL_METRICS:
        problems.append(f"eval_metric: got {metric!r}, expected one of {', '.join(EVAL_METRICS)}")
    elif metric in BINARY_ONLY_METRICS and not binary:
        problems.append(f"eval_metric: got {metric!r}, which needs a model trained with binary_mode=True; "
                        "use 'accuracy'")
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0.0 <= threshold <= 1.0:
        problems.append(f"threshold: got {threshold!r}, expected a probability in [0, 1]")
    if problems:
        raise HyperparameterError(problems)
    return metric


def _check_fit(loaded: prediction.LoadedModel, dataset_labels: Sequence[str], dataset_dir: str) -> None:
    """The model must predict the data set's classes, in the same order."""
    model_labels = list(loaded.labels)
    outputs = "1 sigmoid output (binary mode, 2 classes)" if loaded.binary else f"{len(model_labels)} outputs"
    if len(model_labels) != len(dataset_labels):
        raise ModelError(
            f"the model in {loaded.model_dir} has {outputs} but the data set {dataset_dir} has "
            f"{len(dataset_labels)} classes ({_preview(dataset_labels)}); evaluate a model trained "
            "on this data set")
    if model_labels != list(dataset_labels):
        raise ModelError(
            f"the model in {loaded.model_dir} was trained on the classes {_preview(model_labels)} but "
            f"the data set {dataset_dir} has {_preview(dataset_labels)}; the same index would mean a "
            "different class, so evaluate a model trained on this data set")


def _preview(labels: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(labels[:limit])
    return f"{shown}, ... ({len(labels)} in all)" if len(labels) > limit else shown


def _predict_split(loaded: prediction.LoadedModel, dataset_dir: str, split: str, batch_size: int,
                   lite_models: Mapping[str, tflite.TfliteModel] | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Labels int64 [N] and probabilities float32 [N, K] for every example of the split, in order,
    and the probabilities of each TFLite model in ``lite_models`` on the same pixels.

    The images are decoded and resized as the model's serving signature does it: to the model's own
    input size, with the interpolation of its hyperparameters.yaml.
    """
    lite_models = lite_models or {}
    labels, probabilities = [], []
    lite: dict[str, list[np.ndarray]] = {name: [] for name in lite_models}
    split_images = reader.read_split(dataset_dir, split, image_size=loaded.image_size,
                                   interpolation=loaded.interpolation)
    batches = split_images.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    for images, batch_labels in batches:
        labels.append(batch_labels.numpy().astype(np.int64))
        pixels = images.numpy()
        probabilities.append(loaded.probabilities(pixels))
        for name, lite_model in lite_models.items():
            lite[name].append(lite_model.probabilities(pixels))
    classes = len(loaded.labels)
    if not labels:
        return np.zeros([0], np.int64), np.zeros([0, classes], np.float32), {}
    y_true = np.concatenate(labels)
    if y_true.min() < 0 or y_true.max() >= classes:
        bad = sorted(set(y_true[(y_true < 0) | (y_true >= classes)].tolist()))
        raise DataError(f"the {split!r} split of {dataset_dir} holds labels {bad[:10]} outside the label "
                        f"map's 0..{classes - 1}; convert the data set again")
    return y_true, np.concatenate(probabilities), {name: np.concatenate(rows) for name, rows in lite.items()}


def _images_at(loaded: prediction.LoadedModel, dataset_dir: str, split: str,
               indices: set[int]) -> dict[int, np.ndarray]:
    """The model-input pixels (uint8 [S, S, 3]) of the split's examples at ``indices`` (a second read of
    the split that decodes only those)."""
    examples = reader.read_examples(dataset_dir, split, indices, image_size=loaded.image_size,
                                  interpolation=loaded.interpolation)
    return {index: image for index, (image, _) in examples.items()}


def predicted_classes(probabilities: np.ndarray, *, binary: bool, threshold: float = 0.5) -> np.ndarray:
    """The predicted class per image: arg-max, or in binary mode index 1 above ``threshold``."""
    if binary:
        return (probabilities[:, 1] > threshold).astype(np.int64)
    return np.argmax(probabilities, axis=1)


def _write(output_dir: str, name: str, text: str) -> None:
    storage.write_bytes(storage.join(output_dir, name), text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def build_evaluation(y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str], *,
                     binary: bool, threshold: float = 0.5, eval_metric: str = "accuracy",
                     split: str = "test") -> dict:
    """Every metric that applies, as the JSON-ready dict written to ``evaluation.json``.

    Args:
      y_true: true class indices, int [N].
      probabilities: float [N, K], rows summing to 1 (binary mode: [1 - p, p]).
      labels: class names in index order.

    Returns:
      ``{"split", "count", "eval_metric", "eval_value", "binary_mode", "threshold", "labels",
      "metrics", "confusion_matrix", "per_class", "most_confused"}`` and in binary mode also
      ``"positive_label"`` and ``"roc"``. ``metrics`` maps names to floats and leaves out a
      metric that is undefined on this data (AUC with one class only); ``eval_value`` is then None.
    """
    y_true = np.asarray(y_true, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    classes = len(labels)
    if probabilities.shape != (y_true.size, classes):
        raise ValueError(f"probabilities must be [{y_true.size}, {classes}], got {list(probabilities.shape)}")
    if not np.isfinite(probabilities).all():
        raise ValueError("probabilities must be finite: no metric of NaN or infinity means anything")

    y_pred = predicted_classes(probabilities, binary=binary, threshold=threshold)
    matrix = np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(classes, classes)

    metrics: dict[str, float] = {
        "accuracy": float(np.mean(y_pred == y_true)),
        "loss": cross_entropy(y_true, probabilities),
    }
    per_class = _per_class(matrix, labels)
    if binary:
        positive = per_class[labels[1]]
        metrics.update(precision=positive["precision"], recall=positive["recall"], f1=positive["f1"])
        roc = roc_curve(y_true, probabilities[:, 1])
        if roc is not None:
            metrics["auc"] = roc["auc"]
            metrics["prc"] = average_precision(y_true, probabilities[:, 1])
    else:
        for name in ("precision", "recall", "f1"):
            metrics[f"macro_{name}"] = float(np.mean([row[name] for row in per_class.values()]))
        if classes > TOP_K:
            metrics[f"top_{TOP_K}_accuracy"] = top_k_accuracy(y_true, probabilities, TOP_K)

    result: dict[str, Any] = {
        "split": split,
        "count": int(y_true.size),
        "eval_metric": eval_metric,
        "eval_value": metrics.get(eval_metric),
        "binary_mode": binary,
        "threshold": float(threshold) if binary else None,
        "labels": list(labels),
        "metrics": metrics,
        "confusion_matrix": matrix.tolist(),
        "per_class": per_class,
        "most_confused": most_confused(matrix, labels),
        "calibration": calibration.calibration(y_true, probabilities) if y_true.size else None,
    }
    if result["calibration"] is not None:
        metrics["expected_calibration_error"] = result["calibration"]["ece"]
    if binary:
        result["positive_label"] = labels[1]
        result["roc"] = _thin_roc(roc) if roc is not None else None
    return result


def cross_entropy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean -log(probability of the true class), probabilities clipped to [1e-7, 1]."""
    true_probability = probabilities[np.arange(y_true.size), y_true]
    return float(np.mean(-np.log(np.clip(true_probability, _LOG_EPSILON, 1.0))))


def top_k_accuracy(y_true: np.ndarray, probabilities: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k most probable.

    Ties at the boundary count as hits, as ``tf.math.in_top_k`` does: the true class is in the top
    k when fewer than k classes have a strictly higher probability.
    """
    true_probability = probabilities[np.arange(y_true.size), y_true]
    higher = np.sum(probabilities > true_probability[:, None], axis=1)
    return float(np.mean(higher < k))


def _per_class(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float | int]]:
    """Precision, recall, F1 and support per class; 0 where a ratio has no denominator."""
    true_positives = np.diag(matrix).astype(np.float64)
    predicted = matrix.sum(axis=0)
    support = matrix.sum(axis=1)
    table = {}
    for index, label in enumerate(labels):
        precision = _ratio(true_positives[index], predicted[index])
        recall = _ratio(true_positives[index], support[index])
        f1 = _ratio(2 * precision * recall, precision + recall)
        table[label] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support[index])}
    return table


def _ratio(numerator: float, denominator: float) -> float:
    # Zero rather than NaN: the value must stay valid JSON and loggable as a KFP metric.
    return float(numerator / denominator) if denominator else 0.0


def most_confused(matrix: np.ndarray, labels: Sequence[str],
                  limit: int = MAX_CONFUSED_PAIRS) -> list[dict[str, Any]]:
    """The largest off-diagonal cells: which class is most often taken for which."""
    support = matrix.sum(axis=1)
    cells = [(int(matrix[t, p]), t, p) for t in range(len(labels)) for p in range(len(labels))
             if t != p and matrix[t, p] > 0]
    cells.sort(key=lambda cell: (-cell[0], cell[1], cell[2]))
    return [{"true": labels[t], "predicted": labels[p], "count": count, "rate": _ratio(count, support[t])}
            for count, t, p in cells[:limit]]


def roc_curve(y_true: np.ndarray, scores: np.ndarray) -> dict[str, Any] | None:
    """The exact ROC curve of a binary problem and its area, or None with only one class present.

    Returns ``{"fpr", "tpr", "thresholds", "auc"}`` as NumPy arrays (and a float): one point per
    distinct score, collinear points dropped, starting at (0, 0).
    """
    positives = int(np.sum(y_true == 1))
    negatives = int(y_true.size - positives)
    if positives == 0 or negatives == 0:
        return None
    true_positives, false_positives, thresholds = _cumulative_counts(y_true, scores)
    # Drop points on a straight segment between their neighbours: they add nothing to the curve.
    # Done before (0, 0) is added, as scikit-learn's roc_curve does, so the points match its own.
    # One distinct score (a constant model) gives one point, which is kept: the curve is the diagonal.
    inner = np.logical_or(np.diff(false_positives, 2), np.diff(true_positives, 2))
    keep = np.r_[True, inner, True][:true_positives.size]
    fpr = np.r_[0.0, false_positives[keep] / negatives]
    tpr = np.r_[0.0, true_positives[keep] / positives]
    thresholds = np.r_[np.nextafter(thresholds[0], np.inf), thresholds[keep]]
    return {"fpr": fpr, "tpr": tpr, "thresholds": thresholds, "auc": float(np.trapezoid(tpr, fpr))}


def average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve as sum over thresholds of (R_n - R_n-1) * P_n."""
    true_positives, false_positives, _ = _cumulative_counts(y_true, scores)
    precision = true_positives / (true_positives + false_positives)
    recall = true_positives / true_positives[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _cumulative_counts(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives of "positive when score >= t" for each distinct score t, descending."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    sorted_scores = np.asarray(scores, dtype=np.float64)[order]
    is_positive = (np.asarray(y_true)[order] == 1).astype(np.int64)
    # The last index of each run of equal scores: tied images change class together.
    last = np.r_[np.flatnonzero(np.diff(sorted_scores)), sorted_scores.size - 1]
    true_positives = np.cumsum(is_positive)[last]
    false_positives = last + 1 - true_positives
    return true_positives, false_positives, sorted_scores[last]


def _thin_roc(roc: dict[str, Any]) -> dict[str, Any]:
    """At most MAX_ROC_POINTS points (first and last kept) as JSON lists; the area stays exact."""
    count = roc["fpr"].size
    index = np.unique(np.round(np.linspace(0, count - 1, min(count, MAX_ROC_POINTS))).astype(int))
    return {"fpr": roc["fpr"][index].tolist(), "tpr": roc["tpr"][index].tolist(),
            "thresholds": roc["thresholds"][index].tolist(), "auc": roc["auc"]}


# ---------------------------------------------------------------------------------------------
# Markdown report
# ---------------------------------------------------------------------------------------------

_METRIC_NAMES = {
    "accuracy": "accuracy", "loss": "loss (cross-entropy)", "precision": "precision", "recall": "recall",
    "f1": "F1", "auc": "ROC AUC", "prc": "PR AUC (average precision)", "macro_precision": "macro precision",
    "macro_recall": "macro recall", "macro_f1": "macro F1", f"top_{TOP_K}_accuracy": f"top-{TOP_K} accuracy",
    "expected_calibration_error": "expected calibration error (ECE)",
}
_TFLITE_NAMES = {tflite.FLOAT_FILE: "float32", tflite.DYNAMIC_RANGE_FILE: "dynamic-range quantised"}


def markdown_report(result: Mapping[str, Any]) -> str:
    """A Markdown page for the Kubeflow UI: headline, metrics, per-class table, confusion matrix, pairs."""
    labels = result["labels"]
    value = result["eval_value"]
    shown = f"{value:.4f}" if value is not None else "n/a"
    headline = _METRIC_NAMES.get(result["eval_metric"], result["eval_metric"])
    lines = [f"# {headline} on the {result['split']} split: {shown}", ""]
    summary = f"{result['count']} images, {len(labels)} classes"
    if result["binary_mode"]:
        summary += (f"; binary mode, positive class `{_cell(result['positive_label'])}`, "
                    f"predicted positive above probability {result['threshold']:g}")
    lines += [summary + ".", "", "## Metrics", "", "| metric | value |", "|---|---:|"]
    for name, number in result["metrics"].items():
        marker = " **(headline)**" if name == result["eval_metric"] else ""
        lines.append(f"| {_METRIC_NAMES.get(name, name)}{marker} | {number:.4f} |")
    if result["binary_mode"] and result.get("roc") is None:
        lines += ["", "ROC AUC and PR AUC are undefined: the split holds images of one class only."]

    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support |",
              "|---|---:|---:|---:|---:|"]
    for label, row in result["per_class"].items():
        lines.append(f"| {_cell(label)} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | "
                     f"{row['support']} |")

    lines += ["", "## Confusion matrix", ""]
    if len(labels) <= MAX_MATRIX_IN_REPORT:
        lines += ["Rows are the true class, columns the predicted class.", "",
                  "| true \\ predicted | " + " | ".join(_cell(label) for label in labels) + " |",
                  "|---|" + "---:|" * len(labels)]
        for label, row in zip(labels, result["confusion_matrix"], strict=True):
            lines.append(f"| **{_cell(label)}** | " + " | ".join(str(n) for n in row) + " |")
    else:
        lines.append(f"{len(labels)} classes are too many for a table here; the matrix is in "
                     f"{EVALUATION_FILE} and in the pipeline's confusion-matrix view.")

    lines += ["", "## Most confused classes", ""]
    if result["most_confused"]:
        lines += ["| true class | predicted as | images | share of the true class |", "|---|---|---:|---:|"]
        for pair in result["most_confused"]:
            lines.append(f"| {_cell(pair['true'])} | {_cell(pair['predicted'])} | {pair['count']} | "
                         f"{pair['rate']:.1%} |")
    else:
        lines.append("No image was misclassified.")
    lines += _calibration_lines(result) + _tflite_lines(result)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# HTML report (self-contained: inline SVG and data: URIs, for the Kubeflow UI's sandboxed viewer)
# ---------------------------------------------------------------------------------------------

def html_report(result: Mapping[str, Any], gallery_fragment: str, card: str) -> str:
    """The evaluation as one HTML page: metrics, calibration, TFLite parity, per-class figures,
    confusion matrix, the error gallery and the model card."""
    labels = result["labels"]
    value = result["eval_value"]
    shown = f"{value:.4f}" if value is not None else "n/a"
    headline = _METRIC_NAMES.get(result["eval_metric"], result["eval_metric"])
    esc = html.escape
    body = [f"<h1>{esc(headline)} on the {esc(result['split'])} split: {shown}</h1>",
            f"<p>{result['count']} images, {len(labels)} classes.</p>",
            "<h2>Metrics</h2>", '<table class="numbers"><tr><th>metric</th><th>value</th></tr>']
    for name, number in result["metrics"].items():
        body.append(f"<tr><td>{esc(_METRIC_NAMES.get(name, name))}</td><td>{number:.4f}</td></tr>")
    body.append("</table>")

    if result.get("calibration"):
        table = result["calibration"]
        body += ["<h2>Calibration</h2>",
                 f"<p>Expected calibration error <b>{table['ece']:.4f}</b> (maximum {table['mce']:.4f}): of the "
                 "images predicted with a given confidence, how far the share that is right lies from that "
                 "confidence, averaged over the images. Bars below the diagonal are over-confident.</p>",
                 calibration.reliability_svg(table)]
    if result.get("tflite"):
        body += ["<h2>TFLite models</h2>",
                 f"<p>Compared with the Keras/SavedModel network on the same {result['count']} images.</p>",
                 '<table class="numbers"><tr><th>file</th><th>kind</th><th>size</th><th>largest probability '
                 "difference</th><th>top-1 agreement</th></tr>"]
        for name, row in result["tflite"].items():
            body.append(f"<tr><td>{esc(name)}</td><td>{_TFLITE_NAMES.get(name, '')}</td>"
                        f"<td>{row['size_bytes'] / 1e6:.2f} MB</td><td>{row['max_abs_difference']:.2e}</td>"
                        f"<td>{row['top1_agreement']:.2%}</td></tr>")
        body.append("</table>")

    body += ["<h2>Per class</h2>", '<table class="numbers"><tr><th>class</th><th>precision</th><th>recall</th>'
             "<th>F1</th><th>support</th></tr>"]
    for label, row in result["per_class"].items():
        body.append(f"<tr><td>{esc(label)}</td><td>{row['precision']:.4f}</td><td>{row['recall']:.4f}</td>"
                    f"<td>{row['f1']:.4f}</td><td>{row['support']}</td></tr>")
    body.append("</table>")
    if len(labels) <= MAX_MATRIX_IN_REPORT:
        body += ["<h2>Confusion matrix</h2>", "<p>Rows are the true class, columns the predicted class.</p>",
                 _matrix_html(result["confusion_matrix"], labels)]
    body.append(gallery_fragment)
    body += ["<h2>Model card</h2>", f"<p>Also written as {MODEL_CARD_FILE}.</p>",
             f'<pre class="card-text">{esc(card)}</pre>']
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Evaluation: {esc(headline)} {shown}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 20px; }} h2 {{ font-size: 16px; margin-top: 24px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ddd; padding: 2px 8px; }}
table.numbers td + td {{ text-align: right; }}
svg text {{ font-size: 11px; fill: #444; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 8px; }}
figure.card {{ margin: 0; padding: 6px; border: 1px solid #ddd; border-radius: 4px; font-size: 12px; }}
figure.card img {{ display: inline-block; margin-right: 2px; image-rendering: pixelated; }}
.wrong {{ color: #b00; }}
pre.card-text {{ background: #f6f6f6; padding: 8px; white-space: pre-wrap; max-width: 960px; }}
</style>
</head>
<body>
{chr(10).join(body)}
</body>
</html>
"""


def _matrix_html(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    esc = html.escape
    rows = ['<table class="matrix"><tr><th>true \\ predicted</th>'
            + "".join(f"<th>{esc(label)}</th>" for label in labels) + "</tr>"]
    for label, row in zip(labels, matrix, strict=True):
        total = sum(row) or 1
        cells = []
        for column, count in enumerate(row):
            share = count / total
            colour = (f"rgba(31,119,180,{share:.2f})" if labels[column] == label
                      else f"rgba(214,39,40,{share:.2f})")
            cells.append(f'<td style="background:{colour}">{count}</td>')
        rows.append(f"<tr><th>{esc(label)}</th>" + "".join(cells) + "</tr>")
    return "".join(rows) + "</table>"


def _calibration_lines(result: Mapping[str, Any]) -> list[str]:
    table = result.get("calibration")
    if not table:
        return []
    lines = ["", "## Calibration", "",
             f"Expected calibration error {table['ece']:.4f}, maximum calibration error {table['mce']:.4f} "
             f"({len(table['bins'])} confidence bins of the predicted class's probability; 0 is perfect).", "",
             "| confidence | images | accuracy | mean confidence |", "|---|---:|---:|---:|"]
    for row in table["bins"]:
        if row["count"]:
            lines.append(f"| {row['low']:.1f}-{row['high']:.1f} | {row['count']} | {row['accuracy']:.4f} | "
                         f"{row['confidence']:.4f} |")
    return lines


def _tflite_lines(result: Mapping[str, Any]) -> list[str]:
    files = result.get("tflite") or {}
    if not files:
        return []
    lines = ["", "## TFLite models", "",
             f"Compared with the Keras/SavedModel network on the same {result['count']} {result['split']} images.", "",
             "| file | kind | size | largest probability difference | top-1 agreement |",
             "|---|---|---:|---:|---:|"]
    for name, row in files.items():
        lines.append(f"| {name} | {_TFLITE_NAMES.get(name, '')} | {row['size_bytes'] / 1e6:.2f} MB | "
                     f"{row['max_abs_difference']:.2e} | {row['top1_agreement']:.2%} |")
    return lines


# ---------------------------------------------------------------------------------------------
# Training curves (self-contained HTML with inline SVG: the UI may have no internet access)
# ---------------------------------------------------------------------------------------------

_WIDTH, _HEIGHT = 560, 300
_LEFT, _RIGHT, _TOP, _BOTTOM = 64, 16, 32, 44  # The legend sits in the top margin, clear of the lines.
_TRAIN_COLOUR, _VALIDATION_COLOUR = "#1f77b4", "#d62728"
_MAX_MARKERS = 60  # Beyond this many epochs, point markers only clutter the line.


def training_curves_html(history: Mapping[str, Sequence[float]], title: str = "Training curves") -> str:
    """One chart per metric in a Keras history (loss first), training against validation, per epoch.

    ``history`` is Keras' ``History.history``: ``{"loss": [...], "val_loss": [...], "accuracy": [...],
    ...}``. A metric recorded only for validation (or only for training) gets a chart with one line.
    Non-numeric entries are skipped, and non-finite values (a diverged loss) leave a gap.
    """
    names = _metric_names(history)
    charts = [_chart(name, _series(history.get(name)), _series(history.get(f"val_{name}"))) for name in names]
    body = "\n".join(charts) if charts else "<p>No per-epoch history was recorded.</p>"
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; }}
h1 {{ font-size: 20px; }}
.chart {{ display: inline-block; margin: 0 24px 24px 0; vertical-align: top; }}
.chart h2 {{ font-size: 15px; margin: 0 0 4px 0; }}
svg text {{ font-size: 11px; fill: #444; }}
</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
{body}
</body>
</html>
"""


def _metric_names(history: Mapping[str, Any]) -> list[str]:
    names: list[str] = []
    for key, values in history.items():
        name = key[4:] if key.startswith("val_") else key
        if name not in names and _series(values):
            names.append(name)
    return sorted(names, key=lambda name: name != "loss")  # Stable: loss first, others as recorded.


def _series(values: Any) -> list[float]:
    """The values as floats (NaN for missing or non-finite ones), or [] when it is not a numeric list."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        return []
    numbers = []
    for value in values:
        if value is None:
            numbers.append(math.nan)
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            return []
        numbers.append(float(value) if math.isfinite(value) else math.nan)
    return numbers


def _chart(name: str, train: list[float], validation: list[float]) -> str:
    epochs = max(len(train), len(validation))
    finite = [v for v in train + validation if not math.isnan(v)]
    low, high = (min(finite), max(finite)) if finite else (0.0, 1.0)
    ticks = _nice_ticks(low, high)
    y_min, y_max = ticks[0], ticks[-1]
    plot_width, plot_height = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM

    def x(epoch: int) -> float:  # epoch counts from 1
        return _LEFT + (plot_width * (epoch - 1) / (epochs - 1) if epochs > 1 else plot_width / 2)

    def y(value: float) -> float:
        return _TOP + plot_height * (1 - (value - y_min) / (y_max - y_min))

    parts = [f'<rect x="{_LEFT}" y="{_TOP}" width="{plot_width}" height="{plot_height}" fill="#fff" '
             'stroke="#ccc"/>']
    for tick in ticks:
        parts.append(f'<line x1="{_LEFT}" x2="{_LEFT + plot_width}" y1="{y(tick):.1f}" y2="{y(tick):.1f}" '
                     'stroke="#eee"/>')
        parts.append(f'<text x="{_LEFT - 6}" y="{y(tick) + 4:.1f}" text-anchor="end">'
                     f"{_format_tick(tick)}</text>")
    step = max(1, math.ceil(epochs / 10))
    for epoch in range(1, epochs + 1, step):
        parts.append(f'<text x="{x(epoch):.1f}" y="{_TOP + plot_height + 16}" '
                     f'text-anchor="middle">{epoch}</text>')
    parts.append(f'<text x="{_LEFT + plot_width / 2:.1f}" y="{_HEIGHT - 6}" '
                 'text-anchor="middle">epoch</text>')

    legend = []
    for series_name, values, colour in (("training", train, _TRAIN_COLOUR),
                                        ("validation", validation, _VALIDATION_COLOUR)):
        if not values:
            continue
        parts.append(_line(values, x, y, colour, f"{name} ({series_name})"))
        legend.append((series_name, colour))
    for column, (series_name, colour) in enumerate(legend):
        legend_x, legend_y = _LEFT + 100 * column, _TOP - 12
        parts.append(f'<line x1="{legend_x}" x2="{legend_x + 20}" y1="{legend_y - 4}" y2="{legend_y - 4}" '
                     f'stroke="{colour}" stroke-width="2"/>')
        parts.append(f'<text x="{legend_x + 26}" y="{legend_y}">{series_name}</text>')

    label = html.escape(name)
    return (f'<div class="chart" data-metric="{label}">\n<h2>{label}</h2>\n'
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{_WIDTH}" height="{_HEIGHT}" '
            f'viewBox="0 0 {_WIDTH} {_HEIGHT}" role="img" aria-label="{label} per epoch">\n'
            + "\n".join(parts) + "\n</svg>\n</div>")


def _line(values: list[float], x, y, colour: str, description: str) -> str:
    """A polyline per run of finite values (gaps stay gaps) and, for short runs, a marker per epoch."""
    segments: list[list[str]] = [[]]
    markers = []
    for epoch, value in enumerate(values, start=1):
        if math.isnan(value):
            segments.append([])
            continue
        point = f"{x(epoch):.1f},{y(value):.1f}"
        segments[-1].append(point)
        if len(values) <= _MAX_MARKERS:
            markers.append(f'<circle cx="{x(epoch):.1f}" cy="{y(value):.1f}" r="3" fill="{colour}">'
                           f"<title>{html.escape(description)}, epoch {epoch}: {value:.4g}</title></circle>")
    lines = [f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{" ".join(points)}"/>'
             for points in segments if len(points) > 1]
    return (f'<g class="series" data-series="{html.escape(description)}">'
            + "".join(lines) + "".join(markers) + "</g>")


def _nice_ticks(low: float, high: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten) that cover [low, high]."""
    if high - low < 1e-12:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    count = math.ceil((high - first) / step - 1e-9)
    return [first + i * step for i in range(count + 1)]


def _format_tick(value: float) -> str:
    return f"{value:.4g}" if abs(value) >= 1e-12 else "0"
