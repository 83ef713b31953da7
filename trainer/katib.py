"""The same search as a Katib Experiment (kubeflow.org/v1beta1), and the trial that Katib runs.

``experiment_manifest`` writes the Experiment: objective, algorithm, trial counts, the search space,
early stopping, and a trial template (a Kubernetes Job running our image on an already converted
data set, with one GPU per trial). The trial is ``python -m trainer.katib --dataset URI --output DIR
--set name=value ...``: it trains and prints one line per epoch that Katib's StdOut metrics
collector reads, e.g. ``epoch=3 validation-accuracy=0.981250 validation-loss=0.512300``.

Metric names use '-' where our objectives use ':' (``validation:accuracy`` is ``validation-accuracy``):
Katib's default filter, ``([\\w|-]+)\\s*=\\s*((-?\\d+)(\\.\\d+)?)``, takes letters, digits, '_', '|'
and '-' in a name, so a ':' would cut the name short. Values are printed in fixed-point notation
because that filter reads no exponent; the Experiment still states a filter that does, for
collectors configured otherwise.

Mapping of the strategies: Bayesian -> tpe, Random -> random, Grid -> grid, Hyperband -> hyperband
(with ``epochs`` as its resource). Logarithmic ranges use Katib's ``logUniform`` distribution
(``feasibleSpace.distribution``, Katib 0.17 and later); Katib has no reverse-logarithmic scale, so
those ranges are searched uniformly. ``early_stopping_type`` Auto is Katib's median stopping rule.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from typing import Any

from trainer import search_space
from trainer.tuning import TuningConfig

ALGORITHMS = {"Bayesian": "tpe", "Random": "random", "Grid": "grid", "Hyperband": "hyperband"}
# A filter that also reads exponents (and signs); Katib's default reads neither.
METRICS_FORMAT = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
# Katib's default StdOut filter (pkg/metricscollector/v1beta1/common/const.go).
KATIB_DEFAULT_FILTER = r"([\w|-]+)\s*=\s*((-?\d+)(\.\d+)?)"
CONTAINER = "training"
MODEL_DIR = "/tmp/imgclf-model"


def metric_name(objective: str) -> str:
    """Our objective's name as Katib reads it: 'validation:accuracy' -> 'validation-accuracy'."""
    return objective.replace(":", "-")


def _trial_parameter(name: str) -> str:
    """Katib trial-parameter names in camelCase, as its examples write them: learning_rate -> learningRate."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def experiment_manifest(config: TuningConfig, dataset_uri: str, *, name: str = "imgclf-tuning",
                        namespace: str = "kubeflow", image: str, gpus: int = 1,
                        max_failed_trials: int | None = None, service_account: str = "") -> dict[str, Any]:
    """The Katib v1beta1 Experiment running ``config``'s search on a converted data set at ``dataset_uri``."""
    objective = metric_name(config.objective)
    others = [metric_name(o) for o in ("validation:accuracy", "validation:loss") if o != config.objective]
    ranges = list(config.space.ranges)
    parameters = [_parameter(r) for r in ranges]
    algorithm: dict[str, Any] = {"algorithmName": ALGORITHMS[config.strategy]}
    if config.strategy == "Hyperband":
        parameters.append({"name": "epochs", "parameterType": "int",
                           "feasibleSpace": {"min": "1", "max": str(config.fixed.epochs)}})
        algorithm["algorithmSettings"] = [{"name": "resource_name", "value": "epochs"},
                                          {"name": "eta", "value": "3"},
                                          {"name": "r_l", "value": str(config.fixed.epochs)}]
    elif config.strategy in ("Bayesian", "Random"):
        algorithm["algorithmSettings"] = [{"name": "random_state", "value": str(config.fixed.random_seed)}]
    searched = [r.name for r in ranges] + (["epochs"] if config.strategy == "Hyperband" else [])
    fixed = {k: v for k, v in config.fixed.to_sagemaker_strings().items() if k not in searched}
    args = ["-m", "trainer.katib", "--dataset", dataset_uri, "--output", MODEL_DIR, "--objective", config.objective]
    for key, value in fixed.items():
        args += ["--set", f"{key}={value}"]
    for key in searched:
        args += ["--set", f"{key}=${{trialParameters.{_trial_parameter(key)}}}"]
    container: dict[str, Any] = {"name": CONTAINER, "image": image, "command": ["python"], "args": args}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": gpus}}
    pod: dict[str, Any] = {"containers": [container], "restartPolicy": "Never"}
    if gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if service_account:
        pod["serviceAccountName"] = service_account
    spec: dict[str, Any] = {
        "objective": {"type": config.direction, "objectiveMetricName": objective,
                      "additionalMetricNames": others,
                      "metricStrategies": [{"name": objective, "value": "latest"}]},
        "algorithm": algorithm,
        "parallelTrialCount": config.lanes,
        "maxTrialCount": config.n_trials,
        "maxFailedTrialCount": max_failed_trials if max_failed_trials is not None else config.n_trials,
        "metricsCollectorSpec": {"collector": {"kind": "StdOut"},
                                 "source": {"filter": {"metricsFormat": [METRICS_FORMAT]}}},
        "parameters": parameters,
        "trialTemplate": {
            "primaryContainerName": CONTAINER,
            "trialParameters": [{"name": _trial_parameter(key), "reference": key,
                                 "description": f"imgclf hyperparameter {key}"} for key in searched],
            "trialSpec": {"apiVersion": "batch/v1", "kind": "Job", "spec": {"template": {"spec": pod}}},
        },
    }
    if config.early_stopping_type == "Auto" and config.strategy != "Hyperband":
        spec["earlyStopping"] = {"algorithmName": "medianstop",
                                 "algorithmSettings": [{"name": "min_trials_required", "value": "3"},
                                                       {"name": "start_step", "value": "1"}]}
    return {"apiVersion": "kubeflow.org/v1beta1", "kind": "Experiment",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _parameter(r: search_space.ParameterRange) -> dict[str, Any]:
    if r.kind == search_space.CATEGORICAL:
        return {"name": r.name, "parameterType": "categorical",
                "feasibleSpace": {"list": [str(search_space._plain(v)) for v in r.values]}}
    space: dict[str, Any] = {"min": str(r.low), "max": str(r.high)}
    if r.scale == "Logarithmic":
        space["distribution"] = "logUniform"
    return {"name": r.name, "parameterType": "int" if r.kind == search_space.INTEGER else "double",
            "feasibleSpace": space}


def parse_metrics(text: str, pattern: str = KATIB_DEFAULT_FILTER) -> list[tuple[str, float]]:
    """(name, value) pairs as Katib's StdOut collector reads them from a trial's output."""
    found = []
    for line in text.splitlines():
        for match in re.finditer(pattern, line):
            found.append((match.group(1), float(match.group(2))))
    return found


# --- The trial -------------------------------------------------------------------------------------------


def run_trial(argv: Sequence[str] | None = None) -> int:
    """Train with the given hyperparameters and print Katib's metric lines after every epoch."""
    import keras

    from trainer import hyperparameters as hps
    from trainer.errors import ImgclfError
    from trainer.training import train

    parser = argparse.ArgumentParser(prog="python -m trainer.katib", description="one Katib trial of imgclf")
    parser.add_argument("--dataset", required=True, help="converted data set (local path or gs:// URI)")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--objective", default="validation:accuracy")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)

    class Report(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            fields = [f"epoch={epoch + 1}"] + [f"{metric_name('validation:' + key[4:])}={float(value):.6f}"
                                               for key, value in logs.items() if key.startswith("val_")]
            print(" ".join(fields), flush=True)

    try:
        hp = hps.Hyperparameters.resolve(assignments=args.assignments)
        result = train(hp, args.dataset, args.output, callbacks=[Report()])
    except ImgclfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    final = result["validation_metrics"]
    print(" ".join(f"{metric_name('validation:' + k)}={float(v):.6f}" for k, v in final.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_trial())
