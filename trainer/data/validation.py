"""Checks an image-folder data set file by file; writes validation.json, per-file lists and two reports.

The data set is a folder (local path or gs:// URI) with one sub-folder per class. Every listed entry
ends in exactly one of three lists, so that nothing is lost silently:

* ``skipped``: hidden and system entries that are never data: any path component starting with
  ``.`` (``.DS_Store``, ``.ipynb_checkpoints/``, ``._x.jpg``), ``__MACOSX``, ``Thumbs.db``,
  ``desktop.ini``, ``*_$folder$`` markers and ``name/`` placeholder objects of object stores.
* ``rejected``: files that could be images but cannot be used, each with a reason: files at the top
  level (not in a class folder), files in nested sub-folders (decision: images must sit directly in
  their class folder; a nested file is rejected, not counted for the top-level class, because a
  sub-folder often holds a different kind of picture), unsupported extensions, files
  ``images.decode_image`` refuses, files that TensorFlow's ``images.decode_tensor`` (what training
  and serving decode with) cannot decode or decodes to other pixels than Pillow (codes
  ``tensorflow_unreadable`` and ``decoder_mismatch``; see ``images.check_tensorflow_decode``), and
  every copy of content found in more than one class. Every file is decoded once, with Pillow, and
  also with TensorFlow and compared wherever the two decoders can disagree (``images.check_image``:
  all but plain 8-bit JPEGs and PNGs, which both decode with the same libjpeg-turbo and zlib code), so a
  training run never meets a file it cannot read, and trains on the very pixels checked. A plain
  500x375 JPEG costs about 1 ms of CPU (one decode and a SHA-256), where decoding it with both and
  comparing cost about 7; decoding and hashing run in C outside Python's lock, in one thread per core
  (``default_workers``). TensorFlow is imported only if some file needs its decoder.
* ``accepted``: everything else, with its content hash, size and format.

Class names are the top-level folder names exactly as stored; their label indices follow Python's
``sorted()`` order. Names equal after Unicode NFC normalisation or case-folding are a fatal problem
(two folders that look the same, or that merge on a case-insensitive file system). Identical content
(same SHA-256) within one class is reported and kept; conversion keeps such copies in one split.

validation.json (schema_version 2) is the summary, a few KB however large the data set::

  schema_version  2
  data_uri        the data set validated
  parameters      {binary_mode, max_rejected_fraction, max_pixels}
  classes         class folder names, sorted(): the label index order
  class_counts    {class: accepted images}
  listed          number of entries listed (= accepted + rejected + skipped, checked)
  counts          {listed, accepted, rejected, skipped}
  files           {accepted, rejected, skipped, duplicates}: the per-file lists' names, next to it
  duplicates      {groups, files, conflicts}: groups of identical files, the files in them, and the
                  groups found in several classes (all their copies rejected)
  statistics      {formats, modes, width, height, bytes ({min, median, max}), total_bytes,
                  exif_rotated, rejected_by_code, tensorflow_checked ({reason: files})}
  imbalance       {ratio (largest / smallest class count, null if one is empty), largest, smallest}
  fatal           [message, ...]; empty when the data set can be converted
  fingerprint     SHA-256 hex digest of what a run would use (see ``DataFingerprint``)

The per-file lists (``trainer.layout.VALIDATION_LISTS``) hold one JSON object per line, sorted by
path, and are read only through ``read_results``, which streams them::

  accepted.jsonl    {path, class, sha256, width, height, format, mode, bytes, exif_orientation,
                    tensorflow_checked}; tensorflow_checked: why TensorFlow's decode was compared with
                    Pillow's for this file (e.g. "CMYK JPEG"), null for plain files decoded once
  rejected.jsonl    {path, reason, code, class (when inside a class folder)}
  skipped.jsonl     {path, reason}
  duplicates.jsonl  {sha256, classes, paths, conflict} (sorted by first path); conflict: in several
                    classes, all copies rejected

Paths are relative to data_uri, POSIX style. Width and height are those after EXIF orientation.

Cost that grows with the data set. The listing streams (``storage.iter_files``, one folder at a time),
files are read and decoded by a bounded window of threads, and each result is written to a scratch
list as it comes; what stays in memory per accepted file is about 60 bytes of numbers (content hash,
class, size, format, mode), from which duplicates, class counts and the statistics are computed at
the end. Identical content is found by sorting the content hashes; only files with a twin are read
back. A file that cannot be read because storage keeps failing (after ``storage``'s retries) fails
the step with a StorageError naming the object and the error, so that the pipeline's retry can read
it: it is never counted as a rejected image. A corrupt image is rejected as before.

The fingerprint exists for pipeline caching. The validation step is cached on the content fingerprint
that the look-at-data step takes (``trainer.data.fingerprint``), and hands its fingerprint to the conversion
step as a parameter: KFP's cache key includes every input value, so new content under the same URI can
never reuse an old validation or conversion.

report.md is the plain summary; report.html (``render_html_report``) is the same summary for the
Kubeflow UI, with a few thumbnails per class and of the rejected files, all inlined in the page. Both
are of bounded size: counts, classes, samples and the first rows of each list, which name the file
that lists every one.
"""

from __future__ import annotations

import array
import base64
import collections
import contextlib
import hashlib
import heapq
import html
import io
import itertools
import json
import logging
import os
import posixpath
import tempfile
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from trainer import logs, storage
from trainer.errors import DataError
from trainer.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageRejected,
    check_image,
    decode_image,
    expected_format,
)
from trainer.layout import VALIDATION_FILE, VALIDATION_LISTS, VALIDATION_SCHEMA_VERSION
from trainer.parallel import bounded_map
from trainer.resources import available_cores

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"
SCHEMA_VERSION = VALIDATION_SCHEMA_VERSION

# Names that operating systems and tools leave next to data; never images, never classes.
_SYSTEM_NAMES = {"__MACOSX": "macOS archive metadata folder", "Thumbs.db": "Windows thumbnail cache",
                 "desktop.ini": "Windows folder settings file"}
_FOLDER_MARKER = "_$folder$"
# Rows of each list shown in the reports; the per-file lists always have all of them.
_REPORT_ROWS = 200
# Paths shown per group of identical files (a group may be large).
_GROUP_PATHS = 10
# report.html inlines its thumbnails, so their number and size bound the page (~3 KB each).
THUMBNAIL_PIXELS = 64
MAX_THUMBNAILS = 60
# Of MAX_THUMBNAILS, at most this many show rejected files; the rest show the classes.
_REJECTED_THUMBNAILS = 12
# Rejection codes whose files are still pictures worth showing (they are refused for where they sit,
# for their content type, for being in two classes or because only Pillow reads them right); every
# other rejected file gets a placeholder without being read: it is unreadable, empty, too large, or
# maybe not an image at all.
_PREVIEWABLE = ("nested", "outside_class", "class_conflict", "format_mismatch", "animated",
                "tensorflow_unreadable", "decoder_mismatch")

def default_workers(data_uri: str | None = None, cores: int | None = None) -> int:
    """Threads for reading and decoding files.

    Decoding (Pillow's and TensorFlow's) and hashing run in C with Python's lock released, so threads
    decode in parallel, and one per core keeps every core busy on local files (more only add switching).
    Reading from object storage (gs://) mostly waits on the network, so four per core keep the cores
    fed (at most 32). ``data_uri`` None means unknown: the object-storage count.
    """
    cores = cores or available_cores()
    if data_uri is not None and not storage.is_gcs(data_uri):
        return cores
    return min(32, 4 * cores)


def validate_dataset(data_uri: str, output_dir: str, *, binary_mode: bool = False,
                     max_rejected_fraction: float = 0.01, max_pixels: int = DEFAULT_MAX_PIXELS,
                     workers: int | None = None, html_report: bool = True,
                     expected_files: int | None = None) -> dict[str, Any]:
    """Check every file of an image-folder data set; write validation.json, the per-file lists and the reports.

    Args:
      data_uri: local folder or gs:// URI holding one sub-folder per class.
      output_dir: where validation.json, the per-file lists and the reports are written (local or gs://).
      binary_mode: the data set must have exactly two classes.
      max_rejected_fraction: largest share of rejected files (of accepted + rejected) tolerated.
      max_pixels: largest width * height accepted for one image.
      workers: threads reading and decoding files (default ``default_workers()``).
      html_report: also write report.html with thumbnails (it re-reads up to ``MAX_THUMBNAILS`` files).
      expected_files: how many files the look at the data listed, if known: the progress line's total, so it
        can say the share done and the time left while the listing streams (nothing else depends on it).

    Returns:
      The content of validation.json: the summary, without per-file entries (``read_results`` streams
      those). Its schema is in the module docstring.

    Raises:
      DataError: after writing every output, when there is any fatal problem; the message lists them all.
      StorageError: the data set cannot be listed, a file cannot be read (storage keeps failing: the
        step fails, naming the file, so that a retry of the step can read it; it is never counted as a
        rejected image), or the output cannot be written.
    """
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise ValueError(f"max_rejected_fraction must be between 0 and 1, got {max_rejected_fraction!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels!r}")
    workers = workers or default_workers(data_uri)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="imgclf-validation-") as scratch:
        tally = _Tally(scratch)
        progress = logs.ProgressLog("validated", expected_files or None, unit="files",
                                    logger=logs.progress_logger(__name__))
        try:
            for kind, entry in bounded_map(lambda item: _check(data_uri, item, max_pixels),
                                           _place_all(data_uri, tally), workers):
                tally.add(kind, entry)
                progress.advance()
        finally:
            tally.close_scratch()
        progress.finish()
        tally.classes |= _local_class_folders(data_uri)
        result = tally.finish(scratch, data_uri, output_dir, binary_mode=binary_mode,
                              max_rejected_fraction=max_rejected_fraction, max_pixels=max_pixels)
    _write_reports(output_dir, result, html_report=html_report, workers=workers)
    counts, fatal = result["counts"], result["fatal"]
    log.info("Validation of %s took %.1f s: %d accepted, %d rejected, %d skipped, %d classes, %d fatal",
             data_uri, time.monotonic() - started, counts["accepted"], counts["rejected"], counts["skipped"],
             len(result["classes"]), len(fatal))
    if fatal:
        raise DataError(f"the data set at {data_uri} cannot be used ({len(fatal)} problem(s); details in "
                        f"{storage.join(output_dir, REPORT_FILE)}):\n" + "\n".join(f"  - {p}" for p in fatal))
    return result


class DataFingerprint:
    """SHA-256 over what a run would use: each accepted file's path and content hash, and the rejected
    and skipped paths; fed in the order of validation's lists (accepted, then rejected, then skipped,
    each sorted by path), so it streams.

    Equal data sets give equal fingerprints whatever the listing order; one changed byte in an
    accepted file, or a file added, removed, renamed or newly rejected, gives another. The rejected and
    skipped paths count too because the converted data set's manifest records how many files were
    listed, rejected and skipped: a conversion reused from a different listing would not reconcile.
    The content of rejected files is not read again; only whether and where they are rejected counts.
    """

    def __init__(self) -> None:
        self._digest = hashlib.sha256(b"imgclf-data-fingerprint-v1\n")
        self._last: tuple[str, str] = ("", "")

    def add(self, kind: str, path: str, sha256: str = "") -> None:
        if (kind, path) <= self._last:
            # Out of order: a list was not sorted, or not fed in full; the fingerprint would be another.
            raise DataError(f"validation list {kind} is not sorted by path at {path!r}; re-run validation")
        self._last = (kind, path)
        # One JSON array per line: quoting makes every path unambiguous, whatever characters it holds.
        self._digest.update(json.dumps([kind, path, sha256], ensure_ascii=True).encode("ascii") + b"\n")

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def compute_data_fingerprint(validation_json: str) -> str:
    """The data fingerprint of a written validation result, recomputed from its per-file lists."""
    fingerprint = DataFingerprint()
    for kind in ("accepted", "rejected", "skipped"):
        for entry in read_results(validation_json, kind):
            fingerprint.add(kind, entry["path"], entry.get("sha256", "") if kind == "accepted" else "")
    return fingerprint.hexdigest()


def _place_all(data_uri: str, tally: _Tally) -> Iterator[tuple[str, Any]]:
    """Each listed path, in listing (path) order, as what ``_check`` takes: ready or to be read."""
    for path in storage.iter_files(data_uri):
        kind, entry = _place(path, tally.classes)
        if kind == "candidate":
            try:
                expected_format(path)  # refuse by name before reading a possibly big unrelated file
            except ImageRejected as e:
                kind, entry = "rejected", _reject(path, e.reason, e.code, entry)
        yield kind, (path, entry) if kind == "candidate" else entry


def _check(data_uri: str, item: tuple[str, Any], max_pixels: int) -> tuple[str, dict[str, Any]]:
    """Read and decode one candidate (in a worker thread); entries placed by name pass through."""
    kind, entry = item
    if kind != "candidate":
        return kind, entry
    path, class_name = entry
    # A read that fails after storage's retries raises: a storage failure is not a bad image, and the
    # step's retry may read it (StorageError names the object and the storage error).
    data = storage.read_bytes(storage.join(data_uri, path))
    try:
        # One Pillow decode; TensorFlow's as well only where the two can disagree (images.check_image).
        info, second = check_image(data, path, max_pixels)
    except ImageRejected as e:
        return "rejected", _reject(path, e.reason, e.code, class_name)
    return "accepted", {"path": path, "class": class_name, "sha256": hashlib.sha256(data).hexdigest(),
                        "width": info.width, "height": info.height, "format": info.format, "mode": info.mode,
                        "bytes": len(data), "exif_orientation": info.exif_orientation,
                        "tensorflow_checked": second}


class _Codes:
    """Small integer codes for the few distinct values of a field (formats, modes, classes)."""

    def __init__(self) -> None:
        self.values: list[Any] = []
        self._index: dict[Any, int] = {}

    def code(self, value: Any) -> int:
        found = self._index.get(value)
        if found is None:
            found = self._index[value] = len(self.values)
            self.values.append(value)
        return found


class _Tally:
    """What validation keeps while it streams: per accepted file a few numbers (about 60 bytes: content
    hash, class, size, format, mode), per-class counts, and the entries themselves in scratch files,
    never in memory."""

    def __init__(self, scratch: str) -> None:
        self.classes: set[str] = set()
        self.counts = collections.Counter()
        self.per_class = collections.Counter()  # (class, "rejected" | "skipped") -> files
        self.rejected_by_code = collections.Counter()
        self.sha = bytearray()
        self.class_code, self.format_code, self.mode_code, self.checked_code = _Codes(), _Codes(), _Codes(), _Codes()
        self.checked_code.code(None)  # code 0: decoded once
        self.numbers = {name: array.array(kind) for name, kind in
                        (("class", "i"), ("width", "i"), ("height", "i"), ("bytes", "q"), ("format", "B"),
                         ("mode", "B"), ("rotated", "B"), ("checked", "H"))}
        self._files = {kind: open(os.path.join(scratch, f"{kind}.partial"), "w", encoding="utf-8")  # noqa: SIM115
                       for kind in ("accepted", "rejected", "skipped")}

    def add(self, kind: str, entry: dict[str, Any]) -> None:
        self.counts[kind] += 1
        self._files[kind].write(json.dumps(entry, ensure_ascii=False) + "\n")
        if kind == "rejected":
            self.rejected_by_code[entry["code"]] += 1
            self.per_class[(entry.get("class"), "rejected")] += 1
        elif kind == "skipped":
            parts = entry["path"].split("/")
            if len(parts) >= 2:
                self.per_class[(parts[0], "skipped")] += 1
        else:
            self.sha += bytes.fromhex(entry["sha256"])
            values = {"class": self.class_code.code(entry["class"]), "width": entry["width"],
                      "height": entry["height"], "bytes": entry["bytes"],
                      "format": self.format_code.code(entry["format"]), "mode": self.mode_code.code(entry["mode"]),
                      "rotated": int(entry["exif_orientation"] != 1),
                      "checked": self.checked_code.code(entry["tensorflow_checked"])}
            for name, value in values.items():
                self.numbers[name].append(value)

    def close_scratch(self) -> None:
        for handle in self._files.values():
            handle.close()

    def finish(self, scratch: str, data_uri: str, output_dir: str, *, binary_mode: bool,
               max_rejected_fraction: float, max_pixels: int) -> dict[str, Any]:
        """Find duplicates, write the final lists to ``output_dir``, and return the summary."""
        listed = sum(self.counts.values())
        groups, conflicted = _duplicate_groups(os.path.join(scratch, "accepted.partial"), self.sha)
        keep = np.ones(len(self.numbers["class"]), dtype=bool)
        keep[sorted(conflicted)] = False
        conflicts = _conflict_rejections(groups)
        self.rejected_by_code["class_conflict"] += len(conflicts)
        for entry in conflicts:
            self.per_class[(entry["class"], "rejected")] += 1

        fingerprint = DataFingerprint()
        written = {}
        final = os.path.join(scratch, "final")
        os.makedirs(final)
        with open(os.path.join(final, "accepted"), "w", encoding="utf-8") as out, \
                open(os.path.join(scratch, "accepted.partial"), encoding="utf-8") as lines:
            for index, line in enumerate(lines):
                if keep[index]:
                    out.write(line)
                    entry = json.loads(line)
                    fingerprint.add("accepted", entry["path"], entry["sha256"])
        with open(os.path.join(final, "rejected"), "w", encoding="utf-8") as out, \
                open(os.path.join(scratch, "rejected.partial"), encoding="utf-8") as lines:
            for entry in heapq.merge((json.loads(line) for line in lines), conflicts, key=lambda e: e["path"]):
                out.write(json.dumps(entry, ensure_ascii=False) + "\n")
                fingerprint.add("rejected", entry["path"])
        os.replace(os.path.join(scratch, "skipped.partial"), os.path.join(final, "skipped"))
        with open(os.path.join(final, "skipped"), encoding="utf-8") as lines:
            for line in lines:
                fingerprint.add("skipped", json.loads(line)["path"])
        with open(os.path.join(final, "duplicates"), "w", encoding="utf-8") as out:
            for group in groups:
                out.write(json.dumps(group, ensure_ascii=False) + "\n")
        for kind, name in VALIDATION_LISTS.items():
            storage.upload_file(os.path.join(final, kind), storage.join(output_dir, name))
            written[kind] = name

        counts = {"listed": listed, "accepted": int(keep.sum()),
                  "rejected": self.counts["rejected"] + len(conflicts), "skipped": self.counts["skipped"]}
        if counts["accepted"] + counts["rejected"] + counts["skipped"] != listed:
            # Every listed path goes to exactly one list; a mismatch is a bug here, never bad data.
            raise RuntimeError(f"validation lost track of files: {counts}")
        classes = sorted(self.classes)
        class_ids = np.frombuffer(self.numbers["class"], dtype=np.int32)[keep]
        per_code = np.bincount(class_ids, minlength=len(self.class_code.values))
        class_counts = {name: 0 for name in classes}
        for code, name in enumerate(self.class_code.values):
            class_counts[name] = int(per_code[code])
        result = {
            "schema_version": SCHEMA_VERSION,
            "data_uri": data_uri,
            "parameters": {"binary_mode": binary_mode, "max_rejected_fraction": max_rejected_fraction,
                           "max_pixels": max_pixels},
            "classes": classes,
            "class_counts": class_counts,
            "listed": listed,
            "counts": counts,
            "files": written,
            "duplicates": {"groups": len(groups), "files": sum(len(g["paths"]) for g in groups),
                           "conflicts": sum(1 for g in groups if g["conflict"])},
            "statistics": self._statistics(keep),
            "imbalance": _imbalance(class_counts),
        }
        result["fatal"] = _fatal_problems(data_uri, result, self.per_class, binary_mode, max_rejected_fraction)
        result["fingerprint"] = fingerprint.hexdigest()
        storage.write_bytes(storage.join(output_dir, VALIDATION_FILE),
                            json.dumps(result, indent=1, ensure_ascii=False).encode("utf-8"))
        return result

    def _statistics(self, keep: np.ndarray) -> dict[str, Any]:
        def column(name: str) -> np.ndarray:
            return np.frombuffer(self.numbers[name], dtype=self.numbers[name].typecode)[keep]

        def tally(name: str, codes: _Codes, skip_none: bool = False) -> dict[str, int]:
            found = np.bincount(column(name), minlength=len(codes.values))
            return dict(sorted((codes.values[i], int(n)) for i, n in enumerate(found)
                               if n and not (skip_none and codes.values[i] is None)))

        sizes = column("bytes")
        return {
            "formats": tally("format", self.format_code),
            "modes": tally("mode", self.mode_code),
            "width": _summary(column("width")),
            "height": _summary(column("height")),
            "bytes": _summary(sizes),
            "total_bytes": int(sizes.sum()),
            "exif_rotated": int(column("rotated").sum()),
            "rejected_by_code": dict(sorted((k, v) for k, v in self.rejected_by_code.items() if v)),
            "tensorflow_checked": tally("checked", self.checked_code, skip_none=True),
        }


def _duplicate_groups(accepted_lines: str, digests: bytearray) -> tuple[list[dict[str, Any]], set[int]]:
    """Groups of accepted files with equal content, sorted by first path, and the line numbers of those in
    a group of several classes (``digests``: the files' SHA-256 digests, 32 bytes each, in line order).
    Only files with a twin are read back (from ``accepted_lines``)."""
    if len(digests) < 64:
        return [], set()
    # Sort the hashes (as four big-endian words, a sort of their bytes; a view, not a copy) and compare
    # neighbours, a column at a time: about 20 bytes a file while it runs.
    words = np.frombuffer(digests, dtype=">u8").reshape(-1, 4)
    order = np.lexsort(tuple(words[:, k] for k in (3, 2, 1, 0)))
    same = np.ones(len(order) - 1, dtype=bool)
    for k in range(4):
        column = words[:, k][order]
        same &= column[1:] == column[:-1]
    twins = set(order[1:][same].tolist()) | set(order[:-1][same].tolist())
    if not twins:
        return [], set()
    members: dict[bytes, list[tuple[int, str, str]]] = collections.defaultdict(list)
    with open(accepted_lines, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            if index in twins:
                entry = json.loads(line)
                members[bytes.fromhex(entry["sha256"])].append((index, entry["path"], entry["class"]))
    groups, conflicted = [], set()
    for digest, group in sorted(members.items(), key=lambda kv: kv[1][0][1]):
        classes = sorted({c for _, _, c in group})
        groups.append({"sha256": digest.hex(), "classes": classes, "paths": [p for _, p, _ in group],
                       "conflict": len(classes) > 1, "members": [[p, c] for _, p, c in group]})
        if len(classes) > 1:
            conflicted.update(i for i, _, _ in group)
    return groups, conflicted


def _conflict_rejections(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A rejection for every copy of content found in several classes, sorted by path."""
    rejected = []
    for group in groups:
        members = group.pop("members")
        if not group["conflict"]:
            continue
        for path, class_name in members:
            others = [(p, c) for p, c in members if c != class_name]
            shown = ", ".join(f"'{p}' (class '{c}')" for p, c in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            reason = (f"same content as {shown}{more}: one image cannot have two labels;"
                      " keep it in the folder of its right class only")
            rejected.append(_reject(path, reason, "class_conflict", class_name))
    return sorted(rejected, key=lambda e: e["path"])


def read_results(validation_json: str, kind: str) -> Iterator[dict[str, Any]]:
    """The one reader of validation's per-file lists: the entries of ``kind`` (accepted, rejected,
    skipped or duplicates), sorted by path, one at a time. The lists sit next to ``validation_json``;
    a gs:// list is downloaded to a temporary file first and read from there."""
    if kind not in VALIDATION_LISTS:
        raise ValueError(f"kind must be one of {sorted(VALIDATION_LISTS)}, got {kind!r}")
    uri = storage.join(posixpath.dirname(validation_json) if storage.is_gcs(validation_json)
                       else os.path.dirname(validation_json), VALIDATION_LISTS[kind])
    with contextlib.ExitStack() as stack:
        local = uri[len("file://"):] if uri.startswith("file://") else uri
        if storage.is_gcs(uri):
            local = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgclf-list-")), "list")
            storage.download_file(uri, local)
        try:
            lines = stack.enter_context(open(local, encoding="utf-8"))
        except FileNotFoundError:
            raise DataError(f"{uri} is missing: the validation result at {validation_json} is incomplete or"
                            " of an earlier imgclf; re-run validation") from None
        for number, line in enumerate(lines, 1):
            try:
                yield json.loads(line)
            except ValueError as e:
                raise DataError(f"{uri} line {number} is not valid JSON ({e}); re-run validation") from None


def _read_first(validation_json: str, kind: str, count: int) -> list[dict[str, Any]]:
    return list(itertools.islice(read_results(validation_json, kind), count))


def _hidden_reason(part: str) -> str | None:
    """Why a path component marks a hidden or system entry, or None for an ordinary name."""
    if part.startswith("."):
        return "hidden file or folder (name starts with '.')"
    if part in _SYSTEM_NAMES:
        return _SYSTEM_NAMES[part]
    if part.endswith(_FOLDER_MARKER):
        return "folder marker object ('_$folder$') left by an S3/GCS tool"
    return None


def _place(path: str, classes: set[str]) -> tuple[str, Any]:
    """Where one listed path belongs by its name alone: ("skipped" | "rejected", entry) or
    ("candidate", class name). Adds the class folders the path shows to ``classes``."""
    parts = path.split("/")
    if path.endswith("/"):
        # A zero-byte "folder/" object that some tools create to show an empty folder.
        if len(parts) == 2 and not _hidden_reason(parts[0]):
            classes.add(parts[0])
        return "skipped", {"path": path, "reason": "folder placeholder object"}
    hidden = next((r for r in map(_hidden_reason, parts) if r), None)
    if hidden:
        if len(parts) == 1 and parts[0].endswith(_FOLDER_MARKER):
            # "roses_$folder$" at the top level is how S3 tools mark the (maybe empty) folder "roses".
            marked = parts[0][: -len(_FOLDER_MARKER)]
            if marked and not _hidden_reason(marked):
                classes.add(marked)
        elif len(parts) >= 2 and not _hidden_reason(parts[0]):
            classes.add(parts[0])  # e.g. "roses/.DS_Store": the class folder exists.
        return "skipped", {"path": path, "reason": hidden}
    if "" in parts:
        return "rejected", _reject(path, "path has an empty folder name ('//' or a leading '/'); rename the object",
                                   "bad_path")
    if len(parts) == 1:
        return "rejected", _reject(
            path, "file at the top level of the data set, outside any class folder; move it into the"
                  " folder of its class or delete it", "outside_class")
    classes.add(parts[0])
    if len(parts) > 2:
        return "rejected", _reject(
            path, f"inside the nested folder '{'/'.join(parts[:-1])}'; images must sit directly in their"
                  f" class folder: move it up into '{parts[0]}/' or delete the sub-folder", "nested", parts[0])
    return "candidate", parts[0]


def _local_class_folders(data_uri: str) -> set[str]:
    """Class folders of a local data set, including empty ones (a file listing cannot show those)."""
    if storage.is_gcs(data_uri):
        return set()
    local = data_uri[len("file://"):] if data_uri.startswith("file://") else data_uri
    if not os.path.isdir(local):
        return set()
    with os.scandir(local) as entries:
        return {e.name for e in entries if e.is_dir() and not _hidden_reason(e.name)}


def _reject(path: str, reason: str, code: str, class_name: str | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": path, "reason": reason, "code": code}
    if class_name is not None:
        entry["class"] = class_name
    return entry


def _fatal_problems(data_uri: str, result: dict[str, Any], per_class: collections.Counter,
                    binary_mode: bool, max_rejected_fraction: float) -> list[str]:
    classes, class_counts, counts = result["classes"], result["class_counts"], result["counts"]
    fatal = []
    if not counts["listed"]:
        fatal.append(f"no files found under {data_uri}; data_uri must be the folder that holds one"
                     " sub-folder of images per class")
    elif not classes:
        fatal.append(f"no class folders under {data_uri}; put each class's images in a sub-folder named"
                     " after the class")
    elif len(classes) == 1:
        fatal.append(f"only one class folder ('{classes[0]}') under {data_uri}; classification needs at"
                     " least 2 classes: add one sub-folder of images per class")
    fatal.extend(_name_collisions(classes))
    for name in classes:
        if class_counts[name] == 0:
            fatal.append(f"class folder '{name}' has no usable images ({per_class[(name, 'rejected')]}"
                         f" rejected, {per_class[(name, 'skipped')]} skipped); add .jpg/.jpeg/.png images"
                         " to it or remove the folder")
    if binary_mode and len(classes) != 2:
        shown = ", ".join(f"'{c}'" for c in classes[:10]) + (", ..." if len(classes) > 10 else "")
        fatal.append(f"binary_mode is True but the data set has {len(classes)} class(es) ({shown}); binary"
                     " mode needs exactly 2 class folders: set binary_mode to False or keep two classes")
    rejected = counts["rejected"]
    considered = counts["accepted"] + rejected
    if considered and rejected / considered > max_rejected_fraction:
        share = rejected / considered
        fatal.append(f"{rejected} of {considered} files ({share:.1%}) were rejected,"
                     f" above the limit max_rejected_fraction={max_rejected_fraction:g}"
                     f" ({max_rejected_fraction:.1%}); fix or remove the rejected files listed in"
                     f" {REPORT_FILE} and {VALIDATION_LISTS['rejected']}, or raise max_rejected_fraction")
    return fatal


def _name_collisions(classes: list[str]) -> list[str]:
    """Class names that differ only in Unicode normalisation or in letter case."""
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for name in classes:
        groups[unicodedata.normalize("NFC", name).casefold()].append(name)
    problems = []
    for names in groups.values():
        if len(names) < 2:
            continue
        same_nfc = len({unicodedata.normalize("NFC", n) for n in names}) < len(names)
        kind = "Unicode normalisation (NFC vs NFD)" if same_nfc else "letter case"
        # Spell out the code points too: NFC and NFD forms print identically.
        spelled = " and ".join(f"'{n}'" + (f" ({ascii(n)})" if not n.isascii() else "") for n in names)
        problems.append(f"class folders {spelled} differ only in {kind}: they look like one class but"
                        " would get separate labels (and merge on some file systems); rename or merge them")
    return problems


def _summary(values: np.ndarray) -> dict[str, float] | None:
    if not len(values):
        return None
    median = float(np.median(values))
    return {"min": int(values.min()), "median": int(median) if median.is_integer() else median,
            "max": int(values.max())}


def _checked(st: dict[str, Any]) -> str:
    counts = st.get("tensorflow_checked") or {}
    if not counts:
        return "none (every file is a plain JPEG or PNG, decoded alike by both)"
    return f"{sum(counts.values())} ({', '.join(f'{k} {v}' for k, v in counts.items())})"


def _imbalance(class_counts: dict[str, int]) -> dict[str, Any] | None:
    if not class_counts:
        return None
    largest = max(class_counts, key=lambda c: (class_counts[c], c))
    smallest = min(class_counts, key=lambda c: (class_counts[c], c))
    low = class_counts[smallest]
    return {"ratio": class_counts[largest] / low if low else None,
            "largest": {"class": largest, "count": class_counts[largest]},
            "smallest": {"class": smallest, "count": low}}


def _write_reports(output_dir: str, result: dict[str, Any], *, html_report: bool, workers: int) -> None:
    # storage.write_bytes creates missing local folders and replaces files atomically.
    validation_json = storage.join(output_dir, VALIDATION_FILE)
    storage.write_bytes(storage.join(output_dir, REPORT_FILE), render_report(result, validation_json).encode("utf-8"))
    if html_report:
        page = render_html_report(result, validation_json, workers=workers)
        storage.write_bytes(storage.join(output_dir, HTML_REPORT_FILE), page.encode("utf-8"))


def _md(text: Any) -> str:
    """Show a name verbatim in Markdown: as a code span, with table pipes and control characters escaped."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text)).replace("|", "\\|")
    # A name holding a backtick needs a double-backtick fence, padded so the fence stays separate.
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _more(total: int, list_name: str) -> list[str]:
    return [f"\n{total - _REPORT_ROWS} more in {list_name} (every one is listed there)."] \
        if total > _REPORT_ROWS else []


def _etc(paths: list[str]) -> str:
    return f" and {len(paths) - _GROUP_PATHS} more" if len(paths) > _GROUP_PATHS else ""


def _plain(text: str) -> str:
    """Free text (reasons) in a table cell: pipes escaped, one line."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(result: dict[str, Any], validation_json: str) -> str:
    """The Markdown summary of a validation result, shown in the Kubeflow UI.

    Its size does not grow with the data set: counts, every class, and the first ``_REPORT_ROWS`` rows
    of the rejected, skipped and duplicate lists (read from the lists next to ``validation_json``),
    with the name of the list that holds the rest.
    """
    counts, fatal = result["counts"], result["fatal"]
    lines = [f"# Data validation: {_md(result['data_uri'])}", ""]
    lines.append(f"**Result: FAILED** with {len(fatal)} fatal problem(s)." if fatal
                 else "**Result: passed.**")
    lines += ["", "| listed | accepted | rejected | skipped |", "|---:|---:|---:|---:|",
              "| {listed} | {accepted} | {rejected} | {skipped} |".format(**counts), ""]
    if result.get("fingerprint"):
        lines += [f"Data fingerprint: `{result['fingerprint']}`", ""]
    if fatal:
        lines += ["## Fatal problems", ""] + [f"- {_plain(p)}" for p in fatal] + [""]
    total = max(counts["accepted"], 1)
    lines += ["## Classes (label index order)", "", "| index | class | images | share |",
              "|---:|---|---:|---:|"]
    lines += [f"| {i} | {_md(c)} | {n} | {n / total:.1%} |"
              for i, (c, n) in enumerate(result["class_counts"].items())]
    imbalance = result["imbalance"]
    if imbalance and imbalance["ratio"]:
        lines += ["", f"Imbalance (largest / smallest class): {imbalance['ratio']:.2f}"
                      f" ({_md(imbalance['largest']['class'])}: {imbalance['largest']['count']},"
                      f" {_md(imbalance['smallest']['class'])}: {imbalance['smallest']['count']})."]
    lines.append("")
    for title, key in (("Rejected files", "rejected"), ("Skipped entries", "skipped")):
        total = counts[key]
        if not total:
            continue
        lines += [f"## {title} ({total})", "", "| file | reason |", "|---|---|"]
        lines += [f"| {_md(r['path'])} | {_plain(r['reason'])} |"
                  for r in _read_first(validation_json, key, _REPORT_ROWS)]
        lines += _more(total, VALIDATION_LISTS[key])
        lines.append("")
    groups = result["duplicates"]["groups"]
    if groups:
        lines += [f"## Identical files ({groups} groups)", "",
                  "Copies within one class are kept (and always put in the same split); copies in several"
                  " classes are rejected.", "", "| files | classes | kept |", "|---|---|---|"]
        lines += [f"| {', '.join(_md(p) for p in d['paths'][:_GROUP_PATHS])}{_etc(d['paths'])} |"
                  f" {', '.join(_md(c) for c in d['classes'])} | {'no' if d['conflict'] else 'yes'} |"
                  for d in _read_first(validation_json, "duplicates", _REPORT_ROWS)]
        lines += _more(groups, VALIDATION_LISTS["duplicates"])
        lines.append("")
    st = result["statistics"]
    if st["width"]:
        lines += ["## Images", "",
                  f"- formats: {', '.join(f'{k} {v}' for k, v in st['formats'].items())}",
                  f"- colour modes: {', '.join(f'{k} {v}' for k, v in st['modes'].items())}",
                  "- width min/median/max: {min} / {median:g} / {max}".format(**st["width"]),
                  "- height min/median/max: {min} / {median:g} / {max}".format(**st["height"]),
                  f"- rotated by EXIF orientation: {st['exif_rotated']}",
                  f"- also decoded with TensorFlow and compared: {_checked(st)}", ""]
    return "\n".join(lines)


# --- report.html ------------------------------------------------------------------------------------------

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: middle; }
td.n { text-align: right; }
code { white-space: pre-wrap; word-break: break-all; }
img.thumb, span.none { width: 64px; height: 64px; margin: 1px; vertical-align: middle; background: #eee; }
img.thumb { object-fit: contain; }
span.none { display: inline-flex; align-items: center; justify-content: center; color: #777;
            font-size: 10px; text-align: center; }
.passed { color: #087f23; } .failed { color: #b00020; }
"""


def _h(text: Any) -> str:
    """Escape text for HTML content and attribute values."""
    return html.escape(str(text), quote=True)


def _hname(text: Any) -> str:
    """A file or class name verbatim, with invisible characters spelled out (as in report.md)."""
    shown = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text))
    return f"<code>{_h(shown)}</code>"


def _previewable(entry: dict[str, Any]) -> bool:
    """Whether a rejected file is worth reading for a thumbnail (decided by its name and code only)."""
    return entry["code"] in _PREVIEWABLE and posixpath.splitext(entry["path"])[1].lower() in SUPPORTED_EXTENSIONS


def _pick_thumbnails(result: dict[str, Any], validation_json: str,
                     per_class: int) -> tuple[dict[str, list[str]], list[str]]:
    """Paths to show: ({class: paths spread over its sorted files}, rejected paths), MAX_THUMBNAILS in all.

    One pass over the accepted list; the first previewable rejected files come from the rejected list.
    """
    rejected = []
    if result["counts"]["rejected"]:
        previewable = (r["path"] for r in read_results(validation_json, "rejected") if _previewable(r))
        rejected = list(itertools.islice(previewable, _REJECTED_THUMBNAILS))
    budget = MAX_THUMBNAILS - len(rejected)
    classes, class_counts = result["classes"], result["class_counts"]
    # Many classes share the budget: fewer per class, but every class gets one while any is left.
    share = min(per_class, max(1, budget // max(len(classes), 1)))
    wanted: dict[str, set[int]] = {}
    for name in classes:
        count = min(share, class_counts[name], budget)
        # Spread over the class rather than its first files, which often come from one source.
        wanted[name] = {i * class_counts[name] // count for i in range(count)}
        budget -= count
    picks: dict[str, list[str]] = {name: [] for name in classes}
    if any(wanted.values()):
        seen: collections.Counter = collections.Counter()
        for entry in read_results(validation_json, "accepted"):
            name = entry["class"]
            if seen[name] in wanted[name]:
                picks[name].append(entry["path"])
            seen[name] += 1
    return picks, rejected


def _preview_pixels(data: bytes, path: str, max_pixels: int) -> np.ndarray | None:
    """RGB pixels to show for a file, or None when it cannot be shown."""
    try:
        # Accepted files (and files rejected only for where they sit) look exactly as they will be trained on.
        return decode_image(data, path, max_pixels)
    except ImageRejected as e:
        if e.code not in ("format_mismatch", "animated"):
            return None
    # A picture of another format, or an animation: show its first frame, size checked before decoding.
    with Image.open(io.BytesIO(data)) as image:
        if image.width * image.height > max_pixels:
            return None
        rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))


def _thumbnail(data_uri: str, path: str, max_pixels: int) -> str | None:
    """A small JPEG of one file as a data: URI, or None when it cannot be read or decoded now."""
    try:
        pixels = _preview_pixels(storage.read_bytes(storage.join(data_uri, path)), path, max_pixels)
        if pixels is None:
            return None
        image = Image.fromarray(pixels)
        image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=80)
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - a thumbnail illustrates; the report is written without it.
        log.warning("no thumbnail for %s: %s", path, e)
        return None
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode("ascii")


def _thumb_html(path: str, uri: str | None, missing: str) -> str:
    if uri:
        return f'<img class="thumb" src="{uri}" alt="{_h(path)}" title="{_h(path)}">'
    return f'<span class="none" title="{_h(path)}">{_h(missing)}</span>'


def render_html_report(result: dict[str, Any], validation_json: str, thumbnails_per_class: int = 4, *,
                       workers: int | None = None) -> str:
    """The validation result as one self-contained HTML page, for the Kubeflow UI.

    It shows what report.md shows, plus up to ``thumbnails_per_class`` thumbnails per class and
    thumbnails of rejected files that are still pictures (a placeholder for the others). Thumbnails
    are re-read from the validated data set through ``storage`` and decoded as for training, ``THUMBNAIL_PIXELS``
    on their longer side, inlined as base64 JPEG data URIs: the page loads nothing from elsewhere
    (the UI shows it in a sandbox, and a bucket is rarely readable from a browser). At most
    ``MAX_THUMBNAILS`` are shown, and at most ``_REPORT_ROWS`` rows of each list (the lists next to
    ``validation_json`` hold every file), so the page's size does not grow with the data set. A file
    that cannot be read or decoded now gets a placeholder; the report never fails for a thumbnail.
    """
    if thumbnails_per_class < 0:
        raise ValueError(f"thumbnails_per_class must be 0 or more, got {thumbnails_per_class!r}")
    max_pixels = result["parameters"].get("max_pixels", DEFAULT_MAX_PIXELS)
    data_uri = result["data_uri"]
    class_picks, rejected_picks = _pick_thumbnails(result, validation_json, thumbnails_per_class)
    paths = [p for picks in class_picks.values() for p in picks] + rejected_picks
    thumbs = dict(zip(paths, bounded_map(lambda p: _thumbnail(data_uri, p, max_pixels), paths,
                                         workers or default_workers()), strict=True))

    counts, fatal = result["counts"], result["fatal"]
    out = ['<!DOCTYPE html>', '<html lang="en"><head><meta charset="utf-8">',
           f"<title>Data validation: {_h(data_uri)}</title>", f"<style>{_STYLE}</style></head><body>",
           f"<h1>Data validation: {_hname(data_uri)}</h1>"]
    out.append(f'<p class="failed"><strong>Result: FAILED</strong> with {len(fatal)} fatal problem(s).</p>'
               if fatal else '<p class="passed"><strong>Result: passed.</strong></p>')
    out.append("<table><tr><th>listed</th><th>accepted</th><th>rejected</th><th>skipped</th></tr><tr>"
               + "".join(f'<td class="n">{counts[k]}</td>' for k in ("listed", "accepted", "rejected", "skipped"))
               + "</tr></table>")
    if result.get("fingerprint"):
        out.append(f"<p>Data fingerprint: <code>{_h(result['fingerprint'])}</code></p>")
    if fatal:
        out += ["<h2>Fatal problems</h2><ul>", *(f"<li>{_h(p)}</li>" for p in fatal), "</ul>"]

    total = max(counts["accepted"], 1)
    out.append("<h2>Classes (label index order)</h2><table><tr><th>index</th><th>class</th><th>images</th>"
               "<th>share</th><th>examples</th></tr>")
    for index, (name, count) in enumerate(result["class_counts"].items()):
        examples = "".join(_thumb_html(p, thumbs.get(p), "cannot be shown") for p in class_picks.get(name, []))
        out.append(f'<tr><td class="n">{index}</td><td>{_hname(name)}</td><td class="n">{count}</td>'
                   f'<td class="n">{count / total:.1%}</td><td>{examples}</td></tr>')
    out.append("</table>")
    imbalance = result["imbalance"]
    if imbalance and imbalance["ratio"]:
        out.append(f"<p>Imbalance (largest / smallest class): {imbalance['ratio']:.2f}"
                   f" ({_hname(imbalance['largest']['class'])}: {imbalance['largest']['count']},"
                   f" {_hname(imbalance['smallest']['class'])}: {imbalance['smallest']['count']}).</p>")

    for title, key in (("Rejected files", "rejected"), ("Skipped entries", "skipped")):
        total = counts[key]
        if not total:
            continue
        preview = key == "rejected"
        out.append(f"<h2>{title} ({total})</h2><table><tr>{'<th>preview</th>' if preview else ''}"
                   "<th>file</th><th>reason</th></tr>")
        for row in _read_first(validation_json, key, _REPORT_ROWS):
            cell = ""
            if preview:
                cell = "<td>" + _thumb_html(row["path"], thumbs.get(row["path"]),
                                            "cannot be shown" if row["path"] in thumbs else "no preview") + "</td>"
            out.append(f"<tr>{cell}<td>{_hname(row['path'])}</td><td>{_h(row['reason'])}</td></tr>")
        out.append("</table>")
        out += [f"<p>{_h(line.strip())}</p>" for line in _more(total, VALIDATION_LISTS[key])]

    groups = result["duplicates"]["groups"]
    if groups:
        out.append(f"<h2>Identical files ({groups} groups)</h2><p>Copies within one class are"
                   " kept (and always put in the same split); copies in several classes are rejected.</p>"
                   "<table><tr><th>files</th><th>classes</th><th>kept</th></tr>")
        for group in _read_first(validation_json, "duplicates", _REPORT_ROWS):
            out.append(f"<tr><td>{', '.join(_hname(p) for p in group['paths'][:_GROUP_PATHS])}"
                       f"{_h(_etc(group['paths']))}</td>"
                       f"<td>{', '.join(_hname(c) for c in group['classes'])}</td>"
                       f"<td>{'no' if group['conflict'] else 'yes'}</td></tr>")
        out.append("</table>")
        out += [f"<p>{_h(line.strip())}</p>" for line in _more(groups, VALIDATION_LISTS["duplicates"])]
    st = result["statistics"]
    if st["width"]:
        items = [f"formats: {', '.join(f'{k} {v}' for k, v in st['formats'].items())}",
                 f"colour modes: {', '.join(f'{k} {v}' for k, v in st['modes'].items())}",
                 "width min/median/max: {min} / {median:g} / {max}".format(**st["width"]),
                 "height min/median/max: {min} / {median:g} / {max}".format(**st["height"]),
                 f"rotated by EXIF orientation: {st['exif_rotated']}",
                 f"also decoded with TensorFlow and compared: {_checked(st)}"]
        out += ["<h2>Images</h2><ul>", *(f"<li>{_h(item)}</li>" for item in items), "</ul>"]
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def load_validation(validation_json: str) -> dict[str, Any]:
    """Read the summary in a validation.json written by ``validate_dataset`` (``read_results`` streams
    its per-file lists)."""
    try:
        result = json.loads(storage.read_bytes(validation_json))
    except json.JSONDecodeError as e:
        raise DataError(f"{validation_json} is not valid JSON ({e}); re-run validation") from e
    if not isinstance(result, dict) or result.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{validation_json} is not a validation result of schema version {SCHEMA_VERSION};"
                        " re-run validation with this version of imgclf")
    return result
