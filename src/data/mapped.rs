//! Read-only memory maps of token-cache files that survive being cut short under a live run.
//!
//! A mapped file truncated by another process makes the next read of a page past its new end
//! raise SIGBUS, whose default action kills the run silently (nothing printed, meta.json left
//! "running"). Every mapping made here is registered; a SIGBUS handler that finds the faulting
//! address inside one maps a page of zeros over it (so the read completes) and marks that
//! mapping as changed. The trainer asks [`changed`] before every update and fails the run,
//! naming the file, before those zeros reach the weights. A SIGBUS anywhere else goes to the
//! handler that was there before (Rust's own, then the default action).
//!
//! Why not a private copy: reading the cache into memory defeats mapping it (the data would
//! have to fit in RAM), and a private mapping (MAP_PRIVATE) faults the same way on a truncated
//! file.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use memmap2::Mmap;

/// Mappings that can be live at once (a run maps two files per cache, training and validation).
const SLOTS: usize = 64;

/// Each slot's mapped range (start, length); start 0 is a free slot. Read by the handler.
static RANGES: [(AtomicUsize, AtomicUsize); SLOTS] =
    [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; SLOTS];
/// 1 + the slot of a mapping found cut short (0: none).
static CHANGED: AtomicUsize = AtomicUsize::new(0);
/// The page size, for the handler.
static PAGE: AtomicUsize = AtomicUsize::new(0);
/// Each slot's file, for the message (never touched by the handler).
static PATHS: Mutex<Vec<Option<PathBuf>>> = Mutex::new(Vec::new());
/// The SIGBUS action before ours, restored for faults that are not ours.
static PREVIOUS: Mutex<Option<libc::sigaction>> = Mutex::new(None);
static INSTALL: std::sync::Once = std::sync::Once::new();

/// A read-only mapping of a cache file, registered for the SIGBUS handler while it lives.
pub struct Mapped {
    map: Mmap,
    slot: Option<usize>,
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            RANGES[slot].0.store(0, Ordering::Release);
            if let Some(p) = PATHS.lock().unwrap_or_else(|e| e.into_inner()).get_mut(slot) {
                *p = None;
            }
        }
    }
}

/// Maps `file` (at `path`) read-only. With every slot taken the mapping works but is not
/// protected (a truncation then ends the process with SIGBUS, as without this module).
pub fn map(file: &File, path: &Path) -> std::io::Result<Mapped> {
    INSTALL.call_once(install);
    // SAFETY: the cache files are written once and renamed into place; a truncation by
    // another process is what this module turns into an error (see the module text).
    let map = unsafe { Mmap::map(file) }?;
    let mut paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    paths.resize(SLOTS, None);
    let slot = (0..SLOTS).find(|&i| RANGES[i].0.load(Ordering::Acquire) == 0 && paths[i].is_none());
    if let Some(i) = slot {
        paths[i] = Some(path.to_path_buf());
        RANGES[i].1.store(map.len(), Ordering::Release);
        RANGES[i].0.store(map.as_ptr() as usize, Ordering::Release);
    }
    Ok(Mapped { map, slot })
}

/// The file of a mapping that was found cut short since the process started, if any.
pub fn changed() -> Option<PathBuf> {
    let slot = CHANGED.load(Ordering::Acquire).checked_sub(1)?;
    let paths = PATHS.lock().unwrap_or_else(|e| e.into_inner());
    Some(paths.get(slot).cloned().flatten().unwrap_or_else(|| PathBuf::from("a token cache file")))
}

fn install() {
    // SAFETY: sysconf and sigaction with a zeroed, then filled, struct; the handler only uses
    // atomics and mmap (a plain system call).
    unsafe {
        PAGE.store(libc::sysconf(libc::_SC_PAGESIZE).max(4096) as usize, Ordering::Release);
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut old) == 0 {
            *PREVIOUS.lock().unwrap_or_else(|e| e.into_inner()) = Some(old);
        }
    }
}

extern "C" fn on_sigbus(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    let page = PAGE.load(Ordering::Acquire);
    // Only a fault past the end of a mapped file (BUS_ADRERR) can be ours; si_addr means
    // nothing for a SIGBUS sent with kill.
    let ranges = if code == libc::BUS_ADRERR { &RANGES[..] } else { &[] };
    for (i, (start, len)) in ranges.iter().enumerate() {
        let (start, len) = (start.load(Ordering::Acquire), len.load(Ordering::Acquire));
        if start == 0 || addr < start || addr >= start + len {
            continue;
        }
        let at = addr & !(page - 1);
        // SAFETY: replaces one page inside a mapping this process owns with zeros.
        let p = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if p != libc::MAP_FAILED {
            CHANGED.store(i + 1, Ordering::Release);
            return;
        }
    }
    // Not ours: the previous action takes it (a fault re-raises when the instruction runs
    // again; a sent signal is raised again here, delivered once this handler returns).
    // `try_lock`: a handler must not block; the lock is only ever held while installing.
    if let Ok(previous) = PREVIOUS.try_lock()
        && let Some(old) = previous.as_ref()
    {
        // SAFETY: restores the action that was installed before ours.
        unsafe { libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()) };
    } else {
        // SAFETY: the default action, so the signal ends the process as it would have.
        unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
    }
    if code <= 0 {
        // SAFETY: raise is async-signal-safe.
        unsafe { libc::raise(libc::SIGBUS) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_cut_short_under_its_map_reads_zeros_and_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.bin");
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        std::fs::write(&path, vec![7u8; 4 * page]).unwrap();
        let file = File::open(&path).unwrap();
        let map = map(&file, &path).unwrap();
        let read = |i: usize| unsafe { std::ptr::read_volatile(map.as_ptr().add(i)) };
        assert_eq!(read(3 * page), 7);
        assert!(changed().is_none());
        File::options().write(true).open(&path).unwrap().set_len(page as u64).unwrap();
        // Past the new end: a SIGBUS, turned into zeros and a report naming the file.
        assert_eq!(read(3 * page + 5), 0);
        assert_eq!(changed(), Some(path.clone()));
        assert_eq!(read(0), 7, "the part still in the file reads as before");
    }
}
