//! What the CUDA kernels run on: a GPU through the driver API and cuBLAS ([`Gpu`]), or the
//! emulator that runs `kernels.cu` as C++ on the CPU ([`super::emu::Emulator`]). [`super::Cuda`]
//! is written once over [`Device`], so CI, which has no GPU, runs the same launch code, the same
//! kernel sources and the same cuBLAS argument mapping as the GPU does.

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, result as blas, sys as blas_sys};
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaModule, CudaStream, result};

use crate::config::Dtype;

/// A kernel argument: every parameter of `kernels.cu` is 4 or 8 bytes, passed in an 8-byte slot.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(u64),
    I32(i32),
    I64(i64),
    F32(f32),
    F64(f64),
}

impl Arg {
    pub fn bits(self) -> u64 {
        match self {
            Arg::Ptr(p) => p,
            Arg::I32(x) => x as u32 as u64,
            Arg::I64(x) => x as u64,
            Arg::F32(x) => x.to_bits() as u64,
            Arg::F64(x) => x.to_bits(),
        }
    }

    /// The C type's letter, as the emulator's signatures spell them.
    pub fn code(self) -> char {
        match self {
            Arg::Ptr(_) => 'p',
            Arg::I32(_) => 'i',
            Arg::I64(_) => 'l',
            Arg::F32(_) => 'f',
            Arg::F64(_) => 'd',
        }
    }
}

/// How a buffer of floats is stored: f32, or the bf16/f16 activations of a run in that dtype.
/// The kernels of `kernels.cu` that take activations come in one form per store, in this
/// order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    F32,
    Bf16,
    F16,
}

impl Store {
    /// Activations of a run computing in `dtype`.
    pub fn of(dtype: Dtype) -> Store {
        match dtype {
            Dtype::Float32 => Store::F32,
            Dtype::Bfloat16 => Store::Bf16,
            Dtype::Float16 => Store::F16,
        }
    }

    pub fn size(self) -> usize {
        if self == Store::F32 { 4 } else { 2 }
    }

    /// The kernel-name suffix and index among a template's forms.
    pub fn index(self) -> usize {
        self as usize
    }

    /// Host f32 to stored bytes (rounded to nearest even), appended to `out`.
    pub fn encode(self, x: &[f32], out: &mut Vec<u8>) {
        match self {
            Store::F32 => out.extend(x.iter().flat_map(|v| v.to_le_bytes())),
            Store::Bf16 => out.extend(x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())),
            Store::F16 => out.extend(x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes())),
        }
    }

    /// Stored bytes back to f32.
    pub fn decode(self, bytes: &[u8], out: &mut [f32]) {
        let w = self.size();
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(w)) {
            *o = match self {
                Store::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                Store::Bf16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                Store::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            };
        }
    }
}

/// One column-major `cublasGemmEx` call: `c[n, m] = op(b)[n, k] op(a)[k, m] (+ c)`, `a` and
/// `b` stored as `ab`, `c` as `c_store` (the same, or f32), accumulated in f32 (TF32 off).
#[derive(Clone, Copy, Debug)]
pub struct GemmCall {
    pub b_transposed: bool,
    pub a_transposed: bool,
    pub n: usize,
    pub m: usize,
    pub k: usize,
    pub b: u64,
    pub ldb: usize,
    pub a: u64,
    pub lda: usize,
    pub c: u64,
    pub ldc: usize,
    pub accumulate: bool,
    pub ab: Store,
    pub c_store: Store,
}

/// The operations [`super::Cuda`] needs from a device. Work is queued in order on one stream;
/// `dtoh` and `synchronize` wait for it. Errors are one line each.
pub trait Device: Send + Sync {
    /// `bytes` of zeroed device memory.
    fn alloc(&self, bytes: usize) -> Result<u64, String>;
    fn free(&self, ptr: u64);
    /// Queues a copy from host memory (staged before the call returns: `src` may go after).
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String>;
    /// Copies to host memory once the queued work is done.
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String>;
    /// Queues kernel `kernel` (an index into [`super::kernel_names`]).
    fn launch(&self, kernel: usize, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<(), String>;
    fn gemm(&self, g: &GemmCall) -> Result<(), String>;
    fn synchronize(&self) -> Result<(), String>;
    /// Free and total memory, in bytes.
    fn memory(&self) -> Option<(usize, usize)>;
    /// Bytes allocated through this device and not yet freed, where it counts them (the
    /// emulator: tests hold the memory estimate to it).
    fn live_bytes(&self) -> Option<usize> {
        None
    }
    /// The stream NCCL should queue on (none on the emulator).
    fn stream(&self) -> Option<Arc<CudaStream>>;
    /// The library versions, for meta.json.
    fn versions(&self) -> String;
}

/// Typed device memory, freed on drop.
pub struct DBuf<T> {
    pub(super) ptr: u64,
    pub(super) len: usize,
    dev: Arc<dyn Device>,
    _type: PhantomData<T>,
}

impl<T> DBuf<T> {
    /// `len` zeroed elements (at least one: a zero-length allocation has no address).
    pub fn zeroed(dev: &Arc<dyn Device>, len: usize) -> Result<DBuf<T>, String> {
        let ptr = dev.alloc(len.max(1) * std::mem::size_of::<T>())?;
        Ok(DBuf { ptr, len: len.max(1), dev: dev.clone(), _type: PhantomData })
    }

    /// `len` elements with no memory behind them (address 0): what an allocation the device
    /// refused leaves, so the caller can go on to report the failure instead of crashing.
    pub fn unallocated(dev: &Arc<dyn Device>, len: usize) -> DBuf<T> {
        DBuf { ptr: 0, len: len.max(1), dev: dev.clone(), _type: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl<T> Drop for DBuf<T> {
    fn drop(&mut self) {
        if self.ptr != 0 {
            self.dev.free(self.ptr);
        }
    }
}

/// `x`'s bytes (f32, i32 and f64 have no padding).
pub fn bytes<T: Copy>(x: &[T]) -> &[u8] {
    // SAFETY: plain numbers, read as bytes within their own length.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

pub fn bytes_mut<T: Copy>(x: &mut [T]) -> &mut [u8] {
    // SAFETY: every byte pattern is a valid f32, i32 or f64.
    unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr() as *mut u8, std::mem::size_of_val(x)) }
}

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED: u32 = 48 * 1024;

/// A GPU: its context, one stream, cuBLAS on that stream, and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    /// In the order of [`super::kernel_names`].
    funcs: Vec<CudaFunction>,
    /// Per kernel, the dynamic shared memory it has opted in to (above the default 48 KB).
    opted_in: Vec<AtomicU32>,
    /// Pinned buffers that small uploads (each micro-batch's ids and targets) go through;
    /// empty until the first, and for good where pinned memory was refused.
    staging: Mutex<Staging>,
}

/// Uploads up to this many bytes go through pinned staging; larger ones (weights, at load)
/// copy from pageable memory, where the driver may wait for the stream first (CUDA's API
/// synchronisation notes allow it; from pinned memory a copy is always asynchronous).
const STAGE_BYTES: usize = 1 << 20;
/// Staging buffers in the ring: an upload waits only for the copy made `STAGES` uploads ago
/// (two micro-batches back), never for the kernels queued since.
const STAGES: usize = 4;

/// A ring of pinned host buffers, each with the event of the copy last made from it.
#[derive(Default)]
struct Staging {
    stages: Vec<Stage>,
    next: usize,
    refused: bool,
}

struct Stage {
    ptr: *mut u8,
    copied: CudaEvent,
}

// SAFETY: `ptr` is pinned host memory owned by this stage alone, used under the `Mutex`.
unsafe impl Send for Stage {}

impl Drop for Stage {
    fn drop(&mut self) {
        // SAFETY: the last copy from the buffer is done before it is freed, once, with the
        // context current on this thread.
        unsafe {
            let _ = self.copied.context().bind_to_thread();
            let _ = self.copied.synchronize();
            let _ = result::free_host(self.ptr as *mut c_void);
        }
    }
}

impl Gpu {
    pub fn new(
        ctx: Arc<CudaContext>,
        stream: Arc<CudaStream>,
        blas: CudaBlas,
        module: Arc<CudaModule>,
        funcs: Vec<CudaFunction>,
    ) -> Gpu {
        let opted_in = funcs.iter().map(|_| AtomicU32::new(DEFAULT_SHARED)).collect();
        Gpu { ctx, stream, blas, _module: module, funcs, opted_in, staging: Mutex::default() }
    }

    /// Copies `src` (at most [`STAGE_BYTES`]) to `dst` through the next pinned buffer of the
    /// ring, without waiting for the stream; false where staging is refused or failed (the
    /// caller copies from pageable memory instead, from then on).
    fn staged_htod(&self, dst: u64, src: &[u8]) -> bool {
        let mut st = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if st.refused {
            return false;
        }
        if st.stages.is_empty() {
            for _ in 0..STAGES {
                // SAFETY: a fresh pinned allocation, owned (and freed) by its `Stage`.
                let stage = unsafe { result::malloc_host(STAGE_BYTES, 0) }.and_then(|ptr| {
                    let copied = self.ctx.new_event(None);
                    copied.map(|copied| Stage { ptr: ptr as *mut u8, copied })
                });
                match stage {
                    Ok(stage) => st.stages.push(stage),
                    Err(_) => {
                        st.stages.clear();
                        st.refused = true;
                        return false;
                    }
                }
            }
        }
        let i = st.next;
        st.next = (i + 1) % STAGES;
        let stage = &st.stages[i];
        let s = self.stream.cu_stream();
        let copy = stage.copied.synchronize().and_then(|()| {
            // SAFETY: the buffer's last copy is done (above), so it may be rewritten; it holds
            // STAGE_BYTES >= src.len(); `dst` covers src.len() bytes. The event recorded after
            // the copy keeps the buffer until the copy has run.
            unsafe {
                let pinned = std::slice::from_raw_parts_mut(stage.ptr, src.len());
                pinned.copy_from_slice(src);
                result::memcpy_htod_async(dst, pinned, s)?;
            }
            stage.copied.record(&self.stream)
        });
        // Staging is only a faster road: where it fails, the pageable copy is tried (and
        // reports the error if the GPU itself is broken).
        st.refused = copy.is_err();
        copy.is_ok()
    }

    /// The context is current on this thread (the engine may run on another thread than the
    /// one that opened the GPU).
    fn bind(&self) -> Result<(), String> {
        self.ctx.bind_to_thread().map_err(|e| format!("binding the GPU to this thread: {e}"))
    }
}

impl Device for Gpu {
    fn alloc(&self, bytes: usize) -> Result<u64, String> {
        self.bind()?;
        let s = self.stream.cu_stream();
        // SAFETY: a fresh allocation of `bytes`, zeroed on the same stream before any use.
        // Stream-ordered where the device has memory pools (as cudarc decides), else plain.
        unsafe {
            let p = if self.ctx.has_async_alloc() {
                result::malloc_async(s, bytes)
            } else {
                result::malloc_sync(bytes)
            }
            .map_err(|e| e.to_string())?;
            result::memset_d8_async(p, 0, bytes, s).map_err(|e| e.to_string())?;
            Ok(p)
        }
    }
    fn free(&self, ptr: u64) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: `ptr` came from `alloc` and is freed once, after its uses: in stream order,
        // or (without memory pools) once the device is idle.
        let _ = unsafe {
            if self.ctx.has_async_alloc() {
                result::free_async(ptr, self.stream.cu_stream())
            } else {
                self.stream.synchronize().and_then(|()| result::free_sync(ptr))
            }
        };
    }
    fn htod(&self, dst: u64, src: &[u8]) -> Result<(), String> {
        self.bind()?;
        if src.len() <= STAGE_BYTES && self.staged_htod(dst, src) {
            return Ok(());
        }
        // SAFETY: `dst` covers `src.len()` bytes of a live allocation (the callers' views check
        // the lengths). From pageable memory the driver stages the copy before the call
        // returns (and may wait for the stream to do so).
        unsafe { result::memcpy_htod_async(dst, src, self.stream.cu_stream()) }.map_err(|e| e.to_string())
    }
    fn dtoh(&self, src: u64, dst: &mut [u8]) -> Result<(), String> {
        self.bind()?;
        // SAFETY: `src` covers `dst.len()` bytes; the stream is synchronised before `dst` is read.
        unsafe { result::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .and_then(|()| self.stream.synchronize())
            .map_err(|e| e.to_string())
    }
    fn launch(&self, kernel: usize, grid: u32, block: u32, shared: u32, args: &[Arg]) -> Result<(), String> {
        self.bind()?;
        let mut slots = [0u64; 24];
        let mut params = [std::ptr::null_mut::<c_void>(); 24];
        for (slot, a) in slots.iter_mut().zip(args) {
            *slot = a.bits();
        }
        for (p, slot) in params.iter_mut().zip(slots.iter_mut()) {
            *p = slot as *mut u64 as *mut c_void;
        }
        let f = self.funcs[kernel].cu_function();
        if shared > self.opted_in[kernel].load(Ordering::Relaxed) {
            // Above 48 KB of dynamic shared memory a kernel must opt in, once (sm_80 and later
            // allow up to 163 KB; the tiled attention asks for at most 68 KB).
            use cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES as MAX;
            // SAFETY: a live function of this context.
            unsafe { result::function::set_function_attribute(f, MAX, shared as i32) }
                .map_err(|e| format!("{shared} bytes of shared memory: {e}"))?;
            self.opted_in[kernel].fetch_max(shared, Ordering::Relaxed);
        }
        // SAFETY: the arguments match the kernel's parameters (one 4- or 8-byte slot each, read
        // little-endian; the emulator checks the types), and every pointer is a live allocation.
        unsafe {
            result::launch_kernel(
                f,
                (grid, 1, 1),
                (block, 1, 1),
                shared,
                self.stream.cu_stream(),
                &mut params[..args.len()],
            )
        }
        .map_err(|e| e.to_string())
    }
    fn gemm(&self, g: &GemmCall) -> Result<(), String> {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        self.bind()?;
        let op = |t: bool| if t { CUBLAS_OP_T } else { CUBLAS_OP_N };
        let (alpha, beta) = (1.0f32, if g.accumulate { 1.0f32 } else { 0.0 });
        let ty = |s: Store| match s {
            Store::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
            Store::Bf16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
            Store::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        };
        // f32 accumulation always: on bf16/f16 inputs that is the tensor cores' mode; on f32
        // inputs it keeps TF32 off, so float32 matches the CPU engine.
        let compute = blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F;
        // SAFETY: the caller bounds what cuBLAS reads and writes by the views' lengths; the
        // pointers are live allocations used in stream order.
        unsafe {
            blas::gemm_ex(
                *self.blas.handle(),
                op(g.b_transposed),
                op(g.a_transposed),
                g.n as i32,
                g.m as i32,
                g.k as i32,
                &alpha as *const f32 as *const c_void,
                g.b as *const c_void,
                ty(g.ab),
                g.ldb as i32,
                g.a as *const c_void,
                ty(g.ab),
                g.lda as i32,
                &beta as *const f32 as *const c_void,
                g.c as *mut c_void,
                ty(g.c_store),
                g.ldc as i32,
                compute,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| format!("{e:?}"))
    }
    fn synchronize(&self) -> Result<(), String> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| e.to_string())
    }
    fn memory(&self) -> Option<(usize, usize)> {
        self.bind().ok()?;
        result::mem_get_info().ok()
    }
    fn stream(&self) -> Option<Arc<CudaStream>> {
        Some(self.stream.clone())
    }
    fn versions(&self) -> String {
        format!(
            "driver CUDA {}, NVRTC {}, cuBLAS {}",
            versions::driver(),
            versions::nvrtc(),
            versions::cublas(&self.blas)
        )
    }
}

/// Library versions ("?" when a library does not say).
mod versions {
    fn dotted(v: i32) -> String {
        // CUDA encodes 12.8 as 12080, cuBLAS 12.8.4 as 120804.
        if v >= 100_000 {
            format!("{}.{}.{}", v / 10_000, v / 100 % 100, v % 100)
        } else {
            format!("{}.{}", v / 1000, v % 1000 / 10)
        }
    }

    pub fn driver() -> String {
        let mut v = 0;
        // SAFETY: writes one int; the driver was loaded by the probe.
        let ok = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
            == cudarc::driver::sys::CUresult::CUDA_SUCCESS;
        if ok { dotted(v) } else { "?".into() }
    }

    pub fn nvrtc() -> String {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: writes two ints; NVRTC was loaded by the probe.
        let ok = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }
            == cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS;
        if ok { format!("{major}.{minor}") } else { "?".into() }
    }

    pub fn cublas(blas: &cudarc::cublas::CudaBlas) -> String {
        let mut v = 0;
        // SAFETY: writes one int through a live handle.
        let ok = unsafe { cudarc::cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut v) }
            == cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS;
        if ok { dotted(v) } else { "?".into() }
    }
}
