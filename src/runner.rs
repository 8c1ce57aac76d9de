//! Runs planned experiments: run folders, auto-resume, signals. The edge between the CLI
//! and the training loop.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use anyhow::{Context, Result, bail};

use crate::config::{PlannedRun, Resume};
use crate::run_dir::{Meta, RunDir, Status, folder_name};
use crate::train::{self, Outcome, Session};

/// Routes SIGINT and SIGTERM into a flag the training loop polls between steps.
pub fn install_signals() -> Result<Arc<AtomicUsize>> {
    let flag = Arc::new(AtomicUsize::new(0));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_usize(sig, flag.clone(), sig as usize)
            .context("installing signal handlers")?;
    }
    Ok(flag)
}

/// Starts (or, with `resume = "auto"`, continues) one planned run.
pub fn start(
    planned: &PlannedRun,
    command_line: Vec<String>,
    mut session: Session,
) -> Result<(RunDir, Outcome)> {
    let c = &planned.config;
    // Before any folder exists: a run this build cannot train leaves nothing behind.
    train::require_cpu(&c.train)?;
    if c.checkpoint.resume == Resume::Auto
        && let Some(dir) = find_resumable(&c.checkpoint.save_dir, &c.name, planned.tag.as_deref())?
    {
        let existing = dir.read_config()?;
        let diff = train::checkpoint::model_diff(&existing.model, &c.model, "checkpoint");
        if !diff.is_empty() {
            bail!(
                "checkpoint.resume = \"auto\" found {} but its model differs; differing keys:\n  {}\n  hint: set checkpoint.resume = \"never\" to start a new run",
                dir.root.display(),
                diff.join("\n  ")
            );
        }
        session.resume = true;
        let outcome = continue_run(&dir, &session)?;
        return Ok((dir, outcome));
    }
    let now = chrono::Local::now();
    let dir = RunDir::create(&c.checkpoint.save_dir, &folder_name(&now, &c.name, planned.tag.as_deref()))?;
    dir.write_config(c)?;
    dir.write_meta(&Meta::gather(c, planned.tag.as_deref(), &planned.layered, command_line, &now))?;
    let outcome = train::train(&dir, c, &session)?;
    Ok((dir, outcome))
}

/// `minimind resume RUN_DIR`: continues from the last complete checkpoint.
pub fn resume(root: &Path, session: Session) -> Result<Outcome> {
    let dir = RunDir::open(root)?;
    let meta = dir.read_meta()?;
    if meta.status == Status::Completed {
        bail!("{} already completed", root.display());
    }
    continue_run(&dir, &Session { resume: true, ..session })
}

fn continue_run(dir: &RunDir, session: &Session) -> Result<Outcome> {
    let config = dir.read_config()?;
    let mut meta = dir.read_meta()?;
    meta.status = Status::Running;
    meta.ended_at = None;
    meta.error = None;
    meta.resumes.push(chrono::Local::now().to_rfc3339());
    dir.write_meta(&meta)?;
    train::train(dir, &config, session)
}

/// The newest unfinished run of this experiment (and sweep point) in `save_dir`.
fn find_resumable(save_dir: &Path, name: &str, tag: Option<&str>) -> Result<Option<RunDir>> {
    let Ok(entries) = std::fs::read_dir(save_dir) else {
        return Ok(None);
    };
    let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    for root in dirs.into_iter().rev() {
        let Ok(dir) = RunDir::open(&root) else {
            continue;
        };
        let Ok(meta) = dir.read_meta() else { continue };
        if meta.name == name && meta.sweep_tag.as_deref() == tag && meta.status != Status::Completed {
            return Ok(Some(dir));
        }
    }
    Ok(None)
}

/// The process exit code of an outcome: 0, or 128 + the signal.
pub fn exit_code(o: Outcome) -> u8 {
    match o {
        Outcome::Completed => 0,
        Outcome::Stopped(sig) => (128 + sig) as u8,
    }
}
