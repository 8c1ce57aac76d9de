//! The CPU kernels: the readable reference implementation of [`Kernels`].
//!
//! Matrix products go to the `gemm` crate (AVX-512 micro-kernels, rayon across cores);
//! everything else is a rayon loop over rows. Every reduction is split into fixed-size pieces
//! summed in a fixed order, so results do not depend on the number of threads.

#![allow(clippy::needless_range_loop)] // index loops read like the maths

pub(crate) mod amx;
mod attention;
pub mod bf16;

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::{Arc, Mutex};

use gemm::Parallelism;
use rayon::prelude::*;

use super::kernels::{AdamW, AttnShape, Gemm, Kernels, Positions, Rotary, RouterConfig};
use super::moe::Routing;

/// Rows handed to one rayon task by row-wise kernels.
const ROWS_PER_TASK: usize = 16;
/// Elements per partial sum in reductions over flat buffers.
const SUM_CHUNK: usize = 1 << 15;

#[derive(Default)]
pub struct Cpu {
    /// Reused storage for partial sums (no allocation per step).
    partials: Mutex<Vec<f64>>,
    /// Reused bitmap of rows already written by `spread_rows`.
    seen: Mutex<Vec<u64>>,
    /// Per-kernel wall time, when profiling.
    profile: Option<Mutex<BTreeMap<String, KernelTime>>>,
    /// How the linear layers' and the head's products run: f32 (the `gemm` crate), or a bf16
    /// path (inputs rounded to bf16 while packed, f32 sums: mixed precision as PyTorch's
    /// autocast; weights, activations and everything else stay f32).
    products: bf16::Isa,
    /// The bf16 products' weights, packed once per write of the weights.
    panels: Mutex<WeightPanels>,
    /// Every product packs its weight anew, none kept (tests compare the two).
    pack_anew: bool,
}

/// The bf16 products' packed weights, the bf16 copy of the weights the products read (#21):
/// a weight in a layout a product reads it in (the forward's, the input gradient's), rounded
/// to bf16 and laid out in the kernel's panels. The engine tells of every write
/// ([`Kernels::weights_written`]: set, loaded, broadcast, stepped by AdamW).
///
/// A weight read more than once between two writes (the micro-batches of an accumulated step,
/// the head's chunks of rows, decoding's tokens) is kept: its second product packs its panels
/// and later ones read them as they are. At the next write the kept panels of every weight
/// read more than once since the last are rewritten from the new weights in the update (as
/// AdamW's pass rewrites the bf16 copy in PyTorch's mixed precision), so from then on every
/// micro-batch reads them. A weight read once per write (one micro-batch a step) packs into the
/// product's own small buffer instead: rewriting its ~100 MB of panels (MiniMind2-small) in the
/// update costs 15 ms a step that packing inside the product hides (a dense bf16 step 2.7%
/// slower, measured).
#[derive(Default)]
struct WeightPanels {
    /// The weights' bytes, as addresses (empty until the engine tells).
    span: Range<usize>,
    /// Writes so far: panels packed under an older count are stale.
    writes: u64,
    kept: HashMap<PanelKey, Arc<Mutex<Panels>>>,
}

/// A weight as one product reads it: where, at which strides, how much.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PanelKey {
    ptr: usize,
    rs: isize,
    cs: isize,
    k: usize,
    n: usize,
}

/// A weight's panels, every k block back to back, and the write count they were packed under
/// (none yet: never packed); the write count of its latest reads and how many products read
/// it under that count. At most two layouts of every weight: 4 bytes a parameter, as
/// `cost::memory` counts them.
#[derive(Default)]
struct Panels {
    buf: amx::TileBuf,
    packed_under: Option<u64>,
    read_under: Option<u64>,
    reads: u64,
    /// Products that read the panels as kept (tests count them).
    reuses: u64,
}

/// A product's right-hand operand kept packed across products: `fresh` when `buf` holds it
/// packed as the product packs it, else the product packs it there (and its caller then
/// marks it fresh).
pub(crate) struct RhsCache<'a> {
    pub buf: &'a mut amx::TileBuf,
    pub fresh: bool,
}

/// Runs a bf16 product's k blocks in order, `product(panels, pack, block)` each: `panels`,
/// `len(block)` u32, is the block's share of the kept `cache` (every block back to back;
/// to pack unless fresh), or else this thread's buffer in `own` (always to pack), taken,
/// not borrowed, across the product's parallel loop (see [`with_taken`]).
pub(crate) fn each_k_block<B: Copy>(
    cache: Option<RhsCache>,
    own: &'static std::thread::LocalKey<std::cell::RefCell<amx::TileBuf>>,
    blocks: impl Iterator<Item = B> + Clone,
    len: impl Fn(B) -> usize,
    mut product: impl FnMut(&mut [u32], bool, B),
) {
    match cache {
        Some(RhsCache { buf, fresh }) => {
            let mut rest = buf.overwritten_u32(blocks.clone().map(&len).sum());
            for b in blocks {
                let (panels, tail) = std::mem::take(&mut rest).split_at_mut(len(b));
                rest = tail;
                product(panels, !fresh, b);
            }
        }
        None => with_taken(own, |buf| {
            for b in blocks {
                product(buf.overwritten_u32(len(b)), true, b);
            }
        }),
    }
}

/// Runs `run(i0, rows)` over `m` rows in blocks of `mc` (the last shorter), on the rayon pool
/// when `parallel` and there are several.
pub(crate) fn each_row_block(m: usize, mc: usize, parallel: bool, run: impl Fn(usize, usize) + Sync + Send) {
    let blocks = m.div_ceil(mc);
    let one = |bi: usize| run(bi * mc, mc.min(m - bi * mc));
    if parallel && blocks > 1 {
        (0..blocks).into_par_iter().for_each(one);
    } else {
        (0..blocks).for_each(one);
    }
}

pub use super::kernels::KernelTime;

impl Cpu {
    pub fn new() -> Cpu {
        Cpu::default()
    }

    /// A CPU backend that times every kernel call (for `minimind bench --profile`).
    pub fn profiled() -> Cpu {
        Cpu { profile: Some(Mutex::new(BTreeMap::new())), ..Cpu::default() }
    }

    /// The same backend with its matrix products on `path` (see [`bf16`]).
    pub fn with_products(self, path: bf16::Isa) -> Cpu {
        // Panels kept on another path are in its layout.
        Cpu { products: path, panels: Mutex::default(), ..self }
    }

    /// The same backend packing every product's weight anew (no kept panels): what the
    /// kept panels must equal bit for bit.
    pub fn without_kept_panels(self) -> Cpu {
        Cpu { pack_anew: true, ..self }
    }

    /// The panels kept for a bf16 product's right-hand operand `b` read as `rhs` over
    /// `[k, n]` when it lies inside the weights, with the write count they are fresh under.
    fn kept_panels(&self, b: &[f32], rhs: Operand, [k, n]: [usize; 2]) -> Option<(Arc<Mutex<Panels>>, u64)> {
        if self.pack_anew || self.products == bf16::Isa::F32 {
            return None;
        }
        let mut w = self.panels.lock().unwrap_or_else(|e| e.into_inner());
        let start = b.as_ptr() as usize;
        if w.span.is_empty() || start < w.span.start || start + std::mem::size_of_val(b) > w.span.end {
            return None;
        }
        let writes = w.writes;
        let key = PanelKey { ptr: start, rs: rhs.rs, cs: rhs.cs, k, n };
        Some((w.kept.entry(key).or_default().clone(), writes))
    }

    /// Whether RMSNorm's backward sums its rows in lanes (see `rmsnorm_gx`): in bf16 runs.
    fn lane_sums(&self) -> bool {
        self.products != bf16::Isa::F32
    }

    fn timed<R>(&self, name: impl FnOnce() -> String, flops: f64, f: impl FnOnce() -> R) -> R {
        let Some(p) = &self.profile else { return f() };
        let start = std::time::Instant::now();
        let r = f();
        let dt = start.elapsed().as_secs_f64();
        let mut p = p.lock().unwrap_or_else(|e| e.into_inner());
        let e = p.entry(name()).or_default();
        e.calls += 1;
        e.seconds += dt;
        e.flops += flops;
        r
    }
}

/// `e^x` in f32 to about 1 ulp, written so loops over it vectorise (libm's `expf` does not):
/// range reduction by ln 2 in two parts, a degree-7 polynomial, the exponent by bits.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.3, 88.0);
    // Round to nearest by the 1.5 * 2^23 trick (no libm call, so the loop vectorises): the
    // sum's low mantissa bits hold n as an integer.
    const MAGIC: f32 = 12_582_912.0;
    let shifted = x * LOG2E + MAGIC;
    let n = shifted - MAGIC;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // e^r on |r| <= ln2/2: Taylor to r^7 (truncation < 2e-9 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n from those bits: `n as i32` would be the same value for every integral n here, but
    // Rust's saturating cast compiles to scalar code with branches and kept this loop (and
    // every softmax, SwiGLU and loss over it) from vectorising.
    let scale = f32::from_bits(shifted.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    p * scale
}

/// Defines a function whose body is compiled twice, for the baseline (SSE2) and for AVX2 +
/// FMA, picked at run time: the plain loops inside vectorise 8 wide where the CPU allows.
/// Without `mul_add` nothing is contracted to FMA, so both give the same bits.
macro_rules! simd_fn {
    ($(#[$m:meta])* fn $name:ident($($a:ident: $t:ty),* $(,)?) $(-> $r:ty)? $body:block) => {
        $(#[$m])*
        fn $name($($a: $t),*) $(-> $r)? {
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($a: $t),*) $(-> $r)? $body
            fn base($($a: $t),*) $(-> $r)? $body
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the features were just detected.
                unsafe { avx2($($a),*) }
            } else {
                base($($a),*)
            }
        }
    };
}
pub(crate) use simd_fn;

simd_fn! {
    /// RMSNorm forward over whole rows of width `c`.
    fn rmsnorm_rows(y: &mut [f32], r: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
        for ((y, r), x) in y.chunks_mut(c).zip(r.iter_mut()).zip(x.chunks(c)) {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let s = 1.0 / (ms + eps).sqrt();
            *r = s;
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = w * (x * s);
            }
        }
    }
}

simd_fn! {
    /// `sum_j dy w x` over one row, for RMSNorm's backward. float32 keeps the sequential fold
    /// it always had (its runs keep their bits); a bf16 run, whose products already differ
    /// from f32, sums in 16 lanes (one fixed order for a given length, so runs stay
    /// deterministic) that vectorise, where the fold waits on each add (rmsnorm_backward
    /// 14.6 -> 11.9 ms a bf16 step here, `bench --profile`).
    fn rmsnorm_gx(dy: &[f32], w: &[f32], x: &[f32], lanes: bool) -> f32 {
        if !lanes {
            return dy.iter().zip(w).zip(x).map(|((d, w), x)| d * w * x).sum();
        }
        let mut acc = [0f32; 16];
        let whole = dy.len() / 16 * 16;
        let rows = dy[..whole].chunks_exact(16).zip(w[..whole].chunks_exact(16)).zip(x[..whole].chunks_exact(16));
        for ((d, w), x) in rows {
            for i in 0..16 {
                acc[i] += d[i] * w[i] * x[i];
            }
        }
        let rest = (whole..dy.len()).map(|i| dy[i] * w[i] * x[i]);
        acc.iter().copied().chain(rest).fold(0.0, |s, v| s + v)
    }
}

simd_fn! {
    /// `sum += x`, then RMSNorm of the sums over whole rows of width `w.len()`.
    fn add_rmsnorm_rows(y: &mut [f32], r: &mut [f32], sum: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
        sum.iter_mut().zip(x).for_each(|(s, x)| *s += x);
        rmsnorm_rows(y, r, sum, w, w.len(), eps);
    }
}

simd_fn! {
    /// RMSNorm's backward into `dx` (added) over whole rows of width `w.len()`, `r` their
    /// reciprocal RMS: `dx += r w dy - r³ (sum dy w x) / C x`.
    fn rmsnorm_dx_rows(dx: &mut [f32], dy: &[f32], x: &[f32], w: &[f32], r: &[f32], lanes: bool) {
        let c = w.len();
        for (((dx, dy), x), &r) in dx.chunks_mut(c).zip(dy.chunks(c)).zip(x.chunks(c)).zip(r) {
            let gx = rmsnorm_gx(dy, w, x, lanes);
            let k = r * r * r * gx / c as f32;
            for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                *dx += r * w * dy - k * x;
            }
        }
    }
}

simd_fn! {
    /// RMSNorm's weight gradient for columns `c0..c0 + dw.len()` (added): every row's
    /// `dy x r`, the rows in order.
    fn rmsnorm_dw_columns(dw: &mut [f32], c0: usize, dy: &[f32], x: &[f32], rstd: &[f32], c: usize) {
        for (n, &r) in rstd.iter().enumerate() {
            let base = n * c + c0;
            let (dy, x) = (&dy[base..base + dw.len()], &x[base..base + dw.len()]);
            for ((d, dy), x) in dw.iter_mut().zip(dy).zip(x) {
                *d += dy * x * r;
            }
        }
    }
}

simd_fn! {
    /// `a = silu(g) * u` for rows of `gu = [g | u]`.
    fn swiglu_rows(a: &mut [f32], gu: &[f32], i: usize) {
        for (a, gu) in a.chunks_mut(i).zip(gu.chunks(2 * i)) {
            let (g, u) = gu.split_at(i);
            for ((a, &g), &u) in a.iter_mut().zip(g).zip(u) {
                *a = g / (1.0 + exp(-g)) * u;
            }
        }
    }
}

simd_fn! {
    /// `[dg | du]` rows from `da` and `[g | u]`.
    fn swiglu_back_rows(dgu: &mut [f32], da: &[f32], gu: &[f32], i: usize) {
        for ((dgu, da), gu) in dgu.chunks_mut(2 * i).zip(da.chunks(i)).zip(gu.chunks(2 * i)) {
            let (dg, du) = dgu.split_at_mut(i);
            let (g, u) = gu.split_at(i);
            for j in 0..i {
                let sig = 1.0 / (1.0 + exp(-g[j]));
                du[j] = da[j] * g[j] * sig;
                dg[j] = da[j] * u[j] * sig * (1.0 + g[j] * (1.0 - sig));
            }
        }
    }
}

simd_fn! {
    /// RoPE over the heads of one row: each pair (j, j + half) rotated by the row's position
    /// (`cs`, `sn`), or by its inverse.
    fn rope_row(row: &mut [f32], cs: &[f32], sn: &[f32], half: usize, inverse: bool) {
        for v in row.chunks_mut(2 * half) {
            let (lo, hi) = v.split_at_mut(half);
            for j in 0..half {
                let (a, b) = (lo[j], hi[j]);
                if inverse {
                    lo[j] = a * cs[j] + b * sn[half + j];
                    hi[j] = b * cs[half + j] - a * sn[j];
                } else {
                    lo[j] = a * cs[j] - b * sn[j];
                    hi[j] = b * cs[half + j] + a * sn[half + j];
                }
            }
        }
    }
}

simd_fn! {
    /// The sum of squares of `x` in f64, eight partial sums (lane i takes every eighth value
    /// from i) added at the end.
    fn sum_squares_chunk(x: &[f32]) -> f64 {
        let mut lanes = [0.0f64; 8];
        // Whole chunks by index (they vectorise), then the partial one: the same order.
        let mut whole = x.chunks_exact(8);
        for c in &mut whole {
            for i in 0..8 {
                lanes[i] += (c[i] as f64) * (c[i] as f64);
            }
        }
        for (l, &v) in lanes.iter_mut().zip(whole.remainder()) {
            *l += (v as f64) * (v as f64);
        }
        lanes.iter().sum()
    }
}

simd_fn! {
    /// [`sum_squares_chunk`] of four chunks of one length, side by side: each chunk's lanes
    /// take its values in the same order, so the four sums are that function's bits. One
    /// stream's loads wait on memory (a step's gradients are cold); four a core reads side by
    /// side fetch more at once (26M values: 6.0 -> 4.3 ms on this machine's two cores, in a
    /// C probe of both loops).
    fn sum_squares_4(x: [&[f32]; 4]) -> [f64; 4] {
        let n = x[0].len();
        assert!(x.iter().all(|c| c.len() == n), "four chunks of one length");
        let mut lanes = [[0.0f64; 8]; 4];
        let whole = n / 8 * 8;
        let [a, b, c, d] = x.map(|c| c[..whole].chunks_exact(8));
        for (((a, b), c), d) in a.zip(b).zip(c).zip(d) {
            for (lanes, v) in lanes.iter_mut().zip([a, b, c, d]) {
                for i in 0..8 {
                    lanes[i] += (v[i] as f64) * (v[i] as f64);
                }
            }
        }
        let mut out = [0.0; 4];
        for ((o, lanes), c) in out.iter_mut().zip(&mut lanes).zip(x) {
            for (l, &v) in lanes.iter_mut().zip(&c[whole..]) {
                *l += (v as f64) * (v as f64);
            }
            *o = lanes.iter().sum();
        }
        out
    }
}

simd_fn! {
    /// One row of cross-entropy in place: returns the loss, leaves `scale * (p - onehot)`.
    fn cross_entropy_row(z: &mut [f32], t: usize, scale: f32) -> f32 {
        let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let zt = (z[t] - max) as f64;
        for v in z.iter_mut() {
            *v = exp(*v - max);
        }
        // Eight partial sums in f64: vectorises, and exact enough for V = 6400.
        let mut lanes = [0.0f64; 8];
        for c in z.chunks(8) {
            for (l, v) in lanes.iter_mut().zip(c) {
                *l += *v as f64;
            }
        }
        let sum: f64 = lanes.iter().sum();
        let inv = (1.0 / sum) as f32 * scale;
        z.iter_mut().for_each(|v| *v *= inv);
        z[t] -= scale;
        // logsumexp(z) - z[t] = ln(sum) - (z[t] - max)
        (sum.ln() - zt) as f32
    }
}

simd_fn! {
    /// AdamW over one chunk (see `Kernels::adamw`); `c = [step_size, bc2_sqrt, decay,
    /// grad_scale]`.
    fn adamw_chunk(p: &mut [f32], g: &mut [f32], m: &mut [f32], v: &mut [f32], h: AdamW, c: [f32; 4]) {
        let [step_size, bc2_sqrt, decay, grad_scale] = c;
        let (b1, b2) = (h.beta1, h.beta2);
        for i in 0..p.len() {
            let g = std::mem::take(&mut g[i]) * grad_scale;
            p[i] *= decay;
            m[i] += (1.0 - b1) * (g - m[i]);
            v[i] = b2 * v[i] + (1.0 - b2) * g * g;
            let denom = v[i].sqrt() / bc2_sqrt + h.eps;
            p[i] -= step_size * m[i] / denom;
        }
    }
}

/// A raw pointer that may cross into rayon tasks; each task writes a disjoint part.
pub(crate) struct SendPtr<T = f32>(pub *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
// By hand: derived, they would ask `T: Clone`/`T: Copy`, which a pointer does not need.
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer; a method, so closures capture the whole (Send) wrapper.
    pub fn get(self) -> *mut T {
        self.0
    }
}

/// Runs `f` with this thread's buffer in `cell` taken out for the call, not borrowed: a
/// thread that waits inside `f`'s parallel loop may run another rayon task meanwhile, and a
/// product in that task then packs into a fresh buffer of its own where a second borrow of
/// the cell would panic. The buffer goes back afterwards (steady state allocates nothing).
pub(crate) fn with_taken<T: Default, R>(
    cell: &'static std::thread::LocalKey<std::cell::RefCell<T>>,
    f: impl FnOnce(&mut T) -> R,
) -> R {
    let mut buf = cell.with(|c| c.take());
    let out = f(&mut buf);
    cell.with(|c| c.replace(buf));
    out
}

thread_local! {
    static IN_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while this thread is inside the `gemm` crate, which allocates its packing buffers
/// per call: lets a test check that everything else in a training step is allocation-free.
#[doc(hidden)]
pub fn in_gemm() -> bool {
    IN_GEMM.with(|c| c.get())
}

/// One input of a matrix product: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub ptr: *const f32,
    pub rs: isize,
    pub cs: isize,
}

impl Operand {
    /// A row-major matrix whose rows are `ld` elements apart.
    pub fn rows(ptr: *const f32, ld: usize) -> Operand {
        Operand { ptr, rs: ld as isize, cs: 1 }
    }

    /// The transpose of a row-major matrix whose rows are `ld` elements apart.
    pub fn transposed(ptr: *const f32, ld: usize) -> Operand {
        Operand { ptr, rs: 1, cs: ld as isize }
    }
}

/// The output of a matrix product, row-major with rows `ld` elements apart:
/// `dst (+)= beta * lhs rhs` (added with `accumulate`).
#[derive(Clone, Copy)]
pub(crate) struct Dst {
    pub ptr: *mut f32,
    pub ld: usize,
    pub accumulate: bool,
    pub beta: f32,
}

impl Dst {
    /// `dst = lhs rhs`, rows `ld` apart.
    pub fn set(ptr: *mut f32, ld: usize) -> Dst {
        Dst { ptr, ld, accumulate: false, beta: 1.0 }
    }

    /// The same output, scaled by `beta` and added with `accumulate`.
    pub fn with(self, beta: f32, accumulate: bool) -> Dst {
        Dst { beta, accumulate, ..self }
    }
}

/// `dst[m, n] (+)= beta * lhs[m, k] rhs[k, n]` over strided matrices, on the rayon pool when
/// `parallel`.
///
/// # Safety
/// The pointers must cover the strided extents and `dst` must not alias the inputs.
pub(crate) unsafe fn gemm_strided(
    [m, n, k]: [usize; 3],
    dst: Dst,
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let par = if parallel { Parallelism::Rayon(0) } else { Parallelism::None };
    let (ptr, ld, accumulate, beta) = (dst.ptr, dst.ld as isize, dst.accumulate, dst.beta);
    IN_GEMM.with(|c| c.set(true));
    unsafe {
        gemm::gemm(
            m, n, k, ptr, 1, ld, accumulate, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 1.0, beta,
            false, false, false, par,
        );
    }
    IN_GEMM.with(|c| c.set(false));
}

impl Cpu {
    /// Packs again, from the weights as they are now and fresh under the current write count,
    /// every kept weight that products read more than once under write count `last`: the bits
    /// the weight's next product would pack (the same packing routine, run as a product of no
    /// rows). The others stay stale (packed again at their second read, if any).
    fn rewrite_panels(&self, w: &WeightPanels, last: u64) {
        for (key, panels) in &w.kept {
            let mut p = panels.lock().unwrap_or_else(|e| e.into_inner());
            if p.packed_under.is_none() || p.read_under != Some(last) || p.reads < 2 {
                continue;
            }
            let rhs = Operand { ptr: key.ptr as *const f32, rs: key.rs, cs: key.cs };
            // No rows: neither read nor written.
            let (dst, lhs) =
                (Dst::set(std::ptr::null_mut(), key.n), Operand { ptr: std::ptr::null(), rs: 0, cs: 0 });
            let cache = Some(RhsCache { buf: &mut p.buf, fresh: false });
            // SAFETY: the key was made by a product over `[k, n]` of a slice inside `w.span`,
            // and `weights_written` clears the keys whenever the span moves, so the weights
            // still cover it; the path is the one that packed it, chosen where the CPU runs it.
            unsafe {
                match self.products {
                    bf16::Isa::F32 => continue,
                    bf16::Isa::Avx512Bf16 => bf16::gemm([0, key.n, key.k], dst, lhs, rhs, true, cache),
                    bf16::Isa::Amx => amx::gemm([0, key.n, key.k], dst, lhs, rhs, true, cache),
                }
            }
            p.packed_under = Some(w.writes);
        }
    }

    /// The sum of squares of `x`: [`sum_squares_chunk`] of each `SUM_CHUNK` piece, the pieces
    /// added in order (a fixed order, whatever the threads). Each task takes four whole pieces
    /// with [`sum_squares_4`] (the same bits), the group of a shorter last piece one at a time.
    fn sum_squares(&self, x: &[f32]) -> f64 {
        let chunks = x.len().div_ceil(SUM_CHUNK);
        let piece = |i: usize| &x[i * SUM_CHUNK..((i + 1) * SUM_CHUNK).min(x.len())];
        let mut partials = self.partials.lock().unwrap_or_else(|e| e.into_inner());
        partials.clear();
        partials.resize(chunks, 0.0);
        partials.par_chunks_mut(4).enumerate().for_each(|(g, out)| {
            let first = 4 * g;
            if out.len() == 4 && piece(first + 3).len() == SUM_CHUNK {
                out.copy_from_slice(&sum_squares_4([0, 1, 2, 3].map(|j| piece(first + j))));
            } else {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = sum_squares_chunk(piece(first + j));
                }
            }
        });
        partials.iter().sum()
    }
}

impl Kernels for Cpu {
    fn dtype(&self) -> crate::config::Dtype {
        crate::config::Dtype::Float32
    }

    fn describe(&self) -> String {
        format!("CPU ({} threads)", rayon::current_num_threads())
    }

    /// The recorded times, largest first.
    fn profile(&self) -> Vec<(String, KernelTime)> {
        let Some(p) = &self.profile else {
            return Vec::new();
        };
        let mut v: Vec<_> = p.lock().unwrap_or_else(|e| e.into_inner()).clone().into_iter().collect();
        v.sort_by(|a, b| b.1.seconds.total_cmp(&a.1.seconds));
        v
    }

    fn reset_profile(&self) {
        if let Some(p) = &self.profile {
            p.lock().unwrap_or_else(|e| e.into_inner()).clear();
        }
    }

    type Buf = Vec<f32>;
    type Idx = Vec<i32>;
    type Acc = Vec<f64>;
    type Route = Routing;
    /// The forward's probabilities `[B, H, T, T]` when kept, else none (backward recomputes
    /// them into the scratch).
    type Attn = Option<Vec<f32>>;
    type V<'a> = &'a [f32];
    type M<'a> = &'a mut [f32];
    type I<'a> = &'a [i32];

    fn alloc(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn host_floats<'a>(&self, buf: &'a mut Vec<f32>) -> Option<&'a mut [f32]> {
        Some(buf.as_mut_slice())
    }
    fn weights_written(&self, params: &Vec<f32>) {
        let mut w = self.panels.lock().unwrap_or_else(|e| e.into_inner());
        let start = params.as_ptr() as usize;
        let span = start..start + std::mem::size_of_val(params.as_slice());
        if w.span != span {
            // Keys name addresses inside the weights they were read from: another buffer's are
            // neither its weights nor safe to read.
            w.kept.clear();
            w.span = span;
        }
        w.writes += 1;
        if !w.kept.is_empty() {
            self.timed(|| "bf16 weight copy".to_string(), 0.0, || self.rewrite_panels(&w, w.writes - 1));
        }
    }
    fn view<'a>(&self, buf: &'a Vec<f32>, r: Range<usize>) -> &'a [f32] {
        &buf[r]
    }
    fn view_mut<'a>(&self, buf: &'a mut Vec<f32>, r: Range<usize>) -> &'a mut [f32] {
        &mut buf[r]
    }
    fn upload(&self, dst: &mut [f32], data: &[f32]) {
        self.timed(|| "upload".to_string(), 0.0, || dst.copy_from_slice(data))
    }
    fn download(&self, src: &[f32], out: &mut [f32]) {
        self.timed(|| "download".to_string(), 0.0, || out.copy_from_slice(src))
    }

    fn alloc_idx(&self, len: usize) -> Vec<i32> {
        vec![0; len]
    }
    fn idx<'a>(&self, buf: &'a Vec<i32>, r: Range<usize>) -> &'a [i32] {
        &buf[r]
    }
    fn upload_idx(&self, dst: &mut Vec<i32>, data: &[i32]) {
        dst[..data.len()].copy_from_slice(data);
    }

    fn alloc_acc(&self, len: usize) -> Vec<f64> {
        vec![0.0; len]
    }
    fn read_acc(&self, acc: &Vec<f64>, out: &mut [f64]) {
        out.copy_from_slice(&acc[..out.len()]);
    }
    fn zero_acc(&self, acc: &mut Vec<f64>, slots: Range<usize>) {
        acc[slots].fill(0.0);
    }
    fn fold_acc(&self, acc: &mut Vec<f64>, src: usize, dst: usize, div1: f64, div2: f64) {
        acc[dst] += acc[src] / div1 / div2;
    }

    fn new_route(&self) -> Routing {
        Routing::default()
    }
    fn new_attn(&self, s: AttnShape, keep: bool) -> Option<Vec<f32>> {
        keep.then(|| vec![0.0; s.b * s.h * s.t * s.t])
    }
    fn attn_scratch_len(&self, s: AttnShape, keep: bool) -> usize {
        // Backward's dS, and the recomputed probabilities when they were not kept.
        let probs = s.b * s.h * s.t * s.t;
        if keep { probs } else { 2 * probs }
    }

    fn fill(&self, out: &mut [f32], value: f32) {
        self.timed(
            || "fill".to_string(),
            0.0,
            || {
                out.par_chunks_mut(SUM_CHUNK).for_each(|c| c.fill(value));
            },
        )
    }
    fn add(&self, out: &mut [f32], x: &[f32]) {
        self.timed(
            || "add".to_string(),
            0.0,
            || {
                out.par_chunks_mut(SUM_CHUNK)
                    .zip(x.par_chunks(SUM_CHUNK))
                    .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o += x));
            },
        )
    }
    fn cast(&self, out: &mut [f32], x: &[f32]) {
        out.copy_from_slice(x);
    }
    fn matmul(&self, out: &mut [f32], a: &[f32], b: &[f32], g: Gemm) {
        let Gemm { rows: m, cols: n, depth: k, a_transposed: ta, b_transposed: tb, accumulate } = g;
        let path = self.products;
        self.timed(
            || {
                let bf = if path == bf16::Isa::F32 { String::new() } else { format!(" {}", path.name()) };
                format!(
                    "matmul {m}x{n}x{k}{}{}{bf}",
                    if ta { " ta" } else { "" },
                    if tb { " tb" } else { "" }
                )
            },
            g.flops(),
            || {
                assert!(out.len() >= m * n && a.len() >= m * k && b.len() >= k * n, "matmul shapes");
                let (a_rs, a_cs) = if ta { (1, m as isize) } else { (k as isize, 1) };
                let (b_rs, b_cs) = if tb { (1, k as isize) } else { (n as isize, 1) };
                let lhs = Operand { ptr: a.as_ptr(), rs: a_rs, cs: a_cs };
                let rhs = Operand { ptr: b.as_ptr(), rs: b_rs, cs: b_cs };
                let dst = Dst::set(out.as_mut_ptr(), n).with(1.0, accumulate);
                // A weight's kept panels; busy (a product on another thread packs them), this
                // one packs its own rather than wait.
                let kept = if m > 0 && n > 0 { self.kept_panels(b, rhs, [k, n]) } else { None };
                let mut held = kept.as_ref().and_then(|(p, under)| Some((p.try_lock().ok()?, *under)));
                if let Some((p, under)) = &mut held {
                    if p.read_under.replace(*under) != Some(*under) {
                        p.reads = 0;
                    }
                    p.reads += 1;
                    if p.reads == 1 && p.packed_under != Some(*under) {
                        held = None; // the first read under this write, none rewritten for it
                    }
                }
                let cache = held.as_mut().map(|(p, under)| {
                    let fresh = p.packed_under == Some(*under);
                    p.reuses += fresh as u64;
                    RhsCache { fresh, buf: &mut p.buf }
                });
                // SAFETY: the asserts above bound every strided access; `out` is a distinct &mut;
                // a bf16 path was chosen only where the CPU runs it (`bf16::isa`); kept panels
                // are fresh only when packed from these weights since their last write.
                unsafe {
                    match path {
                        bf16::Isa::F32 => gemm_strided([m, n, k], dst, lhs, rhs, true),
                        bf16::Isa::Avx512Bf16 => bf16::gemm([m, n, k], dst, lhs, rhs, true, cache),
                        bf16::Isa::Amx => amx::gemm([m, n, k], dst, lhs, rhs, true, cache),
                    }
                }
                if let Some((p, under)) = held.as_mut() {
                    p.packed_under = Some(*under);
                }
            },
        )
    }

    fn embed_forward(&self, out: &mut [f32], emb: &[f32], ids: &[i32], c: usize) {
        self.timed(
            || "embed_forward".to_string(),
            0.0,
            || {
                out.par_chunks_mut(c).zip(ids.par_iter()).for_each(|(row, &id)| {
                    let id = id as usize;
                    row.copy_from_slice(&emb[id * c..(id + 1) * c]);
                });
            },
        )
    }

    fn embed_backward(&self, demb: &mut [f32], dout: &[f32], ids: &[i32], c: usize) {
        self.timed(
            || "embed_backward".to_string(),
            0.0,
            || {
                for (n, &id) in ids.iter().enumerate() {
                    let id = id as usize;
                    let dst = &mut demb[id * c..(id + 1) * c];
                    dst.iter_mut().zip(&dout[n * c..(n + 1) * c]).for_each(|(d, g)| *d += g);
                }
            },
        )
    }

    fn rmsnorm_forward(&self, y: &mut [f32], rstd: &mut [f32], x: &[f32], w: &[f32], c: usize, eps: f32) {
        self.timed(
            || "rmsnorm_forward".to_string(),
            0.0,
            || {
                y.par_chunks_mut(c * ROWS_PER_TASK)
                    .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
                    .zip(x.par_chunks(c * ROWS_PER_TASK))
                    .for_each(|((y, r), x)| rmsnorm_rows(y, r, x, w, c, eps));
            },
        )
    }

    fn add_rmsnorm_forward(
        &self,
        y: &mut [f32],
        rstd: &mut [f32],
        sum: &mut [f32],
        x: &[f32],
        w: &[f32],
        c: usize,
        eps: f32,
    ) {
        self.timed(
            || "add_rmsnorm_forward".to_string(),
            0.0,
            || {
                debug_assert_eq!(w.len(), c, "the norm's weight is a row");
                y.par_chunks_mut(c * ROWS_PER_TASK)
                    .zip(rstd.par_chunks_mut(ROWS_PER_TASK))
                    .zip(sum.par_chunks_mut(c * ROWS_PER_TASK).zip(x.par_chunks(c * ROWS_PER_TASK)))
                    .for_each(|((y, r), (sum, x))| add_rmsnorm_rows(y, r, sum, x, w, eps));
            },
        )
    }

    fn rmsnorm_backward(
        &self,
        dx: &mut [f32],
        act: Option<&mut [f32]>,
        dw: &mut [f32],
        dy: &[f32],
        x: &[f32],
        w: &[f32],
        rstd: &[f32],
        c: usize,
    ) {
        let lanes = self.lane_sums();
        self.timed(
            || "rmsnorm_backward".to_string(),
            0.0,
            || {
                debug_assert_eq!(w.len(), c, "the norm's weight is a row");
                dx.par_chunks_mut(c * ROWS_PER_TASK)
                    .zip(dy.par_chunks(c * ROWS_PER_TASK))
                    .zip(x.par_chunks(c * ROWS_PER_TASK))
                    .zip(rstd.par_chunks(ROWS_PER_TASK))
                    .for_each(|(((dx, dy), x), r)| rmsnorm_dx_rows(dx, dy, x, w, r, lanes));
                // The activations are f32 here: the copy is the values (no run asks for one).
                if let Some(act) = act {
                    act.copy_from_slice(dx);
                }
                // dw by column blocks: each task owns its columns and walks the rows in order.
                let rows = rstd.len();
                dw.par_chunks_mut(64)
                    .enumerate()
                    .for_each(|(blk, dw)| rmsnorm_dw_columns(dw, blk * 64, dy, x, &rstd[..rows], c));
            },
        )
    }

    fn rope(
        &self,
        x: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        pos: Positions,
        heads: usize,
        d: usize,
        inverse: bool,
    ) {
        self.timed(
            || "rope".to_string(),
            0.0,
            || {
                let half = d / 2;
                let width = heads * d;
                x.par_chunks_mut(width).enumerate().for_each(|(n, row)| {
                    let p = pos.of(n);
                    let (cs, sn) = (&cos[p * d..(p + 1) * d], &sin[p * d..(p + 1) * d]);
                    rope_row(row, cs, sn, half, inverse);
                });
            },
        )
    }

    fn rope_attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut Option<Vec<f32>>,
        scratch: &mut [f32],
        q: &mut [f32],
        k: &mut [f32],
        v: &[f32],
        s: AttnShape,
        rot: Rotary<&[f32]>,
    ) {
        // In place: backward reads the rotated q and k.
        self.rope(&mut *q, rot.cos, rot.sin, rot.pos, s.h, s.d, false);
        self.rope(&mut *k, rot.cos, rot.sin, rot.pos, s.g, s.d, false);
        self.attention_forward(out, saved, scratch, q, k, v, s);
    }

    fn rope_attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        saved: &Option<Vec<f32>>,
        scratch: &mut [f32],
        dout: &[f32],
        out: &[f32],
        [q, k, v]: [&[f32]; 3],
        s: AttnShape,
        rot: Rotary<&[f32]>,
    ) {
        self.attention_backward(&mut *dq, &mut *dk, dv, saved, scratch, dout, out, q, k, v, s);
        self.rope(dq, rot.cos, rot.sin, rot.pos, s.h, s.d, true);
        self.rope(dk, rot.cos, rot.sin, rot.pos, s.g, s.d, true);
    }

    fn attention_forward(
        &self,
        out: &mut [f32],
        saved: &mut Option<Vec<f32>>,
        scratch: &mut [f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
    ) {
        self.timed(
            || "attention_forward".to_string(),
            0.0,
            || {
                let probs = saved.as_deref_mut().unwrap_or(scratch);
                attention::forward(out, probs, [q, k, v], s, attention::Path::of(self.products));
            },
        )
    }

    fn attention_backward(
        &self,
        dq: &mut [f32],
        dk: &mut [f32],
        dv: &mut [f32],
        saved: &Option<Vec<f32>>,
        scratch: &mut [f32],
        dout: &[f32],
        _out: &[f32],
        q: &[f32],
        k: &[f32],
        v: &[f32],
        s: AttnShape,
    ) {
        let bhtt = s.b * s.h * s.t * s.t;
        let (probs, dscores): (&[f32], &mut [f32]) = match saved {
            Some(p) => (p, scratch),
            None => {
                let (p, ds) = scratch.split_at_mut(bhtt);
                self.timed(
                    || "attention_probs".to_string(),
                    0.0,
                    || attention::probs(p, q, k, s, attention::Path::of(self.products)),
                );
                (p, ds)
            }
        };
        self.timed(
            || "attention_backward".to_string(),
            0.0,
            || {
                let path = attention::Path::of(self.products);
                attention::backward(dq, dk, dv, dscores, dout, probs, q, k, v, s, path);
            },
        )
    }

    fn attention_decode(&self, out: &mut [f32], q: &[f32], k: &[f32], v: &[f32], len: usize, s: AttnShape) {
        self.timed(|| "attention_decode".to_string(), 0.0, || attention::decode(out, q, k, v, len, s))
    }

    fn swiglu_forward(&self, act: &mut [f32], gu: &[f32], i: usize) {
        self.timed(
            || "swiglu_forward".to_string(),
            0.0,
            || {
                act.par_chunks_mut(i * ROWS_PER_TASK)
                    .zip(gu.par_chunks(2 * i * ROWS_PER_TASK))
                    .for_each(|(a, gu)| swiglu_rows(a, gu, i));
            },
        )
    }

    fn swiglu_backward(&self, dgu: &mut [f32], dact: &[f32], gu: &[f32], i: usize) {
        self.timed(
            || "swiglu_backward".to_string(),
            0.0,
            || {
                dgu.par_chunks_mut(2 * i * ROWS_PER_TASK)
                    .zip(dact.par_chunks(i * ROWS_PER_TASK))
                    .zip(gu.par_chunks(2 * i * ROWS_PER_TASK))
                    .for_each(|((dgu, da), gu)| swiglu_back_rows(dgu, da, gu, i));
            },
        )
    }

    fn cross_entropy(
        &self,
        logits: &mut [f32],
        losses: &mut [f32],
        targets: &[i32],
        vocab: usize,
        scale: f32,
    ) {
        self.timed(
            || "cross_entropy".to_string(),
            0.0,
            || {
                logits.par_chunks_mut(vocab).zip(losses.par_iter_mut()).zip(targets.par_iter()).for_each(
                    |((z, loss), &target)| {
                        if target < 0 {
                            z.fill(0.0);
                            *loss = 0.0;
                            return;
                        }
                        *loss = cross_entropy_row(z, target as usize, scale);
                    },
                );
            },
        )
    }

    fn sum_to_acc(&self, acc: &mut Vec<f64>, slot: usize, x: &[f32]) {
        acc[slot] = x.iter().map(|&l| l as f64).sum();
    }

    fn route(&self, route: &mut Routing, logits: &[f32], b: usize, t: usize, rc: RouterConfig) {
        self.timed(|| "moe_route".to_string(), 0.0, || route.route(logits, b, t, rc))
    }

    fn expert_offsets<'a>(&self, route: &'a Routing) -> &'a [usize] {
        &route.offsets
    }

    fn aux_to_acc(&self, acc: &mut Vec<f64>, slot: usize, route: &Routing) {
        acc[slot] += route.aux_loss as f64;
    }

    fn gather_rows(&self, out: &mut [f32], x: &[f32], route: &Routing, c: usize) {
        self.timed(
            || "gather_rows".to_string(),
            0.0,
            || {
                out.par_chunks_mut(c).zip(route.rows.par_iter()).for_each(|(o, &r)| {
                    let r = r as usize;
                    o.copy_from_slice(&x[r * c..(r + 1) * c]);
                });
            },
        )
    }

    fn combine_rows(
        &self,
        out: &mut [f32],
        y: &[f32],
        route: &Routing,
        weighted: bool,
        c: usize,
        accumulate: bool,
    ) {
        let (k, pos, weights) = (route.k, &route.pos, &route.weight);
        self.timed(
            || "combine_rows".to_string(),
            0.0,
            || {
                out.par_chunks_mut(c).enumerate().for_each(|(n, o)| {
                    if !accumulate {
                        o.fill(0.0);
                    }
                    for j in 0..k {
                        let p = pos[n * k + j] as usize;
                        let y = &y[p * c..(p + 1) * c];
                        if weighted {
                            let w = weights[n * k + j];
                            o.iter_mut().zip(y).for_each(|(o, y)| *o += w * y);
                        } else {
                            o.iter_mut().zip(y).for_each(|(o, y)| *o += y);
                        }
                    }
                });
            },
        )
    }

    fn slot_dots(&self, out: &mut [f32], dy: &[f32], y: &[f32], route: &Routing, c: usize) {
        let (k, pos) = (route.k, &route.pos);
        self.timed(
            || "slot_dots".to_string(),
            0.0,
            || {
                out.par_iter_mut().enumerate().for_each(|(i, o)| {
                    let (n, p) = (i / k, pos[i] as usize);
                    *o = dy[n * c..(n + 1) * c].iter().zip(&y[p * c..(p + 1) * c]).map(|(a, b)| a * b).sum();
                });
            },
        )
    }

    fn spread_rows(&self, out: &mut [f32], dy: &[f32], route: &Routing, c: usize) {
        let (k, pos, weights) = (route.k, &route.pos, &route.weight);
        self.timed(
            || "spread_rows".to_string(),
            0.0,
            || {
                // The parallel writes below are sound only if every row is in bounds and written
                // once: check both (a bitmap, O(slots), no allocation once warm).
                let rows = out.len() / c.max(1);
                {
                    let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                    seen.clear();
                    seen.resize(rows.div_ceil(64), 0);
                    for &p in pos {
                        let p = p as usize;
                        assert!(p < rows, "spread_rows: row {p} is outside the {rows} output rows");
                        let (word, bit) = (p / 64, 1u64 << (p % 64));
                        assert!(seen[word] & bit == 0, "spread_rows: row {p} appears twice in the positions");
                        seen[word] |= bit;
                    }
                }
                assert_eq!(weights.len(), pos.len(), "spread_rows: one weight per position");
                assert!(dy.len() >= pos.len().div_ceil(k.max(1)) * c, "spread_rows: dy is too short");
                let ptr = SendPtr(out.as_mut_ptr());
                (0..pos.len()).into_par_iter().for_each(|i| {
                    let (n, p, w) = (i / k, pos[i] as usize, weights[i]);
                    // SAFETY: checked above: every row is in bounds and no two slots share one.
                    let row = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(p * c), c) };
                    row.iter_mut().zip(&dy[n * c..(n + 1) * c]).for_each(|(o, g)| *o = w * g);
                });
            },
        )
    }

    fn router_backward(
        &self,
        route: &mut Routing,
        slot_dw: &[f32],
        dlogits: &mut [f32],
        b: usize,
        t: usize,
        rc: RouterConfig,
        aux_scale: f32,
    ) {
        self.timed(
            || "moe_router_backward".to_string(),
            0.0,
            || route.backward(slot_dw, dlogits, b, t, rc, aux_scale),
        )
    }

    fn sum_squares_to_acc(&self, acc: &mut Vec<f64>, slot: usize, x: &[f32]) {
        acc[slot] = self.timed(|| "sum_squares".to_string(), 0.0, || self.sum_squares(x));
    }

    fn clip_coef(
        &self,
        acc: &mut Vec<f64>,
        sum_sq: usize,
        norm: usize,
        coef: usize,
        max_norm: f32,
        inv_scale: f64,
    ) {
        let n = acc[sum_sq].sqrt() * inv_scale;
        acc[norm] = n;
        // PyTorch's clip_grad_norm_: coef = max_norm / (norm + 1e-6), clamped to 1.
        let clip = if max_norm > 0.0 { (max_norm as f64 / (n + 1e-6)).min(1.0) } else { 1.0 };
        acc[coef] = clip * inv_scale;
    }

    fn adamw(
        &self,
        p: &mut [f32],
        px: Option<&mut [f32]>,
        g: &mut [f32],
        m: &mut [f32],
        v: &mut [f32],
        h: AdamW,
        acc: &Vec<f64>,
        coef: usize,
    ) {
        self.timed(
            || "adamw".to_string(),
            0.0,
            || {
                let bc1 = 1.0 - (h.beta1 as f64).powi(h.step as i32);
                let bc2 = 1.0 - (h.beta2 as f64).powi(h.step as i32);
                let step_size = (h.lr as f64 / bc1) as f32;
                let bc2_sqrt = bc2.sqrt() as f32;
                let decay = 1.0 - h.lr * h.weight_decay;
                let c = [step_size, bc2_sqrt, decay, acc[coef] as f32];
                p.par_chunks_mut(SUM_CHUNK)
                    .zip(g.par_chunks_mut(SUM_CHUNK))
                    .zip(m.par_chunks_mut(SUM_CHUNK).zip(v.par_chunks_mut(SUM_CHUNK)))
                    .for_each(|((p, g), (m, v))| adamw_chunk(p, g, m, v, h, c));
                // The CPU stores activations in f32: a copy of the weights is the weights.
                if let Some(px) = px {
                    px.copy_from_slice(p);
                }
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{Cpu, bf16, exp, rmsnorm_gx, sum_squares_chunk, with_taken};

    /// The bf16 products' kept weight panels give the bits of packing every weight anew, on
    /// every bf16 path this CPU has, dense and MoE, with three micro-batches a step and with
    /// one: across micro-batches (later ones read what the second packed), AdamW steps and
    /// weights set between two micro-batches (each rewrites the panels of the weights read
    /// more than once since the last write); and products read them, the first micro-batch
    /// of a step included (what the update rewrote).
    #[test]
    fn kept_weight_panels_give_the_bits_of_packing_each_product_anew() {
        use crate::engine::{Engine, OptimConfig};
        let paths = bf16::available();
        if paths.is_empty() {
            assert!(std::env::var_os("CI").is_none(), "CI runs on CPUs with bf16 instructions");
            eprintln!("SKIPPED: this CPU has no bf16 instructions ({})", bf16::describe_cpu());
            return;
        }
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/moe_tiny");
        let optim = OptimConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, grad_clip: 1.0 };
        let (b, t) = (2, 40);
        let mut rng = crate::rng::SplitMix64::new(11);
        let ids: Vec<u32> = (0..3 * b * t).map(|_| (rng.next_u64() % 6400) as u32).collect();
        let targets: Vec<i32> = ids.iter().map(|&i| ((i + 1) % 6400) as i32).collect();
        for (use_moe, mbs) in [(false, 3), (true, 3), (false, 1), (true, 1)] {
            let mut cfg = crate::engine::hf::read_config(&dir.join("config.json")).unwrap();
            cfg.use_moe = use_moe;
            for &path in &paths {
                let train = |cpu: Cpu| {
                    let mut e = Engine::new(cpu.with_products(path), cfg.clone(), b, t).unwrap();
                    e.init_weights(3);
                    for step in 0..3 {
                        for mb in 0..mbs {
                            if step == 1 && mb == mbs - 1 {
                                let p: Vec<f32> = e.params_host().iter().map(|x| 0.9 * x).collect();
                                e.set_params(&p);
                            }
                            let r = mb * b * t..(mb + 1) * b * t;
                            e.forward_backward(&ids[r.clone()], &targets[r], 1.0 / mbs as f32);
                        }
                        e.optimizer_step(1e-2, &optim);
                    }
                    let panels = e.kernels.panels.lock().unwrap();
                    let kept: Vec<(usize, u64)> = panels
                        .kept
                        .values()
                        .map(|p| p.lock().unwrap())
                        .filter(|p| p.packed_under.is_some())
                        .map(|p| (p.buf.bytes(), p.reuses))
                        .collect();
                    (e.params_host().iter().map(|x| x.to_bits()).collect::<Vec<_>>(), kept)
                };
                let (kept_bits, kept) = train(Cpu::new());
                let (anew_bits, none) = train(Cpu::new().without_kept_panels());
                let reuses: u64 = kept.iter().map(|k| k.1).sum();
                let kept: Vec<usize> = kept.iter().map(|k| k.0).collect();
                assert!(none.is_empty(), "{}: kept panels with none asked for", path.name());
                if mbs == 1 {
                    // Read once per write: packed in the products, never kept or rewritten.
                    assert!(kept.is_empty(), "{} one micro-batch: {kept:?}", path.name());
                } else {
                    // Each kept weight is read as kept by the third micro-batch of step 0 (the
                    // second packed it); by all three of step 1 (the update rewrote what step 0
                    // read three times, and set_params what step 1 read twice); by the third of
                    // step 2 (read once since set_params: not rewritten by the update).
                    assert!(
                        reuses >= 5 * kept.len() as u64 && kept.len() >= 2 * cfg.num_hidden_layers,
                        "{} {mbs} micro-batches: {reuses} reuses of {} kept",
                        path.name(),
                        kept.len()
                    );
                }
                // What `cost::memory` counts for them: 4 bytes a parameter (two bf16 layouts).
                let bytes = kept.iter().sum::<usize>() as f64 / (4 * cfg.parameter_count()) as f64;
                println!("{} moe {use_moe} {mbs}: kept panels {bytes:.3} of the estimate", path.name());
                assert!(bytes <= 1.05, "{}: kept panels {bytes:.3} of the estimate", path.name());
                assert!(
                    kept_bits == anew_bits,
                    "{} moe {use_moe} {mbs} micro-batches: kept panels changed the weights",
                    path.name()
                );
            }
        }
    }

    /// The gradient norm's sum of squares keeps its order (float32 runs clip by it): eight
    /// f64 lanes over whole chunks, then the partial chunk, then the lanes in order.
    #[test]
    fn the_sum_of_squares_keeps_its_order() {
        let mut rng = crate::rng::SplitMix64::new(3);
        for len in [0, 1, 7, 8, 9, 1000, 4099] {
            let x: Vec<f32> = (0..len).map(|_| rng.next_f32() * 8.0 - 4.0).collect();
            let mut lanes = [0.0f64; 8];
            for (i, &v) in x.iter().enumerate() {
                lanes[i % 8] += (v as f64) * (v as f64);
            }
            let want: f64 = lanes.iter().sum();
            assert_eq!(sum_squares_chunk(&x).to_bits(), want.to_bits(), "{len}");
        }
    }

    /// Four pieces side by side give the bits of one piece at a time, over whole groups of
    /// four, groups of four whose last piece is shorter, and groups cut short.
    #[test]
    fn the_sum_of_squares_in_four_streams_keeps_the_bits_of_one() {
        use super::SUM_CHUNK;
        let mut rng = crate::rng::SplitMix64::new(7);
        let k = Cpu::new();
        let lens = [0, 5, SUM_CHUNK, 4 * SUM_CHUNK - 1, 4 * SUM_CHUNK, 4 * SUM_CHUNK + 3, 8 * SUM_CHUNK - 5];
        for len in lens.into_iter().chain([9 * SUM_CHUNK - 1, 11 * SUM_CHUNK]) {
            let x: Vec<f32> = (0..len).map(|_| rng.next_f32() * 8.0 - 4.0).collect();
            let want: f64 = x.chunks(SUM_CHUNK).map(sum_squares_chunk).sum();
            assert_eq!(k.sum_squares(&x).to_bits(), want.to_bits(), "{len}");
        }
    }

    /// A product nested in another's parallel loop on the same thread (rayon's work
    /// stealing can do that) packs into a buffer of its own: no second borrow, no panic; and
    /// the outer buffer, capacity and all, is what the thread keeps.
    #[test]
    fn a_nested_product_takes_a_buffer_of_its_own() {
        thread_local! {
            static CELL: std::cell::RefCell<Vec<u32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let outer = with_taken(&CELL, |b| {
            b.extend([1, 2, 3]);
            let inner = with_taken(&CELL, |b| {
                assert!(b.is_empty(), "a fresh buffer, not the outer one");
                b.push(9);
                b.len()
            });
            (inner, b.len())
        });
        assert_eq!(outer, (1, 3));
        CELL.with_borrow(|b| assert_eq!(*b, [1, 2, 3]));
        // The cell is free again: a later product takes the same buffer back.
        assert!(with_taken(&CELL, |b| b.capacity() >= 3));
    }

    /// RMSNorm backward's row sum: float32 is the sequential fold, bit for bit; the lanes of
    /// a bf16 run are another order of the same sums (within a few ulps of the row's scale),
    /// exact on integers, and the same bits on every call.
    #[test]
    fn rmsnorm_row_sums_fold_in_float32_and_go_in_lanes_in_bf16() {
        let mut rng = crate::rng::SplitMix64::new(11);
        for len in [1, 15, 16, 17, 100, 512] {
            let v = |rng: &mut crate::rng::SplitMix64| -> Vec<f32> {
                (0..len).map(|_| rng.next_f32() * 4.0 - 2.0).collect()
            };
            let (dy, w, x) = (v(&mut rng), v(&mut rng), v(&mut rng));
            let fold = dy.iter().zip(&w).zip(&x).fold(0.0f32, |s, ((d, w), x)| s + d * w * x);
            assert_eq!(rmsnorm_gx(&dy, &w, &x, false).to_bits(), fold.to_bits(), "{len}");
            let lanes = rmsnorm_gx(&dy, &w, &x, true);
            let scale: f32 = dy.iter().zip(&w).zip(&x).map(|((d, w), x)| (d * w * x).abs()).sum();
            assert!((lanes - fold).abs() <= 1e-6 * scale, "{len}: {lanes} vs {fold}");
            assert_eq!(lanes.to_bits(), rmsnorm_gx(&dy, &w, &x, true).to_bits());
        }
        let ints: Vec<f32> = (0..37).map(|i| i as f32).collect();
        let ones = vec![1.0; 37];
        assert_eq!(rmsnorm_gx(&ints, &ones, &ones, true), 666.0);
    }

    /// The exponent by bits gives what `n as i32` gave, bit for bit (float32 runs unchanged),
    /// over a sweep of inputs and the edges: the clamp's ends, infinities, NaN.
    #[test]
    fn exp_keeps_the_bits_of_the_saturating_cast_form() {
        fn before(x: f32) -> f32 {
            let x = x.clamp(-87.3, 88.0);
            const MAGIC: f32 = 12_582_912.0;
            let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
            let r = (x - n * 0.693_145_75) - n * 1.428_606_8e-6;
            let p = 1.0
                + r * (1.0
                    + r * (0.5
                        + r * (1.0 / 6.0
                            + r * (1.0 / 24.0
                                + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
            p * f32::from_bits(((n as i32 + 127) as u32) << 23)
        }
        let edges = [-87.3f32, 88.0, -90.0, 90.0, 0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-30, -1e-30];
        let sweep = (0..200_001).map(|i| -100.0 + i as f32 * 1e-3);
        for x in edges.into_iter().chain(sweep) {
            assert_eq!(exp(x).to_bits(), before(x).to_bits(), "exp({x})");
            if (-87.0..88.0).contains(&x) {
                let want = (x as f64).exp();
                assert!(((exp(x) as f64 - want) / want).abs() < 3e-7, "exp({x}) accuracy");
            }
        }
        assert!(exp(f32::NAN).is_nan() && before(f32::NAN).is_nan());
    }
}
