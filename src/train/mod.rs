//! The training loop and what it needs around the engine.

pub mod checkpoint;
mod run;
pub mod schedule;

pub use run::{Outcome, ResumeRequest, Session, load_weights, train};

use anyhow::{Context, Result};

use crate::config::{ConfigError, Device, Dtype, Origin, TrainConfig};

/// A rayon pool of `threads` workers (0: one per core) for the CPU engine.
pub fn thread_pool(threads: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().context("starting the CPU thread pool")
}

/// Where a run trains and in which precision, decided from `[train]` and this build/machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    pub dtype: Dtype,
    /// Warnings and choices to print in the run header (dtype replaced, `auto` resolved).
    pub notes: Vec<String>,
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::Float32 => "float32",
        Dtype::Bfloat16 => "bfloat16",
        Dtype::Float16 => "float16",
    }
}

pub fn device_name(d: Device) -> &'static str {
    match d {
        Device::Auto => "auto",
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
    }
}

/// Decides device and dtype. Until the CUDA engine lands, `auto` means the CPU, and on the CPU
/// bfloat16/float16 train in float32 (as MiniMind does on a CPU) with one warning naming the
/// key and where it was set. A combination that cannot run is a config error at its origin.
/// `origin` says where a key's value came from.
pub fn place(t: &TrainConfig, origin: &dyn Fn(&str) -> Origin) -> Result<Placement, ConfigError> {
    let mut notes = Vec::new();
    match t.device {
        Device::Cuda => {
            return Err(ConfigError::new(
                origin("train.device"),
                Some("train.device"),
                "\"cuda\": this build has only the CPU engine",
            )
            .hint("set train.device = \"auto\" (the GPU once the CUDA engine lands, the CPU until then) or \"cpu\""));
        }
        Device::Auto => {
            notes.push("train.device = \"auto\": training on the CPU (this build has no CUDA engine)".into())
        }
        Device::Cpu => {}
    }
    if t.dtype != Dtype::Float32 {
        notes.push(format!(
            "warning: train.dtype = \"{}\" (from {}): the CPU engine trains in float32, as MiniMind does on a CPU",
            dtype_name(t.dtype),
            origin("train.dtype")
        ));
    }
    Ok(Placement { device: Device::Cpu, dtype: Dtype::Float32, notes })
}

/// How meta.json records a placement: requested and effective, for device and dtype.
pub fn choices(t: &TrainConfig, p: &Placement) -> (crate::run_dir::Choice, crate::run_dir::Choice) {
    use crate::run_dir::Choice;
    (
        Choice { requested: device_name(t.device).into(), effective: device_name(p.device).into() },
        Choice { requested: dtype_name(t.dtype).into(), effective: dtype_name(p.dtype).into() },
    )
}
