//! What the CUDA kernels run on: a GPU through the driver API and cuBLAS
//! ([`super::driver::Gpu`]), or the
//! emulator that runs `kernels.cu` as C++ on the CPU ([`super::emu::Emulator`]). [`super::Cuda`]
//! is written once over [`Device`], so CI, which has no GPU, runs the same launch code, the same
//! kernel sources and the same cuBLAS argument mapping as the GPU does.

use std::marker::PhantomData;
use std::sync::Arc;

use cudarc::driver::CudaStream;

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

/// One column-major cuBLAS product: `c[n, m] = alpha op(b)[n, k] op(a)[k, m] (+ c)`, `a` and
/// `b` stored as `ab`, `c` as `c_store` (the same, or f32), accumulated in f32 (TF32 off).
/// With `batch` > 1, `batch` such products, operand `x` of product `i` at `x + i * stride_x`
/// elements (`cublasGemmStridedBatchedEx`).
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
    pub alpha: f32,
    pub batch: usize,
    pub stride_a: usize,
    pub stride_b: usize,
    pub stride_c: usize,
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
    /// Profiling: a timing mark queued on the stream, or none where the device cannot time
    /// its work (the emulator).
    fn mark(&self) -> Option<usize> {
        None
    }
    /// Seconds between two marks, once the work between them is done.
    fn between(&self, _start: usize, _end: usize) -> Option<f64> {
        None
    }
    /// Forgets every mark (they are reused).
    fn clear_marks(&self) {}
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
