//! Every rule about the ranks of a data-parallel run. They agree before they train: rank 0,
//! which owns the run folder, announces it (folder, resolved config, whether it resumes);
//! every other rank checks its own resolution of the same command against that config, and
//! after rank 0 has restored the run's state (a checkpoint, weights or a fresh init) every rank
//! receives it. Then the pure rules: a rank's GPU and threads, how a step's micro-batches are
//! shared, and a stop every rank agrees on.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::Placement;
use super::checkpoint::TrainerState;
use crate::config::{Config, ConfigError, Device, Origin};
use crate::dist::World;
use crate::engine::comm::Communicator;
use crate::engine::{Engine, Kernels, LossScaler};

/// What rank 0 tells the others about the run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    pub root: PathBuf,
    /// The resolved config, as config.toml holds it.
    pub config: String,
    pub resuming: bool,
}

/// Rank 0: announces the run, then waits for every rank's verdict on its config.
pub fn announce(world: &World, root: PathBuf, config: &Config, resuming: bool) -> Result<()> {
    let text = toml::to_string(config).context("serialising the config")?;
    let mut bytes = serde_json::to_vec(&Plan { root, config: text, resuming })?;
    world.comm.broadcast_bytes(&mut bytes);
    agree(world, &[])
}

/// Ranks other than 0: the run rank 0 announced, after checking `own` (this rank's resolution
/// of the same experiment, when it resolved one) against it.
pub fn receive(world: &World, own: Option<&Config>) -> Result<(Plan, Config)> {
    let mut bytes = Vec::new();
    world.comm.broadcast_bytes(&mut bytes);
    let plan: Plan = serde_json::from_slice(&bytes).context("reading rank 0's plan")?;
    let config: Config = toml::from_str(&plan.config).context("reading rank 0's config")?;
    let diff = own.map(|c| differing(&config, c)).unwrap_or_default();
    agree(world, &diff)?;
    Ok((plan, config))
}

/// Every rank's differences from rank 0, gathered on every rank: "rank r has ..." per rank
/// that has some.
fn gather_differences(world: &World, diff: &[String]) -> Vec<String> {
    let all = world.comm.gather_strings(&diff.join(", "));
    all.iter().enumerate().filter(|(_, d)| !d.is_empty()).map(|(r, d)| format!("rank {r} has {d}")).collect()
}

/// Every rank's differences from rank 0; an error on every rank when any rank has some.
fn agree(world: &World, diff: &[String]) -> Result<()> {
    let bad = gather_differences(world, diff);
    if bad.is_empty() {
        return Ok(());
    }
    Err(ConfigError::new(
        Origin::Arg(format!("{} ranks", world.size())),
        None,
        format!("the ranks resolved different configs; rank 0's is the run's:\n  {}", bad.join("\n  ")),
    )
    .hint("give every rank the same files, --set values and MINIMIND_* environment")
    .into())
}

/// `key = mine (rank 0: theirs)` for every key whose value differs. Pure.
pub fn differing(rank0: &Config, mine: &Config) -> Vec<String> {
    let (a, b) = (flat(rank0), flat(mine));
    let mut out: Vec<String> = b
        .iter()
        .filter(|(k, v)| a.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k} = {v} (rank 0: {})", a.get(k).map_or("unset", String::as_str)))
        .collect();
    out.extend(a.keys().filter(|k| !b.contains_key(*k)).map(|k| format!("{k} unset (rank 0: {})", a[k])));
    out
}

fn flat(c: &Config) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    walk(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    if let Ok(v) = toml::Value::try_from(c) {
        walk("", &v, &mut out);
    }
    out
}

/// What rank 0 restored, beyond the weights and moments.
#[derive(Serialize, Deserialize)]
struct Restored {
    state: TrainerState,
    adam_step: u64,
    scaler: Option<LossScaler>,
}

/// Rank 0's restored state on every rank: weights and AdamW moments through the engine's
/// communicator, the trainer's state through the host. Each rank then checks that it reads the
/// same data as rank 0 (by the fingerprints); a difference fails every rank.
pub fn share_state<K: Kernels>(
    world: &World,
    comm: &mut dyn Communicator<K>,
    engine: &mut Engine<K>,
    state: &mut TrainerState,
) -> Result<()> {
    engine.broadcast_state(comm);
    let mut bytes = if world.is_owner() {
        serde_json::to_vec(&Restored { state: state.clone(), adam_step: engine.step, scaler: engine.scaler })?
    } else {
        Vec::new()
    };
    world.comm.broadcast_bytes(&mut bytes);
    let mine = state.data.clone();
    if !world.is_owner() {
        let r: Restored = serde_json::from_slice(&bytes).context("reading rank 0's state")?;
        (*state, engine.step, engine.scaler) = (r.state, r.adam_step, r.scaler);
    }
    let diff = match (&state.data, &mine) {
        (Some(theirs), Some(mine)) if theirs != mine => {
            vec![format!(
                "other data: tokens {} (rank 0: {})",
                short(&mine.tokens_sha256),
                short(&theirs.tokens_sha256)
            )]
        }
        _ => Vec::new(),
    };
    let bad = gather_differences(world, &diff);
    anyhow::ensure!(
        bad.is_empty(),
        "the ranks read different data (data.path, data.tokenizer or the tokens differ):\n  {}",
        bad.join("\n  ")
    );
    Ok(())
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

/// A rank's device: with several ranks on a host and the CUDA engine, rank `l` of the host
/// takes `cuda:l` (and the host needs a GPU per rank).
pub fn placement(p: &Placement, world: &World) -> Result<Placement> {
    let Device::Cuda(_) = p.device else {
        return Ok(p.clone());
    };
    if world.size() == 1 {
        return Ok(p.clone());
    }
    let gpus = crate::engine::gpu::probe().map_err(|e| anyhow::anyhow!(e))?.names;
    let device = gpu(world.local_rank, world.local_size, gpus.len()).map_err(|e| anyhow::anyhow!(e))?;
    // The placement's note named the first GPU; this rank's is its own.
    let device_note = Some(format!(
        "rank {} of {}: training on {device} ({})",
        world.rank(),
        world.size(),
        gpus[world.local_rank]
    ));
    Ok(Placement { device, device_note, ..p.clone() })
}

/// The GPU of rank `local_rank` among `local_size` ranks on a host with `gpus` GPUs: its own,
/// `cuda:<local rank>`; or why there are too few. Pure.
pub fn gpu(local_rank: usize, local_size: usize, gpus: usize) -> Result<Device, String> {
    if local_size > gpus {
        return Err(format!(
            "{local_size} ranks on this host but {gpus} GPU(s): each rank trains on a GPU of its own\n  hint: start at most {gpus} ranks per host, or set train.device = \"cpu\""
        ));
    }
    Ok(Device::Cuda(local_rank))
}

/// A rank's CPU threads: `train.threads`, or with 0 (all cores) its share of the host's cores.
pub fn threads(threads: usize, ranks_on_host: usize) -> usize {
    match threads {
        0 if ranks_on_host > 1 => {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            (cores / ranks_on_host).max(1)
        }
        n => n,
    }
}

/// A run's micro-batches per step over all ranks split evenly: each rank's share. Pure.
pub fn local_accumulation(global: usize, world: usize) -> Result<usize, String> {
    if world == 0 || !global.is_multiple_of(world) || global < world {
        return Err(format!(
            "a step of this run has {global} micro-batch(es), which {world} ranks cannot share evenly\n  hint: use a number of ranks that divides {global}"
        ));
    }
    Ok(global / world)
}

/// How a step's micro-batches are shared among the ranks, and how many steps the run has.
pub struct Split {
    /// Micro-batches per optimiser step, over all ranks.
    pub global: usize,
    /// This rank's share.
    pub local: usize,
    /// Optimiser steps in the whole run.
    pub total: usize,
    /// Why it differs from the checkpoint's, on a resume with another number of ranks.
    pub note: Option<String>,
}

/// The run's micro-batches per step (kept from the checkpoint: a resume with another number
/// of ranks re-splits the same steps), this rank's share, and the run's length in steps (of
/// `per_epoch` micro-batches an epoch); `state` records the split.
pub fn split(config: &Config, per_epoch: usize, state: &mut TrainerState, world: usize) -> Result<Split> {
    let global = state.global_accumulation.unwrap_or(config.train.accumulation_steps * world);
    let local = local_accumulation(global, world).map_err(|e| anyhow::anyhow!(e))?;
    let before = state.world_size.unwrap_or(1);
    let note = (state.step > 0 && before != world).then(|| {
        format!(
            "the checkpoint was written by {before} rank(s), now {world}: the {global} micro-batches of a step are split anew, {local} per rank"
        )
    });
    (state.global_accumulation, state.world_size) = (Some(global), Some(world));
    let total = match config.train.max_steps {
        Some(n) => n,
        None => config.train.epochs * (per_epoch / global),
    };
    anyhow::ensure!(
        total > 0,
        "an epoch has {per_epoch} micro-batch(es), fewer than the {global} of a step (train.accumulation_steps x ranks): nothing to train\n  hint: lower train.accumulation_steps or set train.max_steps"
    );
    Ok(Split { global, local, total, note })
}

/// A stop every rank agrees on: any rank's signal stops them all at the same micro-batch
/// (alone, its own). A collective: every rank calls it at the same points.
pub fn agreed_stop(world: &World, mine: Option<i32>) -> Option<i32> {
    let any = world.comm.max_u64(mine.map_or(0, |sig| sig as u64));
    (any > 0).then_some(any as i32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rank_on_a_host_takes_a_gpu_of_its_own() {
        // (local rank, ranks on the host, GPUs) -> device
        let table: &[(usize, usize, usize, Option<Device>)] = &[
            (0, 1, 1, Some(Device::Cuda(0))),
            (1, 2, 2, Some(Device::Cuda(1))),
            (3, 4, 8, Some(Device::Cuda(3))),
            (0, 2, 1, None),
            (0, 1, 0, None),
        ];
        for &(rank, size, gpus, want) in table {
            let got = gpu(rank, size, gpus);
            assert_eq!(got.as_ref().ok().copied(), want, "{rank} of {size} on {gpus}: {got:?}");
            if let Err(why) = got {
                assert!(why.contains(&format!("{gpus} GPU(s)")), "{why}");
            }
        }
    }

    #[test]
    fn a_step_splits_evenly_over_the_ranks() {
        // (micro-batches per step over all ranks, ranks) -> each rank's share
        let table: &[(usize, usize, Option<usize>)] = &[
            (1, 1, Some(1)),
            (8, 1, Some(8)),
            (8, 2, Some(4)),
            (8, 8, Some(1)),
            // Every rank must train at least one micro-batch of each step, and the same number.
            (2, 4, None),
            (6, 4, None),
            (3, 2, None),
        ];
        for &(global, world, want) in table {
            let got = local_accumulation(global, world);
            assert_eq!(got.as_ref().ok().copied(), want, "{global} over {world}: {got:?}");
            if let Err(why) = got {
                assert!(why.contains(&format!("divides {global}")), "{why}");
            }
        }
    }

    #[test]
    fn differing_keys_name_both_values() {
        let file = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/tiny.toml");
        let a = crate::config::load(&file, &[], &[]).unwrap().remove(0).config;
        // What a rank receives is what config.toml holds.
        let a: Config = toml::from_str(&toml::to_string(&a).unwrap()).unwrap();
        let mut b = a.clone();
        assert!(differing(&a, &b).is_empty());
        b.train.learning_rate = 0.5;
        let d = differing(&a, &b);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].starts_with("train.learning_rate = 0.5 (rank 0: "), "{d:?}");
    }
}
