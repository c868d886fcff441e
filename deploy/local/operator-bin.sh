#!/usr/bin/env bash
# operator-bin.sh - build the operator's release binary (what its image carries); prints its path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

ROOT=$(cd "$HERE/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
log "cargo build --release (the operator image's binary; minutes the first time)"
(cd "$ROOT" && cargo build --release --locked --quiet --bin taskqueue-operator) >&2
echo "$TARGET/release/taskqueue-operator"
