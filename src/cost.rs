//! What a run will cost before it starts: parameters, memory (weights, gradients, AdamW
//! moments, activations, the transient buffers of a checkpoint; the peak), FLOPs per optimiser
//! step and an estimated time, from training steps of a reference model measured once per
//! machine, thread count and product path, and cached ([`Speed`]). The arithmetic is pure;
//! measuring and reading the machine are the edges.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};

use crate::config::{Config, Dtype, ModelConfig, PlannedRun};
use crate::engine::cpu::bf16::Isa;
use crate::engine::{
    Engine, Footprint, OptimConfig, cpu::Cpu, flops_per_token, keep_attention_probs, workspace_bytes,
};
use crate::metrics::say;
use crate::units::{duration, human};

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
    /// This machine's measured speed at the run's thread count, on the run's product path.
    pub speed: Option<(Speed, Isa)>,
}

impl Cost {
    /// Pure: the cost of `c` over `steps`, timed at `speed`; `panels`: the run keeps the
    /// CPU's packed bf16 weights ([`keeps_panels`] where it trains).
    pub fn of(c: &Config, steps: Option<usize>, speed: Option<(Speed, Isa)>, panels: bool) -> Cost {
        let (b, t) = (c.train.batch_size, c.data.max_seq_len);
        let tokens = (b * t * c.train.accumulation_steps) as f64;
        Cost {
            parameters: c.model.parameter_count(),
            memory: memory(&c.model, b, t, c.train.accumulation_steps, panels),
            flops_per_step: 3.0 * flops_per_token(&c.model, t) * tokens,
            steps,
            speed,
        }
    }

    /// The step's micro-batches at the measured model FLOP rate, then its update at the
    /// measured time per parameter.
    pub fn step_seconds(&self) -> Option<f64> {
        self.speed.map(|(s, _)| s.seconds(self.flops_per_step, self.parameters))
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
        if let (Some(step), Some((speed, path))) = (self.step_seconds(), self.speed) {
            s.push_str(&format!("; about {} per step", duration_fine(step)));
            if let Some(n) = self.steps {
                s.push_str(&format!(", {} for {n} steps", duration(step * n as f64)));
            }
            let on =
                if path == Isa::F32 { String::new() } else { format!(", bf16 products on {}", path.name()) };
            s.push_str(&format!(
                " (from MiniMind2-small steps on this machine{on}: {}FLOP/s forward and backward, {:.2} ns a parameter to update)",
                human(speed.gflops * 1e9),
                speed.update_ns
            ));
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

/// How fast this machine trains, measured on a reference model
/// ([`ModelConfig::minimind2_small`]: dense, micro-batches of 4 x 256 tokens) on one product
/// path: its forward and backward as model FLOP/s, and its update (the gradient norm and
/// AdamW, passes over memory that the product rate says nothing about) as time per parameter.
/// A step of another model is priced by its FLOPs and its parameters ([`Speed::seconds`]): the
/// reference's shares of products, attention and memory passes stand for every model's, which
/// holds best near its size (BENCHMARKS.md, "Cost estimates against measurements").
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Speed {
    /// Model FLOPs (3x the forward's) per second of micro-batches, in GFLOP/s.
    pub gflops: f64,
    /// Nanoseconds an update takes per parameter.
    pub update_ns: f64,
}

impl Speed {
    /// Seconds of an optimiser step of `flops` model FLOPs over `parameters`. Pure.
    pub fn seconds(&self, flops: f64, parameters: u64) -> f64 {
        flops / (self.gflops * 1e9) + parameters as f64 * self.update_ns * 1e-9
    }
}

/// This machine's [`Speed`] with `threads` threads (0: all cores) on the product path of
/// `dtype`: measured once (one to three seconds) and cached per CPU model, thread count and
/// path, on disk and for the process. Processes that start together (a sweep's `-j 2`)
/// measure one at a time: the others wait for the lock and read what the first cached, rather
/// than time steps side by side.
pub fn machine_speed(threads: usize, dtype: Dtype) -> Result<(Speed, Isa)> {
    static KNOWN: std::sync::Mutex<std::collections::BTreeMap<String, Speed>> =
        std::sync::Mutex::new(std::collections::BTreeMap::new());
    let threads =
        if threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { threads };
    let isa = cpu_path(dtype);
    let key = cache_key(&crate::run_dir::cpu_model(), threads, isa);
    let mut known = KNOWN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(&s) = known.get(&key) {
        return Ok((s, isa));
    }
    let s = speed_of(threads, isa, &key)?;
    known.insert(key, s);
    Ok((s, isa))
}

/// [`machine_speed`] from the cache file, else measured and kept there.
fn speed_of(threads: usize, isa: Isa, key: &str) -> Result<Speed> {
    let path = cache_file();
    let read = || -> std::collections::BTreeMap<String, serde_json::Value> {
        path.as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default()
    };
    let cached = |table: &std::collections::BTreeMap<String, serde_json::Value>| {
        table.get(key).and_then(|v| serde_json::from_value::<Speed>(v.clone()).ok())
    };
    if let Some(s) = cached(&read()) {
        return Ok(s);
    }
    // A cache: where its folder cannot be made or locked, the measurement is only not kept.
    let dir = path.as_ref().and_then(|p| p.parent()).filter(|d| std::fs::create_dir_all(d).is_ok());
    let _lock = dir.and_then(|d| crate::files::lock_file(&d.join("speed.lock"), true).ok().flatten());
    let mut table = read();
    if let Some(s) = cached(&table) {
        return Ok(s);
    }
    let s = measure(threads, isa)?;
    table.insert(key.to_string(), serde_json::to_value(s)?);
    if let (Some(p), Some(_)) = (&path, dir) {
        let _ = crate::files::write_atomic(p, serde_json::to_string_pretty(&table)?.as_bytes());
    }
    Ok(s)
}

/// The revision of what [`measure`] times, in the cache's key: raised when a change moves the
/// engine's speed on a path (or what is measured), so a speed cached before is measured again
/// instead of pricing runs at the old one.
const ENGINE_REVISION: u32 = 1;

/// The cache's key for a measurement. Pure.
fn cache_key(cpu: &str, threads: usize, path: Isa) -> String {
    let version = env!("CARGO_PKG_VERSION");
    format!("{cpu}|{threads} threads|step on {} r{ENGINE_REVISION}|{version}", path.name())
}

/// `$XDG_CACHE_HOME/minimind/speed.json`, else `~/.cache/minimind/speed.json`: a file of its
/// own, as binaries before [`Speed`] rewrite `throughput.json` (their 1024³ rates) whole.
fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("minimind").join("speed.json"))
}

/// Times training steps of MiniMind2-small ([`ModelConfig::minimind2_small`]) on synthetic
/// tokens on the CPU engine's `path`: one untimed (first touches of the buffers), then at least
/// one and about 0.4 s more, the micro-batch and the update apart.
fn measure(threads: usize, path: Isa) -> Result<Speed> {
    let (b, t) = (4, 256);
    let m = ModelConfig::minimind2_small();
    let pool = crate::threads::pool(threads).context("measuring this machine's training speed")?;
    pool.install(|| {
        let mut engine = Engine::new(Cpu::new().with_products(path), m.clone(), b, t)?;
        engine.init_weights(1);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7919 % m.vocab_size) as u32).collect();
        let targets: Vec<i32> =
            (0..b * t).map(|i| if i % t == t - 1 { -1 } else { ids[i + 1] as i32 }).collect();
        let optim = OptimConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
        let (mut micro, mut update, mut step) = (0.0, 0.0, 0);
        loop {
            let start = Instant::now();
            engine.begin_step();
            engine.accumulate(&ids, &targets, 1.0, 1, None);
            let forward_backward = start.elapsed().as_secs_f64();
            engine.update(1e-4, &optim);
            if step > 0 {
                micro += forward_backward;
                update += start.elapsed().as_secs_f64() - forward_backward;
                if micro + update >= 0.4 {
                    let flops = 3.0 * flops_per_token(&m, t) * (b * t) as f64 * step as f64;
                    let per_param = update / step as f64 / m.parameter_count() as f64;
                    return Ok(Speed { gflops: flops / micro / 1e9, update_ns: per_param * 1e9 });
                }
            }
            step += 1;
        }
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
    Cost::of(c, planned_steps(c), machine_speed(c.train.threads, c.train.dtype).ok(), panels)
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
    say(&format!(
        "{} run(s); time estimated from training steps measured on this machine (MiniMind2-small, 4 x 256 tokens)",
        runs.len()
    ));
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
    fn the_speed_is_cached_per_product_path_and_engine_revision() {
        let version = env!("CARGO_PKG_VERSION");
        let r = ENGINE_REVISION;
        assert_eq!(cache_key("Xeon", 2, Isa::F32), format!("Xeon|2 threads|step on f32 r{r}|{version}"));
        assert_eq!(cache_key("Xeon", 2, Isa::Amx), format!("Xeon|2 threads|step on amx r{r}|{version}"));
        assert_ne!(cache_key("Xeon", 2, Isa::Avx512Bf16), cache_key("Xeon", 2, Isa::Amx));
        assert_ne!(cache_key("Xeon", 1, Isa::F32), cache_key("Xeon", 2, Isa::F32));
        // The keys of the 1024³ product rate cached before (a rate, not a Speed) are others.
        assert_ne!(cache_key("Xeon", 2, Isa::F32), format!("Xeon|2 threads|{version}"));
    }

    /// A step is its micro-batches' FLOPs at the forward and backward's rate plus its update
    /// at the time a parameter takes: accumulation multiplies only the first.
    #[test]
    fn a_step_is_its_flops_at_the_measured_rate_plus_its_update() {
        let speed = Speed { gflops: 500.0, update_ns: 0.8 };
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/bench/dense.toml");
        let mut c = crate::config::load(&file, &[], &[]).unwrap().remove(0).config;
        let base = Cost::of(&c, None, Some((speed, Isa::F32)), false);
        let micro = base.flops_per_step / 500e9;
        let update = base.parameters as f64 * 0.8e-9;
        for (accumulation, want) in [(1, micro + update), (8, 8.0 * micro + update)] {
            c.train.accumulation_steps = accumulation;
            let got = Cost::of(&c, None, Some((speed, Isa::F32)), false).step_seconds().unwrap();
            assert!((got - want).abs() <= 1e-12 * want, "accumulation {accumulation}: {got} vs {want}");
        }
        assert_eq!(Cost::of(&c, None, None, false).step_seconds(), None);
        assert_eq!(speed.seconds(1e12, 1_000_000), 2.0 + 0.0008);
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
        let cost = Cost { parameters: 1, memory: big.clone(), flops_per_step: 1.0, steps: None, speed: None };
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
