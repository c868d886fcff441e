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
# servers, Redis, Celery, Helm). Both outputs are kept to print one total at the end.
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --quiet 2>&1 | tee "$log"
cargo test --quiet -- --ignored --test-threads=2 2>&1 | tee -a "$log"
awk '/^test result:/ { p += $4; f += $6 } END { printf "summary: %d passed, %d failed\n", p, f }' "$log"
