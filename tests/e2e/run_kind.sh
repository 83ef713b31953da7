#!/usr/bin/env bash
# The kind end-to-end environment: a kind cluster running Kubeflow Pipelines standalone, a GCS emulator
# in the cluster that serves the test data as gs://, the project's image loaded into the node, and the
# port-forwards the e2e test talks through. Runs by hand and in .github/workflows/e2e-kind.yaml.
#
#   tests/e2e/run_kind.sh                 # all steps, then the test; diagnostics when it fails
#   tests/e2e/run_kind.sh STEP [STEP...]  # tools cluster install image ready forward test diagnose unforward delete
#
# Needs docker, git (kubectl fetches the KFP manifests from GitHub), curl, and the project's virtual
# environment (make install) with tests/e2e/requirements.txt for the test step.
set -euo pipefail

cd "$(dirname "$0")/../.."

# Pinned versions. KFP's backend and SDK share version numbers since 2.14; this is the SDK in pyproject.
KIND_VERSION="${KIND_VERSION:-v0.29.0}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"
KUBECTL_VERSION="${KUBECTL_VERSION:-v1.33.1}"
PIPELINE_VERSION="${PIPELINE_VERSION:-2.17.3}"

CLUSTER="${KIND_CLUSTER_NAME:-imgclf-e2e}"
PYTHON="${PYTHON:-.venv/bin/python}"
STATE_DIR="${E2E_STATE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/imgclf-e2e}"
BIN_DIR="$STATE_DIR/bin"
export PATH="$BIN_DIR:$PATH"

E2E_NAMESPACE=imgclf-e2e
GCS_BUCKET=imgclf-e2e
KFP_PORT="${KFP_PORT:-8888}"
GCS_PORT="${GCS_PORT:-9023}"
S3_PORT="${S3_PORT:-9000}"

log() { printf '\n== %s\n' "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

# Remote kustomizations and image pulls fail now and then on shared CI runners; try again before failing.
retry() {
  local attempt
  for attempt in 1 2 3; do
    "$@" && return 0
    printf 'attempt %s of 3 failed: %s\n' "$attempt" "$*" >&2
    sleep $((attempt * 15))
  done
  return 1
}

image_name() {
  # The tag is stated once, in components/_image.py; the compiled pipeline names the same one.
  "$PYTHON" -c 'from components._image import IMAGE; print(IMAGE)'
}

# Download a release binary and check it against the checksum its project publishes beside it.
fetch_binary() {
  local name="$1" url="$2" sum_url="$3" expected
  curl -fsSL --retry 3 -o "$BIN_DIR/$name.download" "$url"
  expected="$(curl -fsSL --retry 3 "$sum_url" | awk '{print $1}')"
  echo "$expected  $BIN_DIR/$name.download" | sha256sum --check --quiet \
    || die "$name from $url does not match its published sha256"
  chmod +x "$BIN_DIR/$name.download"
  mv "$BIN_DIR/$name.download" "$BIN_DIR/$name"
}

step_tools() {
  log "tools: kind $KIND_VERSION and kubectl $KUBECTL_VERSION in $BIN_DIR"
  local arch
  case "$(uname -m)" in
    x86_64) arch=amd64 ;;
    aarch64 | arm64) arch=arm64 ;;
    *) die "no kind or kubectl build for $(uname -m)" ;;
  esac
  mkdir -p "$BIN_DIR"
  if ! kind version 2>/dev/null | grep -q "kind $KIND_VERSION "; then
    fetch_binary kind "https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-linux-$arch" \
      "https://github.com/kubernetes-sigs/kind/releases/download/$KIND_VERSION/kind-linux-$arch.sha256sum"
  fi
  if ! kubectl version --client 2>/dev/null | grep -q "Client Version: $KUBECTL_VERSION\$"; then
    fetch_binary kubectl "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$arch/kubectl" \
      "https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$arch/kubectl.sha256"
  fi
  kind version
  kubectl version --client
}

step_cluster() {
  log "cluster: kind cluster $CLUSTER ($KIND_NODE_IMAGE)"
  if kind get clusters | grep -qx "$CLUSTER"; then
    echo "cluster $CLUSTER exists; reusing it"
  else
    retry kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --wait 180s
  fi
  kubectl config use-context "kind-$CLUSTER"
  kubectl get nodes -o wide
}

gcs_emulator_manifest() {
  # The emulator version is the one the tests use (the dev extra in pyproject), read from the venv.
  local version
  version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("gcp-storage-emulator"))')"
  cat <<EOF
apiVersion: v1
kind: Namespace
metadata:
  name: $E2E_NAMESPACE
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: gcs-emulator
  namespace: $E2E_NAMESPACE
spec:
  replicas: 1
  selector:
    matchLabels:
      app: gcs-emulator
  template:
    metadata:
      labels:
        app: gcs-emulator
    spec:
      containers:
        - name: gcs-emulator
          image: python:3.11-slim
          command:
            - sh
            - -c
            - >-
              pip install --no-cache-dir --disable-pip-version-check gcp-storage-emulator==$version
              && exec gcp-storage-emulator start --host 0.0.0.0 --port 9023 --in-memory
              --default-bucket $GCS_BUCKET
          ports:
            - containerPort: 9023
          readinessProbe:
            tcpSocket:
              port: 9023
            periodSeconds: 3
---
apiVersion: v1
kind: Service
metadata:
  name: gcs-emulator
  namespace: $E2E_NAMESPACE
spec:
  selector:
    app: gcs-emulator
  ports:
    - port: 9023
      targetPort: 9023
EOF
}

step_install() {
  log "install: Kubeflow Pipelines $PIPELINE_VERSION (standalone, platform-agnostic) and the GCS emulator"
  retry kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/cluster-scoped-resources?ref=$PIPELINE_VERSION"
  kubectl wait --for condition=established --timeout=120s crd --all
  retry kubectl apply -k "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=$PIPELINE_VERSION"
  gcs_emulator_manifest | kubectl apply -f -
}

# Apart from install, so the cluster pulls its images while the project's image builds.
step_ready() {
  log "ready: waiting for every Kubeflow Pipelines deployment and the GCS emulator"
  kubectl -n kubeflow wait --for=condition=Available deployment --all --timeout=1200s
  kubectl -n "$E2E_NAMESPACE" rollout status deployment/gcs-emulator --timeout=600s
  kubectl -n kubeflow get pods
}

step_image() {
  local image
  image="$(image_name)"
  log "image: build $image and load it into the kind node"
  docker build -t "$image" .
  kind load docker-image "$image" --name "$CLUSTER"
}

# kubectl port-forward listens at once but reaches the pod only per connection, so wait for an answer.
wait_for_ok() {
  local url="$1"
  for _ in $(seq 1 60); do
    curl -fsS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 1
  done
  die "no successful answer from $url after 60 s (see the port-forward logs in $STATE_DIR)"
}

# Any HTTP status will do where the endpoint wants credentials (the object store answers 403 without).
wait_for_answer() {
  local url="$1"
  for _ in $(seq 1 60); do
    curl -sS -o /dev/null "$url" 2>/dev/null && return 0
    sleep 1
  done
  die "no HTTP answer from $url after 60 s (see the port-forward logs in $STATE_DIR)"
}

forward() {
  local name="$1" namespace="$2" target="$3" ports="$4"
  nohup kubectl -n "$namespace" port-forward "$target" "$ports" >"$STATE_DIR/forward-$name.log" 2>&1 &
  echo "$!" >>"$STATE_DIR/forward.pids"
}

step_forward() {
  log "forward: KFP API :$KFP_PORT, GCS emulator :$GCS_PORT, object store :$S3_PORT"
  mkdir -p "$STATE_DIR"
  step_unforward
  forward kfp kubeflow svc/ml-pipeline "$KFP_PORT:8888"
  forward gcs "$E2E_NAMESPACE" svc/gcs-emulator "$GCS_PORT:9023"
  # KFP keeps the name minio-service for its object store, MinIO or (since 2.15) SeaweedFS.
  forward s3 kubeflow svc/minio-service "$S3_PORT:9000"
  wait_for_ok "http://127.0.0.1:$KFP_PORT/apis/v2beta1/healthz"
  wait_for_ok "http://127.0.0.1:$GCS_PORT/storage/v1/b/$GCS_BUCKET"
  wait_for_answer "http://127.0.0.1:$S3_PORT/"
  local access_key secret_key
  access_key="$(kubectl -n kubeflow get secret mlpipeline-minio-artifact -o jsonpath='{.data.accesskey}' | base64 -d)"
  secret_key="$(kubectl -n kubeflow get secret mlpipeline-minio-artifact -o jsonpath='{.data.secretkey}' | base64 -d)"
  # The test reads these; a file lets later CI steps and later shells pick them up.
  cat >"$STATE_DIR/e2e.env" <<EOF
KFP_HOST=http://127.0.0.1:$KFP_PORT
IMGCLF_E2E_GCS_HOST=http://127.0.0.1:$GCS_PORT
IMGCLF_E2E_GCS_CLUSTER_HOST=http://gcs-emulator.$E2E_NAMESPACE.svc.cluster.local:9023
IMGCLF_E2E_GCS_BUCKET=$GCS_BUCKET
IMGCLF_E2E_S3_ENDPOINT=http://127.0.0.1:$S3_PORT
IMGCLF_E2E_S3_ACCESS_KEY=$access_key
IMGCLF_E2E_S3_SECRET_KEY=$secret_key
EOF
  echo "environment for the test: $STATE_DIR/e2e.env"
}

step_unforward() {
  local pid
  if [[ -f "$STATE_DIR/forward.pids" ]]; then
    while read -r pid; do
      kill "$pid" 2>/dev/null || true
    done <"$STATE_DIR/forward.pids"
    rm -f "$STATE_DIR/forward.pids"
  fi
}

step_test() {
  log "test: the e2e tier against the cluster"
  [[ -f "$STATE_DIR/e2e.env" ]] || die "no $STATE_DIR/e2e.env: run the forward step first"
  "$PYTHON" -m pip install --quiet --disable-pip-version-check -r tests/e2e/requirements.txt
  set -a
  # Written by step_forward, so not there for shellcheck to follow.
  # shellcheck source=/dev/null
  . "$STATE_DIR/e2e.env"
  set +a
  "$PYTHON" -m pytest -m e2e tests/e2e -v -p no:cacheprovider
}

step_diagnose() {
  log "diagnose: pods, events, logs"
  kubectl get pods -A -o wide || true
  kubectl get events -A --sort-by=.lastTimestamp | tail -n 100 || true
  local namespace pod
  for namespace in kubeflow "$E2E_NAMESPACE"; do
    kubectl -n "$namespace" describe pods || true
    for pod in $(kubectl -n "$namespace" get pods -o name 2>/dev/null); do
      printf '\n--- logs of %s/%s\n' "$namespace" "$pod"
      kubectl -n "$namespace" logs "$pod" --all-containers --prefix --tail=300 || true
    done
  done
  # Argo workflows carry each pipeline step's pod status and the reason a step failed.
  kubectl -n kubeflow get workflows.argoproj.io -o yaml || true
  local file
  for file in "$STATE_DIR"/forward-*.log; do
    [[ -f "$file" ]] && { printf '\n--- %s\n' "$file"; cat "$file"; }
  done
  return 0
}

step_delete() {
  step_unforward
  log "delete: kind cluster $CLUSTER"
  kind delete cluster --name "$CLUSTER"
}

main() {
  local steps=("$@")
  if [[ ${#steps[@]} -eq 0 ]]; then
    trap step_unforward EXIT
    step_tools
    step_cluster
    step_install
    step_image
    step_ready
    step_forward
    # A subshell outside any condition keeps set -e in force inside the test step.
    local status=0
    set +e
    (set -e; step_test)
    status=$?
    set -e
    if [[ $status -ne 0 ]]; then
      step_diagnose
    fi
    return "$status"
  fi
  local step
  for step in "${steps[@]}"; do
    case "$step" in
      tools | cluster | install | image | ready | forward | unforward | test | diagnose | delete) "step_$step" ;;
      *) die "unknown step '$step'; steps: tools cluster install image ready forward test diagnose unforward delete" ;;
    esac
  done
}

main "$@"
