#!/usr/bin/env bash
# make demo: the whole market on this machine running a real VM to its end.
#
# A real nats-server (fsync on every write), the broker, and three QEMU
# providers that join one after another, each cheaper than the last, so the
# test guest (a hash chain that powers off when done) migrates across all
# three, segment by segment. Prints the console tail, the per-segment table,
# the ledger, and checks that the console joined from the segments equals a
# direct QEMU run of the same guest. Everything lives in .demo/ and is
# stopped on exit; running it twice in a row is fine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
demo=$root/.demo
bin=$root/target/release
vmlot=$bin/vmlot
guest=$root/.tools/guest
# ~9 s of boot and ~25 s of hashing under TCG: 7–8 segments of 5 s.
cmdline="console=ttyS0 quiet loglevel=1 panic=-1 vmlot.steps=60 vmlot.work_kib=2048"
segment_seconds=5

for f in "$bin/vmlot" "$bin/vmlot-broker" "$bin/vmlot-provider" "$guest/vmlinuz" "$guest/initrd.cpio.gz"; do
  [ -e "$f" ] || { echo "demo: $f is missing: run 'make demo' (it builds everything first)" >&2; exit 1; }
done
command -v qemu-system-x86_64 >/dev/null || { echo "demo: qemu-system-x86_64 missing: run 'make deps'" >&2; exit 1; }

# A previous run that was killed hard may have left processes behind.
stop_leftovers() {
  local pids
  pids=$(pgrep -f -- "$demo/" || true)
  [ -z "$pids" ] || kill $pids 2>/dev/null || true
}
stop_leftovers
# The last run's files (tens of thousands of cached blocks) are removed in
# the background, at low priority, so this run need not wait for it.
if [ -e "$demo" ]; then
  mv "$demo" "$demo.old.$$"
fi
for old in "$demo".old.*; do
  if [ -e "$old" ]; then
    (nice -n 19 rm -rf "$old" > /dev/null 2>&1 &)
  fi
done
mkdir -p "$demo/nats-store" "$demo/pids"

cleanup() {
  # Providers first (SIGTERM: each stops its running QEMU), then the broker, then NATS.
  for f in "$demo/pids/joins.pid" "$demo"/pids/provider-*.pid "$demo/pids/broker.pid" \
    "$demo/pids/reference.pid" "$demo/pids/nats.pid"; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  wait 2>/dev/null || true
  stop_leftovers
}
trap cleanup EXIT

# Who is who: a deployment (operator, accounts, signing keys, a CA and the
# server's TLS certificate) whose auth.conf the server includes; credentials for the broker (made by init),
# an operator, a submitter and each provider. Nobody connects without them.
echo "== vmlot admin init: the server checks every participant's credentials, over TLS"
"$vmlot" admin init --dir "$demo/deploy" | sed 's/^/   /'
operator_creds=$("$vmlot" admin add operator house --dir "$demo/deploy")
submitter_creds=$("$vmlot" admin add submitter default --dir "$demo/deploy")
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$demo/nats.conf" <<CONF
listen: 127.0.0.1:$port
max_payload: 8MB
jetstream { store_dir: "$demo/nats-store", sync_interval: always }
CONF
cat "$demo/deploy/auth.conf" >> "$demo/nats.conf"
.tools/bin/nats-server -c "$demo/nats.conf" 2> "$demo/nats.log" &
echo $! > "$demo/pids/nats.pid"
export VMLOT_NATS=nats://127.0.0.1:$port
# Every connection is TLS, checked against the deployment's own CA.
export VMLOT_TLS_CA=$demo/deploy/tls/ca.pem
for _ in $(seq 100); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

# The reference: the same guest booted once by QEMU itself, run to its
# power-off, in the background while the market runs.
(
  exec timeout 600 qemu-system-x86_64 -accel tcg -machine q35 -m 128 -smp 1 -nodefaults \
    -no-user-config -display none -no-reboot -serial "file:$demo/reference.console" \
    -kernel "$guest/vmlinuz" -initrd "$guest/initrd.cpio.gz" -append "$cmdline"
) > "$demo/reference.log" 2>&1 &
echo $! > "$demo/pids/reference.pid"

# The CLI runs as the operator unless told otherwise (the submission runs
# as the submitter, whose account pays).
export VMLOT_CREDS=$operator_creds
"$bin/vmlot-broker" --creds "$demo/deploy/creds/broker-broker.creds" --books-creds "$demo/deploy/creds/broker-books.creds" --bid-window-ms 500 --transfer-allowance-s 30 --fee-rate 0.05 > "$demo/broker.log" 2>&1 &
echo $! > "$demo/pids/broker.pid"

# provider NAME PRICE: a QEMU provider asking PRICE per segment (nothing per
# second, no discount for blocks it already holds: price alone decides).
provider() {
  local name=$1 price=$2
  cat > "$demo/$name.toml" <<TOML
name = "$name"
hypervisors = ["qemu"]
slots = 1
memory_mib = 1024
price_per_second = "0"
min_price = "$price"
hot_discount = "0"
cache_dir = "$demo/$name/cache"
work_dir = "$demo/$name/work"
qemu_accel = "auto"
TOML
  local creds
  creds=$("$vmlot" admin add provider --dir "$demo/deploy")
  "$bin/vmlot-provider" --config "$demo/$name.toml" --creds "$creds" > "$demo/$name.log" 2>&1 &
  echo $! > "$demo/pids/provider-$name.pid"
  echo "demo: provider $name joins, asking $price CRD a segment"
}

# Waits until segment $2 of job $1 is awarded (or past).
wait_awarded() {
  local job=$1 segment=$2
  for _ in $(seq 600); do
    if $vmlot --json status "$job" 2>/dev/null | python3 -c '
import json, sys
s = json.load(sys.stdin)
lot = s.get("open_lot") or {}
k = int(sys.argv[1])
ok = lot.get("lot", {}).get("segment") == k and lot.get("awarded")
sys.exit(0 if ok or len(s["settled"]) > k or s["state"] != "running" else 1)' "$segment" 2>/dev/null; then
      return 0
    fi
    sleep 0.3
  done
  return 1
}

provider demo-a 0.30
# Until the broker answers and has heard from the provider.
for _ in $(seq 150); do
  $vmlot --json providers 2>/dev/null | python3 -c 'import json,sys; sys.exit(len(json.load(sys.stdin)) < 1)' 2>/dev/null && break
  sleep 0.2
done

echo
echo "== push the test guest (Debian kernel + busybox initramfs) as an image"
$vmlot image push --kernel "$guest/vmlinuz" --initrd "$guest/initrd.cpio.gz" \
  --memory 128 --cmdline "$cmdline" -o "$demo/image.json"
python3 -c 'import json,sys; i=json.load(open(sys.argv[1])); print("kernel", i["kernel"]); print("initrd", i["initrd"])' "$demo/image.json"

echo
echo "== the operator funds the submitter's account (vmlot admin credit default 20)"
$vmlot admin credit default 20 --memo "demo funds"

echo
echo "== submit: ${segment_seconds} s segments until the guest powers off"
job=$(VMLOT_CREDS=$submitter_creds $vmlot --json submit --image "$demo/image.json" --segment-seconds "$segment_seconds" \
  --until-halt --redundancy 1 --reserve 1 --budget 10 | python3 -c 'import json,sys; print(json.load(sys.stdin)["job"])')
echo "job $job"

# Cheaper providers join while the job runs: demo-b during segment 0 wins
# segment 1, demo-c during segment 1 wins segment 2 (and most after it).
(
  wait_awarded "$job" 0 && provider demo-b 0.20
  wait_awarded "$job" 1 && provider demo-c 0.10
) &
echo $! > "$demo/pids/joins.pid"

echo
$vmlot watch "$job"
wait "$(cat "$demo/pids/joins.pid")" || true
rm -f "$demo/pids/joins.pid"

echo
echo "== console tail (vmlot logs $job | tail)"
$vmlot logs "$job" > "$demo/market.console"
tail -n 5 "$demo/market.console"

echo
echo "== segments (vmlot status $job)"
$vmlot status "$job"

echo
echo "== the job's books (vmlot ledger --job $job): budget held, segments paid from escrow (5 % fee), the rest refunded"
for _ in $(seq 100); do
  $vmlot --json status "$job" | python3 -c 'import json,sys; sys.exit(not json.load(sys.stdin)["refunded"])' && break
  sleep 0.2
done
$vmlot ledger --job "$job"

month=$(date -u +%Y-%m)
for name in demo-a demo-b demo-c; do
  echo
  echo "== statement of provider $name (vmlot statement provider:$name --period $month)"
  $vmlot statement "provider:$name" --period "$month"
done
echo
echo "== statement of the submitter (vmlot statement default --period $month)"
$vmlot statement default --period "$month"

echo
echo "== balances (vmlot balance)"
$vmlot balance

echo
echo "== reconciliation (vmlot ledger verify)"
$vmlot ledger verify

echo
echo "== the same guest run once, directly by QEMU"
wait "$(cat "$demo/pids/reference.pid")" || { echo "demo: the direct QEMU run failed" >&2; exit 1; }
rm -f "$demo/pids/reference.pid"
echo "direct run: $(wc -c < "$demo/reference.console") bytes of console"
if cmp -s "$demo/market.console" "$demo/reference.console"; then
  echo "console: identical ($(wc -c < "$demo/market.console") bytes, sha1 $(sha1sum < "$demo/market.console" | cut -c1-40))"
else
  echo "console: DIFFERENT from the direct run" >&2
  diff <(cat "$demo/reference.console") <(cat "$demo/market.console") | head -20 >&2 || true
  exit 1
fi
echo
echo "demo: done (logs and files in .demo/)"
