#!/bin/sh
# Builds the detstop QEMU plugin (Rust cdylib against qemu-plugin-sys, plugin API v4 = QEMU 10.0).
# Output: $CARGO_TARGET_DIR/release/libdetstop.so (default target dir: /work/proto/target).
set -eu
cd "$(dirname "$0")/plugin"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/work/proto/target}"
nice -n 10 cargo build --release -j1
echo "$CARGO_TARGET_DIR/release/libdetstop.so"
