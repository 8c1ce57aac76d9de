//! Data: shards (jsonl, compressed, Parquet) -> tokenizer -> memory-mapped token cache -> rows of T tokens -> shuffled
//! micro-batches, with a cursor that is part of the resume state.

pub mod cache;
pub mod jsonl;
mod mapped;
pub mod source;
pub mod tokenizer;

use std::path::Path;
use std::time::Duration;

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::DataConfig;
use crate::rng::SplitMix64;
use crate::signals::Stop;
pub use cache::TokenCache;
pub use jsonl::Skipped;
pub use tokenizer::{Tok, encode_row, targets_from_ids};

/// What a run's data is, by content: the data file, the tokenizer and the tokens made of them.
/// Checkpoints record it so a resume notices when any of them changed.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fingerprint {
    pub data_sha256: String,
    pub tokenizer_sha256: String,
    pub tokens_sha256: String,
}

impl Fingerprint {
    /// What differs from `then` (a checkpoint's) to `self` (now), one line each. Pure.
    pub fn changes_since(&self, then: &Fingerprint, data: &Path, tokenizer: &Path) -> Vec<String> {
        let short = |s: &str| s.chars().take(12).collect::<String>();
        let mut out = Vec::new();
        if self.data_sha256 != then.data_sha256 {
            out.push(format!(
                "the data file {} changed (sha256 {} then, {} now)",
                data.display(),
                short(&then.data_sha256),
                short(&self.data_sha256)
            ));
        }
        if self.tokenizer_sha256 != then.tokenizer_sha256 {
            out.push(format!(
                "the tokenizer {} changed (sha256 {} then, {} now)",
                tokenizer.display(),
                short(&then.tokenizer_sha256),
                short(&self.tokenizer_sha256)
            ));
        }
        if out.is_empty() && self.tokens_sha256 != then.tokens_sha256 {
            out.push(format!(
                "the same data and tokenizer now give other tokens (token cache sha256 {} then, {} now)",
                short(&then.tokens_sha256),
                short(&self.tokens_sha256)
            ));
        }
        out
    }
}

/// Where a dataset's token cache lives and what may interrupt building it.
pub struct OpenOptions<'a> {
    pub cache_root: &'a Path,
    pub quiet: bool,
    /// Progress lines this often when there is no progress bar.
    pub heartbeat: Duration,
    pub stop: &'a Stop,
    /// Testing aid: stop as if interrupted once this many shards are tokenised.
    pub stop_after_shards: Option<usize>,
}

/// Training rows over a token cache, encoded as `data.packing` says.
pub struct Dataset {
    cache: TokenCache,
    t: usize,
    packing: bool,
    bos: u32,
    eos: u32,
    pad: u32,
    samples: usize,
    /// What opening it involved (cache rebuilds, waits), for the run log.
    pub notes: Vec<String>,
}

impl Dataset {
    /// Loads the tokenizer, builds or opens the cache (under `opts.cache_root`), checks the
    /// vocabulary against the model's.
    pub fn open(cfg: &DataConfig, vocab_size: usize, opts: &OpenOptions<'_>) -> Result<(Dataset, Tok)> {
        let tok = Tok::load(&cfg.tokenizer)?;
        if tok.id_limit > vocab_size {
            bail!(
                "tokenizer {} emits ids up to {} but model.vocab_size is {vocab_size}\n  hint: set model.vocab_size = {}",
                cfg.tokenizer.display(),
                tok.id_limit - 1,
                tok.id_limit
            );
        }
        let opened = cache::open_or_build(
            &cfg.path,
            &cfg.tokenizer,
            &tok,
            &cache::CacheOptions {
                root: opts.cache_root,
                text_field: &cfg.text_field,
                skip_bad_lines: cfg.skip_bad_lines,
                threads: cfg.num_workers,
                quiet: opts.quiet,
                heartbeat: opts.heartbeat,
                stop: opts.stop,
                stop_after_shards: opts.stop_after_shards,
            },
        )?;
        let cache = opened.cache;
        let t = cfg.max_seq_len;
        let samples = if cfg.packing {
            // Every document is followed by eos; rows are full T-token cuts of that stream.
            ((cache.info.tokens + cache.info.documents) / t as u64) as usize
        } else {
            cache.documents()
        };
        let ds = Dataset {
            cache,
            t,
            packing: cfg.packing,
            bos: tok.bos,
            eos: tok.eos,
            pad: tok.pad,
            samples,
            notes: opened.notes,
        };
        Ok((ds, tok))
    }

    pub fn samples(&self) -> usize {
        self.samples
    }

    /// The token cache the rows are read from.
    pub fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// Lines of the data file skipped as malformed (with `data.skip_bad_lines`).
    pub fn skipped(&self) -> Skipped {
        Skipped { count: self.cache.info.skipped_lines, first: self.cache.info.skipped_line_numbers.clone() }
    }

    pub fn fingerprint(&self) -> Fingerprint {
        let i = &self.cache.info;
        Fingerprint {
            data_sha256: i.data_sha256.clone(),
            tokenizer_sha256: i.tokenizer_sha256.clone(),
            tokens_sha256: i.tokens_sha256.clone(),
        }
    }

    /// Fails, naming the file, when a token cache file of this process was cut short while it
    /// was mapped (the rows read since then hold zeros; see `mapped`).
    pub fn intact(&self) -> Result<()> {
        match mapped::changed() {
            None => Ok(()),
            Some(path) => bail!(
                "the token cache file {} was cut short while this run read it (another process truncated or rewrote it): the rows read since are not the data\n  hint: resume the run; the cache is checked and rebuilt when damaged",
                path.display()
            ),
        }
    }

    /// Tokens of the data (documents' tokens, before rows add bos/eos and pad).
    pub fn tokens(&self) -> u64 {
        self.cache.info.tokens
    }

    /// How many of row `i`'s tokens are real (not padding): what [`Dataset::fill`] returns,
    /// without building the row.
    pub fn real_tokens(&self, i: usize) -> usize {
        if self.packing {
            return self.t;
        }
        let len = self.cache.offset(i + 1) - self.cache.offset(i);
        len.min(self.t - 2) + 2
    }

    /// Writes row `i` into `ids`/`targets` (length T); returns how many of its tokens are real
    /// (not padding).
    pub fn fill(&self, i: usize, ids: &mut [u32], targets: &mut [i32], scratch: &mut Vec<u32>) -> usize {
        let t = self.t;
        if !self.packing {
            self.cache.doc(i, scratch);
            encode_row(scratch, t, self.bos, self.eos, self.pad, ids, targets);
            return scratch.len().min(t - 2) + 2;
        }
        // Stream position of row i, and the document holding it (docs are len + 1 long).
        let start = i * t;
        let (mut lo, mut hi) = (0usize, self.cache.documents());
        let stream_start = |d: usize| self.cache.offset(d) + d;
        while hi - lo > 1 {
            let mid = (lo + hi) / 2;
            if stream_start(mid) <= start { lo = mid } else { hi = mid }
        }
        let (mut doc, mut within) = (lo, start - stream_start(lo));
        let mut filled = 0;
        while filled < t {
            self.cache.doc(doc, scratch);
            scratch.push(self.eos);
            let take = (scratch.len() - within).min(t - filled);
            ids[filled..filled + take].copy_from_slice(&scratch[within..within + take]);
            filled += take;
            doc += 1;
            within = 0;
        }
        for p in 0..t {
            targets[p] = if p + 1 < t { ids[p + 1] as i32 } else { -1 };
        }
        t
    }
}

/// Where the data stands: the next micro-batch of an epoch. Saved in checkpoints.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: usize,
    pub batch: usize,
}

/// Shuffled micro-batches: epoch e visits the training rows in a permutation drawn from
/// (seed, e); the last partial batch of an epoch is dropped so every micro-batch has B rows.
pub struct Batches {
    seed: u64,
    b: usize,
    /// The rows trained on (all of them, or all but the held-out validation rows).
    rows: Vec<u32>,
    epoch: Option<usize>,
    order: Vec<u32>,
    scratch: Vec<u32>,
}

impl Batches {
    /// Over all `samples` rows.
    pub fn new(samples: usize, b: usize, seed: u64) -> Result<Batches> {
        Batches::over((0..samples as u32).collect(), b, seed)
    }

    /// Over the given rows only (in this order before shuffling).
    pub fn over(rows: Vec<u32>, b: usize, seed: u64) -> Result<Batches> {
        let samples = rows.len();
        if samples < b {
            bail!(
                "the data has {samples} training row(s), fewer than one batch of train.batch_size = {b}\n  hint: lower train.batch_size or add data"
            );
        }
        Ok(Batches { seed, b, rows, epoch: None, order: Vec::new(), scratch: Vec::new() })
    }

    /// Rows trained on.
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Micro-batches per epoch.
    pub fn per_epoch(&self) -> usize {
        self.rows.len() / self.b
    }

    /// Fills the micro-batch at `cursor` and advances it; returns its real (non-pad) tokens.
    pub fn next(&mut self, ds: &Dataset, cursor: &mut Cursor, ids: &mut [u32], targets: &mut [i32]) -> usize {
        self.settle(cursor);
        let t = ds.t;
        let mut real = 0;
        for r in 0..self.b {
            let sample = self.sample(cursor, r);
            real += ds.fill(
                sample,
                &mut ids[r * t..(r + 1) * t],
                &mut targets[r * t..(r + 1) * t],
                &mut self.scratch,
            );
        }
        cursor.batch += 1;
        real
    }

    /// Passes over the micro-batch at `cursor` (another rank trains it); returns its real
    /// tokens, as [`Batches::next`] would.
    pub fn skip(&mut self, ds: &Dataset, cursor: &mut Cursor) -> usize {
        self.settle(cursor);
        let real = (0..self.b).map(|r| ds.real_tokens(self.sample(cursor, r))).sum();
        cursor.batch += 1;
        real
    }

    /// The rows of the micro-batch at `cursor` (which does not move), as sample indices.
    pub fn samples_at(&mut self, cursor: Cursor) -> Vec<usize> {
        let mut c = cursor;
        self.settle(&mut c);
        (0..self.b).map(|r| self.sample(&c, r)).collect()
    }

    /// Moves a cursor past the end of an epoch to the next one, and draws that epoch's order.
    fn settle(&mut self, cursor: &mut Cursor) {
        if cursor.batch >= self.per_epoch() {
            cursor.epoch += 1;
            cursor.batch = 0;
        }
        if self.epoch != Some(cursor.epoch) {
            permutation(self.rows.len(), self.seed, cursor.epoch, &mut self.order);
            self.epoch = Some(cursor.epoch);
        }
    }

    fn sample(&self, cursor: &Cursor, r: usize) -> usize {
        self.rows[self.order[cursor.batch * self.b + r] as usize] as usize
    }
}

/// Splits `samples` rows into (training rows, validation rows): `fraction` of them, chosen by
/// `seed`, held out. Both in ascending order. Pure.
pub fn hold_out(samples: usize, fraction: f64, seed: u64) -> (Vec<u32>, Vec<u32>) {
    let held = (samples as f64 * fraction).round() as usize;
    if held == 0 {
        return ((0..samples as u32).collect(), Vec::new());
    }
    let mut order = Vec::new();
    // A stream of its own: the held-out rows do not depend on the epochs' shuffles.
    permutation(samples, seed ^ 0x005E_ED0F_DA7A, u32::MAX as usize, &mut order);
    let mut val = order[..held.min(samples)].to_vec();
    let mut train = order[held.min(samples)..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

/// Fisher-Yates permutation of `0..n` from (seed, epoch).
pub fn permutation(n: usize, seed: u64, epoch: usize, out: &mut Vec<u32>) {
    out.clear();
    out.extend(0..n as u32);
    let mut rng = SplitMix64::new(seed ^ (epoch as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03));
    for i in (1..n).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        out.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_out_rows_are_disjoint_seeded_and_complete() {
        let (train, val) = hold_out(1000, 0.05, 3);
        assert_eq!((train.len(), val.len()), (950, 50));
        let mut all: Vec<u32> = train.iter().chain(&val).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1000).collect::<Vec<u32>>());
        assert_eq!(hold_out(1000, 0.05, 3), (train, val.clone()), "the same seed, the same rows");
        assert_ne!(hold_out(1000, 0.05, 4).1, val, "another seed, other rows");
        assert_eq!(hold_out(10, 0.0, 1), ((0..10).collect(), Vec::new()));
    }

    #[test]
    fn permutations_are_deterministic_per_epoch() {
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        permutation(100, 7, 0, &mut a);
        permutation(100, 7, 0, &mut b);
        permutation(100, 7, 1, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<u32>>());
    }
}
