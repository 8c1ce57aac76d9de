//! `minimind data prepare FILE`: builds an experiment's token cache ahead of training (on a
//! CPU machine, so a GPU is never idle while a CPU tokenises), with progress and a summary of
//! what the corpus is: documents, tokens, skipped rows, tokens per document. A stopped build
//! continues from the shards it finished; training then opens the cache at once.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::config::PlannedRun;
use crate::data::{Dataset, OpenOptions, TokenCache};
use crate::metrics::say;
use crate::signals::{Interrupted, Stop};
use crate::units::{duration, human};

/// How `data prepare` runs.
pub struct Prepare<'a> {
    pub quiet: bool,
    pub stop: &'a Stop,
    /// Testing aid: stop as if interrupted once this many shards are tokenised.
    pub stop_after_shards: Option<usize>,
}

/// Builds (or finds) the token cache of each run's data; 128 + the signal when stopped.
pub fn prepare(runs: &[PlannedRun], p: &Prepare<'_>) -> Result<ExitCode> {
    let mut seen = Vec::new();
    for run in runs {
        let c = &run.config;
        let key =
            (c.data.path.clone(), c.data.tokenizer.clone(), c.data.text_field.clone(), c.data.skip_bad_lines);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        let cache_root = c.checkpoint.save_dir.join(".cache");
        let opts = OpenOptions {
            cache_root: &cache_root,
            quiet: p.quiet,
            heartbeat: Duration::from_secs(10),
            stop: p.stop,
            stop_after_shards: p.stop_after_shards,
        };
        let start = Instant::now();
        say(&format!("preparing {} for {}", c.data.path.display(), run.tag.as_deref().unwrap_or(&c.name)));
        match Dataset::open(&c.data, c.model.vocab_size, &opts) {
            Ok((ds, _)) => {
                for note in &ds.notes {
                    say(note);
                }
                say(&summary(ds.cache(), start.elapsed().as_secs_f64()));
            }
            Err(e) => match e.downcast_ref::<Interrupted>() {
                Some(Interrupted(sig)) => {
                    say(&format!(
                        "stopped by {}: the shards tokenised so far are kept; run the same command again to continue",
                        crate::signals::name(*sig)
                    ));
                    return Ok(ExitCode::from((128 + sig) as u8));
                }
                None => return Err(e),
            },
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The corpus in a few lines: shards, documents, tokens, skipped rows, tokens per document.
fn summary(cache: &TokenCache, seconds: f64) -> String {
    let i = &cache.info;
    let lens = cache.lengths();
    let mut lines = vec![format!(
        "token cache ready in {}: {} shard(s), {} documents, {} tokens",
        duration(seconds),
        i.shards.len().max(1),
        human(i.documents as f64),
        human(i.tokens as f64)
    )];
    let p = percentiles(&lens, &[50.0, 90.0, 99.0, 100.0]);
    lines.push(format!(
        "  tokens per document: mean {:.0}, p50 {}, p90 {}, p99 {}, max {}",
        i.tokens as f64 / i.documents.max(1) as f64,
        p[0],
        p[1],
        p[2],
        p[3]
    ));
    if i.skipped_lines > 0 {
        lines.push(format!("  {} row(s) skipped as malformed or damaged:", i.skipped_lines));
        lines.extend(i.skipped_rows.iter().map(|r| format!("    {r}")));
    } else {
        lines.push("  no rows skipped".into());
    }
    lines.join("\n")
}

/// The `ps` percentiles (nearest rank) of `values`, 0 for none. Pure.
pub fn percentiles(values: &[u64], ps: &[f64]) -> Vec<u64> {
    let mut v = values.to_vec();
    v.sort_unstable();
    ps.iter()
        .map(|p| {
            if v.is_empty() {
                return 0;
            }
            let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<u64> = (1..=100).rev().collect();
        assert_eq!(percentiles(&v, &[50.0, 90.0, 99.0, 100.0]), [50, 90, 99, 100]);
        assert_eq!(percentiles(&[7], &[50.0, 100.0]), [7, 7]);
        assert_eq!(percentiles(&[], &[50.0]), [0]);
    }
}
