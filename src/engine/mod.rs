//! The training engine: MiniMind's forward and backward written out over fused kernels
//! (llm.c style), flat parameter / gradient / AdamW buffers and an activation workspace
//! allocated once.
//!
//! Shape legend: B batch, T time, N = B*T, C channels, H query heads, G key/value heads,
//! D head dim, I feed-forward width, V vocabulary, E experts, K experts per token.

pub mod backend;
pub mod comm;
pub mod conformance;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dry;
pub mod gpu;
pub mod hf;
pub mod kernels;
pub mod layout;
pub(crate) mod model;
pub(crate) mod moe;
pub mod scaler;

pub use kernels::{AdamW, Gemm, KernelTime, Kernels};
pub use layout::Layout;
pub use model::{Footprint, KvCache, Losses, keep_attention_probs, rope_tables, workspace_bytes};

use std::ops::Range;

use crate::config::{Dtype, ModelConfig};
use crate::rng::SplitMix64;
use model::{Model, Weights, Workspace, acc};
pub use scaler::LossScaler;

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

/// A model with its parameters, gradients, AdamW state and workspace on one device.
pub struct Engine<K: Kernels> {
    pub kernels: K,
    pub config: ModelConfig,
    pub layout: Layout,
    params: K::Buf,
    /// The weights in the activations' storage when that is not f32 (bf16/f16 on CUDA): what
    /// the matrix products read, refreshed from `params` by every AdamW step and every load.
    params_act: Option<K::Buf>,
    grads: K::Buf,
    /// A micro-batch's own gradients when it is not the step's first: computed from zero and
    /// then added to `grads`, as PyTorch accumulates `.grad`, so that a step's gradient is the
    /// same sum however its micro-batches are split over ranks. Allocated on first use.
    micro_grads: Option<K::Buf>,
    adam_m: K::Buf,
    adam_v: K::Buf,
    ws: Workspace<K>,
    /// The micro-batch's token ids and targets, on the device.
    ids: K::Idx,
    targets: K::Idx,
    /// Losses, norms and the clipping coefficient, on the device (slots in `model::acc`).
    acc: K::Acc,
    /// Reused host buffer for ids and targets on their way up (no allocation per step).
    staging: Vec<i32>,
    /// Optimiser steps taken (AdamW's t).
    pub step: u64,
    /// The gradients are known to be zero (AdamW leaves them so): zeroing can be skipped.
    grads_zero: bool,
    /// Has gradients and optimiser state (not built by `for_inference`).
    trainable: bool,
    /// Dynamic loss scaling, when the kernels compute in float16.
    pub scaler: Option<LossScaler>,
    /// The last update was skipped (float16: gradients not finite).
    skipped: bool,
}

/// The numbers of the optimiser step just taken, read from the device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean over the step's micro-batches of their mean loss over kept targets.
    pub lm: f64,
    /// Mean over the micro-batches of the summed MoE aux losses.
    pub aux: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// float16: the update was skipped (its gradients overflowed) and the loss scale halved.
    pub skipped: bool,
}

impl<K: Kernels> Engine<K> {
    /// Allocates everything for micro-batches of up to `batch` rows of `seq` tokens; the
    /// parameters start at zero (call [`Engine::init_weights`] or [`Engine::set_params`]).
    /// Fails on a model shape the kernels cannot run ([`ModelConfig::validate`]).
    pub fn new(kernels: K, config: ModelConfig, batch: usize, seq: usize) -> anyhow::Result<Self> {
        let keep = model::keep_attention_probs(&config, batch, seq);
        Self::with_attention_probs(kernels, config, batch, seq, keep)
    }

    /// An engine that only runs forward (evaluation, generation): no gradients or optimiser
    /// state are allocated.
    pub fn for_inference(kernels: K, config: ModelConfig, batch: usize, seq: usize) -> anyhow::Result<Self> {
        let mut e = Self::with_attention_probs(kernels, config, batch, seq, false)?;
        let k = &e.kernels;
        (e.grads, e.adam_m, e.adam_v) = (k.alloc(0), k.alloc(0), k.alloc(0));
        e.trainable = false;
        Ok(e)
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
        let kernels_dtype = kernels.dtype();
        let params_act = (kernels_dtype != Dtype::Float32).then(|| kernels.alloc_act(total));
        Ok(Engine {
            params: kernels.alloc(total),
            params_act,
            grads: kernels.alloc(total),
            micro_grads: None,
            adam_m: kernels.alloc(total),
            adam_v: kernels.alloc(total),
            ws,
            ids: kernels.alloc_idx(batch * seq),
            targets: kernels.alloc_idx(batch * seq),
            acc: kernels.alloc_acc(acc::LEN),
            staging: Vec::with_capacity(batch * seq),
            kernels,
            config,
            layout,
            step: 0,
            grads_zero: true,
            trainable: true,
            scaler: (kernels_dtype == Dtype::Float16).then(LossScaler::default),
            skipped: false,
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
        self.refresh_params_act();
    }

    /// Rounds the weights into the matrix products' copy (after they changed other than by
    /// AdamW, which writes both), and tells the kernels they changed.
    fn refresh_params_act(&mut self) {
        let (k, n) = (&self.kernels, self.layout.total);
        k.weights_written(&self.params);
        if let Some(px) = &mut self.params_act {
            k.cast(k.view_mut(px, 0..n), k.view(&self.params, 0..n));
        }
    }

    /// The weights as the model reads them (borrowing the two fields only, so the gradients
    /// and workspace stay free to borrow mutably).
    fn weights<'a>(params: &'a K::Buf, params_act: &'a Option<K::Buf>) -> Weights<'a, K> {
        Weights { master: params, matmul: params_act.as_ref().unwrap_or(params) }
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

    /// Checks a micro-batch and uploads its ids (and targets); returns its rows and how many
    /// targets are kept.
    fn load_batch(&mut self, ids: &[u32], targets: Option<&[i32]>) -> (usize, usize) {
        let (b, t) = (self.ws.b, self.ws.t);
        assert!(
            !ids.is_empty() && ids.len().is_multiple_of(t) && ids.len() <= b * t,
            "a micro-batch is up to {b} rows of exactly {t} tokens, got {} tokens",
            ids.len()
        );
        let vocab = self.config.vocab_size;
        assert!(ids.iter().all(|&i| (i as usize) < vocab), "token id out of range");
        let k = &self.kernels;
        self.staging.clear();
        self.staging.extend(ids.iter().map(|&i| i as i32));
        k.upload_idx(&mut self.ids, &self.staging);
        let mut kept = 0;
        if let Some(targets) = targets {
            assert_eq!(targets.len(), ids.len(), "one target per token");
            assert!(targets.iter().all(|&i| i < vocab as i32), "target out of range");
            kept = targets.iter().filter(|&&t| t >= 0).count();
            k.upload_idx(&mut self.targets, targets);
        }
        (ids.len(), kept)
    }

    /// Starts an optimiser step: gradients and the step's loss totals at zero.
    pub fn begin_step(&mut self) {
        self.zero_grads();
        self.kernels.zero_acc(&mut self.acc, acc::STEP_LM..acc::STEP_AUX + 1);
    }

    /// Forward and backward of one micro-batch of an optimiser step made of `accumulation`
    /// of them: gradients are added (times `grad_scale`), the losses added to the step's
    /// totals on the device. Nothing is read back. On the step's last micro-batch `reduce`
    /// sums the gradients over the ranks, span by span as backward finishes them (so on a
    /// device whose communicator has a stream of its own the sums overlap the rest of the
    /// backward); [`Engine::settle`] then waits for it before the update.
    pub fn accumulate(
        &mut self,
        ids: &[u32],
        targets: &[i32],
        grad_scale: f32,
        accumulation: usize,
        mut reduce: Option<&mut dyn comm::Communicator<K>>,
    ) {
        assert!(self.trainable, "an inference engine has no gradients");
        // float16: the gradients carry the loss scale until the update divides it out.
        let grad_scale = grad_scale * self.scaler.map_or(1.0, |s| s.scale);
        let (n, kept) = self.load_batch(ids, Some(targets));
        let first = self.grads_zero;
        self.grads_zero = false;
        let (k, total) = (&self.kernels, self.layout.total);
        let model = Model::new(k, &self.config, &self.layout);
        let tv = &self.targets;
        let iv = k.idx(&self.ids, 0..n);
        let mut covered = 0;
        let mut sum_over_ranks = |g: &mut K::Buf, span: Range<usize>| {
            covered += span.len();
            if let Some(c) = reduce.as_deref_mut() {
                for bucket in comm::buckets(span) {
                    c.all_reduce_sum(k, g, bucket);
                }
            }
        };
        // After the step's first micro-batch each one is computed apart, then added span by
        // span: a sum of whole micro-batch gradients, as PyTorch accumulates `.grad` (and as
        // the ranks' gradients are summed).
        let mut add_then_sum;
        let (into, ready): (&mut K::Buf, model::Ready<'_, K>) = if first {
            (&mut self.grads, &mut sum_over_ranks)
        } else {
            let micro = self.micro_grads.get_or_insert_with(|| k.alloc(total));
            k.fill(k.view_mut(micro, 0..total), 0.0);
            let grads = &mut self.grads;
            add_then_sum = move |g: &mut K::Buf, span: Range<usize>| {
                k.add(k.view_mut(grads, span.clone()), k.view(g, span.clone()));
                sum_over_ranks(grads, span);
            };
            (micro, &mut add_then_sum)
        };
        model.forward_backward(
            Self::weights(&self.params, &self.params_act),
            into,
            &mut self.ws,
            &mut self.acc,
            iv,
            tv,
            n,
            kept,
            grad_scale,
            ready,
        );
        assert_eq!(covered, total, "backward reported every gradient once");
        let a = accumulation as f64;
        k.fold_acc(&mut self.acc, acc::MB_LM, acc::STEP_LM, kept.max(1) as f64, a);
        k.fold_acc(&mut self.acc, acc::MB_AUX, acc::STEP_AUX, 1.0, a);
    }

    /// Forward and backward of one micro-batch, its losses read back; gradients are added
    /// (times `grad_scale`).
    pub fn forward_backward(&mut self, ids: &[u32], targets: &[i32], grad_scale: f32) -> Losses {
        self.accumulate(ids, targets, grad_scale, 1, None);
        let kept = targets.iter().filter(|&&t| t >= 0).count();
        let a = self.read_acc();
        Losses { lm: a[acc::MB_LM] / kept.max(1) as f64, aux: a[acc::MB_AUX], targets: kept }
    }

    /// Summed loss over kept targets, and their count (no gradients).
    pub fn loss(&mut self, ids: &[u32], targets: &[i32]) -> (f64, usize) {
        let (n, kept) = self.load_batch(ids, Some(targets));
        let model = Model::new(&self.kernels, &self.config, &self.layout);
        let iv = self.kernels.idx(&self.ids, 0..n);
        model.loss(
            Self::weights(&self.params, &self.params_act),
            &mut self.ws,
            &mut self.acc,
            iv,
            &self.targets,
            n,
        );
        (self.read_acc()[acc::MB_LM], kept)
    }

    /// Full logits `[N, V]`.
    pub fn logits(&mut self, ids: &[u32], out: &mut [f32]) {
        let (n, _) = self.load_batch(ids, None);
        assert_eq!(out.len(), n * self.config.vocab_size, "logits buffer size");
        let model = Model::new(&self.kernels, &self.config, &self.layout);
        let iv = self.kernels.idx(&self.ids, 0..n);
        model.logits(Self::weights(&self.params, &self.params_act), &mut self.ws, &mut self.acc, iv, n, out);
    }

    /// A KV cache for decoding up to `capacity` positions of one sequence.
    pub fn kv_cache(&self, capacity: usize) -> KvCache<K> {
        KvCache::new(&self.kernels, &self.config, capacity)
    }

    /// Feeds `token` at the cache's next position; writes the logits `[V]` to `out`. The
    /// same block forward as training, its attention reading the cache.
    pub fn decode(&mut self, cache: &mut KvCache<K>, token: u32, out: &mut [f32]) {
        assert!((token as usize) < self.config.vocab_size, "token id out of range");
        assert_eq!(out.len(), self.config.vocab_size, "logits buffer size");
        let model = Model::new(&self.kernels, &self.config, &self.layout);
        model.decode(Self::weights(&self.params, &self.params_act), cache, &mut self.acc, token as i32, out);
    }

    fn read_acc(&self) -> [f64; acc::LEN] {
        let mut out = [0.0; acc::LEN];
        self.kernels.read_acc(&self.acc, &mut out);
        out
    }

    /// Waits (on the device) for the gradient sums [`Engine::accumulate`] queued: after it
    /// every rank holds the step's whole gradient (each rank's micro-batches already carry
    /// `1 / (A x W)`).
    pub fn settle(&mut self, comm: &mut dyn comm::Communicator<K>) {
        comm.settle(&self.kernels);
    }

    /// Rank 0's weights and AdamW moments (and step), on every rank.
    pub fn broadcast_state(&mut self, comm: &mut dyn comm::Communicator<K>) {
        for buf in [&mut self.params, &mut self.adam_m, &mut self.adam_v] {
            for bucket in comm::buckets(0..self.layout.total) {
                comm.broadcast(&self.kernels, buf, bucket);
            }
        }
        comm.settle(&self.kernels);
        self.refresh_params_act();
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&mut self) -> f64 {
        let k = &self.kernels;
        k.sum_squares_to_acc(&mut self.acc, acc::SUM_SQ, k.view(&self.grads, 0..self.layout.total));
        self.read_acc()[acc::SUM_SQ].sqrt()
    }

    /// Clips the gradients to `grad_clip` (PyTorch's `clip_grad_norm_`), then one AdamW step
    /// at `lr`, which consumes them (they are zero afterwards); all on the device.
    pub fn update(&mut self, lr: f32, o: &OptimConfig) {
        assert!(self.trainable, "an inference engine has no optimiser state");
        let n = self.layout.total;
        let k = &self.kernels;
        k.sum_squares_to_acc(&mut self.acc, acc::SUM_SQ, k.view(&self.grads, 0..n));
        let mut inv_scale = 1.0;
        if let Some(mut scaler) = self.scaler {
            // GradScaler: a step with overflowed gradients is skipped (a read per step, as
            // PyTorch's). Only float16 pays it. The gradients carry the scale that was in
            // effect while they accumulated (`self.scaler` until it is replaced below).
            let finite = self.read_acc()[acc::SUM_SQ].is_finite();
            self.skipped = !scaler.update(!finite);
            inv_scale = 1.0 / self.scaler.map_or(1.0, |s| s.scale) as f64;
            self.scaler = Some(scaler);
            if self.skipped {
                k.fill(k.view_mut(&mut self.grads, 0..n), 0.0);
                self.grads_zero = true;
                return;
            }
        }
        k.clip_coef(&mut self.acc, acc::SUM_SQ, acc::NORM, acc::COEF, o.grad_clip, inv_scale);
        self.step += 1;
        let h = AdamW {
            lr,
            beta1: o.beta1,
            beta2: o.beta2,
            eps: o.eps,
            weight_decay: o.weight_decay,
            step: self.step,
        };
        k.adamw(
            k.view_mut(&mut self.params, 0..n),
            self.params_act.as_mut().map(|px| k.view_mut(px, 0..n)),
            k.view_mut(&mut self.grads, 0..n),
            k.view_mut(&mut self.adam_m, 0..n),
            k.view_mut(&mut self.adam_v, 0..n),
            h,
            &self.acc,
            acc::COEF,
        );
        k.weights_written(&self.params);
        self.grads_zero = true;
    }

    /// [`Engine::update`], returning the gradient norm before clipping (read back).
    pub fn optimizer_step(&mut self, lr: f32, o: &OptimConfig) -> f64 {
        self.update(lr, o);
        self.read_acc()[acc::NORM]
    }

    /// The losses of the step's micro-batches and the gradient norm of its update, read from
    /// the device (the one wait for it: at log intervals and before checkpoints).
    pub fn step_stats(&self) -> StepStats {
        let a = self.read_acc();
        let grad_norm = if self.skipped { f64::NAN } else { a[acc::NORM] };
        StepStats { lm: a[acc::STEP_LM], aux: a[acc::STEP_AUX], grad_norm, skipped: self.skipped }
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
