"""validate_dataset puts every listed file in exactly one list, with a reason, and names what is fatal."""

import base64
import functools
import io
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image

from tests.support import datasets as ds
from trainer import logs, resources
from trainer.data import validation
from trainer.data.validation import validate_dataset
from trainer.errors import DataError


def outcome_of(result: dict) -> dict[str, tuple[str, str | None]]:
    """{path: (list name, rejection code)} over the three lists of a validation result."""
    found = {}
    for kind in ("accepted", "rejected", "skipped"):
        for entry in result[kind]:
            assert entry["path"] not in found, f"{entry['path']} is in two lists"
            found[entry["path"]] = (kind, entry.get("code"))
    return found


def assert_reconciles(result: dict) -> None:
    counts = result["counts"]
    assert result["listed"] == counts["listed"] == counts["accepted"] + counts["rejected"] + counts["skipped"]
    assert [len(result[k]) for k in ("accepted", "rejected", "skipped")] == [
        counts["accepted"], counts["rejected"], counts["skipped"]]
    assert sum(result["class_counts"].values()) == counts["accepted"]


def test_tiny_dataset_passes(tiny_dataset, tmp_path):
    out = tmp_path / "out"
    summary = validate_dataset(str(tiny_dataset), str(out), workers=2)
    result = ds.validation_with_lists(out)
    assert_reconciles(result)
    assert result["classes"] == ["cats", "dogs", "fish"]
    assert result["class_counts"] == {"cats": 10, "dogs": 10, "fish": 10}
    assert result["fatal"] == [] and result["rejected"] == [] and result["skipped"] == []
    entry = result["accepted"][0]
    assert entry["path"] == "cats/cats_000.jpg" and entry["class"] == "cats"
    assert (entry["width"], entry["height"], entry["format"]) == (40, 30, "JPEG") and len(entry["sha256"]) == 64
    assert result["statistics"]["formats"] == {"JPEG": 30}
    assert result["statistics"]["width"] == {"min": 40, "median": 40, "max": 40}
    assert result["imbalance"]["ratio"] == 1.0
    assert json.loads((out / "validation.json").read_text()) == summary
    assert summary["files"] == {"accepted": "accepted.jsonl", "rejected": "rejected.jsonl",
                                "skipped": "skipped.jsonl", "duplicates": "duplicates.jsonl"}
    assert "accepted" not in json.loads((out / "validation.json").read_text())  # the lists stream from files
    report = (out / "report.md").read_text()
    assert "**Result: passed.**" in report and "| 0 | `cats` | 10 | 33.3% |" in report


def test_bad_inputs_corpus_every_file_accounted_for(bad_corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(DataError) as info:
        validate_dataset(str(bad_corpus.root), str(out), max_pixels=bad_corpus.max_pixels, workers=3)
    # The files are written before the error is raised, and the error lists every fatal problem.
    result = ds.validation_with_lists(out)
    assert_reconciles(result)
    assert outcome_of(result) == bad_corpus.expected
    for fragment in bad_corpus.fatal:
        assert any(fragment in problem for problem in result["fatal"]), fragment
        assert fragment in str(info.value)
    assert len(result["fatal"]) == 5 and "report.md" in str(info.value)
    report = (out / "report.md").read_text()
    assert "**Result: FAILED** with 5 fatal problem(s)." in report
    assert "| `good/zero_bytes.jpg` | empty file (0 bytes)" in report


def test_corpus_reasons_name_the_problem(bad_corpus, tmp_path):
    with pytest.raises(DataError):
        validate_dataset(str(bad_corpus.root), str(tmp_path), max_pixels=bad_corpus.max_pixels)
    result = ds.validation_with_lists(tmp_path)
    reasons = {e["path"]: e["reason"] for e in result["rejected"] + result["skipped"]}
    assert "content is PNG but the extension says JPEG" in reasons["good/png_named.jpg"]
    assert "'odd #*?[] name/shared copy.jpg' (class 'odd #*?[] name')" in reasons["good/shared.jpg"]
    assert "(class 'good')" in reasons["odd #*?[] name/shared copy.jpg"]
    assert "nested folder 'good/nested'" in reasons["good/nested/deeper.jpg"]
    assert "outside any class folder" in reasons["top_level.jpg"]
    assert "1,100,000 pixels" in reasons["good/over_limit.png"]
    assert "_$folder$" in reasons["ghost_$folder$"] and "hidden" in reasons["good/.DS_Store"]
    assert reasons["good/gray16_key.png"].startswith("TensorFlow and Pillow decode it to different pixels (1 of 12")
    # Odd but legal names are classes like any other, in sorted() order.
    assert result["classes"] == sorted(result["classes"]) and ds.ODD_NAME in result["classes"]
    assert ds.NFC_NAME in result["classes"] and ds.NFD_NAME in result["classes"]
    twins = [d for d in result["duplicates"] if not d["conflict"]]
    assert twins == [{"sha256": twins[0]["sha256"], "classes": ["good"], "paths": ["good/twin_1.png",
                                                                                  "good/twin_2.png"],
                      "conflict": False}]
    modes = result["statistics"]["modes"]
    assert {"CMYK", "I;16", "L", "P", "RGBA"} <= set(modes)
    exif = next(e for e in result["accepted"] if e["path"] == "good/exif_6.jpg")
    assert (exif["width"], exif["height"], exif["exif_orientation"]) == (20, 40, 6)


def test_name_collisions_are_fatal_with_both_spellings(tmp_path):
    ds.make_image_folder(tmp_path / "d", {ds.NFC_NAME: 2, ds.NFD_NAME: 2, "Roses": 2, "roses": 2})
    with pytest.raises(DataError) as info:
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"))
    message = str(info.value)
    assert "Unicode normalisation (NFC vs NFD)" in message and "caf\\xe9" in message and "cafe\\u0301" in message
    assert "'Roses' and 'roses' differ only in letter case" in message


@pytest.mark.parametrize("classes,binary,expected", [
    ({"only": 3}, False, "only one class folder ('only')"),
    ({"a": 2, "b": 2, "c": 2}, True, "binary_mode is True but the data set has 3 class(es) ('a', 'b', 'c')"),
])
def test_class_count_problems(tmp_path, classes, binary, expected):
    ds.make_image_folder(tmp_path / "d", classes)
    with pytest.raises(DataError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), binary_mode=binary)


def test_binary_mode_with_two_classes_passes(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"no": 2, "yes": 2})
    assert validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), binary_mode=True)["classes"] == [
        "no", "yes"]


def test_nothing_to_validate(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(DataError, match="no files found under"):
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"))
    (tmp_path / "d" / "loose.jpg").write_bytes(ds.encode(ds.noise(), "JPEG"))
    with pytest.raises(DataError, match="no class folders under"):
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), max_rejected_fraction=1.0)


def test_class_with_only_bad_files_is_empty(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    (tmp_path / "d" / "c").mkdir()
    (tmp_path / "d" / "c" / "broken.jpg").write_bytes(b"")
    (tmp_path / "d" / "c" / ".DS_Store").write_bytes(b"x")
    with pytest.raises(DataError, match=r"class folder 'c' has no usable images \(1 rejected, 1 skipped\)"):
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), max_rejected_fraction=0.5)


def test_rejected_share_limit(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"a": 5, "b": 4})
    (tmp_path / "d" / "b" / "cut.jpg").write_bytes(ds.truncate(ds.encode(ds.noise(), "JPEG")))
    with pytest.raises(DataError) as info:
        validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"))
    assert ("1 of 10 files (10.0%) were rejected, above the limit max_rejected_fraction=0.01 (1.0%)"
            in str(info.value)) and "or raise max_rejected_fraction" in str(info.value)
    validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), max_rejected_fraction=0.1)
    result = ds.validation_with_lists(tmp_path / "out")
    assert result["counts"] == {"listed": 10, "accepted": 9, "rejected": 1, "skipped": 0}
    assert result["rejected"] == [{"path": "b/cut.jpg", "reason": result["rejected"][0]["reason"],
                                   "code": "truncated", "class": "b"}]


def test_parameters_are_checked(tmp_path):
    with pytest.raises(ValueError, match="max_rejected_fraction"):
        validate_dataset(str(tmp_path), str(tmp_path), max_rejected_fraction=1.5)


def test_bounded_map_keeps_order_and_bounds_work_in_flight():
    running, peak, lock = 0, 0, threading.Lock()

    def work(x):
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(0.002 * (x % 3))
        with lock:
            running -= 1
        return x * x

    started = []

    def items():
        for i in range(40):
            started.append(i)
            yield i

    results = []
    for value in validation.bounded_map(work, items(), workers=3, window=5):
        results.append(value)
        # Never more than `window` items taken from the input beyond what was consumed.
        assert len(started) - len(results) <= 5
    assert results == [i * i for i in range(40)] and peak <= 3


def test_bounded_map_propagates_errors():
    def work(x):
        if x == 3:
            raise ValueError("boom")
        return x

    with pytest.raises(ValueError, match="boom"):
        list(validation.bounded_map(work, range(10), workers=2))


def test_progress_log_reports_rate_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="trainer.data.validation.progress")
    progress = logs.ProgressLog("validated", 10, interval=0.0, logger=logs.progress_logger("trainer.data.validation"))
    progress.advance(4)
    progress.finish()
    assert "validated: 4/10 images (40%)" in caplog.text and "left" in caplog.text and "images/s" in caplog.text


def test_validation_progress_has_a_total_and_time_left_when_the_look_counted_the_files(tmp_path, caplog,
                                                                                       monkeypatch):
    """The listing streams, so only the look's count gives validation's progress line its total."""
    ds.make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    monkeypatch.setattr(validation.logs, "ProgressLog", functools.partial(logs.ProgressLog, interval=0.0))
    caplog.set_level(logging.INFO, logger="trainer.data.validation.progress")
    validation.validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), expected_files=6, html_report=False)
    assert re.search(r"validated: [1-6]/6 files \(\d+%\), .* files/s, about .* left", caplog.text), caplog.text
    caplog.clear()
    validation.validate_dataset(str(tmp_path / "d"), str(tmp_path / "out2"), html_report=False)
    assert "left" not in caplog.text and "validated: 6 files" in caplog.text


def test_report_shows_odd_names_verbatim(tmp_path):
    ds.make_image_folder(tmp_path / "d", {"pipe|name": 2, "tick`name": 2})
    validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"))
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| 0 | `pipe\\|name` | 2 | 50.0% |" in report and "| 1 | `` tick`name `` | 2 | 50.0% |" in report


def test_fingerprint_follows_content_and_status_not_order(tmp_path):
    # A JPEG comment changes the file's bytes but not its pixels: the fingerprint must follow the bytes.
    picture = ds.noise(30, 40, seed=3)
    for folder in ("d", "copy"):
        ds.make_image_folder(tmp_path / folder, {"a": 3, "b": 3})
        (tmp_path / folder / "a" / "commented.jpg").write_bytes(ds.encode(picture, "JPEG", comment=b"x"))
    first = validate_dataset(str(tmp_path / "d"), str(tmp_path / "v1"))
    again = validate_dataset(str(tmp_path / "d"), str(tmp_path / "v2"))
    elsewhere = validate_dataset(str(tmp_path / "copy"), str(tmp_path / "v3"))
    assert len(first["fingerprint"]) == 64
    assert first["fingerprint"] == again["fingerprint"] == elsewhere["fingerprint"]
    assert json.loads((tmp_path / "v1" / "validation.json").read_text())["fingerprint"] == first["fingerprint"]
    assert f"Data fingerprint: `{first['fingerprint']}`" in (tmp_path / "v1" / "report.md").read_text()
    assert validation.compute_data_fingerprint(str(tmp_path / "v3" / "validation.json")) == first["fingerprint"]

    (tmp_path / "d" / "a" / "commented.jpg").write_bytes(ds.encode(picture, "JPEG", comment=b"y"))
    changed = validate_dataset(str(tmp_path / "d"), str(tmp_path / "v4"))
    assert changed["counts"] == first["counts"] and changed["fingerprint"] != first["fingerprint"]

    # A file newly rejected, or newly skipped, changes the counts a conversion records: a new fingerprint.
    (tmp_path / "copy" / "b" / "cut.jpg").write_bytes(b"")
    rejected = validate_dataset(str(tmp_path / "copy"), str(tmp_path / "v5"), max_rejected_fraction=0.5)
    (tmp_path / "copy" / "b" / ".DS_Store").write_bytes(b"x")
    skipped = validate_dataset(str(tmp_path / "copy"), str(tmp_path / "v6"), max_rejected_fraction=0.5)
    assert len({first["fingerprint"], rejected["fingerprint"], skipped["fingerprint"]}) == 3


def _img_sources(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]*)"', page)


def test_html_report_shows_classes_thumbnails_and_rejected_files(tmp_path):
    data = tmp_path / "d"
    ds.make_image_folder(data, {"cats": 6, "dogs": 5, "<script>": 3}, size=(80, 60))
    (data / "dogs" / "cut.jpg").write_bytes(ds.truncate(ds.encode(ds.noise(), "JPEG")))
    (data / "dogs" / "old").mkdir()
    (data / "dogs" / "old" / "nested.jpg").write_bytes(ds.encode(ds.noise(seed=9), "JPEG"))
    result = validate_dataset(str(data), str(tmp_path / "out"), max_rejected_fraction=0.5)
    page = (tmp_path / "out" / "report.html").read_text()

    for name in ("cats", "dogs", "&lt;script&gt;"):
        assert f"<code>{name}</code>" in page
    assert "<script" not in page  # the class name is text, never markup
    # 4 per class (3 for the class with 3 images), and the nested file, which is still a picture.
    sources = _img_sources(page)
    assert len(sources) == page.count("<img ") == 4 + 4 + 3 + 1
    assert all(s.startswith("data:image/jpeg;base64,") for s in sources)
    assert "http" not in page and "url(" not in page  # nothing is loaded from elsewhere
    thumbnail = Image.open(io.BytesIO(base64.b64decode(sources[0].split(",", 1)[1])))
    assert max(thumbnail.size) == validation.THUMBNAIL_PIXELS
    # The truncated file is listed with its reason and a placeholder instead of a picture.
    row = next(line for line in page.splitlines() if "dogs/cut.jpg</code>" in line)
    assert "truncated JPEG file" in row and "<img" not in row and 'class="none"' in row
    assert 'alt="dogs/old/nested.jpg"' in page and "nested folder" in page

    fewer = validation.render_html_report(result, str(tmp_path / "out" / "validation.json"), thumbnails_per_class=1)
    assert len(_img_sources(fewer)) == 3 + 1


def test_html_report_is_capped_and_survives_missing_files(tmp_path, monkeypatch):
    data = tmp_path / "d"
    ds.make_image_folder(data, {f"class_{i}": 2 for i in range(6)}, size=(16, 16))
    result = validate_dataset(str(data), str(tmp_path / "out"), html_report=False)
    assert not (tmp_path / "out" / "report.html").exists()
    monkeypatch.setattr(validation, "MAX_THUMBNAILS", 4)
    (data / "class_0" / "class_0_000.jpg").unlink()  # gone since validation: a placeholder, no failure
    page = validation.render_html_report(result, str(tmp_path / "out" / "validation.json"))
    assert len(_img_sources(page)) == 3 and page.count('class="none"') == 1
    assert all(f"<code>class_{i}</code>" in page for i in range(6))


def test_file_tensorflow_cannot_decode_is_rejected_so_training_never_meets_it(tmp_path):
    """Pillow reads the too-wide PNG, TensorFlow (which training and serving decode with) refuses it:
    validation rejects it, and the converted data set decodes from the first record to the last."""
    from trainer.data import conversion, reader

    ds.make_image_folder(tmp_path / "d", {"a": 4, "b": 4}, fmt="png")
    (tmp_path / "d" / "a" / "wide.png").write_bytes(ds.too_wide_png())
    result = validate_dataset(str(tmp_path / "d"), str(tmp_path / "v"), max_rejected_fraction=0.2)
    [rejected] = ds.validation_with_lists(tmp_path / "v")["rejected"]
    assert (rejected["path"], rejected["code"]) == ("a/wide.png", "tensorflow_unreadable")
    assert rejected["reason"] == (
        "Pillow reads it but TensorFlow cannot decode it (Invalid PNG. Failed to initialize decoder), and training"
        " and serving decode with TensorFlow; re-save it as a baseline JPEG or PNG")
    assert result["statistics"]["rejected_by_code"] == {"tensorflow_unreadable": 1}
    conversion.convert_dataset(str(tmp_path / "d"), str(tmp_path / "v" / "validation.json"), str(tmp_path / "o"),
                               validation_split_ratio=0.0, test_split_ratio=0.0)
    batches = reader.make_dataset(str(tmp_path / "o"), "train", batch_size=3, training=True, seed=0, num_classes=2,
                                binary_mode=False, image_size=8, interpolation="bilinear")
    assert sum(len(images) for images, _ in batches) == 8


# --- one decode where one suffices; quiet output; worker counts ------------------------------------------

def _write(folder, files: dict[str, bytes]) -> None:
    for relative, blob in files.items():
        path = folder / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)


def _run_validate(data, out) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    return subprocess.run([sys.executable, "-m", "trainer", "validate-data", "--data", str(data), "--output",
                           str(out), "--max-rejected-fraction", "1"], capture_output=True, text=True, env=env,
                          timeout=300)


def test_plain_data_set_is_validated_without_tensorflow(tmp_path):
    _write(tmp_path / "data", {f"c{k}/{i}.jpg": ds.encode(ds.noise(seed=10 * k + i), "JPEG") for k in range(2)
                               for i in range(3)})
    code = ("import sys; from trainer.data.validation import validate_dataset; "
            f"r = validate_dataset({str(tmp_path / 'data')!r}, {str(tmp_path / 'out')!r}); "
            "assert r['counts']['accepted'] == 6, r['counts']; "
            "assert r['statistics']['tensorflow_checked'] == {}; "
            "print('tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_validate_data_output_is_progress_and_results_not_tensorflow_internals(tmp_path):
    # CMYK and palette files take the TensorFlow path; the truncated one is refused.
    _write(tmp_path / "data", {
        "a/cmyk.jpg": ds.cmyk_jpeg(ds.noise(seed=1)), "a/plain.jpg": ds.encode(ds.noise(seed=2), "JPEG"),
        "b/palette.png": ds.palette_with_transparency(), "b/plain.png": ds.encode(ds.noise(seed=3), "PNG"),
        "b/cut.jpg": ds.truncate(ds.cmyk_jpeg(ds.noise(seed=4))),
    })
    result = _run_validate(tmp_path / "data", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "Skipping loop optimization" not in output
    assert not re.search(r"^[WE]0000 ", output, re.MULTILINE), output
    assert "validated: 5 files" in output and "4 accepted, 1 rejected" in output
    assert "2 classes, 4 images accepted, 1 rejected" in result.stdout
    report = ds.validation_with_lists(tmp_path / "out")
    checked = {e["path"]: e["tensorflow_checked"] for e in report["accepted"]}
    assert checked == {"a/cmyk.jpg": "CMYK JPEG", "a/plain.jpg": None, "b/palette.png": "palette PNG",
                       "b/plain.png": None}
    assert report["statistics"]["tensorflow_checked"] == {"CMYK JPEG": 1, "palette PNG": 1}


def test_available_cores_follows_affinity_and_a_cgroup_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: set(range(16)))
    assert resources.available_cores(str(tmp_path / "none")) == 16
    (tmp_path / "v2").mkdir()
    (tmp_path / "v2" / "cpu.max").write_text("150000 100000\n")
    assert resources.available_cores(str(tmp_path / "v2")) == 2  # 1.5 CPUs: two threads keep it busy
    (tmp_path / "v2" / "cpu.max").write_text("max 100000\n")
    assert resources.available_cores(str(tmp_path / "v2")) == 16
    (tmp_path / "v1" / "cpu").mkdir(parents=True)
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("400000")
    (tmp_path / "v1" / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert resources.available_cores(str(tmp_path / "v1")) == 4
    (tmp_path / "v1" / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert resources.available_cores(str(tmp_path / "v1")) == 16
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda pid: {0})
    assert resources.available_cores(str(tmp_path / "v1")) == 1


def test_default_workers_one_per_core_locally_more_for_object_storage():
    assert validation.default_workers("/data/flowers", cores=2) == 2
    assert validation.default_workers("file:///data", cores=6) == 6
    assert validation.default_workers("gs://bucket/flowers", cores=2) == 8
    assert validation.default_workers("gs://bucket/flowers", cores=64) == 32
    assert validation.default_workers(None, cores=3) == 12


def test_storage_failure_fails_the_step_naming_the_object_but_a_corrupt_image_is_rejected(
        gcs_bucket, gcs_proxy, tmp_path, monkeypatch):
    """The proxy stands in for GCS failing one object for good (every download of it answers 503); the
    emulator serves the rest. The retry deadline is cut from 120 s to 2 s to keep the test short."""
    from google.cloud.storage.retry import DEFAULT_RETRY

    from tests.support.gcs import upload_folder
    from trainer import storage
    from trainer.errors import StorageError

    ds.make_image_folder(tmp_path / "d", {"a": 5, "b": 5}, size=(16, 16))
    (tmp_path / "d" / "b" / "cut.jpg").write_bytes(ds.truncate(ds.encode(ds.noise(), "JPEG")))
    data_uri = upload_folder(tmp_path / "d", gcs_bucket, "data")
    monkeypatch.setattr(storage, "_RETRY", DEFAULT_RETRY.with_timeout(2))
    gcs_proxy.inject("GET", r"^/download/.*a_002\.jpg$", 503, times=None)
    with pytest.raises(StorageError) as raised:
        validate_dataset(data_uri, str(tmp_path / "out"), max_rejected_fraction=0.2, workers=2)
    message = str(raised.value)
    assert f"{data_uri}/a/a_002.jpg" in message and "failed even after retries" in message
    assert "ServiceUnavailable" in message or "503" in message
    assert not (tmp_path / "out" / "validation.json").exists()  # nothing is recorded as validated

    # Storage heals (the pipeline's retry of the step): the corrupt image alone is rejected.
    gcs_proxy.clear()
    validate_dataset(data_uri, str(tmp_path / "out"), max_rejected_fraction=0.2, workers=2)
    result = ds.validation_with_lists(tmp_path / "out")
    assert result["counts"] == {"listed": 11, "accepted": 10, "rejected": 1, "skipped": 0}
    assert [(r["path"], r["code"]) for r in result["rejected"]] == [("b/cut.jpg", "truncated")]


def test_reports_stay_small_and_every_rejected_file_is_in_its_list(tmp_path, monkeypatch):
    monkeypatch.setattr(validation, "_REPORT_ROWS", 3)
    ds.make_image_folder(tmp_path / "d", {"a": 6, "b": 6}, size=(8, 8))
    for i in range(7):
        (tmp_path / "d" / "b" / f"cut_{i}.jpg").write_bytes(b"")
    validate_dataset(str(tmp_path / "d"), str(tmp_path / "out"), max_rejected_fraction=0.9)
    markdown = (tmp_path / "out" / "report.md").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    for report, row in ((markdown, "| `b/cut_"), (page, "<td><code>b/cut_")):
        assert report.count(row) == 3 and "4 more in rejected.jsonl (every one is listed there)." in report
    assert "b/cut_3.jpg" not in markdown
    listed = [e["path"] for e in validation.read_results(str(tmp_path / "out" / "validation.json"), "rejected")]
    assert listed == [f"b/cut_{i}.jpg" for i in range(7)]
    summary = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert summary["counts"]["rejected"] == 7 and "rejected" not in summary


def test_memory_per_file_is_a_few_bytes_not_a_record(tmp_path):
    """What validation and conversion keep per file: tracemalloc's peak (Python and NumPy allocations)
    grows by well under 400 bytes a file from 400 to 2,000 files (a dict per file costs over 1 KB)."""
    import tracemalloc

    from trainer.data import conversion

    peaks = {}
    for count in (400, 2000):
        data = tmp_path / f"d{count}"
        for i in range(count):
            folder = data / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:05d}.png").write_bytes(ds.encode(ds.noise(4, 4, seed=i), "PNG"))
        tracemalloc.start()
        try:
            # Each step's peak over what was allocated before it started.
            validate_dataset(str(data), str(tmp_path / f"v{count}"), html_report=False, workers=2)
            validated = tracemalloc.get_traced_memory()[1]
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            conversion.convert_dataset(str(data), str(tmp_path / f"v{count}" / "validation.json"),
                                       str(tmp_path / f"o{count}"), workers=2)
            peaks[count] = (validated, tracemalloc.get_traced_memory()[1] - before)
        finally:
            tracemalloc.stop()
    for index, step in enumerate(("validation", "conversion")):
        per_file = (peaks[2000][index] - peaks[400][index]) / 1600
        assert per_file < 400, f"{step}: {per_file:.0f} bytes a file"
