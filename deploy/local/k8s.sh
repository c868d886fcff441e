#!/usr/bin/env bash
# k8s.sh build|up|down|env|status|start COMPONENT - a real kube-apiserver + kube-controller-manager v1.20.2,
# built from Debian bookworm's `kubernetes` source package, on Debian's etcd 3.4, all on 127.0.0.1.
# No kubelet/scheduler: Deployments get ReplicaSets and Pods, and the Pods stay Pending.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

KVER=v1.20.2
# Built together; bin/ holds all or nothing (the cache key). kubelet and kube-scheduler: node.sh.
COMPONENTS="kube-apiserver kube-controller-manager kube-scheduler kubelet"
K8S=$CACHE/k8s-$KVER          # src/ gopath/ gocache/ bin/ - kept across down/up
BIN=$K8S/bin
PKI=$STATE/pki
KCFG=$STATE/kubeconfig
kc() { in_lab kubectl --kubeconfig "$KCFG" --request-timeout=5s "$@"; }

cmd_build() {
  local b all=1
  for b in $COMPONENTS; do [ -x "$BIN/$b" ] || all=0; done
  if [ $all = 1 ]; then log "cached: $BIN"; return; fi
  command -v go >/dev/null || die "no go: run deps.sh first"
  local t0=$SECONDS src=$K8S/src
  if [ ! -d "$src" ]; then
    log "apt-get source kubernetes (needs the deb-src entry deps.sh adds)"
    rm -rf "$K8S/dl"; mkdir -p "$K8S/dl"
    # APT::Sandbox::User=root: _apt can't write into root's home; only silences a warning.
    (cd "$K8S/dl" && apt-get source -q -o APT::Sandbox::User=root kubernetes) >"$LOGS/k8s-source.log" 2>&1 \
      || { tail -20 "$LOGS/k8s-source.log" >&2; die "apt-get source kubernetes failed"; }
    mv "$K8S"/dl/kubernetes-*1.20.2 "$src" && rm -rf "$K8S/dl"
  fi

  # GOPATH mode: vendor/ (with staging/ symlinked into it) resolves every import, no module proxy.
  export GO111MODULE=off GOPATH=$K8S/gopath GOCACHE=$K8S/gocache GOFLAGS='' CGO_ENABLED=0
  local kk=$GOPATH/src/k8s.io/kubernetes
  mkdir -p "$(dirname "$kk")"; ln -sfn "$src" "$kk"
  cd "$kk"   # via the symlink: go resolves packages from $PWD's GOPATH location

  # reflect2 v1.0.1 (vendored) reads Go maps with a pre-1.18 layout: under Go 1.19 the apiserver
  # dies with `fatal error: fault` in UnsafeIterate on the first custom object. v1.0.2 fixes it.
  rsync -a --delete --exclude go.mod /usr/share/gocode/src/github.com/modern-go/reflect2/ vendor/github.com/modern-go/reflect2/

  # pkg/generated/openapi/zz_generated.openapi.go is not in the tarball (upstream's make generates
  # it). Same package set as Makefile.generated_files: every non-vendor dir (staging/src seen as
  # vendor/) tagged +k8s:openapi-gen=, minus code-generator and sample-apiserver.
  log "generating pkg/generated/openapi"
  go build -o "$K8S/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  local pkgs
  pkgs=$(find -H . -not \( \( -path './_*' -o -path './.*' -o -path ./vendor \) -prune \) -name '*.go' -print0 \
    | { xargs -0 grep -l '^// *+k8s:openapi-gen=' || true; } | xargs -n1 dirname \
    | sed 's|^\./||; s|^staging/src/|vendor/|; s|^|k8s.io/kubernetes/|' \
    | grep -v -E '/vendor/k8s.io/(code-generator|sample-apiserver)/' | LC_ALL=C sort -u | paste -sd,)
  "$K8S/openapi-gen" -i "$pkgs" -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
    -o "$GOPATH/src" -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt -r "$K8S/openapi-violations.report" \
    >"$LOGS/k8s-openapi-gen.log" 2>&1 || { tail -20 "$LOGS/k8s-openapi-gen.log" >&2; die "openapi-gen failed"; }

  log "go build $COMPONENTS (9-12 min cold, ~1.5 GB RAM; log: $LOGS/k8s-build.log)"
  local ldf="-s -w" v
  for v in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldf+=" -X $v.gitVersion=$KVER -X $v.gitMajor=1 -X $v.gitMinor=20 -X $v.gitTreeState=clean -X $v.buildDate=$(date -u +%FT%TZ)"
  done
  rm -rf "$BIN.tmp"; mkdir -p "$BIN.tmp"
  # shellcheck disable=SC2046  # one package path per component
  go build -o "$BIN.tmp/" -ldflags "$ldf" $(printf 'k8s.io/kubernetes/cmd/%s ' $COMPONENTS) \
    >"$LOGS/k8s-build.log" 2>&1 || { tail -30 "$LOGS/k8s-build.log" >&2; die "go build failed"; }
  rm -rf "$BIN"; mv "$BIN.tmp" "$BIN"   # bin/ appears only complete: it is the cache key
  log "built in $((SECONDS - t0))s: $("$BIN/kube-apiserver" --version)"
}

gen_pki() {   # once per $STATE: CA, apiserver serving cert, admin client cert, service-account keys
  [ -s "$PKI/kubelet.crt" ] && return
  rm -rf "$PKI"; mkdir -p "$PKI"   # an older set (without the node's certs) is made anew
  ( cd "$PKI"; exec 2>openssl.log
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 3650 -subj /CN=tq-local-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign,digitalSignature
    sign() { # name subject extensions
      openssl req -newkey rsa:2048 -nodes -keyout "$1.key" -out "$1.csr" -subj "$2"
      printf '%s\n' "${@:3}" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 3650 -sha256 -extfile "$1.ext" -out "$1.crt"
    }
    sign apiserver /CN=kube-apiserver "subjectAltName=IP:127.0.0.1,IP:$LAB_NET.1,DNS:localhost,DNS:kubernetes.default.svc" extendedKeyUsage=serverAuth
    sign apiserver-kubelet "/O=system:masters/CN=kube-apiserver-kubelet-client" extendedKeyUsage=clientAuth   # logs/exec
    # The lab's node (node.sh): the kubelet's client cert (Node authorization) and serving cert.
    sign kubelet-client "/O=system:nodes/CN=system:node:127.0.0.1" extendedKeyUsage=clientAuth
    sign kubelet "/CN=127.0.0.1" subjectAltName=IP:127.0.0.1 extendedKeyUsage=serverAuth
    sign admin "/O=system:masters/CN=tq-admin" extendedKeyUsage=clientAuth   # system:masters bypasses RBAC
    openssl genrsa -out sa.key 2048 && openssl rsa -in sa.key -pubout -out sa.pub
    [ -s ca.crt ] && [ -s apiserver.crt ] && [ -s admin.crt ] && [ -s sa.pub ] && [ -s apiserver-kubelet.crt ] && [ -s kubelet.crt ]  # errexit is off left of ||
  ) || { cat "$PKI/openssl.log" >&2; rm -rf "$PKI"; die "openssl failed"; }
}

write_kubeconfig() {  # $1 = apiserver port
  cat > "$KCFG" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: tq-local
  cluster: {server: "https://127.0.0.1:$1", certificate-authority: "$PKI/ca.crt"}
users:
- name: tq-admin
  user: {client-certificate: "$PKI/admin.crt", client-key: "$PKI/admin.key"}
contexts:
- name: tq-local
  context: {cluster: tq-local, user: tq-admin, namespace: default}
current-context: tq-local
EOF
  chmod 600 "$KCFG"
}

ready() { [ "$(kc get --raw=/readyz 2>/dev/null)" = ok ]; }
has_sa_token() { [ -n "$(kc -n default get sa default -o 'jsonpath={.secrets[0].name}')" ]; }
has_pod() { [ -n "$(kc -n "$1" get pods -o name)" ]; }   # Pods exist only via Deployment -> ReplicaSet
running() { alive etcd && alive kube-apiserver && alive kube-controller-manager && ready; }

cmd_up() {
  if running; then log "already running ($(cat "$STATE/k8s.ports"))"; return; fi
  cmd_down 2>/dev/null   # half-up leftovers from an earlier run
  [ -x "$BIN/kube-apiserver" ] || die "no binaries in $BIN: run '$0 build' first"
  local t0=$SECONDS
  echo "etcd peer apiserver controller-manager: $(free_ports 4)" > "$STATE/k8s.ports"
  gen_pki; write_kubeconfig "$(port apiserver)"
  rm -rf "$STATE/etcd"   # every `up` starts from an empty cluster
  start_etcd
  start_apiserver
  start_kcm
  # ServiceAccount admission rejects Pods until the tokens controller made default's token secret.
  wait_for kube-controller-manager 60 "default serviceaccount token" has_sa_token
  selfcheck
  log "up in $((SECONDS - t0))s: $(cat "$STATE/k8s.ports"); KUBECONFIG=$KCFG"
}

# port NAME: the port `up` picked for etcd, peer, apiserver or controller-manager.
port() {
  local names ports i
  read -r -a names <<<"$(cut -d: -f1 "$STATE/k8s.ports")"
  read -r -a ports <<<"$(cut -d: -f2 "$STATE/k8s.ports")"
  for i in "${!names[@]}"; do [ "${names[$i]}" = "$1" ] && { echo "${ports[$i]}"; return; }; done
  die "no port for $1 in $STATE/k8s.ports"
}

# The three components, each (re)startable on its own with the ports and data of `up` (the
# fault suite restarts them one at a time).
start_etcd() {
  start_bg etcd etcd --name tq --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$(port etcd)" --advertise-client-urls "http://127.0.0.1:$(port etcd)" \
    --listen-peer-urls "http://127.0.0.1:$(port peer)" --initial-advertise-peer-urls "http://127.0.0.1:$(port peer)" \
    --initial-cluster "tq=http://127.0.0.1:$(port peer)"
}

start_apiserver() {
  # --insecure-port 0: 1.20 still opens plain HTTP :8080 by default. --endpoint-reconciler-type none:
  # no reconciler publishes 127.0.0.1 as the `kubernetes` Service's endpoint (no pod could use it).
  # In the lab: every address of the lab (its loopback, the bridge pods reach it on); Node
  # authorization for the kubelet's own credentials.
  start_bg kube-apiserver "$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$(port etcd)" \
    --bind-address "$([ -n "$LAB_IP" ] && echo 0.0.0.0 || echo 127.0.0.1)" --advertise-address "${LAB_IP:-127.0.0.1}" \
    --secure-port "$(port apiserver)" --insecure-port 0 \
    --endpoint-reconciler-type none --authorization-mode Node,RBAC --allow-privileged \
    --kubelet-client-certificate "$PKI/apiserver-kubelet.crt" --kubelet-client-key "$PKI/apiserver-kubelet.key" \
    --tls-cert-file "$PKI/apiserver.crt" --tls-private-key-file "$PKI/apiserver.key" --client-ca-file "$PKI/ca.crt" \
    --service-account-key-file "$PKI/sa.pub" --service-account-signing-key-file "$PKI/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local --service-cluster-ip-range 10.0.0.0/24
  wait_for kube-apiserver 90 "apiserver /readyz" ready
}

start_kcm() {
  # --port 0: no plain-HTTP port. Admin credentials + --use-service-account-credentials=false keep it simple.
  start_bg kube-controller-manager "$BIN/kube-controller-manager" --kubeconfig "$KCFG" \
    --authentication-kubeconfig "$KCFG" --authorization-kubeconfig "$KCFG" \
    --bind-address 127.0.0.1 --secure-port "$(port controller-manager)" --port 0 --cert-dir "$STATE/kcm-certs" \
    --leader-elect=false --controllers '*' --use-service-account-credentials=false \
    --service-account-private-key-file "$PKI/sa.key" --root-ca-file "$PKI/ca.crt" \
    --cluster-signing-cert-file "$PKI/ca.crt" --cluster-signing-key-file "$PKI/ca.key"
}

cmd_start() {
  [ -f "$STATE/k8s.ports" ] || die "not up: run '$0 up' first"
  case "${1:-}" in
    etcd) start_etcd ;;
    kube-apiserver) start_apiserver ;;
    kube-controller-manager) start_kcm ;;
    *) die "start etcd|kube-apiserver|kube-controller-manager" ;;
  esac
}

selfcheck() {  # controller-manager works: Deployment -> ReplicaSet -> (Pending) Pod
  local ns=tq-selfcheck
  kc create namespace $ns >/dev/null
  kc -n $ns create deployment selfcheck --image=registry.k8s.io/pause:3.2 >/dev/null
  wait_for kube-controller-manager 60 "selfcheck ReplicaSet and Pod" has_pod $ns
  kc delete namespace $ns --wait=false >/dev/null   # the namespace controller cleans up behind us
}

cmd_down() {
  stop_pid kube-controller-manager kube-apiserver etcd
  rm -f "$STATE/k8s.ports"
}

cmd_status() {
  local n
  for n in etcd kube-apiserver kube-controller-manager; do
    if alive $n; then echo "$n: running (pid $(cat "$STATE/$n.pid"))"; else echo "$n: stopped"; fi
  done
  [ -f "$STATE/k8s.ports" ] && echo "ports: $(cat "$STATE/k8s.ports")"
  if ready; then echo "readyz: ok; KUBECONFIG=$KCFG"; else echo "readyz: not ready"; return 1; fi
}

case "${1:-}" in
  build) cmd_build ;;
  up) cmd_up ;;
  start) cmd_start "${2:-}" ;;
  down) cmd_down ;;
  env) printf "export KUBECONFIG=%q\n" "$KCFG" ;;
  status) cmd_status ;;
  *) echo "usage: $0 build|up|down|env|status|start COMPONENT" >&2; exit 2 ;;
esac
