"""Checks an image-folder data set file by file; writes validation.json and a Markdown and an HTML report.

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

validation.json (schema_version 1)::

  schema_version  1
  data_uri        the data set validated
  parameters      {binary_mode, max_rejected_fraction, max_pixels}
  classes         class folder names, sorted(): the label index order
  class_counts    {class: accepted images}
  listed          number of entries listed (= accepted + rejected + skipped, checked)
  counts          {listed, accepted, rejected, skipped}
  accepted        [{path, class, sha256, width, height, format, mode, bytes, exif_orientation,
                   tensorflow_checked}]; tensorflow_checked: why TensorFlow's decode was compared with
                   Pillow's for this file (e.g. "CMYK JPEG"), null for plain files decoded once
  rejected        [{path, reason, code, class (when inside a class folder)}]
  skipped         [{path, reason}]
  duplicates      [{sha256, classes, paths, conflict}]; conflict: in several classes, all copies rejected
  statistics      {formats, modes, width, height, bytes ({min, median, max}), total_bytes,
                   exif_rotated, rejected_by_code, tensorflow_checked ({reason: files})}
  imbalance       {ratio (largest / smallest class count, null if one is empty), largest, smallest}
  fatal           [message, ...]; empty when the data set can be converted
  fingerprint     SHA-256 hex digest of what a run would use (see ``compute_data_fingerprint``)

Paths are relative to data_uri, POSIX style; lists are sorted by path. Width and height are those
after EXIF orientation.

The fingerprint exists for pipeline caching. The validation step is cached on the content fingerprint
that the look-at-data step takes (``trainer.fingerprint``), and hands its fingerprint to the conversion
step as a parameter: KFP's cache key includes every input value, so new content under the same URI can
never reuse an old validation or conversion.

report.md is the plain summary; report.html (``render_html_report``) is the same summary for the
Kubeflow UI, with a few thumbnails per class and of the rejected files, all inlined in the page.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import html
import io
import json
import logging
import os
import posixpath
import statistics as stats
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from trainer import logs, storage
from trainer.errors import DataError, StorageError
from trainer.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_EXTENSIONS,
    ImageRejected,
    check_image,
    decode_image,
    expected_format,
)
from trainer.resources import available_cores

log = logging.getLogger(__name__)

VALIDATION_FILE = "validation.json"
REPORT_FILE = "report.md"
HTML_REPORT_FILE = "report.html"
SCHEMA_VERSION = 1

# Names that operating systems and tools leave next to data; never images, never classes.
_SYSTEM_NAMES = {"__MACOSX": "macOS archive metadata folder", "Thumbs.db": "Windows thumbnail cache",
                 "desktop.ini": "Windows folder settings file"}
_FOLDER_MARKER = "_$folder$"
# Rows of each list shown in report.md; validation.json always has all of them.
_REPORT_ROWS = 200
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

T = TypeVar("T")
R = TypeVar("R")


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


def bounded_map(fn: Callable[[T], R], items: Iterable[T], workers: int,
                window: int | None = None) -> Iterator[R]:
    """Yield ``fn(item)`` for each item, in order, computed by ``workers`` threads.

    At most ``window`` (default 2 x workers) items are in flight or waiting to be consumed, so memory
    stays bounded however many items there are (``Executor.map`` would submit them all at once).
    """
    window = max(window or 2 * workers, 1)
    pending: collections.deque[Future[R]] = collections.deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imgclf") as pool:
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            # On an error or an abandoned generator, do not run what has not started yet.
            for future in pending:
                future.cancel()


def validate_dataset(data_uri: str, output_dir: str, *, binary_mode: bool = False,
                     max_rejected_fraction: float = 0.01, max_pixels: int = DEFAULT_MAX_PIXELS,
                     workers: int | None = None, html_report: bool = True) -> dict[str, Any]:
    """Check every file of an image-folder data set; write validation.json, report.md and report.html.

    Args:
      data_uri: local folder or gs:// URI holding one sub-folder per class.
      output_dir: where validation.json and the reports are written (local or gs://).
      binary_mode: the data set must have exactly two classes.
      max_rejected_fraction: largest share of rejected files (of accepted + rejected) tolerated.
      max_pixels: largest width * height accepted for one image.
      workers: threads reading and decoding files (default ``default_workers()``).
      html_report: also write report.html with thumbnails (it re-reads up to ``MAX_THUMBNAILS`` files).

    Returns:
      The content of validation.json (its schema is in the module docstring).

    Raises:
      DataError: after writing both files, when there is any fatal problem; the message lists them all.
      StorageError: the data set cannot be listed or the output cannot be written.
    """
    if not 0.0 <= max_rejected_fraction <= 1.0:
        raise ValueError(f"max_rejected_fraction must be between 0 and 1, got {max_rejected_fraction!r}")
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive number of pixels, got {max_pixels!r}")
    workers = workers or default_workers(data_uri)
    started = time.monotonic()

    listed = storage.list_files(data_uri)
    log.info("Validating %s: %d entries listed", data_uri, len(listed))
    layout = _sort_entries(data_uri, listed)
    accepted, rejected = _check_images(data_uri, layout.candidates, max_pixels, workers)
    rejected = layout.rejected + rejected
    accepted, duplicates, conflicts = _find_duplicates(accepted)
    rejected += conflicts
    rejected.sort(key=lambda r: r["path"])
    skipped = sorted(layout.skipped, key=lambda r: r["path"])

    if len(accepted) + len(rejected) + len(skipped) != len(listed):
        # Every listed path goes to exactly one list; a mismatch is a bug here, never bad data.
        raise RuntimeError(f"validation lost track of files: listed {len(listed)} != accepted {len(accepted)}"
                           f" + rejected {len(rejected)} + skipped {len(skipped)}")

    classes = sorted(layout.classes)
    class_counts = {name: 0 for name in classes}
    for entry in accepted:
        class_counts[entry["class"]] += 1
    fatal = _fatal_problems(data_uri, listed, classes, class_counts, rejected, skipped, accepted,
                            binary_mode, max_rejected_fraction)
    result = {
        "schema_version": SCHEMA_VERSION,
        "data_uri": data_uri,
        "parameters": {"binary_mode": binary_mode, "max_rejected_fraction": max_rejected_fraction,
                       "max_pixels": max_pixels},
        "classes": classes,
        "class_counts": class_counts,
        "listed": len(listed),
        "counts": {"listed": len(listed), "accepted": len(accepted), "rejected": len(rejected),
                   "skipped": len(skipped)},
        "accepted": accepted,
        "rejected": rejected,
        "skipped": skipped,
        "duplicates": duplicates,
        "statistics": _statistics(accepted, rejected),
        "imbalance": _imbalance(class_counts),
        "fatal": fatal,
    }
    result["fingerprint"] = compute_data_fingerprint(result)
    _write_outputs(output_dir, result, html_report=html_report, workers=workers)
    log.info("Validation of %s took %.1f s: %d accepted, %d rejected, %d skipped, %d classes, %d fatal",
             data_uri, time.monotonic() - started, len(accepted), len(rejected), len(skipped), len(classes),
             len(fatal))
    if fatal:
        raise DataError(f"the data set at {data_uri} cannot be used ({len(fatal)} problem(s); details in "
                        f"{storage.join(output_dir, REPORT_FILE)}):\n" + "\n".join(f"  - {p}" for p in fatal))
    return result


def compute_data_fingerprint(result: dict[str, Any]) -> str:
    """SHA-256 over what a run would use: each accepted file's path and content hash, and the rejected
    and skipped paths.

    Equal data sets give equal fingerprints whatever the listing order; one changed byte in an
    accepted file, or a file added, removed, renamed or newly rejected, gives another. The rejected and
    skipped paths count too because the converted data set's manifest records how many files were
    listed, rejected and skipped: a conversion reused from a different listing would not reconcile.
    The content of rejected files is not read again; only whether and where they are rejected counts.
    """
    digest = hashlib.sha256(f"imgclf-data-fingerprint-v{SCHEMA_VERSION}\n".encode())
    rows = [("accepted", e["path"], e["sha256"]) for e in result["accepted"]]
    rows += [("rejected", e["path"], "") for e in result["rejected"]]
    rows += [("skipped", e["path"], "") for e in result["skipped"]]
    for row in sorted(rows):
        # One JSON array per line: quoting makes every path unambiguous, whatever characters it holds.
        digest.update(json.dumps(row, ensure_ascii=True).encode("ascii") + b"\n")
    return digest.hexdigest()


class _Layout:
    """Listed paths sorted by where they sit: candidates, rejected, skipped, and class names."""

    def __init__(self) -> None:
        self.candidates: list[tuple[str, str]] = []  # (relative path, class)
        self.rejected: list[dict[str, Any]] = []
        self.skipped: list[dict[str, Any]] = []
        self.classes: set[str] = set()


def _hidden_reason(part: str) -> str | None:
    """Why a path component marks a hidden or system entry, or None for an ordinary name."""
    if part.startswith("."):
        return "hidden file or folder (name starts with '.')"
    if part in _SYSTEM_NAMES:
        return _SYSTEM_NAMES[part]
    if part.endswith(_FOLDER_MARKER):
        return "folder marker object ('_$folder$') left by an S3/GCS tool"
    return None


def _sort_entries(data_uri: str, listed: list[str]) -> _Layout:
    layout = _Layout()
    for path in listed:
        parts = path.split("/")
        if path.endswith("/"):
            # A zero-byte "folder/" object that some tools create to show an empty folder.
            layout.skipped.append({"path": path, "reason": "folder placeholder object"})
            if len(parts) == 2 and not _hidden_reason(parts[0]):
                layout.classes.add(parts[0])
            continue
        hidden = next((r for r in map(_hidden_reason, parts) if r), None)
        if hidden:
            layout.skipped.append({"path": path, "reason": hidden})
            if len(parts) == 1 and parts[0].endswith(_FOLDER_MARKER):
                # "roses_$folder$" at the top level is how S3 tools mark the (maybe empty) folder "roses".
                marked = parts[0][: -len(_FOLDER_MARKER)]
                if marked and not _hidden_reason(marked):
                    layout.classes.add(marked)
            elif len(parts) >= 2 and not _hidden_reason(parts[0]):
                layout.classes.add(parts[0])  # e.g. "roses/.DS_Store": the class folder exists.
            continue
        if "" in parts:
            layout.rejected.append(_reject(path, "path has an empty folder name ('//' or a leading '/');"
                                                 " rename the object", "bad_path"))
            continue
        if len(parts) == 1:
            layout.rejected.append(_reject(
                path, "file at the top level of the data set, outside any class folder; move it into the"
                      " folder of its class or delete it", "outside_class"))
            continue
        layout.classes.add(parts[0])
        if len(parts) > 2:
            layout.rejected.append(_reject(
                path, f"inside the nested folder '{'/'.join(parts[:-1])}'; images must sit directly in their"
                      f" class folder: move it up into '{parts[0]}/' or delete the sub-folder",
                "nested", parts[0]))
            continue
        layout.candidates.append((path, parts[0]))
    layout.classes |= _local_class_folders(data_uri)
    return layout


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


def _check_images(data_uri: str, candidates: list[tuple[str, str]], max_pixels: int,
                  workers: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read and decode every candidate in parallel; return (accepted, rejected)."""
    accepted: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    to_read = []
    for path, class_name in candidates:
        try:
            expected_format(path)  # refuse by name before reading a possibly big unrelated file
            to_read.append((path, class_name))
        except ImageRejected as e:
            rejected.append(_reject(path, e.reason, e.code, class_name))

    def check(item: tuple[str, str]) -> dict[str, Any]:
        path, class_name = item
        try:
            data = storage.read_bytes(storage.join(data_uri, path))
        except StorageError as e:
            return _reject(path, f"could not be read ({e}); check the object and its permissions",
                           "read_error", class_name)
        try:
            # One Pillow decode; TensorFlow's as well only where the two can disagree (images.check_image).
            info, second = check_image(data, path, max_pixels)
        except ImageRejected as e:
            return _reject(path, e.reason, e.code, class_name)
        return {"path": path, "class": class_name, "sha256": hashlib.sha256(data).hexdigest(),
                "width": info.width, "height": info.height, "format": info.format, "mode": info.mode,
                "bytes": len(data), "exif_orientation": info.exif_orientation, "tensorflow_checked": second}

    progress = logs.ProgressLog("validated", len(to_read), logger=logs.progress_logger(__name__))
    for entry in bounded_map(check, to_read, workers):
        (accepted if "sha256" in entry else rejected).append(entry)
        progress.advance()
    progress.finish()
    return accepted, rejected


def _find_duplicates(accepted: list[dict[str, Any]]) -> tuple[list, list, list]:
    """Group accepted files by content; return (still accepted, duplicate groups, conflict rejections)."""
    by_hash: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for entry in accepted:
        by_hash[entry["sha256"]].append(entry)
    duplicates, conflicts, conflicting = [], [], set()
    for digest, group in sorted(by_hash.items(), key=lambda kv: kv[1][0]["path"]):
        if len(group) < 2:
            continue
        classes = sorted({e["class"] for e in group})
        paths = sorted(e["path"] for e in group)
        duplicates.append({"sha256": digest, "classes": classes, "paths": paths,
                           "conflict": len(classes) > 1})
        if len(classes) == 1:
            continue
        conflicting.add(digest)
        for entry in group:
            others = [e for e in group if e["class"] != entry["class"]]
            shown = ", ".join(f"'{e['path']}' (class '{e['class']}')" for e in others[:3])
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            reason = (f"same content as {shown}{more}: one image cannot have two labels;"
                      " keep it in the folder of its right class only")
            conflicts.append(_reject(entry["path"], reason, "class_conflict", entry["class"]))
    kept = [e for e in accepted if e["sha256"] not in conflicting]
    kept.sort(key=lambda e: e["path"])
    return kept, duplicates, conflicts


def _fatal_problems(data_uri: str, listed: list[str], classes: list[str], class_counts: dict[str, int],
                    rejected: list, skipped: list, accepted: list, binary_mode: bool,
                    max_rejected_fraction: float) -> list[str]:
    fatal = []
    if not listed:
        fatal.append(f"no files found under {data_uri}; data_uri must be the folder that holds one"
                     " sub-folder of images per class")
    elif not classes:
        fatal.append(f"no class folders under {data_uri}; put each class's images in a sub-folder named"
                     " after the class")
    elif len(classes) == 1:
        fatal.append(f"only one class folder ('{classes[0]}') under {data_uri}; classification needs at"
                     " least 2 classes: add one sub-folder of images per class")
    fatal.extend(_name_collisions(classes))
    per_class = collections.Counter()
    for entry in rejected:
        per_class[(entry.get("class"), "rejected")] += 1
    for entry in skipped:
        parts = entry["path"].split("/")
        if len(parts) >= 2:
            per_class[(parts[0], "skipped")] += 1
    for name in classes:
        if class_counts[name] == 0:
            fatal.append(f"class folder '{name}' has no usable images ({per_class[(name, 'rejected')]}"
                         f" rejected, {per_class[(name, 'skipped')]} skipped); add .jpg/.jpeg/.png images"
                         " to it or remove the folder")
    if binary_mode and len(classes) != 2:
        shown = ", ".join(f"'{c}'" for c in classes[:10]) + (", ..." if len(classes) > 10 else "")
        fatal.append(f"binary_mode is True but the data set has {len(classes)} class(es) ({shown}); binary"
                     " mode needs exactly 2 class folders: set binary_mode to False or keep two classes")
    considered = len(accepted) + len(rejected)
    if considered and len(rejected) / considered > max_rejected_fraction:
        share = len(rejected) / considered
        fatal.append(f"{len(rejected)} of {considered} files ({share:.1%}) were rejected,"
                     f" above the limit max_rejected_fraction={max_rejected_fraction:g}"
                     f" ({max_rejected_fraction:.1%}); fix or remove the rejected files listed in"
                     f" {REPORT_FILE}, or raise max_rejected_fraction")
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


def _summary(values: list[int]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": stats.median(values), "max": max(values)}


def _statistics(accepted: list[dict[str, Any]], rejected: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "formats": dict(sorted(collections.Counter(e["format"] for e in accepted).items())),
        "modes": dict(sorted(collections.Counter(e["mode"] for e in accepted).items())),
        "width": _summary([e["width"] for e in accepted]),
        "height": _summary([e["height"] for e in accepted]),
        "bytes": _summary([e["bytes"] for e in accepted]),
        "total_bytes": sum(e["bytes"] for e in accepted),
        "exif_rotated": sum(1 for e in accepted if e["exif_orientation"] != 1),
        "rejected_by_code": dict(sorted(collections.Counter(e["code"] for e in rejected).items())),
        "tensorflow_checked": dict(sorted(collections.Counter(
            e["tensorflow_checked"] for e in accepted if e.get("tensorflow_checked")).items())),
    }


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


def _write_outputs(output_dir: str, result: dict[str, Any], *, html_report: bool, workers: int) -> None:
    # storage.write_bytes creates missing local folders and replaces files atomically.
    storage.write_bytes(storage.join(output_dir, VALIDATION_FILE),
                        json.dumps(result, indent=1, ensure_ascii=False).encode("utf-8"))
    storage.write_bytes(storage.join(output_dir, REPORT_FILE), render_report(result).encode("utf-8"))
    if html_report:
        page = render_html_report(result, result["data_uri"], workers=workers)
        storage.write_bytes(storage.join(output_dir, HTML_REPORT_FILE), page.encode("utf-8"))


def _md(text: Any) -> str:
    """Show a name verbatim in Markdown: as a code span, with table pipes and control characters escaped."""
    text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in str(text)).replace("|", "\\|")
    # A name holding a backtick needs a double-backtick fence, padded so the fence stays separate.
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _plain(text: str) -> str:
    """Free text (reasons) in a table cell: pipes escaped, one line."""
    return text.replace("|", "\\|").replace("\n", " ")


def render_report(result: dict[str, Any]) -> str:
    """The Markdown summary of a validation result, shown in the Kubeflow UI."""
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
        rows = result[key]
        if not rows:
            continue
        lines += [f"## {title} ({len(rows)})", "", "| file | reason |", "|---|---|"]
        lines += [f"| {_md(r['path'])} | {_plain(r['reason'])} |" for r in rows[:_REPORT_ROWS]]
        if len(rows) > _REPORT_ROWS:
            lines.append(f"\n{len(rows) - _REPORT_ROWS} more in {VALIDATION_FILE}.")
        lines.append("")
    if result["duplicates"]:
        lines += [f"## Identical files ({len(result['duplicates'])} groups)", "",
                  "Copies within one class are kept (and always put in the same split); copies in several"
                  " classes are rejected.", "", "| files | classes | kept |", "|---|---|---|"]
        lines += [f"| {', '.join(_md(p) for p in d['paths'])} | {', '.join(_md(c) for c in d['classes'])} |"
                  f" {'no' if d['conflict'] else 'yes'} |" for d in result["duplicates"][:_REPORT_ROWS]]
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


def _pick_thumbnails(result: dict[str, Any], per_class: int) -> tuple[dict[str, list[str]], list[str]]:
    """Paths to show: ({class: paths spread over its sorted files}, rejected paths), MAX_THUMBNAILS in all."""
    rejected = [r["path"] for r in result["rejected"] if _previewable(r)][:_REJECTED_THUMBNAILS]
    budget = MAX_THUMBNAILS - len(rejected)
    by_class: dict[str, list[str]] = collections.defaultdict(list)
    for entry in result["accepted"]:
        by_class[entry["class"]].append(entry["path"])
    classes = result["classes"]
    # Many classes share the budget: fewer per class, but every class gets one while any is left.
    share = min(per_class, max(1, budget // max(len(classes), 1)))
    picks = {}
    for name in classes:
        paths = by_class.get(name, [])
        count = min(share, len(paths), budget)
        # Spread over the class rather than its first files, which often come from one source.
        picks[name] = [paths[i * len(paths) // count] for i in range(count)]
        budget -= count
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


def render_html_report(result: dict[str, Any], data_uri: str, thumbnails_per_class: int = 4, *,
                       workers: int | None = None) -> str:
    """The validation result as one self-contained HTML page, for the Kubeflow UI.

    It shows what report.md shows, plus up to ``thumbnails_per_class`` thumbnails per class and
    thumbnails of rejected files that are still pictures (a placeholder for the others). Thumbnails
    are re-read from ``data_uri`` through ``storage`` and decoded as for training, ``THUMBNAIL_PIXELS``
    on their longer side, inlined as base64 JPEG data URIs: the page loads nothing from elsewhere
    (the UI shows it in a sandbox, and a bucket is rarely readable from a browser). At most
    ``MAX_THUMBNAILS`` are shown, so the page stays small for thousands of classes. A file that cannot
    be read or decoded now gets a placeholder; the report never fails for a thumbnail.
    """
    if thumbnails_per_class < 0:
        raise ValueError(f"thumbnails_per_class must be 0 or more, got {thumbnails_per_class!r}")
    max_pixels = result["parameters"].get("max_pixels", DEFAULT_MAX_PIXELS)
    class_picks, rejected_picks = _pick_thumbnails(result, thumbnails_per_class)
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
        rows = result[key]
        if not rows:
            continue
        preview = key == "rejected"
        out.append(f"<h2>{title} ({len(rows)})</h2><table><tr>{'<th>preview</th>' if preview else ''}"
                   "<th>file</th><th>reason</th></tr>")
        for row in rows[:_REPORT_ROWS]:
            cell = ""
            if preview:
                cell = "<td>" + _thumb_html(row["path"], thumbs.get(row["path"]),
                                            "cannot be shown" if row["path"] in thumbs else "no preview") + "</td>"
            out.append(f"<tr>{cell}<td>{_hname(row['path'])}</td><td>{_h(row['reason'])}</td></tr>")
        out.append("</table>")
        if len(rows) > _REPORT_ROWS:
            out.append(f"<p>{len(rows) - _REPORT_ROWS} more in {VALIDATION_FILE}.</p>")

    if result["duplicates"]:
        out.append(f"<h2>Identical files ({len(result['duplicates'])} groups)</h2><p>Copies within one class are"
                   " kept (and always put in the same split); copies in several classes are rejected.</p>"
                   "<table><tr><th>files</th><th>classes</th><th>kept</th></tr>")
        for group in result["duplicates"][:_REPORT_ROWS]:
            out.append(f"<tr><td>{', '.join(_hname(p) for p in group['paths'])}</td>"
                       f"<td>{', '.join(_hname(c) for c in group['classes'])}</td>"
                       f"<td>{'no' if group['conflict'] else 'yes'}</td></tr>")
        out.append("</table>")
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
    """Read a validation.json written by ``validate_dataset``."""
    try:
        result = json.loads(storage.read_bytes(validation_json))
    except json.JSONDecodeError as e:
        raise DataError(f"{validation_json} is not valid JSON ({e}); re-run validation") from e
    if not isinstance(result, dict) or result.get("schema_version") != SCHEMA_VERSION:
        raise DataError(f"{validation_json} is not a validation result of schema version {SCHEMA_VERSION};"
                        " re-run validation with this version of imgclf")
    return result
