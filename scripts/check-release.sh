#!/usr/bin/env bash
# The release binaries carry no test machinery (issue 12): no fault-injection
# switch in the broker, no synthetic driver in the provider. The test builds
# (cargo build --workspace --bins, with the features the tests crate enables)
# must carry both, which shows the check can fail.
#
# Which code a binary carries is decided by cargo's feature resolution for
# the packages built together, not by the profile: `make build` builds
# exactly these three packages with --release. The check builds the same
# three in the dev profile (whose dependencies `make unit` has already
# compiled: a minute, not the eight of a release build) and keeps them
# apart in target/release-features/. Without optimisation nothing unused is
# thrown away, so a mark that is compiled in cannot hide.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
fail() { echo "check-release: $*" >&2; exit 1; }

$cargo build -p vmlot-broker -p vmlot-provider -p vmlot-client
rel=target/release-features
rm -rf "$rel" && mkdir -p "$rel"
cp target/debug/vmlot-broker target/debug/vmlot-provider target/debug/vmlot "$rel/"

# Strings only the test machinery holds.
broker_marks=(VMLOT_FAULT crash-after-settlement)
provider_marks=(synthetic.state_kib synthetic.seed= "guest RAM flipped")

for m in "${broker_marks[@]}"; do
  ! grep -aqF -- "$m" "$rel/vmlot-broker" || fail "release vmlot-broker contains '$m' (fault injection)"
done
for m in "${provider_marks[@]}"; do
  ! grep -aqF -- "$m" "$rel/vmlot-provider" || fail "release vmlot-provider contains '$m' (synthetic driver)"
done

# The release provider refuses the synthetic hypervisor by name, before it
# touches NATS (port 1: nothing listens there).
out=$("$rel/vmlot-provider" --nats nats://127.0.0.1:1 --hypervisors synthetic --name check 2>&1) &&
  fail "release vmlot-provider accepted --hypervisors synthetic"
grep -qi "synthetic" <<<"$out" || fail "release vmlot-provider refused synthetic without naming it: $out"

# Control: the test builds do carry them.
# (This also puts the test builds back where the integration tests run them.)
dbg=target/debug
$cargo build --workspace --bins
grep -aqF VMLOT_FAULT "$dbg/vmlot-broker" || fail "control: test vmlot-broker lacks VMLOT_FAULT (is the check looking at the right thing?)"
grep -aqF synthetic.state_kib "$dbg/vmlot-provider" || fail "control: test vmlot-provider lacks the synthetic driver"
grep -aqF "guest RAM flipped" "$dbg/vmlot-provider" || fail "control: test vmlot-provider lacks its fault injection"
echo "check-release: release broker and provider carry no fault injection and no synthetic driver"
