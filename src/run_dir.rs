//! Run folders: `runs/<YYYYmmdd-HHMMSS>-<name>[-<tag>]/`. This module owns every path and file
//! name inside them.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use chrono::{DateTime, Local};
use serde::{Deserialize, Serialize};

use crate::config::{Config, Layered};

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

/// Run status, as meta.json records it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Running,
    Completed,
    Failed,
    Stopped,
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
    pub crate_version: String,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub status: Status,
    /// Data lines skipped as malformed (with `data.skip_bad_lines`).
    #[serde(default)]
    pub skipped_lines: u64,
    /// Why the run failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Each resume of this run: when, and from which step.
    #[serde(default)]
    pub resumes: Vec<String>,
    /// Loss of the final weights on the first `batches x batch_size` rows of the data, in
    /// file order: what `minimind eval` must reproduce on the exported model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_eval: Option<FinalEval>,
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
            name: config.name.clone(),
            sweep_tag: tag.map(str::to_string),
            experiment_file: std::path::absolute(&path).unwrap_or(path.clone()),
            command_line,
            overrides,
            git: git_info(path.parent().unwrap_or(Path::new("."))),
            host: host_name(),
            cpu_model: cpu_model(),
            cpu_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            gpu: None,
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            started_at: start.to_rfc3339(),
            ended_at: None,
            status: Status::Running,
            skipped_lines: 0,
            error: None,
            resumes: Vec::new(),
            final_eval: None,
        }
    }
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

fn cpu_model() -> String {
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
    /// Creates a fresh, uniquely named run folder (`-2`, `-3`, ... when the name is taken).
    pub fn create(save_dir: &Path, base_name: &str) -> Result<RunDir> {
        fs::create_dir_all(save_dir)
            .with_context(|| format!("cannot create the runs folder {}", save_dir.display()))?;
        for n in 1.. {
            let root = save_dir.join(candidate(base_name, n));
            match fs::create_dir(&root) {
                Ok(()) => {
                    fs::create_dir(root.join("checkpoints"))?;
                    return Ok(RunDir { root });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create run folder {}", root.display()));
                }
            }
        }
        unreachable!("1.. never ends")
    }

    /// Opens an existing run folder (for resume).
    pub fn open(root: &Path) -> Result<RunDir> {
        let dir = RunDir { root: root.to_path_buf() };
        anyhow::ensure!(
            dir.config_path().is_file() && dir.meta_path().is_file(),
            "{} is not a run folder (it has no config.toml and meta.json)",
            root.display()
        );
        Ok(dir)
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

    pub fn read_config(&self) -> Result<Config> {
        let text = fs::read_to_string(self.config_path())
            .with_context(|| format!("reading {}", self.config_path().display()))?;
        toml::from_str(&text).with_context(|| format!("parsing {}", self.config_path().display()))
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
}

/// Writes a file under a temporary name, syncs it, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    write_synced(&tmp, bytes)
        .and_then(|()| fs::rename(&tmp, path).with_context(|| format!("renaming {}", tmp.display())))
        .inspect_err(|_e| {
            let _ = fs::remove_file(&tmp);
        })
        .with_context(|| format!("writing {}", path.display()))
}

/// Writes a file and syncs it to disk before returning.
pub fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes).with_context(|| format!("writing {}", path.display()))?;
    f.sync_all().with_context(|| format!("syncing {}", path.display()))
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
        let a = RunDir::create(&tmp, "20261128-101500-x").unwrap();
        let b = RunDir::create(&tmp, "20261128-101500-x").unwrap();
        assert_ne!(a.root, b.root);
        assert!(b.root.ends_with("20261128-101500-x-2"));
        fs::remove_dir_all(&tmp).unwrap();
    }
}
