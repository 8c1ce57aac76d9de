//! The CPU's worker threads: one rayon pool per use (the engine's kernels, tokenising a data
//! file, measuring the machine), sized by the caller.

use anyhow::{Context, Result};

/// A rayon pool of `threads` workers (0: one per core).
pub fn pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting the CPU thread pool")
}
