"""imgclf serve (trainer.serve.serving): the real server on a free loopback port answers TF Serving V1, SageMaker's
/invocations and V2 as `imgclf predict` does, refuses every bad request with a clear 4xx and stays ready;
its batcher gathers concurrent requests into one model call off the event loop."""

import asyncio
import base64
import http.client as http_client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from tests.support.datasets import encode, noise, png16_gray_transparent_key, png_header_only, truncate
from tests.support.gcs import upload_folder
from tests.support.serving import break_signature, small_model_dir
from trainer.serve import prediction, registry, serving
from trainer.serve.infra_validation import ServerFailed, http, running_server

LABELS = ["cats", "dogs", "fish"]
MAX_REQUEST_BYTES = 300_000


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return small_model_dir(tmp_path_factory.mktemp("serving") / "model", LABELS)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = str(tmp_path_factory.mktemp("serving-log") / "server.log")
    with running_server(model_dir, log_path=log_path,
                        extra_args=("--max-request-bytes", str(MAX_REQUEST_BYTES))) as running:
        yield running.url


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Four different images, JPEG and PNG, of different sizes, as files (for `imgclf predict`) and bytes."""
    folder = tmp_path_factory.mktemp("pictures")
    files = {}
    for index, (fmt, size) in enumerate([("JPEG", (30, 40)), ("PNG", (64, 48)), ("JPEG", (16, 16)),
                                         ("PNG", (21, 77))]):
        path = folder / f"picture{index}.{'jpg' if fmt == 'JPEG' else 'png'}"
        path.write_bytes(encode(noise(*size, seed=index), fmt))
        files[str(path)] = path.read_bytes()
    return files


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def post_json(url, path, payload, headers=None):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return http("POST", url + path, body, headers or {"Content-Type": "application/json"})


def answer(status_and_body):
    status, body = status_and_body
    assert status == 200, body
    return json.loads(body)


def test_every_contract_answers_what_imgclf_predict_answers(server, model_dir, pictures):
    expected = prediction.predict(model_dir, list(pictures), verbose=True)
    blobs = list(pictures.values())

    v1 = answer(post_json(server, "/v1/models/imgclf:predict", {"instances": [{"b64": b64(b)} for b in blobs]}))
    named = answer(post_json(server, "/v1/models/imgclf:predict",
                             {"instances": [{"image_bytes": {"b64": b64(b)}} for b in blobs]}))
    columnar = answer(post_json(server, "/v1/models/imgclf:predict",
                                {"inputs": {"image_bytes": [{"b64": b64(b)} for b in blobs]}}))
    v2 = answer(post_json(server, "/v2/models/imgclf/infer", {"inputs": [
        {"name": "image_bytes", "shape": [len(blobs)], "datatype": "BYTES", "data": [b64(b) for b in blobs]}]}))
    plain = [answer(post_json(server, "/invocations", b, {"Content-Type": "application/x-image"})) for b in blobs]
    verbose = [answer(post_json(server, "/invocations", b, {"Content-Type": "application/x-image",
                                                            "Accept": "application/json;verbose"})) for b in blobs]

    want = np.array([e["probabilities"] for e in expected])
    assert want.shape == (4, 3) and np.ptp(want, axis=0).max() > 1e-3, "the pictures must get different answers"
    assert np.abs(np.array(v1["predictions"]) - want).max() <= 1e-5
    assert np.abs(np.array(named["predictions"]) - want).max() <= 1e-5
    assert np.abs(np.array(columnar["outputs"]) - want).max() <= 1e-5
    output = v2["outputs"][0]
    assert output["name"] == "probabilities" and output["shape"] == [4, 3] and output["datatype"] == "FP32"
    assert np.abs(np.reshape(output["data"], (4, 3)) - want).max() <= 1e-5
    assert all(set(a) == {"probabilities"} for a in plain)
    assert np.abs(np.array([a["probabilities"] for a in plain]) - want).max() <= 1e-5
    for got, exp in zip(verbose, expected, strict=True):
        assert got["labels"] == LABELS and got["predicted_label"] == exp["predicted_label"]
        assert np.abs(np.array(got["probabilities"]) - exp["probabilities"]).max() <= 1e-5


def test_images_are_checked_and_decoded_as_predict_does(server, model_dir, tmp_path):
    """A 16-bit PNG with a transparent colour: Pillow and TensorFlow decode it differently, so validation keeps it
    out of training; predict and the served model both decode it with TensorFlow, so both answer, alike."""
    blob = png16_gray_transparent_key()
    (tmp_path / "key.png").write_bytes(blob)
    [expected] = prediction.predict(model_dir, [str(tmp_path / "key.png")])
    served = answer(post_json(server, "/invocations", blob, IMAGE))["probabilities"]
    assert np.abs(np.array(served) - expected["probabilities"]).max() <= 1e-5


def test_health_and_readiness(server):
    assert http("GET", server + "/ping") == (200, b'{"status":"ready"}')
    assert http("GET", server + "/v2/health/live")[0] == 200
    assert json.loads(http("GET", server + "/v2/health/ready")[1]) == {"ready": True}
    assert json.loads(http("GET", server + "/v1/models/imgclf")[1]) == {"name": "imgclf", "ready": True}
    status, metrics = http("GET", server + "/metrics")
    assert status == 200 and b"request_predict_seconds" in metrics


PICTURE = encode(noise(30, 40, seed=9), "JPEG")
V1 = "/v1/models/imgclf:predict"
IMAGE = {"Content-Type": "application/x-image"}
BAD_REQUESTS = {
    "not an image": ("/invocations", b"hello, not an image", IMAGE, 400, "not a JPEG or PNG image"),
    "empty body": ("/invocations", b"", IMAGE, 400, "empty"),
    "truncated JPEG": ("/invocations", truncate(PICTURE), IMAGE, 400, "the request body: TensorFlow cannot decode it"),
    "GIF": ("/invocations", b"GIF89a" + bytes(20), IMAGE, 400, "not a JPEG or PNG"),
    "decompression bomb": ("/invocations", png_header_only(20_000, 20_000), IMAGE, 400, "pixels"),
    "wrong content type": ("/invocations", PICTURE, {"Content-Type": "text/plain"}, 415, "not an image type"),
    "unanswerable Accept": ("/invocations", PICTURE, {**IMAGE, "Accept": "text/csv"}, 406, "application/json"),
    "too large": ("/invocations", bytes(MAX_REQUEST_BYTES + 1), IMAGE, 413, "above the limit"),
    "bad JSON": (V1, b'{"instances": [', None, 400, "not valid JSON"),
    "bad base64": (V1, {"instances": [{"b64": "not base64!"}]}, None, 400, "instances[0]: not valid base64"),
    "wrong shape": (V1, {"instances": [[[0, 0, 0]]]}, None, 400, 'instances[0]: expected {"b64"'),
    "no instances": (V1, {"images": []}, None, 400, '"instances"'),
    "a bad image among good": (V1, {"instances": [{"b64": b64(PICTURE)}, {"b64": b64(truncate(PICTURE))}]}, None,
                               400, "instances[1]: TensorFlow cannot decode it"),
    "V2 wrong datatype": ("/v2/models/imgclf/infer", {"inputs": [{"name": "x", "shape": [1], "datatype": "FP32",
                                                                  "data": [1.0]}]}, None, 400, "BYTES"),
    "V2 binary extension": ("/v2/models/imgclf/infer", b"{}", {"Inference-Header-Content-Length": "2"}, 415,
                            "binary tensor extension"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_request_gets_a_clear_4xx_and_the_server_stays_ready(server, case):
    path, payload, headers, status, message = BAD_REQUESTS[case]
    got, body = post_json(server, path, payload, headers)
    assert got == status, body
    reply = json.loads(body)
    assert message in (reply.get("error") or reply["detail"]), reply
    assert http("GET", server + "/v2/health/ready")[0] == 200
    assert answer(post_json(server, "/invocations", PICTURE, IMAGE))["probabilities"]


def test_a_chunked_body_above_the_bound_is_refused_while_it_is_read(server):
    """Without a Content-Length the bound is counted as the body arrives."""
    host, port = server.removeprefix("http://").split(":")
    connection = http_client.HTTPConnection(host, int(port), timeout=30)
    chunks = (bytes(50_000) for _ in range(MAX_REQUEST_BYTES // 50_000 + 2))
    connection.request("POST", "/invocations", body=chunks, headers=IMAGE, encode_chunked=True)
    reply = connection.getresponse()
    assert reply.status == 413 and "above the limit" in json.loads(reply.read())["detail"]
    connection.close()
    assert http("GET", server + "/v2/health/ready")[0] == 200


def test_concurrent_requests_each_get_their_own_answer(server, model_dir, pictures):
    """24 requests at once (batched together by the server) each get the probabilities of their own image."""
    blobs = [encode(noise(20 + i, 30, seed=100 + i), "PNG") for i in range(24)]
    want = prediction.serve_saved_model(model_dir, blobs)
    with ThreadPoolExecutor(12) as pool:
        got = list(pool.map(lambda b: answer(post_json(server, "/invocations", b, IMAGE))["probabilities"], blobs))
    assert np.abs(np.array(got) - want).max() <= 1e-5


def test_a_pushed_registry_version_serves_what_predict_answers(model_dir, pictures, tmp_path):
    version = registry.push_model(model_dir, str(tmp_path / "registry"),
                                  metadata={"blessed": True, "reason": "test"})
    expected = prediction.predict(version, list(pictures), verbose=True)
    with running_server(version) as running:
        got = [answer(post_json(running.url, "/invocations", blob, {**IMAGE, "Accept": "application/json;verbose"}))
               for blob in pictures.values()]
    assert [g["predicted_label"] for g in got] == [e["predicted_label"] for e in expected]
    assert np.abs(np.array([g["probabilities"] for g in got])
                  - np.array([e["probabilities"] for e in expected])).max() <= 1e-5


def test_a_model_on_gcs_is_served(model_dir, pictures, gcs_bucket):
    """gs:// models are read through trainer.storage (here from the GCS emulator the server process inherits)."""
    uri = upload_folder(model_dir, gcs_bucket, "models/flowers/000001")
    blob = next(iter(pictures.values()))
    with running_server(uri) as running:
        got = answer(post_json(running.url, "/invocations", blob, IMAGE))["probabilities"]
    assert np.abs(np.array(got) - prediction.serve_saved_model(model_dir, [blob])[0]).max() <= 1e-5


def test_a_model_that_cannot_serve_stops_the_server_before_it_listens(model_dir, tmp_path):
    broken = small_model_dir(tmp_path / "model", LABELS)
    break_signature(broken)
    with pytest.raises(ServerFailed, match=r"exited with status 1 before it was ready: .*takes 'pixels'"):
        with running_server(broken, timeout_s=120):
            pass


# --- the batcher -----------------------------------------------------------------------------------------

class FakeModel:
    """Stands in for the serving signature: image bytes -> one row per image, recording each call."""

    def __init__(self, delay=0.0, fail_on=None):
        self.calls, self.delay, self.fail_on = [], delay, fail_on
        self.thread_ids = set()

    def __call__(self, blobs):
        self.calls.append(len(blobs))
        self.thread_ids.add(threading.get_ident())
        time.sleep(self.delay)
        if self.fail_on is not None and self.fail_on in blobs:
            raise RuntimeError("cannot decode")
        return np.array([[len(b), 1.0] for b in blobs], dtype=np.float32)


def refuse_x(data, where):
    if data.startswith(b"x"):
        raise serving.BadImage(f"{where}: not an image")


def run_requests(batcher, requests, **gather):
    async def main():
        async def one(blobs):
            try:
                return [row.tolist() for row in await batcher.classify(blobs, [f"i{n}" for n in range(len(blobs))])]
            except Exception as err:  # noqa: BLE001 - the test looks at it
                return err
        return await asyncio.gather(*(one(blobs) for blobs in requests))
    try:
        return asyncio.run(main())
    finally:
        batcher.close()


def test_concurrent_requests_share_one_model_call_off_the_event_loop():
    model = FakeModel(delay=0.05)
    batcher = serving.Batcher(model, refuse_x, max_batch=8, max_wait_s=0.01)
    results = run_requests(batcher, [[b"a" * n] for n in range(1, 13)])
    assert results == [[[float(n), 1.0]] for n in range(1, 13)]
    assert sum(model.calls) == 12 and max(model.calls) == 8 and len(model.calls) <= 3
    assert threading.get_ident() not in model.thread_ids


def test_a_refused_image_fails_only_its_own_request():
    model = FakeModel()
    results = run_requests(serving.Batcher(model, refuse_x, max_batch=8), [[b"aa"], [b"bbb", b"xx"], [b"c"]])
    assert results[0] == [[2.0, 1.0]] and results[2] == [[1.0, 1.0]]
    assert isinstance(results[1], serving.BadImage) and "i1: not an image" in str(results[1])


def test_an_image_the_model_cannot_take_fails_alone():
    model = FakeModel(fail_on=b"bad")
    results = run_requests(serving.Batcher(model, refuse_x, max_batch=8), [[b"ok"], [b"bad"], [b"fine"]])
    assert results[0] == [[2.0, 1.0]] and results[2] == [[4.0, 1.0]]
    assert isinstance(results[1], serving.ModelFailure) and "could not classify" in str(results[1])


def test_an_image_the_models_decoder_refuses_is_a_bad_image_of_its_own_request():
    def model(blobs):
        if b"cmyk" in blobs:
            raise serving.BadImage("TensorFlow cannot decode it")
        return np.ones((len(blobs), 2), dtype=np.float32)

    results = run_requests(serving.Batcher(model, refuse_x, max_batch=8), [[b"ok"], [b"fine", b"cmyk"]])
    assert results[0] == [[1.0, 1.0]]
    assert isinstance(results[1], serving.BadImage) and str(results[1]) == "i1: TensorFlow cannot decode it"


def test_the_event_loop_runs_while_the_model_computes():
    model = FakeModel(delay=0.3)
    batcher = serving.Batcher(model, refuse_x)
    ticks = []

    async def main():
        async def ticker():
            for _ in range(10):
                ticks.append(time.monotonic())
                await asyncio.sleep(0.02)
        await asyncio.gather(batcher.classify([b"a"], ["i0"]), ticker())
    try:
        asyncio.run(main())
    finally:
        batcher.close()
    assert len(ticks) == 10 and ticks[-1] - ticks[0] < 0.28


def test_non_finite_probabilities_are_a_server_error_not_an_answer():
    def nan_model(blobs):
        return np.full((len(blobs), 2), np.nan, np.float32)
    [result] = run_requests(serving.Batcher(nan_model, refuse_x), [[b"a"]])
    assert isinstance(result, serving.ModelFailure) and "not finite" in str(result)

