"""Pipeline step 4: measure the trained model on the held-out test split."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(
    trained_model: Input[Model],
    dataset: Input[Dataset],
    eval_metric: str,
    metrics: Output[Metrics],
    confusion_matrix: Output[ClassificationMetrics],
    report: Output[Markdown],
    training_curves: Output[HTML],
    evaluation: Output[Artifact],
    evaluation_report: Output[HTML],
    model_card: Output[Markdown],
) -> NamedTuple("Outputs", [("eval_metric", str), ("eval_value", float)]):
    """Evaluates the model of this run on the test split.

    Args:
        trained_model: The training step's model folder.
        dataset: The converted data set; its test split is used.
        eval_metric: The headline metric (accuracy; precision, recall, auc or prc in binary mode).
        metrics: Every metric that applies, for the run comparison view.
        confusion_matrix: Confusion matrix labelled with class names (and the ROC curve in binary mode).
        report: Per-class precision, recall and support, and the most confused pairs.
        training_curves: Loss and metrics per epoch, training against validation.
        evaluation: Folder holding evaluation.json with everything above.
        evaluation_report: One HTML page: metrics, calibration (ECE, reliability diagram), TFLite
            parity, the error gallery with Grad-CAM heat maps, and the model card.
        model_card: Markdown model card: data, training, evaluation, weak classes, use to fill in.
    """
    import collections
    import json
    import os

    from trainer import logs
    from trainer.evaluate.evaluation import evaluate as evaluate_model
    from trainer.evaluate.evaluation import training_curves_html
    from trainer.layout import HISTORY_FILE

    logs.configure()
    os.makedirs(evaluation.path, exist_ok=True)
    result = evaluate_model(trained_model.path, dataset.path, evaluation.path, eval_metric=eval_metric)
    for name, value in result["metrics"].items():
        metrics.log_metric(name, float(value))
    confusion_matrix.log_confusion_matrix(result["labels"], result["confusion_matrix"])
    if result.get("roc"):
        roc = result["roc"]
        confusion_matrix.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    # The figures live in the artifacts' metadata; a file at each URI too lets a cache reuse the step
    # (kfp.local treats an output without a file as missing).
    for artifact in (metrics, confusion_matrix):
        with open(artifact.path, "w", encoding="utf-8") as handle:
            json.dump(artifact.metadata, handle, indent=2)
    for name, artifact in (("report.md", report), ("report.html", evaluation_report),
                           ("model_card.md", model_card)):
        with open(os.path.join(evaluation.path, name), encoding="utf-8") as source, \
                open(artifact.path, "w", encoding="utf-8") as target:
            target.write(source.read())
    with open(os.path.join(trained_model.path, HISTORY_FILE), encoding="utf-8") as handle:
        history = json.load(handle)
    with open(training_curves.path, "w", encoding="utf-8") as handle:
        handle.write(training_curves_html(history))
    outputs = collections.namedtuple("Outputs", ["eval_metric", "eval_value"])
    return outputs(result["eval_metric"], float(result["eval_value"]))
