//! A backend that computes nothing and counts what the CUDA engine would do: every kernel
//! launch, matrix product and host read of a step, with its class, FLOPs and the bytes it
//! moves. `plan --gpu` runs one training step of the model on it and prices the counts on a
//! named GPU (`crate::roofline`). Each method mirrors the launches of `engine::cuda` (a test
//! holds the two to the same launch counts, kernel by kernel).
//!
//! Bytes count what a kernel reads and writes once: f32 buffers 4 bytes an element,
//! activations 2 in bf16/f16. MoE routing is taken as balanced (every expert gets N*K/E rows).
//! Shapes as in the trait: N rows, C channels, H/G heads, D head dim, V vocabulary, E experts,
//! K experts per token, R = H/G.

use std::ops::Range;
use std::sync::Mutex;

use super::kernels::{AdamW, AttnShape, Gemm, Kernels, Positions, Rotary, RouterConfig};
use crate::config::Dtype;

/// What a call's time is made of, for the step-time model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// The linear layers and the LM head (cuBLAS).
    Matmul,
    /// Attention: its products and the passes around them.
    Attention,
    /// RMSNorm forward and backward.
    Norm,
    /// RoPE, SwiGLU, residual adds, casts, fills, the embedding.
    Pointwise,
    /// Cross-entropy over the logits.
    Loss,
    /// Gradient norm, clipping, AdamW.
    Optimizer,
    /// MoE routing: top-k, dispatch, aux loss, gathers and combines, the host's read of the
    /// expert offsets.
    Routing,
}

impl Class {
    pub const ALL: [Class; 7] = [
        Class::Matmul,
        Class::Attention,
        Class::Norm,
        Class::Pointwise,
        Class::Loss,
        Class::Optimizer,
        Class::Routing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Class::Matmul => "matmul",
            Class::Attention => "attention",
            Class::Norm => "norm",
            Class::Pointwise => "pointwise",
            Class::Loss => "loss",
            Class::Optimizer => "optimizer",
            Class::Routing => "routing",
        }
    }
}

/// Where a call's arithmetic runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Tensor cores (16-bit operands, f32 accumulation).
    Tensor,
    /// CUDA cores in f32 (TF32 off): float32 products, the tiled attention.
    Cuda,
    /// Neither: a memory-bound kernel.
    Memory,
    /// The host waits for the device (a device-to-host read).
    Host,
}

/// One thing the device does.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    /// The kernel's name in `kernels.cu` (without its storage suffix), `gemm`, or `host read`.
    pub kernel: &'static str,
    pub class: Class,
    pub unit: Unit,
    pub flops: f64,
    pub bytes: f64,
    /// Our own tiled attention kernels rather than a library product: the f32 ones on the
    /// CUDA cores (shared-memory bound), the flash ones on the tensor cores (`mma.sync`).
    pub tiled: bool,
}

/// Which attention a 16-bit run takes on the GPU (float32 runs always take the tiled f32
/// kernels), as `engine::cuda` chooses it; the earlier ones are what BENCHMARKS.md compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attention {
    /// The tiled f32 kernels in every dtype (the engine before #17).
    Tiled,
    /// cuBLAS batched products with the scores in memory between them (GPUs before sm_80,
    /// and heads other than 64 or 128 wide).
    Cublas,
    /// The flash kernels on `mma.sync` at heads 64 or 128 wide, cuBLAS otherwise.
    Flash,
}

/// The backend. Buffers are lengths; every call is recorded.
pub struct Dry {
    dtype: Dtype,
    attention: Attention,
    calls: Mutex<Vec<Call>>,
}

#[derive(Clone, Copy, Debug)]
pub struct Buf {
    len: usize,
    size: usize,
}

/// A view: its length and bytes per element.
#[derive(Clone, Copy, Debug)]
pub struct View {
    len: usize,
    size: usize,
}

impl View {
    fn bytes(&self) -> f64 {
        (self.len * self.size) as f64
    }
}

/// Balanced routing: each expert's first row.
pub struct Route {
    offsets: Vec<usize>,
}

impl Dry {
    pub fn new(dtype: Dtype) -> Dry {
        Dry { dtype, attention: Attention::Flash, calls: Mutex::new(Vec::new()) }
    }

    /// The engine with another attention path (see [`Attention`]).
    pub fn with_attention(dtype: Dtype, attention: Attention) -> Dry {
        Dry { attention, ..Dry::new(dtype) }
    }

    /// The calls recorded so far, and forgets them.
    pub fn take(&self) -> Vec<Call> {
        std::mem::take(&mut *self.calls.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn act(&self) -> usize {
        if self.dtype == Dtype::Float32 { 4 } else { 2 }
    }

    /// Whether attention runs on the tensor cores (bf16/f16 runs).
    fn tensor(&self) -> bool {
        self.dtype != Dtype::Float32 && self.attention != Attention::Tiled
    }

    /// Whether the flash kernels serve attention of shape `s` (`Cuda::flash_serves`).
    fn flash(&self, s: AttnShape) -> bool {
        self.tensor() && self.attention == Attention::Flash && super::gpu::flash_width(s.d)
    }

    fn record(&self, kernel: &'static str, class: Class, unit: Unit, flops: f64, bytes: f64) {
        let call = Call { kernel, class, unit, flops, bytes, tiled: false };
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
    }

    /// The counting sort of `n` positions over `v` keys (kernels.cu): counts per chunk and
    /// key, their prefix, the offsets, the places.
    fn sort(&self, n: usize, v: usize, class: Class) {
        let chunks = n.div_ceil(super::gpu::SORT_CHUNK) as f64;
        let (n, v) = (n as f64, v as f64);
        self.pass("sort_count", class, 4.0 * (chunks * v + 2.0 * n));
        self.pass("sort_prefix", class, 4.0 * (2.0 * chunks * v + v));
        self.pass("sort_offsets", class, 8.0 * v);
        self.pass("sort_place", class, 4.0 * 5.0 * n);
    }

    /// Attention forward as `engine::cuda` runs it; `rope`: rotated in the head-major copies.
    fn forward(&self, out: View, s: AttnShape, rope: bool) {
        if !self.tensor() {
            let kernel = if s.d <= 128 { "attention_forward_tiled" } else { "attention_forward" };
            return self.tiled(kernel, s, 2.0);
        }
        let (a, f) = (self.act() as f64, 4.0);
        let (b, t, h, g, d) = (s.b, s.t, s.h, s.g, s.d);
        let r = h / g;
        let (nq, nkv) = ((b * t * h * d) as f64, (b * t * g * d) as f64);
        if self.flash(s) {
            // q, k, v in (the key tiles a block re-reads come from L2), out and lse out.
            let bytes = a * (2.0 * nq + 2.0 * nkv) + f * (b * h * t) as f64;
            return self.fused("flash_forward", s, 2.0, Unit::Tensor, bytes);
        }
        let scores = (b * h * t * t) as f64;
        let copy = if rope { "attn_heads_rope" } else { "attn_heads" };
        for (kernel, n) in [(copy, nq), (copy, nkv), ("attn_heads", nkv)] {
            self.pass(kernel, Class::Attention, 2.0 * a * n);
        }
        let plain = Gemm {
            rows: r * t,
            cols: t,
            depth: d,
            a_transposed: false,
            b_transposed: true,
            accumulate: false,
        };
        self.gemm(Class::Attention, plain, b * g, 2, 4);
        self.pass("attn_softmax", Class::Attention, scores * (f + a) + f * (b * h * t) as f64);
        self.gemm(Class::Attention, Gemm { cols: d, depth: t, b_transposed: false, ..plain }, b * g, 2, 2);
        self.pass("attn_heads", Class::Attention, 2.0 * a * out.len as f64);
    }

    /// Attention backward as `engine::cuda` runs it, the pass for `rowsum(dO∘O)` included
    /// where it has one (the flash dq kernel sums its own); `rope`: the copies rotate q and k
    /// and un-rotate dq and dk.
    fn backward(&self, dout: View, s: AttnShape, rope: bool) {
        let a = self.act() as f64;
        let (b, t, h, g, d) = (s.b, s.t, s.h, s.g, s.d);
        let rows = (b * h * t) as f64;
        if !self.tensor() && d > 128 {
            self.tiled("attention_backward_dq", s, 3.0);
            return self.tiled("attention_backward_dkv", s, 4.0);
        }
        let f = 4.0;
        let r = h / g;
        let (nq, nkv) = ((b * t * h * d) as f64, (b * t * g * d) as f64);
        if self.flash(s) {
            // dq: delta = rowsum(dO O), S, dP and dS K (q, dout, out, k, v, lse in; dq and
            // delta out); dkv: S, dP, dV, dK (k, v, q, dout, lse, delta in; dk, dv out).
            let dq_bytes = a * (4.0 * nq + 2.0 * nkv) + 2.0 * f * rows;
            self.fused("flash_backward_dq", s, 3.0, Unit::Tensor, dq_bytes);
            let dkv_bytes = a * (2.0 * nq + 4.0 * nkv) + 2.0 * f * rows;
            return self.fused("flash_backward_dkv", s, 4.0, Unit::Tensor, dkv_bytes);
        }
        self.pass("attention_delta", Class::Attention, 2.0 * dout.bytes() + 4.0 * rows);
        if !self.tensor() {
            self.tiled("attention_backward_dq_tiled", s, 3.0);
            return self.tiled("attention_backward_dkv_tiled", s, 4.0);
        }
        let scores = (b * h * t * t) as f64;
        let copy = if rope { "attn_heads_rope" } else { "attn_heads" };
        for (kernel, n) in [(copy, nq), (copy, nkv), ("attn_heads", nkv), ("attn_heads", nq)] {
            self.pass(kernel, Class::Attention, 2.0 * a * n);
        }
        let s_gemm = Gemm {
            rows: r * t,
            cols: t,
            depth: d,
            a_transposed: false,
            b_transposed: true,
            accumulate: false,
        };
        let dv_gemm = Gemm {
            rows: t,
            cols: d,
            depth: r * t,
            a_transposed: true,
            b_transposed: false,
            accumulate: false,
        };
        let dq_gemm = Gemm {
            rows: r * t,
            cols: d,
            depth: t,
            a_transposed: false,
            b_transposed: false,
            accumulate: false,
        };
        self.gemm(Class::Attention, s_gemm, b * g, 2, 4);
        self.pass("attn_softmax", Class::Attention, scores * (f + a) + f * rows);
        self.gemm(Class::Attention, dv_gemm, b * g, 2, 2);
        self.gemm(Class::Attention, s_gemm, b * g, 2, 4);
        self.pass("attn_dsoftmax", Class::Attention, scores * (2.0 * a + f) + f * rows);
        self.gemm(Class::Attention, dq_gemm, b * g, 2, 2);
        self.gemm(Class::Attention, dv_gemm, b * g, 2, 2);
        for (kernel, n) in [(copy, nq), (copy, nkv), ("attn_heads", nkv)] {
            self.pass(kernel, Class::Attention, 2.0 * a * n);
        }
    }

    /// A memory-bound kernel moving `bytes`.
    fn pass(&self, kernel: &'static str, class: Class, bytes: f64) {
        self.record(kernel, class, Unit::Memory, 0.0, bytes);
    }

    /// A matrix product (or `batch` of them) of `g`'s shape: operands in `ab` bytes an
    /// element, the output in `out`.
    fn gemm(&self, class: Class, g: Gemm, batch: usize, ab: usize, out: usize) {
        let (m, n, k) = (g.rows as f64, g.cols as f64, g.depth as f64);
        let unit = if ab == 2 { Unit::Tensor } else { Unit::Cuda };
        let bytes = batch as f64
            * ((m * k + k * n) * ab as f64 + m * n * out as f64 * (1.0 + g.accumulate as u8 as f64));
        self.record("gemm", class, unit, batch as f64 * 2.0 * m * n * k, bytes);
    }

    /// The tiled f32 attention kernel `kernel` doing `products` causal [T, T, D] products
    /// per (sequence, head) of `s`.
    fn tiled(&self, kernel: &'static str, s: AttnShape, products: f64) {
        let (b, t, h, d) = (s.b as f64, s.t as f64, s.h as f64, s.d as f64);
        let a = self.act() as f64;
        let bytes = a * b * t * (2.0 * h + 2.0 * s.g as f64) * d;
        self.fused(kernel, s, products, Unit::Cuda, bytes);
    }

    /// One of our attention kernels doing `products` causal [T, T, D] products per
    /// (sequence, head) of `s` (half squares: masked tiles are skipped) on `unit`.
    fn fused(&self, kernel: &'static str, s: AttnShape, products: f64, unit: Unit, bytes: f64) {
        let (b, t, h, d) = (s.b as f64, s.t as f64, s.h as f64, s.d as f64);
        let flops = products * 2.0 * b * h * t * t / 2.0 * d;
        let call = Call { kernel, class: Class::Attention, unit, flops, bytes, tiled: true };
        self.calls.lock().unwrap_or_else(|e| e.into_inner()).push(call);
    }
}

impl Kernels for Dry {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn describe(&self) -> String {
        "a dry run (nothing computed)".into()
    }

    type Buf = Buf;
    type Idx = usize;
    type Acc = usize;
    type Route = Route;
    type Attn = ();
    type V<'a> = View;
    type M<'a> = View;
    type I<'a> = usize;

    fn alloc(&self, len: usize) -> Buf {
        Buf { len, size: 4 }
    }
    fn alloc_act(&self, len: usize) -> Buf {
        Buf { len, size: self.act() }
    }
    fn len(&self, buf: &Buf) -> usize {
        buf.len
    }
    fn view(&self, buf: &Buf, r: Range<usize>) -> View {
        assert!(r.end <= buf.len, "view {r:?} of {}", buf.len);
        View { len: r.len(), size: buf.size }
    }
    fn view_mut(&self, buf: &mut Buf, r: Range<usize>) -> View {
        self.view(buf, r)
    }
    fn upload(&self, _: View, _: &[f32]) {}
    fn download(&self, _: View, out: &mut [f32]) {
        out.fill(0.0);
    }
    fn alloc_idx(&self, len: usize) -> usize {
        len
    }
    fn idx(&self, _: &usize, r: Range<usize>) -> usize {
        r.len()
    }
    fn upload_idx(&self, _: &mut usize, _: &[i32]) {}
    fn alloc_acc(&self, len: usize) -> usize {
        len
    }
    fn read_acc(&self, _: &usize, out: &mut [f64]) {
        // float16's loss scaler reads the step's gradient norm every step.
        self.record("host read", Class::Optimizer, Unit::Host, 0.0, 8.0 * out.len() as f64);
        out.fill(0.0);
    }
    fn zero_acc(&self, _: &mut usize, _: Range<usize>) {
        self.pass("zero_acc", Class::Optimizer, 0.0);
    }
    fn fold_acc(&self, _: &mut usize, _: usize, _: usize, _: f64, _: f64) {
        self.pass("fold_acc", Class::Loss, 0.0);
    }
    fn new_route(&self) -> Route {
        Route { offsets: Vec::new() }
    }
    fn new_attn(&self, _: AttnShape, _: bool) {}
    fn attn_scratch_len(&self, s: AttnShape, _: bool) -> usize {
        s.b * s.h * s.t
    }

    fn fill(&self, out: View, _: f32) {
        self.pass("fill", Class::Pointwise, out.bytes());
    }
    fn add(&self, out: View, x: View) {
        self.pass("add", Class::Pointwise, 2.0 * out.bytes() + x.bytes());
    }
    fn cast(&self, out: View, x: View) {
        self.pass("cast", Class::Pointwise, out.bytes() + x.bytes());
    }
    fn matmul(&self, out: View, a: View, _: View, g: Gemm) {
        if g.rows == 0 || g.cols == 0 {
            return;
        }
        if g.depth == 0 {
            if !g.accumulate {
                self.fill(View { len: g.rows * g.cols, size: out.size }, 0.0);
            }
            return;
        }
        self.gemm(Class::Matmul, g, 1, a.size, out.size);
    }

    fn embed_forward(&self, out: View, _: View, ids: usize, _: usize) {
        self.pass("embed_forward", Class::Pointwise, 2.0 * out.bytes() + 4.0 * ids as f64);
    }
    fn embed_backward(&self, demb: View, dout: View, ids: usize, c: usize) {
        // The positions sorted by id, then each touched row read and written once, each
        // position's row read.
        let (n, v) = (ids as f64, (demb.len / c) as f64);
        self.sort(ids, demb.len / c, Class::Pointwise);
        let touched = v.min(n) * c as f64 * 4.0;
        self.pass("embed_backward", Class::Pointwise, dout.bytes() + 2.0 * touched + 4.0 * (n + v));
    }

    fn rmsnorm_forward(&self, y: View, rstd: View, x: View, _: View, _: usize, _: f32) {
        self.pass("rmsnorm_forward", Class::Norm, y.bytes() + rstd.bytes() + x.bytes());
    }
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        dx: View,
        act: Option<View>,
        _: View,
        dy: View,
        x: View,
        _: View,
        rstd: View,
        c: usize,
    ) {
        let parts = (super::gpu::DW_PARTS.min(rstd.len.max(1)) * c * 4) as f64;
        // dx read and written (and its 16-bit copy written), dy and x read once, the partial
        // sums written.
        let copy = act.map_or(0.0, |a| a.bytes());
        let bytes = 2.0 * dx.bytes() + copy + dy.bytes() + x.bytes() + rstd.bytes() + parts;
        self.pass("rmsnorm_backward", Class::Norm, bytes);
        self.pass("rmsnorm_backward_dw_sum", Class::Norm, parts + 8.0 * c as f64);
    }
    fn add_rmsnorm_forward(&self, y: View, rstd: View, sum: View, x: View, _: View, _: usize, _: f32) {
        self.pass(
            "add_rmsnorm_forward",
            Class::Norm,
            y.bytes() + rstd.bytes() + 2.0 * sum.bytes() + x.bytes(),
        );
    }
    fn rope(&self, x: View, _: View, _: View, _: Positions, _: usize, _: usize, _: bool) {
        self.pass("rope", Class::Pointwise, 2.0 * x.bytes());
    }

    fn rope_attention_forward(
        &self,
        out: View,
        saved: &mut (),
        scratch: View,
        q: View,
        k: View,
        v: View,
        s: AttnShape,
        rot: Rotary<View>,
    ) {
        // On the tensor cores RoPE rides in the head-major copies of q and k.
        let fused = self.tensor() && rot.pos == Positions::sequences(s.t);
        if !fused {
            self.rope(q, rot.cos, rot.sin, rot.pos, s.h, s.d, false);
            self.rope(k, rot.cos, rot.sin, rot.pos, s.g, s.d, false);
        }
        let _ = (saved, scratch, v);
        self.forward(out, s, fused);
    }
    fn rope_attention_backward(
        &self,
        dq: View,
        dk: View,
        dv: View,
        saved: &(),
        scratch: View,
        dout: View,
        out: View,
        [q, k, v]: [View; 3],
        s: AttnShape,
        rot: Rotary<View>,
    ) {
        let fused = self.tensor() && rot.pos == Positions::sequences(s.t);
        let _ = (dv, saved, scratch, out, q, k, v);
        self.backward(dout, s, fused);
        if !fused {
            self.rope(dq, rot.cos, rot.sin, rot.pos, s.h, s.d, true);
            self.rope(dk, rot.cos, rot.sin, rot.pos, s.g, s.d, true);
        }
    }
    fn packed_qkv(&self, s: AttnShape) -> bool {
        self.flash(s)
    }
    fn rope_attention_forward_packed(&self, out: View, _: &mut (), _: View, s: AttnShape, _: Rotary<View>) {
        // The flash kernels read q, k, v at the packed rows' stride: the same bytes.
        self.forward(out, s, true);
    }
    fn rope_attention_backward_packed(
        &self,
        _: View,
        _: &(),
        _: View,
        dout: View,
        _: View,
        _: View,
        s: AttnShape,
        _: Rotary<View>,
    ) {
        self.backward(dout, s, true);
    }
    fn attention_forward(&self, out: View, _: &mut (), _: View, _: View, _: View, _: View, s: AttnShape) {
        self.forward(out, s, false);
    }
    fn attention_backward(
        &self,
        _: View,
        _: View,
        _: View,
        _: &(),
        _: View,
        dout: View,
        _: View,
        _: View,
        _: View,
        _: View,
        s: AttnShape,
    ) {
        self.backward(dout, s, false);
    }
    fn attention_decode(&self, _: View, _: View, k: View, v: View, _: usize, _: AttnShape) {
        self.pass("attention_decode", Class::Attention, k.bytes() + v.bytes());
    }

    fn swiglu_forward(&self, act: View, gu: View, _: usize) {
        self.pass("swiglu_forward", Class::Pointwise, act.bytes() + gu.bytes());
    }
    fn swiglu_backward(&self, dgu: View, dact: View, gu: View, _: usize) {
        self.pass("swiglu_backward", Class::Pointwise, dgu.bytes() + dact.bytes() + gu.bytes());
    }
    fn cross_entropy(&self, logits: View, losses: View, targets: usize, _: usize, _: f32) {
        // Two reads of each row (max, then the sum of exponentials) and one write.
        self.pass("cross_entropy", Class::Loss, 3.0 * logits.bytes() + losses.bytes() + 4.0 * targets as f64);
    }
    fn sum_to_acc(&self, _: &mut usize, _: usize, x: View) {
        self.pass("sum_to_acc", Class::Loss, x.bytes());
    }

    fn route(&self, route: &mut Route, logits: View, b: usize, t: usize, rc: RouterConfig) {
        let (n, e, k) = (b * t, rc.experts, rc.top_k);
        let slots = (n * k) as f64;
        self.pass("moe_topk", Class::Routing, logits.bytes() + 4.0 * (n * e) as f64 + 8.0 * slots);
        self.sort(n * k, e, Class::Routing);
        self.pass("moe_place", Class::Routing, 4.0 * 3.0 * slots);
        if rc.alpha > 0.0 {
            // Each (group, expert) block reads its group's slots and its scores.
            self.pass("moe_aux_terms", Class::Routing, 4.0 * e as f64 * slots + 4.0 * (n * e) as f64);
        }
        self.record("host read", Class::Routing, Unit::Host, 0.0, 4.0 * (e + 1) as f64);
        route.offsets = (0..=e).map(|x| n * k * x / e).collect();
    }
    fn expert_offsets<'a>(&self, route: &'a Route) -> &'a [usize] {
        &route.offsets
    }
    fn aux_to_acc(&self, _: &mut usize, _: usize, _: &Route) {
        self.pass("moe_aux_sum", Class::Routing, 0.0);
    }
    fn gather_rows(&self, out: View, _: View, _: &Route, _: usize) {
        self.pass("gather_rows", Class::Routing, 2.0 * out.bytes());
    }
    fn combine_rows(&self, out: View, y: View, _: &Route, _: bool, _: usize, accumulate: bool) {
        let name = if out.size == 4 { "combine_rows" } else { "combine_rows_act" };
        self.pass(name, Class::Routing, y.bytes() + out.bytes() * (1.0 + accumulate as u8 as f64));
    }
    fn slot_dots(&self, out: View, dy: View, y: View, _: &Route, _: usize) {
        self.pass("slot_dots", Class::Routing, out.bytes() + y.bytes() + y.len as f64 * dy.size as f64);
    }
    fn spread_rows(&self, out: View, _: View, _: &Route, _: usize) {
        self.pass("spread_rows", Class::Routing, 2.0 * out.bytes());
    }
    fn router_backward(
        &self,
        _: &mut Route,
        slot_dw: View,
        dlogits: View,
        _: usize,
        _: usize,
        _: RouterConfig,
        _: f32,
    ) {
        self.pass("moe_router_backward", Class::Routing, 3.0 * dlogits.bytes() + 3.0 * slot_dw.bytes());
    }

    fn sum_squares_to_acc(&self, _: &mut usize, _: usize, x: View) {
        self.pass("sum_squares_partial", Class::Optimizer, x.bytes());
        self.pass("sum_partials", Class::Optimizer, 8.0 * 512.0);
    }
    fn clip_coef(&self, _: &mut usize, _: usize, _: usize, _: usize, _: f32, _: f64) {
        self.pass("clip_coef", Class::Optimizer, 0.0);
    }
    fn adamw(&self, p: View, px: Option<View>, _: View, _: View, _: View, _: AdamW, _: &usize, _: usize) {
        // Reads p, g, m, v; writes p, g (zeroed), m, v and the 16-bit copy.
        self.pass("adamw", Class::Optimizer, 8.0 * p.bytes() + px.map_or(0.0, |x| x.bytes()));
    }
}
