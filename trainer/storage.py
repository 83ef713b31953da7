"""One storage layer for local paths and gs:// URIs: all data-set and model I/O goes through it."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import io
import os
import posixpath
import queue
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

import requests
from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import GoogleAuthError
from google.cloud import storage
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY, DEFAULT_RETRY_IF_GENERATION_SPECIFIED

from trainer.errors import StorageError

_GS = "gs://"
_FILE = "file://"
# Reads and listings are idempotent, so the library's default policy (429, 5xx, resets; exponential
# back-off, 120 s deadline) applies to them. Kept as a module name so tests can shorten the deadline.
_RETRY = DEFAULT_RETRY
# Whole-file transfers are independent, and GCS latency per object dominates: a few threads help a lot.
_WORKERS = 8
# Pages (of up to 1,000 objects) a folder's listing may run ahead of its reader.
_PAGES_AHEAD = 2
T = TypeVar("T")
_NO_OBJECT = "{uri} does not exist (HTTP 404): check the bucket and object name"
_CREDENTIALS_HINT = (
    "check that the pipeline's service account (Workload Identity on GKE, or GOOGLE_APPLICATION_CREDENTIALS) "
    "has Storage Object Viewer to read and Storage Object Creator/Admin to write on the bucket"
)


def is_gcs(uri: str) -> bool:
    return uri.startswith(_GS)


def join(base: str, *parts: str) -> str:
    """Append path parts; for gs:// the result has no empty segments ('//') and no trailing '/'."""
    if is_gcs(base):
        segments = [s for part in (base[len(_GS) :], *parts) for s in part.split("/") if s]
        return _GS + "/".join(segments)
    # Leading '/' in a part would make os.path.join drop everything before it.
    return os.path.join(base, *(p.strip("/") for p in parts if p.strip("/")))


def local_path(path: str) -> str:
    """A local path given as file:///x or /x, as /x (what ``os`` functions take)."""
    return _local(path)


def safe_relative_path(rel: str) -> str:
    """Return ``rel`` as a normalised relative POSIX path, or raise if it could land outside its folder."""
    problem = None
    if not rel:
        problem = "is empty"
    elif "\\" in rel or "\x00" in rel:
        problem = "contains a backslash or NUL character (a path separator on some systems)"
    elif rel.startswith("/"):
        problem = "is an absolute path"
    elif "" in rel.split("/"):
        problem = "has an empty path segment ('//' or a trailing '/')"
    elif posixpath.normpath(rel) in (".", "..") or posixpath.normpath(rel).startswith("../"):
        problem = "would escape the target folder ('..')"
    if problem:
        raise StorageError(f"refusing object name {rel!r}: it {problem}; rename or remove it at the source")
    return posixpath.normpath(rel)


def list_files(root: str) -> list[str]:
    """Every file or object below ``root`` (recursively) as sorted POSIX paths relative to it.

    Nothing is filtered out (hidden files, '_$folder$' markers): callers decide what to reject.
    A missing local folder, a missing bucket and a gs:// prefix without objects each raise StorageError;
    an existing but empty local folder gives an empty list. ``iter_files`` gives the same one at a time.
    """
    return list(iter_files(root))


def iter_files(root: str) -> Iterator[str]:
    """``list_files`` as a stream, in the same sorted order, holding one folder's names at a time.

    Locally each folder is read and sorted on its own and sub-folders are entered where their names
    sort (a folder ``d`` sorts as ``d/``, which puts its files exactly where a sort of the full paths
    would); on gs:// the top level is listed with a delimiter and its folders (the classes of a data
    set) are listed in parallel, each in name order as GCS lists.
    """
    if is_gcs(root):
        return _iter_gcs_blobs(root, "items(name),nextPageToken", lambda rel, _: rel)
    path = Path(_local(root))
    if not path.exists():
        raise StorageError(f"local path {root} does not exist: check the path and that its volume is mounted")
    if not path.is_dir():
        raise StorageError(f"{root} is a file, not a folder: pass the folder that holds the files")
    return _walk_sorted(str(path), "", root, (os.path.realpath(path),))


def _walk_sorted(folder: str, rel: str, root: str, ancestors: tuple[str, ...]) -> Iterator[str]:
    try:
        with os.scandir(folder) as entries:
            # A folder's key ends in '/': where a sort of full paths puts its files. Links are followed.
            keys = sorted(e.name + "/" if e.is_dir() else e.name for e in entries)
    except OSError as err:
        # A data set must never lose files because a folder could not be read.
        raise StorageError(f"cannot read {err.filename or folder} below {root}: {err.strerror or err}; "
                           "check its permissions") from err
    for key in keys:
        if not key.endswith("/"):
            yield rel + key
            continue
        below = os.path.join(folder, key[:-1])
        real = os.path.realpath(below)
        if real in ancestors:
            continue  # a link back to an ancestor would loop
        yield from _walk_sorted(below, rel + key, root, (*ancestors, real))


def list_object_details(root: str) -> list[dict[str, Any]]:
    """What a listing says about every file below ``root``, without reading any content (a list of
    ``iter_object_details``)."""
    return list(iter_object_details(root))


def iter_object_details(root: str) -> Iterator[dict[str, Any]]:
    """What a listing says about every file below ``root``, in ``iter_files`` order, one at a time.

    Each entry has ``path`` (relative, as in ``list_files``) and ``size``; gs:// objects also have
    ``md5`` (absent for composite objects: ""), ``crc32c`` and ``generation`` (new on every write).
    """
    if not is_gcs(root):
        return ({"path": rel, "size": os.path.getsize(os.path.join(_local(root), rel))} for rel in iter_files(root))
    fields = "items(name,size,md5Hash,crc32c,generation),nextPageToken"
    return _iter_gcs_blobs(root, fields, lambda rel, blob: {
        "path": rel, "size": int(blob.size or 0), "md5": blob.md5_hash or "", "crc32c": blob.crc32c or "",
        "generation": int(blob.generation or 0)})


def read_bytes(uri: str) -> bytes:
    if is_gcs(uri):
        with _gcs_errors(uri, "reading", _NO_OBJECT.format(uri=uri)):
            return _blob(uri).download_as_bytes(retry=_RETRY)
    with _local_errors(uri, "read"):
        return Path(_local(uri)).read_bytes()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` whole: readers see the old content or the new one, never a part."""
    if is_gcs(uri):
        _upload(
            uri,
            lambda blob, gen, retry: blob.upload_from_string(
                data, content_type="application/octet-stream", if_generation_match=gen, retry=retry
            ),
            lambda: _md5(io.BytesIO(data)),
        )
    else:
        with _atomic_file(_local(uri)) as out:
            out.write(data)


def read_bytes_if_exists(uri: str) -> bytes | None:
    """The content of ``uri``, or None when there is no such file or object (other errors raise)."""
    if is_gcs(uri):
        try:
            with _gcs_errors(uri, "reading", _NO_OBJECT.format(uri=uri)):
                return _blob(uri).download_as_bytes(retry=_RETRY)
        except StorageError as err:
            if isinstance(err.__cause__, api_exceptions.NotFound):
                return None
            raise
    try:
        return Path(_local(uri)).read_bytes()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err.strerror or err}; check the path and its permissions") from err


def create_if_absent(uri: str, data: bytes) -> bool:
    """Write ``data`` to ``uri`` only if nothing is there yet; False (and nothing written) if something is.

    Of several writers racing for one name at most one gets True: locally through ``link()``, which
    refuses an existing name (the content is written under a temporary name first), on GCS through the
    precondition ``ifGenerationMatch=0``. On GCS an upload whose answer was lost is sent again, and
    then meets 412 against its own first attempt: so a 412 is checked by the object's MD5 (``_landed``), and
    an object holding exactly ``data`` counts as written by this call. Callers must therefore make ``data``
    unique to the writer (a claim id, a batch id), or two writers of equal bytes would both win.
    """
    if is_gcs(uri):
        missing = f"bucket {_split(uri)[0]!r} does not exist (HTTP 404 writing {uri}): create it or fix the URI"
        try:
            with _gcs_errors(uri, "writing", missing):
                # Conditional on "no object", so the library may resend it safely.
                _blob(uri).upload_from_string(data, content_type="application/octet-stream",
                                              if_generation_match=0, retry=DEFAULT_RETRY_IF_GENERATION_SPECIFIED)
        except StorageError as err:
            if isinstance(err.__cause__, api_exceptions.PreconditionFailed):
                # Someone's object is there: ours when an earlier attempt of this upload landed.
                return _landed(uri, _md5(io.BytesIO(data)))
            raise
        return True
    path = _local(uri)
    staged = f"{path}.{secrets.token_hex(4)}.claim"
    with _atomic_file(staged) as out:
        out.write(data)
    try:
        with _local_errors(uri, "write"):
            try:
                # link() fails if the name exists: the complete file appears under its name, or nothing does.
                os.link(staged, path)
            except FileExistsError:
                return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staged)
    return True


def delete(uri: str) -> bool:
    """Remove one file or object; False if there was none."""
    if is_gcs(uri):
        try:
            with _gcs_errors(uri, "deleting", _NO_OBJECT.format(uri=uri)):
                _blob(uri).delete(retry=_RETRY)
        except StorageError as err:
            if isinstance(err.__cause__, api_exceptions.NotFound):
                return False
            raise
        return True
    with _local_errors(uri, "delete"):
        try:
            os.remove(_local(uri))
        except FileNotFoundError:
            return False
    return True


def delete_tree(root: str) -> int:
    """Remove every file or object below ``root`` (a local folder with the folder itself); returns how
    many files went, 0 when nothing was there. Other failures raise StorageError."""
    if is_gcs(root):
        bucket, key = _split(root)
        prefix = key.strip("/") + "/" if key.strip("/") else ""
        with _gcs_errors(f"{_GS}{bucket}/{prefix}", "listing", f"bucket {bucket!r} does not exist"):
            names = [blob.name for blob in _client().list_blobs(bucket, prefix=prefix, retry=_RETRY,
                                                                fields="items(name),nextPageToken")]
        for name in names:
            delete(f"{_GS}{bucket}/{name}")
        return len(names)
    path = _local(root)
    if not os.path.isdir(path):
        return 0
    count = sum(len(files) for _, _, files in os.walk(path))
    with _local_errors(root, "delete"):
        shutil.rmtree(path)
    return count


def download_file(uri: str, local_path: str) -> None:
    """Copy one file or object to ``local_path``; on failure nothing is left at ``local_path``."""
    with _atomic_file(_local(local_path)) as out:
        if is_gcs(uri):
            with _gcs_errors(uri, "reading", _NO_OBJECT.format(uri=uri)):
                # The library resumes an interrupted transfer with a range request and checks the CRC32C.
                _blob(uri).download_to_file(out, retry=_RETRY)
        else:
            with _local_errors(uri, "read"):
                src = open(_local(uri), "rb")  # closed just below, outside the read-error mapping
            with src:
                shutil.copyfileobj(src, out)


def upload_file(local_path: str, uri: str) -> None:
    if is_gcs(uri):
        with _local_errors(local_path, "read"):
            _upload(
                uri,
                lambda blob, gen, retry: blob.upload_from_filename(
                    _local(local_path), if_generation_match=gen, retry=retry
                ),
                lambda: _md5(open(_local(local_path), "rb")),
            )
    else:
        download_file(local_path, uri)


def download_tree(root: str, local_dir: str) -> list[str]:
    """Copy every file below ``root`` into ``local_dir``; returns the relative paths written.

    All names are checked before anything is copied, so a bad name leaves no half-copied tree.
    """
    targets: dict[str, str] = {}
    for name in list_files(root):
        rel = safe_relative_path(name)
        if rel in targets:
            raise StorageError(
                f"{targets[rel]!r} and {name!r} below {root} would both be written to {rel}; "
                "rename one of them at the source"
            )
        targets[rel] = name
    _parallel(
        lambda rel: download_file(join(root, targets[rel]), os.path.join(_local(local_dir), rel)), targets
    )
    return sorted(targets)


def upload_tree(local_dir: str, root: str) -> list[str]:
    """Copy every file below ``local_dir`` to ``root``; returns the relative paths copied."""
    names = list_files(local_dir)
    _parallel(lambda rel: upload_file(os.path.join(_local(local_dir), rel), join(root, rel)), names)
    return names


# --- helpers -------------------------------------------------------------------------------------------


def _local(path: str) -> str:
    return path[len(_FILE) :] if path.startswith(_FILE) else path


def _split(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len(_GS) :].partition("/")
    if not bucket:
        raise StorageError(f"{uri!r} names no bucket: write gs://BUCKET/PATH")
    return bucket, key


def _client() -> storage.Client:
    # Read at call time, never at import, and keyed on it so a changed emulator address gets a new client.
    return _client_for(os.environ.get("STORAGE_EMULATOR_HOST") or None)


@functools.lru_cache(maxsize=4)
def _client_for(emulator_host: str | None) -> storage.Client:
    if emulator_host:
        # The library sends requests to the emulator itself; it needs neither credentials nor a project.
        return storage.Client(project="imgclf-emulator", credentials=AnonymousCredentials())
    return storage.Client()


def _blob(uri: str) -> storage.Blob:
    bucket, key = _split(uri)
    if not key:
        raise StorageError(f"{uri} names a bucket, not an object: add the object's path")
    return _client().bucket(bucket).blob(key)


def _iter_gcs_blobs(root: str, fields: str, row: Callable[[str, storage.Blob], T]) -> Iterator[T]:
    """``row(path relative to root, blob)`` of every object below ``root``, sorted by path.

    The top level is listed with the delimiter '/'; its folders (a data set's classes) are each listed
    by a thread of their own, up to ``_WORKERS`` folders ahead of the one being read, each at most
    ``_PAGES_AHEAD`` pages (of 1,000 objects) ahead. So the listing of many class folders goes on in
    parallel while memory holds a bounded number of pages, however large the folders; the objects of
    a folder come in GCS's name order (which is Python's order of the decoded names).
    """
    bucket, key = _split(root)
    # GCS has no folders: 'data' would also match 'data2/...', so always list below 'data/'.
    prefix = key.strip("/") + "/" if key.strip("/") else ""
    shown = f"{_GS}{bucket}/{prefix}"
    missing = f"bucket {bucket!r} does not exist (HTTP 404 listing {shown}): check the bucket name in the URI"
    with _gcs_errors(shown, "listing", missing):
        pages = _client().list_blobs(bucket, prefix=prefix, delimiter="/", retry=_RETRY,
                                     fields=fields.replace("),", "),prefixes,", 1))
        # An object named exactly like the prefix is a folder marker for the root itself, not a file below it.
        top = [(b.name[len(prefix):], row(b.name[len(prefix):], b)) for b in pages if b.name != prefix]
        folders = sorted(pages.prefixes)
    # A folder sorts by its name with the '/', exactly where its objects' full paths sort.
    parts: list[tuple[str, Any]] = sorted(top + [(name[len(prefix):], None) for name in folders],
                                          key=lambda item: item[0])

    def list_folder(rel: str) -> Iterator[list[T]]:
        with _gcs_errors(f"{shown}{rel}", "listing", missing):
            listing = _client().list_blobs(bucket, prefix=prefix + rel, retry=_RETRY, fields=fields)
            for page in listing.pages:
                yield [row(b.name[len(prefix):], b) for b in page]

    found = 0
    with _Prefetch(list_folder, [rel for rel, item in parts if item is None], _WORKERS, _PAGES_AHEAD) as ahead:
        for rel, item in parts:
            if item is not None:
                found += 1
                yield item
                continue
            for page in ahead.pages(rel):
                found += len(page)
                yield from page
    if not found:
        raise StorageError(
            f"no objects found under {shown}: check the path (in GCS a misspelled folder "
            "and an empty one look the same)"
        )


class _Prefetch:
    """Runs ``produce(key)`` (a generator of pages) for the keys in order, up to ``ahead`` keys at a time
    on threads of their own, each holding at most ``pages`` pages until ``pages(key)`` takes them."""

    _DONE = object()

    def __init__(self, produce: Callable[[str], Iterator[Any]], keys: list[str], ahead: int, pages: int):
        self._produce, self._keys, self._ahead, self._size = produce, list(keys), ahead, pages
        self._queues: dict[str, queue.Queue] = {}
        self._next = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _Prefetch:
        self._start_more()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()  # an abandoned or failed listing: the producers stop at their next page
        for thread in self._threads:
            thread.join()

    def _start_more(self) -> None:
        while self._next < len(self._keys) and len(self._queues) < self._ahead:
            key = self._keys[self._next]
            self._next += 1
            self._queues[key] = queue.Queue(self._size)
            thread = threading.Thread(target=self._run, args=(key, self._queues[key]), daemon=True,
                                      name=f"imgclf-list-{self._next}")
            thread.start()
            self._threads.append(thread)

    def _run(self, key: str, out: queue.Queue) -> None:
        try:
            for page in self._produce(key):
                if not self._put(out, (None, page)):
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the reader, who raises it
            self._put(out, (err, None))
            return
        self._put(out, (None, self._DONE))

    def _put(self, out: queue.Queue, item: tuple) -> bool:
        while not self._stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pages(self, key: str) -> Iterator[Any]:
        """The pages of ``key``, in order (keys must be read in the order given)."""
        source = self._queues[key]
        while True:
            err, page = source.get()
            if err is not None:
                raise err
            if page is self._DONE:
                break
            yield page
        del self._queues[key]
        self._threads = [t for t in self._threads if t.is_alive()]
        self._start_more()


def _upload(uri: str, send: Callable[[storage.Blob, int, Any], None], md5: Callable[[], str]) -> None:
    """Send an upload conditional on the generation it replaces; ``md5`` (base64, of what is sent) tells a
    412 against this upload's own landed attempt from another writer's change."""
    missing = f"bucket {_split(uri)[0]!r} does not exist (HTTP 404 writing {uri}): create it or fix the URI"
    try:
        with _gcs_errors(uri, "writing", missing):
            blob = _blob(uri)
            current = blob.bucket.get_blob(blob.name, retry=_RETRY)
            # An upload is only safe to resend when it is conditional on the generation it replaces (0: none),
            # so the library's conditional policy turns retries on exactly then.
            send(blob, current.generation if current else 0, DEFAULT_RETRY_IF_GENERATION_SPECIFIED)
    except StorageError as err:
        if not (isinstance(err.__cause__, api_exceptions.PreconditionFailed) and _landed(uri, md5())):
            raise


def _landed(uri: str, md5: str) -> bool:
    """After a conditional upload met 412: whether the object now holds exactly what was sent (MD5, base64).

    The library resends an upload whose answer was lost; when the first attempt had landed, the resend
    meets 412 against it, and the write is done. Another writer's object (other content) is not.
    """
    with _gcs_errors(uri, "reading", _NO_OBJECT.format(uri=uri)):
        blob = _blob(uri)
        current = blob.bucket.get_blob(blob.name, retry=_RETRY)
    return current is not None and current.md5_hash == md5


def file_md5(uri: str) -> str:
    """A file's MD5, base64 as GCS reports ``md5Hash``, computed from its content (local path or gs://)."""
    if is_gcs(uri):
        return _md5(io.BytesIO(read_bytes(uri)))
    return _md5(open(_local(uri), "rb"))


def _md5(source: IO[bytes]) -> str:
    """The base64 MD5 of a stream's content (as GCS reports ``md5Hash``); the stream is closed."""
    digest = hashlib.md5(usedforsecurity=False)
    with source:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode("ascii")


@contextlib.contextmanager
def _gcs_errors(uri: str, doing: str, missing: str) -> Iterator[None]:
    try:
        yield
    except api_exceptions.NotFound as err:
        raise StorageError(missing) from err
    except (api_exceptions.Forbidden, api_exceptions.Unauthorized) as err:
        raise StorageError(f"permission denied (HTTP {err.code}) {doing} {uri}: {_CREDENTIALS_HINT}") from err
    except api_exceptions.PreconditionFailed as err:
        raise StorageError(
            f"{uri} was changed by another writer while {doing} it (HTTP 412): make sure only "
            "one run writes to this location, then retry"
        ) from err
    except GoogleAuthError as err:
        raise StorageError(
            f"cannot authenticate to Google Cloud Storage for {uri} ({err}): {_CREDENTIALS_HINT}"
        ) from err
    except (
        api_exceptions.GoogleAPIError,
        InvalidResponse,
        DataCorruption,
        requests.RequestException,
        ConnectionError,
    ) as err:
        raise StorageError(
            f"{doing} {uri} failed even after retries ({type(err).__name__}: {err}): "
            "check network access to Cloud Storage and try again"
        ) from err


@contextlib.contextmanager
def _local_errors(path: str, doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as err:
        raise StorageError(
            f"cannot {doing} {path}: {err.strerror or err}; check the path and its permissions"
        ) from err


@contextlib.contextmanager
def _atomic_file(path: str) -> Iterator[IO[bytes]]:
    """Yield a temporary file next to ``path`` that replaces it only when the block succeeds."""
    folder = os.path.dirname(os.path.abspath(path))
    with _local_errors(path, "write"):
        os.makedirs(folder, exist_ok=True)
        # Same folder, so os.replace is an atomic rename on the same file system. Not mkstemp: its 0600 mode
        # would stick to the final file; 0666 less the umask gives the permissions any new file gets.
        temp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.partial")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with _local_errors(path, "write"):
            with os.fdopen(fd, "wb") as out:
                yield out
                out.flush()
                os.fsync(out.fileno())
            os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise


def _parallel(task: Callable[[str], None], items: Iterable[str]) -> None:
    """Run ``task`` for each item on a few threads; the first error cancels what has not started."""
    with ThreadPoolExecutor(max_workers=_WORKERS) as pool:
        futures = [pool.submit(task, item) for item in items]
        try:
            for future in futures:
                future.result()
        except BaseException:
            for future in futures:
                future.cancel()
            raise
