#!/usr/bin/env bash
# Builds the vmlot test guest: OUT_DIR/initrd.cpio.gz (busybox + guest/init
# + the virtio-blk modules, cpio newc, gzip) and OUT_DIR/vmlinuz (copied
# from .tools/kernel, which
# scripts/deps.sh unpacks).  Usage: scripts/build-guest.sh [OUT_DIR]
# Default OUT_DIR is .tools/guest in the repo.  Rebuilds only when an input
# changed; the initramfs is reproducible (fixed mtimes/owners, gzip -n).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.tools/guest}
busybox=${BUSYBOX:-/bin/busybox}
init=$root/guest/init

die() { echo "build-guest: $*" >&2; exit 1; }

# The kernel version differs between machines: take the newest unpacked one.
kernel=$(compgen -G "$root/.tools/kernel/boot/vmlinuz-*" | sort -V | tail -1 || true)
[ -n "$kernel" ] || die "no kernel at $root/.tools/kernel/boot/vmlinuz-* (run scripts/deps.sh)"
[ -x "$busybox" ] || die "no static busybox at $busybox (apt-get install busybox-static)"
[ -f "$init" ] || die "missing $init"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
# A dynamic busybox would need its libraries in the initramfs.
if command -v file >/dev/null && ! file -L "$busybox" | grep -q "statically linked"; then
  die "$busybox is not statically linked"
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
stamp_file=$out/.inputs.sha256
stamp=$(cat "$0" "$root/scripts/modules.sh" "$init" "$busybox" "$kernel" | sha256sum | cut -d' ' -f1)
if [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/vmlinuz" ] &&
   [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  echo "build-guest: up to date in $out"
  exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs"/{bin,proc,sys,dev,mem,tmp}
cp "$busybox" "$stage/rootfs/bin/busybox"
# /dev/console comes from the kernel's built-in initramfs, so the cpio needs
# no device nodes (and building needs no root).
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$stage/rootfs/bin/$applet"
done
install -m 0755 "$init" "$stage/rootfs/init"
# The disk driver (modules in Debian's kernel), loaded by init only when a
# job asks the guest to write to its disk (vmlot.answer).
rootfs=$stage/rootfs
moddir=$(compgen -G "$root/.tools/kernel/lib/modules/*" | sort -V | tail -1)
[ -n "$moddir" ] || die "no modules at $root/.tools/kernel/lib/modules (run scripts/deps.sh)"
mkdir -p "$rootfs/lib/modules"
: > "$rootfs/lib/modules/load.list"
# shellcheck source=scripts/modules.sh
source "$root/scripts/modules.sh"
for m in virtio_pci virtio_blk; do add_module "$m"; done

cpio_dir "$stage/rootfs" 9 > "$stage/initrd.cpio.gz"

# Replace outputs atomically so a concurrent QEMU never reads a half file.
mv -f "$stage/initrd.cpio.gz" "$out/initrd.cpio.gz"
cp -f "$kernel" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" > "$stamp_file"
echo "build-guest: built $out/initrd.cpio.gz ($(stat -c %s "$out/initrd.cpio.gz") bytes)," \
  "vmlinuz from $(basename "$kernel")"
