"""The same search as a Katib Experiment (kubeflow.org/v1beta1), and the trial that Katib runs.

``experiment_manifest`` writes the Experiment: objective, algorithm, trial counts, the search space,
early stopping, and a trial template (a Kubernetes Job running our image on an already converted
data set, with one GPU per trial). The trial is ``python -m trainer.tune.katib --dataset URI --output DIR
--set name=value ...``: it trains and prints one line per epoch that Katib's StdOut metrics
collector reads, and a last one with the value of the exported epoch (the trial's result, the value
tuning judges a trial by), e.g.
``2026-12-03T10:15:02.123456Z epoch=3 validation-accuracy=0.981250 validation-loss=0.512300``.
Each line starts with an RFC 3339 timestamp, strictly increasing: Katib's collector takes a line's
first word as its time (pkg/metricscollector/v1beta1/file-metricscollector/file-metricscollector.go)
and the objective's "latest" value is the one with the latest time
(pkg/controller.v1beta1/trial/trial_controller_util.go); lines without one all get the same zero
time, and "latest" may then be any epoch's. A value that is not a number is never printed (the
collector's early-stopping watcher stops on a value it cannot parse): a trial whose objective
becomes NaN or infinite stops and exits with an error, so Katib records it as failed.

Metric names use '-' where our objectives use ':' (``validation:accuracy`` is ``validation-accuracy``):
Katib's default filter (pkg/metricscollector/v1beta1/common/const.go), which the Experiment states,
takes letters, digits, '_', '|' and '-' in a name, so a ':' would cut the name short.

Mapping of the strategies (read at Katib v0.19.0): Bayesian -> tpe and Random -> random (its hyperopt
service), Grid -> grid (its optuna service), Hyperband -> hyperband (with ``epochs`` as its resource,
so the fixed ``epochs`` is r_l). Logarithmic ranges use Katib's ``logUniform`` distribution
(``feasibleSpace.distribution``, Katib 0.17 and later); Katib has no reverse-logarithmic scale, so
those ranges are searched uniformly (``notes`` says so). ``early_stopping_type`` Auto is Katib's
median stopping rule, which differs from ours (see ``MEDIANSTOP``).

Combinations Katib would refuse, or run other than asked, are refused before anything is written
(``problems``): Katib's hyperband needs ``parallelTrialCount >= ceil(eta ** int(log(r_l) / log(eta)))``
(its ValidateAlgorithmSettings, pkg/suggestion/v1beta1/hyperband/service.py) and samples every range
uniformly (pkg/suggestion/v1beta1/hyperband/parameter.py), and the experiment webhook takes names of
at most 40 characters (pkg/webhook/v1beta1/experiment/validator/validator.go).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import re
import sys
from collections.abc import Sequence
from typing import Any

from trainer.errors import HyperparameterError
from trainer.tune import search_space, tuning
from trainer.tune.tuning import TuningConfig

ALGORITHMS = {"Bayesian": "tpe", "Random": "random", "Grid": "grid", "Hyperband": "hyperband"}
# Katib's default StdOut filter (pkg/metricscollector/v1beta1/common/const.go, unchanged from v0.14 to
# v0.19): a name, '=', a number with optional sign, fraction and exponent.
METRICS_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"
CONTAINER = "training"
MODEL_DIR = "/tmp/imgclf-model"
HYPERBAND_ETA = 3
# Katib's median stopping for Auto. Its rule (pkg/earlystopping/v1beta1/medianstop/service.py and the
# collector's watcher): once min_trials_required trials succeeded, a trial whose best value so far, from
# its start_step-th report on, is worse than the mean over those trials of their first start_step
# values' average is stopped. Ours (tuning.MedianRulePruner) compares the value at each epoch with the
# median of the others' running averages at that epoch; the warm-up and the trial count are the same.
MEDIANSTOP = {"min_trials_required": tuning.PRUNE_MIN_TRIALS, "start_step": tuning.PRUNE_WARMUP_EPOCHS + 1}
# metadata.name as the experiment webhook takes it.
NAME_PATTERN, NAME_MAX = r"[a-z]([-a-z0-9]*[a-z0-9])?", 40


class KatibError(HyperparameterError):
    """The search cannot be written as an Experiment that Katib accepts and runs as asked; one line each."""

    def __str__(self) -> str:
        return "not a Katib Experiment that Katib accepts and runs as asked:\n" + "\n".join(
            f"  - {p}" for p in self.problems)


def metric_name(objective: str) -> str:
    """Our objective's name as Katib reads it: 'validation:accuracy' -> 'validation-accuracy'."""
    return objective.replace(":", "-")


def _trial_parameter(name: str) -> str:
    """Katib trial-parameter names in camelCase, as its examples write them: learning_rate -> learningRate."""
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def hyperband_parallel_trials(epochs: int) -> int:
    """The trials Katib's hyperband starts at once with r_l = ``epochs``; it refuses a parallelTrialCount below.

    Its ValidateAlgorithmSettings computes ``ceil(eta ** int(log(r_l) / log(eta)))`` in floating point
    (so 243 epochs give 81, not 243); this does the same.
    """
    return math.ceil(HYPERBAND_ETA ** int(math.log(float(epochs)) / math.log(HYPERBAND_ETA)))


def problems(config: TuningConfig, name: str) -> list[str]:
    """What Katib would refuse in this search, or run other than asked; one line each, saying what to do."""
    found = []
    if not re.fullmatch(NAME_PATTERN, name) or len(name) > NAME_MAX:
        found.append(f"name {name!r}: Katib takes Experiment names of lower-case letters, digits and '-', starting "
                     f"with a letter and ending with a letter or digit, at most {NAME_MAX} characters")
    if config.strategy == "Hyperband":
        needed = hyperband_parallel_trials(config.fixed.epochs)
        if config.lanes < needed:
            more = f" and max_trials to at least {needed}" if config.max_trials < needed else ""
            found.append(f"parallel_trials: Katib's hyperband starts {needed} trials at once for epochs "
                         f"{config.fixed.epochs} (eta {HYPERBAND_ETA}) and refuses fewer; set parallel_trials to "
                         f"{needed}{more}, or lower epochs")
        for r in config.space.ranges:
            if r.kind != search_space.CATEGORICAL and r.scale != "Linear":
                found.append(f"{r.name}: Katib's hyperband samples every range uniformly, but this one is searched "
                             f"on a {r.scale} scale ({search_space._text(r.low)} to {search_space._text(r.high)}); "
                             "give it Linear scaling (and a narrower range) or use Bayesian or Random")
    return found


def notes(config: TuningConfig) -> list[str]:
    """What runs differently under Katib without being wrong: one line each, for the person writing it."""
    return [f"{r.name}: Katib has no reverse-logarithmic scale; this range is searched uniformly"
            for r in config.space.ranges if r.scale == "ReverseLogarithmic" and config.strategy != "Hyperband"]


def experiment_manifest(config: TuningConfig, dataset_uri: str, *, name: str = "imgclf-tuning",
                        namespace: str = "kubeflow", image: str, gpus: int = 1,
                        max_failed_trials: int | None = None, service_account: str = "") -> dict[str, Any]:
    """The Katib v1beta1 Experiment running ``config``'s search on a converted data set at ``dataset_uri``.

    Raises KatibError, listing ``problems``, for a search Katib would refuse or run other than asked.
    """
    found = problems(config, name)
    if found:
        raise KatibError(found)
    objective = metric_name(config.objective)
    others = [metric_name(o) for o in ("validation:accuracy", "validation:loss") if o != config.objective]
    ranges = list(config.space.ranges)
    parameters = [_parameter(r) for r in ranges]
    algorithm: dict[str, Any] = {"algorithmName": ALGORITHMS[config.strategy]}
    if config.strategy == "Hyperband":
        # epochs is the resource (tuning refuses it ranged under Hyperband): Katib sets it per trial.
        parameters.append({"name": "epochs", "parameterType": "int",
                           "feasibleSpace": {"min": "1", "max": str(config.fixed.epochs)}})
        algorithm["algorithmSettings"] = [{"name": "resource_name", "value": "epochs"},
                                          {"name": "eta", "value": str(HYPERBAND_ETA)},
                                          {"name": "r_l", "value": str(config.fixed.epochs)}]
    elif config.strategy in ("Bayesian", "Random"):
        algorithm["algorithmSettings"] = [{"name": "random_state", "value": str(config.fixed.random_seed)}]
    searched = [p["name"] for p in parameters]
    fixed = {k: v for k, v in config.fixed.to_sagemaker_strings().items() if k not in searched}
    args = ["-m", "trainer.tune.katib", "--dataset", dataset_uri, "--output", MODEL_DIR,
            "--objective", config.objective]
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
                                 "source": {"filter": {"metricsFormat": [METRICS_FILTER]}}},
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
                                 "algorithmSettings": [{"name": k, "value": str(v)} for k, v in MEDIANSTOP.items()]}
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


class MetricLines:
    """Prints the trial's metric lines: each with a strictly increasing RFC 3339 timestamp first, finite values only."""

    def __init__(self):
        self.last: datetime.datetime | None = None

    def timestamp(self) -> str:
        now = datetime.datetime.now(datetime.UTC)
        if self.last is not None and now <= self.last:  # Katib keeps microseconds: never two lines at one time
            now = self.last + datetime.timedelta(microseconds=1)
        self.last = now
        return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def print(self, fields: dict[str, float]) -> None:
        shown = " ".join(f"{name}={value:.6f}" if isinstance(value, float) else f"{name}={value}"
                         for name, value in fields.items() if not isinstance(value, float) or math.isfinite(value))
        print(f"{self.timestamp()} {shown}", flush=True)


def _validation_fields(metrics: dict[str, Any]) -> dict[str, float]:
    """Keras validation metrics (``val_accuracy`` or ``accuracy``) as Katib metric names and floats."""
    return {metric_name("validation:" + key.removeprefix("val_")): float(value) for key, value in metrics.items()}


# --- The trial -------------------------------------------------------------------------------------------


def run_trial(argv: Sequence[str] | None = None) -> int:
    """Train with the given hyperparameters and print Katib's metric lines after every epoch and at the end.

    Exits 1 with the reason when training fails or the objective is not a number (NaN, infinite):
    training stops at the first such epoch, and Katib records the trial as failed.
    """
    import keras

    from trainer import hyperparameters as hps
    from trainer.errors import ImgclfError
    from trainer.train.training import train

    parser = argparse.ArgumentParser(prog="python -m trainer.tune.katib", description="one Katib trial of imgclf")
    parser.add_argument("--dataset", required=True, help="converted data set (local path or gs:// URI)")
    parser.add_argument("--output", required=True, help="model folder to write")
    parser.add_argument("--objective", default=tuning.DEFAULT_OBJECTIVE, choices=list(tuning.OBJECTIVES))
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    lines = MetricLines()
    metric = tuning.OBJECTIVES[args.objective][0]

    class Report(keras.callbacks.Callback):
        diverged: str | None = None

        def on_epoch_end(self, epoch, logs=None):
            logs = logs or {}
            lines.print({"epoch": epoch + 1, **_validation_fields({k: v for k, v in logs.items()
                                                                    if k.startswith("val_")})})
            value = logs.get(f"val_{metric}")
            if value is not None and not math.isfinite(float(value)):
                Report.diverged = tuning.diverged_reason(metric, float(value), epoch + 1)
                self.model.stop_training = True

    try:
        hp = hps.Hyperparameters.resolve(assignments=args.assignments)
        result = train(hp, args.dataset, args.output, callbacks=[Report()])
    except ImgclfError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    final = result["validation_metrics"]
    value = final.get(metric)
    if Report.diverged or value is None or not math.isfinite(float(value)):
        reason = Report.diverged or (f"training reported no validation {metric}" if value is None else
                                     tuning.diverged_reason(metric, float(value), result["epochs_completed"]))
        print(f"error: {reason}", file=sys.stderr)
        return 1
    lines.print(_validation_fields(final))
    return 0


if __name__ == "__main__":
    sys.exit(run_trial())
