//! The one place a backend is chosen: a placement's device becomes kernels, and a task runs
//! generically over them (the training loop, evaluation, generation and the benchmark are
//! written once, over `K: Kernels`).

use anyhow::Result;

use super::Kernels;
use super::cpu::Cpu;
use crate::config::{Device, Dtype};

/// Work written once for every backend.
pub trait Task {
    type Out;
    fn run<K: Kernels>(self, kernels: K) -> Self::Out;
}

/// Runs `task` on `device` (already resolved: `auto` means the CPU here) computing in
/// `dtype`; `profiled` records every kernel call (timed on the CPU and on a GPU; the CUDA
/// emulator counts them).
pub fn run<T: Task>(device: Device, dtype: Dtype, profiled: bool, task: T) -> Result<T::Out> {
    match device {
        Device::Auto | Device::Cpu => {
            anyhow::ensure!(dtype == Dtype::Float32, "the CPU engine computes in float32");
            Ok(task.run(if profiled { Cpu::profiled() } else { Cpu::new() }))
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(ordinal) => {
            let mut cuda = super::cuda::Cuda::new(ordinal, dtype)?;
            cuda.set_profiling(profiled);
            Ok(task.run(cuda))
        }
        #[cfg(not(feature = "cuda"))]
        Device::Cuda(_) => {
            let _ = dtype;
            anyhow::bail!("this build has no CUDA engine (build with `--features cuda`)")
        }
    }
}
