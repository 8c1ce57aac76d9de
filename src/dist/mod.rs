//! Data parallel: which process this is among the ranks of one run, and the host-side
//! collectives the training loop needs (the stop flag, the step's losses, the plan that rank 0
//! broadcasts). Processes, ranks and the reductions come from MPI (the `mpi` feature); a
//! process started without a launcher is a world of one and every collective is a no-op.
//!
//! Who starts the ranks: `mpirun -np N`, `srun --mpi=pmix`, or `minimind run --nproc N`
//! (which runs mpirun, see [`nproc`]). Rank 0 owns the run folder; the others train the same
//! steps on their share of the micro-batches and write only their own log.

#[cfg(feature = "mpi")]
mod mpi;
pub mod nproc;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Host-side collectives over the ranks of one run. Every rank calls them in the same order.
pub trait Comm: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Sums `buf` over the ranks, in place; `scratch` is at least as long (MPI without
    /// MPI_IN_PLACE in the bindings needs a receive buffer).
    fn sum_f32(&self, buf: &mut [f32], scratch: &mut [f32]);
    /// Sums `buf` over the ranks, in place.
    fn sum_f64(&self, buf: &mut [f64]);
    /// The largest `v` of any rank.
    fn max_u64(&self, v: u64) -> u64;
    /// Rank 0's `buf`, on every rank.
    fn broadcast_f32(&self, buf: &mut [f32]);
    /// Rank 0's bytes, on every rank (any length).
    fn broadcast_bytes(&self, bytes: &mut Vec<u8>);
    /// Every rank's string, in rank order.
    fn gather_strings(&self, s: &str) -> Vec<String>;
    fn barrier(&self);
    /// Ends every rank of the run at once with `code` (a rank that fails alone would
    /// otherwise leave the others waiting in a collective).
    fn abort(&self, code: i32) -> !;
}

/// A world of one: every collective is the identity.
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn sum_f32(&self, _: &mut [f32], _: &mut [f32]) {}
    fn sum_f64(&self, _: &mut [f64]) {}
    fn max_u64(&self, v: u64) -> u64 {
        v
    }
    fn broadcast_f32(&self, _: &mut [f32]) {}
    fn broadcast_bytes(&self, _: &mut Vec<u8>) {}
    fn gather_strings(&self, s: &str) -> Vec<String> {
        vec![s.to_string()]
    }
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// How this process was started.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Launcher {
    /// On its own: a world of one.
    Single,
    /// By Open MPI's `mpirun` (or `minimind run --nproc`, which uses it).
    Mpirun,
    /// By Slurm's `srun` through PMIx.
    Srun,
    /// By another PMI launcher (MPICH's hydra).
    Pmi,
}

impl std::fmt::Display for Launcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Launcher::Single => "single process",
            Launcher::Mpirun => "mpirun",
            Launcher::Srun => "srun",
            Launcher::Pmi => "PMI",
        })
    }
}

/// What the environment says about the launch: the launcher and the number of ranks, or why
/// it cannot work. Pure (over the environment's variables).
pub fn detect(env: &BTreeMap<String, String>) -> Result<(Launcher, usize), String> {
    let num = |k: &str| env.get(k).and_then(|v| v.trim().parse::<usize>().ok());
    if let Some(n) = num("OMPI_COMM_WORLD_SIZE") {
        return Ok((Launcher::Mpirun, n));
    }
    if env.contains_key("SLURM_STEP_ID")
        && let Some(n) = num("SLURM_STEP_NUM_TASKS")
        && n > 1
    {
        if env.contains_key("PMIX_RANK") || env.contains_key("PMI_RANK") {
            return Ok((Launcher::Srun, n));
        }
        return Err(format!(
            "srun started {n} tasks without an MPI plugin, so they cannot find each other\n  hint: srun --mpi=pmix ... (or set SLURM_MPI_TYPE=pmix)"
        ));
    }
    if let Some(n) = num("PMI_SIZE") {
        return Ok((Launcher::Pmi, n));
    }
    Ok((Launcher::Single, 1))
}

/// The ranks of this run, as this process sees them.
#[derive(Clone)]
pub struct World {
    pub comm: Arc<dyn Comm>,
    pub launcher: Launcher,
    /// This rank's index among the ranks on its host (its GPU with the CUDA engine), and how
    /// many ranks share the host (and its cores).
    pub local_rank: usize,
    pub local_size: usize,
    /// Every rank's host name, in rank order.
    pub hosts: Vec<String>,
}

impl World {
    /// A world of one.
    pub fn single() -> World {
        World {
            comm: Arc::new(Single),
            launcher: Launcher::Single,
            local_rank: 0,
            local_size: 1,
            hosts: vec![host_name()],
        }
    }

    /// Joins the ranks a launcher started (MPI), or a world of one without a launcher. A
    /// multi-rank launch of a build without MPI is an error, never N unrelated runs.
    pub fn init() -> Result<World> {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let (launcher, size) = detect(&env).map_err(launch_error)?;
        if size <= 1 {
            return Ok(World { launcher, ..World::single() });
        }
        join(launcher, size)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }
    pub fn size(&self) -> usize {
        self.comm.size()
    }
    /// Rank 0 owns the run folder.
    pub fn is_owner(&self) -> bool {
        self.rank() == 0
    }

    /// What meta.json records.
    pub fn info(&self, global_batch: usize) -> WorldInfo {
        let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
        for h in &self.hosts {
            *per_host.entry(h.clone()).or_default() += 1;
        }
        WorldInfo { size: self.size(), launcher: self.launcher, hosts: per_host, global_batch }
    }
}

/// The ranks of a run, as meta.json records them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct WorldInfo {
    pub size: usize,
    pub launcher: Launcher,
    /// Ranks per host.
    pub hosts: BTreeMap<String, usize>,
    /// Rows per optimiser step: batch_size x accumulation_steps x size.
    pub global_batch: usize,
}

#[cfg(feature = "mpi")]
fn join(launcher: Launcher, _size: usize) -> Result<World> {
    mpi::join(launcher)
}

#[cfg(not(feature = "mpi"))]
fn join(launcher: Launcher, size: usize) -> Result<World> {
    Err(launch_error(format!(
        "this process is one of {size} ranks started by {launcher}, but this build has no MPI, so they cannot train together\n  hint: build with `cargo build --release --features mpi` (Debian: apt install libopenmpi-dev openmpi-bin clang libclang-dev)"
    )))
}

/// A launch that cannot work is a usage error (exit 2), like a bad config.
fn launch_error(why: String) -> anyhow::Error {
    crate::config::ConfigError::new(crate::config::Origin::Arg("the launch".into()), None, why).into()
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_default()
}

/// Sums `buf` over the ranks in buckets of `scratch.len()` floats.
pub fn sum_in_buckets(comm: &dyn Comm, buf: &mut [f32], scratch: &mut [f32]) {
    for chunk in buf.chunks_mut(scratch.len().max(1)) {
        let n = chunk.len();
        comm.sum_f32(chunk, &mut scratch[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn launch_detection() {
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<(Launcher, usize), &'a str>);
        let table: &[Case] = &[
            (&[], Ok((Launcher::Single, 1))),
            (&[("OMPI_COMM_WORLD_SIZE", "2"), ("PMIX_RANK", "0")], Ok((Launcher::Mpirun, 2))),
            (
                &[("SLURM_STEP_ID", "0"), ("SLURM_STEP_NUM_TASKS", "4"), ("PMIX_RANK", "3")],
                Ok((Launcher::Srun, 4)),
            ),
            (&[("SLURM_STEP_ID", "0"), ("SLURM_STEP_NUM_TASKS", "2")], Err("srun --mpi=pmix")),
            // An array task's batch step, or `srun -n 1`: a run of its own.
            (&[("SLURM_JOB_ID", "7"), ("SLURM_NTASKS", "1")], Ok((Launcher::Single, 1))),
            (&[("SLURM_STEP_ID", "0"), ("SLURM_STEP_NUM_TASKS", "1")], Ok((Launcher::Single, 1))),
            (&[("PMI_SIZE", "3"), ("PMI_RANK", "1")], Ok((Launcher::Pmi, 3))),
        ];
        for (vars, want) in table {
            match (detect(&env(vars)), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, *want, "{vars:?}"),
                (Err(got), Err(want)) => assert!(got.contains(want), "{vars:?}: {got}"),
                (got, want) => panic!("{vars:?}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn buckets_cover_the_buffer() {
        let mut buf: Vec<f32> = (0..10).map(|i| i as f32).collect();
        let mut scratch = vec![0.0; 3];
        sum_in_buckets(&Single, &mut buf, &mut scratch);
        assert_eq!(buf, (0..10).map(|i| i as f32).collect::<Vec<_>>());
        let w = World::single();
        let info = w.info(32);
        assert_eq!((info.size, info.global_batch, info.hosts.values().sum::<usize>()), (1, 32, 1));
    }
}
