//! bf16 matrix products on the CPU with f32 accumulation, as PyTorch's autocast computes them:
//! the f32 operands are rounded to bf16 (nearest even) while they are packed, multiplied with
//! the CPU's bf16 dot-product instruction, and summed in f32.
//!
//! Shapes: `dst[M, N] (+)= beta * lhs[M, K] rhs[K, N]`, the operands strided as
//! [`super::Operand`] describes them. K is taken in pairs: `vdpbf16ps` multiplies two bf16
//! pairs per f32 lane and adds both products to the lane.
//!
//! Layout (llm.c-style blocking over the `gemm` crate's conventions):
//! - rhs is packed once per `KC` block into panels of `NR` = 32 columns: for each pair p of k,
//!   the 32 columns' `(rhs[2p][j], rhs[2p+1][j])` as one u32 each (two zmm registers);
//! - lhs is packed per `MC`-row block (on the worker that owns it) into panels of `MR` = 12
//!   rows: for each pair p, the 12 rows' `(lhs[i][2p], lhs[i][2p+1])` as u32, broadcast one at
//!   a time;
//! - the microkernel keeps a 12 x 32 f32 tile in 24 zmm registers over the block's k pairs.
//!
//! Which instructions run is decided once per process ([`isa`]): AMX (`super::amx`, its own
//! tile layout) when the CPU has AMX-BF16 and Linux grants the tile state, else `avx512bf16`
//! when the CPU has AVX512-BF16, else `f32` (the caller keeps its f32 product);
//! `MINIMIND_CPU_ISA` pins a path (`f32`, `avx512bf16`, `amx`) so tests can take each one.

use std::cell::RefCell;
use std::sync::OnceLock;

use super::{Dst, Operand, RhsCache};

/// The bf16 instruction path this process uses for matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isa {
    /// No bf16 instruction (or pinned off): products stay in f32.
    #[default]
    F32,
    /// AVX512-BF16's `vdpbf16ps` (Intel Cooper Lake and later, AMD Zen 4 and later).
    Avx512Bf16,
    /// AMX-BF16's `tdpbf16ps` on 16 x 64-byte tiles (Intel Sapphire Rapids and later).
    Amx,
}

impl Isa {
    /// Whether attention's products take this path too (AMX; the AVX512-BF16 kernel is
    /// slower than f32 at attention's small blocks, so attention stays f32 there).
    pub fn takes_attention(self) -> bool {
        self == Isa::Amx
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::F32 => "f32",
            Isa::Avx512Bf16 => "avx512bf16",
            Isa::Amx => "amx",
        }
    }
}

/// What this CPU offers: (AVX512-BF16, AMX-BF16).
fn cpu_features() -> (bool, bool) {
    #[cfg(target_arch = "x86_64")]
    {
        let avx = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        // CPUID leaf 7: EDX bit 22 is AMX-BF16, bit 24 AMX-TILE.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID exists on every x86_64 CPU.
        let edx = unsafe { std::arch::x86_64::__cpuid_count(7, 0) }.edx;
        let amx = edx & (1 << 22) != 0 && edx & (1 << 24) != 0;
        (avx, amx)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (false, false)
}

/// The path for what the CPU can run (`paths`: the bf16 paths available, see [`available`])
/// and the pin: the pin wins when the CPU can run it; a pin it cannot run is an error, never a
/// SIGILL; unpinned, the fastest path (AMX, then AVX512-BF16, then f32). Pure.
pub fn choose(paths: &[Isa], pinned: Option<&str>) -> Result<Isa, String> {
    let has = |isa: Isa| paths.contains(&isa);
    match pinned {
        None | Some("") => Ok([Isa::Amx, Isa::Avx512Bf16].into_iter().find(|&i| has(i)).unwrap_or(Isa::F32)),
        Some("f32") => Ok(Isa::F32),
        Some("avx512bf16") if has(Isa::Avx512Bf16) => Ok(Isa::Avx512Bf16),
        Some("avx512bf16") => Err("MINIMIND_CPU_ISA=avx512bf16, but this CPU has no AVX512-BF16".into()),
        Some("amx") if has(Isa::Amx) => Ok(Isa::Amx),
        Some("amx") => {
            Err("MINIMIND_CPU_ISA=amx, but this CPU has no AMX-BF16 (or Linux did not grant its tiles)"
                .into())
        }
        Some(other) => Err(format!("MINIMIND_CPU_ISA={other}: expected f32, avx512bf16 or amx")),
    }
}

/// The bf16 paths this CPU can run, in the order they are preferred.
pub fn available() -> Vec<Isa> {
    let (avx, amx) = cpu_features();
    let mut out = Vec::new();
    if amx && super::amx::permit() {
        out.push(Isa::Amx);
    }
    if avx {
        out.push(Isa::Avx512Bf16);
    }
    out
}

/// The variable that pins the products' path (see the top of this file).
pub const ISA_ENV: &str = "MINIMIND_CPU_ISA";

/// The process's path, decided on first use from the CPU and `MINIMIND_CPU_ISA`.
pub fn isa() -> Result<Isa, String> {
    static ISA: OnceLock<Result<Isa, String>> = OnceLock::new();
    ISA.get_or_init(|| choose(&available(), std::env::var(ISA_ENV).ok().as_deref())).clone()
}

/// The CPU's bf16 instructions, in words (for selftest and benchmark headers).
pub fn describe_cpu() -> String {
    let (avx, amx) = cpu_features();
    let yes = |b: bool| if b { "yes" } else { "no" };
    format!("AVX512-BF16: {}, AMX-BF16: {}", yes(avx), yes(amx))
}

/// Rows of lhs per microkernel tile.
const MR: usize = 12;
/// Columns of rhs per microkernel tile (two zmm registers of f32).
const NR: usize = 32;
/// k elements per block (even): a rhs panel of `NR x KC` bf16 stays in L1/L2.
const KC: usize = 512;
/// Rows of lhs per block: one worker's packed lhs (`MC x KC` bf16) stays in L2.
const MC: usize = 16 * MR;

/// f32 -> bf16, rounded to nearest even (NaN stays NaN).
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

/// bf16 -> f32 (exact).
pub fn f32_of(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

/// Two bf16 as the u32 `vdpbf16ps` reads (the first in the low half).
fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

thread_local! {
    /// Packing buffers, reused call after call (no allocation once warm).
    static PACK_A: RefCell<Vec<u32>> = const { RefCell::new(Vec::new()) };
    static PACK_B: RefCell<super::amx::TileBuf> = const { RefCell::new(super::amx::TileBuf::new()) };
}

/// `dst[m, n] (+)= beta * lhs[m, k] rhs[k, n]` with bf16 products and f32 sums, on the rayon
/// pool when `parallel`; rhs packed into `cache` (or read from it, packed there before) when
/// one is given. Requires a CPU with AVX512-BF16 (see [`available`]).
///
/// # Safety
/// As [`super::gemm_strided`]: the pointers cover the strided extents, `dst` aliases neither
/// input; and the CPU has AVX512-BF16; a fresh `cache` holds this rhs as this function packed
/// it.
pub(crate) unsafe fn gemm(
    [m, n, k]: [usize; 3],
    dst: Dst,
    lhs: Operand,
    rhs: Operand,
    parallel: bool,
    cache: Option<RhsCache>,
) {
    // Nothing to do: no columns, or no rows and nothing to pack. No rows with a stale cache
    // packs the cache alone (the update's rewrite of a kept weight).
    if n == 0 || (m == 0 && cache.as_ref().is_none_or(|c| c.fresh)) {
        return;
    }
    // u32 of one k pair of every NR-column panel.
    let per_pair = n.div_ceil(NR) * NR;
    // Each k block: (index, k0, kc, pairs).
    let blocks = || {
        (0..k.max(1)).step_by(KC).enumerate().map(move |(block, k0)| {
            let kc = KC.min(k - k0.min(k));
            (block, k0, kc, kc.div_ceil(2))
        })
    };
    let product = |packed: &mut [u32], pack: bool, (block, k0, kc, _): (usize, usize, usize, usize)| {
        if pack {
            // SAFETY: the caller's extents cover rhs[k0..k0 + kc, 0..n].
            unsafe { pack_rhs(packed, rhs, k0, kc, n) };
        }
        // The first block writes (or accumulates, as dst asks), the others add.
        let dst = if block == 0 { dst } else { dst.with(dst.beta, true) };
        let packed: &[u32] = packed;
        let shared = Shared { dst, lhs };
        super::each_row_block(m, MC, parallel, |i0, mc| {
            // SAFETY: row block i0.. of dst is written by this worker only; the inputs are
            // read within the caller's extents.
            let Shared { dst, lhs } = shared.get();
            unsafe { row_block(dst, lhs, (i0, mc), (k0, kc), n, packed) };
        });
    };
    super::each_k_block(cache, &PACK_B, blocks(), |b| b.3 * per_pair, product);
}

/// The output and an input as the workers see them: each writes its own rows of `dst` and
/// reads `lhs`, which nobody writes during the product (also the AMX kernel's).
#[derive(Clone, Copy)]
pub(super) struct Shared {
    pub dst: Dst,
    pub lhs: Operand,
}
impl Shared {
    /// By value (a closure calling this captures the whole struct, not its pointer fields).
    pub fn get(&self) -> Shared {
        *self
    }
}

/// Writes rows `..rows`, columns `..cols` of a finished f32 `tile` into `dst` at (`i`, `j`),
/// as `dst` asks (set or added, scaled by `beta`).
///
/// # Safety
/// That block of `dst` lies inside it and no other thread writes it.
pub(super) unsafe fn store_tile(
    dst: Dst,
    (i, j): (usize, usize),
    (rows, cols): (usize, usize),
    tile: &[[f32; 32]],
) {
    for (r, row) in tile.iter().enumerate().take(rows) {
        // SAFETY: row i + r, columns j..j + cols are inside dst (the caller's promise).
        let out = unsafe { dst.ptr.add((i + r) * dst.ld + j) };
        for (c, v) in row.iter().enumerate().take(cols) {
            // SAFETY: as above.
            unsafe {
                let o = out.add(c);
                *o = if dst.accumulate { *o + dst.beta * v } else { dst.beta * v };
            }
        }
    }
}

// SAFETY: see `Shared`: disjoint writes, shared reads, all within the call.
unsafe impl Sync for Shared {}
unsafe impl Send for Shared {}

/// Packs rhs[k0..k0 + kc, 0..n] into NR-column panels of k pairs (zero past n and kc).
unsafe fn pack_rhs(out: &mut [u32], rhs: Operand, k0: usize, kc: usize, n: usize) {
    let pairs = kc.div_ceil(2);
    let at = |r: usize, c: usize| -> f32 {
        if r >= kc || c >= n {
            return 0.0;
        }
        // SAFETY: (k0 + r, c) is inside the caller's rhs.
        unsafe { *rhs.ptr.offset((k0 + r) as isize * rhs.rs + c as isize * rhs.cs) }
    };
    for (panel, chunk) in out.chunks_exact_mut(pairs * NR).enumerate() {
        let c0 = panel * NR;
        for p in 0..pairs {
            for j in 0..NR {
                chunk[p * NR + j] = pair(at(2 * p, c0 + j), at(2 * p + 1, c0 + j));
            }
        }
    }
}

/// Rows i0..i0 + mc of dst over k block (k0, kc): packs its lhs rows, then every column panel.
unsafe fn row_block(
    dst: Dst,
    lhs: Operand,
    (i0, mc): (usize, usize),
    (k0, kc): (usize, usize),
    n: usize,
    rhs: &[u32],
) {
    let pairs = kc.div_ceil(2);
    let tiles = mc.div_ceil(MR);
    PACK_A.with(|a| {
        let mut a = a.borrow_mut();
        a.clear();
        a.resize(tiles * pairs * MR, 0);
        let at = |r: usize, c: usize| -> f32 {
            if r >= mc || c >= kc {
                return 0.0;
            }
            // SAFETY: (i0 + r, k0 + c) is inside the caller's lhs.
            unsafe { *lhs.ptr.offset((i0 + r) as isize * lhs.rs + (k0 + c) as isize * lhs.cs) }
        };
        for (t, chunk) in a.chunks_exact_mut(pairs * MR).enumerate() {
            for p in 0..pairs {
                for i in 0..MR {
                    chunk[p * MR + i] = pair(at(t * MR + i, 2 * p), at(t * MR + i, 2 * p + 1));
                }
            }
        }
        for (panel, b) in rhs.chunks_exact(pairs * NR).enumerate() {
            let j0 = panel * NR;
            let cols = NR.min(n - j0);
            for (t, a) in a.chunks_exact(pairs * MR).enumerate() {
                let rows = MR.min(mc - t * MR);
                let mut tile = [[0f32; NR]; MR];
                // SAFETY: the packed panels hold `pairs` pairs each; the CPU has AVX512-BF16.
                unsafe { micro(a, b, pairs, &mut tile) };
                // SAFETY: rows i0 + t*MR.., columns j0.. of dst are this block's.
                unsafe { store_tile(dst, (i0 + t * MR, j0), (rows, cols), &tile) };
            }
        }
    });
}

/// The 12 x 32 tile `a^T b` over `pairs` k pairs, into `tile`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn micro(a: &[u32], b: &[u32], pairs: usize, tile: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..pairs {
        // SAFETY: p < pairs and the panels hold pairs * NR (b) and pairs * MR (a) values.
        let (b0, b1) = unsafe {
            let bp = b.as_ptr().add(p * NR) as *const __m512i;
            (_mm512_loadu_si512(bp), _mm512_loadu_si512(bp.add(1)))
        };
        // SAFETY: both are 512-bit vectors; the bits are 32 bf16 values.
        let (b0, b1) = unsafe {
            (std::mem::transmute::<__m512i, __m512bh>(b0), std::mem::transmute::<__m512i, __m512bh>(b1))
        };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: p * MR + i < pairs * MR, the panel's length; the broadcast pair is 2 bf16.
            let ai = unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                    *a.get_unchecked(p * MR + i) as i32
                ))
            };
            row[0] = _mm512_dpbf16_ps(row[0], ai, b0);
            row[1] = _mm512_dpbf16_ps(row[1], ai, b1);
        }
    }
    for (row, out) in acc.iter().zip(tile.iter_mut()) {
        // SAFETY: each tile row holds 32 f32.
        unsafe {
            _mm512_storeu_ps(out.as_mut_ptr(), row[0]);
            _mm512_storeu_ps(out.as_mut_ptr().add(16), row[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn micro(_: &[u32], _: &[u32], _: usize, _: &mut [[f32; NR]; MR]) {
    unreachable!("no bf16 path is chosen off x86_64")
}

/// `tdpbf16ps`'s peak on every thread of the current rayon pool at once (GFLOP/s), when the
/// AMX path is available.
pub fn amx_peak() -> Option<f64> {
    available()
        .contains(&Isa::Amx)
        .then(|| rayon::broadcast(|_| super::amx::peak_gflops(2_000_000)).iter().sum())
}

/// The instructions' peaks on this CPU, measured: GFLOP/s of 512-bit f32 FMAs and (when the
/// CPU has them) of `vdpbf16ps`, each from 12 independent accumulators on every thread of the
/// current rayon pool at once. What a product's efficiency is judged against.
pub fn instruction_peaks() -> (f64, Option<f64>) {
    const ITERS: usize = 20_000_000;
    let threads = rayon::current_num_threads() as f64;
    let time = |f: &(dyn Fn() -> f32 + Sync), flop_per_instr: f64| {
        let t = std::time::Instant::now();
        let sink: f32 = rayon::broadcast(|_| f()).iter().sum();
        std::hint::black_box(sink);
        threads * 12.0 * ITERS as f64 * flop_per_instr / t.elapsed().as_secs_f64() / 1e9
    };
    #[cfg(target_arch = "x86_64")]
    {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return (0.0, None);
        }
        // SAFETY: AVX-512F was detected above; AVX512-BF16 below.
        let f32_peak = time(&|| unsafe { peak_loops::fma(ITERS) }, 32.0);
        let bf16 = std::arch::is_x86_feature_detected!("avx512bf16")
            .then(|| time(&|| unsafe { peak_loops::dpbf16(ITERS) }, 64.0));
        (f32_peak, bf16)
    }
    #[cfg(not(target_arch = "x86_64"))]
    (0.0, None)
}

#[cfg(target_arch = "x86_64")]
mod peak_loops {
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn fma(iters: usize) -> f32 {
        let a = _mm512_set1_ps(1e-9);
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_fmadd_ps(*x, a, a);
            }
        }
        acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn dpbf16(iters: usize) -> f32 {
        // SAFETY: 512 bits either way; the bits are 32 bf16 values of 1e-9-ish.
        let a = unsafe { std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(0x3089_3089)) };
        let mut acc = [_mm512_setzero_ps(); 12];
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = _mm512_dpbf16_ps(*x, a, a);
            }
        }
        acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
    }
}

/// The shapes of MiniMind's products for a model of width `c` (MLP width `i`, vocabulary `v`)
/// at `rows` = B x T tokens: `(name, [M, N, K], rhs transposed)`. The forward products read
/// the weights `[out, in]` transposed; the weight gradients are `dy^T x` (K = rows).
pub fn minimind_shapes(rows: usize, c: usize, i: usize, v: usize) -> Vec<(String, [usize; 3], bool)> {
    vec![
        (format!("x W_o^T   {rows}x{c}x{c}"), [rows, c, c], true),
        (format!("x W_up^T  {rows}x{}x{c}", 2 * i), [rows, 2 * i, c], true),
        (format!("h W_dn^T  {rows}x{c}x{i}"), [rows, c, i], true),
        (format!("x E^T     {rows}x{v}x{c}"), [rows, v, c], true),
        (format!("dy^T x    {}x{c}x{rows}", 2 * i), [2 * i, c, rows], false),
    ]
}

/// Random inputs for `[m, n, k]`: lhs `[m, k]` row-major, rhs as stored (`[n, k]` read
/// transposed, or `[k, n]`).
pub fn random_operands([m, n, k]: [usize; 3], seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut rng = crate::rng::SplitMix64::new(seed);
    let mut rand = move || rng.next_f32() - 0.5;
    ((0..m * k).map(|_| rand()).collect(), (0..n * k).map(|_| rand()).collect())
}

/// One product of `shape` into `out` on `path` (f32: the `gemm` crate), rhs transposed or
/// not; on the rayon pool. Panics for a path this CPU cannot run.
pub fn product(
    shape: [usize; 3],
    transposed: bool,
    (lhs, rhs): (&[f32], &[f32]),
    out: &mut [f32],
    path: Isa,
) {
    let [m, n, k] = shape;
    assert!(lhs.len() >= m * k && rhs.len() >= n * k && out.len() >= m * n, "operands too small");
    assert!(path == Isa::F32 || available().contains(&path), "this CPU cannot run {}", path.name());
    let b = if transposed { Operand::transposed(rhs.as_ptr(), k) } else { Operand::rows(rhs.as_ptr(), n) };
    let (a, d) = (Operand::rows(lhs.as_ptr(), k), Dst::set(out.as_mut_ptr(), n));
    // SAFETY: the sizes were checked above, and the CPU runs `path`.
    unsafe {
        match path {
            Isa::F32 => super::gemm_strided(shape, d, a, b, true),
            Isa::Avx512Bf16 => gemm(shape, d, a, b, true, None),
            Isa::Amx => super::amx::gemm(shape, d, a, b, true, None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_isa_switch_is_not_read_as_a_config_key() {
        // Else every run would warn about it, and sweep points would not inherit it.
        assert!(!crate::config::is_config_var(ISA_ENV));
    }

    #[test]
    fn the_path_follows_the_cpu_and_the_pin() {
        let (both, avx, none): (&[Isa], &[Isa], &[Isa]) =
            (&[Isa::Amx, Isa::Avx512Bf16], &[Isa::Avx512Bf16], &[]);
        // (paths available, MINIMIND_CPU_ISA, the path or the error's words)
        type Row<'a> = (&'a [Isa], Option<&'a str>, Result<Isa, &'a str>);
        let table: [Row; 11] = [
            (both, None, Ok(Isa::Amx)),
            (avx, None, Ok(Isa::Avx512Bf16)),
            (none, None, Ok(Isa::F32)),
            (both, Some("f32"), Ok(Isa::F32)),
            (both, Some("avx512bf16"), Ok(Isa::Avx512Bf16)),
            (none, Some("avx512bf16"), Err("no AVX512-BF16")),
            (both, Some("amx"), Ok(Isa::Amx)),
            (avx, Some("amx"), Err("no AMX-BF16")),
            (both, Some("sse"), Err("expected f32, avx512bf16 or amx")),
            (none, Some(""), Ok(Isa::F32)),
            (none, Some("f32"), Ok(Isa::F32)),
        ];
        for (has, pin, want) in table {
            match (choose(has, pin), want) {
                (Ok(got), Ok(w)) => assert_eq!(got, w, "{has:?} {pin:?}"),
                (Err(e), Err(w)) => assert!(e.contains(w), "{has:?} {pin:?}: {e}"),
                (got, w) => panic!("{has:?} {pin:?}: {got:?} vs {w:?}"),
            }
        }
    }

    #[test]
    fn bf16_rounds_to_nearest_even() {
        for (x, want) in [
            (1.0f32, 0x3f80u16),
            (f32::from_bits(0x3f80_8000), 0x3f80), // a tie: to the even 0x3f80
            (f32::from_bits(0x3f81_8000), 0x3f82), // a tie: to the even 0x3f82
            (f32::from_bits(0x3f80_8001), 0x3f81),
            (-2.5, 0xc020),
        ] {
            assert_eq!(to_bf16(x), want, "{x}");
        }
        assert!(f32_of(to_bf16(f32::NAN)).is_nan());
    }

    /// The bf16 product against f32 products of the same bf16-rounded inputs (so only the
    /// summation order differs), over ragged shapes, strides and both Dst modes.
    #[test]
    fn the_bf16_product_matches_f32_on_rounded_inputs() {
        let paths = available();
        if paths.is_empty() {
            assert!(std::env::var_os("CI").is_none(), "CI runs on CPUs with bf16 instructions");
            eprintln!("SKIPPED: this CPU has no bf16 instructions ({})", describe_cpu());
            return;
        }
        let mut rng = crate::rng::SplitMix64::new(7);
        let mut rand = || rng.next_f32() - 0.5;
        for [m, n, k] in
            [[1, 1, 1], [13, 33, 7], [200, 70, 1030], [12, 32, 512], [5, 100, 3], [64, 64, 64], [96, 48, 96]]
        {
            let a: Vec<f32> = (0..m * k).map(|_| f32_of(to_bf16(rand()))).collect();
            let bt: Vec<f32> = (0..n * k).map(|_| f32_of(to_bf16(rand()))).collect(); // [n, k]
            let mut want = vec![0f64; m * n];
            for i in 0..m {
                for j in 0..n {
                    want[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * bt[j * k + p] as f64).sum();
                }
            }
            for &path in &paths {
                // The operands as row-major copies and as transposed ones (lhs [k, m] read
                // transposed; rhs [k, n] read by rows), so every packing layout is taken.
                let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
                let b: Vec<f32> = (0..k * n).map(|x| bt[(x % n) * k + x / n]).collect();
                let layouts = [
                    (Operand::rows(a.as_ptr(), k), Operand::transposed(bt.as_ptr(), k)),
                    (Operand::transposed(at.as_ptr(), m), Operand::rows(b.as_ptr(), n)),
                ];
                for ((accumulate, beta), (l, r)) in [(false, 1.0f32), (true, 0.5), (true, 1.0)]
                    .into_iter()
                    .flat_map(|ab| layouts.map(|lr| (ab, lr)))
                {
                    // Packed by the product (no cache), packed into a kept buffer over other
                    // contents, then read from it as packed, the rhs given now all zeros (so
                    // a product that packed it again would give zeros): the same bits each
                    // time.
                    let mut kept = crate::engine::cpu::amx::TileBuf::new();
                    kept.overwritten_u32(1 << 16).fill(0xdead_beef);
                    let zeros = vec![0f32; n * k];
                    let [got, packing, packed] = [None, Some(false), Some(true)].map(|fresh| {
                        let mut got = vec![1f32; m * n];
                        let d = Dst::set(got.as_mut_ptr(), n).with(beta, accumulate);
                        let r = if fresh == Some(true) { Operand { ptr: zeros.as_ptr(), ..r } } else { r };
                        let cache = fresh.map(|fresh| RhsCache { buf: &mut kept, fresh });
                        // SAFETY: the buffers hold the shapes; `path` is available; the kept
                        // buffer is fresh only after the real rhs was packed into it.
                        unsafe {
                            match path {
                                Isa::Avx512Bf16 => gemm([m, n, k], d, l, r, true, cache),
                                Isa::Amx => super::super::amx::gemm([m, n, k], d, l, r, true, cache),
                                Isa::F32 => unreachable!("not a bf16 path"),
                            }
                        };
                        got
                    });
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&packing),
                        bits(&got),
                        "{} {m}x{n}x{k}: packing into a cache",
                        path.name()
                    );
                    assert_eq!(bits(&packed), bits(&got), "{} {m}x{n}x{k}: from the cache", path.name());
                    let base = if accumulate { 1.0 } else { 0.0 };
                    for (g, w) in got.iter().zip(&want) {
                        let w = base + beta as f64 * w;
                        assert!(
                            (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()) * (k as f64).sqrt(),
                            "{} {m}x{n}x{k}: {g} vs {w}",
                            path.name()
                        );
                    }
                }
            }
        }
    }
}
