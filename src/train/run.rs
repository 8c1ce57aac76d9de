//! The training loop: micro-batches with accumulation, schedule, clipping, AdamW, metrics,
//! checkpoints, resume, signals, export.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use super::checkpoint::{self, TrainerState};
use super::schedule::lr_at;
use crate::config::Config;
use crate::data::{Batches, Cursor, Dataset};
use crate::engine::cpu::Cpu;
use crate::engine::{Engine, OptimConfig, hf};
use crate::metrics::{Console, MetricsWriter, StepMetrics};
use crate::run_dir::{FinalEval, RunDir, Status};

/// How a training session ended (errors are returned as errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Stopped by a signal (its number) after writing a checkpoint.
    Stopped(i32),
}

/// Knobs of one session that are not part of the experiment.
pub struct Session {
    /// Continue from the run's last complete checkpoint.
    pub resume: bool,
    /// Set to a signal number to stop after the current optimiser step.
    pub stop: Arc<AtomicUsize>,
    /// Testing aid: behave as if SIGINT arrived right after this step.
    pub stop_after: Option<usize>,
    /// No progress bars (lines only).
    pub quiet: bool,
}

/// Rows of the final evaluation recorded in meta.json (one micro-batch).
const FINAL_EVAL_BATCHES: usize = 1;

/// Trains the run in `run` (its config.toml) until done or stopped; keeps meta.json's
/// status current.
pub fn train(run: &RunDir, config: &Config, s: &Session) -> Result<Outcome> {
    super::require_cpu(&config.train)?;
    let result = super::thread_pool(config.train.threads)?.install(|| train_inner(run, config, s));
    let mut meta = run.read_meta()?;
    meta.ended_at = Some(chrono::Local::now().to_rfc3339());
    match &result {
        Ok(Outcome::Completed) => meta.status = Status::Completed,
        Ok(Outcome::Stopped(_)) => meta.status = Status::Stopped,
        Err(e) => {
            meta.status = Status::Failed;
            meta.error = Some(format!("{e:#}"));
        }
    }
    run.write_meta(&meta)?;
    result
}

fn train_inner(run: &RunDir, config: &Config, s: &Session) -> Result<Outcome> {
    let (b, t) = (config.train.batch_size, config.data.max_seq_len);
    let accum = config.train.accumulation_steps;
    let cache_root = config.checkpoint.save_dir.join(".cache");
    let (ds, tok) = Dataset::open(&config.data, config.model.vocab_size, &cache_root, s.quiet)?;
    let mut batches = Batches::new(ds.samples(), b, config.seed)?;
    let steps_per_epoch = batches.per_epoch() / accum;
    let total = match config.train.max_steps {
        Some(n) => n,
        None => config.train.epochs * steps_per_epoch,
    };
    if total == 0 {
        bail!(
            "an epoch has {} micro-batch(es), fewer than train.accumulation_steps = {accum}: nothing to train\n  hint: lower train.accumulation_steps or set train.max_steps",
            batches.per_epoch()
        );
    }
    let mut meta = run.read_meta()?;
    meta.skipped_lines = ds.skipped_lines();
    run.write_meta(&meta)?;

    let mut engine = Engine::new(Cpu::new(), config.model.clone(), b, t);
    let mut state = TrainerState {
        step: 0,
        cursor: Cursor::default(),
        tokens_seen: 0,
        elapsed_s: 0.0,
        model: config.model.clone(),
    };
    let mut notes = Vec::new();
    let checkpoint = if s.resume { latest_checkpoint(run, &engine, &mut notes)? } else { None };
    match checkpoint {
        Some(ck) => {
            engine.set_params(&ck.params);
            engine.set_moments(&ck.exp_avg, &ck.exp_avg_sq);
            engine.step = ck.adam_step;
            state = ck.state;
            notes.push(format!("resuming from {} (step {})", ck.dir.display(), state.step));
        }
        None => match &config.checkpoint.from_weight {
            Some(w) => {
                engine.set_params(&load_weights(w, &engine)?);
                notes.push(format!("starting from weights {}", w.display()));
            }
            None => engine.init_weights(config.seed),
        },
    }
    let mut metrics = MetricsWriter::open(&run.metrics_path(), Some(state.step).filter(|_| s.resume))?;
    let mut console = Console::new(&run.log_path(), total as u64, state.step as u64, s.quiet)?;
    for n in notes {
        console.line(&n);
    }
    console.line(&format!(
        "{}: {} parameters, {} steps of {} tokens, {} samples ({} micro-batches per epoch)",
        run.root.display(),
        config.derived.parameters,
        total,
        b * t * accum,
        ds.samples(),
        batches.per_epoch()
    ));

    let optim = OptimConfig::from_train(&config.train);
    let (mut ids, mut targets) = (vec![0u32; b * t], vec![0i32; b * t]);
    let session_start = Instant::now();
    let elapsed_before = state.elapsed_s;
    let (mut last_log, mut last_tokens) = (Instant::now(), state.tokens_seen);
    while state.step < total {
        engine.zero_grads();
        let (mut lm, mut aux) = (0.0, 0.0);
        for _ in 0..accum {
            batches.next(&ds, &mut state.cursor, &mut ids, &mut targets);
            let l = engine.forward_backward(&ids, &targets, 1.0 / accum as f32);
            lm += l.lm / accum as f64;
            aux += l.aux / accum as f64;
        }
        let loss = lm + aux;
        if !loss.is_finite() {
            let last = checkpoint::list(&run.checkpoints_dir()).pop();
            bail!(
                "the loss became {loss} at step {}; training stopped{}\n  hint: lower train.learning_rate or check the data",
                state.step + 1,
                last.map_or(String::new(), |(_, p)| format!(" (last good checkpoint: {})", p.display()))
            );
        }
        let lr = lr_at(&config.train, state.step, total);
        let grad_norm = engine.optimizer_step(lr as f32, &optim);
        state.step += 1;
        state.tokens_seen += (b * t * accum) as u64;
        state.elapsed_s = elapsed_before + session_start.elapsed().as_secs_f64();

        let ck = &config.checkpoint;
        if state.step.is_multiple_of(ck.log_interval) || state.step == total {
            let dt = last_log.elapsed().as_secs_f64().max(1e-9);
            let row = StepMetrics {
                step: state.step,
                epoch: state.cursor.epoch,
                tokens: state.tokens_seen,
                loss,
                lm_loss: lm,
                aux_loss: aux,
                lr,
                grad_norm,
                tokens_per_s: (state.tokens_seen - last_tokens) as f64 / dt,
                elapsed_s: state.elapsed_s,
            };
            metrics.write(&row)?;
            console.line(&row.line(total));
            (last_log, last_tokens) = (Instant::now(), state.tokens_seen);
        }
        console.progress(state.step as u64, format!("loss {loss:.4}"));

        let signal = match s.stop.load(Ordering::SeqCst) {
            0 if s.stop_after == Some(state.step) => signal_hook::consts::SIGINT as usize,
            sig => sig,
        };
        if signal != 0 && state.step < total {
            let dir = checkpoint::save(&run.checkpoints_dir(), &engine, &state, ck.keep_last)?;
            console.line(&format!(
                "stopped by signal {signal} after step {}; checkpoint {}",
                state.step,
                dir.display()
            ));
            console.line(&format!("continue with: minimind resume {}", run.root.display()));
            console.finish();
            return Ok(Outcome::Stopped(signal as i32));
        }
        if state.step.is_multiple_of(ck.save_interval) || state.step == total {
            checkpoint::save(&run.checkpoints_dir(), &engine, &state, ck.keep_last)?;
        }
    }
    console.finish();
    export(run, &engine, &config.data.tokenizer)?;
    let (eval_ids, eval_targets) =
        crate::eval::first_rows(&config.data.path, &tok, t, b * FINAL_EVAL_BATCHES)?;
    let eval = crate::eval::mean_loss(&mut engine, &eval_ids, &eval_targets, b, t);
    let mut meta = run.read_meta()?;
    meta.final_eval = Some(FinalEval {
        loss: eval.loss,
        tokens: eval.tokens,
        seq_len: t,
        batch_size: b,
        batches: FINAL_EVAL_BATCHES,
    });
    run.write_meta(&meta)?;
    console.line(&format!(
        "done: {} steps; model exported to {} (eval loss {:.4} on the first {} rows)",
        state.step,
        run.model_dir().display(),
        eval.loss,
        eval_ids.len() / t
    ));
    Ok(Outcome::Completed)
}

/// The newest checkpoint that reads back intact; damaged ones are skipped with a note.
/// Fails when its model shape differs from the run's config.
fn latest_checkpoint(
    run: &RunDir,
    engine: &Engine<Cpu>,
    notes: &mut Vec<String>,
) -> Result<Option<checkpoint::Loaded>> {
    for (_, dir) in checkpoint::list(&run.checkpoints_dir()).into_iter().rev() {
        let state: Option<TrainerState> =
            std::fs::read(dir.join("state.json")).ok().and_then(|b| serde_json::from_slice(&b).ok());
        if let Some(st) = &state {
            let diff = checkpoint::model_diff(&st.model, &engine.config, "checkpoint");
            if !diff.is_empty() {
                bail!(
                    "checkpoint {} was written for another model shape; differing keys:\n  {}",
                    dir.display(),
                    diff.join("\n  ")
                );
            }
        }
        match checkpoint::load(&dir, &engine.layout) {
            Ok(ck) => return Ok(Some(ck)),
            Err(e) => notes.push(format!("warning: skipping damaged checkpoint {}: {e:#}", dir.display())),
        }
    }
    Ok(None)
}

/// Weights from an exported model folder (config.json + model.safetensors) or a
/// `.safetensors` file.
pub fn load_weights(path: &Path, engine: &Engine<Cpu>) -> Result<Vec<f32>> {
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

/// `model/`: config.json, model.safetensors and tokenizer.json in the Hugging Face layout.
fn export(run: &RunDir, engine: &Engine<Cpu>, tokenizer: &Path) -> Result<()> {
    let dir = run.model_dir();
    std::fs::create_dir_all(&dir)?;
    let weights = hf::encode_weights(&engine.layout, &engine.params_host())?;
    crate::run_dir::write_atomic(&dir.join("model.safetensors"), &weights)?;
    crate::run_dir::write_atomic(&dir.join("config.json"), hf::config_json(&engine.config).as_bytes())?;
    std::fs::copy(tokenizer, dir.join("tokenizer.json"))
        .with_context(|| format!("copying {}", tokenizer.display()))?;
    Ok(())
}
