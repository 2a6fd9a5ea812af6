#!/bin/sh
# Build the DaemonSet's image (misc/kubernetes/Dockerfile) with Debian's buildah, without a
# Docker engine and without Docker Hub, and run its installer once in it (docs/deploy.md).
#
#   misc/kubernetes/build-buildah.sh [TAG]     # from the checkout; default localhost/pynydus-node:dev
#
# Needs root, `apt-get install buildah debootstrap`, and the Debian mirror and PyPI (the
# Dockerfile's apt-get and pip wheel). FROM python:3.11-slim-bookworm cannot be pulled here,
# so a stand-in of that name is made first in buildah's local store (kept for the next
# build): a Debian 12 minbase rootfs (debootstrap) with python3.11, pip, venv and the Python
# headers the official image has, PIP_BREAK_SYSTEM_PACKAGES=1 (Debian's pip refuses system
# installs otherwise, the official image's does not), and this host's CA bundle for pip (a
# proxy that re-signs TLS needs it). Then `buildah bud --pull=never` of the Dockerfile as it
# is, and /pynydus/install.sh in the image with HOST_EXEC="" STAY=0 and a systemctl stub:
# the venv installed from the image's wheels alone, pynydus and pynydusd run.
set -eu
TAG=${1:-localhost/pynydus-node:dev}
BASE=docker.io/library/python:3.11-slim-bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
cd "$(dirname "$0")/../.."
for p in buildah debootstrap; do
  command -v "$p" >/dev/null || { echo "build-buildah: $p is missing: apt-get install $p" >&2; exit 1; }
done
work=$(mktemp -d /var/tmp/pyn-imgbuild-XXXXXX)
trap 'rm -rf "$work"' EXIT
export BUILDAH_ISOLATION=chroot

if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "build-buildah: making a stand-in for $BASE (Debian 12 minbase + python3.11)"
  debootstrap --variant=minbase \
    --include=python3,python3-pip,python3-venv,python3-dev,python-is-python3,ca-certificates \
    bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; exit 1; }
  rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
  c=$(buildah from scratch)
  mnt=$(buildah mount "$c")
  cp -a "$work/rootfs/." "$mnt/"
  cp /etc/ssl/certs/ca-certificates.crt "$mnt/etc/ssl/certs/host-ca-certificates.crt"
  buildah umount "$c" >/dev/null
  buildah config --env PIP_BREAK_SYSTEM_PACKAGES=1 --env PIP_ROOT_USER_ACTION=ignore \
    --env PIP_CERT=/etc/ssl/certs/host-ca-certificates.crt --cmd python3 "$c"
  buildah commit -q "$c" "$BASE" >/dev/null
  buildah rm "$c" >/dev/null
fi

echo "build-buildah: building $TAG"
buildah bud --pull=never --network host --layers=false \
  --ignorefile misc/kubernetes/Dockerfile.dockerignore -f misc/kubernetes/Dockerfile -t "$TAG" .

echo "build-buildah: running the installer in $TAG"
c=$(buildah from --pull=never "$TAG")
# shellcheck disable=SC2016  # expanded in the image, not here
buildah run "$c" -- sh -c '
  mkdir -p /stubs /config
  printf "#!/bin/sh\necho systemctl \"\$*\"\n" >/stubs/systemctl && chmod +x /stubs/systemctl
  echo "version = 1" >/config/config.toml
  PATH=/stubs:$PATH HOST_EXEC= STAY=0 /pynydus/install.sh
  /usr/local/bin/pynydus --version && /usr/local/bin/pynydusd --version >/dev/null
  test -f /etc/systemd/system/pynydus-snapshotter.service'
buildah rm "$c" >/dev/null
echo "build-buildah: $TAG built and its installer ran"
