//! The training loop and what it needs around the engine.

pub mod checkpoint;
mod run;
pub mod schedule;

pub use run::{Outcome, Session, load_weights, train};

use anyhow::{Context, Result};

/// A rayon pool of `threads` workers (0: one per core) for the CPU engine.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting the CPU thread pool")
}

/// The CPU engine computes in float32; other dtypes need the CUDA engine.
pub fn require_cpu(t: &crate::config::TrainConfig) -> Result<()> {
    use crate::config::{Device, Dtype};
    if t.device == Device::Cuda {
        anyhow::bail!(
            "train.device = \"cuda\": this build has only the CPU engine\n  hint: --set train.device=\"cpu\""
        );
    }
    let dtype = match t.dtype {
        Dtype::Float32 => return Ok(()),
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Float16 => "float16",
    };
    anyhow::bail!(
        "train.dtype = \"{dtype}\": the CPU engine computes in float32 (bfloat16/float16 are for CUDA)\n  hint: --set train.dtype=\"float32\""
    )
}
