//! The CUDA kernels: the second implementation of [`Kernels`], over cudarc.
//!
//! Precision: weights, gradients, AdamW moments, RMSNorm scales, the residual stream and its
//! gradient are f32. Activations (normed inputs, q/k/v, attention output, feed-forward
//! activations, logits, and the gradients flowing through them) are stored in the run's
//! dtype ([`Store`]): f32, or bf16/f16 in half the bytes, read into f32 by every kernel and
//! rounded once on store. Matrix products go to cuBLAS (`cublasGemmEx`, f32 accumulation, TF32
//! off): two operands of one storage into that storage or f32; in 16 bits they read a bf16/f16
//! copy of the weights that AdamW writes in the same pass as the f32 update. Everything else
//! runs in the kernels of `kernels.cu`, compiled by NVRTC into a CUBIN for the device's
//! architecture and cached on disk (`driver`, `cache`). The CUDA libraries are found and
//! opened by `libs`, for CUDA 12 and 13 wherever they live. No training kernel adds floats in
//! an order that depends on scheduling (no float atomics; the emulator's shuffled mode is the
//! test), so a run on one GPU is bit-reproducible.
//!
//! One compute stream (NCCL sums on a second, see `nccl`); buffers are plain device
//! allocations addressed through views of raw device pointers; nothing waits for the device
//! but `read_acc`, `download` and the expert offsets of a MoE routing.
//!
//! Written once over a [`device::Device`]: the GPU, or the emulator that runs the same kernel
//! sources on the CPU (`emu`), which is how CI tests this file without a GPU.
//!
//! Shapes as in the trait: N rows, C channels, H/G heads, D head dim, V vocabulary, E experts,
//! K experts per token.

use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Result, anyhow};

use super::gpu::{DW_PARTS, SORT_CHUNK};
use super::kernels::{AdamW, AttnShape, Gemm, Kernels, Positions, Rotary, RouterConfig};
use crate::config::Dtype;
use crate::units::human;
use device::{Arg, DBuf, Device, GemmCall, Store, bytes, bytes_mut};

/// `launch!(gpu, kernel, grid, block[, shared BYTES]; args...)`: one launch with its kernel,
/// grid and block stated once and each argument converted by `Arg::from` (a view or buffer is
/// its device pointer, a `usize` a checked CUDA `int`, `i64`/`f32`/`f64` themselves).
macro_rules! launch {
    ($gpu:expr, $kernel:expr, $grid:expr, $block:expr; $($arg:expr),* $(,)?) => {
        $gpu.launch_kernel($kernel, $grid, $block, 0, &[$(Arg::from($arg)),*])
    };
    ($gpu:expr, $kernel:expr, $grid:expr, $block:expr, shared $shared:expr; $($arg:expr),* $(,)?) => {
        $gpu.launch_kernel($kernel, $grid, $block, $shared, &[$(Arg::from($arg)),*])
    };
}

mod attention;
mod blas;
pub mod cache;
mod device;
pub mod driver;
pub mod emu;
pub mod libs;
mod nccl;
pub mod nvrtc;
#[cfg(test)]
mod ptxas;

/// The kernel sources, embedded in the binary.
pub const SOURCE: &str = include_str!("kernels.cu");

/// The kernels `SOURCE` defines in one form (f32 throughout).
const PLAIN: &[&str] = &[
    "add_f32",
    "sort_count",
    "sort_prefix",
    "sort_offsets",
    "sort_place",
    "embed_forward",
    "embed_backward",
    "rmsnorm_backward_dw_sum",
    "sum_to_acc",
    "sum_squares_partial",
    "sum_partials",
    "zero_acc",
    "fold_acc",
    "clip_coef",
    "moe_topk",
    "moe_place",
    "moe_aux_terms",
    "moe_aux_sum",
    "moe_router_backward",
    "mma_probe",
];

/// The kernels that read or write activations: templates over their storage, each defined as
/// `name_f32`, `name_bf16` and `name_f16` (see [`Store`]).
const TYPED: &[&str] = &[
    "fill",
    "cast",
    "rmsnorm_forward",
    "add_rmsnorm_forward",
    "rmsnorm_backward",
    "rope",
    "attention_forward",
    "attention_backward_dq",
    "attention_backward_dkv",
    "attention_forward_tiled",
    "attention_forward_tiled_d64",
    "attention_forward_tiled_d128",
    "attention_delta",
    "attention_backward_dq_tiled",
    "attention_backward_dq_tiled_d64",
    "attention_backward_dq_tiled_d128",
    "attention_backward_dkv_tiled",
    "attention_backward_dkv_tiled_d64",
    "attention_backward_dkv_tiled_d128",
    "attn_heads",
    "attn_heads_rope",
    "attn_softmax",
    "attn_dsoftmax",
    "attention_decode",
    "swiglu_forward",
    "swiglu_backward",
    "cross_entropy",
    "adamw",
    "gather_rows",
    "combine_rows",
    "combine_rows_act",
    "slot_dots",
    "spread_rows",
    "flash_forward_d64",
    "flash_forward_d128",
    "flash_backward_dq_d64",
    "flash_backward_dq_d128",
    "flash_backward_dkv_d64",
    "flash_backward_dkv_d128",
];

/// Every kernel `SOURCE` defines, in launch-index order: [`PLAIN`], then each of [`TYPED`]
/// in its three forms (the compile test checks each is there).
pub fn kernel_names() -> &'static [String] {
    static NAMES: OnceLock<Vec<String>> = OnceLock::new();
    NAMES.get_or_init(|| {
        let typed = TYPED.iter().flat_map(|t| ["f32", "bf16", "f16"].map(|s| format!("{t}_{s}")));
        PLAIN.iter().map(|s| s.to_string()).chain(typed).collect()
    })
}

/// Compiles `SOURCE` for `arch` (`sm_90`) as the engine does, with ptxas's report of every
/// kernel's registers, stack and spills in the log (`--ptxas-options=-v`).
pub fn compile_with_report(arch: &str) -> Result<nvrtc::Compiled> {
    let mut options = driver::NVRTC_OPTIONS.to_vec();
    options.push("--ptxas-options=-v");
    nvrtc::compile(SOURCE, arch, &options)
        .map_err(|e| anyhow!("the CUDA kernels do not compile for {arch}: {e}"))
}

/// `MINIMIND_CUDA_FLASH=0` sends 16-bit attention to the cuBLAS products instead of the flash
/// kernels (the GPU check's speed stage measures both; an escape hatch should a GPU disagree).
pub const FLASH_ENV: &str = "MINIMIND_CUDA_FLASH";

/// Whether a value of `MINIMIND_CUDA_FLASH` leaves the flash kernels on: all but `0`. Pure.
fn flash_wanted(value: Option<&str>) -> bool {
    value.map(str::trim) != Some("0")
}

/// The profile's name for a matrix product.
const GEMM: usize = usize::MAX;

/// One profiled launch or product: the kernel (or [`GEMM`]) and the device's timing marks
/// around it, where it can time.
type Timed = (usize, Option<(usize, usize)>);

/// A kernel's name without its storage and head-width forms: the template's name
/// (`attention_forward_tiled_d64_bf16` -> `attention_forward_tiled`), as `engine::dry` names it.
fn base_name(name: &str) -> &str {
    let base = ["_f32", "_bf16", "_f16"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
    ["_d64", "_d128"].iter().find_map(|s| base.strip_suffix(s)).unwrap_or(base)
}

/// Threads per block for elementwise and row kernels.
const THREADS: u32 = 256;
/// Blocks of the grid-stride reductions (their partial sums are added in order).
const REDUCE_BLOCKS: u32 = 512;
/// The tiled attention kernels: blocks of 4 warps over tiles of 32 rows, for heads up to 128
/// wide (wider ones take the one-warp-per-row kernels). Must match `kernels.cu`.
const TILE: usize = 32;
const TILE_WARPS: usize = 4;
/// Rows of a tile each warp owns.
const TILE_ROWS: usize = TILE / TILE_WARPS;
const TILE_THREADS: u32 = 32 * TILE_WARPS as u32;
const TILED_MAX_D: usize = 128;

/// Blocks of a tiled attention kernel: one per tile of 32 rows of each (sequence, head).
fn tile_grid(s: AttnShape, heads: usize) -> u32 {
    u32::try_from(s.b * heads * s.t.div_ceil(TILE)).expect("a grid that fits CUDA's limit")
}

/// Which form of a tiled attention kernel serves heads `d` wide: those compiled for
/// MiniMind's 64 and for 128 with every loop bound known (listed after the template's own
/// name in [`TYPED`]), else the one that reads D at run time.
fn tiled_form(d: usize) -> usize {
    match d {
        64 => 1,
        128 => 2,
        _ => 0,
    }
}

/// Dynamic shared memory of a tiled attention kernel: `tiles` [32, D + 1] tiles (rows padded
/// by one float against bank conflicts) and `rows` buffers of 32 floats.
fn tile_shared(d: usize, tiles: usize, rows: usize) -> u32 {
    (4 * (tiles * TILE * (d + 1) + rows * TILE)) as u32
}

/// What the three tiled kernels stage, for heads `d` wide: forward Q, K, V and each warp's
/// rows of probabilities; dq Q, dO, K, V and each warp's rows of dS; dkv the same four tiles,
/// each warp's rows of P and of dS, and the staged query rows' lse and delta.
fn attention_shared(d: usize) -> [u32; 3] {
    let rows = TILE_WARPS * TILE_ROWS;
    [tile_shared(d, 3, rows), tile_shared(d, 4, rows), tile_shared(d, 4, 2 * rows + 2)]
}

/// Blocks of the one-warp-per-row kernels over `rows` rows.
fn row_grid(rows: usize) -> u32 {
    (rows * 32).div_ceil(THREADS as usize) as u32
}

fn i32_of(x: usize) -> Arg {
    Arg::I32(i32::try_from(x).expect("a size that fits a CUDA int"))
}

/// Which compiled kernel a launch runs: one of [`PLAIN`], or form `form` (see [`tiled_form`])
/// of one of [`TYPED`] for activations stored as `st`.
#[derive(Clone, Copy, Debug)]
enum Kernel<'a> {
    Plain(&'a str),
    Typed { name: &'a str, form: usize, st: Store },
}

fn plain(name: &str) -> Kernel<'_> {
    Kernel::Plain(name)
}

fn typed(name: &str, st: Store) -> Kernel<'_> {
    form(name, 0, st)
}

fn form(name: &str, form: usize, st: Store) -> Kernel<'_> {
    Kernel::Typed { name, form, st }
}

impl Kernel<'_> {
    /// Its launch index, in [`kernel_names`] order.
    fn index(self) -> usize {
        match self {
            Kernel::Plain(name) => {
                PLAIN.iter().position(|&k| k == name).expect("every plain kernel is in PLAIN")
            }
            Kernel::Typed { name, form, st } => {
                let t = TYPED.iter().position(|&k| k == name).expect("every template is in TYPED") + form;
                PLAIN.len() + 3 * t + st.index()
            }
        }
    }
}

impl From<usize> for Arg {
    fn from(x: usize) -> Arg {
        i32_of(x)
    }
}

impl From<i32> for Arg {
    fn from(x: i32) -> Arg {
        Arg::I32(x)
    }
}

impl From<i64> for Arg {
    fn from(x: i64) -> Arg {
        Arg::I64(x)
    }
}

impl From<f32> for Arg {
    fn from(x: f32) -> Arg {
        Arg::F32(x)
    }
}

impl From<f64> for Arg {
    fn from(x: f64) -> Arg {
        Arg::F64(x)
    }
}

impl From<&DView<'_>> for Arg {
    fn from(v: &DView<'_>) -> Arg {
        Arg::Ptr(v.ptr)
    }
}

impl From<&DViewMut<'_>> for Arg {
    fn from(v: &DViewMut<'_>) -> Arg {
        Arg::Ptr(v.ptr)
    }
}

impl From<&IView<'_>> for Arg {
    fn from(v: &IView<'_>) -> Arg {
        Arg::Ptr(v.ptr)
    }
}

impl<T> From<&DBuf<T>> for Arg {
    fn from(b: &DBuf<T>) -> Arg {
        Arg::Ptr(b.ptr)
    }
}

/// Floats on the device: f32, or activations in the run's 16-bit format.
pub struct FBuf {
    mem: DBuf<u8>,
    len: usize,
    st: Store,
}

/// A read-only view of floats on the device.
#[derive(Clone, Copy, Debug)]
pub struct DView<'a> {
    ptr: u64,
    len: usize,
    st: Store,
    _borrow: PhantomData<&'a ()>,
}

/// A writable view of floats on the device.
#[derive(Debug)]
pub struct DViewMut<'a> {
    ptr: u64,
    len: usize,
    st: Store,
    _borrow: PhantomData<&'a mut ()>,
}

impl<'a> DViewMut<'a> {
    /// The same floats, to read. Views are handles to device memory, which the stream orders:
    /// a kernel queued later reads what one queued earlier wrote through either.
    fn read(&self) -> DView<'a> {
        DView { ptr: self.ptr, len: self.len, st: self.st, _borrow: PhantomData }
    }

    /// The same floats, writable again (for a second kernel on them, queued after the first).
    fn again(&self) -> DViewMut<'a> {
        DViewMut { ptr: self.ptr, len: self.len, st: self.st, _borrow: PhantomData }
    }
}

/// Where q, k and v (or their gradients) start in a packed `[N, (H + 2G) D]` buffer of `len`
/// elements stored in `st` (`Kernels::packed_qkv`): each as (bytes from the buffer's start,
/// elements to its end), their rows the buffer's rows apart (`attention::Ld::packed`).
fn qkv_blocks(len: usize, st: Store, s: AttnShape) -> [(u64, usize); 3] {
    let (hd, gd) = (s.h * s.d, s.g * s.d);
    assert_eq!(len, s.b * s.t * (hd + 2 * gd), "packed q|k|v size");
    [0, hd, hd + gd].map(|col| ((col * st.size()) as u64, len - col))
}

impl<'a> DView<'a> {
    /// q, k and v of this packed buffer ([`qkv_blocks`]), borrowing what it borrows.
    fn qkv(&self, s: AttnShape) -> [DView<'a>; 3] {
        qkv_blocks(self.len, self.st, s).map(|(at, len)| DView { ptr: self.ptr + at, len, ..*self })
    }
}

impl<'a> DViewMut<'a> {
    /// dq, dk and dv of this packed buffer ([`qkv_blocks`]), writable as [`DViewMut::again`].
    fn qkv(&self, s: AttnShape) -> [DViewMut<'a>; 3] {
        qkv_blocks(self.len, self.st, s).map(|(at, len)| DViewMut {
            ptr: self.ptr + at,
            len,
            st: self.st,
            _borrow: PhantomData,
        })
    }
}

/// The store of a kernel's activation arguments: every one of `views` must share it (the
/// kernels have one X), and the model never mixes them.
fn same_store(what: &str, views: &[Store]) -> Store {
    let st = views[0];
    assert!(views.iter().all(|&v| v == st), "{what}: activations stored as {views:?}");
    st
}

fn f32_only(what: &str, views: &[Store]) {
    assert!(views.iter().all(|&v| v == Store::F32), "{what}: expects f32 buffers, got {views:?}");
}

/// A read-only view of i32 device memory.
#[derive(Clone, Copy, Debug)]
pub struct IView<'a> {
    ptr: u64,
    len: usize,
    _borrow: PhantomData<&'a ()>,
}

/// A MoE routing kept on the device, with the expert offsets read back once per routing.
pub struct CudaRoute {
    scores: DBuf<f32>,
    expert: DBuf<i32>,
    weight: DBuf<f32>,
    pos: DBuf<i32>,
    rows: DBuf<i32>,
    offsets_dev: DBuf<i32>,
    aux_grad: DBuf<f32>,
    terms: DBuf<f64>,
    offsets: Vec<usize>,
    /// The offsets as read from the device (kept to read into without allocating).
    offsets_raw: Vec<i32>,
    k: usize,
    has_aux: bool,
    /// How `moe_aux_sum` adds the aux terms: how many, the divisor (B with `seq_aux`), alpha.
    aux_shape: (usize, f64, f32),
}

/// The device (a GPU or the emulator), and the scratch the reductions share.
pub struct Cuda {
    dev: Arc<dyn Device>,
    dtype: Dtype,
    /// Partial sums of the grid-stride reductions.
    partials: Mutex<DBuf<f64>>,
    /// Partial column sums of RMSNorm's weight gradient `[DW_PARTS, C]`.
    dw_partials: Mutex<DBuf<f32>>,
    /// The counting sort's scratch (the embedding backward's positions by token, MoE
    /// dispatch's slots by expert; see [`Cuda::sort`]).
    sort_scratch: Mutex<DBuf<i32>>,
    /// The tensor-core attention's scores and probabilities (see `attention`).
    attn: Mutex<attention::Scratch>,
    /// Launches so far, per kernel (in the order of [`kernel_names`]), matrix products (a
    /// batch counts once) and reads the host waited for.
    launches: Vec<std::sync::atomic::AtomicU64>,
    gemms: std::sync::atomic::AtomicU64,
    host_reads: std::sync::atomic::AtomicU64,
    /// Profiling (`bench --profile`): every launch and product in order (a kernel's index in
    /// [`kernel_names`], or [`GEMM`]), with the device's timing marks around it on a GPU.
    profiling: Option<Mutex<Vec<Timed>>>,
    /// The first failure, until a `check` reports it.
    error: Mutex<Option<String>>,
    /// Something failed: no more work goes to the device (a CUDA error is sticky, and a
    /// refused allocation leaves buffers without memory), and every later `check` fails.
    broken: std::sync::atomic::AtomicBool,
    name: String,
    build: Option<driver::Build>,
    /// Whether 16-bit attention at heads 64 or 128 wide takes the flash kernels (`mma.sync`:
    /// sm_80 and later, and the emulator) rather than the cuBLAS products.
    flash: bool,
}

impl Cuda {
    /// Opens GPU `ordinal` computing its matrix products in `dtype`. Probes the libraries
    /// first (see [`super::gpu::probe`]), so a missing one is an error, not a panic. With
    /// `MINIMIND_CUDA_EMULATOR` set, `cuda:0` is the emulator (see [`emu`]).
    pub fn new(ordinal: usize, dtype: Dtype) -> Result<Cuda> {
        let unusable =
            |why: String| anyhow::Error::new(super::gpu::Unusable(format!("cuda:{ordinal}: {why}")));
        let gpus = super::gpu::probe().map_err(unusable)?;
        if ordinal >= gpus.names.len() {
            return Err(unusable(format!("this machine has {} GPU(s)", gpus.names.len())));
        }
        if emu::wanted() > 0 {
            return Cuda::emulated(dtype);
        }
        let (gpu, (major, minor)) = driver::Gpu::open(ordinal).map_err(|e| anyhow!("cuda:{ordinal}: {e}"))?;
        let name = format!(
            "{} (sm_{major}{minor}, {:.0} GB; {})",
            gpus.names[ordinal],
            gpu.total_memory() as f64 / 1e9,
            gpu.versions()
        );
        let build = gpu.build.clone();
        let mut cuda = Cuda::on(Arc::new(gpu), dtype, name)?;
        cuda.build = Some(build);
        cuda.flash &= major >= 8;
        Ok(cuda)
    }

    /// Launches of kernel `name` (all its forms) so far.
    pub fn launches_of(&self, name: &str) -> u64 {
        kernel_names()
            .iter()
            .zip(&self.launches)
            .filter(|(k, _)| {
                *k == name
                    || k.strip_prefix(name).is_some_and(|rest| ["_f32", "_bf16", "_f16"].contains(&rest))
            })
            .map(|(_, n)| n.load(std::sync::atomic::Ordering::Relaxed))
            .sum()
    }

    /// Launches so far by kernel, each kernel's forms together under its template's name
    /// (`attention_forward_tiled` for its `_d64` form too), with the matrix products as
    /// `gemm` and the host's reads as `host read`: the launch trace `engine::dry` mirrors.
    pub fn launch_counts(&self) -> std::collections::BTreeMap<String, u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut out = std::collections::BTreeMap::new();
        for (name, n) in kernel_names().iter().zip(&self.launches) {
            let n = n.load(Relaxed);
            if n > 0 {
                let base =
                    ["_f32", "_bf16", "_f16"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
                let base = ["_d64", "_d128"].iter().find_map(|s| base.strip_suffix(s)).unwrap_or(base);
                *out.entry(base.to_string()).or_insert(0) += n;
            }
        }
        for (name, n) in [("gemm", &self.gemms), ("host read", &self.host_reads)] {
            if n.load(Relaxed) > 0 {
                out.insert(name.to_string(), n.load(Relaxed));
            }
        }
        out
    }

    /// Records every launch and product from now on, timed on a GPU (see [`Kernels::profile`]).
    pub fn set_profiling(&mut self, on: bool) {
        self.profiling = on.then(Mutex::default);
    }

    /// Queues `work` (kernel `id`, or [`GEMM`]), timed when profiling.
    fn timed(&self, id: usize, work: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
        let Some(p) = &self.profiling else { return work() };
        let start = self.dev.mark();
        let r = work();
        let end = self.dev.mark();
        p.lock().unwrap_or_else(|e| e.into_inner()).push((id, start.zip(end)));
        r
    }

    /// Sends 16-bit attention to the cuBLAS products instead of the flash kernels (tests
    /// compare the two). Only off: a GPU before sm_80 must never take them. Before an engine
    /// is built on it: the workspace lays q, k, v out for the path (`Kernels::packed_qkv`).
    pub fn without_flash(&mut self) {
        self.flash = false;
    }

    /// How this GPU's kernels were obtained (none on the emulator).
    pub fn build(&self) -> Option<&driver::Build> {
        self.build.as_ref()
    }

    /// The emulator: the same kernels, run on the CPU (tests; see [`emu`]).
    pub fn emulated(dtype: Dtype) -> Result<Cuda> {
        let dev = emu::Emulator::new().map_err(|e| anyhow!(e))?;
        let name = format!("CUDA emulator ({})", dev.versions());
        Cuda::on(Arc::new(dev), dtype, name)
    }

    fn on(dev: Arc<dyn Device>, dtype: Dtype, name: String) -> Result<Cuda> {
        let partials =
            DBuf::zeroed(&dev, REDUCE_BLOCKS as usize).map_err(|e| anyhow!("allocating on the GPU: {e}"))?;
        let dw_partials = DBuf::zeroed(&dev, 1).map_err(|e| anyhow!("allocating on the GPU: {e}"))?;
        let sort_scratch = DBuf::zeroed(&dev, 1).map_err(|e| anyhow!("allocating on the GPU: {e}"))?;
        Ok(Cuda {
            dev,
            dtype,
            partials: Mutex::new(partials),
            dw_partials: Mutex::new(dw_partials),
            sort_scratch: Mutex::new(sort_scratch),
            attn: Mutex::default(),
            launches: kernel_names().iter().map(|_| 0.into()).collect(),
            gemms: 0.into(),
            host_reads: 0.into(),
            profiling: None,
            error: Mutex::new(None),
            broken: std::sync::atomic::AtomicBool::new(false),
            name,
            build: None,
            flash: flash_wanted(std::env::var(FLASH_ENV).ok().as_deref()),
        })
    }

    /// Free and total device memory, in bytes.
    pub fn memory(&self) -> Option<(usize, usize)> {
        self.dev.memory()
    }

    fn fail(&self, what: impl FnOnce() -> String) {
        use std::sync::atomic::Ordering;
        if self.broken.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.error.lock().unwrap_or_else(|e| e.into_inner()) = Some(what());
    }

    fn failed(&self) -> bool {
        self.broken.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Launches `kernel` on `grid` blocks of `block` threads with `shared` bytes of dynamic
    /// shared memory (through [`launch!`], which converts the arguments).
    fn launch_kernel(&self, kernel: Kernel, grid: u32, block: u32, shared: u32, args: &[Arg]) {
        self.launch_at(kernel.index(), grid, block, shared, args);
    }

    fn launch_at(&self, kernel: usize, grid: u32, block: u32, shared: u32, args: &[Arg]) {
        if self.failed() || grid == 0 {
            return;
        }
        self.launches[kernel].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.timed(kernel, || self.dev.launch(kernel, grid, block, shared, args)) {
            self.fail(|| {
                format!(
                    "CUDA kernel {} (grid {grid}, block {block}, {shared} B shared memory) failed: {e}",
                    kernel_names()[kernel]
                )
            });
        }
    }

    /// A stable counting sort of `n` positions by their key in `[0, v)` (`keys`: i32 on the
    /// device), with no atomics (kernels.cu); `then` gets the sorted order (position of each
    /// rank) and the `v + 1` offsets, written to `offsets` when given, else to scratch.
    fn sort(&self, keys: u64, n: usize, v: usize, offsets: Option<u64>, then: &dyn Fn(Arg, Arg)) {
        let chunks = n.div_ceil(SORT_CHUNK);
        let mut scratch = self.sort_scratch.lock().unwrap_or_else(|e| e.into_inner());
        let need = chunks * v + 2 * n + 2 * v + 1;
        if scratch.len() < need {
            *scratch = self.alloc_of(need);
        }
        let at = |offset: usize| Arg::Ptr(scratch.ptr + 4 * offset as u64);
        let (counts, rank, order) = (at(0), at(chunks * v), at(chunks * v + n));
        let totals = at(chunks * v + 2 * n);
        let offsets = offsets.map_or(at(chunks * v + 2 * n + v), Arg::Ptr);
        let (keys, n_a, v_a) = (Arg::Ptr(keys), i32_of(n), i32_of(v));
        launch!(self, plain("sort_count"), chunks as u32, SORT_CHUNK as u32; counts, rank, keys, n_a, v_a);
        launch!(self, plain("sort_prefix"), Self::blocks(v), THREADS; counts, totals, chunks, v_a);
        launch!(self, plain("sort_offsets"), 1, 1024; offsets, totals, v_a);
        launch!(self, plain("sort_place"), Self::blocks(n), THREADS; order, keys, rank, counts, offsets, n_a, v_a);
        then(order, offsets);
    }

    /// Floats stored as `st`.
    fn floats(&self, len: usize, st: Store) -> FBuf {
        FBuf { mem: self.alloc_of(len * st.size()), len, st }
    }

    fn blocks(n: usize) -> u32 {
        (n.div_ceil(THREADS as usize)).clamp(1, 65535) as u32
    }

    fn ptr<T>(&self, s: &DBuf<T>) -> u64 {
        s.ptr
    }

    /// `len` zeroed elements. When the device refuses, the failure is recorded (the next
    /// `check` reports it) and the buffer has no memory behind it: launches and copies are
    /// skipped from then on, so building an engine that does not fit ends in one error, not
    /// a crash.
    fn alloc_of<T>(&self, len: usize) -> DBuf<T> {
        if !self.failed() {
            match DBuf::zeroed(&self.dev, len) {
                Ok(s) => return s,
                Err(e) => {
                    let bytes = len * std::mem::size_of::<T>();
                    let free =
                        self.memory().map_or(String::new(), |(f, _)| format!(", {}B free", human(f as f64)));
                    self.fail(|| {
                        format!(
                            "out of GPU memory allocating {}B{free} ({e})\n  hint: lower train.batch_size or data.max_seq_len",
                            human(bytes as f64)
                        )
                    });
                }
            }
        }
        DBuf::unallocated(&self.dev, len)
    }

    /// Copies host bytes to the device (skipped after a failure: there may be no memory).
    fn copy_up(&self, dst: u64, src: &[u8], what: &str) {
        if self.failed() {
            return;
        }
        if let Err(e) = self.dev.htod(dst, src) {
            self.fail(|| format!("{what}: {e}"));
        }
    }

    /// Copies device bytes to the host; false (nothing copied) after a failure.
    fn copy_down(&self, src: u64, dst: &mut [u8], what: &str) -> bool {
        if self.failed() {
            return false;
        }
        self.host_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match self.dev.dtoh(src, dst) {
            Ok(()) => true,
            Err(e) => {
                self.fail(|| format!("{what}: {e}"));
                false
            }
        }
    }
}

impl Kernels for Cuda {
    fn dtype(&self) -> Dtype {
        self.dtype
    }

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn free_memory(&self) -> Option<u64> {
        self.memory().map(|(free, _)| free as u64)
    }

    /// Per kernel (its template's name; products as `gemm`): launches and, on a GPU, the
    /// seconds between the marks around them (zero on the emulator, which cannot time).
    /// FLOPs and bytes come from `engine::dry` (see `bench`).
    fn profile(&self) -> Vec<(String, crate::engine::KernelTime)> {
        let Some(p) = &self.profiling else { return Vec::new() };
        let mut by = std::collections::BTreeMap::<&str, crate::engine::KernelTime>::new();
        for &(id, marks) in p.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            let name = if id == GEMM { "gemm" } else { base_name(&kernel_names()[id]) };
            let t = by.entry(name).or_default();
            t.calls += 1;
            t.seconds += marks.and_then(|(a, b)| self.dev.between(a, b)).unwrap_or(0.0);
        }
        let mut v: Vec<_> = by.into_iter().map(|(k, t)| (k.to_string(), t)).collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds).then(b.1.calls.cmp(&a.1.calls)));
        v
    }

    fn reset_profile(&self) {
        if let Some(p) = &self.profiling {
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
            self.dev.clear_marks();
        }
    }

    fn check(&self) -> Result<()> {
        if !self.failed()
            && let Err(e) = self.dev.synchronize()
        {
            self.fail(|| format!("the GPU reported an error: {e}"));
        }
        if !self.failed() {
            return Ok(());
        }
        // The failure once, in full; after that only that the device is out of use.
        match self.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Some(e) => Err(anyhow!(e)),
            None => Err(anyhow!("the GPU is out of use after the error reported before")),
        }
    }

    type Buf = FBuf;
    type Idx = DBuf<i32>;
    type Acc = DBuf<f64>;
    type Route = CudaRoute;
    /// Each query row's log-sum-exp `[B, H, T]`, and how q and k were rotated.
    type Attn = attention::Saved;
    type V<'a> = DView<'a>;
    type M<'a> = DViewMut<'a>;
    type I<'a> = IView<'a>;

    fn alloc(&self, len: usize) -> FBuf {
        self.floats(len, Store::F32)
    }
    fn alloc_act(&self, len: usize) -> FBuf {
        self.floats(len, Store::of(self.dtype))
    }
    fn len(&self, buf: &FBuf) -> usize {
        buf.len
    }
    fn device_comm(
        &self,
        world: &crate::dist::World,
    ) -> Option<Result<Box<dyn crate::engine::comm::Communicator<Cuda>>>> {
        // The emulator has no NCCL: its ranks sum through MPI on the host.
        let stream = self.dev.stream()?;
        Some(nccl::open(stream, world).map(|c| Box::new(c) as _))
    }
    fn view<'a>(&self, buf: &'a FBuf, r: Range<usize>) -> DView<'a> {
        assert!(r.start <= r.end && r.end <= buf.len, "view {r:?} of {} floats", buf.len);
        let ptr = buf.mem.ptr + (buf.st.size() * r.start) as u64;
        DView { ptr, len: r.len(), st: buf.st, _borrow: PhantomData }
    }
    fn view_mut<'a>(&self, buf: &'a mut FBuf, r: Range<usize>) -> DViewMut<'a> {
        assert!(r.start <= r.end && r.end <= buf.len, "view {r:?} of {} floats", buf.len);
        let ptr = buf.mem.ptr + (buf.st.size() * r.start) as u64;
        DViewMut { ptr, len: r.len(), st: buf.st, _borrow: PhantomData }
    }
    fn upload(&self, dst: DViewMut<'_>, data: &[f32]) {
        assert_eq!(dst.len, data.len(), "upload size");
        if dst.st == Store::F32 {
            self.copy_up(dst.ptr, bytes(data), "copying to the GPU");
        } else {
            let mut stored = Vec::with_capacity(data.len() * dst.st.size());
            dst.st.encode(data, &mut stored);
            self.copy_up(dst.ptr, &stored, "copying to the GPU");
        }
    }
    fn download(&self, src: DView<'_>, out: &mut [f32]) {
        assert_eq!(src.len, out.len(), "download size");
        if src.st == Store::F32 {
            self.copy_down(src.ptr, bytes_mut(out), "copying from the GPU");
        } else {
            let mut stored = vec![0u8; out.len() * src.st.size()];
            if self.copy_down(src.ptr, &mut stored, "copying from the GPU") {
                src.st.decode(&stored, out);
            }
        }
    }

    fn alloc_idx(&self, len: usize) -> DBuf<i32> {
        self.alloc_of(len)
    }
    fn idx<'a>(&self, buf: &'a DBuf<i32>, r: Range<usize>) -> IView<'a> {
        assert!(r.start <= r.end && r.end <= buf.len(), "index view {r:?} of {}", buf.len());
        IView { ptr: self.ptr(buf) + 4 * r.start as u64, len: r.len(), _borrow: PhantomData }
    }
    fn upload_idx(&self, dst: &mut DBuf<i32>, data: &[i32]) {
        assert!(data.len() <= dst.len(), "index upload size");
        self.copy_up(dst.ptr, bytes(data), "copying ids to the GPU");
    }

    fn alloc_acc(&self, len: usize) -> DBuf<f64> {
        self.alloc_of(len)
    }
    fn read_acc(&self, acc: &DBuf<f64>, out: &mut [f64]) {
        assert!(out.len() <= acc.len(), "accumulator read size");
        if !self.copy_down(acc.ptr, bytes_mut(out), "reading the step's numbers from the GPU") {
            out.fill(f64::NAN);
        }
    }
    fn zero_acc(&self, acc: &mut DBuf<f64>, slots: Range<usize>) {
        let p = self.ptr(acc);
        launch!(self, plain("zero_acc"), 1, 32; Arg::Ptr(p), slots.start, slots.end);
    }
    fn fold_acc(&self, acc: &mut DBuf<f64>, src: usize, dst: usize, div1: f64, div2: f64) {
        let p = self.ptr(acc);
        launch!(self, plain("fold_acc"), 1, 32; Arg::Ptr(p), src, dst, div1, div2);
    }

    fn new_route(&self) -> CudaRoute {
        CudaRoute {
            scores: self.alloc_of(1),
            expert: self.alloc_of(1),
            weight: self.alloc_of(1),
            pos: self.alloc_of(1),
            rows: self.alloc_of(1),
            offsets_dev: self.alloc_of(1),
            aux_grad: self.alloc_of(1),
            terms: self.alloc_of(1),
            offsets: Vec::new(),
            offsets_raw: Vec::new(),
            k: 0,
            has_aux: false,
            aux_shape: (0, 1.0, 0.0),
        }
    }
    fn new_attn(&self, s: AttnShape, _keep: bool) -> attention::Saved {
        attention::Saved { lse: self.alloc_of(s.b * s.h * s.t), rotated_in_place: true }
    }
    fn attn_scratch_len(&self, s: AttnShape, _keep: bool) -> usize {
        // Backward's per-row delta = rowsum(dO * O).
        s.b * s.h * s.t
    }

    fn fill(&self, out: DViewMut<'_>, value: f32) {
        launch!(self, typed("fill", out.st), Self::blocks(out.len), THREADS; &out, value, out.len as i64);
    }
    fn add(&self, out: DViewMut<'_>, x: DView<'_>) {
        f32_only("add", &[out.st, x.st]);
        launch!(self, plain("add_f32"), Self::blocks(out.len), THREADS; &out, &x, out.len as i64);
    }
    fn cast(&self, out: DViewMut<'_>, x: DView<'_>) {
        assert_eq!(out.len, x.len, "cast size");
        f32_only("cast source", &[x.st]);
        launch!(self, typed("cast", out.st), Self::blocks(out.len), THREADS; &out, &x, out.len as i64);
    }
    fn matmul(&self, out: DViewMut<'_>, a: DView<'_>, b: DView<'_>, g: Gemm) {
        let Gemm { rows: m, cols: n, depth: k, a_transposed, b_transposed, accumulate } = g;
        assert!(out.len >= m * n && a.len >= m * k && b.len >= k * n, "matmul shapes");
        // cuBLAS multiplies two operands of one storage into that storage or f32.
        let ab = same_store("matmul operands", &[a.st, b.st]);
        assert!(out.st == ab || out.st == Store::F32, "matmul of {ab:?} into {:?}", out.st);
        if m == 0 || n == 0 || self.failed() {
            return;
        }
        if k == 0 {
            if !accumulate {
                self.fill(DViewMut { ptr: out.ptr, len: m * n, st: out.st, _borrow: PhantomData }, 0.0);
            }
            return;
        }
        // Row-major out[m, n] = op(a) op(b) is column-major outᵀ[n, m] = op(b)ᵀ op(a)ᵀ: cuBLAS
        // gets b first. A row-major matrix stored [r, c] is column-major [c, r] with ld = c.
        let call = GemmCall {
            b_transposed,
            a_transposed,
            n,
            m,
            k,
            b: b.ptr,
            ldb: if b_transposed { k } else { n },
            a: a.ptr,
            lda: if a_transposed { m } else { k },
            c: out.ptr,
            ldc: n,
            accumulate,
            ab,
            c_store: out.st,
            alpha: 1.0,
            batch: 1,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
        };
        self.gemms.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.timed(GEMM, || self.dev.gemm(&call)) {
            self.fail(|| format!("cuBLAS gemm {m}x{n}x{k}: {e}"));
        }
    }

    fn embed_forward(&self, out: DViewMut<'_>, emb: DView<'_>, ids: IView<'_>, c: usize) {
        f32_only("embed_forward", &[out.st, emb.st]);
        launch!(self, plain("embed_forward"), ids.len as u32, THREADS; &out, &emb, &ids, ids.len, c);
    }
    fn embed_backward(&self, demb: DViewMut<'_>, dout: DView<'_>, ids: IView<'_>, c: usize) {
        f32_only("embed_backward", &[demb.st, dout.st]);
        // The positions sorted by token id, then one block per token: no atomics.
        let v = demb.len / c;
        self.sort(ids.ptr, ids.len, v, None, &|order, offsets| {
            launch!(self, plain("embed_backward"), v.min(65535) as u32, THREADS; &demb, &dout, order, offsets, v, c);
        });
    }

    fn rmsnorm_forward(
        &self,
        y: DViewMut<'_>,
        rstd: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        c: usize,
        eps: f32,
    ) {
        let n = rstd.len;
        f32_only("rmsnorm_forward", &[rstd.st, x.st, w.st]);
        launch!(self, typed("rmsnorm_forward", y.st), n as u32, THREADS; &y, &rstd, &x, &w, n, c, eps);
    }
    fn add_rmsnorm_forward(
        &self,
        y: DViewMut<'_>,
        rstd: DViewMut<'_>,
        sum: DViewMut<'_>,
        x: DView<'_>,
        w: DView<'_>,
        c: usize,
        eps: f32,
    ) {
        let n = rstd.len;
        f32_only("add_rmsnorm_forward", &[rstd.st, sum.st, x.st, w.st]);
        launch!(self, typed("add_rmsnorm_forward", y.st), n as u32, THREADS; &y, &rstd, &sum, &x, &w, n, c, eps);
    }

    fn rmsnorm_backward(
        &self,
        dx: DViewMut<'_>,
        act: Option<DViewMut<'_>>,
        dw: DViewMut<'_>,
        dy: DView<'_>,
        x: DView<'_>,
        w: DView<'_>,
        rstd: DView<'_>,
        c: usize,
    ) {
        let n = rstd.len;
        f32_only("rmsnorm_backward", &[dx.st, dw.st, x.st, w.st, rstd.st]);
        let parts = DW_PARTS.min(n.max(1));
        let mut partial = self.dw_partials.lock().unwrap_or_else(|e| e.into_inner());
        if partial.len() < parts * c {
            *partial = self.alloc_of(parts * c);
        }
        let pp = self.ptr(&partial);
        // The form of dy's storage; without a copy to write, a null pointer.
        let act = match &act {
            Some(a) => {
                assert_eq!(a.len, dx.len, "rmsnorm_backward copy size");
                same_store("rmsnorm_backward dy and copy", &[dy.st, a.st]);
                Arg::from(a)
            }
            None => Arg::Ptr(0),
        };
        launch!(self, typed("rmsnorm_backward", dy.st), parts as u32, THREADS; &dx, act, Arg::Ptr(pp), &dy, &x, &w, &rstd, n, c);
        launch!(self, plain("rmsnorm_backward_dw_sum"), Self::blocks(c), THREADS; &dw, Arg::Ptr(pp), parts, c);
    }

    fn rope(
        &self,
        x: DViewMut<'_>,
        cos: DView<'_>,
        sin: DView<'_>,
        pos: Positions,
        heads: usize,
        d: usize,
        inverse: bool,
    ) {
        let n = x.len / (heads * d);
        let work = n * heads * d / 2;
        f32_only("rope tables", &[cos.st, sin.st]);
        launch!(self, typed("rope", x.st), Self::blocks(work), THREADS; &x, &cos, &sin, n, heads, d, pos.first, pos.period, Arg::I32(inverse as i32));
    }

    fn rope_attention_forward(
        &self,
        out: DViewMut<'_>,
        saved: &mut attention::Saved,
        scratch: DViewMut<'_>,
        q: DViewMut<'_>,
        k: DViewMut<'_>,
        v: DView<'_>,
        s: AttnShape,
        rot: Rotary<DView<'_>>,
    ) {
        // On the tensor cores, q and k are rotated in their head-major copies; elsewhere in
        // place, as the CPU does.
        let tables = attention::Tables { cos: rot.cos.ptr, sin: rot.sin.ptr };
        if rot.pos == Positions::sequences(s.t) {
            let lse = self.ptr(&saved.lse);
            if self.flash_serves(s) {
                let at = (s, attention::Ld::split(s));
                self.attention_forward_flash(&out, lse, [&q.read(), &k.read(), &v], Some(tables), at);
                saved.rotated_in_place = false;
                return;
            }
            if self.attention_forward_tc(&out, lse, [&q.read(), &k.read(), &v], Some(tables), s) {
                saved.rotated_in_place = false;
                return;
            }
        }
        let (qv, kv) = (q.read(), k.read());
        self.rope(q, rot.cos, rot.sin, rot.pos, s.h, s.d, false);
        self.rope(k, rot.cos, rot.sin, rot.pos, s.g, s.d, false);
        self.attention_forward(out, saved, scratch, qv, kv, v, s);
    }

    fn rope_attention_backward(
        &self,
        dq: DViewMut<'_>,
        dk: DViewMut<'_>,
        dv: DViewMut<'_>,
        saved: &attention::Saved,
        scratch: DViewMut<'_>,
        dout: DView<'_>,
        out: DView<'_>,
        [q, k, v]: [DView<'_>; 3],
        s: AttnShape,
        rot: Rotary<DView<'_>>,
    ) {
        if !saved.rotated_in_place {
            // The forward rotated only its head-major copies: backward does the same (the
            // scratch that served it still does: see `attention::Cuda::tensor_chunk`).
            let st = same_store("rope_attention_backward", &[dq.st, dk.st, dv.st, dout.st, out.st, q.st]);
            let [b, t, h, d] = [s.b, s.t, s.h, s.d].map(i32_of);
            let delta = scratch.ptr;
            let tables = attention::Tables { cos: rot.cos.ptr, sin: rot.sin.ptr };
            let inputs = [&dout, &q, &k, &v];
            let lse_delta = (self.ptr(&saved.lse), delta);
            if self.flash_serves(s) {
                // The dq kernel sums delta itself.
                let at = (s, attention::Ld::split(s));
                self.attention_backward_flash([&dq, &dk, &dv], inputs, &out, lse_delta, Some(tables), at);
                return;
            }
            launch!(self, typed("attention_delta", st), row_grid(s.b * s.h * s.t), THREADS; Arg::Ptr(delta), &dout, &out, b, t, h, d);
            if !self.attention_backward_tc([&dq, &dk, &dv], inputs, lse_delta, Some(tables), s) {
                self.fail(|| {
                    "the tensor-core attention lost its scratch between forward and backward".into()
                });
            }
            return;
        }
        let (dqa, dka) = (dq.again(), dk.again());
        self.attention_backward(dq, dk, dv, saved, scratch, dout, out, q, k, v, s);
        self.rope(dqa, rot.cos, rot.sin, rot.pos, s.h, s.d, true);
        self.rope(dka, rot.cos, rot.sin, rot.pos, s.g, s.d, true);
    }

    fn packed_qkv(&self, s: AttnShape) -> bool {
        self.flash_serves(s)
    }

    fn rope_attention_forward_packed(
        &self,
        out: DViewMut<'_>,
        saved: &mut attention::Saved,
        qkv: DView<'_>,
        s: AttnShape,
        rot: Rotary<DView<'_>>,
    ) {
        assert!(
            self.flash_serves(s) && rot.pos == Positions::sequences(s.t),
            "packed q|k|v off the flash path"
        );
        same_store("rope_attention_forward_packed", &[out.st, qkv.st]);
        let [q, k, v] = qkv.qkv(s);
        let tables = attention::Tables { cos: rot.cos.ptr, sin: rot.sin.ptr };
        let at = (s, attention::Ld::packed(s));
        self.attention_forward_flash(&out, self.ptr(&saved.lse), [&q, &k, &v], Some(tables), at);
        saved.rotated_in_place = false;
    }

    fn rope_attention_backward_packed(
        &self,
        dqkv: DViewMut<'_>,
        saved: &attention::Saved,
        scratch: DViewMut<'_>,
        dout: DView<'_>,
        out: DView<'_>,
        qkv: DView<'_>,
        s: AttnShape,
        rot: Rotary<DView<'_>>,
    ) {
        assert!(self.flash_serves(s) && !saved.rotated_in_place, "packed q|k|v off the flash path");
        same_store("rope_attention_backward_packed", &[dqkv.st, dout.st, out.st, qkv.st]);
        let ([q, k, v], [dq, dk, dv]) = (qkv.qkv(s), dqkv.qkv(s));
        let tables = attention::Tables { cos: rot.cos.ptr, sin: rot.sin.ptr };
        let lse_delta = (self.ptr(&saved.lse), scratch.ptr);
        let at = (s, attention::Ld::packed(s));
        self.attention_backward_flash(
            [&dq, &dk, &dv],
            [&dout, &q, &k, &v],
            &out,
            lse_delta,
            Some(tables),
            at,
        );
    }

    fn attention_forward(
        &self,
        out: DViewMut<'_>,
        saved: &mut attention::Saved,
        _scratch: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        s: AttnShape,
    ) {
        let lse = self.ptr(&saved.lse);
        saved.rotated_in_place = true;
        let st = same_store("attention_forward", &[out.st, q.st, k.st, v.st]);
        if self.flash_serves(s) {
            self.attention_forward_flash(&out, lse, [&q, &k, &v], None, (s, attention::Ld::split(s)));
            return;
        }
        if self.attention_forward_tc(&out, lse, [&q, &k, &v], None, s) {
            return;
        }
        assert!(s.d <= 256, "head_dim {} is above the CUDA attention's 256", s.d);
        let [b, t, h, g, d] = [s.b, s.t, s.h, s.g, s.d].map(i32_of);
        let args = [
            Arg::Ptr(out.ptr),
            Arg::Ptr(lse),
            Arg::Ptr(q.ptr),
            Arg::Ptr(k.ptr),
            Arg::Ptr(v.ptr),
            b,
            t,
            h,
            g,
            d,
        ];
        if s.d <= TILED_MAX_D {
            let shared = attention_shared(s.d)[0];
            let grid = tile_grid(s, s.h);
            self.launch_kernel(
                form("attention_forward_tiled", tiled_form(s.d), st),
                grid,
                TILE_THREADS,
                shared,
                &args,
            );
        } else {
            self.launch_kernel(typed("attention_forward", st), row_grid(s.b * s.h * s.t), THREADS, 0, &args);
        }
    }

    fn attention_backward(
        &self,
        dq: DViewMut<'_>,
        dk: DViewMut<'_>,
        dv: DViewMut<'_>,
        saved: &attention::Saved,
        scratch: DViewMut<'_>,
        dout: DView<'_>,
        out: DView<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        s: AttnShape,
    ) {
        let [b, t, h, g, d] = [s.b, s.t, s.h, s.g, s.d].map(i32_of);
        let st = same_store("attention_backward", &[dq.st, dk.st, dv.st, dout.st, out.st, q.st, k.st, v.st]);
        f32_only("attention_backward scratch", &[scratch.st]);
        let (lse, delta) = (Arg::Ptr(self.ptr(&saved.lse)), Arg::Ptr(scratch.ptr));
        let (dout_p, q_p, k_p, v_p) = (Arg::Ptr(dout.ptr), Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr));
        let dq_args = [Arg::Ptr(dq.ptr), delta, dout_p, lse, q_p, k_p, v_p, b, t, h, g, d];
        let dkv_args = [Arg::Ptr(dk.ptr), Arg::Ptr(dv.ptr), delta, dout_p, lse, q_p, k_p, v_p, b, t, h, g, d];
        let tensor = Store::of(self.dtype) != Store::F32;
        // Wide heads: one warp per row; the dq kernel also sums delta from the probabilities.
        let per_row = || {
            self.launch_kernel(
                typed("attention_backward_dq", st),
                row_grid(s.b * s.h * s.t),
                THREADS,
                0,
                &dq_args,
            );
            self.launch_kernel(
                typed("attention_backward_dkv", st),
                row_grid(s.b * s.g * s.t),
                THREADS,
                0,
                &dkv_args,
            );
        };
        if s.d > TILED_MAX_D && !tensor {
            per_row();
            return;
        }
        // delta = rowsum(dO * O) (the flash dq kernel sums its own), then dq per tile of query
        // rows, dk/dv per tile of key rows (or, in 16 bits, the products on the tensor cores).
        let (lse_p, delta_p) = (self.ptr(&saved.lse), scratch.ptr);
        if self.flash_serves(s) {
            // The dq kernel sums delta itself.
            self.attention_backward_flash(
                [&dq, &dk, &dv],
                [&dout, &q, &k, &v],
                &out,
                (lse_p, delta_p),
                None,
                (s, attention::Ld::split(s)),
            );
            return;
        }
        launch!(self, typed("attention_delta", st), row_grid(s.b * s.h * s.t), THREADS; delta, dout_p, &out, b, t, h, d);
        if tensor
            && self.attention_backward_tc([&dq, &dk, &dv], [&dout, &q, &k, &v], (lse_p, delta_p), None, s)
        {
            return;
        }
        if s.d > TILED_MAX_D {
            per_row();
            return;
        }
        let [_, dq_shared, dkv_shared] = attention_shared(s.d);
        self.launch_kernel(
            form("attention_backward_dq_tiled", tiled_form(s.d), st),
            tile_grid(s, s.h),
            TILE_THREADS,
            dq_shared,
            &dq_args,
        );
        self.launch_kernel(
            form("attention_backward_dkv_tiled", tiled_form(s.d), st),
            tile_grid(s, s.g),
            TILE_THREADS,
            dkv_shared,
            &dkv_args,
        );
    }

    fn attention_decode(
        &self,
        out: DViewMut<'_>,
        q: DView<'_>,
        k: DView<'_>,
        v: DView<'_>,
        len: usize,
        s: AttnShape,
    ) {
        let st = same_store("attention_decode", &[out.st, q.st, k.st, v.st]);
        launch!(self, typed("attention_decode", st), (s.h * 32).div_ceil(THREADS as usize) as u32, THREADS; &out, &q, &k, &v, len, s.h, s.g, s.d);
    }

    fn swiglu_forward(&self, act: DViewMut<'_>, gu: DView<'_>, i: usize) {
        let rows = act.len / i;
        let st = same_store("swiglu_forward", &[act.st, gu.st]);
        launch!(self, typed("swiglu_forward", st), Self::blocks(act.len), THREADS; &act, &gu, rows as i64, i);
    }
    fn swiglu_backward(&self, dgu: DViewMut<'_>, dact: DView<'_>, gu: DView<'_>, i: usize) {
        let rows = dact.len / i;
        let st = same_store("swiglu_backward", &[dgu.st, dact.st, gu.st]);
        launch!(self, typed("swiglu_backward", st), Self::blocks(dact.len), THREADS; &dgu, &dact, &gu, rows as i64, i);
    }

    fn cross_entropy(
        &self,
        logits: DViewMut<'_>,
        losses: DViewMut<'_>,
        targets: IView<'_>,
        vocab: usize,
        scale: f32,
    ) {
        let rows = targets.len;
        f32_only("cross_entropy losses", &[losses.st]);
        launch!(self, typed("cross_entropy", logits.st), rows as u32, THREADS; &logits, &losses, &targets, rows, vocab, scale);
    }

    fn sum_to_acc(&self, acc: &mut DBuf<f64>, slot: usize, x: DView<'_>) {
        let p = self.ptr(acc);
        f32_only("sum_to_acc", &[x.st]);
        launch!(self, plain("sum_to_acc"), 1, 1024; Arg::Ptr(p), slot, &x, x.len as i64);
    }

    fn route(&self, route: &mut CudaRoute, logits: DView<'_>, b: usize, t: usize, rc: RouterConfig) {
        let (n, e, k) = (b * t, rc.experts, rc.top_k);
        let slots = n * k;
        f32_only("router logits", &[logits.st]);
        let grow = |have: usize, want: usize| have < want.max(1);
        if grow(route.scores.len(), n * e) {
            route.scores = self.alloc_of(n * e);
        }
        if grow(route.expert.len(), slots) {
            route.expert = self.alloc_of(slots);
            route.weight = self.alloc_of(slots);
            route.pos = self.alloc_of(slots);
            route.rows = self.alloc_of(slots);
        }
        if grow(route.offsets_dev.len(), e + 1) {
            route.offsets_dev = self.alloc_of(e + 1);
        }
        if grow(route.aux_grad.len(), b * e) {
            route.aux_grad = self.alloc_of(b * e);
            route.terms = self.alloc_of(b * e);
        }
        route.k = k;
        let (scores, expert, weight) =
            (self.ptr(&route.scores), self.ptr(&route.expert), self.ptr(&route.weight));
        launch!(self, plain("moe_topk"), Self::blocks(n), THREADS; Arg::Ptr(scores), Arg::Ptr(expert), Arg::Ptr(weight), &logits, n, e, k, Arg::I32(rc.norm_topk_prob as i32));
        // The slots sorted by expert (stable: slot order within an expert), then each slot's
        // position and each position's token.
        let (pos, rows, offs) = (self.ptr(&route.pos), self.ptr(&route.rows), self.ptr(&route.offsets_dev));
        self.sort(expert, slots, e, Some(offs), &|order, _| {
            launch!(self, plain("moe_place"), Self::blocks(slots), THREADS; Arg::Ptr(pos), Arg::Ptr(rows), order, slots, k);
        });
        route.has_aux = rc.alpha > 0.0;
        if route.has_aux {
            let groups = if rc.seq_aux { b } else { 1 };
            route.aux_shape = (groups * e, groups as f64, rc.alpha);
            let (ag, terms) = (self.ptr(&route.aux_grad), self.ptr(&route.terms));
            launch!(self, plain("moe_aux_terms"), (groups * e).min(65535) as u32, THREADS; Arg::Ptr(ag), Arg::Ptr(terms), Arg::Ptr(scores), Arg::Ptr(expert), b, t, e, k, rc.alpha, Arg::I32(rc.seq_aux as i32));
        }
        // The one read per MoE layer: each expert's rows, to size its matrix products.
        route.offsets_raw.resize(e + 1, 0);
        if !self.copy_down(offs, bytes_mut(&mut route.offsets_raw), "reading the MoE routing") {
            route.offsets_raw.fill(0);
        }
        route.offsets.clear();
        route.offsets.extend(route.offsets_raw.iter().map(|&o| o.max(0) as usize));
        route.offsets.resize(e + 1, 0);
    }

    fn expert_offsets<'a>(&self, route: &'a CudaRoute) -> &'a [usize] {
        &route.offsets
    }

    fn aux_to_acc(&self, acc: &mut DBuf<f64>, slot: usize, route: &CudaRoute) {
        if !route.has_aux {
            return;
        }
        let (count, divisor, alpha) = route.aux_shape;
        let (p, terms) = (self.ptr(acc), self.ptr(&route.terms));
        launch!(self, plain("moe_aux_sum"), 1, 32; Arg::Ptr(p), slot, Arg::Ptr(terms), count, divisor, alpha);
    }

    fn gather_rows(&self, out: DViewMut<'_>, x: DView<'_>, route: &CudaRoute, c: usize) {
        let count = out.len / c;
        let rows = self.ptr(&route.rows);
        let st = same_store("gather_rows", &[out.st, x.st]);
        launch!(self, typed("gather_rows", st), count as u32, THREADS; &out, &x, Arg::Ptr(rows), count, c);
    }

    fn combine_rows(
        &self,
        out: DViewMut<'_>,
        y: DView<'_>,
        route: &CudaRoute,
        weighted: bool,
        c: usize,
        accumulate: bool,
    ) {
        let n = out.len / c;
        let (pos, weight) = (self.ptr(&route.pos), self.ptr(&route.weight));
        // Into f32 (the residual stream), or into y's storage (a gradient for the products).
        let name = if out.st == Store::F32 { "combine_rows" } else { "combine_rows_act" };
        if out.st != Store::F32 {
            same_store("combine_rows_act", &[out.st, y.st]);
        }
        launch!(self, typed(name, y.st), n as u32, THREADS; &out, &y, Arg::Ptr(pos), Arg::Ptr(weight), n, route.k, c, Arg::I32(weighted as i32), Arg::I32(accumulate as i32));
    }

    fn slot_dots(&self, out: DViewMut<'_>, dy: DView<'_>, y: DView<'_>, route: &CudaRoute, c: usize) {
        let slots = out.len;
        let pos = self.ptr(&route.pos);
        f32_only("slot_dots output", &[out.st]);
        let st = same_store("slot_dots", &[dy.st, y.st]);
        launch!(self, typed("slot_dots", st), slots as u32, THREADS; &out, &dy, &y, Arg::Ptr(pos), slots, route.k, c);
    }

    fn spread_rows(&self, out: DViewMut<'_>, dy: DView<'_>, route: &CudaRoute, c: usize) {
        let slots = out.len / c;
        let (pos, weight) = (self.ptr(&route.pos), self.ptr(&route.weight));
        let st = same_store("spread_rows", &[out.st, dy.st]);
        launch!(self, typed("spread_rows", st), slots as u32, THREADS; &out, &dy, Arg::Ptr(pos), Arg::Ptr(weight), slots, route.k, c);
    }

    fn router_backward(
        &self,
        route: &mut CudaRoute,
        slot_dw: DView<'_>,
        dlogits: DViewMut<'_>,
        b: usize,
        t: usize,
        rc: RouterConfig,
        aux_scale: f32,
    ) {
        f32_only("router_backward", &[slot_dw.st, dlogits.st]);
        let n = b * t;
        let (scores, expert, weight, ag) = (
            self.ptr(&route.scores),
            self.ptr(&route.expert),
            self.ptr(&route.weight),
            self.ptr(&route.aux_grad),
        );
        launch!(self, plain("moe_router_backward"), Self::blocks(n), THREADS; &dlogits, Arg::Ptr(scores), Arg::Ptr(expert), Arg::Ptr(weight), &slot_dw, Arg::Ptr(ag), n, t, rc.experts, rc.top_k, Arg::I32(rc.norm_topk_prob as i32), Arg::I32(rc.seq_aux as i32), Arg::I32(route.has_aux as i32), aux_scale);
    }

    fn sum_squares_to_acc(&self, acc: &mut DBuf<f64>, slot: usize, x: DView<'_>) {
        f32_only("sum_squares_to_acc", &[x.st]);
        let partials = self.partials.lock().unwrap_or_else(|e| e.into_inner());
        let pp = self.ptr(&partials);
        launch!(self, plain("sum_squares_partial"), REDUCE_BLOCKS, THREADS; Arg::Ptr(pp), &x, x.len as i64);
        let p = self.ptr(acc);
        launch!(self, plain("sum_partials"), 1, 32; Arg::Ptr(p), slot, Arg::Ptr(pp), Arg::I32(REDUCE_BLOCKS as i32));
    }

    fn clip_coef(
        &self,
        acc: &mut DBuf<f64>,
        sum_sq: usize,
        norm: usize,
        coef: usize,
        max_norm: f32,
        inv_scale: f64,
    ) {
        let p = self.ptr(acc);
        launch!(self, plain("clip_coef"), 1, 32; Arg::Ptr(p), sum_sq, norm, coef, max_norm, inv_scale);
    }

    fn adamw(
        &self,
        p: DViewMut<'_>,
        px: Option<DViewMut<'_>>,
        g: DViewMut<'_>,
        m: DViewMut<'_>,
        v: DViewMut<'_>,
        h: AdamW,
        acc: &DBuf<f64>,
        coef: usize,
    ) {
        f32_only("adamw", &[p.st, g.st, m.st, v.st]);
        // Without a copy to refresh, the f32 form with a null pointer.
        let (px, st) = match px {
            Some(x) => {
                assert_eq!(x.len, p.len, "adamw: the weights' copy covers the weights");
                (x.ptr, x.st)
            }
            None => (0, Store::F32),
        };
        let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
        let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
        let step_size = (h.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = 1.0 - h.lr * h.weight_decay;
        let a = self.ptr(acc);
        launch!(self, typed("adamw", st), Self::blocks(p.len).min(4096), THREADS; &p, Arg::Ptr(px), &g, &m, &v, p.len as i64, h.beta1, h.beta2, h.eps, step_size, bc2_sqrt, decay, Arg::Ptr(a), coef);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC is loadable (CI installs it from PyPI into the clone), or the test says why not;
    /// under CI a missing NVRTC is a failure, not a skip.
    fn nvrtc_or_skip() -> bool {
        match libs::get(libs::Lib::Nvrtc) {
            Ok(_) => true,
            Err(missing) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "NVRTC is not loadable under CI (.ci/run installs it and sets MINIMIND_CUDA_LIBS): {missing}"
                );
                eprintln!(
                    "SKIPPED: NVRTC is not loadable here ({missing}); pip install nvidia-cuda-nvrtc-cu12 and set MINIMIND_CUDA_LIBS to its lib/"
                );
                false
            }
        }
    }

    #[test]
    fn cuda_tiled_attention_fits_the_shared_memory_of_every_target() {
        // sm_80 and later let a block opt in to 163 KB (sm_86/89: 99 KB); without opting in,
        // 48 KB. MiniMind's heads (64) need no opt-in.
        let widest = attention_shared(TILED_MAX_D);
        assert!(widest.iter().all(|&b| b <= 99 * 1024), "{widest:?}");
        assert!(attention_shared(64).iter().all(|&b| b <= 48 * 1024));
    }

    #[test]
    fn cuda_emulated_launch_that_overruns_its_shared_memory_fails() {
        // The tiled attention stages its tiles in dynamic shared memory: give it too little.
        let emu = Cuda::emulated(Dtype::Float32).unwrap();
        let s = AttnShape::new(1, 8, 1, 1, 16).unwrap();
        let (q, out, lse) = (emu.alloc(8 * 16), emu.alloc(8 * 16), emu.alloc(8));
        let args = [
            Arg::Ptr(out.mem.ptr),
            Arg::Ptr(lse.mem.ptr),
            Arg::Ptr(q.mem.ptr),
            Arg::Ptr(q.mem.ptr),
            Arg::Ptr(q.mem.ptr),
            i32_of(1),
            i32_of(8),
            i32_of(1),
            i32_of(1),
            i32_of(16),
        ];
        let enough = attention_shared(16)[0];
        let grid = tile_grid(s, 1);
        emu.launch_kernel(typed("attention_forward_tiled", Store::F32), grid, TILE_THREADS, enough, &args);
        emu.check().unwrap();
        emu.launch_kernel(
            typed("attention_forward_tiled", Store::F32),
            grid,
            TILE_THREADS,
            enough / 2,
            &args,
        );
        let err = emu.check().unwrap_err().to_string();
        assert!(
            err.contains(&format!("wrote past its {} bytes of dynamic shared memory", enough / 2)),
            "{err}"
        );
    }

    #[test]
    fn cuda_activations_are_stored_in_16_bits_rounded_once_to_nearest_even() {
        // Around 1.0 a bf16 step is 2^-7 and an f16 step 2^-10: halfway values go to the even
        // neighbour, the kernels' cast and the host's conversion agree, and AdamW's copy of the
        // weights is the new f32 weights rounded the same way.
        let ties = |ulp: f32| [1.0, 1.0 + ulp / 2.0, 1.0 + 1.5 * ulp, -3.0 - ulp / 2.0, 0.0];
        for (dtype, ulp) in [(Dtype::Bfloat16, 2f32.powi(-7)), (Dtype::Float16, 2f32.powi(-10))] {
            let emu = Cuda::emulated(dtype).unwrap();
            let x = ties(ulp);
            let want = [1.0, 1.0, 1.0 + 2.0 * ulp, -3.0, 0.0];
            let mut f = emu.alloc(x.len());
            emu.upload(emu.view_mut(&mut f, 0..5), &x);
            let mut act = emu.alloc_act(x.len());
            assert_eq!((act.st, act.mem.len()), (Store::of(dtype), 10), "{dtype:?}: two bytes a float");
            emu.cast(emu.view_mut(&mut act, 0..5), emu.view(&f, 0..5));
            let mut got = [0.0f32; 5];
            emu.download(emu.view(&act, 0..5), &mut got);
            assert_eq!(got, want, "{dtype:?}: the kernels' rounding");
            emu.upload(emu.view_mut(&mut act, 0..5), &x);
            emu.download(emu.view(&act, 0..5), &mut got);
            assert_eq!(got, want, "{dtype:?}: the host's rounding");

            // One AdamW step with zero gradients and no decay leaves the weights as they were:
            // the copy is their rounding.
            let (mut g, mut m, mut v) = (emu.alloc(5), emu.alloc(5), emu.alloc(5));
            let mut acc = emu.alloc_acc(1);
            emu.zero_acc(&mut acc, 0..1);
            let h = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, step: 1 };
            emu.fill(emu.view_mut(&mut act, 0..5), 7.0);
            emu.adamw(
                emu.view_mut(&mut f, 0..5),
                Some(emu.view_mut(&mut act, 0..5)),
                emu.view_mut(&mut g, 0..5),
                emu.view_mut(&mut m, 0..5),
                emu.view_mut(&mut v, 0..5),
                h,
                &acc,
                0,
            );
            emu.check().unwrap();
            emu.download(emu.view(&act, 0..5), &mut got);
            assert_eq!(got, want, "{dtype:?}: AdamW's copy");
            emu.download(emu.view(&f, 0..5), &mut got);
            assert_eq!(got, x, "{dtype:?}: the f32 weights keep every bit");
        }
    }

    #[test]
    fn cuda_device_memory_estimate_is_what_the_engine_allocates() {
        // The check before a GPU run (cost::device_memory) against the emulator's live bytes
        // after a training step: weights, gradients, moments, the 16-bit weight copy, the
        // workspace in 16 bits, the routing buffers that fill on the first step, the kernels'
        // scratch (RMSNorm's partials, the embedding backward's sort).
        use crate::engine::{Engine, OptimConfig};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
        let optim = OptimConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: 1.0 };
        let (b, t) = (2, 48);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 7 % 6400) as u32).collect();
        let targets: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        for dtype in [Dtype::Float32, Dtype::Bfloat16] {
            // Heads 16 wide (the cuBLAS attention's scratch in 16 bits) and 64 (flash: none).
            for (use_moe, head_dim) in [(false, 16), (true, 16), (false, 64)] {
                let mut cfg = crate::engine::hf::read_config(&dir.join("config.json")).unwrap();
                cfg.use_moe = use_moe;
                if head_dim == 64 {
                    (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) = (128, 2, 1);
                    cfg.head_dim = 64;
                }
                let gpu = Cuda::emulated(dtype).unwrap();
                let before = gpu.dev.live_bytes().unwrap();
                let mut engine = Engine::new(gpu, cfg.clone(), b, t).unwrap();
                engine.init_weights(1);
                engine.forward_backward(&ids, &targets, 1.0);
                engine.optimizer_step(1e-3, &optim);
                engine.kernels.check().unwrap();
                let live = (engine.kernels.dev.live_bytes().unwrap() - before) as f64;
                // The emulator has no cuBLAS, so no cuBLAS workspace.
                let want = crate::cost::device_memory(&cfg, b, t, 1, dtype)
                    - crate::engine::gpu::CUBLAS_WORKSPACE_BYTES as f64;
                let off = (live - want).abs();
                assert!(off < 1e-3 * want, "{dtype:?} moe {use_moe}: estimate {want}, engine holds {live}");
            }
        }
    }

    /// The emulator with a memory limit: allocations past `limit` bytes are refused.
    struct Small {
        inner: emu::Emulator,
        used: Mutex<usize>,
        limit: std::sync::atomic::AtomicUsize,
    }

    impl Small {
        fn limit(&self) -> usize {
            self.limit.load(std::sync::atomic::Ordering::Relaxed)
        }
    }

    impl Device for Small {
        fn alloc(&self, bytes: usize) -> Result<u64, String> {
            let mut used = self.used.lock().unwrap();
            if *used + bytes > self.limit() {
                return Err("out of memory".into());
            }
            *used += bytes;
            self.inner.alloc(bytes)
        }
        fn free(&self, ptr: u64) {
            self.inner.free(ptr)
        }
        fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String> {
            self.inner.htod(dst, src)
        }
        fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String> {
            self.inner.dtoh(src, dst)
        }
        fn launch(
            &self,
            kernel: usize,
            grid: u32,
            block: u32,
            shared: u32,
            args: &[Arg],
        ) -> Result<(), String> {
            self.inner.launch(kernel, grid, block, shared, args)
        }
        fn gemm(&self, g: &GemmCall) -> Result<(), String> {
            self.inner.gemm(g)
        }
        fn synchronize(&self) -> Result<(), String> {
            Ok(())
        }
        fn memory(&self) -> Option<(usize, usize)> {
            Some((self.limit() - *self.used.lock().unwrap(), self.limit()))
        }
        fn stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
            None
        }
        fn versions(&self) -> String {
            "a small emulated GPU".into()
        }
    }

    #[test]
    fn cuda_an_engine_that_does_not_fit_is_one_error_not_a_crash() {
        // Building an engine, uploading its weights and running a step on a device that ran
        // out of memory halfway: every later allocation, copy and launch is skipped, and the
        // first check reports the refused allocation with its size and a hint.
        use crate::engine::Engine;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
        let cfg = crate::engine::hf::read_config(&dir.join("config.json")).unwrap();
        let small =
            Small { inner: emu::Emulator::new().unwrap(), used: Mutex::new(0), limit: (4 << 20).into() };
        let gpu = Cuda::on(Arc::new(small), Dtype::Bfloat16, "small".into()).unwrap();
        let mut engine = Engine::new(gpu, cfg, 2, 48).unwrap();
        engine.init_weights(1);
        let ids: Vec<u32> = (0..96).map(|i| i * 7 % 6400).collect();
        let targets: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let losses = engine.forward_backward(&ids, &targets, 1.0);
        assert!(losses.lm.is_nan(), "no numbers come back from a device that failed");
        let err = engine.kernels.check().unwrap_err().to_string();
        assert!(err.starts_with("out of GPU memory allocating "), "{err}");
        assert!(
            err.contains("B free (out of memory)") && err.contains("hint: lower train.batch_size"),
            "{err}"
        );
        let again = engine.kernels.check().unwrap_err().to_string();
        assert_eq!(again, "the GPU is out of use after the error reported before", "reported once, in full");
    }

    /// The emulator with a fault: launch `fail_at` (counting from 0) and everything after it
    /// fails as a GPU's sticky error does (an illegal address poisons the context).
    struct Faulty {
        inner: emu::Emulator,
        fail_at: usize,
        launches: std::sync::atomic::AtomicUsize,
    }

    impl Faulty {
        fn poisoned(&self) -> bool {
            self.launches.load(std::sync::atomic::Ordering::Relaxed) > self.fail_at
        }
        fn sticky<T>(&self, ok: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
            if self.poisoned() {
                Err("CUDA_ERROR_ILLEGAL_ADDRESS, an illegal memory access was encountered".into())
            } else {
                ok()
            }
        }
    }

    impl Device for Faulty {
        fn alloc(&self, bytes: usize) -> Result<u64, String> {
            self.inner.alloc(bytes)
        }
        fn free(&self, ptr: u64) {
            self.inner.free(ptr)
        }
        fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String> {
            self.sticky(|| self.inner.htod(dst, src))
        }
        fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String> {
            self.sticky(|| self.inner.dtoh(src, dst))
        }
        fn launch(
            &self,
            kernel: usize,
            grid: u32,
            block: u32,
            shared: u32,
            args: &[Arg],
        ) -> Result<(), String> {
            self.launches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            self.sticky(|| self.inner.launch(kernel, grid, block, shared, args))
        }
        fn gemm(&self, g: &GemmCall) -> Result<(), String> {
            self.sticky(|| self.inner.gemm(g))
        }
        fn synchronize(&self) -> Result<(), String> {
            self.sticky(|| Ok(()))
        }
        fn memory(&self) -> Option<(usize, usize)> {
            None
        }
        fn stream(&self) -> Option<Arc<cudarc::driver::CudaStream>> {
            None
        }
        fn versions(&self) -> String {
            "a faulty emulated GPU".into()
        }
    }

    #[test]
    fn cuda_a_sticky_error_is_reported_once_with_its_kernel_and_teardown_is_quiet() {
        use crate::engine::Engine;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
        let cfg = crate::engine::hf::read_config(&dir.join("config.json")).unwrap();
        let faulty =
            Arc::new(Faulty { inner: emu::Emulator::new().unwrap(), fail_at: 5, launches: 0.into() });
        let gpu = Cuda::on(faulty.clone(), Dtype::Float32, "faulty".into()).unwrap();
        let mut engine = Engine::new(gpu, cfg, 2, 48).unwrap();
        engine.init_weights(1);
        let ids: Vec<u32> = (0..96).map(|i| i * 7 % 6400).collect();
        let targets: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let losses = engine.forward_backward(&ids, &targets, 1.0);
        assert!(losses.lm.is_nan(), "no numbers come back from a failed device");
        // The launch that failed, by name and shape; nothing was queued after it.
        let err = engine.kernels.check().unwrap_err().to_string();
        assert!(err.starts_with("CUDA kernel ") && err.contains("(grid "), "{err}");
        assert!(
            err.ends_with("failed: CUDA_ERROR_ILLEGAL_ADDRESS, an illegal memory access was encountered"),
            "{err}"
        );
        assert_eq!(
            faulty.launches.load(std::sync::atomic::Ordering::Relaxed),
            6,
            "no launch after the failure"
        );
        // Reported once; later checks only say the device is out of use.
        let again = engine.kernels.check().unwrap_err().to_string();
        assert_eq!(again, "the GPU is out of use after the error reported before");
        engine.forward_backward(&ids, &targets, 1.0);
        assert_eq!(faulty.launches.load(std::sync::atomic::Ordering::Relaxed), 6);
        drop(engine);
    }

    /// An emulated GPU whose launches run blocks and threads in an order shuffled by `seed`.
    fn shuffled(dtype: Dtype, seed: u64) -> Cuda {
        let dev = emu::Emulator::shuffled(Some(seed)).unwrap();
        Cuda::on(Arc::new(dev), dtype, format!("shuffled {seed}")).unwrap()
    }

    #[test]
    fn cuda_every_kernel_gives_the_same_bits_in_any_block_and_thread_order() {
        // What a GPU may do: blocks in any order, threads interleaved as warps are scheduled.
        // Every case of the conformance suite, under two shuffle seeds, bit for bit.
        for dtype in [Dtype::Float32, Dtype::Bfloat16] {
            let (a, b) = (shuffled(dtype, 1), shuffled(dtype, 2));
            let checks = crate::engine::conformance::kernels(&a, &b, &|f| f(), &|f| f(), &|_| 0.0);
            a.check().unwrap();
            b.check().unwrap();
            let differ: Vec<String> = checks
                .iter()
                .filter(|c| !c.passed())
                .map(|c| format!("{} ({:.1e})", c.name, c.worst))
                .collect();
            assert!(
                checks.len() >= 20 && differ.is_empty(),
                "{dtype:?}: order-dependent kernels: {differ:?}"
            );
        }
    }

    #[test]
    fn cuda_a_shuffled_emulator_catches_an_order_dependent_launch() {
        // The control: out[i] += out[i - 1] over overlapping views reads what another thread
        // (or block) may or may not have written yet, so its result depends on the order.
        let run = |gpu: &Cuda| {
            let n = 4096;
            let mut buf = gpu.alloc(n + 1);
            gpu.upload(gpu.view_mut(&mut buf, 0..n + 1), &vec![1.0; n + 1]);
            let p = buf.mem.ptr;
            launch!(gpu, plain("add_f32"), 4, 256; Arg::Ptr(p + 4), Arg::Ptr(p), n as i64);
            gpu.check().unwrap();
            let mut out = vec![0.0; n + 1];
            gpu.download(gpu.view(&buf, 0..n + 1), &mut out);
            out
        };
        let (a, b) = (run(&shuffled(Dtype::Float32, 1)), run(&shuffled(Dtype::Float32, 2)));
        assert_ne!(a, b, "two shuffle seeds must give two orders");
        let plain = Cuda::emulated(Dtype::Float32).unwrap();
        assert_eq!(run(&plain), run(&plain), "in order, the emulator is deterministic");
    }

    /// Attention forward and backward of shape `s` on `gpu` with seeded inputs; `ready` runs
    /// once everything is allocated. Returns out, lse, dq, dk, dv.
    fn attention_round(gpu: &Cuda, s: AttnShape, ready: &dyn Fn()) -> Vec<Vec<f32>> {
        let mut rng = crate::rng::SplitMix64::new(7);
        let mut random = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect() };
        let (nq, nkv) = (s.b * s.t * s.h * s.d, s.b * s.t * s.g * s.d);
        let mut up = |n: usize| {
            let mut buf = gpu.alloc_act(n);
            gpu.upload(gpu.view_mut(&mut buf, 0..n), &random(n));
            buf
        };
        let (q, k, v, dout) = (up(nq), up(nkv), up(nkv), up(nq));
        let (mut out, mut dq, mut dk, mut dv) =
            (gpu.alloc_act(nq), gpu.alloc_act(nq), gpu.alloc_act(nkv), gpu.alloc_act(nkv));
        let mut saved = gpu.new_attn(s, false);
        let mut scratch = gpu.alloc(gpu.attn_scratch_len(s, false));
        let ns = gpu.len(&scratch);
        ready();
        gpu.attention_forward(
            gpu.view_mut(&mut out, 0..nq),
            &mut saved,
            gpu.view_mut(&mut scratch, 0..ns),
            gpu.view(&q, 0..nq),
            gpu.view(&k, 0..nkv),
            gpu.view(&v, 0..nkv),
            s,
        );
        gpu.attention_backward(
            gpu.view_mut(&mut dq, 0..nq),
            gpu.view_mut(&mut dk, 0..nkv),
            gpu.view_mut(&mut dv, 0..nkv),
            &saved,
            gpu.view_mut(&mut scratch, 0..ns),
            gpu.view(&dout, 0..nq),
            gpu.view(&out, 0..nq),
            gpu.view(&q, 0..nq),
            gpu.view(&k, 0..nkv),
            gpu.view(&v, 0..nkv),
            s,
        );
        gpu.check().unwrap();
        let down = |b: &FBuf| {
            let mut h = vec![0.0; b.len];
            gpu.download(gpu.view(b, 0..b.len), &mut h);
            h
        };
        let mut lse = vec![0.0f32; saved.lse.len()];
        gpu.copy_down(saved.lse.ptr, bytes_mut(&mut lse), "lse");
        vec![down(&out), lse, down(&dq), down(&dk), down(&dv)]
    }

    #[test]
    fn cuda_the_flash_forms_are_the_widths_the_model_prices_as_flash() {
        for d in 1..=512 {
            assert_eq!(attention::flash_form(d).is_some(), crate::engine::gpu::flash_width(d), "D {d}");
        }
    }

    #[test]
    fn cuda_flash_is_on_unless_the_variable_says_0() {
        for (value, on) in
            [(None, true), (Some("1"), true), (Some(""), true), (Some("0"), false), (Some(" 0 "), false)]
        {
            assert_eq!(flash_wanted(value), on, "{value:?}");
        }
    }

    #[test]
    fn cuda_mma_fragments_follow_the_ptx_layout() {
        // One warp's m16n8k16 product through the flash kernels' fragment helpers and the
        // emulated mma.sync, against a plain product: small integers, so exact. (On a GPU the
        // flash kernels' conformance cases check the hardware's layout against the CPU.)
        let gpu = Cuda::emulated(Dtype::Bfloat16).unwrap();
        let a: Vec<f32> = (0..256).map(|i| ((i * 7 + 3) % 17) as f32 - 8.0).collect();
        let bt: Vec<f32> = (0..128).map(|i| ((i * 5 + 1) % 13) as f32 - 6.0).collect();
        let (mut da, mut db, mut dd) = (gpu.alloc_act(256), gpu.alloc_act(128), gpu.alloc(128));
        gpu.upload(gpu.view_mut(&mut da, 0..256), &a);
        gpu.upload(gpu.view_mut(&mut db, 0..128), &bt);
        launch!(gpu, plain("mma_probe"), 1, 32; Arg::Ptr(dd.mem.ptr), Arg::Ptr(da.mem.ptr), Arg::Ptr(db.mem.ptr));
        gpu.check().unwrap();
        let mut got = vec![0.0; 128];
        gpu.download(gpu.view(&dd, 0..128), &mut got);
        let want: Vec<f32> =
            (0..128).map(|e| (0..16).map(|k| a[(e / 8) * 16 + k] * bt[(e % 8) * 16 + k]).sum()).collect();
        assert_eq!(got, want, "D [16 x 8] row-major");
        let _ = &mut dd;
    }

    #[test]
    fn cuda_flash_attention_agrees_with_the_cublas_path() {
        // In 16 bits at heads 64 and 128 wide the flash kernels serve (no scores in memory,
        // nothing of cuBLAS); switched off, the cuBLAS products do. Both against each other
        // within a rounding of the 16-bit P and dS: several query and key tiles, ragged, G < H.
        for (dtype, tolerance) in [(Dtype::Bfloat16, 2e-2), (Dtype::Float16, 5e-3)] {
            for s in [AttnShape::new(2, 150, 4, 2, 64).unwrap(), AttnShape::new(1, 70, 2, 1, 128).unwrap()] {
                let flash = Cuda::emulated(dtype).unwrap();
                let by_flash = attention_round(&flash, s, &|| {});
                let mut cublas = Cuda::emulated(dtype).unwrap();
                cublas.without_flash();
                let by_cublas = attention_round(&cublas, s, &|| {});
                let counts = |gpu: &Cuda| {
                    let names = [
                        "flash_forward",
                        "flash_backward_dq",
                        "flash_backward_dkv",
                        "attn_softmax",
                        "attention_delta",
                    ];
                    let launches = gpu.launch_counts();
                    (names.map(|k| launches.get(k).copied().unwrap_or(0)), launches.get("gemm").copied())
                };
                // The flash dq kernel sums delta itself: no pass of its own there.
                assert_eq!(counts(&flash), ([1, 1, 1, 0, 0], None), "{dtype:?} {s:?}: flash");
                assert_eq!(counts(&cublas).0, [0, 0, 0, 2, 1], "{dtype:?} {s:?}: cuBLAS");
                for (what, (a, b)) in
                    ["out", "lse", "dq", "dk", "dv"].iter().zip(by_flash.iter().zip(&by_cublas))
                {
                    let worst = crate::engine::conformance::rel(a, b);
                    assert!(worst < tolerance, "{dtype:?} {s:?} {what}: {worst:.2e}");
                }
            }
        }
    }

    #[test]
    fn cuda_packed_qkv_training_agrees_with_three_products_and_cublas_attention() {
        // The model's wiring of the packed q|k|v path (one product each way into and out of
        // the flash kernels' strided rows), heads 64 wide in bf16: one micro-batch's loss and
        // every tensor's gradient against the engine that takes three products and the cuBLAS
        // attention (the conformance suite checks the kernels alone). Dense: MoE takes the
        // same attention, and bf16's differences flip some of its top-k choices, which moves
        // its experts' gradients by tens of percent.
        use crate::engine::Engine;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
        let (b, t) = (2, 40);
        let ids: Vec<u32> = (0..b * t).map(|i| (i * 37 % 6400) as u32).collect();
        let targets: Vec<i32> = (0..b * t).map(|i| (i * 53 % 6400) as i32).collect();
        let mut cfg = crate::engine::hf::read_config(&dir.join("config.json")).unwrap();
        (cfg.use_moe, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) =
            (false, 128, 2, 1, 64);
        let run = |flash: bool| {
            let mut cuda = Cuda::emulated(Dtype::Bfloat16).unwrap();
            if !flash {
                cuda.without_flash();
            }
            let mut e = Engine::new(cuda, cfg.clone(), b, t).unwrap();
            e.init_weights(2);
            let loss = e.forward_backward(&ids, &targets, 1.0);
            e.kernels.check().unwrap();
            let launches = e.kernels.launch_counts();
            (loss.lm, e.grads_host(), launches.get("flash_forward").copied())
        };
        let (packed, split) = (run(true), run(false));
        // (The dry backend's launch test holds the packed path to its product count.)
        let layers = cfg.num_hidden_layers as u64;
        assert_eq!((packed.2, split.2), (Some(layers), None), "the flash path runs");
        assert!((packed.0 - split.0).abs() < 1e-2, "loss {} vs {}", packed.0, split.0);
        for tensor in &crate::engine::Layout::new(&cfg).tensors {
            let r = tensor.range.clone();
            let worst = crate::engine::conformance::rel(&packed.1[r.clone()], &split.1[r]);
            assert!(worst < 3e-2, "{}: {worst:.2e}", tensor.name);
        }
    }

    #[test]
    fn cuda_tensor_attention_in_chunks_equals_the_whole_batch() {
        // In bf16 the products go to (emulated) cuBLAS; with memory for two sequences' scores
        // at a time, five go through in chunks of 2, 2 and 1, bit for bit as all at once, and
        // the tiled kernels never run.
        let s = AttnShape::new(5, 37, 4, 2, 16).unwrap();
        let whole = Cuda::emulated(Dtype::Bfloat16).unwrap();
        let all_at_once = attention_round(&whole, s, &|| {});
        assert_eq!(whole.launches_of("attn_softmax"), 2, "one forward and one backward pass");
        let small = Arc::new(Small {
            inner: emu::Emulator::new().unwrap(),
            used: Mutex::new(0),
            limit: usize::MAX.into(),
        });
        let chunked = Cuda::on(small.clone(), Dtype::Bfloat16, "small".into()).unwrap();
        let two = crate::engine::gpu::attention_scratch(2, s.t, s.h, s.g, s.d, 2).1;
        let in_chunks = attention_round(&chunked, s, &|| {
            // Half the free memory holds two sequences' scratch, not three.
            let used = *small.used.lock().unwrap();
            small.limit.store(used + 2 * two + 64, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!(chunked.launches_of("attn_softmax"), 6, "three chunks, forward and backward");
        assert!(in_chunks == all_at_once, "chunked attention differs");
        for gpu in [&whole, &chunked] {
            for tiled in
                ["attention_forward_tiled", "attention_backward_dq_tiled", "attention_backward_dkv_tiled"]
            {
                assert_eq!(gpu.launches_of(tiled), 0, "{tiled}");
            }
        }
        // Without memory for even one sequence, the tiled kernels serve.
        let tiny = Arc::new(Small {
            inner: emu::Emulator::new().unwrap(),
            used: Mutex::new(0),
            limit: usize::MAX.into(),
        });
        let tiled = Cuda::on(tiny.clone(), Dtype::Bfloat16, "tiny".into()).unwrap();
        let fallback = attention_round(&tiled, s, &|| {
            let used = *tiny.used.lock().unwrap();
            tiny.limit.store(used + 1024, std::sync::atomic::Ordering::Relaxed);
        });
        assert_eq!((tiled.launches_of("attn_softmax"), tiled.launches_of("attention_forward_tiled")), (0, 1));
        for (a, b) in fallback.iter().zip(&all_at_once) {
            assert!(crate::engine::conformance::rel(a, b) < 2e-2, "the tiled kernels agree within bf16");
        }
    }

    #[test]
    fn cuda_the_dry_backend_launches_what_the_cuda_engine_does() {
        // The step-time model prices the dry backend's calls; they must be the CUDA engine's:
        // one optimiser step of two micro-batches, kernel by kernel, in every dtype. MoE
        // routing depends on the tokens (an expert without rows skips its products), so MoE
        // compares the routing kernels only.
        use crate::engine::dry::Dry;
        use crate::engine::{Engine, OptimConfig};
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
        let optim = OptimConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: 1.0 };
        for dtype in [Dtype::Float32, Dtype::Bfloat16, Dtype::Float16] {
            // Heads 16 wide (cuBLAS attention in 16 bits), and 64 (the flash kernels), dense.
            for (use_moe, head_dim) in [(false, 16), (true, 16), (false, 64)] {
                let mut cfg = crate::engine::hf::read_config(&dir.join("config.json")).unwrap();
                cfg.use_moe = use_moe;
                if head_dim == 64 {
                    cfg.hidden_size = 128;
                    cfg.num_attention_heads = 2;
                    cfg.num_key_value_heads = 1;
                    cfg.head_dim = 64;
                }
                let mut gpu = Engine::new(Cuda::emulated(dtype).unwrap(), cfg.clone(), 2, 40).unwrap();
                gpu.init_weights(1);
                let before = gpu.kernels.launch_counts();
                crate::roofline::one_step(&mut gpu, 2, 1e-3, &optim);
                gpu.kernels.check().unwrap();
                let mut cuda = gpu.kernels.launch_counts();
                for (k, n) in before {
                    *cuda.get_mut(&k).unwrap() -= n;
                }
                cuda.retain(|_, n| *n > 0);
                let mut dry = Engine::new(Dry::new(dtype), cfg, 2, 40).unwrap();
                crate::roofline::one_step(&mut dry, 2, 1e-3, &optim);
                let mut counted = std::collections::BTreeMap::<String, u64>::new();
                for call in dry.kernels.take() {
                    *counted.entry(call.kernel.to_string()).or_insert(0) += 1;
                }
                if use_moe {
                    let routing = |k: &String| {
                        k.starts_with("moe_") || k.ends_with("_rows") || k == "slot_dots" || k == "host read"
                    };
                    cuda.retain(|k, _| routing(k));
                    counted.retain(|k, _| routing(k));
                }
                assert_eq!(counted, cuda, "{dtype:?} moe {use_moe}: dry (left) against the emulated GPU");
            }
        }
    }

    #[test]
    fn cuda_matmul_takes_16_bit_operands_into_either_storage_and_refuses_a_mix() {
        let emu = Cuda::emulated(Dtype::Bfloat16).unwrap();
        // [1, 2] · [2, 1]: 1.5 * 1.5 + 1 * 1 = 3.25, exact in f32 and in bf16.
        let (mut a, mut b) = (emu.alloc_act(2), emu.alloc_act(2));
        emu.upload(emu.view_mut(&mut a, 0..2), &[1.5, 1.0]);
        emu.upload(emu.view_mut(&mut b, 0..2), &[1.5, 1.0]);
        let g =
            Gemm { rows: 1, cols: 1, depth: 2, a_transposed: false, b_transposed: false, accumulate: false };
        let (mut to_f32, mut to_act) = (emu.alloc(1), emu.alloc_act(1));
        emu.matmul(emu.view_mut(&mut to_f32, 0..1), emu.view(&a, 0..2), emu.view(&b, 0..2), g);
        emu.matmul(emu.view_mut(&mut to_act, 0..1), emu.view(&a, 0..2), emu.view(&b, 0..2), g);
        emu.check().unwrap();
        let mut got = [0.0f32; 2];
        emu.download(emu.view(&to_f32, 0..1), &mut got[..1]);
        emu.download(emu.view(&to_act, 0..1), &mut got[1..]);
        assert_eq!(got, [3.25, 3.25]);
        let f = emu.alloc(2);
        let mixed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            emu.matmul(emu.view_mut(&mut to_f32, 0..1), emu.view(&a, 0..2), emu.view(&f, 0..2), g)
        }));
        assert!(mixed.is_err(), "an f32 operand beside a bf16 one is a model bug, caught");
    }
    #[test]
    fn cuda_compile_errors_carry_the_nvrtc_log() {
        if !nvrtc_or_skip() {
            return;
        }
        let err = nvrtc::compile("__global__ void f() { undeclared = 1; }", "sm_80", &[]).err().unwrap();
        assert!(err.contains("NVRTC_ERROR_COMPILATION") && err.contains("undeclared"), "{err}");
    }
}
