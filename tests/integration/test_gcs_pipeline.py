"""The whole pipeline runs locally on a data set in (emulated) Cloud Storage: --data gs://...

The gcs_emulator fixture sets STORAGE_EMULATOR_HOST in this process's environment; kfp.local's
subprocess steps inherit it, so every step reads the same emulator.
"""

import glob
import json
import os

import pytest

from pipelines.local import run_local
from tests.support import datasets as ds
from tests.support.gcs import emulator_client, upload_folder
from trainer.hyperparameters import Hyperparameters

pytestmark = pytest.mark.integration

HP = Hyperparameters(model="small_cnn", weights="none", image_size=32, epochs=1, batch_size=8,
                     validation_split_ratio=0.2, test_split_ratio=0.2)
CLASSES = {"circles": 10, "squares": 10, "stripes": 10}
# One truncated image and one system file: the counts must account for them too.
LISTED = sum(CLASSES.values()) + 2


@pytest.fixture
def staged(tmp_path, gcs_bucket) -> str:
    """The data set under gs://BUCKET/flowers, next to a 'flowers2' prefix that must never be read."""
    data = tmp_path / "data"
    ds.make_image_folder(data, CLASSES, size=(40, 32))
    (data / "squares" / "cut.jpg").write_bytes(ds.truncate(ds.encode(ds.noise(seed=5), "JPEG")))
    (data / "circles" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    upload_folder(data, gcs_bucket, "flowers")
    # A prefix that starts like the data set's: listing "flowers" without its "/" would pick it up.
    emulator_client().bucket(gcs_bucket).blob("flowers2/intruders/x.jpg").upload_from_string(
        ds.encode(ds.noise(seed=6), "JPEG"))
    return gcs_bucket


def _run(data_uri: str, out) -> dict:
    # One rejected file of 31 is above the default limit of 1%.
    return run_local(data_uri, str(out), HP, pipeline_args={"max_rejected_fraction": 0.1})


def _validation_dir(out) -> str:
    found = glob.glob(os.path.join(out, "artifacts", "*", "validate-data", "validation"))
    assert len(found) == 1, found
    return found[0]


def _assert_reconciled(summary: dict, out) -> None:
    assert summary["status"] == "succeeded", summary
    assert summary["listed"] == LISTED and summary["rejected"] == 1 and summary["skipped"] == 1
    assert sum(summary["counts"].values()) + summary["rejected"] + summary["skipped"] == summary["listed"]
    assert summary["counts"] == {"train": 18, "validation": 6, "test": 6}
    with open(os.path.join(summary["dataset_path"], "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    validation = ds.validation_with_lists(_validation_dir(out))
    assert manifest["written"] == manifest["accepted"] == len(validation["accepted"]) == 30
    assert (manifest["listed"], manifest["rejected"], manifest["skipped"]) == (LISTED, 1, 1)
    assert manifest["data_fingerprint"] == validation["fingerprint"]
    assert all(not p.startswith("flowers2") and "intruders" not in p for p in
               [e["path"] for e in validation["accepted"] + validation["rejected"] + validation["skipped"]])


def test_pipeline_runs_on_a_gcs_data_set(staged, tmp_path):
    out = tmp_path / "run"
    summary = _run(f"gs://{staged}/flowers/", out)
    _assert_reconciled(summary, out)
    assert summary["data_uri"] == f"gs://{staged}/flowers/"
    assert summary["classes"] == sorted(CLASSES)
    # The HTML report's thumbnails were read back through the emulator.
    with open(os.path.join(_validation_dir(out), "report.html"), encoding="utf-8") as f:
        page = f.read()
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 4 * len(CLASSES)
    assert "squares/cut.jpg" in page and "truncated JPEG file" in page


def test_prefix_without_trailing_slash_is_the_same_folder(staged, tmp_path):
    out = tmp_path / "run"
    summary = _run(f"gs://{staged}/flowers", out)
    _assert_reconciled(summary, out)


def test_missing_bucket_fails_in_the_first_look_naming_it(gcs_emulator, tmp_path):
    summary = _run("gs://imgclf-no-such-bucket/flowers/", tmp_path / "run")
    # The look at the data is the first step to list the bucket.
    assert summary["status"] == "failed" and summary["failed_step"] == "look-at-data", summary
    assert "imgclf-no-such-bucket" in summary["error"] and "does not exist" in summary["error"]
