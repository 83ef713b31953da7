"""Infra validation: the model server started on loopback with a new model, asked in every contract, checked.

Before a model is pushed, ``validate_serving`` starts ``imgclf serve`` (``python -m trainer serve``) in a
process of its own on 127.0.0.1, waits for it to be ready, sends test-split images as TF Serving REST V1,
SageMaker ``/invocations`` (verbose) and Open Inference Protocol V2 requests, and compares every answer with
the model's in-process predictions (``trainer.serve.prediction``: the Keras model on the pixels of
``prediction.preprocess``, TensorFlow's decode as in the serving signature, what ``imgclf predict`` answers).
The server's request bound is raised to fit the largest test image, and V1 and V2 requests carry as many
images as fit under it. A model that does not load, is not ready in time, answers an error or
answers other probabilities (more than ``TOLERANCE`` apart) or labels fails, with the reason. This is what
TFX's InfraValidator does for TF Serving.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.client import HTTPException
from typing import Any

import numpy as np

from trainer.errors import ImgclfError

log = logging.getLogger(__name__)

TOLERANCE = 1e-5
DEFAULT_IMAGES = 8
READY_TIMEOUT_S = 180.0
MODEL_NAME = "imgclf"


class ServerFailed(ImgclfError):
    """The model server did not start, or answered wrongly; the message says how."""


@dataclasses.dataclass(frozen=True)
class RunningServer:
    url: str  # http://127.0.0.1:PORT
    pid: int
    seconds_to_ready: float  # from starting the process to the first 200 of the readiness endpoint


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: str, *, port: int | None = None, log_path: str | None = None,
                   extra_args: tuple[str, ...] = (), timeout_s: float = READY_TIMEOUT_S) -> Iterator[RunningServer]:
    """Run ``python -m trainer serve model_dir`` on 127.0.0.1 and yield it once it is ready.

    Its output goes to ``log_path`` (a temporary file when None). ServerFailed, with the last lines of
    its log, when the process exits or is not ready within ``timeout_s``. The process is stopped on exit.
    """
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        if log_path is None:
            log_path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory(prefix="imgclf-serve-")),
                                    "server.log")
        out = stack.enter_context(open(log_path, "wb"))
        command = [sys.executable, "-m", "trainer", "serve", model_dir, "--host", "127.0.0.1", "--port", str(port),
                   "--name", MODEL_NAME, *extra_args]
        started = time.monotonic()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            _wait_ready(process, url, log_path, timeout_s)
            yield RunningServer(url, process.pid, time.monotonic() - started)
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(process: subprocess.Popen, url: str, log_path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerFailed(f"the model server exited with status {process.returncode} before it was ready: "
                               f"{_tail(log_path)}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.2)
    raise ServerFailed(f"the model server was not ready after {timeout_s:.0f} s: {_tail(log_path)}")


def _tail(log_path: str, lines: int = 6) -> str:
    try:
        with open(log_path, encoding="utf-8", errors="replace") as handle:
            text = [line.rstrip() for line in handle if line.strip()]
    except OSError:
        return "(no log)"
    return " | ".join(text[-lines:]) or "(empty log)"


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, bytes]:
    """One request; the status and body, also for 4xx and 5xx answers. ServerFailed, with the reason, when
    no answer comes (the server closed the connection or died, refused it, or did not answer in time)."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()
    except (urllib.error.URLError, HTTPException, OSError) as err:
        # URLError wraps a refused connection; RemoteDisconnected and timeouts come through as they are.
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        raise ServerFailed(f"{method} {url} got no answer: {type(reason).__name__}: {reason}") from None


def split_images(dataset_dir: str, count: int = DEFAULT_IMAGES, split: str = "test") -> list[tuple[str, bytes]]:
    """Up to ``count`` images of a converted data set's split (the first in its order): (path, encoded bytes)."""
    import tensorflow as tf

    from trainer.data import reader
    from trainer.layout import FEATURE_ENCODED, FEATURE_PATH

    local = reader.local_dataset_dir(dataset_dir, (split,))
    files = reader.shard_files(local, split)
    if not files:
        raise ServerFailed(f"the {split} split of {dataset_dir} is empty: nothing to validate the server with")
    features = reader.record_features()
    records = tf.data.TFRecordDataset(files).take(count).map(lambda r: tf.io.parse_single_example(r, features))
    return [(record[FEATURE_PATH].decode("utf-8"), record[FEATURE_ENCODED]) for record in records.as_numpy_iterator()]


def validate_serving(model_dir: str, dataset_dir: str, *, count: int = DEFAULT_IMAGES,
                     log_path: str | None = None, max_request_bytes: int | None = None) -> dict[str, Any]:
    """Serve ``model_dir`` on loopback and check its answers in every contract against in-process predictions.

    The server's request bound is ``max_request_bytes`` (``imgclf serve``'s default when None), raised to
    twice the largest one-image request, and V1 and V2 requests carry as many images as fit under it, so
    large photos are validated, not refused with 413.

    Returns ``{"passed", "reason", "images", "max_abs_diff", "contracts": {name: max diff}, "seconds"}``;
    never raises for a model that cannot be served (that is a failed validation, with its reason).
    """
    from trainer.serve import prediction
    from trainer.serve.serving import DEFAULT_MAX_REQUEST_BYTES

    started = time.monotonic()
    result: dict[str, Any] = {"passed": False, "images": 0, "max_abs_diff": None, "contracts": {}}
    try:
        samples = split_images(dataset_dir, count)
        result["images"] = len(samples)
        loaded = prediction.load_model(model_dir)
        expected = loaded.probabilities(np.stack([prediction.preprocess(name, blob, loaded)
                                                  for name, blob in samples]))
        if not np.all(np.isfinite(expected)):
            raise ServerFailed("the model's own probabilities are not finite (NaN or infinity)")
        requests = _Requests([blob for _, blob in samples])
        bound = max(max_request_bytes or DEFAULT_MAX_REQUEST_BYTES, 2 * requests.largest_one_image_body())
        with running_server(model_dir, log_path=log_path, extra_args=("--max-request-bytes", str(bound))) as server:
            answers = requests.ask_every_contract(server.url, bound)
        labels = list(loaded.labels)
        for contract, (rows, extra) in answers.items():
            if rows.shape != expected.shape or not np.all(np.isfinite(rows)):
                raise ServerFailed(f"{contract}: answered probabilities of shape {list(rows.shape)} "
                                   f"({'finite' if np.all(np.isfinite(rows)) else 'not finite'}), expected "
                                   f"{list(expected.shape)}")
            diff = float(np.max(np.abs(rows - expected)))
            result["contracts"][contract] = diff
            if diff > TOLERANCE:
                raise ServerFailed(f"{contract}: the server's probabilities differ from the model's by up to "
                                   f"{diff:.3g} (tolerance {TOLERANCE:g})")
            for index, answer in enumerate(extra):
                want = labels[int(np.argmax(expected[index]))]
                if answer.get("labels") != labels or answer.get("predicted_label") != want:
                    raise ServerFailed(f"{contract}: image {index} answered labels {answer.get('labels')} and "
                                       f"predicted_label {answer.get('predicted_label')!r}, expected {labels} and "
                                       f"{want!r}")
        result["max_abs_diff"] = max(result["contracts"].values())
        result["passed"] = True
        result["reason"] = (f"infra validation passed: {len(samples)} test images answered alike in "
                            f"{', '.join(result['contracts'])} (max abs diff {result['max_abs_diff']:.2g})")
    except ImgclfError as err:
        result["reason"] = f"infra validation failed: {err}"
    result["seconds"] = round(time.monotonic() - started, 1)
    log.info("%s", result["reason"])
    return result


V1_PATH = f"/v1/models/{MODEL_NAME}:predict"
V2_PATH = f"/v2/models/{MODEL_NAME}/infer"
# What a server's answer can raise when it is not shaped as its contract says (a missing key, a list for an
# object, ragged rows, a shape its data does not fill).
_MALFORMED = (KeyError, IndexError, TypeError, ValueError)


class _Requests:
    """The test images as each contract's requests: V1 and V2 carry as many images as fit under a bound."""

    def __init__(self, blobs: list[bytes]):
        self.blobs = blobs
        self.encoded = [base64.b64encode(blob).decode("ascii") for blob in blobs]

    @staticmethod
    def v1(encoded: list[str]) -> bytes:
        return json.dumps({"instances": [{"b64": e} for e in encoded]}).encode("utf-8")

    @staticmethod
    def v2(encoded: list[str]) -> bytes:
        return json.dumps({"inputs": [{"name": "image_bytes", "shape": [len(encoded)], "datatype": "BYTES",
                                       "data": encoded}]}).encode("utf-8")

    def largest_one_image_body(self) -> int:
        return max(max(len(self.v1([e])), len(self.v2([e])), len(blob))
                   for e, blob in zip(self.encoded, self.blobs, strict=True))

    def chunks(self, build, bound: int) -> Iterator[tuple[int, bytes]]:
        """(image count, body) of consecutive requests, each as many images as fit in ``bound`` bytes (at
        least one)."""
        start = 0
        while start < len(self.encoded):
            end = start + 1
            body = build(self.encoded[start:end])
            while end < len(self.encoded) and len(grown := build(self.encoded[start:end + 1])) <= bound:
                end, body = end + 1, grown
            yield end - start, body
            start = end

    def ask_every_contract(self, url: str, bound: int) -> dict[str, tuple[np.ndarray, list[dict]]]:
        """Each contract's probabilities [N, K] (and the verbose answers where the contract has them);
        ServerFailed naming the contract for an answer that is an error or not shaped as it says."""
        v1 = [_rows("tf-serving-v1", V1_PATH, _json_call(url, V1_PATH, body), count,
                    lambda answer: answer["predictions"]) for count, body in self.chunks(self.v1, bound)]
        verbose = [_json_call(url, "/invocations", blob, {"Content-Type": "application/x-image",
                                                          "Accept": "application/json;verbose"})
                   for blob in self.blobs]
        sagemaker = [_rows("sagemaker", "/invocations", answer, 1, lambda answer: [answer["probabilities"]])
                     for answer in verbose]
        v2 = [_rows("open-inference-v2", V2_PATH, _json_call(url, V2_PATH, body), count,
                    lambda answer: np.reshape(answer["outputs"][0]["data"], answer["outputs"][0]["shape"]))
              for count, body in self.chunks(self.v2, bound)]
        return {"tf-serving-v1": (np.concatenate(v1), []), "sagemaker": (np.concatenate(sagemaker), verbose),
                "open-inference-v2": (np.concatenate(v2), [])}


def _rows(contract: str, path: str, answer: dict, count: int, pick) -> np.ndarray:
    """``pick(answer)`` as probabilities [count, K]; ServerFailed when the answer is not shaped so."""
    try:
        rows = np.asarray(pick(answer), dtype=np.float64)
    except _MALFORMED as err:
        raise ServerFailed(f"{contract}: POST {path} answered {json.dumps(answer)[:200]}, which holds no "
                           f"probabilities ({type(err).__name__}: {err})") from None
    if rows.ndim != 2 or rows.shape[0] != count:
        raise ServerFailed(f"{contract}: POST {path} answered probabilities of shape {list(rows.shape)} for "
                           f"{count} image(s)")
    return rows


def _json_call(url: str, path: str, body: bytes, headers: dict[str, str] | None = None) -> dict:
    status, content = http("POST", url + path, body, headers or {"Content-Type": "application/json"})
    if status != 200:
        raise ServerFailed(f"POST {path} answered {status}: {content[:300].decode('utf-8', 'replace')}")
    try:
        answer = json.loads(content)
    except ValueError:
        raise ServerFailed(f"POST {path} answered invalid JSON: {content[:200]!r}") from None
    if not isinstance(answer, dict):
        raise ServerFailed(f"POST {path} answered JSON that is not an object: {content[:200]!r}")
    return answer
