//! MiniMind's forward and backward, layer by layer, over the [`Kernels`] trait.
//!
//! Shape legend: B batch, T time, N = B*T rows, C channels (hidden), H query heads, G
//! key/value heads, D head dim, I feed-forward width, V vocabulary, E routed experts, K
//! experts per token, L layers.
//!
//! Per layer (pre-norm): `h = x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`,
//! `y = h + mlp(n2(h))`; then a final RMSNorm and the tied head `z = n(x) Embᵀ`. The head,
//! softmax, loss and dz are fused in chunks of rows so the `N x V` logits never exist at once.

use std::ops::Range;

use super::kernels::{AttnShape, Kernels};
use super::layout::{Ffn, Layout, Mlp};
use super::moe::{RouterConfig, Routing};
use crate::config::ModelConfig;

/// Rows of logits materialised at once by the fused head.
const HEAD_CHUNK: usize = 1024;

/// Activations of one SwiGLU feed-forward: `gu` `[rows, 2I]` holds each row's gate and up
/// projections side by side (one GEMM against the adjacent gate/up weights), `act` `[rows, I]`.
pub struct FfnActs<K: Kernels> {
    gu: K::Buf,
    act: K::Buf,
}

impl<K: Kernels> FfnActs<K> {
    fn new(k: &K, rows: usize, i: usize) -> Self {
        FfnActs { gu: k.alloc(rows * 2 * i), act: k.alloc(rows * i) }
    }
}

pub struct MoeActs<K: Kernels> {
    route: Routing,
    /// Router logits `[N, E]`, and their gradient.
    logits: K::Buf,
    dlogits: K::Buf,
    /// Inputs gathered in expert order `[N*K, C]`.
    xg: K::Buf,
    /// Expert activations in expert order `[N*K, I]`.
    experts: FfnActs<K>,
    /// Expert outputs in expert order `[N*K, C]`.
    yout: K::Buf,
    shared: Vec<FfnActs<K>>,
}

pub enum MlpActs<K: Kernels> {
    Dense(FfnActs<K>),
    Moe(Box<MoeActs<K>>),
}

/// What one layer keeps from forward for backward.
pub struct LayerActs<K: Kernels> {
    xn1: K::Buf,
    rstd1: K::Buf,
    q: K::Buf,
    k: K::Buf,
    v: K::Buf,
    att: K::Buf,
    mid: K::Buf,
    xn2: K::Buf,
    rstd2: K::Buf,
    mlp: MlpActs<K>,
}

/// Every activation and scratch buffer for micro-batches of up to `B x T`, allocated once.
pub struct Workspace<K: Kernels> {
    pub b: usize,
    pub t: usize,
    /// `resid[l]` is the input of layer l; `resid[L]` feeds the final norm. `[N, C]` each.
    resid: Vec<K::Buf>,
    /// Attention probabilities `[B, H, T, T]`: one per layer when kept for backward, else a
    /// single buffer that backward refills (see [`keep_attention_probs`]).
    probs: Vec<K::Buf>,
    layers: Vec<LayerActs<K>>,
    xnf: K::Buf,
    rstdf: K::Buf,
    logits: K::Buf,
    row_loss: Vec<f32>,
    cos: K::Buf,
    sin: K::Buf,
    // backward scratch, shared by all layers
    dresid: K::Buf,
    dtmp: K::Buf,
    dxn: K::Buf,
    dq: K::Buf,
    dk: K::Buf,
    dv: K::Buf,
    datt: K::Buf,
    dscores: K::Buf,
    dffn: FfnActs<K>,
    dyout: K::Buf,
    dxg: K::Buf,
    slot_dw: Vec<f32>,
    dlogits_host: Vec<f32>,
    logits_host: Vec<f32>,
    ones: Vec<f32>,
}

/// Loss of one micro-batch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Losses {
    /// Mean cross-entropy over kept targets.
    pub lm: f64,
    /// Sum over MoE layers of the aux loss (0 for dense models).
    pub aux: f64,
    /// Number of kept targets.
    pub targets: usize,
}

/// Whether to keep every layer's attention probabilities for backward (else backward
/// recomputes them): kept while they take at most 1 GiB. MiniMind's defaults (B = 32, T = 512,
/// 8 layers of 8 heads) would need 2.1 GiB, so they recompute. Pure.
pub fn keep_attention_probs(m: &ModelConfig, b: usize, t: usize) -> bool {
    let bytes = m.num_hidden_layers * b * m.num_attention_heads * t * t * 4;
    bytes <= 1 << 30
}

impl<K: Kernels> Workspace<K> {
    /// Buffers for micro-batches of up to `b x t`; `keep_probs` as [`keep_attention_probs`].
    pub fn new(k: &K, m: &ModelConfig, b: usize, t: usize, keep_probs: bool) -> Self {
        let n = b * t;
        let (c, i, d) = (m.hidden_size, m.intermediate_size, m.head_dim);
        let (hd, gd) = (m.num_attention_heads * d, m.num_key_value_heads * d);
        let slots = if m.use_moe { n * m.num_experts_per_tok } else { 0 };
        let layers = (0..m.num_hidden_layers)
            .map(|_| LayerActs {
                xn1: k.alloc(n * c),
                rstd1: k.alloc(n),
                q: k.alloc(n * hd),
                k: k.alloc(n * gd),
                v: k.alloc(n * gd),
                att: k.alloc(n * hd),
                mid: k.alloc(n * c),
                xn2: k.alloc(n * c),
                rstd2: k.alloc(n),
                mlp: if m.use_moe {
                    MlpActs::Moe(Box::new(MoeActs {
                        route: Routing::default(),
                        logits: k.alloc(n * m.n_routed_experts),
                        dlogits: k.alloc(n * m.n_routed_experts),
                        xg: k.alloc(slots * c),
                        experts: FfnActs::new(k, slots, i),
                        yout: k.alloc(slots * c),
                        shared: (0..m.n_shared_experts).map(|_| FfnActs::new(k, n, i)).collect(),
                    }))
                } else {
                    MlpActs::Dense(FfnActs::new(k, n, i))
                },
            })
            .collect();
        let (cos, sin) = rope_tables(m, t);
        let mut cos_buf = k.alloc(cos.len());
        let mut sin_buf = k.alloc(sin.len());
        k.upload(k.view_mut(&mut cos_buf, 0..cos.len()), &cos);
        k.upload(k.view_mut(&mut sin_buf, 0..sin.len()), &sin);
        Workspace {
            b,
            t,
            resid: (0..=m.num_hidden_layers).map(|_| k.alloc(n * c)).collect(),
            probs: (0..if keep_probs { m.num_hidden_layers } else { 1 })
                .map(|_| k.alloc(b * m.num_attention_heads * t * t))
                .collect(),
            layers,
            xnf: k.alloc(n * c),
            rstdf: k.alloc(n),
            logits: k.alloc(HEAD_CHUNK.min(n) * m.vocab_size),
            row_loss: vec![0.0; n],
            cos: cos_buf,
            sin: sin_buf,
            dresid: k.alloc(n * c),
            dtmp: k.alloc(n * c),
            dxn: k.alloc(n * c),
            dq: k.alloc(n * hd),
            dk: k.alloc(n * gd),
            dv: k.alloc(n * gd),
            datt: k.alloc(n * hd),
            dscores: k.alloc(b * m.num_attention_heads * t * t),
            dffn: FfnActs::new(k, n.max(slots), i),
            dyout: k.alloc(slots * c),
            dxg: k.alloc(slots * c),
            slot_dw: vec![0.0; slots],
            dlogits_host: vec![0.0; if m.use_moe { n * m.n_routed_experts } else { 0 }],
            logits_host: vec![0.0; if m.use_moe { n * m.n_routed_experts } else { 0 }],
            ones: vec![1.0; slots],
        }
    }
}

/// Bytes [`Workspace::new`] allocates for `b x t` micro-batches, plus the MoE routing buffers
/// that fill on the first step: the activation memory a run needs. Mirrors `new` line for line
/// (a test checks it against the allocator). Pure.
pub fn workspace_bytes(m: &ModelConfig, b: usize, t: usize, keep_probs: bool) -> u64 {
    let (n, l) = ((b * t) as u64, m.num_hidden_layers as u64);
    let (c, i, d) = (m.hidden_size as u64, m.intermediate_size as u64, m.head_dim as u64);
    let (hd, gd) = (m.num_attention_heads as u64 * d, m.num_key_value_heads as u64 * d);
    let (e, k) = (m.n_routed_experts as u64, m.num_experts_per_tok as u64);
    let slots = if m.use_moe { n * k } else { 0 };
    let ffn = |rows: u64| rows * 3 * i;
    let mlp = if m.use_moe {
        let routing = n * e + 4 * n * k + b as u64 * e + 2 * (e + 1) + 4 * e;
        2 * n * e + 2 * slots * c + ffn(slots) + m.n_shared_experts as u64 * ffn(n) + routing
    } else {
        ffn(n)
    };
    let layer = 3 * n * c + 2 * n + 2 * n * hd + 2 * n * gd + mlp;
    let probs = (b * m.num_attention_heads * t * t) as u64;
    let kept_probs = if keep_probs { l } else { 1 } * probs;
    let moe_host = if m.use_moe { 2 * n * e + 2 * slots } else { 0 };
    let floats = l * layer
        + (l + 1) * n * c
        + kept_probs
        + n * c
        + 2 * n
        + (HEAD_CHUNK as u64).min(n) * m.vocab_size as u64
        + 2 * t as u64 * d
        + 3 * n * c
        + 2 * n * hd
        + 2 * n * gd
        + probs
        + ffn(n.max(slots))
        + 2 * slots * c
        + moe_host;
    4 * floats
}

/// RoPE tables `[T, D]` in f32 as MiniMind computes them: `inv[j] = 1/theta^(2j/D)`,
/// angle `t * inv[j mod D/2]`, duplicated across both halves.
pub fn rope_tables(m: &ModelConfig, t: usize) -> (Vec<f32>, Vec<f32>) {
    let d = m.head_dim;
    let half = d / 2;
    let theta = m.rope_theta as f32;
    let inv: Vec<f32> = (0..half).map(|j| 1.0 / theta.powf((2 * j) as f32 / d as f32)).collect();
    let mut cos = vec![0.0; t * d];
    let mut sin = vec![0.0; t * d];
    for pos in 0..t {
        for j in 0..d {
            let a = pos as f32 * inv[j % half];
            cos[pos * d + j] = a.cos();
            sin[pos * d + j] = a.sin();
        }
    }
    (cos, sin)
}

pub(crate) fn router_config(m: &ModelConfig) -> RouterConfig {
    RouterConfig {
        experts: m.n_routed_experts,
        top_k: m.num_experts_per_tok,
        norm_topk_prob: m.norm_topk_prob,
        alpha: m.aux_loss_alpha as f32,
        seq_aux: m.seq_aux,
    }
}

/// The model's computation: configuration, layout and kernels, no state of its own.
pub struct Model<'a, K: Kernels> {
    pub k: &'a K,
    pub m: &'a ModelConfig,
    pub layout: &'a Layout,
}

impl<K: Kernels> Model<'_, K> {
    fn w<'b>(&self, p: &'b K::Buf, r: &Range<usize>) -> K::V<'b> {
        self.k.view(p, r.clone())
    }

    /// `y[rows, out] (+)= x[rows, inp] Wᵀ`, W in PyTorch's `[out, inp]` layout.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        y: K::M<'_>,
        x: K::V<'_>,
        w: K::V<'_>,
        rows: usize,
        out: usize,
        inp: usize,
        accumulate: bool,
    ) {
        self.k.matmul(y, x, w, rows, out, inp, false, true, accumulate);
    }

    /// Backward to the input: `dx[rows, inp] (+)= dy[rows, out] W`.
    #[allow(clippy::too_many_arguments)]
    fn linear_dx(
        &self,
        dx: K::M<'_>,
        dy: K::V<'_>,
        w: K::V<'_>,
        rows: usize,
        out: usize,
        inp: usize,
        accumulate: bool,
    ) {
        self.k.matmul(dx, dy, w, rows, inp, out, false, false, accumulate);
    }

    /// Backward to the weight: `dW[out, inp] += dy[rows, out]ᵀ x[rows, inp]`.
    #[allow(clippy::too_many_arguments)]
    fn linear_dw(&self, dw: K::M<'_>, dy: K::V<'_>, x: K::V<'_>, rows: usize, out: usize, inp: usize) {
        self.k.matmul(dw, dy, x, out, inp, rows, true, false, true);
    }

    /// Forward through the blocks and the final norm; leaves `ws.xnf` = normed output.
    /// Returns the summed aux loss of the MoE layers.
    fn trunk_forward(&self, p: &K::Buf, ws: &mut Workspace<K>, ids: &[u32]) -> f64 {
        let k = self.k;
        let m = self.m;
        let n = ids.len();
        let b = n / ws.t;
        let t = ws.t;
        let (c, d) = (m.hidden_size, m.head_dim);
        let (h, g) = (m.num_attention_heads, m.num_key_value_heads);
        let (hd, gd) = (h * d, g * d);
        let eps = m.rms_norm_eps as f32;
        let nc = 0..n * c;
        k.embed_forward(k.view_mut(&mut ws.resid[0], nc.clone()), self.w(p, &self.layout.embed), ids, c);
        let mut aux = 0.0;
        let kept = ws.probs.len();
        for (l, lp) in self.layout.layers.iter().enumerate() {
            let (before, after) = ws.resid.split_at_mut(l + 1);
            let x = &before[l];
            let out = &mut after[0];
            let a = &mut ws.layers[l];
            k.rmsnorm_forward(
                k.view_mut(&mut a.xn1, nc.clone()),
                k.view_mut(&mut a.rstd1, 0..n),
                k.view(x, nc.clone()),
                self.w(p, &lp.ln1),
                c,
                eps,
            );
            let xn1 = k.view(&a.xn1, nc.clone());
            self.linear(k.view_mut(&mut a.q, 0..n * hd), xn1, self.w(p, &lp.q), n, hd, c, false);
            self.linear(k.view_mut(&mut a.k, 0..n * gd), xn1, self.w(p, &lp.k), n, gd, c, false);
            self.linear(k.view_mut(&mut a.v, 0..n * gd), xn1, self.w(p, &lp.v), n, gd, c, false);
            let (cos, sin) = (k.view(&ws.cos, 0..t * d), k.view(&ws.sin, 0..t * d));
            k.rope(k.view_mut(&mut a.q, 0..n * hd), cos, sin, t, h, d, false);
            k.rope(k.view_mut(&mut a.k, 0..n * gd), cos, sin, t, g, d, false);
            let shape = AttnShape::new(b, t, h, g, d).expect("Engine::new validated the model");
            k.attention_forward(
                k.view_mut(&mut a.att, 0..n * hd),
                k.view_mut(&mut ws.probs[l.min(kept - 1)], 0..b * h * t * t),
                k.view(&a.q, 0..n * hd),
                k.view(&a.k, 0..n * gd),
                k.view(&a.v, 0..n * gd),
                shape,
            );
            self.linear(
                k.view_mut(&mut a.mid, nc.clone()),
                k.view(&a.att, 0..n * hd),
                self.w(p, &lp.o),
                n,
                c,
                hd,
                false,
            );
            k.add(k.view_mut(&mut a.mid, nc.clone()), k.view(x, nc.clone()));
            k.rmsnorm_forward(
                k.view_mut(&mut a.xn2, nc.clone()),
                k.view_mut(&mut a.rstd2, 0..n),
                k.view(&a.mid, nc.clone()),
                self.w(p, &lp.ln2),
                c,
                eps,
            );
            match (&lp.mlp, &mut a.mlp) {
                (Mlp::Dense(f), MlpActs::Dense(fa)) => {
                    self.ffn_forward(p, f, fa, 0..n, &a.xn2, 0..n, out, false);
                }
                (Mlp::Moe { router, experts, shared }, MlpActs::Moe(ma)) => {
                    aux += self.moe_forward(
                        p,
                        router,
                        experts,
                        shared,
                        ma,
                        &a.xn2,
                        out,
                        b,
                        t,
                        &mut ws.logits_host,
                    );
                }
                _ => unreachable!("layout and workspace built from the same config"),
            }
            k.add(k.view_mut(out, nc.clone()), k.view(&a.mid, nc.clone()));
        }
        let last = &ws.resid[m.num_hidden_layers];
        k.rmsnorm_forward(
            k.view_mut(&mut ws.xnf, nc.clone()),
            k.view_mut(&mut ws.rstdf, 0..n),
            k.view(last, nc),
            self.w(p, &self.layout.norm),
            c,
            eps,
        );
        aux
    }

    /// `out[out_rows] (+)= ffn(x[x_rows])`, keeping activations in `fa[act_rows]`.
    #[allow(clippy::too_many_arguments)]
    fn ffn_forward(
        &self,
        p: &K::Buf,
        f: &Ffn,
        fa: &mut FfnActs<K>,
        act_rows: Range<usize>,
        x: &K::Buf,
        x_rows: Range<usize>,
        out: &mut K::Buf,
        accumulate: bool,
    ) {
        let k = self.k;
        let (c, i) = (self.m.hidden_size, self.m.intermediate_size);
        let rows = act_rows.len();
        if rows == 0 {
            return;
        }
        let ar = act_rows.start * i..act_rows.end * i;
        let gr = 2 * act_rows.start * i..2 * act_rows.end * i;
        let xv = k.view(x, x_rows.start * c..x_rows.end * c);
        // [gate | up] = x [W_g; W_u]ᵀ: the two weights are adjacent in the flat buffer.
        self.linear(k.view_mut(&mut fa.gu, gr.clone()), xv, self.w(p, &f.gate_up()), rows, 2 * i, c, false);
        k.swiglu_forward(k.view_mut(&mut fa.act, ar.clone()), k.view(&fa.gu, gr), i);
        self.linear(
            k.view_mut(out, x_rows.start * c..x_rows.end * c),
            k.view(&fa.act, ar),
            self.w(p, &f.down),
            rows,
            c,
            i,
            accumulate,
        );
    }

    /// MoE forward for one layer: route, gather, one GEMM chain per expert, combine, shared.
    #[allow(clippy::too_many_arguments)]
    fn moe_forward(
        &self,
        p: &K::Buf,
        router: &Range<usize>,
        experts: &[Ffn],
        shared: &[Ffn],
        ma: &mut MoeActs<K>,
        xn: &K::Buf,
        out: &mut K::Buf,
        b: usize,
        t: usize,
        logits_host: &mut [f32],
    ) -> f64 {
        let k = self.k;
        let m = self.m;
        let (n, c, e, kk) = (b * t, m.hidden_size, m.n_routed_experts, m.num_experts_per_tok);
        self.linear(
            k.view_mut(&mut ma.logits, 0..n * e),
            k.view(xn, 0..n * c),
            self.w(p, router),
            n,
            e,
            c,
            false,
        );
        k.download(k.view(&ma.logits, 0..n * e), &mut logits_host[..n * e]);
        ma.route.route(&logits_host[..n * e], b, t, router_config(m));
        let slots = n * kk;
        k.gather_rows(k.view_mut(&mut ma.xg, 0..slots * c), k.view(xn, 0..n * c), &ma.route.rows, c);
        for (x, f) in experts.iter().enumerate() {
            let rows = ma.route.offsets[x]..ma.route.offsets[x + 1];
            self.ffn_forward(p, f, &mut ma.experts, rows.clone(), &ma.xg, rows.clone(), &mut ma.yout, false);
        }
        k.combine_rows(
            k.view_mut(out, 0..n * c),
            k.view(&ma.yout, 0..slots * c),
            &ma.route.pos,
            &ma.route.weight,
            kk,
            c,
            false,
        );
        // The shared experts add on top of the routed output.
        for (f, fa) in shared.iter().zip(ma.shared.iter_mut()) {
            self.ffn_forward(p, f, fa, 0..n, xn, 0..n, out, true);
        }
        ma.route.aux_loss as f64
    }

    /// One micro-batch: forward, loss, backward; gradients are *added* to `grads`.
    /// `targets[n]` is the id row n should predict (< 0: ignored). `grad_scale` multiplies
    /// every gradient (1/accumulation_steps).
    pub fn forward_backward(
        &self,
        p: &K::Buf,
        grads: &mut K::Buf,
        ws: &mut Workspace<K>,
        ids: &[u32],
        targets: &[i32],
        grad_scale: f32,
    ) -> Losses {
        let aux = self.trunk_forward(p, ws, ids);
        let kept = targets.iter().filter(|&&t| t >= 0).count();
        let lm = self.head(p, Some(grads), ws, targets, grad_scale / kept.max(1) as f32);
        self.trunk_backward(p, grads, ws, ids, grad_scale);
        Losses { lm: lm / kept.max(1) as f64, aux, targets: kept }
    }

    /// Forward only: summed loss over kept targets and their count (for eval).
    pub fn loss(&self, p: &K::Buf, ws: &mut Workspace<K>, ids: &[u32], targets: &[i32]) -> (f64, usize) {
        self.trunk_forward(p, ws, ids);
        let kept = targets.iter().filter(|&&t| t >= 0).count();
        (self.head(p, None, ws, targets, 1.0), kept)
    }

    /// Forward only, full logits `[N, V]` into `out`.
    pub fn logits(&self, p: &K::Buf, ws: &mut Workspace<K>, ids: &[u32], out: &mut [f32]) {
        let k = self.k;
        let (n, c, v) = (ids.len(), self.m.hidden_size, self.m.vocab_size);
        self.trunk_forward(p, ws, ids);
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let rows = HEAD_CHUNK.min(n - r0);
            self.linear(
                k.view_mut(&mut ws.logits, 0..rows * v),
                k.view(&ws.xnf, r0 * c..(r0 + rows) * c),
                self.w(p, &self.layout.embed),
                rows,
                v,
                c,
                false,
            );
            k.download(k.view(&ws.logits, 0..rows * v), &mut out[r0 * v..(r0 + rows) * v]);
        }
    }

    /// The fused head: per chunk of rows, logits, loss, and (when training) dz, dEmb and
    /// d(xnf) into `ws.dxn`. Returns the summed loss.
    fn head(
        &self,
        p: &K::Buf,
        mut grads: Option<&mut K::Buf>,
        ws: &mut Workspace<K>,
        targets: &[i32],
        dz_scale: f32,
    ) -> f64 {
        let k = self.k;
        let (n, c, v) = (targets.len(), self.m.hidden_size, self.m.vocab_size);
        let emb = &self.layout.embed;
        for r0 in (0..n).step_by(HEAD_CHUNK) {
            let rows = HEAD_CHUNK.min(n - r0);
            let xr = r0 * c..(r0 + rows) * c;
            self.linear(
                k.view_mut(&mut ws.logits, 0..rows * v),
                k.view(&ws.xnf, xr.clone()),
                self.w(p, emb),
                rows,
                v,
                c,
                false,
            );
            k.cross_entropy(
                k.view_mut(&mut ws.logits, 0..rows * v),
                &mut ws.row_loss[r0..r0 + rows],
                &targets[r0..r0 + rows],
                v,
                dz_scale,
            );
            if let Some(g) = grads.as_deref_mut() {
                let dz = k.view(&ws.logits, 0..rows * v);
                self.linear_dx(k.view_mut(&mut ws.dxn, xr.clone()), dz, self.w(p, emb), rows, v, c, false);
                self.linear_dw(k.view_mut(g, emb.clone()), dz, k.view(&ws.xnf, xr), rows, v, c);
            }
        }
        ws.row_loss[..n].iter().map(|&l| l as f64).sum()
    }

    fn trunk_backward(
        &self,
        p: &K::Buf,
        grads: &mut K::Buf,
        ws: &mut Workspace<K>,
        ids: &[u32],
        grad_scale: f32,
    ) {
        let k = self.k;
        let m = self.m;
        let n = ids.len();
        let (t, b) = (ws.t, n / ws.t);
        let (c, d) = (m.hidden_size, m.head_dim);
        let (h, g) = (m.num_attention_heads, m.num_key_value_heads);
        let (hd, gd) = (h * d, g * d);
        let nc = 0..n * c;
        let lay = self.layout;
        k.fill(k.view_mut(&mut ws.dresid, nc.clone()), 0.0);
        k.rmsnorm_backward(
            k.view_mut(&mut ws.dresid, nc.clone()),
            k.view_mut(grads, lay.norm.clone()),
            k.view(&ws.dxn, nc.clone()),
            k.view(&ws.resid[m.num_hidden_layers], nc.clone()),
            self.w(p, &lay.norm),
            k.view(&ws.rstdf, 0..n),
            c,
        );
        for (l, lp) in lay.layers.iter().enumerate().rev() {
            let a = &mut ws.layers[l];
            // mlp: dresid = d(out); d(xn2) into dtmp.
            match (&lp.mlp, &mut a.mlp) {
                (Mlp::Dense(f), MlpActs::Dense(fa)) => {
                    self.ffn_backward(
                        p,
                        grads,
                        f,
                        fa,
                        &mut ws.dffn,
                        0..n,
                        &a.xn2,
                        &ws.dresid,
                        &mut ws.dtmp,
                        false,
                    );
                }
                (Mlp::Moe { router, experts, shared }, MlpActs::Moe(ma)) => {
                    let scratch = MoeScratch {
                        dffn: &mut ws.dffn,
                        dyout: &mut ws.dyout,
                        dxg: &mut ws.dxg,
                        slot_dw: &mut ws.slot_dw,
                        dlogits: &mut ws.dlogits_host,
                        ones: &ws.ones,
                    };
                    let moe = MoeParams { router, experts, shared };
                    self.moe_backward(
                        p,
                        grads,
                        moe,
                        ma,
                        scratch,
                        &a.xn2,
                        &ws.dresid,
                        &mut ws.dtmp,
                        b,
                        t,
                        grad_scale,
                    );
                }
                _ => unreachable!("layout and workspace built from the same config"),
            }
            k.rmsnorm_backward(
                k.view_mut(&mut ws.dresid, nc.clone()),
                k.view_mut(grads, lp.ln2.clone()),
                k.view(&ws.dtmp, nc.clone()),
                k.view(&a.mid, nc.clone()),
                self.w(p, &lp.ln2),
                k.view(&a.rstd2, 0..n),
                c,
            );
            // attention: mid = x + att Woᵀ.
            let dmid = k.view(&ws.dresid, nc.clone());
            self.linear_dx(k.view_mut(&mut ws.datt, 0..n * hd), dmid, self.w(p, &lp.o), n, c, hd, false);
            self.linear_dw(k.view_mut(grads, lp.o.clone()), dmid, k.view(&a.att, 0..n * hd), n, c, hd);
            let shape = AttnShape::new(b, t, h, g, d).expect("Engine::new validated the model");
            let bhtt = 0..b * h * t * t;
            let probs = if ws.probs.len() == lay.layers.len() {
                &ws.probs[l]
            } else {
                k.attention_probs(
                    k.view_mut(&mut ws.probs[0], bhtt.clone()),
                    k.view(&a.q, 0..n * hd),
                    k.view(&a.k, 0..n * gd),
                    shape,
                );
                &ws.probs[0]
            };
            k.attention_backward(
                k.view_mut(&mut ws.dq, 0..n * hd),
                k.view_mut(&mut ws.dk, 0..n * gd),
                k.view_mut(&mut ws.dv, 0..n * gd),
                k.view_mut(&mut ws.dscores, 0..b * h * t * t),
                k.view(&ws.datt, 0..n * hd),
                k.view(probs, bhtt),
                k.view(&a.q, 0..n * hd),
                k.view(&a.k, 0..n * gd),
                k.view(&a.v, 0..n * gd),
                shape,
            );
            let (cos, sin) = (k.view(&ws.cos, 0..t * d), k.view(&ws.sin, 0..t * d));
            k.rope(k.view_mut(&mut ws.dq, 0..n * hd), cos, sin, t, h, d, true);
            k.rope(k.view_mut(&mut ws.dk, 0..n * gd), cos, sin, t, g, d, true);
            let xn1 = k.view(&a.xn1, nc.clone());
            let (dq, dk, dv) =
                (k.view(&ws.dq, 0..n * hd), k.view(&ws.dk, 0..n * gd), k.view(&ws.dv, 0..n * gd));
            self.linear_dx(k.view_mut(&mut ws.dtmp, nc.clone()), dq, self.w(p, &lp.q), n, hd, c, false);
            self.linear_dx(k.view_mut(&mut ws.dtmp, nc.clone()), dk, self.w(p, &lp.k), n, gd, c, true);
            self.linear_dx(k.view_mut(&mut ws.dtmp, nc.clone()), dv, self.w(p, &lp.v), n, gd, c, true);
            self.linear_dw(k.view_mut(grads, lp.q.clone()), dq, xn1, n, hd, c);
            self.linear_dw(k.view_mut(grads, lp.k.clone()), dk, xn1, n, gd, c);
            self.linear_dw(k.view_mut(grads, lp.v.clone()), dv, xn1, n, gd, c);
            k.rmsnorm_backward(
                k.view_mut(&mut ws.dresid, nc.clone()),
                k.view_mut(grads, lp.ln1.clone()),
                k.view(&ws.dtmp, nc.clone()),
                k.view(&ws.resid[l], nc.clone()),
                self.w(p, &lp.ln1),
                k.view(&a.rstd1, 0..n),
                c,
            );
        }
        k.embed_backward(k.view_mut(grads, lay.embed.clone()), k.view(&ws.dresid, nc), ids, c);
    }

    /// Backward of `out[rows] (+)= ffn(x[rows])`: weight gradients added, `dx[rows]`
    /// overwritten (or added to with `accumulate`). `dffn` is scratch of the same rows.
    #[allow(clippy::too_many_arguments)]
    fn ffn_backward(
        &self,
        p: &K::Buf,
        grads: &mut K::Buf,
        f: &Ffn,
        fa: &FfnActs<K>,
        dffn: &mut FfnActs<K>,
        rows: Range<usize>,
        x: &K::Buf,
        dy: &K::Buf,
        dx: &mut K::Buf,
        accumulate: bool,
    ) {
        let k = self.k;
        let (c, i) = (self.m.hidden_size, self.m.intermediate_size);
        let r = rows.len();
        if r == 0 {
            return;
        }
        let (ar, cr) = (rows.start * i..rows.end * i, rows.start * c..rows.end * c);
        let gr = 2 * rows.start * i..2 * rows.end * i;
        let dyv = k.view(dy, cr.clone());
        // da = dy W_d; dW_d += dyᵀ a
        self.linear_dx(k.view_mut(&mut dffn.act, ar.clone()), dyv, self.w(p, &f.down), r, c, i, false);
        self.linear_dw(k.view_mut(grads, f.down.clone()), dyv, k.view(&fa.act, ar.clone()), r, c, i);
        k.swiglu_backward(
            k.view_mut(&mut dffn.gu, gr.clone()),
            k.view(&dffn.act, ar),
            k.view(&fa.gu, gr.clone()),
            i,
        );
        // dx = [dg | du] [W_g; W_u]; d[W_g; W_u] += [dg | du]ᵀ x
        let dgu = k.view(&dffn.gu, gr);
        self.linear_dx(k.view_mut(dx, cr.clone()), dgu, self.w(p, &f.gate_up()), r, 2 * i, c, accumulate);
        self.linear_dw(k.view_mut(grads, f.gate_up()), dgu, k.view(x, cr), r, 2 * i, c);
    }

    /// MoE backward for one layer: `dy` is d(layer mlp output); `dx` gets d(xn) (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn moe_backward(
        &self,
        p: &K::Buf,
        grads: &mut K::Buf,
        moe: MoeParams<'_>,
        ma: &mut MoeActs<K>,
        s: MoeScratch<'_, K>,
        xn: &K::Buf,
        dy: &K::Buf,
        dx: &mut K::Buf,
        b: usize,
        t: usize,
        grad_scale: f32,
    ) {
        let k = self.k;
        let m = self.m;
        let (n, c, e, kk) = (b * t, m.hidden_size, m.n_routed_experts, m.num_experts_per_tok);
        let slots = n * kk;
        let route = &ma.route;
        let dyv = k.view(dy, 0..n * c);
        // d(weight of slot) = <dy, expert output>; each routed expert sees weight * dy.
        k.slot_dots(&mut s.slot_dw[..slots], dyv, k.view(&ma.yout, 0..slots * c), &route.pos, kk, c);
        k.spread_rows(k.view_mut(s.dyout, 0..slots * c), dyv, &route.pos, &route.weight, kk, c);
        for (x, f) in moe.experts.iter().enumerate() {
            let rows = route.offsets[x]..route.offsets[x + 1];
            self.ffn_backward(p, grads, f, &ma.experts, s.dffn, rows, &ma.xg, s.dyout, s.dxg, false);
        }
        // Back to token order, slots summed in a fixed order.
        k.combine_rows(
            k.view_mut(dx, 0..n * c),
            k.view(s.dxg, 0..slots * c),
            &route.pos,
            &s.ones[..slots],
            kk,
            c,
            false,
        );
        for (f, fa) in moe.shared.iter().zip(&ma.shared) {
            self.ffn_backward(p, grads, f, fa, s.dffn, 0..n, xn, dy, dx, true);
        }
        ma.route.backward(&s.slot_dw[..slots], &mut s.dlogits[..n * e], b, t, router_config(m), grad_scale);
        k.upload(k.view_mut(&mut ma.dlogits, 0..n * e), &s.dlogits[..n * e]);
        let dl = k.view(&ma.dlogits, 0..n * e);
        self.linear_dw(k.view_mut(grads, moe.router.clone()), dl, k.view(xn, 0..n * c), n, e, c);
        self.linear_dx(k.view_mut(dx, 0..n * c), dl, self.w(p, moe.router), n, e, c, true);
    }
}

/// The parameters of one MoE layer.
#[derive(Clone, Copy)]
struct MoeParams<'a> {
    router: &'a Range<usize>,
    experts: &'a [Ffn],
    shared: &'a [Ffn],
}

/// Backward scratch the MoE layers share.
struct MoeScratch<'s, K: Kernels> {
    dffn: &'s mut FfnActs<K>,
    dyout: &'s mut K::Buf,
    dxg: &'s mut K::Buf,
    slot_dw: &'s mut [f32],
    dlogits: &'s mut [f32],
    ones: &'s [f32],
}
