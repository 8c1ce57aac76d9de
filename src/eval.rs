//! Evaluation: mean next-token loss of a model on the first rows of a jsonl file, in file
//! order, encoded as MiniMind encodes them (`[bos] + tokens[:T-2] + [eos]`, padded).

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::config::{Device, Dtype};
use crate::data::jsonl::{Lines, parse_line};
use crate::data::{Skipped, Tok, encode_row};
use crate::engine::backend::{self, Task};
use crate::engine::{Engine, Kernels, Layout};

/// An evaluation result, as `--json` prints it and meta.json records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over all non-pad targets.
    pub loss: f64,
    /// Number of targets averaged.
    pub tokens: usize,
}

/// The first `rows` documents of `path` as `(ids, targets)`, `rows x t` each, read as the
/// token cache reads the file: malformed lines are an error, or skipped (and counted) with
/// `skip_bad_lines`.
pub fn first_rows(
    path: &Path,
    tok: &Tok,
    t: usize,
    rows: usize,
    skip_bad_lines: bool,
) -> Result<(Vec<u32>, Vec<i32>, Skipped)> {
    let f = File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    let mut skipped = Skipped::default();
    for line in Lines::new(BufReader::new(f)) {
        if ids.len() == rows * t {
            break;
        }
        let (no, line) = line.with_context(|| format!("reading {}", path.display()))?;
        let text = match line.and_then(|l| parse_line(&l)) {
            Ok(text) => text,
            Err(_) if skip_bad_lines => {
                skipped.add(no);
                continue;
            }
            Err(why) => bail!(
                "{}:{no}: malformed line: {why}\n  hint: fix the line, or skip such lines (data.skip_bad_lines = true, or --skip-bad-lines for eval)",
                path.display()
            ),
        };
        let tokens = tok.encode(&text)?;
        let start = ids.len();
        ids.resize(start + t, 0);
        targets.resize(start + t, 0);
        encode_row(&tokens, t, tok.bos, tok.eos, tok.pad, &mut ids[start..], &mut targets[start..]);
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

/// `minimind eval`: a Hugging Face style folder on the first `batches x b` rows of `data`,
/// on `device` (float32).
#[allow(clippy::too_many_arguments)]
pub fn eval_dir(
    dir: &Path,
    data: &Path,
    tokenizer: Option<&Path>,
    t: usize,
    b: usize,
    batches: usize,
    skip_bad_lines: bool,
    device: Device,
) -> Result<(EvalResult, Skipped)> {
    if t < 2 || b == 0 || batches == 0 {
        bail!("--seq-len must be at least 2, --batch-size and --batches at least 1");
    }
    let cfg = crate::engine::hf::read_config(&dir.join("config.json"))?;
    let tok_path = tokenizer.map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf);
    let tok = Tok::load(&tok_path)?;
    let weights_path = dir.join("model.safetensors");
    let bytes =
        std::fs::read(&weights_path).with_context(|| format!("reading {}", weights_path.display()))?;
    let weights = crate::engine::hf::read_weights(&bytes, &Layout::new(&cfg))
        .with_context(|| format!("loading {}", weights_path.display()))?;
    let (ids, targets, skipped) = first_rows(data, &tok, t, b * batches, skip_bad_lines)?;
    let task = Eval { cfg, weights: &weights, ids: &ids, targets: &targets, b, t };
    let result = backend::run(device, Dtype::Float32, false, task)??;
    Ok((result, skipped))
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
