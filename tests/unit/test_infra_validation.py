"""Infra validation in the quality gate: the model served on loopback must answer every contract as it predicts
in-process; a model with a broken serving signature or NaN outputs is not blessed, and so never pushed."""

import contextlib
import json
import re
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.datasets import make_image_folder
from tests.support.serving import break_signature, small_model_dir
from trainer.data import conversion, validation
from trainer.errors import ModelError
from trainer.layout import BLESSING_FILE, INFRA_VALIDATION_LOG, SAVED_MODEL_DIR
from trainer.serve import infra_validation, registry

LABELS = ["cats", "dogs", "fish"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("infra")
    make_image_folder(root / "images", {label: 4 for label in LABELS}, size=(24, 24), fmt="png")
    validation.validate_dataset(str(root / "images"), str(root / "validation"))
    conversion.convert_dataset(str(root / "images"), str(root / "validation" / "validation.json"),
                               str(root / "dataset"), validation_split_ratio=0.0, test_split_ratio=0.5,
                               random_seed=0)
    return str(root / "dataset")


def gate(dataset, model_dir, output_dir):
    return registry.decide_blessing("accuracy", 0.5, dataset_dir=dataset, model_uri=model_dir,
                                    output_dir=str(output_dir), model_dir=model_dir)


def test_a_servable_model_is_blessed_with_its_infra_validation(dataset, tmp_path):
    model_dir = small_model_dir(tmp_path / "model", LABELS)
    decision = gate(dataset, model_dir, tmp_path / "blessing")
    infra = decision["infra_validation"]
    assert decision["blessed"] is True, decision["reason"]
    assert "; infra validation passed: 6 test images answered alike in tf-serving-v1, sagemaker, " \
           "open-inference-v2" in decision["reason"]
    assert infra["passed"] and infra["images"] == 6 and 0 <= infra["max_abs_diff"] <= 1e-5
    assert set(infra["contracts"]) == {"tf-serving-v1", "sagemaker", "open-inference-v2"}
    assert json.loads((tmp_path / "blessing" / BLESSING_FILE).read_text())["infra_validation"] == infra
    assert "Serving" in (tmp_path / "blessing" / INFRA_VALIDATION_LOG).read_text()


@pytest.mark.parametrize("defect, reason", [
    ("broken signature", r"not blessed: infra validation failed: the model server exited with status 1 before it "
                         r"was ready: .*the 'serving_default' signature takes 'pixels'"),
    ("NaN outputs", r"not blessed: infra validation failed: the model's own probabilities are not finite"),
    ("SavedModel of another model", r"not blessed: infra validation failed: tf-serving-v1: the server's "
                                    r"probabilities differ from the model's by up to [0-9.e-]+ \(tolerance 1e-05\)"),
])
def test_a_model_that_cannot_serve_is_not_blessed_and_not_pushed(dataset, tmp_path, defect, reason):
    model_dir = small_model_dir(tmp_path / "model", LABELS, nan_head=defect == "NaN outputs")
    if defect == "broken signature":
        break_signature(model_dir)
    if defect == "SavedModel of another model":
        other = small_model_dir(tmp_path / "other", LABELS, seed=1)
        shutil.rmtree(Path(model_dir, SAVED_MODEL_DIR))
        shutil.copytree(Path(other, SAVED_MODEL_DIR), Path(model_dir, SAVED_MODEL_DIR))
    decision = gate(dataset, model_dir, tmp_path / "blessing")
    assert decision["blessed"] is False
    assert decision["infra_validation"]["passed"] is False
    assert pytest.approx(0.5) == decision["eval_value"]
    assert re.match(reason, decision["reason"]), decision["reason"]
    with pytest.raises(ModelError, match="refusing to push"):
        registry.push_model(model_dir, str(tmp_path / "registry"), metadata=decision)
    assert not Path(tmp_path / "registry").exists()


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    return small_model_dir(tmp_path_factory.mktemp("servable") / "model", LABELS)


def test_images_too_large_for_one_request_are_sent_in_several_under_a_raised_bound(dataset, servable):
    """Photos of a few MB each would not fit one request under serve's default bound: the gate raises the
    server's bound to twice the largest one-image request and splits V1 and V2 requests under it."""
    blobs = [blob for _, blob in infra_validation.split_images(dataset)]
    requests = infra_validation._Requests(blobs)
    bound = 2 * requests.largest_one_image_body()
    assert len(requests.v1(requests.encoded)) > bound  # one request of all images would get 413
    result = infra_validation.validate_serving(servable, dataset, max_request_bytes=1000)
    assert result["passed"] is True, result["reason"]
    assert result["images"] == 6
    sizes = [count for count, body in requests.chunks(requests.v1, bound)]
    assert sum(sizes) == 6 and len(sizes) > 1


class GarbageServer:
    """A model server that answers wrongly (a stand-in for a broken ``imgclf serve`` on loopback)."""

    def __init__(self, answer: bytes | None):
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if served.answer is None:  # the server dies mid-request: the connection closes unanswered
                    self.close_connection = True
                    return
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(served.answer)))
                self.end_headers()
                self.wfile.write(served.answer)

        self.answer = answer
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("answer, reason", [
    (None, r"POST http://127\.0\.0\.1:\d+/v1/models/imgclf:predict got no answer: RemoteDisconnected"),
    (b'{"predictions": [[0.1, 0.2, 0.7], [0.5]]}', r"tf-serving-v1: POST /v1/models/imgclf:predict answered "
                                                  r"\{\"predictions\".*which holds no probabilities \(ValueError"),
    (b'{"predictions": [0.1, 0.2, 0.7]}', r"tf-serving-v1: POST /v1/models/imgclf:predict answered "
                                         r"probabilities of shape \[3\] for \d image\(s\)"),
    (b"[[0.1, 0.2, 0.7]]", r"POST /v1/models/imgclf:predict answered JSON that is not an object"),
])
def test_a_server_answering_garbage_or_dying_fails_validation_with_the_reason(dataset, servable, monkeypatch,
                                                                            answer, reason):
    server = GarbageServer(answer)

    @contextlib.contextmanager
    def garbage(model_dir, **kwargs):
        yield infra_validation.RunningServer(server.url, 0, 0.0)

    monkeypatch.setattr(infra_validation, "running_server", garbage)
    try:
        result = infra_validation.validate_serving(servable, dataset)
    finally:
        server.close()
    assert result["passed"] is False
    assert re.match("infra validation failed: " + reason, result["reason"]), result["reason"]


def test_a_model_not_blessed_on_metrics_is_not_served(dataset, tmp_path):
    """Infra validation costs a server start: it is skipped when the metrics already refuse the model."""
    decision = registry.decide_blessing("accuracy", 0.5, dataset_dir=dataset, min_eval_value=0.9,
                                        model_dir=str(tmp_path / "never-read"))
    assert decision["blessed"] is False
    assert decision["reason"] == ("not blessed: accuracy 0.5000 < threshold 0.9000; infra validation not run: "
                                  "not blessed on metrics")
    assert "infra_validation" not in decision
