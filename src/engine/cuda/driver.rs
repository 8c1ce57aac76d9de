//! The real GPU behind [`Device`]: the driver API (through cudarc), cuBLAS and the kernels of
//! `kernels.cu`, compiled by NVRTC into a CUBIN for the device's architecture, cached on
//! disk (see `cache`) and loaded as it is.
//!
//! `MINIMIND_CUDA_SYNC=1` waits for every launch and matrix product, so a failing kernel is
//! named with its grid, block and shared memory (otherwise a fault surfaces at the next
//! read-back, without the culprit). Teardown never panics, even after a sticky error: every
//! release ignores a failure.

use std::ffi::{CString, c_void};
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUfunction, CUmodule};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream, result};

use super::blas::{self, Blas};
use super::cache::{self, Origin};
use super::device::{Arg, Device, GemmCall};
use super::nvrtc::{self, Image};
use super::{SOURCE, kernel_names};

/// The variable that makes every launch synchronous (debugging).
pub const SYNC_ENV: &str = "MINIMIND_CUDA_SYNC";

/// NVRTC options beyond the architecture (part of the cache key).
pub const NVRTC_OPTIONS: &[&str] = &["--std=c++17"];

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_SHARED: u32 = 48 * 1024;

/// How the kernels of this process were obtained, for selftest.
#[derive(Clone, Debug)]
pub struct Build {
    /// `sm_90` (a CUBIN), or `compute_XX` (PTX the driver compiled).
    pub target: String,
    pub origin: Origin,
}

impl Build {
    /// "CUBIN" or "PTX".
    pub fn image(&self) -> &'static str {
        if self.target.starts_with("sm_") { "CUBIN" } else { "PTX (compiled by the driver)" }
    }
}

/// A GPU: its context, one stream, cuBLAS on that stream, and the compiled kernels.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Dropped by hand, before its workspace is freed.
    blas: ManuallyDrop<Blas>,
    workspace: u64,
    module: CUmodule,
    /// In the order of [`kernel_names`].
    funcs: Vec<CUfunction>,
    /// Per kernel, the dynamic shared memory it has opted in to (above the default 48 KB).
    opted_in: Vec<AtomicU32>,
    /// Pinned buffers that small uploads (each micro-batch's ids and targets) go through;
    /// empty until the first, and for good where pinned memory was refused.
    staging: Mutex<Staging>,
    /// `MINIMIND_CUDA_SYNC`: wait after each launch and product.
    sync: bool,
    /// Profiling marks: timing events, and how many are in use (the rest are reused).
    marks: Mutex<(Vec<CudaEvent>, usize)>,
    pub build: Build,
}

// SAFETY: the module and function handles are plain driver handles, valid in any thread once
// the context is current (every method binds it first); the engine queues work from one
// thread at a time.
unsafe impl Send for Gpu {}
unsafe impl Sync for Gpu {}

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

/// Compiles (or reads from the cache) the kernels for a device of compute capability `cc`
/// and loads them; a cached entry the driver refuses is compiled again.
fn load_kernels(cc: i32) -> Result<(CUmodule, Build), String> {
    let supported = nvrtc::supported_archs()?;
    let version = nvrtc::version()?;
    let (target, image) = nvrtc::target(cc, &supported).ok_or_else(|| {
        format!(
            "NVRTC {version} compiles for sm_{} to sm_{}, not for this GPU (sm_{cc})",
            supported.iter().min().unwrap_or(&0),
            supported.iter().max().unwrap_or(&0)
        )
    })?;
    let dir = cache::dir_from_env();
    let name = cache::entry_name(SOURCE, &target, &version, NVRTC_OPTIONS);
    let compile = || nvrtc::compile(SOURCE, &target, NVRTC_OPTIONS).map(|c| c.bytes);
    let warn = &mut |w: String| eprintln!("warning: {w}");
    // A process opening several engines (selftest, one per dtype) reads the disk once.
    static MEMO: Mutex<Vec<(String, Vec<u8>)>> = Mutex::new(Vec::new());
    for attempt in 0..2 {
        let memo = MEMO
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, b)| b.clone());
        let remembered = memo.is_some();
        let (bytes, origin) = match memo {
            Some(bytes) => (bytes, Origin::Cached),
            None => cache::fetch(dir.as_deref(), &name, compile, warn)
                .map_err(|e| format!("the CUDA kernels do not compile for {target}: {e}"))?,
        };
        // SAFETY: a CUBIN or NUL-terminated PTX image, read by the driver before it returns.
        match unsafe { result::module::load_data(bytes.as_ptr() as *const c_void) } {
            Ok(module) => {
                if !remembered {
                    MEMO.lock().unwrap_or_else(|e| e.into_inner()).push((name, bytes));
                }
                return Ok((module, Build { target, origin }));
            }
            Err(e) if origin == Origin::Cached && attempt == 0 => {
                warn(format!("the driver refused the cached kernels ({e}); compiling again"));
                MEMO.lock().unwrap_or_else(|e| e.into_inner()).retain(|(n, _)| *n != name);
                cache::discard(dir.as_deref(), &name);
            }
            Err(e) => {
                let what = if image == Image::Cubin { "CUBIN" } else { "PTX" };
                return Err(format!("loading the CUDA kernels ({what} for {target}): {e}"));
            }
        }
    }
    Err(format!("loading the CUDA kernels for {target} failed twice"))
}

impl Gpu {
    /// Opens GPU `ordinal` (the libraries are loaded: see `libs`). Returns the device and
    /// its compute capability.
    pub fn open(ordinal: usize) -> Result<(Gpu, (i32, i32)), String> {
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("opening cuda:{ordinal}: {e}"))?;
        // One compute stream, and allocations through the driver directly; the one other
        // stream (NCCL's) is ordered against it by explicit events, so cudarc's own
        // cross-stream event tracking is not needed.
        // SAFETY: every cross-stream use of an allocation goes through those events.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let (major, minor) =
            ctx.compute_capability().map_err(|e| format!("reading the compute capability: {e}"))?;
        let (module, build) = load_kernels(major * 10 + minor)?;
        let funcs: Result<Vec<CUfunction>, String> = kernel_names()
            .iter()
            .map(|name| {
                let c = CString::new(name.as_str()).expect("kernel names have no NUL");
                // SAFETY: a module loaded above.
                unsafe { result::module::get_function(module, c) }.map_err(|e| format!("kernel {name}: {e}"))
            })
            .collect();
        let unload = |e: String| {
            // SAFETY: the module loaded above, unloaded once.
            let _ = unsafe { result::module::unload(module) };
            e
        };
        let funcs = funcs.map_err(unload)?;
        // SAFETY: a fresh allocation for cuBLAS's workspace, freed in `drop` after the handle.
        let workspace = unsafe { result::malloc_sync(blas::WORKSPACE_BYTES) }
            .map_err(|e| unload(format!("allocating cuBLAS's workspace: {e}")))?;
        let blas = Blas::new(stream.cu_stream() as *mut c_void, workspace).map_err(|e| {
            // SAFETY: freed once; nothing used it.
            let _ = unsafe { result::free_sync(workspace) };
            unload(e)
        })?;
        let opted_in = funcs.iter().map(|_| AtomicU32::new(DEFAULT_SHARED)).collect();
        let sync = std::env::var(SYNC_ENV).is_ok_and(|v| !v.is_empty() && v != "0");
        let gpu = Gpu {
            ctx,
            stream,
            blas: ManuallyDrop::new(blas),
            workspace,
            module,
            funcs,
            opted_in,
            staging: Mutex::default(),
            sync,
            marks: Mutex::default(),
            build,
        };
        Ok((gpu, (major, minor)))
    }

    pub fn total_memory(&self) -> usize {
        self.ctx.total_mem().unwrap_or(0)
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

    /// With `MINIMIND_CUDA_SYNC`, waits for the work queued so far: a fault is then the last
    /// launch's (the caller names it).
    fn settle(&self) -> Result<(), String> {
        if !self.sync {
            return Ok(());
        }
        self.stream.synchronize().map_err(|e| e.to_string())
    }
}

impl Drop for Gpu {
    fn drop(&mut self) {
        let _ = self.bind();
        let _ = self.stream.synchronize();
        // SAFETY: the handle is dropped once, before its workspace; the module after every
        // launch that used it (the stream is idle or broken). Failures are ignored.
        unsafe {
            ManuallyDrop::drop(&mut self.blas);
            let _ = result::free_sync(self.workspace);
            let _ = result::module::unload(self.module);
        }
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
        let f = self.funcs[kernel];
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
        .map_err(|e| e.to_string())?;
        self.settle()
    }
    fn gemm(&self, g: &GemmCall) -> Result<(), String> {
        self.bind()?;
        self.blas.gemm(g)?;
        self.settle()
    }
    fn synchronize(&self) -> Result<(), String> {
        self.bind()?;
        self.stream.synchronize().map_err(|e| {
            let hint = if self.sync { "" } else { " (run with MINIMIND_CUDA_SYNC=1 to name the kernel)" };
            format!("{e}{hint}")
        })
    }
    fn memory(&self) -> Option<(usize, usize)> {
        self.bind().ok()?;
        result::mem_get_info().ok()
    }
    fn stream(&self) -> Option<Arc<CudaStream>> {
        Some(self.stream.clone())
    }
    fn mark(&self) -> Option<usize> {
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let (events, used) = &mut *marks;
        if *used == events.len() {
            let timing = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            events.push(self.ctx.new_event(timing).ok()?);
        }
        events[*used].record(&self.stream).ok()?;
        *used += 1;
        Some(*used - 1)
    }
    fn between(&self, start: usize, end: usize) -> Option<f64> {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let (events, _) = &*marks;
        let ms = events.get(start)?.elapsed_ms(events.get(end)?).ok()?;
        Some(ms as f64 / 1e3)
    }
    fn clear_marks(&self) {
        self.marks.lock().unwrap_or_else(|e| e.into_inner()).1 = 0;
    }
    fn versions(&self) -> String {
        use super::libs::{Lib, get};
        let v = |lib: Lib| get(lib).map(|o| o.version.clone()).unwrap_or_else(|_| "?".into());
        format!("driver {}, NVRTC {}, cuBLAS {}", v(Lib::Driver), v(Lib::Nvrtc), v(Lib::Cublas))
    }
}
