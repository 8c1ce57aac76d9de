# Everyday entry points. EXP picks the experiment file for `run` and `bench`.
EXP ?= experiments/tiny.toml
SWEEP ?= experiments/sweeps/lr_moe.toml
CARGO ?= cargo

.PHONY: build run sweep test bench schema check

build:
	$(CARGO) build --release

run: build
	./target/release/minimind run $(EXP)

sweep: build
	./target/release/minimind run $(SWEEP)

test:
	$(CARGO) test

bench: build
	./target/release/minimind bench $(EXP)

schema:
	$(CARGO) run --quiet -- schema > schemas/experiment.schema.json

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test
