"""Read the converted TFRecord data set: label map, split sizes, and tf.data input pipelines.

The data set is written once by the conversion step (``trainer/data/conversion.py``); its layout is
stated in ``trainer/layout.py``::

    DATASET_DIR/train/part-NNNNN-of-MMMMM.tfrecord       (likewise validation/ and test/)
    DATASET_DIR/class_label_to_prediction_index.json     {class: index}, alphabetical
    DATASET_DIR/manifest.json                            format_version 2, classes, splits: {split: {count, ...}}

Records hold each image file's original bytes (see ``trainer/data/conversion.py`` for the decision), so
one data set serves every model size. The input pipeline decodes and resizes them with
``images.model_input`` -- the function the serving signature uses, with the model's image size and
interpolation, big JPEGs decoded scaled down by ``images.jpeg_scale`` -- several at a time (twice as
many as cores, order kept, so seeded runs repeat). Records carry the EXIF orientation serving would find
in their bytes, so training does not search for it, and a split conversion recorded as upright JPEGs
only is decoded without control flow (``images.decode_upright_jpeg_tensor``): the same pixels, a fifth
less work per photo. That happens ONCE per pipeline: the resized uint8 pixels are cached, in memory when
they fit in ``cache_bytes``, else in cache files on local disk, one per shard (``$IMGCLF_CACHE_DIR`` or
the system temp directory) when it has room, so every epoch after the first reads pixels and does no
decoding. Only when neither fits does every epoch decode again, and the log says so. After the cache
come the shuffle (training: the order of each epoch is a function of the seed and the epoch's number,
see ``make_dataset``; the first epoch streams decoded images into training as they come), batching and
prefetching; batches stay uint8 (the model casts them to float32 in its step, on the accelerator).

gs:// data sets are copied to a local cache directory, one per manifest content (so a re-conversion
into the same URI is never read from an old copy), before reading (``local_dataset_dir``) rather than
streamed through TensorFlow's GCS file system: the copy goes through
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
import weakref
from collections.abc import Callable
from typing import Any

from trainer import images, resources, storage
from trainer.errors import DataError, StorageError
from trainer.images import tf  # imported on first use (trainer.images)
from trainer.layout import (  # noqa: F401  (re-exported: the data set's contract, read through this module)
    FEATURE_ENCODED,
    FEATURE_FORMAT,
    FEATURE_LABEL,
    FEATURE_ORIENTATION,
    FEATURE_PATH,
    FORMAT_VERSION,
    LABEL_MAP_FILE,
    MANIFEST_FILE,
    MANIFEST_JPEG_SHORT_SIDE,
    SPLITS,
    check_format_version,
    read_manifest,
    read_manifest_bytes,
)

log = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    # ``FEATURES``, the parsing spec's former name, still works (built on use: it needs TensorFlow).
    if name == "FEATURES":
        return record_features()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def record_features() -> dict[str, Any]:
    """The parsing spec of the records conversion writes (trainer.layout); "path" is kept for error
    messages and evaluation, and "image/format" for tools (decode_tensor tells JPEG from PNG by the
    bytes themselves). A function, so that importing this module needs no TensorFlow."""
    return {
        FEATURE_ENCODED: tf.io.FixedLenFeature([], tf.string),
        FEATURE_FORMAT: tf.io.FixedLenFeature([], tf.string, default_value=""),
        FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
        FEATURE_PATH: tf.io.FixedLenFeature([], tf.string, default_value=""),
        # 0 (records of earlier conversions): unknown, decode_tensor searches the bytes as serving does.
        FEATURE_ORIENTATION: tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }

# A split whose resized pixels fit in this many bytes is cached in memory after its first pass;
# a larger one in a cache file on local disk.
DEFAULT_CACHE_BYTES = 1 << 30
# A disk cache must leave this much of its file system free.
CACHE_DISK_RESERVE_BYTES = 1 << 30
# The shuffle buffer holds at most this many bytes of pixels (the whole split when it is in memory).
SHUFFLE_BUFFER_BYTES = 256 << 20
# The first pass shuffles the encoded records (before decoding) in a buffer of at most this many bytes.
# Conversion already wrote every split in a seeded random order, so this buffer only makes the first
# epoch's order a function of the training seed too; it is filled before the first image is decoded
# (64 MiB held back the first batch by about 0.1 s: a tenth of a 2,000-photo epoch).
RECORD_SHUFFLE_BYTES = 2 << 20

# Where gs:// data sets are copied; one subdirectory per manifest content.
CACHE_DIR_ENV = "IMGCLF_CACHE_DIR"
_COMPLETE_MARKER = ".imgclf-complete"


# ---------------------------------------------------------------------------------------------
# The data set's metadata
# ---------------------------------------------------------------------------------------------

def read_label_map(dataset_dir: str) -> dict[str, int]:
    """The ``{class: prediction index}`` mapping written by conversion, checked to be 0..K-1."""
    path = storage.join(dataset_dir, LABEL_MAP_FILE)
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


def shard_files(dataset_dir: str, split: str) -> list[str]:
    """Paths of the split's TFRecord shards, as the manifest lists them (never from a listing, which
    could include a half-written or stale file); empty when the split was not written."""
    _check_split(split)
    names = (read_manifest(dataset_dir)["splits"].get(split) or {}).get("files", [])
    return [storage.join(dataset_dir, split, name) for name in names]


# ---------------------------------------------------------------------------------------------
# gs:// data sets
# ---------------------------------------------------------------------------------------------

def local_dataset_dir(dataset_dir: str, splits: tuple[str, ...] = SPLITS,
                      cache_dir: str | None = None) -> str:
    """A local directory holding ``dataset_dir``'s metadata and the given splits.

    Local paths are returned as they are. A gs:// URI is copied into ``cache_dir`` (default
    ``$IMGCLF_CACHE_DIR`` or the system temp directory) under a name derived from its manifest's
    content, not from the URI: a re-conversion into the same URI writes a new manifest and so gets a
    new copy, never the old shards under the new manifest. A later call with the same manifest finds
    the copy. Each split is copied into a temporary directory and renamed into place, so an
    interrupted copy is never mistaken for a complete one; the manifest is read again after the copy,
    and a change (a conversion running meanwhile) is an error rather than a mixed copy.
    """
    if not dataset_dir.startswith("gs://"):
        return dataset_dir

    root = cache_dir or os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "imgclf-cache")
    manifest_uri = storage.join(dataset_dir, MANIFEST_FILE)
    manifest_bytes = read_manifest_bytes(dataset_dir)
    digest = hashlib.sha256(manifest_bytes).hexdigest()[:24]
    local = os.path.join(root, f"dataset-{digest}")
    os.makedirs(local, exist_ok=True)
    storage.write_bytes(os.path.join(local, MANIFEST_FILE), manifest_bytes)
    storage.download_file(storage.join(dataset_dir, LABEL_MAP_FILE), os.path.join(local, LABEL_MAP_FILE))
    copied = False
    for split in splits:
        target = os.path.join(local, split)
        # The shard names come from the manifest just read, so the copy matches its key.
        remote = [storage.join(dataset_dir, split, os.path.basename(path)) for path in shard_files(local, split)]
        if os.path.exists(os.path.join(target, _COMPLETE_MARKER)) or not remote:
            continue
        log.info("Copying %d shards of the %s split of %s to %s", len(remote), split, dataset_dir, target)
        staging = tempfile.mkdtemp(prefix=f".{split}-", dir=local)
        try:
            with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
                # list() re-raises the first failed download.
                targets = [os.path.join(staging, uri.rsplit("/", 1)[-1]) for uri in remote]
                list(pool.map(storage.download_file, remote, targets))
            if read_manifest_bytes(dataset_dir) != manifest_bytes:
                raise DataError(f"{manifest_uri} changed while its shards were copied (a conversion into "
                                f"{dataset_dir} ran meanwhile); the copy is discarded: run the step again")
            open(os.path.join(staging, _COMPLETE_MARKER), "w").close()
            shutil.rmtree(target, ignore_errors=True)
            os.replace(staging, target)
            copied = True
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    if not copied:
        log.info("Reading %s from its local copy %s (same manifest)", dataset_dir, local)
    return local


# ---------------------------------------------------------------------------------------------
# tf.data pipelines
# ---------------------------------------------------------------------------------------------

def read_split(dataset_dir: str, split: str, *, image_size: int, interpolation: str) -> tf.data.Dataset:
    """Unbatched ``(image uint8 [S, S, 3], label int64)`` pairs of one split, in file order.

    Each image is decoded and resized as the serving signature does it (``images.decode_tensor``,
    then ``images.resize_image`` to ``image_size`` with ``interpolation``), several at a time. Not
    cached: this is for reading a split once (evaluation). An empty dataset for a split that was not
    written (ratio 0). The number of elements is known to tf.data (``cardinality``) and checked
    against the manifest while reading.
    """
    _check_resize(image_size, interpolation)
    local = local_dataset_dir(dataset_dir, (split,))
    return _pipeline_options(_records(local, split, shuffle_files=False, seed=None,
                                      then=_decoder(image_size, interpolation, local, split)))


def read_examples(dataset_dir: str, split: str, indices: set[int] | list[int], *, image_size: int,
                  interpolation: str) -> dict[int, tuple[Any, int]]:
    """``{index: (pixels uint8 [S, S, 3] numpy, label)}`` for the split's examples at ``indices`` (their
    positions in ``read_split``'s order), decoded and resized as ``read_split`` does. Only those records
    are decoded (the others are read and parsed, which costs a fraction of a decode), so the evaluation
    report's few gallery pictures do not cost a second pass of decoding over the whole split."""
    _check_resize(image_size, interpolation)
    found: dict[int, tuple[Any, int]] = {}
    if not indices:
        return found
    local = local_dataset_dir(dataset_dir, (split,))
    wanted = tf.constant(sorted(set(indices)), tf.int64)
    decode = _decoder(image_size, interpolation, local, split)
    records = _records(local, split, shuffle_files=False, seed=None).enumerate()
    chosen = records.filter(lambda index, record: tf.reduce_any(tf.equal(index, wanted)))
    pixels = chosen.map(lambda index, record: (index, *decode(record[0], record[1], tf.constant(0, tf.int64))),
                        num_parallel_calls=_decode_calls(), deterministic=True)
    for index, image, label in _pipeline_options(pixels).as_numpy_iterator():
        found[int(index)] = (image, int(label))
    return found


def make_dataset(dataset_dir: str, split: str, *, batch_size: int, training: bool, seed: int | None,
                 num_classes: int, binary_mode: bool, image_size: int, interpolation: str,
                 cache_bytes: int = DEFAULT_CACHE_BYTES, epoch: tf.Variable | None = None) -> tf.data.Dataset:
    """Batches ``(images uint8 [B, S, S, 3], targets)`` for Keras ``fit``/``evaluate`` (the model takes
    float32 RGB 0-255 and casts the uint8 pixels itself, in its step: see ``to_inputs`` below).

    Images are decoded and resized to ``image_size`` with ``interpolation`` (as ``read_split``) during
    the first pass, and the resized uint8 pixels cached (see the module docstring), so later passes
    do no decoding. Targets are one-hot float32 [B, K] (float so that label smoothing applies), or
    float32 [B, 1] holding the label (0 or 1) in binary mode. Evaluation keeps file order; the last
    batch may be smaller than ``batch_size``.

    ``training`` shuffles, and the order of every epoch is a function of ``seed`` and the epoch's number
    alone, so a run resumed at epoch k feeds epoch k exactly as an uninterrupted run does:

    * The first pass reads the shards in a seeded order and shuffles the small encoded records (a
      buffer of ``RECORD_SHUFFLE_BYTES``) before decoding; the decoded pixels stream into training as
      they come (no buffer of pixels waits for the whole split), and are cached in that order.
    * Epoch 0 takes them in that order. Every other epoch shuffles the cached pixels (the whole split
      when it is in memory) with a seed drawn from ``(seed, epoch)``.

    ``epoch``: an int64 variable (``epoch_variable()``) holding the number of the epoch whose pass
    starts next; each pass reads it and adds one, so the passes are epochs 0, 1, 2, ... unless it is
    set: training sets it once, to the first epoch of its ``fit`` (k in a run resumed at epoch k).
    (Keras starts an epoch's pass before that epoch's callbacks run, so it is set only once.)
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    _check_resize(image_size, interpolation)
    local = local_dataset_dir(dataset_dir, (split,))
    count = split_count(local, split)
    shuffled = training and count > 1
    if seed is None and shuffled:
        seed = int.from_bytes(os.urandom(4), "little")
    where, folder = _cache_place(f"{local}/{split}", count, image_size, cache_bytes)
    dataset = _records(local, split, shuffle_files=shuffled, seed=seed,
                       then=_decoder(image_size, interpolation, local, split),
                       record_buffer=_record_buffer(local, split, count) if shuffled else 0, cache_folder=folder)
    image_bytes = image_size * image_size * 3
    if where == "memory":
        dataset = dataset.cache()
    elif where == "disk":
        # Iterators keep their dataset alive, so the folder outlives every reader of the cache.
        weakref.finalize(dataset, shutil.rmtree, folder, ignore_errors=True)
    if where != "none" and not shuffled:
        dataset = _read_ahead(dataset, count)
    if shuffled:
        buffer = count if where == "memory" else max(batch_size, min(count, SHUFFLE_BUFFER_BYTES // image_bytes))
        # The pass that fills the cache is not shuffled again (a buffer of 2 gives the elements out nearly
        # in order, and has read the end of the cache's input before it gives out the last one: see _cache_place).
        first_buffer = buffer if where == "none" else 2
        dataset = _epoch_shuffle(dataset, count, seed, buffer, first_buffer,
                                 epoch if epoch is not None else epoch_variable())
    dataset = dataset.batch(batch_size)

    def to_inputs(images_batch: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # An out-of-range label would silently become an all-zero one-hot row. (The Assert op itself:
        # tf.debugging.Assert wraps it in a tf.cond, whose control flow costs every new iterator time.)
        check = tf.raw_ops.Assert(condition=tf.reduce_all(tf.logical_and(labels >= 0, labels < num_classes)), data=[
            f"a label in {local}/{split} is outside 0..{num_classes - 1}; the data set and its label map "
            "disagree: re-run the conversion step. Labels:", labels])
        with tf.control_dependencies([check]):
            if binary_mode:
                targets = tf.cast(tf.reshape(labels, [-1, 1]), tf.float32)
            else:
                targets = tf.one_hot(labels, num_classes, dtype=tf.float32)
        # The pixels stay uint8: the model casts them to its float32 input inside the training step
        # (Keras converts a functional model's inputs to its Input's dtype), on the accelerator, so the
        # host does not write a float copy of every batch and the bus carries a quarter of the bytes.
        return images_batch, targets

    dataset = dataset.map(to_inputs)
    return _pipeline_options(dataset.prefetch(tf.data.AUTOTUNE))


def epoch_variable() -> tf.Variable:
    """The epoch counter ``make_dataset`` reads at the start of each training pass (int64, on the CPU)."""
    with tf.device("/cpu:0"):
        return tf.Variable(0, dtype=tf.int64, trainable=False, name="imgclf_input_epoch")


def _epoch_shuffle(cached: tf.data.Dataset, count: int, seed: int, buffer: int, first_buffer: int,
                   epoch: tf.Variable) -> tf.data.Dataset:
    """Each pass of ``cached`` shuffled for its epoch: epoch 0 with ``first_buffer``, others with
    ``buffer``, seeded from ``(seed, epoch)`` (never from how many passes this process has made)."""
    base = tf.constant(seed, tf.int64)
    specs = tf.nest.flatten(cached.element_spec)

    def one_pass(_: tf.Tensor) -> tf.data.Dataset:
        number = epoch.assign_add(1, read_value=True) - 1
        seeds = tf.random.stateless_uniform([2], seed=tf.stack([base, number]), minval=None, maxval=None,
                                            dtype=tf.int64)
        size = tf.where(number == 0, tf.constant(first_buffer, tf.int64), tf.constant(buffer, tf.int64))
        # Dataset.shuffle's seed cannot be a tensor when TensorFlow's global seed is 0 (its seed helper then
        # compares the tensor in Python), so its op is called as shuffle calls it, with both seeds given
        # (an odd second seed: 0 and 0 would mean "random").
        variant = tf.raw_ops.ShuffleDatasetV3(
            input_dataset=tf.data.experimental.to_variant(cached), buffer_size=size, seed=seeds[0],
            seed2=tf.bitwise.bitwise_or(seeds[1], 1), seed_generator=tf.raw_ops.DummySeedGenerator(),
            output_types=[spec.dtype for spec in specs], output_shapes=[spec.shape for spec in specs],
            reshuffle_each_iteration=False)
        return tf.data.experimental.from_variant(variant, cached.element_spec)

    passes = tf.data.Dataset.from_tensors(tf.constant(0, tf.int64)).flat_map(one_pass)
    return passes.apply(tf.data.experimental.assert_cardinality(count))


def _check_resize(image_size: int, interpolation: str) -> None:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive whole number of pixels, got {image_size!r}")
    if interpolation not in images.RESIZE_METHODS:
        raise ValueError(f"unknown image_resize_interpolation {interpolation!r}; use one of "
                         f"{', '.join(images.RESIZE_METHODS)}")


def _records(local_dir: str, split: str, *, shuffle_files: bool, seed: int | None,
             then: Callable[[tf.Tensor, tf.Tensor, tf.Tensor], Any] | None = None,
             record_buffer: int = 0, cache_folder: str | None = None) -> tf.data.Dataset:
    """``(encoded image, label)`` pairs of a split from a local data set directory, parsed; or, with
    ``then``, what ``then(encoded, label, orientation)`` returns for them (orientation: the record's
    EXIF orientation, 0 when unknown), computed with the parsing in one parallel map (each map stage
    costs every element a function call and a hand-over between threads).

    ``shuffle_files``: the shards in an order drawn from ``seed`` (the same on every pass), several
    read at once, and the records shuffled in a buffer of ``record_buffer`` records (when above 1).

    ``cache_folder`` (with ``then``): what ``then`` returns is cached on disk there, one cache file per
    shard, the shards read one after the other (each shuffled in its own buffer). tf.data's cache file
    keeps an index entry per element in memory until the file is complete (about 1.3 KB an element,
    ``benchmarks/cache_index_memory.py``: 367 MiB for 300,000 in one file), so one file for a split would hold memory in
    proportion to the split; one per shard holds it to a shard's images (conversion caps those)."""
    count = split_count(local_dir, split)
    files = shard_files(local_dir, split)
    if count and not files:
        raise DataError(f"{storage.join(local_dir, MANIFEST_FILE)}: the {split} split has {count} images but no "
                        "shard files; the data set is incomplete: re-run the conversion step")
    missing = [path for path in files if not os.path.isfile(path)]
    if missing:
        raise DataError(f"{len(missing)} shard(s) listed in the manifest are missing, e.g. {missing[0]}; the "
                        "data set is incomplete: re-run the conversion step")
    if not files:
        empty = tf.data.Dataset.from_tensor_slices((tf.zeros([0], tf.string), tf.zeros([0], tf.int64)))
        return empty.map(lambda encoded, label: then(encoded, label, tf.constant(0, tf.int64))) if then else empty
    features = record_features()
    wanted = {key: features[key] for key in (FEATURE_ENCODED, FEATURE_LABEL, FEATURE_ORIENTATION)}

    def parse(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        example = tf.io.parse_single_example(record, wanted)
        return example[FEATURE_ENCODED], example[FEATURE_LABEL], example[FEATURE_ORIENTATION]

    if cache_folder is not None and then is not None:
        order = tf.data.Dataset.from_tensor_slices(files)
        if shuffle_files:
            order = order.shuffle(len(files), seed=seed, reshuffle_each_iteration=False)

        def shard(path: tf.Tensor) -> tf.data.Dataset:
            records = tf.data.TFRecordDataset(path)
            if shuffle_files and record_buffer > 1:
                records = records.shuffle(record_buffer, seed=seed, reshuffle_each_iteration=False)
            decoded = records.map(lambda record: then(*parse(record)), num_parallel_calls=_decode_calls(),
                                  deterministic=True)
            # A later pass finds the file complete and reads it; the shard is then not read at all.
            return decoded.cache(tf.strings.join([cache_folder, "/", tf.strings.split(path, "/")[-1]]))

        return order.flat_map(shard).apply(tf.data.experimental.assert_cardinality(count))
    if shuffle_files:
        if len(files) == 1:
            records = tf.data.TFRecordDataset(files)
        else:
            order = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), seed=seed,
                                                                      reshuffle_each_iteration=False)
            # Several shards read at once keep the CPU busy while one waits on a network volume, and mix
            # the shards; the order stays a function of the seed, so runs are reproducible.
            records = order.interleave(tf.data.TFRecordDataset, cycle_length=min(len(files), _READ_CALLS),
                                       num_parallel_calls=min(len(files), _READ_CALLS), deterministic=True)
        if record_buffer > 1:
            # Encoded records are small next to their pixels: shuffling them here varies the first epoch
            # with the seed without a buffer of decoded images that would wait for the whole split.
            records = records.shuffle(record_buffer, seed=seed, reshuffle_each_iteration=False)
    else:
        # Evaluation reads in conversion's order, so results line up with the manifest.
        records = tf.data.TFRecordDataset(files)

    if then:
        # Parsing and decoding in one function: one parallel stage, one hand-over between threads.
        dataset = records.map(lambda record: then(*parse(record)), num_parallel_calls=_decode_calls(),
                              deterministic=True)
    else:
        dataset = records.map(lambda record: parse(record)[:2])
    # Tells Keras the number of steps per epoch (progress, ETA) and fails loudly when the shards
    # hold a different number of records than the manifest says.
    return dataset.apply(tf.data.experimental.assert_cardinality(count))


def _pipeline_options(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """``dataset`` without tf.data's autotuning thread, and run by a thread pool of its own sized to the cores
    a cgroup quota allows when the quota allows fewer than the CPU affinity shows.

    Autotuning: every iterator of an autotuned pipeline starts a thread that wakes up to re-tune after 10 ms,
    then after 20, 40, ... ms (10 * (2**k - 1) ms after the start). Keras ends a training epoch after its
    steps, before the iterator reaches the data's end, and deleting such an iterator could wait for that
    thread's next wake-up: measured here, deleting a partly read iterator took 0.9 s and ended 5.12-5.17 s
    after its start (the wake-up at 5.11 s), and training epochs of 5-7 s of work took exactly 10.24 s (62.5
    images/s for 640 images; 20.5 and 41.0 s on a busier machine, the wake-ups at 20.47 and 40.95 s). Every
    stage here has its parallelism set (decoding: ``_decode_calls``; reading shards: ``_READ_CALLS``; the
    prefetch buffer grows on its own), so nothing is left for the tuner.

    Quota: a pod limited to 8 CPUs of a 96-core node: tf.data sizes its shared pool by the affinity, and 96
    threads under an 8-CPU quota are throttled in bursts.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    cores = resources.available_cores()
    if cores < resources.affinity_cores():
        options.threading.private_threadpool_size = cores
    return dataset.with_options(options)


# Shards read at once by a training pipeline (at most; a split with fewer shards reads them all at once).
_READ_CALLS = 8


def _decode_calls() -> int:
    """Images decoded at once: twice the cores this process may use (at least 4).

    The map keeps the records' order (so a seeded run repeats), and tf.data holds at most as many
    finished images as calls in flight. With AUTOTUNE that is at most one per core, so a photo that
    takes longer to decode than the next one leaves a core idle until it is done; a few calls more
    than cores keep every core decoding (first epochs about 7% faster on 2 cores, in 25 alternating
    runs of each), at the cost of a few decoded images held in memory.
    """
    return max(4, 2 * resources.available_cores())


def _record_buffer(local_dir: str, split: str, count: int) -> int:
    """How many encoded records of the split fit in ``RECORD_SHUFFLE_BYTES`` (at least 2)."""
    total = sum(os.path.getsize(path) for path in shard_files(local_dir, split))
    return max(2, min(count, RECORD_SHUFFLE_BYTES * count // max(total, 1)))


def _upright_jpegs(local_dir: str, split: str) -> bool:
    """Whether conversion recorded the split as JPEGs only, none of them turned by its EXIF orientation
    (the manifest's per-split "formats" and "turned"; absent from earlier conversions' manifests)."""
    info = read_manifest(local_dir)["splits"].get(split) or {}
    formats = info.get("formats")
    return isinstance(formats, dict) and formats.get("png") == 0 and info.get("turned") == 0


def _any_scaled_jpeg(local_dir: str, split: str, image_size: int) -> bool:
    """Whether ``images.jpeg_scale`` may scale a JPEG of the split at ``image_size``: its largest JPEG's
    shorter side, as conversion recorded it, is large enough (unknown, in earlier manifests: it may)."""
    info = read_manifest(local_dir)["splits"].get(split) or {}
    side = info.get(MANIFEST_JPEG_SHORT_SIDE)
    if not isinstance(side, int) or isinstance(side, bool):
        return True
    return int(images.jpeg_scale(side, side, image_size)) > 1


def _decoder(image_size: int, interpolation: str, local_dir: str, split: str) -> Callable[
        [tf.Tensor, tf.Tensor, tf.Tensor], tuple[tf.Tensor, tf.Tensor]]:
    """``(encoded, label, orientation)`` -> ``(uint8 [S, S, 3], label)``: the serving signature's
    ``images.model_input`` (the record's orientation, when known, spares the search of the bytes for it:
    the same value serving finds, see ``images.decode_tensor``). When conversion recorded ``split`` of the
    data set in ``local_dir`` as upright JPEGs only, every record is decoded as one
    (``images.decode_upright_jpeg_tensor``: the same pixels, without control flow); when no JPEG of the
    split is large enough to be decoded scaled down, none is asked about its size (the same pixels again).

    Run inside ``_records``' parallel map, deterministic (the order of the records is kept), so a
    seeded run repeats.
    """
    upright_jpegs = _upright_jpegs(local_dir, split)
    scaled = _any_scaled_jpeg(local_dir, split, image_size)

    def decode(encoded: tf.Tensor, label: tf.Tensor, orientation: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        pixels = images.model_input(encoded, image_size, interpolation, orientation, upright_jpeg=upright_jpegs,
                                    scaled=scaled)
        return pixels, label

    return decode


def _cache_place(name: str, count: int, image_size: int, cache_bytes: int) -> tuple[str, str | None]:
    """Where the decoded pixels of the first pass are cached: ``("memory", None)``, ``("disk", folder)``
    or ``("none", None)``.

    In memory when ``count`` images fit in ``cache_bytes``; else in cache files (one per shard, see
    ``_records``) in a new temporary folder on local disk (removed when the dataset is garbage-collected
    or the process ends) when that file system keeps ``CACHE_DISK_RESERVE_BYTES`` free; else not at all,
    which is logged.

    A cached pipeline that is not shuffled needs ``_read_ahead``: tf.data completes a cache only once its
    input has reported its end, and Keras starts the next epoch's iterator as soon as it has taken an
    epoch's last batch. Without a shuffle buffer (which reads to the end before giving out its last
    elements) that end could come too late: a memory cache would then be dropped and refilled, and a
    second writer of a cache file fails ("concurrent caching iterator").
    """
    if count == 0:
        return "memory", None
    needed = count * image_size * image_size * 3
    if needed <= cache_bytes:
        log.info("%s: %d images of %d px are decoded once, in the first pass, and kept in memory (%.0f MiB)",
                 name, count, image_size, needed / 2**20)
        return "memory", None
    root = os.environ.get(CACHE_DIR_ENV) or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free - needed < CACHE_DISK_RESERVE_BYTES:
        log.warning("%s: not caching the decoded images: %d images of %d px need %.1f GiB, more than "
                    "cache_bytes (%.1f GiB) and than %s can spare (%.1f GiB free); every epoch decodes and "
                    "resizes them again. Set %s to a larger local disk to cache them there", name, count,
                    image_size, needed / 2**30, cache_bytes / 2**30, root, free / 2**30, CACHE_DIR_ENV)
        return "none", None
    folder = tempfile.mkdtemp(prefix="imgclf-pixels-", dir=root)
    log.info("%s: %d images of %d px are decoded once, in the first pass, and cached in %s (%.1f GiB)",
             name, count, image_size, folder, needed / 2**30)
    # When it completes a file, tf.data logs "The calling iterator did not fully read the dataset
    # being cached ... will be discarded": a false alarm (its writer looks for its pre-merge file
    # name once the files are merged). Nothing is discarded; later epochs read the files.
    return "disk", folder


def _read_ahead(dataset: tf.data.Dataset, count: int) -> tf.data.Dataset:
    """The same elements in the same order, each given out only once the next one (or the end) has
    been read from ``dataset``; so ``dataset`` has reported its end before its last element leaves."""
    image_spec, label_spec = dataset.element_spec
    placeholder = (tf.zeros(image_spec.shape, image_spec.dtype), tf.constant(-1, label_spec.dtype))

    def delay(previous, current):
        # Keep the current element; give out the one before it, flagged with whether there was one.
        (image, label), real = previous
        return (current, True), (image, label, real)

    def is_real(image, label, real):
        return real

    def without_flag(image, label, real):
        return image, label

    # The placeholder appended at the end pushes the last element out; the one given out first is dropped.
    delayed = dataset.concatenate(tf.data.Dataset.from_tensors(placeholder)).scan((placeholder, False), delay)
    delayed = delayed.filter(is_real).map(without_flag)
    return delayed.apply(tf.data.experimental.assert_cardinality(count))


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def _read_json(path: str, what: str, kind: type) -> Any:
    try:
        value = json.loads(storage.read_bytes(path))
    except StorageError as err:
        if not storage.is_gcs(path) and not os.path.exists(path):
            raise DataError(f"{path}: the data set's {what} is missing; is this a directory written by the "
                            "conversion step?") from None
        raise DataError(f"cannot read the data set's {what}: {err}") from None
    except ValueError as err:
        raise DataError(f"{path}: the data set's {what} is not valid JSON ({err}); re-run the conversion "
                        "step") from None
    if not isinstance(value, kind):
        raise DataError(f"{path}: expected a JSON {kind.__name__} as the data set's {what}, got "
                        f"{type(value).__name__}")
    return value
