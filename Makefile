# onair: `make run` builds everything and starts the server; `make test` runs every check.
CARGO ?= cargo

.PHONY: run build player setup test fmt-check clippy wasm-check unit e2e bench soak fuzz fuzz-smoke fuzz-corpus

run: build
	./target/release/onair

# Builds the server in release mode and the Wasm player into web/player/ (served at /player/).
build: setup player
	$(CARGO) build --release --locked -p onair-server --bin onair

# The browser player: Rust -> wasm32 -> wasm-opt -> wasm-bindgen glue; prints the bundle size.
player: setup
	./scripts/build-player.sh

setup:
	./scripts/setup.sh

test: setup fmt-check clippy wasm-check unit player e2e fuzz-smoke

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

# The protocol crate is shared with the Wasm player, so it must build for wasm32; the player's
# browser side exists only there, so clippy checks it there.
wasm-check:
	$(CARGO) build -p onair-protocol --target wasm32-unknown-unknown --locked
	$(CARGO) clippy -p onair-player --target wasm32-unknown-unknown --locked -- -D warnings

unit:
	$(CARGO) test --workspace --exclude onair-tests --locked

# End-to-end tests run the real binary with real ffmpeg; one at a time, so that timing
# assertions are not at the mercy of several encoders sharing two cores.
e2e:
	$(CARGO) build -p onair-server --bin onair --locked
	$(CARGO) test -p onair-tests --tests --locked -- --test-threads=1

# The fan-out benchmark against node-media-server (docs/benchmarks.md). Not part of `make test`;
# its smoke version (10 viewers, 5 s) is. Takes about 25 minutes with the defaults.
BENCH_ARGS ?= --viewers 1000 --burst 500 --window-secs 60 --runs 3
bench: setup player
	$(CARGO) build --release --locked -p onair-server -p onair-tests --bin onair --bin onair-bench
	./target/release/onair-bench $(BENCH_ARGS) --json target/bench/results.json

# The fault and soak runs R1, R3-R6 against the release binary (docs/reliability.md). Not part
# of `make test`, which runs a short R4 (tests/tests/faults.rs) and all of R5. About 45 minutes.
SOAK_ARGS ?=
soak: setup player
	$(CARGO) build --release --locked -p onair-server -p onair-tests --bin onair --bin onair-soak
	mkdir -p target/soak
	./target/release/onair-soak $(SOAK_ARGS) --json target/soak/results.json

# `make fuzz`'s short version: every target for 10 s from the committed seeds.
fuzz-smoke:
	./scripts/fuzz.sh 10

# Every fuzz target for FUZZ_SECS seconds each (docs/reliability.md); not part of `make test`.
FUZZ_SECS ?= 300
fuzz: setup
	./scripts/fuzz.sh $(FUZZ_SECS)

# Re-seeds fuzz/corpus/ from real ffmpeg output and a real server's messages (committed).
fuzz-corpus: build
	python3 scripts/fuzz-corpus.py ./target/release/onair fuzz/corpus
