"""Tuning step 4: read the finished search, report every trial and hand on the best trial's model."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def select_best_trial(
    study: Input[Artifact],
    best_model: Output[Model],
    best_hyperparameters: Output[Artifact],
    tuning: Output[Artifact],
    report: Output[Markdown],
    report_html: Output[HTML],
    metrics: Output[Metrics],
) -> NamedTuple("Outputs", [("best_trial", int), ("best_value", float)]):
    """Writes the trials report and copies the best trial's model; fails, listing why, if no trial completed.

    Args:
        study: The setup step's study artifact; its metadata names the study folder.
        best_model: The best trial's model folder, as the train step writes it.
        best_hyperparameters: YAML of the best trial's hyperparameters; `--params` takes it as it is.
        tuning: Folder holding tuning.json (every trial's hyperparameters, objective, status, epochs, seconds).
        report: The trials table in Markdown.
        report_html: The trials table and plots of the objective per trial and against each tuned hyperparameter.
        metrics: The best value of the objective and the count of trials by status.
    """
    import collections
    import os
    import shutil

    from trainer import logs
    from trainer.tune import tuning as tuning_lib

    logs.configure()
    os.makedirs(tuning.path, exist_ok=True)
    try:
        summary = tuning_lib.select_best(study.metadata["study_uri"], best_model.path, tuning.path)
    finally:
        # The reports are worth showing even when every trial failed.
        for name, target in (("report.md", report.path), ("report.html", report_html.path),
                             ("best_hyperparameters.yaml", best_hyperparameters.path)):
            if os.path.exists(os.path.join(tuning.path, name)):
                shutil.copyfile(os.path.join(tuning.path, name), target)
    best = summary["best"]
    metrics.log_metric("best_trial", best["trial"])
    for name, value in tuning_lib.trial_metrics(summary["trials"], summary["direction"]).items():
        metrics.log_metric(name, value)
    best_model.metadata.update({"framework": "tensorflow", "backbone": best["hyperparameters"]["model"],
                                "trial": best["trial"], "objective": summary["objective"], "value": best["value"]})
    outputs = collections.namedtuple("Outputs", ["best_trial", "best_value"])
    return outputs(best["trial"], float(best["value"]))
