//! Run folders: `runs/<YYYYmmdd-HHMMSS>-<name>[-<tag>]/`. This module owns every path and file
//! name inside them.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use chrono::{DateTime, Local};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Layered};
use crate::files::{lock_file, lock_holder, write_atomic};

/// The folder name of a run: pure, so it can be tested with a table.
pub fn folder_name(start: &DateTime<Local>, name: &str, tag: Option<&str>) -> String {
    let stamp = start.format("%Y%m%d-%H%M%S");
    match tag {
        Some(t) => format!("{stamp}-{name}-{t}"),
        None => format!("{stamp}-{name}"),
    }
}

/// The n-th candidate when a name is taken: `x`, `x-2`, `x-3`, ...
fn candidate(base: &str, n: usize) -> String {
    if n <= 1 { base.to_string() } else { format!("{base}-{n}") }
}

/// A run's status: what meta.json records, what a sweep's index.csv and `ls` show.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// A sweep point that has not started.
    Queued,
    Running,
    Completed,
    Failed,
    Stopped,
    /// A sweep point whose folder was deleted (index.csv only; never in a meta.json).
    Missing,
    /// meta.json says running, but no process holds the run's lock: it died without recording
    /// its end (kill -9, a crash, a lost node); `resume` continues it. Readers only.
    Died,
    /// meta.json cannot be read. Readers only; `resume` rebuilds it.
    Damaged,
}

impl Status {
    pub fn name(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Stopped => "stopped",
            Status::Missing => "missing",
            Status::Died => "died",
            Status::Damaged => "damaged",
        }
    }
}

impl std::fmt::Display for Status {
    /// The name, padded as a table column asks (`{:<10}`).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.name())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Override {
    pub key: String,
    pub value: String,
    pub source: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct GitInfo {
    pub commit: String,
    pub dirty: bool,
}

/// A setting as asked for and as the run actually uses it (`auto` resolved, a dtype the
/// device cannot train in replaced).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Choice {
    pub requested: String,
    pub effective: String,
}

/// One `minimind resume` (or auto-resume) of a run.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ResumeRecord {
    pub at: String,
    /// The checkpoint's step (0: no checkpoint yet, started over).
    pub from_step: usize,
    /// `--set` values given to the resume.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<Override>,
    /// Data changes accepted with `--allow-data-change`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data_changes: Vec<String>,
}

/// What meta.json holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub name: String,
    pub sweep_tag: Option<String>,
    pub experiment_file: PathBuf,
    pub command_line: Vec<String>,
    pub overrides: Vec<Override>,
    pub git: Option<GitInfo>,
    pub host: String,
    pub cpu_model: String,
    pub cpu_cores: usize,
    pub gpu: Option<String>,
    /// `train.device` asked for and used.
    #[serde(default)]
    pub device: Choice,
    /// `train.dtype` asked for and used.
    #[serde(default)]
    pub dtype: Choice,
    pub crate_version: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub status: Status,
    /// Data lines skipped as malformed (with `data.skip_bad_lines`).
    #[serde(default)]
    pub skipped_lines: u64,
    /// The first few of those, as 1-based line numbers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_line_numbers: Vec<u64>,
    /// Why the run failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the run stopped early (the signal), when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Optimiser steps completed when the run last ended (completed, stopped or failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_step: Option<usize>,
    /// Each resume of this run: when, from which step, with which changes.
    #[serde(default)]
    pub resumes: Vec<ResumeRecord>,
    /// The lowest validation loss measured, and at which step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_loss: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_val_step: Option<usize>,
    /// Loss of the final weights on the first `batches x batch_size` rows of the data, in
    /// file order: what `minimind eval` must reproduce on the exported model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_eval: Option<FinalEval>,
    /// The ranks that trained the run (the latest session's): how many, on which hosts, the
    /// launcher, and the global batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<crate::dist::WorldInfo>,
    /// Values that are legal but almost certainly wrong, as the run header warned of them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FinalEval {
    pub loss: f64,
    pub tokens: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub batches: usize,
}

impl Meta {
    /// Collects everything meta.json says at the start of a run.
    pub fn gather(
        config: &Config,
        tag: Option<&str>,
        layered: &Layered,
        command_line: Vec<String>,
        start: &DateTime<Local>,
    ) -> Meta {
        let overrides = crate::config::overrides(layered)
            .into_iter()
            .map(|(key, value, origin)| Override { key, value, source: origin.to_string() })
            .collect();
        let path = layered.path().to_path_buf();
        Meta {
            sweep_tag: tag.map(str::to_string),
            experiment_file: std::path::absolute(&path).unwrap_or(path.clone()),
            command_line,
            overrides,
            git: git_info(path.parent().unwrap_or(Path::new("."))),
            started_at: start.to_rfc3339(),
            ..Meta::placeholder_for(&config.name)
        }
    }

    /// What meta.json says when it has been lost: the run's name from its config, this
    /// machine, everything else unknown (also the base of a new run's meta.json).
    pub fn placeholder(config: &Config) -> Meta {
        Meta::placeholder_for(&config.name)
    }

    fn placeholder_for(name: &str) -> Meta {
        Meta {
            name: name.to_string(),
            sweep_tag: None,
            experiment_file: PathBuf::new(),
            command_line: Vec::new(),
            overrides: Vec::new(),
            git: None,
            host: host_name(),
            cpu_model: cpu_model(),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gpu: None,
            device: Choice::default(),
            dtype: Choice::default(),
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: String::new(),
            ended_at: None,
            status: Status::Running,
            skipped_lines: 0,
            skipped_line_numbers: Vec::new(),
            error: None,
            reason: None,
            last_step: None,
            resumes: Vec::new(),
            best_val_loss: None,
            best_val_step: None,
            final_eval: None,
            world: None,
            warnings: Vec::new(),
        }
    }
}

/// Reads meta.json text field by field: a field that is missing or damaged takes its value
/// from `fallback` (and is named in the returned notes), the others are kept. Pure.
pub fn salvage_meta(text: &str, fallback: &Meta) -> (Meta, Vec<String>) {
    if let Ok(meta) = serde_json::from_str::<Meta>(text) {
        return (meta, Vec::new());
    }
    let serde_json::Value::Object(base) = serde_json::to_value(fallback).expect("meta serialises") else {
        unreachable!("a struct serialises to an object")
    };
    let found = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(found)) => found,
        Ok(_) | Err(_) => {
            return (
                fallback.clone(),
                vec!["meta.json is not a JSON object: rebuilt from config.toml".into()],
            );
        }
    };
    let mut kept = base.clone();
    let mut lost = Vec::new();
    for (key, _) in base.iter() {
        // A missing field keeps the fallback's value (most have defaults anyway).
        let Some(value) = found.get(key) else { continue };
        let mut trial = kept.clone();
        trial.insert(key.clone(), value.clone());
        if serde_json::from_value::<Meta>(serde_json::Value::Object(trial.clone())).is_ok() {
            kept = trial;
        } else {
            lost.push(key.clone());
        }
    }
    let meta = serde_json::from_value(serde_json::Value::Object(kept)).expect("every kept field was checked");
    let notes = if lost.is_empty() {
        Vec::new()
    } else {
        vec![format!("meta.json: damaged field(s) {} were reset", lost.join(", "))]
    };
    (meta, notes)
}

fn git_info(dir: &Path) -> Option<GitInfo> {
    let run = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(dir)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let commit = run(&["rev-parse", "HEAD"])?;
    let dirty = run(&["status", "--porcelain"]).is_some_and(|s| !s.is_empty());
    Some(GitInfo { commit, dirty })
}

fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

pub(crate) fn cpu_model() -> String {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// An existing run folder and the names of everything in it.
#[derive(Clone, Debug)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    /// Creates a fresh, uniquely named run folder (`-2`, `-3`, ... when the name is taken) and
    /// takes its lock.
    pub fn create(save_dir: &Path, base_name: &str) -> Result<(RunDir, RunLock)> {
        if let Err(e) = fs::create_dir_all(save_dir) {
            let why = crate::files::not_a_folder(save_dir).unwrap_or_else(|| e.to_string());
            anyhow::bail!(
                "cannot create the runs folder {}: {why}\n  hint: set checkpoint.save_dir to a folder (or a path where one can be made)",
                save_dir.display()
            );
        }
        for n in 1.. {
            let root = save_dir.join(candidate(base_name, n));
            match fs::create_dir(&root) {
                Ok(()) => {
                    let dir = RunDir { root };
                    // Blocking: only an auto-resume probing the new folder can hold it, briefly.
                    let lock = dir.lock_with(true)?.expect("a blocking lock is always taken");
                    let checkpoints = dir.checkpoints_dir();
                    fs::create_dir(&checkpoints)
                        .with_context(|| format!("cannot create {}", checkpoints.display()))?;
                    return Ok((dir, lock));
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create run folder {}", root.display()));
                }
            }
        }
        unreachable!("1.. never ends")
    }

    /// Opens an existing run folder (for resume): one with a config.toml.
    pub fn open(root: &Path) -> Result<RunDir> {
        let dir = RunDir { root: root.to_path_buf() };
        anyhow::ensure!(
            dir.config_path().is_file(),
            "{} is not a run folder (it has no config.toml)",
            root.display()
        );
        Ok(dir)
    }

    /// Takes the folder's exclusive lock, held until the returned guard is dropped (the OS
    /// releases it when the process dies, however it dies). Fails at once, naming the process
    /// that holds it, when another one does.
    pub fn lock(&self) -> Result<RunLock> {
        match self.lock_with(false)? {
            Some(lock) => Ok(lock),
            None => {
                let (who, stop) = match lock_holder(&self.lock_path()) {
                    Some(pid) => (format!("pid {pid}"), format!("stop it with `kill -INT {pid}`")),
                    None => ("it has just started".into(), "stop that process with Ctrl-C".into()),
                };
                anyhow::bail!(
                    "{} is in use by another minimind process ({who}); one process trains a run folder at a time\n  hint: wait for it to finish, or {stop}",
                    self.root.display()
                )
            }
        }
    }

    /// The status a reader shows: meta.json's, except that a run it calls running whose lock
    /// no process holds has died. Probes the lock without taking it.
    pub fn observed_status(&self, meta: &Meta) -> Status {
        if meta.status == Status::Running && self.holder().is_none() { Status::Died } else { meta.status }
    }

    /// The lock if it is free now, `None` if another process holds it.
    pub fn try_lock(&self) -> Result<Option<RunLock>> {
        self.lock_with(false)
    }

    fn lock_with(&self, wait: bool) -> Result<Option<RunLock>> {
        let Some(file) = lock_file(&self.lock_path(), wait)? else {
            return Ok(None);
        };
        // Holding the lock, nothing else writes here: temporary files are a dead writer's.
        for folder in [self.root.clone(), self.model_dir()] {
            for e in fs::read_dir(folder).into_iter().flatten().flatten() {
                let name = e.file_name().to_string_lossy().to_string();
                if name.starts_with('.') && name.ends_with(".tmp") && e.path().is_file() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
        Ok(Some(RunLock { _file: file }))
    }

    fn lock_path(&self) -> PathBuf {
        self.root.join(".lock")
    }

    pub fn config_path(&self) -> PathBuf {
        self.root.join("config.toml")
    }
    pub fn meta_path(&self) -> PathBuf {
        self.root.join("meta.json")
    }
    pub fn metrics_path(&self) -> PathBuf {
        self.root.join("metrics.csv")
    }
    pub fn log_path(&self) -> PathBuf {
        self.root.join("train.log")
    }
    /// A sweep point's stderr, kept by the sweep driver that started it (its errors; train.log
    /// has the rest).
    pub fn stderr_path(&self) -> PathBuf {
        self.root.join("stderr.log")
    }
    /// Whether a live process holds the run (see [`crate::files::lock_is_held`]), and its pid
    /// (`"?"` when it has not written it yet).
    pub fn holder(&self) -> Option<String> {
        crate::files::lock_is_held(&self.lock_path())
            .then(|| lock_holder(&self.lock_path()).unwrap_or_else(|| "?".into()))
    }
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.root.join("checkpoints")
    }
    pub fn model_dir(&self) -> PathBuf {
        self.root.join("model")
    }

    pub fn write_config(&self, config: &Config) -> Result<()> {
        let text = toml::to_string(config).context("serialising the resolved config")?;
        write_atomic(&self.config_path(), text.as_bytes())
    }

    pub fn write_meta(&self, meta: &Meta) -> Result<()> {
        let text = serde_json::to_string_pretty(meta)?;
        write_atomic(&self.meta_path(), text.as_bytes())
    }

    pub fn read_meta(&self) -> Result<Meta> {
        let text = fs::read_to_string(self.meta_path())
            .with_context(|| format!("reading {}", self.meta_path().display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", self.meta_path().display()))
    }

    /// meta.json as far as it can be read: damaged or missing fields come from `fallback`,
    /// with notes saying which.
    pub fn read_meta_lenient(&self, fallback: &Meta) -> (Meta, Vec<String>) {
        match fs::read_to_string(self.meta_path()) {
            Ok(text) => salvage_meta(&text, fallback),
            Err(e) => {
                (fallback.clone(), vec![format!("meta.json cannot be read ({e}): rebuilt from config.toml")])
            }
        }
    }
}

/// meta.json kept in memory and written through on every change. Clones share it, so the
/// signal thread can record a forced quit with the step the loop last finished.
#[derive(Clone)]
pub struct MetaFile {
    dir: RunDir,
    meta: std::sync::Arc<std::sync::Mutex<Meta>>,
    step: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// False on the ranks other than 0 of a data-parallel run: rank 0 owns meta.json.
    writes: bool,
}

impl MetaFile {
    /// Starts from `meta` (not written until the first update).
    pub fn new(dir: &RunDir, meta: Meta) -> MetaFile {
        let step = meta.last_step.unwrap_or(0);
        MetaFile {
            dir: dir.clone(),
            meta: std::sync::Arc::new(std::sync::Mutex::new(meta)),
            step: std::sync::Arc::new(step.into()),
            writes: true,
        }
    }

    /// A rank's view of a run that rank 0 records: updates change only this copy.
    pub fn unwritten(dir: &RunDir, meta: Meta) -> MetaFile {
        MetaFile { writes: false, ..MetaFile::new(dir, meta) }
    }

    /// Changes meta.json and writes it.
    pub fn update(&self, f: impl FnOnce(&mut Meta)) -> Result<()> {
        let mut meta = self.meta.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut meta);
        if !self.writes {
            return Ok(());
        }
        self.dir.write_meta(&meta)
    }

    pub fn get(&self) -> Meta {
        self.meta.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The optimiser steps done so far (kept current by the training loop).
    pub fn set_step(&self, step: usize) {
        self.step.store(step, Ordering::SeqCst);
    }

    pub fn step(&self) -> usize {
        self.step.load(Ordering::SeqCst)
    }

    /// Records how the run ended: status, why, the last step, the time.
    pub fn ended(&self, status: Status, reason: Option<String>, error: Option<String>) -> Result<()> {
        let step = self.step();
        self.update(|m| {
            m.status = status;
            m.reason = reason;
            m.error = error;
            m.last_step = Some(step);
            m.ended_at = Some(chrono::Local::now().to_rfc3339());
        })
    }
}

/// A run folder's lock; released when dropped or when the process ends.
#[derive(Debug)]
pub struct RunLock {
    _file: fs::File,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn folder_names() {
        let t = Local.with_ymd_and_hms(2026, 11, 28, 10, 15, 0).unwrap();
        let table = [
            (("moe_small", None), "20261128-101500-moe_small"),
            (("tiny", Some("lr=1e-3,moe=1")), "20261128-101500-tiny-lr=1e-3,moe=1"),
        ];
        for ((name, tag), want) in table {
            assert_eq!(folder_name(&t, name, tag), want);
        }
        assert_eq!(candidate("x", 1), "x");
        assert_eq!(candidate("x", 3), "x-3");
    }

    #[test]
    fn same_second_runs_get_distinct_folders() {
        let tmp = std::env::temp_dir().join(format!("minimind-rundir-{}", std::process::id()));
        let (a, _la) = RunDir::create(&tmp, "20261128-101500-x").unwrap();
        let (b, _lb) = RunDir::create(&tmp, "20261128-101500-x").unwrap();
        assert_ne!(a.root, b.root);
        assert!(b.root.ends_with("20261128-101500-x-2"));
        fs::remove_dir_all(&tmp).unwrap();
    }

    #[test]
    fn a_locked_folder_cannot_be_locked_again_until_released() {
        let tmp = tempfile::tempdir().unwrap();
        let (dir, lock) = RunDir::create(tmp.path(), "x").unwrap();
        assert!(dir.try_lock().unwrap().is_none(), "flock is per open file: a second open is refused");
        let err = dir.lock().unwrap_err().to_string();
        assert!(err.contains(&format!("pid {}", std::process::id())), "{err}");
        drop(lock);
        assert!(dir.try_lock().unwrap().is_some());
    }

    #[test]
    fn damaged_meta_fields_are_reset_the_rest_kept() {
        let mut good = Meta::placeholder_for("exp");
        good.status = Status::Stopped;
        good.cpu_cores = 7;
        good.resumes.push(ResumeRecord { at: "then".into(), from_step: 4, ..ResumeRecord::default() });
        let fallback = Meta::placeholder_for("fallback");
        let text = serde_json::to_string(&good).unwrap();
        assert_eq!(salvage_meta(&text, &fallback), (good.clone(), Vec::new()));
        let broken = text.replace("\"cpu_cores\":7", "\"cpu_cores\":\"seven\"");
        let (meta, notes) = salvage_meta(&broken, &fallback);
        assert_eq!(meta.cpu_cores, fallback.cpu_cores);
        assert_eq!((meta.status, meta.name.as_str(), meta.resumes.len()), (Status::Stopped, "exp", 1));
        assert!(notes[0].contains("cpu_cores"), "{notes:?}");
        let (meta, notes) = salvage_meta("{\"name\": \"exp\", \"status\": ", &fallback);
        assert_eq!(meta, fallback);
        assert!(notes[0].contains("rebuilt"), "{notes:?}");
    }
}
