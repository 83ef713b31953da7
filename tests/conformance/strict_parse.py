"""Run inside one backend release's schema (its own folder on sys.path, nothing of the project's): parse a
compiled pipeline against that release's protos as its API server and driver do, noting every field they
do not know.

stdin: {"pipeline_spec": {...}, "platform_spec": {...} or null}; stdout: a JSON list of [reader, problem],
reader "api server" or "driver". The API server parses the PipelineSpec with protojson, which refuses an
unknown field at every release (``backend/src/apiserver/template/v2_template.go``); there the executors
are a free-form Struct. The driver parses each task's container spec and Kubernetes config
(``backend/src/v2/cmd/driver/main.go``): with ``jsonpb.UnmarshalString`` up to 2.4.0, which refuses an
unknown field, and from 2.4.1 with ``util.UnmarshalString`` (``backend/src/common/util/json.go``,
``AllowUnknownFields: true``), which ignores it. ``releases.strict_parse`` words each problem per release.
"""

import importlib.util
import json
import os
import sys

schema_dir = sys.argv[1]
sys.path.insert(0, schema_dir)

from google.protobuf import json_format  # noqa: E402
from kfp.pipeline_spec import pipeline_spec_pb2  # noqa: E402

# kfp/kubernetes/__init__.py imports the kfp SDK; the generated module alone needs only the pipeline spec.
_path = os.path.join(schema_dir, "kfp", "kubernetes", "kubernetes_executor_config_pb2.py")
_spec = importlib.util.spec_from_file_location("kubernetes_executor_config_pb2", _path)
kubernetes_pb2 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kubernetes_pb2)

document = json.load(sys.stdin)
problems = []
try:
    json_format.ParseDict(document["pipeline_spec"], pipeline_spec_pb2.PipelineSpec(), ignore_unknown_fields=False)
except json_format.ParseError as err:
    problems.append(["api server", f"PipelineSpec: {err}"])
for name, executor in sorted(document["pipeline_spec"].get("deploymentSpec", {}).get("executors", {}).items()):
    try:
        json_format.ParseDict(executor, pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec(),
                              ignore_unknown_fields=False)
    except json_format.ParseError as err:
        problems.append(["driver", f"executor {name} (the driver's --container): {err}"])
platform = document.get("platform_spec") or {}
executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
for name, config in sorted(executors.items()):
    try:
        json_format.ParseDict(config, kubernetes_pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)
    except json_format.ParseError as err:
        problems.append(["driver", f"Kubernetes config of {name} (the driver's --kubernetes_config): {err}"])
print(json.dumps(problems))
