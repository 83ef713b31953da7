"""The on-disk contracts, stated once: the data set folder, the model folder and the registry's versions.

Every module that reads or writes one of these folders takes its names from here, and the manifest
is read and written only through ``read_manifest`` / ``write_manifest``. A static test refuses a
contract name spelled out anywhere else.

Data set folder (written by ``trainer.data.conversion``, read by ``trainer.data.reader``)::

    DATASET/manifest.json                          written last; its presence vouches for the folder
    DATASET/class_label_to_prediction_index.json   {class: index}, classes in alphabetical order
    DATASET/<split>/part-NNNNN-of-MMMMM.tfrecord    split in SPLITS; records with RECORD_FEATURES

Validation folder (written by ``trainer.data.validation``, read by ``trainer.data.conversion`` through
``validation.read_results``)::

    VALIDATION/validation.json                     the summary: counts, classes, statistics, fatal problems
    VALIDATION/accepted.jsonl, rejected.jsonl,     one JSON object per file (per group of identical files),
      skipped.jsonl, duplicates.jsonl              sorted by path; they stream, whatever the data set's size
    VALIDATION/report.md, report.html              summaries of bounded size (trainer.data.validation names them)

Model folder (written by ``trainer.train.export``, read by prediction, evaluation and the registry)::

    MODEL/model.keras, MODEL/saved_model/, MODEL/class_label_to_prediction_index.json,
    MODEL/hyperparameters.yaml, MODEL/history.json, MODEL/model.tflite [, MODEL/model_dynamic_range.tflite]

Export owns these names (``MODEL_FILES`` and ``SAVED_MODEL_DIR``): a new export replaces all of them,
so no file of an earlier export survives beside it; other files in the folder are left alone.

A local run's folder (``imgclf run-local``, ``imgclf tune``)::

    RUN/index.html, RUN/reports/*.html              the run page and copies of the steps' HTML reports
    RUN/artifacts/<run>/<step>/log.txt              everything the step printed, beside its artifacts

Registry (``trainer.serve.registry``)::

    REGISTRY/000001/saved_model.pb, variables/, assets/, fingerprint.pb   the SavedModel, at the top
    REGISTRY/000001/model.keras, class_label_to_prediction_index.json, hyperparameters.yaml, history.json,
                    model.tflite [, model_dynamic_range.tflite]          the rest of the model folder
    REGISTRY/000001/blessing.json                 the push's record (with ``model_digest``), written last
    REGISTRY/.claims/000001                       the claim of a version number, created only if absent

A version folder IS the SavedModel, so REGISTRY is a TF Serving ``--model_base_path`` and a KServe
``storageUri`` as it is: TF Serving takes every child whose name parses as an int64 as a version and
loads it as a SavedModel (``<base>/<version>/saved_model.pb``; "000001" is version 1), ignores the
other files of a version, and skips ``.claims`` (not a number). A version pushed by imgclf before
2026-12-03 holds its SavedModel one level down (``000001/saved_model/``) as a model folder does; it is
still read everywhere (``saved_model_dir`` resolves the SavedModel of either), only not served by TF
Serving from the base path.

Push order: every SavedModel file but ``saved_model.pb`` (variables/, assets/, fingerprint.pb), then
``saved_model.pb``, which TF Serving takes as the sign that a version is ready (TFX's Pusher writes it
last too), then the other files, then ``blessing.json``: a server watching REGISTRY never loads a
partial SavedModel, and a version without ``blessing.json`` is an interrupted push.

Registry version or model folder: a folder is a registry version when its name is a version number
and its parent holds its claim (``.claims/<name>``; every push claims the number before it writes a
file). Readers (prediction, batch prediction, the gate's baseline, incremental training) refuse a
registry version without ``blessing.json`` (``check_not_interrupted``); any other folder, such as a
training run's output, has no blessing and needs none. A numbered folder without a claim (copied by
hand) is read as a model folder.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from trainer import storage
from trainer.errors import DataError, ModelError, StorageError

# --- the data set folder ----------------------------------------------------------------------------

MANIFEST_FILE = "manifest.json"
LABEL_MAP_FILE = "class_label_to_prediction_index.json"
SPLITS = ("train", "validation", "test")
# The record format. Version 1 held resized pixels ("image/raw"); version 2 holds the original file bytes.
FORMAT_VERSION = 2
FEATURE_ENCODED = "image/encoded"
FEATURE_FORMAT = "image/format"
FEATURE_LABEL = "label"
FEATURE_PATH = "path"
# Optional (records of earlier conversions lack it; they read as 0, "unknown", and training then searches
# the bytes for it as serving does), so the format version stays 2.
FEATURE_ORIENTATION = "image/orientation"
RECORD_FEATURES = {
    FEATURE_ENCODED: "bytes: the image file's original bytes (JPEG or PNG)",
    FEATURE_FORMAT: "bytes: b'jpeg' or b'png', the content as validation detected it",
    FEATURE_LABEL: "int64: index into classes (sorted class folder names)",
    FEATURE_PATH: "bytes: the file's path relative to data_uri, UTF-8",
    FEATURE_ORIENTATION: "int64: the EXIF orientation 1-8 the serving decoder finds in the bytes "
                         "(images.tensorflow_orientation); absent or 0: unknown",
}
# In each split's entry of the manifest: the shorter side, in pixels, of the split's largest JPEG (0 when it
# has none; absent from earlier conversions' manifests). Training reads it to know, before decoding, whether
# any JPEG of the split is large enough to be decoded scaled down (images.jpeg_scale).
MANIFEST_JPEG_SHORT_SIDE = "largest_jpeg_short_side"
SHARD_PATTERN = re.compile(r"^part-\d{5}-of-\d{5}\.tfrecord$")


def shard_name(index: int, count: int) -> str:
    """The file name of shard ``index`` (0-based) of ``count``."""
    return f"part-{index:05d}-of-{count:05d}.tfrecord"


def check_format_version(manifest: dict[str, Any], where: str) -> None:
    """DataError unless ``manifest`` (read from ``where``) is of the format this code reads."""
    version = manifest.get("format_version")
    if version == FORMAT_VERSION:
        return
    if version == 1:
        raise DataError(f"{where}: this data set is of format version 1 (records of pixels resized at conversion,"
                        f" written by an earlier imgclf); this imgclf reads version {FORMAT_VERSION}, whose records"
                        " hold the original image files: re-run the conversion step on the data set")
    raise DataError(f"{where}: format_version {version!r} is not one this imgclf reads (version {FORMAT_VERSION});"
                    " re-run the conversion step with this version of imgclf")


def read_manifest_bytes(dataset_dir: str) -> bytes:
    """The manifest file's bytes; DataError naming it when it is missing or unreadable."""
    try:
        return storage.read_bytes(storage.join(dataset_dir, MANIFEST_FILE))
    except StorageError as err:
        raise DataError(f"no readable {MANIFEST_FILE} in {dataset_dir}: it is missing or unreadable ({err}); the "
                        "conversion step did not finish or the path is wrong: re-run the conversion step or fix "
                        "the path") from None


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """Check a manifest's format version and split entries; ``where`` names it in errors."""
    try:
        manifest = json.loads(raw)
    except ValueError as err:
        raise DataError(f"{where}: the data set's manifest is not valid JSON ({err}); re-run the conversion step") \
            from None
    if not isinstance(manifest, dict):
        raise DataError(f"{where}: expected a JSON object as the data set's manifest, got "
                        f"{type(manifest).__name__}; re-run the conversion step")
    check_format_version(manifest, where)
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{where}: 'splits' must map each split to its count and files; re-run the conversion step")
    for split, info in splits.items():
        names = (info or {}).get("files", [])
        if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
            raise DataError(f"{where}: splits.{split}.files must be a list of shard file names, got {names!r}; "
                            "re-run the conversion step")
    return manifest


def read_manifest(dataset_dir: str, *, check_shards: bool = False) -> dict[str, Any]:
    """The one manifest reader: the data set's manifest, checked (local path or gs:// URI).

    With ``check_shards`` the counts must add up to ``accepted`` and every listed shard must exist
    (one listing of the folder).

    Raises:
      DataError: the manifest is missing (the conversion did not finish), not JSON, of another
        format version, malformed, or (``check_shards``) inconsistent or missing a shard.
    """
    where = storage.join(dataset_dir, MANIFEST_FILE)
    manifest = parse_manifest(read_manifest_bytes(dataset_dir), where)
    if check_shards:
        splits = manifest["splits"]
        total = sum((splits.get(s) or {}).get("count", 0) for s in SPLITS)
        if "accepted" in manifest and total != manifest["accepted"]:
            raise DataError(f"{where} is inconsistent: {manifest['accepted']} accepted images but {total} in the"
                            " splits; re-run the conversion")
        present = set(storage.list_files(dataset_dir))
        missing = [f"{split}/{name}" for split in SPLITS for name in (splits.get(split) or {}).get("files", [])
                   if f"{split}/{name}" not in present]
        if missing:
            raise DataError(f"{dataset_dir} is missing shard(s) listed in its manifest: {', '.join(missing[:5])}"
                            f"{' ...' if len(missing) > 5 else ''}; re-run the conversion")
    return manifest


def write_manifest(dataset_dir: str, manifest: dict[str, Any]) -> None:
    """Write the manifest (atomically): call it last, once every shard and the label map are written."""
    storage.write_bytes(storage.join(dataset_dir, MANIFEST_FILE),
                        json.dumps(manifest, indent=1, ensure_ascii=False).encode("utf-8"))


def invalidate_manifest(dataset_dir: str) -> None:
    """Remove the manifest, so that it stops vouching for a folder whose shards are about to change."""
    storage.delete(storage.join(dataset_dir, MANIFEST_FILE))


# --- the validation folder -------------------------------------------------------------------------

VALIDATION_FILE = "validation.json"
VALIDATION_SCHEMA_VERSION = 2  # version 1 held every per-file list in validation.json itself
VALIDATION_LISTS = {"accepted": "accepted.jsonl", "rejected": "rejected.jsonl", "skipped": "skipped.jsonl",
                    "duplicates": "duplicates.jsonl"}

# --- the model folder -------------------------------------------------------------------------------

KERAS_MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_PROTO = "saved_model.pb"
# What TensorFlow's SavedModel format puts at the top of its folder (tf.saved_model.save).
SAVED_MODEL_PARTS = (SAVED_MODEL_PROTO, "saved_model.pbtxt", "fingerprint.pb", "variables", "assets",
                     "assets.extra")
HYPERPARAMETERS_FILE = "hyperparameters.yaml"
HISTORY_FILE = "history.json"
# The on-device models (trainer.train.tflite): float always, dynamic-range quantised on request.
TFLITE_FILE = "model.tflite"
TFLITE_DYNAMIC_RANGE_FILE = "model_dynamic_range.tflite"
# The model folder's label map has the data set's name and content.
MODEL_LABEL_MAP_FILE = LABEL_MAP_FILE
# The files of a model folder besides its SavedModel: required first, then those written when they apply.
MODEL_REQUIRED_FILES = (KERAS_MODEL_FILE, MODEL_LABEL_MAP_FILE, HYPERPARAMETERS_FILE)
MODEL_FILES = MODEL_REQUIRED_FILES + (HISTORY_FILE, TFLITE_FILE, TFLITE_DYNAMIC_RANGE_FILE)


def saved_model_dir(model_dir: str) -> str:
    """The folder that holds the SavedModel of a model folder or registry version (local or gs://).

    That is ``model_dir`` itself when ``saved_model.pb`` is at its top (a registry version), else its
    ``saved_model/`` (a training run's model folder, or a version pushed before 2026-12-03).

    Raises:
      ModelError: neither holds a ``saved_model.pb``, or the folder cannot be listed.
    """
    try:
        names = set(storage.list_files(model_dir))
    except StorageError as err:
        raise ModelError(f"cannot read the model folder {model_dir}: {err}") from None
    if SAVED_MODEL_PROTO in names:
        return model_dir
    if f"{SAVED_MODEL_DIR}/{SAVED_MODEL_PROTO}" in names:
        return storage.join(model_dir, SAVED_MODEL_DIR)
    raise ModelError(f"{model_dir} holds no SavedModel: neither {SAVED_MODEL_PROTO} nor {SAVED_MODEL_DIR}/"
                     f"{SAVED_MODEL_PROTO} is there; pass a model folder written by imgclf training or a "
                     "registry version")


# --- the registry -----------------------------------------------------------------------------------

BLESSING_FILE = "blessing.json"
# The key of blessing.json that says which model a version holds (``trainer.serve.registry.model_digest``); versions
# pushed before 2026-12-03 lack it, and push computes their digest from their files.
MODEL_DIGEST_KEY = "model_digest"
# Beside the gate's blessing.json: the output of the model server infra validation started.
INFRA_VALIDATION_LOG = "infra_validation.log"
CLAIMS_DIR = ".claims"
VERSION_DIGITS = 6
# A version folder's name: digits (zero-padded by push; unpadded names written by hand count too).
VERSION_NAME = re.compile(r"[0-9]+")


def version_name(number: int) -> str:
    """The folder name of registry version ``number``: zero-padded, so names sort in version order."""
    return f"{number:0{VERSION_DIGITS}d}"


def is_registry_version(model_dir: str) -> bool:
    """Whether ``model_dir`` is a registry version: a version number whose claim its parent holds."""
    parent, name = _parent_and_name(model_dir)
    if not VERSION_NAME.fullmatch(name):
        return False
    claim = storage.join(parent, CLAIMS_DIR, name)
    if not storage.is_gcs(claim):
        # A file, or a folder (.claims/<version>/<token>) as the first imgclf pushes claimed a number.
        return os.path.exists(storage.local_path(claim))
    if storage.read_bytes_if_exists(claim) is not None:
        return True
    try:
        return bool(storage.list_files(claim))
    except StorageError:
        return False  # no claim of either form


def check_not_interrupted(model_dir: str) -> None:
    """ModelError when ``model_dir`` is a registry version whose push did not finish (no blessing.json).

    Costs no request for a folder whose name is not a version number, one for a finished version.
    """
    if not VERSION_NAME.fullmatch(_parent_and_name(model_dir)[1]):
        return
    if storage.read_bytes_if_exists(storage.join(model_dir, BLESSING_FILE)) is not None:
        return
    if is_registry_version(model_dir):
        raise ModelError(f"{model_dir} is a registry version without {BLESSING_FILE}: its push was interrupted, "
                         "so its files may be incomplete; use another version (the push writes a new one when "
                         "it is run again)")


def _parent_and_name(folder: str) -> tuple[str, str]:
    if storage.is_gcs(folder):
        parent, _, name = folder.rstrip("/").rpartition("/")
        return parent, name
    path = os.path.normpath(storage.local_path(folder))
    return os.path.dirname(path) or os.curdir, os.path.basename(path)

# --- a local run's folder (imgclf run-local, imgclf tune) -----------------------------------------

RUN_PAGE_FILE = "index.html"
# Each step's whole output, beside its artifacts (the folder kfp.local gives the step).
STEP_LOG_FILE = "log.txt"
# The run page links copies of the HTML reports, named *.html so that a browser shows them as pages.
RUN_REPORTS_DIR = "reports"
