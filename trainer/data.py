"""Read the converted TFRecord data set: label map, split sizes, and tf.data input pipelines.

The data set is written once by the conversion step (``trainer/conversion.py``)::

    DATASET_DIR/train/part-NNNNN-of-MMMMM.tfrecord       (likewise validation/ and test/)
    DATASET_DIR/class_label_to_prediction_index.json     {class: index}, alphabetical
    DATASET_DIR/manifest.json                            classes, image_size, splits: {split: {count, ...}}

Every record already holds the resized uint8 pixels, so training never decodes or resizes an
image: an epoch costs one ``decode_raw`` per record, and when the split fits in memory not even
that after the first epoch (the parsed split is cached).

gs:// data sets are copied to a local cache directory before reading (``local_dataset_dir``)
rather than streamed through TensorFlow's GCS file system: the copy goes through
``trainer.storage`` (google-cloud-storage), which honours the same credentials and
``STORAGE_EMULATOR_HOST`` as every other step, and every epoch after the copy reads local disk
instead of paying network latency again.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any

import tensorflow as tf

from trainer.errors import DataError, StorageError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
LABEL_MAP_FILE = "class_label_to_prediction_index.json"
MANIFEST_FILE = "manifest.json"

# The record layout written by conversion; "path" is kept for error messages and evaluation.
FEATURES = {
    "image/raw": tf.io.FixedLenFeature([], tf.string),
    "image/size": tf.io.FixedLenFeature([], tf.int64),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "path": tf.io.FixedLenFeature([], tf.string, default_value=""),
}

# A split whose pixels fit in this many bytes is cached in memory after its first pass.
DEFAULT_CACHE_BYTES = 1 << 30
# The shuffle buffer holds at most this many bytes of pixels (the whole split when it is cached).
SHUFFLE_BUFFER_BYTES = 256 << 20

# Where gs:// data sets are copied; one subdirectory per URI.
CACHE_DIR_ENV = "IMGCLF_CACHE_DIR"
_COMPLETE_MARKER = ".imgclf-complete"


# ---------------------------------------------------------------------------------------------
# The data set's metadata
# ---------------------------------------------------------------------------------------------

def read_manifest(dataset_dir: str) -> dict[str, Any]:
    """The data set's ``manifest.json`` as a dict; DataError naming the file if missing or invalid."""
    return _read_json(_join(dataset_dir, MANIFEST_FILE), "manifest", dict)


def read_label_map(dataset_dir: str) -> dict[str, int]:
    """The ``{class: prediction index}`` mapping written by conversion, checked to be 0..K-1."""
    path = _join(dataset_dir, LABEL_MAP_FILE)
    mapping = _read_json(path, "label map", dict)
    indices = sorted(mapping.values()) if all(type(v) is int for v in mapping.values()) else None
    if not mapping or indices != list(range(len(mapping))):
        raise DataError(f"{path}: expected a non-empty mapping of class name to the indices 0..K-1, each "
                        f"once; got {mapping!r}. Re-run the conversion step to rewrite it.")
    return {str(name): index for name, index in mapping.items()}


def split_count(dataset_dir: str, split: str) -> int:
    """Number of images in a split according to the manifest (0 for a split that was not written)."""
    _check_split(split)
    info = read_manifest(dataset_dir).get("splits", {}).get(split) or {}
    return int(info.get("count", 0))


def image_size(dataset_dir: str) -> int:
    """Side in pixels of the (square) images stored in the data set."""
    manifest = read_manifest(dataset_dir)
    size = manifest.get("image_size")
    if not isinstance(size, int) or size < 1:
        raise DataError(f"{_join(dataset_dir, MANIFEST_FILE)}: 'image_size' must be a positive integer, "
                        f"got {size!r}; re-run the conversion step")
    return size


def shard_files(dataset_dir: str, split: str) -> list[str]:
    """Paths of the split's TFRecord shards, as the manifest lists them (never from a listing, which
    could include a half-written or stale file); empty when the split was not written."""
    _check_split(split)
    manifest = read_manifest(dataset_dir)
    info = manifest.get("splits", {}).get(split) or {}
    names = info.get("files", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and "/" not in n for n in names):
        raise DataError(f"{_join(dataset_dir, MANIFEST_FILE)}: splits.{split}.files must be a list of shard "
                        f"file names, got {names!r}; re-run the conversion step")
    return [_join(dataset_dir, split, name) for name in names]


# ---------------------------------------------------------------------------------------------
# gs:// data sets
# ---------------------------------------------------------------------------------------------

def local_dataset_dir(dataset_dir: str, splits: tuple[str, ...] = SPLITS,
                      cache_dir: str | None = None) -> str:
    """A local directory holding ``dataset_dir``'s metadata and the given splits.

    Local paths are returned as they are. A gs:// URI is copied once into
    ``cache_dir`` (default ``$IMGCLF_CACHE_DIR`` or the system temp directory) under a name derived
    from the URI; a later call in the same pod finds the copy. Each split is copied into a
    temporary directory and renamed into place, so an interrupted copy is never mistaken for a
    complete one.
    """
    if not dataset_dir.startswith("gs://"):
        return dataset_dir
    from trainer import storage  # Only needed for gs:// data sets.

    root = cache_dir or os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "imgclf-cache")
    digest = hashlib.sha256(dataset_dir.rstrip("/").encode()).hexdigest()[:16]
    local = os.path.join(root, f"dataset-{digest}")
    os.makedirs(local, exist_ok=True)
    for name in (MANIFEST_FILE, LABEL_MAP_FILE):
        storage.download_file(storage.join(dataset_dir, name), os.path.join(local, name))
    for split in splits:
        target = os.path.join(local, split)
        remote = shard_files(dataset_dir, split)
        if os.path.exists(os.path.join(target, _COMPLETE_MARKER)) or not remote:
            continue
        log.info("Copying %d shards of the %s split of %s to %s", len(remote), split, dataset_dir, target)
        staging = tempfile.mkdtemp(prefix=f".{split}-", dir=local)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                # list() re-raises the first failed download.
                targets = [os.path.join(staging, uri.rsplit("/", 1)[-1]) for uri in remote]
                list(pool.map(storage.download_file, remote, targets))
            open(os.path.join(staging, _COMPLETE_MARKER), "w").close()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return local


# ---------------------------------------------------------------------------------------------
# tf.data pipelines
# ---------------------------------------------------------------------------------------------

def read_split(dataset_dir: str, split: str) -> tf.data.Dataset:
    """Unbatched ``(image uint8 [S, S, 3], label int64)`` pairs of one split, in file order.

    An empty dataset for a split that was not written (ratio 0). The number of elements is known
    to tf.data (``cardinality``) and checked against the manifest while reading.
    """
    return _records(local_dataset_dir(dataset_dir, (split,)), split, shuffle_files=False, seed=None)


def make_dataset(dataset_dir: str, split: str, *, batch_size: int, training: bool, seed: int | None,
                 num_classes: int, binary_mode: bool,
                 cache_bytes: int = DEFAULT_CACHE_BYTES) -> tf.data.Dataset:
    """Batches ``(images float32 [B, S, S, 3] in 0-255, targets)`` for Keras ``fit``/``evaluate``.

    Targets are one-hot float32 [B, K] (float so that label smoothing applies), or float32 [B, 1]
    holding the label (0 or 1) in binary mode. ``training`` shuffles (seeded, a new order every
    epoch); evaluation keeps file order. The last batch may be smaller than ``batch_size``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    local = local_dataset_dir(dataset_dir, (split,))
    count = split_count(local, split)
    records = _records(local, split, shuffle_files=training, seed=seed)

    def to_target(image: tf.Tensor, label: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # An out-of-range label would silently become an all-zero one-hot row.
        check = tf.debugging.Assert(tf.logical_and(label >= 0, label < num_classes), [
            f"a label in {local}/{split} is outside 0..{num_classes - 1}; the data set and its label map "
            "disagree: re-run the conversion step. Label:", label])
        with tf.control_dependencies([check]):
            if binary_mode:
                return image, tf.cast(tf.reshape(label, [1]), tf.float32)
            return image, tf.one_hot(label, num_classes, dtype=tf.float32)

    dataset = records.map(to_target, num_parallel_calls=tf.data.AUTOTUNE)
    image_bytes = image_size(local) ** 2 * 3
    cached = count * image_bytes <= cache_bytes
    if cached:
        # Parsing is then paid once; later epochs read the parsed tensors from memory.
        dataset = dataset.cache()
    if training and count > 1:
        buffer = count if cached else max(batch_size, min(count, SHUFFLE_BUFFER_BYTES // image_bytes))
        dataset = dataset.shuffle(buffer, seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size, num_parallel_calls=tf.data.AUTOTUNE)
    # Cast a whole batch at once (one op per step); uint8 keeps the cache and shuffle buffer 4x smaller.
    dataset = dataset.map(lambda images, targets: (tf.cast(images, tf.float32), targets),
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)


def _records(local_dir: str, split: str, *, shuffle_files: bool, seed: int | None) -> tf.data.Dataset:
    """Parsed ``(image, label)`` pairs of a split from a local data set directory."""
    count = split_count(local_dir, split)
    size = image_size(local_dir)
    files = shard_files(local_dir, split)
    if count and not files:
        raise DataError(f"{_join(local_dir, MANIFEST_FILE)}: the {split} split has {count} images but no "
                        "shard files; the data set is incomplete: re-run the conversion step")
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; the "
                        "data set is incomplete: re-run the conversion step")
    if not files:
        return tf.data.Dataset.from_tensor_slices((tf.zeros([0, size, size, 3], tf.uint8),
                                                   tf.zeros([0], tf.int64)))
    if shuffle_files:
        shards = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed,
                                                                   reshuffle_each_iteration=True)
        # Several shards read at once keeps the CPU busy while one shard waits on storage, and mixes
        # the shards; the order stays a function of the seed, so runs are reproducible.
        records = shards.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), 8),
                                    num_parallel_calls=tf.data.AUTOTUNE)
    else:
        # Evaluation reads in conversion's order, so results line up with the manifest.
        records = tf.data.TFRecordDataset(files)

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, FEATURES)
        image = tf.reshape(tf.io.decode_raw(example["image/raw"], tf.uint8), [size, size, 3])
        return image, example["label"]

    dataset = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE)
    # Tells Keras the number of steps per epoch (progress, ETA) and fails loudly when the shards
    # hold a different number of records than the manifest says.
    return dataset.apply(tf.data.experimental.assert_cardinality(count))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _join(root: str, *parts: str) -> str:
    # Works for local paths and gs:// URIs alike, without importing trainer.storage.
    return "/".join([root.rstrip("/"), *parts]) if root.startswith("gs://") else os.path.join(root, *parts)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _read_json(path: str, what: str, kind: type) -> Any:
    try:
        if path.startswith("gs://"):
            from trainer import storage  # Only needed for gs:// data sets.

            data = storage.read_bytes(path)
        else:
            with open(path, "rb") as handle:
                data = handle.read()
        value = json.loads(data)
    except FileNotFoundError:
        raise DataError(f"{path}: the data set's {what} is missing; is this a directory written by the "
                        "conversion step?") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read the data set's {what} ({err.strerror or err})") from None
    except StorageError as err:
        raise DataError(f"cannot read the data set's {what}: {err}") from None
    except ValueError as err:
        raise DataError(f"{path}: the data set's {what} is not valid JSON ({err}); re-run the conversion "
                        "step") from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a JSON {kind.__name__} as the data set's {what}, got "
                        f"{type(value).__name__}")
    return value
