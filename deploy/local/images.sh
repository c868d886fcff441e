#!/usr/bin/env bash
# images.sh build|load SOCKET|names - the lab's container images, built without a registry:
#   pause     the pod sandbox: pause.c from the same kubernetes source as the control plane, static;
#   worker    Debian bookworm (debootstrap minbase) + python3 + a venv with celery[redis] + the
#             demo's Celery app (`app.worker`) in /srv: what a user's worker image is;
#   operator  Debian bookworm minbase + the release binary, user 65532, entrypoint as the
#             Dockerfile (which stays how users build it).
# Each is an OCI layout packed by umoci and tarred under $CACHE/images; `load` imports them into
# the lab's containerd. Tags are never `latest`, so the default pull policy (IfNotPresent) never pulls.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

IMG=$CACHE/images
ROOT=$(cd "$HERE/../.." && pwd)
K8S_SRC=$CACHE/k8s-v1.20.2/src
MIRROR=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CELERY='celery[redis]>=5.5,<6'

PAUSE=tq.local/pause:3.2
WORKER=tq.local/celery-worker:1
OPERATOR=tq.local/taskqueue-operator:dev

# rootfs NAME INCLUDE: a debootstrap minbase rootfs, cached (the slow part, ~90 s each).
rootfs() {
  local dir=$IMG/rootfs-$1
  [ -f "$dir/.complete" ] && return
  log "debootstrap $1 (minbase${2:+ + $2})"
  rm -rf "$dir"
  debootstrap --variant=minbase ${2:+--include="$2"} bookworm "$dir" "$MIRROR" >"$LOGS/debootstrap-$1.log" 2>&1 \
    || { tail -20 "$LOGS/debootstrap-$1.log" >&2; die "debootstrap $1 failed"; }
  rm -rf "$dir"/var/cache/apt/archives/*.deb "$dir"/var/lib/apt/lists/*
  touch "$dir/.complete"
}

# pack NAME REF ROOTFS UMOCI-CONFIG-ARGS...: ROOTFS as a one-layer OCI image REF, in $IMG/NAME.tar.
pack() {
  local name=$1 ref=$2 rootfs=$3; shift 3
  local tag=${ref##*:} layout=$IMG/oci-$name
  rm -rf "$layout"
  umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  umoci insert --image "$layout:$tag" "$rootfs" / >/dev/null
  umoci config --image "$layout:$tag" --author taskqueue-operator-lab "$@"
  umoci gc --layout "$layout"
  tar -C "$layout" -cf "$IMG/$name.tar.tmp" . && mv "$IMG/$name.tar.tmp" "$IMG/$name.tar"
  rm -rf "$layout"
  echo "$ref" >"$IMG/$name.ref"
}

# fresh NAME INPUTS...: true when $IMG/NAME.tar was built from these inputs (their hash).
fresh() {
  local name=$1; shift
  local sum; sum=$(cat "$@" | sha256sum | cut -c1-16)
  [ -f "$IMG/$name.tar" ] && [ "$(cat "$IMG/$name.inputs" 2>/dev/null)" = "$sum" ] && return 0
  echo "$sum" >"$IMG/$name.inputs.new"
  return 1
}
built() { mv "$IMG/$1.inputs.new" "$IMG/$1.inputs"; log "image $(cat "$IMG/$1.ref"): $(du -h "$IMG/$1.tar" | cut -f1)"; }

build_pause() {
  local c=$K8S_SRC/build/pause/linux/pause.c
  [ -f "$c" ] || die "no $c: run k8s.sh build first (it fetches the kubernetes source)"
  fresh pause "$c" "$0" && return
  local r=$IMG/rootfs-pause
  rm -rf "$r"; mkdir -p "$r"
  gcc -Os -static -DVERSION=3.2 -o "$r/pause" "$c"
  pack pause "$PAUSE" "$r" --config.entrypoint /pause --config.user 65535
  rm -rf "$r"; built pause
}

build_worker() {
  local app; mapfile -t app < <(find "$ROOT/deploy/demo/app" -name '*.py' | LC_ALL=C sort)
  fresh worker "${app[@]}" "$0" && return
  rootfs python "python3,python3-venv,ca-certificates"
  local r=$IMG/rootfs-worker
  rm -rf "$r"; cp -a "$IMG/rootfs-python" "$r"
  # Wheels are fetched by the host's pip (its index, proxy and CA settings), then installed with
  # no network into a venv made by the image's own python3 (chroot), so its paths are the image's.
  # pip evaluates `python_full_version` markers with its own Python, not --python-version: redis
  # needs async-timeout below 3.11.3 (bookworm has 3.11.2), so it is named explicitly.
  log "worker venv: $CELERY from wheels fetched on the host"
  rm -rf "$IMG/wheels"
  local pyver; pyver=$(chroot "$r" /usr/bin/python3 -c 'import platform; print(platform.python_version())')
  "${TQ_PYTHON:-python3}" -m pip download -q --only-binary=:all: --python-version "$pyver" -d "$IMG/wheels" "$CELERY" \
    'async-timeout>=4.0.3' \
    >"$LOGS/worker-pip.log" 2>&1 \
    || { tail -20 "$LOGS/worker-pip.log" >&2; die "pip download $CELERY failed"; }
  mkdir -p "$r/tmp/wheels"; cp "$IMG"/wheels/*.whl "$r/tmp/wheels/"
  chroot "$r" /usr/bin/python3 -m venv /opt/venv
  PIP_FIND_LINKS='' chroot "$r" /opt/venv/bin/pip install -q --no-index --find-links /tmp/wheels --no-cache-dir "$CELERY" \
    >>"$LOGS/worker-pip.log" 2>&1 || { tail -20 "$LOGS/worker-pip.log" >&2; die "pip install in the worker rootfs failed"; }
  rm -rf "$r/tmp/wheels"
  mkdir -p "$r/srv"; cp -r "$ROOT/deploy/demo/app" "$r/srv/app"
  find "$r/srv" -name __pycache__ -prune -exec rm -rf {} +
  chroot "$r" /usr/sbin/useradd --uid 1000 --no-create-home --home-dir /srv celery
  pack worker "$WORKER" "$r" --config.workingdir /srv --config.user 1000 \
    --config.env PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.env PYTHONUNBUFFERED=1 --config.cmd celery
  rm -rf "$r"; built worker
}

build_operator() {
  local bin=${TQ_OPERATOR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/taskqueue-operator}
  [ -x "$bin" ] || die "no release binary at $bin: cargo build --release first"
  fresh operator "$bin" "$0" && return
  rootfs base ""
  local r=$IMG/rootfs-operator
  rm -rf "$r"; cp -a "$IMG/rootfs-base" "$r"
  # The user of the Dockerfile (which users build), made the same way.
  chroot "$r" /usr/sbin/groupadd --gid 65532 nonroot
  chroot "$r" /usr/sbin/useradd --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin nonroot
  install -m 0755 "$bin" "$r/usr/local/bin/taskqueue-operator"
  pack operator "$OPERATOR" "$r" --config.user 65532:65532 \
    --config.entrypoint /usr/local/bin/taskqueue-operator --config.cmd run
  rm -rf "$r"; built operator
}

cmd_load() {  # SOCKET: the lab containerd's address
  local n
  for n in pause worker operator; do
    [ -f "$IMG/$n.tar" ] || die "no $IMG/$n.tar: run '$0 build' first"
    ctr --address "$1" -n k8s.io images import --base-name "$(cut -d: -f1 "$IMG/$n.ref")" "$IMG/$n.tar" >/dev/null
  done
  log "loaded: $(ctr --address "$1" -n k8s.io images ls -q | grep '^tq.local/' | paste -sd' ')"
}

mkdir -p "$IMG"
case "${1:-}" in
  build) build_pause; build_worker; build_operator ;;
  build-pause) build_pause ;;
  build-worker) build_worker ;;
  build-operator) build_operator ;;
  load) cmd_load "${2:?socket}" ;;
  names) printf 'PAUSE=%s\nWORKER=%s\nOPERATOR=%s\n' "$PAUSE" "$WORKER" "$OPERATOR" ;;
  *) echo "usage: $0 build|load SOCKET|names" >&2; exit 2 ;;
esac
