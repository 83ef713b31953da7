"""Run Katib's own validators on the Experiments `imgclf katib-experiment` writes (by hand; not a pytest module).

Two steps, in two environments:

    # 1. In the project's venv: write the Experiment of every strategy and setting (refusals go to refused.json).
    .venv/bin/python tests/support/katib_services.py write /tmp/katib/exports
    # 2. In a scratch venv with Katib's service dependencies (grpcio, "protobuf<5", numpy, scikit-learn,
    #    hyperopt==0.2.5, optuna==3.3.0, kubernetes, pyyaml) and a Katib checkout's pkg/ (git archive v0.19.0 pkg)
    #    on the path, with its generated api_pb2 (pkg/apis/manager/v1beta1/python) too:
    PYTHONPATH=$KATIB:$KATIB/pkg/apis/manager/v1beta1/python /tmp/katib-venv/bin/python \
        tests/support/katib_services.py check /tmp/katib/exports/*.yaml

``check`` converts each Experiment to Katib's gRPC message as its controller does (ConvertExperiment in
pkg/controller.v1beta1/suggestion/suggestionclient/suggestionclient.go, after the mutating webhook's
defaults), calls ValidateAlgorithmSettings on the service katib-config.yaml assigns to the algorithm,
ValidateEarlyStoppingSettings on medianstop, and GetSuggestions once for parallelTrialCount trials, and
prints what each answered as JSON. tests/support/katib.py encodes the same rules for the test suite.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import sys

STRATEGIES = ("Bayesian", "Random", "Grid", "Hyperband")
SPACES = {"recommended": "", "digits": "pipelines/params/digits_ranges.yaml",
          "linear": "learning_rate: {min: 0.001, max: 0.05, scaling: Linear}\noptimizer: [adam, sgd]\n",
          "epochs": "learning_rate: {min: 0.001, max: 0.05, scaling: Linear}\nepochs: {min: 1, max: 27}\n",
          "grid": "optimizer: [adam, sgd, rmsprop]\nreinitialize_top_layer: [True, False]\n"}


def write(folder: str) -> None:
    """Every strategy x early stopping x space x epochs x parallel trials x max trials x objective, via the CLI."""
    from pipelines.cli import main

    os.makedirs(folder, exist_ok=True)
    refused = {}
    for strategy, stopping, space, epochs, parallel, max_trials, objective in itertools.product(
            STRATEGIES, ("Auto", "Off"), SPACES, (1, 3, 9, 15), (1, 2, 3, 9), (4, 10), ("accuracy", "loss")):
        if (strategy == "Grid") != (space == "grid"):
            continue
        name = f"{strategy}-{stopping}-{space}-e{epochs}-p{parallel}-m{max_trials}-{objective}"
        output = os.path.join(folder, f"{name}.yaml")
        argv = ["katib-experiment", "--dataset", "gs://bucket/dataset", "--output", output,
                "--strategy", strategy, "--early-stopping-type", stopping, "--parallel-trials", str(parallel),
                "--max-trials", str(max_trials), "--objective", f"validation:{objective}"]
        if space != "epochs":
            argv += ["--set", f"epochs={epochs}"]
        if SPACES[space] and not SPACES[space].endswith(".yaml"):
            path = os.path.join(folder, f"ranges-{space}.yml")
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(SPACES[space])
            argv += ["--ranges", path]
        elif SPACES[space]:
            argv += ["--ranges", SPACES[space]]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            if main(argv) != 0:
                refused[name] = err.getvalue().strip()
    with open(os.path.join(folder, "refused.json"), "w", encoding="utf-8") as handle:
        json.dump(refused, handle, indent=1)


def check(paths: list[str]) -> dict[str, dict[str, object]]:
    """What Katib's services answer for each Experiment file."""
    import yaml
    from pkg.apis.manager.v1beta1.python import api_pb2
    from pkg.earlystopping.v1beta1.medianstop.service import MedianStopService
    from pkg.suggestion.v1beta1.hyperband.service import HyperbandService
    from pkg.suggestion.v1beta1.hyperopt.service import HyperoptService
    from pkg.suggestion.v1beta1.optuna.service import OptunaService

    services = {"random": HyperoptService, "tpe": HyperoptService, "grid": OptunaService,
                "hyperband": HyperbandService}
    types = {"int": api_pb2.INT, "double": api_pb2.DOUBLE, "categorical": api_pb2.CATEGORICAL,
             "discrete": api_pb2.DISCRETE}
    distributions = {"uniform": api_pb2.UNIFORM, "logUniform": api_pb2.LOG_UNIFORM, "normal": api_pb2.NORMAL,
                     "logNormal": api_pb2.LOG_NORMAL}

    class Context:
        code, details = None, ""

        def set_code(self, code):
            self.code = code

        def set_details(self, details):
            self.details = details

    def answer(context):
        return "OK" if context.code is None else f"{context.code.name}: {context.details}"

    results = {}
    for path in paths:
        with open(path, encoding="utf-8") as handle:
            spec = yaml.safe_load(handle)["spec"]
        experiment = api_pb2.Experiment(name="check")
        s = experiment.spec
        s.algorithm.algorithm_name = spec["algorithm"]["algorithmName"]
        for setting in spec["algorithm"].get("algorithmSettings") or []:
            s.algorithm.algorithm_settings.add(name=setting["name"], value=setting["value"])
        s.objective.type = api_pb2.MAXIMIZE if spec["objective"]["type"] == "maximize" else api_pb2.MINIMIZE
        s.objective.objective_metric_name = spec["objective"]["objectiveMetricName"]
        s.objective.additional_metric_names.extend(spec["objective"].get("additionalMetricNames") or [])
        for p in spec["parameters"]:
            fs = p["feasibleSpace"]
            s.parameter_specs.parameters.add(name=p["name"], parameter_type=types[p["parameterType"]],
                                             feasible_space=api_pb2.FeasibleSpace(
                                                 max=fs.get("max", ""), min=fs.get("min", ""),
                                                 list=fs.get("list", []), step=fs.get("step", ""),
                                                 distribution=distributions[fs.get("distribution", "uniform")]))
        s.parallel_trial_count = spec.get("parallelTrialCount", 3)
        s.max_trial_count = spec.get("maxTrialCount", 0)
        result: dict[str, object] = {}
        context = Context()
        services[s.algorithm.algorithm_name]().ValidateAlgorithmSettings(
            api_pb2.ValidateAlgorithmSettingsRequest(experiment=experiment), context)
        result["algorithm"] = answer(context)
        if spec.get("earlyStopping"):
            s.early_stopping.algorithm_name = spec["earlyStopping"]["algorithmName"]
            for setting in spec["earlyStopping"].get("algorithmSettings") or []:
                s.early_stopping.algorithm_settings.add(name=setting["name"], value=setting["value"])
            context = Context()
            # MedianStopService() loads a Kubernetes config when built; validating needs none of it.
            MedianStopService.__new__(MedianStopService).ValidateEarlyStoppingSettings(
                api_pb2.ValidateEarlyStoppingSettingsRequest(early_stopping=s.early_stopping), context)
            result["earlyStopping"] = answer(context)
        try:
            reply = services[s.algorithm.algorithm_name]().GetSuggestions(api_pb2.GetSuggestionsRequest(
                experiment=experiment, current_request_number=s.parallel_trial_count,
                total_request_number=s.parallel_trial_count), Context())
            result["suggestions"] = [{a.name: a.value for a in p.assignments} for p in reply.parameter_assignments]
        except Exception as err:  # noqa: BLE001 - what Katib raised is the answer
            result["suggestions"] = f"{type(err).__name__}: {err}"
        results[path] = result
    return results


if __name__ == "__main__":
    if sys.argv[1:2] == ["write"] and len(sys.argv) == 3:
        write(sys.argv[2])
    elif sys.argv[1:2] == ["check"]:
        print(json.dumps(check(sys.argv[2:]), indent=1))
    else:
        sys.exit(__doc__)
