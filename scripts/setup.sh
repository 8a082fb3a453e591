#!/usr/bin/env bash
# Install everything ferry needs on a fresh Debian (bookworm) machine, as root.
# Idempotent: each step checks first and is skipped when already done.
# The mirror may serve snapshots whose Release files are past Valid-Until, so
# our extra sources say Check-Valid-Until: no.
#   QEMU 10.0 + SeaBIOS from bookworm-backports (7.2 from main also works)
#   CRIU 4.2.1 built from Debian's upstream tarball into /usr/local/sbin
#   busybox-static (container image), nasm (test VM guest), nftables (CRIU network lock)
set -euo pipefail
CRIU_VERSION=4.2.1
log() { echo "setup: $*" >&2; }
[ "$(id -u)" = 0 ] || { echo "setup: must run as root (it installs packages)" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive

mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
[ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
[ -n "$mirror" ] || mirror=http://deb.debian.org/debian
src=/etc/apt/sources.list.d/ferry.sources
want_src="Types: deb
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no

Types: deb-src
URIs: $mirror
Suites: forky sid trixie
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
Check-Valid-Until: no"
updated=0
if [ "$(cat "$src" 2>/dev/null)" != "$want_src" ]; then
  log "adding apt sources (bookworm-backports; deb-src for the CRIU tarball)"
  echo "$want_src" > "$src"
  apt-get update -q >/dev/null; updated=1
fi

pkgs="busybox-static nasm nftables iproute2 ca-certificates curl xz-utils python3"
criu_build_deps="build-essential pkg-config python3 libprotobuf-c-dev protobuf-c-compiler protobuf-compiler
python3-protobuf libprotobuf-dev libnl-3-dev libcap-dev libnet1-dev libbsd-dev libgnutls28-dev
libnftables-dev libaio-dev uuid-dev"
missing=""
for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if ! command -v qemu-system-x86_64 >/dev/null; then missing="$missing qemu"; fi
if [ -n "$missing" ]; then
  [ $updated = 1 ] || { apt-get update -q >/dev/null; updated=1; }
  log "installing:$missing"
  apt-get install -y -q --no-install-recommends $pkgs >/dev/null
  if ! command -v qemu-system-x86_64 >/dev/null; then
    log "installing QEMU 10.0 from bookworm-backports"
    apt-get install -y -q --no-install-recommends -t bookworm-backports \
      qemu-system-x86 qemu-utils seabios ipxe-qemu >/dev/null \
    || apt-get install -y -q --no-install-recommends qemu-system-x86 qemu-utils seabios >/dev/null
  fi
fi

# The stock Incus client (issue 7: `incus` drives ferryd), 6.0.4 from backports.
# (The version is read into a variable: `incus version | grep -q` under
# pipefail fails when grep exits early and incus gets SIGPIPE.)
incus_version=$(command -v incus >/dev/null && incus version 2>/dev/null || true)
if ! printf '%s\n' "$incus_version" | grep -q '^Client version: 6.0.4$'; then
  [ $updated = 1 ] || { apt-get update -q >/dev/null; updated=1; }
  log "installing incus-client 6.0.4 from bookworm-backports"
  apt-get install -y -q --no-install-recommends -t bookworm-backports incus-client >/dev/null
fi

criu_ok() { local v; v=$(command -v criu >/dev/null && criu --version 2>/dev/null || true); [[ "$v" == *"Version: $CRIU_VERSION"* ]]; }
if ! criu_ok; then
  [ $updated = 1 ] || { apt-get update -q >/dev/null; updated=1; }
  log "building CRIU $CRIU_VERSION from Debian's source tarball (about 2 minutes)"
  apt-get install -y -q --no-install-recommends $criu_build_deps >/dev/null
  work=/var/cache/ferry/criu-build; mkdir -p "$work"; cd "$work"
  tarball=$(ls criu_${CRIU_VERSION}.orig.tar.* 2>/dev/null | head -1 || true)
  if [ -z "$tarball" ]; then
    apt-get source --tar-only --download-only "criu=${CRIU_VERSION}-1" >/dev/null 2>&1 || true
    tarball=$(ls criu_${CRIU_VERSION}.orig.tar.* 2>/dev/null | head -1 || true)
  fi
  [ -n "$tarball" ] || { log "could not download the criu $CRIU_VERSION tarball"; exit 1; }
  rm -rf "criu-$CRIU_VERSION"; tar xf "$tarball"
  make -C "criu-$CRIU_VERSION" -j"$(nproc)" criu >build.log 2>&1 || { tail -30 build.log; exit 1; }
  install -m 0755 "criu-$CRIU_VERSION/criu/criu" /usr/local/sbin/criu
  hash -r
  criu_ok || { log "criu build did not produce $CRIU_VERSION"; exit 1; }
fi
# Debian main's QEMU 7.2, unpacked beside the system's 10.0 (not installed), so
# tests and mixed-version members can run it with FERRY_QEMU=$QEMU72.
QEMU72=/opt/ferry/qemu-7.2/usr/bin/qemu-system-x86_64
if [ ! -x "$QEMU72" ]; then
  [ $updated = 1 ] || { apt-get update -q >/dev/null; updated=1; }
  v72=$(apt-cache madison qemu-system-x86 | awk '$3 ~ /^1:7\.2/ {print $3; exit}')
  if [ -n "$v72" ]; then
    log "unpacking QEMU $v72 into /opt/ferry/qemu-7.2"
    tmp=$(mktemp -d); (cd "$tmp" && apt-get download -q "qemu-system-x86=$v72" >/dev/null 2>&1) || true
    if ls "$tmp"/qemu-system-x86_*.deb >/dev/null 2>&1; then
      rm -rf /opt/ferry/qemu-7.2; mkdir -p /opt/ferry/qemu-7.2/usr/lib
      dpkg -x "$tmp"/qemu-system-x86_*.deb /opt/ferry/qemu-7.2
      # QEMU looks for firmware relative to its binary: point it at the system's.
      ln -sfn /usr/share/qemu /opt/ferry/qemu-7.2/usr/share/qemu
      ln -sfn /usr/share/seabios /opt/ferry/qemu-7.2/usr/share/seabios
      ln -sfn /usr/lib/ipxe /opt/ferry/qemu-7.2/usr/lib/ipxe
    fi
    rm -rf "$tmp"
  fi
  "$QEMU72" --version >/dev/null 2>&1 || log "note: QEMU 7.2 is not available; the QEMU 7.2 test will be skipped"
fi
mkdir -p /etc/criu
grep -qs '^network-lock nftables' /etc/criu/default.conf || echo 'network-lock nftables' >> /etc/criu/default.conf
# lazy-pages (post-copy) needs big pipes
[ "$(cat /proc/sys/fs/pipe-max-size)" -ge 4194304 ] || echo 4194304 > /proc/sys/fs/pipe-max-size || true
log "ok: $(qemu-system-x86_64 --version | head -1); criu $(criu --version | head -1)"
