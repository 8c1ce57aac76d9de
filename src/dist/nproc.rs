//! `minimind run FILE --nproc N`: N local ranks through Open MPI's `mpirun`, this process
//! watching them. mpirun runs in a process group of its own, so a Ctrl-C reaches only this
//! process, which passes it straight to the ranks: they stop together at the end of the step
//! with a checkpoint (mpirun itself, signalled, would kill them a second later).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::signals::Stop;

/// mpirun's arguments for `np` ranks of `exe args`. Pure.
pub fn mpirun_args(np: usize, exe: &Path, args: &[String], as_root: bool) -> Vec<String> {
    let mut v: Vec<String> = vec!["-np".into(), np.to_string(), "--oversubscribe".into()];
    // Each rank runs its own thread pool over its share of the cores: no pinning to one core.
    v.extend(["--bind-to".into(), "none".into()]);
    if as_root {
        v.push("--allow-run-as-root".into());
    }
    v.push(exe.display().to_string());
    v.extend(args.iter().cloned());
    v
}

/// The command line without its `--nproc N` / `--nproc=N`. Pure.
pub fn without_nproc(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if a == "--nproc" {
            skip = true;
        } else if !a.starts_with("--nproc=") {
            out.push(a.clone());
        }
    }
    out
}

/// `program` on PATH.
pub fn on_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Runs `args` (this program's arguments without `--nproc`) as `np` ranks under mpirun and
/// returns mpirun's exit code. Signals go to the ranks.
pub fn launch(np: usize, args: &[String], stop: &Stop) -> Result<i32> {
    let mpirun = on_path("mpirun").context(
        "mpirun not found: --nproc starts its ranks with Open MPI's mpirun\n  hint: install it (Debian: apt install openmpi-bin), or start the ranks with your own launcher (srun --mpi=pmix)",
    )?;
    let exe = std::env::current_exe().context("finding this program's path")?;
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let mut cmd = Command::new(&mpirun);
    cmd.args(mpirun_args(np, &exe, args, root));
    // The ranks are this process's, not a sweep driver's: they must not watch its pipe.
    cmd.env_remove(crate::signals::DRIVER_FD_VAR);
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().with_context(|| format!("starting {}", mpirun.display()))?;
    let mpirun_pid = child.id();
    // A second signal quits this process: the ranks get it too and quit at once.
    crate::signals::on_quit(Some(Box::new(move |sig| signal_ranks(mpirun_pid, sig))));
    let mut forwarded = false;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for mpirun")? {
            break status;
        }
        if let Some(sig) = stop.requested()
            && !forwarded
        {
            signal_ranks(mpirun_pid, sig);
            forwarded = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    crate::signals::on_quit(None);
    Ok(status
        .code()
        .unwrap_or_else(|| 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)))
}

/// Sends `sig` to mpirun's children (the ranks), found through /proc.
fn signal_ranks(mpirun: u32, sig: i32) {
    for pid in children(mpirun) {
        // SAFETY: signals a process this one's child started.
        unsafe { libc::kill(pid as i32, sig) };
    }
}

/// The processes whose parent is `parent`.
fn children(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split
            // after its closing parenthesis.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).ok().is_some_and(|s| {
                s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mpirun_command_lines() {
        let args: Vec<String> = ["run", "x.toml", "--nproc", "2", "--set", "train.threads=1", "--nproc=3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let rest = without_nproc(&args);
        assert_eq!(rest, ["run", "x.toml", "--set", "train.threads=1"]);
        let v = mpirun_args(2, Path::new("/bin/minimind"), &rest, true);
        assert_eq!(
            v.join(" "),
            "-np 2 --oversubscribe --bind-to none --allow-run-as-root /bin/minimind run x.toml --set train.threads=1"
        );
        assert!(!mpirun_args(2, Path::new("m"), &rest, false).contains(&"--allow-run-as-root".to_string()));
    }

    #[test]
    fn children_of_this_process() {
        let mut child = Command::new("sleep").arg("5").spawn().unwrap();
        let found = children(std::process::id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(found.contains(&child.id()), "{found:?}");
    }
}
