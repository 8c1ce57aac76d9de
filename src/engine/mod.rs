//! The training engine: MiniMind's forward and backward written out over fused kernels
//! (llm.c style), flat parameter / gradient / AdamW buffers and an activation workspace
//! allocated once.
//!
//! Shape legend: B batch, T time, N = B*T, C channels, H query heads, G key/value heads,
//! D head dim, I feed-forward width, V vocabulary, E experts, K experts per token.

pub mod cpu;
pub mod hf;
pub mod kernels;
pub mod layout;
pub(crate) mod model;
pub(crate) mod moe;

pub use kernels::{AdamW, Kernels};
pub use layout::Layout;
pub use model::{Losses, keep_attention_probs, rope_tables, workspace_bytes};

use crate::config::{ModelConfig, TrainConfig};
use model::{Model, Workspace};

/// Optimiser settings, built from the `[train]` section.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OptimConfig {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// Max global gradient norm; 0 disables clipping.
    pub grad_clip: f32,
}

impl OptimConfig {
    pub fn from_train(t: &TrainConfig) -> OptimConfig {
        OptimConfig {
            beta1: t.betas[0] as f32,
            beta2: t.betas[1] as f32,
            eps: t.eps as f32,
            weight_decay: t.weight_decay as f32,
            grad_clip: t.grad_clip as f32,
        }
    }
}

/// A model with its parameters, gradients, AdamW state and workspace on one device.
pub struct Engine<K: Kernels> {
    pub kernels: K,
    pub config: ModelConfig,
    pub layout: Layout,
    params: K::Buf,
    grads: K::Buf,
    adam_m: K::Buf,
    adam_v: K::Buf,
    ws: Workspace<K>,
    /// Optimiser steps taken (AdamW's t).
    pub step: u64,
    /// The gradients are known to be zero (AdamW leaves them so): zeroing can be skipped.
    grads_zero: bool,
}

impl<K: Kernels> Engine<K> {
    /// Allocates everything for micro-batches of up to `batch` rows of `seq` tokens; the
    /// parameters start at zero (call [`Engine::init_weights`] or [`Engine::set_params`]).
    /// Fails on a model shape the kernels cannot run ([`ModelConfig::validate`]).
    pub fn new(kernels: K, config: ModelConfig, batch: usize, seq: usize) -> anyhow::Result<Self> {
        let keep = model::keep_attention_probs(&config, batch, seq);
        Self::with_attention_probs(kernels, config, batch, seq, keep)
    }

    /// As [`Engine::new`], choosing whether backward keeps (`true`) or recomputes the
    /// attention probabilities; the results are the same bits either way.
    pub fn with_attention_probs(
        kernels: K,
        config: ModelConfig,
        batch: usize,
        seq: usize,
        keep: bool,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        anyhow::ensure!(batch > 0 && seq > 0, "an engine needs at least one row of one token");
        let layout = Layout::new(&config);
        let total = layout.total;
        let ws = Workspace::new(&kernels, &config, batch, seq, keep);
        Ok(Engine {
            params: kernels.alloc(total),
            grads: kernels.alloc(total),
            adam_m: kernels.alloc(total),
            adam_v: kernels.alloc(total),
            ws,
            kernels,
            config,
            layout,
            step: 0,
            grads_zero: true,
        })
    }

    pub fn batch_capacity(&self) -> (usize, usize) {
        (self.ws.b, self.ws.t)
    }

    /// PyTorch's default initialisation, as MiniMind gets it: every linear (and the tied
    /// embedding/head, a `Linear(C, V)`) uniform in ±1/sqrt(fan_in), norms at one. Each
    /// tensor has its own stream from `seed`, so the result is independent of threads.
    pub fn init_weights(&mut self, seed: u64) {
        let mut host = vec![0.0f32; self.layout.total];
        for (i, t) in self.layout.tensors.iter().enumerate() {
            let dst = &mut host[t.range.clone()];
            if Layout::is_norm(&t.name) {
                dst.fill(1.0);
                continue;
            }
            let bound = 1.0 / (*t.shape.last().expect("2-d weight") as f32).sqrt();
            let mut rng = SplitMix64::new(seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(i as u64 + 1)));
            dst.iter_mut().for_each(|v| *v = (rng.next_f32() * 2.0 - 1.0) * bound);
        }
        self.set_params(&host);
    }

    pub fn set_params(&mut self, host: &[f32]) {
        assert_eq!(host.len(), self.layout.total, "parameter count");
        let k = &self.kernels;
        k.upload(k.view_mut(&mut self.params, 0..host.len()), host);
    }

    pub fn params_host(&self) -> Vec<f32> {
        self.host(&self.params)
    }
    pub fn grads_host(&self) -> Vec<f32> {
        self.host(&self.grads)
    }
    /// AdamW first and second moments.
    pub fn moments_host(&self) -> (Vec<f32>, Vec<f32>) {
        (self.host(&self.adam_m), self.host(&self.adam_v))
    }
    pub fn set_moments(&mut self, m: &[f32], v: &[f32]) {
        let k = &self.kernels;
        let n = self.layout.total;
        assert!(m.len() == n && v.len() == n, "moment sizes");
        k.upload(k.view_mut(&mut self.adam_m, 0..n), m);
        k.upload(k.view_mut(&mut self.adam_v, 0..n), v);
    }

    fn host(&self, buf: &K::Buf) -> Vec<f32> {
        let mut out = vec![0.0; self.layout.total];
        self.kernels.download(self.kernels.view(buf, 0..self.layout.total), &mut out);
        out
    }

    /// Zeroes the gradients (free right after a step, which leaves them at zero).
    pub fn zero_grads(&mut self) {
        if !self.grads_zero {
            let k = &self.kernels;
            k.fill(k.view_mut(&mut self.grads, 0..self.layout.total), 0.0);
            self.grads_zero = true;
        }
    }

    fn check_batch(&self, ids: &[u32], targets: Option<&[i32]>) {
        let (b, t) = (self.ws.b, self.ws.t);
        assert!(
            !ids.is_empty() && ids.len().is_multiple_of(t) && ids.len() <= b * t,
            "a micro-batch is up to {b} rows of exactly {t} tokens, got {} tokens",
            ids.len()
        );
        assert!(ids.iter().all(|&i| (i as usize) < self.config.vocab_size), "token id out of range");
        if let Some(targets) = targets {
            assert_eq!(targets.len(), ids.len(), "one target per token");
            assert!(targets.iter().all(|&i| i < self.config.vocab_size as i32), "target out of range");
        }
    }

    /// Forward and backward of one micro-batch; gradients are added (times `grad_scale`).
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[i32], grad_scale: f32) -> Losses {
        self.check_batch(ids, Some(targets));
        self.grads_zero = false;
        let model = Model { k: &self.kernels, m: &self.config, layout: &self.layout };
        model.forward_backward(&self.params, &mut self.grads, &mut self.ws, ids, targets, grad_scale)
    }

    /// Summed loss over kept targets, and their count (no gradients).
    pub fn loss(&mut self, ids: &[u32], targets: &[i32]) -> (f64, usize) {
        self.check_batch(ids, Some(targets));
        let model = Model { k: &self.kernels, m: &self.config, layout: &self.layout };
        model.loss(&self.params, &mut self.ws, ids, targets)
    }

    /// Full logits `[N, V]`.
    pub fn logits(&mut self, ids: &[u32], out: &mut [f32]) {
        self.check_batch(ids, None);
        assert_eq!(out.len(), ids.len() * self.config.vocab_size, "logits buffer size");
        let model = Model { k: &self.kernels, m: &self.config, layout: &self.layout };
        model.logits(&self.params, &mut self.ws, ids, out);
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&self) -> f64 {
        let k = &self.kernels;
        k.sum_squares(k.view(&self.grads, 0..self.layout.total)).sqrt()
    }

    /// Clips the gradients to `grad_clip` (PyTorch's `clip_grad_norm_`), then one AdamW step
    /// at `lr`, which consumes them (they are zero afterwards). Returns the norm before
    /// clipping.
    pub fn optimizer_step(&mut self, lr: f32, o: &OptimConfig) -> f64 {
        let norm = self.grad_norm();
        let n = self.layout.total;
        let k = &self.kernels;
        // PyTorch's clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1; applied
        // inside the AdamW pass instead of a pass of its own.
        let coef = if o.grad_clip > 0.0 { (o.grad_clip as f64 / (norm + 1e-6)).min(1.0) } else { 1.0 };
        self.step += 1;
        let h = AdamW {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            step: self.step,
            grad_scale: coef as f32,
        };
        k.adamw(
            k.view_mut(&mut self.params, 0..n),
            k.view_mut(&mut self.grads, 0..n),
            k.view_mut(&mut self.adam_m, 0..n),
            k.view_mut(&mut self.adam_v, 0..n),
            h,
        );
        self.grads_zero = true;
        norm
    }
}

/// Forward FLOPs per token: 2 per multiply-add of every matrix product a token goes through
/// (routed experts counted K times), plus causal attention at sequence length `t`.
pub fn flops_per_token(m: &ModelConfig, t: usize) -> f64 {
    let (c, i, d) = (m.hidden_size as f64, m.intermediate_size as f64, m.head_dim as f64);
    let (h, g) = (m.num_attention_heads as f64, m.num_key_value_heads as f64);
    let attn_proj = c * h * d * 2.0 + c * g * d * 2.0;
    let ffn = 3.0 * c * i;
    let mlp = if m.use_moe {
        (m.num_experts_per_tok + m.n_shared_experts) as f64 * ffn + m.n_routed_experts as f64 * c
    } else {
        ffn
    };
    // q kᵀ and P v over (t+1)/2 keys on average.
    let attn = 2.0 * h * d * (t as f64 + 1.0) / 2.0;
    let per_layer = attn_proj + mlp + attn;
    2.0 * (m.num_hidden_layers as f64 * per_layer + m.vocab_size as f64 * c)
}

/// A small, fast, splittable generator (SplitMix64) for initialisation and sampling.
#[derive(Clone, Debug)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    pub fn state(&self) -> u64 {
        self.0
    }
}
