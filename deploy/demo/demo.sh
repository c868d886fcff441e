#!/usr/bin/env bash
# demo.sh - `make demo`: the seed's four worker pools on a local control plane, scaled by the
# operator from real Celery tasks in a real Redis.
#
# The pools run as real pods on the lab's node (deploy/local/node.sh): the lab's worker image
# (the demo's Celery app), the node's toleration, no CPU requests (the node has the machine's 2
# cores; the seed asks for a production cluster's).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
NS=${DEMO_NAMESPACE:-taskqueue-demo}
ARGS=("$@")
# --plot PATH (make demo PLOT=PATH): also draw this run's timeline (pending, in flight and
# replicas per pool, scale events marked) as an SVG. --shot PATH (make demo SHOT=PATH): also
# take a screenshot (PNG) of the operator's page while every pool runs and has work waiting.
PLOT="" SHOT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --plot) PLOT=$2; shift 2 ;;
    --plot=*) PLOT=${1#--plot=}; shift ;;
    --shot) SHOT=$2; shift 2 ;;
    --shot=*) SHOT=${1#--shot=}; shift ;;
    *) echo "usage: demo.sh [--plot PATH.svg] [--shot PATH.png]" >&2; exit 2 ;;
  esac
done
case "$PLOT" in ""|/*) ;; *) PLOT=$PWD/$PLOT ;; esac
case "$SHOT" in ""|/*) ;; *) SHOT=$PWD/$SHOT ;; esac

# The lab answers only inside its network namespace: start it, build (cargo may fetch crates),
# then run the rest of this script in there.
if [ -z "${TQ_IN_LAB:-}" ]; then
  env_file=$(bash deploy/local/up.sh | tail -1 | sed 's/^source //')
  # shellcheck disable=SC1090
  . "$env_file"
  if [ -n "${TQ_NODE_UNAVAILABLE:-}" ]; then echo "make demo needs the lab's node: $TQ_NODE_UNAVAILABLE" >&2; exit 1; fi
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
# The pods reach Redis on the lab's bridge.
kubectl -n "$NS" create secret generic celery-broker --from-literal=url="$TQ_REDIS_POD_URL" --dry-run=client -o yaml | kubectl -n "$NS" apply -f - >/dev/null
# Every task the workers run adds 1 to this broker hash (TASK_COUNT_KEY in the demo's app).
COUNT_KEY=taskqueue-demo:ran:$(date +%s)
LAB_POOL=$(python3 - "$TQ_WORKER_IMAGE" "$TQ_NODE_TAINT" "$COUNT_KEY" <<'PY'
import json, sys
image, taint, count_key = sys.argv[1:]
key, effect = taint.split("=")[0], taint.rsplit(":", 1)[1]
print(json.dumps({"spec": {
    "worker": {"image": image, "resources": None,
               "env": [{"name": "TASK_SCALE", "value": "0.3"}, {"name": "TASK_COUNT_KEY", "value": count_key}],
               "podTemplate": {"spec": {"tolerations": [{"key": key, "operator": "Exists", "effect": effect}]}}},
    "scaling": {"pollInterval": "1s", "scaleDown": {"stabilizationWindow": "15s"}}}}))
PY
)
for tq in urgent ai-processing demo-tasks general; do
  kubectl -n "$NS" patch tq "$tq" --type merge -p "$LAB_POOL" >/dev/null
done
echo "   (demo: image $TQ_WORKER_IMAGE, the node's toleration, no resource requests, tasks at 0.3 x"
echo "    their seed duration, pollInterval 1s, stabilizationWindow 15s; broker URL -> $TQ_REDIS_POD_URL)"

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

echo "== waiting for the pools with minReplicas > 0 to run their pods"
t=$SECONDS
kubectl -n "$NS" wait --for=condition=Ready tq --all --timeout=180s
kubectl -n "$NS" get pods -o wide
echo "   every TaskQueue Ready after $((SECONDS - t))s: its workers are ready pods"
echo
CELERY_BROKER_URL=$TQ_REDIS_URL PYTHONPATH=$ROOT/deploy/demo "$TQ_VENV/bin/python" deploy/demo/run_demo.py \
  --namespace "$NS" --count-key "$COUNT_KEY" ${SHOT:+--shot "$SHOT" --page "http://127.0.0.1:$MPORT/"}
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
