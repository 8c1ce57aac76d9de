//! Runs planned experiments and resumes run folders: every decision of `run` and `resume`
//! (a dry run, ranks or one process, the owner or a follower of a data-parallel run, one run
//! or a sweep, failures gathered), placement, the memory check, run folders and their locks,
//! auto-resume. The edge between the CLI and the training loop.

mod args;
mod launch;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Result, bail};

use args::usage;
pub use args::{SessionArgs, TestingAids};

use crate::config::{self, Assign, Config, ConfigError, Layered, PlannedRun, Resume};
use crate::cost::{self, Cost};
use crate::dist::World;
use crate::metrics::say;
use crate::run_dir::{Meta, MetaFile, Override, RunDir, RunLock, Status, folder_name};
use crate::train::{self, Outcome, Placement, RESUMABLE_KEYS, ResumeRequest, Session};

/// `minimind run FILES...`: every run of the experiment files (every sweep point), or with
/// `dry_run` what would be created; as ranks with `--nproc`, or as one rank of a launch.
pub fn run_experiments(
    files: &[PathBuf],
    dry_run: bool,
    args: SessionArgs,
    world: &World,
) -> Result<ExitCode> {
    args.check()?;
    let experiments = files.iter().map(|f| load(f, &args.set)).collect::<Result<Vec<_>>>()?;
    if dry_run {
        experiments.iter().try_for_each(|runs| print_dry_run(runs))?;
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(n) = args.ranks() {
        let run = launch::one_run(&experiments, &format!("--nproc {n}"), "--nproc")?;
        return launch::ranks(n, world, Some(&run.config.train));
    }
    let session = args.session(world)?;
    if world.size() > 1 {
        // Every rank resolved the same command; rank 0 creates the run and tells the others,
        // which check their own resolution against it.
        let run = launch::one_run(&experiments, "the launch", "a data-parallel launch")?;
        let outcome = if world.is_owner() {
            start(run, std::env::args().collect(), session)?.1
        } else {
            train::follow(&session, Some(&run.config))?
        };
        return Ok(exit(outcome));
    }
    run_each(&experiments, &args, &session)
}

/// Each experiment in turn (a single run, or a sweep); with several files a failed one is
/// reported and the rest still run, a signal stops them all.
fn run_each(experiments: &[Vec<PlannedRun>], args: &SessionArgs, session: &Session) -> Result<ExitCode> {
    let mut failed = Vec::new();
    for runs in experiments {
        let result = match runs.as_slice() {
            [run] if run.tag.is_none() => {
                start(run, std::env::args().collect(), session.clone()).map(|(_, o)| o)
            }
            points => {
                let file_launcher = &points[0].layered.merged.launcher;
                let l = crate::sweep::launcher(file_launcher, args.jobs, args.launcher);
                let sweep = crate::sweep::Sweep::create(points, l, std::env::args().collect())?;
                run_sweep(&sweep, session)
            }
        };
        match result {
            Ok(Outcome::Completed) => {}
            Ok(outcome) => return Ok(exit(outcome)),
            Err(e) if experiments.len() > 1 => {
                let _ = writeln!(std::io::stderr(), "error: {}: {e:#}", runs[0].config.name);
                failed.push(runs[0].config.name.clone());
            }
            Err(e) => return Err(e),
        }
    }
    if !failed.is_empty() {
        bail!("{} of {} experiments failed: {}", failed.len(), experiments.len(), failed.join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `minimind resume DIR`: a run folder continues from its last complete checkpoint (`--set`
/// limited to [`RESUMABLE_KEYS`]), a sweep folder runs its unfinished points; as ranks with
/// `--nproc`, or as one rank of a launch.
pub fn resume(root: &Path, allow_data_change: bool, args: SessionArgs, world: &World) -> Result<ExitCode> {
    args.check()?;
    let sets = args.sets()?;
    let sweep = crate::sweep::is_sweep(root);
    if let Some(n) = args.ranks() {
        if sweep {
            return Err(
                usage(&format!("--nproc {n}"), "--nproc continues one run folder, not a sweep").into()
            );
        }
        return launch::ranks(n, world, None);
    }
    if args.jobs.is_some() || args.launcher.is_some() {
        launch::relaunch(root, args.jobs, args.launcher)?;
    }
    let session = args.session(world)?;
    if world.size() > 1 && sweep {
        let why = "a data-parallel launch continues one run folder, not a sweep";
        return Err(usage("the launch", why).into());
    }
    let outcome = if !world.is_owner() {
        train::follow(&session, None)?
    } else if sweep {
        anyhow::ensure!(sets.is_empty(), "--set applies to one run folder, not to a sweep folder");
        run_sweep(&crate::sweep::Sweep::open(root)?, &session)?
    } else {
        resume_run(root, &sets, allow_data_change, session)?
    };
    Ok(exit(outcome))
}

fn exit(outcome: Outcome) -> ExitCode {
    ExitCode::from(outcome.exit_code())
}

/// Loads an experiment with this process's environment and the given `--set` arguments.
pub fn load(file: &Path, set: &[String]) -> Result<Vec<PlannedRun>> {
    let env = config::parse_env(std::env::vars())?;
    for w in &env.warnings {
        crate::metrics::warn(w);
    }
    let sets = args::parse_sets(set)?;
    Ok(config::load(file, &env.assigns, &sets)?)
}

/// `run --dry-run`: the folders that would be created, with the placement notes and cost.
fn print_dry_run(runs: &[PlannedRun]) -> Result<()> {
    let now = chrono::Local::now();
    for run in runs {
        let c = &run.config;
        let folder = folder_name(&now, &c.name, run.tag.as_deref());
        let placement = preflight(c, &run.layered)?;
        say(&format!(
            "would create {} (config.toml, meta.json, metrics.csv, checkpoints/)",
            c.checkpoint.save_dir.join(folder).display()
        ));
        for note in placement.all_notes() {
            say(&format!("  {note}"));
        }
        say(&format!("  cost: {}", cost::cost_of(c).describe()));
    }
    Ok(())
}

/// Everything a run must pass before anything is created: a device/dtype it can train on and
/// memory for its peak. On the CPU it also measures this machine's speed where none is cached
/// yet (`cost::machine_speed`): its engine of MiniMind2-small is freed before the run's exists.
pub fn preflight(c: &Config, layered: &Layered) -> Result<Placement, ConfigError> {
    let origin = |key: &str| layered.origin_of(key);
    let placement = train::place(&c.train, &origin)?;
    if !matches!(placement.device, config::Device::Cuda(_)) {
        // An estimate: without it the header says less, nothing fails.
        let _ = cost::machine_speed(c.train.threads, placement.dtype);
    }
    if let Some(available) = cost::available_memory()
        && let Some(why) = cost::too_big(
            &Cost::of(c, None, None, cost::keeps_panels(placement.device, placement.dtype)),
            available,
        )
    {
        let shrink = ["train.batch_size", "data.max_seq_len", "model.hidden_size", "model.num_hidden_layers"]
            .iter()
            .map(|k| format!("{k} ({})", origin(k)))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(ConfigError::new(origin("train.batch_size"), Some("train.batch_size"), why)
            .hint(format!("lower one of {shrink}")));
    }
    Ok(placement)
}

/// Starts (or, with `resume = "auto"`, continues) one planned run.
pub fn start(
    planned: &PlannedRun,
    command_line: Vec<String>,
    mut session: Session,
) -> Result<(RunDir, Outcome)> {
    let c = &planned.config;
    // Before any folder exists: a run that cannot train leaves nothing behind.
    let placement = preflight(c, &planned.layered)?;
    if c.checkpoint.resume == Resume::Auto
        && let Some((dir, lock, notes)) =
            find_resumable(&c.checkpoint.save_dir, &c.name, planned.tag.as_deref())?
    {
        for n in notes {
            crate::metrics::say(&n);
        }
        crate::metrics::say(&format!("checkpoint.resume = \"auto\": continuing {}", dir.root.display()));
        let (existing, layered) = config::load_run_config(&dir.config_path(), &[])?;
        let diff = existing.model.differences(&c.model, "checkpoint");
        if !diff.is_empty() {
            bail!(
                "checkpoint.resume = \"auto\" found {} but its model differs; differing keys:\n  {}\n  hint: set checkpoint.resume = \"never\" to start a new run",
                dir.root.display(),
                diff.join("\n  ")
            );
        }
        session.resume = Some(ResumeRequest::default());
        let outcome = continue_run(&dir, lock, &existing, &layered, &session)?;
        return Ok((dir, outcome));
    }
    let now = chrono::Local::now();
    let (dir, _lock) =
        RunDir::create(&c.checkpoint.save_dir, &folder_name(&now, &c.name, planned.tag.as_deref()))?;
    dir.write_config(c)?;
    let mut meta = Meta::gather(c, planned.tag.as_deref(), &planned.layered, command_line, &now);
    (meta.device, meta.dtype) = train::choices(&c.train, &placement);
    let meta = MetaFile::new(&dir, meta);
    meta.update(|_| {})?;
    let outcome = train::train(&dir, &meta, c, &placement, &session)?;
    Ok((dir, outcome))
}

/// Continues the run folder `root` from its last complete checkpoint, `sets` limited to
/// [`RESUMABLE_KEYS`].
fn resume_run(root: &Path, sets: &[Assign], allow_data_change: bool, session: Session) -> Result<Outcome> {
    let dir = RunDir::open(root)?;
    let lock = dir.lock()?;
    let refused: Vec<&Assign> = sets.iter().filter(|a| !RESUMABLE_KEYS.contains(&a.key.as_str())).collect();
    if let Some(first) = refused.first() {
        let keys: Vec<&str> = refused.iter().map(|a| a.key.as_str()).collect();
        return Err(ConfigError::new(
            first.origin.clone(),
            Some(&first.key),
            format!(
                "{} cannot change when a run resumes (it would change the model or the order of the data)",
                keys.join(", ")
            ),
        )
        .hint(format!("a resume may set: {}; start a new run for the rest", RESUMABLE_KEYS.join(", ")))
        .into());
    }
    let (config, layered) = config::load_run_config(&dir.config_path(), sets)?;
    let overrides: Vec<Override> = sets
        .iter()
        .map(|a| Override { key: a.key.clone(), value: a.value.to_string(), source: a.origin.to_string() })
        .collect();
    // A resume reads the run's config.toml: configuration variables are not applied to it.
    let ignored: Vec<String> =
        std::env::vars().map(|(k, _)| k).filter(|k| config::is_config_var(k)).collect();
    let warnings = if ignored.is_empty() {
        Vec::new()
    } else {
        vec![format!(
            "{} set in the environment, but a resume reads the run's config.toml: ignored (--set changes the keys a resume may change)",
            ignored.join(", ")
        )]
    };
    let request = ResumeRequest { overrides, allow_data_change, warnings };
    continue_run(&dir, lock, &config, &layered, &Session { resume: Some(request), ..session })
}

/// Continues the run in `dir` (locked) with `config`; the training loop records the resume in
/// meta.json (and the changed config.toml) once it has accepted the checkpoint and the data.
fn continue_run(
    dir: &RunDir,
    _lock: RunLock,
    config: &Config,
    layered: &Layered,
    session: &Session,
) -> Result<Outcome> {
    let placement = preflight(config, layered)?;
    let (mut meta, notes) = dir.read_meta_lenient(&Meta::placeholder(config));
    for n in notes {
        crate::metrics::warn(&n);
    }
    let done = meta.last_step.unwrap_or(0);
    let extended = session
        .resume
        .as_ref()
        .is_some_and(|r| r.overrides.iter().any(|o| o.key == "train.max_steps" || o.key == "train.epochs"));
    if meta.status == Status::Completed
        && !extended
        && let Some(n) = config.train.max_steps
        && done < n
    {
        // A completed run ends at its last step: this status was written by hand or by an
        // older version; the run goes on to its end without changing its schedule.
        crate::metrics::warn(&format!(
            "{} says completed, but its last step {done} is short of train.max_steps = {n}: continuing it to step {n}",
            dir.meta_path().display()
        ));
        meta.status = Status::Stopped;
    }
    if meta.status == Status::Completed {
        if let Some(n) = config.train.max_steps
            && extended
            && n <= done
        {
            bail!("train.max_steps = {n} is not beyond the {done} steps {} has done", dir.root.display());
        }
        if !extended {
            bail!(
                "{} already completed ({done} steps)\n  hint: to train further, raise the step count: {} resume {} --set train.max_steps={}",
                dir.root.display(),
                crate::metrics::program(),
                dir.root.display(),
                (done * 2).max(1)
            );
        }
    }
    (meta.device, meta.dtype) = train::choices(&config.train, &placement);
    // A sweep point that never ran starts now: a first start, not a resume; its --set values
    // (the sweep's thread split) are overrides of the run.
    let queued = meta.status == Status::Queued;
    let first_start;
    let session = if queued {
        let request = session.resume.clone().unwrap_or_default();
        meta.overrides.extend(request.overrides);
        dir.write_config(config)?;
        first_start = Session { resume: None, ..session.clone() };
        &first_start
    } else {
        session
    };
    let meta = MetaFile::new(dir, meta);
    meta.update(|_| {})?;
    let outcome = train::train(dir, &meta, config, &placement, session);
    // A sweep's index follows its points.
    if let Some(parent) = dir.root.parent()
        && crate::sweep::is_sweep(parent)
        && let Ok(sweep) = crate::sweep::Sweep::open(parent)
    {
        let _ = sweep.refresh_index();
    }
    outcome
}

/// Runs a sweep's points: `jobs` at a time here, or as a Slurm job array.
pub fn run_sweep(sweep: &crate::sweep::Sweep, session: &Session) -> Result<Outcome> {
    use crate::sweep::Ended;
    let launcher = &sweep.file.launcher;
    crate::metrics::say(&format!("sweep {}: {} point(s)", sweep.root.display(), sweep.file.points.len()));
    if launcher.kind == crate::config::LauncherKind::Slurm {
        crate::slurm::submit(sweep)?;
        return Ok(Outcome::Completed);
    }
    let ended = crate::sweep::run_local(sweep, launcher.jobs, &session.stop)?;
    let rows = sweep.refresh_index()?;
    crate::sweep::print_index(&rows);
    // The picture is a convenience: failing to draw it does not fail the sweep.
    if let Err(e) = crate::report::plot_sweep_loss(&sweep.root) {
        crate::metrics::say(&format!("warning: no loss.svg: {e:#}"));
    }
    match ended {
        Ended::Stopped(sig) => {
            say(&format!("continue with: {} resume {}", crate::metrics::program(), sweep.root.display()));
            Ok(Outcome::Stopped(sig))
        }
        Ended::Done { failed: 0 } => Ok(Outcome::Completed),
        Ended::Done { failed } => bail!("{failed} of {} points failed (see index.csv)", rows.len()),
    }
}

/// The newest unfinished run of this experiment (and sweep point) in `save_dir` that no live
/// process holds, locked; runs still alive are skipped with a note.
fn find_resumable(
    save_dir: &Path,
    name: &str,
    tag: Option<&str>,
) -> Result<Option<(RunDir, RunLock, Vec<String>)>> {
    let Ok(entries) = std::fs::read_dir(save_dir) else {
        return Ok(None);
    };
    let mut dirs: Vec<_> = entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect();
    dirs.sort();
    let mut notes = Vec::new();
    for root in dirs.into_iter().rev() {
        let Ok(dir) = RunDir::open(&root) else {
            continue;
        };
        let Ok(meta) = dir.read_meta() else { continue };
        if meta.name != name || meta.sweep_tag.as_deref() != tag || meta.status == Status::Completed {
            continue;
        }
        match dir.try_lock()? {
            Some(lock) => return Ok(Some((dir, lock, notes))),
            None => notes.push(format!(
                "checkpoint.resume = \"auto\": {} is still running (another process holds it); not adopting it",
                root.display()
            )),
        }
    }
    for n in notes {
        crate::metrics::say(&n);
    }
    Ok(None)
}
