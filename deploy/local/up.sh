#!/usr/bin/env bash
# up.sh - the whole local lab: packages, Celery venv, Helm, the lab's network namespace, etcd +
# kube-apiserver + controller-manager + scheduler, Redis, the images (built without a registry)
# and one node (containerd + kubelet). Writes $STATE/env.sh; prints `source $STATE/env.sh`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

t0=$SECONDS
"$HERE/deps.sh"
VENV=$("$HERE/python.sh")
HELM=$("$HERE/helm.sh")
"$HERE/k8s.sh" build
# A stack of an earlier version (before the lab) runs outside any namespace: stop it first, so
# the record of the host that lab.sh takes is of the host alone.
if [ ! -s "$STATE/lab" ]; then "$HERE/node.sh" down; "$HERE/redis.sh" down; "$HERE/k8s.sh" down; fi
"$HERE/lab.sh" up   # each script below reads $STATE/lab (lib.sh) and runs inside the lab
"$HERE/k8s.sh" up
"$HERE/redis.sh" up
TQ_OPERATOR_BIN=$("$HERE/operator-bin.sh") TQ_PYTHON="$VENV/bin/python" "$HERE/images.sh" build
# A machine where containers cannot start still runs every test that needs no node: the ones that
# do are counted as skipped, with this reason (TQ_NODE_UNAVAILABLE).
NODE_UNAVAILABLE=""
if ! "$HERE/node.sh" up; then
  NODE_UNAVAILABLE="the lab's node did not come up (log: $LOGS/kubelet.log, $LOGS/containerd.log)"
elif ! probe=$("$HERE/node.sh" probe); then
  NODE_UNAVAILABLE=$probe
fi
[ -z "$NODE_UNAVAILABLE" ] || log "WARNING: $NODE_UNAVAILABLE; tests that need it will be skipped"
LAB=$("$HERE/lab.sh" name)
{ "$HERE/k8s.sh" env
  "$HERE/redis.sh" env
  # shellcheck disable=SC2016  # $PATH expands when env.sh is sourced
  printf 'export TQ_VENV=%q\nexport TQ_STATE=%q\nexport TQ_LAB=%q\nexport TQ_LAB_NET=%q\nexport PATH=%q:"$PATH"\n' \
    "$VENV" "$STATE" "$LAB" "$LAB_NET" "$(dirname "$HELM")"
  # What a pool needs to run on the lab's node: the worker image and the node's taint.
  "$HERE/images.sh" names | sed -n 's/^WORKER=/export TQ_WORKER_IMAGE=/p'
  printf 'export TQ_NODE_TAINT=%q\n' "$NODE_TAINT"
  if [ -n "$NODE_UNAVAILABLE" ]; then printf 'export TQ_NODE_UNAVAILABLE=%q\n' "$NODE_UNAVAILABLE"; fi
  # Everything of the lab answers only inside its network namespace: these run commands there.
  printf 'lab() { ip netns exec %q "$@"; }\nkubectl() { ip netns exec %q kubectl "$@"; }\n' "$LAB" "$LAB"
} > "$STATE/env.sh"
log "lab up in $((SECONDS - t0))s (network namespace $LAB: run commands in it with \`lab CMD\` after sourcing env.sh)"
echo "source $STATE/env.sh"
