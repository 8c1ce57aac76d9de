//! A model of GPU step time, so a run can be priced before a GPU is rented: one training step
//! of the model goes through the dry backend (`engine::dry`: the CUDA engine's launches,
//! products and host reads, with their FLOPs and bytes), and each call is priced on a named
//! GPU by a roofline with an efficiency per kind of work. `minimind plan FILE --gpu NAME`
//! prints it; a run on a GPU prints it in its header; the GPU check prints it beside what it
//! measures, and the efficiencies below are what to recalibrate from that.
//!
//! The arithmetic is pure. The efficiencies are assumptions until measured (BENCHMARKS.md).

use crate::config::{Config, Dtype, ModelConfig, PlannedRun};
use crate::engine::dry::{Call, Class, Dry, Unit};
use crate::engine::{Engine, Kernels, OptimConfig, flops_per_token};
use crate::metrics::say;
use crate::units::human;

/// A GPU's peaks: dense tensor-core throughput with 16-bit operands and f32 accumulation,
/// the CUDA cores' f32 throughput, memory bandwidth and size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gpu {
    pub name: &'static str,
    /// Lower-case fragments that name it (`--gpu h200`, or the driver's "NVIDIA H200").
    pub aliases: &'static [&'static str],
    pub tensor_tflops: f64,
    pub cuda_tflops: f64,
    pub bandwidth_gbs: f64,
    pub memory_gb: f64,
    pub source: &'static str,
}

/// The GPUs the model knows. Dense figures (no structured sparsity); for the GeForce cards the
/// tensor rate is the one with f32 accumulation, which is what cuBLAS uses here.
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "H100 SXM",
        aliases: &["h100"],
        tensor_tflops: 989.4,
        cuda_tflops: 66.9,
        bandwidth_gbs: 3350.0,
        memory_gb: 80.0,
        source: "NVIDIA H100 Tensor Core GPU datasheet (SXM5)",
    },
    Gpu {
        name: "H200",
        aliases: &["h200"],
        tensor_tflops: 989.4,
        cuda_tflops: 66.9,
        bandwidth_gbs: 4800.0,
        memory_gb: 141.0,
        source: "NVIDIA H200 Tensor Core GPU datasheet (SXM)",
    },
    Gpu {
        name: "A100 80GB",
        aliases: &["a100"],
        tensor_tflops: 312.0,
        cuda_tflops: 19.5,
        bandwidth_gbs: 2039.0,
        memory_gb: 80.0,
        source: "NVIDIA A100 Tensor Core GPU datasheet (80GB SXM)",
    },
    Gpu {
        name: "L40S",
        aliases: &["l40s"],
        tensor_tflops: 362.1,
        cuda_tflops: 91.6,
        bandwidth_gbs: 864.0,
        memory_gb: 48.0,
        source: "NVIDIA L40S datasheet",
    },
    Gpu {
        name: "RTX 4090",
        aliases: &["4090"],
        tensor_tflops: 165.2,
        cuda_tflops: 82.6,
        bandwidth_gbs: 1008.0,
        memory_gb: 24.0,
        source: "NVIDIA Ada Lovelace architecture whitepaper (GeForce RTX 4090)",
    },
    Gpu {
        name: "RTX 3090",
        aliases: &["3090"],
        tensor_tflops: 71.0,
        cuda_tflops: 35.6,
        bandwidth_gbs: 936.0,
        memory_gb: 24.0,
        source: "NVIDIA Ampere GA102 GPU architecture whitepaper (GeForce RTX 3090)",
    },
];

/// The GPU `name` names (a table entry's name or alias, case-insensitive, anywhere in it:
/// "NVIDIA H200" finds the H200), or the known names.
pub fn find(name: &str) -> Result<&'static Gpu, String> {
    let lower = name.to_lowercase();
    GPUS.iter()
        .find(|g| g.name.to_lowercase() == lower || g.aliases.iter().any(|a| lower.contains(a)))
        .ok_or_else(|| {
            let known: Vec<&str> = GPUS.iter().map(|g| g.name).collect();
            format!("no GPU named \"{name}\" in the model; known: {}", known.join(", "))
        })
}

/// Fractions of the peaks that each kind of work reaches. Assumptions until a GPU measures
/// them (the GPU check prints predicted against measured per class; recalibrate here).
pub mod efficiency {
    /// cuBLAS products of the linear layers on tensor cores (MiniMind2's shapes: M = B*T rows,
    /// N and K 128..6400): large enough to reach most of the dense peak.
    pub const LINEAR_TENSOR: f64 = 0.70;
    /// The attention's batched products, of depth D = 64 or [T, T] outputs: lower.
    pub const ATTENTION_TENSOR: f64 = 0.45;
    /// The flash kernels on `mma.sync`: FlashAttention-2 reaches 35-50% of an A100's or
    /// H100's peak at D 64 with ldmatrix, cp.async pipelines and swizzled tiles; ours has
    /// none of those (plain shared-memory reads into fragments, one stage), and its
    /// backward recomputes S and dP in the dq kernel: assumed 25%.
    pub const FLASH_TENSOR: f64 = 0.25;
    /// f32 products on the CUDA cores (float32 runs, TF32 off).
    pub const CUDA_GEMM: f64 = 0.80;
    /// The tiled f32 attention kernels: shared-memory bound, 9 reads per 8 FMA, so at most
    /// 8/9 of a quarter of the f32 peak (one read per clock against four FMA pipes).
    pub const TILED_ATTENTION: f64 = 0.22;
    /// Memory-bound kernels against the peak bandwidth.
    pub const BANDWIDTH: f64 = 0.75;
    /// What a kernel launch costs the device beyond its work (back-to-back small kernels).
    pub const LAUNCH_SECONDS: f64 = 2e-6;
    /// A read the host waits for: the stream drains, the copy, the next launch.
    pub const HOST_READ_SECONDS: f64 = 15e-6;
}

/// The time of one call on `gpu`: the larger of its arithmetic and its memory traffic at the
/// class's efficiency, plus the launch. Pure.
pub fn seconds(call: &Call, gpu: &Gpu) -> f64 {
    use efficiency as e;
    let memory = call.bytes / (gpu.bandwidth_gbs * 1e9 * e::BANDWIDTH);
    let compute = match call.unit {
        Unit::Tensor => {
            let eff = match (call.class, call.tiled) {
                (Class::Attention, true) => e::FLASH_TENSOR,
                (Class::Attention, false) => e::ATTENTION_TENSOR,
                _ => e::LINEAR_TENSOR,
            };
            call.flops / (gpu.tensor_tflops * 1e12 * eff)
        }
        Unit::Cuda => {
            let eff = if call.tiled { e::TILED_ATTENTION } else { e::CUDA_GEMM };
            call.flops / (gpu.cuda_tflops * 1e12 * eff)
        }
        Unit::Memory => 0.0,
        Unit::Host => return e::HOST_READ_SECONDS,
    };
    compute.max(memory) + e::LAUNCH_SECONDS
}

/// One class's share of a step.
#[derive(Clone, Debug, PartialEq)]
pub struct Share {
    pub class: Class,
    pub calls: usize,
    pub flops: f64,
    pub bytes: f64,
    pub seconds: f64,
}

/// A predicted step of a run on a GPU.
#[derive(Clone, Debug, PartialEq)]
pub struct Prediction {
    pub gpu: Gpu,
    pub dtype: Dtype,
    /// Per class, the largest first.
    pub shares: Vec<Share>,
    pub step_seconds: f64,
    pub tokens_per_step: usize,
    /// The model's FLOPs (3x forward, causal attention) per second over the peak of the
    /// run's arithmetic (tensor cores in bf16/f16, CUDA cores in float32).
    pub mfu: f64,
    /// Device memory the run needs, and whether it fits.
    pub memory_bytes: f64,
    pub fits: bool,
}

impl Prediction {
    pub fn tokens_per_s(&self) -> f64 {
        self.tokens_per_step as f64 / self.step_seconds
    }

    /// One line: `predicted on H200 (bfloat16): 14.7 ms/step, 1.1M tokens/s, MFU 18%
    /// (attention 7.1 ms, matmul 3.7 ms, ...); ~49s for 200 steps`.
    pub fn describe(&self, steps: Option<usize>) -> String {
        let classes: Vec<String> =
            self.shares.iter().map(|s| format!("{} {:.2} ms", s.class.name(), s.seconds * 1e3)).collect();
        let mut line = format!(
            "predicted on {} ({}): {:.2} ms/step, {} tokens/s, MFU {:.0}% ({})",
            self.gpu.name,
            self.dtype.name(),
            self.step_seconds * 1e3,
            human(self.tokens_per_s()),
            100.0 * self.mfu,
            classes.join(", ")
        );
        if let Some(n) = steps {
            line.push_str(&format!(
                "; ~{} for {n} steps",
                crate::units::duration(self.step_seconds * n as f64)
            ));
        }
        if !self.fits {
            line.push_str(&format!(
                "; needs {}B, more than its {:.0} GB",
                human(self.memory_bytes),
                self.gpu.memory_gb
            ));
        }
        line
    }
}

/// One optimiser step of `accumulation` micro-batches of synthetic tokens on `engine`: what
/// the model prices (on the dry backend), and what a test runs on the emulated GPU to hold the
/// dry backend to the CUDA engine's launches.
pub fn one_step<K: Kernels>(engine: &mut Engine<K>, accumulation: usize, lr: f32, optim: &OptimConfig) {
    let (b, t) = engine.batch_capacity();
    let v = engine.config.vocab_size;
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % v) as u32).collect();
    let targets: Vec<i32> = (0..b * t).map(|n| if n % t == t - 1 { -1 } else { ids[n + 1] as i32 }).collect();
    engine.begin_step();
    for _ in 0..accumulation {
        engine.accumulate(&ids, &targets, 1.0 / accumulation as f32, accumulation, None);
    }
    engine.update(lr, optim);
}

/// What an optimiser step is made of: `accumulation` micro-batches of B sequences of T tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub b: usize,
    pub t: usize,
    pub accumulation: usize,
}

impl Step {
    pub fn of(c: &Config) -> Step {
        Step { b: c.train.batch_size, t: c.data.max_seq_len, accumulation: c.train.accumulation_steps }
    }
}

/// The calls of one optimiser step of model `m` on the CUDA engine in `dtype`.
pub fn step_calls(
    m: &ModelConfig,
    step: Step,
    dtype: Dtype,
    optim: &OptimConfig,
) -> anyhow::Result<Vec<Call>> {
    let mut engine = Engine::new(Dry::new(dtype), m.clone(), step.b, step.t)?;
    one_step(&mut engine, step.accumulation, 1e-3, optim);
    Ok(engine.kernels.take())
}

/// The predicted step of run `c` on `gpu`, in its dtype.
pub fn predict_run(c: &Config, gpu: &Gpu) -> anyhow::Result<Prediction> {
    let (step, dtype) = (Step::of(c), c.train.dtype);
    let calls = step_calls(&c.model, step, dtype, &crate::train::optim_config(&c.train))?;
    Ok(predict(&c.model, step, dtype, &calls, gpu))
}

/// The step of model `m` in `dtype` on `gpu`, from its calls. Pure.
pub fn predict(m: &ModelConfig, step: Step, dtype: Dtype, calls: &[Call], gpu: &Gpu) -> Prediction {
    let mut shares: Vec<Share> = Class::ALL
        .iter()
        .map(|&class| Share { class, calls: 0, flops: 0.0, bytes: 0.0, seconds: 0.0 })
        .collect();
    for call in calls {
        let s = shares.iter_mut().find(|s| s.class == call.class).expect("every class has a share");
        s.calls += 1;
        s.flops += call.flops;
        s.bytes += call.bytes;
        s.seconds += seconds(call, gpu);
    }
    shares.retain(|s| s.calls > 0);
    shares.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
    let step_seconds: f64 = shares.iter().map(|s| s.seconds).sum();
    let Step { b, t, accumulation } = step;
    let tokens_per_step = b * t * accumulation;
    let peak = if dtype == Dtype::Float32 { gpu.cuda_tflops } else { gpu.tensor_tflops } * 1e12;
    let mfu = 3.0 * flops_per_token(m, t) * tokens_per_step as f64 / step_seconds / peak;
    let memory_bytes = crate::cost::device_memory_least(m, b, t, accumulation, dtype);
    Prediction {
        gpu: *gpu,
        dtype,
        shares,
        step_seconds,
        tokens_per_step,
        mfu,
        memory_bytes,
        fits: memory_bytes <= gpu.memory_gb * 1e9,
    }
}

/// Each run's predicted step on `gpu`, class by class (see `roofline`).
pub fn print_plan(runs: &[PlannedRun], gpu: &Gpu) -> anyhow::Result<()> {
    say(&format!(
        "on {} ({:.0} TFLOP/s bf16 tensor, {:.1} f32, {:.0} GB/s, {:.0} GB; {}):",
        gpu.name, gpu.tensor_tflops, gpu.cuda_tflops, gpu.bandwidth_gbs, gpu.memory_gb, gpu.source
    ));
    for run in runs {
        let c = &run.config;
        let p = predict_run(c, gpu)?;
        say(&format!(
            "{}: {}",
            run.tag.as_deref().unwrap_or(&c.name),
            p.describe(crate::cost::planned_steps(c))
        ));
        say(&format!(
            "  {:<10} {:>6} {:>10} {:>10} {:>9} {:>6}",
            "class", "calls", "GFLOP", "GB moved", "ms", "share"
        ));
        for sh in &p.shares {
            say(&format!(
                "  {:<10} {:>6} {:>10.1} {:>10.2} {:>9.3} {:>5.0}%",
                sh.class.name(),
                sh.calls,
                sh.flops / 1e9,
                sh.bytes / 1e9,
                sh.seconds * 1e3,
                100.0 * sh.seconds / p.step_seconds
            ));
        }
        say(&format!(
            "  memory {}B of {:.0} GB: {}",
            human(p.memory_bytes),
            gpu.memory_gb,
            if p.fits { "fits" } else { "does not fit" }
        ));
    }
    say("efficiencies assumed per class (src/roofline.rs), until a GPU measures them");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_names_table() {
        for (name, want) in [
            ("h200", "H200"),
            ("NVIDIA H100 80GB HBM3", "H100 SXM"),
            ("RTX 3090", "RTX 3090"),
            ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ] {
            assert_eq!(find(name).unwrap().name, want, "{name}");
        }
        let err = find("Voodoo2").unwrap_err();
        assert!(
            err.contains("no GPU named \"Voodoo2\"") && err.contains("H200") && err.contains("RTX 3090"),
            "{err}"
        );
    }

    fn minimind2_small(moe: bool) -> ModelConfig {
        let json = format!(
            r#"{{"vocab_size": 6400, "hidden_size": 512, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 2, "use_moe": {moe}}}"#
        );
        serde_json::from_str::<crate::engine::hf::HfConfig>(&json).unwrap().to_model().unwrap()
    }

    fn by_class(calls: &[Call]) -> std::collections::BTreeMap<&'static str, (usize, f64, f64)> {
        let mut out = std::collections::BTreeMap::new();
        for c in calls {
            let e = out.entry(c.class.name()).or_insert((0, 0.0, 0.0));
            *e = (e.0 + 1, e.1 + c.flops, e.2 + c.bytes);
        }
        out
    }

    #[test]
    fn a_known_shape_gives_known_flops_and_bytes_per_class() {
        // MiniMind2-small dense at 32 x 512, one micro-batch: FLOPs by hand, class by class.
        let m = minimind2_small(false);
        let step = Step { b: 32, t: 512, accumulation: 1 };
        let optim = OptimConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
        let (n, c, i, v, l) = (32.0 * 512.0, 512.0, 1408.0, 6400.0, 8.0);
        let (hd, gd) = (512.0, 128.0);
        // Linear layers: q, k, v, o, gate|up, down per layer, and the LM head; forward, and
        // backward to the inputs and the weights: three products each.
        let linear = l * (c * hd + 2.0 * c * gd + hd * c + 3.0 * c * i) + v * c;
        let params = m.parameter_count() as f64;
        for (dtype, attention_flops) in [
            // bf16: the flash kernels skip masked tiles: 2 forward, 3 in dq (S and dP again),
            // 4 in dkv: nine half squares.
            (Dtype::Bfloat16, 9.0 * 2.0 * 32.0 * 8.0 * 512.0 * 256.0 * 64.0 * l),
            // float32: the tiled kernels skip masked tiles: nine half squares.
            (Dtype::Float32, 9.0 * 2.0 * 32.0 * 8.0 * 512.0 * 256.0 * 64.0 * l),
        ] {
            let classes = by_class(&step_calls(&m, step, dtype, &optim).unwrap());
            assert_eq!(classes["matmul"].1, 3.0 * 2.0 * n * linear, "{dtype:?}");
            assert_eq!(classes["attention"].1, attention_flops, "{dtype:?}");
            // AdamW reads p, g, m, v and writes them back (g zeroed), plus the 16-bit copy;
            // the gradient norm reads g once.
            let copy = if dtype == Dtype::Float32 { 0.0 } else { 2.0 };
            assert_eq!(classes["optimizer"].2, params * (32.0 + copy + 4.0) + 8.0 * 512.0, "{dtype:?}");
            // Cross-entropy: two reads and a write of the [N, V] logits, the losses, the targets.
            let a = if dtype == Dtype::Float32 { 4.0 } else { 2.0 };
            assert_eq!(classes["loss"].2 - 4.0 * n, 3.0 * a * n * v + 4.0 * n + 4.0 * n, "{dtype:?}");
            assert!(!classes.contains_key("routing"));
        }
        // MoE adds routing: a host read per layer, the routing kernels.
        let moe = step_calls(&minimind2_small(true), step, Dtype::Bfloat16, &optim).unwrap();
        let reads = moe.iter().filter(|c| c.unit == Unit::Host).count();
        assert_eq!(reads, 8, "one read of the expert offsets per MoE layer");
    }

    #[test]
    fn minimind2_small_on_an_h200_before_and_now() {
        // The model's verdict on this engine and on its earlier attention paths: the tiled
        // f32 kernels (before #17), cuBLAS products with the scores in memory, the flash
        // kernels (now). The numbers BENCHMARKS.md quotes (`-- --nocapture` prints them).
        use crate::engine::dry::Attention;
        let step = Step { b: 32, t: 512, accumulation: 1 };
        let optim = OptimConfig { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1, grad_clip: 1.0 };
        let gpu = find("h200").unwrap();
        for moe in [false, true] {
            let m = minimind2_small(moe);
            let with = |attention: Attention| {
                let dry = Dry::with_attention(Dtype::Bfloat16, attention);
                let mut engine = Engine::new(dry, m.clone(), step.b, step.t).unwrap();
                one_step(&mut engine, 1, 1e-3, &optim);
                predict(&m, step, Dtype::Bfloat16, &engine.kernels.take(), gpu)
            };
            let (tiled, cublas, flash) =
                (with(Attention::Tiled), with(Attention::Cublas), with(Attention::Flash));
            let now = predict(
                &m,
                step,
                Dtype::Bfloat16,
                &step_calls(&m, step, Dtype::Bfloat16, &optim).unwrap(),
                gpu,
            );
            assert_eq!(now.step_seconds, flash.step_seconds, "the engine takes the flash kernels");
            println!("moe {moe}, tiled:  {}", tiled.describe(None));
            println!("moe {moe}, cuBLAS: {}", cublas.describe(None));
            println!("moe {moe}, flash:  {}", flash.describe(None));
            assert!(tiled.step_seconds > cublas.step_seconds && cublas.step_seconds > flash.step_seconds);
            assert!(flash.fits && flash.mfu > cublas.mfu, "{flash:?}");
            assert_ne!(flash.shares[0].class, Class::Attention, "attention is no longer the largest class");
            // #17's predicted target, dense and MoE (since q, k, v became one product).
            assert!(flash.mfu >= 0.35, "moe {moe}: MFU {:.4}", flash.mfu);
        }
    }

    #[test]
    fn a_call_costs_its_roofline_plus_the_launch() {
        let gpu = find("h200").unwrap();
        let call =
            |unit, flops, bytes| Call { kernel: "k", class: Class::Matmul, unit, flops, bytes, tiled: false };
        // 1 TFLOP on the tensor cores at 70% of 989.4 TFLOP/s.
        let t = seconds(&call(Unit::Tensor, 1e12, 0.0), gpu);
        assert!((t - (1.0 / (989.4 * 0.70) + 2e-6)).abs() < 1e-9, "{t}");
        // 36 GB at 75% of 4.8 TB/s: 10 ms.
        let m = seconds(&call(Unit::Memory, 0.0, 36e9), gpu);
        assert!((m - (0.01 + 2e-6)).abs() < 1e-9, "{m}");
        // The larger of the two.
        assert_eq!(seconds(&call(Unit::Tensor, 1e12, 36e9), gpu), m.max(t));
        assert_eq!(seconds(&call(Unit::Host, 0.0, 8.0), gpu), efficiency::HOST_READ_SECONDS);
    }
}
