//! The CUDA emulator: a [`Device`] whose kernels are `kernels.cu` compiled as C++ (`emu.cpp`,
//! built by build.rs) and run on the CPU, one block at a time, each CUDA thread a coroutine.
//! Device memory is host memory; cuBLAS is a plain loop over the same column-major arguments
//! cuBLAS would get, reading and writing each operand in its storage (f32, bf16, f16) and
//! accumulating in f32.
//!
//! It exists for tests: CI has no GPU, and with it every kernel, every launch shape and the
//! cuBLAS argument mapping run against the CPU engine. `MINIMIND_CUDA_EMULATOR=1` makes
//! `cuda:0` this device everywhere (selftest, run, bench); `=2` gives two of them. It is slow (a context switch per
//! barrier per thread), so it suits the conformance suite and micro models.

use std::collections::HashMap;
use std::ffi::{CStr, c_char, c_int};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use super::device::{Arg, Device, GemmCall, Store};
use super::kernel_names;

unsafe extern "C" {
    fn minimind_emu_kernels() -> c_int;
    fn minimind_emu_name(i: c_int) -> *const c_char;
    fn minimind_emu_signature(i: c_int) -> *const c_char;
    fn minimind_emu_launch(
        i: c_int,
        grid: u32,
        threads: u32,
        shared: u32,
        args: *const u64,
        shuffle: u64,
        err: *mut c_char,
        errlen: usize,
    ) -> c_int;
}

/// The environment variable that turns the GPUs into emulators: `1` (or any value but a
/// number) one of them, `N` as many (data-parallel tests give each rank its own).
pub const ENV: &str = "MINIMIND_CUDA_EMULATOR";

/// The variable that makes every emulated launch run its blocks, and its threads within each
/// round of the scheduler, in an order shuffled by this seed (a number): what a GPU may do.
/// Results that change with the seed depend on scheduling (see `emu.cpp`).
pub const SHUFFLE_ENV: &str = "MINIMIND_CUDA_EMULATOR_SHUFFLE";

/// The shuffle seed a value of `MINIMIND_CUDA_EMULATOR_SHUFFLE` asks for (none when unset,
/// empty or 0; a value that is not a number is hashed). Pure.
fn shuffle_of(value: Option<&str>) -> Option<u64> {
    match value.map(str::trim) {
        None | Some("") | Some("0") => None,
        Some(v) => Some(v.parse::<u64>().unwrap_or_else(|_| {
            v.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3))
        })),
    }
}

/// How many emulated GPUs `MINIMIND_CUDA_EMULATOR` asks for (none when unset, empty or 0).
pub fn wanted() -> usize {
    gpus_of(std::env::var(ENV).ok().as_deref())
}

/// The emulated GPUs a value of `MINIMIND_CUDA_EMULATOR` asks for. Pure.
fn gpus_of(value: Option<&str>) -> usize {
    match value.map(str::trim) {
        None | Some("") | Some("0") => 0,
        Some(v) => v.parse::<usize>().unwrap_or(1).max(1),
    }
}

/// Every kernel the emulator was built with: name and parameter types (`p` pointer, `i` int,
/// `l` i64, `f` float, `d` double).
pub fn table() -> Vec<(String, String)> {
    // SAFETY: the table is static; indices are in range and the strings NUL-terminated.
    unsafe {
        (0..minimind_emu_kernels())
            .map(|i| {
                let name = CStr::from_ptr(minimind_emu_name(i)).to_string_lossy().into_owned();
                let sig = CStr::from_ptr(minimind_emu_signature(i)).to_string_lossy().into_owned();
                (name, sig)
            })
            .collect()
    }
}

pub struct Emulator {
    /// Per entry of [`kernel_names`]: the emulator's index and parameter types.
    kernels: Vec<(c_int, String)>,
    /// Each live allocation's size (for [`Device::live_bytes`]).
    sizes: Mutex<HashMap<u64, usize>>,
    /// The shuffle seed, if any, and the launches made (each launch shuffles with its own
    /// seed, drawn from both).
    shuffle: Option<u64>,
    launches: AtomicU64,
}

/// The C++ side keeps one block's state for the whole process: one launch at a time, across
/// every emulator (tests open several at once).
static LAUNCH: Mutex<()> = Mutex::new(());

impl Emulator {
    /// An emulator, shuffled as `MINIMIND_CUDA_EMULATOR_SHUFFLE` asks.
    pub fn new() -> Result<Emulator, String> {
        Emulator::shuffled(shuffle_of(std::env::var(SHUFFLE_ENV).ok().as_deref()))
    }

    /// An emulator whose launches run in an order shuffled by `seed` (in order without).
    pub fn shuffled(seed: Option<u64>) -> Result<Emulator, String> {
        let table = table();
        let kernels = kernel_names()
            .iter()
            .map(|name| {
                let i = table.iter().position(|(n, _)| n == name).ok_or_else(|| {
                    format!("the CUDA emulator has no kernel {name} (add it to emu.cpp's table)")
                })?;
                Ok((i as c_int, table[i].1.clone()))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Emulator {
            kernels,
            sizes: Mutex::new(HashMap::new()),
            shuffle: seed,
            launches: AtomicU64::new(0),
        })
    }
}

/// Element `i` of a buffer at `base` stored as `st`, in f32.
///
/// # Safety
/// `base` must hold at least `i + 1` elements.
unsafe fn load(st: Store, base: u64, i: usize) -> f32 {
    // SAFETY: in bounds by the caller's contract; the emulator's memory is host memory.
    unsafe {
        match st {
            Store::F32 => *(base as *const f32).add(i),
            Store::Bf16 => half::bf16::from_bits(*(base as *const u16).add(i)).to_f32(),
            Store::F16 => half::f16::from_bits(*(base as *const u16).add(i)).to_f32(),
        }
    }
}

/// Stores `v` as element `i`, rounded to `st` (nearest even, as cuBLAS writes its output).
///
/// # Safety
/// As [`load`].
unsafe fn store(st: Store, base: u64, i: usize, v: f32) {
    // SAFETY: as in `load`.
    unsafe {
        match st {
            Store::F32 => *(base as *mut f32).add(i) = v,
            Store::Bf16 => *(base as *mut u16).add(i) = half::bf16::from_f32(v).to_bits(),
            Store::F16 => *(base as *mut u16).add(i) = half::f16::from_f32(v).to_bits(),
        }
    }
}

/// One product of a [`GemmCall`] (its batch ignored), as cuBLAS computes it: each output a
/// dot product in f32, in order over k, times alpha, plus the old value when accumulating.
fn gemm_one(g: &GemmCall) {
    let GemmCall {
        b_transposed,
        a_transposed,
        n,
        m,
        k,
        b,
        ldb,
        a,
        lda,
        c,
        ldc,
        accumulate,
        ab,
        c_store,
        alpha,
        ..
    } = *g;
    // Column-major: element (i, p) of op(b) [n, k] and (p, j) of op(a) [k, m].
    let bv = |i: usize, p: usize| -> usize { if b_transposed { p + i * ldb } else { i + p * ldb } };
    let av = |p: usize, j: usize| -> usize { if a_transposed { j + p * lda } else { p + j * lda } };
    // Copy op(b) to rows of k (one per output row i) and op(a) to rows of k (one per
    // output column j), in f32, so each output is a contiguous dot product.
    // SAFETY: the caller's views bound these extents.
    let brows: Vec<f32> = (0..n)
        .flat_map(|i| (0..k).map(move |p| (i, p)))
        .map(|(i, p)| unsafe { load(ab, b, bv(i, p)) })
        .collect();
    let arows: Vec<f32> = (0..m)
        .flat_map(|j| (0..k).map(move |p| (p, j)))
        .map(|(p, j)| unsafe { load(ab, a, av(p, j)) })
        .collect();
    // Output column j is `n` elements from `c + j * ldc`; columns do not overlap (ldc >= n)
    // nor the inputs (the engine never multiplies in place).
    let c_at = c as usize;
    (0..m).into_par_iter().zip(arows.par_chunks(k.max(1))).for_each(|(j, arow)| {
        for (i, brow) in brows.chunks(k.max(1)).enumerate().take(n) {
            let dot: f32 = brow.iter().zip(arow).map(|(x, y)| x * y).sum();
            let sum = alpha * dot;
            let at = j * ldc + i;
            // SAFETY: within the output the caller's view bounds; one writer per element.
            unsafe {
                let old = if accumulate { load(c_store, c_at as u64, at) } else { 0.0 };
                store(c_store, c_at as u64, at, if accumulate { old + sum } else { sum });
            }
        }
    });
}

impl Device for Emulator {
    fn alloc(&self, bytes: usize) -> Result<u64, String> {
        // SAFETY: calloc of a positive size; freed once in `free`.
        let p = unsafe { libc::calloc(bytes.max(1), 1) };
        if p.is_null() {
            return Err(format!("the CUDA emulator could not allocate {bytes} bytes"));
        }
        self.sizes.lock().unwrap_or_else(|e| e.into_inner()).insert(p as u64, bytes.max(1));
        Ok(p as u64)
    }
    fn free(&self, ptr: u64) {
        self.sizes.lock().unwrap_or_else(|e| e.into_inner()).remove(&ptr);
        // SAFETY: `ptr` came from `alloc` and is freed once.
        unsafe { libc::free(ptr as *mut libc::c_void) }
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String> {
        // SAFETY: `dst` covers `src.len()` bytes of an allocation (the views check lengths).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String> {
        // SAFETY: as in `htod`, the other way.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }
    fn launch(&self, kernel: usize, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<(), String> {
        let (index, signature) = &self.kernels[kernel];
        if !(args.len() == signature.len() && args.iter().zip(signature.chars()).all(|(a, c)| a.code() == c))
        {
            let given: String = args.iter().map(|a| a.code()).collect();
            return Err(format!(
                "kernel {} takes ({signature}) but was given ({given}) (p pointer, i int, l i64, f float, d double)",
                kernel_names()[kernel]
            ));
        }
        let mut slots = [0u64; 24];
        for (slot, a) in slots.iter_mut().zip(args) {
            *slot = a.bits();
        }
        let mut err = [0 as c_char; 256];
        // Launch i of a shuffled emulator shuffles with a seed of its own (never 0, which
        // means in order).
        let shuffle = self.shuffle.map_or(0, |seed| {
            let i = self.launches.fetch_add(1, Ordering::Relaxed);
            (seed ^ i.wrapping_mul(0x9e3779b97f4a7c15)).max(1)
        });
        let _turn = LAUNCH.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the slots match the kernel's parameters (checked above); pointers are live
        // allocations of this emulator.
        let r = unsafe {
            minimind_emu_launch(
                *index,
                grid,
                block,
                shared,
                slots.as_ptr(),
                shuffle,
                err.as_mut_ptr(),
                err.len(),
            )
        };
        if r != 0 {
            // SAFETY: the C side wrote a NUL-terminated message.
            let msg = unsafe { CStr::from_ptr(err.as_ptr()) }.to_string_lossy().into_owned();
            return Err(format!("kernel {}: {msg}", kernel_names()[kernel]));
        }
        Ok(())
    }
    fn gemm(&self, g: &GemmCall) -> Result<(), String> {
        for i in 0..g.batch.max(1) {
            let at = |base: u64, stride: usize, st: Store| base + (i * stride * st.size()) as u64;
            let one = GemmCall {
                a: at(g.a, g.stride_a, g.ab),
                b: at(g.b, g.stride_b, g.ab),
                c: at(g.c, g.stride_c, g.c_store),
                batch: 1,
                ..*g
            };
            gemm_one(&one);
        }
        Ok(())
    }
    fn synchronize(&self) -> Result<(), String> {
        Ok(())
    }
    fn memory(&self) -> Option<(usize, usize)> {
        None
    }
    fn live_bytes(&self) -> Option<usize> {
        Some(self.sizes.lock().unwrap_or_else(|e| e.into_inner()).values().sum())
    }
    fn stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
        None
    }
    fn versions(&self) -> String {
        "no CUDA libraries: kernels.cu as C++ on the CPU".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emulated_gpus_table() {
        for (value, gpus) in
            [(None, 0), (Some(""), 0), (Some("0"), 0), (Some("1"), 1), (Some("yes"), 1), (Some(" 2"), 2)]
        {
            assert_eq!(gpus_of(value), gpus, "{value:?}");
        }
    }

    #[test]
    fn shuffle_seeds_table() {
        for (value, seed) in
            [(None, None), (Some(""), None), (Some("0"), None), (Some("7"), Some(7)), (Some(" 42"), Some(42))]
        {
            assert_eq!(shuffle_of(value), seed, "{value:?}");
        }
        assert!(shuffle_of(Some("yes")).is_some_and(|s| s != 0));
    }

    #[test]
    fn the_switches_are_not_read_as_config_keys() {
        use super::super::{cache::CACHE_ENV, driver::SYNC_ENV, libs::LIBS_ENV};
        let (flash, isa) = (super::super::FLASH_ENV, crate::engine::cpu::bf16::ISA_ENV);
        for var in [ENV, SHUFFLE_ENV, LIBS_ENV, CACHE_ENV, SYNC_ENV, flash, isa] {
            assert!(crate::config::OWN_VARS.contains(&var), "{var}: every run would warn about it");
        }
    }

    #[test]
    fn the_emulator_has_every_kernel_and_no_other() {
        let names: Vec<String> = table().into_iter().map(|(n, _)| n).collect();
        let mut want: Vec<String> = kernel_names().to_vec();
        let mut have = names.clone();
        want.sort();
        have.sort();
        assert_eq!(have, want);
    }

    #[test]
    fn a_launch_with_the_wrong_argument_types_is_refused() {
        let emu: Arc<dyn Device> = Arc::new(Emulator::new().unwrap());
        let fill = kernel_names().iter().position(|k| k == "fill_f32").unwrap();
        // fill_f32(float*, float, i64): an int count is the bug a GPU would not report.
        let err = emu.launch(fill, 1, 32, 0, &[Arg::Ptr(0), Arg::F32(1.0), Arg::I32(4)]).unwrap_err();
        assert!(err.contains("takes (pfl) but was given (pfi)"), "{err}");
    }

    #[test]
    fn a_block_reduction_gives_the_exact_sum_for_every_block_size() {
        // Shuffles inside warps, then __syncthreads across them: the scheduler's two barriers.
        let emu: Arc<dyn Device> = Arc::new(Emulator::new().unwrap());
        let sum = kernel_names().iter().position(|k| k == "sum_to_acc").unwrap();
        let acc = emu.alloc(8).unwrap();
        let x: Vec<f32> = (1..=100).map(|i| i as f32).collect();
        let xp = emu.alloc(400).unwrap();
        emu.htod(xp, super::super::device::bytes(&x)).unwrap();
        for threads in [32, 64, 1024] {
            emu.launch(sum, 1, threads, 0, &[Arg::Ptr(acc), Arg::I32(0), Arg::Ptr(xp), Arg::I64(100)])
                .unwrap();
            let mut out = [0.0f64];
            emu.dtoh(acc, super::super::device::bytes_mut(&mut out)).unwrap();
            assert_eq!(out[0], 5050.0, "{threads} threads");
        }
        emu.free(acc);
        emu.free(xp);
    }
}
