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
/// Positions per block of the embedding backward's sort (`EMBED_CHUNK` in kernels.cu).
pub const EMBED_CHUNK: usize = 256;

/// Bytes the CUDA kernels keep for themselves beside the model's buffers, training `n` rows
/// of `c` channels over a vocabulary of `v`: RMSNorm's weight-gradient partials
/// `[min(256, n), c]` f32, the embedding backward's sort (i32: a count per chunk of 256
/// positions and id, a rank and a slot per position, a total and an offset per id), and
/// cuBLAS's workspace. Pure.
pub fn kernel_scratch_bytes(n: usize, c: usize, v: usize) -> u64 {
    let partials = 4 * DW_PARTS.min(n.max(1)) * c;
    let sort = 4 * (n.div_ceil(EMBED_CHUNK) * v + 2 * n + 2 * v + 1);
    (partials + sort + CUBLAS_WORKSPACE_BYTES) as u64
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
