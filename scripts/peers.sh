#!/usr/bin/env bash
# Install the upstream "peer" programs that pynydus is tested and benchmarked against,
# by package name from the registries (cargo install / go install), at the versions
# pinned in scripts/peers.lock, into $PYNYDUS_PEERS_CACHE/NAME-VERSION/bin
# (default /var/cache/pynydus/peers). Never from copied sources or git clones.
#
#   scripts/peers.sh                      # every peer
#   scripts/peers.sh nydus-rs containerd2 # only these
#
# What is already installed is skipped, so a second run takes seconds. Prints one line
# per peer (name, version, bin directory) and exits non-zero naming any required peer
# that failed. Optional peers (nydusify) that cannot be installed by name are
# reported as "NAME: not installable by name: REASON" and do not fail the run; that
# verdict is remembered in NAME-VERSION.unavailable (PYNYDUS_PEERS_RETRY=1 tries again).
# Build logs: $PYNYDUS_PEERS_CACHE/_logs/NAME-VERSION.log.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
LOCK="$HERE/peers.lock"
CACHE="${PYNYDUS_PEERS_CACHE:-/var/cache/pynydus/peers}"

# name -> how to build it. kind|registry package|packages (Go)|programs|ldflags (Go, %V = version)
declare -A SPEC=(
  [nydus-rs]="cargo|nydus-rs||nydusd nydus-image nydusctl|"
  [nydus-snapshotter]="go|github.com/containerd/nydus-snapshotter|cmd/containerd-nydus-grpc|containerd-nydus-grpc|-X github.com/containerd/nydus-snapshotter/version.Version=%V"
  [containerd2]="go|github.com/containerd/containerd/v2|cmd/containerd cmd/ctr cmd/containerd-shim-runc-v2|containerd ctr containerd-shim-runc-v2|"
  [crictl]="go|sigs.k8s.io/cri-tools|cmd/crictl|crictl|-X sigs.k8s.io/cri-tools/pkg/version.Version=%V"
  [h2spec]="go|github.com/summerwind/h2spec|cmd/h2spec|h2spec|-X main.VERSION=%V"
  [nerdctl]="go|github.com/containerd/nerdctl/v2|cmd/nerdctl|nerdctl|-X github.com/containerd/nerdctl/v2/pkg/version.Version=%V"
  [nydusify]="go|github.com/dragonflyoss/nydus/contrib/nydusify|cmd/nydusify|nydusify|"
)
ORDER=(nydus-rs nydus-snapshotter containerd2 crictl h2spec nerdctl nydusify)
# Dependencies of a Go peer moved to another version the proxy serves, when upstream's own
# is refused (403): "module=version ...". nerdctl v2.4.2 requires moby/moby/v2
# v2.0.0-beta.28, which the proxy refuses; of that module nerdctl uses only pkg/sysinfo and
# pkg/meminfo, which beta.25 (the newest the proxy serves) has with the same API.
declare -A DEP_PINS=(
  [nerdctl]="github.com/moby/moby/v2=v2.0.0-beta.25"
)
# Optional: it does not build by name through the Go module proxy we reach (the exact
# reason is printed and kept in NAME-VERSION.unavailable): nydusify's module, which lives
# inside the nydus repository, is refused by the proxy outright (403), so upstream's
# replace directives never even come into play. Nothing may depend on it; it is tried so
# a proxy that serves it works.
OPTIONAL=" nydusify "
# Debian packages needed to build them: C toolchain for cgo and the -sys crates, OpenSSL.
DEB_PKGS=(build-essential pkg-config libssl-dev zlib1g-dev ca-certificates)

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; echo "peers: ${ORDER[*]}"; }

declare -A PIN=()
while read -r name version _; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  PIN[$name]=$version
done < "$LOCK"

wanted=()
for a in "$@"; do
  case "$a" in
    -h|--help) usage; exit 0 ;;
    -*) echo "peers: unknown option $a" >&2; usage >&2; exit 2 ;;
    *) [[ -n "${SPEC[$a]:-}" ]] || { echo "peers: unknown peer '$a' (known: ${ORDER[*]})" >&2; exit 2; }
       wanted+=("$a") ;;
  esac
done
[ ${#wanted[@]} -gt 0 ] || wanted=("${ORDER[@]}")
for n in "${wanted[@]}"; do
  [[ -n "${PIN[$n]:-}" ]] || { echo "peers: $n has no version in $LOCK" >&2; exit 2; }
done

mkdir -p "$CACHE/_logs"
# One run at a time per cache: a second one waits instead of building the same thing twice.
exec 9>"$CACHE/.lock"
flock 9

# Shared caches so reruns and neighbouring peers reuse downloads and compiled objects.
export CARGO_HOME="$CACHE/_cargo" CARGO_TARGET_DIR="$CACHE/_cargo/target"
export GOMODCACHE="$CACHE/_go/mod" GOCACHE="$CACHE/_go/build" GOTOOLCHAIN=local GOFLAGS=
CARGO="${CARGO:-$(command -v cargo || echo /root/.cargo/bin/cargo)}"
GO="${GO:-$(command -v go || echo /usr/local/go/bin/go)}"

bindir() { echo "$CACHE/$1-$2/bin"; }
installed() {  # name version: every program present and executable
  local progs; IFS='|' read -r _ _ _ progs _ <<<"${SPEC[$1]}"
  local d; d=$(bindir "$1" "$2")
  for p in $progs; do [ -x "$d/$p" ] || return 1; done
}

deps_checked=
debian_deps() {
  [ -n "$deps_checked" ] && return 0
  deps_checked=1
  local missing=() p
  for p in "${DEB_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "peers: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

cargo_peer() {  # crate version root
  [ -x "$CARGO" ] || { echo "cargo not found (set CARGO=)"; return 1; }
  "$CARGO" install "$1" --version "$2" --root "$3" --locked
}

# go install PKG@VERSION refuses a module whose go.mod has replace or exclude directives
# (nydus-snapshotter has excludes). Then build the same module version, fetched by name
# from the proxy, as a dependency of a throwaway main module that carries upstream's
# exclude directives and its module-to-module replaces, so the build list is upstream's.
# Replaces by local path cannot be honoured this way; they are logged and left out.
# $DEP_PIN ("module=version ...", from DEP_PINS) moves dependencies on top of those.
go_build_by_name() {  # module version out ldflags pkgs...
  local module=$1 version=$2 out=$3 ldflags=$4; shift 4
  local work rc=0
  mkdir -p "$CACHE/_go"
  work=$(mktemp -d "$CACHE/_go/work.XXXXXX")
  # (errexit does not apply inside a function called under ||, hence the explicit exits)
  (
    cd "$work" || exit 1
    "$GO" mod init pynydus.peers/build || exit 1
    gomod=$("$GO" mod download -json "$module@$version" |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])') || exit 1
    edits=$("$GO" mod edit -json "$gomod" | python3 -c '
import json, sys
d = json.load(sys.stdin)
for e in d.get("Exclude") or []:
    print("-exclude=%s@%s" % (e["Path"], e["Version"]))
for r in d.get("Replace") or []:
    old, new = r["Old"], r["New"]
    if not new.get("Version"):
        print("peers: upstream replace %s => %s is a local path; left out" % (old["Path"], new["Path"]), file=sys.stderr)
        continue
    o = old["Path"] + ("@" + old["Version"] if old.get("Version") else "")
    print("-replace=%s=%s@%s" % (o, new["Path"], new["Version"]))
') || exit 1
    for pin in ${DEP_PIN:-}; do
      echo "peers: $module@$version: ${pin%%=*} replaced by ${pin#*=} (DEP_PINS)"
      edits+=" -replace=${pin%%=*}=${pin%%=*}@${pin#*=}"
    done
    if [ -n "$edits" ]; then
      # shellcheck disable=SC2086
      "$GO" mod edit $edits || exit 1
    fi
    targets=() pkgs=()
    for p in "$@"; do targets+=("$module/$p@$version"); pkgs+=("$module/$p"); done
    "$GO" get "${targets[@]}" || exit 1
    mkdir -p "$out" || exit 1
    "$GO" build -trimpath -ldflags "$ldflags" -o "$out/" "${pkgs[@]}"
  ) || rc=$?
  rm -rf "$work"
  return $rc
}

go_peer() {  # module version out ldflags pkgs...
  [ -x "$GO" ] || { echo "go not found (set GO=)"; return 1; }
  local module=$1 version=$2 out=$3 ldflags=$4; shift 4
  local p targets=() errf rc=0
  for p in "$@"; do targets+=("$module/$p@$version"); done
  errf=$(mktemp)
  GOBIN="$out" "$GO" install -trimpath -ldflags "$ldflags" "${targets[@]}" 2>"$errf" || rc=$?
  cat "$errf"
  if [ $rc -ne 0 ] && grep -q "must not contain directives" "$errf"; then
    echo "peers: go install refused the module's directives; building $module@$version by name in a throwaway module"
    rc=0
    go_build_by_name "$module" "$version" "$out" "$ldflags" "$@" || rc=$?
  fi
  rm -f "$errf"
  return $rc
}

smoke() {  # bin dir, programs: each must start and answer its version flag
  local d=$1 p; shift
  for p in "$@"; do
    case "$p" in
      containerd-shim-runc-v2) "$d/$p" -v ;;
      *) "$d/$p" --version ;;
    esac >/dev/null 2>&1 || { echo "peers: $p --version failed"; return 1; }
  done
}

# shellcheck disable=SC2086  # $pkgs and $progs are word lists
install_peer() {  # name version
  local name=$1 version=$2 kind pkg pkgs progs ldflags
  IFS='|' read -r kind pkg pkgs progs ldflags <<<"${SPEC[$name]}"
  local final="$CACHE/$name-$version" part="$CACHE/.$name-$version.partial"
  local log="$CACHE/_logs/$name-$version.log"
  rm -rf "$part"
  mkdir -p "$part"
  debian_deps
  local start rc=0
  start=$(date +%s)
  {
    echo "== $(date -u +%FT%TZ) installing $name $version"
    case "$kind" in
      cargo) cargo_peer "$pkg" "$version" "$part" ;;
      go) DEP_PIN="${DEP_PINS[$name]:-}" go_peer "$pkg" "$version" "$part/bin" "${ldflags//%V/${version%+incompatible}}" $pkgs ;;
    esac && smoke "$part/bin" $progs
  } >>"$log" 2>&1 || rc=$?
  local secs=$(( $(date +%s) - start ))
  if [ $rc -ne 0 ]; then
    rm -rf "$part"
    return $rc
  fi
  echo "seconds=$secs installed=$(date -u +%FT%TZ)" >"$part/.installed"
  rm -rf "$final"
  mv "$part" "$final"
  LAST_SECS=$secs
}

# A one-line reason from a failed build's log: from its last "go: ..." or "error..." line
# on (download and compile progress dropped), whitespace folded.
reason() {
  grep -v -e '^go: downloading' -e '^ *Compiling' -e '^ *Downloaded' -e '^peers: ' "$1" |
    awk '/^go: |^error/ { n = 0 } { buf[n++] = $0 } END { for (i = 0; i < n; i++) print buf[i] }' |
    tr -s ' \t\n' ' ' | sed 's/^ //; s/ $//' | cut -c1-400 || true
}

failed=()
total_start=$(date +%s)
for name in "${wanted[@]}"; do
  version=${PIN[$name]}
  d=$(bindir "$name" "$version")
  unavail="$CACHE/$name-$version.unavailable"
  if installed "$name" "$version"; then
    note="cached"
    [ -f "$d/../.installed" ] && note="cached; first install took $(sed -n 's/^seconds=\([0-9]*\).*/\1/p' "$d/../.installed")s"
    printf '%-18s %-20s %s (%s)\n' "$name" "$version" "$d" "$note"
    continue
  fi
  if [[ "$OPTIONAL" == *" $name "* && -f "$unavail" && -z "${PYNYDUS_PEERS_RETRY:-}" ]]; then
    echo "$name: not installable by name: $(cat "$unavail")"
    continue
  fi
  echo "peers: installing $name $version (log: $CACHE/_logs/$name-$version.log)"
  LAST_SECS=0
  if install_peer "$name" "$version"; then
    rm -f "$unavail"
    printf '%-18s %-20s %s (installed in %ss)\n' "$name" "$version" "$d" "$LAST_SECS"
  elif [[ "$OPTIONAL" == *" $name "* ]]; then
    why=$(reason "$CACHE/_logs/$name-$version.log")
    echo "${why:-see $CACHE/_logs/$name-$version.log}" >"$unavail"
    echo "$name: not installable by name: $(cat "$unavail")"
  else
    echo "peers: FAILED: $name $version; last lines of $CACHE/_logs/$name-$version.log:" >&2
    tail -n 25 "$CACHE/_logs/$name-$version.log" >&2
    failed+=("$name")
  fi
done

if [ ${#failed[@]} -gt 0 ]; then
  echo "peers: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "peers: ok in $(( $(date +%s) - total_start ))s (cache: $CACHE)"
