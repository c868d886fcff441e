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
# Unit + mock-API tests, then the end-to-end ones (real API server, Redis, Celery).
cargo test --quiet
cargo test --quiet -- --ignored --test-threads=2
