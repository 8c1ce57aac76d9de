//! The ranks of a data-parallel run agree before they train: rank 0, which owns the run
//! folder, announces it (folder, resolved config, whether it resumes); every other rank checks
//! its own resolution of the same command against that config, and after rank 0 has restored
//! the run's state (a checkpoint, weights or a fresh init) every rank receives it.

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::checkpoint::TrainerState;
use crate::config::{Config, ConfigError, Origin};
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

#[cfg(test)]
mod tests {
    use super::*;

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
