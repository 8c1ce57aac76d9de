//! `minimind generate`: sampling with a KV cache, one token at a time, on the CPU.
//!
//! Shapes: C hidden, H/G query/kv heads, D head dim, I ffn width, V vocab. Per layer the cache
//! holds K and V `[positions, G*D]` (after RoPE for K).

use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result, bail};
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::data::Tok;
use crate::engine::layout::{Ffn, Layout, Mlp};
use crate::engine::model::router_config;
use crate::engine::moe::Routing;
use crate::engine::{SplitMix64, hf, rope_tables};

#[derive(Clone, Debug)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: u64,
}

/// A model to sample from: its shape, tokenizer and weights, and where they came from.
struct Loaded {
    cfg: ModelConfig,
    tok: Tok,
    layout: Layout,
    params: Vec<f32>,
}

/// The model in `dir`: a model folder, a finished run's export, or (for a run that has not
/// finished) its newest complete checkpoint with the run's config and tokenizer.
fn load(dir: &Path) -> Result<Loaded> {
    let export = dir.join("model");
    let folder = if export.join("config.json").is_file() { export } else { dir.to_path_buf() };
    if folder.join("config.json").is_file() {
        let cfg = hf::read_config(&folder.join("config.json"))?;
        let tok = Tok::load(&folder.join("tokenizer.json"))?;
        let layout = Layout::new(&cfg);
        let path = folder.join("model.safetensors");
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let params =
            hf::read_weights(&bytes, &layout).with_context(|| format!("loading {}", path.display()))?;
        return Ok(Loaded { cfg, tok, layout, params });
    }
    let run = crate::run_dir::RunDir::open(dir).map_err(|_| {
        anyhow::anyhow!("{} has no config.json: give a run folder or a model folder", dir.display())
    })?;
    let (config, _) = crate::config::load_run_config(&run.config_path(), &[])?;
    let layout = Layout::new(&config.model);
    let mut damaged = Vec::new();
    for (_, ck) in crate::train::checkpoint::list(&run.checkpoints_dir()).into_iter().rev() {
        match crate::train::checkpoint::load(&ck, &layout) {
            Ok(loaded) => {
                let tok = Tok::load(&config.data.tokenizer)?;
                eprintln!("(no export yet: sampling from {}, step {})", ck.display(), loaded.state.step);
                return Ok(Loaded { cfg: config.model, tok, layout, params: loaded.params });
            }
            Err(e) => damaged.push(format!("{}: {e:#}", ck.display())),
        }
    }
    bail!(
        "{} has no exported model and no complete checkpoint yet{}",
        dir.display(),
        if damaged.is_empty() { String::new() } else { format!(" (damaged: {})", damaged.join("; ")) }
    )
}

pub fn run(dir: &Path, prompt: &str, s: &Sampling) -> Result<()> {
    let Loaded { cfg, tok, layout, params } = load(dir)?;
    let mut prompt_ids = vec![tok.bos];
    prompt_ids.extend(tok.encode(prompt)?);
    let max_len = (prompt_ids.len() + s.max_new_tokens).min(cfg.max_position_embeddings);
    let mut g = Generator::new(&cfg, &layout, &params, max_len);
    let mut rng = SplitMix64::new(s.seed);
    let mut logits = Vec::new();
    for &id in &prompt_ids {
        logits = g.step(id);
    }
    print!("{prompt}");
    let mut out_ids: Vec<u32> = Vec::new();
    let mut printed = 0;
    let stdout = std::io::stdout();
    while out_ids.len() < s.max_new_tokens && g.pos < max_len {
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
        if g.pos >= max_len {
            break;
        }
        logits = g.step(next);
    }
    println!();
    Ok(())
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

struct Generator<'a> {
    m: &'a ModelConfig,
    layout: &'a Layout,
    p: &'a [f32],
    cos: Vec<f32>,
    sin: Vec<f32>,
    kc: Vec<Vec<f32>>,
    vc: Vec<Vec<f32>>,
    pos: usize,
}

/// `y = W x` for `W: [rows, cols]`.
fn matvec(w: &[f32], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    y.par_iter_mut().enumerate().with_min_len(64).for_each(|(i, y)| {
        *y = w[i * cols..(i + 1) * cols].iter().zip(x).map(|(a, b)| a * b).sum();
    });
}

fn rmsnorm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let r = 1.0 / (x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32 + eps).sqrt();
    x.iter().zip(w).map(|(x, w)| w * (x * r)).collect()
}

impl<'a> Generator<'a> {
    fn new(m: &'a ModelConfig, layout: &'a Layout, p: &'a [f32], max_len: usize) -> Self {
        let (cos, sin) = rope_tables(m, max_len);
        let gd = m.num_key_value_heads * m.head_dim;
        Generator {
            m,
            layout,
            p,
            cos,
            sin,
            kc: (0..m.num_hidden_layers).map(|_| vec![0.0; max_len * gd]).collect(),
            vc: (0..m.num_hidden_layers).map(|_| vec![0.0; max_len * gd]).collect(),
            pos: 0,
        }
    }

    fn ffn(&self, f: &Ffn, x: &[f32]) -> Vec<f32> {
        let i = self.m.intermediate_size;
        let (mut g, mut u) = (vec![0.0; i], vec![0.0; i]);
        matvec(&self.p[f.gate.clone()], x, &mut g);
        matvec(&self.p[f.up.clone()], x, &mut u);
        let a: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let mut y = vec![0.0; x.len()];
        matvec(&self.p[f.down.clone()], &a, &mut y);
        y
    }

    fn rope(&self, v: &mut [f32]) {
        let d = self.m.head_dim;
        let half = d / 2;
        let (c, s) =
            (&self.cos[self.pos * d..(self.pos + 1) * d], &self.sin[self.pos * d..(self.pos + 1) * d]);
        for head in v.chunks_mut(d) {
            for j in 0..half {
                let (a, b) = (head[j], head[j + half]);
                head[j] = a * c[j] - b * s[j];
                head[j + half] = b * c[half + j] + a * s[half + j];
            }
        }
    }

    /// Feeds one token at the next position; returns the logits `[V]`.
    fn step(&mut self, token: u32) -> Vec<f32> {
        let m = self.m;
        let (c, d) = (m.hidden_size, m.head_dim);
        let (h, g) = (m.num_attention_heads, m.num_key_value_heads);
        let (hd, gd) = (h * d, g * d);
        let eps = m.rms_norm_eps as f32;
        let emb = &self.p[self.layout.embed.clone()];
        let mut x = emb[token as usize * c..(token as usize + 1) * c].to_vec();
        let pos = self.pos;
        for (l, lp) in self.layout.layers.iter().enumerate() {
            let xn = rmsnorm(&x, &self.p[lp.ln1.clone()], eps);
            let (mut q, mut k, mut v) = (vec![0.0; hd], vec![0.0; gd], vec![0.0; gd]);
            matvec(&self.p[lp.q.clone()], &xn, &mut q);
            matvec(&self.p[lp.k.clone()], &xn, &mut k);
            matvec(&self.p[lp.v.clone()], &xn, &mut v);
            self.rope(&mut q);
            self.rope(&mut k);
            self.kc[l][pos * gd..(pos + 1) * gd].copy_from_slice(&k);
            self.vc[l][pos * gd..(pos + 1) * gd].copy_from_slice(&v);
            let mut att = vec![0.0; hd];
            let scale = 1.0 / (d as f32).sqrt();
            for hi in 0..h {
                let gi = hi / (h / g);
                let qh = &q[hi * d..(hi + 1) * d];
                let mut scores: Vec<f32> = (0..=pos)
                    .map(|s| {
                        self.kc[l][s * gd + gi * d..s * gd + (gi + 1) * d]
                            .iter()
                            .zip(qh)
                            .map(|(a, b)| a * b)
                            .sum::<f32>()
                            * scale
                    })
                    .collect();
                let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let mut sum = 0.0;
                scores.iter_mut().for_each(|s| {
                    *s = (*s - max).exp();
                    sum += *s;
                });
                let out = &mut att[hi * d..(hi + 1) * d];
                for (s, w) in scores.iter().enumerate() {
                    let vrow = &self.vc[l][s * gd + gi * d..s * gd + (gi + 1) * d];
                    out.iter_mut().zip(vrow).for_each(|(o, v)| *o += w / sum * v);
                }
            }
            let mut o = vec![0.0; c];
            matvec(&self.p[lp.o.clone()], &att, &mut o);
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let xn2 = rmsnorm(&x, &self.p[lp.ln2.clone()], eps);
            let y = match &lp.mlp {
                Mlp::Dense(f) => self.ffn(f, &xn2),
                Mlp::Moe { router, experts, shared } => {
                    // The training router, on one token: the same top-k and weights.
                    let mut logits = vec![0.0; m.n_routed_experts];
                    matvec(&self.p[router.clone()], &xn2, &mut logits);
                    let mut route = Routing::default();
                    route.route(&logits, 1, 1, router_config(m));
                    let mut y = vec![0.0; c];
                    for (&ex, wt) in route.expert.iter().zip(&route.weight) {
                        let out = self.ffn(&experts[ex as usize], &xn2);
                        y.iter_mut().zip(&out).for_each(|(y, o)| *y += wt * o);
                    }
                    for f in shared {
                        let out = self.ffn(f, &xn2);
                        y.iter_mut().zip(&out).for_each(|(y, o)| *y += o);
                    }
                    y
                }
            };
            x.iter_mut().zip(&y).for_each(|(x, y)| *x += y);
        }
        let xf = rmsnorm(&x, &self.p[self.layout.norm.clone()], eps);
        let mut logits = vec![0.0; m.vocab_size];
        matvec(emb, &xf, &mut logits);
        self.pos += 1;
        logits
    }
}
