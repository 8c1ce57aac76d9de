//! Where a session starts: the run's data opened (rows, batches, validation rows), and the
//! engine with its starting state: the newest intact checkpoint when resuming (the data
//! checked against the checkpoint's fingerprints), else `from_weight` or a fresh init.

use anyhow::{Result, bail};

use super::Session;
use super::checkpoint::{self, TrainerState};
use super::edits;
use super::session::Refused;
use crate::config::Config;
use crate::data::{Batches, Cursor, Dataset, OpenOptions, Tok, hold_out};
use crate::engine::{Engine, Kernels, hf};
use crate::run_dir::{MetaFile, Override, ResumeRecord, RunDir};
use crate::units::human;

/// The run's data, opened: rows, batches and the validation rows.
pub struct Data {
    pub ds: Dataset,
    pub tok: Tok,
    pub batches: Batches,
    /// Validation rows `(ids, targets)`, `rows x T` each, encoded as `minimind eval` does.
    pub val: Option<(Vec<u32>, Vec<i32>)>,
}

/// Opens the run's data (tokenising it into the cache on first use).
pub fn open_data(config: &Config, s: &Session) -> Result<Data> {
    let b = config.train.batch_size;
    let cache_root = config.checkpoint.save_dir.join(".cache");
    let opts = OpenOptions {
        cache_root: &cache_root,
        quiet: s.quiet,
        heartbeat: s.heartbeat,
        stop: &s.stop,
        stop_after_shards: None,
    };
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
            let span = r * t..(r + 1) * t;
            ds.fill(row as usize, &mut ids[span.clone()], &mut targets[span], &mut scratch);
        }
        Some((ids, targets))
    } else if let Some(path) = &config.data.val_path {
        let (ids, targets, _) = crate::eval::first_rows(
            (path, &config.data.text_field),
            &tok,
            t,
            rows,
            config.data.skip_bad_lines,
        )?;
        Some((ids, targets))
    } else {
        None
    };
    Ok(Data { ds, tok, batches, val })
}

/// Where training starts: the engine with its weights (and moments, when resuming), the
/// trainer's state, and the notes for the run header.
pub struct Start<K: Kernels> {
    pub engine: Engine<K>,
    pub state: TrainerState,
    pub notes: Vec<String>,
}

/// The engine with the run's starting state; a resume is recorded in meta.json once its
/// checkpoint and data are accepted. Rank 0 restores; the other ranks receive its state
/// (`ranks::share_state`).
pub fn restore<K: Kernels>(
    kernels: K,
    (run, meta): (&RunDir, &MetaFile),
    config: &Config,
    data: &Data,
    s: &Session,
) -> Result<Start<K>> {
    fits(&kernels, config)?;
    let (b, t) = (config.train.batch_size, config.data.max_seq_len);
    let engine = Engine::new(kernels, config.model.clone(), b, t)?;
    // A device that refused an allocation (more than the estimate foresaw) says so now.
    engine.kernels.check()?;
    let mut start = Start { state: fresh_state(config, data), engine, notes: Vec::new() };
    let mut data_changes = Vec::new();
    let owner = s.world.is_owner();
    let checkpoint = match &s.resume {
        Some(_) if owner => newest(run, config, data, &mut start.notes)?,
        _ => None,
    };
    let mut overrides = s.resume.as_ref().map(|r| r.overrides.clone()).unwrap_or_default();
    match checkpoint {
        Some(ck) => {
            overrides.extend(hand_edits(&ck, config, &overrides, &mut start.notes));
            data_changes = from_checkpoint(&mut start, ck, (run, config), data, s)?;
        }
        None if !owner => {}
        None => from_scratch(&mut start, config, s.resume.is_some())?,
    }
    if s.resume.is_some() {
        let record = ResumeRecord {
            at: chrono::Local::now().to_rfc3339(),
            from_step: start.state.step,
            overrides,
            data_changes,
        };
        meta.update(|m| m.resumes.push(record))?;
    }
    Ok(start)
}

/// The run's resolved config as a TOML table (what checkpoints record).
fn config_table(config: &Config) -> toml::Table {
    toml::Table::try_from(config).expect("the resolved config is TOML-serialisable")
}

/// The run's newest checkpoint that is intact for this model shape, with its data cursor
/// where its step says (damaged or misplaced newer ones set aside, with notes). Refused, never
/// set aside: a checkpoint of another shape, or config.toml edited since it in a key that
/// changes the model or the order of the data.
fn newest(
    run: &RunDir,
    config: &Config,
    data: &Data,
    notes: &mut Vec<String>,
) -> Result<Option<checkpoint::Loaded>> {
    let now = data.ds.fingerprint();
    let table = config_table(config);
    let check = |ck: &checkpoint::Loaded| -> Result<Option<String>> {
        if let Some(then) = ck.state.config.as_deref().and_then(|t| toml::from_str::<toml::Table>(t).ok()) {
            let (_, refused) = edits::config_edits(&then, &table);
            if !refused.is_empty() {
                let keys: Vec<String> =
                    refused.iter().map(|e| format!("{} ({} then, {} now)", e.key, e.then, e.now)).collect();
                return Err(Refused(format!(
                    "cannot resume {}: config.toml differs from the config {} was trained with, in keys that change the model or the order of the data:\n  {}\n  hint: restore them in config.toml, or start a new run from these weights with checkpoint.from_weight = \"{}\"",
                    run.root.display(),
                    ck.dir.display(),
                    keys.join("\n  "),
                    ck.dir.join("model.safetensors").display()
                ))
                .into());
            }
        }
        // On other data (a resume allowed to change it) the cursor has nothing to be checked against.
        if ck.state.data.as_ref() != Some(&now) {
            return Ok(None);
        }
        let per_step = ck.state.global_accumulation.unwrap_or(config.train.accumulation_steps);
        Ok(checkpoint::cursor_problem(&ck.state, data.batches.per_epoch(), per_step))
    };
    let (ck, damaged) = checkpoint::newest_intact(
        &run.checkpoints_dir(),
        &config.model,
        checkpoint::Damaged::SetAside,
        &check,
    )
    .map_err(|e| match e.downcast::<checkpoint::OtherShape>() {
        Ok(shape) => Refused(format!("cannot resume {}: {shape}", run.root.display())).into(),
        Err(e) => e,
    })?;
    notes.extend(damaged);
    Ok(ck)
}

/// Keys a resume may change that differ between config.toml (its `--set` values aside, already
/// in `sets`) and the config checkpoint `ck` was trained with: hand edits, recorded in
/// meta.json as `--set` values are, and named in the run header.
fn hand_edits(
    ck: &checkpoint::Loaded,
    config: &Config,
    sets: &[Override],
    notes: &mut Vec<String>,
) -> Vec<Override> {
    let Some(then) = ck.state.config.as_deref().and_then(|t| toml::from_str::<toml::Table>(t).ok()) else {
        return Vec::new();
    };
    let (resumable, _) = edits::config_edits(&then, &config_table(config));
    let mut out = Vec::new();
    for e in resumable.into_iter().filter(|e| !sets.iter().any(|o| o.key == e.key)) {
        notes.push(format!(
            "config.toml was edited since {}: {} = {} (was {})",
            ck.dir.display(),
            e.key,
            e.now,
            e.then
        ));
        out.push(Override {
            key: e.key,
            value: e.now,
            source: format!("config.toml, edited by hand (was {})", e.then),
        });
    }
    out
}

/// Fails before anything is allocated when the device has too little free memory for the
/// least the engine trains with.
fn fits<K: Kernels>(kernels: &K, config: &Config) -> Result<()> {
    let Some(free) = kernels.free_memory() else { return Ok(()) };
    let (b, t) = (config.train.batch_size, config.data.max_seq_len);
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
    Ok(())
}

/// The state of a run at step 0, on `data`.
fn fresh_state(config: &Config, data: &Data) -> TrainerState {
    TrainerState {
        step: 0,
        cursor: Cursor::default(),
        tokens_seen: 0,
        tokens_real: 0,
        elapsed_s: 0.0,
        model: config.model.clone(),
        data: Some(data.ds.fingerprint()),
        loss_scale: None,
        global_accumulation: None,
        world_size: None,
        config: Some(config_text(config)),
        data_changed_at: None,
    }
}

fn config_text(config: &Config) -> String {
    toml::to_string(config).expect("the resolved config is TOML-serialisable")
}

/// Continues from checkpoint `ck` when the data it trained on is the same (or the resume
/// allows the change); returns the changes allowed.
fn from_checkpoint<K: Kernels>(
    start: &mut Start<K>,
    ck: checkpoint::Loaded,
    (run, config): (&RunDir, &Config),
    data: &Data,
    s: &Session,
) -> Result<Vec<String>> {
    let now = data.ds.fingerprint();
    let mut changes = Vec::new();
    match &ck.state.data {
        Some(then) => changes = now.changes_since(then, &config.data.path, &config.data.tokenizer),
        None => start.notes.push(format!(
            "note: {} predates data fingerprints; the data cannot be checked against it",
            ck.dir.display()
        )),
    }
    let allowed = s.resume.as_ref().is_some_and(|r| r.allow_data_change);
    if !changes.is_empty() && !allowed {
        return Err(Refused(format!(
            "cannot resume {}: what it trains on changed since {}:\n  {}\n  hint: resume anyway with --allow-data-change (recorded in meta.json), or start a new run",
            run.root.display(),
            ck.dir.display(),
            changes.join("\n  ")
        ))
        .into());
    }
    for change in &changes {
        start.notes.push(format!("warning: {change} (allowed by --allow-data-change)"));
    }
    let engine = &mut start.engine;
    engine.set_params(&ck.params);
    engine.set_moments(&ck.exp_avg, &ck.exp_avg_sq);
    engine.step = ck.adam_step;
    if engine.scaler.is_some() {
        engine.scaler = ck.state.loss_scale.or(engine.scaler);
    }
    // Checkpoints from before data parallel were written by one process.
    let global = ck.state.global_accumulation.or(Some(config.train.accumulation_steps));
    let config = Some(config_text(config));
    let data_changed_at = if changes.is_empty() { ck.state.data_changed_at } else { Some(ck.state.step) };
    start.state =
        TrainerState { data: Some(now), global_accumulation: global, config, data_changed_at, ..ck.state };
    start.notes.push(format!("resuming from {} (step {})", ck.dir.display(), start.state.step));
    Ok(changes)
}

/// Step 0: `from_weight`'s weights, or a fresh init from the seed.
fn from_scratch<K: Kernels>(start: &mut Start<K>, config: &Config, resuming: bool) -> Result<()> {
    if resuming {
        start.notes.push("no complete checkpoint yet: starting from step 0".into());
    }
    match &config.checkpoint.from_weight {
        Some(w) => {
            let params = hf::load_weights(w, &start.engine.config, &start.engine.layout)?;
            start.engine.set_params(&params);
            start.notes.push(format!("starting from weights {}", w.display()));
        }
        None => start.engine.init_weights(config.seed),
    }
    Ok(())
}
