//! ptxas's report on the compiled kernels (`--ptxas-options=-v`), read by a test: every
//! kernel is there, nothing spills, and no kernel keeps a stack frame (local memory, which
//! lives in DRAM behind the L1) but those allowed below with a reason. The test prints each
//! hot kernel's registers and the occupancy they allow, the table in BENCHMARKS.md.

use super::{TILE_THREADS, TYPED, attention_shared, compile_with_report, kernel_names};

/// What ptxas says of one function.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Properties {
    pub name: String,
    pub registers: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory, bytes.
    pub smem: u32,
}

/// Kernels allowed a stack frame, with the reason. Empty: with the tiled attention templated
/// on the head dimension, its write-backs unrolled and the router's per-expert array gone,
/// no kernel keeps one (NVRTC 12.9 and 13.5, sm_80 and sm_90).
const STACK_ALLOWED: &[(&str, &str)] = &[];

/// The number after `key` in `line` ("Used 32 registers" -> 32 for "Used").
fn number_before(line: &str, word: &str) -> Option<u32> {
    let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
    words.windows(2).find(|w| w[1] == word).and_then(|w| w[0].parse().ok())
}

/// Every function of a ptxas report, in order. Pure.
pub fn parse(log: &str) -> Vec<Properties> {
    let mut out: Vec<Properties> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Function properties for ").nth(1) {
            out.push(Properties { name: rest.trim().to_string(), ..Properties::default() });
            continue;
        }
        let Some(p) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            let nums: Vec<u32> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
            if let [stack, stores, loads] = nums[..] {
                (p.stack, p.spill_stores, p.spill_loads) = (stack, stores, loads);
            }
        } else if line.contains("Used") && line.contains("registers") {
            p.registers = number_before(line, "registers").unwrap_or(0);
            p.smem = line
                .split(',')
                .find(|part| part.trim_end().ends_with("bytes smem"))
                .and_then(|part| part.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
        }
    }
    out
}

/// Resident warps per SM (of 64) for a kernel of `regs` registers, `threads` per block and
/// `smem` bytes of shared memory per block, on an SM with `smem_per_sm` bytes (sm_80: 164 KB,
/// sm_90: 228 KB; 1 KB of each block's is the system's). Registers go in 256-register units
/// per warp from 64 K. Pure.
pub fn resident_warps(regs: u32, threads: u32, smem: u32, smem_per_sm: u32) -> u32 {
    let warps = threads.div_ceil(32);
    let per_warp = (regs.max(1) * 32).div_ceil(256) * 256;
    let by_regs = (65536 / per_warp) / warps;
    let by_smem = if smem == 0 { 32 } else { smem_per_sm / (smem + 1024) };
    let by_threads = 64 / warps;
    by_regs.min(by_smem).min(by_threads).min(32) * warps
}

/// The launch shape of the hot kernels (threads, dynamic shared memory) at MiniMind's shapes
/// (D 64, 4 experts), as `mod.rs` launches them.
fn launch_shape(name: &str) -> Option<(u32, u32)> {
    let base = name.trim_end_matches("_f32").trim_end_matches("_bf16").trim_end_matches("_f16");
    let [fwd, dq, dkv] = attention_shared(64);
    Some(match base {
        "attention_forward_tiled_d64" => (TILE_THREADS, fwd),
        "attention_backward_dq_tiled_d64" => (TILE_THREADS, dq),
        "attention_backward_dkv_tiled_d64" => (TILE_THREADS, dkv),
        // Static shared memory only (counted in ptxas's smem).
        "flash_forward_d64"
        | "flash_backward_dq_d64"
        | "flash_backward_dkv_d64"
        | "flash_forward_d128"
        | "flash_backward_dq_d128"
        | "flash_backward_dkv_d128" => (128, 0),
        "attention_delta"
        | "attn_heads"
        | "attn_heads_rope"
        | "attn_softmax"
        | "attn_dsoftmax"
        | "add_rmsnorm_forward"
        | "rmsnorm_forward"
        | "rmsnorm_backward"
        | "rope"
        | "swiglu_forward"
        | "swiglu_backward"
        | "cross_entropy"
        | "adamw"
        | "embed_forward"
        | "embed_backward"
        | "sort_count"
        | "moe_topk"
        | "moe_place"
        | "moe_aux_terms"
        | "gather_rows"
        | "combine_rows"
        | "combine_rows_act"
        | "slot_dots"
        | "spread_rows"
        | "moe_router_backward" => (256, 0),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_ptxas_report_is_parsed() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'rmsnorm_forward_f32' for 'sm_80'\n\
ptxas info    : Function properties for rmsnorm_forward_f32\n\
ptxas         .     8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 16 registers, used 1 barriers, 128 bytes smem, 396 bytes cmem[0]\n\
ptxas info    : Compile time = 10.156 ms\n\
ptxas info    : Function properties for moe_place\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 32 registers, used 1 barriers\n";
        let got = parse(log);
        let want = [
            Properties {
                name: "rmsnorm_forward_f32".into(),
                registers: 16,
                stack: 8,
                spill_stores: 4,
                spill_loads: 12,
                smem: 128,
            },
            Properties { name: "moe_place".into(), registers: 32, ..Properties::default() },
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn cuda_occupancy_table() {
        // (registers, threads, shared bytes, SM's shared bytes) -> resident warps of 64.
        let table = [
            ((32, 256, 0, 228 << 10), 64),
            ((64, 256, 0, 228 << 10), 32),
            ((128, 128, 33408, 228 << 10), 16),
            ((94, 128, 25088, 228 << 10), 20),
            ((255, 1024, 0, 228 << 10), 0),
            ((16, 128, 41728, 164 << 10), 12),
        ];
        for ((regs, threads, smem, sm), want) in table {
            assert_eq!(
                resident_warps(regs, threads, smem, sm),
                want,
                "{regs} regs, {threads} threads, {smem} B"
            );
        }
    }

    /// Compiles for `arch` with the report, or says why it cannot (NVRTC missing outside CI).
    fn report(arch: &str) -> Option<Vec<Properties>> {
        if super::super::libs::get(super::super::libs::Lib::Nvrtc).is_err() {
            assert!(std::env::var_os("CI").is_none(), "NVRTC is not loadable under CI (.ci/run installs it)");
            eprintln!(
                "SKIPPED: NVRTC is not loadable here; pip install nvidia-cuda-nvrtc-cu12 and set MINIMIND_CUDA_LIBS"
            );
            return None;
        }
        let compiled = compile_with_report(arch).unwrap_or_else(|e| panic!("{e:#}"));
        Some(parse(&compiled.log))
    }

    #[test]
    fn cuda_kernels_compile_for_sm80_and_sm90_without_local_memory() {
        for (arch, smem_per_sm) in [("sm_80", 164 << 10), ("sm_90", 228 << 10)] {
            let Some(functions) = report(arch) else { return };
            for name in kernel_names() {
                assert!(
                    functions.iter().any(|f| &f.name == name),
                    "{arch}: no kernel {name} in ptxas's report"
                );
            }
            let spills: Vec<&Properties> =
                functions.iter().filter(|f| f.spill_stores + f.spill_loads > 0).collect();
            assert!(spills.is_empty(), "{arch}: spills: {spills:?}");
            let stacks: Vec<String> = functions
                .iter()
                .filter(|f| f.stack > 0 && !STACK_ALLOWED.iter().any(|(k, _)| f.name.starts_with(k)))
                .map(|f| format!("{} ({} B)", f.name, f.stack))
                .collect();
            assert!(stacks.is_empty(), "{arch}: stack frames (local memory): {stacks:?}");
            // The table of BENCHMARKS.md: `cargo test ... cuda_kernels_compile -- --nocapture`.
            println!("{arch}: kernel, registers, threads, shared bytes, resident warps of 64");
            for f in &functions {
                let typed = TYPED.iter().any(|t| f.name.starts_with(t));
                if typed && !f.name.ends_with("_bf16") {
                    continue;
                }
                if let Some((threads, dynamic)) = launch_shape(&f.name) {
                    let smem = f.smem + dynamic;
                    let warps = resident_warps(f.registers, threads, smem, smem_per_sm);
                    println!("  {:<36} {:>4} {:>5} {:>6} {:>3}", f.name, f.registers, threads, smem, warps);
                }
            }
        }
    }
}
