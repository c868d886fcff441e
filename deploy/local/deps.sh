#!/usr/bin/env bash
# deps.sh - install the Debian packages the local stack needs (idempotent: apt-get update and
# install run only when something is missing). Needs root. Never starts the system redis/etcd.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

PKGS=(
  etcd-server redis-server redis-sentinel   # run by k8s.sh / redis.sh on free ports
  golang-go                                 # Go 1.19 = kubernetes 1.20's Build-Depends
  golang-github-modern-go-reflect2-dev      # reflect2 v1.0.2 replaces the vendored v1.0.1 (crash on Go 1.19)
  dpkg-dev xz-utils rsync                   # apt-get source (dpkg-source), vendor swap
  openssl unzip ca-certificates python3 python3-venv
  chromium fonts-dejavu-core                # tests/dashboard.rs opens the live page in headless Chromium
  containerd runc containernetworking-plugins   # node.sh: the kubelet's runtime and the pod network
  umoci debootstrap                         # images.sh: images built without a registry
  iproute2 util-linux                       # lab.sh: the lab's network namespace (ip netns, nsenter)
)
command -v npm >/dev/null || PKGS+=(npm)    # helm.sh; a node install's own npm counts too

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

# `apt-get source kubernetes` needs a deb-src entry. Added as its own file; the system's
# deb822 debian.sources stays untouched.
SRC=/etc/apt/sources.list.d/tq-debian-src.sources
need_update=0
if ! grep -qsE '^(Types:.*deb-src|deb-src )' /etc/apt/sources.list /etc/apt/sources.list.d/*.{list,sources}; then
  log "adding $SRC (deb-src bookworm main)"
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null)
  printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "${uri:-http://deb.debian.org/debian}" > "$SRC"
  need_update=1
fi
[ -n "$(apt-cache showsrc kubernetes 2>/dev/null)" ] || need_update=1
[ ${#missing[@]} -gt 0 ] && need_update=1

[ $need_update = 1 ] || { log "all packages present"; exit 0; }
[ "$(id -u)" = 0 ] || die "missing packages (${missing[*]:-deb-src index}); run as root"
log "apt-get update"
apt-get update -qq >&2   # stdout stays clean: callers capture the last line of up.sh
[ ${#missing[@]} -gt 0 ] || exit 0

# policy-rc.d exit 101 tells invoke-rc.d not to start services from postinst scripts.
PRC=/usr/sbin/policy-rc.d
[ -e $PRC ] && cp -p $PRC $PRC.tq-saved
trap 'if [ -e $PRC.tq-saved ]; then mv -f $PRC.tq-saved $PRC; else rm -f $PRC; fi' EXIT
printf '#!/bin/sh\nexit 101\n' > $PRC; chmod 755 $PRC

log "installing: ${missing[*]}"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$LOGS/apt-install.log" 2>&1 \
  || { tail -30 "$LOGS/apt-install.log" >&2; die "apt-get install failed"; }
# postinst still enables the units for the next boot; we never want the system instances.
if [ -d /run/systemd/system ]; then
  systemctl disable --now etcd redis-server redis-sentinel containerd >/dev/null 2>&1 || true
fi
log "installed ${#missing[@]} packages"
