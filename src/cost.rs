//! What a run will cost before it starts: parameters, memory (weights, gradients, AdamW
//! moments, activations, the transient buffers of a checkpoint; the peak), FLOPs per optimiser
//! step and an estimated time, from a matrix-multiply throughput measured once per machine and
//! thread count and cached. The arithmetic is pure; measuring and reading the machine are the
//! edges.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::config::{Config, Dtype, ModelConfig, PlannedRun};
use crate::engine::cpu::bf16::Isa;
use crate::engine::{
    Footprint, Gemm, Kernels, cpu::Cpu, flops_per_token, keep_attention_probs, workspace_bytes,
};
use crate::metrics::say;
use crate::units::{duration, human};

/// Model FLOP rate of a training step over the measured 1024³ product rate, per product
/// path. f32: about one at MiniMind2 shapes (BENCHMARKS.md: 0.98 dense, 1.12 MoE at 32 x 512;
/// the model's larger products run faster than 1024³, its attention core and memory passes
/// slower). bf16 (mixed precision): the products run 2-4x faster but the memory passes and
/// softmax do not, so a step reaches a smaller share of the product rate (BENCHMARKS.md, the
/// mixed-precision section: a dense bf16 step at 0.31 s against 1563 GFLOP/s on AMX at 1024³).
fn model_efficiency(path: Isa) -> f64 {
    match path {
        Isa::F32 => 1.0,
        Isa::Avx512Bf16 | Isa::Amx => BF16_MODEL_EFFICIENCY,
    }
}
const BF16_MODEL_EFFICIENCY: f64 = 0.35;
/// The process beyond the engine: binary, tokenizer, thread stacks, allocator slack.
const BASELINE_BYTES: f64 = 150e6;

/// Memory a run needs, in bytes.
#[derive(Clone, Debug, PartialEq)]
pub struct Memory {
    pub weights: f64,
    pub gradients: f64,
    /// AdamW's two moments.
    pub moments: f64,
    /// The CPU's bf16 products' packed weights (see `engine::cpu`): 2 bytes a value in each
    /// of the two layouts the products read a weight in (the forward's and the input
    /// gradient's); none in float32.
    pub panels: f64,
    pub activations: f64,
    /// Host copies and encodings alive while a checkpoint is written.
    pub checkpoint: f64,
    pub peak: f64,
}

/// Memory of training `m` on the CPU on `b x t` micro-batches, `accumulation` of them per
/// step (beyond one, each micro-batch's gradients are computed apart and then added), with
/// bf16 products (`bf16`: their packed weights too). Pure.
pub fn memory(m: &ModelConfig, b: usize, t: usize, accumulation: usize, bf16: bool) -> Memory {
    let p = 4.0 * m.parameter_count() as f64;
    let panels = if bf16 { p } else { 0.0 };
    let gradients = if accumulation > 1 { 2.0 * p } else { p };
    let keep_probs = keep_attention_probs(m, b, t);
    let activations = workspace_bytes(m, b, t, Footprint::Cpu { keep_probs }) as f64;
    // Writing a checkpoint holds the encoded weights, the two moments copied to the host and
    // their encoding at once: 7 floats per parameter (see train::checkpoint::save).
    let checkpoint = 7.0 * p;
    Memory {
        weights: p,
        gradients,
        moments: 2.0 * p,
        panels,
        activations,
        checkpoint,
        peak: BASELINE_BYTES + 3.0 * p + gradients + panels + activations + checkpoint,
    }
}

/// Device memory of training `m` on a GPU (the CUDA engine) with activations stored in `act`:
/// f32 weights, gradients (twice with accumulation) and moments, the 16-bit weight copy in
/// bf16/f16, the workspace as [`Footprint::Cuda`] lays it out, the kernels' own scratch
/// (cuBLAS's workspace included), and in bf16/f16 the cuBLAS attention's scores for the whole
/// batch (see [`device_memory_least`]; none at heads the flash kernels take). Pure.
pub fn device_memory(m: &ModelConfig, b: usize, t: usize, accumulation: usize, act: Dtype) -> f64 {
    device_memory_with(m, b, t, accumulation, act, b)
}

/// [`device_memory`] with the attention's scores for one sequence at a time: the least the
/// engine runs with (it takes the whole batch's scores when they fit half the free memory,
/// else a chunk of sequences, else the tiled kernels). What the check before a run asks for.
pub fn device_memory_least(m: &ModelConfig, b: usize, t: usize, accumulation: usize, act: Dtype) -> f64 {
    device_memory_with(m, b, t, accumulation, act, 1)
}

fn device_memory_with(
    m: &ModelConfig,
    b: usize,
    t: usize,
    accumulation: usize,
    act: Dtype,
    chunk: usize,
) -> f64 {
    let params = m.parameter_count() as f64;
    let grads = if accumulation > 1 { 2.0 } else { 1.0 };
    let copy = if act == Dtype::Float32 { 0.0 } else { 2.0 };
    let workspace = workspace_bytes(m, b, t, Footprint::Cuda { act }) as f64;
    let (slots, e) = if m.use_moe { (b * t * m.num_experts_per_tok, m.n_routed_experts) } else { (0, 0) };
    let scratch =
        crate::engine::gpu::kernel_scratch_bytes(b * t, m.hidden_size, m.vocab_size, slots, e) as f64;
    let (h, g, d) = (m.num_attention_heads, m.num_key_value_heads, m.head_dim);
    let attention = if act == Dtype::Float32 || crate::engine::gpu::flash_width(d) {
        0.0
    } else {
        crate::engine::gpu::attention_scratch(chunk, t, h, g, d, 2).1 as f64
    };
    params * (4.0 * (1.0 + grads + 2.0) + copy) + workspace + scratch + attention
}

/// Whether a run on `device` in `dtype` keeps the CPU's packed bf16 weights: bfloat16 on the
/// CPU (`auto` counted as the CPU: an upper bound) with bf16 products on this CPU.
pub fn keeps_panels(device: crate::config::Device, dtype: Dtype) -> bool {
    dtype == Dtype::Bfloat16
        && !matches!(device, crate::config::Device::Cuda(_))
        && cpu_path(Dtype::Bfloat16) != Isa::F32
}

/// A run's cost, as `plan`, `run --dry-run` and the run header show it.
#[derive(Clone, Debug, PartialEq)]
pub struct Cost {
    pub parameters: u64,
    pub memory: Memory,
    pub flops_per_step: f64,
    /// Optimiser steps of the whole run, when known before tokenising.
    pub steps: Option<usize>,
    /// Measured matrix-multiply GFLOP/s of this machine at the run's thread count, on the
    /// run's product path.
    pub gflops: Option<(f64, Isa)>,
}

impl Cost {
    /// Pure: the cost of `c` over `steps`, timed at `gflops`; `panels`: the run keeps the
    /// CPU's packed bf16 weights ([`keeps_panels`] where it trains).
    pub fn of(c: &Config, steps: Option<usize>, gflops: Option<(f64, Isa)>, panels: bool) -> Cost {
        let (b, t) = (c.train.batch_size, c.data.max_seq_len);
        let tokens = (b * t * c.train.accumulation_steps) as f64;
        Cost {
            parameters: c.model.parameter_count(),
            memory: memory(&c.model, b, t, c.train.accumulation_steps, panels),
            flops_per_step: 3.0 * flops_per_token(&c.model, t) * tokens,
            steps,
            gflops,
        }
    }

    pub fn step_seconds(&self) -> Option<f64> {
        self.gflops.map(|(g, path)| self.flops_per_step / (g * 1e9 * model_efficiency(path)))
    }

    /// `parameters 1.2M, memory 185.3MB peak (...), 1.5G FLOP/step, ~0.01 s/step, ~2s for 200 steps`.
    pub fn describe(&self) -> String {
        let m = &self.memory;
        let panels =
            if m.panels > 0.0 { format!(", bf16 weight panels {}B", human(m.panels)) } else { String::new() };
        let mut s = format!(
            "{} parameters; memory {}B peak (weights {}B{panels}, gradients {}B, AdamW moments {}B, activations {}B, checkpoint writing {}B); {} FLOP per step",
            human(self.parameters as f64),
            human(m.peak),
            human(m.weights),
            human(m.gradients),
            human(m.moments),
            human(m.activations),
            human(m.checkpoint),
            human(self.flops_per_step),
        );
        if let (Some(step), Some((g, path))) = (self.step_seconds(), self.gflops) {
            s.push_str(&format!("; about {} per step", duration_fine(step)));
            if let Some(n) = self.steps {
                s.push_str(&format!(", {} for {n} steps", duration(step * n as f64)));
            }
            let on =
                if path == Isa::F32 { String::new() } else { format!(", bf16 products on {}", path.name()) };
            s.push_str(&format!(" (at {}FLOP/s measured on this machine{on})", human(g * 1e9)));
        }
        s
    }
}

/// Sub-second durations too: 0.25s.
fn duration_fine(secs: f64) -> String {
    if secs < 10.0 { format!("{secs:.2}s") } else { duration(secs) }
}

/// Why a run does not fit in memory, with the keys that shrink it; `None` when it fits. Pure.
pub fn too_big(cost: &Cost, available: f64) -> Option<String> {
    if cost.memory.peak <= available {
        return None;
    }
    Some(format!(
        "this run needs about {}B of memory ({}B of it activations), more than the {}B available",
        human(cost.memory.peak),
        human(cost.memory.activations),
        human(available)
    ))
}

/// Memory this process may still use, in bytes: the smaller of the system's MemAvailable and
/// the cgroup's limit minus its usage.
pub fn available_memory() -> Option<f64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
    let cgroup = |name: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{name}")).ok();
    available_from(meminfo.as_deref(), cgroup("memory.max").as_deref(), cgroup("memory.current").as_deref())
}

/// [`available_memory`] from the files' text. Pure.
pub fn available_from(meminfo: Option<&str>, max: Option<&str>, current: Option<&str>) -> Option<f64> {
    let system = meminfo.and_then(|text| {
        let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024.0)
    });
    let limit = match (max.map(str::trim), current.map(str::trim)) {
        (Some(max), Some(cur)) if max != "max" => {
            Some((max.parse::<f64>().ok()? - cur.parse::<f64>().ok()?).max(0.0))
        }
        _ => None,
    };
    match (system, limit) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The CPU engine's product path for a run in `dtype`: its bf16 path for bfloat16 where the
/// CPU has one, f32 otherwise (float16, and bfloat16 falling back, train in float32).
pub fn cpu_path(dtype: Dtype) -> Isa {
    crate::engine::backend::cpu_products(dtype).unwrap_or(Isa::F32)
}

/// This machine's matrix-multiply throughput with `threads` threads (0: all cores) on the
/// product path of `dtype`, in GFLOP/s: measured once (about a second) and cached per CPU
/// model, thread count and path.
pub fn machine_gflops(threads: usize, dtype: Dtype) -> Result<(f64, Isa)> {
    let threads =
        if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let isa = cpu_path(dtype);
    let key = cache_key(&crate::run_dir::cpu_model(), threads, isa);
    let path = cache_file();
    let mut table: std::collections::BTreeMap<String, f64> = path
        .as_ref()
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(&g) = table.get(&key) {
        return Ok((g, isa));
    }
    let g = measure_gflops(threads, isa)?;
    table.insert(key, g);
    if let Some(p) = path
        && let Some(dir) = p.parent()
        && std::fs::create_dir_all(dir).is_ok()
    {
        // A cache: failing to keep it only costs a measurement next time.
        let _ = crate::files::write_atomic(&p, serde_json::to_string_pretty(&table)?.as_bytes());
    }
    Ok((g, isa))
}

/// The revision of the bf16 product kernels, in the cache's key: raised when a change moves
/// their speed (2: AMX tiles on cache lines, +20-40%; 3: vectorised packing), so a rate
/// measured before is measured again instead of pricing runs at the old speed.
const BF16_KERNELS: u32 = 3;

/// The cache's key for a measurement: f32 keeps the key it always had. Pure.
fn cache_key(cpu: &str, threads: usize, path: Isa) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match path {
        Isa::F32 => format!("{cpu}|{threads} threads|{version}"),
        _ => format!("{cpu}|{threads} threads|bf16 on {} r{BF16_KERNELS}|{version}", path.name()),
    }
}

/// `$XDG_CACHE_HOME/minimind/throughput.json`, else `~/.cache/minimind/throughput.json`.
fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("minimind").join("throughput.json"))
}

/// Times 1024^3 matrix products on the CPU engine's `path` for about half a second.
fn measure_gflops(threads: usize, path: Isa) -> Result<f64> {
    const N: usize = 1024;
    let pool =
        crate::threads::pool(threads).context("measuring this machine's matrix-multiply throughput")?;
    pool.install(|| {
        let k = Cpu::new().with_products(path);
        let a: Vec<f32> = (0..N * N).map(|i| (i % 7) as f32 * 0.1).collect();
        let b: Vec<f32> = (0..N * N).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut c = vec![0.0f32; N * N];
        k.matmul(
            &mut c,
            &a,
            &b,
            Gemm { rows: N, cols: N, depth: N, a_transposed: false, b_transposed: false, accumulate: false },
        );
        let start = Instant::now();
        let mut calls = 0;
        while calls < 3 || start.elapsed().as_secs_f64() < 0.5 {
            k.matmul(
                &mut c,
                &a,
                &b,
                Gemm {
                    rows: N,
                    cols: N,
                    depth: N,
                    a_transposed: false,
                    b_transposed: false,
                    accumulate: false,
                },
            );
            calls += 1;
        }
        let secs = start.elapsed().as_secs_f64();
        Ok(2.0 * (N * N * N) as f64 * calls as f64 / secs / 1e9)
    })
}

/// Steps a run will take when that is known without tokenising: `max_steps`, or (rows being
/// documents when unpacked) epochs over the documents (see `source::count_documents`).
pub fn planned_steps(c: &Config) -> Option<usize> {
    if let Some(n) = c.train.max_steps {
        return Some(n);
    }
    if c.data.packing {
        return None;
    }
    let docs = crate::data::source::count_documents(&c.data.path)? as usize;
    Some(c.train.epochs * (docs / c.train.batch_size) / c.train.accumulation_steps)
}

/// The run's cost with the measured throughput of this machine (measured once, cached).
pub fn cost_of(c: &Config) -> Cost {
    let panels = keeps_panels(c.train.device, c.train.dtype);
    Cost::of(c, planned_steps(c), machine_gflops(c.train.threads, c.train.dtype).ok(), panels)
}

/// The runs' costs; `ranks` data-parallel ranks multiply each step's batch (the global batch,
/// `batch_size x accumulation_steps x ranks` rows) and its tokens.
pub fn print_plan(runs: &[PlannedRun], ranks: usize) {
    say(&format!(
        "{:<24} {:>10} {:>14} {:>11} {:>10} {:>11} {:>10} {:>10}  overrides",
        "run", "parameters", "global batch", "tokens/step", "memory", "FLOP/step", "step", "run"
    ));
    for run in runs {
        let c = &run.config;
        let cost = cost_of(c);
        let point: Vec<String> =
            run.layered.assigns.iter().map(|a| format!("{}={}", a.key, a.value)).collect();
        let step = cost.step_seconds();
        let (b, a) = (c.train.batch_size, c.train.accumulation_steps);
        let batch = if ranks > 1 {
            format!("{b}x{a}x{ranks}={}", b * a * ranks)
        } else {
            format!("{b}x{a}={}", b * a)
        };
        say(&format!(
            "{:<24} {:>10} {:>14} {:>11} {:>10} {:>11} {:>10} {:>10}  {}",
            run.tag.as_deref().unwrap_or(&c.name),
            human(cost.parameters as f64),
            batch,
            human((c.derived.tokens_per_step * ranks as u64) as f64),
            format!("{}B", human(cost.memory.peak)),
            human(cost.flops_per_step),
            step.map_or("?".into(), |s| format!("~{}", seconds(s))),
            match (step, cost.steps) {
                (Some(s), Some(n)) => format!("~{}", duration(s * n as f64)),
                _ => "?".into(),
            },
            if point.is_empty() { "-".to_string() } else { point.join(" ") }
        ));
    }
    say(&format!("{} run(s); time estimated from this machine's measured matrix-multiply speed", runs.len()));
    if ranks > 1 {
        say(&format!(
            "global batch: batch_size x accumulation_steps x {ranks} ranks rows per step; step time is one rank's"
        ));
    }
}

fn seconds(s: f64) -> String {
    if s < 10.0 { format!("{s:.2}s") } else { duration(s) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throughput_is_cached_per_product_path_and_f32_keeps_its_key() {
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(cache_key("Xeon", 2, Isa::F32), format!("Xeon|2 threads|{version}"));
        assert_eq!(cache_key("Xeon", 2, Isa::Amx), format!("Xeon|2 threads|bf16 on amx r3|{version}"));
        assert_ne!(cache_key("Xeon", 2, Isa::Avx512Bf16), cache_key("Xeon", 2, Isa::Amx));
        // A bf16 step reaches a smaller share of its (faster) product rate.
        assert!(model_efficiency(Isa::Amx) < model_efficiency(Isa::F32));
    }

    #[test]
    fn available_memory_table() {
        let mi = "MemTotal: 100 kB\nMemAvailable:   2048 kB\n";
        let table = [
            (Some(mi), None, None, Some(2048.0 * 1024.0)),
            (Some(mi), Some("max\n"), Some("5\n"), Some(2048.0 * 1024.0)),
            (Some(mi), Some("1048576\n"), Some("524288\n"), Some(524288.0)),
            (None, Some("1000"), Some("1500"), Some(0.0)),
            (None, None, None, None),
        ];
        for (meminfo, max, cur, want) in table {
            assert_eq!(available_from(meminfo, max, cur), want, "{meminfo:?} {max:?} {cur:?}");
        }
    }

    #[test]
    fn memory_grows_with_the_batch_and_names_the_excess() {
        let json = r#"{"vocab_size": 6400, "hidden_size": 512, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2}"#;
        let m = serde_json::from_str::<crate::engine::hf::HfConfig>(json).unwrap().to_model().unwrap();
        let small = memory(&m, 4, 256, 1, false);
        let big = memory(&m, 32, 512, 1, false);
        assert_eq!(small.weights, 4.0 * m.parameter_count() as f64);
        // bf16 products keep the weights packed in two bf16 layouts: 4 bytes a parameter.
        let bf16 = memory(&m, 32, 512, 1, true);
        assert_eq!((bf16.panels, bf16.peak - big.peak), (big.weights, big.weights));
        assert!(big.activations > 10.0 * small.activations);
        assert!(big.peak > small.peak);
        let cost =
            Cost { parameters: 1, memory: big.clone(), flops_per_step: 1.0, steps: None, gflops: None };
        assert_eq!(too_big(&cost, big.peak + 1.0), None);
        assert!(too_big(&cost, 1e9).unwrap().contains("more than the 1.0GB available"));
    }

    #[test]
    fn only_a_cpu_run_with_bf16_products_keeps_packed_weights() {
        use crate::config::Device;
        let bf16_here = cpu_path(Dtype::Bfloat16) != Isa::F32;
        for (device, dtype, keeps) in [
            (Device::Cpu, Dtype::Bfloat16, bf16_here),
            (Device::Auto, Dtype::Bfloat16, bf16_here),
            (Device::Cpu, Dtype::Float32, false),
            (Device::Cpu, Dtype::Float16, false),
            (Device::Cuda(0), Dtype::Bfloat16, false),
        ] {
            assert_eq!(keeps_panels(device, dtype), keeps, "{device:?} {dtype:?}");
        }
    }

    #[test]
    fn a_gpu_run_in_16_bits_needs_less_than_in_float32_which_needs_less_than_the_cpu() {
        // MiniMind2-small at 32 x 512: the CPU recomputes the [B, H, T, T] probabilities into
        // scratch, CUDA keeps a log-sum-exp per row; bf16 halves the stored activations.
        let json = r#"{"vocab_size": 6400, "hidden_size": 512, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2}"#;
        let m = serde_json::from_str::<crate::engine::hf::HfConfig>(json).unwrap().to_model().unwrap();
        let cpu = memory(&m, 32, 512, 1, false);
        let f32 = device_memory(&m, 32, 512, 1, Dtype::Float32);
        let bf16 = device_memory_least(&m, 32, 512, 1, Dtype::Bfloat16);
        assert!(cpu.weights + cpu.gradients + cpu.moments + cpu.activations > f32, "{cpu:?} {f32}");
        assert!(bf16 < 0.7 * f32, "{bf16} {f32}");
        assert_eq!(device_memory_least(&m, 32, 512, 1, Dtype::Float16), bf16);
        // Heads 64 wide take the flash kernels: no scores in memory, whatever the batch.
        assert_eq!(device_memory(&m, 32, 512, 1, Dtype::Bfloat16), bf16);
        // Heads 96 wide (MiniMind2's 768 over 8) take cuBLAS: the whole batch's scores (f32)
        // and probabilities (bf16), 6 bytes per score of [32, 8, 512, 512], and its head-major
        // copies, against one sequence's.
        let mut wide = m.clone();
        wide.hidden_size = 768;
        wide.head_dim = 96;
        let (full, least) = (
            device_memory(&wide, 32, 512, 1, Dtype::Bfloat16),
            device_memory_least(&wide, 32, 512, 1, Dtype::Bfloat16),
        );
        let more = 31.0 * 6.0 * (8 * 512 * 512) as f64;
        assert!(full - least > more && full - least < 1.3 * more, "{full} {least}");
    }
}
