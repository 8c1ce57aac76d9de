//! A sweep as one thing: `runs/<stamp>-<name>/` holds `sweep.toml` (every point's resolved
//! config), `index.csv` (one row per point, rebuilt from the point folders under a lock) and
//! the points' run folders. Points run as `minimind resume <point>` processes: on this machine
//! `jobs` at a time, or as one Slurm job array; so starting, stopping, resuming and reporting a
//! point are the run folder's own, and `minimind resume SWEEP_DIR` continues the sweep.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::{Config, LauncherKind, LauncherSection, PlannedRun};
use crate::files::{lock_file, write_atomic};
use crate::metrics::say;
use crate::run_dir::{Meta, RunDir, Status};
use crate::signals::Stop;

/// `sweep.toml`: what the sweep is, enough to run or re-create any point.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SweepFile {
    pub name: String,
    pub experiment_file: PathBuf,
    pub created_at: String,
    pub command_line: Vec<String>,
    pub launcher: LauncherSection,
    /// The Slurm job id, once submitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slurm_job: Option<String>,
    pub points: Vec<Point>,
}

/// One point: its tag, its folder (relative to the sweep) and its resolved config.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Point {
    pub index: usize,
    pub tag: String,
    pub folder: String,
    pub config: Config,
}

/// A sweep folder.
#[derive(Clone, Debug)]
pub struct Sweep {
    pub root: PathBuf,
    pub file: SweepFile,
}

/// One row of `index.csv`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct IndexRow {
    pub index: usize,
    pub tag: String,
    pub run_dir: String,
    pub status: Status,
    pub steps: usize,
    pub final_loss: Option<f64>,
    pub best_val_loss: Option<f64>,
    pub tokens_per_s: Option<f64>,
    pub error: String,
}

const FILE: &str = "sweep.toml";
const INDEX: &str = "index.csv";

/// True when `dir` is a sweep folder.
pub fn is_sweep(dir: &Path) -> bool {
    dir.join(FILE).is_file()
}

impl Sweep {
    /// Creates the sweep folder for `runs` (the points of one experiment) under their
    /// `save_dir`: sweep.toml, a queued run folder per point, index.csv.
    pub fn create(
        runs: &[PlannedRun],
        launcher: LauncherSection,
        command_line: Vec<String>,
    ) -> Result<Sweep> {
        let first = runs.first().context("a sweep without points")?;
        let now = chrono::Local::now();
        let save_dir = first.config.checkpoint.save_dir.clone();
        let name = crate::run_dir::folder_name(&now, &first.config.name, None);
        let (sweep_dir, _lock) = RunDir::create(&save_dir, &name)?;
        // A sweep folder is not a run folder: drop what RunDir::create made for one.
        let _ = std::fs::remove_dir(sweep_dir.checkpoints_dir());
        let root = sweep_dir.root.clone();
        let mut points = Vec::new();
        for (index, run) in runs.iter().enumerate() {
            let tag = run.tag.clone().unwrap_or_else(|| format!("point{index}"));
            let mut config = run.config.clone();
            config.checkpoint.save_dir = root.clone();
            points.push(Point { index, tag: tag.clone(), folder: tag, config });
        }
        let file = SweepFile {
            name: first.config.name.clone(),
            experiment_file: std::path::absolute(first.layered.path())
                .unwrap_or_else(|_| first.layered.path().into()),
            created_at: now.to_rfc3339(),
            command_line,
            launcher,
            slurm_job: None,
            points,
        };
        let sweep = Sweep { root, file };
        sweep.save()?;
        for (p, run) in sweep.file.points.iter().zip(runs) {
            sweep.create_point(p, Some(run))?;
        }
        sweep.refresh_index()?;
        Ok(sweep)
    }

    pub fn open(root: &Path) -> Result<Sweep> {
        let path = root.join(FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        let file: SweepFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        for p in &file.points {
            if !is_plain_folder_name(Path::new(&p.folder)) {
                bail!(
                    "{}: point {} ({}) has folder `{}`, which is not a folder inside the sweep\n  hint: a point's folder is one name (its tag), as minimind writes it",
                    path.display(),
                    p.index,
                    p.tag,
                    p.folder
                );
            }
        }
        Ok(Sweep { root: root.to_path_buf(), file })
    }

    pub fn save(&self) -> Result<()> {
        let text = toml::to_string(&self.file).context("serialising sweep.toml")?;
        write_atomic(&self.root.join(FILE), text.as_bytes())
    }

    pub fn point_dir(&self, p: &Point) -> PathBuf {
        self.root.join(&p.folder)
    }

    /// A queued run folder for point `p` (config.toml, meta.json); `planned` adds the
    /// overrides and sources a fresh sweep knows.
    fn create_point(&self, p: &Point, planned: Option<&PlannedRun>) -> Result<()> {
        let dir = RunDir { root: self.point_dir(p) };
        std::fs::create_dir_all(dir.checkpoints_dir())
            .with_context(|| format!("creating {}", dir.checkpoints_dir().display()))?;
        dir.write_config(&p.config)?;
        let now = chrono::Local::now();
        let mut meta = match planned {
            Some(run) => {
                Meta::gather(&p.config, Some(&p.tag), &run.layered, self.file.command_line.clone(), &now)
            }
            None => Meta { sweep_tag: Some(p.tag.clone()), ..Meta::placeholder(&p.config) },
        };
        meta.status = Status::Queued;
        dir.write_meta(&meta)
    }

    /// Rebuilds index.csv from the point folders (under a lock, so concurrent points and the
    /// driver never interleave) and returns its rows. A point whose folder is gone is reported
    /// `missing`, not trusted.
    pub fn refresh_index(&self) -> Result<Vec<IndexRow>> {
        let _lock = lock_file(&self.root.join(".index.lock"), true)?;
        let rows: Vec<IndexRow> = self.file.points.iter().map(|p| index_row(p, &self.point_dir(p))).collect();
        let mut w = csv::Writer::from_writer(Vec::new());
        for r in &rows {
            w.serialize(r)?;
        }
        write_atomic(&self.root.join(INDEX), &w.into_inner().map_err(|e| e.into_error())?)?;
        Ok(rows)
    }

    /// Re-creates the folders of points that were deleted (they run again from the start),
    /// saying which.
    fn restore_missing(&self) -> Result<()> {
        for p in &self.file.points {
            let dir = self.point_dir(p);
            if !dir.join("config.toml").is_file() {
                say(&format!(
                    "{}: its run folder {} was deleted; it runs again from the start",
                    p.tag,
                    dir.display()
                ));
                self.create_point(p, None)?;
            }
        }
        Ok(())
    }
}

/// Whether `folder` names one folder directly inside another (no `..`, `/` or root). Pure.
fn is_plain_folder_name(folder: &Path) -> bool {
    let mut parts = folder.components();
    matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None))
}

/// The index row of point `p` from its folder. Pure but for reading the folder.
fn index_row(p: &Point, dir: &Path) -> IndexRow {
    let mut row = IndexRow {
        index: p.index,
        tag: p.tag.clone(),
        run_dir: p.folder.clone(),
        status: Status::Missing,
        steps: 0,
        final_loss: None,
        best_val_loss: None,
        tokens_per_s: None,
        error: String::new(),
    };
    let run = RunDir { root: dir.to_path_buf() };
    let Ok(meta) = run.read_meta() else {
        if dir.exists() {
            row.status = Status::Damaged;
            row.error = "meta.json unreadable; resume rebuilds it".into();
        } else {
            row.error = "run folder was deleted".into();
        }
        return row;
    };
    row.status = run.observed_status(&meta);
    if row.status == Status::Died {
        row.error = "its process died (kill -9, crash or lost node); resume continues it".into();
    }
    row.steps = meta.last_step.unwrap_or(0);
    row.best_val_loss = meta.best_val_loss;
    if let Some(e) = meta.error {
        row.error = e.lines().next().unwrap_or_default().to_string();
    }
    if let Ok(rows) = crate::metrics::read(&run.metrics_path())
        && let Some(last) = rows.last()
    {
        row.steps = row.steps.max(last.step);
        row.final_loss = Some(last.loss);
        row.tokens_per_s = Some(last.tokens_per_s);
    }
    row
}

/// How a local sweep ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every point ran; how many failed.
    Done { failed: usize },
    /// Stopped by this signal; the running points wrote checkpoints.
    Stopped(i32),
}

/// Threads per point when `jobs` points share this machine: the cores split evenly, unless
/// the config sets its own. Pure.
pub fn threads_per_point(cores: usize, jobs: usize, configured: usize) -> usize {
    if configured > 0 { configured } else { (cores / jobs.max(1)).max(1) }
}

/// Where a local sweep starts a point, given this machine's GPU count and the GPUs its running
/// points hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    /// As its config says: the CPU, or a GPU it pins (`cuda:N`, N > 0), or a GPU that is not
    /// here (the point then fails with its own located error).
    AsConfigured,
    /// A GPU of its own: the point sees only GPU `k` (CUDA_VISIBLE_DEVICES), as its cuda:0.
    Gpu(usize),
    /// Every GPU is busy: the point waits for one.
    Wait,
}

/// One point per GPU: `auto` and `cuda` / `cuda:0` mean "a GPU", so they get the lowest free
/// one; a point pinned to `cuda:N` (N > 0) keeps it. Pure.
pub fn gpu_slot(device: crate::config::Device, gpus: usize, busy: &[usize]) -> Slot {
    use crate::config::Device;
    match device {
        Device::Cpu => Slot::AsConfigured,
        Device::Auto | Device::Cuda(0) if gpus > 0 => {
            (0..gpus).find(|k| !busy.contains(k)).map_or(Slot::Wait, Slot::Gpu)
        }
        Device::Cuda(n) if n > 0 && n < gpus && busy.contains(&n) => Slot::Wait,
        _ => Slot::AsConfigured,
    }
}

/// The GPU a point in this slot holds while it runs.
fn held_gpu(device: crate::config::Device, slot: Slot, gpus: usize) -> Option<usize> {
    match (slot, device) {
        (Slot::Gpu(k), _) => Some(k),
        (Slot::AsConfigured, crate::config::Device::Cuda(n)) if n < gpus => Some(n),
        _ => None,
    }
}

/// Runs the points that have not completed, `jobs` at a time, each as `minimind resume
/// <point>` (a child process in its own process group, so a Ctrl-C reaches only this driver,
/// which forwards it once). Progress lines go to stdout; each point logs to its train.log.
pub fn run_local(sweep: &Sweep, jobs: usize, stop: &Stop) -> Result<Ended> {
    if jobs == 0 {
        bail!("-j 0: a sweep runs at least one point at a time");
    }
    sweep.restore_missing()?;
    let exe = std::env::current_exe().context("finding this program's path")?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let gpus = crate::engine::gpu::probe().map_or(0, |g| g.names.len());
    let rows = sweep.refresh_index()?;
    let mut pending: Vec<&Point> =
        sweep.file.points.iter().filter(|p| rows[p.index].status != Status::Completed).collect();
    let done = sweep.file.points.len() - pending.len();
    if done > 0 {
        say(&format!("{done} point(s) already completed; {} to run", pending.len()));
    }
    pending.reverse();
    let children: Arc<Mutex<Vec<(u32, String)>>> = Arc::default();
    let forward = children.clone();
    // A second signal quits this driver at once: pass it on, so the points quit too.
    crate::signals::on_quit(Some(Box::new(move |sig| {
        for (pid, _) in forward.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            // SAFETY: signals a child this process started.
            unsafe { libc::kill(*pid as i32, sig) };
        }
    })));
    // Each running point with the GPU it holds, if any, and the pipe end it watches.
    let mut running: Vec<(Child, &Point, Option<usize>, std::os::fd::OwnedFd)> = Vec::new();
    let mut failed = 0;
    let mut forwarded = None;
    let mut last_refresh = Instant::now();
    let total = sweep.file.points.len();
    loop {
        if let Some(sig) = stop.requested()
            && forwarded.is_none()
        {
            forwarded = Some(sig);
            pending.clear();
            for (child, p, _, _) in &running {
                say(&format!("{}: stopping (checkpoint of its last complete step)", p.tag));
                // SAFETY: signals a child this process started.
                unsafe { libc::kill(child.id() as i32, sig) };
            }
        }
        while running.len() < jobs
            && let Some(&p) = pending.last()
        {
            let device = p.config.train.device;
            let busy: Vec<usize> = running.iter().filter_map(|r| r.2).collect();
            let slot = gpu_slot(device, gpus, &busy);
            if slot == Slot::Wait {
                break;
            }
            pending.pop();
            if let Some(ended) = wait_for_earlier_process(sweep, p, stop) {
                say(&format!("[{}/{total}] {} {ended}", p.index + 1, p.tag));
                if ended.starts_with("completed") {
                    continue;
                }
            }
            let threads = threads_per_point(cores, jobs, p.config.train.threads);
            let mut cmd = Command::new(&exe);
            cmd.arg("resume").arg(sweep.point_dir(p)).args(["--quiet", "--progress-every", "60"]);
            if p.config.train.threads == 0 {
                cmd.args(["--set", &format!("train.threads={threads}")]);
            }
            let mut place = format!("{threads} thread(s)");
            if let Slot::Gpu(k) = slot {
                cmd.env("CUDA_VISIBLE_DEVICES", k.to_string());
                place = format!("GPU {k}");
            }
            let (child, watched) = spawn_point(&mut cmd, &RunDir { root: sweep.point_dir(p) })?;
            say(&format!("[{}/{total}] {} started ({place}, pid {})", p.index + 1, p.tag, child.id()));
            children.lock().unwrap_or_else(|e| e.into_inner()).push((child.id(), p.tag.clone()));
            running.push((child, p, held_gpu(device, slot, gpus), watched));
        }
        if running.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        let mut i = 0;
        while i < running.len() {
            let Some(status) = running[i].0.try_wait().context("waiting for a point")? else {
                i += 1;
                continue;
            };
            let (child, p, _, _) = running.remove(i);
            children.lock().unwrap_or_else(|e| e.into_inner()).retain(|(pid, _)| *pid != child.id());
            let rows = sweep.refresh_index()?;
            let row = &rows[p.index];
            let line = match status.code() {
                Some(0) => format!(
                    "[{}/{total}] {} completed: {} steps, loss {}{}",
                    p.index + 1,
                    p.tag,
                    row.steps,
                    row.final_loss.map_or("-".into(), |l| format!("{l:.4}")),
                    row.best_val_loss.map_or(String::new(), |v| format!(", best val {v:.4}"))
                ),
                Some(c) if c > 128 => {
                    format!("[{}/{total}] {} stopped after step {}", p.index + 1, p.tag, row.steps)
                }
                code => {
                    failed += 1;
                    let why = if row.error.is_empty() {
                        first_error(&RunDir { root: sweep.point_dir(p) }, code)
                    } else {
                        row.error.clone()
                    };
                    format!("[{}/{total}] {} FAILED: {why}", p.index + 1, p.tag)
                }
            };
            say(&line);
        }
        if last_refresh.elapsed() > Duration::from_secs(5) {
            sweep.refresh_index()?;
            last_refresh = Instant::now();
        }
    }
    crate::signals::on_quit(None);
    sweep.refresh_index()?;
    Ok(match forwarded {
        Some(sig) => Ended::Stopped(sig),
        None => Ended::Done { failed },
    })
}

/// A point that a process of an earlier driver still trains (a driver killed with -9 leaves its
/// points stopping): waits for it to end, saying so, and returns how it ended; `None` when no
/// process holds it.
fn wait_for_earlier_process(sweep: &Sweep, p: &Point, stop: &Stop) -> Option<String> {
    let run = RunDir { root: sweep.point_dir(p) };
    let pid = run.holder()?;
    say(&format!(
        "{}: still trained by process {pid}, which an earlier sweep driver started; waiting for it to end",
        p.tag
    ));
    while run.holder().is_some() && stop.requested().is_none() {
        std::thread::sleep(Duration::from_millis(100));
    }
    let row = index_row(p, &run.root);
    Some(match row.status {
        Status::Completed => format!("completed (by process {pid}): {} steps", row.steps),
        other => format!("{other} after step {} in process {pid}; continuing it", row.steps),
    })
}

/// The first error a point's process printed (its stderr.log), for a FAILED line whose run
/// recorded none.
fn first_error(run: &RunDir, code: Option<i32>) -> String {
    let text = std::fs::read_to_string(run.stderr_path()).unwrap_or_default();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines.iter().find(|l| l.starts_with("error")).or(lines.first()).map(|l| l.to_string()).unwrap_or_else(
        || match code {
            Some(c) => format!("exit code {c}, nothing on stderr"),
            None => "killed by a signal".into(),
        },
    )
}

/// Starts a point's process in a process group of its own (a Ctrl-C reaches the driver, which
/// forwards it), stdout discarded (it logs to its run folder), stderr kept in its folder's
/// stderr.log. It gets the read end of a pipe whose write end only this driver holds
/// (`signals::watch_driver`): if the driver dies, the point stops with a checkpoint, so none
/// trains on unnoticed. Config variables are not passed on: the point's resolved file already
/// holds them.
fn spawn_point(cmd: &mut Command, run: &RunDir) -> Result<(Child, std::os::fd::OwnedFd)> {
    use std::os::unix::process::CommandExt;
    let path = run.stderr_path();
    let stderr = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(stderr).process_group(0);
    for (k, _) in std::env::vars() {
        if crate::config::is_config_var(&k) {
            cmd.env_remove(k);
        }
    }
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two descriptors; both ends close on exec, the read end is made
    // inheritable in the child alone (below).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the pipe a sweep point watches");
    }
    let (read_end, write_end) = (fds[0], fds[1]);
    cmd.env(crate::signals::DRIVER_FD_VAR, read_end.to_string());
    // SAFETY: between fork and exec only fcntl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            libc::fcntl(read_end, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let child = cmd.spawn().context("starting a sweep point");
    // SAFETY: the read end is the child's now; the write end is held (as an owned descriptor)
    // while the point runs, and closes when it ends or when this driver dies.
    unsafe { libc::close(read_end) };
    let write_end = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(write_end) };
    Ok((child?, write_end))
}

/// Prints the index as a table.
pub fn print_index(rows: &[IndexRow]) {
    say(&format!(
        "{:<4} {:<28} {:<10} {:>6} {:>9} {:>9} {:>9}  error",
        "#", "point", "status", "steps", "loss", "best val", "tok/s"
    ));
    let num = |v: Option<f64>, prec: usize| v.map_or("-".to_string(), |v| format!("{v:.prec$}"));
    for r in rows {
        say(&format!(
            "{:<4} {:<28} {:<10} {:>6} {:>9} {:>9} {:>9}  {}",
            r.index,
            r.tag,
            r.status,
            r.steps,
            num(r.final_loss, 4),
            num(r.best_val_loss, 4),
            num(r.tokens_per_s, 0),
            r.error
        ));
    }
}

/// `minimind status SWEEP_DIR`: the index refreshed from the point folders and, for a sweep
/// submitted to Slurm, each point's state in the queue.
pub fn status(dir: &Path) -> Result<()> {
    let sweep = Sweep::open(dir)?;
    let rows = sweep.refresh_index()?;
    print_index(&rows);
    if let Some(job) = &sweep.file.slurm_job {
        let queue = crate::slurm::queue(job);
        say(&format!("Slurm job {job}:"));
        for r in &rows {
            let state = queue.get(&r.index).map_or("not in the queue", String::as_str);
            say(&format!("  {:<4} {:<28} {state}", r.index, r.tag));
        }
    }
    Ok(())
}

/// The launcher a sweep uses: its file's, overridden by `-j` and `--launcher`.
pub fn launcher(
    from_file: &LauncherSection,
    jobs: Option<usize>,
    kind: Option<LauncherKind>,
) -> LauncherSection {
    let mut l = from_file.clone();
    if let Some(j) = jobs {
        l.jobs = j;
    }
    if let Some(k) = kind {
        l.kind = k;
    }
    l
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_point_folder_stays_inside_the_sweep() {
        for (folder, ok) in [
            ("moe=0,lr=1e-3", true),
            ("a", true),
            ("../x", false),
            ("a/b", false),
            ("/tmp/x", false),
            (".", false),
            ("..", false),
            ("", false),
        ] {
            assert_eq!(is_plain_folder_name(Path::new(folder)), ok, "{folder:?}");
        }
    }

    #[test]
    fn threads_table() {
        for (cores, jobs, configured, want) in
            [(16, 2, 0, 8), (2, 2, 0, 1), (2, 4, 0, 1), (16, 2, 3, 3), (1, 1, 0, 1)]
        {
            assert_eq!(
                threads_per_point(cores, jobs, configured),
                want,
                "{cores} cores, -j {jobs}, {configured}"
            );
        }
    }

    #[test]
    fn one_point_per_gpu() {
        use crate::config::Device::{Auto, Cpu, Cuda};
        let table: [(crate::config::Device, usize, &[usize], Slot); 10] = [
            (Cpu, 2, &[], Slot::AsConfigured),
            (Auto, 0, &[], Slot::AsConfigured),
            (Auto, 2, &[], Slot::Gpu(0)),
            (Auto, 2, &[0], Slot::Gpu(1)),
            (Cuda(0), 2, &[1], Slot::Gpu(0)),
            (Auto, 2, &[0, 1], Slot::Wait),
            (Cuda(1), 2, &[0], Slot::AsConfigured),
            (Cuda(1), 2, &[1], Slot::Wait),
            (Cuda(0), 0, &[], Slot::AsConfigured),
            (Cuda(3), 2, &[0, 1], Slot::AsConfigured),
        ];
        for (device, gpus, busy, want) in table {
            assert_eq!(gpu_slot(device, gpus, busy), want, "{device} with {gpus} GPU(s), busy {busy:?}");
        }
        assert_eq!(held_gpu(Cuda(1), Slot::AsConfigured, 2), Some(1));
        assert_eq!(held_gpu(Auto, Slot::Gpu(1), 2), Some(1));
        assert_eq!(held_gpu(Cpu, Slot::AsConfigured, 2), None);
    }
}
