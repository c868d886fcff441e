#!/usr/bin/env bash
# down.sh - stop what up.sh started (by PID file only); caches (binaries, venv, helm) stay.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$HERE/redis.sh" down
"$HERE/k8s.sh" down
rm -f "$STATE/env.sh"
