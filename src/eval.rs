//! Evaluation: mean next-token loss of a model on the first rows of a jsonl file, in file
//! order, encoded as MiniMind encodes them (`[bos] + tokens[:T-2] + [eos]`, padded).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::{Device, Dtype};
use crate::data::source;
use crate::data::{Skipped, Tok, encode_row};
use crate::engine::backend::{self, Task};
use crate::engine::{Engine, Kernels};

/// An evaluation result, as `--json` prints it and meta.json records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over all non-pad targets.
    pub loss: f64,
    /// Number of targets averaged.
    pub tokens: usize,
}

/// The first `rows` documents of the data at `path` (a file, folder or glob of shards, their
/// text in `field`) as `(ids, targets)`, `rows x t` each, read as the token cache reads them:
/// unusable rows are an error, or skipped (and counted) with `skip_bad_lines`.
pub fn first_rows(
    (path, field): (&Path, &str),
    tok: &Tok,
    t: usize,
    rows: usize,
    skip_bad_lines: bool,
) -> Result<(Vec<u32>, Vec<i32>, Skipped)> {
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    let mut skipped = Skipped::default();
    let mut docs = Vec::new();
    'shards: for shard in source::shards(path)? {
        let mut reader = source::open(&shard, field)?;
        loop {
            docs.clear();
            let more = reader.fill(&mut docs, 256, 1 << 20)?;
            for (no, text) in docs.drain(..) {
                if ids.len() == rows * t {
                    break 'shards;
                }
                let text = match text {
                    Ok(text) => text,
                    Err(_) if skip_bad_lines => {
                        skipped.add(no);
                        continue;
                    }
                    Err(why) => bail!(
                        "{}:{no}: malformed line: {why}\n  hint: fix the line, or skip such lines (data.skip_bad_lines = true, or --skip-bad-lines for eval)",
                        shard.display()
                    ),
                };
                let tokens = tok.encode(&text)?;
                let start = ids.len();
                ids.resize(start + t, 0);
                targets.resize(start + t, 0);
                encode_row(&tokens, t, tok.bos, tok.eos, tok.pad, &mut ids[start..], &mut targets[start..]);
            }
            if !more {
                break;
            }
        }
    }
    if ids.is_empty() {
        bail!("data file {} has no documents", path.display());
    }
    Ok((ids, targets, skipped))
}

/// Mean loss over every non-pad target, `b` rows at a time.
pub fn mean_loss<K: Kernels>(
    engine: &mut Engine<K>,
    ids: &[u32],
    targets: &[i32],
    b: usize,
    t: usize,
) -> EvalResult {
    let (mut sum, mut count) = (0.0, 0);
    for (i, tg) in ids.chunks(b * t).zip(targets.chunks(b * t)) {
        let (s, n) = engine.loss(i, tg);
        sum += s;
        count += n;
    }
    EvalResult { loss: sum / count.max(1) as f64, tokens: count }
}

/// What `minimind eval` evaluates.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// Folder with config.json, model.safetensors and tokenizer.json.
    #[arg(long)]
    pub hf_dir: PathBuf,
    /// The documents: a JSON-lines file (one {"text": ...} per line), a folder or a glob of
    /// shards (.jsonl, .jsonl.zst, .jsonl.gz, .parquet).
    #[arg(long)]
    pub data: PathBuf,
    /// The JSON field (or Parquet column) holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Tokens per row, T.
    #[arg(long)]
    pub seq_len: usize,
    /// Rows per batch, B.
    #[arg(long)]
    pub batch_size: usize,
    /// Batches to evaluate.
    #[arg(long, default_value_t = 1)]
    pub batches: usize,
    /// Tokenizer to use instead of HF_DIR/tokenizer.json.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Skip (and count) malformed lines instead of failing.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Print `{"loss": ..., "tokens": ...}`.
    #[arg(long)]
    pub json: bool,
}

/// `minimind eval`: the model folder on the first `batches x batch_size` rows of the data, on
/// `device` (float32), printed.
pub fn command(a: &EvalArgs, device: Device) -> Result<()> {
    let (t, b) = (a.seq_len, a.batch_size);
    if t < 2 || b == 0 || a.batches == 0 {
        bail!("--seq-len must be at least 2, --batch-size and --batches at least 1");
    }
    let folder = crate::engine::hf::read_folder(&a.hf_dir)?;
    let tok = Tok::load(a.tokenizer.as_ref().unwrap_or(&folder.tokenizer))?;
    let (ids, targets, skipped) =
        first_rows((&a.data, &a.text_field), &tok, t, b * a.batches, a.skip_bad_lines)?;
    let task = Eval { cfg: folder.config, weights: &folder.params, ids: &ids, targets: &targets, b, t };
    let r = backend::run(device, Dtype::Float32, false, task)??;
    if let Some(s) = skipped.describe() {
        crate::metrics::warn(&s);
    }
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("loss={} tokens={}", r.loss, r.tokens);
    }
    Ok(())
}

/// The evaluation, on whichever backend runs it.
struct Eval<'a> {
    cfg: crate::config::ModelConfig,
    weights: &'a [f32],
    ids: &'a [u32],
    targets: &'a [i32],
    b: usize,
    t: usize,
}

impl Task for Eval<'_> {
    type Out = Result<EvalResult>;
    fn run<K: Kernels>(self, kernels: K) -> Result<EvalResult> {
        let mut engine = Engine::for_inference(kernels, self.cfg, self.b, self.t)?;
        engine.set_params(self.weights);
        let r = mean_loss(&mut engine, self.ids, self.targets, self.b, self.t);
        engine.kernels.check()?;
        Ok(r)
    }
}
