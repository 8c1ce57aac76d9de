//! The training loop and what it needs around the engine.

pub mod checkpoint;
mod edits;
mod ranks;
mod run;
pub mod schedule;
mod session;
mod start;
mod trainer;
mod warnings;

pub use edits::RESUMABLE_KEYS;
pub use ranks::gpu as rank_gpu;
pub use run::{follow, train};
pub use session::{Outcome, ResumeRequest, Session};

use anyhow::Result;

use crate::config::{ConfigError, Device, Dtype, Origin, TrainConfig};

/// AdamW's settings from the user's `[train]` section (the engine knows only its own config).
pub fn optim_config(t: &TrainConfig) -> crate::engine::OptimConfig {
    crate::engine::OptimConfig {
        beta1: t.betas[0] as f32,
        beta2: t.betas[1] as f32,
        eps: t.eps as f32,
        weight_decay: t.weight_decay as f32,
        grad_clip: t.grad_clip as f32,
    }
}

/// Where a run trains and in which precision, decided from `[train]` and this build/machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub device: Device,
    pub dtype: Dtype,
    /// What `train.device` resolved to (unless it was plainly the CPU): a rank of several
    /// replaces it with its own GPU.
    pub device_note: Option<String>,
    /// Warnings to print in the run header (dtype replaced).
    pub notes: Vec<String>,
}

impl Placement {
    /// Every note for the run header, the device's first.
    pub fn all_notes(&self) -> impl Iterator<Item = &String> {
        self.device_note.iter().chain(&self.notes)
    }
}

/// Decides device and dtype: `auto` is the first GPU when a driver and a GPU are found, else
/// the CPU (saying why); on the CPU bfloat16/float16 train in float32 (as MiniMind does on a
/// CPU) with one warning naming the key and where it was set. A GPU that cannot be used is a
/// config error at the origin of `train.device`. `origin` says where a key's value came from.
pub fn place(t: &TrainConfig, origin: &dyn Fn(&str) -> Origin) -> Result<Placement, ConfigError> {
    let mut notes = Vec::new();
    let mut device_note = None;
    let device = match choose_device(t.device) {
        Ok((device, what)) => {
            if t.device != Device::Cpu {
                device_note = Some(format!("train.device = \"{}\": training on {what}", t.device));
            }
            device
        }
        Err(why) => {
            return Err(ConfigError::new(origin("train.device"), Some("train.device"), why)
                .hint("set train.device = \"auto\" (a GPU when there is one, else the CPU) or \"cpu\""));
        }
    };
    let dtype = match device {
        Device::Cuda(_) => t.dtype,
        _ => match (t.dtype, crate::engine::backend::cpu_products(Dtype::Bfloat16)) {
            (Dtype::Float32, _) => Dtype::Float32,
            (Dtype::Bfloat16, Ok(path)) => {
                let (products, f32_parts) = if path.takes_attention() {
                    (
                        "the linear layers', the head's and attention's",
                        "weights, norms, softmax, loss and AdamW",
                    )
                } else {
                    (
                        "the linear layers' and the head's",
                        "weights, norms, softmax, attention, loss and AdamW",
                    )
                };
                notes.push(format!(
                    "train.dtype = \"bfloat16\": mixed precision on the CPU, {products} matrix products in bf16 on {} with f32 sums ({f32_parts} in f32)",
                    path.name()
                ));
                Dtype::Bfloat16
            }
            (dtype, bf16) => {
                let why = match (dtype, bf16) {
                    (Dtype::Bfloat16, Err(why)) => format!("{why:#}"),
                    _ => "the CPU engine has no float16 path".into(),
                };
                notes.push(format!(
                    "warning: train.dtype = \"{}\" (from {}): {why}; training in float32, as MiniMind does on a CPU",
                    dtype.name(),
                    origin("train.dtype")
                ));
                Dtype::Float32
            }
        },
    };
    Ok(Placement { device, dtype, device_note, notes })
}

/// The device `requested` resolves to on this machine and what it is ("cuda:0 (NVIDIA
/// H200)", "the CPU; this build has no CUDA engine ..."); or why a requested GPU cannot be
/// used. Shared by training, `eval` and `generate`.
pub fn choose_device(requested: Device) -> Result<(Device, String), String> {
    match requested {
        Device::Cpu => Ok((Device::Cpu, "the CPU".into())),
        Device::Auto => Ok(match crate::engine::gpu::probe() {
            Ok(gpus) => (Device::Cuda(0), format!("cuda:0 ({})", gpus.names[0])),
            Err(why) => (Device::Cpu, format!("the CPU; {}", why.lines().next().unwrap_or_default())),
        }),
        Device::Cuda(n) => match crate::engine::gpu::probe() {
            Err(why) => Err(format!("\"{requested}\": {why}")),
            Ok(gpus) if n >= gpus.names.len() => {
                let list: Vec<String> =
                    gpus.names.iter().enumerate().map(|(i, name)| format!("cuda:{i} {name}")).collect();
                Err(format!(
                    "\"{requested}\": this machine has {} GPU(s): {}",
                    gpus.names.len(),
                    list.join(", ")
                ))
            }
            Ok(gpus) => Ok((Device::Cuda(n), format!("cuda:{n} ({})", gpus.names[n]))),
        },
    }
}

/// The dtype a run trains in, as meta.json records it: on the CPU, bfloat16 names its
/// instruction path (`bfloat16 (amx products)`).
fn effective_dtype(p: &Placement) -> String {
    match (p.device, p.dtype) {
        (Device::Cuda(_), d) | (_, d @ (Dtype::Float32 | Dtype::Float16)) => d.name().into(),
        (_, Dtype::Bfloat16) => match crate::engine::backend::cpu_products(Dtype::Bfloat16) {
            Ok(path) => format!("bfloat16 ({} products)", path.name()),
            Err(_) => "bfloat16".into(),
        },
    }
}

/// How meta.json records a placement: requested and effective, for device and dtype.
pub fn choices(t: &TrainConfig, p: &Placement) -> (crate::run_dir::Choice, crate::run_dir::Choice) {
    use crate::run_dir::Choice;
    (
        Choice { requested: t.device.to_string(), effective: p.device.to_string() },
        Choice { requested: t.dtype.name().into(), effective: effective_dtype(p) },
    )
}
