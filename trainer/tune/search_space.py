"""Tuning's search space: which hyperparameters can be searched, over what ranges, read from the one schema.

Ranges arrive in SageMaker's own ``ParameterRanges`` JSON, exactly as SageMaker users hold it::

    {"ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "0.00001", "MaxValue": "0.1",
                                    "ScalingType": "Logarithmic"}],
     "IntegerParameterRanges":    [{"Name": "batch_size", "MinValue": "8", "MaxValue": "512"}],
     "CategoricalParameterRanges": [{"Name": "optimizer", "Values": ["adam", "sgd", "rmsprop"]}]}

or in a short YAML form of ours, one entry per hyperparameter (a list is categorical; a mapping is a
range whose kind, integer or continuous, is the hyperparameter's type in the schema)::

    learning_rate: {min: 0.00001, max: 0.1, scaling: Logarithmic}
    batch_size: {min: 8, max: 512}
    optimizer: [adam, sgd, rmsprop]

Which names can be searched, their types and their valid values come from
``trainer.hyperparameters``; nothing is listed here a second time. Every bad range is reported at
once, one line each, before anything runs.

``ScalingType`` follows SageMaker: Linear, Logarithmic (the range must lie above 0),
ReverseLogarithmic (within [0, 1): values close to 1 are searched finely, as for momentum or beta_2),
and Auto, which here means Logarithmic when the range lies above 0 and spans at least a factor of
10, and Linear otherwise.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from trainer import hyperparameters as hps
from trainer.errors import HyperparameterError

CONTINUOUS, INTEGER, CATEGORICAL = "continuous", "integer", "categorical"
SCALING_TYPES = ("Auto", "Linear", "Logarithmic", "ReverseLogarithmic")
_SAGEMAKER_KEYS = {CONTINUOUS: "ContinuousParameterRanges", INTEGER: "IntegerParameterRanges",
                   CATEGORICAL: "CategoricalParameterRanges"}
# Auto picks a logarithmic scale for ranges above 0 that span at least this factor.
AUTO_LOG_FACTOR = 10.0

# The reference's recommended ranges (its "Automatic model tuning" page), the default search space.
RECOMMENDED_RANGES: dict[str, Any] = {
    "ContinuousParameterRanges": [
        {"Name": "beta_1", "MinValue": "0.000001", "MaxValue": "0.999", "ScalingType": "Auto"},
        {"Name": "beta_2", "MinValue": "0.000001", "MaxValue": "0.999", "ScalingType": "Auto"},
        {"Name": "epsilon", "MinValue": "0.00000001", "MaxValue": "1.0", "ScalingType": "Auto"},
        {"Name": "learning_rate", "MinValue": "0.000001", "MaxValue": "0.5", "ScalingType": "Auto"},
        {"Name": "momentum", "MinValue": "0", "MaxValue": "0.999", "ScalingType": "Auto"},
        {"Name": "regularizers_l2", "MinValue": "0", "MaxValue": "0.999", "ScalingType": "Auto"},
    ],
    "IntegerParameterRanges": [{"Name": "batch_size", "MinValue": "8", "MaxValue": "512", "ScalingType": "Auto"}],
    "CategoricalParameterRanges": [
        {"Name": "optimizer", "Values": list(hps.OPTIMIZERS)},
        {"Name": "train_only_top_layer", "Values": ["True", "False"]},
    ],
}


_BOTH = ("{name}: given a fixed value and a range; remove one of the two (a range is searched, a fixed value "
         "is kept in every trial)")


class RangeError(HyperparameterError):
    """One or more ranges of a search space are invalid; ``problems`` holds one line each."""

    def __str__(self) -> str:
        return "invalid hyperparameter ranges:\n" + "\n".join(f"  - {p}" for p in self.problems)


def tunable_names() -> tuple[str, ...]:
    """The hyperparameters a search may range over, in the schema's order."""
    return tuple(name for name, field in hps.FIELDS.items() if field.metadata["tunable"])


@dataclasses.dataclass(frozen=True)
class ParameterRange:
    """One hyperparameter's range: numeric (low, high, scaling) or categorical (values, typed)."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    scaling: str = "Auto"
    values: tuple[Any, ...] = ()

    @property
    def scale(self) -> str:
        """The scale actually used: Auto resolved to Linear or Logarithmic."""
        if self.scaling != "Auto":
            return self.scaling
        if self.low is not None and self.low > 0 and self.high >= self.low * AUTO_LOG_FACTOR:
            return "Logarithmic"
        return "Linear"

    def suggest(self, trial: Any) -> Any:
        """Ask an Optuna trial for this hyperparameter's value (the value as training takes it)."""
        if self.kind == CATEGORICAL:
            # Optuna stores categorical choices as they are; strings keep its plots readable.
            chosen = trial.suggest_categorical(self.name, [_plain(v) for v in self.values])
            return self.values[[_plain(v) for v in self.values].index(chosen)]
        if self.scale == "ReverseLogarithmic":
            # Search 1 - value on a log scale: fine steps close to 1, coarse ones near the low end.
            if self.kind == INTEGER:
                raise AssertionError("ReverseLogarithmic integer ranges are refused when parsed")
            return 1.0 - trial.suggest_float(f"1-{self.name}", 1.0 - self.high, 1.0 - self.low, log=True)
        log = self.scale == "Logarithmic"
        if self.kind == INTEGER:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=log)

    def to_sagemaker(self) -> dict[str, Any]:
        if self.kind == CATEGORICAL:
            return {"Name": self.name, "Values": [_plain(v) for v in self.values]}
        return {"Name": self.name, "MinValue": _text(self.low), "MaxValue": _text(self.high),
                "ScalingType": self.scaling}


@dataclasses.dataclass(frozen=True)
class SearchSpace:
    """The ranges of one search, at most one per hyperparameter, in the schema's order."""

    ranges: tuple[ParameterRange, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(r.name for r in self.ranges)

    def suggest(self, trial: Any) -> dict[str, Any]:
        """One value per ranged hyperparameter, asked of an Optuna trial."""
        return {r.name: r.suggest(trial) for r in self.ranges}

    def grid(self) -> dict[str, list[Any]]:
        """Every categorical range's values, for the Grid strategy (which takes nothing else)."""
        return {r.name: [_plain(v) for v in r.values] for r in self.ranges if r.kind == CATEGORICAL}

    def grid_size(self) -> int:
        return math.prod(len(r.values) for r in self.ranges)

    def to_sagemaker(self) -> dict[str, list[dict[str, Any]]]:
        """SageMaker's ParameterRanges JSON of this space."""
        out: dict[str, list[dict[str, Any]]] = {key: [] for key in _SAGEMAKER_KEYS.values()}
        for r in self.ranges:
            out[_SAGEMAKER_KEYS[r.kind]].append(r.to_sagemaker())
        return {key: value for key, value in out.items() if value}

    def to_json(self) -> str:
        return json.dumps(self.to_sagemaker())


def default_space(without: Iterable[str] = ()) -> SearchSpace:
    """The reference's recommended ranges, less the hyperparameters named in ``without`` (given fixed values).

    A value the user fixed is kept in every trial, never searched over; RangeError when that leaves
    nothing to search.
    """
    kept = {hps.ALIASES.get(name, name) for name in without}
    ranges = {key: [r for r in entries if r["Name"] not in kept] for key, entries in RECOMMENDED_RANGES.items()}
    if not any(ranges.values()):
        raise RangeError(["ranges: none given, and every hyperparameter of the recommended ranges has a fixed "
                          "value; give the ranges to search"])
    return parse_ranges(ranges)


def parse_ranges(data: Any, *, source: str = "ranges", fixed: Iterable[str] = ()) -> SearchSpace:
    """Read SageMaker's ParameterRanges or our short form; RangeError lists every problem at once.

    ``fixed`` names hyperparameters given a fixed value, which must not be ranged too.
    """
    fixed_names = {hps.ALIASES.get(name, name) for name in fixed}
    if data is None or data == {}:
        raise RangeError([f"{source}: no ranges given; give at least one hyperparameter to search"])
    if not isinstance(data, Mapping):
        raise RangeError([f"{source}: expected a mapping (SageMaker's ParameterRanges or name: range), "
                          f"got a {type(data).__name__}"])
    problems: list[str] = []
    entries: list[tuple[str, str, Any]] = []  # (name, kind given or None, entry)
    if set(data) & set(_SAGEMAKER_KEYS.values()):
        _read_sagemaker(data, problems, entries)
    else:
        for name, entry in data.items():
            entries.append((str(name), CATEGORICAL if isinstance(entry, list) else "", entry))
    ranges: list[ParameterRange] = []
    seen: set[str] = set()
    for name, kind, entry in entries:
        canonical = hps.ALIASES.get(name, name)
        if canonical in seen:
            problems.append(f"{name}: ranged twice; give one range per hyperparameter")
            continue
        seen.add(canonical)
        if canonical in fixed_names:
            problems.append(_BOTH.format(name=name))
            continue
        parsed = _parse_one(name, kind, entry, problems)
        if parsed is not None:
            ranges.append(parsed)
    if problems:
        raise RangeError(problems)
    order = {name: i for i, name in enumerate(hps.FIELDS)}
    return SearchSpace(tuple(sorted(ranges, key=lambda r: order[r.name])))


def load_ranges(text: str, *, source: str = "ranges", fixed: Iterable[str] = ()) -> SearchSpace:
    """Parse ranges from JSON or YAML text; empty text gives the recommended ranges less those in ``fixed``."""
    if not text or not text.strip():
        return default_space(without=fixed)
    try:
        data = yaml.safe_load(text)  # JSON is YAML too
    except yaml.YAMLError as err:
        raise RangeError([f"{source}: not valid JSON/YAML: {str(err).splitlines()[0]}"]) from None
    return parse_ranges(data, source=source, fixed=fixed)


def load_ranges_file(path: str) -> SearchSpace:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise RangeError([f"--ranges {path}: cannot read the file ({err.strerror})"]) from None
    if not text.strip():
        raise RangeError([f"--ranges {path}: the file is empty; leave --ranges out for the recommended ranges"])
    return load_ranges(text, source=f"--ranges {path}")


def check_not_fixed(space: SearchSpace, fixed: Iterable[str]) -> None:
    """Refuse hyperparameters that were given a fixed value and a range too."""
    given = {hps.ALIASES.get(name, name) for name in fixed}
    problems = [_BOTH.format(name=name) for name in space.names if name in given]
    if problems:
        raise RangeError(problems)


# --- parsing helpers -------------------------------------------------------------------------------------


def _read_sagemaker(data: Mapping[str, Any], problems: list[str], entries: list[tuple[str, str, Any]]) -> None:
    known = set(_SAGEMAKER_KEYS.values())
    for key in data:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            problems.append(f"{key}: not a ParameterRanges key; expected {', '.join(sorted(known))}"
                            + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    for kind, key in _SAGEMAKER_KEYS.items():
        items = data.get(key, [])
        if not isinstance(items, list):
            problems.append(f"{key}: expected a list of ranges, got a {type(items).__name__}")
            continue
        for index, item in enumerate(items):
            if not isinstance(item, Mapping) or not isinstance(item.get("Name"), str):
                problems.append(f"{key}[{index}]: expected an object with a \"Name\"")
                continue
            entries.append((item["Name"], kind, item))


def _parse_one(name: str, kind: str, entry: Any, problems: list[str]) -> ParameterRange | None:
    canonical = hps.ALIASES.get(name, name)
    field = hps.FIELDS.get(canonical)
    if field is None:
        hint = difflib.get_close_matches(name, [*tunable_names(), *hps.ALIASES], n=1, cutoff=0.6)
        problems.append(f"{name}: unknown hyperparameter; "
                        + (f"did you mean {hint[0]!r}?" if hint else
                           f"the ones that can be tuned are {', '.join(tunable_names())}"))
        return None
    if not field.metadata["tunable"]:
        problems.append(f"{name}: cannot be tuned (it changes what trials are judged on, or is not a value "
                        "from a range); give it a fixed value with --params or --set instead")
        return None
    python_kind = hps.python_type(field)
    if kind == "":  # our short form: a mapping is a numeric range of the hyperparameter's own type
        if not isinstance(entry, Mapping):
            problems.append(f"{name}: expected a list of values or {{min: ..., max: ..., scaling: ...}}, "
                            f"got {entry!r}")
            return None
        unknown = set(entry) - {"min", "max", "scaling"}
        if unknown:
            problems.append(f"{name}: unknown keys {sorted(unknown)}; a range has min, max and scaling")
            return None
        kind = INTEGER if python_kind is int else CONTINUOUS
        entry = {"MinValue": entry.get("min"), "MaxValue": entry.get("max"),
                 "ScalingType": entry.get("scaling", "Auto")}
    if kind == CATEGORICAL:
        return _categorical(canonical, name, field, entry, problems)
    return _numeric(canonical, name, kind, field, python_kind, entry, problems)


def _categorical(canonical: str, name: str, field: dataclasses.Field, entry: Any,
                 problems: list[str]) -> ParameterRange | None:
    values = entry.get("Values") if isinstance(entry, Mapping) else entry
    if not isinstance(values, list) or not values:
        problems.append(f"{name}: a categorical range needs a non-empty list of values")
        return None
    typed: list[Any] = []
    bad: list[str] = []
    for value in values:
        try:
            coerced = hps.coerce(field, value)
        except ValueError:
            bad.append(repr(value))
            continue
        if hps._check_field(field, coerced, shown=value) is not None:
            hint = difflib.get_close_matches(str(value), [str(c) for c in field.metadata["choices"] or ()], n=1)
            bad.append(repr(value) + (f" (did you mean {hint[0]!r}?)" if hint else ""))
            continue
        if coerced not in typed:
            typed.append(coerced)
    if bad:
        problems.append(f"{name}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not valid; expected "
                        f"{hps.describe_valid(field)}")
        return None
    return ParameterRange(canonical, CATEGORICAL, values=tuple(typed))


def _numeric(canonical: str, name: str, kind: str, field: dataclasses.Field, python_kind: type, entry: Mapping,
             problems: list[str]) -> ParameterRange | None:
    if python_kind not in (int, float):
        problems.append(f"{name}: takes {hps.describe_valid(field)}, so it needs a categorical range "
                        "(CategoricalParameterRanges, or a list of values)")
        return None
    if kind == INTEGER and python_kind is float:
        problems.append(f"{name}: is a number, not an integer; put it under ContinuousParameterRanges")
        return None
    if kind == CONTINUOUS and python_kind is int:
        problems.append(f"{name}: is an integer; put it under IntegerParameterRanges")
        return None
    scaling = entry.get("ScalingType", "Auto") or "Auto"
    if scaling not in SCALING_TYPES:
        hint = difflib.get_close_matches(str(scaling), SCALING_TYPES, n=1)
        problems.append(f"{name}: ScalingType {scaling!r} is not one of {', '.join(SCALING_TYPES)}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        return None
    bounds = []
    for key in ("MinValue", "MaxValue"):
        raw = entry.get(key)
        try:
            if raw is None or isinstance(raw, bool):
                raise ValueError
            number = float(raw)
            if not math.isfinite(number) or (python_kind is int and not number.is_integer()):
                raise ValueError
        except (TypeError, ValueError):
            noun = "an integer" if python_kind is int else "a number"
            problems.append(f"{name}: {key} {raw!r} is not {noun}" if raw is not None else
                            f"{name}: {key} is missing")
            return None
        bounds.append(int(number) if python_kind is int else number)
    low, high = bounds
    if low > high:
        problems.append(f"{name}: MinValue {_text(low)} is above MaxValue {_text(high)}; swap them")
        return None
    outside = [_text(v) for v in (low, high) if hps._check_field(field, v) is not None]
    if outside:
        problems.append(f"{name}: the range [{_text(low)}, {_text(high)}] reaches outside the valid values "
                        f"({hps.describe_valid(field)}): {', '.join(outside)}")
        return None
    if scaling == "Logarithmic" and low <= 0:
        problems.append(f"{name}: a Logarithmic scale needs a range above 0, but MinValue is {_text(low)}; "
                        "raise MinValue or use Linear")
        return None
    if scaling == "ReverseLogarithmic":
        if python_kind is int:
            problems.append(f"{name}: ReverseLogarithmic applies to continuous ranges only; use Linear or "
                            "Logarithmic")
            return None
        if low < 0 or high >= 1:
            problems.append(f"{name}: a ReverseLogarithmic scale needs a range within [0, 1), but the range is "
                            f"[{_text(low)}, {_text(high)}]; use Linear or Logarithmic")
            return None
    return ParameterRange(canonical, kind, low=low, high=high, scaling=scaling)


def _plain(value: Any) -> Any:
    """Categorical values as Optuna and SageMaker hold them: booleans as "True"/"False"."""
    return str(value) if isinstance(value, bool) else value


def _text(number: float | int) -> str:
    if isinstance(number, int):
        return str(number)
    return repr(float(number))
