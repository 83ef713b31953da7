"""The quality gate ("blessing") and the model registry that only blessed models are pushed to.

Blessing: a run's model is blessed when its ``eval_metric`` on the test split reaches
``min_eval_value`` (0 means no threshold) and is not below the value of an optional baseline model
evaluated here on the same split of the same data set. Every ``eval_metric`` is higher-is-better,
and ties bless: a retrained model as good as the one in production may replace it.

Registry layout (``registry_uri`` is a gs:// URI or a local / mounted path)::

    registry_uri/000001/                  one folder per pushed model, numbered 1, 2, 3... (zero-padded,
                                            so names sort in version order); never overwritten
    registry_uri/000001/saved_model/      the serving SavedModel (what KServe / TF Serving load)
    registry_uri/000001/model.keras, class_label_to_prediction_index.json, hyperparameters.yaml,
                        history.json      the rest of the training run's model folder
    registry_uri/000001/blessing.json     why the model was pushed: the gate's decision, the source
                                            model, the version and the time; written last, so a
                                            version folder without it is an interrupted push
    registry_uri/.claims/000001           the reservation of a version number, created only if absent
                                            (see ``_claim_version``)

A version folder is a complete imgclf model folder: it can be the ``baseline_model_uri`` of the
next run, the ``initial_model_uri`` of incremental training, or the model of ``imgclf predict``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trainer import data, evaluation, prediction, storage
from trainer.errors import HyperparameterError, ModelError, StorageError
from trainer.hyperparameters import EVAL_METRICS
from trainer.layout import (
    BLESSING_FILE,
    CLAIMS_DIR,
    HISTORY_FILE,
    HYPERPARAMETERS_FILE,
    KERAS_MODEL_FILE,
    MODEL_LABEL_MAP_FILE,
    SAVED_MODEL_DIR,
    SAVED_MODEL_PROTO,
    TFLITE_DYNAMIC_RANGE_FILE,
    TFLITE_FILE,
    version_name,
)

log = logging.getLogger(__name__)

BASELINE_EVALUATION_DIR = "baseline"
# Each attempt loses a race against another push; more than a few in a row means something is wrong.
MAX_CLAIM_ATTEMPTS = 10

# What a registry version holds: the model folder's files (history.json and the TFLite files only if
# training wrote them).
_REQUIRED_FILES = (KERAS_MODEL_FILE, MODEL_LABEL_MAP_FILE, HYPERPARAMETERS_FILE,
                   f"{SAVED_MODEL_DIR}/{SAVED_MODEL_PROTO}")
_OPTIONAL_FILES = (HISTORY_FILE, TFLITE_FILE, TFLITE_DYNAMIC_RANGE_FILE)
_VERSION = re.compile(r"[0-9]+")


# ---------------------------------------------------------------------------------------------
# Blessing
# ---------------------------------------------------------------------------------------------

def decide_blessing(eval_metric: str, eval_value: float, *, dataset_dir: str, min_eval_value: float = 0.0,
                    baseline_model_uri: str = "", model_uri: str | None = None, output_dir: str | None = None,
                    split: str = "test") -> dict[str, Any]:
    """Decide whether this run's model is good enough to push.

    Args:
      eval_metric: the headline metric the run was evaluated on (the evaluation step's output).
      eval_value: the run's value of ``eval_metric`` on ``split``.
      dataset_dir: the run's converted data set; the baseline is evaluated on its ``split``.
      min_eval_value: the threshold in [0, 1]; 0 means none.
      baseline_model_uri: an imgclf model folder (e.g. a registry version) the run must not fall
        below, or "" for none. It is loaded in safe mode and must predict the same classes.
      model_uri: where the run's model is, recorded in the decision for the registry.
      output_dir: if given, ``blessing.json`` is written there, and the baseline's evaluation
        (evaluation.json, report.md) below it in ``baseline/``.
      split: the split ``eval_value`` was measured on.

    Returns:
      ``{"blessed", "reason", "eval_metric", "eval_value", "min_eval_value", "baseline_model_uri",
      "baseline_value", "model_uri", "split"}``; ``reason`` is one line such as
      "not blessed: accuracy 0.9100 < threshold 0.9500". ``baseline_model_uri`` and
      ``baseline_value`` are None without a baseline.

    Raises:
      HyperparameterError: ``eval_metric`` or ``min_eval_value`` is not valid.
      ModelError: the baseline cannot be loaded or predicts other classes than the data set has.
    """
    _check_gate(eval_metric, eval_value, min_eval_value)
    baseline = baseline_model_uri.strip() or None
    baseline_value = None
    if baseline:
        baseline_value = _evaluate_baseline(baseline, dataset_dir, eval_metric, split, output_dir)

    failed = []
    if eval_value < min_eval_value:
        failed.append(("threshold", min_eval_value, ""))
    if baseline_value is not None and eval_value < baseline_value:
        failed.append(("baseline", baseline_value, f" ({baseline})"))
    if failed:
        reason = "not blessed: " + _comparison(eval_metric, eval_value, "<", failed)
    else:
        passed = [("threshold", min_eval_value, "")] if min_eval_value > 0 else []
        if baseline_value is not None:
            passed.append(("baseline", baseline_value, f" ({baseline})"))
        reason = "blessed: " + (_comparison(eval_metric, eval_value, ">=", passed) if passed else
                                f"{eval_metric} {eval_value:.4f}; no quality gate (min_eval_value 0, no baseline)")
    decision = {
        "blessed": not failed,
        "reason": reason,
        "eval_metric": eval_metric,
        "eval_value": float(eval_value),
        "min_eval_value": float(min_eval_value),
        "baseline_model_uri": baseline,
        "baseline_value": baseline_value,
        "model_uri": model_uri,
        "split": split,
    }
    if output_dir:
        storage.write_bytes(storage.join(output_dir, BLESSING_FILE), _json(decision))
    log.info("%s", reason)
    return decision


def _check_gate(eval_metric: str, eval_value: float, min_eval_value: float) -> None:
    problems = []
    if eval_metric not in EVAL_METRICS:
        problems.append(f"eval_metric: got {eval_metric!r}, expected one of {', '.join(EVAL_METRICS)}")
    if not _is_share(min_eval_value):
        problems.append(f"min_eval_value: got {min_eval_value!r}, expected a number in [0, 1] (every eval_metric "
                        "is a share; 0 turns the threshold off)")
    if problems:
        raise HyperparameterError(problems)
    if not _is_share(eval_value):
        # The evaluation step only produces shares, so anything else is a wiring mistake, not bad data.
        raise ValueError(f"eval_value must be the run's {eval_metric} in [0, 1], got {eval_value!r}")


def _is_share(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
            and 0.0 <= value <= 1.0)


def _evaluate_baseline(baseline: str, dataset_dir: str, eval_metric: str, split: str,
                       output_dir: str | None) -> float:
    """The baseline's ``eval_metric`` on the run's own split, computed as the run's was."""
    try:
        baseline_labels = list(prediction.read_labels(baseline))
    except ModelError as err:
        raise ModelError(f"baseline model: {err}; set baseline_model_uri to an imgclf model folder (such as "
                         "a registry version) or to '' to gate on min_eval_value alone") from None
    label_map = data.read_label_map(dataset_dir)
    dataset_labels = sorted(label_map, key=label_map.__getitem__)
    if baseline_labels != dataset_labels:
        # Checked here, before loading the model, to say what to do about it in terms of the gate.
        raise ModelError(
            f"the baseline model {baseline} cannot be compared with this run: it predicts the classes "
            f"{_preview(baseline_labels)} but the data set {dataset_dir} has {_preview(dataset_labels)} "
            f"({_difference(baseline_labels, dataset_labels)}); set baseline_model_uri to a model trained on "
            "the same classes, or to '' to gate on min_eval_value alone")

    def run(out: str) -> float:
        try:
            result = evaluation.evaluate(baseline, dataset_dir, out, split=split, eval_metric=eval_metric)
        except HyperparameterError as err:
            # E.g. auc asked of a baseline trained without binary_mode: a property of the baseline here.
            raise ModelError(f"the baseline model {baseline} cannot be evaluated on {eval_metric}: "
                             f"{'; '.join(err.problems)}") from None
        except ModelError as err:
            raise ModelError(f"the baseline model {baseline} cannot be compared with this run: {err}") from None
        return float(result["eval_value"])

    if output_dir:
        value = run(storage.join(output_dir, BASELINE_EVALUATION_DIR))
    else:
        with tempfile.TemporaryDirectory(prefix="imgclf-baseline-") as scratch:
            value = run(scratch)
    log.info("Baseline %s: %s %.4f on the %s split of %s", baseline, eval_metric, value, split, dataset_dir)
    return value


def _difference(have: Sequence[str], want: Sequence[str]) -> str:
    missing = [label for label in want if label not in have]
    extra = [label for label in have if label not in want]
    if not missing and not extra:
        return "the same classes in another index order"
    parts = []
    if missing:
        parts.append(f"it lacks {_preview(missing)}")
    if extra:
        parts.append(f"it has {_preview(extra)} besides")
    return " and ".join(parts)


def _preview(labels: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(labels[:limit])
    return f"[{shown}, ... ({len(labels)} in all)]" if len(labels) > limit else f"[{shown}]"


def _comparison(metric: str, value: float, operator: str, bounds: list[tuple[str, float, str]]) -> str:
    """'accuracy 0.9100 < threshold 0.9500 and < baseline 0.9300 (uri)', with enough digits to
    tell the numbers apart (0.93333 vs 0.93334 would both read 0.9333 at four decimals)."""
    digits = _digits_to_tell_apart(value, *(bound for _, bound, _ in bounds))
    parts = [f"{operator} {name} {bound:.{digits}f}{suffix}" for name, bound, suffix in bounds]
    return f"{metric} {value:.{digits}f} " + " and ".join(parts)


def _digits_to_tell_apart(value: float, *bounds: float, fewest: int = 4, most: int = 17) -> int:
    for digits in range(fewest, most):
        shown = f"{value:.{digits}f}"
        if all(bound == value or f"{bound:.{digits}f}" != shown for bound in bounds):
            return digits
    return most


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def push_model(model_dir: str, registry_uri: str, *, metadata: Mapping[str, Any]) -> str:
    """Copy the model folder into a new version folder of the registry; returns its URI.

    Args:
      model_dir: a training run's model folder (local path or gs:// URI).
      registry_uri: the registry's root (gs:// URI or local / mounted path); created by the first push.
      metadata: why the model is pushed, usually ``decide_blessing``'s decision; it is written,
        with the version, the source model and the time, to the version's ``blessing.json``.

    The version is one more than the highest version (or reservation) in the registry. An existing
    version is never written to: when another push takes the number first, the next one is used.
    When the newest pushed version already holds this model (``metadata["model_uri"]``, else
    ``model_dir``), as after a scheduled run reused from the cache or a retried push, that version's
    URI is returned and nothing is written.

    Raises:
      ModelError: ``metadata`` says the model was not blessed, or ``model_dir`` lacks a file.
      StorageError: the model cannot be read or the registry cannot be listed or written.
    """
    if not registry_uri.strip():
        raise StorageError("registry_uri is empty: set it (the pipeline's model_registry_uri) to a gs:// URI "
                           "or a mounted path")
    if metadata.get("blessed") is False:
        # The pipeline only runs the push for blessed models; this keeps a mis-wired one from pushing.
        raise ModelError(f"refusing to push {model_dir}: {metadata.get('reason') or 'it was not blessed'}; only "
                         "blessed models go to the registry")
    files = _model_files(model_dir)
    source = str(metadata.get("model_uri") or model_dir)
    names = _list_registry(registry_uri)
    newest = _newest_pushed_version(registry_uri, names)
    if newest is not None and newest[1].get("model_uri") == source:
        # A cached run on unchanged data (its model is the one pushed last time) or a retried push whose
        # first attempt finished: the registry already serves this model, so no duplicate version.
        uri = storage.join(registry_uri, newest[0])
        log.info("%s is already the registry's newest version %s; nothing pushed", source, uri)
        return uri
    # The claim id makes this push's claim unlike any other's: a retried claim upload that meets its own
    # landed first attempt is recognised by its content (storage.create_if_absent) and keeps its version.
    claim = _json({"model_uri": source, "claimed_at": _now(), "claim_id": secrets.token_hex(16)})
    version = _claim_version(registry_uri, claim, names)
    target = storage.join(registry_uri, version)
    log.info("Pushing %s to %s (%d files)", model_dir, target, len(files))
    _copy_files(model_dir, files, target)
    record = {"model_uri": source, **metadata, "version": version, "version_uri": target, "pushed_at": _now()}
    storage.write_bytes(storage.join(target, BLESSING_FILE), _json(record))
    log.info("Pushed version %s: %s", version, target)
    return target


def _model_files(model_dir: str) -> list[str]:
    """The files of the model folder that a registry version holds; ModelError if one is missing."""
    listed = storage.list_files(model_dir)
    missing = [name for name in _REQUIRED_FILES if name not in listed]
    if missing:
        raise ModelError(f"{model_dir} is not a complete imgclf model folder: {', '.join(missing)} missing; "
                         "push the folder that training wrote")
    saved_model = [name for name in listed if name.startswith(f"{SAVED_MODEL_DIR}/")]
    wanted = set(_REQUIRED_FILES) | set(saved_model) | {name for name in _OPTIONAL_FILES if name in listed}
    # Only the model's own files: anything else in the folder (notes, stray temporary files) stays out.
    return sorted(storage.safe_relative_path(name) for name in wanted)


def _list_registry(registry_uri: str) -> list[str]:
    try:
        return storage.list_files(registry_uri)
    except StorageError:
        # A registry nothing was pushed to yet cannot be listed (GCS has no empty folders), and neither
        # can an unreachable one. Both start at version 1: the claim written next creates the registry
        # or fails with the real reason.
        return []


def _newest_pushed_version(registry_uri: str, names: Iterable[str]) -> tuple[str, dict[str, Any]] | None:
    """The highest version whose push finished (its blessing.json is written last), with that record."""
    finished = sorted((int(name.split("/")[0]), name.split("/")[0]) for name in names
                      if name.count("/") == 1 and name.endswith("/" + BLESSING_FILE)
                      and _VERSION.fullmatch(name.split("/")[0]))
    if not finished:
        return None
    version = finished[-1][1]
    try:
        return version, json.loads(storage.read_bytes(storage.join(registry_uri, version, BLESSING_FILE)))
    except (StorageError, ValueError):
        return None  # unreadable: push a new version rather than trust it


def _claim_version(registry_uri: str, claim: bytes, names: Iterable[str]) -> str:
    """Reserve the next version number for this push, safely against concurrent pushes.

    The version is one more than the highest in the registry's listing ``names``; it is taken by creating
    ``.claims/<version>`` only if it is absent (``storage.create_if_absent``: an exclusive create on
    disk, ``ifGenerationMatch=0`` on GCS), which exactly one of several racing pushes achieves. A
    push that loses tries the next number, so each conflict means another push got a version.
    """
    candidate = _highest_version(names) + 1
    for _ in range(MAX_CLAIM_ATTEMPTS):
        version = version_name(candidate)
        candidate += 1
        if not storage.create_if_absent(storage.join(registry_uri, CLAIMS_DIR, version), claim):
            log.info("Version %s of %s was taken by another push; trying the next", version, registry_uri)
            continue
        if _has_files(storage.join(registry_uri, version)):
            # A folder without a claim: written by an older imgclf or by hand. The claim stays, unused.
            log.info("Version %s of %s already has files; trying the next", version, registry_uri)
            continue
        return version
    raise StorageError(f"could not reserve a version in {registry_uri}: other pushes took the next number "
                       f"{MAX_CLAIM_ATTEMPTS} times in a row; retry the push (nothing was written to a version)")


def _has_files(uri: str) -> bool:
    try:
        return bool(storage.list_files(uri))
    except StorageError:
        return False


def _highest_version(names: Iterable[str]) -> int:
    """The highest version that has a folder or a reservation; 0 for an empty registry.

    Other entries (a README, a folder named 'latest') are not versions and are left alone.
    """
    highest = 0
    for name in names:
        parts = name.split("/")
        if parts[0] == CLAIMS_DIR and len(parts) > 1:  # .claims/<version> (or, before, .claims/<version>/<token>)
            number = parts[1]
        elif len(parts) > 1:
            number = parts[0]
        else:
            continue
        if _VERSION.fullmatch(number):
            highest = max(highest, int(number))
    return highest


def _copy_files(source: str, names: Sequence[str], target: str) -> None:
    if not storage.is_gcs(source):
        for name in names:
            storage.upload_file(storage.join(source, name), storage.join(target, name))
        return
    # trainer.storage copies between a local file and a URI, so gs:// to gs:// goes through a local copy.
    with tempfile.TemporaryDirectory(prefix="imgclf-push-") as scratch:
        for name in names:
            local = os.path.join(scratch, *name.split("/"))
            storage.download_file(storage.join(source, name), local)
            storage.upload_file(local, storage.join(target, name))
            os.unlink(local)  # One file on local disk at a time: the model may be larger than it.


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")
