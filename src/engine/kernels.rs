//! The kernel trait: every operation the model needs, over buffers of one device.
//!
//! The model (`model.rs`, `moe.rs`) and the optimiser are written once against this trait;
//! `cpu` implements it with the `gemm` crate and rayon, a CUDA implementation maps the same
//! calls to cuBLAS and NVRTC kernels on device buffers. Views are borrowed sub-ranges of a
//! buffer (`&[f32]` on the CPU, a device view on CUDA). Index lists (token ids, targets, MoE
//! routing) stay on the host: they are small and the CUDA side uploads them once per call.
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
    /// Multiplies every gradient first (the clipping coefficient; 1 when not clipping).
    pub grad_scale: f32,
}

pub trait Kernels: Sync {
    /// An owned buffer of f32 on the device.
    type Buf: Send + Sync;
    /// A read-only view of part of a buffer.
    type V<'a>: Copy
    where
        Self: 'a;
    /// A writable view of part of a buffer.
    type M<'a>
    where
        Self: 'a;

    fn alloc(&self, len: usize) -> Self::Buf;
    fn len(&self, buf: &Self::Buf) -> usize;
    fn view<'a>(&self, buf: &'a Self::Buf, r: Range<usize>) -> Self::V<'a>;
    fn view_mut<'a>(&self, buf: &'a mut Self::Buf, r: Range<usize>) -> Self::M<'a>;
    fn upload(&self, dst: Self::M<'_>, data: &[f32]);
    fn download(&self, src: Self::V<'_>, out: &mut [f32]);

    fn fill(&self, out: Self::M<'_>, value: f32);
    /// `out += x`.
    fn add(&self, out: Self::M<'_>, x: Self::V<'_>);

    /// `out[m, n] = (accumulate ? out : 0) + op(a) op(b)` where `op(a)` is `[m, k]` (stored
    /// `[k, m]` when `ta`) and `op(b)` is `[k, n]` (stored `[n, k]` when `tb`).
    #[allow(clippy::too_many_arguments)]
    fn matmul(
        &self,
        out: Self::M<'_>,
        a: Self::V<'_>,
        b: Self::V<'_>,
        m: usize,
        n: usize,
        k: usize,
        ta: bool,
        tb: bool,
        accumulate: bool,
    );

    /// `out[n] = emb[ids[n]]`, rows of width `c`.
    fn embed_forward(&self, out: Self::M<'_>, emb: Self::V<'_>, ids: &[u32], c: usize);
    /// `demb[ids[n]] += dout[n]`, in token order (deterministic).
    fn embed_backward(&self, demb: Self::M<'_>, dout: Self::V<'_>, ids: &[u32], c: usize);

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
    /// `dx += ...`, `dw += sum_n dy * x * rstd`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: Self::M<'_>,
        dw: Self::M<'_>,
        dy: Self::V<'_>,
        x: Self::V<'_>,
        w: Self::V<'_>,
        rstd: Self::V<'_>,
        c: usize,
    );

    /// Rotates, in place, `heads` vectors of size `d` per row; row `n` is at position
    /// `n % t`. `cos`/`sin` are `[T_max, d]` tables. `inverse` applies the transpose
    /// (the backward pass).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: Self::M<'_>,
        cos: Self::V<'_>,
        sin: Self::V<'_>,
        t: usize,
        heads: usize,
        d: usize,
        inverse: bool,
    );

    /// Causal GQA attention. `q`: `[N, H*D]`, `k`/`v`: `[N, G*D]`, `out`: `[N, H*D]`,
    /// `probs`: `[B, H, T, T]` (lower triangle written, kept for backward).
    #[allow(clippy::too_many_arguments)]
    fn attention_forward(
        &self,
        out: Self::M<'_>,
        probs: Self::M<'_>,
        q: Self::V<'_>,
        k: Self::V<'_>,
        v: Self::V<'_>,
        s: AttnShape,
    );
    /// Writes the `probs` that `attention_forward` writes, bit for bit (for a backward pass
    /// when the forward's were not kept).
    fn attention_probs(&self, probs: Self::M<'_>, q: Self::V<'_>, k: Self::V<'_>, s: AttnShape);
    /// Gradients of the above; `dq`/`dk`/`dv` are overwritten; `scratch` is `[B, H, T, T]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        dq: Self::M<'_>,
        dk: Self::M<'_>,
        dv: Self::M<'_>,
        scratch: Self::M<'_>,
        dout: Self::V<'_>,
        probs: Self::V<'_>,
        q: Self::V<'_>,
        k: Self::V<'_>,
        v: Self::V<'_>,
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
        losses: &mut [f32],
        targets: &[i32],
        vocab: usize,
        scale: f32,
    );

    /// `out[i] = x[rows[i]]`, rows of width `c`.
    fn gather_rows(&self, out: Self::M<'_>, x: Self::V<'_>, rows: &[u32], c: usize);
    /// `out[n] (+)= sum_j weights[n*k + j] * y[pos[n*k + j]]`, in slot order; `accumulate`
    /// keeps what `out` holds.
    #[allow(clippy::too_many_arguments)]
    fn combine_rows(
        &self,
        out: Self::M<'_>,
        y: Self::V<'_>,
        pos: &[u32],
        weights: &[f32],
        k: usize,
        c: usize,
        accumulate: bool,
    );
    /// Row dot products: `out[n*k + j] = <dy[n], y[pos[n*k + j]]>`.
    fn slot_dots(&self, out: &mut [f32], dy: Self::V<'_>, y: Self::V<'_>, pos: &[u32], k: usize, c: usize);
    /// `out[pos[n*k + j]] = weights[n*k + j] * dy[n]`. `pos` must not repeat a row (it is a
    /// permutation of the slots); implementations check it.
    #[allow(clippy::too_many_arguments)]
    fn spread_rows(
        &self,
        out: Self::M<'_>,
        dy: Self::V<'_>,
        pos: &[u32],
        weights: &[f32],
        k: usize,
        c: usize,
    );

    /// `sum(x^2)` in f64, independent of the thread count.
    fn sum_squares(&self, x: Self::V<'_>) -> f64;
    /// One AdamW step over flat buffers (decoupled decay, bias correction). Consumes the
    /// gradients: `g` is left at zero, ready for the next step (saves a pass over memory).
    fn adamw(&self, p: Self::M<'_>, g: Self::M<'_>, m: Self::M<'_>, v: Self::M<'_>, h: AdamW);
}
