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

# The CPU suite; the `mpi` build's (the same tests, plus two MPI ranks on this machine: needs
# Open MPI and libclang, see README); then the `cuda` feature: its kernels compiled with NVRTC
# (found through MINIMIND_CUDA_LIBS; .ci/run installs it) with ptxas's report checked, and the
# CUDA engine run on the emulator (kernels.cu as C++ on the CPU): selftest, training, resume,
# half precision, shuffled block order, two ranks.
test:
	$(CARGO) test
	$(CARGO) test --features mpi
	$(CARGO) test --features cuda --lib cuda
	$(CARGO) test --features cuda,mpi --test cli cuda

bench: build
	$(BIN) bench $(EXP)

schema:
	$(CARGO) run --quiet -- schema > schemas/experiment.schema.json

check:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --all-features -- -D warnings
	$(MAKE) test
