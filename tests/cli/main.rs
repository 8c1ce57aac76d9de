//! Every CLI test, in one binary, driving the real executable: config handling, training runs,
//! and faults injected into runs (signals, kill -9, full disks, damaged files, concurrency).

mod config;
#[cfg(feature = "cuda")]
mod cuda;
mod dist;
mod faults;
mod runs;
mod shards;
mod silent;
mod sweeps;
mod tensorboard;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary with a clean `MINIMIND_*` environment, run in `dir`. Its throughput cache (for
/// cost estimates) is the tests' own, so test runs never touch the user's.
pub fn minimind(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_minimind"));
    cmd.current_dir(dir);
    cmd.env("XDG_CACHE_HOME", Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"));
    for (k, _) in std::env::vars() {
        if k.starts_with("MINIMIND_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects the given exit code; returns the output.
pub fn expect(cmd: &mut Command, code: i32) -> Output {
    let o = cmd.output().expect("binary runs");
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    o
}

/// A scratch folder with a tiny data file and tokenizer next to the experiment files.
pub struct Scratch {
    dir: tempfile::TempDir,
}

#[allow(clippy::new_without_default)] // `new` copies files: not a default value
impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(repo().join("data/minimind_tokenizer.json"), dir.path().join("tok.json")).unwrap();
        fs::copy(repo().join("data/songci_2k.jsonl"), dir.path().join("data.jsonl")).unwrap();
        Scratch { dir }
    }
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::write(&p, text).unwrap();
        p
    }
    /// A valid small experiment file body (data paths relative to the file).
    pub fn base(&self) -> PathBuf {
        self.write("base.toml", "name = \"base\"\n[data]\npath = \"data.jsonl\"\ntokenizer = \"tok.json\"\n")
    }
}

pub const SONGCI: &str = include_str!("../../data/songci_2k.jsonl");

pub fn resolved(o: &Output) -> toml::Table {
    toml::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}\n{}", stdout(o)))
}

/// A model small enough that a dozen steps take well under a second.
pub const MICRO: &str = r#"
name = "micro"
[model]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 64
[data]
path = "data.jsonl"
tokenizer = "tok.json"
max_seq_len = 32
[train]
batch_size = 4
accumulation_steps = 2
learning_rate = 1e-3
max_steps = 12
dtype = "float32"
device = "cpu"
threads = 1
[checkpoint]
log_interval = 1
save_interval = 4
keep_last = 2
"#;

impl Scratch {
    pub fn micro(&self, extra: &str) -> PathBuf {
        self.write("micro.toml", &format!("{MICRO}\n{extra}"))
    }
    /// Run folders under runs/, oldest first.
    pub fn runs(&self) -> Vec<PathBuf> {
        runs_in(self.path())
    }
}

/// Run folders under `dir`/runs/, oldest first (not the hidden cache).
pub fn runs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir.join("runs"))
        .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir() && !p.ends_with(".cache")).collect())
        .unwrap_or_default();
    v.retain(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'));
    v.sort();
    v
}

pub fn meta(run: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(run.join("meta.json")).unwrap()).unwrap()
}

/// metrics.csv rows without the wall-clock columns (tokens_per_s, elapsed_s).
pub fn metric_rows(run: &Path) -> Vec<String> {
    let text = fs::read_to_string(run.join("metrics.csv")).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    let keep: Vec<bool> = header.iter().map(|h| !matches!(*h, "tokens_per_s" | "elapsed_s")).collect();
    assert!(keep.iter().filter(|k| !**k).count() == 2, "{header:?}");
    text.lines()
        .map(|l| l.split(',').zip(&keep).filter(|(_, k)| **k).map(|(v, _)| v).collect::<Vec<_>>().join(","))
        .collect()
}

/// One column of metrics.csv, by name, parsed.
pub fn metric(run: &Path, name: &str) -> Vec<f64> {
    let text = fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = text.lines();
    let i = lines.next().unwrap().split(',').position(|h| h == name).unwrap_or_else(|| panic!("no {name}"));
    lines.map(|l| l.split(',').nth(i).unwrap().parse().unwrap()).collect()
}

pub fn run_quiet(dir: &Path, args: &[&str]) -> Command {
    let mut c = minimind(dir);
    c.arg("run").args(args).arg("--quiet");
    c
}

/// A process in the background whose output is collected as it comes.
pub struct Spawned {
    pub child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stdout line so far.
    pub out: Vec<String>,
    err: Option<std::thread::JoinHandle<String>>,
}

impl Spawned {
    pub fn start(cmd: &mut Command) -> Spawned {
        use std::io::{BufRead, Read};
        let mut child = cmd
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("binary starts");
        let (tx, rx) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let err = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Spawned { child, lines: rx, out: Vec::new(), err: Some(err) }
    }

    /// Waits for a stdout line containing `text` (panics after `secs`); returns it.
    pub fn wait_for(&mut self, text: &str, secs: u64) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.out.push(line.clone());
                    if line.contains(text) {
                        return line;
                    }
                }
                Err(_) => {
                    panic!("no line with {text:?} within {secs}s; stdout so far:\n{}", self.out.join("\n"))
                }
            }
        }
    }

    pub fn signal(&self, sig: &str) {
        assert!(
            Command::new("kill")
                .args([&format!("-{sig}"), &self.child.id().to_string()])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the exit; returns the exit code (None when killed by a signal), stdout, stderr.
    pub fn finish(mut self) -> (Option<i32>, String, String) {
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(std::time::Duration::from_secs(5)) {
            self.out.push(line);
        }
        let err = self.err.take().unwrap().join().unwrap();
        (status.code(), self.out.join("\n"), err)
    }
}

/// A small tmpfs mounted at `path` for the duration of a test (needs root). Where it cannot be
/// mounted the test is skipped with a message, except under CI (which runs as root), where
/// that is a failure.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(path.to_path_buf())),
            other => {
                let why = match other {
                    Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cannot mount a tmpfs under CI, which runs as root: {why}"
                );
                eprintln!(
                    "SKIPPED: cannot mount a small tmpfs here ({why}); run as root to fill a disk safely"
                );
                None
            }
        }
    }

    pub fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// The local one-node Slurm cluster of ../shared/slurm for one test: started (as root) if it
/// is not running, and its daemons stopped again by pid when dropped, if this test started them.
pub struct LocalSlurm {
    started: Vec<u32>,
    /// One test at a time uses the cluster: one that stops the daemons it started must not
    /// pull them from under another.
    _turn: std::sync::MutexGuard<'static, ()>,
}

static SLURM_TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

const SLURM_DAEMONS: [&str; 3] = ["slurmd", "slurmctld", "munged"];

/// Live daemons only: each daemonises by forking, and its exited parent may linger as a zombie.
fn daemon_pids() -> Vec<u32> {
    SLURM_DAEMONS
        .iter()
        .flat_map(|name| {
            let out = Command::new("pgrep")
                .args(["-x", "-r", "S,R,D"])
                .arg(name)
                .output()
                .map(|o| o.stdout)
                .unwrap_or_default();
            String::from_utf8_lossy(&out)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

impl LocalSlurm {
    /// None where the cluster cannot start (not root, no apt); under CI (root) that fails.
    pub fn start() -> Option<LocalSlurm> {
        let turn = SLURM_TURN.lock().unwrap_or_else(|e| e.into_inner());
        let before = daemon_pids();
        let script = repo().join("../shared/slurm/start-local-slurm.sh");
        let outcome = Command::new("bash").arg(&script).output();
        match outcome {
            Ok(o) if o.status.success() => {
                let started = daemon_pids().into_iter().filter(|p| !before.contains(p)).collect();
                Some(LocalSlurm { started, _turn: turn })
            }
            other => {
                let why = match other {
                    Ok(o) => {
                        String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("it failed").to_string()
                    }
                    Err(e) => e.to_string(),
                };
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cannot start the local Slurm cluster under CI (root): {why}"
                );
                eprintln!("SKIPPED: cannot start a local Slurm cluster here ({why}); it needs root");
                None
            }
        }
    }
}

impl Drop for LocalSlurm {
    fn drop(&mut self) {
        // A test may end as soon as its runs report completed, while Slurm still winds their
        // job down. Stopping the daemons then would leave the job "running" in the
        // controller's saved state, holding the node's CPUs, and the next test's jobs would
        // queue forever: the queue drains first (what is left after 60 s is cancelled).
        let queued = || {
            Command::new("squeue")
                .args(["-h", "-o", "%i"])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).trim().is_empty())
                .unwrap_or(false)
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while queued() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
        }
        if queued() {
            let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
            let _ = Command::new("scancel").args(["-u", &user]).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while queued() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        for pid in &self.started {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
    }
}

/// PYTHONPATH under which python3 imports `module` (from `.ci/deps/<package>`, where .ci/run
/// installs it, else the system's), or None: SKIPPED with `install`, a failure under CI.
pub fn python_with(package: &str, module: &str, install: &str) -> Option<String> {
    let deps = repo().join(".ci/deps").join(package);
    let path = if deps.join(package).is_dir() { deps.display().to_string() } else { String::new() };
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .env("PYTHONPATH", &path)
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(path);
    }
    let why = format!("SKIPPED: {package} is not installed; {install}");
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("{why}");
    None
}
