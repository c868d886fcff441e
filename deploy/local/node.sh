#!/usr/bin/env bash
# node.sh up|down|status|probe|restart|kill-container - one node for the lab: kube-scheduler, containerd (+ runc, the CNI
# bridge) and a kubelet v1.20.2 named 127.0.0.1, inside the lab's network namespace (lab.sh).
#
# Traps met on these machines (docs: deploy/local/README.md, "The node"):
# * root here lacks CAP_SYS_RESOURCE: runc cannot lower oom_score_adj, so containerd's CRI
#   `restrict_oom_score_adj` and the kubelet's `--oom-score-adj 0`;
# * a node address of 127.0.0.1 is refused by --node-ip, but a node *named* 127.0.0.1 gets that
#   InternalIP, which `kubectl logs/exec` need (the API server dials it inside the lab);
# * containerd and the kubelet are started with `nsenter --net` (network namespace only): `ip
#   netns exec` would also give them a private mount namespace and /sys, where the kubelet finds
#   no cgroup mounts and runc cannot see volume mounts;
# * `makeIPTablesUtilChains: false`, or the kubelet adds iptables chains to the host.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

K8S=$CACHE/k8s-v1.20.2
BIN=$K8S/bin
PKI=$STATE/pki
NODE=$STATE/node
CTRD=$STATE/containerd
SOCK=$CTRD/containerd.sock
LAB=$("$HERE/lab.sh" name)
# shellcheck disable=SC1090
. <("$HERE/images.sh" names)

kc() { in_lab kubectl --kubeconfig "$STATE/kubeconfig" --request-timeout=5s "$@"; }
node_ready() { [ "$(kc get node 127.0.0.1 -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}')" = True ]; }
ctrd_up() { [ -S "$SOCK" ] && timeout 5 ctr --address "$SOCK" version >/dev/null 2>&1; }

write_configs() {
  mkdir -p "$NODE" "$CTRD" "$STATE/cni/net.d" "$STATE/cni/ipam"
  local api; api=$(sed -n 's/.*server: "\(.*\)".*/\1/p' "$STATE/kubeconfig")
  cat >"$NODE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster: {server: "$api", certificate-authority: "$PKI/ca.crt"}
users:
- name: node
  user: {client-certificate: "$PKI/kubelet-client.crt", client-key: "$PKI/kubelet-client.key"}
contexts:
- name: lab
  context: {cluster: lab, user: node}
current-context: lab
EOF
  : >"$NODE/resolv.conf"   # pods get no nameserver: there is nothing to resolve in the lab
  cat >"$NODE/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: 127.0.0.1
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
authentication: {anonymous: {enabled: false}, webhook: {enabled: false}, x509: {clientCAFile: "$PKI/ca.crt"}}
authorization: {mode: AlwaysAllow}
tlsCertFile: "$PKI/kubelet.crt"
tlsPrivateKeyFile: "$PKI/kubelet.key"
cgroupDriver: cgroupfs
failSwapOn: false
makeIPTablesUtilChains: false
resolvConf: "$NODE/resolv.conf"
serializeImagePulls: false
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
EOF
  cat >"$CTRD/config.toml" <<EOF
version = 2
root = "$CTRD/root"
state = "$CTRD/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE"
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "10010"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        Root = "$CTRD/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$STATE/cni/net.d"
EOF
  # The lab's bridge (lab.sh made it); no default route in pods: only the lab's subnet answers.
  cat >"$STATE/cni/net.d/10-lab.conflist" <<EOF
{"cniVersion": "0.4.0", "name": "lab", "plugins": [
  {"type": "bridge", "bridge": "tqbr0", "isGateway": true, "ipMasq": false,
   "ipam": {"type": "host-local", "dataDir": "$STATE/cni/ipam",
            "ranges": [[{"subnet": "$LAB_NET.0/24", "rangeStart": "$LAB_NET.10", "gateway": "$LAB_IP"}]]}}
]}
EOF
}

cmd_up() {
  [ -x "$BIN/kubelet" ] && [ -x "$BIN/kube-scheduler" ] || die "no kubelet/kube-scheduler in $BIN: run 'k8s.sh build'"
  [ -f "$STATE/lab" ] || die "no lab netns: run 'lab.sh up' (up.sh does)"
  [ -s "$PKI/kubelet.crt" ] || die "no kubelet certs in $PKI: run 'k8s.sh up' first"
  write_configs
  if ! alive containerd || ! ctrd_up; then
    start_bg_net containerd containerd --config "$CTRD/config.toml"
    wait_for containerd 30 "containerd" ctrd_up
  fi
  "$HERE/images.sh" load "$SOCK"
  alive kube-scheduler || start_bg kube-scheduler "$BIN/kube-scheduler" --kubeconfig "$STATE/kubeconfig" \
    --authentication-kubeconfig "$STATE/kubeconfig" --authorization-kubeconfig "$STATE/kubeconfig" \
    --bind-address 127.0.0.1 --secure-port "$(free_ports 1)" --port 0 --leader-elect=false
  if ! alive kubelet; then
    start_bg_net kubelet "$BIN/kubelet" --config "$NODE/kubelet.yaml" --kubeconfig "$NODE/kubeconfig" \
      --container-runtime remote --container-runtime-endpoint "unix://$SOCK" --hostname-override 127.0.0.1 \
      --root-dir "$NODE/root" --cert-dir "$NODE/certs" --pod-infra-container-image "$PAUSE" --oom-score-adj 0 \
      --register-with-taints "$NODE_TAINT"
  fi
  wait_for kubelet 90 "node 127.0.0.1 Ready" node_ready
  log "node 127.0.0.1 Ready"
}

# Pods first (their containers, sandboxes and mounts), then the kubelet and containerd.
cmd_down() {
  if alive kubelet && kc get --raw=/readyz >/dev/null 2>&1; then
    kc delete pods --all -A --grace-period=5 --wait=false >/dev/null 2>&1 || true
  fi
  stop_pid kubelet kube-scheduler
  if ctrd_up; then
    local c
    for c in $(crictl_ps); do timeout 10 ctr --address "$SOCK" -n k8s.io tasks kill -s KILL "$c" >/dev/null 2>&1 || true; done
  fi
  stop_pid containerd
  # Shims outlive containerd by design; with their tasks killed they only wait to be reaped.
  pkill -9 -f "containerd-shim-runc-v2 .*-address $SOCK" 2>/dev/null || true
  # Mounts under the node's and containerd's dirs (volumes, rootfs, shm), deepest first.
  awk '{print $5}' /proc/self/mountinfo | { grep -E "^($NODE|$CTRD)/" || true; } | LC_ALL=C sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
  # The kubelet's cgroups, deepest first, in every hierarchy.
  find /sys/fs/cgroup -depth -type d -name 'kubepods*' 2>/dev/null | while read -r d; do
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || true
  done
  # The fixed host paths (/var/log/pods, /var/lib/cni, ...) and the pods' network namespaces
  # go with lab.sh down, which removes only what was not there before up.
}

crictl_ps() { timeout 10 ctr --address "$SOCK" -n k8s.io tasks ls -q 2>/dev/null || true; }

# probe: can containers start here? A pod of the pause image (already loaded) must be Running
# within 180 s; otherwise the reason (the container's or the sandbox's last word) and exit 1.
cmd_probe() {
  local pod=tq-node-probe phase="" end=$((SECONDS + 180))
  kc delete pod "$pod" --ignore-not-found --grace-period=0 --force >/dev/null 2>&1 || true
  # A new cluster's `default` ServiceAccount comes a moment after the API server.
  until kc get serviceaccount default >/dev/null 2>&1; do
    [ $SECONDS -lt "$end" ] || { echo "no ServiceAccount default/default after 180 s"; return 1; }
    sleep 1
  done
  kc run "$pod" --image "$PAUSE" --restart Never --image-pull-policy Never \
    --overrides '{"spec":{"tolerations":[{"operator":"Exists"}],"terminationGracePeriodSeconds":0}}' >/dev/null 2>&1 \
    || { echo "could not create the probe pod $pod"; return 1; }
  while [ $SECONDS -lt $end ]; do
    phase=$(kc get pod "$pod" -o 'jsonpath={.status.phase}' 2>/dev/null || true)
    [ "$phase" = Running ] && break
    sleep 1
  done
  if [ "$phase" != Running ]; then
    echo "containers do not start on this machine: pod $pod is ${phase:-unknown} after 180 s:" \
      "$(kc get pod "$pod" -o 'jsonpath={.status.containerStatuses[0].state.waiting.message}' 2>/dev/null)" \
      "$(kc get events --field-selector involvedObject.name=$pod -o 'jsonpath={.items[-1:].message}' 2>/dev/null)"
  fi
  kc delete pod "$pod" --grace-period=0 --force >/dev/null 2>&1 || true
  [ "$phase" = Running ] && log "a pod started on the node"
}

# The node's faults (tests/pods.rs): `restart kubelet|containerd` stops one (TERM) and starts it
# again; `kill-container ID` SIGKILLs a container's processes (ID from a pod's containerID).
# Run them in the host's mount namespace (from inside the lab: nsenter -t HOST_PID -m -n).
case "${1:-}" in
  up) cmd_up ;;
  down) cmd_down ;;
  status) node_ready && echo "node 127.0.0.1 Ready" ;;
  probe) cmd_probe ;;
  restart)
    case "${2:-}" in kubelet|containerd) ;; *) die "usage: $0 restart kubelet|containerd" ;; esac
    stop_pid "$2"; cmd_up ;;
  kill-container)
    [ -n "${2:-}" ] || die "usage: $0 kill-container ID"
    timeout 10 ctr --address "$SOCK" -n k8s.io tasks kill -s KILL "${2#containerd://}" ;;
  *) echo "usage: $0 up|down|status|probe|restart kubelet|containerd|kill-container ID" >&2; exit 2 ;;
esac
