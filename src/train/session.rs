//! What a training session is and how it ends: the knobs of one process's session (resume,
//! signals, console, the ranks it trains with) and its outcome.

use std::path::PathBuf;
use std::time::Duration;

use crate::dist::World;
use crate::engine::comm::CommChoice;
use crate::run_dir::Override;
use crate::signals::Stop;

/// How a training session ended (errors are returned as errors).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Completed,
    /// Stopped by a signal (its number), after writing a checkpoint of the last complete step.
    Stopped(i32),
}

impl Outcome {
    /// The process exit code: 0, or 128 + the signal.
    pub fn exit_code(self) -> u8 {
        match self {
            Outcome::Completed => 0,
            Outcome::Stopped(sig) => (128 + sig) as u8,
        }
    }
}

/// A resume's own settings.
#[derive(Clone, Debug, Default)]
pub struct ResumeRequest {
    /// `--set` values given to the resume, recorded in meta.json.
    pub overrides: Vec<Override>,
    /// Continue even though the data, tokenizer or tokens changed since the checkpoint.
    pub allow_data_change: bool,
    /// Warnings about the request itself (settings it ignores), for the run header and meta.json.
    pub warnings: Vec<String>,
}

/// Knobs of one session that are not part of the experiment.
#[derive(Clone)]
pub struct Session {
    /// Continue from the run's last complete checkpoint.
    pub resume: Option<ResumeRequest>,
    /// Set by a signal: stop at the next micro-batch boundary.
    pub stop: Stop,
    /// Testing aid: behave as if SIGINT arrived right after this step.
    pub stop_after: Option<usize>,
    /// No progress bars (lines only).
    pub quiet: bool,
    /// Without a progress bar, print a progress line when nothing was printed for this long.
    pub heartbeat: Duration,
    /// The ranks that train this run together (a world of one without a launcher).
    pub world: World,
    /// Testing aid: which communicator carries the gradients (`device` runs NCCL even alone).
    pub comm: CommChoice,
    /// Testing aid: every micro-batch this rank trains, as its sample indices, is appended to
    /// `<trace>.<rank>` ("STEP: i i i ...").
    pub trace: Option<PathBuf>,
}

impl Session {
    /// A session of one process with default knobs.
    pub fn new(stop: Stop) -> Session {
        Session {
            resume: None,
            stop,
            stop_after: None,
            quiet: true,
            heartbeat: Duration::ZERO,
            world: World::single(),
            comm: CommChoice::Auto,
            trace: None,
        }
    }
}

/// A resume refused before it changed anything (the run stays as it was).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(super) struct Refused(pub String);
