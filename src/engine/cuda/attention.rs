//! Attention on the tensor cores, for bf16/f16 runs: llm.c's layout. The two forward
//! products (S = scale·QKᵀ, O = PV) and the four backward ones (dV = PᵀdO, dP = dO·Vᵀ,
//! dQ = scale·dS·K, dK = scale·dSᵀQ) are cuBLAS strided batched GEMMs with f32 accumulation;
//! `kernels.cu` does the rest: the head-major copies, the causal softmax (which saves each
//! row's log-sum-exp) and the softmax backward (with delta = rowsum(dO∘O)). Backward
//! recomputes S from Q and K rather than keeping P per layer, so the scratch is one chunk's,
//! shared by every layer.
//!
//! Head-major Q `[B, H, T, D]` puts the R = H/G query heads of a group in R*T consecutive
//! rows, all reading the group's K/V block `[T, D]`: one product per (sequence, group) covers
//! the group's heads without copying K or V, and dK, dV sum over the heads inside the product
//! (one rounding). The scratch (S in f32, P in 16 bits: [c, H, T, T] for a chunk of c
//! sequences) takes at most [`ATTENTION_MEMORY_SHARE`] of the free memory: when a batch does
//! not fit, the sequences go through in chunks; when not even one does, the tiled kernels
//! serve. Shapes: B sequences, T tokens, H/G heads, D head dim, R = H/G.

use super::device::{DBuf, GemmCall, Store};
use super::{Arg, Cuda, DView, DViewMut, THREADS, i32_of, typed};
use crate::engine::gpu::{ATTENTION_MEMORY_SHARE, attention_chunk, attention_scratch};
use crate::engine::kernels::{AttnShape, Gemm};

/// What a layer's attention forward keeps for its backward.
pub struct Saved {
    /// Each query row's log-sum-exp `[B, H, T]`.
    pub lse: DBuf<f32>,
    /// Whether q and k were rotated in place (the model's buffers hold them rotated), or
    /// (tensor cores with RoPE fused) only as they were read: into the head-major copies of
    /// the cuBLAS path, or by the flash kernels.
    pub rotated_in_place: bool,
}

/// RoPE's tables on the device (`[T, D]` cos and sin), for sequences starting at position 0.
#[derive(Clone, Copy)]
pub(super) struct Tables {
    pub cos: u64,
    pub sin: u64,
}

/// The tensor-core attention's scratch, grown on first use to the chunk that fits.
#[derive(Default)]
pub struct Scratch {
    buf: Option<DBuf<u8>>,
    /// Not even one sequence fits, or the device refused the memory: the tiled kernels serve.
    off: bool,
}

/// One operand of a batched product: device address, row length (leading dimension), the
/// elements between consecutive products, and how they are stored.
#[derive(Clone, Copy)]
struct Mat {
    ptr: u64,
    ld: usize,
    stride: usize,
    st: Store,
}

/// `c` sequences of `t` rows of `heads` heads of width `d`.
#[derive(Clone, Copy)]
struct Heads {
    c: usize,
    t: usize,
    heads: usize,
    d: usize,
}

/// What the causal softmax does with each row's log-sum-exp.
#[derive(Clone, Copy)]
enum Lse {
    /// Writes it (forward).
    Write(u64),
    /// Reads the forward's, to recompute P (backward).
    Read(u64),
}

/// Where each part of a chunk's scratch starts.
struct Parts {
    s: u64,
    p: u64,
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    dq: u64,
    dk: u64,
    dv: u64,
}

impl Cuda {
    /// The scratch and the sequences per chunk for tensor-core attention over `s`; none in
    /// float32 runs (they keep the tiled kernels' exact path) or when no memory is left for
    /// even one sequence.
    fn tensor_chunk(&self, s: AttnShape) -> Option<(Parts, usize)> {
        let st = Store::of(self.dtype);
        if st == Store::F32 || self.failed() {
            return None;
        }
        let bytes_for = |c: usize| attention_scratch(c, s.t, s.h, s.g, s.d, st.size()).1;
        let mut scratch = self.attn.lock().unwrap_or_else(|e| e.into_inner());
        if scratch.off {
            return None;
        }
        let have = scratch.buf.as_ref().map_or(0, |b| b.len());
        // The chunks the scratch already holds: once it holds one sequence the tensor cores
        // serve for good, so a layer's backward goes the way its forward went.
        let fits = |room: usize| attention_chunk(s.b, Some(room), bytes_for);
        let chunk = if have >= bytes_for(s.b) {
            s.b
        } else {
            // Grow within a share of what is free now plus what the old scratch holds.
            let budget =
                self.memory().map(|(free, _)| ((free + have) as f64 * ATTENTION_MEMORY_SHARE) as usize);
            let want = attention_chunk(s.b, budget, bytes_for);
            let old = scratch.buf.take();
            let grown = if want > fits(have) {
                drop(old);
                DBuf::zeroed(&self.dev, bytes_for(want)).ok().map(|buf| (buf, want))
            } else {
                old.map(|buf| (buf, fits(have)))
            };
            match grown {
                Some((buf, chunk)) if chunk > 0 => {
                    scratch.buf = Some(buf);
                    chunk
                }
                // The device refused what the budget allows: one sequence at a time, if it
                // gives that; without budget for one, the tiled kernels.
                _ => match (want > 0).then(|| DBuf::zeroed(&self.dev, bytes_for(1)).ok()).flatten() {
                    Some(buf) => {
                        scratch.buf = Some(buf);
                        1
                    }
                    None => {
                        scratch.off = true;
                        return None;
                    }
                },
            }
        };
        let base = scratch.buf.as_ref().map(|b| b.ptr)?;
        let (o, _) = attention_scratch(chunk, s.t, s.h, s.g, s.d, st.size());
        let at = |i: usize| base + o[i] as u64;
        let parts = Parts {
            s: at(0),
            p: at(1),
            q: at(2),
            k: at(3),
            v: at(4),
            o: at(5),
            dq: at(6),
            dk: at(7),
            dv: at(8),
        };
        Some((parts, chunk))
    }

    /// Head-major copies: `dst [c, heads, T, D]` from rows `src [c*T, heads*D]`
    /// (`to_heads`), or back; rotated by RoPE on the way in (by its inverse on the way back)
    /// when `rot` is given.
    fn heads(&self, st: Store, dst: u64, src: u64, x: Heads, to_heads: bool, rot: Option<Tables>) {
        let Heads { c, t, heads, d } = x;
        let dims = [i32_of(c), i32_of(t), i32_of(heads), i32_of(d), Arg::I32(to_heads as i32)];
        match rot {
            None => {
                let args = [[Arg::Ptr(dst), Arg::Ptr(src)].as_slice(), &dims].concat();
                self.launch_kernel(
                    typed("attn_heads", st),
                    Self::blocks(c * heads * t * d),
                    THREADS,
                    0,
                    &args,
                );
            }
            Some(r) => {
                let ptrs = [Arg::Ptr(dst), Arg::Ptr(src), Arg::Ptr(r.cos), Arg::Ptr(r.sin)];
                let args = [ptrs.as_slice(), &dims].concat();
                self.launch_kernel(
                    typed("attn_heads_rope", st),
                    Self::blocks(c * heads * t * d / 2),
                    THREADS,
                    0,
                    &args,
                );
            }
        }
    }

    /// `batch` products `out_i (=) alpha op(a_i) op(b_i)` (row-major, as [`Gemm`] says).
    fn batched(&self, out: Mat, a: Mat, b: Mat, g: Gemm, alpha: f32, batch: usize) {
        if self.failed() || batch == 0 {
            return;
        }
        let call = GemmCall {
            b_transposed: g.b_transposed,
            a_transposed: g.a_transposed,
            n: g.cols,
            m: g.rows,
            k: g.depth,
            b: b.ptr,
            ldb: b.ld,
            a: a.ptr,
            lda: a.ld,
            c: out.ptr,
            ldc: out.ld,
            accumulate: g.accumulate,
            ab: super::same_store("batched gemm operands", &[a.st, b.st]),
            c_store: out.st,
            alpha,
            batch,
            stride_a: a.stride,
            stride_b: b.stride,
            stride_c: out.stride,
        };
        self.gemms.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Err(e) = self.timed(super::GEMM, || self.dev.gemm(&call)) {
            self.fail(|| format!("cuBLAS batched gemm {batch} x {}x{}x{}: {e}", g.rows, g.cols, g.depth));
        }
    }

    /// The causal softmax of `rows` score rows of length `t` into P, writing or reading each
    /// row's log-sum-exp.
    fn softmax(&self, st: Store, p: u64, s: u64, lse: Lse, rows: usize, t: usize) {
        let (lse, from_lse) = match lse {
            Lse::Write(p) => (p, false),
            Lse::Read(p) => (p, true),
        };
        launch!(self, typed("attn_softmax", st), super::row_grid(rows).min(65535), THREADS; Arg::Ptr(p), Arg::Ptr(lse), Arg::Ptr(s), rows as i64, t, Arg::I32(from_lse as i32));
    }

    /// Forward on the tensor cores, q and k rotated by RoPE in their head-major copies when
    /// `rot` is given; false when the tiled kernels must serve (see [`Cuda::tensor_chunk`]).
    pub(super) fn attention_forward_tc(
        &self,
        out: &DViewMut<'_>,
        lse: u64,
        [q, k, v]: [&DView<'_>; 3],
        rot: Option<Tables>,
        s: AttnShape,
    ) -> bool {
        let Some((x, chunk)) = self.tensor_chunk(s) else { return false };
        let st = q.st;
        let (t, h, g, d, xs) = (s.t, s.h, s.g, s.d, st.size() as u64);
        let r = h / g;
        let scale = 1.0 / (d as f32).sqrt();
        let plain =
            Gemm { rows: 0, cols: 0, depth: 0, a_transposed: false, b_transposed: false, accumulate: false };
        let qrows = |ptr: u64| Mat { ptr, ld: d, stride: r * t * d, st };
        let kv = |ptr: u64| Mat { ptr, ld: d, stride: t * d, st };
        let scores = |ptr: u64, st: Store| Mat { ptr, ld: t, stride: r * t * t, st };
        for b0 in (0..s.b).step_by(chunk) {
            let c = chunk.min(s.b - b0);
            let (qh, kvh) = (Heads { c, t, heads: h, d }, Heads { c, t, heads: g, d });
            let batch = c * g;
            let (first_q, first_kv) = ((b0 * t * h * d) as u64 * xs, (b0 * t * g * d) as u64 * xs);
            self.heads(st, x.q, q.ptr + first_q, qh, true, rot);
            self.heads(st, x.k, k.ptr + first_kv, kvh, true, rot);
            self.heads(st, x.v, v.ptr + first_kv, kvh, true, None);
            // S = scale Q Kᵀ per (sequence, group): [R*T, D] x [T, D]ᵀ, in f32.
            let s_gemm = Gemm { rows: r * t, cols: t, depth: d, b_transposed: true, ..plain };
            self.batched(scores(x.s, Store::F32), qrows(x.q), kv(x.k), s_gemm, scale, batch);
            self.softmax(st, x.p, x.s, Lse::Write(lse + (4 * b0 * h * t) as u64), c * h * t, t);
            // O = P V: [R*T, T] x [T, D].
            let o_gemm = Gemm { rows: r * t, cols: d, depth: t, ..plain };
            self.batched(qrows(x.o), scores(x.p, st), kv(x.v), o_gemm, 1.0, batch);
            self.heads(st, out.ptr + first_q, x.o, qh, false, None);
        }
        true
    }

    /// Backward on the tensor cores, given `[dout, q, k, v]`, the forward's `lse` and
    /// `delta` = rowsum(dO∘O) `[B*H*T]`; with `rot`, q and k are un-rotated (rotated in their
    /// copies) and dq, dk come back through RoPE's inverse. False when the tiled kernels must
    /// serve.
    pub(super) fn attention_backward_tc(
        &self,
        grads: [&DViewMut<'_>; 3],
        inputs: [&DView<'_>; 4],
        (lse, delta): (u64, u64),
        rot: Option<Tables>,
        s: AttnShape,
    ) -> bool {
        let Some((x, chunk)) = self.tensor_chunk(s) else { return false };
        let [dq, dk, dv] = grads;
        let [dout, q, k, v] = inputs;
        let st = q.st;
        let (t, h, g, d, xs) = (s.t, s.h, s.g, s.d, st.size() as u64);
        let r = h / g;
        let scale = 1.0 / (d as f32).sqrt();
        let plain =
            Gemm { rows: 0, cols: 0, depth: 0, a_transposed: false, b_transposed: false, accumulate: false };
        // Operands, per (sequence, group): the group's query rows [R*T, D], its K/V [T, D],
        // its scores [R*T, T].
        let qrows = |ptr: u64| Mat { ptr, ld: d, stride: r * t * d, st };
        let kv = |ptr: u64| Mat { ptr, ld: d, stride: t * d, st };
        let scores = |ptr: u64, st: Store| Mat { ptr, ld: t, stride: r * t * t, st };
        for b0 in (0..s.b).step_by(chunk) {
            let c = chunk.min(s.b - b0);
            let (qh, kvh) = (Heads { c, t, heads: h, d }, Heads { c, t, heads: g, d });
            let batch = c * g;
            let (first_q, first_kv) = ((b0 * t * h * d) as u64 * xs, (b0 * t * g * d) as u64 * xs);
            let (rows_lse, rows) = ((4 * b0 * h * t) as u64, c * h * t);
            self.heads(st, x.q, q.ptr + first_q, qh, true, rot);
            self.heads(st, x.k, k.ptr + first_kv, kvh, true, rot);
            self.heads(st, x.v, v.ptr + first_kv, kvh, true, None);
            self.heads(st, x.o, dout.ptr + first_q, qh, true, None);
            // S again, then P from the forward's log-sum-exp.
            let s_gemm = Gemm { rows: r * t, cols: t, depth: d, b_transposed: true, ..plain };
            self.batched(scores(x.s, Store::F32), qrows(x.q), kv(x.k), s_gemm, scale, batch);
            self.softmax(st, x.p, x.s, Lse::Read(lse + rows_lse), rows, t);
            // dV = Pᵀ dO: [T, R*T] x [R*T, D], summing the group's heads.
            let dv_gemm = Gemm { rows: t, cols: d, depth: r * t, a_transposed: true, ..plain };
            self.batched(kv(x.dv), scores(x.p, st), qrows(x.o), dv_gemm, 1.0, batch);
            // dP = dO Vᵀ, in f32 where S was.
            self.batched(scores(x.s, Store::F32), qrows(x.o), kv(x.v), s_gemm, 1.0, batch);
            // dS = P (dP - delta), in place of P.
            launch!(self, typed("attn_dsoftmax", st), super::row_grid(rows).min(65535), THREADS; Arg::Ptr(x.p), Arg::Ptr(x.s), Arg::Ptr(delta + rows_lse), rows as i64, t);
            // dQ = scale dS K: [R*T, T] x [T, D]; dK = scale dSᵀ Q: [T, R*T] x [R*T, D].
            let dq_gemm = Gemm { rows: r * t, cols: d, depth: t, ..plain };
            self.batched(qrows(x.dq), scores(x.p, st), kv(x.k), dq_gemm, scale, batch);
            self.batched(kv(x.dk), scores(x.p, st), qrows(x.q), dv_gemm, scale, batch);
            self.heads(st, dq.ptr + first_q, x.dq, qh, false, rot);
            self.heads(st, dk.ptr + first_kv, x.dk, kvh, false, rot);
            self.heads(st, dv.ptr + first_kv, x.dv, kvh, false, None);
        }
        true
    }
}

/// Rows (forward, dq: queries; dkv: keys) per block of the flash kernels (`FLASH_ROWS` in
/// `kernels.cu`), in 4 warps of 16.
const FLASH_ROWS: usize = 64;
const FLASH_THREADS: u32 = 128;

/// Which form of a flash kernel serves heads `d` wide (listed `_d64`, `_d128` in `TYPED`);
/// none for other widths (see [`crate::engine::gpu::flash_width`]). Pure.
pub(super) fn flash_form(d: usize) -> Option<usize> {
    match d {
        64 => Some(0),
        128 => Some(1),
        _ => None,
    }
}

/// The row strides, in elements, at which the flash kernels read q (and write dq) and read k
/// and v (and write dk and dv); `out` and `dout` are always `[N, H*D]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ld {
    q: usize,
    kv: usize,
}

impl Ld {
    /// q `[N, H*D]`, k and v `[N, G*D]`, each a buffer of its own.
    pub(super) fn split(s: AttnShape) -> Ld {
        Ld { q: s.h * s.d, kv: s.g * s.d }
    }

    /// q, k and v as the column blocks of one `[N, (H + 2G) D]` buffer (the fused
    /// projection's output, `Kernels::packed_qkv`).
    pub(super) fn packed(s: AttnShape) -> Ld {
        let row = (s.h + 2 * s.g) * s.d;
        Ld { q: row, kv: row }
    }
}

impl Cuda {
    /// Whether the flash kernels (`mma.sync`, sm_80 and later) serve attention of shape `s`:
    /// 16-bit runs at heads 64 or 128 wide, unless switched off (`MINIMIND_CUDA_FLASH=0`,
    /// [`Cuda::without_flash`]).
    pub(super) fn flash_serves(&self, s: AttnShape) -> bool {
        self.flash && Store::of(self.dtype) != Store::F32 && flash_form(s.d).is_some()
    }

    fn flash_args(&self, rot: Option<Tables>, s: AttnShape, ld: Ld) -> [Arg; 9] {
        let (cos, sin) = rot.map_or((0, 0), |r| (r.cos, r.sin));
        [
            Arg::Ptr(cos),
            Arg::Ptr(sin),
            i32_of(s.b),
            i32_of(s.t),
            i32_of(s.h),
            i32_of(s.g),
            i32_of(ld.q),
            i32_of(ld.kv),
            Arg::I32(rot.is_some() as i32),
        ]
    }

    /// Flash attention forward: `out` and each row's log-sum-exp, q and k rotated as they
    /// are read when `rot` is given, q, k and v read at the strides `ld`. The caller checked
    /// [`Cuda::flash_serves`].
    pub(super) fn attention_forward_flash(
        &self,
        out: &DViewMut<'_>,
        lse: u64,
        [q, k, v]: [&DView<'_>; 3],
        rot: Option<Tables>,
        (s, ld): (AttnShape, Ld),
    ) {
        let form = flash_form(s.d).expect("flash_serves checked the head width");
        let grid =
            u32::try_from(s.b * s.h * s.t.div_ceil(FLASH_ROWS)).expect("a grid that fits CUDA's limit");
        let ptrs = [Arg::Ptr(out.ptr), Arg::Ptr(lse), Arg::Ptr(q.ptr), Arg::Ptr(k.ptr), Arg::Ptr(v.ptr)];
        let args = [ptrs.as_slice(), &self.flash_args(rot, s, ld)].concat();
        self.launch_kernel(super::form("flash_forward_d64", form, q.st), grid, FLASH_THREADS, 0, &args);
    }

    /// Flash attention backward, given `[dout, q, k, v]`, the forward's `out` and `lse`, and
    /// `delta` `[B*H*T]` (f32 scratch): dq per block of query rows, which also writes delta =
    /// rowsum(dO∘O) of its rows, then dk and dv per block of key rows; with `rot`, dq and dk
    /// leave through RoPE's inverse; q, k, v read and dq, dk, dv written at the strides `ld`.
    pub(super) fn attention_backward_flash(
        &self,
        [dq, dk, dv]: [&DViewMut<'_>; 3],
        [dout, q, k, v]: [&DView<'_>; 4],
        out: &DView<'_>,
        (lse, delta): (u64, u64),
        rot: Option<Tables>,
        (s, ld): (AttnShape, Ld),
    ) {
        let form = flash_form(s.d).expect("flash_serves checked the head width");
        let tiles = s.t.div_ceil(FLASH_ROWS);
        let grid = |heads: usize| u32::try_from(s.b * heads * tiles).expect("a grid that fits CUDA's limit");
        let inputs = [
            Arg::Ptr(delta),
            Arg::Ptr(dout.ptr),
            Arg::Ptr(lse),
            Arg::Ptr(q.ptr),
            Arg::Ptr(k.ptr),
            Arg::Ptr(v.ptr),
        ];
        let rest = self.flash_args(rot, s, ld);
        let dq_args =
            [[Arg::Ptr(dq.ptr), Arg::Ptr(delta), Arg::Ptr(out.ptr)].as_slice(), &inputs[1..], &rest].concat();
        self.launch_kernel(
            super::form("flash_backward_dq_d64", form, q.st),
            grid(s.h),
            FLASH_THREADS,
            0,
            &dq_args,
        );
        let dkv_args = [[Arg::Ptr(dk.ptr), Arg::Ptr(dv.ptr)].as_slice(), &inputs, &rest].concat();
        self.launch_kernel(
            super::form("flash_backward_dkv_d64", form, q.st),
            grid(s.g),
            FLASH_THREADS,
            0,
            &dkv_args,
        );
    }
}
