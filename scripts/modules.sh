# The initramfs helpers, sourced by scripts/build-guest.sh,
# scripts/build-nats-guest.sh and scripts/xen-host.sh.
# Expects: $moddir (an unpacked kernel's lib/modules/VERSION), $stage (a
# scratch directory), $rootfs (the image being built), die().
# Resolves module $1 (and its dependencies, first) into $rootfs/lib/modules,
# appending to load.list.
declare -A mod_done=()
add_module() {
  local name=$1 f dep deps
  [ -n "${mod_done[$name]:-}" ] && return 0
  mod_done[$name]=1
  f=$(find "$moddir/kernel" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \
    -o -name "${name//-/_}.ko" -o -name "${name//-/_}.ko.xz" -o -name "${name//-/_}.ko.zst" \) | head -1)
  [ -n "$f" ] || die "module $name not in $moddir"
  local tmp=$stage/mod-$name.ko
  case "$f" in
    *.xz) xz -dc "$f" > "$tmp" ;;
    *.zst) zstd -qdc "$f" > "$tmp" ;;
    *) cp "$f" "$tmp" ;;
  esac
  deps=$(tr '\0' '\n' < "$tmp" | sed -n 's/^depends=//p' | head -1)
  for dep in ${deps//,/ }; do add_module "$dep"; done
  local base=${f##*/}
  base=${base%.xz}
  base=${base%.zst}
  mv "$tmp" "$rootfs/lib/modules/$base"
  echo "$base" >> "$rootfs/lib/modules/load.list"
}

# cpio_dir DIR [GZIP_LEVEL] > archive.gz: DIR as a reproducible initramfs
# (fixed mtimes and owners, sorted names, cpio newc, gzip -n; level 6
# unless given).
cpio_dir() {
  (
    cd "$1"
    find . -exec touch -h -d @0 {} +
    find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible
  ) | gzip "-${2:-6}n"
}
