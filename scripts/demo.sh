#!/usr/bin/env bash
# make demo: a real NATS server (fsync on every write), the broker, and real
# QEMU checkpoints of the test guest moved through the content-addressed
# store. Grows into the whole market as the market is built.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
demo=$root/.demo
rm -rf "$demo"
mkdir -p "$demo/nats-store" "$demo/out"
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$demo/nats.conf" <<CONF
listen: 127.0.0.1:$port
max_payload: 8MB
jetstream { store_dir: "$demo/nats-store", sync_interval: always }
CONF
.tools/bin/nats-server -c "$demo/nats.conf" 2> "$demo/nats.log" &
pids+=($!)
export VMLOT_NATS=nats://127.0.0.1:$port
for _ in $(seq 50); do (echo > /dev/tcp/127.0.0.1/$port) 2>/dev/null && break; sleep 0.1; done

./target/release/vmlot-broker 2> "$demo/broker.log" &
pids+=($!)

echo "== saving a running 128 MiB QEMU guest twice, 5 s apart, and a second boot (mapped-ram + classic)"
python3 scripts/qemu-checkpoints.py "$demo/ckpt" > "$demo/ckpt.json" 2> "$demo/ckpt.log"

vmlot=./target/release/vmlot
echo
echo "== push checkpoint A (every block cold)"
$vmlot store push --kind machine-state "$demo/ckpt/same-a.mapped" --cache "$demo/cache-a" | tee "$demo/push-a.txt"
echo
echo "== push checkpoint B, 5 s later (only blocks the store lacks cross the wire)"
$vmlot store push --kind machine-state "$demo/ckpt/same-b.mapped" | tee "$demo/push-b.txt"
manifest_b=$(awk '/^manifest/ {print $2}' "$demo/push-b.txt")
echo
echo "== a provider holding A pulls B"
$vmlot store have "$manifest_b" --cache "$demo/cache-a"
$vmlot store pull "$manifest_b" -o "$demo/out/same-b.mapped" --cache "$demo/cache-a"
cmp "$demo/ckpt/same-b.mapped" "$demo/out/same-b.mapped"
echo "byte-identical: $(sha1sum < "$demo/out/same-b.mapped" | cut -d' ' -f1)"
echo
echo "== rsync's delta transfer of the same pair, for comparison"
cp --sparse=always "$demo/ckpt/same-a.mapped" "$demo/out/rsync-dest"
rsync --no-whole-file --inplace --stats "$demo/ckpt/same-b.mapped" "$demo/out/rsync-dest" | grep -E "Literal data|Matched data"
echo
echo "demo: done (the market itself is not built yet; see README status)"
