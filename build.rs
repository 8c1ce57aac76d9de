//! With the `cuda` feature, compiles the CUDA emulator (`src/engine/cuda/emu.cpp`: the
//! kernels of `kernels.cu` as C++ for the CPU), so tests run every kernel without a GPU.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=src/engine/cuda/emu.cpp");
    println!("cargo:rerun-if-changed=src/engine/cuda/kernels.cu");
    cc::Build::new()
        .cpp(true)
        .file("src/engine/cuda/emu.cpp")
        .std("c++20")
        .opt_level(2)
        .flag_if_supported("-Wno-sign-compare")
        .flag_if_supported("-Wno-unknown-pragmas")
        // The attention kernels share one parameter list; not every kernel reads every size.
        .flag_if_supported("-Wno-unused-parameter")
        .compile("minimind_cuda_emu");
}
