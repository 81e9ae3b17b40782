#!/usr/bin/env bash
# Nested Xen test host for vmlot: Xen 4.17 (Debian bookworm) under QEMU TCG,
# with a busybox dom0 that runs vmlot-provider --hypervisors xen.
#
#   scripts/xen-host.sh build      (make xen-host) assemble .tools/xen/:
#       xen                 Xen's 32-bit multiboot ELF (QEMU -kernel loads it)
#       vmlinuz             the Debian kernel, dom0 (and PV guest) kernel
#       dom0.cpio.gz        dom0 initramfs: busybox, xl & co. with their
#                           libraries, hotplug scripts, modules, xen/dom0-init
#                           as /init, a stripped vmlot-provider
#       dom0-selftest.cpio.gz  the same + the test guest (.tools/guest) and
#                           xen/selftest, for --mode selftest
#       debs/               the Debian packages (cached: rebuilds are offline)
#     Idempotent: rebuilds only when an input changed (stamp .tools/xen/.inputs.sha256).
#     It first builds the release package set (`cargo build -p vmlot-broker
#     -p vmlot-provider -p vmlot-client`: the release binaries' features, no
#     synthetic driver) in the dev profile, as scripts/check-release.sh does,
#     so it is a no-op after `make test`; strips the provider and fails with a
#     clear message if that fails;
#     VMLOT_PROVIDER_BIN=/path/to/vmlot-provider skips cargo and ships that
#     binary instead (e.g. one built from another checkout).
#
#   scripts/xen-host.sh boot --nats URL --name NAME --id UUID [--creds FILE] [--tls-ca FILE] [--price DEC]
#       [--min-price DEC]   (--price: per second of segment; --min-price: the
#                            least asked for any segment; provider defaults otherwise)
#       [--mode provider|shell|selftest] [--serial FILE] [--mem MiB]
#       [--dom0-mem MiB] [--smp N] [--slots N] [--debug] [--append "k=v ..."]
#       [--xen-append "..."]
#     exec's qemu-system-x86_64 (the caller's PID becomes QEMU's: SIGKILL of it
#     kills the whole host).  URL is as seen from dom0: nats://10.0.2.2:PORT
#     reaches the host's 127.0.0.1:PORT through QEMU's user-mode network
#     (nats-server must listen on 127.0.0.1 or 0.0.0.0).  No host ports are
#     opened, so any number of hosts can run at once.  Serial (Xen's com1, which
#     carries Xen's and dom0's console, hence the provider's log) goes to FILE,
#     or to stdio without --serial.  --mem is QEMU's RAM (default 3072), of which
#     dom0 gets --dom0-mem (default 1024); the rest is for guests.
#
#   scripts/xen-host.sh selftest [--serial FILE]
#     boots a host in selftest mode against a nats-server it starts on a free
#     port, waits for the host to power off, then checks the guest's step hashes
#     (before and after xl save/restore) against a recomputation here.
#
# Console markers (see xen/dom0-init): "vmlot-xen-host: ready ..." once Xen
# services and the network are up (7.5-19 s after QEMU starts under TCG),
# "vmlot-xen-host: provider started pid=N", "vmlot-xen-host: provider exited
# status=N" (then dom0 powers off and QEMU exits, unless --debug), and
# "vmlot-xen-host: FAILED ..." for a bring-up step that failed.
#
# Inside dom0 (what the Xen driver can rely on):
#   PATH=/usr/sbin:/usr/bin:/sbin:/bin:/usr/lib/xen-4.17/bin; xl is /usr/sbin/xl
#   (a symlink to /usr/lib/xen-4.17/bin/xl, no Debian wrapper); no
#   LD_LIBRARY_PATH is needed (libraries live in /usr/lib/x86_64-linux-gnu).
#   Guest consoles: /var/log/xen/console/guest-<domname>.log (xenconsoled
#   --log=guest).  Hotplug scripts: /etc/xen/scripts (bash is /bin/bash).
#   Work area: tmpfs /var/lib/vmlot (80 % of dom0 RAM) with cache/ and work/;
#   TMPDIR=/var/lib/vmlot/tmp.  VMLOT_LOG=info.  The provider also gets
#   --config /etc/vmlot-provider.toml (memory_mib = Xen's free memory - 64,
#   cache_bytes = a third of dom0 RAM).  Kernel for PV guests: the same Debian
#   kernel as dom0 (/usr/share/vmlot/guest/vmlinuz only in the selftest image).
#   Disks: xen-blkback + loop are loaded, so file-backed disks work
#   (disk = ["format=raw,vdev=xvda,access=rw,target=/path"] runs the bash block
#   hotplug script, which uses util-linux flock and losetup, copied from the host).
#
# Debugging:
#   - `--mode shell` (or --debug: a shell after the provider exits): a root shell
#     on the serial console.  Xen's own console: CTRL-a three times (then 'h').
#     Scripted, without --serial (console on stdio), fed from a fifo:
#       mkfifo /tmp/in; sleep 3600 > /tmp/in &   # keeps the fifo open
#       scripts/xen-host.sh boot --mode shell < /tmp/in > /tmp/out 2>&1 &
#       # wait for "shell on the console" in /tmp/out, then one line at a time,
#       # ~1 s apart (busybox line editing drops fast input), first "stty -echo":
#       echo 'xl list' > /tmp/in
#     `boot --mode selftest --append vmlot.mode=shell` gives the shell with the
#     test guest in /usr/share/vmlot/guest (the last vmlot.mode= wins).
#   - The serial log has CRLF line ends (Xen's console): strip \r before matching.
#   - Hotplug logs: /var/log/xen/xen-hotplug.log in dom0; `xl -vvv` for libxl.
#   - Nothing on the console at all: Xen did not start; check `-cpu` (max
#     without -smap crashes dom0) and that the kernel cmdline has no commas
#     (QEMU splits multiboot modules on commas).
#   - dom0 panics "VFS: Unable to mount root": the initramfs failed to unpack
#     (too little dom0 memory for it) - raise --dom0-mem.
#   - `xl` sometimes dies under TCG (SIGSEGV or glibc "robust mutex" abort):
#     retry it.  xl without libgcc_s.so.1 aborts after every command (the
#     build copies it).
#   - Restored guests computing wrong results: keep spec-ctrl=eager-fpu on
#     Xen's command line and -avx on the CPU (both set here).
#   - Timings (TCG, 2-core host; ranges: idle machine .. load average ~4):
#     QEMU start to "ready" 7.5-19 s (39 s with two hosts at once);
#     `xl create` of a 128 MiB PV guest 4.6-14 s; `xl save` 1.1-10 s, file
#     134,493,011 bytes (with one 16 MiB disk); `xl restore` 1.0-11 s (a disk
#     adds the bash block hotplug script, several seconds under TCG).
#   - Guest console logs are appended to across save/restore (same domain
#     name = same guest-<name>.log): track offsets or remove the file.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/.tools/xen
debs=$out/debs
busybox=${BUSYBOX:-/bin/busybox}
qemu=${QEMU:-qemu-system-x86_64}
xenver=4.17
pkgs=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
  libxenmisc4.17 libxenstore4 libxencall1 libxenevtchn1 libxenforeignmemory1
  libxengnttab1 libxentoollog1 libxenhypfs1 libxendevicemodel1 libxentoolcore1
  libyajl2)
# dom0 modules, in load order (dependencies are added before each).
modules=(xen-evtchn xen-privcmd xenfs xen-gntdev xen-gntalloc xen-blkback loop
  virtio_pci virtio_net e1000e)

die() { echo "xen-host: $*" >&2; exit 1; }
log() { echo "xen-host: $*" >&2; }

kernel_file() {
  local k
  k=$(compgen -G "$root/.tools/kernel/boot/vmlinuz-*" | sort -V | tail -1 || true)
  [ -n "$k" ] || die "no kernel at $root/.tools/kernel/boot/vmlinuz-* (run make deps)"
  echo "$k"
}

fetch_debs() {
  mkdir -p "$debs"
  local missing=() p
  for p in "${pkgs[@]}"; do
    compgen -G "$debs/${p}_*.deb" >/dev/null || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "downloading ${missing[*]}"
  # apt-get download runs as _apt when it can; let it write here.
  chmod 0777 "$debs" 2>/dev/null || true
  if ! (cd "$debs" && apt-get download "${missing[@]}" >/dev/null 2>&1); then
    log "apt-get download failed; running apt-get update once"
    apt-get update >/dev/null
    (cd "$debs" && apt-get download "${missing[@]}") || die "cannot download ${missing[*]}"
  fi
}

# Copies the host libraries ELF file $1 needs (ldd) into the staged rootfs.
copy_libs() {
  local f=$1 lib
  while read -r lib; do
    case "$lib" in
      "$stage"/*) continue ;; # one of ours (the Xen libs)
      /lib64/ld-linux-x86-64.so.2)
        [ -e "$rootfs/lib64/ld-linux-x86-64.so.2" ] || cp -L "$lib" "$rootfs/lib64/" ;;
      /*)
        [ -e "$rootfs/usr/lib/x86_64-linux-gnu/${lib##*/}" ] ||
          cp -L "$lib" "$rootfs/usr/lib/x86_64-linux-gnu/${lib##*/}" ;;
    esac
  done < <(LD_LIBRARY_PATH=$rootfs/usr/lib/x86_64-linux-gnu ldd "$f" 2>/dev/null |
    awk '/not found/ { print "MISSING:" $1; next } /=>/ { print $3; next } /^\t\// { print $1 }')
  if LD_LIBRARY_PATH=$rootfs/usr/lib/x86_64-linux-gnu ldd "$f" 2>/dev/null | grep -q 'not found'; then
    die "$f: libraries not found: $(LD_LIBRARY_PATH=$rootfs/usr/lib/x86_64-linux-gnu ldd "$f" | grep 'not found' | tr -s ' \t\n' ' ')"
  fi
}

# add_module NAME: the module and its dependencies into $rootfs/lib/modules.
# shellcheck source=scripts/modules.sh
source "$root/scripts/modules.sh"

build() {
  local kernel provider=${VMLOT_PROVIDER_BIN:-$root/target/xen-provider/vmlot-provider}
  kernel=$(kernel_file)
  [ -x "$busybox" ] || die "no static busybox at $busybox (apt-get install busybox-static)"
  file -L "$busybox" | grep -q "statically linked" || die "$busybox is not statically linked"
  command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
  [ -x /bin/bash ] || die "no /bin/bash (the hotplug scripts need it)"
  # Always (re)build the provider so the image never carries a stale one
  # (a no-op when it is fresh), unless VMLOT_PROVIDER_BIN names a binary.
  if [ -z "${VMLOT_PROVIDER_BIN:-}" ]; then
    log "cargo build -p vmlot-broker -p vmlot-provider -p vmlot-client"
    (cd "$root" && cargo build -p vmlot-broker -p vmlot-provider -p vmlot-client) ||
      die "cargo build -p vmlot-provider failed: fix the build (or set VMLOT_PROVIDER_BIN=/path/to/vmlot-provider), then rerun"
    mkdir -p "$(dirname "$provider")"
    strip -o "$provider.new" "$root/target/debug/vmlot-provider" && mv "$provider.new" "$provider"
  fi
  [ -x "$provider" ] || die "no provider binary at $provider"
  fetch_debs
  local guest_k=$root/.tools/guest/vmlinuz guest_i=$root/.tools/guest/initrd.cpio.gz
  mkdir -p "$out"
  local stamp
  stamp=$( {
    cat "$0" "$root/scripts/modules.sh" "$root/xen/dom0-init" "$root/xen/selftest" "$busybox" "$kernel" "$provider" /bin/bash
    ls "$debs"/*.deb | LC_ALL=C sort | xargs cat
    [ -f "$guest_k" ] && cat "$guest_k" "$guest_i"
    dpkg-query -W libc6 libtinfo6 libgcc-s1 libuuid1 zlib1g liblzma5 libzstd1 2>/dev/null
  } | sha256sum | cut -d' ' -f1)
  if [ -f "$out/dom0.cpio.gz" ] && [ -f "$out/xen" ] && [ -f "$out/vmlinuz" ] &&
    [ "$(cat "$out/.inputs.sha256" 2>/dev/null)" = "$stamp" ]; then
    log "up to date in $out"
    return 0
  fi

  stage=$(mktemp -d)
  trap 'rm -rf "$stage"' EXIT
  local x=$stage/x
  rootfs=$stage/rootfs
  mkdir -p "$x"
  for d in "$debs"/*.deb; do dpkg -x "$d" "$x"; done
  gzip -dc "$x/boot/xen-$xenver-amd64.gz" > "$stage/xen"

  mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,lib64,etc,proc,sys,dev,run,tmp,root,var/lib,var/log,usr/share/vmlot}
  ln -s usr/lib "$rootfs/lib"
  ln -s ../run "$rootfs/var/run"
  ln -s ../run/lock "$rootfs/var/lock"
  chmod 1777 "$rootfs/tmp"
  mkdir -p "$rootfs/lib/modules"

  # Busybox applets in /bin (bash stays the real one).
  cp "$busybox" "$rootfs/bin/busybox"
  for applet in $("$busybox" --list); do
    [ "$applet" = busybox ] || [ "$applet" = bash ] || ln -s busybox "$rootfs/bin/$applet"
  done
  cp /bin/bash "$rootfs/bin/bash"

  # Xen tools and libraries, laid out as Debian does; /usr/sbin points
  # straight at the binaries (no xen-utils-wrapper shell script per call).
  mkdir -p "$rootfs/usr/lib/xen-$xenver"
  cp -a "$x/usr/lib/xen-$xenver/bin" "$rootfs/usr/lib/xen-$xenver/"
  cp -a "$x/usr/lib/x86_64-linux-gnu/." "$rootfs/usr/lib/x86_64-linux-gnu/"
  cp -a "$x/usr/bin/." "$rootfs/usr/bin/"
  for b in "$rootfs/usr/bin"/*; do # Debian's wrapper symlinks: point at the binary
    [ -L "$b" ] && [ -x "$rootfs/usr/lib/xen-$xenver/bin/${b##*/}" ] &&
      ln -sf "../lib/xen-$xenver/bin/${b##*/}" "$b"
  done
  for b in "$rootfs/usr/lib/xen-$xenver/bin"/*; do
    ln -sf "../lib/xen-$xenver/bin/${b##*/}" "$rootfs/usr/sbin/${b##*/}"
  done
  cp -a "$x/usr/sbin/xenhypfs" "$rootfs/usr/sbin/" 2>/dev/null || true
  mkdir -p "$rootfs/etc/xen"
  cp -a "$x/etc/xen/scripts" "$x/etc/xen/xl.conf" "$rootfs/etc/xen/"
  # pygrub & co. are python: not shipped.
  rm -f "$rootfs/usr/lib/xen-$xenver/bin/pygrub" "$rootfs/usr/lib/xen-$xenver/bin/xenpvnetboot"
  rm -f "$rootfs/usr/sbin/pygrub" "$rootfs/usr/sbin/xenpvnetboot" "$rootfs/usr/bin/pygrub"

  # Release builds carry debuginfo (~90 MB): strip it, keep the symbols.
  if command -v strip >/dev/null; then
    strip --strip-debug -o "$rootfs/usr/bin/vmlot-provider" "$provider"
    chmod 0755 "$rootfs/usr/bin/vmlot-provider"
  else
    install -m 0755 "$provider" "$rootfs/usr/bin/vmlot-provider"
  fi
  # The block hotplug script needs flock (busybox-static has none) and parses
  # util-linux losetup's output: take both from the host (util-linux).
  local t p
  for t in flock losetup; do
    p=$(PATH=/usr/sbin:/usr/bin:/sbin:/bin command -v "$t") || die "$t not found on the host (util-linux)"
    cp -L "$p" "$rootfs/usr/sbin/$t"
  done

  # Host libraries of every dynamic ELF we ship.
  local f
  while read -r f; do
    file -b "$f" | grep -q 'dynamically linked' && copy_libs "$f"
  done < <(find "$rootfs/usr" "$rootfs/bin/bash" -type f)
  # glibc dlopens libgcc_s for pthread_cancel/backtraces: xl aborts without it.
  cp -L "$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ { print $NF; exit }')" \
    "$rootfs/usr/lib/x86_64-linux-gnu/libgcc_s.so.1"
  echo /usr/lib/x86_64-linux-gnu > "$rootfs/etc/ld.so.conf"
  ldconfig -r "$rootfs" 2>/dev/null || true

  # Kernel modules.
  moddir=$(compgen -G "$root/.tools/kernel/lib/modules/*" | sort -V | tail -1)
  [ -d "$moddir/kernel" ] || die "no modules in $root/.tools/kernel/lib/modules"
  : > "$rootfs/lib/modules/load.list"
  for m in "${modules[@]}"; do add_module "$m"; done

  cat > "$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
EOF
  echo "root:x:0:" > "$rootfs/etc/group"
  printf '127.0.0.1 localhost\n10.0.2.2 vmlot-host\n' > "$rootfs/etc/hosts"
  install -m 0755 "$root/xen/dom0-init" "$rootfs/init"
  install -m 0755 "$root/xen/selftest" "$rootfs/usr/share/vmlot/selftest"

  cpio_dir "$rootfs" > "$stage/dom0.cpio.gz"
  if [ -f "$guest_k" ] && [ -f "$guest_i" ]; then
    mkdir -p "$stage/st/usr/share/vmlot/guest"
    cp "$guest_k" "$guest_i" "$stage/st/usr/share/vmlot/guest/"
    # The kernel unpacks concatenated (separately compressed) cpio archives.
    { cat "$stage/dom0.cpio.gz"; cpio_dir "$stage/st"; } > "$stage/dom0-selftest.cpio.gz"
    mv -f "$stage/dom0-selftest.cpio.gz" "$out/dom0-selftest.cpio.gz"
  else
    log "no test guest in .tools/guest (make guest): --mode selftest unavailable"
    rm -f "$out/dom0-selftest.cpio.gz"
  fi
  # Replace outputs atomically so a running QEMU never reads a half file.
  mv -f "$stage/dom0.cpio.gz" "$out/dom0.cpio.gz"
  mv -f "$stage/xen" "$out/xen"
  cp -f "$kernel" "$out/vmlinuz.tmp" && mv -f "$out/vmlinuz.tmp" "$out/vmlinuz"
  echo "$stamp" > "$out/.inputs.sha256"
  log "built $out: dom0.cpio.gz $(stat -c %s "$out/dom0.cpio.gz") bytes, xen, vmlinuz ($(basename "$kernel"))"
}

# Prints the qemu command line (NUL-separated) for boot's options.
boot_args() {
  local nats="" name="" id="" price="" min_price="" mode=provider serial="" mem=3072 dom0_mem=1024 smp=2
  local slots="" debug=0 extra="" xen_extra="" creds="" tls_ca=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --nats) nats=$2; shift 2 ;;
      --creds) creds=$2; shift 2 ;;
      --tls-ca) tls_ca=$2; shift 2 ;;
      --name) name=$2; shift 2 ;;
      --id) id=$2; shift 2 ;;
      --price) price=$2; shift 2 ;;
      --min-price) min_price=$2; shift 2 ;;
      --mode) mode=$2; shift 2 ;;
      --serial) serial=$2; shift 2 ;;
      --mem) mem=$2; shift 2 ;;
      --dom0-mem) dom0_mem=$2; shift 2 ;;
      --smp) smp=$2; shift 2 ;;
      --slots) slots=$2; shift 2 ;;
      --debug) debug=1; shift ;;
      --append) extra=$2; shift 2 ;;
      --xen-append) xen_extra=$2; shift 2 ;;
      *) die "boot: unknown option $1" ;;
    esac
  done
  case "$mode" in
    provider) [ -n "$nats" ] && [ -n "$name" ] && [ -n "$id" ] ||
      die "boot: --nats, --name and --id are required in provider mode" ;;
    shell | selftest) ;;
    *) die "boot: --mode must be provider, shell or selftest" ;;
  esac
  [ "$dom0_mem" -lt "$mem" ] || die "boot: --dom0-mem must be less than --mem"
  local cpio=$out/dom0.cpio.gz
  [ "$mode" = selftest ] && cpio=$out/dom0-selftest.cpio.gz
  for f in "$out/xen" "$out/vmlinuz" "$cpio"; do
    [ -f "$f" ] || die "missing $f (run: make xen-host${mode:+; selftest also needs make guest})"
  done
  # QEMU splits multiboot modules (-initrd) on commas, and a module's command
  # line is space-separated: neither may appear in paths or values.
  local v
  for v in "$nats" "$name" "$id" "$price" "$min_price" "$slots" "$out" "$extra"; do
    case "$v" in *,*) die "boot: no commas allowed in '$v' (multiboot module list)" ;; esac
  done
  for v in "$nats" "$name" "$id" "$price" "$min_price" "$slots" "$out"; do
    case "$v" in *[[:space:]]*) die "boot: no spaces allowed in '$v'" ;; esac
  done
  # The provider's credentials (and the deployment's CA) reach dom0 as a
  # second cpio archive after the image's (the kernel unpacks both):
  # /etc/vmlot/provider.creds, /etc/vmlot/ca.pem.
  if [ -n "$creds" ]; then
    [ -f "$creds" ] || die "boot: no credentials file $creds"
    [ -z "$tls_ca" ] || [ -f "$tls_ca" ] || die "boot: no CA file $tls_ca"
    local stage initrd
    initrd=$(dirname "${serial:-/tmp/x}")/dom0-$name-$$.cpio.gz
    case "$initrd" in *,*) die "boot: no commas allowed in '$initrd'" ;; esac
    stage=$(mktemp -d)
    mkdir -p "$stage/etc/vmlot"
    install -m 600 "$creds" "$stage/etc/vmlot/provider.creds"
    [ -z "$tls_ca" ] || install -m 644 "$tls_ca" "$stage/etc/vmlot/ca.pem"
    { cat "$cpio"; (cd "$stage" && find . | cpio -o -H newc --quiet | gzip -1); } >"$initrd"
    rm -rf "$stage"
    cpio=$initrd
  fi
  local cmd="console=hvc0 rdinit=/init quiet vmlot.mode=$mode"
  [ -n "$nats" ] && cmd+=" vmlot.nats=$nats"
  [ -n "$name" ] && cmd+=" vmlot.name=$name"
  [ -n "$id" ] && cmd+=" vmlot.id=$id"
  [ -n "$price" ] && cmd+=" vmlot.price=$price"
  [ -n "$min_price" ] && cmd+=" vmlot.min_price=$min_price"
  [ -n "$slots" ] && cmd+=" vmlot.slots=$slots"
  [ "$debug" = 1 ] && cmd+=" vmlot.debug=1"
  [ -n "$extra" ] && cmd+=" $extra"
  local xen_cmd="console=com1 com1=115200,8n1 dom0_mem=${dom0_mem}M,max:${dom0_mem}M"
  xen_cmd+=" spec-ctrl=eager-fpu${xen_extra:+ $xen_extra}"
  local ser=stdio
  [ -n "$serial" ] && ser="file:$serial"
  printf '%s\0' "$qemu" -accel tcg -machine q35 -cpu max,-smap,-avx -smp "$smp" -m "$mem" \
    -nodefaults -display none -no-reboot -monitor none -serial "$ser" \
    -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    -kernel "$out/xen" -append "$xen_cmd" \
    -initrd "$out/vmlinuz $cmd,$cpio"
}

boot() {
  local args=()
  mapfile -d '' args < <(boot_args "$@")
  [ ${#args[@]} -gt 0 ] || exit 1
  exec "${args[@]}"
}

# Boots a selftest host against a nats-server on a free port, checks hashes.
selftest() {
  local serial="" nats_bin=$root/.tools/bin/nats-server
  while [ $# -gt 0 ]; do
    case "$1" in
      --serial) serial=$2; shift 2 ;;
      *) die "selftest: unknown option $1" ;;
    esac
  done
  [ -n "$serial" ] || serial=$(mktemp /tmp/xen-selftest.XXXXXX.log)
  local port nats_pid=""
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  if [ -x "$nats_bin" ]; then
    "$nats_bin" -a 127.0.0.1 -p "$port" >/dev/null 2>&1 &
    nats_pid=$!
  fi
  local t0=$SECONDS rc=0
  timeout 600 bash "$0" boot --mode selftest --serial "$serial" \
    --nats "nats://10.0.2.2:$port" || rc=$?
  [ -n "$nats_pid" ] && kill "$nats_pid" 2>/dev/null
  log "selftest host ran $((SECONDS - t0)) s (qemu rc=$rc), console in $serial"
  python3 - "$serial" <<'EOF'
import hashlib, re, sys
text = open(sys.argv[1], errors="replace").read().replace("\r", "")
for l in text.splitlines():
    if "vmlot-selftest:" in l or "vmlot-xen-host:" in l:
        print(l)
m = re.search(r"hashchain steps=(\d+) work_kib=(\d+) seed=(\S+)", text)
if not m:
    sys.exit("selftest: no hashchain header in the guest console")
steps, kib, h = int(m.group(1)), int(m.group(2)), m.group(3)
n = kib * 1024
got = re.findall(r"^step (\d+)/(\d+) ([0-9a-f]{64})$", text, re.M)
bad = 0
for i, (k, tot, hh) in enumerate(got, 1):
    h = hashlib.sha256(((h + "\n") * (n // (len(h) + 1) + 1))[:n].encode()).hexdigest()
    if int(k) != i or hh != h:
        print(f"selftest: step line {i} is 'step {k}/{tot} {hh}', expected 'step {i}/{steps} {h}'")
        bad += 1
        h = hh
ok = len(got) == steps and bad == 0 and "vmlot-guest: done" in text
print(f"selftest: {len(got)}/{steps} step lines, {bad} wrong -> {'PASS' if ok else 'FAIL'}")
sys.exit(0 if ok else 1)
EOF
}

case "${1:-}" in
  build) shift; build "$@" ;;
  boot) shift; boot "$@" ;;
  selftest) shift; selftest "$@" ;;
  *) die "usage: $0 build | boot --nats URL --name NAME --id UUID [options] | selftest [--serial FILE]" ;;
esac
