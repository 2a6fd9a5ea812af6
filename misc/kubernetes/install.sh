#!/bin/sh
# The DaemonSet pod's entry point (misc/kubernetes/pynydus-snapshotter.yaml): install this
# image's pynydus on the node and run the snapshotter there as a systemd service, then
# stay (the pod is the installer and the readiness probe, not the snapshotter).
#
# Why a host service and not a process in the pod: the pynydusd daemons serve running
# containers' root filesystems; in the pod they would live in its cgroup and die with any
# restart or update of the pod, and every container on them with it. The unit's
# KillMode=process keeps them across restarts and upgrades of the snapshotter.
#
# Steps, each idempotent: a venv per pynydus version under $PYNYDUS_HOME (a hostPath at
# the same path in the pod and on the node) from the wheels in the image, no network;
# $PYNYDUS_HOME/current points at it; programs linked into $BIN_DIR; unit and config
# installed; the service enabled, started, and restarted when the version, the unit or the
# config changed (the upgrade path of README "Upgrading a node": running daemons are
# adopted). Commands that touch the node run through $HOST_EXEC (nsenter into PID 1's
# namespaces; the pod has hostPID and is privileged).
set -eu

: "${PYNYDUS_HOME:=/opt/pynydus}"
: "${IMAGE_DIR:=/pynydus}"               # wheels/, VERSION, the unit, in the image
: "${CONFIG_FILE:=/config/config.toml}"  # the ConfigMap's config.toml
: "${BIN_DIR:=/usr/local/bin}"           # on the node
: "${UNIT_DIR:=/etc/systemd/system}"     # on the node
: "${NODE_CONFIG:=/etc/nydus/config.toml}"  # on the node, as the unit's ExecStart says
: "${HOST_EXEC=nsenter --target 1 --mount --uts --ipc --net --pid --}"
: "${STAY:=1}"                           # 0: exit once installed (tests)
UNIT=pynydus-snapshotter.service

host() { $HOST_EXEC "$@"; }
log() { echo "pynydus-install: $*"; }

version=$(cat "$IMAGE_DIR/VERSION")
dest="$PYNYDUS_HOME/$version"
if [ ! -e "$dest/.installed" ]; then
  log "installing pynydus $version into $dest"
  rm -rf "$dest"
  mkdir -p "$dest"
  cp -r "$IMAGE_DIR/wheels" "$dest/wheels"
  host python3 -m venv "$dest/venv"
  host "$dest/venv/bin/pip" install --quiet --no-index --find-links "$dest/wheels" pynydus
  touch "$dest/.installed"
fi

changed=
stage() {  # stage FILE TARGET: install FILE at TARGET on the node if it differs
  cp "$1" "$PYNYDUS_HOME/.staged"
  if ! host cmp -s "$PYNYDUS_HOME/.staged" "$2"; then
    host install -D -m 644 "$PYNYDUS_HOME/.staged" "$2"
    log "installed $2"
    changed=1
  fi
  rm -f "$PYNYDUS_HOME/.staged"
}
stage "$IMAGE_DIR/$UNIT" "$UNIT_DIR/$UNIT"
stage "$CONFIG_FILE" "$NODE_CONFIG"

if [ "$(readlink "$PYNYDUS_HOME/current" || true)" != "$dest" ]; then
  ln -sfn "$dest" "$PYNYDUS_HOME/current.new"
  mv -T "$PYNYDUS_HOME/current.new" "$PYNYDUS_HOME/current"
  log "pynydus $version is current"
  changed=1
fi
host mkdir -p "$BIN_DIR"
for prog in pynydus pynydusd nydus-overlayfs nydusctl nydus-image; do
  # containerd runs nydus-overlayfs by name from PATH; the unit runs $BIN_DIR/pynydus
  host ln -sfn "$PYNYDUS_HOME/current/venv/bin/$prog" "$BIN_DIR/$prog"
done

host systemctl daemon-reload
host systemctl enable "$UNIT"
if [ -n "$changed" ]; then
  log "restarting $UNIT (its daemons keep running and are adopted)"
  host systemctl restart "$UNIT"
else
  host systemctl start "$UNIT"
fi
log "done; waiting (the pod's readiness probe runs pynydus ctl health)"
[ "$STAY" = 1 ] || exit 0
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
