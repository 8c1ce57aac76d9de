//! NCCL, the CUDA engine's own communicator: gradients summed on the GPUs, with no host
//! synchronisation. The sums run on a stream of their own: each waits (through an event) for
//! the backward that wrote its span, and the backward of the layers below goes on beside it;
//! `settle` makes the engine's stream wait for the last sum before the update. Its unique id
//! goes from rank 0 to the others over MPI.

use std::ops::Range;
use std::sync::Arc;

use anyhow::{Result, bail};
use cudarc::driver::{CudaEvent, CudaStream, DevicePtrMut, DeviceSlice, SyncOnDrop};
use cudarc::nccl::{Comm, Id, ReduceOp};

use super::device::Store;
use super::{Cuda, FBuf};
use crate::dist::World;
use crate::engine::comm::Communicator;

pub struct Nccl {
    comm: Comm,
    /// The engine's stream, where backward writes the gradients.
    compute: Arc<CudaStream>,
    /// NCCL's own stream.
    sums: Arc<CudaStream>,
    /// Recorded on `compute` before each collective: the data it reads is written.
    written: CudaEvent,
    /// Recorded on `sums` by `settle`: every collective queued so far is done.
    summed: CudaEvent,
}

/// A range of an engine buffer as cudarc's NCCL wants it. No synchronisation on use: the
/// NCCL stream is ordered after the engine's by `Nccl::after_compute`.
struct Floats {
    ptr: u64,
    len: usize,
    stream: Arc<CudaStream>,
}

impl DeviceSlice<f32> for Floats {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl DevicePtrMut<f32> for Floats {
    fn device_ptr_mut<'a>(&'a mut self, _stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, SyncOnDrop::Sync(None))
    }
}

impl Nccl {
    fn floats(&self, buf: &FBuf, range: Range<usize>) -> Floats {
        assert!(
            range.start <= range.end && range.end <= buf.len && buf.st == Store::F32,
            "range {range:?} of {} floats",
            buf.len
        );
        Floats { ptr: buf.mem.ptr + 4 * range.start as u64, len: range.len(), stream: self.sums.clone() }
    }

    /// The collective stream waits for what the engine's stream has queued so far.
    fn after_compute(&self) -> Result<(), String> {
        self.written
            .record(&self.compute)
            .and_then(|()| self.sums.wait(&self.written))
            .map_err(|e| e.to_string())
    }
}

/// Joins `world`'s ranks in an NCCL communicator on `stream` (this rank's GPU).
pub fn open(stream: Arc<CudaStream>, world: &World) -> Result<Nccl> {
    // SAFETY: probing only tries to load the library (cudarc panics on a missing one).
    let here = unsafe { cudarc::nccl::sys::is_culib_present() };
    // Every rank decides alike (the id broadcast below is a collective): NCCL only when each
    // rank has it.
    let missing_somewhere = world.comm.max_u64(u64::from(!here)) > 0;
    if missing_somewhere {
        if here {
            bail!("NCCL is missing on another rank's host, so the GPUs cannot sum gradients themselves");
        }
        bail!(
            "NCCL (libnccl.so) not found, so the GPUs cannot sum gradients themselves\n  hint: add the folder of libnccl.so to LD_LIBRARY_PATH (PyTorch's wheels ship it in nvidia/nccl/lib; link libnccl.so.2 as libnccl.so)"
        );
    }
    // Rank 0 broadcasts the id, or nothing when it could not make one (so every rank fails).
    let mut bytes = Vec::new();
    let mut made = Ok(());
    if world.is_owner() {
        match Id::new() {
            Ok(id) => bytes = id.internal().iter().map(|&c| c as u8).collect(),
            Err(e) => made = Err(anyhow::anyhow!("creating the NCCL id: {e:?}")),
        }
    }
    world.comm.broadcast_bytes(&mut bytes);
    made?;
    if bytes.len() != 128 {
        bail!("rank 0 could not create the NCCL id");
    }
    let mut internal = [0 as std::ffi::c_char; 128];
    for (to, from) in internal.iter_mut().zip(&bytes) {
        *to = *from as std::ffi::c_char;
    }
    // NCCL joins on the current device: this rank's, whichever thread runs the engine.
    let ctx = stream.context().clone();
    ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("binding the GPU: {e:?}"))?;
    let gpu = |what: &str, e: cudarc::driver::DriverError| anyhow::anyhow!("{what} for NCCL: {e}");
    let sums = ctx.new_stream().map_err(|e| gpu("creating a stream", e))?;
    let written = ctx.new_event(None).map_err(|e| gpu("creating an event", e))?;
    let summed = ctx.new_event(None).map_err(|e| gpu("creating an event", e))?;
    let comm = Comm::from_rank(sums.clone(), world.rank(), world.size(), Id::uninit(internal))
        .map_err(|e| anyhow::anyhow!("joining the NCCL communicator of {} ranks: {e:?}", world.size()))?;
    Ok(Nccl { comm, compute: stream, sums, written, summed })
}

impl Communicator<Cuda> for Nccl {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce_sum(&mut self, k: &Cuda, buf: &mut FBuf, range: Range<usize>) {
        if let Err(e) = self.after_compute() {
            k.fail(|| format!("ordering the NCCL stream after the backward: {e}"));
            return;
        }
        let mut view = self.floats(buf, range);
        if let Err(e) = self.comm.all_reduce_in_place(&mut view, &ReduceOp::Sum) {
            k.fail(|| format!("NCCL all-reduce: {e:?}"));
        }
    }
    fn broadcast(&mut self, k: &Cuda, buf: &mut FBuf, range: Range<usize>) {
        if let Err(e) = self.after_compute() {
            k.fail(|| format!("ordering the NCCL stream after the engine's: {e}"));
            return;
        }
        let mut view = self.floats(buf, range);
        if let Err(e) = self.comm.broadcast_in_place(&mut view, 0) {
            k.fail(|| format!("NCCL broadcast: {e:?}"));
        }
    }
    fn barrier(&self) {}
    fn settle(&mut self, k: &Cuda) {
        let r = self.summed.record(&self.sums).and_then(|()| self.compute.wait(&self.summed));
        if let Err(e) = r {
            k.fail(|| format!("waiting for the NCCL stream: {e}"));
        }
    }
    fn describe(&self) -> String {
        format!("NCCL all-reduce on the GPUs beside the backward, {} rank(s)", self.comm.world_size())
    }
}
