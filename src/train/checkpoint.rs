//! Checkpoints: `checkpoints/step-NNNNNNNN/` with `model.safetensors`, `optimizer.safetensors`
//! and `state.json`, written into a temporary folder that is renamed into place once
//! complete; `COMPLETE` (inside it) lists each file's size and SHA-256, so a damaged
//! checkpoint is detected and skipped.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::ModelConfig;
use crate::data::{Cursor, Fingerprint};
use crate::engine::{Engine, Kernels, hf};
use crate::files::{sync_dir, write_synced};

const MARKER: &str = "COMPLETE";
const FILES: [&str; 3] = ["model.safetensors", "optimizer.safetensors", "state.json"];

/// The trainer's state besides the weights.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainerState {
    /// Optimiser steps done.
    pub step: usize,
    /// Where the data continues.
    pub cursor: Cursor,
    /// Token positions trained on, padding included.
    pub tokens_seen: u64,
    /// Real (non-pad) tokens trained on.
    #[serde(default)]
    pub tokens_real: u64,
    /// Training seconds before this checkpoint (for elapsed_s across resumes).
    pub elapsed_s: f64,
    /// The model the weights belong to.
    pub model: ModelConfig,
    /// The data, tokenizer and tokens trained on (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Fingerprint>,
    /// float16's dynamic loss scale (none in other precisions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::engine::LossScaler>,
    /// Micro-batches per optimiser step over all ranks: a resume with another number of ranks
    /// keeps it (each rank's accumulation changes), so the run sees the same batches. Absent
    /// in older checkpoints: train.accumulation_steps of one process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_accumulation: Option<usize>,
    /// How many ranks wrote this checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    /// The run's resolved config (TOML) this checkpoint was trained with: a resume compares
    /// config.toml with it (absent in older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// The step at which a resume last accepted other data (`--allow-data-change`): the cursor
    /// then no longer follows from the step alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_changed_at: Option<usize>,
}

/// A checkpoint written for another model shape than the run's config asks: not damage (its
/// bytes are intact), so it is never set aside; the resume is refused naming the keys.
#[derive(Debug, thiserror::Error)]
#[error(
    "checkpoint {} was written for another model shape than config.toml now gives; differing keys:\n  {}\n  hint: restore those values in config.toml, or start a new run from these weights with checkpoint.from_weight",
    dir.display(),
    keys.join("\n  ")
)]
pub struct OtherShape {
    pub dir: PathBuf,
    pub keys: Vec<String>,
}

pub fn dir_name(step: usize) -> String {
    format!("step-{step:08}")
}

fn step_of(name: &str) -> Option<usize> {
    name.strip_prefix("step-")?.parse().ok()
}

/// Steps to delete so that only the newest `keep` remain. Pure.
pub fn to_delete(mut steps: Vec<usize>, keep: usize) -> Vec<usize> {
    steps.sort_unstable();
    let n = steps.len().saturating_sub(keep);
    steps.truncate(n);
    steps
}

/// Which existing checkpoints to delete before writing a new (newer) one and which after, so
/// that `keep` remain in the end, the disk holds as few as possible while writing, and at
/// least one complete checkpoint exists at every moment. Pure.
pub fn prune_plan(existing: &[usize], keep: usize) -> (Vec<usize>, Vec<usize>) {
    let doomed = to_delete(existing.to_vec(), keep.saturating_sub(1));
    if !doomed.is_empty() && doomed.len() == existing.len() {
        // Deleting them all first would leave no complete checkpoint while the new one is
        // written: keep the newest until then.
        let (before, last) = doomed.split_at(doomed.len() - 1);
        return (before.to_vec(), last.to_vec());
    }
    (doomed, Vec::new())
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes a complete checkpoint of `engine` and `state` under `dir`, keeping the newest
/// `keep_last` (older ones go first when that still leaves one, see [`prune_plan`]). A complete
/// checkpoint of the same step is the same state: it is kept, not rewritten. On any failure the
/// partial folder is removed; earlier checkpoints stay.
pub fn save<K: Kernels>(
    dir: &Path,
    engine: &Engine<K>,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf> {
    let final_dir = dir.join(dir_name(state.step));
    if final_dir.join(MARKER).is_file() {
        return Ok(final_dir);
    }
    // Leftovers of writers that died mid-checkpoint are never complete: clear them.
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(".step-") && name.ends_with(".tmp") {
            let _ = fs::remove_dir_all(e.path());
        }
    }
    let existing: Vec<usize> = list(dir).into_iter().map(|(s, _)| s).filter(|&s| s < state.step).collect();
    let (before, after) = prune_plan(&existing, keep_last);
    remove_steps(dir, &before)?;
    let tmp = dir.join(format!(".{}.tmp", dir_name(state.step)));
    let written = encode(engine, state).and_then(|files| publish(dir, &tmp, &final_dir, &files, state.step));
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e).with_context(|| format!("writing checkpoint {}", final_dir.display()));
    }
    remove_steps(dir, &after)?;
    Ok(final_dir)
}

/// Removes the checkpoints of `steps` in `dir`.
fn remove_steps(dir: &Path, steps: &[usize]) -> Result<()> {
    for &step in steps {
        let old = dir.join(dir_name(step));
        fs::remove_dir_all(&old).with_context(|| format!("removing the old checkpoint {}", old.display()))?;
    }
    Ok(())
}

/// The bytes of [`FILES`]: weights, AdamW's moments and step, the trainer's state.
fn encode<K: Kernels>(engine: &Engine<K>, state: &TrainerState) -> Result<[Vec<u8>; 3]> {
    let params = engine.params_host();
    let model = hf::encode_weights(&engine.layout, &params)?;
    drop(params);
    let (m, v) = engine.moments_host();
    let n = m.len();
    let optim = hf::encode(
        &[("exp_avg".into(), vec![n], &m), ("exp_avg_sq".into(), vec![n], &v)],
        Some([("adam_step".to_string(), engine.step.to_string())].into()),
    )?;
    drop((m, v));
    let state_json = serde_json::to_vec_pretty(&TrainerState { loss_scale: engine.scaler, ..state.clone() })?;
    Ok([model, optim, state_json])
}

/// Writes `files` into `tmp`, synced, then the marker with their sizes and checksums, then
/// renames `tmp` to `final_dir`: a checkpoint folder either has all of it or does not exist.
fn publish(dir: &Path, tmp: &Path, final_dir: &Path, files: &[Vec<u8>; 3], step: usize) -> Result<()> {
    fs::create_dir_all(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut marker = String::new();
    for (name, bytes) in FILES.iter().zip(files) {
        write_synced(&tmp.join(name), bytes)?;
        marker.push_str(&format!("{name} {} {}\n", bytes.len(), sha256(bytes)));
    }
    crate::signals::crash_point("checkpoint", step);
    write_synced(&tmp.join(MARKER), marker.as_bytes())?;
    if final_dir.exists() {
        fs::remove_dir_all(final_dir)
            .with_context(|| format!("removing the incomplete {}", final_dir.display()))?;
    }
    fs::rename(tmp, final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))?;
    sync_dir(dir);
    Ok(())
}

/// Checkpoint folders that have a marker, oldest first.
pub fn list(dir: &Path) -> Vec<(usize, PathBuf)> {
    let mut out: Vec<(usize, PathBuf)> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = step_of(&name)?;
            e.path().join(MARKER).is_file().then(|| (step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// A checkpoint read back and verified.
pub struct Loaded {
    pub dir: PathBuf,
    pub state: TrainerState,
    pub params: Vec<f32>,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
    pub adam_step: u64,
}

/// Reads and verifies one checkpoint against its marker, then against `model` (a shape
/// change is [`OtherShape`], not damage) and its contents (see [`check_contents`]).
pub fn load(dir: &Path, model: &ModelConfig) -> Result<Loaded> {
    let marker = fs::read_to_string(dir.join(MARKER)).context("no COMPLETE marker")?;
    let mut files = Vec::new();
    for line in marker.lines() {
        let mut parts = line.split(' ');
        let (Some(name), Some(len), Some(hash)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("marker is damaged");
        };
        let bytes = fs::read(dir.join(name)).with_context(|| format!("reading {name}"))?;
        if bytes.len().to_string() != len || sha256(&bytes) != hash {
            bail!("{name} is truncated or corrupt (size or checksum differs from the marker)");
        }
        files.push(bytes);
    }
    if files.len() != FILES.len() {
        bail!("marker lists {} files, expected {}", files.len(), FILES.len());
    }
    let state: TrainerState = serde_json::from_slice(&files[2]).context("state.json")?;
    let keys = state.model.differences(model, "checkpoint");
    if !keys.is_empty() {
        return Err(OtherShape { dir: dir.to_path_buf(), keys }.into());
    }
    let layout = crate::engine::Layout::new(model);
    let params = hf::read_weights(&files[0], &layout).context("model.safetensors")?;
    let st = SafeTensors::deserialize(&files[1]).context("optimizer.safetensors")?;
    let vec_of = |name: &str| -> Result<Vec<f32>> {
        hf::to_f32(&st.tensor(name).with_context(|| format!("optimizer state has no {name}"))?)
    };
    let (exp_avg, exp_avg_sq) = (vec_of("exp_avg")?, vec_of("exp_avg_sq")?);
    if exp_avg.len() != layout.total || exp_avg_sq.len() != layout.total {
        bail!("optimizer state has {} values, the model {}", exp_avg.len(), layout.total);
    }
    let (_, meta) = SafeTensors::read_metadata(&files[1])?;
    let adam_step = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("adam_step"))
        .and_then(|s| s.parse().ok())
        .context("optimizer state has no adam_step")?;
    let loaded = Loaded { dir: dir.to_path_buf(), state, params, exp_avg, exp_avg_sq, adam_step };
    check_contents(&loaded).map_err(|why| anyhow::anyhow!("{why}"))?;
    Ok(loaded)
}

/// What a checkpoint holds, beyond its checksums: finite weights and moments (a second moment
/// is never negative), and no more AdamW updates than optimiser steps (float16 skips some).
fn check_contents(ck: &Loaded) -> std::result::Result<(), String> {
    let first_bad = |v: &[f32], ok: fn(f32) -> bool| v.iter().position(|&x| !ok(x));
    if let Some(i) = first_bad(&ck.params, f32::is_finite) {
        return Err(format!("model.safetensors: weight {i} is {} (not finite)", ck.params[i]));
    }
    if let Some(i) = first_bad(&ck.exp_avg, f32::is_finite) {
        return Err(format!("optimizer.safetensors: exp_avg[{i}] is {} (not finite)", ck.exp_avg[i]));
    }
    if let Some(i) = first_bad(&ck.exp_avg_sq, |x| x.is_finite() && x >= 0.0) {
        return Err(format!(
            "optimizer.safetensors: exp_avg_sq[{i}] is {} (not finite and >= 0)",
            ck.exp_avg_sq[i]
        ));
    }
    if ck.adam_step > ck.state.step as u64 {
        return Err(format!("adam_step {} is past the checkpoint's step {}", ck.adam_step, ck.state.step));
    }
    Ok(())
}

/// Whether a checkpoint's data cursor is where its step says, on the data the run opened:
/// micro-batches consumed (`epoch x per_epoch + batch`) = `step x` micro-batches per step, and
/// the batch within its epoch. `None` when it is. Pure.
pub fn cursor_problem(state: &TrainerState, per_epoch: usize, per_step: usize) -> Option<String> {
    // After a data change the cursor carries the old data's epochs: only its bounds hold.
    cursor_rule((state.step, state.cursor, state.data_changed_at.is_none()), per_epoch, per_step)
}

/// [`cursor_problem`] on `(step, cursor, whether the cursor follows from the step)`. Pure.
fn cursor_rule(
    (step, cursor, follows_step): (usize, Cursor, bool),
    per_epoch: usize,
    per_step: usize,
) -> Option<String> {
    let Cursor { epoch, batch } = cursor;
    let consumed = epoch.checked_mul(per_epoch).and_then(|n| n.checked_add(batch));
    let expected = step.checked_mul(per_step);
    if batch > per_epoch || consumed.is_none() || (follows_step && consumed != expected) {
        return Some(format!(
            "state.json: data cursor (epoch {epoch}, batch {batch}) is not where step {step} leaves the data ({per_step} micro-batches a step, {per_epoch} an epoch)"
        ));
    }
    None
}

/// What to do with a damaged checkpoint met while looking for the newest intact one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Damaged {
    /// Rename it `*.damaged` (the run's own lock held: the step's next checkpoint is then
    /// written afresh).
    SetAside,
    /// Leave it (a reader that does not own the run).
    Leave,
}

/// The newest checkpoint in `dir` that reads back intact (checksums first) for `model` and
/// passes `check` (the caller's own rules, such as the data cursor: `Some(why)` is damage, an
/// error ends the search), and a note for each
/// damaged one newer than it (set aside or left as `damaged` says). A checkpoint of another
/// model shape is an error ([`OtherShape`]), never damage.
pub fn newest_intact(
    dir: &Path,
    model: &ModelConfig,
    damaged: Damaged,
    check: &dyn Fn(&Loaded) -> Result<Option<String>>,
) -> Result<(Option<Loaded>, Vec<String>)> {
    let mut notes = Vec::new();
    for (_, ck) in list(dir).into_iter().rev() {
        let e = match load(&ck, model) {
            Ok(loaded) => match check(&loaded)? {
                None => return Ok((Some(loaded), notes)),
                Some(why) => anyhow::anyhow!("{why}"),
            },
            Err(e) if e.is::<OtherShape>() => return Err(e),
            Err(e) => e,
        };
        let kept = match damaged {
            Damaged::Leave => String::new(),
            Damaged::SetAside => {
                // Never deleted: set aside under a name no earlier set-aside holds.
                let aside = (1..)
                    .map(|n| {
                        if n == 1 {
                            ck.with_extension("damaged")
                        } else {
                            ck.with_extension(format!("damaged-{n}"))
                        }
                    })
                    .find(|p| !p.exists())
                    .expect("an unused name");
                fs::rename(&ck, &aside).with_context(|| {
                    format!(
                        "setting the damaged checkpoint {} aside as {} ({e:#})",
                        ck.display(),
                        aside.display()
                    )
                })?;
                format!(" (kept as {})", aside.display())
            }
        };
        notes.push(format!("warning: skipping damaged checkpoint {}: {e:#}{kept}", ck.display()));
    }
    Ok((None, notes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cursor_follows_the_step_until_the_data_changes() {
        let state =
            |step, epoch, batch, changed: Option<usize>| (step, Cursor { epoch, batch }, changed.is_none());
        // (state, per_epoch, per_step, ok)
        let table = [
            (state(0, 0, 0, None), 25, 8, true),
            (state(9, 2, 22, None), 25, 8, true),  // 72 = 2 x 25 + 22
            (state(9, 2, 25, None), 25, 8, false), // 75 micro-batches, not 72
            (state(9, 0, 72, None), 25, 8, false), // past the epoch's batches
            (state(3, 0, 25, None), 25, 8, false), // 25 != 24
            (state(3, 0, 24, None), 25, 8, true),
            (state(9, 1, 2, Some(5)), 25, 8, true), // other data since step 5: bounds only
            (state(9, 1, 26, Some(5)), 25, 8, false),
            (state(1, usize::MAX, 1, None), 25, 8, false), // overflow is a problem, not a panic
        ];
        for (s, per_epoch, per_step, ok) in table {
            assert_eq!(cursor_rule(s, per_epoch, per_step).is_none(), ok, "{s:?} {per_epoch} {per_step}");
        }
    }

    #[test]
    fn retention_table() {
        let table: &[(&[usize], usize, &[usize])] = &[
            (&[100, 200, 300], 2, &[100]),
            (&[300, 100, 200], 1, &[100, 200]),
            (&[100], 3, &[]),
            (&[], 2, &[]),
        ];
        for (steps, keep, want) in table {
            assert_eq!(to_delete(steps.to_vec(), *keep), want.to_vec(), "{steps:?} keep {keep}");
        }
    }

    #[test]
    fn prune_plan_table() {
        // (existing, keep, delete before writing, delete after writing)
        type Row = (&'static [usize], usize, &'static [usize], &'static [usize]);
        let table: &[Row] = &[
            (&[4, 8, 12], 2, &[4, 8], &[]),
            (&[4, 8, 12], 3, &[4], &[]),
            (&[4], 1, &[], &[4]),
            (&[4, 8], 1, &[4], &[8]),
            (&[4], 3, &[], &[]),
            (&[], 1, &[], &[]),
        ];
        for (existing, keep, before, after) in table {
            let (b, a) = prune_plan(existing, *keep);
            assert_eq!((b.as_slice(), a.as_slice()), (*before, *after), "{existing:?} keep {keep}");
        }
    }

    #[test]
    fn names_round_trip() {
        assert_eq!(dir_name(100), "step-00000100");
        assert_eq!(step_of("step-00000100"), Some(100));
        assert_eq!(step_of(".step-00000100.tmp"), None);
    }
}
