#!/usr/bin/env bash
# demo.sh - `make demo`: the seed's four worker pools on a local control plane, scaled by the
# operator from real Celery tasks in a real Redis.
#
# The seed's pools do not run on the lab's node yet (their pods lack its toleration and stay
# Pending): run_demo.py stands in for the kubelet, keeping spec.replicas local Celery processes
# per worker Deployment with the Deployment's own container command. tests/pods.rs runs pools
# as real pods.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
NS=${DEMO_NAMESPACE:-taskqueue-demo}
ARGS=("$@")
# --plot PATH (make demo PLOT=PATH): also draw this run's timeline (pending, in flight and
# replicas per pool, scale events marked) as an SVG.
PLOT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --plot) PLOT=$2; shift 2 ;;
    --plot=*) PLOT=${1#--plot=}; shift ;;
    *) echo "usage: demo.sh [--plot PATH.svg]" >&2; exit 2 ;;
  esac
done
if [ -n "$PLOT" ]; then
  case "$PLOT" in /*) ;; *) PLOT=$PWD/$PLOT ;; esac
fi

# The lab answers only inside its network namespace: start it, build (cargo may fetch crates),
# then run the rest of this script in there.
if [ -z "${TQ_IN_LAB:-}" ]; then
  env_file=$(bash deploy/local/up.sh | tail -1 | sed 's/^source //')
  # shellcheck disable=SC1090
  . "$env_file"
  echo "== building the operator"
  cargo build --quiet
  exec env TQ_IN_LAB=1 TQ_ENV_FILE="$env_file" ip netns exec "$TQ_LAB" bash "$0" "${ARGS[@]}"
fi
# shellcheck disable=SC1090
. "$TQ_ENV_FILE"
BIN=${CARGO_TARGET_DIR:-$ROOT/target}/debug/taskqueue-operator

echo "== installing the CRD and the seed's TaskQueues into namespace $NS"
# --validate=false: the local 1.20 API server predates CEL and rejects the rule field; it
# drops the rules instead (the operator enforces them itself). Current clusters need no flag.
kubectl apply --validate=false -f crds/taskqueue.yaml >/dev/null
kubectl wait --for condition=established --timeout=30s crd/taskqueues.taskqueue.dev >/dev/null
kubectl delete namespace "$NS" --ignore-not-found --wait=true >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl -n "$NS" apply -f deploy/examples/seed.yaml
# Point the Secret at the local Redis, and shorten the windows so the demo ends in minutes.
kubectl -n "$NS" create secret generic celery-broker --from-literal=url="$TQ_REDIS_URL" --dry-run=client -o yaml | kubectl -n "$NS" apply -f - >/dev/null
for tq in urgent ai-processing demo-tasks general; do
  kubectl -n "$NS" patch tq "$tq" --type merge -p '{"spec":{"scaling":{"pollInterval":"1s","scaleDown":{"stabilizationWindow":"15s"}}}}' >/dev/null
done
echo "   (demo: pollInterval 1s, stabilizationWindow 15s; broker URL -> $TQ_REDIS_URL)"

echo "== starting the operator (log: $TQ_STATE/logs/demo-operator.log)"
MPORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" run --leader-election=false --namespace "$NS" --metrics-addr "127.0.0.1:$MPORT" >"$TQ_STATE/logs/demo-operator.log" 2>&1 &
OP=$!
trap 'kill $OP 2>/dev/null; wait $OP 2>/dev/null || true' EXIT
if [ -n "$PLOT" ]; then
  "$BIN" timeline -n "$NS" --out "$PLOT" &
  PLOTTER=$!
  trap 'kill -INT $PLOTTER 2>/dev/null || true; wait $PLOTTER 2>/dev/null || true; kill $OP 2>/dev/null || true; wait $OP 2>/dev/null || true' EXIT
fi

CELERY_BROKER_URL=$TQ_REDIS_URL PYTHONPATH=$ROOT/deploy/demo "$TQ_VENV/bin/python" deploy/demo/run_demo.py --namespace "$NS" --logs "$TQ_STATE/logs"
echo
if [ -n "$PLOT" ]; then
  sleep 2 # the last decisions
  kill -INT "$PLOTTER"
  wait "$PLOTTER" || true
  echo "== the run's timeline: $PLOT"
fi
kubectl -n "$NS" get tq
echo
echo "== the operator's /metrics (excerpt; http://127.0.0.1:$MPORT/metrics)"
"$TQ_VENV/bin/python" - "$MPORT" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
keep = ("taskqueue_scale_events_total", "taskqueue_api_writes_total", "taskqueue_broker_reads_total",
        "taskqueue_broker_read_seconds_count", "taskqueue_broker_read_seconds_sum", "taskqueue_reconciles_total")
for line in text.splitlines():
    if line.startswith(keep):
        print("   ", line)
PY
echo "The lab keeps running for a look around: source $TQ_ENV_FILE, then kubectl -n $NS get tq,deploy,events"
echo "(the env file's kubectl and lab run commands in the lab's network namespace); 'make down' stops it."
