//! The entry of a training session: the signal hooks, the trainer run on the placement's
//! backend (see `trainer`), a panic caught, and how the session ended recorded in meta.json
//! (completed, stopped by which signal, or failed with the first error).

use anyhow::{Context, Result};

use super::session::Refused;
use super::trainer::{Ctx, Trainer};
use super::{Outcome, Placement, ResumeRequest, Session, ranks};
use crate::config::Config;
use crate::dist::World;
use crate::engine::Kernels;
use crate::engine::backend::{self, Task};
use crate::run_dir::{MetaFile, RunDir, Status};
use crate::signals::{self, Interrupted};

/// Trains the run in `run` until done or stopped, and records in meta.json how it ended:
/// completed, stopped (by which signal) or failed (with the first error; a panic is caught and
/// recorded as one). A second signal quits at once after recording the stop.
pub fn train(
    run: &RunDir,
    meta: &MetaFile,
    config: &Config,
    placement: &Placement,
    s: &Session,
) -> Result<Outcome> {
    hook_signals(meta, &s.world);
    let world = &s.world;
    let session = std::panic::AssertUnwindSafe(|| {
        if world.size() > 1 && world.is_owner() {
            ranks::announce(world, run.root.clone(), config, s.resume.is_some())?;
        }
        let placement = &ranks::placement(placement, world)?;
        let task = Training(Ctx { run, meta, config, placement, s });
        crate::threads::pool(ranks::threads(config.train.threads, world.local_size))?
            .install(|| backend::run(placement.device, placement.dtype, false, task)?)
    });
    let result = std::panic::catch_unwind(session).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(anyhow::anyhow!("internal error (a bug, please report it): {what}"))
    });
    signals::on_quit(None);
    signals::on_first_signal(None);
    let result = result.or_else(|e| match e.downcast_ref::<Interrupted>() {
        Some(Interrupted(sig)) => Ok(Outcome::Stopped(*sig)),
        None => Err(e),
    });
    record_end(meta, result)
}

/// While the session runs: a second signal quits at once, recorded as a stop; with several
/// ranks the first one is recorded at once (the launcher may end the ranks before the step
/// ends).
fn hook_signals(meta: &MetaFile, world: &World) {
    let hook = meta.clone();
    signals::on_quit(Some(Box::new(move |sig| {
        let why = format!("{} twice: quit at once (the previous checkpoint stays valid)", signals::name(sig));
        let _ = hook.ended(Status::Stopped, Some(why), None);
    })));
    if world.size() > 1 {
        let hook = meta.clone();
        signals::on_first_signal(Some(Box::new(move |sig| {
            let why = format!(
                "stopped by {} (recorded at once: the launcher may end the ranks before the step ends; the last checkpoint stays valid)",
                signals::name(sig)
            );
            let _ = hook.ended(Status::Stopped, Some(why), None);
        })));
    }
}

/// Records how the session ended in meta.json, and returns it. A refused resume changed
/// nothing: meta.json stays as it was.
fn record_end(meta: &MetaFile, result: Result<Outcome>) -> Result<Outcome> {
    if let Err(e) = &result
        && e.downcast_ref::<Refused>().is_some()
    {
        return result;
    }
    let recorded = match &result {
        Ok(Outcome::Completed) => meta.ended(Status::Completed, None, None),
        Ok(Outcome::Stopped(sig)) => {
            meta.ended(Status::Stopped, Some(format!("stopped by {}", signals::name(*sig))), None)
        }
        Err(e) => meta.ended(Status::Failed, None, Some(format!("{e:#}"))),
    };
    match (result, recorded) {
        (r, Ok(())) => r,
        // The first error is the one to report; failing to record it comes second.
        (Err(e), Err(also)) => {
            crate::metrics::warn(&format!("could not record the failure in meta.json either: {also:#}"));
            Err(e)
        }
        (Ok(_), Err(e)) => Err(e),
    }
}

/// A rank other than 0 of a data-parallel run: trains the run rank 0 announces (see
/// [`ranks`]), after checking `own` (its own resolution of the command) against it.
pub fn follow(s: &Session, own: Option<&Config>) -> Result<Outcome> {
    let world = &s.world;
    let (plan, config) = ranks::receive(world, own)?;
    std::fs::create_dir_all(&plan.root).with_context(|| format!("creating {}", plan.root.display()))?;
    let run = RunDir { root: plan.root.clone() };
    let meta = MetaFile::unwritten(&run, crate::run_dir::Meta::placeholder(&config));
    let origin = |k: &str| crate::config::Origin::Arg(format!("rank 0's {k}"));
    let placement = super::place(&config.train, &origin)?;
    let session = Session { resume: plan.resuming.then(ResumeRequest::default), ..s.clone() };
    train(&run, &meta, &config, &placement, &session)
}

/// A training session, run on whichever backend the placement chose.
struct Training<'a>(Ctx<'a>);

impl Task for Training<'_> {
    type Out = Result<Outcome>;
    fn run<K: Kernels>(self, kernels: K) -> Result<Outcome> {
        Trainer::build(kernels, self.0)?.run()
    }
}
