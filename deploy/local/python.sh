#!/usr/bin/env bash
# python.sh - venv with the real Celery (+ its Redis transport) for producers/workers in tests.
# Idempotent: an existing venv whose celery imports is kept. Prints the venv path.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

VENV=$CACHE/venv
ok() { [ -x "$VENV/bin/celery" ] && "$VENV/bin/python" -c 'import celery, redis, kombu' 2>/dev/null; }
if ! ok; then
  log "creating $VENV"
  rm -rf "$VENV"
  # Debian's python3 (deps.sh installs python3-venv): stable across pyenv or other PATH pythons.
  "${TQ_PYTHON:-/usr/bin/python3}" -m venv "$VENV"
  # The [redis] extra is required: without it kombu has no redis client and the broker URL fails.
  "$VENV/bin/pip" install -q --disable-pip-version-check 'celery[redis]>=5.5,<6' >"$LOGS/pip.log" 2>&1 \
    || { tail -20 "$LOGS/pip.log" >&2; die "pip install failed"; }
  ok || die "celery/redis/kombu do not import in $VENV"
  log "celery $("$VENV/bin/celery" --version)"
fi
echo "$VENV"
