//! What `run` and `resume` share on the command line: how a session runs (console, signals,
//! ranks, a sweep's concurrency), not what it trains. Parsed by clap, checked here, turned
//! into a [`Session`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;

use crate::config::{self, Assign, ConfigError, ConfigErrors, LauncherKind};
use crate::dist::World;
use crate::train::Session;

/// Options of `run` and `resume`.
#[derive(clap::Args, Debug, Clone)]
pub struct SessionArgs {
    /// Override a key: `section.key=value` (TOML value syntax); repeatable. A resume may set
    /// only keys that change neither the model nor the order of the data.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// No progress bars, plain lines only.
    #[arg(long)]
    pub quiet: bool,
    /// Without a progress bar, print a progress line when nothing was printed for this many seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pub progress_every: f64,
    /// A sweep's points run this many at a time on this machine: the cores split between them,
    /// and with GPUs one point per GPU (a resumed sweep saves it in sweep.toml).
    #[arg(short = 'j', long = "jobs", value_name = "N")]
    pub jobs: Option<usize>,
    /// Where a sweep's points run: local (this machine) or slurm (one job array).
    #[arg(long, value_enum)]
    pub launcher: Option<LauncherKind>,
    /// Data parallel: train with N local ranks started through mpirun (the `mpi` build); a
    /// resume may use any N that divides a step's micro-batches.
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    #[command(flatten)]
    pub aids: TestingAids,
}

/// Testing aids (hidden from --help).
#[derive(clap::Args, Debug, Clone)]
pub struct TestingAids {
    /// Testing aid: stop as if interrupted right after this optimiser step.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
    /// Testing aid: kill this process with SIGKILL at a named point (checkpoint, export, step; optionally :STEP).
    #[arg(long, hide = true)]
    pub crash_at: Option<String>,
    /// Testing aid: which communicator carries the gradients (device: NCCL even for one rank).
    #[arg(long, hide = true, value_enum, default_value = "auto")]
    pub comm: crate::engine::comm::CommChoice,
    /// Testing aid: append each micro-batch's sample indices to FILE.<rank>.
    #[arg(long, hide = true)]
    pub trace_samples: Option<PathBuf>,
}

impl SessionArgs {
    /// The one check of `-j`: a sweep runs at least one point at a time.
    pub fn check(&self) -> Result<(), ConfigError> {
        if self.jobs == Some(0) {
            return Err(usage("-j 0", "a sweep runs at least one point at a time"));
        }
        Ok(())
    }

    /// `--nproc N` with N > 1: this command line runs as N ranks.
    pub fn ranks(&self) -> Option<usize> {
        self.nproc.filter(|&n| n > 1)
    }

    /// Every `--set` parsed.
    pub fn sets(&self) -> Result<Vec<Assign>, ConfigErrors> {
        parse_sets(&self.set)
    }

    /// The session these options describe, its signal handlers installed.
    pub fn session(&self, world: &World) -> Result<Session> {
        let stop = crate::signals::install()?;
        crate::signals::watch_driver();
        if let Some(point) = &self.aids.crash_at {
            crate::signals::set_crash_point(point.clone());
        }
        Ok(Session {
            stop_after: self.aids.stop_after,
            quiet: self.quiet,
            heartbeat: Duration::from_secs_f64(self.progress_every.max(0.0)),
            comm: self.aids.comm,
            trace: self.aids.trace_samples.clone(),
            world: world.clone(),
            ..Session::new(stop)
        })
    }
}

/// A usage error (exit 2) about the argument `what`.
pub fn usage(what: &str, why: &str) -> ConfigError {
    ConfigError::new(config::Origin::Arg(what.into()), None, why)
}

/// Every `--set` argument parsed; all bad ones reported together.
pub fn parse_sets(set: &[String]) -> Result<Vec<Assign>, ConfigErrors> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for s in set {
        match config::parse_set(s) {
            Ok(a) => out.push(a),
            Err(e) => bad.push(e),
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(ConfigErrors(bad)) }
}
