"""A cheap look at a data set: one fingerprint of its content, for pipeline caching across runs.

A scheduled pipeline runs again and again on the same URI. KFP reuses a step when its cache key (the
component, its input values and its input artifacts) is unchanged, so the URI alone must never be the
key: new files under it would reuse a stale conversion and model. The first step of the pipeline is
therefore never cached and only looks at the data; its fingerprint is an input of validation, so
validation (and everything after it) is reused exactly when the content is the same.

How the content is seen, per kind of location:

* gs://: from the object listing alone, nothing is downloaded. Each object counts with its name,
  size and MD5; composite objects have no MD5, and for them the CRC32C and the generation (new on
  every write) count instead, so a replaced object is never taken for the old one, while an
  unchanged bucket lists the same fingerprint every time.
* a local path or mounted volume: each file's name, size and SHA-256 of its bytes. Hashing reads
  the files once at disk speed (about 1 GB/s of SHA-256 per core), far cheaper than validation's
  decoding of every image (about 1 ms each); modification times are not used because a copy or
  restore changes them without changing content, and a same-second rewrite may keep them.

Every listed file counts, hidden ones included (validation decides what is data): adding or editing
even a skipped file makes the next run validate and train again, which is safe, never stale.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

from trainer import storage
from trainer.errors import DataError
from trainer.parallel import bounded_map

log = logging.getLogger(__name__)

_VERSION = 1
_READERS = 8  # files hashed at once; bounds memory to a few images


@dataclass(frozen=True)
class DataLook:
    """What the look found: the fingerprint, and counts a person can check it against."""

    fingerprint: str
    files: int
    bytes: int
    method: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def look_at_data(data_uri: str) -> DataLook:
    """List ``data_uri`` and fingerprint its content (see the module's docstring for how)."""
    started = time.monotonic()
    if storage.is_gcs(data_uri):
        method = "gcs-listing"
        rows: Iterator[list[Any]] = (_gcs_row(entry) for entry in storage.iter_object_details(data_uri))
    else:
        method = "sha256"
        rows = bounded_map(lambda rel: _local_row(data_uri, rel), storage.iter_files(data_uri), _READERS)
    digest = hashlib.sha256(f"imgclf-content-v{_VERSION} {method}\n".encode())
    files = size = 0
    for row in rows:  # listings stream sorted by path; nothing per file is kept
        # One JSON array per line: quoting keeps every name unambiguous, whatever characters it holds.
        digest.update(json.dumps(row, ensure_ascii=True).encode("ascii") + b"\n")
        files, size = files + 1, size + row[1]
    look = DataLook(digest.hexdigest(), files, size, method)
    log.info("Looked at %s in %.1f s: %d files, %d bytes, content fingerprint %s (%s)", data_uri,
             time.monotonic() - started, look.files, look.bytes, look.fingerprint[:12], method)
    return look


def validate_unchanged(data_uri: str, output_dir: str, expected_fingerprint: str,
                       **validate_options: Any) -> dict[str, Any]:
    """Validate ``data_uri`` (``trainer.data.validation.validate_dataset``) and make sure it saw the content
    the look fingerprinted.

    The look runs first and its fingerprint keys the cache of this step and every later one, so a
    validation result must belong to that very content. The data is looked at again after
    validating; a difference means files were written meanwhile, and the run stops rather than
    cache a result under the wrong key.

    Returns validation's result with ``content_fingerprint`` added.

    Raises:
      DataError: the content changed between the look and the end of validation, or validation
        refused the data set.
    """
    from trainer.data.validation import validate_dataset

    result = validate_dataset(data_uri, output_dir, **validate_options)
    now = look_at_data(data_uri)
    if now.fingerprint != expected_fingerprint:
        raise DataError(
            f"the data at {data_uri} changed while this run was reading it (content fingerprint "
            f"{expected_fingerprint[:12]}... when the run looked at it, {now.fingerprint[:12]}... after validation, "
            f"{now.files} files now): finish writing the data set, then start the run again")
    return {**result, "content_fingerprint": now.fingerprint}


def _gcs_row(entry: dict[str, Any]) -> list[Any]:
    if entry["md5"]:
        return [entry["path"], entry["size"], "md5", entry["md5"]]
    return [entry["path"], entry["size"], "crc32c", entry["crc32c"], entry["generation"]]


def _local_row(data_uri: str, rel: str) -> list[Any]:
    content = storage.read_bytes(storage.join(data_uri, rel))
    return [rel, len(content), "sha256", hashlib.sha256(content).hexdigest()]
