#!/usr/bin/env bash
# Builds the NATS guest of the power-cut test (issue 16 step 4,
# tests/tests/powercut.rs): OUT_DIR/initrd.cpio.gz (busybox + the static
# nats-server + guest/nats-init + the modules for virtio-net, virtio-blk
# and ext4, cpio newc, gzip) and OUT_DIR/vmlinuz (copied from .tools/kernel,
# which scripts/deps.sh unpacks).  The guest mounts its first virtio disk
# (ext4, made and filled on the host by the test harness, never formatted
# in the guest) and runs nats-server with its JetStream store there.
# Usage: scripts/build-nats-guest.sh [OUT_DIR]
# Default OUT_DIR is .tools/nats-guest in the repo.  nats-server is
# $VMLOT_NATS_SERVER, .tools/bin/nats-server or the one on PATH (as the
# tests find it).  Rebuilds only when an input changed; the initramfs is
# reproducible (fixed mtimes/owners, gzip -n).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.tools/nats-guest}
busybox=${BUSYBOX:-/bin/busybox}
init=$root/guest/nats-init

die() { echo "build-nats-guest: $*" >&2; exit 1; }

kernel=$(compgen -G "$root/.tools/kernel/boot/vmlinuz-*" | sort -V | tail -1 || true)
[ -n "$kernel" ] || die "no kernel at $root/.tools/kernel/boot/vmlinuz-* (run make deps)"
[ -x "$busybox" ] || die "no static busybox at $busybox (apt-get install busybox-static)"
[ -f "$init" ] || die "missing $init"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
nats=${VMLOT_NATS_SERVER:-}
if [ -z "$nats" ]; then
  if [ -e "$root/.tools/bin/nats-server" ]; then
    nats=$root/.tools/bin/nats-server
  else
    nats=$(command -v nats-server || true)
  fi
fi
[ -n "$nats" ] && [ -x "$nats" ] || die "nats-server not found (run make deps)"
# The initramfs has no C library: both binaries must be static.
if command -v file >/dev/null; then
  for bin in "$busybox" "$nats"; do
    file -L "$bin" | grep -q "statically linked" || die "$bin is not statically linked"
  done
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
stamp_file=$out/.inputs.sha256
stamp=$(cat "$0" "$root/scripts/modules.sh" "$init" "$busybox" "$nats" "$kernel" | sha256sum | cut -d' ' -f1)
if [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/vmlinuz" ] &&
   [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  echo "build-nats-guest: up to date in $out"
  exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rootfs=$stage/rootfs
mkdir -p "$rootfs"/{bin,proc,sys,dev,etc,mnt,tmp,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
cp -L "$nats" "$rootfs/bin/nats-server"
chmod 0755 "$rootfs/bin/nats-server"
install -m 0755 "$init" "$rootfs/init"

# Modules (Debian builds these as modules): the NIC, the disk, the file
# system.  ext4 asks the crypto API for crc32c at mount time, which would
# need modprobe: load crc32c_generic up front instead.
moddir=$(compgen -G "$root/.tools/kernel/lib/modules/*" | sort -V | tail -1)
[ -n "$moddir" ] || die "no modules at $root/.tools/kernel/lib/modules (run make deps)"
: > "$rootfs/lib/modules/load.list"
# shellcheck source=scripts/modules.sh
source "$root/scripts/modules.sh"
for m in virtio_pci virtio_net virtio_blk crc32c_generic crc16 ext4; do add_module "$m"; done

cpio_dir "$rootfs" > "$stage/initrd.cpio.gz"

# Replace outputs atomically so a running QEMU never reads a half file.
mv -f "$stage/initrd.cpio.gz" "$out/initrd.cpio.gz"
cp -f "$kernel" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" > "$stamp_file"
echo "build-nats-guest: built $out/initrd.cpio.gz ($(stat -c %s "$out/initrd.cpio.gz") bytes)," \
  "vmlinuz from $(basename "$kernel"), nats-server $("$nats" --version 2>/dev/null || echo '?')"
