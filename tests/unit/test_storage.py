"""trainer.storage on local folders and on gs:// URIs.

gcp-storage-emulator, a real GCS JSON API server on loopback, stands in for Cloud Storage. Where the
emulator lacks a GCS behaviour, GcsFaultProxy (tests/support/gcs.py), a loopback proxy in front of the
emulator, stands in for that part of GCS, and the test says so: listings paged at 1,000 objects (the
emulator returns one page), 403 and 503 answers, a connection reset in the middle of a download, and an
object name containing '..' (the emulator's store cannot hold one: it drops the connection).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.cloud.storage.retry import DEFAULT_RETRY

from tests.support.gcs import GcsFaultProxy, emulator_client, new_bucket, upload_folder
from trainer import storage
from trainer.errors import StorageError

SAMPLE = {
    "cat/a.jpg": b"cat-a",
    "cat/sub/b.jpg": b"cat-b",
    "dog/ünï cödé #1.png": b"dog",
    ".DS_Store": b"finder",
    "dog_$folder$": b"",
}


def make_folder(path: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)
    return path


@pytest.fixture(params=["local", "gcs"])
def base(request, tmp_path) -> str:
    """An empty place to store things: a local folder, or a fresh bucket in the emulator."""
    if request.param == "local":
        return str(tmp_path / "store")
    return f"gs://{request.getfixturevalue('gcs_bucket')}"


@pytest.fixture(params=["local", "gcs"])
def sample_root(request, tmp_path) -> str:
    """SAMPLE staged without trainer.storage, as a local folder or under gs://BUCKET/data."""
    folder = make_folder(tmp_path / "sample", SAMPLE)
    if request.param == "local":
        return str(folder)
    return upload_folder(folder, request.getfixturevalue("gcs_bucket"), "data")


def no_partial_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".partial")]


# --- paths -------------------------------------------------------------------------------------------


def test_is_gcs_and_join():
    assert storage.is_gcs("gs://b/x") and not storage.is_gcs("/data/gs://b") and not storage.is_gcs("b/x")
    assert storage.join("gs://b", "data", "x.jpg") == "gs://b/data/x.jpg"
    assert storage.join("gs://b/", "/data/", "/x.jpg") == "gs://b/data/x.jpg"
    assert storage.join("gs://b/data/") == "gs://b/data"
    assert storage.join("/tmp/a", "/b/", "c") == "/tmp/a/b/c"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a/b.jpg", "a/b.jpg"),
        ("a/./b.jpg", "a/b.jpg"),
        ("a/x/../b.jpg", "a/b.jpg"),
        ("ü #?[]*.jpg", "ü #?[]*.jpg"),
    ],
)
def test_safe_relative_path_normalises(name, expected):
    assert storage.safe_relative_path(name) == expected


@pytest.mark.parametrize(
    "name",
    ["a/../../b", "..", "../b", "a/..", "/etc/passwd", "a\\..\\..\\b", "..\\b", "a//b", "a/", "", "a/\x00b"],
)
def test_safe_relative_path_refuses_escapes(name):
    with pytest.raises(StorageError, match="refusing object name"):
        storage.safe_relative_path(name)


def test_import_reads_no_environment_and_creates_no_client():
    code = (
        "import os; os.environ.pop('STORAGE_EMULATOR_HOST', None); "
        "os.environ['GOOGLE_APPLICATION_CREDENTIALS'] = '/nonexistent/key.json'; "
        "import trainer.storage as s; assert s._client_for.cache_info().currsize == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2], timeout=60)


def test_missing_credentials_are_reported_as_such(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    for call in (lambda: storage.read_bytes("gs://b/x"), lambda: storage.write_bytes("gs://b/x", b"1")):
        with pytest.raises(StorageError, match="cannot authenticate.*gs://b/x.*service account"):
            call()


# --- listing -----------------------------------------------------------------------------------------


def test_list_files_lists_everything_relative_and_sorted(sample_root):
    assert storage.list_files(sample_root) == sorted(SAMPLE)
    assert storage.list_files(sample_root + "/") == sorted(SAMPLE)


def test_delete_tree_removes_everything_below_a_folder_and_nothing_beside_it(base):
    for name in ("backup/1/weights.h5", "backup/1/sub/state.json", "backup/10/keep.json"):
        storage.write_bytes(storage.join(base, name), b"x")
    assert storage.delete_tree(storage.join(base, "backup/1")) == 2
    assert storage.delete_tree(storage.join(base, "backup/1")) == 0  # nothing there any more
    assert storage.list_files(storage.join(base, "backup")) == ["10/keep.json"]


def test_list_files_gcs_prefix_does_not_match_siblings(gcs_bucket, tmp_path):
    folder = make_folder(
        tmp_path / "f", {"data/x.jpg": b"1", "data2/y.jpg": b"2", "data.txt": b"3", "data_$folder$": b""}
    )
    emulator_client().bucket(gcs_bucket).blob("data/").upload_from_string(b"")  # console-made folder marker
    upload_folder(folder, gcs_bucket)
    assert storage.list_files(f"gs://{gcs_bucket}/data") == ["x.jpg"]
    assert storage.list_files(f"gs://{gcs_bucket}/data/") == ["x.jpg"]
    assert storage.list_files(f"gs://{gcs_bucket}") == sorted(
        ["data/", "data/x.jpg", "data2/y.jpg", "data.txt", "data_$folder$"]
    )


def test_list_files_gcs_missing_bucket_and_missing_prefix_say_different_things(gcs_bucket, tmp_path):
    with pytest.raises(StorageError) as missing_bucket:
        storage.list_files("gs://no-such-bucket-imgclf/data")
    assert "bucket 'no-such-bucket-imgclf' does not exist" in str(missing_bucket.value)
    upload_folder(make_folder(tmp_path / "f", {"data/x.jpg": b"1"}), gcs_bucket)
    with pytest.raises(StorageError) as missing_prefix:
        storage.list_files(f"gs://{gcs_bucket}/dat")
    assert f"no objects found under gs://{gcs_bucket}/dat/" in str(missing_prefix.value)
    assert "does not exist" not in str(missing_prefix.value)


def test_list_files_local_errors(tmp_path):
    with pytest.raises(StorageError, match="does not exist.*mounted"):
        storage.list_files(str(tmp_path / "missing"))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(StorageError, match="is a file, not a folder"):
        storage.list_files(str(tmp_path / "file.txt"))
    (tmp_path / "empty").mkdir()
    assert storage.list_files(str(tmp_path / "empty")) == []


def test_list_files_local_follows_linked_folders_but_not_cycles(tmp_path):
    make_folder(tmp_path / "real", {"x.jpg": b"1"})
    make_folder(tmp_path / "root", {"a.jpg": b"2"})
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "real")
    (tmp_path / "root" / "loop").symlink_to(tmp_path / "root")
    assert storage.list_files(f"file://{tmp_path / 'root'}") == ["a.jpg", "linked/x.jpg"]


@pytest.fixture(scope="module")
def big_prefix(gcs_emulator, tmp_path_factory) -> str:
    """1,001 objects under one prefix: one more than a GCS listing page holds."""
    folder = tmp_path_factory.mktemp("many")
    for i in range(1001):
        (folder / f"{i:05d}.jpg").write_bytes(b"x")
    return upload_folder(folder, new_bucket(), "many")


def test_list_files_more_than_1000_objects(big_prefix):
    names = storage.list_files(big_prefix)
    assert len(names) == 1001 and names[0] == "00000.jpg" and names[-1] == "01000.jpg"


def test_list_files_pages_through_1000_object_pages(big_prefix, gcs_proxy: GcsFaultProxy):
    """The proxy stands in for GCS's paging (the emulator sends every object in one page)."""
    assert len(storage.list_files(big_prefix)) == 1001
    pages = gcs_proxy.seen("GET", r"^/storage/v1/b/[^/]+/o$")
    assert len(pages) == 2 and pages[1].query["pageToken"] == ["1000"]


# --- single files ------------------------------------------------------------------------------------


def test_write_and_read_bytes_round_trip_and_overwrite(base, tmp_path):
    uri = storage.join(base, "model", "deep", "weights.bin")
    storage.write_bytes(uri, b"first")
    storage.write_bytes(uri, b"second")  # an overwrite is conditional on the generation it replaces
    assert storage.read_bytes(uri) == b"second"
    assert storage.list_files(storage.join(base, "model")) == ["deep/weights.bin"]


def test_read_bytes_missing_names_the_uri(base):
    uri = storage.join(base, "nope.bin")
    if storage.is_gcs(uri):
        storage.write_bytes(storage.join(base, "other.bin"), b"x")
    with pytest.raises(StorageError, match=f"{uri}.*(does not exist|No such file)"):
        storage.read_bytes(uri)


def test_download_and_upload_file_round_trip(base, tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(300_000))
    uri = storage.join(base, "dir", "file.bin")
    storage.upload_file(str(source), uri)
    target = tmp_path / "out" / "nested" / "copy.bin"
    storage.download_file(uri, str(target))
    assert target.read_bytes() == source.read_bytes()
    assert no_partial_files(tmp_path)


def test_download_file_missing_creates_nothing(base, tmp_path):
    if storage.is_gcs(base):
        storage.write_bytes(storage.join(base, "other.bin"), b"x")
    target = tmp_path / "out" / "copy.bin"
    with pytest.raises(StorageError, match="nope.bin"):
        storage.download_file(storage.join(base, "nope.bin"), str(target))
    assert not target.exists() and no_partial_files(tmp_path)


def test_upload_file_missing_local_file(base, tmp_path):
    with pytest.raises(StorageError, match="missing.bin"):
        storage.upload_file(str(tmp_path / "missing.bin"), storage.join(base, "x.bin"))


# --- trees -------------------------------------------------------------------------------------------


def test_download_tree_copies_everything(sample_root, tmp_path):
    target = tmp_path / "copy"
    assert storage.download_tree(sample_root, str(target)) == sorted(SAMPLE)
    assert {
        p.relative_to(target).as_posix(): p.read_bytes() for p in target.rglob("*") if p.is_file()
    } == SAMPLE


def test_upload_tree_then_download_tree_round_trip(base, tmp_path):
    folder = make_folder(
        tmp_path / "model",
        {"saved_model.pb": b"pb", "variables/variables.index": b"ix", "assets/labels.txt": b"cat\ndog\n"},
    )
    root = storage.join(base, "exports", "1")
    assert storage.upload_tree(str(folder), root) == sorted(
        ["saved_model.pb", "variables/variables.index", "assets/labels.txt"]
    )
    target = tmp_path / "back"
    storage.download_tree(root, str(target))
    assert (target / "variables" / "variables.index").read_bytes() == b"ix"
    assert (target / "assets" / "labels.txt").read_bytes() == b"cat\ndog\n"


def test_download_tree_refuses_escaping_names_before_copying(gcs_bucket, gcs_proxy: GcsFaultProxy, tmp_path):
    """The emulator cannot store a name containing '..', so the proxy adds it to the listing, as GCS would."""
    upload_folder(make_folder(tmp_path / "f", {"a.jpg": b"1"}), gcs_bucket, "data")
    gcs_proxy.extra_names[gcs_bucket] = ["data/a/../../../escaped.txt"]
    target = tmp_path / "work" / "target"
    with pytest.raises(StorageError, match=r"a/\.\./\.\./\.\./escaped\.txt.*escape"):
        storage.download_tree(f"gs://{gcs_bucket}/data", str(target))
    assert not target.exists() and not list(tmp_path.rglob("escaped.txt"))
    assert not gcs_proxy.seen("GET", r"^/download/")  # nothing was fetched at all


def test_download_tree_refuses_empty_segments_the_emulator_can_store(gcs_bucket, tmp_path):
    emulator_client().bucket(gcs_bucket).blob("data/a//b.jpg").upload_from_string(b"1")
    with pytest.raises(StorageError, match="empty path segment"):
        storage.download_tree(f"gs://{gcs_bucket}/data", str(tmp_path / "target"))


# --- faults ------------------------------------------------------------------------------------------


def test_transient_503_is_retried_for_every_operation(gcs_bucket, gcs_proxy: GcsFaultProxy, tmp_path):
    """The proxy stands in for a GCS front end that answers 503 once per request kind."""
    for method, path in [("POST", r"^/upload/"), ("GET", r"/o$"), ("GET", r"^/download/")]:
        gcs_proxy.inject(method, path, 503, times=1)
    uri = f"gs://{gcs_bucket}/data/x.bin"
    storage.write_bytes(uri, b"payload")
    assert storage.list_files(f"gs://{gcs_bucket}/data") == ["x.bin"]
    assert storage.read_bytes(uri) == b"payload"
    uploads = gcs_proxy.seen("POST", r"^/upload/")
    assert len(uploads) == 2  # the 503 and the retry
    # The retried upload was conditional (0: only if absent), which is what makes resending it safe.
    assert all(u.query["ifGenerationMatch"] == ["0"] for u in uploads)
    assert len(gcs_proxy.seen("GET", r"/o$")) == 2 and len(gcs_proxy.seen("GET", r"^/download/")) == 2


def test_reset_mid_download_is_resumed(gcs_bucket, gcs_proxy: GcsFaultProxy, tmp_path):
    """The proxy stands in for GCS cutting the connection half-way through the body."""
    data = os.urandom(2_000_000)
    storage.write_bytes(f"gs://{gcs_bucket}/big.bin", data)
    gcs_proxy.inject("GET", r"^/download/.*/big\.bin$", "reset", times=1)
    target = tmp_path / "big.bin"
    storage.download_file(f"gs://{gcs_bucket}/big.bin", str(target))
    assert target.read_bytes() == data
    # The retry asked only for the rest: from the last whole chunk received, not from byte 0.
    resumed = gcs_proxy.seen("GET", r"^/download/")[1].headers
    offset = int(re.fullmatch(r"bytes=(\d+)-", resumed.get("Range", resumed.get("range", ""))).group(1))
    assert 0 < offset <= len(data) // 2


def test_download_that_keeps_failing_leaves_no_partial_file(gcs_bucket, gcs_proxy, tmp_path, monkeypatch):
    """The proxy resets every attempt; the retry deadline is cut from 120 s to 2 s to keep the test short."""
    storage.write_bytes(f"gs://{gcs_bucket}/big.bin", os.urandom(500_000))
    gcs_proxy.inject("GET", r"^/download/", "reset", times=None)
    monkeypatch.setattr(storage, "_RETRY", DEFAULT_RETRY.with_timeout(2))
    target = tmp_path / "out" / "big.bin"
    with pytest.raises(StorageError, match=f"gs://{gcs_bucket}/big.bin.*failed even after retries"):
        storage.download_file(f"gs://{gcs_bucket}/big.bin", str(target))
    assert not target.exists() and no_partial_files(tmp_path)
    assert len(gcs_proxy.seen("GET", r"^/download/")) >= 2  # it did retry before giving up
    target.write_bytes(b"previous good copy")
    with pytest.raises(StorageError):
        storage.download_file(f"gs://{gcs_bucket}/big.bin", str(target))
    assert target.read_bytes() == b"previous good copy"


def test_403_is_reported_as_permission_problem_not_missing(gcs_bucket, gcs_proxy: GcsFaultProxy, tmp_path):
    """The emulator never says 403; the proxy stands in for GCS refusing the service account."""
    storage.write_bytes(f"gs://{gcs_bucket}/data/x.bin", b"1")
    gcs_proxy.inject("GET", r"/o$", 403, times=None)
    gcs_proxy.inject("GET", r"^/download/", 403, times=None)
    gcs_proxy.inject("POST", r"^/upload/", 403, times=None)
    calls = {
        f"gs://{gcs_bucket}/data/": lambda: storage.list_files(f"gs://{gcs_bucket}/data"),
        f"gs://{gcs_bucket}/data/x.bin": lambda: storage.read_bytes(f"gs://{gcs_bucket}/data/x.bin"),
        f"gs://{gcs_bucket}/data/y.bin": lambda: storage.write_bytes(f"gs://{gcs_bucket}/data/y.bin", b"2"),
    }
    for uri, call in calls.items():
        with pytest.raises(StorageError) as raised:
            call()
        message = str(raised.value)
        assert "permission denied (HTTP 403)" in message and uri in message and "service account" in message
        assert "does not exist" not in message


@pytest.fixture(params=["local", "gcs"])
def exclusive_base(request, tmp_path) -> str:
    """Like ``base``, but gs:// goes through the proxy, which applies ifGenerationMatch (the emulator does not)."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("gcs_proxy")
    return f"gs://{request.getfixturevalue('gcs_bucket')}"


def test_create_if_absent_lets_exactly_one_of_racing_writers_win(exclusive_base, tmp_path):
    import threading
    from concurrent.futures import ThreadPoolExecutor

    uri = storage.join(exclusive_base, "claims", "000001")
    start = threading.Barrier(6, timeout=30)

    def claim(index: int) -> bool:
        start.wait()
        return storage.create_if_absent(uri, f"writer {index}".encode())

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(claim, range(6)))
    assert results.count(True) == 1
    assert storage.read_bytes(uri) == f"writer {results.index(True)}".encode()
    assert storage.list_files(storage.join(exclusive_base, "claims")) == ["000001"]  # nothing staged is left


def test_delete_removes_one_file_and_says_whether_there_was_one(base):
    uri = storage.join(base, "a", "manifest.json")
    storage.write_bytes(uri, b"{}")
    storage.write_bytes(storage.join(base, "a", "kept"), b"x")
    assert storage.delete(uri) is True
    assert storage.delete(uri) is False
    assert storage.list_files(storage.join(base, "a")) == ["kept"]


def test_retried_create_that_meets_its_own_landed_attempt_counts_as_done(gcs_bucket, gcs_proxy: GcsFaultProxy):
    """The proxy stands in for GCS twice: it applies ifGenerationMatch=0 (the emulator ignores it), and it
    lets the first upload land but answers 503 (a reply lost on the way), so the library's retry meets 412."""
    uri = f"gs://{gcs_bucket}/claims/000001"
    gcs_proxy.inject("POST", r"^/upload/", "lost", times=1)
    assert storage.create_if_absent(uri, b"writer 1, id 5f3a") is True
    uploads = gcs_proxy.seen("POST", r"^/upload/")
    assert len(uploads) == 2  # the first landed and its reply was lost; the retry met 412
    assert storage.read_bytes(uri) == b"writer 1, id 5f3a"
    # Someone else's object under the name is still someone else's, retry or not.
    gcs_proxy.inject("POST", r"^/upload/", "lost", times=1)
    assert storage.create_if_absent(storage.join(f"gs://{gcs_bucket}", "claims", "000002"), b"mine") is True
    assert storage.create_if_absent(storage.join(f"gs://{gcs_bucket}", "claims", "000002"), b"another") is False
    assert storage.read_bytes(storage.join(f"gs://{gcs_bucket}", "claims", "000002")) == b"mine"


def test_retried_upload_that_meets_its_own_landed_attempt_counts_as_done(gcs_bucket, gcs_proxy: GcsFaultProxy,
                                                                        tmp_path):
    """As above for upload_file and write_bytes (conditional on generation 0 for a new object): the first upload
    lands, its reply is lost, the retry meets 412, and the object's MD5 is what was sent, so the write is done."""
    local = tmp_path / "model.bin"
    local.write_bytes(b"weights " * 1000)
    gcs_proxy.inject("POST", r"^/upload/", "lost", times=1)
    storage.upload_file(str(local), f"gs://{gcs_bucket}/model/model.bin")
    assert len(gcs_proxy.seen("POST", r"^/upload/")) == 2
    assert storage.read_bytes(f"gs://{gcs_bucket}/model/model.bin") == local.read_bytes()
    gcs_proxy.inject("POST", r"^/upload/", "lost", times=1)
    storage.write_bytes(f"gs://{gcs_bucket}/model/labels.json", b'{"a": 0}')
    assert storage.read_bytes(f"gs://{gcs_bucket}/model/labels.json") == b'{"a": 0}'


def test_gcs_listing_lists_class_folders_on_their_own_in_path_order(gcs_bucket, gcs_proxy, tmp_path):
    """The proxy pages listings as GCS does; the top level is listed with a delimiter, then each folder."""
    files = {"a.b/x.jpg": b"1", "a/y.jpg": b"2", "a/z/deep.jpg": b"3", "a0.jpg": b"4", "b/": b"",
             "b/w.jpg": b"5", "top.jpg": b"6"}
    uri = upload_folder(make_folder(tmp_path / "d", {k: v for k, v in files.items() if not k.endswith("/")}),
                        gcs_bucket, "data")
    emulator_client().bucket(gcs_bucket).blob("data/b/").upload_from_string(b"")
    assert storage.list_files(uri) == sorted(files)
    folders = [r.query["prefix"][0] for r in gcs_proxy.seen("GET", r"^/storage/v1/b/[^/]+/o$")]
    assert folders[0] == "data/" and sorted(folders[1:]) == ["data/a.b/", "data/a/", "data/b/"]
    assert [d["path"] for d in storage.iter_object_details(uri)] == sorted(files)


def test_local_listing_streams_in_the_order_of_a_full_sort(tmp_path):
    files = ["a.b/x.jpg", "a/y.jpg", "a/z/deep.jpg", "a0.jpg", "b-c/1.jpg", "b/2.jpg", "ü/3.jpg", "Z.jpg"]
    make_folder(tmp_path / "d", {name: b"x" for name in files})
    listing = storage.iter_files(str(tmp_path / "d"))
    assert not isinstance(listing, list) and list(listing) == sorted(files)


def test_gcs_folder_listings_run_only_a_few_pages_ahead(gcs_bucket, gcs_proxy: GcsFaultProxy, tmp_path):
    """The proxy pages listings as GCS does, here 5 objects a page, so that paging ahead shows."""
    import time

    files = {f"c{c}/{i:03d}.jpg": b"x" for c in range(3) for i in range(40)}
    uri = upload_folder(make_folder(tmp_path / "d", files), gcs_bucket, "data")
    gcs_proxy.page_size = 5
    listing = storage.iter_files(uri)
    assert next(listing) == "c0/000.jpg"
    time.sleep(1.0)  # let the folder listers run as far ahead as they may
    pages = len(gcs_proxy.seen("GET", r"^/storage/v1/b/[^/]+/o$"))
    # The top level, then per folder the pages queued (2) and one held by its lister: far from all 24.
    assert pages <= 1 + 3 * (storage._PAGES_AHEAD + 2), pages
    assert ["c0/000.jpg", *listing] == sorted(files)
    assert len(gcs_proxy.seen("GET", r"^/storage/v1/b/[^/]+/o$")) == 1 + 3 * 8


def test_a_folder_that_cannot_be_listed_fails_the_listing_naming_it(gcs_bucket, gcs_proxy, tmp_path, monkeypatch):
    """The proxy stands in for GCS refusing one folder's listing; the retry deadline is cut to 2 s."""
    uri = upload_folder(make_folder(tmp_path / "d", {"a/1.jpg": b"1", "b/2.jpg": b"2"}), gcs_bucket, "data")
    monkeypatch.setattr(storage, "_RETRY", DEFAULT_RETRY.with_timeout(2))
    gcs_proxy.inject("GET", r"^/storage/v1/b/[^/]+/o$", 503, times=None, query_regex=r"prefix=data/a/")
    with pytest.raises(StorageError, match=rf"listing gs://{gcs_bucket}/data/a/ failed even after retries"):
        storage.list_files(uri)
