//! The training loop, in phases that read top to bottom: open the data; build the engine and
//! restore its state (a checkpoint, given weights or a fresh init); train (micro-batches with
//! accumulation, schedule, clipping, AdamW, metrics, checkpoints, stop requests at every
//! micro-batch); export and evaluate. [`train`] wraps the phases so that whatever ends them
//! (completion, a signal, an error, a panic) is recorded in meta.json.
//!
//! Data parallel (see `crate::dist`): every rank runs these phases. A step's micro-batches are
//! the single-process ones, `G` of them; rank r of W trains micro-batches r, r+W, ... and
//! passes over the rest, so every rank's data cursor is the run's global position. Gradients
//! are summed over the ranks before the update, which is then the same on every rank. Rank 0
//! alone writes the run folder (metrics, checkpoints, export); the others log to
//! `rank-<r>.log`. Nothing rank-local draws random numbers: rank 0's initial weights are
//! broadcast, and the data order is the seed's.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::Placement;
use super::checkpoint::{self, TrainerState};
use super::schedule::lr_at;
use crate::config::{Config, Dtype};
use crate::cost::Cost;
use crate::data::{Batches, Cursor, Dataset, OpenOptions, Tok, hold_out};
use crate::dist::World;
use crate::engine::backend::{self, Task};
use crate::engine::comm::{self, CommChoice, Communicator};
use crate::engine::{Engine, Kernels, OptimConfig, hf};
use crate::metrics::{Console, MetricsWriter, Progress, StepMetrics, duration, human};
use crate::run_dir::{FinalEval, MetaFile, Override, ResumeRecord, RunDir, Status};
use crate::signals::{self, Interrupted, Stop};

/// How a training session ended (errors are returned as errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Stopped by a signal (its number), after writing a checkpoint of the last complete step.
    Stopped(i32),
}

/// A resume's own settings.
#[derive(Clone, Debug, Default)]
pub struct ResumeRequest {
    /// `--set` values given to the resume, recorded in meta.json.
    pub overrides: Vec<Override>,
    /// Continue even though the data, tokenizer or tokens changed since the checkpoint.
    pub allow_data_change: bool,
}

/// Knobs of one session that are not part of the experiment.
#[derive(Clone)]
pub struct Session {
    /// Continue from the run's last complete checkpoint.
    pub resume: Option<ResumeRequest>,
    /// Set by a signal: stop at the next micro-batch boundary.
    pub stop: Stop,
    /// Testing aid: behave as if SIGINT arrived right after this step.
    pub stop_after: Option<usize>,
    /// No progress bars (lines only).
    pub quiet: bool,
    /// Without a progress bar, print a progress line when nothing was printed for this long.
    pub heartbeat: Duration,
    /// The ranks that train this run together (a world of one without a launcher).
    pub world: World,
    /// Testing aid: which communicator carries the gradients (`device` runs NCCL even alone).
    pub comm: CommChoice,
    /// Testing aid: every micro-batch this rank trains, as its sample indices, is appended to
    /// `<trace>.<rank>` ("STEP: i i i ...").
    pub trace: Option<PathBuf>,
}

impl Session {
    /// A session of one process with default knobs.
    pub fn new(stop: Stop) -> Session {
        Session {
            resume: None,
            stop,
            stop_after: None,
            quiet: true,
            heartbeat: Duration::ZERO,
            world: World::single(),
            comm: CommChoice::Auto,
            trace: None,
        }
    }
}

/// Rows of the final evaluation recorded in meta.json (one micro-batch).
const FINAL_EVAL_BATCHES: usize = 1;

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
    let hook = meta.clone();
    signals::on_quit(Some(Box::new(move |sig| {
        let why = format!("{} twice: quit at once (the previous checkpoint stays valid)", signals::name(sig));
        let _ = hook.ended(Status::Stopped, Some(why), None);
    })));
    let world = &s.world;
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
    let phases = std::panic::AssertUnwindSafe(|| {
        if world.size() > 1 && world.is_owner() {
            super::ranks::announce(world, run.root.clone(), config, s.resume.is_some())?;
        }
        let placement = &rank_placement(placement, world)?;
        let task = Training { run, meta, config, placement, s };
        super::thread_pool(rank_threads(config.train.threads, world.local_size))?
            .install(|| backend::run(placement.device, placement.dtype, false, task)?)
    });
    let result = std::panic::catch_unwind(phases).unwrap_or_else(|panic| {
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
    if let Err(e) = &result
        && e.downcast_ref::<Refused>().is_some()
    {
        // The run did not fail: it was not continued. meta.json stays as it was.
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

/// A rank's device: with several ranks on a host and the CUDA engine, rank `l` of the host
/// takes `cuda:l` (and the host needs a GPU per rank).
fn rank_placement(p: &Placement, world: &World) -> Result<Placement> {
    let crate::config::Device::Cuda(_) = p.device else {
        return Ok(p.clone());
    };
    if world.size() == 1 {
        return Ok(p.clone());
    }
    let gpus = crate::engine::gpu::probe().map_err(|e| anyhow::anyhow!(e))?.names;
    let device = rank_gpu(world.local_rank, world.local_size, gpus.len()).map_err(|e| anyhow::anyhow!(e))?;
    // The placement's note named the first GPU; this rank's is its own.
    let device_note = Some(format!(
        "rank {} of {}: training on {device} ({})",
        world.rank(),
        world.size(),
        gpus[world.local_rank]
    ));
    Ok(Placement { device, device_note, ..p.clone() })
}

/// The GPU of rank `local_rank` among `local_size` ranks on a host with `gpus` GPUs: its own,
/// `cuda:<local rank>`; or why there are too few. Pure.
pub fn rank_gpu(local_rank: usize, local_size: usize, gpus: usize) -> Result<crate::config::Device, String> {
    if local_size > gpus {
        return Err(format!(
            "{local_size} ranks on this host but {gpus} GPU(s): each rank trains on a GPU of its own\n  hint: start at most {gpus} ranks per host, or set train.device = \"cpu\""
        ));
    }
    Ok(crate::config::Device::Cuda(local_rank))
}

/// A rank's CPU threads: `train.threads`, or with 0 (all cores) its share of the host's cores.
fn rank_threads(threads: usize, ranks_on_host: usize) -> usize {
    match threads {
        0 if ranks_on_host > 1 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / ranks_on_host).max(1)
        }
        n => n,
    }
}

/// A run's micro-batches per step over all ranks split evenly: each rank's share. Pure.
fn local_accumulation(global: usize, world: usize) -> Result<usize, String> {
    if world == 0 || !global.is_multiple_of(world) || global < world {
        return Err(format!(
            "a step of this run has {global} micro-batch(es), which {world} ranks cannot share evenly\n  hint: use a number of ranks that divides {global}"
        ));
    }
    Ok(global / world)
}

/// A rank other than 0 of a data-parallel run: trains the run rank 0 announces (see
/// [`super::ranks`]), after checking `own` (its own resolution of the command) against it.
pub fn follow(s: &Session, own: Option<&Config>) -> Result<Outcome> {
    let world = &s.world;
    let (plan, config) = super::ranks::receive(world, own)?;
    std::fs::create_dir_all(&plan.root).with_context(|| format!("creating {}", plan.root.display()))?;
    let run = RunDir { root: plan.root.clone() };
    let meta = MetaFile::unwritten(&run, crate::run_dir::Meta::placeholder(&config));
    let origin = |k: &str| crate::config::Origin::Arg(format!("rank 0's {k}"));
    let placement = super::place(&config.train, &origin)?;
    let session = Session { resume: plan.resuming.then(ResumeRequest::default), ..s.clone() };
    train(&run, &meta, &config, &placement, &session)
}

/// A resume refused before it changed anything (the run stays as it was).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

/// The run's data, opened: rows, batches and the validation rows.
struct Data {
    ds: Dataset,
    tok: Tok,
    batches: Batches,
    /// Validation rows `(ids, targets)`, `rows x T` each, encoded as `minimind eval` does.
    val: Option<(Vec<u32>, Vec<i32>)>,
}

/// A training session, run on whichever backend the placement chose.
struct Training<'a> {
    run: &'a RunDir,
    meta: &'a MetaFile,
    config: &'a Config,
    placement: &'a Placement,
    s: &'a Session,
}

impl Task for Training<'_> {
    type Out = Result<Outcome>;
    fn run<K: Kernels>(self, kernels: K) -> Result<Outcome> {
        phases(kernels, self.run, self.meta, self.config, self.placement, self.s)
    }
}

fn phases<K: Kernels>(
    kernels: K,
    run: &RunDir,
    meta: &MetaFile,
    config: &Config,
    placement: &Placement,
    s: &Session,
) -> Result<Outcome> {
    let world = &s.world;
    let owner = world.is_owner();
    let wall = Instant::now();
    // Rank 0 opens the data first: the others then read the token cache it built.
    if !owner {
        world.comm.barrier();
    }
    let mut data = open_data(config, s)?;
    if owner {
        world.comm.barrier();
    }
    let skipped = data.ds.skipped();
    meta.update(|m| {
        m.skipped_lines = skipped.count;
        m.skipped_line_numbers = skipped.first.clone();
    })?;
    let device = kernels.describe();
    let comm = comm::for_world(&kernels, world, s.comm)?;
    let (mut engine, mut state, mut restore_notes) = restore(kernels, run, meta, config, &data, s)?;
    // Bound after the engine, so dropped before it: a device communicator (NCCL) finishes
    // what it queued on the engine's buffers before they are freed, on every way out.
    let mut comm = comm;
    super::ranks::share_state(world, &mut *comm, &mut engine, &mut state)?;
    let split = split_steps(config, &data.batches, &mut state, world)?;
    restore_notes.extend(split.note.clone());
    meta.set_step(state.step);
    if matches!(placement.device, crate::config::Device::Cuda(_)) {
        meta.update(|m| m.gpu = Some(device.clone()))?;
    }
    let info = world.info(config.train.batch_size * split.global);
    let hosts = info.hosts.len();
    meta.update(|m| {
        m.status = Status::Running;
        (m.ended_at, m.error, m.reason) = (None, None, None);
        m.world = Some(info);
    })?;
    if owner && s.resume.as_ref().is_some_and(|r| !r.overrides.is_empty()) {
        run.write_config(config)?;
    }
    let (mut metrics, metric_notes) = if owner {
        let (w, notes) = MetricsWriter::open(&run.metrics_path(), s.resume.as_ref().map(|_| state.step))?;
        (Some(w), notes)
    } else {
        (None, Vec::new())
    };
    let mut console = if owner {
        Console::new(&run.log_path(), split.total as u64, state.step as u64, s.quiet, s.heartbeat)?
    } else {
        Console::log_file(&run.root.join(format!("rank-{}.log", world.rank())))?
    };
    for note in &data.ds.notes {
        console.log_only(note);
    }
    for note in placement.all_notes().chain(&restore_notes).chain(&metric_notes) {
        console.line(note);
    }
    header(&mut console, run, config, &data, &split, (&device, placement.dtype));
    if world.size() > 1 || s.comm != CommChoice::Auto {
        console.line(&format!(
            "data parallel: rank {} of {} ({}), {} rank(s) on {} host(s); gradients: {}",
            world.rank(),
            world.size(),
            world.launcher,
            world.local_size,
            hosts,
            comm.describe()
        ));
    }

    let mut ctx = StepContext { run, meta, config, s, comm: &mut *comm, split: &split };
    let last_loss =
        match train_steps(&mut ctx, &mut data, &mut engine, &mut state, &mut console, metrics.as_mut())? {
            Steps::Stopped(sig) => return Ok(Outcome::Stopped(sig)),
            Steps::Done(loss) => loss,
        };
    if !owner {
        // Rank 0 exports and evaluates.
        console.finish();
        return Ok(Outcome::Completed);
    }
    if let Some(sig) = s.stop.requested() {
        console.line(&format!(
            "{}: stopping before the export; the final checkpoint is written",
            signals::name(sig)
        ));
        console.line(&format!("continue with: minimind resume {}", run.root.display()));
        return Ok(Outcome::Stopped(sig));
    }
    console.finish();
    finish(run, meta, config, &data, &mut engine, &state, last_loss, &mut console, wall)?;
    Ok(Outcome::Completed)
}

/// How a step's micro-batches are shared among the ranks, and how many steps the run has.
struct Split {
    /// Micro-batches per optimiser step, over all ranks.
    global: usize,
    /// This rank's share.
    local: usize,
    /// Optimiser steps in the whole run.
    total: usize,
    /// Why it differs from the checkpoint's, on a resume with another number of ranks.
    note: Option<String>,
}

/// The run's micro-batches per step (kept from the checkpoint: a resume with another number
/// of ranks re-splits the same steps), this rank's share, and the run's length in steps.
fn split_steps(config: &Config, batches: &Batches, state: &mut TrainerState, world: &World) -> Result<Split> {
    let w = world.size();
    let global = state.global_accumulation.unwrap_or(config.train.accumulation_steps * w);
    let local = local_accumulation(global, w).map_err(|e| anyhow::anyhow!(e))?;
    let before = state.world_size.unwrap_or(1);
    let note = (state.step > 0 && before != w).then(|| {
        format!(
            "the checkpoint was written by {before} rank(s), now {w}: the {global} micro-batches of a step are split anew, {local} per rank"
        )
    });
    (state.global_accumulation, state.world_size) = (Some(global), Some(w));
    let total = match config.train.max_steps {
        Some(n) => n,
        None => config.train.epochs * (batches.per_epoch() / global),
    };
    if total == 0 {
        bail!(
            "an epoch has {} micro-batch(es), fewer than the {global} of a step (train.accumulation_steps x ranks): nothing to train\n  hint: lower train.accumulation_steps or set train.max_steps",
            batches.per_epoch()
        );
    }
    Ok(Split { global, local, total, note })
}

fn open_data(config: &Config, s: &Session) -> Result<Data> {
    let b = config.train.batch_size;
    let cache_root = config.checkpoint.save_dir.join(".cache");
    let opts = OpenOptions { cache_root: &cache_root, quiet: s.quiet, heartbeat: s.heartbeat, stop: &s.stop };
    let (ds, tok) = Dataset::open(&config.data, config.model.vocab_size, &opts)?;
    let (train_rows, held_out) = hold_out(ds.samples(), config.data.val_fraction, config.seed);
    let batches = Batches::over(train_rows, b, config.seed)?;
    let rows = config.checkpoint.eval_batches * b;
    let t = config.data.max_seq_len;
    let val = if !held_out.is_empty() {
        let held = &held_out[..rows.min(held_out.len())];
        let (mut ids, mut targets, mut scratch) =
            (vec![0; held.len() * t], vec![0; held.len() * t], Vec::new());
        for (r, &row) in held.iter().enumerate() {
            ds.fill(
                row as usize,
                &mut ids[r * t..(r + 1) * t],
                &mut targets[r * t..(r + 1) * t],
                &mut scratch,
            );
        }
        Some((ids, targets))
    } else if let Some(path) = &config.data.val_path {
        let (ids, targets, _) = crate::eval::first_rows(path, &tok, t, rows, config.data.skip_bad_lines)?;
        Some((ids, targets))
    } else {
        None
    };
    Ok(Data { ds, tok, batches, val })
}

/// The engine with the run's starting state: its newest intact checkpoint when resuming (the
/// data checked against the checkpoint's fingerprints), else `from_weight` or a fresh init.
fn restore<K: Kernels>(
    kernels: K,
    run: &RunDir,
    meta: &MetaFile,
    config: &Config,
    data: &Data,
    s: &Session,
) -> Result<(Engine<K>, TrainerState, Vec<String>)> {
    let (b, t) = (config.train.batch_size, config.data.max_seq_len);
    if let Some(free) = kernels.free_memory() {
        let need = crate::cost::device_memory_least(
            &config.model,
            b,
            t,
            config.train.accumulation_steps,
            kernels.dtype(),
        );
        if need > free as f64 {
            bail!(
                "this run needs about {}B of device memory, {} has {}B free\n  hint: lower train.batch_size ({b}) or data.max_seq_len ({t})",
                human(need),
                kernels.describe(),
                human(free as f64)
            );
        }
    }
    let mut engine = Engine::new(kernels, config.model.clone(), b, t)?;
    // A device that refused an allocation (more than the estimate above foresaw) says so now.
    engine.kernels.check()?;
    let now = data.ds.fingerprint();
    let mut state = TrainerState {
        step: 0,
        cursor: Cursor::default(),
        tokens_seen: 0,
        tokens_real: 0,
        elapsed_s: 0.0,
        model: config.model.clone(),
        data: Some(now.clone()),
        loss_scale: None,
        global_accumulation: None,
        world_size: None,
    };
    let mut notes = Vec::new();
    let mut data_changes = Vec::new();
    // Rank 0 restores; the other ranks receive its state (`ranks::share_state`).
    let owner = s.world.is_owner();
    let checkpoint = match &s.resume {
        Some(_) if owner => latest_checkpoint(run, &engine, &mut notes)?,
        _ => None,
    };
    match checkpoint {
        Some(ck) => {
            match &ck.state.data {
                Some(then) => {
                    data_changes = now.changes_since(then, &config.data.path, &config.data.tokenizer)
                }
                None => notes.push(format!(
                    "note: {} predates data fingerprints; the data cannot be checked against it",
                    ck.dir.display()
                )),
            }
            let allowed = s.resume.as_ref().is_some_and(|r| r.allow_data_change);
            if !data_changes.is_empty() && !allowed {
                return Err(Refused(format!(
                    "cannot resume {}: what it trains on changed since {}:\n  {}\n  hint: resume anyway with --allow-data-change (recorded in meta.json), or start a new run",
                    run.root.display(),
                    ck.dir.display(),
                    data_changes.join("\n  ")
                ))
                .into());
            }
            for change in &data_changes {
                notes.push(format!("warning: {change} (allowed by --allow-data-change)"));
            }
            engine.set_params(&ck.params);
            engine.set_moments(&ck.exp_avg, &ck.exp_avg_sq);
            engine.step = ck.adam_step;
            if engine.scaler.is_some() {
                engine.scaler = ck.state.loss_scale.or(engine.scaler);
            }
            // Checkpoints from before data parallel were written by one process.
            let global = ck.state.global_accumulation.or(Some(config.train.accumulation_steps));
            state = TrainerState { data: Some(now), global_accumulation: global, ..ck.state };
            notes.push(format!("resuming from {} (step {})", ck.dir.display(), state.step));
        }
        None if !owner => {}
        None => {
            if s.resume.is_some() {
                notes.push("no complete checkpoint yet: starting from step 0".into());
            }
            match &config.checkpoint.from_weight {
                Some(w) => {
                    engine.set_params(&load_weights(w, &engine)?);
                    notes.push(format!("starting from weights {}", w.display()));
                }
                None => engine.init_weights(config.seed),
            }
        }
    }
    if let Some(r) = &s.resume {
        let record = ResumeRecord {
            at: chrono::Local::now().to_rfc3339(),
            from_step: state.step,
            overrides: r.overrides.clone(),
            data_changes,
        };
        meta.update(|m| m.resumes.push(record))?;
    }
    Ok((engine, state, notes))
}

/// The run's first lines; `on` is the device (as the backend names it) and the dtype: on a
/// GPU the model knows, the step time is its prediction, else this machine's matrix speed.
fn header(
    console: &mut Console,
    run: &RunDir,
    config: &Config,
    data: &Data,
    split: &Split,
    on: (&str, Dtype),
) {
    let (b, t, accum) = (config.train.batch_size, config.data.max_seq_len, split.global);
    let ranks = match split.global / split.local {
        1 => String::new(),
        w => format!(" = {} per rank x {w} ranks", split.local),
    };
    console.line(&format!(
        "{}: {} steps of {} tokens ({b} x {t}, accumulation {accum}{ranks}); {} samples{}, {} micro-batches per epoch",
        run.root.display(),
        split.total,
        human((b * t * accum) as f64),
        data.ds.samples(),
        match data.ds.samples() - data.batches.rows() {
            0 => String::new(),
            held => format!(", {held} held out for validation"),
        },
        data.batches.per_epoch()
    ));
    let skipped = data.ds.skipped().describe().map_or(String::new(), |s| format!("; {s}"));
    console.line(&format!(
        "data: {}: {} tokens{skipped}",
        config.data.path.display(),
        human(data.ds.tokens() as f64)
    ));
    let gpu = crate::roofline::find(on.0).ok().filter(|_| config.train.device != crate::config::Device::Cpu);
    let gflops = if gpu.is_some() { None } else { crate::cost::machine_gflops(config.train.threads).ok() };
    console.line(&format!("cost: {}", Cost::of(config, Some(split.total), gflops).describe()));
    // The run's own dtype on its GPU (a resolved placement may differ from the config's).
    let mut placed = config.clone();
    placed.train.dtype = on.1;
    if let Some(gpu) = gpu
        && let Ok(p) = crate::roofline::predict_run(&placed, gpu)
    {
        console.line(&p.describe(Some(split.total)));
    }
}

/// How the step loop ended.
enum Steps {
    /// Every step done; the loss of the last step run in this session, if any ran.
    Done(Option<f64>),
    /// Stopped by a signal after writing a checkpoint.
    Stopped(i32),
}

/// What the step loop reads besides the engine, the data and the state.
struct StepContext<'a, K: Kernels> {
    run: &'a RunDir,
    meta: &'a MetaFile,
    config: &'a Config,
    s: &'a Session,
    comm: &'a mut dyn Communicator<K>,
    split: &'a Split,
}

/// A stop every rank agrees on: any rank's signal stops them all at the same micro-batch
/// (alone, its own).
fn agreed_stop(world: &World, mine: Option<i32>) -> Option<i32> {
    let any = world.comm.max_u64(mine.map_or(0, |sig| sig as u64));
    (any > 0).then_some(any as i32)
}

fn train_steps<K: Kernels>(
    ctx: &mut StepContext<'_, K>,
    data: &mut Data,
    engine: &mut Engine<K>,
    state: &mut TrainerState,
    console: &mut Console,
    mut metrics: Option<&mut MetricsWriter>,
) -> Result<Steps> {
    let (run, meta, config, s) = (ctx.run, ctx.meta, ctx.config, ctx.s);
    let world = &s.world;
    let (rank, w) = (world.rank(), world.size());
    let (b, t) = (config.train.batch_size, config.data.max_seq_len);
    let (global, local) = (ctx.split.global, ctx.split.local);
    let total = ctx.split.total;
    let ck = &config.checkpoint;
    let optim = OptimConfig::from_train(&config.train);
    let (mut ids, mut targets) = (vec![0u32; b * t], vec![0i32; b * t]);
    let mut trace = match &s.trace {
        Some(path) => {
            let path = PathBuf::from(format!("{}.{rank}", path.display()));
            let f = std::fs::OpenOptions::new().create(true).append(true).open(&path);
            Some(f.with_context(|| format!("opening {}", path.display()))?)
        }
        None => None,
    };
    let session = Instant::now();
    let elapsed_before = state.elapsed_s;
    let micro_total = total.saturating_sub(state.step) * local;
    let mut micro_done = 0usize;
    let (mut last_log, mut last_tokens) = (Instant::now(), state.tokens_seen);
    let mut last_loss = None;
    let start = Progress {
        step: state.step,
        total,
        micro: 0,
        accumulation: local,
        elapsed_s: elapsed_before,
        eta_s: f64::NAN,
    };
    console.progress(&start);
    while state.step < total {
        // A stop inside the step abandons it: the data rewinds to where it began.
        let step_start = state.cursor;
        let mut real = 0u64;
        let mut mine = 0;
        engine.begin_step();
        for j in 0..global {
            if j % w != rank {
                real += data.batches.skip(&data.ds, &mut state.cursor) as u64;
                continue;
            }
            if let Some(f) = &mut trace {
                let rows: Vec<String> =
                    data.batches.samples_at(state.cursor).iter().map(|r| r.to_string()).collect();
                writeln!(f, "{}: {}", state.step + 1, rows.join(" ")).context("writing the sample trace")?;
            }
            real += data.batches.next(&data.ds, &mut state.cursor, &mut ids, &mut targets) as u64;
            // This rank's last micro-batch of the step sums the gradients over the ranks as
            // its backward goes.
            let reduce: Option<&mut dyn Communicator<K>> =
                if mine + 1 == local { Some(&mut *ctx.comm) } else { None };
            engine.accumulate(&ids, &targets, 1.0 / global as f32, global, reduce);
            mine += 1;
            micro_done += 1;
            let secs = session.elapsed().as_secs_f64();
            let progress = Progress {
                step: state.step,
                total,
                micro: mine,
                accumulation: local,
                elapsed_s: elapsed_before + secs,
                eta_s: secs / micro_done as f64 * (micro_total - micro_done) as f64,
            };
            console.progress(&progress);
            if mine < local
                && let Some(sig) = agreed_stop(world, s.stop.requested())
            {
                state.cursor = step_start;
                return stop_here(run, engine, state, ck.keep_last, console, sig, world.is_owner());
            }
        }
        engine.settle(&mut *ctx.comm);
        let lr = lr_at(&config.train, state.step, total);
        engine.update(lr as f32, &optim);
        state.step += 1;
        state.tokens_seen += (b * t * global) as u64;
        state.tokens_real += real;
        state.elapsed_s = elapsed_before + session.elapsed().as_secs_f64();
        meta.set_step(state.step);
        signals::crash_point("panic", state.step);
        signals::crash_point("step", state.step);

        // The device's numbers are read only when something needs them: a metrics row, a
        // checkpoint (never of non-finite weights) or a stop.
        let eval_now = data.val.is_some()
            && (ck.eval_interval.is_some_and(|n| state.step.is_multiple_of(n)) || state.step == total);
        let log_now = state.step.is_multiple_of(ck.log_interval) || state.step == total || eval_now;
        let save_now = state.step.is_multiple_of(ck.save_interval) || state.step == total;
        let asked = s.stop.requested().or((s.stop_after == Some(state.step)).then_some(libc::SIGINT));
        let signal = agreed_stop(world, asked);
        let stop_now = signal.is_some() && state.step < total;
        if !(log_now || save_now || stop_now) {
            continue;
        }
        let mut stats = engine.step_stats();
        engine.kernels.check()?;
        // Each rank's losses cover its own micro-batches (already divided by `global`).
        let mut sums = [stats.lm, stats.aux];
        world.comm.sum_f64(&mut sums);
        [stats.lm, stats.aux] = sums;
        let loss = stats.lm + stats.aux;
        if stats.skipped {
            let scale = engine.scaler.map_or(1.0, |s| s.scale);
            console.line(&format!(
                "step {}: float16 gradients overflowed: update skipped, loss scale now {scale}",
                state.step
            ));
        }
        // A skipped step's gradient norm is not finite by definition; its loss must still be:
        // the forward does not see the loss scale, so a NaN there is divergence, which the
        // scaler would otherwise skip step after step.
        if !stats.skipped || !loss.is_finite() {
            check_finite(run, loss, stats.grad_norm, state.step, ck.log_interval)?;
        }
        last_loss = Some(loss);
        let val_loss = match (&data.val, eval_now && world.is_owner()) {
            (Some((ids, targets)), true) => Some(crate::eval::mean_loss(engine, ids, targets, b, t).loss),
            _ => None,
        };
        if let Some(v) = val_loss {
            let step = state.step;
            meta.update(|m| {
                if m.best_val_loss.is_none_or(|best| v < best) {
                    (m.best_val_loss, m.best_val_step) = (Some(v), Some(step));
                }
            })?;
        }
        if log_now {
            let dt = last_log.elapsed().as_secs_f64().max(1e-9);
            let row = StepMetrics {
                step: state.step,
                epoch: state.cursor.epoch,
                tokens: state.tokens_real,
                tokens_padded: state.tokens_seen,
                loss,
                lm_loss: stats.lm,
                aux_loss: stats.aux,
                lr,
                grad_norm: stats.grad_norm,
                val_loss,
                tokens_per_s: (state.tokens_seen - last_tokens) as f64 / dt,
                elapsed_s: state.elapsed_s,
            };
            if let Some(m) = metrics.as_deref_mut() {
                m.write(&row)?;
            }
            console.line(&row.line(total));
            (last_log, last_tokens) = (Instant::now(), state.tokens_seen);
        }
        if let Some(sig) = signal.filter(|_| stop_now) {
            return stop_here(run, engine, state, ck.keep_last, console, sig, world.is_owner());
        }
        if save_now && world.is_owner() {
            checkpoint::save(&run.checkpoints_dir(), engine, state, ck.keep_last)?;
        }
    }
    Ok(Steps::Done(last_loss))
}

/// Fails the run when the step's loss or gradient norm is not finite; the last checkpoint (of
/// finite weights) stays. The numbers are read every `log_interval` steps and before every
/// checkpoint, so a NaN is caught by then.
fn check_finite(run: &RunDir, loss: f64, grad_norm: f64, step: usize, log_interval: usize) -> Result<()> {
    if loss.is_finite() && grad_norm.is_finite() {
        return Ok(());
    }
    let last = checkpoint::list(&run.checkpoints_dir()).pop();
    let when = if log_interval == 1 { format!("at step {step}") } else { format!("by step {step}") };
    bail!(
        "training diverged {when}: the loss became {loss}, the gradient norm {grad_norm}; training stopped{}\n  hint: lower train.learning_rate or check the data",
        last.map_or(String::new(), |(_, p)| format!(" (last good checkpoint: {})", p.display()))
    )
}

/// Stops for signal `sig`: a checkpoint of the last complete step (none before the first; by
/// rank 0 only), and how to continue.
fn stop_here<K: Kernels>(
    run: &RunDir,
    engine: &Engine<K>,
    state: &TrainerState,
    keep_last: usize,
    console: &mut Console,
    sig: i32,
    owner: bool,
) -> Result<Steps> {
    let name = signals::name(sig);
    if !owner {
        console.line(&format!("stopped by {name} after step {}; rank 0 writes the checkpoint", state.step));
    } else if state.step == 0 {
        console.line(&format!("stopped by {name} before the first step completed: nothing to checkpoint"));
    } else {
        let dir = checkpoint::save(&run.checkpoints_dir(), engine, state, keep_last)?;
        console.line(&format!("stopped by {name} after step {}; checkpoint {}", state.step, dir.display()));
    }
    console.line(&format!("continue with: minimind resume {}", run.root.display()));
    console.finish();
    Ok(Steps::Stopped(sig))
}

/// Export, the final evaluation and the summary.
#[allow(clippy::too_many_arguments)]
fn finish<K: Kernels>(
    run: &RunDir,
    meta: &MetaFile,
    config: &Config,
    data: &Data,
    engine: &mut Engine<K>,
    state: &TrainerState,
    last_loss: Option<f64>,
    console: &mut Console,
    wall: Instant,
) -> Result<()> {
    let (b, t) = (config.train.batch_size, config.data.max_seq_len);
    export(run, engine, &config.data.tokenizer, state.step)?;
    let (eval_ids, eval_targets, _) = crate::eval::first_rows(
        &config.data.path,
        &data.tok,
        t,
        b * FINAL_EVAL_BATCHES,
        config.data.skip_bad_lines,
    )?;
    let eval = crate::eval::mean_loss(engine, &eval_ids, &eval_targets, b, t);
    let final_eval = FinalEval {
        loss: eval.loss,
        tokens: eval.tokens,
        seq_len: t,
        batch_size: b,
        batches: FINAL_EVAL_BATCHES,
    };
    meta.update(|m| m.final_eval = Some(final_eval))?;
    let loss = last_loss.map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
    let root = run.root.display();
    console.line(&format!(
        "done in {} ({} of training in all): {} steps, {} tokens ({} with padding), final loss {loss}, eval loss {:.4} on the first {} rows",
        duration(wall.elapsed().as_secs_f64()),
        duration(state.elapsed_s),
        state.step,
        human(state.tokens_real as f64),
        human(state.tokens_seen as f64),
        eval.loss,
        eval_ids.len() / t
    ));
    console.line(&format!("model exported to {}; next:", run.model_dir().display()));
    console.line(&format!("  minimind generate {root} --prompt \"...\"     sample text"));
    console.line(&format!(
        "  minimind eval --hf-dir {} --data {} --seq-len {t} --batch-size {b}     loss on data",
        run.model_dir().display(),
        config.data.path.display()
    ));
    console.line(&format!(
        "  minimind resume {root} --set train.max_steps={}     train further",
        state.step * 2
    ));
    Ok(())
}

/// The newest checkpoint that reads back intact (checksums first); damaged ones are set aside
/// (renamed `*.damaged`) with a note. Fails when the intact one's model differs from the run's.
fn latest_checkpoint<K: Kernels>(
    run: &RunDir,
    engine: &Engine<K>,
    notes: &mut Vec<String>,
) -> Result<Option<checkpoint::Loaded>> {
    for (_, dir) in checkpoint::list(&run.checkpoints_dir()).into_iter().rev() {
        let ck = match checkpoint::load(&dir, &engine.layout) {
            Ok(ck) => ck,
            Err(e) => {
                // Out of the way, so that the step's next checkpoint is written afresh.
                let aside = dir.with_extension("damaged");
                let kept = match std::fs::rename(&dir, &aside) {
                    Ok(()) => format!(" (kept as {})", aside.display()),
                    Err(_) => {
                        std::fs::remove_dir_all(&dir)
                            .with_context(|| format!("removing the damaged checkpoint {}", dir.display()))?;
                        " (removed)".to_string()
                    }
                };
                notes.push(format!("warning: skipping damaged checkpoint {}: {e:#}{kept}", dir.display()));
                continue;
            }
        };
        let diff = checkpoint::model_diff(&ck.state.model, &engine.config, "checkpoint");
        if !diff.is_empty() {
            bail!(
                "checkpoint {} was written for another model shape; differing keys:\n  {}",
                dir.display(),
                diff.join("\n  ")
            );
        }
        return Ok(Some(ck));
    }
    Ok(None)
}

/// Weights from an exported model folder (config.json + model.safetensors) or a
/// `.safetensors` file.
pub fn load_weights<K: Kernels>(path: &Path, engine: &Engine<K>) -> Result<Vec<f32>> {
    let file = if path.is_dir() {
        let cfg = hf::read_config(&path.join("config.json"))?;
        let diff = checkpoint::model_diff(&cfg, &engine.config, "weights");
        if !diff.is_empty() {
            bail!("{} is another model shape; differing keys:\n  {}", path.display(), diff.join("\n  "));
        }
        path.join("model.safetensors")
    } else {
        path.to_path_buf()
    };
    let bytes = std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
    hf::read_weights(&bytes, &engine.layout).with_context(|| format!("loading {}", file.display()))
}

/// `model/`: config.json, model.safetensors and tokenizer.json in the Hugging Face layout, each
/// written atomically; config.json last, so its presence means the folder is complete.
fn export<K: Kernels>(run: &RunDir, engine: &Engine<K>, tokenizer: &Path, step: usize) -> Result<()> {
    let dir = run.model_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let weights = hf::encode_weights(&engine.layout, &engine.params_host())?;
    crate::run_dir::write_atomic(&dir.join("model.safetensors"), &weights)?;
    signals::crash_point("export", step);
    let tok = std::fs::read(tokenizer).with_context(|| format!("reading {}", tokenizer.display()))?;
    crate::run_dir::write_atomic(&dir.join("tokenizer.json"), &tok)?;
    crate::run_dir::write_atomic(&dir.join("config.json"), hf::config_json(&engine.config).as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_on_a_host_takes_a_gpu_of_its_own() {
        use crate::config::Device;
        // (local rank, ranks on the host, GPUs) -> device
        let table: &[(usize, usize, usize, Option<Device>)] = &[
            (0, 1, 1, Some(Device::Cuda(0))),
            (1, 2, 2, Some(Device::Cuda(1))),
            (3, 4, 8, Some(Device::Cuda(3))),
            (0, 2, 1, None),
            (0, 1, 0, None),
        ];
        for &(rank, size, gpus, want) in table {
            let got = rank_gpu(rank, size, gpus);
            assert_eq!(got.as_ref().ok().copied(), want, "{rank} of {size} on {gpus}: {got:?}");
            if let Err(why) = got {
                assert!(why.contains(&format!("{gpus} GPU(s)")), "{why}");
            }
        }
    }

    #[test]
    fn a_step_splits_evenly_over_the_ranks() {
        // (micro-batches per step over all ranks, ranks) -> each rank's share
        let table: &[(usize, usize, Option<usize>)] = &[
            (1, 1, Some(1)),
            (8, 1, Some(8)),
            (8, 2, Some(4)),
            (8, 8, Some(1)),
            // Every rank must train at least one micro-batch of each step, and the same number.
            (2, 4, None),
            (6, 4, None),
            (3, 2, None),
        ];
        for &(global, world, want) in table {
            let got = local_accumulation(global, world);
            assert_eq!(got.as_ref().ok().copied(), want, "{global} over {world}: {got:?}");
            if let Err(why) = got {
                assert!(why.contains(&format!("divides {global}")), "{why}");
            }
        }
    }
}
