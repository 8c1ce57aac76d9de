//! `minimind bench`: training throughput of the configured model on synthetic tokens, on the
//! run's device.

use std::time::Instant;

use anyhow::Result;

use crate::config::{Config, Device, Dtype};
use crate::engine::backend::{self, Task};
use crate::engine::{Engine, KernelTime, Kernels, OptimConfig, SplitMix64, flops_per_token};

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
    let pool = crate::train::thread_pool(config.train.threads)?;
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
        let optim = OptimConfig::from_train(&config.train);
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
