//! MiniMind's forward and backward, layer by layer, over the [`Kernels`] trait.
//!
//! Shape legend: B batch, T time, N = B*T rows, C channels (hidden), H query heads, G
//! key/value heads, D head dim, I feed-forward width, V vocabulary, E routed experts, K
//! experts per token, L layers.
//!
//! Per layer (pre-norm): `h = x + o(attn(rope(q(n1(x))), rope(k(n1(x))), v(n1(x))))`,
//! `y = h + mlp(n2(h))`; then a final RMSNorm and the tied head `z = n(x) Embᵀ`. The head,
//! softmax, loss and dz are fused in chunks of rows so the `N x V` logits never exist at once.
//! One block forward serves training (causal attention over the micro-batch) and decoding
//! (one token against a KV cache), so the two cannot drift.

use std::ops::Range;

use super::kernels::{AttnShape, Gemm, Kernels, Positions, Rotary, RouterConfig};
use super::layout::{Ffn, Layout, Mlp};
use crate::config::{Dtype, ModelConfig};

/// Rows of logits materialised at once by the fused head: 1024 in f32, and the same bytes
/// (2048 rows) in 16 bits, half the launches. (float32's stays 1024: its embedding gradient
/// sums the chunks in order, so another size would change its bits.)
fn head_chunk(f32_acts: bool) -> usize {
    if f32_acts { 1024 } else { 2048 }
}

/// Slots of the f64 accumulator buffer (`Kernels::Acc`) the engine keeps on the device.
pub mod acc {
    /// The last micro-batch: summed loss over kept targets, and its aux loss.
    pub const MB_LM: usize = 0;
    pub const MB_AUX: usize = 1;
    /// The optimiser step so far: mean loss and aux loss over its micro-batches.
    pub const STEP_LM: usize = 2;
    pub const STEP_AUX: usize = 3;
    /// Gradient sum of squares, norm, and the clipping coefficient AdamW reads.
    pub const SUM_SQ: usize = 4;
    pub const NORM: usize = 5;
    pub const COEF: usize = 6;
    pub const LEN: usize = 7;
}

/// The parameters as the model reads them: `master` in f32 (the optimiser's), `matmul` the
/// copy in the activations' storage that AdamW refreshes (the same buffer when that is f32).
pub struct Weights<'a, K: Kernels> {
    pub master: &'a K::Buf,
    pub matmul: &'a K::Buf,
}

impl<K: Kernels> Clone for Weights<'_, K> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<K: Kernels> Copy for Weights<'_, K> {}

/// Activations of one SwiGLU feed-forward: `gu` `[rows, 2I]` holds each row's gate and up
/// projections side by side (one GEMM against the adjacent gate/up weights), `act` `[rows, I]`.
pub struct FfnActs<K: Kernels> {
    gu: K::Buf,
    act: K::Buf,
}

impl<K: Kernels> FfnActs<K> {
    fn new(ops: &K, rows: usize, i: usize) -> Self {
        FfnActs { gu: ops.alloc_act(rows * 2 * i), act: ops.alloc_act(rows * i) }
    }
}

pub struct MoeActs<K: Kernels> {
    route: K::Route,
    /// Router logits `[N, E]`, and their gradient (f32: routing works in f32).
    logits: K::Buf,
    dlogits: K::Buf,
    /// The gradient in the activations' storage, for the router's matrix products.
    dlogits_act: K::Buf,
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
    /// `[N, H*D]`, or `[N, (H + 2G) D]` holding k and v too when `Workspace::packed`.
    q: K::Buf,
    /// `[N, G*D]` each; empty when packed.
    k: K::Buf,
    v: K::Buf,
    att: K::Buf,
    /// What attention forward saved for backward (backend-owned).
    attn: K::Attn,
    mid: K::Buf,
    xn2: K::Buf,
    rstd2: K::Buf,
    mlp: MlpActs<K>,
}

/// Called as backward finishes each span of the gradients ([`Layout::layer_span`] says in
/// which order), with the buffer they are in: data parallel sums a span over the ranks while
/// backward goes on with the layers below.
pub type Ready<'a, K> = &'a mut dyn FnMut(&mut <K as Kernels>::Buf, Range<usize>);

/// Every activation and scratch buffer for micro-batches of up to `B x T`, allocated once.
pub struct Workspace<K: Kernels> {
    pub b: usize,
    pub t: usize,
    /// Attention takes q, k, v packed (`Kernels::packed_qkv`): one product each way makes
    /// them, in `q`, and their gradients, in `dq`.
    packed: bool,
    /// `resid[l]` is the input of layer l; `resid[L]` feeds the final norm. `[N, C]` each.
    resid: Vec<K::Buf>,
    layers: Vec<LayerActs<K>>,
    /// Attention scratch shared by the layers (`Kernels::attn_scratch_len`).
    attn_scratch: K::Buf,
    xnf: K::Buf,
    rstdf: K::Buf,
    logits: K::Buf,
    /// Loss of each row `[N]`.
    row_loss: K::Buf,
    /// RoPE tables `[T, D]`.
    cos: K::Buf,
    sin: K::Buf,
    // backward scratch, shared by all layers. f32: the residual stream's gradient `dresid`
    // (and MoE's `slot_dw`); the rest in the activations' storage, as autocast keeps them:
    // `dtmp`/`dxn` too, the gradients of the norms' outputs that the products write and
    // RMSNorm's backward reads.
    dresid: K::Buf,
    /// `dresid` rounded for the matrix products that read it (unused when activations are f32).
    dresid_act: K::Buf,
    dtmp: K::Buf,
    dxn: K::Buf,
    dq: K::Buf,
    dk: K::Buf,
    dv: K::Buf,
    datt: K::Buf,
    dffn: FfnActs<K>,
    dyout: K::Buf,
    dxg: K::Buf,
    /// d(loss)/d(routing weight) per slot `[N*K]`.
    slot_dw: K::Buf,
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

fn shape_of(m: &ModelConfig, b: usize, t: usize) -> AttnShape {
    AttnShape::new(b, t, m.num_attention_heads, m.num_key_value_heads, m.head_dim)
        .expect("Engine::new validated the model")
}

impl<K: Kernels> Workspace<K> {
    /// Buffers for micro-batches of up to `b x t`; `keep_probs` as [`keep_attention_probs`].
    pub fn new(ops: &K, m: &ModelConfig, b: usize, t: usize, keep_probs: bool) -> Self {
        let n = b * t;
        let (c, i, d) = (m.hidden_size, m.intermediate_size, m.head_dim);
        let (hd, gd) = (m.num_attention_heads * d, m.num_key_value_heads * d);
        let slots = if m.use_moe { n * m.num_experts_per_tok } else { 0 };
        let shape = shape_of(m, b, t);
        // The f32 gradients' copies for the matrix products exist only in 16-bit storage.
        let f32_acts = ops.dtype() == Dtype::Float32;
        let packed = ops.packed_qkv(shape);
        // q's buffer holds k and v too when packed.
        let (qd, kvd) = if packed { (hd + 2 * gd, 0) } else { (hd, gd) };
        let layers = (0..m.num_hidden_layers)
            .map(|_| LayerActs {
                xn1: ops.alloc_act(n * c),
                rstd1: ops.alloc(n),
                q: ops.alloc_act(n * qd),
                k: ops.alloc_act(n * kvd),
                v: ops.alloc_act(n * kvd),
                att: ops.alloc_act(n * hd),
                attn: ops.new_attn(shape, keep_probs),
                mid: ops.alloc(n * c),
                xn2: ops.alloc_act(n * c),
                rstd2: ops.alloc(n),
                mlp: if m.use_moe {
                    MlpActs::Moe(Box::new(MoeActs {
                        route: ops.new_route(),
                        logits: ops.alloc(n * m.n_routed_experts),
                        dlogits: ops.alloc(n * m.n_routed_experts),
                        dlogits_act: ops.alloc_act(if f32_acts { 0 } else { n * m.n_routed_experts }),
                        xg: ops.alloc_act(slots * c),
                        experts: FfnActs::new(ops, slots, i),
                        yout: ops.alloc_act(slots * c),
                        shared: (0..m.n_shared_experts).map(|_| FfnActs::new(ops, n, i)).collect(),
                    }))
                } else {
                    MlpActs::Dense(FfnActs::new(ops, n, i))
                },
            })
            .collect();
        let (cos, sin) = rope_buffers(ops, m, t);
        Workspace {
            b,
            t,
            packed,
            resid: (0..=m.num_hidden_layers).map(|_| ops.alloc(n * c)).collect(),
            layers,
            attn_scratch: ops.alloc(ops.attn_scratch_len(shape, keep_probs)),
            xnf: ops.alloc_act(n * c),
            rstdf: ops.alloc(n),
            logits: ops.alloc_act(head_chunk(f32_acts).min(n) * m.vocab_size),
            row_loss: ops.alloc(n),
            cos,
            sin,
            dresid: ops.alloc(n * c),
            dresid_act: ops.alloc_act(if f32_acts { 0 } else { n * c }),
            dtmp: ops.alloc_act(n * c),
            dxn: ops.alloc_act(n * c),
            dq: ops.alloc_act(n * qd),
            dk: ops.alloc_act(n * kvd),
            dv: ops.alloc_act(n * kvd),
            datt: ops.alloc_act(n * hd),
            dffn: FfnActs::new(ops, n.max(slots), i),
            dyout: ops.alloc_act(slots * c),
            dxg: ops.alloc_act(slots * c),
            slot_dw: ops.alloc(slots),
        }
    }
}

/// The RoPE tables for positions `0..t`, uploaded.
fn rope_buffers<K: Kernels>(ops: &K, m: &ModelConfig, t: usize) -> (K::Buf, K::Buf) {
    let (cos, sin) = rope_tables(m, t);
    let mut cos_buf = ops.alloc(cos.len());
    let mut sin_buf = ops.alloc(sin.len());
    ops.upload(ops.view_mut(&mut cos_buf, 0..cos.len()), &cos);
    ops.upload(ops.view_mut(&mut sin_buf, 0..sin.len()), &sin);
    (cos_buf, sin_buf)
}

/// Which backend's workspace [`workspace_bytes`] counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Footprint {
    /// The CPU: f32 throughout; attention keeps its probabilities for backward, or (`false`,
    /// see [`keep_attention_probs`]) recomputes them into scratch.
    Cpu { keep_probs: bool },
    /// CUDA: activations stored in `act` (2 bytes in bf16/f16, plus the f32 gradients' 16-bit
    /// copies); fused attention keeps one log-sum-exp per row.
    Cuda { act: Dtype },
}

/// Bytes [`Workspace::new`] allocates for `b x t` micro-batches, plus the MoE routing buffers
/// that fill on the first step and the engine's index buffers: the activation memory a run
/// needs. Mirrors `new` line for line, f32 buffers and activations counted apart (tests check
/// it against the CPU's allocator and the CUDA emulator's). Pure.
pub fn workspace_bytes(m: &ModelConfig, b: usize, t: usize, on: Footprint) -> u64 {
    let (n, l) = ((b * t) as u64, m.num_hidden_layers as u64);
    let (c, i, d) = (m.hidden_size as u64, m.intermediate_size as u64, m.head_dim as u64);
    let (hd, gd) = (m.num_attention_heads as u64 * d, m.num_key_value_heads as u64 * d);
    let (e, k) = (m.n_routed_experts as u64, m.num_experts_per_tok as u64);
    let slots = if m.use_moe { n * k } else { 0 };
    let half = matches!(on, Footprint::Cuda { act } if act != Dtype::Float32);
    let act_bytes = if half { 2 } else { 4 };
    // Only 16-bit storage keeps 16-bit copies of the f32 gradients the matrix products read.
    let copy = |floats: u64| if half { floats } else { 0 };
    let ffn = |rows: u64| rows * 3 * i;
    // Per layer, [f32 floats, activations] of the feed-forward.
    let [mlp_f32, mlp_act] = if m.use_moe {
        let routing = n * e + 4 * n * k + b as u64 * e + 2 * (e + 1) + 4 * e;
        [2 * n * e + routing, 2 * slots * c + ffn(slots) + m.n_shared_experts as u64 * ffn(n) + copy(n * e)]
    } else {
        [0, ffn(n)]
    };
    let probs = (b * m.num_attention_heads * t * t) as u64;
    let lse = (b * m.num_attention_heads * t) as u64;
    let (saved, scratch) = match on {
        Footprint::Cpu { keep_probs: true } => (probs, probs),
        Footprint::Cpu { keep_probs: false } => (0, 2 * probs),
        Footprint::Cuda { .. } => (lse, lse),
    };
    // xn1, xn2, q, k, v, att; mid and the two rstd in f32.
    let layer_act = 2 * n * c + 2 * n * hd + 2 * n * gd + mlp_act;
    let layer_f32 = n * c + 2 * n + saved + mlp_f32;
    let f32s = l * layer_f32
        + (l + 1) * n * c
        + scratch
        // rstdf, row_loss; the RoPE tables; dresid; slot_dw
        + 2 * n
        + 2 * t as u64 * d
        + n * c
        + slots
        // the engine's token ids and targets (i32)
        + 2 * n;
    let acts = l * layer_act
        // xnf, the logits chunk, dresid's copy, dtmp, dxn; dq, datt, dk, dv; dffn; dyout, dxg
        + 3 * n * c
        + (head_chunk(!half) as u64).min(n) * m.vocab_size as u64
        + copy(n * c)
        + 2 * n * hd
        + 2 * n * gd
        + ffn(n.max(slots))
        + 2 * slots * c;
    4 * f32s + act_bytes * acts
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

/// A KV cache for decoding one sequence, with what a one-token forward needs: a workspace of
/// one row and RoPE tables for every position up to `capacity`.
pub struct KvCache<K: Kernels> {
    /// Per layer: keys (after RoPE) and values `[capacity, G*D]`.
    layers: Vec<(K::Buf, K::Buf)>,
    ws: Workspace<K>,
    cos: K::Buf,
    sin: K::Buf,
    ids: K::Idx,
    pub capacity: usize,
    /// Positions filled so far.
    pub len: usize,
}

impl<K: Kernels> KvCache<K> {
    pub fn new(ops: &K, m: &ModelConfig, capacity: usize) -> Self {
        let gd = m.num_key_value_heads * m.head_dim;
        let (cos, sin) = rope_buffers(ops, m, capacity);
        KvCache {
            layers: (0..m.num_hidden_layers)
                .map(|_| (ops.alloc_act(capacity * gd), ops.alloc_act(capacity * gd)))
                .collect(),
            ws: Workspace::new(ops, m, 1, 1, false),
            cos,
            sin,
            ids: ops.alloc_idx(1),
            capacity,
            len: 0,
        }
    }
}

/// Where a block's attention reads its keys and values.
enum Attention<'w, K: Kernels> {
    /// Causal over the rows of B sequences of T tokens (training, evaluation), with the
    /// workspace's scratch and RoPE tables.
    Causal { shape: AttnShape },
    /// One token at `pos`, against (and appended to) a layer's KV cache, with the cache's
    /// RoPE tables.
    Cached { k: &'w mut K::Buf, v: &'w mut K::Buf, pos: usize, cos: &'w K::Buf, sin: &'w K::Buf },
}

impl<K: Kernels> Attention<'_, K> {
    /// The rows a block works on (one when decoding).
    fn rows(&self) -> Rows {
        match self {
            Attention::Causal { shape } => Rows { b: shape.b, t: shape.t },
            Attention::Cached { .. } => Rows { b: 1, t: 1 },
        }
    }
}

/// The rows one call works on: B sequences of T tokens. MoE's aux loss is per sequence.
#[derive(Clone, Copy, Debug)]
struct Rows {
    b: usize,
    t: usize,
}

impl Rows {
    fn n(self) -> usize {
        self.b * self.t
    }
}

/// What a backward pass works on: the micro-batch's rows and the factor on every gradient.
#[derive(Clone, Copy, Debug)]
struct Micro {
    rows: Rows,
    grad_scale: f32,
}

/// The model's dimensions (legend at the top), computed once from its config.
#[derive(Clone, Copy, Debug)]
struct Dims {
    c: usize,
    d: usize,
    h: usize,
    g: usize,
    hd: usize,
    gd: usize,
    i: usize,
    v: usize,
    e: usize,
    /// Experts per token (K).
    k: usize,
    eps: f32,
}

impl Dims {
    fn of(m: &ModelConfig) -> Dims {
        let (d, h, g) = (m.head_dim, m.num_attention_heads, m.num_key_value_heads);
        Dims {
            c: m.hidden_size,
            d,
            h,
            g,
            hd: h * d,
            gd: g * d,
            i: m.intermediate_size,
            v: m.vocab_size,
            e: m.n_routed_experts,
            k: m.num_experts_per_tok,
            eps: m.rms_norm_eps as f32,
        }
    }
}

/// The model's computation: configuration, layout and kernels, no state of its own. Matrix
/// products go straight to `ops.matmul` with a [`Gemm`] saying which of a linear layer's
/// three products it is (`linear`, `linear_dx`, `linear_dw`) and its shape.
pub struct Model<'a, K: Kernels> {
    /// The kernels (`ops`: `k` is the key projection, `K` the experts per token).
    pub ops: &'a K,
    pub m: &'a ModelConfig,
    pub layout: &'a Layout,
    dims: Dims,
}

impl<'a, K: Kernels> Model<'a, K> {
    pub fn new(ops: &'a K, m: &'a ModelConfig, layout: &'a Layout) -> Self {
        Model { ops, m, layout, dims: Dims::of(m) }
    }
}

impl<K: Kernels> Model<'_, K> {
    /// A weight as the matrix products read it (the copy in the activations' storage).
    fn w<'b>(&self, p: Weights<'b, K>, r: &Range<usize>) -> K::V<'b> {
        self.ops.view(p.matmul, r.clone())
    }

    /// A weight in f32: RMSNorm's scales, the embedding rows a lookup copies.
    fn wf<'b>(&self, p: Weights<'b, K>, r: &Range<usize>) -> K::V<'b> {
        self.ops.view(p.master, r.clone())
    }

    /// `dy` (an f32 gradient) as a matrix product reads it: itself when activations are f32,
    /// else rounded into `to`.
    fn act_of<'b>(&self, dy: &'b K::Buf, to: &'b mut K::Buf, r: Range<usize>) -> &'b K::Buf {
        if self.f32_acts() {
            return dy;
        }
        self.ops.cast(self.ops.view_mut(to, r.clone()), self.ops.view(dy, r));
        to
    }

    /// RoPE for B sequences of `t` tokens from the tables `[T, D]` (`t <= T`).
    fn rotary<'b>(&self, cos: &'b K::Buf, sin: &'b K::Buf, t: usize) -> Rotary<K::V<'b>> {
        let td = t * self.dims.d;
        Rotary {
            cos: self.ops.view(cos, 0..td),
            sin: self.ops.view(sin, 0..td),
            pos: Positions::sequences(t),
        }
    }

    fn f32_acts(&self) -> bool {
        self.ops.dtype() == Dtype::Float32
    }

    /// Where RMSNorm's backward also writes the residual gradient rounded for the products
    /// that read it next, `dresid_act` (none when activations are f32: the products read
    /// `dresid` itself).
    fn dresid_copy<'b>(&self, dresid_act: &'b mut K::Buf, r: Range<usize>) -> Option<K::M<'b>> {
        (!self.f32_acts()).then(|| self.ops.view_mut(dresid_act, r))
    }

    /// Forward through the blocks and the final norm for the `n` rows of `ids`; leaves
    /// `ws.xnf` = normed output and adds the MoE layers' aux losses to `acc[MB_AUX]`.
    fn trunk_forward(
        &self,
        p: Weights<'_, K>,
        ws: &mut Workspace<K>,
        acc: &mut K::Acc,
        ids: K::I<'_>,
        n: usize,
    ) {
        let ops = self.ops;
        let c = self.dims.c;
        ops.zero_acc(acc, acc::MB_AUX..acc::MB_AUX + 1);
        ops.embed_forward(ops.view_mut(&mut ws.resid[0], 0..n * c), self.wf(p, &self.layout.embed), ids, c);
        let shape = shape_of(self.m, n / ws.t, ws.t);
        for l in 0..self.layout.layers.len() {
            self.block_forward(p, ws, l, Attention::Causal { shape }, acc);
        }
    }

    /// Block `l` over the rows of `attention`, from `x = ws.resid[l]` to
    /// `out = ws.resid[l + 1]`: `out = mid + mlp(n2(mid))`, `mid = x + o(attn(...))`. Blocks
    /// run in order from 0: block 0 norms its input, and each block norms its output for the
    /// next (the last for the final norm, `ws.xnf`) in the pass that adds the residual.
    fn block_forward(
        &self,
        p: Weights<'_, K>,
        ws: &mut Workspace<K>,
        l: usize,
        attention: Attention<'_, K>,
        acc: &mut K::Acc,
    ) {
        let ops = self.ops;
        let lp = &self.layout.layers[l];
        let Dims { c, d, h, g, hd, gd, eps, .. } = self.dims;
        let rows = attention.rows();
        let n = rows.n();
        let nc = 0..n * c;
        let (before, after) = ws.resid.split_at_mut(l + 1);
        let (this, later) = ws.layers.split_at_mut(l + 1);
        let (x, out, a) = (&before[l], &mut after[0], &mut this[l]);
        if l == 0 {
            ops.rmsnorm_forward(
                ops.view_mut(&mut a.xn1, nc.clone()),
                ops.view_mut(&mut a.rstd1, 0..n),
                ops.view(x, nc.clone()),
                self.wf(p, &lp.ln1),
                c,
                eps,
            );
        }
        let xn1 = ops.view(&a.xn1, nc.clone());
        match attention {
            Attention::Causal { shape } if ws.packed => {
                // q | k | v = xn1 [Wq; Wk; Wv]ᵀ, one product into one [N, (H + 2G) D] buffer.
                let qkv = 0..n * (hd + 2 * gd);
                let g3 = Gemm::linear(n, hd + 2 * gd, c);
                ops.matmul(ops.view_mut(&mut a.q, qkv.clone()), xn1, self.w(p, &lp.qkv()), g3);
                let rot = self.rotary(&ws.cos, &ws.sin, shape.t);
                ops.rope_attention_forward_packed(
                    ops.view_mut(&mut a.att, 0..n * hd),
                    &mut a.attn,
                    ops.view(&a.q, qkv),
                    shape,
                    rot,
                );
            }
            Attention::Causal { shape } => {
                ops.matmul(ops.view_mut(&mut a.q, 0..n * hd), xn1, self.w(p, &lp.q), Gemm::linear(n, hd, c));
                ops.matmul(ops.view_mut(&mut a.k, 0..n * gd), xn1, self.w(p, &lp.k), Gemm::linear(n, gd, c));
                ops.matmul(ops.view_mut(&mut a.v, 0..n * gd), xn1, self.w(p, &lp.v), Gemm::linear(n, gd, c));
                // RoPE on q and k, then attention (the backend may rotate copies instead:
                // what a.q and a.k hold afterwards is for rope_attention_backward only).
                let rot = self.rotary(&ws.cos, &ws.sin, shape.t);
                let scratch_len = ops.len(&ws.attn_scratch);
                ops.rope_attention_forward(
                    ops.view_mut(&mut a.att, 0..n * hd),
                    &mut a.attn,
                    ops.view_mut(&mut ws.attn_scratch, 0..scratch_len),
                    ops.view_mut(&mut a.q, 0..n * hd),
                    ops.view_mut(&mut a.k, 0..n * gd),
                    ops.view(&a.v, 0..n * gd),
                    shape,
                    rot,
                );
            }
            Attention::Cached { k: kc, v: vc, pos, cos, sin } => {
                ops.matmul(ops.view_mut(&mut a.q, 0..n * hd), xn1, self.w(p, &lp.q), Gemm::linear(n, hd, c));
                let row = pos * gd..(pos + 1) * gd;
                ops.matmul(ops.view_mut(kc, row.clone()), xn1, self.w(p, &lp.k), Gemm::linear(1, gd, c));
                ops.matmul(ops.view_mut(vc, row.clone()), xn1, self.w(p, &lp.v), Gemm::linear(1, gd, c));
                let table = ops.len(cos);
                let (cos, sin) = (ops.view(cos, 0..table), ops.view(sin, 0..table));
                ops.rope(ops.view_mut(&mut a.q, 0..hd), cos, sin, Positions::at(pos), h, d, false);
                ops.rope(ops.view_mut(kc, row), cos, sin, Positions::at(pos), g, d, false);
                let cached = 0..(pos + 1) * gd;
                ops.attention_decode(
                    ops.view_mut(&mut a.att, 0..hd),
                    ops.view(&a.q, 0..hd),
                    ops.view(kc, cached.clone()),
                    ops.view(vc, cached),
                    pos + 1,
                    shape_of(self.m, 1, 1),
                );
            }
        }
        let att = ops.view(&a.att, 0..n * hd);
        ops.matmul(ops.view_mut(&mut a.mid, nc.clone()), att, self.w(p, &lp.o), Gemm::linear(n, c, hd));
        // mid += x, then xn2 = norm(mid): one pass.
        ops.add_rmsnorm_forward(
            ops.view_mut(&mut a.xn2, nc.clone()),
            ops.view_mut(&mut a.rstd2, 0..n),
            ops.view_mut(&mut a.mid, nc.clone()),
            ops.view(x, nc.clone()),
            self.wf(p, &lp.ln2),
            c,
            eps,
        );
        match (&lp.mlp, &mut a.mlp) {
            (Mlp::Dense(f), MlpActs::Dense(fa)) => self.ffn_forward(p, f, fa, 0..n, &a.xn2, out, false),
            (Mlp::Moe { router, experts, shared }, MlpActs::Moe(ma)) => {
                let moe = MoeParams { router, experts, shared };
                self.moe_forward(p, moe, ma, &a.xn2, out, rows, acc);
            }
            _ => unreachable!("layout and workspace built from the same config"),
        }
        // out += mid, then the next norm of out: the next block's first, or the final norm.
        let (y, rstd, w) = match later.first_mut() {
            Some(next) => (&mut next.xn1, &mut next.rstd1, &self.layout.layers[l + 1].ln1),
            None => (&mut ws.xnf, &mut ws.rstdf, &self.layout.norm),
        };
        ops.add_rmsnorm_forward(
            ops.view_mut(y, nc.clone()),
            ops.view_mut(rstd, 0..n),
            ops.view_mut(out, nc.clone()),
            ops.view(&a.mid, nc),
            self.wf(p, w),
            c,
            eps,
        );
    }

    /// Backward of [`Self::block_forward`] for block `l`: `ws.dresid` holds d(out) and leaves
    /// holding d(x); the block's weight gradients are added to `grads`. With 16-bit
    /// activations `ws.dresid_act` holds d(out) rounded on entry (the norm backward above
    /// wrote it) and d(x) rounded on leaving, except from block 0 (only the embedding, in
    /// f32, reads its gradient).
    fn block_backward(
        &self,
        p: Weights<'_, K>,
        grads: &mut K::Buf,
        ws: &mut Workspace<K>,
        l: usize,
        mb: Micro,
    ) {
        let ops = self.ops;
        let lp = &self.layout.layers[l];
        let Dims { c, hd, gd, .. } = self.dims;
        let (n, t) = (mb.rows.n(), mb.rows.t);
        let nc = 0..n * c;
        let a = &mut ws.layers[l];
        // mlp: d(out) in dresid, and in dresid_act as the products read it (`dresid_copy`);
        // d(xn2) into dtmp.
        let dout = if self.f32_acts() { &ws.dresid } else { &ws.dresid_act };
        let grad = FfnGrad { x: &a.xn2, dy: dout, dx: &mut ws.dtmp, accumulate: false };
        match (&lp.mlp, &mut a.mlp) {
            (Mlp::Dense(f), MlpActs::Dense(fa)) => {
                self.ffn_backward(p, grads, f, (fa, &mut ws.dffn), 0..n, grad)
            }
            (Mlp::Moe { router, experts, shared }, MlpActs::Moe(ma)) => {
                let moe = MoeParams { router, experts, shared };
                let s = MoeScratch {
                    dffn: &mut ws.dffn,
                    dyout: &mut ws.dyout,
                    dxg: &mut ws.dxg,
                    slot_dw: &mut ws.slot_dw,
                };
                self.moe_backward(p, grads, moe, ma, s, grad, mb);
            }
            _ => unreachable!("layout and workspace built from the same config"),
        }
        ops.rmsnorm_backward(
            ops.view_mut(&mut ws.dresid, nc.clone()),
            self.dresid_copy(&mut ws.dresid_act, nc.clone()),
            ops.view_mut(grads, lp.ln2.clone()),
            ops.view(&ws.dtmp, nc.clone()),
            ops.view(&a.mid, nc.clone()),
            self.wf(p, &lp.ln2),
            ops.view(&a.rstd2, 0..n),
            c,
        );
        // attention: mid = x + att Woᵀ.
        let dmid = ops.view(if self.f32_acts() { &ws.dresid } else { &ws.dresid_act }, nc.clone());
        ops.matmul(ops.view_mut(&mut ws.datt, 0..n * hd), dmid, self.w(p, &lp.o), Gemm::linear_dx(n, c, hd));
        let att = ops.view(&a.att, 0..n * hd);
        ops.matmul(ops.view_mut(grads, lp.o.clone()), dmid, att, Gemm::linear_dw(n, c, hd));
        if ws.packed {
            // dq | dk | dv into one buffer, then one product each for d(xn1) and the three
            // weights' gradients (stored back to back).
            let scratch_len = ops.len(&ws.attn_scratch);
            let rot = self.rotary(&ws.cos, &ws.sin, t);
            let shape = shape_of(self.m, mb.rows.b, t);
            let xn1 = ops.view(&a.xn1, nc.clone());
            let qkv = 0..n * (hd + 2 * gd);
            ops.rope_attention_backward_packed(
                ops.view_mut(&mut ws.dq, qkv.clone()),
                &a.attn,
                ops.view_mut(&mut ws.attn_scratch, 0..scratch_len),
                ops.view(&ws.datt, 0..n * hd),
                ops.view(&a.att, 0..n * hd),
                ops.view(&a.q, qkv.clone()),
                shape,
                rot,
            );
            let dqkv = ops.view(&ws.dq, qkv);
            let w = lp.qkv();
            ops.matmul(
                ops.view_mut(&mut ws.dtmp, nc.clone()),
                dqkv,
                self.w(p, &w),
                Gemm::linear_dx(n, hd + 2 * gd, c),
            );
            ops.matmul(ops.view_mut(grads, w), dqkv, xn1, Gemm::linear_dw(n, hd + 2 * gd, c));
        } else {
            self.qkv_backward(p, grads, ws, l, mb);
        }
        let a = &ws.layers[l];
        // Block 0's input gradient goes to the embedding only, in f32: no copy.
        let copy = if l == 0 { None } else { self.dresid_copy(&mut ws.dresid_act, nc.clone()) };
        ops.rmsnorm_backward(
            ops.view_mut(&mut ws.dresid, nc.clone()),
            copy,
            ops.view_mut(grads, lp.ln1.clone()),
            ops.view(&ws.dtmp, nc.clone()),
            ops.view(&ws.resid[l], nc.clone()),
            self.wf(p, &lp.ln1),
            ops.view(&a.rstd1, 0..n),
            c,
        );
    }

    /// [`Self::block_backward`]'s attention and q, k, v projections with q, k, v in buffers
    /// of their own: d(att) in `ws.datt` to d(xn1) in `ws.dtmp`, the weights' gradients
    /// added to `grads`.
    fn qkv_backward(
        &self,
        p: Weights<'_, K>,
        grads: &mut K::Buf,
        ws: &mut Workspace<K>,
        l: usize,
        mb: Micro,
    ) {
        let ops = self.ops;
        let lp = &self.layout.layers[l];
        let Dims { c, hd, gd, .. } = self.dims;
        let n = mb.rows.n();
        let nc = 0..n * c;
        let a = &ws.layers[l];
        let scratch_len = ops.len(&ws.attn_scratch);
        let rot = self.rotary(&ws.cos, &ws.sin, mb.rows.t);
        ops.rope_attention_backward(
            ops.view_mut(&mut ws.dq, 0..n * hd),
            ops.view_mut(&mut ws.dk, 0..n * gd),
            ops.view_mut(&mut ws.dv, 0..n * gd),
            &a.attn,
            ops.view_mut(&mut ws.attn_scratch, 0..scratch_len),
            ops.view(&ws.datt, 0..n * hd),
            ops.view(&a.att, 0..n * hd),
            [ops.view(&a.q, 0..n * hd), ops.view(&a.k, 0..n * gd), ops.view(&a.v, 0..n * gd)],
            shape_of(self.m, mb.rows.b, mb.rows.t),
            rot,
        );
        // q, k, v = xn1 [Wq; Wk; Wv]ᵀ: d(xn1) sums the three.
        let xn1 = ops.view(&a.xn1, nc.clone());
        let (dq, dk, dv) =
            (ops.view(&ws.dq, 0..n * hd), ops.view(&ws.dk, 0..n * gd), ops.view(&ws.dv, 0..n * gd));
        ops.matmul(ops.view_mut(&mut ws.dtmp, nc.clone()), dq, self.w(p, &lp.q), Gemm::linear_dx(n, hd, c));
        let dx_kv = Gemm::linear_dx(n, gd, c).accumulate(true);
        ops.matmul(ops.view_mut(&mut ws.dtmp, nc.clone()), dk, self.w(p, &lp.k), dx_kv);
        ops.matmul(ops.view_mut(&mut ws.dtmp, nc.clone()), dv, self.w(p, &lp.v), dx_kv);
        ops.matmul(ops.view_mut(grads, lp.q.clone()), dq, xn1, Gemm::linear_dw(n, hd, c));
        ops.matmul(ops.view_mut(grads, lp.k.clone()), dk, xn1, Gemm::linear_dw(n, gd, c));
        ops.matmul(ops.view_mut(grads, lp.v.clone()), dv, xn1, Gemm::linear_dw(n, gd, c));
    }

    /// `out[rows] (+)= ffn(x[rows])`, keeping activations in `fa[rows]`.
    #[allow(clippy::too_many_arguments)]
    fn ffn_forward(
        &self,
        p: Weights<'_, K>,
        f: &Ffn,
        fa: &mut FfnActs<K>,
        rows: Range<usize>,
        x: &K::Buf,
        out: &mut K::Buf,
        accumulate: bool,
    ) {
        let ops = self.ops;
        let Dims { c, i, .. } = self.dims;
        let r = rows.len();
        if r == 0 {
            return;
        }
        let (ar, cr) = (rows.start * i..rows.end * i, rows.start * c..rows.end * c);
        let gr = 2 * rows.start * i..2 * rows.end * i;
        // [gate | up] = x [W_g; W_u]ᵀ: the two weights are adjacent in the flat buffer.
        let xv = ops.view(x, cr.clone());
        ops.matmul(
            ops.view_mut(&mut fa.gu, gr.clone()),
            xv,
            self.w(p, &f.gate_up()),
            Gemm::linear(r, 2 * i, c),
        );
        ops.swiglu_forward(ops.view_mut(&mut fa.act, ar.clone()), ops.view(&fa.gu, gr), i);
        let down = Gemm::linear(r, c, i).accumulate(accumulate);
        ops.matmul(ops.view_mut(out, cr), ops.view(&fa.act, ar), self.w(p, &f.down), down);
    }

    /// Backward of [`Self::ffn_forward`] over `rows`: weight gradients added, `grad.dx[rows]`
    /// overwritten (or added to with `grad.accumulate`). `dffn` is scratch of the same rows.
    fn ffn_backward(
        &self,
        p: Weights<'_, K>,
        grads: &mut K::Buf,
        f: &Ffn,
        (fa, dffn): (&FfnActs<K>, &mut FfnActs<K>),
        rows: Range<usize>,
        grad: FfnGrad<'_, K>,
    ) {
        let ops = self.ops;
        let Dims { c, i, .. } = self.dims;
        let r = rows.len();
        if r == 0 {
            return;
        }
        let (ar, cr) = (rows.start * i..rows.end * i, rows.start * c..rows.end * c);
        let gr = 2 * rows.start * i..2 * rows.end * i;
        let dyv = ops.view(grad.dy, cr.clone());
        // da = dy W_d; dW_d += dyᵀ a
        ops.matmul(
            ops.view_mut(&mut dffn.act, ar.clone()),
            dyv,
            self.w(p, &f.down),
            Gemm::linear_dx(r, c, i),
        );
        let act = ops.view(&fa.act, ar.clone());
        ops.matmul(ops.view_mut(grads, f.down.clone()), dyv, act, Gemm::linear_dw(r, c, i));
        ops.swiglu_backward(
            ops.view_mut(&mut dffn.gu, gr.clone()),
            ops.view(&dffn.act, ar),
            ops.view(&fa.gu, gr.clone()),
            i,
        );
        // dx = [dg | du] [W_g; W_u]; d[W_g; W_u] += [dg | du]ᵀ x
        let dgu = ops.view(&dffn.gu, gr);
        let dx = Gemm::linear_dx(r, 2 * i, c).accumulate(grad.accumulate);
        ops.matmul(ops.view_mut(grad.dx, cr.clone()), dgu, self.w(p, &f.gate_up()), dx);
        ops.matmul(ops.view_mut(grads, f.gate_up()), dgu, ops.view(grad.x, cr), Gemm::linear_dw(r, 2 * i, c));
    }

    /// MoE forward for one layer: route, gather, one GEMM chain per expert, combine, shared;
    /// the routing's aux loss goes to `acc[MB_AUX]`.
    #[allow(clippy::too_many_arguments)]
    fn moe_forward(
        &self,
        p: Weights<'_, K>,
        moe: MoeParams<'_>,
        ma: &mut MoeActs<K>,
        xn: &K::Buf,
        out: &mut K::Buf,
        rows: Rows,
        acc: &mut K::Acc,
    ) {
        let ops = self.ops;
        let Dims { c, e, k, .. } = self.dims;
        let n = rows.n();
        let slots = n * k;
        let xv = ops.view(xn, 0..n * c);
        ops.matmul(ops.view_mut(&mut ma.logits, 0..n * e), xv, self.w(p, moe.router), Gemm::linear(n, e, c));
        ops.route(&mut ma.route, ops.view(&ma.logits, 0..n * e), rows.b, rows.t, router_config(self.m));
        ops.aux_to_acc(acc, acc::MB_AUX, &ma.route);
        ops.gather_rows(ops.view_mut(&mut ma.xg, 0..slots * c), xv, &ma.route, c);
        for (x, f) in moe.experts.iter().enumerate() {
            let offsets = ops.expert_offsets(&ma.route);
            self.ffn_forward(p, f, &mut ma.experts, offsets[x]..offsets[x + 1], &ma.xg, &mut ma.yout, false);
        }
        let yout = ops.view(&ma.yout, 0..slots * c);
        ops.combine_rows(ops.view_mut(out, 0..n * c), yout, &ma.route, true, c, false);
        // The shared experts add on top of the routed output.
        for (f, fa) in moe.shared.iter().zip(ma.shared.iter_mut()) {
            self.ffn_forward(p, f, fa, 0..n, xn, out, true);
        }
    }

    /// Backward of [`Self::moe_forward`]: `grad.dy` is d(layer mlp output); `grad.dx` gets
    /// d(xn) (overwritten).
    #[allow(clippy::too_many_arguments)]
    fn moe_backward(
        &self,
        p: Weights<'_, K>,
        grads: &mut K::Buf,
        moe: MoeParams<'_>,
        ma: &mut MoeActs<K>,
        s: MoeScratch<'_, K>,
        grad: FfnGrad<'_, K>,
        mb: Micro,
    ) {
        let ops = self.ops;
        let Dims { c, e, k, .. } = self.dims;
        let n = mb.rows.n();
        let slots = n * k;
        let FfnGrad { x: xn, dy, dx, .. } = grad;
        let dyv = ops.view(dy, 0..n * c);
        // d(weight of slot) = <dy, expert output>; each routed expert sees weight * dy.
        ops.slot_dots(ops.view_mut(s.slot_dw, 0..slots), dyv, ops.view(&ma.yout, 0..slots * c), &ma.route, c);
        ops.spread_rows(ops.view_mut(s.dyout, 0..slots * c), dyv, &ma.route, c);
        for (x, f) in moe.experts.iter().enumerate() {
            let offsets = ops.expert_offsets(&ma.route);
            let expert = FfnGrad { x: &ma.xg, dy: s.dyout, dx: s.dxg, accumulate: false };
            self.ffn_backward(p, grads, f, (&ma.experts, s.dffn), offsets[x]..offsets[x + 1], expert);
        }
        // Back to token order, slots summed in a fixed order.
        ops.combine_rows(
            ops.view_mut(dx, 0..n * c),
            ops.view(s.dxg, 0..slots * c),
            &ma.route,
            false,
            c,
            false,
        );
        for (f, fa) in moe.shared.iter().zip(&ma.shared) {
            let shared = FfnGrad { x: xn, dy, dx, accumulate: true };
            self.ffn_backward(p, grads, f, (fa, s.dffn), 0..n, shared);
        }
        let (b, t) = (mb.rows.b, mb.rows.t);
        let cfg = router_config(self.m);
        ops.router_backward(
            &mut ma.route,
            ops.view(s.slot_dw, 0..slots),
            ops.view_mut(&mut ma.dlogits, 0..n * e),
            b,
            t,
            cfg,
            mb.grad_scale,
        );
        let dl = ops.view(self.act_of(&ma.dlogits, &mut ma.dlogits_act, 0..n * e), 0..n * e);
        ops.matmul(
            ops.view_mut(grads, moe.router.clone()),
            dl,
            ops.view(xn, 0..n * c),
            Gemm::linear_dw(n, e, c),
        );
        let dx_router = Gemm::linear_dx(n, e, c).accumulate(true);
        ops.matmul(ops.view_mut(dx, 0..n * c), dl, self.w(p, moe.router), dx_router);
    }

    /// One micro-batch of `n` rows: forward, loss, backward; gradients are *added* to
    /// `grads`. `targets[n]` is the id row n should predict (< 0: ignored), `kept` how many
    /// are not. `grad_scale` multiplies every gradient (1/accumulation_steps). The summed
    /// loss goes to `acc[MB_LM]`, the aux loss to `acc[MB_AUX]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_backward(
        &self,
        p: Weights<'_, K>,
        grads: &mut K::Buf,
        ws: &mut Workspace<K>,
        acc: &mut K::Acc,
        ids: K::I<'_>,
        targets: &K::Idx,
        n: usize,
        kept: usize,
        grad_scale: f32,
        ready: Ready<'_, K>,
    ) {
        self.trunk_forward(p, ws, acc, ids, n);
        self.head(p, Some(grads), ws, acc, targets, n, grad_scale / kept.max(1) as f32);
        let mb = Micro { rows: Rows { b: n / ws.t, t: ws.t }, grad_scale };
        self.trunk_backward(p, grads, ws, ids, mb, ready);
    }

    /// Forward only: the summed loss over kept targets into `acc[MB_LM]` (for eval).
    pub fn loss(
        &self,
        p: Weights<'_, K>,
        ws: &mut Workspace<K>,
        acc: &mut K::Acc,
        ids: K::I<'_>,
        targets: &K::Idx,
        n: usize,
    ) {
        self.trunk_forward(p, ws, acc, ids, n);
        self.head(p, None, ws, acc, targets, n, 1.0);
    }

    /// Forward only, full logits `[N, V]` into `out`.
    pub fn logits(
        &self,
        p: Weights<'_, K>,
        ws: &mut Workspace<K>,
        acc: &mut K::Acc,
        ids: K::I<'_>,
        n: usize,
        out: &mut [f32],
    ) {
        let ops = self.ops;
        let Dims { c, v, .. } = self.dims;
        self.trunk_forward(p, ws, acc, ids, n);
        let chunk = head_chunk(self.f32_acts());
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let x = ops.view(&ws.xnf, r0 * c..(r0 + rows) * c);
            let emb = self.w(p, &self.layout.embed);
            ops.matmul(ops.view_mut(&mut ws.logits, 0..rows * v), x, emb, Gemm::linear(rows, v, c));
            ops.download(ops.view(&ws.logits, 0..rows * v), &mut out[r0 * v..(r0 + rows) * v]);
        }
    }

    /// Feeds `token` at the next position of `cache` and writes the logits `[V]` to `out`.
    pub fn decode(
        &self,
        p: Weights<'_, K>,
        cache: &mut KvCache<K>,
        acc: &mut K::Acc,
        token: i32,
        out: &mut [f32],
    ) {
        let ops = self.ops;
        let Dims { c, v, .. } = self.dims;
        let pos = cache.len;
        assert!(pos < cache.capacity, "the KV cache holds {} positions", cache.capacity);
        ops.upload_idx(&mut cache.ids, &[token]);
        let embed = self.wf(p, &self.layout.embed);
        ops.embed_forward(ops.view_mut(&mut cache.ws.resid[0], 0..c), embed, ops.idx(&cache.ids, 0..1), c);
        for l in 0..self.layout.layers.len() {
            let (kc, vc) = &mut cache.layers[l];
            let attention = Attention::Cached { k: kc, v: vc, pos, cos: &cache.cos, sin: &cache.sin };
            self.block_forward(p, &mut cache.ws, l, attention, acc);
        }
        let ws = &mut cache.ws;
        let (x, emb) = (ops.view(&ws.xnf, 0..c), self.w(p, &self.layout.embed));
        ops.matmul(ops.view_mut(&mut ws.logits, 0..v), x, emb, Gemm::linear(1, v, c));
        ops.download(ops.view(&ws.logits, 0..v), &mut out[..v]);
        cache.len += 1;
    }

    /// The fused head: per chunk of rows, logits, loss, and (when training) dz, dEmb and
    /// d(xnf) into `ws.dxn`. The summed loss goes to `acc[MB_LM]`.
    #[allow(clippy::too_many_arguments)]
    fn head(
        &self,
        p: Weights<'_, K>,
        mut grads: Option<&mut K::Buf>,
        ws: &mut Workspace<K>,
        acc: &mut K::Acc,
        targets: &K::Idx,
        n: usize,
        dz_scale: f32,
    ) {
        let ops = self.ops;
        let Dims { c, v, .. } = self.dims;
        let emb = &self.layout.embed;
        let chunk = head_chunk(self.f32_acts());
        for r0 in (0..n).step_by(chunk) {
            let rows = chunk.min(n - r0);
            let xr = r0 * c..(r0 + rows) * c;
            let x = ops.view(&ws.xnf, xr.clone());
            ops.matmul(
                ops.view_mut(&mut ws.logits, 0..rows * v),
                x,
                self.w(p, emb),
                Gemm::linear(rows, v, c),
            );
            ops.cross_entropy(
                ops.view_mut(&mut ws.logits, 0..rows * v),
                ops.view_mut(&mut ws.row_loss, r0..r0 + rows),
                ops.idx(targets, r0..r0 + rows),
                v,
                dz_scale,
            );
            if let Some(g) = grads.as_deref_mut() {
                let dz = ops.view(&ws.logits, 0..rows * v);
                ops.matmul(
                    ops.view_mut(&mut ws.dxn, xr.clone()),
                    dz,
                    self.w(p, emb),
                    Gemm::linear_dx(rows, v, c),
                );
                ops.matmul(
                    ops.view_mut(g, emb.clone()),
                    dz,
                    ops.view(&ws.xnf, xr),
                    Gemm::linear_dw(rows, v, c),
                );
            }
        }
        ops.sum_to_acc(acc, acc::MB_LM, ops.view(&ws.row_loss, 0..n));
    }

    /// Backward from `ws.dxn` (d of the final norm's output) through the final norm, every
    /// block ([`Self::block_backward`], last first) and the embedding; `ready` gets each span
    /// of `grads` as it is finished.
    fn trunk_backward(
        &self,
        p: Weights<'_, K>,
        grads: &mut K::Buf,
        ws: &mut Workspace<K>,
        ids: K::I<'_>,
        mb: Micro,
        ready: Ready<'_, K>,
    ) {
        let ops = self.ops;
        let (n, c) = (mb.rows.n(), self.dims.c);
        let nc = 0..n * c;
        let lay = self.layout;
        ops.fill(ops.view_mut(&mut ws.dresid, nc.clone()), 0.0);
        ops.rmsnorm_backward(
            ops.view_mut(&mut ws.dresid, nc.clone()),
            self.dresid_copy(&mut ws.dresid_act, nc.clone()),
            ops.view_mut(grads, lay.norm.clone()),
            ops.view(&ws.dxn, nc.clone()),
            ops.view(&ws.resid[self.m.num_hidden_layers], nc.clone()),
            self.wf(p, &lay.norm),
            ops.view(&ws.rstdf, 0..n),
            c,
        );
        ready(grads, lay.norm.clone());
        for l in (0..lay.layers.len()).rev() {
            self.block_backward(p, grads, ws, l, mb);
            ready(grads, lay.layer_span(l));
        }
        ops.embed_backward(ops.view_mut(grads, lay.embed.clone()), ops.view(&ws.dresid, nc), ids, c);
        ready(grads, lay.embed.clone());
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
    slot_dw: &'s mut K::Buf,
}

/// A feed-forward's input and the gradients through it: `dy` in, `dx` out (overwritten, or
/// added to with `accumulate`).
struct FfnGrad<'b, K: Kernels> {
    x: &'b K::Buf,
    dy: &'b K::Buf,
    dx: &'b mut K::Buf,
    accumulate: bool,
}
