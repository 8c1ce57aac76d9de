//! `minimind bench`: training throughput of the configured model on synthetic tokens.

use std::time::Instant;

use anyhow::Result;

use crate::config::Config;
use crate::engine::cpu::{Cpu, KernelTime};
use crate::engine::{Engine, OptimConfig, SplitMix64, flops_per_token};

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
    /// Per-kernel times over the timed steps, when profiling.
    pub profile: Vec<(String, KernelTime)>,
}

/// Runs `warmup` untimed steps, then `steps` timed ones: forward, backward, clip, AdamW.
pub fn run(config: &Config, steps: usize, warmup: usize, profile: bool) -> Result<BenchReport> {
    let pool = crate::train::thread_pool(config.train.threads)?;
    pool.install(|| {
        let (b, t) = (config.train.batch_size, config.data.max_seq_len);
        let m = &config.model;
        let cpu = if profile { Cpu::profiled() } else { Cpu::new() };
        let mut engine = Engine::new(cpu, m.clone(), b, t)?;
        engine.init_weights(config.seed);
        let mut rng = SplitMix64::new(config.seed);
        let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % m.vocab_size as u64) as u32).collect();
        let targets: Vec<i32> =
            (0..b * t).map(|n| if n % t == t - 1 { -1 } else { ids[n + 1] as i32 }).collect();
        let optim = OptimConfig::from_train(&config.train);
        let accum = config.train.accumulation_steps;
        let lr = config.train.learning_rate as f32;
        let step = |engine: &mut Engine<Cpu>| {
            engine.begin_step();
            for _ in 0..accum {
                engine.accumulate(&ids, &targets, 1.0 / accum as f32, accum);
            }
            engine.update(lr, &optim);
        };
        for _ in 0..warmup {
            step(&mut engine);
        }
        engine.kernels.reset_profile();
        let start = Instant::now();
        for _ in 0..steps {
            step(&mut engine);
        }
        let seconds = start.elapsed().as_secs_f64();
        let tokens_per_step = b * t * accum;
        let tokens_per_s = (steps * tokens_per_step) as f64 / seconds;
        let gflops = 3.0 * flops_per_token(m, t) * tokens_per_s / 1e9;
        Ok(BenchReport {
            steps,
            tokens_per_step,
            seconds,
            tokens_per_s,
            gflops,
            threads: rayon::current_num_threads(),
            profile: engine.kernels.profile(),
        })
    })
}
