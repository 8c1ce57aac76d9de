//! Typed step metrics -> `metrics.csv`, and the console (progress bar + `train.log`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// One row of metrics.csv. `tokens_per_s` and `elapsed_s` are wall-clock; every other column
/// is a deterministic function of the config (bit-identical across an exact resume).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimiser steps done.
    pub step: usize,
    /// 0-based epoch of the step's last micro-batch.
    pub epoch: usize,
    /// Tokens processed (rows x T, pad included).
    pub tokens: u64,
    /// lm_loss + aux_loss.
    pub loss: f64,
    pub lm_loss: f64,
    pub aux_loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

/// Appends rows to metrics.csv; on resume, first drops rows past the checkpoint so no step
/// is ever listed twice.
pub struct MetricsWriter {
    file: File,
}

impl MetricsWriter {
    pub fn open(path: &Path, resume_step: Option<usize>) -> Result<MetricsWriter> {
        if let Some(step) = resume_step
            && path.exists()
        {
            let kept: Vec<StepMetrics> = read(path)?.into_iter().filter(|r| r.step <= step).collect();
            let mut w = csv::Writer::from_writer(Vec::new());
            for r in &kept {
                w.serialize(r)?;
            }
            if kept.is_empty() {
                fs::remove_file(path)?;
            } else {
                crate::run_dir::write_atomic(path, &w.into_inner().map_err(|e| e.into_error())?)?;
            }
        }
        let new = !path.exists();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        if new {
            let mut w = csv::Writer::from_writer(Vec::new());
            w.write_record(HEADER)?;
            file.write_all(&w.into_inner().map_err(|e| e.into_error())?)?;
        }
        Ok(MetricsWriter { file })
    }

    pub fn write(&mut self, row: &StepMetrics) -> Result<()> {
        let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
        w.serialize(row)?;
        self.file.write_all(&w.into_inner().map_err(|e| e.into_error())?)?;
        self.file.flush()?;
        Ok(())
    }
}

const HEADER: [&str; 10] = [
    "step",
    "epoch",
    "tokens",
    "loss",
    "lm_loss",
    "aux_loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "elapsed_s",
];

pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let mut r = csv::Reader::from_path(path).with_context(|| format!("reading {}", path.display()))?;
    r.deserialize().collect::<Result<_, _>>().with_context(|| format!("parsing {}", path.display()))
}

/// What the user sees: a progress bar with ETA on a terminal, plain lines otherwise; every
/// line also goes to train.log.
pub struct Console {
    bar: indicatif::ProgressBar,
    log: Option<File>,
    log_path: PathBuf,
}

impl Console {
    pub fn new(log_path: &Path, total_steps: u64, done: u64, quiet: bool) -> Result<Console> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let bar =
            if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_steps) };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        bar.set_position(done);
        Ok(Console { bar, log: Some(log), log_path: log_path.to_path_buf() })
    }

    /// Prints a line (above the bar) and appends it to train.log.
    pub fn line(&mut self, text: &str) {
        if self.bar.is_hidden() {
            println!("{text}");
        } else {
            self.bar.println(text);
        }
        if let Some(f) = &mut self.log
            && writeln!(f, "{text}").is_err()
        {
            eprintln!(
                "warning: cannot write {}; the console is not logged any more",
                self.log_path.display()
            );
            self.log = None;
        }
    }

    pub fn progress(&self, step: u64, msg: String) {
        self.bar.set_position(step);
        self.bar.set_message(msg);
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl StepMetrics {
    /// The console form of a row.
    pub fn line(&self, total: usize) -> String {
        format!(
            "step {}/{} epoch {} loss {:.4} (lm {:.4} aux {:.4}) lr {:.3e} grad_norm {:.3} {:.0} tok/s",
            self.step,
            total,
            self.epoch,
            self.loss,
            self.lm_loss,
            self.aux_loss,
            self.lr,
            self.grad_norm,
            self.tokens_per_s
        )
    }
}
