#!/usr/bin/env bash
# test.sh - what `make test` runs (and so what CI runs): start the local stack, then format check,
# clippy, and every test including the end-to-end ones marked #[ignore] (they need the stack).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

env_file=$(bash deploy/local/up.sh | tail -1 | sed 's/^source //')
# shellcheck disable=SC1090
. "$env_file"
export TQ_REDIS_SERVER=${TQ_REDIS_SERVER:-$(command -v redis-server)}

cargo fmt --all -- --check
cargo clippy --all-targets --quiet -- -D warnings
# Unit + mock-API tests, then the ones marked #[ignore] because they need the stack (real API
# servers, Redis, Celery, Helm). Both outputs are kept to print one total at the end. A test
# that cannot run here records itself in $TQ_SKIP_FILE (tests/support::skipped): cargo counts
# it as passed, so the summary moves it from passed to skipped.
log=$(mktemp)
export TQ_SKIP_FILE
TQ_SKIP_FILE=$(mktemp)
trap 'rm -f "$log" "$TQ_SKIP_FILE"' EXIT
cargo test --quiet 2>&1 | tee "$log"
cargo test --quiet -- --ignored --test-threads=2 2>&1 | tee -a "$log"
skipped=$(grep -c '^skipped: ' "$TQ_SKIP_FILE" || true)
sed 's/^/  /' "$TQ_SKIP_FILE"
awk -v s="$skipped" '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d skipped, %d failed\n", p - s, s, f }' "$log"
