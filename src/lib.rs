//! minimind: a config-driven experiment runner and training engine for MiniMind-style LLM
//! pretraining.

pub mod bench;
pub mod cli;
pub mod config;
pub mod data;
pub mod engine;
pub mod run_dir;
pub mod train;
