"""The look at the data: one fingerprint that changes exactly when the content does (local and gs://)."""

import os
import shutil

import pytest

from tests.support.datasets import encode, make_image_folder, noise
from tests.support.gcs import emulator_client, upload_folder
from trainer import storage
from trainer.data.fingerprint import look_at_data, validate_unchanged
from trainer.errors import DataError


@pytest.fixture
def folder(tmp_path):
    make_image_folder(tmp_path / "data", classes={"cats": 4, "dogs": 4}, size=(16, 16))
    return tmp_path / "data"


def test_local_fingerprint_follows_content_not_place_or_time(folder, tmp_path):
    before = look_at_data(str(folder))
    assert before.files == 8 and before.bytes == sum(f.stat().st_size for f in folder.rglob("*.jpg"))
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # new place, new modification times, same content
    for path in copy.rglob("*.jpg"):
        os.utime(path, (1, 1))
    assert look_at_data(str(copy)).fingerprint == before.fingerprint


def test_local_fingerprint_sees_every_kind_of_change(folder):
    seen = {look_at_data(str(folder)).fingerprint}
    victim = folder / "cats" / "cats_000.jpg"
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF  # one byte replaced: same name, same size
    victim.write_bytes(bytes(data))
    seen.add(look_at_data(str(folder)).fingerprint)
    (folder / "dogs" / "new.png").write_bytes(encode(noise(16, 16), "PNG"))  # added
    seen.add(look_at_data(str(folder)).fingerprint)
    (folder / "dogs" / "new.png").rename(folder / "cats" / "new.png")  # moved to another class
    seen.add(look_at_data(str(folder)).fingerprint)
    (folder / "dogs" / "dogs_001.jpg").unlink()  # removed
    seen.add(look_at_data(str(folder)).fingerprint)
    assert len(seen) == 5


def test_gcs_fingerprint_comes_from_the_listing(folder, gcs_bucket):
    uri = upload_folder(folder, gcs_bucket, "data")
    details = storage.list_object_details(uri)
    assert [d["path"] for d in details] == storage.list_files(uri)
    assert all(d["size"] > 0 and d["md5"] and d["crc32c"] and d["generation"] for d in details)
    before = look_at_data(uri)
    assert before.method == "gcs-listing" and before.files == 8
    assert look_at_data(uri).fingerprint == before.fingerprint  # a second listing of unchanged objects
    # Replaced by other bytes of the same size: the MD5 differs.
    blob = emulator_client().bucket(gcs_bucket).blob("data/cats/cats_000.jpg")
    data = bytearray(blob.download_as_bytes())
    data[-3] ^= 0xFF
    blob.upload_from_string(bytes(data))
    assert look_at_data(uri).fingerprint != before.fingerprint


def test_validation_refuses_data_that_changed_since_the_look(folder, tmp_path):
    look = look_at_data(str(folder))
    result = validate_unchanged(str(folder), str(tmp_path / "ok"), look.fingerprint)
    assert result["content_fingerprint"] == look.fingerprint and result["counts"]["accepted"] == 8
    (folder / "dogs" / "late.png").write_bytes(encode(noise(16, 16), "PNG"))
    with pytest.raises(DataError, match=rf"the data at {folder} changed while this run was reading it"):
        validate_unchanged(str(folder), str(tmp_path / "late"), look.fingerprint)
