//! The trainer: built once from the run (its data, the engine with its starting state, the
//! split of each step over the ranks, the communicator, the console and the metrics file),
//! then [`Trainer::run`]: step after step until the run's last or a stop every rank agrees
//! on, then the export, the final evaluation and the summary.
//!
//! Data parallel (see `crate::dist`): every rank runs a trainer. A step's micro-batches are
//! the single-process ones, `G` of them; rank r of W trains micro-batches r, r+W, ... and
//! passes over the rest, so every rank's data cursor is the run's global position. Gradients
//! are summed over the ranks before the update, which is then the same on every rank. Rank 0
//! alone writes the run folder (metrics, checkpoints, export); the others log to
//! `rank-<r>.log`. Nothing rank-local draws random numbers: rank 0's initial weights are
//! broadcast, and the data order is the seed's.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::checkpoint::{self, TrainerState};
use super::ranks::{self, Split, agreed_stop};
use super::schedule::lr_at;
use super::start::{self, Data};
use super::{Outcome, Placement, Session, warnings};
use crate::config::{Config, Device, Dtype};
use crate::cost::Cost;
use crate::engine::comm::{self, CommChoice, Communicator};
use crate::engine::{Engine, Kernels, OptimConfig, StepStats, hf};
use crate::metrics::{Console, MetricsWriter, Progress, StepMetrics};
use crate::run_dir::{FinalEval, MetaFile, RunDir, Status};
use crate::signals;
use crate::units::{duration, human};

/// Rows of the final evaluation recorded in meta.json (one micro-batch).
const FINAL_EVAL_BATCHES: usize = 1;

/// What a trainer reads besides what it owns: the run folder and its meta.json, the resolved
/// config, where it trains, the session.
#[derive(Clone, Copy)]
pub struct Ctx<'a> {
    pub run: &'a RunDir,
    pub meta: &'a MetaFile,
    pub config: &'a Config,
    pub placement: &'a Placement,
    pub s: &'a Session,
}

/// One training session of one rank.
pub struct Trainer<'a, K: Kernels> {
    ctx: Ctx<'a>,
    /// Declared before the engine, so dropped before it: a device communicator (NCCL)
    /// finishes what it queued on the engine's buffers before they are freed.
    comm: Box<dyn Communicator<K>>,
    engine: Engine<K>,
    state: TrainerState,
    data: Data,
    split: Split,
    console: Console,
    /// Rank 0's metrics.csv.
    metrics: Option<MetricsWriter>,
    optim: OptimConfig,
    /// The current micro-batch's token ids and targets.
    ids: Vec<u32>,
    targets: Vec<i32>,
    /// Testing aid: the samples of every micro-batch this rank trains.
    trace: Option<std::fs::File>,
    clock: Clock,
    /// The learning rate and the loss of the last step run in this session.
    lr: f64,
    last_loss: Option<f64>,
}

/// Time and progress of a session.
struct Clock {
    /// Since the session began (before the data opened).
    wall: Instant,
    /// Since the first step of this session.
    steps: Instant,
    /// Training time of the run before this session.
    before: f64,
    /// Micro-batches this rank trains in this session, and has trained.
    micro_total: usize,
    micro_done: usize,
    /// When the last metrics row was written, and the tokens then.
    last_log: Instant,
    last_tokens: u64,
}

/// What a finished step calls for.
struct Due {
    eval: bool,
    log: bool,
    save: bool,
    /// A stop every rank agreed on, before the run's last step.
    stop: Option<i32>,
}

impl<'a, K: Kernels> Trainer<'a, K> {
    /// Opens the data, builds the engine with its starting state (shared by every rank), splits
    /// the steps over the ranks, opens the metrics file and the console, prints the header.
    pub fn build(kernels: K, ctx: Ctx<'a>) -> Result<Trainer<'a, K>> {
        let wall = Instant::now();
        let Ctx { run, meta, config, placement, s } = ctx;
        let data = open_data_in_turn(config, s)?;
        let skipped = data.ds.skipped();
        meta.update(|m| {
            m.skipped_lines = skipped.count;
            m.skipped_line_numbers = skipped.first.clone();
        })?;
        let device = kernels.describe();
        let comm = comm::for_world(&kernels, &s.world, s.comm)?;
        let start = start::restore(kernels, (run, meta), config, &data, s)?;
        let (mut engine, mut state, mut notes) = (start.engine, start.state, start.notes);
        let mut comm = comm;
        ranks::share_state(&s.world, &mut *comm, &mut engine, &mut state)?;
        let split = ranks::split(config, data.batches.per_epoch(), &mut state, s.world.size())?;
        notes.extend(split.note.clone());
        notes.extend(record_warnings(ctx, &data, split.total)?);
        record_start(ctx, &state, &split, &device)?;
        let (metrics, metric_notes) = open_metrics(ctx, &state)?;
        notes.extend(metric_notes);
        let console = open_console(ctx, &split, &state)?;
        let (b, t) = (config.train.batch_size, config.data.max_seq_len);
        let mut trainer = Trainer {
            ctx,
            comm,
            engine,
            state,
            data,
            split,
            console,
            metrics,
            optim: super::optim_config(&config.train),
            ids: vec![0; b * t],
            targets: vec![0; b * t],
            trace: open_trace(s)?,
            clock: Clock::new(wall),
            lr: 0.0,
            last_loss: None,
        };
        trainer.header(&device, placement, &notes);
        Ok(trainer)
    }

    /// Trains to the run's last step (or a stop), then exports and evaluates (rank 0).
    pub fn run(mut self) -> Result<Outcome> {
        if let Some(sig) = self.steps()? {
            return Ok(Outcome::Stopped(sig));
        }
        if !self.ctx.s.world.is_owner() {
            // Rank 0 exports and evaluates.
            self.console.finish();
            return Ok(Outcome::Completed);
        }
        if let Some(sig) = self.ctx.s.stop.requested() {
            let run = self.ctx.run.root.display();
            self.console.line(&format!(
                "{}: stopping before the export; the final checkpoint is written",
                signals::name(sig)
            ));
            self.console.line(&format!("continue with: {} resume {run}", crate::metrics::program()));
            return Ok(Outcome::Stopped(sig));
        }
        self.console.finish();
        self.finish()?;
        Ok(Outcome::Completed)
    }

    /// Steps until the run's last, or until a stop every rank agrees on (the signal, after
    /// the stop's checkpoint).
    fn steps(&mut self) -> Result<Option<i32>> {
        self.clock.begin(&self.state, self.split.total, self.split.local);
        self.console.progress(&self.progress(0));
        while self.state.step < self.split.total {
            if let Some(sig) = self.step()? {
                return self.stop(sig).map(Some);
            }
            let due = self.due();
            if !(due.log || due.save || due.stop.is_some()) {
                continue;
            }
            self.observe(&due)?;
            if let Some(sig) = due.stop {
                return self.stop(sig).map(Some);
            }
            if due.save && self.ctx.s.world.is_owner() {
                self.checkpoint()?;
            }
        }
        Ok(None)
    }

    /// One optimiser step: this rank's micro-batches (passing over the other ranks'), the
    /// gradients summed over the ranks, the update. A stop agreed inside the step abandons it
    /// (the data rewinds to where the step began) and returns the signal.
    fn step(&mut self) -> Result<Option<i32>> {
        let world = &self.ctx.s.world;
        let (rank, w, local) = (world.rank(), world.size(), self.split.local);
        let step_start = self.state.cursor;
        let (mut real, mut mine) = (0u64, 0);
        self.engine.begin_step();
        for j in 0..self.split.global {
            if j % w != rank {
                real += self.data.batches.skip(&self.data.ds, &mut self.state.cursor) as u64;
                continue;
            }
            real += self.micro_batch(mine + 1 == local)?;
            mine += 1;
            self.clock.micro_done += 1;
            self.console.progress(&self.progress(mine));
            if mine < local
                && let Some(sig) = agreed_stop(world, self.ctx.s.stop.requested())
            {
                self.state.cursor = step_start;
                return Ok(Some(sig));
            }
        }
        // Rows read from a cache cut short under this run are zeros: never an update from them.
        self.data.ds.intact()?;
        self.update(real);
        Ok(None)
    }

    /// Forward and backward of this rank's next micro-batch; on its last of the step
    /// (`last`) the gradients are summed over the ranks as its backward goes. Returns the
    /// micro-batch's real (unpadded) tokens.
    fn micro_batch(&mut self, last: bool) -> Result<u64> {
        let (data, cursor) = (&mut self.data, &mut self.state.cursor);
        if let Some(f) = &mut self.trace {
            let rows: Vec<String> = data.batches.samples_at(*cursor).iter().map(|r| r.to_string()).collect();
            writeln!(f, "{}: {}", self.state.step + 1, rows.join(" ")).context("writing the sample trace")?;
        }
        let real = data.batches.next(&data.ds, cursor, &mut self.ids, &mut self.targets) as u64;
        let global = self.split.global;
        let reduce: Option<&mut dyn Communicator<K>> = if last { Some(&mut *self.comm) } else { None };
        self.engine.accumulate(&self.ids, &self.targets, 1.0 / global as f32, global, reduce);
        Ok(real)
    }

    /// The update after the step's micro-batches (`real` tokens), and the step counted.
    fn update(&mut self, real: u64) {
        let config = self.ctx.config;
        self.engine.settle(&mut *self.comm);
        self.lr = lr_at(&config.train, self.state.step, self.split.total);
        self.engine.update(self.lr as f32, &self.optim);
        let (b, t) = (config.train.batch_size, config.data.max_seq_len);
        let state = &mut self.state;
        state.step += 1;
        state.tokens_seen += (b * t * self.split.global) as u64;
        state.tokens_real += real;
        state.elapsed_s = self.clock.before + self.clock.steps.elapsed().as_secs_f64();
        self.ctx.meta.set_step(state.step);
        signals::crash_point("panic", state.step);
        signals::crash_point("step", state.step);
    }

    /// What the step just done calls for: validation, a metrics row, a checkpoint, a stop.
    /// The device's numbers are read only when one of them needs them. A collective (the
    /// stop): every rank calls it after every step.
    fn due(&self) -> Due {
        let (s, ck) = (self.ctx.s, &self.ctx.config.checkpoint);
        let (step, total) = (self.state.step, self.split.total);
        let eval = self.data.val.is_some()
            && (ck.eval_interval.is_some_and(|n| step.is_multiple_of(n)) || step == total);
        let log = step.is_multiple_of(ck.log_interval) || step == total || eval;
        let save = step.is_multiple_of(ck.save_interval) || step == total;
        let asked = s.stop.requested().or((s.stop_after == Some(step)).then_some(libc::SIGINT));
        let stop = agreed_stop(&s.world, asked).filter(|_| step < total);
        Due { eval, log, save, stop }
    }

    /// Reads the step's numbers (summed over the ranks): fails on divergence, validates when
    /// due, writes the metrics row when due.
    fn observe(&mut self, due: &Due) -> Result<()> {
        let mut stats = self.engine.step_stats();
        self.engine.kernels.check()?;
        // Each rank's losses cover its own micro-batches (already divided by `global`).
        let mut sums = [stats.lm, stats.aux];
        self.ctx.s.world.comm.sum_f64(&mut sums);
        [stats.lm, stats.aux] = sums;
        let loss = stats.lm + stats.aux;
        let step = self.state.step;
        if stats.skipped {
            let scale = self.engine.scaler.map_or(1.0, |s| s.scale);
            self.console.line(&format!(
                "step {step}: float16 gradients overflowed: update skipped, loss scale now {scale}"
            ));
        }
        // A skipped step's gradient norm is not finite by definition; its loss must still be:
        // the forward does not see the loss scale, so a NaN there is divergence, which the
        // scaler would otherwise skip step after step.
        if !stats.skipped || !loss.is_finite() {
            check_finite(self.ctx.run, loss, stats.grad_norm, step, self.ctx.config.checkpoint.log_interval)?;
        }
        self.last_loss = Some(loss);
        let val_loss = self.validate(due.eval)?;
        if due.log {
            self.log_row(&stats, loss, val_loss)?;
        }
        Ok(())
    }

    /// The validation loss when due (rank 0), the best so far recorded in meta.json.
    fn validate(&mut self, due: bool) -> Result<Option<f64>> {
        let (Some((ids, targets)), true) = (&self.data.val, due && self.ctx.s.world.is_owner()) else {
            return Ok(None);
        };
        let (b, t) = (self.ctx.config.train.batch_size, self.ctx.config.data.max_seq_len);
        let v = crate::eval::mean_loss(&mut self.engine, ids, targets, b, t).loss;
        let step = self.state.step;
        self.ctx.meta.update(|m| {
            if m.best_val_loss.is_none_or(|best| v < best) {
                (m.best_val_loss, m.best_val_step) = (Some(v), Some(step));
            }
        })?;
        Ok(Some(v))
    }

    /// The step's metrics row: to metrics.csv (rank 0) and the console.
    fn log_row(&mut self, stats: &StepStats, loss: f64, val_loss: Option<f64>) -> Result<()> {
        let state = &self.state;
        let dt = self.clock.last_log.elapsed().as_secs_f64().max(1e-9);
        let row = StepMetrics {
            step: state.step,
            epoch: state.cursor.epoch,
            tokens: state.tokens_real,
            tokens_padded: state.tokens_seen,
            loss,
            lm_loss: stats.lm,
            aux_loss: stats.aux,
            lr: self.lr,
            grad_norm: stats.grad_norm,
            val_loss,
            tokens_per_s: (state.tokens_seen - self.clock.last_tokens) as f64 / dt,
            elapsed_s: state.elapsed_s,
        };
        self.console.line(&row.line(self.split.total));
        if let Some(m) = self.metrics.as_mut() {
            m.write(&row)?;
            self.console.log_only(&crate::metrics::log_line(&row));
        }
        (self.clock.last_log, self.clock.last_tokens) = (Instant::now(), state.tokens_seen);
        Ok(())
    }

    /// A checkpoint of the step just done (rank 0); returns its folder.
    fn checkpoint(&self) -> Result<PathBuf> {
        let dir = self.ctx.run.checkpoints_dir();
        checkpoint::save(&dir, &self.engine, &self.state, self.ctx.config.checkpoint.keep_last)
    }

    /// Stops for signal `sig`: a checkpoint of the last complete step (none before the first;
    /// by rank 0 only), and how to continue.
    fn stop(&mut self, sig: i32) -> Result<i32> {
        let (name, step) = (signals::name(sig), self.state.step);
        if !self.ctx.s.world.is_owner() {
            self.console.line(&format!("stopped by {name} after step {step}; rank 0 writes the checkpoint"));
        } else if step == 0 {
            self.console
                .line(&format!("stopped by {name} before the first step completed: nothing to checkpoint"));
        } else {
            let dir = self.checkpoint()?;
            self.console.line(&format!("stopped by {name} after step {step}; checkpoint {}", dir.display()));
        }
        let me = crate::metrics::program();
        self.console.line(&format!("continue with: {me} resume {}", self.ctx.run.root.display()));
        self.console.finish();
        Ok(sig)
    }

    /// The export, the final evaluation (recorded in meta.json) and the summary.
    fn finish(&mut self) -> Result<()> {
        let Ctx { run, meta, config, .. } = self.ctx;
        let (b, t) = (config.train.batch_size, config.data.max_seq_len);
        let step = self.state.step;
        let crash = || signals::crash_point("export", step);
        hf::write_folder(
            &run.model_dir(),
            &self.engine.config,
            &self.engine.params_host(),
            &config.data.tokenizer,
            &crash,
        )?;
        let rows = b * FINAL_EVAL_BATCHES;
        let (ids, targets, _) = crate::eval::first_rows(
            (&config.data.path, &config.data.text_field),
            &self.data.tok,
            t,
            rows,
            config.data.skip_bad_lines,
        )?;
        let eval = crate::eval::mean_loss(&mut self.engine, &ids, &targets, b, t);
        let batches = FINAL_EVAL_BATCHES;
        let final_eval =
            FinalEval { loss: eval.loss, tokens: eval.tokens, seq_len: t, batch_size: b, batches };
        meta.update(|m| m.final_eval = Some(final_eval))?;
        self.summary(eval.loss, ids.len() / t);
        Ok(())
    }

    /// The last lines: what was done, where the model is, what to run next.
    fn summary(&mut self, eval_loss: f64, eval_rows: usize) {
        let (run, config, state) = (self.ctx.run, self.ctx.config, &self.state);
        let (b, t) = (config.train.batch_size, config.data.max_seq_len);
        let loss = self.last_loss.map_or_else(|| "-".to_string(), |l| format!("{l:.4}"));
        let (root, model) = (run.root.display(), run.model_dir());
        let me = crate::metrics::program();
        let lines = [
            format!(
                "done in {} ({} of training in all): {} steps, {} tokens ({} with padding), final loss {loss}, eval loss {eval_loss:.4} on the first {eval_rows} rows",
                duration(self.clock.wall.elapsed().as_secs_f64()),
                duration(state.elapsed_s),
                state.step,
                human(state.tokens_real as f64),
                human(state.tokens_seen as f64),
            ),
            format!("model exported to {}; next:", model.display()),
            format!("  {me} generate {root} --prompt \"...\"     sample text"),
            format!(
                "  {me} eval --hf-dir {} --data {} --seq-len {t} --batch-size {b}     loss on data",
                model.display(),
                config.data.path.display()
            ),
            format!("  {me} resume {root} --set train.max_steps={}     train further", state.step * 2),
        ];
        for line in lines {
            self.console.line(&line);
        }
    }

    /// Where the session stands after `mine` micro-batches of the current step.
    fn progress(&self, mine: usize) -> Progress {
        let c = &self.clock;
        let secs = c.steps.elapsed().as_secs_f64();
        let eta_s = if c.micro_done == 0 {
            f64::NAN
        } else {
            secs / c.micro_done as f64 * (c.micro_total - c.micro_done) as f64
        };
        let (step, total, accumulation) = (self.state.step, self.split.total, self.split.local);
        Progress { step, total, micro: mine, accumulation, elapsed_s: c.before + secs, eta_s }
    }

    /// The run's first lines: notes, shape and data, cost (on a GPU the model knows, its
    /// predicted step), the ranks.
    fn header(&mut self, device: &str, placement: &Placement, notes: &[String]) {
        for note in &self.data.ds.notes {
            self.console.log_only(note);
        }
        for note in placement.all_notes().chain(notes) {
            self.console.line(note);
        }
        let panels = crate::cost::keeps_panels(placement.device, placement.dtype);
        let lines = header_lines(self.ctx, &self.data, &self.split, (device, placement.dtype), panels);
        for line in lines {
            self.console.line(&line);
        }
        let s = self.ctx.s;
        if s.world.size() > 1 || s.comm != CommChoice::Auto {
            let w = &s.world;
            let hosts = w.info(1).hosts.len();
            self.console.line(&format!(
                "data parallel: rank {} of {} ({}), {} rank(s) on {} host(s); gradients: {}",
                w.rank(),
                w.size(),
                w.launcher,
                w.local_size,
                hosts,
                self.comm.describe()
            ));
        }
    }
}

impl Clock {
    fn new(wall: Instant) -> Clock {
        let now = Instant::now();
        Clock { wall, steps: now, before: 0.0, micro_total: 0, micro_done: 0, last_log: now, last_tokens: 0 }
    }

    /// The steps of this session begin, from `state`, toward step `total` of `local`
    /// micro-batches each.
    fn begin(&mut self, state: &TrainerState, total: usize, local: usize) {
        let now = Instant::now();
        (self.steps, self.last_log) = (now, now);
        (self.before, self.last_tokens) = (state.elapsed_s, state.tokens_seen);
        self.micro_total = total.saturating_sub(state.step) * local;
        self.micro_done = 0;
    }
}

/// The run's data, rank 0 first: the others then read the token cache it built.
fn open_data_in_turn(config: &Config, s: &Session) -> Result<Data> {
    let owner = s.world.is_owner();
    if !owner {
        s.world.comm.barrier();
    }
    let data = start::open_data(config, s)?;
    if owner {
        s.world.comm.barrier();
    }
    Ok(data)
}

/// Warnings about values that are legal but almost certainly wrong (and the resume's own),
/// recorded in meta.json once each; returns them as header lines.
fn record_warnings(ctx: Ctx<'_>, data: &Data, total_steps: usize) -> Result<Vec<String>> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let facts = warnings::Facts { cores, total_steps, tokens: data.ds.tokens() };
    let mut found = warnings::warnings(&ctx.config.train, &facts);
    if let Some(r) = &ctx.s.resume {
        found.extend(r.warnings.iter().cloned());
    }
    if !found.is_empty() {
        ctx.meta.update(|m| {
            for w in &found {
                if !m.warnings.contains(w) {
                    m.warnings.push(w.clone());
                }
            }
        })?;
    }
    Ok(found.into_iter().map(|w| format!("warning: {w}")).collect())
}

/// meta.json as the steps begin: the step, the GPU, the ranks, running; a resume's changed
/// config.toml (rank 0).
fn record_start(ctx: Ctx<'_>, state: &TrainerState, split: &Split, device: &str) -> Result<()> {
    let Ctx { run, meta, config, placement, s } = ctx;
    meta.set_step(state.step);
    if matches!(placement.device, Device::Cuda(_)) {
        meta.update(|m| m.gpu = Some(device.to_string()))?;
    }
    let info = s.world.info(config.train.batch_size * split.global);
    meta.update(|m| {
        m.status = Status::Running;
        (m.ended_at, m.error, m.reason) = (None, None, None);
        m.world = Some(info);
    })?;
    if s.world.is_owner() && s.resume.as_ref().is_some_and(|r| !r.overrides.is_empty()) {
        run.write_config(config)?;
    }
    Ok(())
}

/// Rank 0's metrics.csv and TensorBoard events (rows after a resume's step dropped), with notes.
fn open_metrics(ctx: Ctx<'_>, state: &TrainerState) -> Result<(Option<MetricsWriter>, Vec<String>)> {
    if !ctx.s.world.is_owner() {
        return Ok((None, Vec::new()));
    }
    let resume = ctx.s.resume.as_ref().map(|_| state.step);
    let log = ctx.run.log_path();
    let (mut w, mut notes) =
        MetricsWriter::open(&ctx.run.metrics_path(), resume.map(|step| (step, log.as_path())))?;
    if ctx.config.metrics.tensorboard {
        notes.extend(w.with_events(&ctx.run.root, resume, &crate::config::render(ctx.config, None))?);
    }
    Ok((Some(w), notes))
}

/// Rank 0's console (train.log and the terminal); the other ranks' `rank-<r>.log`.
fn open_console(ctx: Ctx<'_>, split: &Split, state: &TrainerState) -> Result<Console> {
    let (run, s) = (ctx.run, ctx.s);
    if s.world.is_owner() {
        Console::new(&run.log_path(), split.total as u64, state.step as u64, s.quiet, s.heartbeat)
    } else {
        Console::log_file(&run.root.join(format!("rank-{}.log", s.world.rank())))
    }
}

/// Testing aid: the file this rank appends its micro-batches' samples to.
fn open_trace(s: &Session) -> Result<Option<std::fs::File>> {
    let Some(path) = &s.trace else { return Ok(None) };
    let path = PathBuf::from(format!("{}.{}", path.display(), s.world.rank()));
    let f = std::fs::OpenOptions::new().create(true).append(true).open(&path);
    Ok(Some(f.with_context(|| format!("opening {}", path.display()))?))
}

/// The header's lines: the run's shape and data, its cost; `on` is the device (as the backend
/// names it) and the dtype: on a GPU the model knows, the step time is its prediction, else
/// this machine's matrix speed; `panels`: the run keeps the CPU's packed bf16 weights.
fn header_lines(ctx: Ctx<'_>, data: &Data, split: &Split, on: (&str, Dtype), panels: bool) -> Vec<String> {
    let (run, config) = (ctx.run, ctx.config);
    let (b, t, accum) = (config.train.batch_size, config.data.max_seq_len, split.global);
    let ranks = match split.global / split.local {
        1 => String::new(),
        w => format!(" = {} per rank x {w} ranks", split.local),
    };
    let held = match data.ds.samples() - data.batches.rows() {
        0 => String::new(),
        held => format!(", {held} held out for validation"),
    };
    let skipped = data.ds.skipped().describe().map_or(String::new(), |s| format!("; {s}"));
    let mut lines = vec![
        format!(
            "{}: {} steps of {} tokens ({b} x {t}, accumulation {accum}{ranks}); {} samples{held}, {} micro-batches per epoch",
            run.root.display(),
            split.total,
            human((b * t * accum) as f64),
            data.ds.samples(),
            data.batches.per_epoch()
        ),
        format!("data: {}: {} tokens{skipped}", config.data.path.display(), human(data.ds.tokens() as f64)),
    ];
    let gpu = crate::roofline::find(on.0).ok().filter(|_| config.train.device != Device::Cpu);
    let speed =
        if gpu.is_some() { None } else { crate::cost::machine_speed(config.train.threads, on.1).ok() };
    lines.push(format!("cost: {}", Cost::of(config, Some(split.total), speed, panels).describe()));
    // The run's own dtype on its GPU (a resolved placement may differ from the config's).
    let mut placed = config.clone();
    placed.train.dtype = on.1;
    if let Some(gpu) = gpu
        && let Ok(p) = crate::roofline::predict_run(&placed, gpu)
    {
        lines.push(p.describe(Some(split.total)));
    }
    lines
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
