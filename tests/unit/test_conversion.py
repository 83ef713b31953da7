"""convert_dataset writes every accepted file once, byte for byte, in a stratified seeded leak-free split."""

import collections
import glob
import hashlib
import inspect
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.support import datasets as ds
from trainer import images, storage
from trainer.cli import main as imgclf
from trainer.data import conversion, reader
from trainer.data.conversion import convert_dataset, read_manifest
from trainer.data.validation import validate_dataset
from trainer.errors import DataError

# The pinned record format, parsed here independently of trainer.data.reader.
FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/format": tf.io.FixedLenFeature([], tf.string),
    "label": tf.io.FixedLenFeature([], tf.int64),
    "path": tf.io.FixedLenFeature([], tf.string),
}


def read_split(out, manifest, split) -> list[dict]:
    """Every record of a split, in file order, as {path, label, encoded, format}."""
    records = []
    for name in manifest["splits"][split]["files"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out, split, name)):
            example = tf.io.parse_single_example(raw, FEATURES)
            records.append({"path": example["path"].numpy().decode("utf-8"), "label": int(example["label"]),
                            "encoded": example["image/encoded"].numpy(),
                            "format": example["image/format"].numpy().decode("ascii")})
    return records


def validate_and_convert(data, tmp_path, name="out", **kwargs):
    validation_dir = tmp_path / f"{name}-validation"
    validate_dataset(str(data), str(validation_dir), max_rejected_fraction=kwargs.pop("max_rejected", 0.01))
    out = tmp_path / name
    manifest = convert_dataset(str(data), str(validation_dir / "validation.json"), str(out), workers=2,
                               **kwargs)
    return out, manifest


def split_paths(manifest_dir, manifest):
    return {s: sorted(r["path"] for r in read_split(manifest_dir, manifest, s)) for s in conversion.SPLITS}


def test_records_hold_the_original_bytes_and_labels(tiny_dataset, tmp_path):
    (tiny_dataset / "fish" / "fish_000.png").write_bytes(ds.encode(ds.noise(30, 40, seed=3), "PNG"))
    out, manifest = validate_and_convert(tiny_dataset, tmp_path)
    assert manifest == read_manifest(str(out))
    assert manifest["format_version"] == 2 and "image_size" not in manifest
    assert "image_resize_interpolation" not in manifest and "image_size" not in manifest["parameters"]
    assert manifest["classes"] == ["cats", "dogs", "fish"]
    assert json.loads((out / "class_label_to_prediction_index.json").read_text()) == {
        "cats": 0, "dogs": 1, "fish": 2}
    seen = set()
    for split in conversion.SPLITS:
        records = read_split(out, manifest, split)
        assert len(records) == manifest["splits"][split]["count"]
        for record in records:
            seen.add(record["path"])
            assert record["label"] == manifest["classes"].index(record["path"].split("/")[0])
            # The file itself, byte for byte, and its format as validation detected it.
            assert record["encoded"] == (tiny_dataset / record["path"]).read_bytes()
            assert record["format"] == ("png" if record["path"].endswith(".png") else "jpeg")
        assert manifest["splits"][split]["bytes"] == sum(len(r["encoded"]) for r in records)
    # Every accepted image was written exactly once, and the counts reconcile.
    assert len(seen) == 31 == manifest["accepted"] == manifest["written"]
    assert manifest["listed"] == manifest["accepted"] + manifest["rejected"] + manifest["skipped"]
    assert sum(manifest["splits"][s]["count"] for s in conversion.SPLITS) == manifest["accepted"]


def test_training_reads_the_pixels_validation_checked(tmp_path):
    """Through validation, conversion and the training input pipeline, every image arrives as
    ``resize_image(decode_image(file))``: Pillow's pixels, for JPEG and PNG, EXIF-rotated, palette,
    transparent, grayscale, 16-bit and CMYK files, at any model size (JPEGs at least twice the model's
    size decoded scaled down, as Pillow's ``draft`` decodes them)."""
    folder = tmp_path / "d"
    ds.make_image_folder(folder, {"a": 3, "b": 3}, size=(23, 17))
    rgba = np.dstack([ds.noise(30, 40, seed=3), np.random.default_rng(4).integers(0, 256, (30, 40), np.uint8)])
    extra = {
        "a/sideways.jpg": ds.exif_bytes(ds.halves(20, 40), 6),
        "a/turned.png": ds.exif_bytes(ds.noise(20, 30, seed=5), 8, "PNG"),
        "a/palette.png": ds.palette_with_transparency(),
        "a/rgba.png": ds.encode(rgba, "PNG"),
        "b/gray.jpg": ds.encode(ds.noise(25, 35, seed=6)[:, :, 0], "JPEG"),
        "b/gray16.png": ds.png16_gray(np.arange(1200, dtype=np.uint16).reshape(30, 40) * 50),
        "b/cmyk.jpg": ds.cmyk_jpeg(ds.noise(30, 40, seed=7)),
        "b/progressive.jpg": ds.encode(ds.noise(31, 41, seed=8), "JPEG", progressive=True, subsampling=2),
    }
    for name, blob in extra.items():
        (folder / name).write_bytes(blob)
    out, manifest = validate_and_convert(folder, tmp_path, validation_split_ratio=0.0, test_split_ratio=0.0)
    paths = [r["path"] for r in read_split(out, manifest, "train")]
    assert set(extra) <= set(paths)
    # Each record carries the orientation the serving decoder finds in its bytes, and the manifest counts
    # the formats and the turned images (so training knows when a split is upright JPEGs only).
    stored = {}
    for name in manifest["splits"]["train"]["files"]:
        for raw in tf.data.TFRecordDataset(os.path.join(out, "train", name)):
            example = tf.io.parse_single_example(raw, {**FEATURES, "image/orientation": tf.io.FixedLenFeature(
                [], tf.int64)})
            stored[example["path"].numpy().decode()] = int(example["image/orientation"])
    assert stored == {path: int(images.exif_orientation(tf.constant((folder / path).read_bytes())))
                      for path in paths}
    assert stored["a/sideways.jpg"] == 6 and stored["a/turned.png"] == 8
    pngs = sum(path.endswith(".png") for path in paths)
    assert manifest["splits"]["train"]["formats"] == {"jpeg": len(paths) - pngs, "png": pngs}
    assert manifest["splits"]["train"]["turned"] == 2
    assert manifest["splits"]["train"]["largest_jpeg_short_side"] == 31  # progressive.jpg, 41 x 31
    for size, method in [(12, "bilinear"), (20, "area")]:
        batches = reader.make_dataset(str(out), "train", batch_size=5, training=False, seed=None, num_classes=2,
                                    binary_mode=False, image_size=size, interpolation=method)
        got = np.concatenate([pixels for pixels, _ in batches.as_numpy_iterator()])
        for path, pixels in zip(paths, got, strict=True):
            blob = (folder / path).read_bytes()
            if path.endswith(".jpg"):  # decoded scaled down (Pillow's draft) when at least twice the size
                expected = ds.pillow_model_input(blob, size, method)
            else:
                expected = images.resize_image(images.decode_image(blob, path), size, method).numpy()
            np.testing.assert_array_equal(pixels, expected, err_msg=path)


def test_conversion_does_not_depend_on_the_model(tiny_dataset, tmp_path, capsys):
    """The same conversion, byte for byte, whatever model, image_size and interpolation a run uses."""
    assert not {"image_size", "image_resize_interpolation"} & set(inspect.signature(convert_dataset).parameters)
    validate_dataset(str(tiny_dataset), str(tmp_path / "v"))
    runs = {"small": ["--set", "model=small_cnn", "--set", "weights=none", "--set", "image_size=32"],
            "large": ["--set", "model=mobilenet_v2", "--set", "image_size=96",
                      "--set", "image_resize_interpolation=area"]}
    for name, options in runs.items():
        assert imgclf(["convert", "--data", str(tiny_dataset), "--validation", str(tmp_path / "v" / "validation.json"),
                       "--output", str(tmp_path / name), *options]) == 0
    small, large = (read_manifest(str(tmp_path / name)) for name in runs)
    assert small["fingerprint"] == large["fingerprint"]
    for split in conversion.SPLITS:
        for shard in small["splits"][split]["files"]:
            small_shard, large_shard = (tmp_path / name / split / shard for name in runs)
            assert small_shard.read_bytes() == large_shard.read_bytes()


def test_format_version_1_data_set_is_refused(tiny_dataset, tmp_path):
    out, manifest = validate_and_convert(tiny_dataset, tmp_path)
    (out / "manifest.json").write_text(json.dumps({**manifest, "format_version": 1, "image_size": 224}))
    with pytest.raises(DataError, match="format version 1 .*pixels resized at conversion.*re-run the conversion"):
        read_manifest(str(out))


def test_split_is_stratified_and_follows_the_ratios(tiny_dataset, tmp_path):
    _, manifest = validate_and_convert(tiny_dataset, tmp_path, validation_split_ratio=0.2,
                                       test_split_ratio=0.1)
    for name in manifest["classes"]:
        assert [manifest["splits"][s]["class_counts"][name] for s in conversion.SPLITS] == [7, 2, 1]
    assert manifest["ratios"] == {"train": 0.7, "validation": 0.2, "test": 0.1}


def test_split_is_seeded(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"a": 15, "b": 15}, size=(12, 12))
    out1, m1 = validate_and_convert(tmp_path / "d", tmp_path, "one", random_seed=7)
    out2, m2 = validate_and_convert(tmp_path / "d", tmp_path, "two", random_seed=7)
    out3, m3 = validate_and_convert(tmp_path / "d", tmp_path, "three", random_seed=8)
    assert split_paths(out1, m1) == split_paths(out2, m2) != split_paths(out3, m3)
    assert m1["fingerprint"] == m2["fingerprint"] != m3["fingerprint"]
    # Same seed, same record order, byte for byte.
    train = m1["splits"]["train"]["files"][0]
    assert (out1 / "train" / train).read_bytes() == (out2 / "train" / train).read_bytes()


def test_training_order_mixes_classes(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"a": 20, "b": 20}, size=(8, 8))
    out, manifest = validate_and_convert(tmp_path / "d", tmp_path, num_shards=2)
    for name in manifest["splits"]["train"]["files"]:
        manifest_one = {"splits": {"train": {"files": [name]}}}
        labels = [r["label"] for r in read_split(out, manifest_one, "train")]
        assert set(labels) == {0, 1} and labels != sorted(labels)


def test_identical_content_never_crosses_splits(tmp_path):
    data = tmp_path / "d"
    ds.make_image_folder(data, {"a": 12, "b": 12}, size=(10, 10), fmt="png")
    # Four copies of each of three "a" pictures, under other names.
    for i in range(3):
        content = (data / "a" / f"a_{i:03d}.png").read_bytes()
        for copy in range(3):
            (data / "a" / f"copy_{i}_{copy}.png").write_bytes(content)
    for seed in range(4):
        out, manifest = validate_and_convert(data, tmp_path, f"s{seed}", random_seed=seed,
                                             validation_split_ratio=0.3, test_split_ratio=0.3)
        split_of = {}
        for split, paths in split_paths(out, manifest).items():
            for path in paths:
                split_of[path] = split
        groups = collections.defaultdict(set)
        for path, split in split_of.items():
            groups[hashlib.sha256((data / path).read_bytes()).hexdigest()].add(split)
        assert all(len(splits) == 1 for splits in groups.values())
        assert len(split_of) == manifest["accepted"] == 33


def test_class_too_small_to_split(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"big": 10, "small": 2})
    with pytest.raises(DataError) as info:
        validate_and_convert(tmp_path / "d", tmp_path)
    message = str(info.value)
    assert "at least 3 distinct images, one for each of train, validation, test" in message
    assert "'small' has 2 distinct image(s) (2 file(s))" in message and "test_split_ratio=0" in message
    assert "'big'" not in message
    # Without a test split two images are enough; the test split gets no folder.
    out, manifest = validate_and_convert(tmp_path / "d", tmp_path, "two", test_split_ratio=0)
    assert manifest["splits"]["test"] == {"count": 0, "class_counts": {"big": 0, "small": 0}, "bytes": 0, "files": [],
                                        "formats": {"jpeg": 0, "png": 0}, "turned": 0,
                                        "largest_jpeg_short_side": 0}
    assert not (out / "test").exists()
    assert manifest["splits"]["validation"]["class_counts"] == {"big": 2, "small": 1}


def test_duplicates_count_once_toward_the_minimum(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"a": 5, "b": 2})
    (tmp_path / "d" / "b" / "again.jpg").write_bytes((tmp_path / "d" / "b" / "b_000.jpg").read_bytes())
    with pytest.raises(DataError, match=r"'b' has 2 distinct image\(s\) \(3 file\(s\)\)"):
        validate_and_convert(tmp_path / "d", tmp_path)


def test_explicit_shards_and_default_sharding(tiny_dataset, tmp_path):
    out, manifest = validate_and_convert(tiny_dataset, tmp_path, num_shards=4)
    train = manifest["splits"]["train"]
    assert train["files"] == [f"part-0000{i}-of-00004.tfrecord" for i in range(4)]
    sizes = [sum(1 for _ in tf.data.TFRecordDataset(str(out / "train" / f))) for f in train["files"]]
    assert sum(sizes) == 21 and max(sizes) - min(sizes) <= 1
    # A split smaller than num_shards gets one shard per image, never an empty shard.
    assert len(manifest["splits"]["test"]["files"]) == 3
    # Automatic: at most 256 MiB of images per shard, by validation's byte counts.
    mib = 2**20
    assert conversion.default_num_shards(0, 0) == 0
    assert conversion.default_num_shards(10, 500_000) == 1
    assert conversion.default_num_shards(2_000, 256 * mib) == 1
    assert conversion.default_num_shards(20_000, 900 * mib) == 4  # 225 MiB each
    assert conversion.default_num_shards(3, 2_000 * mib) == 3  # never more shards than images
    # Small pictures: capped by images (a disk cache file per shard holds memory per image until complete).
    assert conversion.default_num_shards(140_000, 200 * mib) == 3


def test_leftover_shards_and_temp_files_are_never_listed(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    (out / "train").mkdir(parents=True)
    (out / "test").mkdir()
    stale = out / "train" / "part-00003-of-00009.tfrecord"
    temp = out / "train" / ".tmp-0123-part-00000-of-00001.tfrecord"
    stale.write_bytes(b"old")
    temp.write_bytes(b"half a shard")
    (out / "test" / "part-00000-of-00001.tfrecord").write_bytes(b"old")
    (out / "train" / "notes.txt").write_text("not ours: kept")
    out, manifest = validate_and_convert(tiny_dataset, tmp_path, test_split_ratio=0)
    assert not stale.exists() and not temp.exists() and (out / "train" / "notes.txt").exists()
    assert not (out / "test").exists()
    assert manifest["splits"]["train"]["files"] == ["part-00000-of-00001.tfrecord"]
    assert sorted(os.path.basename(p) for p in glob.glob(str(out / "*" / "part-*.tfrecord"))) == [
        "part-00000-of-00001.tfrecord"] * 2


def test_crash_mid_shard_leaves_no_shard_and_no_manifest(tiny_dataset, tmp_path, monkeypatch):
    out, _ = validate_and_convert(tiny_dataset, tmp_path)
    validation_json = tmp_path / "out-validation" / "validation.json"
    real = conversion._encode_example
    calls = 0

    def failing(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == 10:
            raise OSError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion, "_encode_example", failing)
    with pytest.raises(OSError, match="worker killed"):
        convert_dataset(str(tiny_dataset), str(validation_json), str(out), workers=2)
    assert not (out / "manifest.json").exists()  # the previous manifest is gone before shards change
    assert glob.glob(str(out / "train" / "*")) == []  # no complete-looking or temporary shard left
    with pytest.raises(DataError, match="no readable manifest.json"):
        read_manifest(str(out))


def test_file_changed_since_validation_is_an_error(tiny_dataset, tmp_path):
    validate_dataset(str(tiny_dataset), str(tmp_path / "v"))
    (tiny_dataset / "dogs" / "dogs_003.jpg").write_bytes(ds.encode(ds.noise(30, 40, seed=5), "JPEG"))
    with pytest.raises(DataError, match="dogs/dogs_003.jpg changed since validation"):
        convert_dataset(str(tiny_dataset), str(tmp_path / "v" / "validation.json"), str(tmp_path / "o"))


def test_fingerprint_follows_content_not_just_names(tiny_dataset, tmp_path):
    _, before = validate_and_convert(tiny_dataset, tmp_path, "before")
    _, again = validate_and_convert(tiny_dataset, tmp_path, "again")
    (tiny_dataset / "dogs" / "dogs_003.jpg").write_bytes(ds.encode(ds.noise(30, 40, seed=5), "JPEG"))
    _, after = validate_and_convert(tiny_dataset, tmp_path, "after")
    assert before["fingerprint"] == again["fingerprint"] != after["fingerprint"]


def test_fingerprint_ignores_order_and_number_spelling():
    accepted = [{"path": "a/1.jpg", "sha256": "1" * 64}, {"path": "b/2.jpg", "sha256": "2" * 64}]

    def params(**kw):
        base = {"validation_split_ratio": 0.2, "test_split_ratio": 0, "random_seed": 0, "num_shards": None}
        return conversion.conversion_parameters(**{**base, **kw})

    one = conversion.compute_fingerprint(accepted, params())
    assert one == conversion.compute_fingerprint(accepted[::-1], params(test_split_ratio=0.0))
    assert one != conversion.compute_fingerprint(accepted, params(num_shards=2))
    renamed = [{**accepted[0], "path": "b/1.jpg"}, accepted[1]]
    assert one != conversion.compute_fingerprint(renamed, params())


def test_validation_with_fatal_problems_is_refused(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"only": 3})
    with pytest.raises(DataError):
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "v"))
    with pytest.raises(DataError, match="(?s)reports fatal problems.*only one class folder"):
        convert_dataset(str(tmp_path / "d"), str(tmp_path / "v" / "validation.json"), str(tmp_path / "o"))


@pytest.mark.parametrize("kwargs,expected", [
    ({"validation_split_ratio": 0.6, "test_split_ratio": 0.4}, "their sum must be below 1"),
    ({"test_split_ratio": -0.1}, "test_split_ratio must be a number at least 0"),
    ({"test_split_ratio": "0.1"}, "test_split_ratio must be a number"),
    ({"random_seed": 1.5}, "random_seed must be a whole number"),
    ({"num_shards": 0}, "num_shards must be a positive"),
])
def test_parameters_are_checked_before_any_work(tmp_path, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        convert_dataset(str(tmp_path), str(tmp_path / "missing.json"), str(tmp_path / "o"), **kwargs)


def test_read_manifest_notices_a_missing_shard(tiny_dataset, tmp_path):
    out, manifest = validate_and_convert(tiny_dataset, tmp_path)
    os.remove(out / "validation" / manifest["splits"]["validation"]["files"][0])
    with pytest.raises(DataError, match="missing shard.*validation/part-00000-of-00001.tfrecord"):
        read_manifest(str(out))
    assert conversion.shard_uris(str(out), manifest, "train") == [
        storage.join(str(out), "train", "part-00000-of-00001.tfrecord")]


def test_gcs_data_set_end_to_end(tiny_dataset, gcs_bucket, tmp_path):
    from tests.support.gcs import emulator_client, upload_folder

    data_uri = upload_folder(tiny_dataset, gcs_bucket, "flowers")
    # An empty class folder in object storage exists only as a placeholder object or a marker.
    emulator_client().bucket(gcs_bucket).blob("flowers/ghost/").upload_from_string(b"")
    work = f"gs://{gcs_bucket}/work"
    with pytest.raises(DataError, match="class folder 'ghost' has no usable images"):
        validate_dataset(data_uri, f"{work}/bad-validation")
    emulator_client().bucket(gcs_bucket).blob("flowers/ghost/").delete()
    validate_dataset(data_uri, f"{work}/validation")
    result = ds.validation_with_lists(f"{work}/validation")
    assert result["counts"] == {"listed": 30, "accepted": 30, "rejected": 0, "skipped": 0}
    assert "Result: passed" in storage.read_bytes(f"{work}/validation/report.md").decode()
    manifest = convert_dataset(data_uri, f"{work}/validation/validation.json", f"{work}/dataset",
                               workers=2)
    assert read_manifest(f"{work}/dataset") == manifest
    assert set(storage.list_files(f"{work}/dataset")) == {
        "manifest.json", "class_label_to_prediction_index.json", "train/part-00000-of-00001.tfrecord",
        "validation/part-00000-of-00001.tfrecord", "test/part-00000-of-00001.tfrecord"}
    local = tmp_path / "copy"
    storage.download_tree(f"{work}/dataset", str(local))
    assert sorted(r["path"] for s in conversion.SPLITS for r in read_split(local, manifest, s)) == sorted(
        e["path"] for e in result["accepted"])


def test_data_fingerprint_from_validation_is_checked_and_recorded(tiny_dataset, tmp_path):
    result = validate_dataset(str(tiny_dataset), str(tmp_path / "v"))
    validation_json = tmp_path / "v" / "validation.json"
    manifest = convert_dataset(str(tiny_dataset), str(validation_json), str(tmp_path / "o"),
                               data_fingerprint=result["fingerprint"])
    assert manifest["data_fingerprint"] == result["fingerprint"]
    with pytest.raises(DataError, match="belongs to other data"):
        convert_dataset(str(tiny_dataset), str(validation_json), str(tmp_path / "o2"),
                        data_fingerprint="0" * 64)
    # A validation result whose lists were edited no longer matches the fingerprint it records.
    edited = json.loads(validation_json.read_text())
    accepted = (tmp_path / "v" / "accepted.jsonl").read_text().splitlines()
    dropped = json.loads(accepted.pop())
    (tmp_path / "v" / "accepted.jsonl").write_text("".join(line + "\n" for line in accepted))
    (tmp_path / "v" / "skipped.jsonl").write_text(json.dumps({"path": dropped["path"], "reason": "edited"}) + "\n")
    edited["counts"].update(accepted=edited["counts"]["accepted"] - 1, skipped=edited["counts"]["skipped"] + 1)
    validation_json.write_text(json.dumps(edited))
    with pytest.raises(DataError, match="its fingerprint does not match its file lists"):
        convert_dataset(str(tiny_dataset), str(validation_json), str(tmp_path / "o3"))


@pytest.mark.parametrize("where", ["local", "gcs"])
def test_reconversion_that_fails_half_way_leaves_no_manifest(where, tiny_dataset, tmp_path, monkeypatch, request):
    """The old manifest stops vouching for the folder before any shard changes, on disk and on gs://."""
    if where == "gcs":
        out = f"gs://{request.getfixturevalue('gcs_bucket')}/dataset"
    else:
        out = str(tmp_path / "dataset")
    validate_dataset(str(tiny_dataset), str(tmp_path / "v"))
    validation_json = str(tmp_path / "v" / "validation.json")
    convert_dataset(str(tiny_dataset), validation_json, out, workers=2)
    assert read_manifest(out)["accepted"] == 30
    # New content for the next conversion into the same folder.
    (tiny_dataset / "dogs" / "dogs_003.jpg").write_bytes(ds.encode(ds.noise(30, 40, seed=5), "JPEG"))
    validate_dataset(str(tiny_dataset), str(tmp_path / "v2"))
    real, calls = conversion._encode_example, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 25:  # after the first split's shards are written
            raise OSError("worker killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion, "_encode_example", failing)
    with pytest.raises(OSError, match="worker killed"):
        convert_dataset(str(tiny_dataset), str(tmp_path / "v2" / "validation.json"), out, workers=2)
    with pytest.raises(DataError, match="no readable manifest.json"):
        read_manifest(out)
    monkeypatch.setattr(conversion, "_encode_example", real)
    manifest = convert_dataset(str(tiny_dataset), str(tmp_path / "v2" / "validation.json"), out, workers=2)
    assert read_manifest(out) == manifest


def test_records_written_without_tensorflow_are_tensorflows_format(tmp_path):
    features = {"image/encoded": bytes(range(256)) * 300, "image/format": b"jpeg", "label": 7,
                "path": "café/ünï #1.jpg".encode(), "big": 2**40, "negative": -3, "empty": b""}
    record = conversion.serialize_example(features)
    # The same message as TensorFlow's own protocol-buffer class builds.
    expected = tf.train.Example(features=tf.train.Features(feature={
        key: tf.train.Feature(bytes_list=tf.train.BytesList(value=[value])) if isinstance(value, bytes)
        else tf.train.Feature(int64_list=tf.train.Int64List(value=[value])) for key, value in features.items()}))
    assert tf.train.Example.FromString(record) == expected
    path = tmp_path / "records.tfrecord"
    with conversion.TFRecordWriter(str(path)) as writer:
        writer.write(record)
        writer.write(b"")
        writer.write(b"x" * 100_000)
    # TensorFlow's reader checks the length and data checksums of every record.
    read = [r.numpy() for r in tf.data.TFRecordDataset(str(path))]
    assert read == [record, b"", b"x" * 100_000]
    with pytest.raises(TypeError, match="feature 'bad'"):
        conversion.serialize_example({"bad": 1.5})


def test_conversion_does_not_import_tensorflow(tiny_dataset, tmp_path):
    validate_dataset(str(tiny_dataset), str(tmp_path / "v"))
    code = ("import sys; from trainer.data.conversion import convert_dataset; "
            f"m = convert_dataset({str(tiny_dataset)!r}, {str(tmp_path / 'v' / 'validation.json')!r}, "
            f"{str(tmp_path / 'out')!r}); print(m['written'], 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    written, imported = result.stdout.split()
    assert int(written) > 0 and imported == "False"
