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
    // A reader's probe ([`lock_is_held`]) holds the lock for a moment: a few retries keep it
    // from being mistaken for an owner.
    let mut probes_waited = 0;
    loop {
        // SAFETY: flock on a file descriptor owned by `file`, which outlives the call.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            break;
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            std::io::ErrorKind::WouldBlock if probes_waited < 5 => {
                probes_waited += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
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

/// Whether a live process holds the lock at `path`: a probe that takes a shared lock for a
/// moment and never writes the file (a missing file is not held).
pub fn lock_is_held(path: &Path) -> bool {
    let Ok(file) = fs::File::open(path) else { return false };
    loop {
        // SAFETY: flock on a file descriptor owned by `file`; closing it releases the lock.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) } == 0 {
            return false;
        }
        match std::io::Error::last_os_error().kind() {
            std::io::ErrorKind::Interrupted => continue,
            std::io::ErrorKind::WouldBlock => return true,
            _ => return false,
        }
    }
}

/// The process id written in a lock file. Its holder writes it just after taking the lock, so
/// an empty file is read again for a moment; `None` when there is still none.
pub fn lock_holder(path: &Path) -> Option<String> {
    for _ in 0..20 {
        let text = fs::read_to_string(path).unwrap_or_default();
        let pid = text.trim();
        if !pid.is_empty() && pid.chars().all(|c| c.is_ascii_digit()) {
            return Some(pid.to_string());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    None
}

/// Why `path` cannot be (or become) a folder: the first part of it that exists but is not one
/// (a file, a link to nothing, a link loop), said plainly; `None` when nothing is in the way.
pub fn not_a_folder(path: &Path) -> Option<String> {
    let parts: Vec<&Path> = path.ancestors().filter(|p| !p.as_os_str().is_empty()).collect();
    for p in parts.into_iter().rev() {
        // A part that does not exist can be created, and so can everything below it.
        let meta = fs::symlink_metadata(p).ok()?;
        if meta.file_type().is_symlink() {
            match fs::metadata(p) {
                Ok(m) if m.is_dir() => continue,
                Ok(_) => return Some(format!("{} is a link to a file, not a folder", p.display())),
                Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                    return Some(format!("{} is a symbolic link loop", p.display()));
                }
                Err(_) => {
                    let target = fs::read_link(p).map_or_else(|_| "?".into(), |t| t.display().to_string());
                    return Some(format!("{} is a link to {target}, which does not exist", p.display()));
                }
            }
        } else if !meta.is_dir() {
            return Some(format!("{} is a file, not a folder", p.display()));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_holder_is_a_pid_or_none_never_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(".lock");
        for (text, want) in [("", None), ("\n", None), ("12345\n", Some("12345")), ("garbage", None)] {
            fs::write(&path, text).unwrap();
            assert_eq!(lock_holder(&path).as_deref(), want, "{text:?}");
        }
        assert_eq!(lock_holder(&dir.path().join("missing")), None);
    }

    #[test]
    fn what_is_in_the_way_of_a_folder() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("file"), "x").unwrap();
        std::os::unix::fs::symlink(d.join("nowhere"), d.join("dangling")).unwrap();
        std::os::unix::fs::symlink(d.join("loop"), d.join("loop")).unwrap();
        std::os::unix::fs::symlink(d.join("file"), d.join("to_file")).unwrap();
        fs::create_dir(d.join("dir")).unwrap();
        for (path, want) in [
            ("dir", None),
            ("dir/new/deeper", None),
            ("new", None),
            ("file", Some("file is a file, not a folder")),
            ("file/runs", Some("file is a file, not a folder")),
            ("dangling", Some("dangling is a link to")),
            ("loop/x", Some("loop is a symbolic link loop")),
            ("to_file", Some("to_file is a link to a file, not a folder")),
        ] {
            let got = not_a_folder(&d.join(path));
            match want {
                None => assert_eq!(got, None, "{path}"),
                Some(w) => assert!(got.as_deref().is_some_and(|g| g.contains(w)), "{path}: {got:?}"),
            }
        }
    }
}
