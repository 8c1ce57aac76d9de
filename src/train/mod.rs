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


/// Decides device and dtype: `auto` is the first GPU when a driver and a GPU are found, else
/// the CPU (saying why); on the CPU bfloat16/float16 train in float32 (as MiniMind does on a
/// CPU) with one warning naming the key and where it was set. A GPU that cannot be used is a
/// config error at the origin of `train.device`. `origin` says where a key's value came from.
pub fn place(t: &TrainConfig, origin: &dyn Fn(&str) -> Origin) -> Result<Placement, ConfigError> {
    let mut notes = Vec::new();
    let device = match t.device {
        Device::Cpu => Device::Cpu,
        Device::Auto => match crate::engine::gpu::probe() {
            Ok(gpus) => {
                notes.push(format!("train.device = \"auto\": training on cuda:0 ({})", gpus.names[0]));
                Device::Cuda(0)
            }
            Err(why) => {
                let why = why.lines().next().unwrap_or_default().to_string();
                notes.push(format!("train.device = \"auto\": training on the CPU; {why}"));
                Device::Cpu
            }
        },
        Device::Cuda(n) => {
            let err = |msg: String| {
                ConfigError::new(origin("train.device"), Some("train.device"), msg)
                    .hint("set train.device = \"auto\" (a GPU when there is one, else the CPU) or \"cpu\"")
            };
            match crate::engine::gpu::probe() {
                Err(why) => return Err(err(format!("\"{}\": {why}", t.device))),
                Ok(gpus) if n >= gpus.names.len() => {
                    let list: Vec<String> =
                        gpus.names.iter().enumerate().map(|(i, name)| format!("cuda:{i} {name}")).collect();
                    return Err(err(format!(
                        "\"{}\": this machine has {} GPU(s): {}",
                        t.device,
                        gpus.names.len(),
                        list.join(", ")
                    )));
                }
                Ok(gpus) => {
                    notes.push(format!("training on cuda:{n} ({})", gpus.names[n]));
                    Device::Cuda(n)
                }
            }
        }
    };
    let dtype = match device {
        Device::Cuda(_) => t.dtype,
        _ => {
            if t.dtype != Dtype::Float32 {
                notes.push(format!(
                    "warning: train.dtype = \"{}\" (from {}): the CPU engine trains in float32, as MiniMind does on a CPU",
                    dtype_name(t.dtype),
                    origin("train.dtype")
                ));
            }
            Dtype::Float32
        }
    };
    Ok(Placement { device, dtype, notes })
}

/// How meta.json records a placement: requested and effective, for device and dtype.
pub fn choices(t: &TrainConfig, p: &Placement) -> (crate::run_dir::Choice, crate::run_dir::Choice) {
    use crate::run_dir::Choice;
    (
        Choice { requested: t.device.to_string(), effective: p.device.to_string() },
        Choice { requested: dtype_name(t.dtype).into(), effective: dtype_name(p.dtype).into() },
    )
}
