"""A local HTTP server that stands in for the Kubeflow Pipelines API server (REST v2beta1) in tests.

It answers the endpoints that ``kfp.Client`` calls for uploading pipelines and versions, creating
experiments, runs and recurring runs, with JSON shaped like the real server's (snake_case field
names, RFC 3339 times, 64-bit integers as strings, ``{"code", "message"}`` errors). It records every
request, so tests can check exactly what the commands sent. State lives in memory for one server.

    with FakeKfpServer() as kfp_api:
        client = kfp.Client(host=kfp_api.url)
        ...
        [upload] = kfp_api.requests_to("POST", "/apis/v2beta1/pipelines/upload")
"""

from __future__ import annotations

import dataclasses
import datetime
import email.parser
import email.policy
import http.server
import itertools
import json
import re
import threading
import urllib.parse
from typing import Any

import yaml

API = "/apis/v2beta1"
# gRPC status codes the real server puts in its error bodies.
_NOT_FOUND, _ALREADY_EXISTS, _INVALID_ARGUMENT = 5, 6, 3
_HTTP_FOR_CODE = {_NOT_FOUND: 404, _ALREADY_EXISTS: 409, _INVALID_ARGUMENT: 400}
_EPOCH = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)


@dataclasses.dataclass
class RecordedRequest:
    """One request as the server received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names in lower case, as HTTP treats them case-insensitively
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def files(self) -> dict[str, tuple[str | None, bytes]]:
        """Multipart form parts by field name: (file name, content)."""
        head = f"Content-Type: {self.headers.get('content-type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        if not message.is_multipart():
            return {}
        return {part.get_param("name", header="content-disposition"): (part.get_filename(),
                                                                        part.get_payload(decode=True))
                for part in message.iter_parts()}


class _ApiError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


class FakeKfpServer:
    """The fake API server on 127.0.0.1 and a free port; a context manager that starts and stops it."""

    def __init__(self) -> None:
        self.requests: list[RecordedRequest] = []
        self.pipelines: dict[str, dict[str, Any]] = {}
        self.versions: dict[str, list[dict[str, Any]]] = {}
        self.experiments: dict[str, dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}
        self.recurring_runs: dict[str, dict[str, Any]] = {}
        # The state GET /runs/{id} reports; tests set it to what the run should have ended with.
        self.run_state = "SUCCEEDED"
        self.multi_user = False
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> FakeKfpServer:
        handler = type("Handler", (_Handler,), {"fake": self})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        # A short poll keeps stop() quick: shutdown() waits for the serving loop's next poll.
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-kfp", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> FakeKfpServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        """The recorded requests with this method and exact path (query string excluded)."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    # --- request handling ---
    def handle(self, request: RecordedRequest) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(request)
            for method, pattern, action in self._routes():
                match = re.fullmatch(pattern, request.path)
                if match and method == request.method:
                    try:
                        return 200, action(request, *match.groups())
                    except _ApiError as err:
                        return _HTTP_FOR_CODE[err.code], {"error": str(err), "code": err.code,
                                                           "message": str(err), "details": []}
            return 404, {"error": "Not Found", "code": _NOT_FOUND,
                         "message": f"the fake KFP API has no route {request.method} {request.path}", "details": []}

    def _routes(self):
        return [
            ("GET", f"{API}/healthz", lambda r: {"multi_user": self.multi_user, "pipeline_store": "database"}),
            ("POST", f"{API}/pipelines/upload", self._upload_pipeline),
            ("POST", f"{API}/pipelines/upload_version", self._upload_version),
            ("GET", f"{API}/pipelines", self._list_pipelines),
            ("GET", f"{API}/pipelines/([^/]+)/versions", self._list_versions),
            ("GET", f"{API}/experiments", self._list_experiments),
            ("POST", f"{API}/experiments", self._create_experiment),
            ("POST", f"{API}/runs", self._create_run),
            ("GET", f"{API}/runs/([^/:]+)", self._get_run),
            ("POST", f"{API}/recurringruns", self._create_recurring_run),
        ]

    def _new_id(self) -> tuple[str, str]:
        """A UUID-shaped id and a creation time one second after the previous object's."""
        n = next(self._ids)
        created = (_EPOCH + datetime.timedelta(seconds=n)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return f"{n:08x}-0000-4000-8000-{n:012x}", created

    def _uploaded_spec(self, request: RecordedRequest) -> dict[str, Any]:
        upload = request.files.get("uploadfile")
        if upload is None:
            raise _ApiError(_INVALID_ARGUMENT, "failed to read the pipeline file: the form has no 'uploadfile'")
        try:
            documents = [document for document in yaml.safe_load_all(upload[1]) if document]
        except yaml.YAMLError as err:
            raise _ApiError(_INVALID_ARGUMENT, f"invalid pipeline spec: {err}") from None
        # As the real server's version.pipeline_spec (kfp 2.5.0 backend/src/apiserver/server/api_util.go,
        # yamlStringToPipelineSpecStruct): the PipelineSpec, or with a platform spec both under their names.
        if not documents:
            raise _ApiError(_INVALID_ARGUMENT, "No pipeline spec provided in yaml doc")
        if len(documents) > 1:
            return {"pipeline_spec": documents[0], "platform_spec": documents[1]}
        return documents[0]

    def _upload_pipeline(self, request: RecordedRequest) -> dict[str, Any]:
        spec = self._uploaded_spec(request)
        name = request.query.get("display_name") or request.query.get("name") or request.files["uploadfile"][0]
        namespace = request.query.get("namespace", "")
        if any(p["display_name"] == name and p.get("namespace", "") == namespace for p in self.pipelines.values()):
            raise _ApiError(_ALREADY_EXISTS, f"Failed to create a pipeline due to conflict: pipeline with name "
                                             f"{name} already exists")
        pipeline_id, created = self._new_id()
        pipeline = {"pipeline_id": pipeline_id, "name": name, "display_name": name, "created_at": created,
                    "description": request.query.get("description", "")}
        if namespace:
            pipeline["namespace"] = namespace
        self.pipelines[pipeline_id] = pipeline
        # Like the real server, the first version is named after the pipeline.
        self.versions[pipeline_id] = [self._version(pipeline_id, name, pipeline["description"], spec)]
        return pipeline

    def _upload_version(self, request: RecordedRequest) -> dict[str, Any]:
        spec = self._uploaded_spec(request)
        pipeline_id = request.query.get("pipelineid", "")
        if pipeline_id not in self.pipelines:
            raise _ApiError(_NOT_FOUND, f"Failed to create a pipeline version: pipeline {pipeline_id} not found")
        name = request.query.get("display_name") or request.query.get("name") or request.files["uploadfile"][0]
        if any(v["display_name"] == name for v in self.versions[pipeline_id]):
            raise _ApiError(_ALREADY_EXISTS, f"Failed to create a pipeline version due to conflict: version "
                                             f"{name} of pipeline {pipeline_id} already exists")
        version = self._version(pipeline_id, name, request.query.get("description", ""), spec)
        self.versions[pipeline_id].append(version)
        return version

    def _version(self, pipeline_id: str, name: str, description: str, spec: dict[str, Any]) -> dict[str, Any]:
        version_id, created = self._new_id()
        return {"pipeline_id": pipeline_id, "pipeline_version_id": version_id, "name": name, "display_name": name,
                "description": description, "created_at": created, "pipeline_spec": spec}

    def _list_pipelines(self, request: RecordedRequest) -> dict[str, Any]:
        namespace = request.query.get("namespace", "")
        found = [p for p in self.pipelines.values() if p.get("namespace", "") == namespace]
        return _page(request, found, "pipelines")

    def _list_versions(self, request: RecordedRequest, pipeline_id: str) -> dict[str, Any]:
        if pipeline_id not in self.pipelines:
            raise _ApiError(_NOT_FOUND, f"Pipeline {pipeline_id} not found")
        return _page(request, self.versions[pipeline_id], "pipeline_versions")

    def _list_experiments(self, request: RecordedRequest) -> dict[str, Any]:
        namespace = request.query.get("namespace", "")
        found = [e for e in self.experiments.values() if e.get("namespace", "") == namespace]
        return _page(request, found, "experiments")

    def _create_experiment(self, request: RecordedRequest) -> dict[str, Any]:
        body = request.json
        name = body.get("display_name", "")
        if not name:
            raise _ApiError(_INVALID_ARGUMENT, "Experiment name is empty. Please specify a valid experiment name")
        if any(e["display_name"] == name and e.get("namespace", "") == body.get("namespace", "")
               for e in self.experiments.values()):
            raise _ApiError(_ALREADY_EXISTS, f"Failed to create a new experiment: experiment {name} already exists")
        experiment_id, created = self._new_id()
        experiment = {**body, "experiment_id": experiment_id, "created_at": created,
                      "last_run_created_at": "1970-01-01T00:00:00Z", "storage_state": "AVAILABLE"}
        self.experiments[experiment_id] = experiment
        return experiment

    def _check_run_body(self, body: dict[str, Any]) -> None:
        if body.get("experiment_id") not in self.experiments:
            raise _ApiError(_NOT_FOUND, f"Experiment {body.get('experiment_id')} not found")
        reference = body.get("pipeline_version_reference")
        if reference:
            versions = self.versions.get(reference.get("pipeline_id"), [])
            if not any(v["pipeline_version_id"] == reference.get("pipeline_version_id") for v in versions):
                raise _ApiError(_NOT_FOUND, f"Pipeline version {reference.get('pipeline_version_id')} not found")
        elif not body.get("pipeline_spec"):
            raise _ApiError(_INVALID_ARGUMENT, "Invalid input error: neither pipeline spec nor pipeline version "
                                               "reference is set")

    def _create_run(self, request: RecordedRequest) -> dict[str, Any]:
        body = request.json
        self._check_run_body(body)
        run_id, created = self._new_id()
        run = {**body, "run_id": run_id, "created_at": created, "scheduled_at": created,
               "finished_at": "1970-01-01T00:00:00Z", "state": "PENDING", "storage_state": "AVAILABLE"}
        self.runs[run_id] = run
        return run

    def _get_run(self, request: RecordedRequest, run_id: str) -> dict[str, Any]:
        if run_id not in self.runs:
            raise _ApiError(_NOT_FOUND, f"Run {run_id} not found")
        run = self.runs[run_id]
        run["state"] = self.run_state
        if self.run_state == "FAILED":
            run["error"] = {"code": 2, "message": "step train failed", "details": []}
        return run

    def _create_recurring_run(self, request: RecordedRequest) -> dict[str, Any]:
        body = request.json
        self._check_run_body(body)
        if not (body.get("trigger", {}).get("cron_schedule") or body.get("trigger", {}).get("periodic_schedule")):
            raise _ApiError(_INVALID_ARGUMENT, "Invalid input error: trigger is required")
        if not 1 <= int(body.get("max_concurrency", 0)) <= 10:
            raise _ApiError(_INVALID_ARGUMENT, "Invalid input error: max concurrency of a recurring run should "
                                               "be in [1, 10]")
        recurring_run_id, created = self._new_id()
        recurring = {**body, "recurring_run_id": recurring_run_id, "created_at": created, "updated_at": created,
                     # int64 fields are strings in the real server's JSON.
                     "max_concurrency": str(body["max_concurrency"]),
                     "status": "ENABLED" if body.get("mode") == "ENABLE" else "DISABLED"}
        self.recurring_runs[recurring_run_id] = recurring
        return recurring


def _page(request: RecordedRequest, items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Filter (display_name EQUALS), sort (created_at [desc]) and cut to page_size, as the real server does."""
    found = [item for item in items if _matches(item, request.query.get("filter"))]
    sort_by = request.query.get("sort_by", "")
    found.sort(key=lambda item: item["created_at"], reverse=sort_by.endswith(" desc"))
    size = int(request.query.get("page_size") or 0)
    page = found[:size] if size > 0 else found
    # Like the real server's JSON, an empty list is left out.
    return {key: page, "total_size": len(found)} if page else {"total_size": len(found)}


def _matches(item: dict[str, Any], filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for predicate in json.loads(filter_json).get("predicates", []):
        operation = predicate.get("operation")
        if operation not in ("EQUALS", 1):
            raise _ApiError(_INVALID_ARGUMENT, f"the fake KFP API filters only with EQUALS, got {operation!r}")
        value = predicate.get("string_value", predicate.get("stringValue"))
        if item.get(predicate.get("key")) != value:
            return False
    return True


class _Handler(http.server.BaseHTTPRequestHandler):
    fake: FakeKfpServer

    def _serve(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        request = RecordedRequest(self.command, url.path, dict(urllib.parse.parse_qsl(url.query)),
                                  {k.lower(): v for k, v in self.headers.items()}, self.rfile.read(length))
        status, payload = self.fake.handle(request)
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Keep request lines out of test output; the recorded requests say more."""
