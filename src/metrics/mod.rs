//! Typed step metrics -> `metrics.csv`, and the console (progress bar + `train.log`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::units::duration;

mod tensorboard;
pub use tensorboard::EventWriter;

/// One row of metrics.csv. `tokens_per_s` and `elapsed_s` are wall-clock; every other column
/// is a deterministic function of the config (bit-identical across an exact resume).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct StepMetrics {
    /// Optimiser steps done.
    pub step: usize,
    /// 0-based epoch of the step's last micro-batch.
    pub epoch: usize,
    /// Real tokens processed so far (padding not counted).
    pub tokens: u64,
    /// Token positions processed so far, padding included (rows x T).
    #[serde(default)]
    pub tokens_padded: u64,
    /// lm_loss + aux_loss.
    pub loss: f64,
    pub lm_loss: f64,
    pub aux_loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Validation loss, at the steps where it was measured (empty elsewhere).
    #[serde(default)]
    pub val_loss: Option<f64>,
    /// Token positions (padding included) per second since the previous row.
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

const HEADER: [&str; 12] = [
    "step",
    "epoch",
    "tokens",
    "tokens_padded",
    "loss",
    "lm_loss",
    "aux_loss",
    "lr",
    "grad_norm",
    "val_loss",
    "tokens_per_s",
    "elapsed_s",
];

/// The rows of a metrics.csv to keep when resuming from step `step`, and what was dropped:
/// rows past the checkpoint (they are recomputed), a partial last row (the process died while
/// writing it) and rows that do not parse. Never fails. Pure.
pub fn rows_to_keep(text: &str, step: usize) -> (Vec<StepMetrics>, Vec<String>) {
    let mut notes = Vec::new();
    let mut body = text;
    if !text.is_empty() && !text.ends_with('\n') {
        let cut = text.rfind('\n').map_or(0, |i| i + 1);
        notes.push(format!(
            "metrics.csv: dropped a partial last row ({:?}): the process died while writing it",
            &text[cut..]
        ));
        body = &text[..cut];
    }
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(body.as_bytes());
    let headers = reader.headers().cloned().unwrap_or_default();
    let (mut kept, mut bad, mut later) = (Vec::new(), Vec::new(), 0);
    for (n, record) in reader.records().enumerate() {
        // Line n + 2: the header is line 1. A damaged row is named by its line and, when its
        // first field still reads as one, its step.
        let row = record.as_ref().ok().map(|r| (r.deserialize::<StepMetrics>(Some(&headers)), r.get(0)));
        match row {
            Some((Ok(r), _)) if r.step <= step => kept.push(r),
            Some((Ok(_), _)) => later += 1,
            Some((Err(_), Some(first))) if first.parse::<usize>().is_ok() => {
                bad.push(format!("line {} (step {first})", n + 2))
            }
            _ => bad.push(format!("line {}", n + 2)),
        }
    }
    if !bad.is_empty() {
        notes.push(format!("metrics.csv: dropped {} damaged row(s): {}", bad.len(), bad.join(", ")));
    }
    if later > 0 {
        notes.push(format!("metrics.csv: {later} row(s) after step {step} dropped; those steps run again"));
    }
    (kept, notes)
}

/// How train.log carries each metrics row (after the console's line for it), so that a lost
/// metrics.csv can be restored from it.
const LOG_PREFIX: &str = "row: ";

/// A metrics row as its train.log line.
pub fn log_line(row: &StepMetrics) -> String {
    let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
    let bytes = w.serialize(row).ok().and_then(|()| w.into_inner().ok()).unwrap_or_default();
    format!("{LOG_PREFIX}{}", String::from_utf8_lossy(&bytes).trim_end())
}

/// The metrics rows a train.log holds, by step (a step logged again, after a resume, counts
/// once: its latest line). Pure.
fn rows_in_log(log: &str) -> std::collections::BTreeMap<usize, StepMetrics> {
    let body: String =
        log.lines().filter_map(|l| l.strip_prefix(LOG_PREFIX)).flat_map(|row| [row, "\n"]).collect();
    let mut reader = csv::ReaderBuilder::new().has_headers(false).flexible(true).from_reader(body.as_bytes());
    let header = csv::StringRecord::from(HEADER.to_vec());
    reader
        .records()
        .filter_map(|r| r.ok()?.deserialize::<StepMetrics>(Some(&header)).ok())
        .map(|r| (r.step, r))
        .collect()
}

/// `kept` (metrics.csv's rows up to checkpoint step `step`) completed with the rows train.log
/// holds for the steps metrics.csv lost (deleted, emptied, damaged), and a note naming
/// them. Pure.
fn restore_from_log(kept: Vec<StepMetrics>, log: &str, step: usize) -> (Vec<StepMetrics>, Option<String>) {
    let mut by_step: std::collections::BTreeMap<usize, StepMetrics> =
        rows_in_log(log).into_iter().filter(|(s, _)| *s <= step).collect();
    let restored: Vec<usize> =
        by_step.keys().copied().filter(|s| !kept.iter().any(|r| r.step == *s)).collect();
    for r in kept {
        by_step.insert(r.step, r);
    }
    let note = if !restored.is_empty() {
        Some(format!(
            "metrics.csv: restored {} row(s) from train.log (steps {})",
            restored.len(),
            ranges(&restored)
        ))
    } else if by_step.is_empty() && step > 0 {
        Some(format!(
            "metrics.csv: the rows of steps 1-{step} are gone for good (metrics.csv lost them and train.log holds none)"
        ))
    } else {
        None
    };
    (by_step.into_values().collect(), note)
}

/// Sorted numbers as ranges: `1-4, 6, 9-10`. Pure.
fn ranges(v: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let mut j = i;
        while j + 1 < v.len() && v[j + 1] == v[j] + 1 {
            j += 1;
        }
        out.push(if j > i { format!("{}-{}", v[i], v[j]) } else { v[i].to_string() });
        i = j + 1;
    }
    out.join(", ")
}

/// Appends rows to metrics.csv; on resume, first keeps only the rows up to the checkpoint (see
/// [`rows_to_keep`]) so no step is ever listed twice, and restores from train.log the rows it
/// lost.
pub struct MetricsWriter {
    file: File,
    path: PathBuf,
    /// The same rows as TensorBoard events, when the run writes them.
    events: Option<EventWriter>,
}

impl MetricsWriter {
    /// Opens (creating) metrics.csv; with `resume` (the checkpoint's step and the run's
    /// train.log), repairs it first. Returns notes about what the repair dropped and restored.
    pub fn open(path: &Path, resume: Option<(usize, &Path)>) -> Result<(MetricsWriter, Vec<String>)> {
        let mut notes = Vec::new();
        if let Some((step, log)) = resume {
            let text = match fs::read(path) {
                Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
            };
            let (kept, dropped) = rows_to_keep(&text, step);
            notes = dropped;
            let log = fs::read(log).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default();
            let (kept, restored) = restore_from_log(kept, &log, step);
            notes.extend(restored);
            if kept.is_empty() {
                if path.exists() {
                    fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
                }
            } else {
                let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
                w.write_record(HEADER)?;
                for r in &kept {
                    w.serialize(r)?;
                }
                crate::files::write_atomic(path, &w.into_inner().map_err(|e| e.into_error())?)?;
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
            file.write_all(&w.into_inner().map_err(|e| e.into_error())?)
                .with_context(|| format!("writing the header of {}", path.display()))?;
        }
        Ok((MetricsWriter { file, path: path.to_path_buf(), events: None }, notes))
    }

    /// Also writes every row as TensorBoard events into `dir` (see [`EventWriter::open`]);
    /// returns notes about what a resume's repair dropped.
    pub fn with_events(
        &mut self,
        dir: &Path,
        resume_step: Option<usize>,
        config: &str,
    ) -> Result<Vec<String>> {
        let (events, notes) = EventWriter::open(dir, resume_step, config)?;
        self.events = Some(events);
        Ok(notes)
    }

    pub fn write(&mut self, row: &StepMetrics) -> Result<()> {
        let mut w = csv::WriterBuilder::new().has_headers(false).from_writer(Vec::new());
        w.serialize(row)?;
        let bytes = w.into_inner().map_err(|e| e.into_error())?;
        self.file
            .write_all(&bytes)
            .and_then(|()| self.file.flush())
            .with_context(|| format!("appending a row to {}", self.path.display()))?;
        match self.events.as_mut() {
            Some(e) => e.write(row),
            None => Ok(()),
        }
    }
}

/// The complete rows of a metrics.csv, for readers: a torn last row (a crash mid-append) and
/// damaged rows are left out (see [`rows_to_keep`]); only a file that cannot be read fails.
pub fn read(path: &Path) -> Result<Vec<StepMetrics>> {
    let text = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(rows_to_keep(&String::from_utf8_lossy(&text), usize::MAX).0)
}

/// Prints a line on stdout; a closed stdout (`| head`) is not an error: returns false.
pub fn say(text: &str) -> bool {
    writeln!(std::io::stdout().lock(), "{text}").is_ok()
}

/// Whether a progress bar can be shown: stdout and stderr are both terminals (with stdout
/// redirected, the lines belong in that file, with periodic progress lines among them).
pub fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::io::stderr().is_terminal()
}

/// A warning on stderr; a closed stderr is not an error.
pub fn warn(text: &str) {
    let _ = writeln!(std::io::stderr(), "warning: {text}");
}

/// How the user runs this program, for the commands hints print: `minimind` when that name
/// on the PATH is this executable (`cargo install --path .`), else this executable's path
/// (`./target/release/minimind` under the working folder).
pub fn program() -> String {
    static NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    NAME.get_or_init(|| {
        let Ok(exe) = std::env::current_exe().and_then(|e| e.canonicalize()) else {
            return "minimind".into();
        };
        let path = std::env::var_os("PATH").unwrap_or_default();
        let cwd = std::env::current_dir().unwrap_or_default();
        program_name(&exe, &path, &cwd, &|p| p.canonicalize().ok())
    })
    .clone()
}

/// [`program`]'s decision: `exe` (canonical), the PATH, the working folder, and how a path
/// resolves (to a canonical file, when it exists). Pure given `resolve`.
pub fn program_name(
    exe: &Path,
    path: &std::ffi::OsStr,
    cwd: &Path,
    resolve: &dyn Fn(&Path) -> Option<PathBuf>,
) -> String {
    let first = std::env::split_paths(path).find_map(|dir| resolve(&dir.join("minimind")));
    if first.as_deref() == Some(exe) {
        return "minimind".into();
    }
    match exe.strip_prefix(cwd) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => exe.display().to_string(),
    }
}

/// Where a training step stands, for the console.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// Optimiser steps completed (the one under way is `step + 1`).
    pub step: usize,
    pub total: usize,
    /// Micro-batches done in the step under way.
    pub micro: usize,
    pub accumulation: usize,
    pub elapsed_s: f64,
    pub eta_s: f64,
}

/// What the console shares with its heartbeat thread.
struct Shared {
    log: Option<File>,
    log_path: PathBuf,
    stdout_ok: bool,
    last_line: Instant,
    /// The latest progress and when it was reported.
    latest: Option<(Progress, Instant)>,
}

impl Shared {
    fn line(&mut self, text: &str, bar: &indicatif::ProgressBar) {
        self.last_line = Instant::now();
        if !bar.is_hidden() {
            bar.println(text);
        } else if self.stdout_ok && !say(text) {
            self.stdout_ok = false;
        }
        if let Some(f) = &mut self.log
            && writeln!(f, "{text}").is_err()
        {
            warn(&format!("cannot write {}; the console is not logged any more", self.log_path.display()));
            self.log = None;
        }
    }
}

/// What the user sees: a progress bar with ETA on a terminal; plain lines otherwise, with a
/// progress line whenever nothing was printed for `heartbeat`, even in the middle of a long
/// micro-batch (a thread keeps watch). Every line also goes to train.log. A closed stdout is
/// tolerated: lines then only go to the log.
pub struct Console {
    bar: indicatif::ProgressBar,
    shared: std::sync::Arc<std::sync::Mutex<Shared>>,
    heartbeat: Duration,
    watch: Option<(std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>)>,
}

impl Console {
    pub fn new(
        log_path: &Path,
        total_steps: u64,
        done: u64,
        quiet: bool,
        heartbeat: Duration,
    ) -> Result<Console> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let bar = if quiet || !interactive() {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total_steps)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps {msg} [{elapsed_precise}<{eta_precise}]",
            )
            .expect("valid template"),
        );
        bar.set_position(done);
        let shared = std::sync::Arc::new(std::sync::Mutex::new(Shared {
            log: Some(log),
            log_path: log_path.to_path_buf(),
            stdout_ok: true,
            last_line: Instant::now(),
            latest: None,
        }));
        let watch = if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(500));
            None
        } else if heartbeat > Duration::ZERO {
            Some(watch(shared.clone(), bar.clone(), heartbeat))
        } else {
            None
        };
        Ok(Console { bar, shared, heartbeat, watch })
    }

    /// Lines to `log_path` only: a data-parallel rank other than 0 (rank 0 speaks for the run).
    pub fn log_file(log_path: &Path) -> Result<Console> {
        let c = Console::new(log_path, 0, 0, true, Duration::from_secs(60))?;
        c.lock().stdout_ok = false;
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Prints a line (above the bar) and appends it to train.log.
    pub fn line(&mut self, text: &str) {
        self.lock().line(text, &self.bar);
    }

    /// Appends a line to train.log only (it was shown already).
    pub fn log_only(&mut self, text: &str) {
        if let Some(f) = &mut self.lock().log {
            let _ = writeln!(f, "{text}");
        }
    }

    /// After every micro-batch (and with `micro` 0 before the first): the bar on a terminal;
    /// elsewhere a line when nothing was printed for `heartbeat`.
    pub fn progress(&mut self, p: &Progress) {
        if !self.bar.is_hidden() {
            self.bar.set_position(p.step as u64);
            self.bar.set_message(format!("(micro-batch {}/{})", p.micro, p.accumulation));
            return;
        }
        let mut shared = self.lock();
        shared.latest = Some((*p, Instant::now()));
        if p.micro > 0 && shared.last_line.elapsed() >= self.heartbeat {
            let text = progress_line(p, "done", 0.0);
            shared.line(&text, &self.bar);
        }
    }

    pub fn finish(&mut self) {
        if let Some((thread, stop)) = self.watch.take() {
            let _ = stop.send(());
            let _ = thread.join();
        }
        self.bar.finish_and_clear();
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.finish();
    }
}

/// `step 3/200, micro-batch 2/8 done: elapsed 1m20s, ETA 14m05s`; `since` seconds after the
/// progress was reported (the heartbeat's view of a micro-batch under way).
fn progress_line(p: &Progress, state: &str, since: f64) -> String {
    format!(
        "step {}/{}, micro-batch {}/{} {state}: elapsed {}, ETA {}",
        p.step + 1,
        p.total,
        p.micro,
        p.accumulation,
        duration(p.elapsed_s + since),
        duration(if p.eta_s.is_nan() { p.eta_s } else { (p.eta_s - since).max(0.0) })
    )
}

/// The heartbeat: every `heartbeat` without a line, a line on the micro-batch under way.
fn watch(
    shared: std::sync::Arc<std::sync::Mutex<Shared>>,
    bar: indicatif::ProgressBar,
    heartbeat: Duration,
) -> (std::thread::JoinHandle<()>, std::sync::mpsc::Sender<()>) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let tick = heartbeat.min(Duration::from_secs(1));
    let thread = std::thread::spawn(move || {
        while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(tick) {
            let mut s = shared.lock().unwrap_or_else(|e| e.into_inner());
            if s.last_line.elapsed() < heartbeat {
                continue;
            }
            if let Some((p, at)) = s.latest {
                // The micro-batch after the last one reported; after a step's last one, the
                // optimiser step (and maybe a checkpoint) is what runs.
                let since = at.elapsed().as_secs_f64();
                let text = if p.micro < p.accumulation {
                    progress_line(&Progress { micro: p.micro + 1, ..p }, "running", since)
                } else {
                    progress_line(&p, "done, updating the weights", since)
                };
                s.line(&text, &bar);
            }
        }
    });
    (thread, stop)
}

impl StepMetrics {
    /// The console form of a row.
    pub fn line(&self, total: usize) -> String {
        let val = self.val_loss.map_or_else(String::new, |v| format!(" val {v:.4}"));
        format!(
            "step {}/{} epoch {} loss {:.4} (lm {:.4} aux {:.4}){val} lr {:.3e} grad_norm {:.3} {:.0} tok/s",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_is_named_as_the_user_runs_it() {
        let exe = Path::new("/home/u/minimind/target/release/minimind");
        let installed = Path::new("/home/u/.cargo/bin/minimind");
        let cwd = Path::new("/home/u/minimind");
        // (PATH, where `minimind` on it resolves, working folder) -> the name printed.
        let table: [(&str, Option<&Path>, &Path, &str); 4] = [
            ("/usr/bin:/home/u/.cargo/bin", Some(exe), cwd, "minimind"),
            ("/usr/bin:/home/u/.cargo/bin", Some(installed), cwd, "./target/release/minimind"),
            ("/usr/bin", None, cwd, "./target/release/minimind"),
            ("/usr/bin", None, Path::new("/tmp"), "/home/u/minimind/target/release/minimind"),
        ];
        for (path, found, cwd, want) in table {
            let resolve =
                |p: &Path| found.filter(|_| p.starts_with("/home/u/.cargo/bin")).map(Path::to_path_buf);
            assert_eq!(program_name(exe, std::ffi::OsStr::new(path), cwd, &resolve), want, "{path} {cwd:?}");
        }
    }

    #[test]
    fn lost_rows_come_back_from_train_log() {
        let row = |s: usize, loss: f64| StepMetrics {
            step: s,
            epoch: 0,
            tokens: 10 * s as u64,
            tokens_padded: 12 * s as u64,
            loss,
            lm_loss: loss,
            aux_loss: 0.0,
            lr: 1e-3,
            grad_norm: 0.5,
            val_loss: (s == 2).then_some(4.25),
            tokens_per_s: 100.0,
            elapsed_s: s as f64,
        };
        // The log: steps 1-4, then a resume from step 2 logged 3 and 4 again (the latest wins),
        // console lines between them.
        let log = [
            "step 1/9 ...".to_string(),
            log_line(&row(1, 9.0)),
            log_line(&row(2, 8.0)),
            log_line(&row(3, 7.5)),
            "resuming from step 2".into(),
            log_line(&row(3, 7.0)),
            log_line(&row(4, 6.0)),
            "row: damaged,".into(),
        ]
        .join("\n");
        assert_eq!(rows_in_log(&log).len(), 4);
        // metrics.csv lost everything: rows up to the checkpoint's step 3 come back exactly.
        let (rows, note) = restore_from_log(Vec::new(), &log, 3);
        assert_eq!(rows, vec![row(1, 9.0), row(2, 8.0), row(3, 7.0)]);
        assert_eq!(note.unwrap(), "metrics.csv: restored 3 row(s) from train.log (steps 1-3)");
        // It kept step 2: only 1 and 3 are restored, and the kept row stays.
        let (rows, note) = restore_from_log(vec![row(2, 8.0)], &log, 3);
        assert_eq!(rows.len(), 3);
        assert!(note.unwrap().ends_with("(steps 1, 3)"));
        assert_eq!(restore_from_log(vec![row(1, 9.0)], "", 3), (vec![row(1, 9.0)], None));
        let (rows, note) = restore_from_log(Vec::new(), "no rows here", 3);
        assert!(rows.is_empty() && note.unwrap().contains("steps 1-3 are gone for good"));
        assert_eq!(restore_from_log(Vec::new(), "", 0), (Vec::new(), None));
        for (v, want) in [(vec![], ""), (vec![1, 2, 3, 5, 7, 8], "1-3, 5, 7-8"), (vec![4], "4")] {
            assert_eq!(ranges(&v), want);
        }
    }

    #[test]
    fn metrics_rows_to_keep() {
        let header = HEADER.join(",");
        let row = |s: usize| format!("{s},0,{},{},4.0,4.0,0.0,0.001,1.0,,100.0,1.0", s * 10, s * 12);
        let full = format!("{header}\n{}\n{}\n{}\n", row(1), row(2), row(3));
        let (kept, notes) = rows_to_keep(&full, 2);
        assert_eq!(kept.iter().map(|r| r.step).collect::<Vec<_>>(), [1, 2]);
        assert!(notes[0].contains("1 row(s) after step 2"), "{notes:?}");
        let partial = format!("{header}\n{}\n{}\n3,0,30,3", row(1), row(2));
        let (kept, notes) = rows_to_keep(&partial, 5);
        assert_eq!(kept.len(), 2);
        assert!(notes[0].contains("partial last row") && notes[0].contains("3,0,30,3"), "{notes:?}");
        let damaged = format!("{header}\n{}\nx,y\n{}\n", row(1), row(2));
        let (kept, notes) = rows_to_keep(&damaged, 5);
        assert_eq!(kept.len(), 2);
        assert!(notes[0].contains("1 damaged row(s): line 3"), "{notes:?}");
        // A row whose step still reads but whose loss does not is named by its step.
        let bad_loss = format!("{header}\n{}\n{}\n", row(1), row(2).replace("4.0,4.0", "4.0,4.x"));
        let (kept, notes) = rows_to_keep(&bad_loss, 5);
        assert_eq!(kept.len(), 1);
        assert!(notes[0].contains("line 3 (step 2)"), "{notes:?}");
        assert_eq!(rows_to_keep("", 3), (Vec::new(), Vec::new()));
    }
}
