"""``imgclf serve``: a model folder or registry version behind an HTTP model server (KServe's Python server).

One server, three contracts, one model call:

* TF Serving REST V1 (KServe V1): ``POST /v1/models/NAME:predict`` with ``{"instances": [{"b64": ...}]}``
  (or ``{"image_bytes": {"b64": ...}}`` per instance, TF Serving's named-input form) answers
  ``{"predictions": [[p0, p1, ...], ...]}``; ``GET /v1/models/NAME`` is the model's readiness.
* The reference algorithm's SageMaker container contract: ``POST /invocations`` with the image file as the
  body (``Content-Type: application/x-image``, also image/jpeg and image/png) answers ``{"probabilities":
  [...]}``, and with ``Accept: application/json;verbose`` also ``"labels"`` and ``"predicted_label"``;
  ``GET /ping`` is 200 once the model is loaded.
* Open Inference Protocol V2 over REST with JSON: ``POST /v2/models/NAME/infer`` with one BYTES input of
  base64 strings answers a FP32 ``probabilities`` output [N, K]; ``/v2/health/live``, ``/v2/health/ready``.
  V2's binary tensor extension (``Inference-Header-Content-Length``) is refused with 415: kserve 0.21's
  parser re-encodes binary BYTES as UTF-8 and answers 500 (measured, ``../shared/reference/serving.md``).

Every request's images go through one queue (``Batcher``): a worker gathers the images of concurrent
requests, up to ``max_batch`` of them, checks each header as ``imgclf predict`` does (``images.check_header``:
wrong formats, animations, decompression bombs are refused before TensorFlow sees them) and runs the
SavedModel's serving signature once for all, in a thread of its own, so the event loop only parses and
answers requests. A bad image, also one the signature's TensorFlow decoder refuses, fails only its own
request (400 naming the instance); the server never stops on a request. Bodies above
``max_request_bytes`` get 413 before they are read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from trainer import images
from trainer.errors import ImgclfError, ModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "imgclf"
DEFAULT_PORT = 8080  # KServe's and SageMaker's container port
# SageMaker's real-time endpoints take at most 6 MB per request; TF Serving-style JSON with base64 grows it
# by a third, so JSON requests of a few images fit as well.
DEFAULT_MAX_REQUEST_BYTES = 8 << 20
DEFAULT_MAX_BATCH = 32
# How long the worker holds a batch open for requests that have arrived but are still being parsed.
DEFAULT_BATCH_WAIT_MS = 3.0
IMAGE_CONTENT_TYPES = ("application/x-image", "image/jpeg", "image/png")
VERBOSE_ACCEPT = "application/json;verbose"
BINARY_V2_HEADER = "inference-header-content-length"

_KSERVE_BAD_JSON = "Unrecognized request format:"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"


# The request this task serves, while it is on its way to the batcher's queue (see Batcher.arriving).
_ARRIVING: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("imgclf_arriving", default=None)


class BadImage(ImgclfError):
    """An image in a request cannot be classified (the client's fault: 400)."""


class ModelFailure(ImgclfError):
    """The model could not answer for images that passed the checks (the server's fault: 500)."""


# ---------------------------------------------------------------------------------------------
# Images of a request
# ---------------------------------------------------------------------------------------------

def check_request_image(data: bytes, where: str, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> None:
    """Refuse what the model must not be given, with the reason: BadImage naming ``where``.

    JPEG or PNG by content (a request has no file name), then the header checks ``imgclf predict`` applies
    (``images.check_header``: at most ``max_pixels`` pixels, read from the header, so a decompression bomb
    costs nothing; no animation; PNG chunk checksums). The pixels are decoded once, by the serving
    signature's TensorFlow decoder, as ``predict`` decodes them; an image it cannot decode fails its own
    request with 400.
    """
    if not data:
        raise BadImage(f"{where}: empty (0 bytes); send the image file's bytes")
    if data.startswith(_PNG_MAGIC):
        name = f"{where}.png"
    elif data.startswith(_JPEG_MAGIC):
        name = f"{where}.jpg"
    else:
        raise BadImage(f"{where}: not a JPEG or PNG image (it starts with {data[:8]!r}); send a .jpg, .jpeg or "
                       ".png file's bytes")
    try:
        images.check_header(data, name, max_pixels)
    except images.ImageRejected as err:
        raise BadImage(f"{where}: {err.reason}") from None


def decode_b64(value: Any, where: str) -> bytes:
    """The bytes of a base64 string (standard or URL-safe alphabet); BadImage naming ``where`` otherwise."""
    if not isinstance(value, str):
        raise BadImage(f"{where}: expected a base64 string, got {type(value).__name__}")
    text = value.strip()
    try:
        if "-" in text or "_" in text:
            return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as err:
        raise BadImage(f"{where}: not valid base64 ({err})") from None


def v1_instances(payload: Any) -> tuple[str, list[bytes]]:
    """The images of a TF Serving REST request, and the key to answer under ("predictions" or "outputs").

    Row format ``{"instances": [{"b64": ...} | {"image_bytes": {"b64": ...}}, ...]}`` or columnar
    ``{"inputs": [...]}`` / ``{"inputs": {"image_bytes": [...]}}``.
    """
    if not isinstance(payload, dict) or not ({"instances", "inputs"} & set(payload)):
        shown = sorted(payload) if isinstance(payload, dict) else type(payload).__name__
        raise BadImage(f'expected a JSON object with "instances": [{{"b64": "..."}}, ...], got {shown}')
    from trainer.serve.prediction import SERVING_INPUT  # TensorFlow: only once the server runs

    key, answer = ("instances", "predictions") if "instances" in payload else ("inputs", "outputs")
    items = payload[key]
    if isinstance(items, dict) and key == "inputs":
        items = items.get(SERVING_INPUT)
    if not isinstance(items, list) or not items:
        raise BadImage(f'"{key}" must be a non-empty list of {{"b64": "..."}} objects, got {_kind(items)}')
    found = []
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if isinstance(item, dict) and set(item) == {SERVING_INPUT}:
            item, where = item[SERVING_INPUT], f"{where}.{SERVING_INPUT}"
        if not (isinstance(item, dict) and set(item) == {"b64"}):
            raise BadImage(f'{where}: expected {{"b64": "<base64 of a JPEG or PNG file>"}}, got {_kind(item)}')
        found.append(decode_b64(item["b64"], where))
    return answer, found


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return f"an object with keys {sorted(value)}"
    return "an empty list" if value == [] else type(value).__name__


# ---------------------------------------------------------------------------------------------
# Dynamic batching
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Item:
    data: bytes
    where: str
    future: asyncio.Future


class Batcher:
    """Gathers the images of concurrent requests and classifies them with one model call per batch.

    ``run`` (encoded images -> probabilities [N, K]; BadImage when its decoder refuses an image) and
    ``check`` (refuses an image with BadImage) run in one worker thread, never on the event loop. A batch
    closes when ``max_batch`` images are in it, or when no request that has arrived is still on its way to
    the queue, or ``max_wait_s`` after its first image, whichever comes first: a lone request is never held
    back.
    """

    def __init__(self, run: Callable[[list[bytes]], np.ndarray], check: Callable[[bytes, str], None], *,
                 max_batch: int = DEFAULT_MAX_BATCH, max_wait_s: float = DEFAULT_BATCH_WAIT_MS / 1000):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._run, self._check = run, check
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: asyncio.Queue[_Item] | None = None
        self._worker: asyncio.Task | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="imgclf-model")
        self._arriving = 0  # requests received whose images are not in the queue yet
        self.batches = 0
        self.images = 0

    @contextlib.contextmanager
    def arriving(self):
        """Mark the request served in this context as on its way (its body being read and parsed), so that
        an open batch waits for it; it stops counting once its images are queued, or when it ends."""
        flag = [True]
        self._arriving += 1
        token = _ARRIVING.set(flag)
        try:
            yield
        finally:
            _ARRIVING.reset(token)
            self._arrived(flag)

    def _arrived(self, flag: list[bool] | None) -> None:
        if flag and flag[0]:
            flag[0] = False
            self._arriving -= 1

    async def classify(self, data: list[bytes], where: Sequence[str]) -> list[np.ndarray]:
        """Probabilities for each image, in order; the first refused image's BadImage, or ModelFailure."""
        if self._worker is None or self._worker.done():
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._serve())
        loop = asyncio.get_running_loop()
        items = [_Item(blob, name, loop.create_future()) for blob, name in zip(data, where, strict=True)]
        for item in items:
            self._queue.put_nowait(item)
        self._arrived(_ARRIVING.get())
        return list(await asyncio.gather(*(item.future for item in items)))

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch:
                if not self._queue.empty():
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if self._arriving == 0 or remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            try:
                results = await loop.run_in_executor(self._thread, self._classify, [(i.data, i.where) for i in batch])
            except Exception as err:  # noqa: BLE001 - whatever happened, the requests get an answer
                results = [ModelFailure(f"the model failed: {type(err).__name__}: {err}")] * len(batch)
            self.batches += 1
            self.images += len(batch)
            for item, result in zip(batch, results, strict=True):
                if item.future.done():  # the client went away
                    continue
                if isinstance(result, Exception):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _classify(self, batch: list[tuple[bytes, str]]) -> list[np.ndarray | Exception]:
        results: list[np.ndarray | Exception | None] = [None] * len(batch)
        good = []
        for index, (data, where) in enumerate(batch):
            try:
                self._check(data, where)
                good.append(index)
            except BadImage as err:
                results[index] = err
            except Exception as err:  # noqa: BLE001 - a checker crash is this image's problem only
                results[index] = BadImage(f"{where}: cannot be read as an image ({type(err).__name__}: {err})")
        if good:
            try:
                rows = self._run([batch[i][0] for i in good])
                for index, row in zip(good, rows, strict=True):
                    results[index] = row
            except Exception:  # noqa: BLE001 - find the image the model cannot take by running each alone
                for index in good:
                    results[index] = self._run_one(*batch[index])
        for index in good:
            row = results[index]
            if isinstance(row, np.ndarray) and not np.all(np.isfinite(row)):
                results[index] = ModelFailure(f"{batch[index][1]}: the model's probabilities are not finite "
                                              f"({row.tolist()}); the model is broken: serve another version")
        return results

    def _run_one(self, data: bytes, where: str) -> np.ndarray | Exception:
        try:
            return self._run([data])[0]
        except BadImage as err:
            return BadImage(f"{where}: {err}")
        except Exception as err:  # noqa: BLE001
            text = str(err).strip().splitlines()
            return ModelFailure(f"{where}: the model could not classify this image ({type(err).__name__}: "
                                f"{text[0] if text else ''})")

    def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
        self._thread.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ServerOptions:
    """How ``serve`` runs; every field has the default the command line shows."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    name: str = DEFAULT_MODEL_NAME
    max_batch: int = DEFAULT_MAX_BATCH
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_pixels: int = images.DEFAULT_MAX_PIXELS


def _import_kserve():
    """Import kserve without letting it read our command line (its model_server module parses sys.argv
    on import and would take options such as --workers for its own)."""
    saved = sys.argv
    sys.argv = saved[:1]
    try:
        import kserve
        from kserve import model_server
    finally:
        sys.argv = saved
    return kserve, model_server


def build_app(model_dir: str, options: ServerOptions = ServerOptions()):
    """Load the model and build the ASGI application (KServe's routes and ours); returns (app, model).

    Raises ModelError when the model cannot be loaded or its serving signature is not what it must be.
    """
    import tensorflow as tf

    from trainer.serve import prediction

    kserve, model_server = _import_kserve()
    from kserve.errors import InvalidInput
    from kserve.model_repository import ModelRepository
    from kserve.protocol.dataplane import DataPlane
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    started = time.monotonic()
    signature = prediction.load_serving_signature(model_dir)
    labels = prediction.read_labels(model_dir)
    def run(data: list[bytes]) -> np.ndarray:
        try:
            return signature(data)
        except tf.errors.InvalidArgumentError as err:  # the decoder refused an image (truncated, CMYK, ...)
            raise BadImage(images.tensorflow_unreadable(err, "").reason) from None

    batcher = Batcher(run, lambda data, where: check_request_image(data, where, options.max_pixels),
                      max_batch=options.max_batch, max_wait_s=options.batch_wait_ms / 1000)
    # Compile the signature's graph before the first request: readiness then means answering at full speed.
    warm = signature([_blank_png()])
    if warm.shape != (1, len(labels)):
        raise ModelError(
            f"{signature.path}: answers {list(warm.shape)} for one image but the label map lists {len(labels)} "
            "classes; the files come from different training runs")

    async def classify(data: list[bytes], where: list[str]) -> list[np.ndarray]:
        try:
            return await batcher.classify(data, where)
        except BadImage as err:
            raise InvalidInput(str(err)) from None

    class ImageClassifier(kserve.Model):
        def __init__(self):
            super().__init__(options.name)
            self.ready = True

        async def predict(self, payload, headers=None):
            if isinstance(payload, InferRequest):
                return await self._predict_v2(payload)
            if isinstance(payload, bytes | bytearray):
                # kserve parses only JSON content types; TF Serving reads any body as JSON (curl -d sends
                # application/x-www-form-urlencoded), and so do we.
                try:
                    payload = json.loads(payload)
                except ValueError as err:
                    raise InvalidInput(f"the request body is not valid JSON ({err}); send "
                                       '{"instances": [{"b64": "..."}]}, or the image itself to /invocations') \
                        from None
            try:
                answer, data = v1_instances(payload)
            except BadImage as err:
                raise InvalidInput(str(err)) from None
            rows = await classify(data, [f"instances[{i}]" for i in range(len(data))])
            return {answer: [row.tolist() for row in rows]}

        async def _predict_v2(self, request: InferRequest):
            if len(request.inputs) != 1 or request.inputs[0].datatype != "BYTES":
                shown = [(i.name, i.datatype) for i in request.inputs]
                raise InvalidInput(f"expected one input of datatype BYTES (base64 strings of JPEG or PNG files), "
                                   f"got {shown}")
            tensor = request.inputs[0]
            values = tensor.as_numpy().reshape(-1)
            if values.size == 0:
                raise InvalidInput(f"input {tensor.name!r} holds no images")
            try:
                data = [decode_b64(v.decode("ascii", "replace") if isinstance(v, bytes) else v,
                                   f"{tensor.name}[{i}]") for i, v in enumerate(values)]
            except BadImage as err:
                raise InvalidInput(str(err)) from None
            rows = np.stack(await classify(data, [f"{tensor.name}[{i}]" for i in range(len(data))]))
            output = InferOutput(prediction.SERVING_OUTPUT, list(rows.shape), "FP32")
            output.set_data_from_numpy(rows.astype(np.float32), binary_data=False)
            return InferResponse(request.id or "", self.name, [output])

    model = ImageClassifier()
    repository = ModelRepository()
    repository.update(model)
    dataplane = DataPlane(model_registry=repository)
    rest = RESTServer("kserve.model_server:app", dataplane, ModelRepositoryExtension(model_registry=repository),
                      options.port)
    app = model_server.app

    async def ping(request):
        if not model.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def invocations(request):
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in IMAGE_CONTENT_TYPES:
            raise HTTPException(415, f"Content-Type {content_type or '(none)'!r} is not an image type: send the "
                                     f"image file's bytes with Content-Type: {IMAGE_CONTENT_TYPES[0]}")
        verbose = _verbose(request.headers.get("accept", ""))
        body = await request.body()
        [row] = await classify([body], ["the request body"])
        answer: dict[str, Any] = {"probabilities": row.tolist()}
        if verbose:
            answer["labels"] = list(labels)
            answer["predicted_label"] = labels[int(np.argmax(row))]
        return JSONResponse(answer)

    app.router.routes[:0] = [Route("/ping", ping, methods=["GET"]), Route("/invocations", invocations,
                                                                         methods=["POST"])]
    rest.create_application()

    async def refused(request, err):
        # One line per refused request (kserve's own handler logs each with a traceback, at ERROR).
        message = str(err)
        if message.startswith(_KSERVE_BAD_JSON):  # kserve's JSON parser, before our predict runs
            message = f"the request body is not valid JSON ({message[len(_KSERVE_BAD_JSON):].strip()})"
        log.info("400 %s %s: %s", request.method, request.url.path, message)
        return JSONResponse({"error": message}, status_code=400)

    app.add_exception_handler(InvalidInput, refused)
    # kserve's timing middleware logs every request's timings; the access log is off for the same reason.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    log.info("Model %s (%d classes) loaded from %s in %.1f s", options.name, len(labels), model_dir,
             time.monotonic() - started)
    return _Guard(app, options.max_request_bytes, batcher), model


def _verbose(accept: str) -> bool:
    """Accept: application/json;verbose (spaces allowed), as the reference endpoint reads it; anything else
    (application/json, */*, none) gets the plain answer. A type JSON cannot satisfy gets 406."""
    from starlette.exceptions import HTTPException

    types = [part.replace(" ", "").lower() for part in accept.split(",") if part.strip()]
    if any(t.startswith(VERBOSE_ACCEPT) for t in types):
        return True
    if types and not any(t.split(";")[0] in ("application/json", "*/*", "application/*") for t in types):
        raise HTTPException(406, f"Accept {accept!r}: this endpoint answers application/json or "
                                 f"{VERBOSE_ACCEPT}")
    return False


def _blank_png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8)).save(out, format="PNG")
    return out.getvalue()


class _Guard:
    """The outermost ASGI layer: refuses bodies above the bound (413) and V2's binary extension (415), and
    marks each predict request as arriving for the batcher while its body is read and parsed."""

    def __init__(self, app, max_bytes: int, batcher: Batcher):
        self.app, self.max_bytes, self.batcher = app, max_bytes, batcher

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            return await _reply(send, 413, f"request body of {int(length)} bytes is above the limit of "
                                           f"{self.max_bytes} bytes; send fewer or smaller images")
        if BINARY_V2_HEADER in headers:
            return await _reply(send, 415, "the V2 binary tensor extension (Inference-Header-Content-Length) is "
                                           "not supported (kserve 0.21 corrupts binary BYTES); send the images as "
                                           "base64 strings in JSON, or use /v1/models/NAME:predict or /invocations")
        seen = 0
        limit = self.max_bytes

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    from starlette.exceptions import HTTPException

                    raise HTTPException(413, f"request body above the limit of {limit} bytes; send fewer or "
                                             "smaller images")
            return message

        path = scope.get("path", "")
        if scope.get("method") == "POST" and (path.endswith((":predict", "/infer")) or path == "/invocations"):
            with self.batcher.arriving():
                return await self.app(scope, limited_receive, send)
        return await self.app(scope, limited_receive, send)


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def serve(model_dir: str, options: ServerOptions = ServerOptions()) -> None:
    """Load ``model_dir`` (a model folder or registry version; local, volume or gs://) and serve it until
    SIGINT or SIGTERM. Raises ModelError, before listening, when the model cannot be served."""
    import uvicorn

    app, _ = build_app(model_dir, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_config=None, access_log=False,
                            timeout_keep_alive=65)
    log.info("Serving %s on http://%s:%d: POST /v1/models/%s:predict, /v2/models/%s/infer, /invocations",
             model_dir, options.host, options.port, options.name, options.name)
    uvicorn.Server(config).run()
