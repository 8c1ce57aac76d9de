//! bf16 products on Intel AMX (`tdpbf16ps`), with f32 accumulation in the tiles: the same
//! contract as [`super::bf16::gemm`] (operands rounded to bf16 while packed).
//!
//! Shapes: `dst[M, N] (+)= beta * lhs[M, K] rhs[K, N]`, K in steps of 32 (zero-padded).
//! Tiles (palette 1, 16 rows of 64 bytes each):
//! - tmm0..3: the 32 x 32 f32 output as four 16 x 16 quarters;
//! - tmm4, tmm5: lhs rows 0..16 and 16..32 of one k step, 32 bf16 each (row-major);
//! - tmm6, tmm7: rhs columns 0..16 and 16..32 of one k step: 16 rows of k pairs, each row the
//!   16 columns' `(rhs[2p][j], rhs[2p+1][j])` (AMX's pair-interleaved layout).
//!
//! Packing: rhs once per `KC` block into 32-column panels `[panel][step][half][16][16] u32`;
//! lhs per `MC`-row block (on its worker) into 32-row tiles `[tile][step][half][16][32] u16`,
//! both on 64-byte lines ([`TileBuf`]). Each 32 x 32 output block is summed in the tiles: onto
//! dst's values when accumulating (and over every k block after the first), else from zero.
//! The tiles load and store a whole block in place where its rows start on lines (the
//! engine's buffers do: [`crate::alloc`]), else (ragged edges, rows off lines) through an
//! aligned [`Block`]: the same sums either way,
//! so the bits do not depend on where dst lies. Scaled products (`beta` not 1: attention's)
//! sum each k block from zero and add `beta` times it with AVX-512.
//! The OS must grant the tile data state first ([`permit`]).

use std::cell::RefCell;

use rayon::prelude::*;

use super::bf16::{Shared, store_tile, to_bf16 as bf16};
use super::{Dst, Operand, RhsCache, SendPtr};

/// Rows and columns of one output tile group.
const T: usize = 32;
/// k per AMX step.
const KS: usize = 32;
/// k per block (a multiple of KS).
const KC: usize = 512;
/// Rows of lhs per worker block.
const MC: usize = 2 * T;
/// How many output blocks ahead of the tiles dst's lines are fetched (see [`prefetch_block`]).
const AHEAD: usize = 2;

thread_local! {
    static PACK_A: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
    static PACK_B: RefCell<TileBuf> = const { RefCell::new(TileBuf::new()) };
}

/// One cache line of tile data. Tile rows are 64 bytes: a row that starts off a line boundary
/// spans two lines, and `tileloadd` then costs about 7x (57 cycles a tile against 8, measured
/// on this project's Xeon), so every tile `tileloadd` reads starts on a line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u32; 16]);

/// A reusable, 64-byte aligned buffer of packed tiles (no allocation once large enough).
#[derive(Default)]
pub(crate) struct TileBuf(Vec<Line>);

impl TileBuf {
    pub const fn new() -> TileBuf {
        TileBuf(Vec::new())
    }

    /// The first `len` u32 of the buffer, zeroed.
    fn zeroed_u32(&mut self, len: usize) -> &mut [u32] {
        self.0.clear();
        self.overwritten_u32(len)
    }

    /// The first `len` u32 of the buffer as an earlier use left them (zero where it grew), for
    /// a caller that writes every one: the right-hand packing, which would otherwise pay a
    /// second pass over the packed bytes (5% of a bf16 dense step, measured); or that reads
    /// what it packed there before (a weight's kept panels, [`super::RhsCache`]).
    pub(crate) fn overwritten_u32(&mut self, len: usize) -> &mut [u32] {
        self.0.resize(len.div_ceil(16).max(self.0.len()), Line([0; 16]));
        // SAFETY: the lines hold at least `len` u32, plain data with no padding.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr() as *mut u32, len) }
    }

    /// Bytes held.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        std::mem::size_of_val(self.0.as_slice())
    }

    /// The first `len` u16 of the buffer as an earlier use left them, for a caller that
    /// writes every one.
    fn overwritten_u16(&mut self, len: usize) -> &mut [u16] {
        let words = self.overwritten_u32(len.div_ceil(2));
        // SAFETY: the same memory as u16, at least `len` of them.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, len) }
    }

    /// The first `len` u16 of the buffer, zeroed.
    fn zeroed_u16(&mut self, len: usize) -> &mut [u16] {
        let words = self.zeroed_u32(len.div_ceil(2));
        // SAFETY: the same memory as u16, at least `len` of them.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u16, len) }
    }
}

/// A 32 x 32 f32 block on line boundaries: where the tiles store a product's output block.
#[repr(C, align(64))]
struct Block([[f32; T]; T]);

/// Asks Linux for the AMX tile data state (`arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`), once
/// per process; false when refused (an old kernel, or no AMX).
pub fn permit() -> bool {
    static GRANTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *GRANTED.get_or_init(|| {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain system call with integer arguments.
        unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
    })
}

/// `dst[m, n] (+)= beta * lhs[m, k] rhs[k, n]` on AMX tiles, on the rayon pool when `parallel`;
/// rhs packed into `cache` (or read from it, packed there before) when one is given.
///
/// # Safety
/// As [`super::gemm_strided`]; and the CPU has AMX-BF16 with [`permit`] granted; a fresh
/// `cache` holds this rhs as this function packed it.
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
    // u32 of one k step of every 32-column panel.
    let per_step = n.div_ceil(T) * T * KS / 2;
    // Each k block: (index, k0, kc, steps).
    let blocks = || {
        (0..k.max(1)).step_by(KC).enumerate().map(move |(block, k0)| {
            let kc = KC.min(k - k0.min(k));
            (block, k0, kc, kc.div_ceil(KS).max(1))
        })
    };
    let product = |packed: &mut [u32], pack: bool, (block, k0, kc, steps): (usize, usize, usize, usize)| {
        if pack {
            // SAFETY: the caller's extents cover rhs[k0..k0 + kc, 0..n].
            unsafe { pack_rhs(packed, Shared { dst, lhs: rhs }, (k0, kc), n, (steps, parallel)) };
        }
        let dst = if block == 0 { dst } else { dst.with(dst.beta, true) };
        let packed: &[u32] = packed;
        let shared = Shared { dst, lhs };
        super::each_row_block(m, MC, parallel, |i0, mc| {
            let Shared { dst, lhs } = shared.get();
            let panels = (packed, steps * T * KS / 2, 0);
            // SAFETY: row block i0.. of dst is this worker's; inputs within the extents.
            unsafe { row_block(dst, lhs, (i0, mc), (k0, kc, steps), n, panels) };
        });
    };
    super::each_k_block(cache, &PACK_B, blocks(), |b| b.3 * per_step, product);
}

/// A right-hand operand packed once for several products over its first columns and any
/// run of its k steps (attention's K, V, Q and dO per head, reused by every row block).
#[derive(Clone, Copy)]
pub(crate) struct Packed<'a> {
    data: &'a [u32],
    steps: usize,
    panels: usize,
}

/// Packs `rhs[0..k, 0..n]` into `buf` (reused: no allocation once it is large enough).
///
/// # Safety
/// `rhs` covers those extents; the CPU has AMX-BF16 with [`permit`] granted.
pub(crate) unsafe fn pack<'a>(buf: &'a mut TileBuf, [k, n]: [usize; 2], rhs: Operand) -> Packed<'a> {
    let (steps, panels) = (k.div_ceil(KS).max(1), n.div_ceil(T));
    let buf = buf.overwritten_u32(panels * steps * T * KS / 2);
    let unused = Dst::set(std::ptr::null_mut(), 0);
    // SAFETY: the caller's extents cover rhs[0..k, 0..n].
    unsafe { pack_rhs(buf, Shared { dst: unused, lhs: rhs }, (0, k), n, (steps, false)) };
    Packed { data: buf, steps, panels }
}

/// `dst[m, n] (+)= beta * lhs[m, k] rhs[k0..k0 + k, 0..n]` on this thread, `rhs` packed by
/// [`pack`] (k0 a multiple of 32, within its rows; n within its columns).
///
/// # Safety
/// As [`gemm`] for `dst` and `lhs`.
pub(crate) unsafe fn gemm_packed([m, n, k]: [usize; 3], dst: Dst, lhs: Operand, rhs: &Packed, k0: usize) {
    let steps = k.div_ceil(KS).max(1);
    assert!(
        k0.is_multiple_of(KS) && k0 / KS + steps <= rhs.steps && n <= rhs.panels * T,
        "a packed product inside its operand"
    );
    let panels = (rhs.data, rhs.steps * T * KS / 2, k0 / KS);
    for i0 in (0..m).step_by(MC) {
        // SAFETY: the caller's extents; this thread writes every row block.
        unsafe { row_block(dst, lhs, (i0, MC.min(m - i0)), (0, k, steps), n, panels) };
    }
}

/// rhs[k0..k0 + kc, 0..n] as 32-column panels of `steps` k steps (zero-padded), writing every
/// u32 of `out` (its earlier contents do not matter). `shared.lhs` is the rhs here (its `dst`
/// unused): the wrapper lets the panels pack in parallel.
unsafe fn pack_rhs(
    out: &mut [u32],
    shared: Shared,
    (k0, kc): (usize, usize),
    n: usize,
    (steps, parallel): (usize, bool),
) {
    let at = |r: usize, c: usize| -> u16 {
        let rhs = shared.get().lhs;
        if r >= kc || c >= n {
            return 0;
        }
        // SAFETY: (k0 + r, c) is inside the caller's rhs.
        bf16(unsafe { *rhs.ptr.offset((k0 + r) as isize * rhs.rs + c as isize * rhs.cs) })
    };
    let per_panel = steps * T * KS / 2;
    if shared.lhs.cs == 1 && vector_pack() {
        // Row-contiguous rhs (activations, or a weight as it is stored), in the order memory
        // holds it: each task takes one k step of every panel and reads its rows in pairs,
        // left to right (two sequential streams). Packed panel by panel (as the transposed
        // case below still is), each tile read 32 rows 64 bytes at a time, rows n * 4 bytes
        // apart: ~4 ns a value for the [2816, 512] gate|up weight in its dx product, where
        // the prefetcher could not run ahead.
        let halves = n.div_ceil(T) * 2;
        let out_at = SendPtr(out.as_mut_ptr());
        let step = |s: usize| {
            let rhs = shared.get().lhs;
            for p in 0..16 {
                let r = s * KS + 2 * p;
                // Group h's tile row p of step s: [panel][step][half][16 pairs][16 columns].
                // SAFETY: h < halves, so inside `out` (panels * per_panel u32).
                let row_of = |h: usize| unsafe {
                    out_at.get().add((h / 2) * per_panel + (s * 2 + h % 2) * 256 + p * 16)
                };
                let whole = if r + 2 <= kc { n / 16 } else { 0 };
                if whole > 0 {
                    // SAFETY: rows k0 + r and k0 + r + 1, columns ..whole * 16 are inside rhs;
                    // each group's 16 u32 are inside `out` and this step's alone; the CPU has
                    // AVX512-BF16 and AVX512-BW (checked).
                    unsafe {
                        let even = rhs.ptr.offset((k0 + r) as isize * rhs.rs);
                        interleave_row(even, even.offset(rhs.rs), whole, row_of(0), per_panel);
                    }
                }
                for h in whole..halves {
                    for j in 0..16 {
                        let c = h * 16 + j;
                        // SAFETY: as above; the zero-padded edge, one u32 at a time.
                        unsafe { *row_of(h).add(j) = at(r, c) as u32 | (at(r + 1, c) as u32) << 16 };
                    }
                }
            }
        };
        if parallel {
            (0..steps).into_par_iter().for_each(step);
        } else {
            (0..steps).for_each(step);
        }
        return;
    }
    let pack = |(panel, chunk): (usize, &mut [u32])| {
        let rhs = shared.get().lhs;
        for s in 0..steps {
            for half in 0..2 {
                let base = (s * 2 + half) * 16 * 16;
                let c0 = panel * T + half * 16;
                if rhs.rs == 1 && s * KS + KS <= kc && c0 + 16 <= n && vector_pack() {
                    // Column-contiguous rhs (a weight read transposed): each column's 32 k
                    // convert at once into its 16 pairs, which go down the tile's column.
                    // SAFETY: the 16 columns' 32 values are inside the caller's rhs; the
                    // tile's 256 u32 are inside `chunk`; the CPU has AVX512-BF16 (checked).
                    unsafe {
                        let src = rhs.ptr.offset((k0 + s * KS) as isize + c0 as isize * rhs.cs);
                        pack_columns16(src, rhs.cs, chunk[base..base + 256].as_mut_ptr());
                    }
                    continue;
                }
                for p in 0..16 {
                    for j in 0..16 {
                        let (r, c) = (s * KS + 2 * p, panel * T + half * 16 + j);
                        chunk[base + p * 16 + j] = at(r, c) as u32 | (at(r + 1, c) as u32) << 16;
                    }
                }
            }
        }
    };
    if parallel {
        out.par_chunks_exact_mut(per_panel).enumerate().for_each(pack);
    } else {
        out.chunks_exact_mut(per_panel).enumerate().for_each(pack);
    }
}

/// Rows i0..i0 + mc of dst over one k block (lhs columns k0..k0 + kc, `steps` k steps):
/// packs its lhs tiles, then multiplies by every column panel of `rhs` (panels `stride` u32
/// apart, starting at k step `step0` of each).
unsafe fn row_block(
    dst: Dst,
    lhs: Operand,
    (i0, mc): (usize, usize),
    (k0, kc, steps): (usize, usize, usize),
    n: usize,
    (rhs, stride, step0): (&[u32], usize, usize),
) {
    let tiles = mc.div_ceil(T);
    let per_tile = steps * T * KS;
    PACK_A.with(|a| {
        let mut a = a.borrow_mut();
        // Every u16 of whole tiles is packed below (k = 0 packs none); ragged ones keep zeros
        // past the edges.
        let a = if mc.is_multiple_of(T) && kc.is_multiple_of(KS) && kc > 0 {
            a.overwritten_u16(tiles * per_tile)
        } else {
            a.zeroed_u16(tiles * per_tile)
        };
        for (t, chunk) in a.chunks_exact_mut(per_tile).enumerate() {
            for s in 0..steps {
                if lhs.rs == 1 && (t + 1) * T <= mc && s * KS + KS <= kc && vector_pack() {
                    // Column-contiguous lhs (a gradient read transposed): 16 rows at a time,
                    // each k pair converted into one register, transposed into the rows.
                    for half in 0..2 {
                        let base = (s * 2 + half) * 16 * KS;
                        // SAFETY: rows i0 + t*T + 16*half .. +16 of columns k0 + s*KS .. +32
                        // are inside lhs; the tile's 16 rows are inside `chunk`; the CPU has
                        // AVX512-BF16 and AVX512-BW (checked).
                        unsafe {
                            let src = lhs
                                .ptr
                                .offset((i0 + t * T + 16 * half) as isize + (k0 + s * KS) as isize * lhs.cs);
                            pack_rows16(src, lhs.cs, chunk[base..base + 16 * KS].as_mut_ptr());
                        }
                    }
                    continue;
                }
                for r in 0..T {
                    let row = t * T + r;
                    // [step][half][16 rows][32 k]: row r is half r / 16, row r % 16.
                    let base = ((s * 2 + r / 16) * 16 + r % 16) * KS;
                    if row < mc && s * KS + KS <= kc && lhs.cs == 1 && vector_pack() {
                        // 32 contiguous k of a row: converted 32 at a time.
                        // SAFETY: the 32 values are inside the caller's lhs; the CPU has
                        // AVX512-BF16 (checked).
                        unsafe {
                            let src = lhs.ptr.offset((i0 + row) as isize * lhs.rs + (k0 + s * KS) as isize);
                            convert32(src, chunk[base..base + KS].as_mut_ptr());
                        }
                        continue;
                    }
                    for c in 0..KS {
                        let col = s * KS + c;
                        if row < mc && col < kc {
                            // SAFETY: (i0 + row, k0 + col) is inside the caller's lhs.
                            let v = unsafe {
                                *lhs.ptr.offset((i0 + row) as isize * lhs.rs + (k0 + col) as isize * lhs.cs)
                            };
                            chunk[base + c] = bf16(v);
                        }
                    }
                }
            }
        }
        let mut tile = Block([[0f32; T]; T]);
        let panels = n.div_ceil(T);
        // Block (panel, t) of this row block: its top-left element, and whether the tiles may
        // read and write it in place: whole, beta 1 (dst (+)= the products, summed in the
        // tiles onto dst's own values when accumulating), its rows on lines (a tile row
        // across two lines costs about 7x; see [`Line`]).
        let block = |panel: usize, t: usize| {
            // SAFETY: row i0 + t*T, column panel*T of dst is inside it (callers keep t, panel
            // within the block's extents).
            let corner = unsafe { dst.ptr.add((i0 + t * T) * dst.ld + panel * T) };
            let whole = (t + 1) * T <= mc && (panel + 1) * T <= n;
            let on_lines = (corner as usize).is_multiple_of(64) && (dst.ld * 4).is_multiple_of(64);
            (corner, whole && on_lines && dst.beta == 1.0)
        };
        // SAFETY: the tile configuration below is valid for palette 1; released at the end.
        unsafe { configure() };
        for panel in 0..panels {
            let b = &rhs[panel * stride + step0 * T * KS / 2..][..steps * T * KS / 2];
            let (j0, cols) = (panel * T, T.min(n - panel * T));
            for (t, a) in a.chunks_exact(per_tile).enumerate() {
                let (i, rows) = (i0 + t * T, T.min(mc - t * T));
                let ((corner, in_place), (a, b)) = (block(panel, t), (a.as_ptr(), b.as_ptr()));
                // The aligned block's pointer, taken after the last borrow of `tile` before use.
                let own = |tile: &mut Block| (tile.0.as_mut_ptr().cast::<f32>(), T * 4);
                if in_place {
                    let next = panel * tiles + t + AHEAD;
                    if next < panels * tiles && block(next / tiles, next % tiles).1 {
                        // SAFETY: a hint at a block inside dst.
                        unsafe { prefetch_block(block(next / tiles, next % tiles).0, dst.ld) };
                    }
                    #[cfg(test)]
                    IN_PLACE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    // SAFETY: the whole block at `corner` is this block's, its rows on lines;
                    // the packed tiles hold `steps` steps each; tiles are configured.
                    unsafe { micro(a, b, steps, (corner, dst.ld * 4), dst.accumulate) };
                } else {
                    // Through the aligned `tile`. Beta 1: the sums the tiles make in place (onto
                    // dst's values, loaded first, when accumulating), stored as they are. Scaled
                    // (attention's products): the sum from zero, scaled as it is added to dst.
                    let load = dst.beta == 1.0 && dst.accumulate;
                    let out = if dst.beta == 1.0 { Dst { accumulate: false, ..dst } } else { dst };
                    // SAFETY: rows i.., columns j0.. of dst are this block's; as above; the CPU
                    // has AVX-512 where `vector_pack` says so.
                    unsafe {
                        if load {
                            load_tile(dst, (i, j0), (rows, cols), &mut tile);
                        }
                        micro(a, b, steps, own(&mut tile), load);
                        if rows == T && cols == T && vector_pack() {
                            store_block(out, corner, &tile);
                        } else {
                            store_tile(out, (i, j0), (rows, cols), &tile.0);
                        }
                    }
                }
            }
        }
        // SAFETY: releases the tiles this thread configured.
        unsafe { std::arch::asm!("tilerelease", options(nostack)) };
    });
}

/// Blocks summed in place, over the process (tests see that the path is taken).
#[cfg(test)]
static IN_PLACE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Whether packing may convert with AVX512-BF16, and the epilogue use AVX-512 (every AMX CPU
/// has both; checked once).
fn vector_pack() -> bool {
    static YES: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *YES.get_or_init(|| {
        use std::arch::is_x86_feature_detected as has;
        has!("avx512f") && has!("avx512bf16") && has!("avx512bw")
    })
}

/// 32 f32 at `src` to 32 bf16 at `dst`, rounded to nearest even (as `bf16::to_bf16`).
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn convert32(src: *const f32, dst: *mut u16) {
    use std::arch::x86_64::*;
    // SAFETY: the caller gives 32 readable f32 and 32 writable u16.
    unsafe {
        let lo = _mm512_loadu_ps(src);
        let hi = _mm512_loadu_ps(src.add(16));
        // cvtne2ps(a, b): b's 16 values in the low half, a's in the high half.
        let v = _mm512_cvtne2ps_pbh(hi, lo);
        _mm512_storeu_si512(dst as *mut __m512i, std::mem::transmute::<__m512bh, __m512i>(v));
    }
}

/// 16 columns of 32 k (each column's k contiguous, columns `cs` f32 apart from `src`) into one
/// rhs tile at `dst`: row p holds the 16 columns' pairs `(k 2p, k 2p + 1)`. Each column
/// converts into one register of 16 pairs; a 16 x 16 transpose of u32 turns them into rows.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_columns16(src: *const f32, cs: isize, dst: *mut u32) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_si512(); 16];
    for (j, col) in r.iter_mut().enumerate() {
        // SAFETY: column j's 32 f32 are the caller's.
        unsafe {
            let c = src.offset(j as isize * cs);
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(c.add(16)), _mm512_loadu_ps(c));
            *col = std::mem::transmute::<__m512bh, __m512i>(v);
        }
    }
    // r[j] lane p is column j's pair p; the tile wants lane j of row p.
    for (p, row) in transpose16(&r).into_iter().enumerate() {
        // SAFETY: row p of the caller's 256 u32.
        unsafe { _mm512_storeu_si512(dst.add(16 * p) as *mut __m512i, row) };
    }
}

/// 16 rows of 32 k (rows contiguous, each k's column `cs` f32 apart from `src`) into 16 lhs tile rows
/// of 32 bf16 at `dst`: each k pair of the 16 rows converts into one register of (row's k 2q,
/// k 2q + 1) pairs, and a 16 x 16 transpose of u32 turns them into rows.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pack_rows16(src: *const f32, cs: isize, dst: *mut u16) {
    use std::arch::x86_64::*;
    let mut r = [_mm512_setzero_si512(); 16];
    for (q, pair) in r.iter_mut().enumerate() {
        // SAFETY: columns 2q and 2q + 1 of the caller's 16 rows.
        *pair = unsafe { pairs16(src.offset(2 * q as isize * cs), src.offset((2 * q + 1) as isize * cs)) };
    }
    for (row, v) in transpose16(&r).into_iter().enumerate() {
        // SAFETY: tile row `row` (32 bf16) of the caller's 16.
        unsafe { _mm512_storeu_si512(dst.add(KS * row) as *mut __m512i, v) };
    }
}

/// The 16 x 16 transpose of u32: lane j of row p out is lane p of row j in.
#[target_feature(enable = "avx512f")]
fn transpose16(r: &[std::arch::x86_64::__m512i; 16]) -> [std::arch::x86_64::__m512i; 16] {
    use std::arch::x86_64::*;
    let mut t = [_mm512_setzero_si512(); 16];
    for i in 0..8 {
        // Per 128-bit lane L: (r[2i][4L], r[2i+1][4L], ..[4L+1]) and the same for 4L+2, 4L+3.
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    let mut u = [_mm512_setzero_si512(); 16];
    for g in 0..4 {
        // u[4g + q], lane L: rows 4g..4g + 4 at lane 4L + q.
        u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
    }
    let mut out = [_mm512_setzero_si512(); 16];
    for q in 0..4 {
        // Lane L of the four row groups, side by side, is row 4L + q out.
        let (v0, v1) =
            (_mm512_shuffle_i32x4::<0x88>(u[q], u[4 + q]), _mm512_shuffle_i32x4::<0xDD>(u[q], u[4 + q]));
        let (w0, w1) = (
            _mm512_shuffle_i32x4::<0x88>(u[8 + q], u[12 + q]),
            _mm512_shuffle_i32x4::<0xDD>(u[8 + q], u[12 + q]),
        );
        out[q] = _mm512_shuffle_i32x4::<0x88>(v0, w0);
        out[q + 4] = _mm512_shuffle_i32x4::<0x88>(v1, w1);
        out[q + 8] = _mm512_shuffle_i32x4::<0xDD>(v0, w0);
        out[q + 12] = _mm512_shuffle_i32x4::<0xDD>(v1, w1);
    }
    out
}

/// The first `groups` x 16 f32 of rows `even` and `odd` as pairs `(bf16(even[j]),
/// bf16(odd[j]))`, 16 at a time: group h to the tile row at `dst` + its offset, tiles 256 u32
/// apart within a panel and panels `per_panel` apart.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn interleave_row(even: *const f32, odd: *const f32, groups: usize, dst: *mut u32, per_panel: usize) {
    use std::arch::x86_64::*;
    for h in 0..groups {
        // SAFETY: the caller gives `groups` x 16 readable f32 at each source and the 16
        // writable u32 of each group's tile row.
        unsafe {
            let to = dst.add((h / 2) * per_panel + (h % 2) * 256);
            _mm512_storeu_si512(to as *mut __m512i, pairs16(even.add(16 * h), odd.add(16 * h)));
        }
    }
}

/// 16 f32 at `even` and 16 at `odd` as one register of 16 pairs `(bf16(even[j]), bf16(odd[j]))`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn pairs16(even: *const f32, odd: *const f32) -> std::arch::x86_64::__m512i {
    use std::arch::x86_64::*;
    // SAFETY: the caller gives 16 readable f32 at each source.
    unsafe {
        // Low half: even's 16 bf16, high half: odd's; then even j, odd j side by side.
        let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(
            _mm512_loadu_ps(odd),
            _mm512_loadu_ps(even),
        ));
        let idx = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        _mm512_permutexvar_epi16(idx, v)
    }
}

/// `corner[r * ld + c] (+)= beta * block[r][c]` for the whole 32 x 32 block, as
/// [`store_tile`] computes it (a product, then a sum: no fused multiply-add).
#[target_feature(enable = "avx512f")]
unsafe fn store_block(dst: Dst, corner: *mut f32, block: &Block) {
    use std::arch::x86_64::*;
    let beta = _mm512_set1_ps(dst.beta);
    for (r, row) in block.0.iter().enumerate() {
        for half in 0..2 {
            // SAFETY: row r, columns 16 * half.. of the caller's block inside dst.
            unsafe {
                let out = corner.add(r * dst.ld + 16 * half);
                let v = _mm512_mul_ps(beta, _mm512_load_ps(row.as_ptr().add(16 * half)));
                let v = if dst.accumulate { _mm512_add_ps(_mm512_loadu_ps(out), v) } else { v };
                _mm512_storeu_ps(out, v);
            }
        }
    }
}

/// `tile[r][c] = dst[i + r, j + c]` for the block's `rows` x `cols` (the rest as it was):
/// what the tiles sum onto when a block accumulates outside dst.
///
/// # Safety
/// That block of `dst` lies inside it and no other thread writes it.
unsafe fn load_tile(dst: Dst, (i, j): (usize, usize), (rows, cols): (usize, usize), tile: &mut Block) {
    for (r, row) in tile.0.iter_mut().enumerate().take(rows) {
        // SAFETY: row i + r, columns j..j + cols are inside dst (the caller's promise).
        let src = unsafe { std::slice::from_raw_parts(dst.ptr.add((i + r) * dst.ld + j), cols) };
        row[..cols].copy_from_slice(src);
    }
}

/// Asks for the 32 rows x 128 bytes of the output block at `c` (rows `ld` f32 apart) into L2:
/// a product's output is written once, mostly to lines no cache holds, and the tile stores
/// that miss hold up the tile loads and products behind them (the W_up product on cold
/// output: 17% -> 24% of the peak in a C probe; bf16 training +7-10%).
#[target_feature(enable = "sse")]
unsafe fn prefetch_block(c: *const f32, ld: usize) {
    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
    for r in 0..T {
        // A hint: no access is made, so any address is sound.
        let row = c.wrapping_add(r * ld) as *const i8;
        _mm_prefetch::<_MM_HINT_T1>(row);
        _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(64));
    }
}

/// Palette 1: tmm0..7 all 16 rows of 64 bytes.
unsafe fn configure() {
    #[repr(C, align(64))]
    struct Config([u8; 64]);
    let mut cfg = Config([0; 64]);
    cfg.0[0] = 1;
    for t in 0..8 {
        cfg.0[16 + 2 * t..16 + 2 * t + 2].copy_from_slice(&64u16.to_le_bytes());
        cfg.0[48 + t] = 16;
    }
    // SAFETY: a valid palette-1 configuration in a 64-byte block.
    unsafe { std::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
}

/// The 32 x 32 f32 block at `c` (rows `ld` bytes apart, on lines) `(+)= lhs rhs` over
/// `steps` k steps of packed `a` and `b`: summed in the tiles from zero, or from the block's
/// own values when `load`, and stored back.
unsafe fn micro(a: *const u16, b: *const u32, steps: usize, (c, ld): (*mut f32, usize), load: bool) {
    let stride: usize = 64;
    // SAFETY: the four 16 x 16 quarters of the caller's block.
    let (c1, c2, c3) = unsafe { (c.add(16), c.byte_add(16 * ld), c.byte_add(16 * ld).add(16)) };
    // SAFETY: the accumulator tiles from the caller's block, or zeroed.
    unsafe {
        if load {
            std::arch::asm!(
                "tileloadd tmm0, [{c} + {os}*1]",
                "tileloadd tmm1, [{c1} + {os}*1]",
                "tileloadd tmm2, [{c2} + {os}*1]",
                "tileloadd tmm3, [{c3} + {os}*1]",
                os = in(reg) ld,
                c = in(reg) c,
                c1 = in(reg) c1,
                c2 = in(reg) c2,
                c3 = in(reg) c3,
                options(nostack, readonly)
            );
        } else {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack)
            );
        }
    }
    // SAFETY: each step reads 2 KB of `a` and 2 KB of `b` within the packed tiles; the four
    // quarters are stored inside the caller's block.
    unsafe {
        std::arch::asm!(
            "2:",
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1]",
            "add {a}, 1024",
            "add {b}, 1024",
            "tileloadd tmm5, [{a} + {s}*1]",
            "tileloadd tmm7, [{b} + {s}*1]",
            "add {a}, 1024",
            "add {b}, 1024",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            "tilestored [{c} + {os}*1], tmm0",
            "tilestored [{c1} + {os}*1], tmm1",
            "tilestored [{c2} + {os}*1], tmm2",
            "tilestored [{c3} + {os}*1], tmm3",
            a = inout(reg) a => _,
            b = inout(reg) b => _,
            n = inout(reg) steps => _,
            s = in(reg) stride,
            os = in(reg) ld,
            c = in(reg) c,
            c1 = in(reg) c1,
            c2 = in(reg) c2,
            c3 = in(reg) c3,
            options(nostack)
        );
    }
}

/// `tdpbf16ps` throughput on this thread: GFLOP/s of `iters` rounds of four independent tile
/// products (16 x 16 x 32 each, 16384 FLOP), tiles never loaded. Needs [`permit`].
pub fn peak_gflops(iters: usize) -> f64 {
    let t = std::time::Instant::now();
    // SAFETY: configures palette 1 and runs tile products on zeroed tiles; released after.
    unsafe {
        configure();
        std::arch::asm!(
            "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
            "tilezero tmm4", "tilezero tmm5", "tilezero tmm6", "tilezero tmm7",
            "2:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "dec {n}",
            "jnz 2b",
            "tilerelease",
            n = inout(reg) iters.max(1) => _,
            options(nostack)
        );
    }
    4.0 * 16384.0 * iters.max(1) as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `tileloadd` reads whole 64-byte rows: the buffers must start on a line (see [`Line`]),
    /// and a reused buffer must come back zeroed (packing leaves the padding unwritten).
    #[test]
    fn tile_buffers_start_on_a_line_and_come_back_zeroed() {
        let mut buf = TileBuf::new();
        for len in [1usize, 17, 4096, 3, 70_000, 5] {
            let words = buf.zeroed_u32(len);
            assert_eq!((words.len(), words.as_ptr() as usize % 64), (len, 0), "u32 x {len}");
            assert!(words.iter().all(|&w| w == 0), "u32 x {len} zeroed");
            words.fill(u32::MAX);
            let halves = buf.zeroed_u16(len);
            assert_eq!((halves.len(), halves.as_ptr() as usize % 64), (len, 0), "u16 x {len}");
            assert!(halves.iter().all(|&h| h == 0), "u16 x {len} zeroed");
            halves.fill(u16::MAX);
        }
        assert_eq!(std::mem::align_of::<Block>(), 64);
        let words = buf.overwritten_u32(9);
        assert_eq!((words.len(), words.as_ptr() as usize % 64), (9, 0));
    }

    /// A product's bits do not depend on where dst lies: blocks on line boundaries are summed
    /// in the tiles in place, others through an aligned block, onto the same values in the
    /// same order. Whole and ragged blocks, two k blocks, set and accumulating; and the rows
    /// on lines do take the in-place path (they are 64-byte aligned here).
    #[test]
    fn the_sums_do_not_depend_on_where_dst_lies() {
        use super::super::bf16::{Isa, available};
        if !available().contains(&Isa::Amx) {
            assert!(std::env::var_os("CI").is_none(), "CI runs on CPUs with AMX");
            eprintln!("SKIPPED: this CPU has no AMX-BF16 (or Linux refused the tile state)");
            return;
        }
        let mut rng = crate::rng::SplitMix64::new(11);
        for [m, n, k] in [[96usize, 64usize, 700usize], [70, 48, 64], [64, 96, 1024]] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.next_f32() - 0.5).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.next_f32() - 0.5).collect();
            let start: Vec<f32> = (0..m * n).map(|_| rng.next_f32() * 4.0).collect();
            let (l, r) = (Operand::rows(a.as_ptr(), k), Operand::rows(b.as_ptr(), n));
            for accumulate in [false, true] {
                // One buffer on a line, the product at float 0 (on lines) and at float 4 (off).
                let mut buf = TileBuf::new();
                let words = buf.zeroed_u32(m * n + 16);
                assert_eq!(words.as_ptr() as usize % 64, 0);
                let [on, off] = [0usize, 4].map(|at| {
                    let before = IN_PLACE.load(std::sync::atomic::Ordering::Relaxed);
                    let out: &mut [f32] = bytemuck_f32(&mut words[at..at + m * n]);
                    out.copy_from_slice(&start);
                    let d = Dst::set(out.as_mut_ptr(), n).with(1.0, accumulate);
                    // SAFETY: the operands and `out` hold the shapes; the CPU has AMX.
                    unsafe { gemm([m, n, k], d, l, r, true, None) };
                    if at == 0 {
                        // Other tests' products may add to the count too, never take from it.
                        let done = IN_PLACE.load(std::sync::atomic::Ordering::Relaxed) - before;
                        assert!(done >= (m / T) * (n / T), "{m}x{n}x{k}: whole blocks on lines in place");
                    }
                    out.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
                });
                assert_eq!(on, off, "{m}x{n}x{k}, accumulate {accumulate}");
                let i = (m - 1) * n + n - 1;
                let want: f64 =
                    (0..k).map(|p| a[(m - 1) * k + p] as f64 * b[p * n + n - 1] as f64).sum::<f64>()
                        + if accumulate { start[i] as f64 } else { 0.0 };
                let got = f32::from_bits(on[i]) as f64;
                assert!((got - want).abs() < 2e-2 * (k as f64).sqrt(), "{m}x{n}x{k}: {got} vs {want}");
            }
        }
    }

    /// u32 storage as f32 (same size, alignment and no invalid bits).
    fn bytemuck_f32(words: &mut [u32]) -> &mut [f32] {
        // SAFETY: as above.
        unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len()) }
    }

    /// The right-hand layout by its definition, element by element, against the packing (its
    /// vector branches where the CPU has AVX512-BF16, the scalar one elsewhere and at the
    /// ragged edges), for a matrix read by rows and read transposed, into a fresh buffer and
    /// into a reused one full of ones: the packing writes every u32 (padding included), so a
    /// reused buffer is not zeroed first.
    #[test]
    fn the_rhs_packing_follows_the_tile_layout_over_any_old_contents() {
        let (k, n): (usize, usize) = (70, 45);
        let m: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let (steps, panels) = (k.div_ceil(KS), n.div_ceil(T));
        for (name, transposed) in [("rows", false), ("transposed", true)] {
            // rhs[r][c] is m[r][c] read by rows, m[c][r] of the [n, k] matrix read transposed.
            let at = |r: usize, c: usize| -> u32 {
                if r >= k || c >= n {
                    return 0;
                }
                bf16(if transposed { m[c * k + r] } else { m[r * n + c] }) as u32
            };
            let op =
                if transposed { Operand::transposed(m.as_ptr(), k) } else { Operand::rows(m.as_ptr(), n) };
            let mut fresh = TileBuf::new();
            // SAFETY: `m` holds k x n either way.
            let got = unsafe { pack(&mut fresh, [k, n], op) }.data.to_vec();
            let mut used = TileBuf::new();
            used.zeroed_u32(got.len() + 100).fill(u32::MAX);
            // SAFETY: as above.
            let over_old = unsafe { pack(&mut used, [k, n], op) }.data.to_vec();
            let mut want = vec![0u32; panels * steps * T * KS / 2];
            for (panel, s, half, p, j) in (0..panels).flat_map(|panel| {
                (0..steps).flat_map(move |s| {
                    (0..2).flat_map(move |half| {
                        (0..16).flat_map(move |p| (0..16).map(move |j| (panel, s, half, p, j)))
                    })
                })
            }) {
                // [panel][step][half][16 pairs][16 columns] u32: (k 2p, k 2p + 1) of column j.
                let (r, c) = (s * KS + 2 * p, panel * T + half * 16 + j);
                want[(((panel * steps + s) * 2 + half) * 16 + p) * 16 + j] = at(r, c) | at(r + 1, c) << 16;
            }
            assert_eq!(got, want, "{name}");
            assert_eq!(over_old, want, "{name}, into a reused buffer");
        }
    }

    /// As the products pack a k block (`gemm`): rows k0.. of the operand, in parallel, into a
    /// buffer full of ones; the same layout, element by element, for a block that starts
    /// past row 0 and one that ends ragged, read by rows and read transposed (the vector
    /// branches where the CPU has AVX512-BF16, the scalar one elsewhere).
    #[test]
    fn a_k_block_packs_in_parallel_as_its_definition() {
        let (k, n): (usize, usize) = (140, 83);
        let m: Vec<f32> = (0..k * n).map(|i| (i as f32 * 0.61).cos() * 2.0).collect();
        for transposed in [false, true] {
            let op =
                if transposed { Operand::transposed(m.as_ptr(), k) } else { Operand::rows(m.as_ptr(), n) };
            for (k0, kc) in [(0usize, 64usize), (64, 76)] {
                let (steps, panels) = (kc.div_ceil(KS), n.div_ceil(T));
                let mut out = vec![u32::MAX; panels * steps * T * KS / 2];
                let unused = Dst::set(std::ptr::null_mut(), 0);
                // SAFETY: `m` holds k x n either way; rows k0..k0 + kc are inside it.
                unsafe { pack_rhs(&mut out, Shared { dst: unused, lhs: op }, (k0, kc), n, (steps, true)) };
                let at = |r: usize, c: usize| -> u32 {
                    if r >= kc || c >= n {
                        return 0;
                    }
                    let (r, c) = (k0 + r, c);
                    bf16(if transposed { m[c * k + r] } else { m[r * n + c] }) as u32
                };
                for (i, &got) in out.iter().enumerate() {
                    // [panel][step][half][16 pairs][16 columns]
                    let (j, p, half) = (i % 16, i / 16 % 16, i / 256 % 2);
                    let (s, panel) = (i / 512 % steps, i / (512 * steps));
                    let (r, c) = (s * KS + 2 * p, panel * T + half * 16 + j);
                    let want = at(r, c) | at(r + 1, c) << 16;
                    assert_eq!(got, want, "transposed {transposed}, k0 {k0}, u32 {i}");
                }
            }
        }
    }
}
