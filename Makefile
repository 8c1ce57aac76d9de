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
	$(BIN) run $(SWEEP) -j 2

# Every suite this machine can run (scripts/test.sh): the CPU suite; the `mpi` build's (the
# same tests, plus two MPI ranks: needs Open MPI and libclang); the `cuda` feature: its kernels
# compiled with NVRTC with ptxas's report checked, and the CUDA engine on the emulator
# (kernels.cu as C++ on the CPU: needs g++). A suite whose prerequisites are missing is one
# SKIPPED line with the command that installs them; under CI a skip fails.
test:
	CARGO="$(CARGO)" bash scripts/test.sh

bench: build
	$(BIN) bench $(EXP)

schema:
	$(CARGO) run --quiet -- schema > schemas/experiment.schema.json

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --all-features -- -D warnings
	$(MAKE) test
