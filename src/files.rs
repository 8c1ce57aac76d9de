//! Generic file utilities: atomic and synced writes, folder syncs, advisory file locks. What
//! the run folder, checkpoints, the token cache and sweeps build on; no file names live here
//! (`run_dir` owns those).

use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};

/// Writes a file under a temporary name of its own (unique per process and call, so two
/// writers never share one), syncs it, then renames it into place.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = path.file_name().map_or_else(|| "file".into(), |n| n.to_string_lossy().to_string());
    let unique = format!(".{name}.{}.{}.tmp", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let tmp = path.with_file_name(unique);
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

/// Syncs a folder's entries to disk (a rename inside it is durable once this returns);
/// best effort.
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// An exclusive advisory lock (flock) on `path`, created if missing, with this process's id
/// written into it. `wait`: block until it is free; else `None` when another process holds it.
pub fn lock_file(path: &Path, wait: bool) -> Result<Option<fs::File>> {
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .with_context(|| format!("opening the lock file {}", path.display()))?;
    let op = if wait { libc::LOCK_EX } else { libc::LOCK_EX | libc::LOCK_NB };
    loop {
        // SAFETY: flock on a file descriptor owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock => return Ok(None),
            std::io::ErrorKind::Interrupted => continue,
            _ => return Err(e).with_context(|| format!("locking {}", path.display())),
        }
    }
    file.set_len(0)
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("writing this process's id into {}", path.display()))?;
    Ok(Some(file))
}

/// The process id written in a lock file ("unknown" when it cannot be read).
pub fn lock_holder(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    match text.trim() {
        "" => "unknown".into(),
        pid => pid.into(),
    }
}
