#!/usr/bin/env bash
# Prepare a Debian 12 machine for pynydus: system packages and a virtualenv at .venv.
# Idempotent: packages already installed are not fetched again.
# Installs the peers the e2e tests drive (containerd 2.x and crictl, scripts/peers.sh);
# --peers: every upstream peer program (scripts/peers.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
peers=
if [ "${1:-}" = "--peers" ]; then peers=1; shift; fi

PKGS=(containerd runc docker-registry fuse3 libfuse3-dev pkg-config erofs-utils skopeo umoci
      e2fsprogs util-linux curl ca-certificates python3-venv
      busybox-static   # the shell/base layer of the e2e test images
      stargz-snapshotter   # ctr-remote: lazy pulls with labels (rpull), eStargz peer in bench/
      pigz                 # pigz/unpigz: bench/lazy_images.py layers, rafs_bench's unpigz baseline
      debootstrap          # bench/lazy_images.py: the Debian base of the lazy-pull images
      apache2-utils        # htpasswd: bcrypt files for the registries with auth
      systemd              # systemd-analyze verify: the unit in misc/systemd
      socat                # bridges h2spec (TCP only) to the snapshots unix socket in a test
      openssl              # verifies the converter's image signatures in a test
      cryptsetup-bin       # veritysetup: userspace check of tarfs block images' dm-verity trees
      liblz4-1             # liblz4: lz4_block chunks decoded without holding the GIL, rafs.format.compress
      util-linux-extra     # fincore: page-cache residency in bench/erofs_blobs.py's memory figures
      git                  # benchmark headers name the commit measured (bench/snapshotter_ops.py)
      mount gzip tar       # mount/umount, gzip, tar: called by tests (tests/harness/tools.py)
      coreutils dash bash dpkg) # Essential, named because tests run their programs: cp, sh, dpkg-query
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pynydus-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[test,fuzz]' 2>&1 | grep -v '^WARNING: Location' || true
  .venv/bin/python -c 'import pynydus, grpc, pyfuse3, atheris' 
  touch "$stamp"
fi
# containerd mounts "fuse.nydus-overlayfs" through mount.fuse3, which runs the helper
# by name from PATH: make ours reachable for a containerd started from any shell.
ln -sf "$PWD/.venv/bin/nydus-overlayfs" /usr/local/bin/nydus-overlayfs
# FUSE and the upstream-written fixtures are needed by tests that fail (never skip)
# without them: load the module if the device is missing, and say where fixtures go.
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
[ -e /dev/fuse ] || { echo "setup: /dev/fuse is missing (modprobe fuse failed)" >&2; exit 1; }
shared="${PYNYDUS_SHARED:-$PWD/../shared}"
[ -d "$shared/fixtures" ] || {
  echo "setup: no fixtures at $shared/fixtures: check out ../shared beside the repo or set PYNYDUS_SHARED" >&2
  exit 1; }
echo "setup: ok ($(.venv/bin/python --version), $(containerd --version | awk '{print $3}'))"
if [ -n "$peers" ]; then
  scripts/peers.sh
else
  scripts/peers.sh containerd2 crictl   # tests/e2e runs against containerd 1.6 and 2.x
fi
