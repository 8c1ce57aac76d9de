//! NCCL, the CUDA engine's own communicator: gradients summed on the GPUs, with no host
//! synchronisation. The sums run on a stream of their own: each waits (through an event) for
//! the backward that wrote its span, and the backward of the layers below goes on beside it;
//! `settle` makes the engine's stream wait for the last sum before the update. Its unique id
//! goes from rank 0 to the others over MPI. NCCL itself is `libnccl.so.2`, found and opened
//! by [`super::libs`] and called through its C API.
//!
//! Dropping the communicator waits for its stream first (so no collective still reads a
//! buffer the engine frees next), and aborts instead of destroying after a failure (a
//! destroy would wait for ranks that may be gone).

use std::ffi::{CStr, c_char, c_int, c_void};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Result, bail};
use cudarc::driver::{CudaEvent, CudaStream};

use super::device::Store;
use super::libs::{self, Lib};
use super::{Cuda, FBuf};
use crate::dist::World;
use crate::engine::comm::Communicator;

type Comm = *mut c_void;
type Status = c_int;

/// `ncclUniqueId`: 128 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy)]
struct UniqueId {
    internal: [c_char; 128],
}

// nccl.h values.
const FLOAT32: c_int = 7;
const SUM: c_int = 0;

struct Api {
    unique_id: unsafe extern "C" fn(*mut UniqueId) -> Status,
    init_rank: unsafe extern "C" fn(*mut Comm, c_int, UniqueId, c_int) -> Status,
    all_reduce:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> Status,
    broadcast:
        unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, Comm, *mut c_void) -> Status,
    destroy: unsafe extern "C" fn(Comm) -> Status,
    abort: unsafe extern "C" fn(Comm) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
}

fn api() -> Result<&'static Api, String> {
    static API: std::sync::OnceLock<Result<Api, String>> = std::sync::OnceLock::new();
    API.get_or_init(|| {
        let lib = libs::get(Lib::Nccl).map_err(|m| m.to_string())?;
        // SAFETY: each symbol has the signature nccl.h gives it.
        unsafe {
            Ok(Api {
                unique_id: lib.function("ncclGetUniqueId")?,
                init_rank: lib.function("ncclCommInitRank")?,
                all_reduce: lib.function("ncclAllReduce")?,
                broadcast: lib.function("ncclBroadcast")?,
                destroy: lib.function("ncclCommDestroy")?,
                abort: lib.function("ncclCommAbort")?,
                error_string: lib.function("ncclGetErrorString")?,
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
    // SAFETY: NCCL returns a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr((api.error_string)(s)) }.to_string_lossy().into_owned();
    Err(format!("{what}: {name}"))
}

pub struct Nccl {
    api: &'static Api,
    comm: Comm,
    rank: usize,
    world: usize,
    /// The engine's stream, where backward writes the gradients.
    compute: Arc<CudaStream>,
    /// NCCL's own stream.
    sums: Arc<CudaStream>,
    /// Recorded on `compute` before each collective: the data it reads is written.
    written: CudaEvent,
    /// Recorded on `sums` by `settle`: every collective queued so far is done.
    summed: CudaEvent,
    /// A collective failed: abort the communicator instead of destroying it.
    failed: AtomicBool,
}

// SAFETY: the communicator is used by one thread at a time (the engine's), as NCCL allows.
unsafe impl Send for Nccl {}

impl Nccl {
    /// `buf[range]`'s device address, checked.
    fn span(buf: &FBuf, range: &Range<usize>) -> u64 {
        assert!(
            range.start <= range.end && range.end <= buf.len && buf.st == Store::F32,
            "range {range:?} of {} floats",
            buf.len
        );
        buf.mem.ptr + 4 * range.start as u64
    }

    /// The collective stream waits for what the engine's stream has queued so far.
    fn after_compute(&self) -> Result<(), String> {
        self.written
            .record(&self.compute)
            .and_then(|()| self.sums.wait(&self.written))
            .map_err(|e| e.to_string())
    }

    fn failure(&self, k: &Cuda, what: String) {
        self.failed.store(true, Ordering::Relaxed);
        k.fail(|| what);
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        // The collectives still queued finish (or fail) before the engine frees what they
        // read; then the communicator goes.
        let _ = self.sums.context().bind_to_thread();
        let synced = self.sums.synchronize().is_ok();
        // SAFETY: the communicator is released once, after its stream is idle.
        unsafe {
            if synced && !self.failed.load(Ordering::Relaxed) {
                let _ = (self.api.destroy)(self.comm);
            } else {
                let _ = (self.api.abort)(self.comm);
            }
        }
    }
}

/// Joins `world`'s ranks in an NCCL communicator on `stream` (this rank's GPU).
pub fn open(stream: Arc<CudaStream>, world: &World) -> Result<Nccl> {
    let here = api();
    // Every rank decides alike (the id broadcast below is a collective): NCCL only when each
    // rank has it.
    let missing_somewhere = world.comm.max_u64(u64::from(here.is_err())) > 0;
    let api = match here {
        Err(why) => bail!("the GPUs cannot sum gradients themselves: {why}"),
        Ok(_) if missing_somewhere => {
            bail!("NCCL is missing on another rank's host, so the GPUs cannot sum gradients themselves")
        }
        Ok(api) => api,
    };
    // Rank 0 broadcasts the id, or nothing when it could not make one (so every rank fails).
    let mut bytes = Vec::new();
    let mut made = Ok(());
    if world.is_owner() {
        let mut id = UniqueId { internal: [0; 128] };
        // SAFETY: fills the 128-byte id.
        match check(api, "creating the NCCL id", unsafe { (api.unique_id)(&mut id) }) {
            Ok(()) => bytes = id.internal.iter().map(|&c| c as u8).collect(),
            Err(e) => made = Err(anyhow::anyhow!(e)),
        }
    }
    world.comm.broadcast_bytes(&mut bytes);
    made?;
    if bytes.len() != 128 {
        bail!("rank 0 could not create the NCCL id");
    }
    let mut id = UniqueId { internal: [0; 128] };
    for (to, from) in id.internal.iter_mut().zip(&bytes) {
        *to = *from as c_char;
    }
    // NCCL joins on the current device: this rank's, whichever thread runs the engine.
    let ctx = stream.context().clone();
    ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("binding the GPU: {e:?}"))?;
    let gpu = |what: &str, e: cudarc::driver::DriverError| anyhow::anyhow!("{what} for NCCL: {e}");
    let sums = ctx.new_stream().map_err(|e| gpu("creating a stream", e))?;
    let written = ctx.new_event(None).map_err(|e| gpu("creating an event", e))?;
    let summed = ctx.new_event(None).map_err(|e| gpu("creating an event", e))?;
    let mut comm: Comm = std::ptr::null_mut();
    let (rank, size) = (world.rank(), world.size());
    // SAFETY: joins the communicator of `size` ranks as `rank`, with rank 0's id.
    let joined = unsafe { (api.init_rank)(&mut comm, size as c_int, id, rank as c_int) };
    check(api, &format!("joining the NCCL communicator of {size} ranks"), joined)
        .map_err(|e| anyhow::anyhow!(e))?;
    Ok(Nccl {
        api,
        comm,
        rank,
        world: size,
        compute: stream,
        sums,
        written,
        summed,
        failed: AtomicBool::new(false),
    })
}

impl Communicator<Cuda> for Nccl {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, k: &Cuda, buf: &mut FBuf, range: Range<usize>) {
        if k.failed() {
            return;
        }
        if let Err(e) = self.after_compute() {
            return self.failure(k, format!("ordering the NCCL stream after the backward: {e}"));
        }
        let p = Self::span(buf, &range) as *mut c_void;
        // SAFETY: `p` covers range.len() floats of a live buffer; in place on NCCL's stream.
        let s = unsafe {
            (self.api.all_reduce)(
                p,
                p,
                range.len(),
                FLOAT32,
                SUM,
                self.comm,
                self.sums.cu_stream() as *mut c_void,
            )
        };
        if let Err(e) = check(self.api, "NCCL all-reduce", s) {
            self.failure(k, e);
        }
    }
    fn broadcast(&mut self, k: &Cuda, buf: &mut FBuf, range: Range<usize>) {
        if k.failed() {
            return;
        }
        if let Err(e) = self.after_compute() {
            return self.failure(k, format!("ordering the NCCL stream after the engine's: {e}"));
        }
        let p = Self::span(buf, &range) as *mut c_void;
        // SAFETY: as in `all_reduce_sum`.
        let s = unsafe {
            (self.api.broadcast)(
                p,
                p,
                range.len(),
                FLOAT32,
                0,
                self.comm,
                self.sums.cu_stream() as *mut c_void,
            )
        };
        if let Err(e) = check(self.api, "NCCL broadcast", s) {
            self.failure(k, e);
        }
    }
    fn barrier(&self) {}
    fn settle(&mut self, k: &Cuda) {
        let r = self.summed.record(&self.sums).and_then(|()| self.compute.wait(&self.summed));
        if let Err(e) = r {
            self.failure(k, format!("waiting for the NCCL stream: {e}"));
        }
    }
    fn describe(&self) -> String {
        format!("NCCL all-reduce on the GPUs beside the backward, {} rank(s)", self.world)
    }
}
