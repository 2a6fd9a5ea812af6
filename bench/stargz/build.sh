#!/usr/bin/env bash
# Build the stargz peer for bench/lazy_pull.py from Debian's Go sources, offline.
#
#   bench/stargz/build.sh [OUT_DIR]     (default /var/tmp/pynydus-bench/bin)
#
# Produces OUT_DIR/pynydus-stargz from bench/stargz/main.go. GOPATH mode
# (GO111MODULE=off) over /usr/share/gocode, where Debian's golang-*-dev packages
# put their sources; our main does not import stargz's service/ package (whose
# resolver needs k8s.io/cri-api, not in bookworm), so no overlay is needed.
# Binaries and the Go build cache stay under OUT_DIR's parent, never in the repo.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
OUT="${1:-/var/tmp/pynydus-bench/bin}"
WORK="$(dirname "$OUT")"
PKGS=(golang-go golang-github-containerd-stargz-snapshotter-dev)
missing=()
for p in "${PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2
fi
mkdir -p "$OUT" "$WORK/gocache" "$WORK/gosrc/src/pynydus-stargz"
# GOPATH mode wants the main package inside a GOPATH src tree: copy (not link)
# main.go so a stale binary is never built from an edited source.
cp "$HERE/main.go" "$WORK/gosrc/src/pynydus-stargz/main.go"
export GO111MODULE=off GOFLAGS= GOPATH="$WORK/gosrc:/usr/share/gocode" GOCACHE="$WORK/gocache"
( cd "$WORK/gosrc/src/pynydus-stargz" && go build -o "$OUT/pynydus-stargz.new" . )
mv "$OUT/pynydus-stargz.new" "$OUT/pynydus-stargz"
echo "$OUT/pynydus-stargz"
