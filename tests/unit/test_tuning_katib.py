"""The Katib Experiment: checked against Katib's own rules (tests/support/katib.py stands in for Katib v0.19.0),
its structure read by the kubeflow-katib SDK's models, and its trial command run for real."""

import itertools
import os
import re
import shlex
import subprocess
import sys
import types

import kubernetes.client
import pytest
from kubeflow.katib import models as katib_models

from components._image import IMAGE
from pipelines.cli import main as imgclf
from tests.support import katib as katib_rules
from trainer import hyperparameters as hps
from trainer.data.conversion import convert_dataset
from trainer.data.validation import validate_dataset
from trainer.errors import HyperparameterError
from trainer.tune import katib, tuning

RANGES = {"ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.0005", "MaxValue": "0.01",
                                         "ScalingType": "Logarithmic"}],
          "IntegerParameterRanges": [{"Name": "batch_size", "MinValue": "4", "MaxValue": "16"}],
          "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "rmsprop"]}]}
LINEAR = {"learning_rate": {"min": 0.001, "max": 0.01, "scaling": "Linear"}, "batch_size": {"min": 4, "max": 16},
          "optimizer": ["adam", "rmsprop"], "reinitialize_top_layer": [True, False]}
FIXED = {"model": "small_cnn", "weights": "none", "image_size": 16, "epochs": 2, "validation_split_ratio": 0.25,
         "test_split_ratio": 0.2}
# Katib 0.17 added feasibleSpace.distribution; the SDK that installs beside kfp here (0.14) predates it.
NEWER_THAN_SDK = {("V1beta1FeasibleSpace", "distribution")}
# Every kind of search we can write: the recommended ranges, linear, logarithmic (the digits demo's),
# reverse-logarithmic, a ranged epochs, categorical only.
SPACES = {"recommended": "", "linear": LINEAR, "digits": open("pipelines/params/digits_ranges.yaml").read(),
          "reverse": {"momentum": {"min": 0.0, "max": 0.99, "scaling": "ReverseLogarithmic"}, "optimizer": ["sgd"]},
          "ranged epochs": {"epochs": {"min": 1, "max": 27}, "optimizer": ["adam", "sgd"]},
          "categorical": {"optimizer": ["adam", "sgd", "rmsprop"], "reinitialize_top_layer": [True, False]}}


def strict(cls, data, package, path="spec"):
    """Build an SDK model from a manifest dict, refusing any key the model does not declare."""
    if isinstance(cls, str):
        inner = re.fullmatch(r"list\[(.+)\]", cls)
        if inner:
            assert isinstance(data, list), path
            return [strict(inner.group(1), item, package, f"{path}[{i}]") for i, item in enumerate(data)]
        inner = re.fullmatch(r"dict\(str, (.+)\)", cls)
        if inner:
            assert isinstance(data, dict), path
            return {k: strict(inner.group(1), v, package, f"{path}.{k}") for k, v in data.items()}
        if cls in ("str", "int", "bool", "float", "object"):
            return data
        cls = getattr(package, cls, None) or getattr(kubernetes.client, cls)
    by_json = {json_name: attr for attr, json_name in cls.attribute_map.items()}
    kwargs = {}
    for key, value in data.items():
        if (cls.__name__, key) in NEWER_THAN_SDK:
            continue
        assert key in by_json, f"{path}.{key} is not a field of {cls.__name__}"
        attr = by_json[key]
        kwargs[attr] = strict(cls.openapi_types[attr], value, package, f"{path}.{key}")
    return cls(**kwargs)


def manifest(strategy="Bayesian", early_stopping_type="Auto", ranges=None, parallel_trials=3, **fixed):
    config = tuning.make_config(ranges or RANGES, {**FIXED, **fixed}, strategy=strategy, max_trials=6,
                                parallel_trials=parallel_trials, early_stopping_type=early_stopping_type)
    return config, katib.experiment_manifest(config, "gs://bucket/dataset", image=IMAGE, gpus=1)


def trial_command(doc, suggestion):
    """What Katib does with one suggestion: substitute it into the template; the container's args."""
    container = doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    return [re.sub(r"\$\{trialParameters\.(\w+)\}", lambda m: suggestion[m.group(1)], a) for a in container["args"]]


def test_every_export_is_accepted_by_katib_or_refused_saying_why():
    written, refused = {}, {}
    settings = itertools.product(tuning.STRATEGIES, tuning.EARLY_STOPPING_TYPES, SPACES, [1, 3, 9, 15, 243],
                                 [1, 2, 3, 9, 81], [4, 100], ["validation:accuracy", "validation:loss"])
    for strategy, stopping, space, epochs, parallel, max_trials, objective in settings:
        key = (strategy, stopping, space, epochs, parallel, max_trials, objective)
        try:
            config = tuning.make_config(SPACES[space], {"epochs": epochs}, strategy=strategy, objective=objective,
                                        max_trials=max_trials, parallel_trials=parallel, early_stopping_type=stopping)
            doc = katib.experiment_manifest(config, "gs://bucket/dataset", image=IMAGE)
        except HyperparameterError as err:
            # Refused before anything is written, each line naming the setting and what to do.
            assert err.problems and all(re.match(r"[\w ]+: .*(; | or | to )", p) for p in err.problems), err.problems
            refused[key] = err.problems
            continue
        assert katib_rules.experiment_problems(doc) == [], key
        assert katib_rules.not_run_as_written(doc) == [], key
        # Every value Katib may suggest is one the trial takes: the bounds of each range, each category.
        lows = {p["name"]: (p["feasibleSpace"].get("min") or p["feasibleSpace"]["list"][0]) for p in doc["spec"][
            "parameters"]}
        args = trial_command(doc, {katib._trial_parameter(name): value for name, value in lows.items()})
        sets = [a for a, flag in zip(args[1:], args[:-1], strict=True) if flag == "--set"]
        hps.Hyperparameters.resolve(assignments=sets)
        written[key] = doc
    assert {key[0] for key in written} == set(tuning.STRATEGIES)
    assert len(written) > 1000 and len(refused) > 1000
    hyperband = {key: doc for key, doc in written.items() if key[0] == "Hyperband"}
    assert {(key[3], doc["spec"]["parallelTrialCount"]) for key, doc in hyperband.items()} >= {(3, 3), (15, 9),
                                                                                               (243, 81)}
    # What Katib's hyperband service answered on the old exports (2 parallel trials) is refused here, with the number.
    [line] = refused[("Hyperband", "Off", "linear", 15, 2, 100, "validation:accuracy")]
    assert line.startswith("parallel_trials: Katib's hyperband starts 9 trials at once for epochs 15")
    assert katib_rules.ANSWERS["hyperband, parallelTrialCount 2, r_l 15"].endswith(" 9.")


@pytest.mark.parametrize("settings, problem", [
    ({"parallel_trials": 2, "epochs": 3},
     "parallel_trials: Katib's hyperband starts 3 trials at once for epochs 3 (eta 3) and refuses fewer; set "
     "parallel_trials to 3, or lower epochs"),
    ({"parallel_trials": 9, "epochs": 27, "max_trials": 6},
     "parallel_trials: Katib's hyperband starts 27 trials at once for epochs 27 (eta 3) and refuses fewer; set "
     "parallel_trials to 27 and max_trials to at least 27, or lower epochs"),
    ({"parallel_trials": 3, "epochs": 3, "ranges": RANGES},
     "learning_rate: Katib's hyperband samples every range uniformly, but this one is searched on a Logarithmic "
     "scale (0.0005 to 0.01); give it Linear scaling (and a narrower range) or use Bayesian or Random"),
    ({"parallel_trials": 3, "epochs": 3, "name": "Imgclf_Tuning"},
     "name 'Imgclf_Tuning': Katib takes Experiment names of lower-case letters, digits and '-'"),
])
def test_what_katib_would_refuse_is_refused_before_writing_with_the_reason(settings, problem):
    settings = dict(settings)
    name = settings.pop("name", "imgclf-tuning")
    config = tuning.make_config(settings.pop("ranges", LINEAR), {"epochs": settings.pop("epochs")},
                                strategy="Hyperband", max_trials=settings.pop("max_trials", 30), **settings)
    with pytest.raises(katib.KatibError) as caught:
        katib.experiment_manifest(config, "gs://b/d", image=IMAGE, name=name)
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems
    assert str(caught.value).startswith("not a Katib Experiment that Katib accepts and runs as asked:\n  - ")


def test_the_stand_in_refuses_what_katib_refused():
    """The rules are not vacuous: the exports Katib's services and webhook refused (written at 869f460) fail them."""
    _, doc = manifest("Hyperband", ranges=LINEAR, parallel_trials=3, epochs=3)
    doc["spec"]["parallelTrialCount"] = 2
    assert katib_rules.experiment_problems(doc) == [katib_rules.ANSWERS["hyperband, parallelTrialCount 2, r_l 3"]]
    # A ranged epochs under hyperband was listed twice: as a range and as the resource.
    _, doc = manifest("Hyperband", ranges=LINEAR, parallel_trials=3, epochs=3)
    doc["spec"]["parameters"].append(dict(doc["spec"]["parameters"][-1]))
    doc["spec"]["trialTemplate"]["trialParameters"].append(doc["spec"]["trialTemplate"]["trialParameters"][-1])
    assert katib_rules.not_run_as_written(doc) == ["parameter epochs listed twice"]
    assert any("can't be duplicated" in p for p in katib_rules.webhook_problems(doc))
    _, doc = manifest("Random")
    doc["spec"]["earlyStopping"]["algorithmSettings"].append({"name": "start_step", "value": "0"})
    doc["spec"]["algorithm"]["algorithmSettings"].append({"name": "gamma", "value": "0.5"})
    doc["metadata"]["name"] = "x" * 41
    assert katib_rules.experiment_problems(doc) == [f"metadata.name {'x' * 41!r}", "unknown setting gamma for "
                                                    "algorithm random", "start_step must be an integer of at least "
                                                    "1, got '0'"]


@pytest.mark.parametrize("strategy, algorithm", [("Bayesian", "tpe"), ("Random", "random"),
                                                 ("Hyperband", "hyperband")])
def test_the_experiment_is_a_valid_katib_v1beta1_experiment(strategy, algorithm):
    config, doc = manifest(strategy, ranges=LINEAR if strategy == "Hyperband" else RANGES)
    experiment = strict(katib_models.V1beta1Experiment, doc, katib_models)
    spec = experiment.spec
    assert (doc["apiVersion"], doc["kind"]) == ("kubeflow.org/v1beta1", "Experiment")
    assert spec.algorithm.algorithm_name == algorithm
    assert (spec.parallel_trial_count, spec.max_trial_count, spec.max_failed_trial_count) == (3, 6, 6)
    assert spec.objective.type == "maximize" and spec.objective.objective_metric_name == "validation-accuracy"
    names = {p.name: p for p in spec.parameters}
    assert {"learning_rate", "batch_size", "optimizer"} <= set(names)
    assert names["optimizer"].feasible_space.list == ["adam", "rmsprop"]
    if strategy != "Hyperband":
        assert doc["spec"]["parameters"][[p["name"] for p in doc["spec"]["parameters"]].index("learning_rate")][
            "feasibleSpace"]["distribution"] == "logUniform"
    # The trial template is a Kubernetes Job running our image with a GPU, every parameter referenced.
    template = spec.trial_template
    job = strict(kubernetes.client.V1Job, template.trial_spec, kubernetes.client, "trialSpec")
    [container] = job.spec.template.spec.containers
    assert container.image == IMAGE and container.name == template.primary_container_name
    assert container.resources.limits == {"nvidia.com/gpu": 1}
    command = " ".join(container.args)
    for parameter in template.trial_parameters:
        assert f"${{trialParameters.{parameter.name}}}" in command
        assert parameter.reference in names
    if strategy == "Hyperband":
        assert "epochs" in names and spec.early_stopping is None
        assert [p["name"] for p in doc["spec"]["parameters"]].count("epochs") == 1
    else:
        assert spec.early_stopping.algorithm_name == "medianstop"
        assert {s.name: s.value for s in spec.early_stopping.algorithm_settings} == {
            "min_trials_required": "3", "start_step": "2"}


def test_grid_and_off():
    config = tuning.make_config({"optimizer": ["adam", "sgd"], "reinitialize_top_layer": [True, False]}, FIXED,
                                strategy="Grid", max_trials=9, early_stopping_type="Off")
    doc = katib.experiment_manifest(config, "gs://b/d", image=IMAGE, gpus=0)
    assert doc["spec"]["algorithm"]["algorithmName"] == "grid" and doc["spec"]["maxTrialCount"] == 4
    assert "earlyStopping" not in doc["spec"]
    assert "resources" not in doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    assert katib_rules.experiment_problems(doc) == []


def test_katib_experiment_keeps_the_values_given_when_searching_the_recommended_ranges(tmp_path, capsys):
    out = tmp_path / "experiment.yaml"
    assert imgclf(["katib-experiment", "--dataset", "gs://b/d", "--output", str(out), "--set", "learning_rate=0.01",
                   "--set", "optimizer=sgd"]) == 0
    import yaml

    doc = yaml.safe_load(out.read_text())
    names = [p["name"] for p in doc["spec"]["parameters"]]
    assert "learning_rate" not in names and "optimizer" not in names and "batch_size" in names
    args = doc["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "learning_rate=0.01" in args and "optimizer=sgd" in args
    assert katib_rules.experiment_problems(doc) == []


def test_metric_lines_have_strictly_increasing_times_and_only_numbers(capsys):
    lines = katib.MetricLines()
    for value in (0.5, float("nan"), 0.75):
        lines.print({"epoch": 1, "validation-accuracy": value, "validation-loss": 0.25})
    output = capsys.readouterr().out
    records = katib_rules.read_metrics(output, ["validation-accuracy", "validation-loss"])
    times = [time for time, name, _ in records if name == "validation-loss"]
    assert len(times) == 3 and times == sorted(set(times)) and times[0] > katib_rules.ZERO_TIME
    assert [value for _, name, value in records if name == "validation-accuracy"] == ["0.500000", "0.750000"]
    assert katib_rules.latest(records, "validation-accuracy") == "0.750000"
    assert katib_rules.early_stopping_reads(output, "validation-accuracy") == [0.5, 0.75]


def test_a_trial_whose_objective_is_not_a_number_fails_with_the_reason(monkeypatch, capsys):
    """Katib records a trial whose container exits non-zero as failed; "nan" would stop its early-stopping watcher."""
    def diverging(hp, dataset_dir, model_dir, *, callbacks=()):
        network = types.SimpleNamespace(stop_training=False)
        for epoch, value in enumerate([0.5, float("nan"), 0.9]):
            for callback in callbacks:
                callback.set_model(network)
                callback.on_epoch_end(epoch, {"val_accuracy": value, "val_loss": 1.0})
            if network.stop_training:
                break
        return {"epochs_completed": epoch + 1, "validation_metrics": {"accuracy": value, "loss": 1.0}}

    monkeypatch.setattr("trainer.train.training.train", diverging)
    assert katib.run_trial(["--dataset", "d", "--output", "o"]) == 1
    captured = capsys.readouterr()
    assert "error: validation accuracy is nan after epoch 2: training diverged" in captured.err
    assert "nan" not in captured.out
    assert katib_rules.early_stopping_reads(captured.out, "validation-accuracy") == [0.5]


@pytest.mark.slow
def test_the_trial_command_runs_and_katib_reads_the_exported_epochs_value_last(tmp_path, tiny_dataset):
    validate_dataset(str(tiny_dataset), str(tmp_path / "validation"))
    convert_dataset(str(tiny_dataset), str(tmp_path / "validation" / "validation.json"), str(tmp_path / "dataset"),
                    validation_split_ratio=0.25, test_split_ratio=0.2, random_seed=0)
    config, doc = manifest("Random")
    args = trial_command(doc, {"learningRate": "0.005", "batchSize": "8", "optimizer": "adam"})
    args[args.index("--dataset") + 1] = str(tmp_path / "dataset")
    args[args.index("--output") + 1] = str(tmp_path / "model")
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:] + shlex.join(args)
    # What the StdOut collector sees: stdout and stderr in one file (Katib's sidecar redirects 2>&1).
    output = done.stdout + done.stderr
    metrics = ["validation-accuracy", "validation-loss"]
    filters = doc["spec"]["metricsCollectorSpec"]["source"]["filter"]["metricsFormat"]
    records = katib_rules.read_metrics(output, metrics, filters)
    accuracy = [(time, float(value)) for time, name, value in records if name == "validation-accuracy"]
    assert len(accuracy) == 3  # two epochs and the final line
    assert all(0.0 <= value <= 1.0 for _, value in accuracy)
    assert [time for time, _ in accuracy] == sorted({time for time, _ in accuracy})
    # Katib's "latest" is the last line's: the exported epoch's value, the trial's result.
    assert katib_rules.latest(records, "validation-accuracy") == done.stdout.strip().splitlines()[-1].split(
        "validation-accuracy=")[1].split()[0]
    assert float(katib_rules.latest(records, "validation-accuracy")) == accuracy[-1][1] == accuracy[-2][1]
    assert len(katib_rules.early_stopping_reads(output, "validation-accuracy", filters)) == 3
    assert (tmp_path / "model" / "model.keras").is_file()


def test_katib_experiment_says_what_katib_searches_otherwise_and_refuses_what_it_would_refuse(tmp_path, capsys):
    ranges = tmp_path / "ranges.yaml"
    ranges.write_text("momentum: {min: 0.0, max: 0.99, scaling: ReverseLogarithmic}\noptimizer: [sgd, nesterov]\n")
    out = tmp_path / "experiment.yaml"
    assert imgclf(["katib-experiment", "--dataset", "gs://b/d", "--output", str(out), "--ranges", str(ranges)]) == 0
    assert "note: momentum: Katib has no reverse-logarithmic scale; this range is searched uniformly" in (
        capsys.readouterr().err)
    out.unlink()
    assert imgclf(["katib-experiment", "--dataset", "gs://b/d", "--output", str(out), "--strategy", "Hyperband",
                   "--ranges", str(ranges), "--set", "epochs=9", "--max-trials", "20"]) == 2
    err = capsys.readouterr().err
    assert "  - parallel_trials: Katib's hyperband starts 9 trials at once for epochs 9" in err
    assert "  - momentum: Katib's hyperband samples every range uniformly" in err
    assert not out.exists()
