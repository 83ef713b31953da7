"""Search spaces: SageMaker's ParameterRanges and our YAML form, read against the schema; every bad range refused."""

import json

import pytest

from trainer import hyperparameters as hps
from trainer.tune import search_space, tuning
from trainer.tune.search_space import RangeError

# The reference's tuning page, unchanged.
REFERENCE_EXAMPLE = """
{"ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.00001", "MaxValue": "0.1",
                                "ScalingType": "Logarithmic"}],
 "IntegerParameterRanges":    [{"Name": "batch_size", "MinValue": "8", "MaxValue": "512", "ScalingType": "Auto"}],
 "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "sgd", "rmsprop"]}]}
"""


def test_the_reference_example_is_accepted_unchanged():
    space = search_space.load_ranges(REFERENCE_EXAMPLE)
    by_name = {r.name: r for r in space.ranges}
    assert set(by_name) == {"learning_rate", "batch_size", "optimizer"}
    assert (by_name["learning_rate"].low, by_name["learning_rate"].high) == (0.00001, 0.1)
    assert by_name["learning_rate"].scale == "Logarithmic"
    assert (by_name["batch_size"].kind, by_name["batch_size"].low, by_name["batch_size"].high) == ("integer", 8, 512)
    assert by_name["optimizer"].values == ("adam", "sgd", "rmsprop")
    # And it goes back out as SageMaker's JSON, which reads the same again.
    assert search_space.parse_ranges(json.loads(space.to_json())) == space


def test_the_yaml_form_gives_the_same_space_as_sagemakers_json():
    yaml_form = """
    learning_rate: {min: 0.00001, max: 0.1, scaling: Logarithmic}
    batch_size: {min: 8, max: 512}
    optimizer: [adam, sgd, rmsprop]
    """
    assert search_space.load_ranges(yaml_form) == search_space.load_ranges(REFERENCE_EXAMPLE)


def test_default_space_is_the_references_recommended_ranges():
    space = search_space.default_space()
    assert set(space.names) == {"batch_size", "beta_1", "beta_2", "epsilon", "learning_rate", "momentum",
                                "regularizers_l2", "optimizer", "train_only_top_layer"}
    by_name = {r.name: r for r in space.ranges}
    assert (by_name["learning_rate"].low, by_name["learning_rate"].high) == (1e-6, 0.5)
    assert by_name["optimizer"].values == hps.OPTIMIZERS
    assert by_name["train_only_top_layer"].values == (True, False)
    assert search_space.load_ranges("") == space


def test_what_can_be_tuned_comes_from_the_schema():
    names = search_space.tunable_names()
    assert set(names) <= set(hps.FIELDS)
    assert "learning_rate" in names and "model" in names
    for fixed_only in ("binary_mode", "eval_metric", "validation_split_ratio", "test_split_ratio", "random_seed",
                       "weights"):
        assert fixed_only not in names


@pytest.mark.parametrize("ranges, problem", [
    ({"learning_rte": {"min": 0.001, "max": 0.1}},
     "learning_rte: unknown hyperparameter; did you mean 'learning_rate'?"),
    ({"ContinuousParameterRanges": [{"Name": "momentum", "MinValue": "0.9", "MaxValue": "0.1"}]},
     "momentum: MinValue 0.9 is above MaxValue 0.1; swap them"),
    ({"ContinuousParameterRanges": [{"Name": "regularizers_l2", "MinValue": "0", "MaxValue": "0.1",
                                     "ScalingType": "Logarithmic"}]},
     "regularizers_l2: a Logarithmic scale needs a range above 0, but MinValue is 0.0; raise MinValue or use Linear"),
    ({"ContinuousParameterRanges": [{"Name": "dropout_rate", "MinValue": "0", "MaxValue": "1"}]},
     "dropout_rate: the range [0.0, 1.0] reaches outside the valid values (a number in [0, 1)): 1.0"),
    ({"IntegerParameterRanges": [{"Name": "batch_size", "MinValue": "0", "MaxValue": "64"}]},
     "batch_size: the range [0, 64] reaches outside the valid values (an integer in [1, 65536]): 0"),
    ({"CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "sdg"]}]},
     "optimizer: 'sdg' (did you mean 'sgd'?) is not valid; expected one of 'adam', 'sgd', 'nesterov', 'rmsprop', "
     "'adagrad', 'adadelta'"),
    ({"ContinuousParameterRanges": [{"Name": "momentum", "MinValue": "0", "MaxValue": "0.999",
                                     "ScalingType": "ReverseLogarithmic"}]}, None),
    ({"ContinuousParameterRanges": [{"Name": "momentum", "MinValue": "0.5", "MaxValue": "1",
                                     "ScalingType": "ReverseLogarithmic"}]},
     "momentum: a ReverseLogarithmic scale needs a range within [0, 1), but the range is [0.5, 1.0]; use Linear or "
     "Logarithmic"),
    ({"ContinuousParameterRanges": [{"Name": "batch_size", "MinValue": "8", "MaxValue": "64"}]},
     "batch_size: is an integer; put it under IntegerParameterRanges"),
    ({"random_seed": [1, 2]}, "random_seed: cannot be tuned"),
])
def test_each_bad_range_is_one_line_naming_the_parameter(ranges, problem):
    if problem is None:
        search_space.parse_ranges(ranges)
        return
    with pytest.raises(RangeError) as caught:
        search_space.parse_ranges(ranges)
    [line] = caught.value.problems
    assert line.startswith(problem), line


def test_fixed_and_ranged_is_refused():
    with pytest.raises(RangeError) as caught:
        search_space.load_ranges(REFERENCE_EXAMPLE, fixed=["learning_rate", "epochs"])
    assert caught.value.problems == ["learning_rate: given a fixed value and a range; remove one of the two (a range "
                                     "is searched, a fixed value is kept in every trial)"]


def test_every_problem_is_reported_at_once_before_anything_runs(tmp_path):
    with pytest.raises(RangeError) as caught:
        tuning.make_config({"ContinuousParameterRanges": [
            {"Name": "learning_rte", "MinValue": "0.001", "MaxValue": "0.1"},
            {"Name": "momentum", "MinValue": "0.9", "MaxValue": "0.1"}],
            "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adamw"]}]},
            {"epochs": 1}, objective="validation:auc", strategy="Grid", max_trials=0)
    text = str(caught.value)
    assert text.startswith("invalid hyperparameter ranges:\n")
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "learning_rte", "momentum", "optimizer", "objective", "max_trials"]


def test_grid_takes_only_categorical_ranges_as_sagemaker():
    with pytest.raises(RangeError, match="strategy: Grid takes only categorical ranges .* learning_rate is ranged"):
        tuning.make_config({"learning_rate": {"min": 0.001, "max": 0.1}, "optimizer": ["adam", "sgd"]}, {},
                           strategy="Grid")
    config = tuning.make_config({"optimizer": ["adam", "sgd"], "augmentation": ["True", "False"]}, {},
                                strategy="Grid", max_trials=10)
    assert config.n_trials == 4  # the grid has 4 points, fewer than max_trials


def test_objectives_follow_binary_mode():
    config = tuning.make_config("", {"binary_mode": "True"}, objective="validation:prc")
    assert (config.metric, config.direction) == ("prc", "maximize")
    assert tuning.make_config("", {}, objective="validation:loss").direction == "minimize"


def test_lanes_split_the_trials():
    config = tuning.make_config("", {}, max_trials=5, parallel_trials=2)
    assert [config.lane_slots(lane) for lane in range(config.lanes)] == [[0, 2, 4], [1, 3]]
    assert tuning.make_config("", {}, max_trials=2, parallel_trials=4).lanes == 2


def test_true_and_false_in_yaml_are_the_text_values_of_a_text_hyperparameter(tmp_path):
    # reinitialize_top_layer takes the text 'Auto', 'True' or 'False'; YAML reads an unquoted True as a boolean.
    space = search_space.load_ranges("reinitialize_top_layer: [True, False]\ntrain_only_top_layer: [True, False]\n")
    by_name = {r.name: r for r in space.ranges}
    assert by_name["reinitialize_top_layer"].values == ("True", "False")
    assert by_name["train_only_top_layer"].values == (True, False)
    assert search_space.load_ranges('{"CategoricalParameterRanges": [{"Name": "reinitialize_top_layer", '
                                    '"Values": ["True", "Auto"]}]}').ranges[0].values == ("True", "Auto")
    params = tmp_path / "params.yaml"
    params.write_text("reinitialize_top_layer: False\n")
    assert hps.Hyperparameters.resolve(files=[str(params)]).reinitialize_top_layer == "False"
    with pytest.raises(RangeError, match=r"model: True is not valid"):
        search_space.load_ranges("model: [True]")


@pytest.mark.parametrize("fixed, fixed_given", [
    ({"learning_rate": 0.01, "optimizer": "sgd"}, ["learning_rate", "optimizer"]),  # imgclf tune / katib-experiment
    ({"learning_rate": 0.001, "optimizer": "adam"}, ["learning_rate", "optimizer"]),  # given, and equal to defaults
    ({**hps.DEFAULTS, "learning_rate": 0.01, "optimizer": "sgd"}, []),  # a pipeline step: every value, none named
])
def test_without_ranges_the_values_given_are_kept_and_not_searched(fixed, fixed_given):
    config = tuning.make_config("", fixed, fixed_given=fixed_given)
    assert "learning_rate" not in config.space.names and "optimizer" not in config.space.names
    assert set(config.space.names) == set(search_space.default_space().names) - {"learning_rate", "optimizer"}
    assert (config.fixed.learning_rate, config.fixed.optimizer) == (fixed["learning_rate"], fixed["optimizer"])


def test_without_ranges_and_every_recommended_value_given_there_is_nothing_to_search():
    given = {r.name: hps.DEFAULTS[r.name] for r in search_space.default_space().ranges}
    with pytest.raises(RangeError) as caught:
        tuning.make_config("", given, fixed_given=given)
    assert caught.value.problems == ["ranges: none given, and every hyperparameter of the recommended ranges has a "
                                     "fixed value; give the ranges to search"]


def test_grid_with_max_trials_below_its_size_is_refused():
    ranges = {"optimizer": ["adam", "sgd", "rmsprop"], "reinitialize_top_layer": ["True", "False"]}
    with pytest.raises(RangeError) as caught:
        tuning.make_config(ranges, {}, strategy="Grid", max_trials=4)
    assert caught.value.problems == ["max_trials: Grid tries every point of its grid, 6 here (3 optimizer x 2 "
                                     "reinitialize_top_layer), but max_trials is 4; raise max_trials to 6 or give "
                                     "fewer values"]
    assert tuning.make_config(ranges, {}, strategy="Grid", max_trials=6).n_trials == 6


def test_hyperband_refuses_a_ranged_epochs_its_budget():
    with pytest.raises(RangeError) as caught:
        tuning.make_config({"epochs": {"min": 1, "max": 27}, "optimizer": ["adam", "sgd"]}, {}, strategy="Hyperband")
    assert caught.value.problems == ["epochs: Hyperband gives each trial its epochs itself (from 1 up to the fixed "
                                     "epochs, its largest budget), so epochs cannot be ranged; give epochs one value "
                                     "(e.g. --set epochs=27) or use Bayesian or Random"]
    config = tuning.make_config({"optimizer": ["adam", "sgd"]}, {"epochs": 27}, strategy="Hyperband")
    assert tuning.make_pruner(config)._max_resource == 27
