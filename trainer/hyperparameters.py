"""The hyperparameter schema: every hyperparameter stated once, with its type, default, valid values and help.

The pipeline signature, the train component, the command line, the validation messages and the
docs table are derived from ``Hyperparameters`` or tested against it. Values arrive the way
SageMaker users hold them (every value a string, booleans as "True"/"False") as well as typed,
from YAML/JSON files and from ``--set name=value``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from trainer import backbones
from trainer.backbones import BACKBONE_NAMES, BACKBONES
from trainer.errors import HyperparameterError

OPTIMIZERS = ("adam", "sgd", "nesterov", "rmsprop", "adagrad", "adadelta")
FLIP_MODES = ("horizontal_and_vertical", "horizontal", "vertical", "None")
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian", "mitchellcubic")
EVAL_METRICS = ("accuracy", "precision", "recall", "auc", "prc")
BINARY_ONLY_METRICS = ("precision", "recall", "auc", "prc")
REINITIALIZE_CHOICES = ("Auto", "True", "False")
CLASS_WEIGHTS = ("none", "balanced")
TFLITE_QUANTIZATIONS = ("none", "dynamic_range")
WEIGHT_SOURCES = ("imagenet", "none")  # or a path / gs:// URI of a Keras weights file

# Other spellings that users of the reference algorithm already have in their files.
ALIASES = {"train_only_on_top_layer": "train_only_top_layer"}


def _hp(default: Any, help: str, *, choices: Iterable[str] | None = None, low: float | None = None,
        high: float | None = None, high_open: bool = False, low_open: bool = False,
        reference: bool = True, group: str = "training", valid: str | None = None,
        tunable: bool = True) -> Any:
    """Declare one hyperparameter as a dataclass field whose metadata carries its rules.

    ``tunable=False`` keeps a hyperparameter out of tuning's search space: it changes what a trial is
    judged on (the split, the objective) or is not a value from a range (a weights file).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "choices": tuple(choices) if choices else None, "low": low, "high": high,
        "low_open": low_open, "high_open": high_open, "reference": reference, "group": group,
        "valid": valid, "tunable": tunable,
    })


@dataclasses.dataclass(frozen=True)
class Hyperparameters:
    """All hyperparameters of one training run, with the reference algorithm's names and defaults."""

    # --- The reference algorithm's 25 hyperparameters (alphabetical, as AWS lists them) ---
    augmentation: bool = _hp(False, "Apply random flip, rotation and zoom to training images only.",
                             group="augmentation")
    augmentation_random_flip: str = _hp(
        "horizontal_and_vertical", "Flip mode of the augmentation; 'None' turns flipping off.",
        choices=FLIP_MODES, group="augmentation")
    augmentation_random_rotation: float = _hp(
        0.2, "Largest random rotation as a fraction of 2*pi; positive is counter-clockwise, 0 turns it off.",
        low=-1.0, high=1.0, group="augmentation")
    augmentation_random_zoom: float = _hp(
        0.1, "Largest random zoom as a fraction of the image; positive zooms out, negative zooms in, "
        "0 turns it off.", low=-1.0, high=1.0, group="augmentation")
    batch_size: int = _hp(32, "Images per training step, across all GPUs together (the global batch).",
                          low=1, high=65536)
    beta_1: float = _hp(0.9, "Adam: decay rate of the first-moment estimates.", low=0.0, high=1.0,
                        group="optimizer")
    beta_2: float = _hp(0.999, "Adam: decay rate of the second-moment estimates.", low=0.0, high=1.0,
                        group="optimizer")
    binary_mode: bool = _hp(False, "Two-class data only: the model returns one probability, that of the "
                            "second class in alphabetical order (the positive class).", group="model",
                            tunable=False)
    dropout_rate: float = _hp(0.2, "Dropout rate of the classification head.", low=0.0, high=1.0,
                              high_open=True, group="model")
    early_stopping: bool = _hp(False, "Stop when the validation loss stops improving.", group="early stopping")
    early_stopping_min_delta: float = _hp(0.0, "Smallest change of the validation loss that counts as an "
                                          "improvement.", low=0.0, high=1.0, group="early stopping")
    early_stopping_patience: int = _hp(5, "Epochs without improvement before training stops.", low=1,
                                       high=10000, group="early stopping")
    epochs: int = _hp(3, "Passes over the training split.", low=1, high=100000)
    epsilon: float = _hp(1e-7, "Numerical-stability constant of adam, rmsprop, adadelta and adagrad.",
                         low=0.0, high=1.0, group="optimizer")
    eval_metric: str = _hp("accuracy", "Metric reported on the test split; precision, recall, auc and prc "
                           "need binary_mode.", choices=EVAL_METRICS, group="evaluation",
                           tunable=False)
    image_resize_interpolation: str = _hp("bilinear", "Interpolation used to resize images to the model's "
                                          "input size.", choices=INTERPOLATIONS, group="data")
    initial_accumulator_value: float = _hp(0.0001, "Adagrad: starting value of the accumulators.",
                                           low=0.0, high=1.0, group="optimizer")
    label_smoothing: float = _hp(0.1, "Label smoothing of the cross-entropy loss (0.1: target 0.9 + 0.1/K, "
                                 "others 0.1/K).", low=0.0, high=1.0)
    learning_rate: float = _hp(0.001, "Optimizer learning rate.", low=0.0, high=1.0, low_open=True,
                               group="optimizer")
    momentum: float = _hp(0.9, "Momentum of sgd, nesterov and rmsprop.", low=0.0, high=1.0, group="optimizer")
    optimizer: str = _hp("adam", "Optimizer; each uses only its own parameters.", choices=OPTIMIZERS,
                         group="optimizer")
    regularizers_l2: float = _hp(0.0001, "L2 factor on the weights of the head's dense layer.", low=0.0,
                                 high=1.0, group="model")
    reinitialize_top_layer: str = _hp(
        "Auto", "'Auto': a new head when starting from a pretrained backbone, the old head kept in "
        "incremental training; 'True'/'False' force it.", choices=REINITIALIZE_CHOICES, group="model")
    rho: float = _hp(0.95, "Discounting factor of adadelta and rmsprop.", low=0.0, high=1.0, group="optimizer")
    train_only_top_layer: bool = _hp(False, "Freeze the backbone and train only the classification head "
                                     "(alias: train_only_on_top_layer).", group="model")

    # --- Data split and reproducibility (the reference script's extras, and ours) ---
    validation_split_ratio: float = _hp(0.2, "Share of each class held out for validation during training.",
                                        low=0.0, high=1.0, high_open=True, reference=False, group="data",
                                        tunable=False)
    test_split_ratio: float = _hp(0.1, "Share of each class held out for the final evaluation.",
                                  low=0.0, high=1.0, high_open=True, reference=False, group="data",
                                  tunable=False)
    random_seed: int = _hp(0, "Seed of the split, shuffling, augmentation and initialisation.", low=0,
                           high=2**31 - 1, reference=False, group="data", tunable=False)

    # --- The backbone ---
    model: str = _hp("mobilenet_v2", "Backbone network (Keras Applications), or small_cnn, a compact "
                     "network that learns from scratch.", choices=BACKBONE_NAMES, reference=False,
                     group="model")
    weights: str = _hp("imagenet", "Backbone weights: 'imagenet' (downloaded by Keras), 'none' (random), "
                       "or the path / gs:// URI of a Keras weights file.", reference=False, group="model",
                       valid="'imagenet', 'none', or the path / gs:// URI of a Keras weights file", tunable=False)
    image_size: int = _hp(0, "Side of the square model input in pixels; 0 uses the backbone's own size "
                          "(224 for mobilenet_v2).", low=0, high=2048, reference=False, group="data")

    # --- Beyond the reference: imbalanced classes, on-device export ---
    class_weight: str = _hp("none", "Loss weight per class: 'none' weighs every image alike (the reference); "
                            "'balanced' weighs each class by the inverse of its share of the training split.",
                            choices=CLASS_WEIGHTS, reference=False)
    tflite_quantization: str = _hp("none", "Besides model.tflite (float32), also export "
                                   "model_dynamic_range.tflite with int8 weights ('dynamic_range').",
                                   choices=TFLITE_QUANTIZATIONS, reference=False, group="export", tunable=False)

    def __post_init__(self) -> None:
        problems = [p for f in dataclasses.fields(self) if (p := _check_field(f, getattr(self, f.name)))]
        if not problems:
            problems = self._cross_field_problems()
        if problems:
            raise HyperparameterError(problems)

    def _cross_field_problems(self) -> list[str]:
        problems = []
        if self.eval_metric in BINARY_ONLY_METRICS and not self.binary_mode:
            problems.append(f"eval_metric: got {self.eval_metric!r}, which needs binary_mode=True; "
                            "use 'accuracy' or set binary_mode to True")
        if self.validation_split_ratio + self.test_split_ratio >= 1.0:
            problems.append(
                f"validation_split_ratio + test_split_ratio: got {self.validation_split_ratio} + "
                f"{self.test_split_ratio}, which leaves nothing to train on; their sum must be below 1")
        backbone = BACKBONES[self.model]
        if self.image_size and self.image_size < backbone.min_size:
            problems.append(f"image_size: got {self.image_size}, but {self.model} needs at least "
                            f"{backbone.min_size} pixels (or 0 for its own size {backbone.native_size})")
        if self.model == "small_cnn" and self.weights == "imagenet":
            problems.append("weights: got 'imagenet', but small_cnn has no pretrained weights; "
                            "set weights to 'none' or to a weights file")
        return problems

    @property
    def input_size(self) -> int:
        """The model's input side in pixels, with 0 resolved to the backbone's own size."""
        return backbones.input_size(self.model, self.image_size)

    # ---- construction ----
    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Hyperparameters:
        """Build from names and values (strings or typed), reporting every problem at once."""
        problems: list[str] = []
        typed: dict[str, Any] = {}
        given_as: dict[str, str] = {}
        for raw_name, raw_value in values.items():
            name = ALIASES.get(raw_name, raw_name)
            field = FIELDS.get(name)
            if field is None:
                problems.append(_unknown(raw_name))
                continue
            try:
                value = coerce(field, raw_value)
            except ValueError as err:
                problems.append(str(err).replace(f"{name}:", f"{raw_name}:", 1))
                continue
            if name in typed and typed[name] != value:
                problems.append(f"{raw_name}: got {raw_value!r}, which contradicts {given_as[name]}="
                                f"{typed[name]!r}; give only one of the two")
                continue
            typed[name], given_as[name] = value, raw_name
            if problem := _check_field(field, value, shown=raw_value):
                problems.append(problem.replace(f"{name}:", f"{raw_name}:", 1))
        if problems:
            raise HyperparameterError(problems)
        return cls(**typed)

    @classmethod
    def resolve(cls, files: Iterable[str] = (), assignments: Iterable[str] = ()) -> Hyperparameters:
        """Defaults, then each YAML/JSON file in turn, then each ``name=value`` assignment."""
        return cls.from_mapping(merge_sources(files, assignments))

    # ---- output ----
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def to_sagemaker_strings(self) -> dict[str, str]:
        """The same values the way SageMaker passes them: every value a string, booleans "True"/"False"."""
        return {k: str(v) for k, v in self.to_dict().items()}


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(Hyperparameters)}
REFERENCE_NAMES: tuple[str, ...] = tuple(n for n, f in FIELDS.items() if f.metadata["reference"])
DEFAULTS: dict[str, Any] = {n: f.default for n, f in FIELDS.items()}


def python_type(field: dataclasses.Field) -> type:
    """The field's type as a class (annotations are strings under ``from __future__``)."""
    return {"bool": bool, "int": int, "float": float, "str": str}[str(field.type)]


def describe_valid(field: dataclasses.Field) -> str:
    """What values a field accepts, in words, for messages and docs."""
    meta, kind = field.metadata, python_type(field)
    if meta["valid"]:
        return meta["valid"]
    if meta["choices"]:
        return "one of " + ", ".join(repr(c) for c in meta["choices"])
    if kind is bool:
        return "True or False"
    noun = "an integer" if kind is int else "a number"
    if meta["low"] is None:
        return noun
    left = "(" if meta["low_open"] else "["
    right = ")" if meta["high_open"] else "]"
    return f"{noun} in {left}{_fmt(meta['low'])}, {_fmt(meta['high'])}{right}"


def coerce(field: dataclasses.Field, value: Any) -> Any:
    """Convert a value as given (string or typed) to the field's type, or raise ValueError naming it."""
    kind = python_type(field)

    def bad() -> ValueError:
        return ValueError(f"{field.name}: got {value!r}, expected {describe_valid(field)}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise bad()
    if kind is int:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                try:
                    number = float(value)
                except ValueError:
                    raise bad() from None
                if number.is_integer():
                    return int(number)
        raise bad()
    if kind is float:
        if isinstance(value, bool):
            raise bad()
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value.strip())
            except ValueError:
                raise bad() from None
        else:
            raise bad()
        if not math.isfinite(number):
            raise bad()
        return number
    if isinstance(value, bool) and str(value) in (field.metadata["choices"] or ()):
        # YAML reads an unquoted True/False as a boolean; for a text field whose values are 'True'/'False'
        # (reinitialize_top_layer) it means that text.
        return str(value)
    if not isinstance(value, str):
        raise bad()
    return value.strip()


def _check_field(field: dataclasses.Field, value: Any, shown: Any = None) -> str | None:
    """One line naming the field, the value (as the user gave it) and what is valid, or None if fine."""
    meta, kind = field.metadata, python_type(field)
    shown = value if shown is None else shown
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        return f"{field.name}: got {shown!r}, expected {describe_valid(field)}"
    if meta["choices"] and value not in meta["choices"]:
        hint = difflib.get_close_matches(str(value), meta["choices"], n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"{field.name}: got {shown!r}, expected {describe_valid(field)}{suggestion}"
    if meta["low"] is not None:
        low_bad = value <= meta["low"] if meta["low_open"] else value < meta["low"]
        high_bad = value >= meta["high"] if meta["high_open"] else value > meta["high"]
        if low_bad or high_bad:
            return f"{field.name}: got {shown!r}, expected {describe_valid(field)}"
    if kind is str and not value:
        return f"{field.name}: got '', expected {describe_valid(field)}"
    return None


def _unknown(name: str) -> str:
    known = list(FIELDS) + list(ALIASES)
    hint = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    suggestion = f"did you mean {hint[0]!r}?" if hint else "run 'imgclf hyperparameters --list' for the names"
    return f"{name}: unknown hyperparameter; {suggestion}"


def _fmt(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else repr(number)


def load_file(path: str) -> dict[str, Any]:
    """Read a YAML or JSON file of hyperparameters: a flat mapping of names to values.

    SageMaker's ``hyperparameters.json`` (every value a string) is such a file. A top-level
    ``hyperparameters:`` key is also accepted, so a resolved ``params.yaml`` can be fed back.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise HyperparameterError([f"--params {path}: cannot read the file ({err.strerror})"]) from None
    try:
        data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        first_line = str(err).splitlines()[0]
        raise HyperparameterError([f"--params {path}: not valid YAML/JSON: {first_line}"]) from None
    if data is None:
        return {}
    if isinstance(data, dict) and set(data) == {"hyperparameters"}:
        data = data["hyperparameters"]
    if not isinstance(data, dict):
        raise HyperparameterError([f"--params {path}: expected a mapping of names to values, "
                                   f"got a {type(data).__name__}"])
    return {str(k): v for k, v in data.items()}


def merge_sources(files: Iterable[str] = (), assignments: Iterable[str] = ()) -> dict[str, Any]:
    """Raw values from YAML/JSON files in turn, then ``name=value`` assignments (later ones win).

    Values stay as given: the schema (or the pipeline's signature, for its other settings) checks them.
    """
    merged: dict[str, Any] = {}
    for path in files:
        merged.update(load_file(path))
    problems = []
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name.strip():
            problems.append(f"--set {assignment!r}: expected name=value, e.g. --set learning_rate=0.01")
            continue
        merged[name.strip()] = value.strip()
    if problems:
        raise HyperparameterError(problems)
    return merged


def markdown_table() -> str:
    """The docs table of every hyperparameter, generated so it cannot drift from the schema."""
    rows = ["| name | type | default | valid values | meaning |", "|---|---|---|---|---|"]
    for name, field in FIELDS.items():
        rows.append(f"| `{name}` | {python_type(field).__name__} | `{field.default!r}` | "
                    f"{describe_valid(field)} | {field.metadata['help']} |")
    return "\n".join(rows)


def write_resolved(hp: Hyperparameters, path: str) -> None:
    """Write the resolved set next to a model, the way official/vision writes params.yaml."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(hp.to_yaml())
