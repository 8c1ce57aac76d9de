//! The engine's communicator seam: what data parallel needs of the ranks, on the engine's own
//! buffers. Three implementations: a world of one (nothing to do), MPI over host memory (the
//! CPU's buffers in place; a device's staged through the host), and the device's own (NCCL on
//! CUDA, see `engine::cuda::nccl`).

use std::ops::Range;
use std::sync::Arc;

use anyhow::Result;

use super::Kernels;
use crate::dist::{Comm, World, sum_in_buckets};

/// Floats per all-reduce bucket: 4 MiB of gradients at a time.
const BUCKET: usize = 1 << 20;

/// `range` in buckets of at most [`BUCKET`] floats: how the engine hands its flat buffers to
/// a communicator.
pub fn buckets(range: Range<usize>) -> impl Iterator<Item = Range<usize>> {
    let end = range.end;
    range.step_by(BUCKET).map(move |start| start..(start + BUCKET).min(end))
}

pub trait Communicator<K: Kernels> {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// Sums `buf[range]` over the ranks, in place.
    fn all_reduce_sum(&mut self, k: &K, buf: &mut K::Buf, range: Range<usize>);
    /// Rank 0's `buf[range]`, on every rank.
    fn broadcast(&mut self, k: &K, buf: &mut K::Buf, range: Range<usize>);
    fn barrier(&self);
    /// The device computes on only once what this communicator queued is done (NCCL runs
    /// on a stream of its own, beside the backward it overlaps). Host communicators finish
    /// each call before returning.
    fn settle(&mut self, _k: &K) {}
    /// What carries the gradients, for the run header.
    fn describe(&self) -> String;
}

/// A world of one.
pub struct Alone;

impl<K: Kernels> Communicator<K> for Alone {
    fn rank(&self) -> usize {
        0
    }
    fn world(&self) -> usize {
        1
    }
    fn all_reduce_sum(&mut self, _: &K, _: &mut K::Buf, _: Range<usize>) {}
    fn broadcast(&mut self, _: &K, _: &mut K::Buf, _: Range<usize>) {}
    fn barrier(&self) {}
    fn describe(&self) -> String {
        "one process".into()
    }
}

/// MPI on host memory: the CPU engine's buffers in place, a device's through a staging copy.
pub struct HostComm {
    comm: Arc<dyn Comm>,
    staging: Vec<f32>,
    scratch: Vec<f32>,
    /// Why the device's own communicator is not used, when it has one.
    instead: Option<String>,
}

impl HostComm {
    pub fn new(comm: Arc<dyn Comm>) -> HostComm {
        HostComm { comm, staging: Vec::new(), scratch: vec![0.0; BUCKET], instead: None }
    }
}

impl<K: Kernels> Communicator<K> for HostComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.size()
    }
    fn all_reduce_sum(&mut self, k: &K, buf: &mut K::Buf, range: Range<usize>) {
        if let Some(host) = k.host_floats(buf) {
            sum_in_buckets(&*self.comm, &mut host[range], &mut self.scratch);
            return;
        }
        self.staging.resize(range.len(), 0.0);
        k.download(k.view(buf, range.clone()), &mut self.staging);
        sum_in_buckets(&*self.comm, &mut self.staging, &mut self.scratch);
        k.upload(k.view_mut(buf, range), &self.staging);
    }
    fn broadcast(&mut self, k: &K, buf: &mut K::Buf, range: Range<usize>) {
        if let Some(host) = k.host_floats(buf) {
            self.comm.broadcast_f32(&mut host[range]);
            return;
        }
        self.staging.resize(range.len(), 0.0);
        k.download(k.view(buf, range.clone()), &mut self.staging);
        self.comm.broadcast_f32(&mut self.staging);
        k.upload(k.view_mut(buf, range), &self.staging);
    }
    fn barrier(&self) {
        self.comm.barrier();
    }
    fn describe(&self) -> String {
        let why = self.instead.as_ref().map_or(String::new(), |w| format!(" ({w})"));
        format!("MPI all-reduce over host memory, {} rank(s){why}", self.comm.size())
    }
}

/// Which communicator a run uses: by default the device's own when there are several ranks
/// (NCCL on CUDA; MPI through the host, saying why, when it cannot start), else MPI on host
/// memory; `Host` or `Device` picks one even for a world of one, to exercise it
/// (`gpu_check.sh` runs NCCL with one GPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CommChoice {
    Auto,
    Host,
    Device,
}

pub fn for_world<K: Kernels>(k: &K, world: &World, choice: CommChoice) -> Result<Box<dyn Communicator<K>>> {
    match choice {
        CommChoice::Auto if world.size() == 1 => Ok(Box::new(Alone)),
        CommChoice::Host => Ok(Box::new(HostComm::new(world.comm.clone()))),
        CommChoice::Device => match k.device_comm(world) {
            Some(c) => c,
            None => anyhow::bail!("{} has no communicator of its own", k.describe()),
        },
        CommChoice::Auto => match k.device_comm(world) {
            Some(Ok(c)) => Ok(c),
            Some(Err(e)) => {
                let why = format!("{e:#}");
                let first = why.lines().next().unwrap_or_default().to_string();
                Ok(Box::new(HostComm { instead: Some(first), ..HostComm::new(world.comm.clone()) }))
            }
            None => Ok(Box::new(HostComm::new(world.comm.clone()))),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_table() {
        let b = |r: Range<usize>| buckets(r).collect::<Vec<_>>();
        assert!(b(0..0).is_empty());
        assert_eq!(b(5..9), vec![5..9]);
        assert_eq!(b(3..BUCKET + 3), vec![3..BUCKET + 3]);
        assert_eq!(
            b(3..2 * BUCKET + 4),
            vec![3..BUCKET + 3, BUCKET + 3..2 * BUCKET + 3, 2 * BUCKET + 3..2 * BUCKET + 4]
        );
    }
}
