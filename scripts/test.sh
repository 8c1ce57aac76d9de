#!/usr/bin/env bash
# The test suites (`make test` runs this): every suite whose prerequisites this machine has;
# each one it cannot run is one line, `SKIPPED: <suite>: <why>; install: <command>`. With CI
# set a skipped suite is a failure (exit 1), so CI (.ci/run installs everything) runs them all.
#
#   scripts/test.sh          run the suites
#   scripts/test.sh plan     print what would run and what would be skipped, run nothing
#
# The facts are detected; HAVE_MPI, HAVE_CXX, HAVE_NVRTC, HAVE_PYDEPS and IS_ROOT (1 or 0) override
# them, which is how the decision is tested (tests/cli/config.rs). Root-only tests (a small tmpfs,
# a local Slurm cluster) and the read-backs with Python's tensorboard and pyarrow live inside the
# default suite and say SKIPPED themselves; the plan names them.
set -uo pipefail
cd "$(dirname "$0")/.."
cargo=${CARGO:-cargo}
mode=${1:-run}

# Open MPI's compiler wrapper and libclang (bindgen) for the `mpi` feature.
detect_mpi() {
    command -v mpicc >/dev/null 2>&1 || return 1
    command -v mpirun >/dev/null 2>&1 || return 1
    ldconfig -p 2>/dev/null | grep -q 'libclang' && return 0
    ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1
}
# A C++ compiler for the CUDA emulator (kernels.cu compiled as C++ by build.rs).
detect_cxx() { command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1; }
detect_root() { [ "$(id -u)" = 0 ]; }
# NVRTC for the kernels' compile checks: the copy .ci/run installs, or one the engine finds.
detect_nvrtc() {
    [ -n "${MINIMIND_CUDA_LIBS:-}" ] && return 0
    ldconfig -p 2>/dev/null | grep -q 'libnvrtc' && return 0
    python3 -c 'import nvidia.cuda_nvrtc' >/dev/null 2>&1
}

# Python's tensorboard and pyarrow (read-back of event files, a real client's Parquet file), from
# .ci/deps/ where .ci/run installs them or from the system's Python.
detect_pydeps() {
    local pkg path
    for pkg in tensorboard pyarrow; do
        path=""
        [ -d ".ci/deps/$pkg/$pkg" ] && path=".ci/deps/$pkg"
        PYTHONPATH="$path" python3 -c "import $pkg" >/dev/null 2>&1 || return 1
    done
}

fact() { # fact NAME DETECTOR: 1 or 0, the override first
    local value=${!1:-}
    if [ -n "$value" ]; then echo "$value"; elif "$2"; then echo 1; else echo 0; fi
}
nvrtc_pip=.ci/deps/nvrtc/nvidia/cuda_nvrtc/lib
if [ -z "${MINIMIND_CUDA_LIBS:-}" ] && [ -d "$nvrtc_pip" ]; then
    export MINIMIND_CUDA_LIBS="$PWD/$nvrtc_pip"
fi
mpi=$(fact HAVE_MPI detect_mpi)
cxx=$(fact HAVE_CXX detect_cxx)
root=$(fact IS_ROOT detect_root)
nvrtc=$(fact HAVE_NVRTC detect_nvrtc)
pydeps=$(fact HAVE_PYDEPS detect_pydeps)

debian_mpi="sudo apt install libopenmpi-dev openmpi-bin clang libclang-dev"
debian_cxx="sudo apt install g++"
pip_pydeps="python3 -m pip install --target .ci/deps/tensorboard tensorboard==2.21.0 \
&& python3 -m pip install --target .ci/deps/pyarrow pyarrow==21.0.0"
pip_nvrtc="python3 -m pip install --target .ci/deps/nvrtc nvidia-cuda-nvrtc-cu12==12.9.86 (make test then finds it)"

# The plan: one line per suite, "run <args>" or "skip <suite>|<why>|<install>".
plan() {
    echo "run test"
    if [ "$root" != 1 ]; then
        echo "note root-only tests (a full disk on a small tmpfs, a local Slurm cluster)|not root|run the tests as root (CI does)"
    fi
    if [ "$pydeps" != 1 ]; then
        echo "note read-back tests (TensorBoard's reader, pyarrow's Parquet)|Python's tensorboard or pyarrow is missing|$pip_pydeps"
    fi
    if [ "$mpi" = 1 ]; then
        echo "run test --features mpi"
    else
        echo "skip mpi (the default suite again with two MPI ranks)|Open MPI or libclang is missing|$debian_mpi"
    fi
    if [ "$cxx" = 1 ]; then
        echo "run test --features cuda --lib cuda"
        if [ "$nvrtc" != 1 ]; then
            echo "note the CUDA kernels' compile checks (NVRTC, ptxas's report)|NVRTC is not found|$pip_nvrtc"
        fi
        if [ "$mpi" = 1 ]; then
            echo "run test --features cuda,mpi --test cli cuda"
        else
            echo "run test --features cuda --test cli cuda"
            echo "skip cuda with mpi (two ranks on two emulated GPUs)|Open MPI or libclang is missing|$debian_mpi"
        fi
    else
        echo "skip cuda (kernels, training and two ranks on the emulated GPU)|no C++ compiler|$debian_cxx"
    fi
}

skipped=0
while IFS= read -r line; do
    case $line in
        run\ *)
            args=${line#run }
            if [ "$mode" = plan ]; then
                echo "RUN: $cargo $args"
            else
                echo "+ $cargo $args"
                # shellcheck disable=SC2086
                $cargo $args || exit $?
            fi
            ;;
        skip\ * | note\ *)
            IFS='|' read -r what why install <<<"${line#* }"
            echo "SKIPPED: $what: $why; install: $install"
            skipped=$((skipped + 1))
            ;;
    esac
done < <(plan)

if [ "$skipped" -gt 0 ]; then
    if [ -n "${CI:-}" ]; then
        echo "error: $skipped suite(s) skipped under CI (every prerequisite must be installed: see .ci/run)" >&2
        exit 1
    fi
    echo "$skipped suite(s) skipped: the lines above say how to install what they need"
fi
