//! cuBLAS, called through the library [`super::libs`] opened (CUDA 12 or 13): one handle on
//! the engine's stream, set up for reproducible results.
//!
//! Reproducibility (cuBLAS's own notes): results are bitwise the same from run to run on one
//! GPU model and library version when the handle uses one stream, a workspace of its own of a
//! fixed size, and no atomics. So the handle gets a fixed workspace (split-K plans then do
//! not depend on what the pool happened to hold), atomics off, and default math (TF32 off:
//! f32 products stay f32, as on the CPU).

use std::ffi::{CStr, c_char, c_int, c_void};

use super::device::{GemmCall, Store};
use super::libs::{self, Lib};

type Handle = *mut c_void;
type Status = c_int;

/// The entry points used, resolved once.
struct Api {
    create: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy: unsafe extern "C" fn(Handle) -> Status,
    set_stream: unsafe extern "C" fn(Handle, *mut c_void) -> Status,
    set_workspace: unsafe extern "C" fn(Handle, *mut c_void, usize) -> Status,
    set_math_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    set_atomics_mode: unsafe extern "C" fn(Handle, c_int) -> Status,
    #[allow(clippy::type_complexity)]
    gemm_ex: unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const c_void,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        c_int,
        c_int,
        *const c_void,
        *mut c_void,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> Status,
    #[allow(clippy::type_complexity)]
    gemm_strided_batched_ex: unsafe extern "C" fn(
        Handle,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        *const c_void,
        *const c_void,
        c_int,
        c_int,
        i64,
        *const c_void,
        c_int,
        c_int,
        i64,
        *const c_void,
        *mut c_void,
        c_int,
        c_int,
        i64,
        c_int,
        c_int,
        c_int,
    ) -> Status,
    status_string: Option<unsafe extern "C" fn(Status) -> *const c_char>,
}

// cublas_api.h / library_types.h values.
const OP_N: c_int = 0;
const OP_T: c_int = 1;
const R_32F: c_int = 0;
const R_16F: c_int = 2;
const R_16BF: c_int = 14;
const COMPUTE_32F: c_int = 68;
const GEMM_DEFAULT: c_int = -1;
const DEFAULT_MATH: c_int = 0;
const ATOMICS_NOT_ALLOWED: c_int = 0;

pub use crate::engine::gpu::CUBLAS_WORKSPACE_BYTES as WORKSPACE_BYTES;

fn api() -> Result<&'static Api, String> {
    static API: std::sync::OnceLock<Result<Api, String>> = std::sync::OnceLock::new();
    API.get_or_init(|| {
        let lib = libs::get(Lib::Cublas).map_err(|m| m.to_string())?;
        // SAFETY: each symbol has the signature cublas_api.h gives it.
        unsafe {
            Ok(Api {
                create: lib.function("cublasCreate_v2")?,
                destroy: lib.function("cublasDestroy_v2")?,
                set_stream: lib.function("cublasSetStream_v2")?,
                set_workspace: lib.function("cublasSetWorkspace_v2")?,
                set_math_mode: lib.function("cublasSetMathMode")?,
                set_atomics_mode: lib.function("cublasSetAtomicsMode")?,
                gemm_ex: lib.function("cublasGemmEx")?,
                gemm_strided_batched_ex: lib.function("cublasGemmStridedBatchedEx")?,
                status_string: lib.symbol("cublasGetStatusString").ok().map(|p| {
                    std::mem::transmute::<*mut c_void, unsafe extern "C" fn(Status) -> *const c_char>(p)
                }),
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn check(api: &Api, what: &str, s: Status) -> Result<(), String> {
    if s == 0 {
        return Ok(());
    }
    // SAFETY: cuBLAS returns a static NUL-terminated string.
    let name = api
        .status_string
        .map(|f| unsafe { CStr::from_ptr(f(s)) }.to_string_lossy().into_owned())
        .unwrap_or_else(|| format!("status {s}"));
    Err(format!("{what}: {name}"))
}

/// A cuBLAS handle on one stream with its own workspace. Dropping it never panics (after a
/// sticky CUDA error, destroying the handle fails; that failure is ignored).
pub struct Blas {
    api: &'static Api,
    handle: Handle,
}

// SAFETY: the handle is used from one thread at a time (the engine's calls are serialised by
// the stream's order and `&self` methods only queue work); cuBLAS handles may move threads.
unsafe impl Send for Blas {}
unsafe impl Sync for Blas {}

impl Blas {
    /// A handle queuing on `stream`, with `workspace` (`WORKSPACE_BYTES` of device memory,
    /// owned by the caller and alive as long as the handle).
    pub fn new(stream: *mut c_void, workspace: u64) -> Result<Blas, String> {
        let api = api()?;
        let mut handle: Handle = std::ptr::null_mut();
        // SAFETY: creates a handle; the rest configure it.
        unsafe {
            check(api, "creating the cuBLAS handle", (api.create)(&mut handle))?;
            let blas = Blas { api, handle };
            check(api, "cublasSetStream", (api.set_stream)(handle, stream))?;
            check(
                api,
                "cublasSetWorkspace",
                (api.set_workspace)(handle, workspace as *mut c_void, WORKSPACE_BYTES),
            )?;
            check(api, "cublasSetMathMode", (api.set_math_mode)(handle, DEFAULT_MATH))?;
            check(api, "cublasSetAtomicsMode", (api.set_atomics_mode)(handle, ATOMICS_NOT_ALLOWED))?;
            Ok(blas)
        }
    }

    /// One column-major `cublasGemmEx`, or `cublasGemmStridedBatchedEx` for a batch (see
    /// [`GemmCall`]), f32 accumulation.
    pub fn gemm(&self, g: &GemmCall) -> Result<(), String> {
        let op = |t: bool| if t { OP_T } else { OP_N };
        let ty = |s: Store| match s {
            Store::F32 => R_32F,
            Store::Bf16 => R_16BF,
            Store::F16 => R_16F,
        };
        let (alpha, beta) = (g.alpha, if g.accumulate { 1.0f32 } else { 0.0 });
        let int =
            |x: usize| c_int::try_from(x).map_err(|_| format!("a gemm dimension {x} above cuBLAS's int"));
        let (alpha_p, beta_p) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
        let (ta, tb) = (op(g.b_transposed), op(g.a_transposed));
        let (n, m, k) = (int(g.n)?, int(g.m)?, int(g.k)?);
        let (ldb, lda, ldc) = (int(g.ldb)?, int(g.lda)?, int(g.ldc)?);
        // SAFETY: the caller bounds what cuBLAS reads and writes by the views' lengths; the
        // pointers are live allocations used in stream order.
        let s = unsafe {
            if g.batch <= 1 {
                (self.api.gemm_ex)(
                    self.handle,
                    ta,
                    tb,
                    n,
                    m,
                    k,
                    alpha_p,
                    g.b as *const c_void,
                    ty(g.ab),
                    ldb,
                    g.a as *const c_void,
                    ty(g.ab),
                    lda,
                    beta_p,
                    g.c as *mut c_void,
                    ty(g.c_store),
                    ldc,
                    COMPUTE_32F,
                    GEMM_DEFAULT,
                )
            } else {
                (self.api.gemm_strided_batched_ex)(
                    self.handle,
                    ta,
                    tb,
                    n,
                    m,
                    k,
                    alpha_p,
                    g.b as *const c_void,
                    ty(g.ab),
                    ldb,
                    g.stride_b as i64,
                    g.a as *const c_void,
                    ty(g.ab),
                    lda,
                    g.stride_a as i64,
                    beta_p,
                    g.c as *mut c_void,
                    ty(g.c_store),
                    ldc,
                    g.stride_c as i64,
                    int(g.batch)?,
                    COMPUTE_32F,
                    GEMM_DEFAULT,
                )
            }
        };
        check(self.api, if g.batch <= 1 { "cublasGemmEx" } else { "cublasGemmStridedBatchedEx" }, s)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        // SAFETY: the handle is destroyed once; a failure (a sticky error) is ignored.
        let _ = unsafe { (self.api.destroy)(self.handle) };
    }
}
