"""Tests for trainer.data.reader: metadata readers and the tf.data input pipelines over converted shards.

``write_dataset`` / ``write_arrays`` write a data set in the pinned conversion format (version 2:
records hold encoded image files) without going through trainer.data.conversion, so these tests (and the
training, evaluation and other tests that import them) depend only on the format. They store each
uint8 array as a lossless PNG, so a split read back at the arrays' own size gives the arrays exactly
(resizing to the same size is the identity for the usual methods).
"""

from __future__ import annotations

import gc
import io
import json
import logging
import os
import types

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tests.support import datasets as ds
from trainer import images
from trainer.data import reader
from trainer.errors import DataError

COLOURS = {"blue": (30, 40, 210), "green": (40, 200, 50), "red": (220, 30, 40), "yellow": (230, 220, 30)}


def colour_images(classes: tuple[str, ...], count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` noisy images whose dominant colour is their class's (easy to learn in an epoch or two)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % len(classes)
    rng.shuffle(labels)
    base = np.array([COLOURS[c] for c in classes], dtype=np.float32)[labels]
    pixels = base[:, None, None, :] + rng.normal(0, 25, (count, size, size, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8), labels.astype(np.int64)


def write_arrays(root: str, classes: tuple[str, ...], splits: dict[str, tuple[np.ndarray, np.ndarray]], *,
                 shards: int = 2) -> str:
    """Write uint8 images [N, H, W, 3] (as PNG files) and labels per split as conversion would; returns ``root``."""
    return write_files(root, classes, {split: ([_png(image) for image in pixels], labels)
                                       for split, (pixels, labels) in splits.items()}, shards=shards)


def write_files(root: str, classes: tuple[str, ...], splits: dict[str, tuple[list[bytes], np.ndarray]], *,
                shards: int = 2, orientation: bool = False) -> str:
    """Write encoded JPEG/PNG files and labels per split as conversion would; returns ``root``.

    ``orientation``: as the current conversion, with each record's EXIF orientation and the split's
    "formats" and "turned" counts in the manifest (else as earlier conversions, without them)."""
    info = {}
    for split in reader.SPLITS:
        blobs, labels = splits.get(split, ([], np.zeros(0, np.int64)))
        labels = np.asarray(labels, np.int64)
        files = []
        if len(labels):
            os.makedirs(os.path.join(root, split), exist_ok=True)
            parts = min(shards, len(labels))
            for part, indices in enumerate(np.array_split(np.arange(len(labels)), parts)):
                name = f"part-{part:05d}-of-{parts:05d}.tfrecord"
                with tf.io.TFRecordWriter(os.path.join(root, split, name)) as writer:
                    for i in indices:
                        writer.write(example(blobs[i], int(labels[i]), f"{classes[labels[i]]}/{split}-{i}",
                                             images.tensorflow_orientation(blobs[i]) if orientation else None))
                files.append(name)
        info[split] = {"count": int(len(labels)),
                       "class_counts": {c: int(np.sum(labels == k)) for k, c in enumerate(classes)},
                       "bytes": sum(len(b) for b in blobs), "files": files}
        if orientation:
            jpegs = sum(blob[:2] == b"\xff\xd8" for blob in blobs)
            info[split]["formats"] = {"jpeg": jpegs, "png": len(blobs) - jpegs}
            info[split]["turned"] = sum(images.tensorflow_orientation(blob) != 1 for blob in blobs)
    with open(os.path.join(root, reader.LABEL_MAP_FILE), "w") as handle:
        json.dump({c: k for k, c in enumerate(classes)}, handle)
    manifest = {"format_version": reader.FORMAT_VERSION, "classes": list(classes), "num_classes": len(classes),
                "splits": info}
    with open(os.path.join(root, reader.MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle)
    return root


def write_dataset(root: str, *, classes: tuple[str, ...] = ("blue", "green", "red"), size: int = 16,
                  counts: dict[str, int] | None = None, shards: int = 2, seed: int = 0) -> str:
    """A small colour-coded data set (default 48 train / 12 validation / 6 test PNGs of 16 px)."""
    counts = {"train": 48, "validation": 12, "test": 6} if counts is None else counts
    splits = {split: colour_images(classes, n, size, seed + i) for i, (split, n) in enumerate(counts.items()) if n}
    return write_arrays(str(root), classes, splits, shards=shards)


def example(blob: bytes, label: int, stem: str, orientation: int | None = None) -> bytes:
    """One record as conversion writes it; ``stem`` + the format's extension is its path."""
    fmt = b"jpeg" if blob[:2] == b"\xff\xd8" else b"png"
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[blob])),
        "image/format": tf.train.Feature(bytes_list=tf.train.BytesList(value=[fmt])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{stem}.{fmt.decode()}".encode()])),
    }
    if orientation is not None:
        feature["image/orientation"] = tf.train.Feature(int64_list=tf.train.Int64List(value=[orientation]))
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _png(pixels: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


# ---------------------------------------------------------------------------------------------

@pytest.fixture
def arrays():
    classes = ("blue", "green", "red")
    return classes, {"train": colour_images(classes, 10, 8, 1), "validation": colour_images(classes, 5, 8, 2)}


@pytest.fixture
def dataset(tmp_path, arrays):
    classes, splits = arrays
    return write_arrays(str(tmp_path / "ds"), classes, splits, shards=3)


PIXELS = {"image_size": 8, "interpolation": "bilinear"}  # the arrays' own size: read back unchanged


def make(dataset, split="train", **kwargs):
    options = {"batch_size": 4, "training": False, "seed": None, "num_classes": 3, "binary_mode": False,
               **PIXELS, **kwargs}
    return reader.make_dataset(dataset, split, **options)


def test_metadata(dataset):
    assert reader.read_label_map(dataset) == {"blue": 0, "green": 1, "red": 2}
    assert reader.split_count(dataset, "train") == 10
    assert reader.split_count(dataset, "validation") == 5
    assert reader.split_count(dataset, "test") == 0
    assert [os.path.basename(p) for p in reader.shard_files(dataset, "train")] == [
        "part-00000-of-00003.tfrecord", "part-00001-of-00003.tfrecord", "part-00002-of-00003.tfrecord"]


def test_read_split_decodes_the_stored_images_and_labels_in_file_order(dataset, arrays):
    _, splits = arrays
    ds = reader.read_split(dataset, "train", **PIXELS)
    assert ds.element_spec == (tf.TensorSpec([8, 8, 3], tf.uint8), tf.TensorSpec([], tf.int64))
    assert int(ds.cardinality()) == 10
    got = list(ds.as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), splits["train"][0])
    np.testing.assert_array_equal([g[1] for g in got], splits["train"][1])


def test_read_examples_decodes_only_the_records_asked_for(tmp_path, arrays):
    """The same pixels and labels as read_split at those positions; a record that cannot be decoded
    elsewhere in the split is never decoded (read_split fails on it)."""
    classes, splits = arrays
    blobs = [_png(image) for image in splits["train"][0]]
    blobs[4] = b"not an image"
    root = write_files(str(tmp_path / "ds"), classes, {"train": (blobs, splits["train"][1])}, shards=3)
    got = reader.read_examples(root, "train", {0, 7, 9}, **PIXELS)
    assert sorted(got) == [0, 7, 9]
    for index, (image, label) in got.items():
        np.testing.assert_array_equal(image, splits["train"][0][index])
        assert label == splits["train"][1][index]
    assert reader.read_examples(root, "train", set(), **PIXELS) == {}
    with pytest.raises(tf.errors.InvalidArgumentError):
        list(reader.read_split(root, "train", **PIXELS))


def test_one_data_set_serves_every_image_size_and_method(dataset, arrays):
    """Records hold files, so the model's size and resize method are chosen when reading."""
    _, splits = arrays
    for size, method in [(5, "bilinear"), (12, "area"), (8, "nearest")]:
        got = np.stack([image for image, _ in reader.read_split(dataset, "train", image_size=size,
                                                             interpolation=method).as_numpy_iterator()])
        expected = np.stack([images.resize_image(a, size, method).numpy() for a in splits["train"][0]])
        np.testing.assert_array_equal(got, expected)


def test_training_pixels_are_the_pillow_decoders_resized(tmp_path):
    """What training reads is ``resize_image(decode_image(file))``, the pixels validation checked and
    the Python prediction path computes, for JPEG and PNG of every colour mode, EXIF-rotated or not."""
    rgba = np.dstack([ds.noise(30, 40, seed=3), np.random.default_rng(4).integers(0, 256, (30, 40), np.uint8)])
    files = {
        "photo.jpg": ds.encode(ds.noise(30, 40, seed=1), "JPEG", quality=90),
        "subsampled.jpg": ds.encode(ds.noise(37, 29, seed=2), "JPEG", quality=75, subsampling=2),
        "sideways.jpg": ds.exif_bytes(ds.halves(20, 40), 6),
        "mirrored.png": ds.exif_bytes(ds.noise(20, 30, seed=5), 5, "PNG"),
        "cmyk.jpg": ds.cmyk_jpeg(ds.noise(30, 40, seed=6)),
        "rgb.png": ds.encode(ds.noise(30, 40, seed=7), "PNG"),
        "rgba.png": ds.encode(rgba, "PNG"),
        "palette.png": ds.palette_with_transparency(),
        "gray16.png": ds.png16_gray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50),
    }
    names = sorted(files)
    root = write_files(str(tmp_path), ("a", "b"), {"train": ([files[n] for n in names], [0] * len(names))},
                       shards=2)
    for size, method in [(16, "bilinear"), (24, "area")]:
        got = [image for image, _ in make(root, batch_size=4, image_size=size, interpolation=method,
                                          num_classes=2).unbatch().as_numpy_iterator()]
        for name, image in zip(names, got, strict=True):
            expected = images.resize_image(images.decode_image(files[name], name), size, method).numpy()
            np.testing.assert_array_equal(image, expected.astype(np.float32), err_msg=name)


def _serving_pixels(blob: bytes, size: int, method: str) -> np.ndarray:
    # What the exported serving function computes from a client's bytes (trainer.train.export.serving_function).
    return images.resize_image(images.decode_tensor(tf.constant(blob)), size, method).numpy()


@pytest.mark.parametrize("kind", ["mixed", "upright_jpegs", "unknown_orientation"])
def test_training_pixels_from_records_equal_the_serving_functions(tmp_path, kind):
    """Records as conversion writes them now carry the orientation serving would find, and a split of
    upright JPEGs is decoded without dispatching on format or orientation; either way training gets the
    serving function's pixels (which search the bytes): rotated and upright, JPEG and PNG. Records
    without the orientation (earlier conversions) are searched as serving does."""
    upright = {
        "photo.jpg": ds.encode(ds.noise(30, 40, seed=1), "JPEG", quality=90),
        "subsampled.jpg": ds.encode(ds.noise(37, 29, seed=2), "JPEG", quality=75, subsampling=2),
        "tagged_upright.jpg": ds.exif_bytes(ds.noise(20, 30, seed=8), 1),
        "cmyk.jpg": ds.cmyk_jpeg(ds.noise(30, 40, seed=6)),
    }
    turned = {
        "sideways.jpg": ds.exif_bytes(ds.halves(20, 40), 6),
        "flipped.jpg": ds.exif_bytes(ds.noise(24, 18, seed=9), 3),
        "mirrored.png": ds.exif_bytes(ds.noise(20, 30, seed=5), 5, "PNG"),
        "rgb.png": ds.encode(ds.noise(30, 40, seed=7), "PNG"),
        "palette.png": ds.palette_with_transparency(),
    }
    files = upright if kind == "upright_jpegs" else {**upright, **turned}
    names = sorted(files)
    root = write_files(str(tmp_path), ("a", "b"), {"train": ([files[n] for n in names], [0] * len(names))},
                       shards=2, orientation=kind != "unknown_orientation")
    assert reader._upright_jpegs(root, "train") == (kind == "upright_jpegs")
    for size, method in [(16, "bilinear"), (24, "area")]:
        got = [image for image, _ in make(root, batch_size=4, image_size=size, interpolation=method,
                                          num_classes=2).unbatch().as_numpy_iterator()]
        for name, image in zip(names, got, strict=True):
            np.testing.assert_array_equal(image, _serving_pixels(files[name], size, method).astype(np.float32),
                                          err_msg=name)


def test_absent_split_is_empty(dataset):
    ds = reader.read_split(dataset, "test", **PIXELS)
    assert ds.element_spec[0].shape == (8, 8, 3)
    assert list(ds) == []


def test_make_dataset_batches_uint8_images_and_one_hot_targets(dataset, arrays):
    """Pixels stay uint8 (the model casts them in its step); targets are float for label smoothing."""
    _, splits = arrays
    batches = list(make(dataset, "validation", batch_size=2).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    pixels = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    assert pixels.dtype == np.uint8 and targets.dtype == np.float32
    np.testing.assert_array_equal(pixels, splits["validation"][0])
    np.testing.assert_array_equal(targets, np.eye(3)[splits["validation"][1]])


@pytest.mark.parametrize("quota, private_pool", [(1, 1), (4, None)], ids=["quota-below-affinity", "no-quota"])
def test_a_cpu_quota_below_the_affinity_gets_a_thread_pool_of_its_size(dataset, arrays, monkeypatch, quota,
                                                                        private_pool):
    """In a pod whose CPU limit is below the cores it may be scheduled on, the pipelines run their own
    pool of that many threads instead of tf.data's pool sized by the affinity (and still read everything)."""
    monkeypatch.setattr(reader.resources, "affinity_cores", lambda: 4)
    monkeypatch.setattr(reader.resources, "available_cores", lambda: quota)
    for pipeline in (make(dataset, "validation", batch_size=5, training=True, seed=1),
                     reader.read_split(dataset, "validation", **PIXELS)):
        assert pipeline.options().threading.private_threadpool_size == private_pool
        # No autotuning thread, whose wake-ups a deleted iterator could wait for (see reader._pipeline_options).
        assert pipeline.options().autotune.enabled is False
    pixels = next(iter(make(dataset, "validation", batch_size=5)))[0].numpy()
    np.testing.assert_array_equal(pixels, arrays[1]["validation"][0])


def test_binary_targets_are_a_column_of_labels(tmp_path):
    classes = ("cat", "dog")
    pixels, labels = colour_images(("blue", "red"), 6, 8, 0)
    root = write_arrays(str(tmp_path), classes, {"train": (pixels, labels)})
    _, targets = next(iter(make(root, batch_size=6, num_classes=2, binary_mode=True)))
    assert targets.shape == (6, 1) and targets.dtype == tf.float32
    np.testing.assert_array_equal(targets.numpy()[:, 0], labels)


def _order(ds) -> list[int]:
    # The first pixel identifies an image (random noise on top of the class colour).
    return [tuple(px) for batch in ds.as_numpy_iterator() for px in batch[0][:, 0, 0, :]]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """Where disk caches go during the test."""
    folder = tmp_path / "cache"
    monkeypatch.setenv(reader.CACHE_DIR_ENV, str(folder))
    return folder


@pytest.mark.parametrize("cache_bytes", [reader.DEFAULT_CACHE_BYTES, 0], ids=["memory", "disk"])
def test_training_order_is_seeded_reshuffled_each_epoch_and_complete(dataset, cache_bytes, cache_dir):
    def shuffled(seed):
        return make(dataset, training=True, seed=seed, cache_bytes=cache_bytes)

    ds = shuffled(7)
    first, second = _order(ds), _order(ds)
    assert sorted(first) == sorted(second) == sorted(_order(make(dataset)))  # every image once per epoch
    assert first != second  # a new order every epoch
    assert _order(shuffled(7)) == first  # the same seed gives the same order
    assert _order(shuffled(8)) != first


@pytest.mark.parametrize("cache_bytes", [reader.DEFAULT_CACHE_BYTES, 0], ids=["memory", "disk"])
def test_each_epochs_order_depends_on_seed_and_epoch_only_so_a_resumed_run_repeats_it(dataset, cache_bytes,
                                                                                      cache_dir):
    """A run resumed at epoch k (a new process: a new pipeline and an empty cache, its epoch counter set
    to k as training does) feeds epoch k, and the ones after it, exactly as an uninterrupted run."""
    def pipeline(start):
        epoch = reader.epoch_variable()
        epoch.assign(start)
        return make(dataset, training=True, seed=7, cache_bytes=cache_bytes, epoch=epoch)

    uninterrupted = pipeline(0)
    orders = [_order(uninterrupted) for _ in range(4)]
    assert len(set(map(tuple, orders))) == 4  # a new order every epoch
    for start in (1, 2):
        resumed = pipeline(start)
        assert [_order(resumed) for _ in range(4 - start)] == orders[start:]


def test_the_first_epoch_is_shuffled_before_decoding(dataset):
    """The first pass is not a buffer of pixels waiting for the whole split: it takes the cached order,
    and that order is already shuffled (the encoded records are, by the seed, before decoding)."""
    file_order = _order(make(dataset))
    first = {seed: _order(make(dataset, training=True, seed=seed)) for seed in (3, 4)}
    assert sorted(first[3]) == sorted(file_order)
    assert first[3] != file_order and first[3] != first[4]


def _remove_shards(dataset: str) -> None:
    for split in ("train", "validation"):
        for path in reader.shard_files(dataset, split):
            os.remove(path)


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_images_are_decoded_once_and_later_epochs_read_the_memory_cache(dataset, training):
    ds = make(dataset, training=training, seed=1)
    first = sorted(_order(ds))
    _remove_shards(dataset)  # a later epoch that decoded again would fail now
    assert sorted(_order(ds)) == first


@pytest.mark.parametrize("training", [True, False], ids=["training", "evaluation"])
def test_a_split_too_large_for_memory_is_cached_on_local_disk(dataset, cache_dir, training, caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.reader")
    ds = make(dataset, training=training, seed=1, cache_bytes=100)
    [folder] = cache_dir.iterdir()
    assert any(str(folder) in r.getMessage() and "decoded once" in r.getMessage() for r in caplog.records)
    first = sorted(_order(ds))
    # One cache file per shard: tf.data holds a cache file's index in memory until the file is complete.
    assert len(list(folder.glob("*.index"))) == len(reader.shard_files(dataset, "train")) == 3
    _remove_shards(dataset)
    assert sorted(_order(ds)) == first
    del ds
    gc.collect()
    assert not folder.exists()  # removed with the dataset


@pytest.mark.parametrize("cache_bytes", [reader.DEFAULT_CACHE_BYTES, 0], ids=["memory", "disk"])
def test_keras_style_epochs_complete_the_cache_before_the_next_iterator(dataset, cache_dir, cache_bytes):
    """Keras takes exactly the known number of batches and opens the next epoch's iterator while the
    last one is still alive. A cache whose input had not yet reported its end would then not be
    complete: the next iterator would decode again (memory) or fail as a second writer (disk).
    10 images in batches of 5, in file order: nothing else reads to the end early."""
    ds = make(dataset, batch_size=5, cache_bytes=cache_bytes)
    iterator = iter(ds)
    first = [next(iterator)[0].numpy() for _ in range(int(ds.cardinality()))]
    _remove_shards(dataset)
    following = iter(ds)  # while ``iterator`` is alive, as Keras does
    np.testing.assert_array_equal(np.concatenate([b[0].numpy() for b in following]), np.concatenate(first))
    del iterator


def test_read_ahead_completes_a_cache_before_its_last_element_leaves(tmp_path):
    """Read synchronously (no prefetch thread to race): a cache file is complete once it has reported its
    end, which ``_read_ahead`` makes happen before the last element is given out."""
    pairs = tf.data.Dataset.from_tensor_slices((np.arange(12, dtype=np.uint8).reshape(3, 2, 2, 1),
                                                tf.constant([0, 1, 2], tf.int64)))
    # Without the read-ahead the cache is usually, but not always, still open at this point (it depends on
    # TensorFlow's scheduling), so only the guarantee _read_ahead gives is asserted.
    prefix = str(tmp_path / "read_ahead")
    iterator = iter(reader._read_ahead(pairs.cache(prefix), 3))
    got = [next(iterator) for _ in range(3)]
    assert [int(label) for _, label in got] == [0, 1, 2]
    assert os.path.exists(prefix + ".index")
    assert int(reader._read_ahead(pairs, 3).cardinality()) == 3


def test_without_room_for_a_cache_every_epoch_decodes_and_the_log_says_so(dataset, cache_dir, monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="trainer.data.reader")
    monkeypatch.setattr(reader.shutil, "disk_usage", lambda path: types.SimpleNamespace(total=1, used=1, free=0))
    ds = make(dataset, training=True, seed=1, cache_bytes=100)
    assert "every epoch decodes and resizes them again" in caplog.text and reader.CACHE_DIR_ENV in caplog.text
    assert not list(cache_dir.iterdir())
    first = sorted(_order(ds))
    assert sorted(_order(ds)) == first


def test_image_size_and_interpolation_are_checked(dataset):
    with pytest.raises(ValueError, match="unknown image_resize_interpolation 'cubic'"):
        make(dataset, interpolation="cubic")
    with pytest.raises(ValueError, match="image_size must be a positive whole number"):
        reader.read_split(dataset, "train", image_size=0, interpolation="bilinear")


def test_steps_per_epoch_are_known(dataset):
    assert int(make(dataset, training=True, seed=0).cardinality()) == 3


def test_format_version_1_data_set_is_refused(dataset):
    path = os.path.join(dataset, reader.MANIFEST_FILE)
    with open(path) as handle:
        manifest = json.load(handle)
    manifest.update(format_version=1, image_size=8, image_resize_interpolation="bilinear")
    with open(path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(DataError, match=r"manifest\.json: this data set is of format version 1 .*re-run the "
                                        r"conversion step"):
        reader.split_count(dataset, "train")


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json.*missing.*conversion"):
        reader.split_count(str(tmp_path), "train")


def test_bad_label_map_is_reported(dataset):
    with open(os.path.join(dataset, reader.LABEL_MAP_FILE), "w") as handle:
        json.dump({"a": 0, "b": 2}, handle)
    with pytest.raises(DataError, match="0..K-1"):
        reader.read_label_map(dataset)


def test_missing_shard_is_reported(dataset):
    os.remove(reader.shard_files(dataset, "train")[1])
    with pytest.raises(DataError, match=r"1 shard\(s\) listed in the manifest are missing.*part-00001"):
        reader.read_split(dataset, "train", **PIXELS)


def test_record_count_differing_from_manifest_fails_while_reading(dataset):
    path = os.path.join(dataset, reader.MANIFEST_FILE)
    with open(path) as handle:
        manifest = json.load(handle)
    manifest["splits"]["train"]["count"] = 11
    with open(path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain 11 elements"):
        list(reader.read_split(dataset, "train", **PIXELS))


def test_label_outside_the_label_map_fails(dataset):
    ds = make(dataset, num_classes=2)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside 0..1"):
        list(ds)


def test_unknown_split_is_a_programming_error(dataset):
    with pytest.raises(ValueError, match="unknown split 'val'"):
        reader.split_count(dataset, "val")


def test_gcs_dataset_is_copied_once_to_the_cache(tmp_path, monkeypatch, dataset):
    """gs:// data sets are read through trainer.storage into a local cache (here a fake bucket)."""
    from trainer import storage

    bucket = "gs://bucket/converted"
    downloads = []

    def local(uri):
        assert uri.startswith(bucket + "/"), uri
        return os.path.join(dataset, uri[len(bucket) + 1:])

    real_read_bytes = storage.read_bytes

    def read_bytes(uri):
        if not uri.startswith("gs://"):  # the local cache is read through storage too
            return real_read_bytes(uri)
        with open(local(uri), "rb") as handle:
            return handle.read()

    def download_file(uri, path):
        downloads.append(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(read_bytes(uri))

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    monkeypatch.setattr(storage, "download_file", download_file)
    monkeypatch.setenv(reader.CACHE_DIR_ENV, str(tmp_path / "cache"))

    assert reader.split_count(bucket, "train") == 10
    got = [label for _, label in reader.read_split(bucket, "train", **PIXELS).as_numpy_iterator()]
    expected = [label for _, label in reader.read_split(dataset, "train", **PIXELS).as_numpy_iterator()]
    assert got == expected
    shards = [uri for uri in downloads if uri.endswith(".tfrecord")]
    assert len(shards) == 3
    reader.read_split(bucket, "train", **PIXELS)
    assert len([uri for uri in downloads if uri.endswith(".tfrecord")]) == 3  # cached, not copied again


def _pixels(dataset_dir: str, split: str = "train") -> list[bytes]:
    return [image.tobytes() for image, _ in reader.read_split(dataset_dir, split, **PIXELS).as_numpy_iterator()]


def test_a_reconverted_gcs_data_set_is_never_read_from_the_old_local_copy(tmp_path, monkeypatch, gcs_bucket):
    """Same URI, same counts and shard names, other images: the second read must see the new images."""
    from tests.support.gcs import upload_folder

    monkeypatch.setenv(reader.CACHE_DIR_ENV, str(tmp_path / "cache"))
    classes = ("blue", "green", "red")
    first = write_arrays(str(tmp_path / "first"), classes, {"train": colour_images(classes, 6, 8, 1)})
    second = write_arrays(str(tmp_path / "second"), classes, {"train": colour_images(classes, 6, 8, 2)})
    for folder in (first, second):  # conversion records the content's fingerprint; these manifests differ by it
        path = os.path.join(folder, reader.MANIFEST_FILE)
        with open(path) as handle:
            manifest = json.load(handle)
        with open(path, "w") as handle:
            json.dump({**manifest, "fingerprint": os.path.basename(folder)}, handle)
    uri = upload_folder(first, gcs_bucket, "converted")
    assert _pixels(uri) == _pixels(first)
    upload_folder(second, gcs_bucket, "converted")  # a re-conversion into the same folder
    assert _pixels(uri) == _pixels(second) != _pixels(first)
    assert _pixels(uri) == _pixels(second)  # and the new copy is reused
    assert len(os.listdir(tmp_path / "cache")) == 2  # one copy per manifest content


def test_a_manifest_changing_during_the_copy_discards_the_copy(tmp_path, monkeypatch, dataset):
    from trainer import storage

    monkeypatch.setenv(reader.CACHE_DIR_ENV, str(tmp_path / "cache"))
    bucket = "gs://bucket/converted"
    reads = []

    def read_bytes(uri):
        path = uri.replace(bucket, dataset) if uri.startswith("gs://") else uri
        reads.append(uri)
        with open(path, "rb") as handle:
            content = handle.read()
        # The second read of the remote manifest sees a re-conversion's manifest.
        if uri == f"{bucket}/manifest.json" and reads.count(uri) > 1:
            content = content.replace(b'"format_version"', b'"other": 1, "format_version"')
        return content

    def download_file(uri, path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(read_bytes(uri))

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    monkeypatch.setattr(storage, "download_file", download_file)
    with pytest.raises(DataError, match="changed while its shards were copied"):
        reader.local_dataset_dir(bucket, ("train",))
    copies = os.listdir(tmp_path / "cache")
    assert len(copies) == 1 and not os.path.exists(tmp_path / "cache" / copies[0] / "train")
