#!/usr/bin/env bash
# Builds OS Farm's boot kit: OUT_DIR/vmlinuz (Debian's kernel, from
# .tools/kernel, which scripts/deps.sh unpacks) and OUT_DIR/initrd.cpio.gz
# (busybox, the virtio and ext4 modules, and an init that mounts the
# image's disk, vmlot.root=, and hands the machine to its /sbin/vmlot-init).
# Every image the farm builds boots with this kit.
# Usage: scripts/build-farm-boot.sh [OUT_DIR] (default .tools/farm-boot).
# Rebuilds only when an input changed; the initramfs is reproducible.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/.tools/farm-boot}
busybox=${BUSYBOX:-/bin/busybox}

die() { echo "build-farm-boot: $*" >&2; exit 1; }

kernel=$(compgen -G "$root/.tools/kernel/boot/vmlinuz-*" | sort -V | tail -1 || true)
[ -n "$kernel" ] || die "no kernel at $root/.tools/kernel/boot/vmlinuz-* (run scripts/deps.sh)"
[ -x "$busybox" ] || die "no static busybox at $busybox (apt-get install busybox-static)"
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"

mkdir -p "$out"
out=$(cd "$out" && pwd)
stamp_file=$out/.inputs.sha256
stamp=$(cat "$0" "$root/scripts/modules.sh" "$busybox" "$kernel" | sha256sum | cut -d' ' -f1)
if [ -f "$out/initrd.cpio.gz" ] && [ -f "$out/vmlinuz" ] &&
   [ "$(cat "$stamp_file" 2>/dev/null)" = "$stamp" ]; then
  echo "build-farm-boot: up to date in $out"
  exit 0
fi

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
rootfs=$stage/rootfs
mkdir -p "$rootfs"/{bin,proc,sys,dev,newroot,lib/modules}
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
done
cat > "$rootfs/init" <<'INIT'
#!/bin/busybox sh
# OS Farm's initrd: mount the image's disk and hand over to its init.
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
while read -r m; do insmod "/lib/modules/$m" 2>/dev/null; done < /lib/modules/load.list
root=/dev/vda
for arg in $(cat /proc/cmdline); do
  case "$arg" in vmlot.root=*) root=${arg#vmlot.root=} ;; esac
done
i=0
while [ ! -b "$root" ] && [ "$i" -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
if ! mount -t ext4 "$root" /newroot; then
  echo "vmlot-boot: cannot mount $root"
  echo o > /proc/sysrq-trigger
  sleep 60
fi
umount /proc /sys
mount --move /dev /newroot/dev 2>/dev/null || umount /dev
exec switch_root /newroot /sbin/vmlot-init
INIT
chmod 0755 "$rootfs/init"
moddir=$(compgen -G "$root/.tools/kernel/lib/modules/*" | sort -V | tail -1)
[ -n "$moddir" ] || die "no modules at $root/.tools/kernel/lib/modules (run scripts/deps.sh)"
: > "$rootfs/lib/modules/load.list"
# shellcheck source=scripts/modules.sh
source "$root/scripts/modules.sh"
# ext4 asks the crypto API for crc32c at mount: a soft dependency modinfo does not list.
for m in virtio_pci virtio_blk crc32c_generic ext4; do add_module "$m"; done

cpio_dir "$rootfs" 9 > "$stage/initrd.cpio.gz"
mv -f "$stage/initrd.cpio.gz" "$out/initrd.cpio.gz"
cp -f "$kernel" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
echo "$stamp" > "$stamp_file"
echo "build-farm-boot: built $out/initrd.cpio.gz ($(stat -c %s "$out/initrd.cpio.gz") bytes)," \
  "vmlinuz from $(basename "$kernel")"
