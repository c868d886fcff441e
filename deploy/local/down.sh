#!/usr/bin/env bash
# down.sh - stop what up.sh started (by PID file only), then put the host back as up found it
# (lab.sh down: sysctls, the lab's and pods' network namespaces, mounts, fixed paths, cgroups).
# Caches (binaries, venv, images, helm) stay.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

"$HERE/node.sh" down
"$HERE/redis.sh" down
"$HERE/k8s.sh" down
"$HERE/lab.sh" down
rm -f "$STATE/env.sh"
