"""Run inside one backend release's schema (its own folder on sys.path, nothing of the project's): parse a
compiled pipeline as that release's API server and driver do, refusing unknown fields.

stdin: {"pipeline_spec": {...}, "platform_spec": {...} or null}; stdout: a JSON list of problems.
The API server parses the PipelineSpec with protojson (``backend/src/apiserver/template/v2_template.go``),
where the executors are a free-form Struct; the driver parses each task's container spec and Kubernetes
config with jsonpb (``backend/src/v2/cmd/driver/main.go``); all refuse a field their generated code does
not know.
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
    problems.append(f"PipelineSpec: {err}")
for name, executor in sorted(document["pipeline_spec"].get("deploymentSpec", {}).get("executors", {}).items()):
    try:
        json_format.ParseDict(executor, pipeline_spec_pb2.PipelineDeploymentConfig.ExecutorSpec(),
                              ignore_unknown_fields=False)
    except json_format.ParseError as err:
        problems.append(f"executor {name} (the driver's --container): {err}")
platform = document.get("platform_spec") or {}
executors = platform.get("platforms", {}).get("kubernetes", {}).get("deploymentSpec", {}).get("executors", {})
for name, config in sorted(executors.items()):
    try:
        json_format.ParseDict(config, kubernetes_pb2.KubernetesExecutorConfig(), ignore_unknown_fields=False)
    except json_format.ParseError as err:
        problems.append(f"Kubernetes config of {name}: {err}")
print(json.dumps(problems))
