//! Launch rules of the runner: which command lines may start ranks (`--nproc`), how they are
//! started, and a sweep's launcher changed on a resume.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Result;

use super::args::usage;
use crate::config::{self, ConfigError, Device, PlannedRun};
use crate::dist::World;

/// The one run of a data-parallel command: one experiment file that is not a sweep. `what`
/// is the argument that asked for it, `who` names it in the message.
pub(super) fn one_run<'a>(
    experiments: &'a [Vec<PlannedRun>],
    what: &str,
    who: &str,
) -> Result<&'a PlannedRun, ConfigError> {
    match experiments {
        [runs] if runs.len() == 1 && runs[0].tag.is_none() => Ok(&runs[0]),
        _ => Err(usage(what, &format!("{who} trains one run: give one experiment file that is not a sweep"))
            .hint("a sweep's points train with several ranks each through launcher.tasks_per_point (Slurm)")),
    }
}

/// Runs this command line as `n` ranks under mpirun, when it can start here: an MPI build,
/// not inside a launch already, and with the CUDA engine a GPU per rank (`train` known).
pub(super) fn ranks(n: usize, world: &World, train: Option<&config::TrainConfig>) -> Result<ExitCode> {
    let what = format!("--nproc {n}");
    if !cfg!(feature = "mpi") {
        return Err(usage(&what, "this build has no MPI, so it cannot start ranks")
            .hint("build with `cargo build --release --features mpi` (Debian: apt install libopenmpi-dev openmpi-bin clang libclang-dev)")
            .into());
    }
    if world.size() > 1 {
        let why =
            format!("this process is already one of {} ranks started by {}", world.size(), world.launcher);
        return Err(usage(&what, &why).into());
    }
    if let Some(t) = train
        && let Ok((Device::Cuda(_), _)) = crate::train::choose_device(t.device)
        && let Ok(gpus) = crate::engine::gpu::probe()
        && let Err(why) = crate::train::rank_gpu(0, n, gpus.names.len())
    {
        return Err(usage(&what, &why).into());
    }
    let stop = crate::signals::install()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = crate::dist::nproc::launch(n, &crate::dist::nproc::without_nproc(&args), &stop)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// `resume SWEEP_DIR -j N --launcher K`: the sweep's launcher from now on, saved in sweep.toml.
pub(super) fn relaunch(dir: &Path, jobs: Option<usize>, kind: Option<config::LauncherKind>) -> Result<()> {
    if !crate::sweep::is_sweep(dir) {
        let why = format!("{} is a run folder: -j and --launcher apply to a sweep folder", dir.display());
        return Err(usage("-j / --launcher", &why).into());
    }
    let mut sweep = crate::sweep::Sweep::open(dir)?;
    sweep.file.launcher = crate::sweep::launcher(&sweep.file.launcher, jobs, kind);
    sweep.save()
}
