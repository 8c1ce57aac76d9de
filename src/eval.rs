//! Evaluation: mean next-token loss of a model on the first rows of a jsonl file, in file
//! order, encoded as MiniMind encodes them (`[bos] + tokens[:T-2] + [eos]`, padded).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::data::{Tok, encode_row};
use crate::engine::{Engine, Kernels};

/// An evaluation result, as `--json` prints it and meta.json records it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// Mean cross-entropy over all non-pad targets.
    pub loss: f64,
    /// Number of targets averaged.
    pub tokens: usize,
}

/// The first `rows` documents of `path` as `(ids, targets)`, `rows x t` each.
pub fn first_rows(path: &Path, tok: &Tok, t: usize, rows: usize) -> Result<(Vec<u32>, Vec<i32>)> {
    let f = File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
    let (mut ids, mut targets) = (Vec::new(), Vec::new());
    for (no, line) in BufReader::new(f).lines().enumerate() {
        if ids.len() == rows * t {
            break;
        }
        let line = line.with_context(|| format!("reading {}:{}", path.display(), no + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let text = crate::data::cache::parse_line(&line)
            .map_err(|why| anyhow::anyhow!("{}:{}: malformed line: {why}", path.display(), no + 1))?;
        let tokens = tok.encode(&text)?;
        let start = ids.len();
        ids.resize(start + t, 0);
        targets.resize(start + t, 0);
        encode_row(&tokens, t, tok.bos, tok.eos, tok.pad, &mut ids[start..], &mut targets[start..]);
    }
    if ids.is_empty() {
        bail!("data file {} has no documents", path.display());
    }
    Ok((ids, targets))
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

/// `minimind eval`: a Hugging Face style folder on the first `batches x b` rows of `data`.
pub fn eval_dir(
    dir: &Path,
    data: &Path,
    tokenizer: Option<&Path>,
    t: usize,
    b: usize,
    batches: usize,
) -> Result<EvalResult> {
    if t < 2 || b == 0 || batches == 0 {
        bail!("--seq-len must be at least 2, --batch-size and --batches at least 1");
    }
    let cfg = crate::engine::hf::read_config(&dir.join("config.json"))?;
    let tok_path = tokenizer.map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf);
    let tok = Tok::load(&tok_path)?;
    let mut engine = Engine::new(crate::engine::cpu::Cpu::new(), cfg, b, t);
    let weights_path = dir.join("model.safetensors");
    let bytes =
        std::fs::read(&weights_path).with_context(|| format!("reading {}", weights_path.display()))?;
    let weights = crate::engine::hf::read_weights(&bytes, &engine.layout)
        .with_context(|| format!("loading {}", weights_path.display()))?;
    engine.set_params(&weights);
    let (ids, targets) = first_rows(data, &tok, t, b * batches)?;
    Ok(mean_loss(&mut engine, &ids, &targets, b, t))
}
