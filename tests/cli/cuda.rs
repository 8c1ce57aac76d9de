//! The CUDA engine without a GPU. `MINIMIND_CUDA_EMULATOR=1` makes `cuda:0` the emulator
//! (src/engine/cuda/emu.rs): kernels.cu compiled as C++ and run on the CPU, behind the same
//! launch code, buffer handling and cuBLAS argument mapping as the GPU. These tests drive the
//! real binary with it, so everything of the CUDA engine but the driver calls runs in CI.

use std::fs;
use std::process::Command;

use super::*;

fn emulated(cmd: Command) -> Command {
    emulating(cmd, 1)
}

/// `gpus` emulated GPUs.
fn emulating(mut cmd: Command, gpus: usize) -> Command {
    cmd.env("MINIMIND_CUDA_EMULATOR", gpus.to_string());
    cmd
}

/// A folder under `s` with the micro model's experiment file and its data.
fn folder(s: &Scratch, sub: &str) -> std::path::PathBuf {
    let dir = s.path().join(sub);
    fs::create_dir_all(&dir).unwrap();
    for f in ["tok.json", "data.jsonl"] {
        fs::copy(s.path().join(f), dir.join(f)).unwrap();
    }
    fs::write(dir.join("micro.toml"), MICRO).unwrap();
    dir
}

/// The one run folder under `dir`.
fn the_run(dir: &std::path::Path) -> std::path::PathBuf {
    let runs = runs_in(dir);
    assert_eq!(runs.len(), 1, "{runs:?}");
    runs[0].clone()
}

/// A run of the micro model in a fresh folder under `s`; returns the run folder.
fn train(s: &Scratch, sub: &str, on_cuda: bool, args: &[&str]) -> std::path::PathBuf {
    let dir = folder(s, sub);
    let mut cmd = minimind(&dir);
    cmd.args(["run", "micro.toml", "--quiet", "--set", "train.max_steps=6"]).args(args);
    if on_cuda {
        cmd = emulated(cmd);
        cmd.args(["--set", "train.device=cuda"]);
    }
    expect(&mut cmd, 0);
    the_run(&dir)
}

fn close(a: &[f64], b: &[f64], tol: f64, what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(x.is_finite() && (x - y).abs() <= tol * y.abs().max(1.0), "{what} row {i}: {x} vs {y}");
    }
}

/// Every kernel against the CPU, then the PyTorch fixtures in float32 and bfloat16.
#[test]
fn cuda_emulated_selftest_passes_every_kernel_and_fixture() {
    let fixtures = repo().join("../shared/fixtures");
    assert!(fixtures.join("dense_tiny").is_dir(), "the PyTorch fixtures are not at {}", fixtures.display());
    let s = Scratch::new();
    let mut cmd = emulated(minimind(s.path()));
    cmd.args(["selftest", "--device", "cuda", "--fixtures"]).arg(&fixtures);
    let o = expect(&mut cmd, 0);
    let out = stdout(&o);
    assert!(out.contains("kernels: CUDA emulator"), "{out}");
    assert!(out.contains("Float32 on cuda:0") && out.contains("Bfloat16 on cuda:0"), "{out}");
    let checks = out.lines().filter(|l| l.trim_end().ends_with(" ok")).count();
    assert!(checks >= 40 && out.contains(&format!("all {checks} checks passed")), "{out}");
}

/// Six steps of the dense and the MoE micro model on the emulated GPU follow the CPU engine.
#[test]
fn cuda_emulated_training_follows_the_cpu() {
    let s = Scratch::new();
    for (name, args) in [("dense", &[][..]), ("moe", &["--set", "model.use_moe=true"][..])] {
        let cpu = train(&s, &format!("{name}-cpu"), false, args);
        let gpu = train(&s, &format!("{name}-cuda"), true, args);
        assert_eq!(meta(&gpu)["device"]["effective"], "cuda:0");
        for column in ["loss", "aux_loss", "grad_norm"] {
            close(&metric(&gpu, column), &metric(&cpu, column), 1e-5, &format!("{name} {column}"));
        }
        if name == "moe" {
            assert!(metric(&gpu, "aux_loss").iter().all(|&a| a > 0.0), "the MoE run has an aux loss");
        }
    }
}

/// A run stopped after step 3 and resumed on the emulated GPU is bit-identical to one that ran
/// straight through (the emulator is deterministic, so this checks the CUDA engine's
/// checkpoint: weights, moments and the data position), in every dtype: in 16 bits the
/// resumed run rebuilds the weights' bf16/f16 copy from the f32 checkpoint, which must give
/// the bits AdamW would have written, and float16 resumes its loss scaler.
#[test]
fn cuda_emulated_resume_is_bit_identical() {
    let s = Scratch::new();
    for dtype in ["float32", "bfloat16", "float16"] {
        let set = format!("train.dtype={dtype}");
        let straight = train(&s, &format!("straight-{dtype}"), true, &["--set", &set]);
        let dir = folder(&s, &format!("stopped-{dtype}"));
        let mut cmd = emulated(minimind(&dir));
        cmd.args([
            "run",
            "micro.toml",
            "--quiet",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.device=cuda",
        ]);
        cmd.args(["--set", &set, "--stop-after", "3"]);
        expect(&mut cmd, 130);
        let run = the_run(&dir);
        let mut cmd = emulated(minimind(&dir));
        cmd.arg("resume").arg(&run).arg("--quiet");
        expect(&mut cmd, 0);
        assert_eq!(metric_rows(&run), metric_rows(&straight), "{dtype}");
        let weights = |r: &std::path::Path| fs::read(r.join("model/model.safetensors")).unwrap();
        assert!(weights(&run) == weights(&straight), "{dtype}: exported weights differ");
    }
}

/// bfloat16 and float16 (with its loss scaler) train on the emulated GPU, near float32.
#[test]
fn cuda_emulated_half_precision_trains_near_float32() {
    let s = Scratch::new();
    let cpu = train(&s, "f32", false, &[]);
    for dtype in ["bfloat16", "float16"] {
        let set = format!("train.dtype={dtype}");
        let run = train(&s, dtype, true, &["--set", &set]);
        assert_eq!(meta(&run)["dtype"]["effective"], dtype);
        close(&metric(&run, "loss"), &metric(&cpu, "loss"), 2e-2, dtype);
    }
}

/// A NaN in 16 bits is the CPU's divergence error: one located line, exit 1, the run marked
/// failed and no checkpoint of the broken weights. In float16 the loss scaler skips steps whose
/// gradients overflow; weights that blow up still end the run.
#[test]
fn cuda_emulated_nan_in_16_bits_fails_the_run_cleanly() {
    let s = Scratch::new();
    for dtype in ["bfloat16", "float16"] {
        let dir = folder(&s, &format!("nan-{dtype}"));
        let mut cmd = emulated(minimind(&dir));
        cmd.args(["run", "micro.toml", "--quiet", "--set", "train.device=cuda"]);
        cmd.args(["--set", &format!("train.dtype={dtype}"), "--set", "train.learning_rate=1e30"]);
        cmd.args(["--set", "train.grad_clip=0.0", "--set", "train.max_steps=6"]);
        let o = expect(&mut cmd, 1);
        let err = stderr(&o);
        assert!(err.contains("training diverged") && !err.contains("panicked"), "{dtype}: {err}");
        assert_eq!(err.trim_end().lines().filter(|l| l.starts_with("error: ")).count(), 1, "{err}");
        let run = the_run(&dir);
        assert_eq!(meta(&run)["status"], "failed", "{dtype}");
        let saved = fs::read_dir(run.join("checkpoints")).unwrap().count();
        assert_eq!(saved, 0, "{dtype}: no checkpoint of NaN weights");
    }
}

/// Two ranks, each on an emulated GPU of its own (`cuda:<local rank>`), sum their gradients
/// through MPI (the emulator has no NCCL, so the host communicator stages the device buffers)
/// and equal one process accumulating both micro-batches, bit for bit.
#[cfg(feature = "mpi")]
#[test]
fn cuda_emulated_two_ranks_equal_one_process_accumulating_two() {
    let s = Scratch::new();
    let one = train(&s, "one", true, &[]);
    let dir = folder(&s, "two");
    let mut cmd = emulating(minimind(&dir), 2);
    cmd.args(["run", "micro.toml", "--quiet", "--nproc", "2", "--set", "train.max_steps=6"]);
    cmd.args(["--set", "train.device=cuda", "--set", "train.accumulation_steps=1"]);
    let o = expect(&mut cmd, 0);
    let two = the_run(&dir);
    assert_eq!(meta(&two)["world"]["size"], 2, "{}", stdout(&o));
    assert_eq!(metric_rows(&two), metric_rows(&one));
    let weights = |r: &std::path::Path| fs::read(r.join("model/model.safetensors")).unwrap();
    assert!(weights(&two) == weights(&one), "exported weights differ");
    let log = fs::read_to_string(two.join("rank-1.log")).unwrap();
    assert!(log.contains("rank 1 of 2: training on cuda:1 (CUDA emulator 1)"), "{log}");
    assert!(!log.contains("cuda:0"), "{log}");
}

/// More ranks on a host than it has GPUs: one clear line, exit 2, no run folder.
#[cfg(feature = "mpi")]
#[test]
fn cuda_emulated_more_ranks_than_gpus_is_refused() {
    let s = Scratch::new();
    let dir = folder(&s, "over");
    let mut cmd = emulating(minimind(&dir), 1);
    cmd.args(["run", "micro.toml", "--quiet", "--nproc", "2", "--set", "train.device=cuda"]);
    let o = expect(&mut cmd, 2);
    let err = stderr(&o);
    assert!(err.contains("2 ranks on this host but 1 GPU(s)"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// `eval` and `generate` (the engine's forward with a KV cache) on the emulated GPU give the
/// CPU's loss and the CPU's text.
#[test]
fn cuda_emulated_eval_and_generate_match_the_cpu() {
    let s = Scratch::new();
    let run = train(&s, "trained", false, &[]);
    let dir = run.parent().unwrap().parent().unwrap().to_path_buf();
    let model = run.join("model");
    let both = |args: &[&str]| -> Vec<String> {
        ["cpu", "cuda"]
            .iter()
            .map(|device| {
                let mut cmd = emulated(minimind(&dir));
                cmd.args(args).args(["--device", device]);
                stdout(&expect(&mut cmd, 0))
            })
            .collect()
    };
    let evals = both(&[
        "eval",
        "--hf-dir",
        model.to_str().unwrap(),
        "--data",
        "data.jsonl",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--batches",
        "2",
    ]);
    let loss = |out: &str| -> f64 {
        let line = out.lines().find_map(|l| l.strip_prefix("loss=")).unwrap_or_else(|| panic!("{out}"));
        line.split_whitespace().next().unwrap().parse().unwrap()
    };
    let (cpu, gpu) = (loss(&evals[0]), loss(&evals[1]));
    assert!((cpu - gpu).abs() <= 1e-6 * cpu.abs(), "eval loss {gpu} on cuda, {cpu} on the CPU");
    let texts = both(&["generate", run.to_str().unwrap(), "--prompt", "春"]);
    assert!(!texts[0].trim().is_empty(), "{texts:?}");
    assert_eq!(texts[0], texts[1], "the same text from the same weights and seed");
}

/// What a GPU may do (blocks in any order, threads interleaved as warps are scheduled), the
/// emulator does under a shuffle seed. Training on it gives the same bits under two seeds and
/// in order: no training kernel sums floats in an order that depends on scheduling, so two
/// runs of one config on one GPU agree bit for bit.
#[test]
fn cuda_emulated_training_is_bit_identical_in_any_block_order() {
    let s = Scratch::new();
    for (name, args) in [("dense", &[][..]), ("moe", &["--set", "model.use_moe=true"][..])] {
        let run = |sub: &str, shuffle: Option<&str>| {
            let dir = folder(&s, &format!("{name}-{sub}"));
            let mut cmd = emulated(minimind(&dir));
            cmd.args([
                "run",
                "micro.toml",
                "--quiet",
                "--set",
                "train.max_steps=6",
                "--set",
                "train.device=cuda",
            ]);
            cmd.args(args);
            if let Some(seed) = shuffle {
                cmd.env("MINIMIND_CUDA_EMULATOR_SHUFFLE", seed);
            }
            expect(&mut cmd, 0);
            let run = the_run(&dir);
            let weights = fs::read(run.join("model/model.safetensors")).unwrap();
            (metric_rows(&run), weights)
        };
        let in_order = run("in-order", None);
        for seed in ["1", "2"] {
            let shuffled = run(&format!("seed-{seed}"), Some(seed));
            assert_eq!(shuffled.0, in_order.0, "{name}: metrics under shuffle seed {seed}");
            assert!(shuffled.1 == in_order.1, "{name}: weights under shuffle seed {seed}");
        }
    }
}

/// A CUDA library that cannot be found is exit 2 (the machine's setup, like a bad config)
/// with every name and folder tried and the fix; never a panic.
#[test]
fn cuda_missing_library_is_exit_2_with_what_was_tried_and_the_fix() {
    let s = Scratch::new();
    let empty = s.path().join("no-cuda-here");
    fs::create_dir_all(&empty).unwrap();
    let mut cmd = minimind(s.path());
    cmd.args(["selftest", "--device", "cuda"]).env("MINIMIND_CUDA_LIBS", &empty);
    let o = expect(&mut cmd, 2);
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("CUDA driver not found: tried libcuda.so.1, libcuda.so in MINIMIND_CUDA_LIBS only"),
        "{err}"
    );
    assert!(err.contains(&format!("folders: {}", empty.display())), "{err}");
    assert!(err.trim_end().lines().last().unwrap().trim_start().starts_with("hint: "), "{err}");
    // Training asked for the GPU: the same, located at train.device.
    let dir = folder(&s, "run");
    let mut cmd = minimind(&dir);
    cmd.args(["run", "micro.toml", "--set", "train.device=cuda"]).env("MINIMIND_CUDA_LIBS", &empty);
    let err = stderr(&expect(&mut cmd, 2));
    assert!(err.contains("train.device") && err.contains("CUDA driver not found"), "{err}");
}

/// The GPU check's correctness stage, run here on the emulator as it will run on a GPU: the
/// script itself is tested before it meets one. Every check line ends in ok (NCCL: SKIPPED,
/// the emulator has none), the verdict is the last line, and the log reaches $OUT.
#[test]
fn cuda_gpu_check_correctness_stage_runs_on_the_emulator() {
    let s = Scratch::new();
    let (gpu, out) = (s.path().join("gpu"), s.path().join("out"));
    let script = |args: &[&str]| {
        let mut cmd = Command::new("bash");
        cmd.arg(repo().join("scripts/gpu_check.sh")).args(args);
        for (k, _) in std::env::vars() {
            if k.starts_with("MINIMIND_") {
                cmd.env_remove(k);
            }
        }
        cmd.env("GPU_DIR", &gpu).env("OUT", &out).env("MINIMIND_BIN", env!("CARGO_BIN_EXE_minimind"));
        cmd.env("XDG_CACHE_HOME", s.path().join("xdg"));
        cmd
    };
    let o = expect(&mut script(&["prepare"]), 0);
    assert!(stdout(&o).starts_with("staged "), "{}", stdout(&o));
    // --emulate without the emulator is refused rather than run on a GPU that is not there.
    expect(&mut script(&["correctness", "--emulate"]), 2);
    let o = expect(&mut emulated(script(&["correctness", "--emulate"])), 0);
    let text = stdout(&o);
    let checks: Vec<&str> = text.lines().filter(|l| l.contains(": ") && !l.starts_with(' ')).collect();
    for name in ["selftest", "determinism", "resume", "bf16", "flash", "eval", "generate"] {
        let line = checks
            .iter()
            .find(|l| l.starts_with(&format!("{name}: ")))
            .unwrap_or_else(|| panic!("{name}?\n{text}"));
        assert!(line.ends_with(" ok"), "{line}\n{text}");
    }
    assert!(checks.iter().any(|l| l.starts_with("nccl-world1: ") && l.ends_with(" SKIPPED")), "{text}");
    assert_eq!(text.trim_end().lines().last(), Some("verdict: correctness ok (7 checks passed)"), "{text}");
    let log = fs::read_to_string(out.join("gpu_check-correctness.txt")).unwrap();
    assert!(log.trim_end().ends_with("verdict: correctness ok (7 checks passed)"), "{log}");
}

/// `bench --profile` on the CUDA engine lists, per kernel, launches per step with the FLOPs
/// and bytes the step-time model gives them; the emulator counts but cannot time.
#[test]
fn cuda_emulated_bench_profile_counts_launches_flops_and_bytes() {
    let s = Scratch::new();
    let dir = folder(&s, "bench");
    let mut cmd = emulated(minimind(&dir));
    cmd.args(["bench", "micro.toml", "--steps", "1", "--profile", "--set", "train.device=cuda"]);
    cmd.args(["--set", "train.dtype=bfloat16", "--set", "train.accumulation_steps=1"]);
    let out = stdout(&expect(&mut cmd, 0));
    assert!(out.contains("kernel") && out.contains("launches") && out.contains("MB moved"), "{out}");
    let row = |name: &str| -> Vec<String> {
        let line = out
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name}: {out}"));
        line.split_whitespace().map(String::from).collect()
    };
    // One layer: q, k, v, o, gate|up, down and the LM head forward, two products each
    // backward; the attention's two batched products forward, five backward.
    assert_eq!(row("gemm")[1], "28", "{out}");
    assert!(row("gemm")[2].parse::<f64>().unwrap() > 0.0, "{out}");
    assert_eq!(row("attn_softmax")[1], "2", "{out}");
    assert_eq!(row("adamw")[4], "-", "no time on the emulator: {out}");
    assert!(out.contains("the emulator counts launches but cannot time them"), "{out}");
}
