"""Fixtures for a local GCS API server (gcp-storage-emulator) and a fault-injecting proxy in front of it."""

from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, parse_qsl, quote, unquote, urlencode, urlsplit

import pytest

_ENV = "STORAGE_EMULATOR_HOST"
_START_TIMEOUT_S = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="session")
def gcs_emulator() -> Iterator[str]:
    """Start gcp-storage-emulator (in memory) on a free loopback port and point google-cloud-storage at it.

    Yields the emulator's URL; STORAGE_EMULATOR_HOST is set for the whole session and restored afterwards.
    Fails (never skips) when the emulator cannot start: GCS behaviour must not go untested by accident.
    """
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # A file, not a pipe: nobody reads the emulator's output while tests run, and a full pipe would block it.
    log = tempfile.NamedTemporaryFile(prefix="gcs-emulator-", suffix=".log", delete=False)
    command = [
        sys.executable,
        "-m",
        "gcp_storage_emulator",
        "start",
        "--host=127.0.0.1",
        f"--port={port}",
        "--in-memory",
        "--quiet",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + _START_TIMEOUT_S
    while not _answers(url):
        exited = process.poll() is not None
        if exited or time.monotonic() > deadline:
            process.kill()
            process.wait()
            why = (
                f"exited with code {process.returncode}"
                if exited
                else f"gave no answer in {_START_TIMEOUT_S} s"
            )
            output = Path(log.name).read_text(errors="replace")[-2000:]
            pytest.fail(
                f"gcp-storage-emulator ({' '.join(command)}) {why} on {url}; is the dev extra installed "
                f"(pip install -e '.[dev]')? Its output:\n{output}",
                pytrace=False,
            )
        time.sleep(0.1)
    previous = os.environ.get(_ENV)
    os.environ[_ENV] = url
    try:
        yield url
    finally:
        _restore_env(previous)
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        os.unlink(log.name)


def emulator_client():
    """A google-cloud-storage client for whatever STORAGE_EMULATOR_HOST names now (no credentials needed)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(project="imgclf-test", credentials=AnonymousCredentials())


def new_bucket() -> str:
    """Create a bucket with a unique name in the running emulator and return its name."""
    name = f"imgclf-test-{uuid.uuid4().hex[:12]}"
    emulator_client().create_bucket(name)
    return name


@pytest.fixture
def gcs_bucket(gcs_emulator: str) -> str:
    """A fresh, empty bucket in the emulator (the emulator keeps everything in memory; nothing to clean)."""
    return new_bucket()


def upload_folder(local_dir: str | os.PathLike, bucket: str, prefix: str = "") -> str:
    """Stage every file below ``local_dir`` as objects under ``prefix`` in ``bucket``; returns the gs:// URI.

    Uses google-cloud-storage directly (not trainer.storage), so tests of the code under test do not
    depend on it for their set-up.
    """
    root = Path(local_dir)
    prefix = prefix.strip("/")
    bucket_ref = emulator_client().bucket(bucket)
    files = sorted(p for p in root.rglob("*") if p.is_file())

    def put(path: Path) -> None:
        name = "/".join(filter(None, [prefix, path.relative_to(root).as_posix()]))
        bucket_ref.blob(name).upload_from_filename(str(path))

    # The emulator answers one request at a time, but overlapping the client-side work still saves time.
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(put, files))
    return f"gs://{bucket}/{prefix}" if prefix else f"gs://{bucket}"


def _restore_env(previous: str | None) -> None:
    if previous is None:
        os.environ.pop(_ENV, None)
    else:
        os.environ[_ENV] = previous


# --- a loopback proxy that plays the parts of GCS the emulator lacks ---------------------------------


@dataclass
class _Rule:
    method: str
    pattern: re.Pattern[str]
    action: int | str  # an HTTP status to answer with; "reset": cut the connection mid-body; "lost": pass
    # the request on, then answer 503 as if the reply had been lost (the request took effect)
    times: int | None  # None: every matching request
    query: re.Pattern[str] | None = None  # also matched against the raw query string, when given


@dataclass
class SeenRequest:
    method: str
    path: str  # percent-decoded, so object names read as they are
    query: dict[str, list[str]]
    headers: dict[str, str]


class GcsFaultProxy:
    """Forwards requests to the emulator, adding what real GCS does and the emulator does not.

    * Listings come in pages of at most ``page_size`` (1,000, like GCS) with ``nextPageToken``;
      the emulator always returns everything in one page.
    * ``inject(method, path_regex, 403 | 503 | "reset" | "lost", times)`` answers matching requests with
      an error, sends half of the emulator's body and closes the connection (a reset mid-download), or
      ("lost") lets the request take effect and answers 503, as when GCS's reply is lost on the way
      (the client's retry then meets its own first attempt).
    * ``extra_names[bucket]`` adds object names to listings that the emulator cannot store
      (names containing '..' crash its store).
    * ``requests`` records every request, in order.
    * Uploads with ``ifGenerationMatch=0`` (create only if absent) fail with 412 when the object exists;
      the emulator ignores the precondition. Such uploads pass the proxy one at a time, so the check
      and the write are one step, as in GCS.
    """

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream)
        self.page_size = 1000
        self.extra_names: dict[str, list[str]] = {}
        self.requests: list[SeenRequest] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._create_lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self._server.daemon_threads = True
        self._server.proxy = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    def inject(self, method: str, path_regex: str, action: int | str, times: int | None = 1,
               query_regex: str | None = None) -> None:
        with self._lock:
            self._rules.append(_Rule(method, re.compile(path_regex), action, times,
                                     re.compile(query_regex) if query_regex else None))

    def clear(self) -> None:
        """Drop every injected fault: storage heals."""
        with self._lock:
            self._rules.clear()

    def seen(self, method: str, path_regex: str) -> list[SeenRequest]:
        return [r for r in self.requests if r.method == method and re.search(path_regex, r.path)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _take(self, method: str, path: str, query: str = "") -> int | str | None:
        with self._lock:
            for rule in self._rules:
                if rule.query is not None and not rule.query.search(unquote(query)):
                    continue
                if rule.method == method and rule.pattern.search(path) and rule.times != 0:
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.action
        return None

    def _forward(self, method: str, target: str, headers, body: bytes) -> tuple[int, list, bytes]:
        connection = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=30)
        try:
            # The Host header goes through unchanged: the emulator builds media and upload links from it,
            # so those links lead back through the proxy.
            sent = {k: v for k, v in headers.items() if k.lower() not in ("connection", "keep-alive")}
            connection.request(method, target, body=body or None, headers=sent)
            response = connection.getresponse()
            data = response.read()
            kept = [
                (k, v)
                for k, v in response.getheaders()
                if k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date")
            ]
            return response.status, kept, data
        finally:
            connection.close()

    def _exists(self, bucket: str, name: str) -> bool:
        status, _, _ = self._forward("GET", f"/storage/v1/b/{bucket}/o/{quote(name, safe='')}", {}, b"")
        return status == 200

    def _page(self, bucket: str, query: dict[str, list[str]], data: bytes) -> bytes:
        listing = json.loads(data)
        prefix = query.get("prefix", [""])[0]
        extra = [
            {"kind": "storage#object", "bucket": bucket, "name": name, "size": "1"}
            for name in self.extra_names.get(bucket, [])
            if name.startswith(prefix)
        ]
        items = sorted(listing.get("items", []) + extra, key=lambda item: item["name"])
        start = int(query.get("pageToken", ["0"])[0])
        size = min(int(query.get("maxResults", [self.page_size])[0]), self.page_size)
        listing["items"] = items[start : start + size]
        listing.pop("nextPageToken", None)
        if start + size < len(items):
            listing["nextPageToken"] = str(start + size)
        return json.dumps(listing).encode()


class _ProxyHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        proxy: GcsFaultProxy = self.server.proxy  # type: ignore[attr-defined]
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        proxy.requests.append(SeenRequest(self.command, path, query, dict(self.headers.items())))
        action = proxy._take(self.command, path, url.query)
        if isinstance(action, int):
            return self._error(action)
        listing = re.fullmatch(r"/storage/v1/b/([^/]+)/o", path) if self.command == "GET" else None
        target = self.path
        if listing:
            # The emulator ignores paging parameters; the proxy pages its complete answer instead.
            kept = [(k, v) for k, v in parse_qsl(url.query) if k not in ("pageToken", "maxResults")]
            target = f"{url.path}?{urlencode(kept)}"
        upload = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path) if self.command == "POST" else None
        if upload and query.get("ifGenerationMatch") == ["0"]:
            with proxy._create_lock:
                name = query.get("name", [None])[0] or _multipart_name(body)
                if name is not None and proxy._exists(upload.group(1), name):
                    error = {"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                       "specified did not hold. (GcsFaultProxy)"}}
                    return self._reply(412, [("Content-Type", "application/json")], json.dumps(error).encode())
                status, headers, data = proxy._forward(self.command, target, self.headers, body)
                return self._error(503) if action == "lost" else self._reply(status, headers, data)
        status, headers, data = proxy._forward(self.command, target, self.headers, body)
        if action == "lost":
            return self._error(503)
        if listing and status == 200:
            data = proxy._page(listing.group(1), query, data)
        if action == "reset":
            self.send_response(status)
            for key, value in headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return None
        return self._reply(status, headers, data)

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def _error(self, status: int) -> None:
        error = {"error": {"code": status, "message": f"injected by GcsFaultProxy ({status})"}}
        return self._reply(status, [("Content-Type", "application/json")], json.dumps(error).encode())

    def _reply(self, status: int, headers: list, data: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:
        pass  # keep test output clean; ``GcsFaultProxy.requests`` records what happened


def _multipart_name(body: bytes) -> str | None:
    """The object name in a multipart upload's JSON metadata part."""
    found = re.search(rb'"name":\s*"((?:[^"\\]|\\.)*)"', body)
    return json.loads(b'"' + found.group(1) + b'"') if found else None


@pytest.fixture
def gcs_proxy(gcs_emulator: str) -> Iterator[GcsFaultProxy]:
    """A GcsFaultProxy in front of the emulator; STORAGE_EMULATOR_HOST points at it for one test."""
    proxy = GcsFaultProxy(gcs_emulator)
    os.environ[_ENV] = proxy.url
    try:
        yield proxy
    finally:
        os.environ[_ENV] = gcs_emulator
        proxy.close()
