//! The hot loop allocates nothing: after warm-up, training steps (forward, backward, clip,
//! AdamW) make no heap allocation of their own, dense and MoE, in float32 and with the CPU's
//! bf16 products (their kept weight panels included). One thread, so that every allocation
//! (gemm's included) happens on the thread that marks where gemm runs. And the memory
//! estimate `plan` prints is what the engine really holds.

use std::alloc::{GlobalAlloc, Layout};

use minimind::alloc::Aligned;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};

use minimind::engine::cpu::{Cpu, bf16};
use minimind::engine::{Engine, Footprint, OptimConfig, hf, keep_attention_probs, workspace_bytes};
use minimind::rng::SplitMix64;

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Every allocation, gemm's included: shows the counter sees the training steps at all.
static ALL: AtomicUsize = AtomicUsize::new(0);
/// Bytes allocated and not yet freed.
static LIVE: AtomicI64 = AtomicI64::new(0);
/// The two tests measure process-wide counters: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        LIVE.fetch_add(l.size() as i64, Ordering::Relaxed);
        unsafe { Aligned.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as i64, Ordering::Relaxed);
        unsafe { Aligned.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        LIVE.fetch_add(n as i64 - l.size() as i64, Ordering::Relaxed);
        unsafe { Aligned.realloc(p, l, n) }
    }
}

/// Counts allocations made outside the `gemm` crate, which allocates its packing buffers on
/// every call (the one exception, noted in BENCHMARKS.md).
fn count() {
    ALL.fetch_add(1, Ordering::Relaxed);
    if !minimind::engine::cpu::in_gemm() {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations outside gemm over three steps after three of warm-up, each step of `micro`
/// micro-batches, the products on `path`.
fn allocations_per_step(use_moe: bool, path: bf16::Isa, micro: usize) -> usize {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
    let mut cfg = hf::read_config(&dir.join("config.json")).unwrap();
    cfg.use_moe = use_moe;
    let (b, t) = (2, 48);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        let mut engine = Engine::new(Cpu::new().with_products(path), cfg, b, t).unwrap();
        engine.init_weights(1);
        let mut rng = SplitMix64::new(5);
        let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 6400) as u32).collect();
        let targets: Vec<i32> =
            (0..b * t).map(|n| if n % t == t - 1 { -1 } else { ids[n + 1] as i32 }).collect();
        let optim = OptimConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: 1.0 };
        let step = |engine: &mut Engine<Cpu>| {
            engine.zero_grads();
            for _ in 0..micro {
                engine.forward_backward(&ids, &targets, 1.0 / micro as f32);
            }
            engine.optimizer_step(1e-3, &optim);
        };
        for _ in 0..3 {
            step(&mut engine);
        }
        let (before, all_before) = (ALLOCS.load(Ordering::SeqCst), ALL.load(Ordering::SeqCst));
        for _ in 0..3 {
            step(&mut engine);
        }
        if path == bf16::Isa::F32 {
            assert!(ALL.load(Ordering::SeqCst) > all_before, "the counter saw gemm's allocations");
        }
        ALLOCS.load(Ordering::SeqCst) - before
    })
}

#[test]
fn the_memory_estimate_is_what_the_engine_holds() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
    for use_moe in [false, true] {
        let mut cfg = hf::read_config(&dir.join("config.json")).unwrap();
        cfg.use_moe = use_moe;
        for (b, t) in [(2, 48), (4, 64)] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 6400) as u32).collect();
            let targets: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
            let optim =
                OptimConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: 1.0 };
            let live = pool.install(|| {
                let before = LIVE.load(Ordering::SeqCst);
                let mut engine = Engine::new(Cpu::new(), cfg.clone(), b, t).unwrap();
                engine.init_weights(1);
                // The first step fills the MoE routing buffers.
                engine.forward_backward(&ids, &targets, 1.0);
                engine.optimizer_step(1e-3, &optim);
                let live = LIVE.load(Ordering::SeqCst) - before;
                drop(engine);
                // What outlives the engine is not the engine's: gemm keeps a per-thread
                // packing buffer (512 KiB) once it has run.
                let kept = LIVE.load(Ordering::SeqCst) - before;
                (live - kept) as f64
            });
            let want = 16.0 * cfg.parameter_count() as f64
                + workspace_bytes(&cfg, b, t, Footprint::Cpu { keep_probs: keep_attention_probs(&cfg, b, t) })
                    as f64;
            let off = (live - want).abs();
            assert!(off < 0.01 * want + 64e3, "moe {use_moe} {b}x{t}: estimate {want}, engine holds {live}");
        }
    }
}

#[test]
fn training_steps_do_not_allocate() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(allocations_per_step(false, bf16::Isa::F32, 1), 0, "dense");
    assert_eq!(allocations_per_step(true, bf16::Isa::F32, 1), 0, "moe");
}

#[test]
fn bf16_training_steps_do_not_allocate_with_kept_weight_panels() {
    // Three micro-batches a step: the second packs each weight into its kept panels, the
    // third reads them; steady state allocates nothing, on every bf16 path the CPU has.
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let paths = bf16::available();
    if paths.is_empty() {
        assert!(std::env::var_os("CI").is_none(), "CI runs on CPUs with bf16 instructions");
        eprintln!("SKIPPED: this CPU has no bf16 instructions ({})", bf16::describe_cpu());
        return;
    }
    for path in paths {
        assert_eq!(allocations_per_step(false, path, 3), 0, "dense, {}", path.name());
        assert_eq!(allocations_per_step(true, path, 3), 0, "moe, {}", path.name());
    }
}
