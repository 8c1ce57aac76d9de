//! The conformance suite behind `minimind selftest`: every kernel of a backend against a
//! reference backend on the same random inputs (odd sizes, masked targets, a MoE expert that
//! receives no token), and the PyTorch fixtures run through the engine on the backend.
//!
//! With `--device cuda` the subject is the GPU and the reference the CPU; with `--device cpu`
//! the subject is the CPU on every core and the reference the CPU on one thread, which must
//! agree bit for bit (the CPU engine's determinism promise).

use std::path::Path;

use anyhow::{Context, Result};

use super::kernels::{AdamW, AttnShape, Gemm, Kernels, Positions, Rotary, RouterConfig};
use super::{Engine, hf};
use crate::rng::SplitMix64;

/// One kernel's verdict.
#[derive(Clone, Debug, PartialEq)]
pub struct Check {
    pub name: String,
    /// Worst relative error over the kernel's outputs: ‖subject − reference‖ / ‖reference‖.
    pub worst: f64,
    pub tolerance: f64,
}

impl Check {
    pub fn passed(&self) -> bool {
        self.worst <= self.tolerance
    }
}

/// ‖a − b‖ / ‖b‖ (absolute when b is zero).
pub fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared outputs differ in length");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if a.iter().zip(b).any(|(x, y)| x.is_nan() != y.is_nan()) {
        return f64::INFINITY;
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = SplitMix64::new(seed);
    (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * scale).collect()
}

fn up<K: Kernels>(k: &K, data: &[f32]) -> K::Buf {
    let mut b = k.alloc(data.len());
    k.upload(k.view_mut(&mut b, 0..data.len()), data);
    b
}

/// Activations (stored in the backend's `dtype`): in 16 bits, the suite checks the
/// kernels' 16-bit forms, with the inputs rounded as the engine would have stored them.
fn up_act<K: Kernels>(k: &K, data: &[f32]) -> K::Buf {
    let mut b = k.alloc_act(data.len());
    k.upload(k.view_mut(&mut b, 0..data.len()), data);
    b
}

fn host<K: Kernels>(k: &K, b: &K::Buf) -> Vec<f32> {
    let n = k.len(b);
    let mut out = vec![0.0; n];
    k.download(k.view(b, 0..n), &mut out);
    out
}

fn idx<K: Kernels>(k: &K, data: &[i32]) -> K::Idx {
    let mut b = k.alloc_idx(data.len());
    k.upload_idx(&mut b, data);
    b
}

fn acc_host<K: Kernels>(k: &K, a: &K::Acc, n: usize) -> Vec<f32> {
    let mut out = vec![0.0f64; n];
    k.read_acc(a, &mut out);
    out.iter().map(|&x| x as f32).collect()
}

/// One case on one backend: runs the kernel and returns its outputs.
type Case<'a> = dyn Fn() -> Vec<f32> + Sync + 'a;

/// The cases: each runs one kernel (or a short chain) on a backend and returns its outputs.
macro_rules! cases {
    ($($name:literal => $f:ident),* $(,)?) => {
        fn each<S: Kernels, R: Kernels>(s: &S, r: &R, run: &mut dyn FnMut(&str, &Case, &Case)) {
            $( run($name, &|| $f(s), &|| $f(r)); )*
        }
    };
}

cases! {
    "fill" => case_fill,
    "add" => case_add,
    "matmul" => case_matmul,
    "matmul (a transposed)" => case_matmul_ta,
    "matmul (b transposed, accumulate)" => case_matmul_tb,
    "embed_forward" => case_embed_forward,
    "embed_backward" => case_embed_backward,
    "rmsnorm_forward" => case_rmsnorm_forward,
    "add_rmsnorm_forward" => case_add_rmsnorm_forward,
    "rmsnorm_backward" => case_rmsnorm_backward,
    "rope (+ inverse, decode position)" => case_rope,
    "attention_forward" => case_attention_forward,
    "attention_backward" => case_attention_backward,
    "attention, 3 tiles of rows (T 70, H 4, G 1)" => case_attention_tiles,
    "attention, MiniMind's heads (T 40, D 64)" => case_attention_minimind,
    "attention, the widest tiled heads (D 128)" => case_attention_widest_tiled,
    "attention, wide heads (D 160)" => case_attention_wide,
    "attention, 3 flash tiles, ragged (T 150, D 64)" => case_attention_flash_tiles,
    "rope_attention, RoPE with attention (T 40, D 64)" => case_rope_attention,
    "rope_attention, q|k|v packed where taken (D 64, 128)" => case_rope_attention_packed,
    "attention_decode" => case_attention_decode,
    "swiglu_forward" => case_swiglu_forward,
    "swiglu_backward" => case_swiglu_backward,
    "cross_entropy (masked targets)" => case_cross_entropy,
    "sum_to_acc, fold_acc, zero_acc" => case_acc,
    "sum_squares_to_acc, clip_coef" => case_clip,
    "adamw" => case_adamw,
    "moe route (an expert without tokens)" => case_route,
    "moe gather, combine, spread, slot_dots" => case_moe_rows,
    "moe router_backward" => case_router_backward,
}

fn case_fill<K: Kernels>(k: &K) -> Vec<f32> {
    let mut b = k.alloc(1001);
    k.fill(k.view_mut(&mut b, 3..998), 2.5);
    host(k, &b)
}

fn case_add<K: Kernels>(k: &K) -> Vec<f32> {
    let mut a = up(k, &random(777, 1, 1.0));
    let b = up(k, &random(777, 2, 1.0));
    k.add(k.view_mut(&mut a, 0..777), k.view(&b, 0..777));
    host(k, &a)
}

fn matmul<K: Kernels>(k: &K, g: Gemm, seed: u64) -> Vec<f32> {
    let a = up_act(k, &random(g.rows * g.depth, seed, 1.0));
    let b = up_act(k, &random(g.depth * g.cols, seed + 1, 1.0));
    let mut out = up(k, &random(g.rows * g.cols, seed + 2, 1.0));
    k.matmul(
        k.view_mut(&mut out, 0..g.rows * g.cols),
        k.view(&a, 0..g.rows * g.depth),
        k.view(&b, 0..g.depth * g.cols),
        g,
    );
    host(k, &out)
}

fn case_matmul<K: Kernels>(k: &K) -> Vec<f32> {
    matmul(
        k,
        Gemm { rows: 37, cols: 53, depth: 29, a_transposed: false, b_transposed: false, accumulate: false },
        10,
    )
}

fn case_matmul_ta<K: Kernels>(k: &K) -> Vec<f32> {
    matmul(
        k,
        Gemm { rows: 31, cols: 17, depth: 45, a_transposed: true, b_transposed: false, accumulate: false },
        20,
    )
}

fn case_matmul_tb<K: Kernels>(k: &K) -> Vec<f32> {
    matmul(
        k,
        Gemm { rows: 19, cols: 67, depth: 33, a_transposed: false, b_transposed: true, accumulate: true },
        30,
    )
}

const C: usize = 48;
const V: usize = 211;

fn ids(n: usize, vocab: usize, seed: u64) -> Vec<i32> {
    let mut rng = SplitMix64::new(seed);
    // Repeats on purpose: embedding backward must add them in order.
    (0..n).map(|_| (rng.next_u64() % (vocab as u64 / 4).max(1)) as i32).collect()
}

fn case_embed_forward<K: Kernels>(k: &K) -> Vec<f32> {
    let emb = up(k, &random(V * C, 40, 1.0));
    let ids = idx(k, &ids(23, V, 41));
    let mut out = k.alloc(23 * C);
    k.embed_forward(k.view_mut(&mut out, 0..23 * C), k.view(&emb, 0..V * C), k.idx(&ids, 0..23), C);
    host(k, &out)
}

fn case_embed_backward<K: Kernels>(k: &K) -> Vec<f32> {
    // 600 positions over 52 ids: repeats within and across the GPU's sort chunks of 256.
    let n = 600;
    let mut demb = up(k, &random(V * C, 42, 0.1));
    let dout = up(k, &random(n * C, 43, 1.0));
    let ids = idx(k, &ids(n, V, 44));
    k.embed_backward(k.view_mut(&mut demb, 0..V * C), k.view(&dout, 0..n * C), k.idx(&ids, 0..n), C);
    host(k, &demb)
}

fn case_add_rmsnorm_forward<K: Kernels>(k: &K) -> Vec<f32> {
    let n = 37;
    let mut sum = up(k, &random(n * C, 52, 2.0));
    let x = up(k, &random(n * C, 53, 1.0));
    let w = up(k, &random(C, 54, 1.0));
    let (mut y, mut r) = (k.alloc_act(n * C), k.alloc(n));
    k.add_rmsnorm_forward(
        k.view_mut(&mut y, 0..n * C),
        k.view_mut(&mut r, 0..n),
        k.view_mut(&mut sum, 0..n * C),
        k.view(&x, 0..n * C),
        k.view(&w, 0..C),
        C,
        1e-5,
    );
    [host(k, &y), host(k, &r), host(k, &sum)].concat()
}

fn case_rmsnorm_forward<K: Kernels>(k: &K) -> Vec<f32> {
    let n = 37;
    let x = up(k, &random(n * C, 50, 2.0));
    let w = up(k, &random(C, 51, 1.0));
    let (mut y, mut r) = (k.alloc_act(n * C), k.alloc(n));
    k.rmsnorm_forward(
        k.view_mut(&mut y, 0..n * C),
        k.view_mut(&mut r, 0..n),
        k.view(&x, 0..n * C),
        k.view(&w, 0..C),
        C,
        1e-5,
    );
    [host(k, &y), host(k, &r)].concat()
}

fn case_rmsnorm_backward<K: Kernels>(k: &K) -> Vec<f32> {
    let n = 37;
    let x = up(k, &random(n * C, 52, 2.0));
    let w = up(k, &random(C, 53, 1.0));
    let dy = up_act(k, &random(n * C, 54, 1.0));
    let (mut y, mut r) = (k.alloc(n * C), k.alloc(n));
    k.rmsnorm_forward(
        k.view_mut(&mut y, 0..n * C),
        k.view_mut(&mut r, 0..n),
        k.view(&x, 0..n * C),
        k.view(&w, 0..C),
        C,
        1e-5,
    );
    let mut dx = up(k, &random(n * C, 55, 0.1));
    let mut dw = up(k, &random(C, 56, 0.1));
    let mut act = k.alloc_act(n * C);
    k.rmsnorm_backward(
        k.view_mut(&mut dx, 0..n * C),
        Some(k.view_mut(&mut act, 0..n * C)),
        k.view_mut(&mut dw, 0..C),
        k.view(&dy, 0..n * C),
        k.view(&x, 0..n * C),
        k.view(&w, 0..C),
        k.view(&r, 0..n),
        C,
    );
    [host(k, &dx), host(k, &dw), host(k, &act)].concat()
}

/// RoPE tables for `t` positions of head dim `d`.
fn tables<K: Kernels>(k: &K, t: usize, d: usize) -> (K::Buf, K::Buf) {
    let half = d / 2;
    let inv: Vec<f32> = (0..half).map(|j| 1.0 / 10000f32.powf((2 * j) as f32 / d as f32)).collect();
    let (mut cos, mut sin) = (vec![0.0; t * d], vec![0.0; t * d]);
    for p in 0..t {
        for j in 0..d {
            cos[p * d + j] = (p as f32 * inv[j % half]).cos();
            sin[p * d + j] = (p as f32 * inv[j % half]).sin();
        }
    }
    (up(k, &cos), up(k, &sin))
}

fn case_rope<K: Kernels>(k: &K) -> Vec<f32> {
    let (t, heads, d) = (11, 3, 16);
    let n = 2 * t;
    let (cos, sin) = tables(k, 40, d);
    let mut x = up_act(k, &random(n * heads * d, 60, 1.0));
    let (cv, sv) = (k.view(&cos, 0..40 * d), k.view(&sin, 0..40 * d));
    k.rope(k.view_mut(&mut x, 0..n * heads * d), cv, sv, Positions::sequences(t), heads, d, false);
    let forward = host(k, &x);
    k.rope(k.view_mut(&mut x, 0..n * heads * d), cv, sv, Positions::sequences(t), heads, d, true);
    let mut one = up_act(k, &random(heads * d, 61, 1.0));
    k.rope(k.view_mut(&mut one, 0..heads * d), cv, sv, Positions::at(37), heads, d, false);
    [forward, host(k, &x), host(k, &one)].concat()
}

/// B 2, T 13 (odd), H 4, G 2, D 16.
fn attn_shape() -> AttnShape {
    AttnShape::new(2, 13, 4, 2, 16).expect("a valid shape")
}

fn attention<K: Kernels>(k: &K, s: AttnShape, backward: bool) -> Vec<f32> {
    let (n, hd, gd) = (s.b * s.t, s.h * s.d, s.g * s.d);
    let q = up_act(k, &random(n * hd, 70, 1.0));
    let kk = up_act(k, &random(n * gd, 71, 1.0));
    let v = up_act(k, &random(n * gd, 72, 1.0));
    let mut out = k.alloc_act(n * hd);
    let mut saved = k.new_attn(s, false);
    let mut scratch = k.alloc(k.attn_scratch_len(s, false));
    let sl = k.len(&scratch);
    k.attention_forward(
        k.view_mut(&mut out, 0..n * hd),
        &mut saved,
        k.view_mut(&mut scratch, 0..sl),
        k.view(&q, 0..n * hd),
        k.view(&kk, 0..n * gd),
        k.view(&v, 0..n * gd),
        s,
    );
    if !backward {
        return host(k, &out);
    }
    let dout = up_act(k, &random(n * hd, 73, 1.0));
    let (mut dq, mut dk, mut dv) = (k.alloc_act(n * hd), k.alloc_act(n * gd), k.alloc_act(n * gd));
    k.attention_backward(
        k.view_mut(&mut dq, 0..n * hd),
        k.view_mut(&mut dk, 0..n * gd),
        k.view_mut(&mut dv, 0..n * gd),
        &saved,
        k.view_mut(&mut scratch, 0..sl),
        k.view(&dout, 0..n * hd),
        k.view(&out, 0..n * hd),
        k.view(&q, 0..n * hd),
        k.view(&kk, 0..n * gd),
        k.view(&v, 0..n * gd),
        s,
    );
    [host(k, &dq), host(k, &dk), host(k, &dv)].concat()
}

fn case_attention_forward<K: Kernels>(k: &K) -> Vec<f32> {
    attention(k, attn_shape(), false)
}

fn case_attention_backward<K: Kernels>(k: &K) -> Vec<f32> {
    attention(k, attn_shape(), true)
}

/// Longer than one tile of the GPU's tiled kernels (32 rows), with a ragged last tile, and
/// four query heads on one key/value head.
fn case_attention_tiles<K: Kernels>(k: &K) -> Vec<f32> {
    let s = AttnShape::new(1, 70, 4, 1, 24).expect("a valid shape");
    [attention(k, s, false), attention(k, s, true)].concat()
}

/// MiniMind's head width: the tiled kernels' lanes each own two of the 64 dimensions.
fn case_attention_minimind<K: Kernels>(k: &K) -> Vec<f32> {
    let s = AttnShape::new(2, 40, 8, 2, 64).expect("a valid shape");
    [attention(k, s, false), attention(k, s, true)].concat()
}

/// The widest heads the tiled kernels take: four dimensions a lane, the backward kernels
/// past the 48 KB of shared memory a block gets without opting in.
fn case_attention_widest_tiled<K: Kernels>(k: &K) -> Vec<f32> {
    let s = AttnShape::new(1, 35, 2, 1, 128).expect("a valid shape");
    [attention(k, s, false), attention(k, s, true)].concat()
}

/// Heads wider than the GPU's tiled kernels take (128).
fn case_attention_wide<K: Kernels>(k: &K) -> Vec<f32> {
    let s = AttnShape::new(1, 9, 2, 1, 160).expect("a valid shape");
    [attention(k, s, false), attention(k, s, true)].concat()
}

/// Three blocks of the GPU's flash kernels (64 query rows, 64 keys a tile at D 64), the last
/// ragged, two query heads on each key/value head.
fn case_attention_flash_tiles<K: Kernels>(k: &K) -> Vec<f32> {
    let s = AttnShape::new(1, 150, 4, 2, 64).expect("a valid shape");
    [attention(k, s, false), attention(k, s, true)].concat()
}

/// RoPE and attention as training runs them (`rope_attention_forward` and its backward),
/// at MiniMind's head width: the gradients with respect to the un-rotated q and k.
fn case_rope_attention<K: Kernels>(k: &K) -> Vec<f32> {
    rope_attention(k, AttnShape::new(2, 40, 8, 2, 64).expect("a valid shape"), 90)
}

/// `rope_attention_forward` then its backward on random q, k, v (seeds from `seed`):
/// out, dq, dk, dv.
fn rope_attention<K: Kernels>(k: &K, s: AttnShape, seed: u64) -> Vec<f32> {
    let (n, hd, gd) = (s.b * s.t, s.h * s.d, s.g * s.d);
    let (cos, sin) = tables(k, s.t, s.d);
    let rot = || Rotary {
        cos: k.view(&cos, 0..s.t * s.d),
        sin: k.view(&sin, 0..s.t * s.d),
        pos: Positions::sequences(s.t),
    };
    let mut q = up_act(k, &random(n * hd, seed, 1.0));
    let mut kk = up_act(k, &random(n * gd, seed + 1, 1.0));
    let v = up_act(k, &random(n * gd, seed + 2, 1.0));
    let mut out = k.alloc_act(n * hd);
    let mut saved = k.new_attn(s, false);
    let mut scratch = k.alloc(k.attn_scratch_len(s, false));
    let sl = k.len(&scratch);
    k.rope_attention_forward(
        k.view_mut(&mut out, 0..n * hd),
        &mut saved,
        k.view_mut(&mut scratch, 0..sl),
        k.view_mut(&mut q, 0..n * hd),
        k.view_mut(&mut kk, 0..n * gd),
        k.view(&v, 0..n * gd),
        s,
        rot(),
    );
    let dout = up_act(k, &random(n * hd, seed + 3, 1.0));
    let (mut dq, mut dk, mut dv) = (k.alloc_act(n * hd), k.alloc_act(n * gd), k.alloc_act(n * gd));
    k.rope_attention_backward(
        k.view_mut(&mut dq, 0..n * hd),
        k.view_mut(&mut dk, 0..n * gd),
        k.view_mut(&mut dv, 0..n * gd),
        &saved,
        k.view_mut(&mut scratch, 0..sl),
        k.view(&dout, 0..n * hd),
        k.view(&out, 0..n * hd),
        [k.view(&q, 0..n * hd), k.view(&kk, 0..n * gd), k.view(&v, 0..n * gd)],
        s,
        rot(),
    );
    [host(k, &out), host(k, &dq), host(k, &dk), host(k, &dv)].concat()
}

/// RoPE and attention with q, k and v as the fused projection writes them, the column
/// blocks of one `[N, (H + 2G) D]` buffer, where the backend takes them so
/// ([`Kernels::packed_qkv`]: CUDA's 16-bit flash kernels, reading and writing at that row
/// stride), else in buffers of their own: the outputs unpacked on the host either way, so
/// the strides are checked against the CPU. Both flash widths, each over several blocks of
/// 64 rows with a ragged last one (T 150 at D 64, T 70 at D 128); G < H.
fn case_rope_attention_packed<K: Kernels>(k: &K) -> Vec<f32> {
    let d64 = AttnShape::new(2, 150, 4, 2, 64).expect("a valid shape");
    let d128 = AttnShape::new(1, 70, 4, 1, 128).expect("a valid shape");
    [rope_attention_packed(k, d64), rope_attention_packed(k, d128)].concat()
}

fn rope_attention_packed<K: Kernels>(k: &K, s: AttnShape) -> Vec<f32> {
    let (n, hd, gd) = (s.b * s.t, s.h * s.d, s.g * s.d);
    if !k.packed_qkv(s) {
        return rope_attention(k, s, 100);
    }
    let row = hd + 2 * gd;
    let (cos, sin) = tables(k, s.t, s.d);
    let rot = || Rotary {
        cos: k.view(&cos, 0..s.t * s.d),
        sin: k.view(&sin, 0..s.t * s.d),
        pos: Positions::sequences(s.t),
    };
    let [q, kk, v] = [(100, hd), (101, gd), (102, gd)].map(|(seed, w)| random(n * w, seed, 1.0));
    let packed: Vec<f32> =
        (0..n).flat_map(|r| [&q[r * hd..][..hd], &kk[r * gd..][..gd], &v[r * gd..][..gd]].concat()).collect();
    let qkv = up_act(k, &packed);
    let mut out = k.alloc_act(n * hd);
    let mut saved = k.new_attn(s, false);
    let mut scratch = k.alloc(k.attn_scratch_len(s, false));
    let sl = k.len(&scratch);
    k.rope_attention_forward_packed(
        k.view_mut(&mut out, 0..n * hd),
        &mut saved,
        k.view(&qkv, 0..n * row),
        s,
        rot(),
    );
    let dout = up_act(k, &random(n * hd, 103, 1.0));
    let mut dqkv = k.alloc_act(n * row);
    k.rope_attention_backward_packed(
        k.view_mut(&mut dqkv, 0..n * row),
        &saved,
        k.view_mut(&mut scratch, 0..sl),
        k.view(&dout, 0..n * hd),
        k.view(&out, 0..n * hd),
        k.view(&qkv, 0..n * row),
        s,
        rot(),
    );
    let d = host(k, &dqkv);
    let block = |from: usize, w: usize| -> Vec<f32> {
        (0..n).flat_map(|r| d[r * row + from..][..w].to_vec()).collect()
    };
    [host(k, &out), block(0, hd), block(hd, gd), block(hd + gd, gd)].concat()
}

fn case_attention_decode<K: Kernels>(k: &K) -> Vec<f32> {
    let s = attn_shape();
    let (len, hd, gd) = (9, s.h * s.d, s.g * s.d);
    let q = up_act(k, &random(hd, 80, 1.0));
    let kc = up_act(k, &random(len * gd, 81, 1.0));
    let vc = up_act(k, &random(len * gd, 82, 1.0));
    let mut out = k.alloc_act(hd);
    let one = s.with_rows(1, 1).expect("valid");
    k.attention_decode(
        k.view_mut(&mut out, 0..hd),
        k.view(&q, 0..hd),
        k.view(&kc, 0..len * gd),
        k.view(&vc, 0..len * gd),
        len,
        one,
    );
    host(k, &out)
}

fn case_swiglu_forward<K: Kernels>(k: &K) -> Vec<f32> {
    let (rows, i) = (13, 37);
    let gu = up_act(k, &random(rows * 2 * i, 90, 3.0));
    let mut act = k.alloc_act(rows * i);
    k.swiglu_forward(k.view_mut(&mut act, 0..rows * i), k.view(&gu, 0..rows * 2 * i), i);
    host(k, &act)
}

fn case_swiglu_backward<K: Kernels>(k: &K) -> Vec<f32> {
    let (rows, i) = (13, 37);
    let gu = up_act(k, &random(rows * 2 * i, 91, 3.0));
    let da = up_act(k, &random(rows * i, 92, 1.0));
    let mut dgu = k.alloc_act(rows * 2 * i);
    k.swiglu_backward(
        k.view_mut(&mut dgu, 0..rows * 2 * i),
        k.view(&da, 0..rows * i),
        k.view(&gu, 0..rows * 2 * i),
        i,
    );
    host(k, &dgu)
}

fn case_cross_entropy<K: Kernels>(k: &K) -> Vec<f32> {
    let rows = 17;
    let mut logits = up_act(k, &random(rows * V, 100, 4.0));
    let targets: Vec<i32> = (0..rows).map(|r| if r % 5 == 3 { -1 } else { (r * 37 % V) as i32 }).collect();
    let t = idx(k, &targets);
    let mut losses = k.alloc(rows);
    k.cross_entropy(
        k.view_mut(&mut logits, 0..rows * V),
        k.view_mut(&mut losses, 0..rows),
        k.idx(&t, 0..rows),
        V,
        0.25,
    );
    [host(k, &logits), host(k, &losses)].concat()
}

fn case_acc<K: Kernels>(k: &K) -> Vec<f32> {
    let x = up(k, &random(3001, 110, 1.0));
    let mut acc = k.alloc_acc(6);
    k.zero_acc(&mut acc, 0..6);
    k.sum_to_acc(&mut acc, 0, k.view(&x, 0..3001));
    k.sum_to_acc(&mut acc, 1, k.view(&x, 1000..1777));
    k.fold_acc(&mut acc, 0, 2, 3.0, 7.0);
    k.fold_acc(&mut acc, 1, 2, 1.0, 7.0);
    acc_host(k, &acc, 6)
}

fn case_clip<K: Kernels>(k: &K) -> Vec<f32> {
    let g = up(k, &random(70001, 120, 0.05));
    let mut acc = k.alloc_acc(6);
    k.zero_acc(&mut acc, 0..6);
    k.sum_squares_to_acc(&mut acc, 0, k.view(&g, 0..70001));
    k.clip_coef(&mut acc, 0, 1, 2, 1.0, 1.0);
    k.clip_coef(&mut acc, 0, 3, 4, 0.5, 0.25);
    acc_host(k, &acc, 6)
}

fn case_adamw<K: Kernels>(k: &K) -> Vec<f32> {
    let n = 40_007;
    let mut p = up(k, &random(n, 130, 1.0));
    let mut g = up(k, &random(n, 131, 0.1));
    let mut m = up(k, &random(n, 132, 0.01));
    let mut v = up(k, &random(n, 133, 0.01).iter().map(|x| x * x).collect::<Vec<_>>());
    let mut acc = k.alloc_acc(4);
    k.zero_acc(&mut acc, 0..4);
    k.sum_squares_to_acc(&mut acc, 0, k.view(&g, 0..n));
    k.clip_coef(&mut acc, 0, 1, 2, 1.0, 1.0);
    let h = AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, step: 3 };
    // The weights' copy a 16-bit run's matrix products read (f32 here: the same numbers).
    let mut px = k.alloc_act(n);
    k.adamw(
        k.view_mut(&mut p, 0..n),
        Some(k.view_mut(&mut px, 0..n)),
        k.view_mut(&mut g, 0..n),
        k.view_mut(&mut m, 0..n),
        k.view_mut(&mut v, 0..n),
        h,
        &acc,
        2,
    );
    [host(k, &p), host(k, &px), host(k, &g), host(k, &m), host(k, &v)].concat()
}

const E: usize = 5;
const TOPK: usize = 2;

fn rc() -> RouterConfig {
    RouterConfig { experts: E, top_k: TOPK, norm_topk_prob: true, alpha: 0.1, seq_aux: true }
}

/// Router logits for 2 sequences of 9 tokens where expert 3 is never chosen.
fn router_logits() -> Vec<f32> {
    let mut l = random(18 * E, 140, 2.0);
    for tok in 0..18 {
        l[tok * E + 3] = -30.0;
    }
    l
}

fn routed<K: Kernels>(k: &K) -> (K::Route, K::Buf) {
    let logits = up(k, &router_logits());
    let mut route = k.new_route();
    k.route(&mut route, k.view(&logits, 0..18 * E), 2, 9, rc());
    (route, logits)
}

fn case_route<K: Kernels>(k: &K) -> Vec<f32> {
    let (route, _) = routed(k);
    let mut acc = k.alloc_acc(2);
    k.zero_acc(&mut acc, 0..2);
    k.aux_to_acc(&mut acc, 1, &route);
    let offsets: Vec<f32> = k.expert_offsets(&route).iter().map(|&o| o as f32).collect();
    assert_eq!(offsets[3], offsets[4], "expert 3 receives no token");
    [offsets, acc_host(k, &acc, 2)].concat()
}

fn case_moe_rows<K: Kernels>(k: &K) -> Vec<f32> {
    let (route, _) = routed(k);
    let (n, slots) = (18, 18 * TOPK);
    let x = up_act(k, &random(n * C, 150, 1.0));
    let y = up_act(k, &random(slots * C, 151, 1.0));
    let dy = up_act(k, &random(n * C, 152, 1.0));
    let mut gathered = k.alloc_act(slots * C);
    k.gather_rows(k.view_mut(&mut gathered, 0..slots * C), k.view(&x, 0..n * C), &route, C);
    let mut combined = up(k, &random(n * C, 153, 1.0));
    k.combine_rows(k.view_mut(&mut combined, 0..n * C), k.view(&y, 0..slots * C), &route, true, C, true);
    let mut plain = k.alloc(n * C);
    k.combine_rows(k.view_mut(&mut plain, 0..n * C), k.view(&y, 0..slots * C), &route, false, C, false);
    // Into the activations' storage (a gradient for the products), on what it holds.
    let mut to_act = up_act(k, &random(n * C, 154, 1.0));
    k.combine_rows(k.view_mut(&mut to_act, 0..n * C), k.view(&y, 0..slots * C), &route, true, C, true);
    let mut spread = k.alloc_act(slots * C);
    k.spread_rows(k.view_mut(&mut spread, 0..slots * C), k.view(&dy, 0..n * C), &route, C);
    let mut dots = k.alloc(slots);
    k.slot_dots(k.view_mut(&mut dots, 0..slots), k.view(&dy, 0..n * C), k.view(&y, 0..slots * C), &route, C);
    let outs = [&gathered, &combined, &plain, &to_act, &spread];
    [outs.map(|b| host(k, b)).concat(), host(k, &dots)].concat()
}

fn case_router_backward<K: Kernels>(k: &K) -> Vec<f32> {
    let (mut route, _) = routed(k);
    let dw = up(k, &random(18 * TOPK, 160, 1.0));
    let mut dl = k.alloc(18 * E);
    k.router_backward(&mut route, k.view(&dw, 0..18 * TOPK), k.view_mut(&mut dl, 0..18 * E), 2, 9, rc(), 0.5);
    host(k, &dl)
}

/// Runs every case on `subject` and `reference` (each inside its own `run_*` wrapper, such
/// as a thread pool) and returns one verdict per kernel; `tolerance` gives each kernel's.
pub fn kernels<S: Kernels, R: Kernels>(
    subject: &S,
    reference: &R,
    run_subject: &dyn Fn(&Case) -> Vec<f32>,
    run_reference: &dyn Fn(&Case) -> Vec<f32>,
    tolerance: &dyn Fn(&str) -> f64,
) -> Vec<Check> {
    let mut out = Vec::new();
    each(subject, reference, &mut |name, s, r| {
        let (a, b) = (run_subject(s), run_reference(r));
        out.push(Check { name: name.to_string(), worst: rel(&a, &b), tolerance: tolerance(name) });
    });
    out
}

/// One PyTorch fixture through the engine on `kernels`: logits, loss, every gradient.
pub fn fixture<K: Kernels>(kernels: K, dir: &Path, tol: FixtureTolerance) -> Result<Vec<Check>> {
    let name = dir.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string());
    let model = hf::read_folder(dir)?;
    let read =
        |f: &str| std::fs::read(dir.join(f)).with_context(|| format!("reading {}", dir.join(f).display()));
    let batch_bytes = read("batch.safetensors")?;
    let batch = safetensors::SafeTensors::deserialize(&batch_bytes).context("batch.safetensors")?;
    let i64s = |t: &str| -> Result<(Vec<i64>, Vec<usize>)> {
        let v = batch.tensor(t).with_context(|| format!("batch has no {t}"))?;
        let data =
            v.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
        Ok((data, v.shape().to_vec()))
    };
    let (ids, shape) = i64s("input_ids")?;
    let (labels, _) = i64s("labels")?;
    let (b, t) = (shape[0], shape[1]);
    let targets: Vec<i32> = (0..b * t)
        .map(|n| if n % t == t - 1 || labels[n + 1] < 0 { -1 } else { labels[n + 1] as i32 })
        .collect();
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    let mut engine = Engine::new(kernels, model.config, b, t)?;
    engine.set_params(&model.params);
    let expected: serde_json::Value = serde_json::from_slice(&read("expected.json")?)?;
    let mut checks = Vec::new();
    let mut logits = vec![0.0; b * t * engine.config.vocab_size];
    engine.logits(&ids, &mut logits);
    let want = hf::to_f32(&batch.tensor("logits").context("batch has no logits")?)?;
    checks.push(Check { name: format!("{name}: logits"), worst: rel(&logits, &want), tolerance: tol.logits });
    engine.zero_grads();
    let losses = engine.forward_backward(&ids, &targets, 1.0);
    let loss = losses.lm + losses.aux;
    let want_loss = expected["loss"].as_f64().context("expected.json has no loss")?;
    checks.push(Check {
        name: format!("{name}: loss (absolute)"),
        worst: (loss - want_loss).abs(),
        tolerance: tol.loss,
    });
    let grads_bytes = read("grads.safetensors")?;
    let grads = safetensors::SafeTensors::deserialize(&grads_bytes).context("grads.safetensors")?;
    let ours = engine.grads_host();
    let mut worst = 0.0f64;
    for t in &engine.layout.tensors {
        let reference =
            hf::to_f32(&grads.tensor(&t.name).with_context(|| format!("no gradient of {}", t.name))?)?;
        worst = worst.max(rel(&ours[t.range.clone()], &reference));
    }
    checks.push(Check { name: format!("{name}: worst gradient"), worst, tolerance: tol.grads });
    engine.kernels.check()?;
    Ok(checks)
}

/// How close a fixture must be: float32 as the CPU engine, bfloat16 looser.
#[derive(Clone, Copy, Debug)]
pub struct FixtureTolerance {
    pub logits: f64,
    pub loss: f64,
    pub grads: f64,
}

impl FixtureTolerance {
    pub const FLOAT32: FixtureTolerance = FixtureTolerance { logits: 1e-5, loss: 1e-5, grads: 1e-4 };
    pub const BFLOAT16: FixtureTolerance = FixtureTolerance { logits: 5e-2, loss: 2e-2, grads: 5e-2 };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu::Cpu;

    #[test]
    fn rel_table() {
        assert_eq!(rel(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!((rel(&[1.0, 0.0], &[0.0, 0.0]) - 1.0).abs() < 1e-12, "absolute against zeros");
        assert_eq!(rel(&[f32::NAN], &[1.0]), f64::INFINITY);
    }

    #[test]
    fn the_cpu_on_every_core_matches_the_cpu_on_one_thread_bit_for_bit() {
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let many = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let (s, r) = (Cpu::new(), Cpu::new());
        let checks = kernels(&s, &r, &|f| many.install(f), &|f| one.install(f), &|_| 0.0);
        assert_eq!(checks.len(), 30);
        for c in &checks {
            assert!(c.passed(), "{}: {:e}", c.name, c.worst);
        }
    }

    #[test]
    fn a_wrong_kernel_is_caught() {
        // The suite compares outputs: a backend that differs must fail it.
        let (s, r) = (Cpu::new(), Cpu::new());
        let mut calls = 0;
        let mut out = Vec::new();
        each(&s, &r, &mut |name, a, b| {
            calls += 1;
            let (mut x, y) = (a(), b());
            x[0] += 1.0;
            out.push(Check { name: name.into(), worst: rel(&x, &y), tolerance: 1e-6 });
        });
        assert_eq!(calls, 30);
        assert!(out.iter().all(|c| !c.passed()), "every perturbed output fails");
    }
}
