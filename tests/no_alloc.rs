//! The hot loop allocates nothing: after warm-up, training steps (forward, backward, clip,
//! AdamW) make no heap allocation of their own, dense and MoE. One thread, so that every
//! allocation (gemm's included) happens on the thread that marks where gemm runs.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use minimind::engine::cpu::Cpu;
use minimind::engine::{Engine, OptimConfig, SplitMix64, hf};

struct Counting;
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// Every allocation, gemm's included: shows the counter sees the training steps at all.
static ALL: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(p, l, n) }
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

fn allocations_per_step(use_moe: bool) -> usize {
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
    let mut cfg = hf::read_config(&dir.join("config.json")).unwrap();
    cfg.use_moe = use_moe;
    let (b, t) = (2, 48);
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    pool.install(|| {
        let mut engine = Engine::new(Cpu::new(), cfg, b, t);
        engine.init_weights(1);
        let mut rng = SplitMix64::new(5);
        let ids: Vec<u32> = (0..b * t).map(|_| (rng.next_u64() % 6400) as u32).collect();
        let targets: Vec<i32> =
            (0..b * t).map(|n| if n % t == t - 1 { -1 } else { ids[n + 1] as i32 }).collect();
        let optim = OptimConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: 1.0 };
        let step = |engine: &mut Engine<Cpu>| {
            engine.zero_grads();
            engine.forward_backward(&ids, &targets, 1.0);
            engine.optimizer_step(1e-3, &optim);
        };
        for _ in 0..3 {
            step(&mut engine);
        }
        let (before, all_before) = (ALLOCS.load(Ordering::SeqCst), ALL.load(Ordering::SeqCst));
        for _ in 0..3 {
            step(&mut engine);
        }
        assert!(ALL.load(Ordering::SeqCst) > all_before, "the counter saw gemm's allocations");
        ALLOCS.load(Ordering::SeqCst) - before
    })
}

#[test]
fn training_steps_do_not_allocate() {
    assert_eq!(allocations_per_step(false), 0, "dense");
    assert_eq!(allocations_per_step(true), 0, "moe");
}
