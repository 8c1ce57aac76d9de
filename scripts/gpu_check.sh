#!/usr/bin/env bash
# The GPU check, in stages that each fit one 10-minute call on a GPU machine (about 5 minutes
# each, compiling the kernels included). The GPU machine has no Rust and no network; only the
# checkout travels, plus one git-ignored folder ($GPU_DIR, default gpu/). So:
#
#   here (with Rust):  cargo build --release --features cuda
#                      scripts/gpu_check.sh prepare        # stages gpu/ (< 50 MB)
#   there:             scripts/gpu_check.sh correctness    # carry ["gpu"]
#                      scripts/gpu_check.sh speed
#
#   correctness  the libraries found (file and version), selftest (every kernel in f32, bf16
#                and f16 against the CPU, the PyTorch fixtures), two identical runs of
#                tiny.toml (bit for bit), a stop and resume (bit for bit), bf16 near f32,
#                the flash attention kernels in training (heads 64 wide: bf16 near f32, twice
#                bit for bit), eval and generate against the CPU, NCCL in a world of one. One line per
#                check ending in ok / FAILED / SKIPPED; the last line is the verdict.
#   speed        minimind bench for MiniMind2-small dense and MoE at 32 x 512 in bf16 and f32,
#                eager PyTorch (bf16, f32) and torch.compile (bf16) on the same GPU, one table
#                with tokens/s, MFU and the ratios; then the step-time model's prediction per
#                kernel class against the profile measured on this GPU (bench --profile): what
#                to recalibrate src/roofline.rs's efficiencies with.
#
# Everything printed also goes to $OUT/gpu_check-<stage>.txt ($OUT is what the GPU tool
# brings back), or to $GPU_DIR when $OUT is unset. The binary finds the CUDA libraries itself
# (see src/engine/cuda/libs.rs): nothing here changes LD_LIBRARY_PATH, and python runs as it
# would without us.
#
# `MINIMIND_CUDA_EMULATOR=1 scripts/gpu_check.sh correctness --emulate` runs the correctness
# stage here on the CUDA emulator (smaller runs; no NCCL): CI does, so the script is tested
# before it meets a GPU. MINIMIND_BIN picks another binary for `prepare`.
set -uo pipefail
cd "$(dirname "$0")/.."
GPU_DIR=${GPU_DIR:-gpu}
case "$GPU_DIR" in /*) ;; *) GPU_DIR="$PWD/$GPU_DIR" ;; esac
stage=${1:-}
emulate=0
[ "${2:-}" = "--emulate" ] && emulate=1

if [ "$stage" = "prepare" ]; then
    set -e
    bin=${MINIMIND_BIN:-${CARGO_TARGET_DIR:-target}/release/minimind}
    [ -x "$bin" ] || { echo "build first: cargo build --release --features cuda" >&2; exit 1; }
    grep -q MINIMIND_CUDA_LIBS "$bin" || { echo "$bin has no CUDA engine: cargo build --release --features cuda" >&2; exit 1; }
    rm -rf "$GPU_DIR" && mkdir -p "$GPU_DIR/fixtures"
    cp "$bin" "$GPU_DIR/minimind" && strip "$GPU_DIR/minimind"
    for f in dense_tiny moe_tiny dense_songci; do cp -r ../shared/fixtures/$f "$GPU_DIR/fixtures/"; done
    # About 2 MB of real text (whole lines) for eval: Jane Austen, whom tiny.toml never saw.
    awk '{ n += length($0) + 1; if (n > 2000000) exit; print }' ../shared/data/en_austen.jsonl > "$GPU_DIR/text.jsonl"
    cp ../shared/tools/torch_ref.py "$GPU_DIR/"
    size=$(du -sm "$GPU_DIR" | cut -f1)
    echo "staged $GPU_DIR: ${size} MB"
    [ "$size" -le 50 ] || { echo "$GPU_DIR is over 50 MB" >&2; exit 1; }
    exit 0
fi

case "$stage" in
    correctness | speed) ;;
    *) echo "usage: scripts/gpu_check.sh prepare | correctness [--emulate] | speed" >&2; exit 2 ;;
esac
mm="$GPU_DIR/minimind"
[ -x "$mm" ] || { echo "no $mm: run 'scripts/gpu_check.sh prepare' where Rust is, and carry $GPU_DIR/" >&2; exit 1; }
if [ "$emulate" = 1 ] && [ -z "${MINIMIND_CUDA_EMULATOR:-}" ]; then
    echo "--emulate needs MINIMIND_CUDA_EMULATOR=1" >&2
    exit 2
fi
out=${OUT:-$GPU_DIR}
mkdir -p "$out"
log="$out/gpu_check-$stage.txt"
: > "$log"
exec > >(tee -a "$log") 2>&1
tee_pid=$!
# Everything reaches the log before the script ends.
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT
start=$(date +%s)
# The compiled kernels, reused by every process of the stage (and the next stage).
export MINIMIND_CACHE_DIR="$GPU_DIR/cache"
echo "gpu_check $stage: $(date -u +%Y-%m-%dT%H:%M:%SZ)$([ "$emulate" = 1 ] && echo ', on the CUDA emulator')"
if [ "$emulate" = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "nvidia-smi: not available"
fi

# --- correctness -----------------------------------------------------------------------
if [ "$stage" = "correctness" ]; then
    failed=()
    passed=0
    verdict() {  # name, ok|FAILED|SKIPPED, detail
        echo "$1: $3 $2"
        case "$2" in
            ok) passed=$((passed + 1)) ;;
            FAILED) failed+=("$1") ;;
        esac
    }
    # Runs of tiny.toml: 30 steps on a GPU; on the emulator, 6 short ones.
    if [ "$emulate" = 1 ]; then
        steps=6 stop=3 limit=600 size=(--set train.batch_size=4 --set data.max_seq_len=64)
    else
        steps=30 stop=10 limit=120 size=()
    fi
    runs="$GPU_DIR/runs"
    rm -rf "$runs"
    train() {  # label, then extra arguments; prints the run folder (empty when it failed)
        local label=$1; shift
        local dir="$runs/$label"
        mkdir -p "$dir"
        timeout "$limit" "$mm" run experiments/tiny.toml --quiet --set train.device=cuda \
            --set train.max_steps=$steps --set checkpoint.log_interval=1 \
            --set "checkpoint.save_dir=\"$dir\"" "${size[@]}" "$@" > "$dir.log" 2>&1
        local code=$?
        echo "$code" > "$dir.code"
        ls -d "$dir"/*/ 2>/dev/null | head -n 1
    }
    metrics() { cut -d, -f1-9 "$1/metrics.csv" 2>/dev/null; }  # without the timing columns
    same_run() {  # two run folders: identical metrics and weights
        [ -n "$1" ] && [ -n "$2" ] && [ -s "$1/metrics.csv" ] && [ "$(metrics "$1")" = "$(metrics "$2")" ] \
            && cmp -s "$1/model/model.safetensors" "$2/model/model.safetensors"
    }
    tail_of() { tail -n 3 "$runs/$1.log" 2>/dev/null | tr '\n' ' '; }

    echo "== selftest (libraries, every kernel in f32/bf16/f16, the PyTorch fixtures)"
    timeout $((limit * 3)) "$mm" selftest --device cuda --fixtures "$GPU_DIR/fixtures" > "$GPU_DIR/selftest.log" 2>&1
    code=$?
    cat "$GPU_DIR/selftest.log"
    summary=$(grep -E "^all [0-9]+ checks passed|checks failed" "$GPU_DIR/selftest.log" | tail -n 1)
    if [ "$code" = 0 ]; then verdict selftest ok "$summary"; else verdict selftest FAILED "exit $code: $summary"; fi

    echo "== training: $steps steps of tiny.toml, twice"
    a=$(train straight-1)
    b=$(train straight-2)
    if same_run "$a" "$b"; then
        verdict determinism ok "two runs: metrics.csv and weights bit-identical"
    else
        verdict determinism FAILED "the two runs differ or one failed: $(tail_of straight-1) $(tail_of straight-2)"
        diff <(metrics "$a") <(metrics "$b") | head -n 6
    fi

    echo "== stop at step $stop, resume"
    c=$(train stopped --stop-after $stop)
    resumed=1
    if [ -n "$c" ] && [ "$(cat "$runs/stopped.code")" = 130 ]; then
        timeout "$limit" "$mm" resume "$c" --quiet >> "$runs/stopped.log" 2>&1 && resumed=0
    fi
    if [ "$resumed" = 0 ] && same_run "$a" "$c"; then
        verdict resume ok "stopped at $stop, resumed: bit-identical to the straight run"
    else
        verdict resume FAILED "$(tail_of stopped)"
        diff <(metrics "$a") <(metrics "$c") | head -n 6
    fi

    gap() {  # two run folders: the worst relative loss difference over their steps
        python3 - "$1/metrics.csv" "$2/metrics.csv" <<'EOF' 2>/dev/null
import csv, sys
rows = [list(csv.DictReader(open(p))) for p in sys.argv[1:]]
assert rows[0] and len(rows[0]) == len(rows[1])
print(max(abs(float(x["loss"]) - float(y["loss"])) / abs(float(x["loss"])) for x, y in zip(*rows)))
EOF
    }
    within() { [ -n "$1" ] && python3 -c "import sys; sys.exit(0 if float('$1') <= 2e-2 else 1)"; }

    echo "== bfloat16 against float32"
    d=$(train bf16 --set train.dtype=bfloat16)
    worst=$(gap "$a" "$d")
    if within "$worst"; then
        verdict bf16 ok "loss within $(printf '%.1e' "$worst") of float32 at every step (tolerance 2e-2)"
    else
        verdict bf16 FAILED "worst relative loss difference ${worst:-?} (tolerance 2e-2): $(tail_of bf16)"
    fi

    echo "== flash attention in training: heads 64 wide, bfloat16 against float32, twice"
    heads=(--set model.num_attention_heads=2 --set model.num_key_value_heads=1)
    f=$(train flash-f32 "${heads[@]}")
    g=$(train flash-bf16 "${heads[@]}" --set train.dtype=bfloat16)
    h=$(train flash-bf16-again "${heads[@]}" --set train.dtype=bfloat16)
    worst=$(gap "$f" "$g")
    if within "$worst" && same_run "$g" "$h"; then
        verdict flash ok "loss within $(printf '%.1e' "$worst") of float32 (tolerance 2e-2); two bf16 runs bit-identical"
    else
        verdict flash FAILED "worst relative loss difference ${worst:-?}, or the two bf16 runs differ: $(tail_of flash-bf16)"
    fi

    echo "== eval and generate on the GPU against the CPU (the first run's model)"
    if [ -n "$a" ]; then
        ev() {  # device
            timeout "$limit" "$mm" eval --hf-dir "$a/model" --data "$GPU_DIR/text.jsonl" --seq-len 128 \
                --batch-size 8 --batches 4 --device "$1" 2>&1 | sed -n 's/^loss=\([^ ]*\).*/\1/p'
        }
        gpu_loss=$(ev cuda) cpu_loss=$(ev cpu)
        if [ -n "$gpu_loss" ] && [ -n "$cpu_loss" ] \
            && python3 -c "import sys; g, c = $gpu_loss, $cpu_loss; sys.exit(0 if abs(g - c) <= 2e-5 * abs(c) else 1)"; then
            verdict eval ok "loss $gpu_loss on the GPU, $cpu_loss on the CPU (tolerance 2e-5 relative)"
        else
            verdict eval FAILED "loss ${gpu_loss:-?} on the GPU, ${cpu_loss:-?} on the CPU"
        fi
        gen() {  # device
            timeout "$limit" "$mm" generate "$a" --prompt "春" --temperature 0 --max-new-tokens 32 --device "$1" 2>/dev/null
        }
        gpu_text=$(gen cuda) cpu_text=$(gen cpu)
        if [ -n "$gpu_text" ] && [ "$gpu_text" = "$cpu_text" ]; then
            verdict generate ok "greedy, 32 tokens: the CPU's text"
        else
            verdict generate FAILED "GPU: ${gpu_text:0:60} / CPU: ${cpu_text:0:60}"
        fi
    else
        verdict eval FAILED "no trained model"
        verdict generate FAILED "no trained model"
    fi

    echo "== NCCL in a world of one (the unique id, the communicator, every step's all-reduce)"
    if [ "$emulate" = 1 ]; then
        verdict nccl-world1 SKIPPED "the emulator has no NCCL (its ranks sum through MPI; tests/cli/cuda.rs)"
    else
        e=$(train nccl --comm device)
        grep -m1 "gradients:" "$runs/nccl.log"
        if same_run "$a" "$e"; then
            verdict nccl-world1 ok "$steps steps: metrics and weights identical to the run without NCCL"
        else
            verdict nccl-world1 FAILED "$(tail_of nccl)"
        fi
    fi

    echo "gpu_check correctness took $(($(date +%s) - start)) s"
    if [ ${#failed[@]} = 0 ]; then
        echo "verdict: correctness ok ($passed checks passed)"
        exit 0
    fi
    echo "verdict: correctness FAILED: ${failed[*]}"
    exit 1
fi

# --- speed -----------------------------------------------------------------------------
[ "$emulate" = 0 ] || { echo "the speed stage needs a GPU" >&2; exit 2; }
bench() {  # label, then minimind bench arguments; prints "label tokens/s GFLOP/s"
    local label=$1; shift
    local log
    log=$(timeout 120 "$mm" bench "$@" --steps 10 --set train.device=cuda --set train.batch_size=32 \
        --set data.max_seq_len=512 --set train.accumulation_steps=1 2>&1)
    local code=$?
    echo "$log" | sed "s/^/  [$label] /" >&2
    [ "$code" = 0 ] || { echo "$label - -"; return; }
    echo "$label $(echo "$log" | sed -n 's/^tokens_per_s=//p') $(echo "$log" | sed -n 's/.*: \([0-9.]*\) GFLOP\/s$/\1/p')"
}
peer() {  # label, then torch_ref.py bench arguments
    local label=$1; shift
    local log
    log=$(timeout 150 python3 "$GPU_DIR/torch_ref.py" bench --device cuda --batch 32 --seq 512 --steps 10 "$@" 2>&1)
    local code=$?
    echo "$log" | tail -n 2 | sed "s/^/  [$label] /" >&2
    [ "$code" = 0 ] || { echo "$label -"; return; }
    echo "$label $(echo "$log" | sed -n 's/^tokens_per_s=//p')"
}
gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
rows="$GPU_DIR/speed-rows.txt"
: > "$rows"
echo "== minimind bench (MiniMind2-small, 32 x 512)"
for m in dense moe; do
    for dt in bfloat16 float32; do
        bench "ours-$m-$dt" experiments/bench/$m.toml --set train.dtype=$dt >> "$rows"
    done
done
# Attention through cuBLAS with the scores in memory instead of the flash kernels.
MINIMIND_CUDA_FLASH=0 bench "cublas-dense-bfloat16" experiments/bench/dense.toml --set train.dtype=bfloat16 >> "$rows"
echo "== PyTorch on the same GPU"
for m in dense moe; do
    moe=$([ $m = moe ] && echo 1 || echo 0)
    peer "eager-$m-bfloat16" --moe $moe --dtype bf16 >> "$rows"
    peer "eager-$m-float32" --moe $moe --dtype fp32 >> "$rows"
done
peer "compile-dense-bfloat16" --moe 0 --dtype bf16 --compile >> "$rows"
cat "$rows"
python3 - "$rows" "$gpu_name" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    p = line.split()
    if p:
        rows[p[0]] = p[1:]
name = sys.argv[2]
# Dense peaks (TFLOP/s): bf16 on the tensor cores, f32 on the CUDA cores (TF32 is off).
peaks = {"H200": (989, 67), "H100": (989, 67), "A100": (312, 19.5)}
peak = next((v for k, v in peaks.items() if k in name), None)
def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None
def fmt(v, f="{:,.0f}"):
    return f.format(v) if v else "-"
print(f"GPU: {name or '?'}; MFU against {peak[0] if peak else '?'} TFLOP/s (bf16) and {peak[1] if peak else '?'} (f32)")
print(f"{'model':<7}{'dtype':<10}{'ours tok/s':>12}{'MFU':>7}{'eager tok/s':>13}{'ours/eager':>11}{'compile tok/s':>15}{'ours/compile':>13}")
for m in ["dense", "moe"]:
    for dt in ["bfloat16", "float32"]:
        ours = rows.get(f"ours-{m}-{dt}", ["-", "-"])
        tps, gf = num(ours[0]), num(ours[1] if len(ours) > 1 else None)
        eager = num(rows.get(f"eager-{m}-{dt}", ["-"])[0])
        comp = num(rows.get(f"compile-{m}-{dt}", ["-"])[0])
        p = peak[0 if dt == "bfloat16" else 1] if peak else None
        mfu = f"{gf * 1e9 / (p * 1e12):.1%}" if gf and p else "-"
        ratio = lambda a, b: f"{a / b:.2f}x" if a and b else "-"
        print(f"{m:<7}{dt:<10}{fmt(tps):>12}{mfu:>7}{fmt(eager):>13}{ratio(tps, eager):>11}{fmt(comp):>15}{ratio(tps, comp):>13}")
flash, cublas = num(rows.get("ours-dense-bfloat16", ["-"])[0]), num(rows.get("cublas-dense-bfloat16", ["-"])[0])
print(f"dense bfloat16 attention: flash kernels {fmt(flash)} tok/s, cuBLAS with the scores in memory {fmt(cublas)}"
      + (f" ({flash / cublas:.2f}x)" if flash and cublas else ""))
EOF
echo "== the step-time model against this GPU (dense bf16, 32 x 512)"
shape=(--set train.batch_size=32 --set data.max_seq_len=512 --set train.accumulation_steps=1)
timeout 60 "$mm" plan experiments/bench/dense.toml "${shape[@]}" --set train.dtype=bfloat16 --gpu "${gpu_name:-H200}" 2>&1 | tail -n 12
timeout 120 "$mm" bench experiments/bench/dense.toml --steps 3 --profile --set train.device=cuda "${shape[@]}" \
    --set train.dtype=bfloat16 2>&1 | tail -n 60
echo "gpu_check speed took $(($(date +%s) - start)) s"
