# Everyday entry points. EXP picks the experiment file for `run` and `bench`.
EXP ?= experiments/tiny.toml
SWEEP ?= experiments/sweeps/lr_moe.toml
CARGO ?= cargo
# Where cargo builds (honours the environment's CARGO_TARGET_DIR, as cargo does).
CARGO_TARGET_DIR ?= target
BIN = $(CARGO_TARGET_DIR)/release/minimind

.PHONY: build run sweep test bench schema check

build:
	$(CARGO) build --release

run: build
	$(BIN) run $(EXP)

sweep: build
	$(BIN) run $(SWEEP)

test:
	$(CARGO) test

bench: build
	$(BIN) bench $(EXP)

schema:
	$(CARGO) run --quiet -- schema > schemas/experiment.schema.json

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) test
