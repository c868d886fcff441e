#!/usr/bin/env bash
# redis.sh up|down|port|env - Debian's redis-server on a free 127.0.0.1 port, no persistence.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PORTF=$STATE/redis.port
port() { cat "$PORTF" 2>/dev/null || die "redis is not up (no $PORTF)"; }
pong() { [ "$(in_lab redis-cli -h 127.0.0.1 -p "$(port)" ping 2>/dev/null)" = PONG ]; }
# In the lab, also on the bridge, where pods reach it; protected mode (loopback only without a
# password) off there: nothing outside the lab's namespace can reach the bridge.
BIND=127.0.0.1 PROTECTED=yes
if [ -n "$LAB_IP" ]; then BIND="127.0.0.1 $LAB_IP" PROTECTED=no; fi

case "${1:-}" in
  up)
    if alive redis-server && pong; then log "already running on 127.0.0.1:$(port)"; exit 0; fi
    stop_pid redis-server
    free_ports 1 > "$PORTF"
    # Foreground (not --daemonize) so start_bg's PID is redis itself. --save '' --appendonly no:
    # nothing on disk, every `up` is an empty broker; --dir keeps any stray file in $STATE.
    # shellcheck disable=SC2086  # one or two addresses
    start_bg redis-server redis-server --bind $BIND --port "$(port)" --protected-mode "$PROTECTED" --save '' --appendonly no --dir "$STATE"
    wait_for redis-server 20 "redis PING" pong
    log "redis up on 127.0.0.1:$(port)" ;;
  down) stop_pid redis-server; rm -f "$PORTF" ;;
  port) port ;;
  env)
    printf 'export TQ_REDIS_URL=redis://127.0.0.1:%s/0\n' "$(port)"
    # Where pods reach it (the bridge), for a broker Secret.
    if [ -n "$LAB_IP" ]; then printf 'export TQ_REDIS_POD_URL=redis://%s:%s/0\n' "$LAB_IP" "$(port)"; fi ;;
  *) echo "usage: $0 up|down|port|env" >&2; exit 2 ;;
esac
