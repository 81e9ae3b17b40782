#!/usr/bin/env bash
# make bench-xen: the transfer of real `xl save` files between segments.
#
# Runs the market on this machine with one nested Xen host (scripts/xen-host.sh)
# and the test guest in memwriter mode (new random data into RAM at a steady
# rate) as a PV domain, for a few short segments on that one host: each
# segment restores the previous save and saves again, so consecutive
# checkpoints are two saves of the same domain SEGMENT seconds of guest time
# apart. Pulls the machine state of the last three segments from the store
# and runs `vmlot-bench xen-save` on two consecutive pairs: fixed 4 KiB, FastCDC and the
# Xen record chunker against rsync and raw SHA-1 over the same bytes. Also
# prints what the provider really sent per segment (its result's sent_bytes).
#
# Usage: scripts/bench-xen.sh [SEGMENT_SECONDS] [SEGMENTS]  (defaults 5 and 11)
# Files go to .tools/bench/xen/; everything started is stopped on exit.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
segment_seconds=${1:-5}
segments=${2:-11}
out=$root/.tools/bench/xen
bin=$root/target/release
vmlot=$bin/vmlot
bench=$root/target/bench-build/vmlot-bench
guest=$root/.tools/guest
for f in "$vmlot" "$bin/vmlot-broker" "$bench" "$guest/vmlinuz" "$guest/initrd.cpio.gz" .tools/xen/dom0.cpio.gz; do
  [ -e "$f" ] || { echo "bench-xen: $f is missing: run 'make bench-xen'" >&2; exit 1; }
done

rm -rf "$out"
mkdir -p "$out/nats-store"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
# Authentication on, as in any market: a deployment, then credentials for
# the broker, the nested host's provider, an operator and a submitter.
"$vmlot" admin init --dir "$out/deploy" > /dev/null
provider_id=$(cat /proc/sys/kernel/random/uuid)
provider_creds=$("$vmlot" admin add provider "$provider_id" --dir "$out/deploy")
operator_creds=$("$vmlot" admin add operator house --dir "$out/deploy")
submitter_creds=$("$vmlot" admin add submitter default --dir "$out/deploy")
cat > "$out/nats.conf" <<CONF
listen: 127.0.0.1:$port
max_payload: 8MB
jetstream { store_dir: "$out/nats-store", sync_interval: always }
CONF
cat "$out/deploy/auth.conf" >> "$out/nats.conf"
.tools/bin/nats-server -c "$out/nats.conf" 2> "$out/nats.log" &
pids+=($!)
export VMLOT_NATS=nats://127.0.0.1:$port
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done
export VMLOT_CREDS=$operator_creds
export VMLOT_TLS_CA=$out/deploy/tls/ca.pem
"$bin/vmlot-broker" --creds "$out/deploy/creds/broker-broker.creds" --books-creds "$out/deploy/creds/broker-books.creds" --bid-window-ms 500 --transfer-allowance-s 120 > "$out/broker.log" 2>&1 &
pids+=($!)

bash scripts/xen-host.sh boot --nats "nats://10.0.2.2:$port" --name xb1 \
  --id "$provider_id" --creds "$provider_creds" --tls-ca "$VMLOT_TLS_CA" --price 0 --min-price 0.1 --serial "$out/xb1.serial" \
  > "$out/xb1.qemu.log" 2>&1 &
pids+=($!)
echo "bench-xen: waiting for the nested Xen host to join (10-60 s)"
for _ in $(seq 300); do
  "$vmlot" --json providers 2>/dev/null | grep -q '"xb1"' && break
  sleep 1
done
"$vmlot" --json providers | grep -q '"xb1"' || { echo "bench-xen: the Xen host never joined; see $out/xb1.serial" >&2; exit 1; }

"$vmlot" admin credit default 100 > /dev/null
"$vmlot" image push --hypervisor xen --kernel "$guest/vmlinuz" --initrd "$guest/initrd.cpio.gz" \
  --memory 128 --cmdline "console=hvc0 quiet loglevel=1 vmlot.mode=memwriter vmlot.rate_kib=256 vmlot.ring_mib=32" \
  -o "$out/image.json" > /dev/null
job=$(VMLOT_CREDS=$submitter_creds "$vmlot" --json submit --image "$out/image.json" --segment-seconds "$segment_seconds" \
  --segments "$segments" --check none --reserve 1 --budget 10 | python3 -c 'import json,sys; print(json.load(sys.stdin)["job"])')
echo "bench-xen: job $job, $segments segments of $segment_seconds s"
"$vmlot" watch "$job" > "$out/watch.log" 2>&1 || { echo "bench-xen: the job did not finish; see $out/" >&2; exit 1; }
"$vmlot" --json status "$job" > "$out/status.json"
"$vmlot" status "$job"

# The machine states of the last three segments, as the store holds them.
read -r s1 s2 s3 < <(python3 - "$out/status.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
states = [seg["guest"]["checkpoint"]["machine_state"] for seg in s["settled"] if seg["guest"]["state"] == "running"]
print(*states[-3:])
PY
)
for n in 1 2 3; do
  id=$(eval echo "\$s$n")
  "$vmlot" store pull "$id" -o "$out/save-$n" > /dev/null
done
python3 - "$out/status.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
for seg in s["settled"]:
    t = seg["timings"]
    print(f"segment {seg['segment']}: provider sent {seg['sent_bytes']} B, fetched {seg['fetched_bytes']} B; "
          f"start {t['start_ms']} ms, save {t['save_ms']} ms, upload {t['upload_ms']} ms")
PY
# Each segment's domain has a fresh name, vmlot-<pid>-<n>-<8 hex> with n
# counting the provider's segments, and the name is in the save file's
# header: with 11 segments the last pair's names differ in length (n = 9,
# then 10), shifting everything after the header by one byte; the pair
# before has names of one length.
echo "== pair A: segments $((segments - 3)) -> $((segments - 2)) (domain names of equal length)"
"$bench" xen-save --old "$out/save-1" --new "$out/save-2"
echo "== pair B: segments $((segments - 2)) -> $((segments - 1)) (the name one character longer)"
"$bench" xen-save --old "$out/save-2" --new "$out/save-3"
