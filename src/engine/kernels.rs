//! The kernel trait: every operation the model needs, over buffers of one device.
//!
//! The model (`model.rs`) and the optimiser are written once against this trait; `cpu`
//! implements it with the `gemm` crate and rayon, `cuda` with cuBLAS and NVRTC kernels on
//! device buffers. A training step stays on the device: token ids and targets are uploaded
//! once per micro-batch into index buffers, losses, the aux loss, the gradient norm and the
//! clipping coefficient live in a small f64 accumulator buffer the host reads only when it
//! wants the numbers, MoE routing is backend state, and attention keeps backend-owned state
//! for backward (probabilities on the CPU, log-sum-exp for a fused attention on CUDA).
//!
//! Shapes: `N` rows (= B*T tokens), `C` channels, `H`/`G` query/key-value heads, `D` head dim,
//! `V` vocabulary. All matrices row-major.

use std::ops::Range;

/// One attention problem: B sequences of T tokens, H query heads reading G key/value heads.
/// Built by [`AttnShape::new`] only, so every shape a kernel sees has whole query-head groups
/// (kernels index key/value head `h / (H / G)` and rely on it staying below G).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) h: usize,
    pub(crate) g: usize,
    pub(crate) d: usize,
}

impl AttnShape {
    /// Fails unless every size is positive and G divides H.
    pub fn new(b: usize, t: usize, h: usize, g: usize, d: usize) -> Result<AttnShape, String> {
        if [b, t, h, g, d].contains(&0) {
            return Err(format!("attention sizes must be positive: B {b}, T {t}, H {h}, G {g}, D {d}"));
        }
        if !h.is_multiple_of(g) {
            return Err(format!("{h} query heads cannot share {g} key/value heads evenly"));
        }
        Ok(AttnShape { b, t, h, g, d })
    }

    /// The same heads for `b` sequences of `t` tokens.
    pub fn with_rows(self, b: usize, t: usize) -> Result<AttnShape, String> {
        AttnShape::new(b, t, self.h, self.g, self.d)
    }
}

/// A matrix product `out[rows, cols] (+)= op(a)[rows, depth] · op(b)[depth, cols]`, where
/// `op(a)` is stored `[depth, rows]` when `a_transposed` and `op(b)` is stored `[cols, depth]`
/// when `b_transposed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub rows: usize,
    pub cols: usize,
    pub depth: usize,
    pub a_transposed: bool,
    pub b_transposed: bool,
    /// Add the product to `out` instead of overwriting it.
    pub accumulate: bool,
}

impl Gemm {
    /// `y[rows, out] = x[rows, inp] Wᵀ` for a weight `W[out, inp]` (PyTorch's `Linear`).
    pub fn linear(rows: usize, out: usize, inp: usize) -> Gemm {
        Gemm { rows, cols: out, depth: inp, a_transposed: false, b_transposed: true, accumulate: false }
    }

    /// Backward to the input of [`Gemm::linear`]: `dx[rows, inp] = dy[rows, out] W`.
    pub fn linear_dx(rows: usize, out: usize, inp: usize) -> Gemm {
        Gemm { rows, cols: inp, depth: out, a_transposed: false, b_transposed: false, accumulate: false }
    }

    /// Backward to the weight of [`Gemm::linear`]: `dW[out, inp] += dy[rows, out]ᵀ x[rows, inp]`.
    pub fn linear_dw(rows: usize, out: usize, inp: usize) -> Gemm {
        Gemm { rows: out, cols: inp, depth: rows, a_transposed: true, b_transposed: false, accumulate: true }
    }

    /// The same product, added to `out` (`true`) or overwriting it.
    pub fn accumulate(self, accumulate: bool) -> Gemm {
        Gemm { accumulate, ..self }
    }

    pub fn flops(&self) -> f64 {
        2.0 * (self.rows * self.cols * self.depth) as f64
    }
}

/// Positions of rows for RoPE: row `n` is at `first + n % period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Positions {
    pub first: usize,
    pub period: usize,
}

impl Positions {
    /// Rows of B sequences of T tokens, each sequence from position 0.
    pub fn sequences(t: usize) -> Positions {
        Positions { first: 0, period: t }
    }

    /// One row at position `pos` (a decoding step).
    pub fn at(pos: usize) -> Positions {
        Positions { first: pos, period: 1 }
    }

    pub fn of(&self, row: usize) -> usize {
        self.first + row % self.period
    }
}

/// RoPE's tables (`[positions, D]` cos and sin) and the rows' positions, for the attention
/// calls that rotate q and k themselves.
#[derive(Clone, Copy, Debug)]
pub struct Rotary<V> {
    pub cos: V,
    pub sin: V,
    pub pos: Positions,
}

/// Calls, seconds and FLOPs of one kernel (matrix products keyed by shape).
#[derive(Clone, Copy, Debug, Default)]
pub struct KernelTime {
    pub calls: u64,
    pub seconds: f64,
    pub flops: f64,
}

/// AdamW hyper-parameters for one step (PyTorch semantics).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number (bias correction).
    pub step: u64,
}

/// The MoE router's settings, from the model config.
#[derive(Clone, Copy, Debug)]
pub struct RouterConfig {
    /// Routed experts, E.
    pub experts: usize,
    /// Experts per token, K.
    pub top_k: usize,
    pub norm_topk_prob: bool,
    pub alpha: f32,
    pub seq_aux: bool,
}

pub trait Kernels: Sync {
    /// How activations are stored and matrix products computed: float32 on the CPU; on CUDA
    /// the run's dtype (bf16/f16 storage, f32 arithmetic and accumulation), so the model casts
    /// what flows from an f32 buffer into a matrix product, and the engine keeps a copy of the
    /// weights in that dtype.
    fn dtype(&self) -> crate::config::Dtype;
    /// One line naming the device, for run headers and meta.json.
    fn describe(&self) -> String;
    /// The first error the device reported since the last check (kernels queue work and
    /// report failures here rather than from each call).
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }
    /// Device memory free now, in bytes (`None`: the host's memory, checked elsewhere).
    fn free_memory(&self) -> Option<u64> {
        None
    }
    /// Calls, seconds and FLOPs per kernel, when the backend was built to profile.
    fn profile(&self) -> Vec<(String, KernelTime)> {
        Vec::new()
    }
    fn reset_profile(&self) {}

    /// Floats on the device ([`Kernels::alloc`]: f32; [`Kernels::alloc_act`]: the activations' storage).
    type Buf: Send + Sync;
    /// i32 storage on the device: token ids and targets (`< 0`: ignored).
    type Idx: Send + Sync;
    /// f64 accumulators on the device (losses, norms, the clipping coefficient).
    type Acc: Send + Sync;
    /// The routing of one micro-batch through one MoE layer, kept for backward.
    type Route: Send + Sync;
    /// What one layer's attention forward keeps for its backward.
    type Attn: Send + Sync;
    /// A read-only view of part of a buffer.
    type V<'a>: Copy
    where
        Self: 'a;
    /// A writable view of part of a buffer.
    type M<'a>
    where
        Self: 'a;
    /// A read-only view of part of an index buffer.
    type I<'a>: Copy
    where
        Self: 'a;

    /// f32 storage (weights, gradients, moments, the residual stream and its gradient).
    fn alloc(&self, len: usize) -> Self::Buf;
    /// Storage for activations, in [`Kernels::dtype`]. Every kernel takes its activation
    /// operands in one storage; a matrix product multiplies two of one storage into that
    /// storage or into f32.
    fn alloc_act(&self, len: usize) -> Self::Buf {
        self.alloc(len)
    }
    fn len(&self, buf: &Self::Buf) -> usize;
    /// The buffer's floats, when they live in host memory (the CPU): collectives then work on
    /// them in place; other devices stage through [`Kernels::download`].
    fn host_floats<'a>(&self, _buf: &'a mut Self::Buf) -> Option<&'a mut [f32]> {
        None
    }
    /// A communicator of the device's own over `world`'s ranks (NCCL on CUDA), if it has one.
    #[allow(clippy::type_complexity)]
    fn device_comm(
        &self,
        _world: &crate::dist::World,
    ) -> Option<anyhow::Result<Box<dyn super::comm::Communicator<Self>>>>
    where
        Self: Sized,
    {
        None
    }
    fn view<'a>(&self, buf: &'a Self::Buf, r: Range<usize>) -> Self::V<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, r: Range<usize>) -> Self::M<'a>;
    fn upload(&self, dst: Self::M<'_>, data: &[f32]);
    fn download(&self, src: Self::V<'_>, out: &mut [f32]);

    fn alloc_idx(&self, len: usize) -> Self::Idx;
    fn idx<'a>(&self, buf: &'a Self::Idx, r: Range<usize>) -> Self::I<'a>;
    fn upload_idx(&self, dst: &mut Self::Idx, data: &[i32]);

    fn alloc_acc(&self, len: usize) -> Self::Acc;
    /// Copies the accumulators to the host (the one place a step waits for the device).
    fn read_acc(&self, acc: &Self::Acc, out: &mut [f64]);
    fn zero_acc(&self, acc: &mut Self::Acc, slots: Range<usize>);
    /// `acc[dst] += (acc[src] / div1) / div2`, in f64, in that order.
    fn fold_acc(&self, acc: &mut Self::Acc, src: usize, dst: usize, div1: f64, div2: f64);

    fn new_route(&self) -> Self::Route;
    /// Saved attention state for problems up to `s`; `keep`: hold the forward's
    /// probabilities (CPU) rather than recompute them in backward.
    fn new_attn(&self, s: AttnShape, keep: bool) -> Self::Attn;
    /// Floats of the scratch buffer attention needs for problems up to `s`.
    fn attn_scratch_len(&self, s: AttnShape, keep: bool) -> usize;

    fn fill(&self, out: Self::M<'_>, value: f32);
    /// `out += x`.
    fn add(&self, out: Self::M<'_>, x: Self::V<'_>);
    /// `out = x` (an f32 buffer), rounded to `out`'s storage.
    fn cast(&self, out: Self::M<'_>, x: Self::V<'_>);
    /// See [`Gemm`].
    fn matmul(&self, out: Self::M<'_>, a: Self::V<'_>, b: Self::V<'_>, g: Gemm);

    /// `out[n] = emb[ids[n]]`, rows of width `c`.
    fn embed_forward(&self, out: Self::M<'_>, emb: Self::V<'_>, ids: Self::I<'_>, c: usize);
    /// `demb[ids[n]] += dout[n]`, in token order (deterministic).
    fn embed_backward(&self, demb: Self::M<'_>, dout: Self::V<'_>, ids: Self::I<'_>, c: usize);

    /// `y = w * x * rstd`, `rstd = 1/sqrt(mean(x^2) + eps)` per row of width `c`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_forward(
        &self,
        y: Self::M<'_>,
        rstd: Self::M<'_>,
        x: Self::V<'_>,
        w: Self::V<'_>,
        c: usize,
        eps: f32,
    );
    /// `sum += x`, then `y = rmsnorm(sum)` with `rstd`: the residual add and the next norm in
    /// one pass over each row; the same bits as [`Kernels::add`] then
    /// [`Kernels::rmsnorm_forward`].
    #[allow(clippy::too_many_arguments)]
    fn add_rmsnorm_forward(
        &self,
        y: Self::M<'_>,
        rstd: Self::M<'_>,
        sum: Self::M<'_>,
        x: Self::V<'_>,
        w: Self::V<'_>,
        c: usize,
        eps: f32,
    );
    /// `dx += ...`, `dw += sum_n dy * x * rstd`; `dy` in the activations' storage, the rest
    /// f32; `act`, when given, gets the new `dx` rounded to `dy`'s storage (the copy the
    /// matrix products read), in the same pass.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: Self::M<'_>,
        act: Option<Self::M<'_>>,
        dw: Self::M<'_>,
        dy: Self::V<'_>,
        x: Self::V<'_>,
        w: Self::V<'_>,
        rstd: Self::V<'_>,
        c: usize,
    );

    /// Rotates, in place, `heads` vectors of size `d` per row, row `n` at position
    /// `pos.of(n)`. `cos`/`sin` are `[positions, d]` tables. `inverse` applies the transpose
    /// (the backward pass).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: Self::M<'_>,
        cos: Self::V<'_>,
        sin: Self::V<'_>,
        pos: Positions,
        heads: usize,
        d: usize,
        inverse: bool,
    );

    /// Causal GQA attention. `q`: `[N, H*D]`, `k`/`v`: `[N, G*D]`, `out`: `[N, H*D]`; `saved`
    /// receives what backward needs; `scratch` is `attn_scratch_len` floats.
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::M<'_>,
        saved: &mut Self::Attn,
        scratch: Self::M<'_>,
        q: Self::V<'_>,
        k: Self::V<'_>,
        v: Self::V<'_>,
        s: AttnShape,
    );
    /// Gradients of the above; `dq`/`dk`/`dv` are overwritten. `out` is the forward's output
    /// (a fused backward takes `rowsum(dout * out)` from it).
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: Self::M<'_>,
        dk: Self::M<'_>,
        dv: Self::M<'_>,
        saved: &Self::Attn,
        scratch: Self::M<'_>,
        dout: Self::V<'_>,
        out: Self::V<'_>,
        q: Self::V<'_>,
        k: Self::V<'_>,
        v: Self::V<'_>,
        s: AttnShape,
    );
    /// RoPE on `q` and `k` (as [`Kernels::rope`] with `rot`), then causal attention (as
    /// [`Kernels::attention_forward`]). What `q` and `k` hold afterwards is the backend's: give
    /// them unchanged to [`Kernels::rope_attention_backward`]. The CPU rotates them in place;
    /// CUDA's tensor-core path rotates its head-major copies instead (a pass less each way).
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_forward(
        &self,
        out: Self::M<'_>,
        saved: &mut Self::Attn,
        scratch: Self::M<'_>,
        q: Self::M<'_>,
        k: Self::M<'_>,
        v: Self::V<'_>,
        s: AttnShape,
        rot: Rotary<Self::V<'_>>,
    );
    /// Gradients of the above with respect to the un-rotated `q` and `k`, and `v` (all
    /// overwritten): attention's backward, then RoPE's.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_backward(
        &self,
        dq: Self::M<'_>,
        dk: Self::M<'_>,
        dv: Self::M<'_>,
        saved: &Self::Attn,
        scratch: Self::M<'_>,
        dout: Self::V<'_>,
        out: Self::V<'_>,
        qkv: [Self::V<'_>; 3],
        s: AttnShape,
        rot: Rotary<Self::V<'_>>,
    );
    /// The weights (`params`, every parameter) were written: set, loaded, broadcast, or
    /// stepped by AdamW. A backend that keeps something derived from them (the CPU's packed
    /// bf16 panels) learns here where they are and that what it kept is stale. Every write
    /// of the weights must be followed by this call before the next product reads them.
    fn weights_written(&self, _params: &Self::Buf) {}

    /// Whether attention of shape `s` takes q, k and v as the column blocks `[q | k | v]` of
    /// one `[N, (H + 2G) D]` buffer, the output of one product with the three projections
    /// stacked, and gives their gradients back the same way (the `_packed` methods below):
    /// one product each way instead of three. It may depend on the dtype and the head width,
    /// never on B or T (the workspace is laid out once). CUDA's 16-bit flash path says yes;
    /// float32 keeps three products, since one dx product of depth (H + 2G) D would round
    /// differently from three that accumulate.
    fn packed_qkv(&self, _s: AttnShape) -> bool {
        false
    }
    /// [`Kernels::rope_attention_forward`] on packed `qkv` (see [`Kernels::packed_qkv`]), which
    /// it leaves unchanged; called only where `packed_qkv(s)` holds, with sequence positions.
    fn rope_attention_forward_packed(
        &self,
        _out: Self::M<'_>,
        _saved: &mut Self::Attn,
        _qkv: Self::V<'_>,
        _s: AttnShape,
        _rot: Rotary<Self::V<'_>>,
    ) {
        unreachable!("called only where packed_qkv holds, which this backend never says")
    }
    /// [`Kernels::rope_attention_backward`] with q, k, v and their gradients packed (see
    /// [`Kernels::packed_qkv`]): `dqkv` is overwritten.
    #[allow(clippy::too_many_arguments)]
    fn rope_attention_backward_packed(
        &self,
        _dqkv: Self::M<'_>,
        _saved: &Self::Attn,
        _scratch: Self::M<'_>,
        _dout: Self::V<'_>,
        _out: Self::V<'_>,
        _qkv: Self::V<'_>,
        _s: AttnShape,
        _rot: Rotary<Self::V<'_>>,
    ) {
        unreachable!("called only where packed_qkv holds, which this backend never says")
    }
    /// One decoding step: `q` `[H*D]` (one token) attends to the first `len` positions of the
    /// caches `k`/`v` `[positions, G*D]`; `out` `[H*D]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_decode(
        &self,
        out: Self::M<'_>,
        q: Self::V<'_>,
        k: Self::V<'_>,
        v: Self::V<'_>,
        len: usize,
        s: AttnShape,
    );

    /// `act = silu(gate) * up` per row, where `gu` rows are `[gate (i) | up (i)]`.
    fn swiglu_forward(&self, act: Self::M<'_>, gu: Self::V<'_>, i: usize);
    /// Overwrites `dgu` (rows `[dgate | dup]`) from `dact`.
    fn swiglu_backward(&self, dgu: Self::M<'_>, dact: Self::V<'_>, gu: Self::V<'_>, i: usize);

    /// Cross-entropy over rows of `logits` (`[rows, V]`), in place: each row becomes
    /// `scale * (softmax - onehot(target))`, zero for ignored rows (`target < 0`). Writes each
    /// row's loss (0 when ignored) to `losses`.
    fn cross_entropy(
        &self,
        logits: Self::M<'_>,
        losses: Self::M<'_>,
        targets: Self::I<'_>,
        vocab: usize,
        scale: f32,
    );
    /// `acc[slot] = sum(x)` in f64, element by element in order.
    fn sum_to_acc(&self, acc: &mut Self::Acc, slot: usize, x: Self::V<'_>);

    /// Routes `b*t` tokens from router logits `[N, E]`: softmax, top-k, weights, the
    /// expert-sorted order and the aux loss.
    fn route(&self, route: &mut Self::Route, logits: Self::V<'_>, b: usize, t: usize, rc: RouterConfig);
    /// Where each expert's rows start in the sorted order (`E + 1` offsets), on the host:
    /// the expert products need them to size their matrices.
    fn expert_offsets<'a>(&self, route: &'a Self::Route) -> &'a [usize];
    /// `acc[slot] += the aux loss` of this routing.
    fn aux_to_acc(&self, acc: &mut Self::Acc, slot: usize, route: &Self::Route);
    /// `out[i] = x[token of sorted slot i]`, rows of width `c`.
    fn gather_rows(&self, out: Self::M<'_>, x: Self::V<'_>, route: &Self::Route, c: usize);
    /// `out[n] (+)= sum_j w * y[position of slot (n, j)]` in slot order, `w` the routing
    /// weight (`weighted`) or 1, summed in f32; `accumulate` keeps what `out` holds. `out` is
    /// f32 (the residual stream) or in `y`'s storage (a gradient for the products).
    fn combine_rows(
        &self,
        out: Self::M<'_>,
        y: Self::V<'_>,
        route: &Self::Route,
        weighted: bool,
        c: usize,
        accumulate: bool,
    );
    /// Per slot `(n, j)`: `out[n*K + j] = <dy[n], y[position of the slot]>`.
    fn slot_dots(&self, out: Self::M<'_>, dy: Self::V<'_>, y: Self::V<'_>, route: &Self::Route, c: usize);
    /// `out[position of slot (n, j)] = weight * dy[n]`.
    fn spread_rows(&self, out: Self::M<'_>, dy: Self::V<'_>, route: &Self::Route, c: usize);
    /// Router-logit gradients `[N, E]` from the slot-weight gradients `slot_dw` `[N*K]`, plus
    /// the aux loss term scaled by `aux_scale`.
    #[allow(clippy::too_many_arguments)]
    fn router_backward(
        &self,
        route: &mut Self::Route,
        slot_dw: Self::V<'_>,
        dlogits: Self::M<'_>,
        b: usize,
        t: usize,
        rc: RouterConfig,
        aux_scale: f32,
    );

    /// `acc[slot] = sum(x^2)` in f64, independent of the thread count.
    fn sum_squares_to_acc(&self, acc: &mut Self::Acc, slot: usize, x: Self::V<'_>);
    /// PyTorch's `clip_grad_norm_` on the device, on gradients scaled by `1 / inv_scale` (a
    /// loss scale; 1 without one): `acc[norm] = sqrt(acc[sum_sq]) * inv_scale`, then
    /// `acc[coef] = min(max_norm / (norm + 1e-6), 1) * inv_scale` (the clip factor 1 when
    /// `max_norm` is 0), the factor AdamW applies to every gradient.
    #[allow(clippy::too_many_arguments)]
    fn clip_coef(
        &self,
        acc: &mut Self::Acc,
        sum_sq: usize,
        norm: usize,
        coef: usize,
        max_norm: f32,
        inv_scale: f64,
    );
    /// One AdamW step over flat buffers (decoupled decay, bias correction), every gradient
    /// first multiplied by `acc[coef]`. Consumes the gradients: `g` is left at zero, ready for
    /// the next step (saves a pass over memory). `px`, when given, receives the new weights
    /// in its own storage (the copy the matrix products read), in the same pass.
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        p: Self::M<'_>,
        px: Option<Self::M<'_>>,
        g: Self::M<'_>,
        m: Self::M<'_>,
        v: Self::M<'_>,
        h: AdamW,
        acc: &Self::Acc,
        coef: usize,
    );
}
