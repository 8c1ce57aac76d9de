//! Finding NVIDIA GPUs. cudarc panics when a CUDA library it needs cannot be loaded, so every
//! library is found and opened here first (see `cuda::libs`) and a missing one becomes a
//! clear error: what was tried, and the fix.

/// A GPU that cannot be used here: no driver, a CUDA library missing, no such device. A
/// problem of the machine's setup, not of the run: exit 2, as for a bad config.
#[derive(Debug)]
pub struct Unusable(pub String);

impl std::fmt::Display for Unusable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unusable {}

/// cuBLAS's workspace on a GPU (the emulator has none): 32 MiB, cuBLAS's advice for Hopper.
pub const CUBLAS_WORKSPACE_BYTES: usize = 32 << 20;
/// Row groups of RMSNorm's weight gradient on a GPU (partial sums added in order).
pub const DW_PARTS: usize = 256;
/// Positions per block of the counting sort (`SORT_CHUNK` in kernels.cu).
pub const SORT_CHUNK: usize = 256;

/// Bytes the CUDA kernels keep for themselves beside the model's buffers, training `n` rows
/// of `c` channels over a vocabulary of `v`, and `slots` MoE slots over `e` experts (0 and 0
/// without MoE): RMSNorm's weight-gradient partials `[min(256, n), c]` f32, the counting
/// sort's scratch for the larger of its two uses (i32: a count per chunk of 256 positions and
/// key, a rank and a slot per position, a total and an offset per key), and cuBLAS's
/// workspace. Pure.
pub fn kernel_scratch_bytes(n: usize, c: usize, v: usize, slots: usize, e: usize) -> u64 {
    let partials = 4 * DW_PARTS.min(n.max(1)) * c;
    let sort = |n: usize, v: usize| 4 * (n.div_ceil(SORT_CHUNK) * v + 2 * n + 2 * v + 1);
    (partials + sort(n, v).max(sort(slots, e)) + CUBLAS_WORKSPACE_BYTES) as u64
}

/// Whether 16-bit attention with heads `d` wide takes the flash kernels (`mma.sync`) on a GPU
/// of sm_80 or later (every GPU the step-time model knows): no scratch, no scores in memory.
/// Other widths, and older GPUs, take the cuBLAS path below. Pure.
pub fn flash_width(d: usize) -> bool {
    matches!(d, 64 | 128)
}

/// The share of free device memory the tensor-core attention may take for its scratch (the
/// scores and probabilities of a chunk of sequences); beyond it, chunks get smaller.
pub const ATTENTION_MEMORY_SHARE: f64 = 0.5;

/// Where the tensor-core attention's scratch for `c` sequences of `t` tokens, `h` query
/// heads, `g` key/value heads of width `d` puts each part, in bytes (each 256-byte aligned):
/// the scores S (f32, `[c, H, T, T]`), the probabilities P, then Q, K, V, O (or dO), dQ, dK,
/// dV head-major, those in `act` bytes per element. Returns the offsets and the total. Pure.
pub fn attention_scratch(
    c: usize,
    t: usize,
    h: usize,
    g: usize,
    d: usize,
    act: usize,
) -> ([usize; 9], usize) {
    let scores = c * h * t * t;
    let (qo, kv) = (c * h * t * d, c * g * t * d);
    let sizes =
        [4 * scores, act * scores, act * qo, act * kv, act * kv, act * qo, act * qo, act * kv, act * kv];
    let mut offsets = [0; 9];
    let mut at = 0;
    for (o, size) in offsets.iter_mut().zip(sizes) {
        *o = at;
        at += size.div_ceil(256) * 256;
    }
    (offsets, at)
}

/// Sequences per chunk of the tensor-core attention: all `b` when their scratch
/// (`bytes_for(c)` for `c` sequences) fits `budget` bytes (no budget: no limit), else as many
/// as fit; 0 when not even one does. Pure.
pub fn attention_chunk(b: usize, budget: Option<usize>, bytes_for: impl Fn(usize) -> usize) -> usize {
    let Some(budget) = budget else { return b };
    // Near linear: padding makes a chunk of c a little less than c times one sequence.
    let mut c = b.min(budget / bytes_for(1).max(1));
    while c < b && bytes_for(c + 1) <= budget {
        c += 1;
    }
    while c > 0 && bytes_for(c) > budget {
        c -= 1;
    }
    c
}

/// The GPUs this process can use, by name (`cuda:0` first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gpus {
    pub names: Vec<String>,
}

/// The GPUs of this machine, or why there are none to use.
#[cfg(not(feature = "cuda"))]
pub fn probe() -> Result<Gpus, String> {
    Err("this build has no CUDA engine (build it with `cargo build --release --features cuda`)".into())
}

/// The GPUs of this machine, or why there are none to use.
#[cfg(feature = "cuda")]
pub fn probe() -> Result<Gpus, String> {
    use cudarc::driver::result;
    let emulated = super::cuda::emu::wanted();
    if emulated > 0 {
        return Ok(Gpus { names: (0..emulated).map(|i| format!("CUDA emulator {i}")).collect() });
    }
    use super::cuda::libs::{Lib, get};
    for lib in [Lib::Driver, Lib::Cublas, Lib::Nvrtc] {
        get(lib).map_err(|missing| missing.to_string())?;
    }
    result::init().map_err(|e| format!("the CUDA driver failed to start: {e}"))?;
    let count = result::device::get_count().map_err(|e| format!("cannot count the GPUs: {e}"))?;
    if count <= 0 {
        return Err("the CUDA driver reports no GPU".into());
    }
    let names = (0..count)
        .map(|i| {
            result::device::get(i).and_then(result::device::get_name).unwrap_or_else(|_| format!("GPU {i}"))
        })
        .collect();
    Ok(Gpus { names })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attention_scratch_layout_is_aligned_and_adds_up() {
        // One sequence of MiniMind2-small (T 512, H 8, G 2, D 64) in bf16.
        let (offsets, total) = attention_scratch(1, 512, 8, 2, 64, 2);
        let scores = 8 * 512 * 512;
        assert_eq!(offsets[..3], [0, 4 * scores, 6 * scores]);
        assert!(offsets.iter().all(|o| o % 256 == 0));
        assert_eq!(total, 6 * scores + 2 * (3 * 8 + 4 * 2) * 512 * 64);
        // Ragged sizes round each part up to 256 bytes.
        let (offsets, total) = attention_scratch(1, 3, 1, 1, 5, 2);
        assert_eq!(offsets, [0, 256, 512, 768, 1024, 1280, 1536, 1792, 2048]);
        assert_eq!(total, 2304);
    }

    #[test]
    fn attention_chunk_table() {
        let per = |c: usize| 100 * c + 10;
        // Padding that shrinks per sequence as chunks grow.
        let padded = |c: usize| 100 * c + 60 - 10 * c.min(5);
        let table = [
            ((32, None), 32),
            ((32, Some(100_000)), 32),
            ((32, Some(1000)), 9),
            ((32, Some(110)), 1),
            ((32, Some(109)), 0),
            ((4, Some(0)), 0),
        ];
        for ((b, budget), want) in table {
            assert_eq!(attention_chunk(b, budget, per), want, "b {b}, budget {budget:?}");
        }
        // 1 sequence: 150 bytes, 2: 240, 3: 330: a budget of 260 holds two.
        assert_eq!(attention_chunk(8, Some(260), padded), 2);
    }
}
