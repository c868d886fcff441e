#!/usr/bin/env bash
# up.sh - the whole local test stack: packages, Celery venv, Helm, kube-apiserver +
# controller-manager, Redis. Writes $STATE/env.sh; prints `source $STATE/env.sh`.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

t0=$SECONDS
"$HERE/deps.sh"
VENV=$("$HERE/python.sh")
HELM=$("$HERE/helm.sh")
"$HERE/k8s.sh" build
"$HERE/k8s.sh" up
"$HERE/redis.sh" up
{ "$HERE/k8s.sh" env
  "$HERE/redis.sh" env
  # shellcheck disable=SC2016  # $PATH expands when env.sh is sourced
  printf 'export TQ_VENV=%q\nexport TQ_STATE=%q\nexport PATH=%q:"$PATH"\n' "$VENV" "$STATE" "$(dirname "$HELM")"
} > "$STATE/env.sh"
log "stack up in $((SECONDS - t0))s"
echo "source $STATE/env.sh"
