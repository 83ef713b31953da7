"""The on-disk contracts, stated once: the data set folder, the model folder and the registry's versions.

Every module that reads or writes one of these folders takes its names from here, and the manifest
is read and written only through ``read_manifest`` / ``write_manifest``. A static test refuses a
contract name spelled out anywhere else.

Data set folder (written by ``trainer.conversion``, read by ``trainer.data``)::

    DATASET/manifest.json                          written last; its presence vouches for the folder
    DATASET/class_label_to_prediction_index.json   {class: index}, classes in alphabetical order
    DATASET/<split>/part-NNNNN-of-MMMMM.tfrecord    split in SPLITS; records with RECORD_FEATURES

Model folder (written by ``trainer.export``, read by prediction, evaluation and the registry)::

    MODEL/model.keras, MODEL/saved_model/, MODEL/class_label_to_prediction_index.json,
    MODEL/hyperparameters.yaml, MODEL/history.json

Registry (``trainer.registry``)::

    REGISTRY/000001/ ...                          a model folder plus blessing.json, written last
    REGISTRY/.claims/000001                       the claim of a version number, created only if absent
"""

from __future__ import annotations

import json
import re
from typing import Any

from trainer import storage
from trainer.errors import DataError, StorageError

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


# --- the model folder -------------------------------------------------------------------------------

KERAS_MODEL_FILE = "model.keras"
SAVED_MODEL_DIR = "saved_model"
SAVED_MODEL_PROTO = "saved_model.pb"
HYPERPARAMETERS_FILE = "hyperparameters.yaml"
HISTORY_FILE = "history.json"
# The on-device models (trainer.tflite): float always, dynamic-range quantised on request.
TFLITE_FILE = "model.tflite"
TFLITE_DYNAMIC_RANGE_FILE = "model_dynamic_range.tflite"
# The model folder's label map has the data set's name and content.
MODEL_LABEL_MAP_FILE = LABEL_MAP_FILE

# --- the registry -----------------------------------------------------------------------------------

BLESSING_FILE = "blessing.json"
CLAIMS_DIR = ".claims"
VERSION_DIGITS = 6


def version_name(number: int) -> str:
    """The folder name of registry version ``number``: zero-padded, so names sort in version order."""
    return f"{number:0{VERSION_DIGITS}d}"
