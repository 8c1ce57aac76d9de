//! Finding NVIDIA GPUs. cudarc panics when a CUDA library it needs cannot be loaded, so every
//! library is probed here first and a missing one becomes one clear line.

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
    // SAFETY: only tries to dlopen the libraries.
    let (driver, cublas, nvrtc) = unsafe {
        (
            cudarc::driver::sys::is_culib_present(),
            cudarc::cublas::sys::is_culib_present(),
            cudarc::nvrtc::sys::is_culib_present(),
        )
    };
    if !driver {
        return Err("no CUDA driver found (libcuda.so is not loadable)".into());
    }
    if !cublas || !nvrtc {
        let missing = if cublas { "NVRTC (libnvrtc.so)" } else { "cuBLAS (libcublas.so)" };
        return Err(format!(
            "the CUDA driver is here but {missing} is not loadable\n  hint: add the CUDA libraries' folder to LD_LIBRARY_PATH"
        ));
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
