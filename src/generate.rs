//! `minimind generate`: sampling one token at a time through the engine's own forward with a
//! KV cache (`Engine::decode`), so generation and training share one forward.

use std::io::Write;
use std::path::Path;

use anyhow::{Result, bail};

use crate::config::{Device, Dtype, ModelConfig};
use crate::data::Tok;
use crate::engine::backend::{self, Task};
use crate::engine::{Engine, Kernels, hf};
use crate::rng::SplitMix64;
use crate::train::checkpoint;

/// How tokens are drawn.
#[derive(clap::Args, Clone, Debug)]
pub struct Sampling {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token.
    #[arg(long, default_value_t = 0.85)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass.
    #[arg(long, default_value_t = 0.85)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// A model to sample from: its shape, tokenizer and weights, and where they came from.
struct Loaded {
    cfg: ModelConfig,
    tok: Tok,
    params: Vec<f32>,
}

/// The model in `dir`: a model folder, a finished run's export, or (for a run that has not
/// finished) its newest complete checkpoint with the run's config and tokenizer.
fn load(dir: &Path) -> Result<Loaded> {
    let export = dir.join("model");
    let folder = if export.join("config.json").is_file() { export } else { dir.to_path_buf() };
    if folder.join("config.json").is_file() {
        let f = hf::read_folder(&folder)?;
        return Ok(Loaded { tok: Tok::load(&f.tokenizer)?, cfg: f.config, params: f.params });
    }
    let run = crate::run_dir::RunDir::open(dir).map_err(|_| {
        anyhow::anyhow!("{} has no config.json: give a run folder or a model folder", dir.display())
    })?;
    let (config, _) = crate::config::load_run_config(&run.config_path(), &[])?;
    let (newest, damaged) = checkpoint::newest_intact(
        &run.checkpoints_dir(),
        &config.model,
        checkpoint::Damaged::Leave,
        &|_| Ok(None),
    )?;
    let Some(loaded) = newest else {
        let damaged = if damaged.is_empty() { String::new() } else { format!(" ({})", damaged.join("; ")) };
        bail!("{} has no exported model and no complete checkpoint yet{damaged}", dir.display());
    };
    for note in &damaged {
        eprintln!("{note}");
    }
    eprintln!("(no export yet: sampling from {}, step {})", loaded.dir.display(), loaded.state.step);
    Ok(Loaded { tok: Tok::load(&config.data.tokenizer)?, cfg: config.model, params: loaded.params })
}

/// Samples a continuation of `prompt` on `device`, streaming it to stdout.
pub fn run(dir: &Path, prompt: &str, s: &Sampling, device: Device) -> Result<()> {
    let loaded = load(dir)?;
    backend::run(device, Dtype::Float32, false, Generate { loaded, prompt, s })?
}

/// Generation, on whichever backend runs it.
struct Generate<'a> {
    loaded: Loaded,
    prompt: &'a str,
    s: &'a Sampling,
}

impl Task for Generate<'_> {
    type Out = Result<()>;
    fn run<K: Kernels>(self, kernels: K) -> Result<()> {
        let Generate { loaded: Loaded { cfg, tok, params }, prompt, s } = self;
        let mut prompt_ids = vec![tok.bos];
        prompt_ids.extend(tok.encode(prompt)?);
        let max_len = (prompt_ids.len() + s.max_new_tokens).min(cfg.max_position_embeddings);
        if prompt_ids.len() >= max_len {
            bail!(
                "the prompt has {} tokens, as many as the model's max_position_embeddings",
                prompt_ids.len()
            );
        }
        let vocab = cfg.vocab_size;
        let mut engine = Engine::for_inference(kernels, cfg, 1, 1)?;
        engine.set_params(&params);
        let mut cache = engine.kv_cache(max_len);
        let mut rng = SplitMix64::new(s.seed);
        let mut logits = vec![0.0; vocab];
        for &id in &prompt_ids {
            engine.decode(&mut cache, id, &mut logits);
        }
        engine.kernels.check()?;
        print!("{prompt}");
        let mut out_ids: Vec<u32> = Vec::new();
        let mut printed = 0;
        let stdout = std::io::stdout();
        while out_ids.len() < s.max_new_tokens {
            let next = sample(&mut logits, s, &mut rng);
            if next == tok.eos {
                break;
            }
            out_ids.push(next);
            let text = tok.decode(&out_ids)?;
            // Print only whole characters (a byte-level token may end mid-character).
            if !text.ends_with('\u{FFFD}') && text.len() > printed {
                print!("{}", &text[printed..]);
                let _ = stdout.lock().flush();
                printed = text.len();
            }
            if cache.len >= max_len {
                break;
            }
            engine.decode(&mut cache, next, &mut logits);
        }
        println!();
        engine.kernels.check()
    }
}

/// Temperature, top-k, top-p, then a draw. Temperature 0 is greedy.
fn sample(logits: &mut [f32], s: &Sampling, rng: &mut SplitMix64) -> u32 {
    if s.temperature <= 0.0 {
        return argmax(logits) as u32;
    }
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    let keep = if s.top_k > 0 { s.top_k.min(idx.len()) } else { idx.len() };
    idx.truncate(keep);
    let max = logits[idx[0]];
    let mut probs: Vec<f32> = idx.iter().map(|&i| ((logits[i] - max) / s.temperature).exp()).collect();
    let sum: f32 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= sum);
    let mut cum = 0.0;
    let mut cut = probs.len();
    for (i, p) in probs.iter().enumerate() {
        cum += p;
        if cum >= s.top_p {
            cut = i + 1;
            break;
        }
    }
    let total: f32 = probs[..cut].iter().sum();
    let mut r = rng.next_f32() * total;
    for (i, p) in probs[..cut].iter().enumerate() {
        r -= p;
        if r <= 0.0 {
            return idx[i] as u32;
        }
    }
    idx[cut - 1] as u32
}

fn argmax(x: &[f32]) -> usize {
    x.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map_or(0, |(i, _)| i)
}
