"""The quality gate ("blessing") and the model registry that only blessed models are pushed to.

Blessing: a run's model is blessed when its ``eval_metric`` on the test split reaches
``min_eval_value`` (0 means no threshold) and is not below the value of an optional baseline model
evaluated here on the same split of the same data set. Every ``eval_metric`` is higher-is-better,
and ties bless: a retrained model as good as the one in production may replace it.

Registry: ``registry_uri`` (a gs:// URI or a local / mounted path) holds one folder per pushed model,
numbered 1, 2, 3... (``000001/``, zero-padded so names sort in version order) and never overwritten.
Each version folder is the serving SavedModel with the rest of the model folder and ``blessing.json``
beside it, so ``registry_uri`` is a TF Serving ``--model_base_path`` / KServe ``storageUri`` as it is;
``trainer.layout`` states the layout, the order push writes it in, and why.

A version folder is a complete imgclf model folder: it can be the ``baseline_model_uri`` of the
next run, the ``initial_model_uri`` of incremental training, or the model of ``imgclf predict``.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import math
import os
import secrets
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from trainer import storage
from trainer.data import reader
from trainer.errors import HyperparameterError, ModelError, StorageError
from trainer.evaluate import evaluation
from trainer.hyperparameters import EVAL_METRICS
from trainer.layout import (
    BLESSING_FILE,
    CLAIMS_DIR,
    INFRA_VALIDATION_LOG,
    MODEL_DIGEST_KEY,
    MODEL_FILES,
    MODEL_REQUIRED_FILES,
    SAVED_MODEL_DIR,
    SAVED_MODEL_PARTS,
    SAVED_MODEL_PROTO,
    VERSION_NAME,
    version_name,
)
from trainer.serve import infra_validation, prediction

log = logging.getLogger(__name__)

BASELINE_EVALUATION_DIR = "baseline"
# Each attempt loses a race against another push; more than a few in a row means something is wrong.
MAX_CLAIM_ATTEMPTS = 10


# ---------------------------------------------------------------------------------------------
# Blessing
# ---------------------------------------------------------------------------------------------

def decide_blessing(eval_metric: str, eval_value: float, *, dataset_dir: str, min_eval_value: float = 0.0,
                    baseline_model_uri: str = "", model_uri: str | None = None, output_dir: str | None = None,
                    split: str = "test", model_dir: str | None = None) -> dict[str, Any]:
    """Decide whether this run's model is good enough to push, and (with ``model_dir``) servable.

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
      model_dir: the run's model folder; when given and the metrics pass, infra validation
        (``trainer.serve.infra_validation``) serves it on loopback with ``imgclf serve`` and asks it about
        test-split images in every contract: a model that does not load or answers other probabilities than
        its own in-process ones is not blessed. The server's log is written to ``output_dir``'s
        ``INFRA_VALIDATION_LOG``. A model not blessed on metrics is not served.

    Returns:
      ``{"blessed", "reason", "eval_metric", "eval_value", "min_eval_value", "baseline_model_uri",
      "baseline_value", "model_uri", "split"}``, and with ``model_dir`` "infra_validation"
      (``validate_serving``'s result); ``reason`` is one line such as
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
    infra = None
    if model_dir and failed:
        reason = f"{reason}; infra validation not run: not blessed on metrics"
    elif model_dir:
        log_path = None
        if output_dir and not storage.is_gcs(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            log_path = os.path.join(output_dir, INFRA_VALIDATION_LOG)
        infra = infra_validation.validate_serving(model_dir, dataset_dir, log_path=log_path)
        if not infra["passed"]:
            reason = f"not blessed: {infra['reason']}"
            failed.append(("infra validation", 0.0, ""))
        else:
            reason = f"{reason}; {infra['reason']}"
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
    if infra is not None:
        decision["infra_validation"] = infra
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
    label_map = reader.read_label_map(dataset_dir)
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
      model_dir: a training run's model folder, or a registry version (local path or gs:// URI).
      registry_uri: the registry's root (gs:// URI or local / mounted path); created by the first push.
      metadata: why the model is pushed, usually ``decide_blessing``'s decision; it is written,
        with the version, the source model, the model's content digest and the time, to the
        version's ``blessing.json``.

    The version is one more than the highest version (or reservation) in the registry. An existing
    version is never written to: when another push takes the number first, the next one is used.
    The files go in the order ``trainer.layout`` states (the SavedModel's ``saved_model.pb`` after its
    other files, ``blessing.json`` last), so a server watching the registry never loads half a version.
    When the newest pushed version already holds this model (the same ``model_digest``: the same
    files with the same content, wherever they are), as after a scheduled run reused from the cache
    or a retried push, that version's URI is returned and nothing is written.

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
    files = version_files(model_dir)
    digest = model_digest(model_dir, files)
    source = str(metadata.get("model_uri") or model_dir)
    names = _list_registry(registry_uri)
    newest = _newest_pushed_version(registry_uri, names)
    if newest is not None and _pushed_digest(registry_uri, *newest) == digest:
        # A cached run on unchanged data (its model is the one pushed last time) or a retried push whose
        # first attempt finished: the registry already serves this model, so no duplicate version.
        uri = storage.join(registry_uri, newest[0])
        log.info("%s (%s) is already the registry's newest version %s; nothing pushed", source, digest, uri)
        return uri
    # The claim id makes this push's claim unlike any other's: a retried claim upload that meets its own
    # landed first attempt is recognised by its content (storage.create_if_absent) and keeps its version.
    claim = _json({"model_uri": source, MODEL_DIGEST_KEY: digest, "claimed_at": _now(),
                   "claim_id": secrets.token_hex(16)})
    version = _claim_version(registry_uri, claim, names)
    target = storage.join(registry_uri, version)
    log.info("Pushing %s to %s (%d files)", model_dir, target, len(files))
    _copy_files(model_dir, files, target)
    record = {"model_uri": source, **metadata, MODEL_DIGEST_KEY: digest, "version": version,
              "version_uri": target, "pushed_at": _now()}
    storage.write_bytes(storage.join(target, BLESSING_FILE), _json(record))
    log.info("Pushed version %s: %s", version, target)
    return target


def version_files(model_dir: str) -> dict[str, str]:
    """``{name in the version: name in model_dir}`` for every file a registry version holds, in push order.

    ``model_dir`` is a training run's model folder (its ``saved_model/`` goes to the version's top) or
    a registry version of either layout. Only the model's own files: anything else in the folder
    (notes, stray temporary files, an earlier blessing.json) stays out.

    Raises:
      ModelError: a required file is missing.
      StorageError: ``model_dir`` cannot be listed.
    """
    listed = storage.list_files(model_dir)
    nested = f"{SAVED_MODEL_DIR}/{SAVED_MODEL_PROTO}"
    if nested in listed:
        prefix = f"{SAVED_MODEL_DIR}/"
        saved_model = {name[len(prefix):]: name for name in listed if name.startswith(prefix)}
    else:
        saved_model = {name: name for name in listed if name.split("/")[0] in SAVED_MODEL_PARTS}
    missing = [name for name in MODEL_REQUIRED_FILES if name not in listed]
    if SAVED_MODEL_PROTO not in saved_model:
        missing.append(nested)
    if missing:
        raise ModelError(f"{model_dir} is not a complete imgclf model folder: {', '.join(missing)} missing; "
                         "push the folder that training wrote")
    others = {name: name for name in MODEL_FILES if name in listed}
    files = {storage.safe_relative_path(target): source for target, source in {**saved_model, **others}.items()}

    def order(name: str) -> tuple[int, str]:
        if name == SAVED_MODEL_PROTO:
            return 1, name
        return (0 if name in saved_model else 2), name

    return {name: files[name] for name in sorted(files, key=order)}


def model_digest(model_dir: str, files: Mapping[str, str] | None = None) -> str:
    """The content digest of the model a push would copy from ``model_dir``: "sha256:<hex>".

    SHA-256 over each file's name in the version, size and MD5, so a training folder and the
    version pushed from it have one digest, and a different model written to the same path has
    another. On gs:// the MD5s come from the listing (no download); a composite object, which has
    none, is read.
    """
    files = version_files(model_dir) if files is None else files
    details = {entry["path"]: entry for entry in storage.list_object_details(model_dir)}
    lines = []
    for target, source in files.items():
        checksum = details[source].get("md5") or storage.file_md5(storage.join(model_dir, source))
        lines.append(f"{target}\t{details[source]['size']}\t{checksum}\n")
    return "sha256:" + hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def _pushed_digest(registry_uri: str, version: str, record: Mapping[str, Any]) -> str | None:
    """The ``model_digest`` of a finished version: its record's, or for a version pushed before the record
    held one, computed from its files (either layout); None when they are not a complete model."""
    if record.get(MODEL_DIGEST_KEY):
        return record[MODEL_DIGEST_KEY]
    try:
        return model_digest(storage.join(registry_uri, version))
    except ModelError:
        return None  # not a complete model folder: this push writes a new version


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
                      and VERSION_NAME.fullmatch(name.split("/")[0]))
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
        if VERSION_NAME.fullmatch(number):
            highest = max(highest, int(number))
    return highest


def _copy_files(source: str, files: Mapping[str, str], target: str) -> None:
    """Copy ``{name in target: name in source}`` one file after another, in the mapping's order."""
    if not storage.is_gcs(source):
        for name, origin in files.items():
            storage.upload_file(storage.join(source, origin), storage.join(target, name))
        return
    # trainer.storage copies between a local file and a URI, so gs:// to gs:// goes through a local copy.
    with tempfile.TemporaryDirectory(prefix="imgclf-push-") as scratch:
        for name, origin in files.items():
            local = os.path.join(scratch, *name.split("/"))
            storage.download_file(storage.join(source, origin), local)
            storage.upload_file(local, storage.join(target, name))
            os.unlink(local)  # One file on local disk at a time: the model may be larger than it.


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _json(value: Mapping[str, Any]) -> bytes:
    return (json.dumps(value, indent=2) + "\n").encode("utf-8")
