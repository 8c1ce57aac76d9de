//! Causal grouped-query attention on the CPU, forward and backward.
//!
//! Per (batch, head) the T x T score matrix is computed in row blocks of `BLOCK`: block r
//! only needs key columns `0..end(r)`, so the causal half is skipped. Query head h reads
//! key/value head `h / (H/G)` in place (no repeated K/V). Backward runs one task per
//! (batch, kv head) and walks that group's query heads in order, so the shared dK/dV
//! accumulate in a fixed order.
//!
//! The products run on one of two paths ([`Path`]): the gemm crate in f32, or (bf16 runs on
//! CPUs with AMX) AMX tiles in bf16 with f32 sums, each head's right-hand operands (Kᵀ, V,
//! Q, dO) packed once and reused by every row block. Softmax and its backward stay f32.
//!
//! Layouts: q/out `[B*T, H*D]`, k/v `[B*T, G*D]`, probs/scratch `[B, H, T, T]`.

use std::cell::RefCell;

use rayon::prelude::*;

use super::bf16::Isa;
use super::{Dst, Operand, SendPtr, amx, exp, gemm_strided, simd_fn};
use crate::engine::kernels::AttnShape;

/// Where attention's products run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// The gemm crate in f32: float32 runs, and bf16 runs without AMX.
    F32,
    /// AMX tiles, operands rounded to bf16 as they are packed, f32 sums.
    Amx,
}

impl Path {
    /// The path of a backend whose linear layers take `isa` (see [`Isa::takes_attention`]).
    pub fn of(isa: Isa) -> Path {
        if isa.takes_attention() { Path::Amx } else { Path::F32 }
    }
}

thread_local! {
    /// The packed operands of the head a worker is on (AMX path): reused, not reallocated.
    static PACKED: RefCell<[amx::TileBuf; 4]> =
        const { RefCell::new([amx::TileBuf::new(), amx::TileBuf::new(), amx::TileBuf::new(), amx::TileBuf::new()]) };
}

/// A right-hand operand `[k, n]`: the f32 matrix and, on the AMX path, its packing.
struct Rhs<'a> {
    f32: Operand,
    packed: Option<amx::Packed<'a>>,
}

impl Rhs<'_> {
    fn path(&self) -> Path {
        if self.packed.is_some() { Path::Amx } else { Path::F32 }
    }
}

/// `op` as a right-hand operand `[k, n]` on `path`, packed into `buf` on AMX.
///
/// # Safety
/// `op` covers `[k, n]`; on AMX, the CPU has it with the tiles granted (the backend chose it).
unsafe fn rhs(path: Path, buf: &mut amx::TileBuf, [k, n]: [usize; 2], op: Operand) -> Rhs<'_> {
    // SAFETY: as the caller promises.
    let packed = (path == Path::Amx).then(|| unsafe { amx::pack(buf, [k, n], op) });
    Rhs { f32: op, packed }
}

/// `dst[m, n] (+)= beta * lhs[m, k] rhs[k0..k0 + k, 0..n]` on the operand's path, on this
/// thread.
///
/// # Safety
/// As [`gemm_strided`], for `rhs` from row k0 on.
unsafe fn product(mnk: [usize; 3], dst: Dst, lhs: Operand, rhs: &Rhs, k0: usize) {
    unsafe {
        match &rhs.packed {
            None => {
                let from_k0 = Operand { ptr: rhs.f32.ptr.offset(k0 as isize * rhs.f32.rs), ..rhs.f32 };
                gemm_strided(mnk, dst, lhs, from_k0, false)
            }
            Some(packed) => amx::gemm_packed(mnk, dst, lhs, packed, k0),
        }
    }
}

const BLOCK: usize = 32;

// The order of a row's sums, by path: f32 keeps the sequential fold it always had (float32
// runs keep their bits); AMX, whose products already differ from f32, sums in 16 lanes (a
// fixed order, so runs stay deterministic) that vectorise, where a sequential sum waits on
// each add (1-2 ms of a ~300 ms bf16 step here, measured).

simd_fn! {
    /// Softmax over the first `live` entries of a score row, zeros after (the causal mask).
    fn softmax_causal(row: &mut [f32], live: usize, path: Path) {
        let (live, masked) = row.split_at_mut(live);
        let max = lanes_max(live);
        // exp in its own loop (it vectorises), then the sum (sequential: the bits of one fused
        // loop; or in lanes).
        for x in live.iter_mut() {
            *x = exp(*x - max);
        }
        let sum = match path {
            Path::F32 => live.iter().fold(0.0f32, |s, x| s + x),
            Path::Amx => lanes_dot(live, None),
        };
        let inv = 1.0 / sum;
        live.iter_mut().for_each(|x| *x *= inv);
        masked.fill(0.0);
    }
}

simd_fn! {
    /// `dS = P * (dP - rowsum(P * dP))` in place over `dp`'s first `live` entries, zeros after.
    fn softmax_causal_backward(p: &[f32], dp: &mut [f32], live: usize, path: Path) {
        let dot: f32 = match path {
            Path::F32 => p[..live].iter().zip(&dp[..live]).map(|(p, d)| p * d).sum(),
            Path::Amx => lanes_dot(&p[..live], Some(&dp[..live])),
        };
        for j in 0..live {
            dp[j] = p[j] * (dp[j] - dot);
        }
        dp[live..].fill(0.0);
    }
}

/// `sum(x * y)` (or `sum(x)`) in 16 lane sums over whole chunks, then the lanes and the rest
/// in order: one fixed order for a given length.
#[inline(always)]
fn lanes_dot(x: &[f32], y: Option<&[f32]>) -> f32 {
    let mut lanes = [0f32; 16];
    let whole = x.len() / 16 * 16;
    match y {
        None => x[..whole].chunks_exact(16).for_each(|c| (0..16).for_each(|i| lanes[i] += c[i])),
        Some(y) => x[..whole]
            .chunks_exact(16)
            .zip(y[..whole].chunks_exact(16))
            .for_each(|(a, b)| (0..16).for_each(|i| lanes[i] += a[i] * b[i])),
    }
    let rest = (whole..x.len()).map(|i| x[i] * y.map_or(1.0, |y| y[i]));
    lanes.iter().copied().chain(rest).fold(0.0, |s, v| s + v)
}

/// The largest of `x` (NEG_INFINITY when empty), 16 lanes at a time: max is exact in any
/// order, so this is the sequential fold's value, vectorised.
#[inline(always)]
fn lanes_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            lanes[i] = lanes[i].max(c[i]);
        }
    }
    chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max)
}

fn blocks(t: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..t).step_by(BLOCK).map(move |r0| (r0, (r0 + BLOCK).min(t)))
}

/// Scores and softmax of rows `r0..r1` of one (batch, head): `P[r0..r1, 0..r1]`, given the
/// head's `kt` = Kᵀ `[D, T]`.
///
/// # Safety
/// `pb` points at this head's `[T, T]` block; `qb` at its first query row (stride `hd`), all
/// in bounds for T rows.
unsafe fn probs_block(
    pb: *mut f32,
    qb: *const f32,
    kt: &Rhs,
    (r0, r1): (usize, usize),
    t: usize,
    s: AttnShape,
) {
    let hd = s.h * s.d;
    let scale = 1.0 / (s.d as f32).sqrt();
    let path = kt.path();
    unsafe {
        // S[r0..r1, 0..r1] = scale * q kᵀ
        product(
            [r1 - r0, r1, s.d],
            Dst::set(pb.add(r0 * t), t).with(scale, false),
            Operand::rows(qb.add(r0 * hd), hd),
            kt,
            0,
        );
        for i in r0..r1 {
            softmax_causal(std::slice::from_raw_parts_mut(pb.add(i * t), r1), i + 1, path);
        }
    }
}

/// `dst[s0..s1] (+)= beta * M[s0.., s0..s1]ᵀ x[s0..]` for one `[T, T]` block `M` that is
/// zero above its diagonal (so rows before s0 contribute nothing); `x` `[T, D]`; rows of
/// `dst` are `dst_rs` apart.
///
/// # Safety
/// `dst` addresses T rows of at least `d` columns, `m` the whole `[T, T]` block.
#[allow(clippy::too_many_arguments)]
unsafe fn tri_t_rows(
    dst: *mut f32,
    dst_rs: usize,
    m: *const f32,
    x: &Rhs,
    (s0, s1): (usize, usize),
    t: usize,
    d: usize,
    accumulate: bool,
    beta: f32,
) {
    unsafe {
        product(
            [s1 - s0, d, t - s0],
            Dst::set(dst.add(s0 * dst_rs), dst_rs).with(beta, accumulate),
            Operand::transposed(m.add(s0 * t + s0), t),
            x,
            s0,
        );
    }
}

fn check(q: &[f32], k: &[f32], probs: usize, s: AttnShape) {
    let AttnShape { b, t, h, g, d } = s;
    // AttnShape::new guarantees it; the unsafe blocks below rely on it.
    assert!(g > 0 && h.is_multiple_of(g), "attention heads");
    assert!(q.len() >= b * t * h * d && k.len() >= b * t * g * d, "attention q/k shape");
    assert!(probs >= b * h * t * t, "attention probs shape");
}

pub fn forward(out: &mut [f32], probs: &mut [f32], [q, k, v]: [&[f32]; 3], s: AttnShape, path: Path) {
    let AttnShape { b, t, h, g, d } = s;
    let (hd, gd) = (h * d, g * d);
    check(q, k, probs.len(), s);
    assert!(out.len() >= b * t * hd && v.len() >= b * t * gd, "attention out/v shape");
    let (outp, probp) = (SendPtr(out.as_mut_ptr()), SendPtr(probs.as_mut_ptr()));
    (0..b * h).into_par_iter().for_each(|bh| {
        let (bi, hi) = (bh / h, bh % h);
        let gi = hi / (h / g);
        // SAFETY: every pointer below stays inside the slices checked above; each task writes
        // only its own (batch, head) probability block and its own head's output columns.
        unsafe {
            let qb = q.as_ptr().add(bi * t * hd + hi * d);
            let kb = k.as_ptr().add(bi * t * gd + gi * d);
            let vb = v.as_ptr().add(bi * t * gd + gi * d);
            let pb = probp.get().add(bh * t * t);
            let ob = outp.get().add(bi * t * hd + hi * d);
            PACKED.with_borrow_mut(|[kbuf, vbuf, ..]| {
                let kt = rhs(path, kbuf, [d, t], Operand::transposed(kb, gd));
                let vr = rhs(path, vbuf, [t, d], Operand::rows(vb, gd));
                for (r0, r1) in blocks(t) {
                    probs_block(pb, qb, &kt, (r0, r1), t, s);
                    // out[r0..r1] = P[r0..r1, 0..r1] v[0..r1]
                    product(
                        [r1 - r0, d, r1],
                        Dst::set(ob.add(r0 * hd), hd),
                        Operand::rows(pb.add(r0 * t), t),
                        &vr,
                        0,
                    );
                }
            });
        }
    });
}

/// Recomputes the probabilities `forward` wrote, bit for bit, for a backward pass whose
/// forward did not keep them.
pub fn probs(probs: &mut [f32], q: &[f32], k: &[f32], s: AttnShape, path: Path) {
    let AttnShape { b, t, h, g, d } = s;
    let (hd, gd) = (h * d, g * d);
    check(q, k, probs.len(), s);
    let probp = SendPtr(probs.as_mut_ptr());
    (0..b * h).into_par_iter().for_each(|bh| {
        let (bi, hi) = (bh / h, bh % h);
        let gi = hi / (h / g);
        // SAFETY: as in `forward`; each task writes only its own (batch, head) block.
        unsafe {
            let qb = q.as_ptr().add(bi * t * hd + hi * d);
            let kb = k.as_ptr().add(bi * t * gd + gi * d);
            PACKED.with_borrow_mut(|[kbuf, ..]| {
                let kt = rhs(path, kbuf, [d, t], Operand::transposed(kb, gd));
                for (r0, r1) in blocks(t) {
                    probs_block(probp.get().add(bh * t * t), qb, &kt, (r0, r1), t, s);
                }
            });
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    scratch: &mut [f32],
    dout: &[f32],
    probs: &[f32],
    q: &[f32],
    k: &[f32],
    v: &[f32],
    s: AttnShape,
    path: Path,
) {
    let AttnShape { b, t, h, g, d } = s;
    let (hd, gd) = (h * d, g * d);
    assert!(g > 0 && h.is_multiple_of(g), "attention heads");
    assert!(dq.len() >= b * t * hd && dout.len() >= b * t * hd && q.len() >= b * t * hd);
    assert!(dk.len() >= b * t * gd && dv.len() >= b * t * gd);
    assert!(k.len() >= b * t * gd && v.len() >= b * t * gd);
    assert!(probs.len() >= b * h * t * t && scratch.len() >= b * h * t * t);
    let scale = 1.0 / (d as f32).sqrt();
    let per_group = h / g;
    let ptrs = (SendPtr(dq.as_mut_ptr()), SendPtr(dk.as_mut_ptr()), SendPtr(dv.as_mut_ptr()));
    let sp = SendPtr(scratch.as_mut_ptr());
    (0..b * g).into_par_iter().for_each(|bg| {
        let (bi, gi) = (bg / g, bg % g);
        // SAFETY: bounds checked above; this task writes dk/dv columns of its own kv head,
        // dq columns and scratch blocks of its own query heads.
        unsafe {
            let kb = k.as_ptr().add(bi * t * gd + gi * d);
            let vb = v.as_ptr().add(bi * t * gd + gi * d);
            let dkb = ptrs.1.get().add(bi * t * gd + gi * d);
            let dvb = ptrs.2.get().add(bi * t * gd + gi * d);
            PACKED.with_borrow_mut(|[vbuf, kbuf, qbuf, dobuf]| {
                // The group's Vᵀ and K serve each of its query heads.
                let vt = rhs(path, vbuf, [d, t], Operand::transposed(vb, gd));
                let kr = rhs(path, kbuf, [t, d], Operand::rows(kb, gd));
                for (n, hi) in (gi * per_group..(gi + 1) * per_group).enumerate() {
                    let first = n == 0;
                    let bh = bi * h + hi;
                    let qb = q.as_ptr().add(bi * t * hd + hi * d);
                    let dob = dout.as_ptr().add(bi * t * hd + hi * d);
                    let dqb = ptrs.0.get().add(bi * t * hd + hi * d);
                    let pb = probs.as_ptr().add(bh * t * t);
                    let db = sp.get().add(bh * t * t);
                    for (r0, r1) in blocks(t) {
                        let rows = r1 - r0;
                        // dP[r0..r1, 0..r1] = dO v^T
                        product(
                            [rows, r1, d],
                            Dst::set(db.add(r0 * t), t),
                            Operand::rows(dob.add(r0 * hd), hd),
                            &vt,
                            0,
                        );
                        // dS = P * (dP - rowsum(P * dP)), zero above the diagonal.
                        for i in r0..r1 {
                            let p = std::slice::from_raw_parts(pb.add(i * t), r1);
                            softmax_causal_backward(
                                p,
                                std::slice::from_raw_parts_mut(db.add(i * t), r1),
                                i + 1,
                                path,
                            );
                        }
                        // dq[r0..r1] = scale * dS k
                        let dq_dst = Dst::set(dqb.add(r0 * hd), hd).with(scale, false);
                        product([rows, d, r1], dq_dst, Operand::rows(db.add(r0 * t), t), &kr, 0);
                    }
                    // Column blocks: key rows s0..s1 gather from query rows s0..T (dS and P are
                    // lower triangular).
                    let qr = rhs(path, qbuf, [t, d], Operand::rows(qb, hd));
                    let dor = rhs(path, dobuf, [t, d], Operand::rows(dob, hd));
                    for (s0, s1) in blocks(t) {
                        // dk[s0..s1] (+)= scale * dS[s0.., s0..s1]ᵀ q[s0..]
                        tri_t_rows(dkb, gd, db, &qr, (s0, s1), t, d, !first, scale);
                        // dv[s0..s1] (+)= P[s0.., s0..s1]ᵀ dO[s0..]
                        tri_t_rows(dvb, gd, pb, &dor, (s0, s1), t, d, !first, 1.0);
                    }
                }
            });
        }
    });
}

/// One decoding step: query `q` `[H*D]` (the newest token) attends to the first `len` cached
/// positions of `k`/`v` `[positions, G*D]`; `out` `[H*D]`. One task per query head.
pub fn decode(out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], len: usize, s: AttnShape) {
    let AttnShape { h, g, d, .. } = s;
    assert!(g > 0 && h.is_multiple_of(g), "attention heads");
    let gd = g * d;
    assert!(q.len() >= h * d && out.len() >= h * d && k.len() >= len * gd && v.len() >= len * gd);
    let scale = 1.0 / (d as f32).sqrt();
    out.par_chunks_mut(d).take(h).enumerate().for_each(|(hi, o)| {
        let gi = hi / (h / g);
        let qh = &q[hi * d..(hi + 1) * d];
        let mut max = f32::NEG_INFINITY;
        let scores: Vec<f32> = (0..len)
            .map(|p| {
                let kr = &k[p * gd + gi * d..p * gd + (gi + 1) * d];
                let s = kr.iter().zip(qh).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(s);
                s
            })
            .collect();
        let weights: Vec<f32> = scores.iter().map(|s| exp(s - max)).collect();
        let sum: f32 = weights.iter().sum();
        o.fill(0.0);
        for (p, w) in weights.iter().enumerate() {
            let vr = &v[p * gd + gi * d..p * gd + (gi + 1) * d];
            o.iter_mut().zip(vr).for_each(|(o, v)| *o += w / sum * v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vectorised_softmax_keeps_the_sequential_bits() {
        // Before, one loop took exp and summed; now max and exp are vectorised and the sum
        // keeps its order: the same bits, so float32 runs are unchanged.
        let mut rng = crate::rng::SplitMix64::new(3);
        for len in [1, 15, 16, 17, 33, 256] {
            let row: Vec<f32> = (0..len + 5).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
            let mut want = row.clone();
            let (live, masked) = want.split_at_mut(len);
            let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for x in live.iter_mut() {
                *x = exp(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            live.iter_mut().for_each(|x| *x *= inv);
            masked.fill(0.0);
            let mut got = row.clone();
            softmax_causal(&mut got, len, Path::F32);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got), bits(&want), "row of {len}");
        }
    }

    #[test]
    fn the_bf16_paths_lane_sums_agree_with_the_sequential_ones() {
        // Another order of the same f32 sums: within a few ulps, and zeros past the diagonal.
        let mut rng = crate::rng::SplitMix64::new(5);
        for len in [1, 15, 16, 17, 33, 256] {
            let row: Vec<f32> = (0..len + 5).map(|_| rng.next_f32() * 20.0 - 10.0).collect();
            let (mut seq, mut lanes) = (row.clone(), row.clone());
            softmax_causal(&mut seq, len, Path::F32);
            softmax_causal(&mut lanes, len, Path::Amx);
            let dp: Vec<f32> = (0..len + 5).map(|_| rng.next_f32() - 0.5).collect();
            let (mut dseq, mut dlanes) = (dp.clone(), dp.clone());
            softmax_causal_backward(&seq, &mut dseq, len, Path::F32);
            softmax_causal_backward(&seq, &mut dlanes, len, Path::Amx);
            for (what, a, b) in [("softmax", &seq, &lanes), ("backward", &dseq, &dlanes)] {
                for (x, y) in a.iter().zip(b.iter()) {
                    assert!((x - y).abs() <= 1e-6 * (1.0 + x.abs()), "{what} of {len}: {x} vs {y}");
                }
                assert!(b[len..].iter().all(|&v| v == 0.0), "{what} of {len}: masked");
            }
        }
        assert_eq!(lanes_dot(&[1.0, 2.0, 3.0], Some(&[4.0, 5.0, 6.0])), 32.0);
    }
}
