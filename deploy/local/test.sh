#!/usr/bin/env bash
# test.sh - what `make test` runs (and so what CI runs): start the lab, then format check,
# clippy, and every test including the end-to-end ones marked #[ignore] (they need the lab),
# then `down`, and a check that the host is as `up` found it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

env_file=$(bash deploy/local/up.sh | tail -1 | sed 's/^source //')
# shellcheck disable=SC1090
. "$env_file"
export TQ_REDIS_SERVER=${TQ_REDIS_SERVER:-$(command -v redis-server)}
# The node's fault test restarts the kubelet and containerd, which must run in the host's mount
# namespace, not the lab's (`ip netns exec` gives the tests a private one): this shell's.
export TQ_HOST_PID=$$

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Built here, outside the lab (cargo may fetch crates); run inside it, where the lab answers and
# nothing else does.
cargo test --no-run --quiet
# Unit + mock-API tests, then the ones marked #[ignore] because they need the lab (real API
# servers, a node, Redis, Celery, Helm). Every test binary runs (--no-fail-fast) and each test
# prints its own line, so the summary counts tests by name. A test that cannot run records itself
# in $TQ_SKIP_FILE (tests/support::skipped): cargo counts it as passed, the summary as skipped. A
# test that ran but could not check a part of what it covers records that part
# (support::partly_skipped): it stays passed, and the part is printed with its reason.
log=$(mktemp)
export TQ_SKIP_FILE
TQ_SKIP_FILE=$(mktemp)
trap 'rm -f "$log" "$TQ_SKIP_FILE"' EXIT
status=0
lab cargo test --offline --no-fail-fast 2>&1 | tee "$log" || status=1
lab cargo test --offline --no-fail-fast -- --ignored --test-threads=2 2>&1 | tee -a "$log" || status=1
# `down` must leave the host as `up` found it (sysctls, mounts, namespaces, links, cgroups,
# paths): counted as one more test.
if { bash deploy/local/down.sh && bash deploy/local/lab.sh check; } 2>&1 | tee -a "$log"; then
  echo "test lab_down_restores_the_host ... ok" | tee -a "$log"
else
  echo "test lab_down_restores_the_host ... FAILED" | tee -a "$log"
fi
bash deploy/local/summary.sh "$log" "$TQ_SKIP_FILE" || status=1
exit "$status"
