#!/usr/bin/env bash
# lab.sh up|down|exec CMD...|name|snapshot FILE|check - the lab's network namespace, and the host
# as the lab found it.
#
# The whole lab (etcd, API server, scheduler, kubelet, containerd, Redis, the pods, the tests)
# talks only on loopback or inside one network namespace, $LAB, made here: its own `lo` and a
# bridge ($BR, $LAB_NET.1/24, lib.sh) for the pods. Nothing is routed out of it. `up` first records what the
# node side may change on the host (sysctls, mounts, cgroups, namespaces, links, paths); `down`
# puts back what it can and `check` compares the host with that record.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

LAB=${TQ_LAB:-tq-lab}
BR=tqbr0
BEFORE=$STATE/host-before.txt
# Machine-wide sysctls the kubelet and the CNI plugins set (real-pods.md): read before, restored after.
SYSCTLS=(vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward)
# Paths the kubelet, containerd and the CNI plugins use at fixed places.
PATHS=(/var/lib/kubelet /var/log/pods /var/log/containers /var/lib/cni /run/containerd /etc/cni /opt/cni /var/lib/containerd)

# snapshot: what `down` must leave as it was, one fact per line, sorted.
snapshot() {
  local s
  for s in "${SYSCTLS[@]}"; do echo "sysctl $s=$(sysctl -n "$s")"; done
  awk '{print "mount " $5}' /proc/self/mountinfo | LC_ALL=C sort -u
  find /sys/fs/cgroup -maxdepth 3 -type d \( -name 'kubepods*' -o -name 'tq-*' \) 2>/dev/null | sed 's/^/cgroup /'
  ip netns list 2>/dev/null | awk '{print "netns " $1}'
  ip -o link show | awk -F': ' '{print "link " $2}' | sed 's/@.*//'
  for s in "${PATHS[@]}"; do [ -e "$s" ] && echo "path $s"; done
  # Processes of the lab (their command lines name its state directory): none before, none after.
  echo "processes of the lab: $(pgrep -f -- "$STATE/" | grep -cvx "$$" || true)"
}

cmd_up() {
  if ip netns list | grep -qw "$LAB"; then log "netns $LAB already there"; return; fi
  # No lab now: the host as it is now is the record (one left by a failed check is stale).
  snapshot | LC_ALL=C sort >"$BEFORE"
  ip netns add "$LAB"
  ip -n "$LAB" link set lo up
  ip -n "$LAB" link add "$BR" type bridge
  ip -n "$LAB" addr add "$LAB_NET.1/24" dev "$BR"
  ip -n "$LAB" link set "$BR" up
  echo "$LAB" >"$STATE/lab"
  log "netns $LAB: lo, $BR $LAB_NET.1/24 (no route out)"
}

cmd_down() {
  if [ -s "$BEFORE" ]; then
    local line name value
    while read -r line; do
      name=${line#sysctl }; value=${name#*=}; name=${name%%=*}
      [ "$(sysctl -n "$name")" = "$value" ] || { sysctl -q -w "$name=$value" >/dev/null && log "restored $name=$value"; }
    done < <(grep '^sysctl ' "$BEFORE")
  fi
  if ip netns list | grep -qw "$LAB"; then ip netns delete "$LAB"; log "netns $LAB deleted"; fi
  rm -f "$STATE/lab"
  if [ -s "$BEFORE" ]; then undo_new; fi
}

# undo_new: what the lab added to the host since the record (pods' network namespaces, the
# /run/netns mount `ip netns add` made, the node's fixed paths, kubepods cgroups), and only that.
undo_new() {
  local kind what
  while read -r kind what; do
    case $kind in
      netns) ip netns delete "$what" 2>/dev/null && log "deleted netns $what" ;;
      path) rm -rf "$what" && log "removed $what" ;;
      cgroup) find "$what" -depth -type d -exec rmdir {} \; 2>/dev/null; log "removed cgroup $what" ;;
    esac
  done < <(comm -13 "$BEFORE" <(snapshot | LC_ALL=C sort))
  # Mounts last (a netns file is a mount too), deepest first.
  comm -13 "$BEFORE" <(snapshot | LC_ALL=C sort) | awk '$1 == "mount" {print $2}' | LC_ALL=C sort -r \
    | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; log "unmounted $m"; done
}

# check: the host now against the record `up` made; prints the differences, fails on any.
cmd_check() {
  [ -s "$BEFORE" ] || die "no record of the host before up ($BEFORE)"
  local diff
  diff=$(diff <(cat "$BEFORE") <(snapshot | LC_ALL=C sort) || true)
  if [ -n "$diff" ]; then
    echo "the host differs from before up (< before, > now):" >&2
    echo "$diff" >&2
    return 1
  fi
  log "the host is as up found it"
  rm -f "$BEFORE"
}

case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  check) cmd_check ;;
  exec) shift; exec ip netns exec "$LAB" "$@" ;;
  name) echo "$LAB" ;;
  net) echo "$LAB_NET" ;;
  snapshot) snapshot | LC_ALL=C sort ;;
  *) echo "usage: $0 up|down|check|exec CMD...|name|net|snapshot" >&2; exit 2 ;;
esac
