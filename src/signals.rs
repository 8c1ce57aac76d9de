//! Stop requests. SIGINT, SIGTERM and SIGHUP are acknowledged at once and become a flag that
//! long work reads at its safe points (training: every micro-batch; tokenising: every chunk).
//! A second signal quits at once, after recording the stop through the registered hook; what
//! is on disk stays valid because every file is written atomically.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};

/// A shared "please stop" flag: 0, or the number of the signal that asked.
#[derive(Clone, Debug, Default)]
pub struct Stop(Arc<AtomicUsize>);

impl Stop {
    /// A flag that only [`Stop::request`] sets (benchmarks, tests, library use).
    pub fn never() -> Stop {
        Stop::default()
    }

    /// The signal that asked to stop, if one did.
    pub fn requested(&self) -> Option<i32> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            sig => Some(sig as i32),
        }
    }

    /// Asks to stop as if `sig` had arrived.
    pub fn request(&self, sig: i32) {
        let _ = self.0.compare_exchange(0, sig as usize, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// `Err(Interrupted)` once a stop was asked for: for loops that give up their work.
    pub fn check(&self) -> Result<(), Interrupted> {
        match self.requested() {
            Some(sig) => Err(Interrupted(sig)),
            None => Ok(()),
        }
    }
}

/// Work abandoned because a signal asked to stop (not a failure).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("interrupted by {}", name(*.0))]
pub struct Interrupted(pub i32);

/// `SIGINT`, `SIGTERM`, ...
pub fn name(sig: i32) -> String {
    match sig {
        SIGINT => "SIGINT".into(),
        SIGTERM => "SIGTERM".into(),
        SIGHUP => "SIGHUP".into(),
        other => format!("signal {other}"),
    }
}

type QuitHook = Box<dyn Fn(i32) + Send>;

/// What a forced quit (a second signal) does before exiting: records the stop.
static QUIT_HOOK: Mutex<Option<QuitHook>> = Mutex::new(None);

/// Sets the hook a second signal runs before the process exits; `None` clears it.
pub fn on_quit(hook: Option<QuitHook>) {
    *QUIT_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// What a first signal records at once, besides asking to stop (data parallel: a launcher
/// that saw a signal or a dead rank kills every rank a moment later, maybe while this one
/// waits for the others in a collective, so the stop cannot wait for the end of the step).
static FIRST_HOOK: Mutex<Option<QuitHook>> = Mutex::new(None);

/// Sets the hook a first signal runs; `None` clears it.
pub fn on_first_signal(hook: Option<QuitHook>) {
    *FIRST_HOOK.lock().unwrap_or_else(|e| e.into_inner()) = hook;
}

/// Routes SIGINT, SIGTERM and SIGHUP to the returned flag, acknowledging each on stderr.
pub fn install() -> Result<Stop> {
    let stop = Stop::default();
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .context("installing signal handlers")?;
    let flag = stop.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let mut err = std::io::stderr();
                if flag.requested().is_none() {
                    flag.request(sig);
                    if let Some(hook) = FIRST_HOOK.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                        hook(sig);
                    }
                    let again = if sig == SIGINT { "Ctrl-C" } else { "send it" };
                    let _ = writeln!(
                        err,
                        "\n{}: stopping after this micro-batch (a checkpoint of the last complete step is written); {again} again to quit now",
                        name(sig)
                    );
                    continue;
                }
                let _ = writeln!(err, "\n{}: quitting now; the previous checkpoint stays valid", name(sig));
                if let Some(hook) = QUIT_HOOK.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
                    hook(sig);
                }
                std::process::exit(128 + sig);
            }
        })
        .context("starting the signal thread")?;
    Ok(stop)
}

/// The variable through which a sweep driver hands its points the read end of a pipe whose
/// write end only the driver holds: when the driver dies, however it dies, the read returns.
pub const DRIVER_FD_VAR: &str = "MINIMIND_SWEEP_DRIVER_FD";

/// In a sweep point: a thread that waits for the driver's end of the pipe to close and then
/// sends this process SIGTERM, once, so it stops with a checkpoint as for any SIGTERM. (Linux's
/// parent-death signal would fire again each time the dying driver's threads hand the process
/// on to each other, which reads as a second signal: quit at once.)
pub fn watch_driver() {
    let Some(fd) = std::env::var(DRIVER_FD_VAR).ok().and_then(|v| v.parse::<i32>().ok()) else { return };
    // Only the pipe a driver handed over (a variable inherited by mistake may name any
    // descriptor of this process: leave those alone).
    // SAFETY: fstat into a zeroed struct; a bad descriptor fails harmlessly.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd, &mut st) } != 0 || st.st_mode & libc::S_IFMT != libc::S_IFIFO {
        return;
    }
    // Not for this process's own children.
    // SAFETY: fcntl on a descriptor this process owns.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return;
    }
    let _ = std::thread::Builder::new().name("sweep-driver".into()).spawn(move || {
        let mut byte = [0u8; 1];
        loop {
            // SAFETY: reads into a 1-byte buffer from a descriptor this process owns.
            let n = unsafe { libc::read(fd, byte.as_mut_ptr().cast(), 1) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            if n <= 0 {
                break;
            }
        }
        // SAFETY: a process-directed signal to this process, handled by `install`'s thread.
        unsafe { libc::kill(libc::getpid(), SIGTERM) };
    });
}

/// Testing aid (`--crash-at POINT`): the place where the process kills itself with SIGKILL,
/// exactly as `kill -9` would at that moment.
static CRASH_AT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn set_crash_point(point: String) {
    let _ = CRASH_AT.set(point);
}

/// Dies here when the crash point is `name` or `name:step`; the point `panic` panics instead
/// (to test that a panic is recorded as a failure).
pub fn crash_point(name: &str, step: usize) {
    if let Some(at) = CRASH_AT.get()
        && (at == name || *at == format!("{name}:{step}"))
    {
        if name == "panic" {
            panic!("testing aid: --crash-at {at}");
        }
        // SAFETY: sends a signal to this very process.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
