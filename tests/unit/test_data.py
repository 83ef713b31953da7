"""Tests for trainer.data: metadata readers and the tf.data input pipelines over converted shards.

``write_dataset`` / ``write_arrays`` write a data set in the pinned conversion format without
going through trainer.conversion, so these tests (and the model/training/export tests that import
them) depend only on the format.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from trainer import data
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
                 shards: int = 2, interpolation: str = "bilinear") -> str:
    """Write uint8 images [N, S, S, 3] and labels per split as conversion would; returns ``root``."""
    size = next(iter(splits.values()))[0].shape[1]
    info = {}
    for split in data.SPLITS:
        pixels, labels = splits.get(split, (np.zeros((0, size, size, 3), np.uint8), np.zeros(0, np.int64)))
        files = []
        if len(labels):
            os.makedirs(os.path.join(root, split), exist_ok=True)
            parts = min(shards, len(labels))
            for part, indices in enumerate(np.array_split(np.arange(len(labels)), parts)):
                name = f"part-{part:05d}-of-{parts:05d}.tfrecord"
                with tf.io.TFRecordWriter(os.path.join(root, split, name)) as writer:
                    for i in indices:
                        writer.write(_example(pixels[i], int(labels[i]), f"{classes[labels[i]]}/{split}-{i}.png"))
                files.append(name)
        info[split] = {"count": int(len(labels)),
                       "class_counts": {c: int(np.sum(labels == k)) for k, c in enumerate(classes)},
                       "files": files}
    with open(os.path.join(root, data.LABEL_MAP_FILE), "w") as handle:
        json.dump({c: k for k, c in enumerate(classes)}, handle)
    manifest = {"format_version": 1, "classes": list(classes), "num_classes": len(classes), "image_size": size,
                "image_resize_interpolation": interpolation, "splits": info}
    with open(os.path.join(root, data.MANIFEST_FILE), "w") as handle:
        json.dump(manifest, handle)
    return root


def write_dataset(root: str, *, classes: tuple[str, ...] = ("blue", "green", "red"), size: int = 16,
                  counts: dict[str, int] | None = None, shards: int = 2, interpolation: str = "bilinear",
                  seed: int = 0) -> str:
    """A small colour-coded data set (default 48 train / 12 validation / 6 test images at 16 px)."""
    counts = {"train": 48, "validation": 12, "test": 6} if counts is None else counts
    splits = {split: colour_images(classes, n, size, seed + i) for i, (split, n) in enumerate(counts.items()) if n}
    return write_arrays(str(root), classes, splits, shards=shards, interpolation=interpolation)


def _example(pixels: np.ndarray, label: int, path: str) -> bytes:
    feature = {
        "image/raw": tf.train.Feature(bytes_list=tf.train.BytesList(value=[pixels.tobytes()])),
        "image/size": tf.train.Feature(int64_list=tf.train.Int64List(value=[pixels.shape[0]])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        "path": tf.train.Feature(bytes_list=tf.train.BytesList(value=[path.encode()])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


# ---------------------------------------------------------------------------------------------

@pytest.fixture
def arrays():
    classes = ("blue", "green", "red")
    return classes, {"train": colour_images(classes, 10, 8, 1), "validation": colour_images(classes, 5, 8, 2)}


@pytest.fixture
def dataset(tmp_path, arrays):
    classes, splits = arrays
    return write_arrays(str(tmp_path / "ds"), classes, splits, shards=3)


def test_metadata(dataset):
    assert data.read_label_map(dataset) == {"blue": 0, "green": 1, "red": 2}
    assert data.split_count(dataset, "train") == 10
    assert data.split_count(dataset, "validation") == 5
    assert data.split_count(dataset, "test") == 0
    assert data.image_size(dataset) == 8
    assert [os.path.basename(p) for p in data.shard_files(dataset, "train")] == [
        "part-00000-of-00003.tfrecord", "part-00001-of-00003.tfrecord", "part-00002-of-00003.tfrecord"]


def test_read_split_returns_stored_pixels_and_labels_in_file_order(dataset, arrays):
    _, splits = arrays
    ds = data.read_split(dataset, "train")
    assert ds.element_spec == (tf.TensorSpec([8, 8, 3], tf.uint8), tf.TensorSpec([], tf.int64))
    assert int(ds.cardinality()) == 10
    got = list(ds.as_numpy_iterator())
    np.testing.assert_array_equal(np.stack([g[0] for g in got]), splits["train"][0])
    np.testing.assert_array_equal([g[1] for g in got], splits["train"][1])


def test_absent_split_is_empty(dataset):
    ds = data.read_split(dataset, "test")
    assert ds.element_spec[0].shape == (8, 8, 3)
    assert list(ds) == []


def test_make_dataset_batches_float_images_and_one_hot_targets(dataset, arrays):
    _, splits = arrays
    ds = data.make_dataset(dataset, "validation", batch_size=2, training=False, seed=None, num_classes=3,
                           binary_mode=False)
    batches = list(ds.as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [2, 2, 1]
    images = np.concatenate([b[0] for b in batches])
    targets = np.concatenate([b[1] for b in batches])
    assert images.dtype == np.float32 and targets.dtype == np.float32
    np.testing.assert_array_equal(images, splits["validation"][0].astype(np.float32))
    np.testing.assert_array_equal(targets, np.eye(3)[splits["validation"][1]])


def test_binary_targets_are_a_column_of_labels(tmp_path):
    classes = ("cat", "dog")
    pixels, labels = colour_images(("blue", "red"), 6, 8, 0)
    root = write_arrays(str(tmp_path), classes, {"train": (pixels, labels)})
    ds = data.make_dataset(root, "train", batch_size=6, training=False, seed=None, num_classes=2, binary_mode=True)
    _, targets = next(iter(ds))
    assert targets.shape == (6, 1) and targets.dtype == tf.float32
    np.testing.assert_array_equal(targets.numpy()[:, 0], labels)


def _order(ds) -> list[int]:
    # The first pixel identifies an image (random noise on top of the class colour).
    return [tuple(px) for batch in ds.as_numpy_iterator() for px in batch[0][:, 0, 0, :]]


@pytest.mark.parametrize("cache_bytes", [data.DEFAULT_CACHE_BYTES, 0], ids=["cached", "streamed"])
def test_training_order_is_seeded_reshuffled_each_epoch_and_complete(dataset, cache_bytes):
    def make(seed):
        return data.make_dataset(dataset, "train", batch_size=4, training=True, seed=seed, num_classes=3,
                                 binary_mode=False, cache_bytes=cache_bytes)

    ds = make(7)
    first, second = _order(ds), _order(ds)
    evaluation = _order(data.make_dataset(dataset, "train", batch_size=4, training=False, seed=None,
                                          num_classes=3, binary_mode=False))
    assert sorted(first) == sorted(second) == sorted(evaluation)  # every image once per epoch
    assert first != second  # a new order every epoch
    assert _order(make(7)) == first  # the same seed gives the same order
    assert _order(make(8)) != first


def test_steps_per_epoch_are_known(dataset):
    ds = data.make_dataset(dataset, "train", batch_size=4, training=True, seed=0, num_classes=3,
                           binary_mode=False)
    assert int(ds.cardinality()) == 3


def test_missing_manifest_names_the_file(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json.*missing.*conversion"):
        data.split_count(str(tmp_path), "train")


def test_bad_label_map_is_reported(dataset):
    with open(os.path.join(dataset, data.LABEL_MAP_FILE), "w") as handle:
        json.dump({"a": 0, "b": 2}, handle)
    with pytest.raises(DataError, match="0..K-1"):
        data.read_label_map(dataset)


def test_missing_shard_is_reported(dataset):
    os.remove(data.shard_files(dataset, "train")[1])
    with pytest.raises(DataError, match=r"1 shard\(s\) listed in the manifest are missing.*part-00001"):
        data.read_split(dataset, "train")


def test_record_count_differing_from_manifest_fails_while_reading(dataset):
    path = os.path.join(dataset, data.MANIFEST_FILE)
    with open(path) as handle:
        manifest = json.load(handle)
    manifest["splits"]["train"]["count"] = 11
    with open(path, "w") as handle:
        json.dump(manifest, handle)
    with pytest.raises(tf.errors.FailedPreconditionError, match="expected to contain 11 elements"):
        list(data.read_split(dataset, "train"))


def test_label_outside_the_label_map_fails(dataset):
    ds = data.make_dataset(dataset, "train", batch_size=4, training=False, seed=None, num_classes=2,
                           binary_mode=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="outside 0..1"):
        list(ds)


def test_unknown_split_is_a_programming_error(dataset):
    with pytest.raises(ValueError, match="unknown split 'val'"):
        data.split_count(dataset, "val")


def test_gcs_dataset_is_copied_once_to_the_cache(tmp_path, monkeypatch, dataset):
    """gs:// data sets are read through trainer.storage into a local cache (here a fake bucket)."""
    from trainer import storage

    bucket = "gs://bucket/converted"
    downloads = []

    def local(uri):
        assert uri.startswith(bucket + "/"), uri
        return os.path.join(dataset, uri[len(bucket) + 1:])

    def read_bytes(uri):
        with open(local(uri), "rb") as handle:
            return handle.read()

    def download_file(uri, path):
        downloads.append(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(read_bytes(uri))

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    monkeypatch.setattr(storage, "download_file", download_file)
    monkeypatch.setenv(data.CACHE_DIR_ENV, str(tmp_path / "cache"))

    assert data.split_count(bucket, "train") == 10
    got = [label for _, label in data.read_split(bucket, "train").as_numpy_iterator()]
    expected = [label for _, label in data.read_split(dataset, "train").as_numpy_iterator()]
    assert got == expected
    shards = [uri for uri in downloads if uri.endswith(".tfrecord")]
    assert len(shards) == 3
    data.read_split(bucket, "train")
    assert len([uri for uri in downloads if uri.endswith(".tfrecord")]) == 3  # cached, not copied again
