//! `minimind bench`: training throughput of the configured model on synthetic tokens, on the
//! run's device.

use std::time::Instant;

use anyhow::{Context, Result};

use crate::config::{Config, Device, Dtype, PlannedRun};
use crate::engine::backend::{self, Task};
use crate::engine::{Engine, KernelTime, Kernels, flops_per_token};
use crate::rng::SplitMix64;

/// What one benchmark measured.
#[derive(Clone, Debug)]
pub struct BenchReport {
    pub steps: usize,
    pub tokens_per_step: usize,
    pub seconds: f64,
    pub tokens_per_s: f64,
    /// Model FLOPs (3x forward) per second.
    pub gflops: f64,
    pub threads: usize,
    /// The device, as the backend names it.
    pub device: String,
    /// Per-kernel times over the timed steps, when profiling.
    pub profile: Vec<(String, KernelTime)>,
    /// On a CUDA device, profiling: one step's calls as the step-time model counts them
    /// (`engine::dry`: FLOPs and bytes per launch), to print beside the launches.
    pub model: Vec<crate::engine::dry::Call>,
}

/// Runs `warmup` untimed steps, then `steps` timed ones: forward, backward, clip, AdamW, on
/// `device` in `dtype`.
pub fn run(
    config: &Config,
    device: Device,
    dtype: Dtype,
    steps: usize,
    warmup: usize,
    profile: bool,
) -> Result<BenchReport> {
    let pool = crate::threads::pool(config.train.threads)?;
    let on_gpu = matches!(device, Device::Cuda(_));
    pool.install(|| backend::run(device, dtype, profile, Bench { config, steps, warmup, on_gpu })?)
}

struct Bench<'a> {
    config: &'a Config,
    steps: usize,
    warmup: usize,
    /// The CUDA engine (a GPU or the emulator): its profile is launches, priced by the model.
    on_gpu: bool,
}

impl Task for Bench<'_> {
    type Out = Result<BenchReport>;

    fn run<K: Kernels>(self, kernels: K) -> Result<BenchReport> {
        let config = self.config;
        let (b, t) = (config.train.batch_size, config.data.max_seq_len);
        let m = &config.model;
        let mut engine = Engine::new(kernels, m.clone(), b, t)?;
        engine.init_weights(config.seed);
        let mut rng = SplitMix64::new(config.seed);
        let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % m.vocab_size as u64) as u32).collect();
        let targets: Vec<i32> =
            (0..b * t).map(|n| if n % t == t - 1 { -1 } else { ids[n + 1] as i32 }).collect();
        let optim = crate::train::optim_config(&config.train);
        let accum = config.train.accumulation_steps;
        let lr = config.train.learning_rate as f32;
        let step = |engine: &mut Engine<K>| {
            engine.begin_step();
            for _ in 0..accum {
                engine.accumulate(&ids, &targets, 1.0 / accum as f32, accum, None);
            }
            engine.update(lr, &optim);
        };
        for _ in 0..self.warmup {
            step(&mut engine);
        }
        // Waits for the device (a read of the step's numbers) so the clock times the work.
        engine.step_stats();
        engine.kernels.check()?;
        engine.kernels.reset_profile();
        let start = Instant::now();
        for _ in 0..self.steps {
            step(&mut engine);
        }
        engine.step_stats();
        engine.kernels.check()?;
        let seconds = start.elapsed().as_secs_f64();
        let tokens_per_step = b * t * accum;
        let tokens_per_s = (self.steps * tokens_per_step) as f64 / seconds;
        let gflops = 3.0 * flops_per_token(m, t) * tokens_per_s / 1e9;
        let profile = engine.kernels.profile();
        let model = if self.on_gpu && !profile.is_empty() {
            let step = crate::roofline::Step { b, t, accumulation: accum };
            crate::roofline::step_calls(m, step, engine.kernels.dtype(), &optim)?
        } else {
            Vec::new()
        };
        Ok(BenchReport {
            steps: self.steps,
            tokens_per_step,
            seconds,
            tokens_per_s,
            gflops,
            threads: rayon::current_num_threads(),
            device: engine.kernels.describe(),
            profile,
            model,
        })
    }
}

/// `minimind bench`: each run's throughput (and with `profile` where the time goes) on the
/// device it would train on.
pub fn report(runs: &[PlannedRun], steps: usize, profile: bool) -> Result<()> {
    for run in runs {
        let c = &run.config;
        let placement = crate::runner::preflight(c, &run.layered)?;
        for note in placement.all_notes() {
            println!("{note}");
        }
        let r = self::run(c, placement.device, placement.dtype, steps.max(1), 2, profile)?;
        println!(
            "{} on {}: hidden {} layers {} moe {} batch {} seq {} accumulation {} threads {}",
            run.tag.as_deref().unwrap_or(&c.name),
            r.device,
            c.model.hidden_size,
            c.model.num_hidden_layers,
            c.model.use_moe,
            c.train.batch_size,
            c.data.max_seq_len,
            c.train.accumulation_steps,
            r.threads
        );
        println!(
            "{} steps of {} tokens in {:.2} s: {:.1} GFLOP/s",
            r.steps, r.tokens_per_step, r.seconds, r.gflops
        );
        if profile && !r.model.is_empty() {
            print_device_profile(&r);
        } else if profile {
            print_profile(&r);
        }
        println!("tokens_per_s={:.1}", r.tokens_per_s);
    }
    Ok(())
}

/// `minimind bench FILE --matmul`: the CPU's f32 products (the `gemm` crate) and bf16 products
/// (`engine::cpu::bf16`, when the CPU has AVX512-BF16) at the first run's shapes, on its
/// threads; `rounds` alternating rounds, medians; each against its instruction's peak as
/// measured on these threads (`bf16::instruction_peaks`).
pub fn matmul(runs: &[PlannedRun], rounds: usize) -> Result<()> {
    use crate::engine::cpu::bf16;
    let c = &runs.first().context("no run to measure")?.config;
    let pool = crate::threads::pool(c.train.threads)?;
    let threads = pool.current_num_threads();
    let rows = c.train.batch_size * c.data.max_seq_len;
    println!("{} ({}), {threads} thread(s)", crate::run_dir::cpu_model(), bf16::describe_cpu());
    let (f32_peak, dp_peak) = pool.install(bf16::instruction_peaks);
    let amx_peak = pool.install(bf16::amx_peak);
    let show = |p: Option<f64>| p.map_or("-".into(), |p| format!("{p:.0} GFLOP/s"));
    println!(
        "instruction peaks (measured): f32 FMA {f32_peak:.0} GFLOP/s, bf16 vdpbf16ps {}, AMX tdpbf16ps {}; {} alternating round(s), medians",
        show(dp_peak),
        show(amx_peak),
        rounds.max(1)
    );
    // Each path's GFLOP/s, and its share of its own instruction's measured peak where known.
    let mut paths = vec![bf16::Isa::F32];
    paths.extend(bf16::available().into_iter().rev());
    let peak_of = |p: bf16::Isa| match p {
        bf16::Isa::F32 => Some(f32_peak),
        bf16::Isa::Avx512Bf16 => dp_peak,
        bf16::Isa::Amx => amx_peak,
    };
    let head: Vec<String> =
        paths.iter().map(|p| format!("{:>17}", format!("{} GF/s (%)", p.name()))).collect();
    println!("{:<28} {}  vs f32", "product [M, N, K]", head.join(" "));
    let m = &c.model;
    for (name, shape, transposed) in
        bf16::minimind_shapes(rows, m.hidden_size, m.intermediate_size, m.vocab_size)
    {
        let (lhs, rhs) = bf16::random_operands(shape, 3);
        let mut out = vec![0f32; shape[0] * shape[1]];
        let flop = 2.0 * shape.iter().map(|&d| d as f64).product::<f64>();
        let mut time = |path: bf16::Isa| {
            let t = Instant::now();
            pool.install(|| bf16::product(shape, transposed, (&lhs, &rhs), &mut out, path));
            flop / t.elapsed().as_secs_f64() / 1e9
        };
        let mut runs: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
        for &p in &paths {
            time(p);
        }
        for _ in 0..rounds.max(1) {
            for (i, &p) in paths.iter().enumerate() {
                runs[i].push(time(p));
            }
        }
        let medians: Vec<f64> = runs.iter_mut().map(|r| median(r)).collect();
        let cells: Vec<String> = paths
            .iter()
            .zip(&medians)
            .map(|(&p, &g)| {
                let share = peak_of(p).map_or(String::new(), |peak| format!(" ({:.0}%)", 100.0 * g / peak));
                format!("{:>17}", format!("{g:.1}{share}"))
            })
            .collect();
        let best = medians[1..].iter().copied().fold(f64::NAN, f64::max);
        let ratio = if best.is_nan() { "-".to_string() } else { format!("{:.2}x", best / medians[0]) };
        println!("{name:<28} {}  {ratio}", cells.join(" "));
    }
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The CUDA engine's profile: per kernel, launches per step (counted on the device), the
/// FLOPs and bytes the step-time model gives them, the time measured on a GPU (the emulator
/// cannot time) and the model's prediction on a GPU it knows; then per class, predicted
/// against measured: the factor to recalibrate `roofline::efficiency` by.
fn print_device_profile(r: &BenchReport) {
    use std::collections::BTreeMap;
    let gpu = crate::roofline::find(&r.device).ok();
    let steps = r.steps as f64;
    // The model's calls of one step, by kernel: FLOPs, bytes, predicted seconds, class.
    let mut model: BTreeMap<&str, (f64, f64, f64, crate::engine::dry::Class)> = BTreeMap::new();
    for c in &r.model {
        let e = model.entry(c.kernel).or_insert((0.0, 0.0, 0.0, c.class));
        e.0 += c.flops;
        e.1 += c.bytes;
        e.2 += gpu.map_or(0.0, |g| crate::roofline::seconds(c, g));
    }
    let measured = r.profile.iter().any(|(_, t)| t.seconds > 0.0);
    println!(
        "{:<30} {:>9} {:>10} {:>10} {:>12} {:>13}",
        "kernel", "launches", "GFLOP", "MB moved", "measured ms", "predicted ms"
    );
    let mut classes: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (name, t) in &r.profile {
        let (flops, bytes, predicted, class) = model.get(name.as_str()).copied().unwrap_or((
            0.0,
            0.0,
            0.0,
            crate::engine::dry::Class::Pointwise,
        ));
        let ms = t.seconds * 1e3 / steps;
        let c = classes.entry(class.name()).or_default();
        *c = (c.0 + ms, c.1 + predicted * 1e3);
        println!(
            "{:<30} {:>9} {:>10.2} {:>10.1} {:>12} {:>13}",
            name,
            format!("{:.0}", t.calls as f64 / steps),
            flops / 1e9,
            bytes / 1e6,
            if measured { format!("{ms:.3}") } else { "-".into() },
            if gpu.is_some() { format!("{:.3}", predicted * 1e3) } else { "-".into() }
        );
    }
    println!("per step; FLOPs and bytes as src/engine/dry.rs counts them");
    match (gpu, measured) {
        (Some(g), true) => {
            println!(
                "{:<12} {:>12} {:>13} {:>16}",
                "class", "measured ms", "predicted ms", "predicted/measured"
            );
            for (class, (ms, predicted)) in &classes {
                println!("{:<12} {:>12.3} {:>13.3} {:>16.2}", class, ms, predicted, predicted / ms.max(1e-9));
            }
            println!(
                "on {}: a class's efficiency in src/roofline.rs times predicted/measured is what this GPU reached",
                g.name
            );
        }
        (None, true) => println!("no model of this GPU in src/roofline.rs: times measured, none predicted"),
        (_, false) => println!("the emulator counts launches but cannot time them"),
    }
}

fn print_profile(r: &BenchReport) {
    let total: f64 = r.profile.iter().map(|(_, t)| t.seconds).sum();
    println!("{:<36} {:>7} {:>9} {:>6} {:>8}", "kernel", "calls", "ms/step", "share", "GFLOP/s");
    for (name, t) in &r.profile {
        let gflops = if t.flops > 0.0 { format!("{:.1}", t.flops / t.seconds / 1e9) } else { "-".into() };
        println!(
            "{:<36} {:>7} {:>9.2} {:>5.1}% {:>8}",
            name,
            t.calls / r.steps as u64,
            t.seconds * 1e3 / r.steps as f64,
            100.0 * t.seconds / total,
            gflops
        );
    }
    println!(
        "kernels total {:.1} ms/step of {:.1} ms/step wall",
        total * 1e3 / r.steps as f64,
        r.seconds * 1e3 / r.steps as f64
    );
}
