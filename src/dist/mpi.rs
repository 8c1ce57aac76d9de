//! The ranks through MPI (rsmpi over the system's Open MPI or MPICH): collectives on host
//! memory. Initialised with MPI_THREAD_SERIALIZED: the training loop calls MPI from the
//! engine's thread and the command line from the main thread, never both at once.

use std::sync::Arc;

use anyhow::{Result, bail};
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

use super::{Comm, Launcher, World};

struct Mpi {
    world: SimpleCommunicator,
    /// Finalizes MPI when the last handle goes (the end of `main`).
    _universe: Universe,
}

// SAFETY: the communicator is a handle that MPI lets any thread use under
// MPI_THREAD_SERIALIZED; this program never calls MPI from two threads at once (collectives
// run on the training thread, in the order every rank follows).
unsafe impl Send for Mpi {}
unsafe impl Sync for Mpi {}

pub(super) fn join(launcher: Launcher) -> Result<World> {
    let Some((universe, _level)) = mpi::initialize_with_threading(mpi::Threading::Serialized) else {
        bail!("MPI was initialised twice");
    };
    let world = universe.world();
    let local = world.split_shared(world.rank());
    let (local_rank, local_size) = (local.rank() as usize, local.size() as usize);
    let comm = Mpi { world, _universe: universe };
    let host = mpi::environment::processor_name().unwrap_or_default();
    let hosts = comm.gather_strings(&host);
    Ok(World { comm: Arc::new(comm), launcher, local_rank, local_size, hosts })
}

impl Comm for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn sum_f32(&self, buf: &mut [f32], scratch: &mut [f32]) {
        let recv = &mut scratch[..buf.len()];
        self.world.all_reduce_into(&buf[..], recv, SystemOperation::sum());
        buf.copy_from_slice(recv);
    }
    fn sum_f64(&self, buf: &mut [f64]) {
        let mut recv = vec![0.0; buf.len()];
        self.world.all_reduce_into(&buf[..], &mut recv[..], SystemOperation::sum());
        buf.copy_from_slice(&recv);
    }
    fn max_u64(&self, v: u64) -> u64 {
        let mut out = 0u64;
        self.world.all_reduce_into(&v, &mut out, SystemOperation::max());
        out
    }
    fn broadcast_f32(&self, buf: &mut [f32]) {
        self.world.process_at_rank(0).broadcast_into(buf);
    }
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(0);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        root.broadcast_into(&mut bytes[..]);
    }
    fn gather_strings(&self, s: &str) -> Vec<String> {
        // Fixed-width records: every rank pads its string to the longest.
        let width = self.max_u64(s.len() as u64) as usize;
        if width == 0 {
            return vec![String::new(); self.size()];
        }
        let mut mine = s.as_bytes().to_vec();
        mine.resize(width, 0);
        let mut all = vec![0u8; width * self.size()];
        self.world.all_gather_into(&mine[..], &mut all[..]);
        all.chunks(width).map(|c| String::from_utf8_lossy(c).trim_end_matches('\0').to_string()).collect()
    }
    fn barrier(&self) {
        self.world.barrier();
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
