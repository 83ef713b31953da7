"""A stand-in for the Kubernetes API server's custom-resource endpoints, for the deploy step's tests.

It stands in for kube-apiserver serving KServe's InferenceService CRD (serving.kserve.io/v1beta1) and mimics
what the deploy step relies on, as these sources define it:
- the REST paths and verbs of a namespaced custom resource, ``/apis/{group}/{version}/namespaces/{ns}/{plural}
  [/{name}]`` with GET, POST and PATCH (kubernetes/apiserver ``pkg/endpoints/installer.go``); PATCH of a custom
  resource accepts ``application/merge-patch+json`` (RFC 7386) and ``application/json-patch+json`` but not
  strategic merge, answering 415 (apiextensions-apiserver ``pkg/apiserver/customresource_handler.go``);
- ``metadata.generation`` set to 1 on create and raised when the spec changes, and errors as ``Status`` objects
  (kind Status, code, reason, message: apimachinery ``pkg/apis/meta/v1/types.go``), e.g. 404 NotFound, 409
  AlreadyExists, 403 Forbidden;
- the status KServe's controller writes (kserve ``pkg/apis/serving/v1beta1/inference_service_status.go``):
  ``observedGeneration``, ``conditions`` (Ready, PredictorReady, ...), ``url``, ``modelStatus``. The test
  scripts it: ``status_script(obj, reads)`` returns the status to show on the ``reads``-th GET.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKubernetesAPI:
    """InferenceServices in memory behind a real HTTP server on 127.0.0.1; ``url`` is its address."""

    def __init__(self, status_script: Callable[[dict, int], dict] | None = None, forbidden: set[str] = frozenset()):
        self.objects: dict[tuple[str, str], dict] = {}
        self.requests: list[tuple[str, str, str]] = []  # (method, path, content type)
        self.reads: dict[tuple[str, str], int] = {}
        self.status_script = status_script
        self.forbidden = forbidden  # verbs answered 403, as RBAC without them would
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                  "reason": reason, "code": code})

            def _handle(self, method: str) -> None:
                api.requests.append((method, self.path, self.headers.get("Content-Type", "")))
                if not self.path.startswith(PREFIX):
                    return self._status(404, "NotFound", "the server could not find the requested resource")
                parts = self.path[len(PREFIX):].split("?")[0].split("/")
                namespace, plural, name = parts[0], parts[1], (parts[2] if len(parts) > 2 else "")
                verb = {"GET": "get", "POST": "create", "PATCH": "patch"}[method]
                if verb in api.forbidden:
                    return self._status(403, "Forbidden", f'inferenceservices.serving.kserve.io "{name}" is '
                                        f'forbidden: User "system:serviceaccount:{namespace}:pipeline-runner" cannot '
                                        f'{verb} resource "{plural}" in API group "serving.kserve.io" in the '
                                        f'namespace "{namespace}"')
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
                with api.lock:
                    return self._verb(method, namespace, name, body)

            def _verb(self, method: str, namespace: str, name: str, body: Any) -> None:
                if method == "POST":
                    name = body["metadata"]["name"]
                    if (namespace, name) in api.objects:
                        return self._status(409, "AlreadyExists", f'inferenceservices "{name}" already exists')
                    obj = copy.deepcopy(body)
                    obj["metadata"].update(generation=1, uid=f"uid-{name}", resourceVersion="1")
                    api.objects[(namespace, name)] = obj
                    return self._send(201, obj)
                obj = api.objects.get((namespace, name))
                if obj is None:
                    return self._status(404, "NotFound", f'inferenceservices.serving.kserve.io "{name}" not found')
                if method == "PATCH":
                    if self.headers.get("Content-Type") not in ("application/merge-patch+json",
                                                                "application/json-patch+json"):
                        return self._status(415, "UnsupportedMediaType",
                                            "the body of the request was in an unknown format - accepted media "
                                            "types include: application/json-patch+json, application/merge-patch+"
                                            "json, application/apply-patch+yaml")
                    patched = merge_patch(obj, body)
                    if patched.get("spec") != obj.get("spec"):
                        patched["metadata"]["generation"] = obj["metadata"]["generation"] + 1
                    api.objects[(namespace, name)] = patched
                    return self._send(200, patched)
                reads = api.reads[(namespace, name)] = api.reads.get((namespace, name), 0) + 1
                if api.status_script is not None:
                    obj["status"] = api.status_script(obj, reads)
                return self._send(200, obj)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PATCH(self):
                self._handle("PATCH")

        self.lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKubernetesAPI:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def api_client(self):
        """A ``kubernetes`` client ApiClient that talks to this server."""
        from kubernetes import client

        configuration = client.Configuration()
        configuration.host = self.url
        return client.ApiClient(configuration)
