//! Slurm: a sweep as one job array, one array task per point that has not completed, each
//! running `minimind resume <point>` into the same sweep folder (so index.csv, `resume` and
//! `status` work as for a local sweep); and the queue's view of it (`squeue`, `sacct`).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::config::LauncherSection;
use crate::metrics::say;
use crate::sweep::Sweep;

/// The job-array script for `points` (index, run folder) of a sweep. Pure.
pub fn script(
    name: &str,
    launcher: &LauncherSection,
    exe: &Path,
    log_dir: &Path,
    points: &[(usize, &Path, usize)],
) -> String {
    let mut s = String::from("#!/bin/bash\n");
    let ids: Vec<String> = points.iter().map(|(i, _, _)| i.to_string()).collect();
    s.push_str(&format!("#SBATCH --job-name=minimind-{name}\n"));
    s.push_str(&format!("#SBATCH --array={}\n", ids.join(",")));
    s.push_str(&format!("#SBATCH --output={}/%a.out\n", log_dir.display()));
    s.push_str(&format!("#SBATCH --cpus-per-task={}\n", launcher.cpus_per_task));
    if launcher.tasks_per_point > 1 {
        s.push_str(&format!("#SBATCH --ntasks={}\n", launcher.tasks_per_point));
    }
    if launcher.gpus_per_task > 0 {
        s.push_str(&format!("#SBATCH --gpus-per-task={}\n", launcher.gpus_per_task));
    }
    for (flag, value) in
        [("partition", &launcher.partition), ("time", &launcher.time), ("mem", &launcher.mem)]
    {
        if let Some(v) = value {
            s.push_str(&format!("#SBATCH --{flag}={v}\n"));
        }
    }
    for extra in &launcher.extra_sbatch {
        s.push_str(&format!("#SBATCH {extra}\n"));
    }
    // Several tasks: one point's data-parallel ranks, which find each other through PMIx; one
    // that fails ends the rest.
    let srun = if launcher.tasks_per_point > 1 { "srun --mpi=pmix --kill-on-bad-exit=1 " } else { "" };
    s.push_str("set -eu\ncase \"$SLURM_ARRAY_TASK_ID\" in\n");
    for (i, dir, threads) in points {
        let threads = if *threads > 0 {
            String::new()
        } else {
            format!(" --set train.threads={}", launcher.cpus_per_task)
        };
        s.push_str(&format!("  {i}) exec {srun}{} resume {} --quiet{threads} ;;\n", quote(exe), quote(dir)));
    }
    s.push_str("  *) echo \"no point $SLURM_ARRAY_TASK_ID in this sweep\" >&2; exit 2 ;;\nesac\n");
    s
}

/// A path in single quotes for the shell.
fn quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

/// Submits the points that have not completed as one job array; records the job id in
/// sweep.toml. `sbatch` missing or refusing the job is an error quoting it.
pub fn submit(sweep: &Sweep) -> Result<()> {
    let rows = sweep.refresh_index()?;
    if let Some(job) = &sweep.file.slurm_job {
        let active = queue(job)
            .into_values()
            .any(|s| matches!(s.as_str(), "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING"));
        if active {
            bail!(
                "job {job} of this sweep is still in the queue\n  hint: minimind status {} ; scancel {job} to stop it",
                sweep.root.display()
            );
        }
    }
    let todo: Vec<_> = sweep
        .file
        .points
        .iter()
        .filter(|p| rows[p.index].status != crate::run_dir::Status::Completed)
        .collect();
    if todo.is_empty() {
        say("every point has completed");
        return Ok(());
    }
    let exe = std::env::current_exe().context("finding this program's path")?;
    let log_dir = sweep.root.join("slurm");
    std::fs::create_dir_all(&log_dir).with_context(|| format!("creating {}", log_dir.display()))?;
    let dirs: Vec<_> = todo.iter().map(|p| (p.index, sweep.point_dir(p), p.config.train.threads)).collect();
    let points: Vec<(usize, &Path, usize)> = dirs.iter().map(|(i, d, t)| (*i, d.as_path(), *t)).collect();
    let text = script(&sweep.file.name, &sweep.file.launcher, &exe, &log_dir, &points);
    let path = log_dir.join("array.sh");
    crate::files::write_atomic(&path, text.as_bytes())?;
    let out = Command::new("sbatch").arg("--parsable").arg(&path).output();
    let out = match out {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "sbatch not found: the Slurm launcher needs a Slurm client on this machine\n  hint: to run the sweep here: minimind resume {} --launcher local",
                sweep.root.display()
            )
        }
        Err(e) => return Err(e).context("running sbatch"),
    };
    if !out.status.success() {
        bail!(
            "sbatch refused the job array {}:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let job = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string();
    let mut updated = sweep.clone();
    updated.file.slurm_job = Some(job.clone());
    updated.save()?;
    say(&format!(
        "submitted Slurm job array {job}: {} task(s), one per point; follow it with: minimind status {}",
        todo.len(),
        sweep.root.display()
    ));
    Ok(())
}

/// The queue's state of each array task of `job` (`squeue`, then `sacct` for finished ones),
/// by task index; empty when neither answers.
pub fn queue(job: &str) -> BTreeMap<usize, String> {
    let mut states = BTreeMap::new();
    let run = |cmd: &mut Command| {
        cmd.output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
    };
    if let Some(text) = run(Command::new("sacct").args(["-j", job, "-n", "-P", "-X", "-o", "JobID,State"])) {
        states.extend(parse_sacct(&text));
    }
    if let Some(text) = run(Command::new("squeue").args(["-j", job, "-h", "-r", "-o", "%K %T"])) {
        for line in text.lines() {
            let mut parts = line.split_whitespace();
            if let (Some(Ok(i)), Some(state)) = (parts.next().map(str::parse::<usize>), parts.next()) {
                states.insert(i, state.to_string());
            }
        }
    }
    states
}

/// `12345_3|COMPLETED` lines into {3: COMPLETED}. Pure.
pub fn parse_sacct(text: &str) -> BTreeMap<usize, String> {
    text.lines()
        .filter_map(|l| {
            let (id, state) = l.split_once('|')?;
            let task = id.split_once('_')?.1.parse().ok()?;
            Some((task, state.split_whitespace().next()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_array_script_runs_each_point() {
        let l = LauncherSection {
            partition: Some("debug".into()),
            time: Some("00:10:00".into()),
            extra_sbatch: vec!["--account=ml".into()],
            ..LauncherSection::default()
        };
        let s = script(
            "lr",
            &l,
            Path::new("/x/minimind"),
            Path::new("/r/s/slurm"),
            &[(0, Path::new("/r/s/a=1"), 0), (2, Path::new("/r/s/it's"), 3)],
        );
        for line in [
            "#SBATCH --array=0,2",
            "#SBATCH --cpus-per-task=2",
            "#SBATCH --partition=debug",
            "#SBATCH --time=00:10:00",
            "#SBATCH --account=ml",
            "  0) exec '/x/minimind' resume '/r/s/a=1' --quiet --set train.threads=2 ;;",
            "  2) exec '/x/minimind' resume '/r/s/it'\\''s' --quiet ;;",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} in\n{s}");
        }
        assert!(!s.contains("--mem") && !s.contains("--gpus") && !s.contains("srun"), "{s}");
        let ranks = LauncherSection { tasks_per_point: 2, ..l };
        let s = script(
            "lr",
            &ranks,
            Path::new("/x/minimind"),
            Path::new("/r/s/slurm"),
            &[(1, Path::new("/r/p"), 1)],
        );
        for line in [
            "#SBATCH --ntasks=2",
            "  1) exec srun --mpi=pmix --kill-on-bad-exit=1 '/x/minimind' resume '/r/p' --quiet ;;",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} in\n{s}");
        }
    }

    #[test]
    fn sacct_lines() {
        let text = "77_0|COMPLETED\n77_1|FAILED\n77|RUNNING\n77_2|CANCELLED by 0\n";
        let got = parse_sacct(text);
        assert_eq!(got.get(&0).map(String::as_str), Some("COMPLETED"));
        assert_eq!(got.get(&1).map(String::as_str), Some("FAILED"));
        assert_eq!(got.get(&2).map(String::as_str), Some("CANCELLED"));
        assert_eq!(got.len(), 3);
    }
}
