# lib.sh - shared bits for deploy/local/*.sh (sourced, not run).
# Everything runs as plain processes on 127.0.0.1; state lives outside the repo.
set -euo pipefail

# shellcheck disable=SC2034  # used by up.sh/down.sh
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/taskqueue-operator   # survives `down` (binaries, venv, helm)
STATE=${TQ_STATE:-$CACHE/state}                            # runtime: pids, ports, logs, data dirs
LOGS=$STATE/logs
mkdir -p "$LOGS"

log() { printf '[%s %(%H:%M:%S)T] %s\n' "$(basename "$0" .sh)" -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# free_ports N: N distinct free loopback ports. All sockets stay bound until every port is
# picked, so the N ports differ; the kernel hands out ephemeral ports that nobody listens on.
free_ports() {
  in_lab python3 - "${1:-1}" <<'PY'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
}

# PID files are $STATE/NAME.pid, NAME being the program name (also checked against the
# process's cmdline, so a recycled PID is never mistaken for ours).
alive() {
  local p; p=$(cat "$STATE/$1.pid" 2>/dev/null) || return 1
  [ -n "$p" ] && grep -qa -- "$1" "/proc/$p/cmdline" 2>/dev/null
}

# start_bg NAME CMD...: run CMD detached (own session, so a terminal's Ctrl-C or a dying
# parent shell doesn't take it down), output to $LOGS/NAME.log, PID to $STATE/NAME.pid.
start_bg() {
  local name=$1; shift
  setsid "${LAB_EXEC[@]}" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

# The lab's network namespace (lab.sh), once it exists: processes and clients run inside it.
# `ip netns exec` for everything but containerd and the kubelet (start_bg_net), which need the
# host's mount namespace and /sys: `nsenter --net` switches the network namespace only.
# LAB_NET: the lab bridge's /24 (lab.sh); LAB_IP, set once the lab exists: the bridge address,
# where pods reach the API server and Redis.
LAB_NET=10.88.0
LAB_EXEC=() LAB_IP=""
if [ -s "$STATE/lab" ]; then LAB_EXEC=(ip netns exec "$(cat "$STATE/lab")") LAB_IP=$LAB_NET.1; fi
in_lab() { "${LAB_EXEC[@]}" "$@"; }
# Only pods that tolerate this run on the lab's node. Most tests create pools whose images exist
# nowhere (the control plane is what they test): without the taint each would get a sandbox and a
# failing pull on two cores. Tests and the demo that run real workers add the toleration.
# shellcheck disable=SC2034  # node.sh, up.sh
NODE_TAINT=tq.lab/real-pods=true:NoSchedule
start_bg_net() {
  local name=$1; shift
  setsid nsenter --net="/run/netns/$(cat "$STATE/lab")" "$@" >"$LOGS/$name.log" 2>&1 </dev/null &
  echo $! >"$STATE/$name.pid"
}

# stop_pid NAME...: TERM (then KILL after 20 s) only the processes named by our PID files, all at
# once. Polls with alive(), not kill -0: an exited child is a zombie until its reaper (here a slow
# PID 1) collects it, and a zombie's cmdline is empty.
stop_pid() {
  local n p live=()
  for n in "$@"; do
    if alive "$n"; then live+=("$n"); kill "$(cat "$STATE/$n.pid")" 2>/dev/null || true; else rm -f "$STATE/$n.pid"; fi
  done
  for n in "${live[@]}"; do
    p=$(cat "$STATE/$n.pid")
    for _ in $(seq 200); do alive "$n" || break; sleep 0.1; done
    alive "$n" && { log "$n ($p) ignored TERM for 20 s, killing"; kill -9 "$p" || true; }
    log "stopped $n ($p)"; rm -f "$STATE/$n.pid"
  done
}

# wait_for NAME TIMEOUT WHAT CMD...: poll CMD until it succeeds; fail fast (with NAME's log
# tail) if process NAME dies, or after TIMEOUT seconds.
wait_for() {
  local name=$1 end=$((SECONDS + $2)) what=$3; shift 3
  until "$@" >/dev/null 2>&1; do
    # Twice, 0.5 s apart: right after the start the PID may be mid-exec (setsid, nsenter), when its
    # command line can read empty.
    alive "$name" || { sleep 0.5; alive "$name"; } \
      || { tail -25 "$LOGS/$name.log" >&2; die "$name exited while waiting for $what (log: $LOGS/$name.log)"; }
    [ $SECONDS -lt $end ] || { tail -25 "$LOGS/$name.log" >&2; die "timed out waiting for $what"; }
    sleep 0.25
  done
}
