"""A stand-in for Katib in tests: the rules by which it accepts an Experiment, and how it reads a trial's output.

Written from Katib's source at tag v0.19.0 (kubeflow/katib, commit 578e60f1ce83), not copied from it;
each function names the files it stands in for. The Python services were also run on the Experiments
that ``imgclf katib-experiment`` writes (see ``ANSWERS``): these rules agree with what they answered.
Katib validates in three places, all of which must pass before a single trial runs:

- the experiment webhook (Go: pkg/webhook/v1beta1/experiment/validator/validator.go), after the
  mutating webhook's defaults (pkg/apis/controller/experiments/v1beta1/experiment_defaults.go);
- the suggestion service of the algorithm (Python, pkg/suggestion/v1beta1/<service>/service.py,
  ``ValidateAlgorithmSettings``): random and tpe are served by hyperopt, grid by optuna, hyperband by
  hyperband (manifests/v1beta1/installs/katib-standalone/katib-config.yaml);
- the early-stopping service (pkg/earlystopping/v1beta1/medianstop/service.py,
  ``ValidateEarlyStoppingSettings``).
"""

from __future__ import annotations

import datetime
import math
import re
from typing import Any

TAG = "v0.19.0"
# What Katib's own services answered, run on our exports (scratch venv, Katib's generated api_pb2 on the
# path): an Experiment with 2 parallel trials, eta 3 and r_l 3 (the default epochs), and with r_l 15.
ANSWERS = {"hyperband, parallelTrialCount 2, r_l 3": "parallelTrialCount must be not less than 3.",
           "hyperband, parallelTrialCount 2, r_l 15": "parallelTrialCount must be not less than 9."}

# katib-config.yaml: the algorithms a standard install serves, and which service validates each.
SERVICES = {"random": "hyperopt", "tpe": "hyperopt", "grid": "optuna", "hyperband": "hyperband",
            "bayesianoptimization": "skopt", "cmaes": "goptuna", "sobol": "goptuna", "multivariate-tpe": "optuna",
            "enas": "enas", "darts": "darts", "pbt": "pbt"}
EARLY_STOPPING = ("medianstop",)
# const.go's default StdOut filter, used when an Experiment states none.
DEFAULT_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


def experiment_problems(doc: dict[str, Any]) -> list[str]:
    """Everything Katib refuses in an Experiment (webhook, suggestion service, early-stopping service)."""
    return webhook_problems(doc) + algorithm_problems(doc) + early_stopping_problems(doc)


def webhook_problems(doc: dict[str, Any]) -> list[str]:
    """The experiment webhook's ValidateExperiment on a new Experiment (validator.go), defaults applied first."""
    spec = doc["spec"]
    found = []
    name = doc["metadata"]["name"]
    # The webhook's regex is not anchored at the end, but Kubernetes' own name rules refuse the rest.
    if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 40:
        found.append(f"metadata.name {name!r}")
    parallel = spec.get("parallelTrialCount", 3)  # DefaultTrialParallelCount
    most, failed = spec.get("maxTrialCount"), spec.get("maxFailedTrialCount")
    if failed is not None and failed < 0:
        found.append("maxFailedTrialCount should not be less than 0")
    if most is not None and most <= 0:
        found.append("maxTrialCount must be greater than 0")
    if parallel <= 0:
        found.append("parallelTrialCount must be greater than 0")
    if most is not None and failed is not None and failed > most:
        found.append("maxFailedTrialCount should be less than or equal to spec.maxTrialCount")
    if most is not None and parallel > most:
        found.append("parallelTrialCount should be less than or equal to spec.maxTrialCount")
    objective = spec.get("objective")
    if not objective:
        return [*found, "objective must be specified"]
    if objective.get("type") not in ("minimize", "maximize"):
        found.append("objective.type must be minimize or maximize")
    if not objective.get("objectiveMetricName"):
        found.append("objective.objectiveMetricName must be specified")
    if objective.get("objectiveMetricName") in (objective.get("additionalMetricNames") or []):
        found.append("additionalMetricNames should not contain objectiveMetricName")
    if spec.get("algorithm", {}).get("algorithmName") not in SERVICES:
        found.append(f"algorithm {spec.get('algorithm')!r}: no suggestion config")
    stopping = spec.get("earlyStopping")
    if stopping is not None and stopping.get("algorithmName") not in EARLY_STOPPING:
        found.append(f"earlyStopping {stopping!r}: no early-stopping config")
    if spec.get("resumePolicy", "") not in ("", "Never", "LongRunning", "FromVolume"):
        found.append("invalid resumePolicy")
    found += _trial_template_problems(spec)
    parameters = spec.get("parameters") or []
    if not parameters:
        found.append("spec.parameters must be specified")
    for i, parameter in enumerate(parameters):
        kind, space = parameter.get("parameterType"), parameter.get("feasibleSpace") or {}
        if kind not in ("int", "double", "categorical", "discrete", ""):
            found.append(f"parameters[{i}].parameterType {kind!r} is not supported")
        if space.get("distribution", "uniform") not in ("uniform", "logUniform", "normal", "logNormal", ""):
            found.append(f"parameters[{i}].feasibleSpace.distribution {space['distribution']!r} is not supported")
        if not space:
            found.append(f"parameters[{i}].feasibleSpace must be specified")
        elif kind in ("int", "double"):
            if space.get("list"):
                found.append(f"parameters[{i}].feasibleSpace.list is not supported for {kind}")
            if not space.get("min") or not space.get("max"):
                found.append(f"parameters[{i}].feasibleSpace.min and max must be specified for {kind}")
        elif kind in ("categorical", "discrete") and any(space.get(k) for k in ("min", "max", "step")):
            found.append(f"parameters[{i}].feasibleSpace min, max and step are not supported for {kind}")
    found += _metrics_collector_problems(spec.get("metricsCollectorSpec") or {})
    return found


def _trial_template_problems(spec: dict[str, Any]) -> list[str]:
    """validateTrialTemplate: every trialParameter once, each substituted, nothing left unsubstituted."""
    template = spec.get("trialTemplate")
    if not template:
        return ["trialTemplate must be specified"]
    found = []
    if not template.get("primaryContainerName"):
        found.append("trialTemplate.primaryContainerName must be specified")
    trial_spec = template.get("trialSpec")
    # SetDefault gives a batch/v1 Job its success and failure conditions; other kinds need their own.
    if trial_spec and trial_spec.get("kind") != "Job" and not (template.get("successCondition")
                                                                and template.get("failureCondition")):
        found.append("trialTemplate: successCondition and failureCondition must be specified")
    if template.get("trialParameters") is None:
        return [*found, "trialTemplate.trialParameters must be specified"]
    if not trial_spec:
        return [*found, "trialTemplate.trialSpec must be specified"]
    text = _go_json(trial_spec)
    names, references = set(), set()
    parameter_names = {p.get("name") for p in spec.get("parameters") or []}
    for i, parameter in enumerate(template["trialParameters"]):
        name, reference = parameter.get("name", ""), parameter.get("reference", "")
        if not name or not reference or "{" in name or "}" in name:
            found.append(f"trialParameters[{i}]: name and reference must be specified, without braces")
            continue
        if name in names:
            found.append(f"trialParameters[{i}].name {name} can't be duplicated")
            continue
        if reference in references:
            found.append(f"trialParameters[{i}].reference {reference} can't be duplicated")
            continue
        names.add(name)
        references.add(reference)
        if parameter_names and reference not in parameter_names and not reference.startswith("${trialSpec."):
            found.append(f"trialParameters[{i}].reference {reference} does not exist in spec.parameters")
        placeholder = "${trialParameters." + name + "}"
        if placeholder not in text:
            return [*found, f"trialParameters[{i}].name {name} not found in trialTemplate"]
        text = text.replace(placeholder, "test-value")
    left = re.findall(r"\$\{trialParameters\.[^}]+\}", text)
    if left:
        found.append(f"parameters {left} in trialTemplate not found in trialParameters")
    metadata = trial_spec.get("metadata") or {}
    if metadata.get("name") or metadata.get("namespace"):
        found.append("metadata.name and metadata.namespace in trialTemplate must be omitted")
    if not trial_spec.get("apiVersion") or not trial_spec.get("kind"):
        found.append("APIVersion and Kind in trialTemplate must be specified")
    return found


def _go_json(value: Any) -> str:
    """The trial spec as text, for the webhook's substring checks (the placeholders are what matter)."""
    if isinstance(value, dict):
        return "{" + ",".join(f'"{k}":{_go_json(v)}' for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_go_json(v) for v in value) + "]"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _metrics_collector_problems(collector: dict[str, Any]) -> list[str]:
    """validateMetricsCollector for the StdOut kind: each filter compiles and has two top subexpressions."""
    found = []
    kind = (collector.get("collector") or {}).get("kind", "StdOut")
    if kind not in ("StdOut", "File", "TensorFlowEvent", "PrometheusMetric", "Custom", "None", "Push"):
        found.append(f"invalid metrics collector kind {kind}")
    for pattern in ((collector.get("source") or {}).get("filter") or {}).get("metricsFormat") or []:
        try:
            re.compile(pattern)
        except re.error as err:
            found.append(f"invalid filter {pattern}: {err}")
            continue
        if not re.match(r".*\(.*\).*\(.*\).*", pattern):
            found.append(f"filter {pattern}: two top subexpressions are required")
    return found


def _settings(spec_part: dict[str, Any]) -> list[tuple[str, str]]:
    return [(s["name"], s["value"]) for s in spec_part.get("algorithmSettings") or []]


def algorithm_problems(doc: dict[str, Any]) -> list[str]:
    """ValidateAlgorithmSettings of the service that serves the Experiment's algorithm."""
    spec = doc["spec"]
    name = spec["algorithm"]["algorithmName"]
    settings = _settings(spec["algorithm"])
    if SERVICES.get(name) == "hyperopt":
        # hyperopt/service.py: tpe takes gamma, prior_weight, n_EI_candidates, random_state; random only random_state.
        allowed = {"random_state"} | ({"gamma", "prior_weight", "n_EI_candidates"} if name == "tpe" else set())
        return [f"unknown setting {k} for algorithm {name}" if k not in allowed else f"{k}({v}) is not valid"
                for k, v in settings if k not in allowed or not _valid_hyperopt_setting(k, v)]
    if name == "grid":
        return _grid_problems(spec, settings)
    if name == "hyperband":
        return _hyperband_problems(spec, dict(settings))
    return []


def _valid_hyperopt_setting(key: str, value: str) -> bool:
    try:
        number = float(value)
        if key in ("random_state", "n_EI_candidates"):
            number = int(value)
    except ValueError:
        return False
    return {"gamma": 0 < number < 1, "prior_weight": number > 0, "n_EI_candidates": number > 0,
            "random_state": number >= 0}[key]


def _grid_problems(spec: dict[str, Any], settings: list[tuple[str, str]]) -> list[str]:
    """optuna/service.py: only random_state; every point of the grid listable; maxTrialCount within the grid."""
    found = [f"unknown setting {k} for algorithm grid" for k, _ in settings if k != "random_state"]
    points = []
    for parameter in spec["parameters"]:
        space = parameter["feasibleSpace"]
        if parameter["parameterType"] in ("categorical", "discrete"):
            points.append(len(space["list"]))
        elif parameter["parameterType"] == "int":
            points.append(len(range(int(space["min"]), int(space["max"]) + 1, int(space.get("step") or 1))))
        elif not space.get("step"):
            found.append(f"Param {parameter['name']} step is nil; for a grid every double parameter needs a step")
    if not found and spec.get("maxTrialCount", 0) > math.prod(points):
        found.append(f"Max Trial Count: {spec['maxTrialCount']} > all possible search combinations: "
                     f"{math.prod(points)}")
    return found


def _hyperband_problems(spec: dict[str, Any], settings: dict[str, str]) -> list[str]:
    """hyperband/service.py: r_l and resource_name set, enough parallel trials, the resource a parameter."""
    if "r_l" not in settings or "resource_name" not in settings:
        return ["r_l and resource_name must be set."]
    try:
        r_l = float(settings["r_l"])
    except ValueError:
        return ["r_l must be a positive float number."]
    if r_l < 0:
        return ["r_l must be a positive float number."]
    eta = int(float(settings.get("eta", "3")))
    eta = eta if eta > 0 else 3
    # The number of configurations in the first bracket, computed as the service does, in floating point.
    first_bracket = math.ceil(eta ** int(math.log(r_l) / math.log(eta)))
    if spec.get("parallelTrialCount", 3) < first_bracket:
        return [f"parallelTrialCount must be not less than {first_bracket}."]
    if settings["resource_name"] not in {p["name"] for p in spec["parameters"]}:
        return ["value of resource_name setting must be in parameters."]
    return []


def early_stopping_problems(doc: dict[str, Any]) -> list[str]:
    """medianstop/service.py: min_trials_required an integer > 0, start_step an integer >= 1, nothing else."""
    stopping = doc["spec"].get("earlyStopping")
    if not stopping:
        return []
    found = []
    for key, value in _settings(stopping):
        lowest = {"min_trials_required": 1, "start_step": 1}.get(key)
        if lowest is None:
            found.append(f"unknown setting {key} for algorithm medianstop")
        elif not re.fullmatch(r"[+-]?\d+", value.strip()) or int(value) < lowest:
            found.append(f"{key} must be an integer of at least {lowest}, got {value!r}")
    return found


def not_run_as_written(doc: dict[str, Any]) -> list[str]:
    """What Katib accepts but runs other than the Experiment says (found by reading it, not refused by it).

    hyperband/parameter.py draws every int and double parameter with one uniform sample over [min, max]
    whatever its distribution, and raises "Parameter names are not unique." on its first suggestion.
    """
    spec = doc["spec"]
    names = [p["name"] for p in spec["parameters"]]
    found = [f"parameter {n} listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    if spec["algorithm"]["algorithmName"] == "hyperband":
        found += [f"{p['name']}: {p['feasibleSpace']['distribution']} sampled uniformly by hyperband"
                  for p in spec["parameters"] if p["feasibleSpace"].get("distribution", "uniform") != "uniform"]
    return found


# --- The StdOut metrics collector ------------------------------------------------------------------------

ZERO_TIME = datetime.datetime(1, 1, 1, tzinfo=datetime.UTC)


def read_metrics(output: str, metric_names: list[str], filters: list[str] | None = None
                 ) -> list[tuple[datetime.datetime, str, str]]:
    """(time, name, value) as the collector records them (file-metricscollector.go, parseLogsInTextFormat).

    A line counts when it contains a metric's name; its time is its first word when that parses as
    RFC 3339, else the zero time; every ``name=value`` the filters find for a known name is kept, the
    value as text (an unparsable one is stored as it is).
    """
    found = []
    for line in output.split("\n"):
        if not any(name in line for name in metric_names):
            continue
        first, _, rest = line.partition(" ")
        time = ZERO_TIME
        if rest:
            try:
                time = datetime.datetime.fromisoformat(first.replace("Z", "+00:00"))
            except ValueError:
                time = ZERO_TIME
            if time.tzinfo is None:  # RFC 3339 requires an offset
                time = ZERO_TIME
        for pattern in filters or [DEFAULT_FILTER]:
            for match in re.finditer(pattern, line):
                if match.group(1).strip() in metric_names:
                    found.append((time, match.group(1).strip(), match.group(2).strip()))
    return found


def latest(records: list[tuple[datetime.datetime, str, str]], name: str) -> str | None:
    """The objective's "latest" value (trial_controller_util.go getMetrics): the one with the latest time.

    Records come from the database ordered by time only; among records sharing the latest time the order
    is the database's, so more than one value there is no answer: None. (Unavailable when none is found.)
    """
    mine = [(time, value) for time, metric, value in records if metric == name]
    if not mine:
        return "unavailable"
    last = max(time for time, _ in mine)
    values = {value for time, value in mine if time == last}
    return values.pop() if len(values) == 1 else None


def early_stopping_reads(output: str, rule_name: str, filters: list[str] | None = None) -> list[float]:
    """The values the collector's early-stopping watcher parses (cmd/metricscollector/.../main.go).

    It converts each value with strconv.ParseFloat and stops (klog.Fatalf) on one it cannot parse:
    ValueError here.
    """
    values = []
    for line in output.split("\n"):
        if rule_name not in line:
            continue
        for pattern in filters or [DEFAULT_FILTER]:
            for match in re.finditer(pattern, line):
                if match.group(1).strip() == rule_name:
                    text = match.group(2).strip()
                    if not re.fullmatch(r"[+-]?(\d+(\.\d*)?|\.\d+)([Ee][+-]?\d+)?", text):
                        raise ValueError(f"Unable to parse value {text!r} to float for metric {rule_name}")
                    values.append(float(text))
    return values

