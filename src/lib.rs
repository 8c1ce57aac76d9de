//! minimind: a config-driven experiment runner and training engine for MiniMind-style LLM
//! pretraining.

pub mod alloc;
pub mod bench;
pub mod cli;
pub mod config;
pub mod cost;
pub mod data;
pub mod dist;
pub mod engine;
pub mod eval;
pub mod files;
pub mod generate;
pub mod metrics;
pub mod prepare;
pub mod report;
pub mod rng;
pub mod roofline;
pub mod run_dir;
pub mod runner;
pub mod selftest;
pub mod signals;
pub mod slurm;
pub mod sweep;
pub mod threads;
pub mod train;
pub mod units;

#[cfg(test)]
#[global_allocator]
static ALLOC: alloc::Aligned = alloc::Aligned;
