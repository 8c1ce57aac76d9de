#!/usr/bin/env bash
# The GPU check: one prepared run on a machine with an NVIDIA GPU, under 6 minutes end to end.
# It checks every CUDA kernel against the CPU's (`minimind selftest --device cuda`: every
# kernel with float32, bfloat16 and float16 activations, then the PyTorch fixtures in float32
# and bfloat16), benchmarks MiniMind2-small dense and MoE at batch 32 x 512 in bfloat16 and
# float32, times eager PyTorch (and torch.compile) on the same GPU with
# ../shared/tools/torch_ref.py, and prints one table. It also trains 20 steps
# through the NCCL communicator with the one GPU (a world of one) and compares the losses.
#
# The GPU machine has no Rust toolchain and no network; only the checkout travels, plus one
# git-ignored folder, gpu/. So:
#
#   here (with Rust):   cargo build --release --features cuda
#                       scripts/gpu_check.sh prepare     # fills gpu/: stripped binary, fixtures,
#                                                        # torch_ref.py (about 45 MB)
#   there:              scripts/gpu_check.sh             # with gpu/ carried along
#
# It needs the CUDA driver, cuBLAS and NVRTC (12.x or 13.x; found in the usual places, in the
# CUDA toolkit or in PyTorch's pip packages) and python3 with PyTorch for the peer.
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=gpu

if [ "${1:-}" = "prepare" ]; then
    bin=${CARGO_TARGET_DIR:-target}/release/minimind
    [ -x "$bin" ] || { echo "build first: cargo build --release --features cuda" >&2; exit 1; }
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/fixtures"
    cp "$bin" "$GPU_DIR/minimind" && strip "$GPU_DIR/minimind"
    for f in dense_tiny moe_tiny dense_songci; do cp -r ../shared/fixtures/$f "$GPU_DIR/fixtures/"; done
    cp ../shared/tools/torch_ref.py "$GPU_DIR/"
    du -sh "$GPU_DIR"
    exit 0
fi

[ -x "$GPU_DIR/minimind" ] || { echo "no $GPU_DIR/minimind: run 'scripts/gpu_check.sh prepare' where Rust is, and carry $GPU_DIR/" >&2; exit 1; }
start=$(date +%s)

# --- Libraries. The binary looks for libcuda.so.1, libcublas.so(.12) and libnvrtc.so(.12);
# CUDA 13 names its libraries .so.13, so link the ones found under those names.
libs="$PWD/$GPU_DIR/libs"
mkdir -p "$libs"
find_lib() {  # the first file named like $1 under the usual folders
    for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu \
             $(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2>/dev/null); do
        [ -d "$d" ] || continue
        f=$(find "$d" -maxdepth 5 -name "$1" 2>/dev/null | sort | tail -n 1)
        [ -n "$f" ] && { echo "$f"; return 0; }
    done
    return 1
}
for lib in cublas cublasLt nvrtc; do
    f=$(find_lib "lib$lib.so.1[23]*") || f=$(find_lib "lib$lib.so") || { echo "lib$lib not found" >&2; exit 1; }
    ln -sf "$f" "$libs/lib$lib.so"
    ln -sf "$f" "$libs/lib$lib.so.12"
    export LD_LIBRARY_PATH="$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
builtins=$(find_lib "libnvrtc-builtins.so.1[23]*" || true)
[ -n "$builtins" ] && export LD_LIBRARY_PATH="$(dirname "$builtins"):$LD_LIBRARY_PATH"
export LD_LIBRARY_PATH="$libs:$LD_LIBRARY_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

mm="$GPU_DIR/minimind"
out="$GPU_DIR/results.txt"
: > "$out"

echo "== selftest"
timeout 150 "$mm" selftest --device cuda --fixtures "$GPU_DIR/fixtures" | tee -a "$out" || echo "selftest FAILED" | tee -a "$out"

# --- NCCL through the whole data-parallel path with one GPU (a world of one): the unique id,
# the communicator, the broadcast of the initial state and every step's all-reduce. A sum over
# one rank changes nothing, so the losses must equal those of the same run without NCCL.
echo "== NCCL (one GPU)"
nccl=$(find_lib "libnccl.so.2*" || true)
if [ -n "$nccl" ]; then
    ln -sf "$nccl" "$libs/libnccl.so"
    nccl_run() {  # --comm value; prints the run's metrics without the timing columns
        timeout 60 "$mm" run experiments/tiny.toml --quiet --comm "$1" --set train.device=cuda \
            --set train.max_steps=20 --set checkpoint.log_interval=1 \
            --set "checkpoint.save_dir=\"$GPU_DIR/runs-$1\"" >"$GPU_DIR/nccl-$1.log" 2>&1 \
            || { echo "nccl run --comm $1 FAILED: $(tail -n 3 "$GPU_DIR/nccl-$1.log")" >&2; return; }
        cut -d, -f1-9 "$(ls -d "$GPU_DIR/runs-$1"/*/ | tail -n 1)metrics.csv"
    }
    with=$(nccl_run device); without=$(nccl_run auto)
    grep -m1 "gradients:" "$GPU_DIR/nccl-device.log" | tee -a "$out" || true
    if [ -n "$with" ] && [ "$with" = "$without" ]; then
        echo "nccl-world1 ok: 20 steps, losses and grad norms identical to the run without NCCL" | tee -a "$out"
    else
        echo "nccl-world1 FAILED: the metrics differ or a run failed" | tee -a "$out"
        diff <(echo "$with") <(echo "$without") | head -n 6 || true
    fi
else
    echo "nccl-world1 SKIPPED: libnccl.so.2 not found" | tee -a "$out"
fi

# --- Our engine: MiniMind2-small (hidden 512, 8 layers), dense and MoE, B 32 x T 512.
bench() {  # label, then minimind bench arguments; prints "label tokens/s gflops"
    local label=$1; shift
    local log
    log=$(timeout 90 "$mm" bench "$@" --steps 5 --set train.device=cuda --set train.batch_size=32 \
          --set data.max_seq_len=512 --set train.accumulation_steps=1 2>&1) || { echo "$label FAILED: $(echo "$log" | tail -n 3)" >&2; echo "$label - -"; return; }
    local tps gf
    tps=$(echo "$log" | sed -n 's/^tokens_per_s=//p')
    gf=$(echo "$log" | sed -n 's/.*: \([0-9.]*\) GFLOP\/s$/\1/p')
    echo "$label $tps $gf"
}
echo "== minimind bench"
ours_dense_bf16=$(bench "dense-bf16" experiments/bench/dense.toml --set train.dtype=bfloat16)
ours_dense_fp32=$(bench "dense-fp32" experiments/bench/dense.toml --set train.dtype=float32)
ours_moe_bf16=$(bench "moe-bf16" experiments/bench/moe.toml --set train.dtype=bfloat16)
printf '%s\n' "$ours_dense_bf16" "$ours_dense_fp32" "$ours_moe_bf16" | tee -a "$out"

# --- The peer: eager PyTorch (and torch.compile) on the same GPU.
peer() {  # label, then torch_ref.py bench arguments
    local label=$1; shift
    local log
    log=$(timeout 120 python3 "$GPU_DIR/torch_ref.py" bench --device cuda --batch 32 --seq 512 --steps 5 "$@" 2>&1) \
        || { echo "$label FAILED: $(echo "$log" | tail -n 2)" >&2; echo "$label -"; return; }
    echo "$label $(echo "$log" | sed -n 's/^tokens_per_s=//p')"
}
echo "== PyTorch"
torch_dense_bf16=$(peer "torch-dense-bf16" --moe 0 --dtype bf16)
torch_dense_fp32=$(peer "torch-dense-fp32" --moe 0 --dtype fp32)
torch_moe_bf16=$(peer "torch-moe-bf16" --moe 1 --dtype bf16)
torch_dense_bf16_compile=$(peer "torch-dense-bf16-compile" --moe 0 --dtype bf16 --compile)
printf '%s\n' "$torch_dense_bf16" "$torch_dense_fp32" "$torch_moe_bf16" "$torch_dense_bf16_compile" | tee -a "$out"

# --- One table: tokens/s, MFU against the H200's dense bf16 peak (989 TFLOP/s), ratio to PyTorch.
python3 - "$out" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) >= 2 and p[0].count("-") >= 1 and not p[0].startswith("="):
        rows[p[0]] = p[1:]
def num(x):
    try: return float(x)
    except (TypeError, ValueError): return None
peak = 989e12
print(f"{'run':<16}{'ours tok/s':>12}{'MFU':>8}{'eager tok/s':>13}{'ours/eager':>11}{'compile tok/s':>15}{'ours/compile':>13}")
for run, peer in [("dense-bf16", "torch-dense-bf16"), ("dense-fp32", "torch-dense-fp32"), ("moe-bf16", "torch-moe-bf16")]:
    ours = rows.get(run, ["-", "-"])
    tps, gf = num(ours[0]), num(ours[1] if len(ours) > 1 else None)
    eager = num(rows.get(peer, ["-"])[0])
    comp = num(rows.get(peer + "-compile", ["-"])[0]) if run == "dense-bf16" else None
    mfu = f"{gf * 1e9 / peak:.1%}" if gf else "-"
    fmt = lambda v: f"{v:,.0f}" if v else "-"
    ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
    print(f"{run:<16}{fmt(tps):>12}{mfu:>8}{fmt(eager):>13}{ratio(tps, eager):>11}{fmt(comp):>15}{ratio(tps, comp):>13}")
EOF
echo "gpu_check took $(( $(date +%s) - start )) s"
