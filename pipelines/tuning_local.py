"""Runs the compiled tuning pipeline on this machine through kfp.local and writes tuning.json.

kfp.local (2.17) runs ``dsl.ParallelFor`` itself, with its ``parallelism`` limit, so the lanes of
trials run side by side here as on a cluster; each trial is a process of this Python environment.
"""

import json
import os
from typing import Any

from kfp import components, local

from pipelines import run_page
from pipelines.compiler import compile_tuning_pipeline
from pipelines.local import _describe_outputs, execute, write_run_page
from trainer import storage

TUNING_FILE = "tuning.json"
BEST_FILE = "best_hyperparameters.yaml"


def run_tuning_local(data_uri: str, output_dir: str, arguments: dict[str, Any], *,
                     verbose: bool = False) -> dict[str, Any]:
    """Compile the tuning pipeline, run it with kfp.local, write OUTPUT/tuning.json and best_hyperparameters.yaml.

    ``arguments`` are the pipeline's parameters other than data_uri, already checked (see
    ``operations.pipeline_parameters``). Returns the summary: the tuning.json content plus the run's
    status, the best model's test evaluation and the paths; on failure ``status`` is "failed" with
    the step and the reason. The terminal gets a line per step (``verbose``: every line each step
    prints); the run page, with the trials report, is ``OUTPUT/index.html``.
    """
    output_dir = os.path.abspath(output_dir)
    pipeline_root = os.path.join(output_dir, "artifacts")
    os.makedirs(pipeline_root, exist_ok=True)
    if not storage.is_gcs(data_uri):
        data_uri = os.path.abspath(data_uri)
    pipeline_yaml = compile_tuning_pipeline(os.path.join(output_dir, "pipeline.yaml"))
    pipeline = components.load_component_from_file(pipeline_yaml)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
    summary: dict[str, Any] = {"data_uri": data_uri}
    arguments = {"data_uri": data_uri, "accelerator_count": "0", **arguments}
    spec = run_page.load_spec(pipeline_yaml)
    task, _ = execute(pipeline, arguments, summary, spec=spec, output_dir=output_dir, verbose=verbose)
    headline = []
    if task is None:
        _copy_reports(pipeline_root, output_dir, summary)
    else:
        with open(os.path.join(task.outputs["tuning"].path, TUNING_FILE), encoding="utf-8") as handle:
            summary.update(json.load(handle))
        summary["evaluation"] = _describe_outputs(task.outputs)
        with open(task.outputs["best_hyperparameters"].path, encoding="utf-8") as source, \
                open(os.path.join(output_dir, BEST_FILE), "w", encoding="utf-8") as target:
            target.write(source.read())
        summary["report_html"] = os.path.join(task.outputs["tuning"].path, "report.html")
        best, evaluation = summary["best"], summary["evaluation"]
        headline = [f"best: trial {best['trial']}, {summary['objective']} = {best['value']:.4f}",
                    f"best model on the test split: {evaluation['eval_metric']} = {evaluation['eval_value']:.4f}; "
                    f"{evaluation['blessing']}"]
    write_run_page(output_dir, spec, summary, arguments, headline)
    with open(os.path.join(output_dir, TUNING_FILE), "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
    return summary


def _copy_reports(pipeline_root: str, output_dir: str, summary: dict[str, Any]) -> None:
    """After a failed run: the trials as far as the select step recorded them, if it got that far."""
    for root, _, files in os.walk(pipeline_root):
        if TUNING_FILE in files and "select-best-trial" in root:
            with open(os.path.join(root, TUNING_FILE), encoding="utf-8") as handle:
                tuning = json.load(handle)
            summary.update({k: v for k, v in tuning.items() if k not in summary})
            summary["report_html"] = os.path.join(root, "report.html")
