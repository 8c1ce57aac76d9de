//! `minimind selftest`: the conformance suite (`engine::conformance`) on a device, one line per
//! kernel with its worst error, then the PyTorch fixtures through the engine on that device.

use std::path::Path;

use anyhow::{Result, bail};

use crate::config::{Device, Dtype};
use crate::engine::conformance::{self, Check, FixtureTolerance};
use crate::engine::cpu::Cpu;
use crate::metrics::say;

/// Kernel tolerances against the CPU: the GPU sums in other orders and uses its own `exp`.
fn gpu_tolerance(kernel: &str) -> f64 {
    if kernel.starts_with("attention") || kernel.contains("router") || kernel.contains("cross_entropy") {
        1e-4
    } else {
        2e-5
    }
}

/// Runs the suite on `device`; `fixtures` is the folder of PyTorch fixtures (skipped with a
/// note when it is not there). Fails when any check fails.
pub fn run(device: Device, fixtures: &Path) -> Result<()> {
    let many = crate::threads::pool(0)?;
    let one = crate::threads::pool(1)?;
    let mut checks: Vec<Check> = Vec::new();
    match device {
        Device::Cpu | Device::Auto => {
            say("kernels: the CPU on every core against the CPU on one thread (must agree bit for bit)");
            let (s, r) = (Cpu::new(), Cpu::new());
            checks.extend(conformance::kernels(&s, &r, &|f| many.install(f), &|f| one.install(f), &|_| 0.0));
        }
        Device::Cuda(ordinal) => cuda_kernels(ordinal, &many, &mut checks)?,
    }
    print(&checks);
    let mut all = checks;
    if matches!(device, Device::Cpu | Device::Auto) {
        let mut products = Vec::new();
        many.install(|| bf16_products(&mut products));
        print(&products);
        all.extend(products);
    }
    let names = ["dense_tiny", "moe_tiny", "dense_songci"];
    if names.iter().all(|n| fixtures.join(n).is_dir()) {
        let runs: Vec<(Dtype, FixtureTolerance)> = match device {
            Device::Cuda(_) => vec![
                (Dtype::Float32, FixtureTolerance::FLOAT32),
                (Dtype::Bfloat16, FixtureTolerance::BFLOAT16),
            ],
            // The CPU's bf16 products (mixed precision) where this CPU has a bf16 path.
            _ if crate::engine::backend::cpu_products(Dtype::Bfloat16).is_ok() => vec![
                (Dtype::Float32, FixtureTolerance::FLOAT32),
                (Dtype::Bfloat16, FixtureTolerance::BFLOAT16),
            ],
            _ => vec![(Dtype::Float32, FixtureTolerance::FLOAT32)],
        };
        for (dtype, tol) in runs {
            say(&format!("fixtures ({}), {dtype:?} on {device}:", fixtures.display()));
            let mut checks = Vec::new();
            for name in names {
                let dir = fixtures.join(name);
                let task = FixtureTask { dir: &dir, tol };
                let found = many.install(|| crate::engine::backend::run(device, dtype, false, task))??;
                checks.extend(found);
            }
            print(&checks);
            all.extend(checks);
        }
    } else {
        say(&format!("fixtures: not found in {} (give --fixtures DIR); skipped", fixtures.display()));
    }
    let failed: Vec<&Check> = all.iter().filter(|c| !c.passed()).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} checks failed: {}",
            failed.len(),
            all.len(),
            failed.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
        );
    }
    say(&format!("all {} checks passed", all.len()));
    Ok(())
}

/// The CPU's bf16 products (each path this CPU has) against its f32 products at MiniMind2-small
/// shapes: relative error of the whole output, at bf16's tolerance (inputs rounded to 8 bits
/// of mantissa): what `train.dtype = "bfloat16"` multiplies with on the CPU.
fn bf16_products(checks: &mut Vec<Check>) {
    use crate::engine::cpu::bf16;
    let default = match bf16::isa() {
        Ok(isa) => isa.name().to_string(),
        Err(why) => format!("none ({why})"),
    };
    let paths = bf16::available();
    say(&format!(
        "bf16 products ({}; the default path {default}) against f32 products, on every path this CPU has:",
        bf16::describe_cpu()
    ));
    if paths.is_empty() {
        say("  no bf16 path on this CPU: nothing to check");
        return;
    }
    for (name, shape, transposed) in bf16::minimind_shapes(256, 512, 1408, 6400) {
        let (lhs, rhs) = bf16::random_operands(shape, 11);
        let mut want = vec![0f32; shape[0] * shape[1]];
        bf16::product(shape, transposed, (&lhs, &rhs), &mut want, bf16::Isa::F32);
        let den: f64 = want.iter().map(|w| (*w as f64).powi(2)).sum();
        for &path in &paths {
            let mut got = vec![0f32; want.len()];
            bf16::product(shape, transposed, (&lhs, &rhs), &mut got, path);
            let num: f64 = got.iter().zip(&want).map(|(g, w)| (*g as f64 - *w as f64).powi(2)).sum();
            checks.push(Check {
                name: format!("matmul {} {name}", path.name()),
                worst: (num / den.max(1e-300)).sqrt(),
                tolerance: 1e-2,
            });
        }
    }
    // Attention's products on the paths that take them (AMX): the suite's attention cases
    // (ragged tiles, G < H, heads 16 to 160 wide) against f32, at the bf16 kernels' tolerance.
    for &path in paths.iter().filter(|p| p.takes_attention()) {
        let (subject, reference) = (Cpu::new().with_products(path), Cpu::new());
        let found = conformance::kernels(&subject, &reference, &|f| f(), &|f| f(), &|_| 2e-2);
        let attention =
            found.into_iter().filter(|c| c.name.contains("attention") && !c.name.contains("decode"));
        checks.extend(attention.map(|c| Check { name: format!("{} [{}]", c.name, path.name()), ..c }));
    }
}

fn print(checks: &[Check]) {
    for c in checks {
        say(&format!(
            "  {:<44} worst error {:>9.2e}  (tolerance {:.0e})  {}",
            c.name,
            c.worst,
            c.tolerance,
            if c.passed() { "ok" } else { "FAIL" }
        ));
    }
}

struct FixtureTask<'a> {
    dir: &'a Path,
    tol: FixtureTolerance,
}

impl crate::engine::backend::Task for FixtureTask<'_> {
    type Out = Result<Vec<Check>>;
    fn run<K: crate::engine::Kernels>(self, kernels: K) -> Result<Vec<Check>> {
        conformance::fixture(kernels, self.dir, self.tol)
    }
}

#[cfg(feature = "cuda")]
fn cuda_kernels(ordinal: usize, pool: &rayon::ThreadPool, checks: &mut Vec<Check>) -> Result<()> {
    use crate::engine::Kernels;
    use crate::engine::cuda::libs::{self, Lib};
    let emulated = crate::engine::cuda::emu::wanted() > 0;
    if !emulated {
        // Which file each library came from and its version: the first thing to know when a
        // GPU machine misbehaves. NCCL is optional (data parallel only).
        say("libraries:");
        for line in libs::report(&[Lib::Driver, Lib::Cublas, Lib::Nvrtc, Lib::Nccl]) {
            say(&format!("  {line}"));
        }
    }
    let gpu = crate::engine::cuda::Cuda::new(ordinal, Dtype::Float32)?;
    if let Some(build) = gpu.build() {
        say(&format!("kernels: {} for {} ({})", build.image(), build.target, build.origin));
    }
    say(&format!("kernels: {} (float32, TF32 off) against the CPU", gpu.describe()));
    let cpu = Cpu::new();
    checks.extend(conformance::kernels(&gpu, &cpu, &|f| f(), &|f| pool.install(f), &gpu_tolerance));
    gpu.check()?;
    // The same cases with activations stored in 16 bits (the kernels' 16-bit forms and matrix
    // products on 16-bit operands), against the CPU's f32: within one rounding or so.
    for (dtype, tag, tolerance) in HALF_TOLERANCES {
        let gpu = crate::engine::cuda::Cuda::new(ordinal, dtype)?;
        say(&format!("kernels: {} (activations in {tag}) against the CPU", gpu.describe()));
        let half = conformance::kernels(&gpu, &cpu, &|f| f(), &|f| pool.install(f), &|_| tolerance);
        checks.extend(half.into_iter().map(|c| Check { name: format!("{} [{tag}]", c.name), ..c }));
        gpu.check()?;
    }
    Ok(())
}

/// A kernel's outputs with its activations stored in 16 bits against the CPU's f32: bf16 keeps
/// 8 bits of mantissa (one rounding is up to 2^-9 relative), f16 11 (2^-12).
#[cfg(feature = "cuda")]
const HALF_TOLERANCES: [(Dtype, &str, f64); 2] =
    [(Dtype::Bfloat16, "bf16", 2e-2), (Dtype::Float16, "f16", 5e-3)];

#[cfg(not(feature = "cuda"))]
fn cuda_kernels(_: usize, _: &rayon::ThreadPool, _: &mut Vec<Check>) -> Result<()> {
    let _ = gpu_tolerance;
    bail!("this build has no CUDA engine (build it with `cargo build --release --features cuda`)")
}
