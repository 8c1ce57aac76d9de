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
            let cpu = if profiled { Cpu::profiled() } else { Cpu::new() };
            Ok(task.run(cpu.with_products(cpu_products(dtype)?)))
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

/// The CPU's matrix-product path for `dtype`: f32 for float32; for bfloat16 the CPU's bf16
/// path (mixed precision), an error where it has none (placement falls back to float32 first,
/// with a warning, so training never gets here without one).
pub fn cpu_products(dtype: Dtype) -> Result<super::cpu::bf16::Isa> {
    use super::cpu::bf16::{Isa, isa};
    match dtype {
        Dtype::Float32 => Ok(Isa::F32),
        Dtype::Bfloat16 => match isa() {
            Ok(Isa::F32) => anyhow::bail!(
                "the CPU engine has no bf16 path here (MINIMIND_CPU_ISA=f32 or no bf16 instructions)"
            ),
            Ok(path) => Ok(path),
            Err(why) => anyhow::bail!("{why}"),
        },
        Dtype::Float16 => anyhow::bail!("the CPU engine computes in float32 or bfloat16"),
    }
}
