"""The hyperparameter schema matches the reference algorithm and refuses bad values one line each."""

import json

import pytest
import yaml

from trainer import hyperparameters as hps
from trainer.errors import HyperparameterError
from trainer.hyperparameters import Hyperparameters

# The reference algorithm's 25 hyperparameters and their documented defaults, written out here
# on purpose: this is the contract the schema is checked against, not a copy of it.
REFERENCE_DEFAULTS = {
    "augmentation": False, "augmentation_random_flip": "horizontal_and_vertical",
    "augmentation_random_rotation": 0.2, "augmentation_random_zoom": 0.1, "batch_size": 32,
    "beta_1": 0.9, "beta_2": 0.999, "binary_mode": False, "dropout_rate": 0.2, "early_stopping": False,
    "early_stopping_min_delta": 0.0, "early_stopping_patience": 5, "epochs": 3, "epsilon": 1e-7,
    "eval_metric": "accuracy", "image_resize_interpolation": "bilinear", "initial_accumulator_value": 0.0001,
    "label_smoothing": 0.1, "learning_rate": 0.001, "momentum": 0.9, "optimizer": "adam",
    "regularizers_l2": 0.0001, "reinitialize_top_layer": "Auto", "rho": 0.95, "train_only_top_layer": False,
}


def test_reference_names_and_defaults():
    assert set(hps.REFERENCE_NAMES) == set(REFERENCE_DEFAULTS)
    defaults = Hyperparameters().to_dict()
    for name, value in REFERENCE_DEFAULTS.items():
        assert defaults[name] == value and type(defaults[name]) is type(value), name
    assert defaults["validation_split_ratio"] == 0.2


def test_reference_choices():
    assert hps.FIELDS["optimizer"].metadata["choices"] == (
        "adam", "sgd", "nesterov", "rmsprop", "adagrad", "adadelta")
    assert set(hps.FIELDS["image_resize_interpolation"].metadata["choices"]) == {
        "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic"}
    assert set(hps.FIELDS["augmentation_random_flip"].metadata["choices"]) == {
        "horizontal_and_vertical", "horizontal", "vertical", "None"}
    assert set(hps.FIELDS["eval_metric"].metadata["choices"]) == {"accuracy", "precision", "recall", "auc", "prc"}


def test_every_field_has_help_and_a_valid_default():
    for name, field in hps.FIELDS.items():
        assert len(field.metadata["help"]) > 15, name
        assert hps._check_field(field, field.default) is None, name


def test_sagemaker_string_file_is_accepted(tmp_path):
    strings = Hyperparameters(binary_mode=True, eval_metric="auc", epochs=7).to_sagemaker_strings()
    strings["train_only_on_top_layer"] = strings.pop("train_only_top_layer")
    path = tmp_path / "hyperparameters.json"
    path.write_text(json.dumps(strings))
    assert all(isinstance(v, str) for v in strings.values())
    hp = Hyperparameters.resolve(files=[str(path)])
    assert hp.epochs == 7 and hp.binary_mode is True and hp.eval_metric == "auc"
    assert hp == Hyperparameters(binary_mode=True, eval_metric="auc", epochs=7)


def test_yaml_file_then_set_override(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("epochs: 4\noptimizer: sgd\nlearning_rate: 0.01\n")
    hp = Hyperparameters.resolve(files=[str(path)], assignments=["epochs=9", "augmentation=True"])
    assert (hp.epochs, hp.optimizer, hp.learning_rate, hp.augmentation) == (9, "sgd", 0.01, True)


def test_resolved_yaml_round_trips(tmp_path):
    hp = Hyperparameters(optimizer="rmsprop", rho=0.5, image_size=96)
    path = tmp_path / "resolved.yaml"
    hps.write_resolved(hp, str(path))
    assert Hyperparameters.resolve(files=[str(path)]) == hp
    nested = tmp_path / "nested.yaml"
    nested.write_text(yaml.safe_dump({"hyperparameters": hp.to_dict()}))
    assert Hyperparameters.resolve(files=[str(nested)]) == hp


@pytest.mark.parametrize("values, expected", [
    ({"learning_rte": "0.1"}, ["learning_rte: unknown hyperparameter; did you mean 'learning_rate'?"]),
    ({"epochs": "three"}, ["epochs: got 'three', expected an integer in [1, 100000]"]),
    ({"epochs": "2.5"}, ["epochs: got '2.5', expected an integer in [1, 100000]"]),
    ({"learning_rate": "2"}, ["learning_rate: got '2', expected a number in (0, 1]"]),
    ({"beta_1": "nan"}, ["beta_1: got 'nan', expected a number in [0, 1]"]),
    ({"augmentation": "yes"}, ["augmentation: got 'yes', expected True or False"]),
    ({"optimizer": "adamw"}, ["optimizer: got 'adamw', expected one of 'adam', 'sgd', 'nesterov', 'rmsprop', "
                              "'adagrad', 'adadelta' (did you mean 'adam'?)"]),
    ({"eval_metric": "auc"}, ["eval_metric: got 'auc', which needs binary_mode=True; use 'accuracy' or set "
                              "binary_mode to True"]),
    ({"validation_split_ratio": "0.6", "test_split_ratio": "0.4"},
     ["validation_split_ratio + test_split_ratio: got 0.6 + 0.4, which leaves nothing to train on; "
      "their sum must be below 1"]),
    ({"model": "small_cnn"}, ["weights: got 'imagenet', but small_cnn has no pretrained weights; set weights to "
                              "'none' or to a weights file"]),
    ({"model": "inception_v3", "image_size": 64},
     ["image_size: got 64, but inception_v3 needs at least 75 pixels (or 0 for its own size 299)"]),
    ({"train_only_top_layer": "True", "train_only_on_top_layer": "False"},
     ["train_only_on_top_layer: got 'False', which contradicts train_only_top_layer=True; give only one of "
      "the two"]),
])
def test_bad_values_give_one_line_each(values, expected):
    with pytest.raises(HyperparameterError) as err:
        Hyperparameters.from_mapping(values)
    assert err.value.problems == expected


def test_all_problems_reported_at_once():
    with pytest.raises(HyperparameterError) as err:
        Hyperparameters.from_mapping({"epochs": "0", "optimizer": "lion", "batch_size": "-1", "typo": 1})
    assert [p.split(":")[0] for p in err.value.problems] == ["epochs", "optimizer", "batch_size", "typo"]


def test_typed_construction_is_checked_too():
    with pytest.raises(HyperparameterError, match="dropout_rate: got 1.5"):
        Hyperparameters(dropout_rate=1.5)
    with pytest.raises(HyperparameterError, match="batch_size: got True"):
        Hyperparameters(batch_size=True)


def test_bad_set_syntax_and_unreadable_file(tmp_path):
    with pytest.raises(HyperparameterError, match="expected name=value"):
        Hyperparameters.resolve(assignments=["epochs"])
    with pytest.raises(HyperparameterError, match="cannot read the file"):
        Hyperparameters.resolve(files=[str(tmp_path / "missing.yaml")])
    bad = tmp_path / "list.yaml"
    bad.write_text("- epochs\n")
    with pytest.raises(HyperparameterError, match="expected a mapping"):
        Hyperparameters.resolve(files=[str(bad)])


def test_input_size_resolves_backbone_default():
    assert Hyperparameters().input_size == 224
    assert Hyperparameters(model="inception_v3").input_size == 299
    assert Hyperparameters(image_size=96).input_size == 96


def test_markdown_table_lists_every_field():
    table = hps.markdown_table()
    for name in hps.FIELDS:
        assert f"| `{name}` |" in table
