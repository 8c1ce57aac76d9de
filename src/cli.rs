//! Command-line surface: clap commands mapped to library calls. No training logic here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{self, Assign, ConfigError, PlannedRun};
use crate::run_dir;
use crate::runner;
use crate::train::{Outcome, Session};

/// Config-driven MiniMind pretraining: experiment files in, run folders out.
#[derive(Parser, Debug)]
#[command(name = "minimind", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train every run of the experiment files (every sweep point in turn).
    Run {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override a key: `section.key=value` (TOML value syntax); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the runs and folders that would be created, create nothing.
        #[arg(long)]
        dry_run: bool,
        /// No progress bars, plain lines only.
        #[arg(long)]
        quiet: bool,
        /// Testing aid: stop as if interrupted right after this optimiser step.
        #[arg(long, hide = true)]
        stop_after: Option<usize>,
    },
    /// Continue an interrupted run exactly, from its last complete checkpoint.
    Resume {
        run_dir: PathBuf,
        #[arg(long)]
        quiet: bool,
        #[arg(long, hide = true)]
        stop_after: Option<usize>,
    },
    /// Mean next-token loss of a model folder on the first N*B samples of a jsonl file.
    Eval {
        /// Folder with config.json, model.safetensors and tokenizer.json.
        #[arg(long)]
        hf_dir: PathBuf,
        #[arg(long)]
        data: PathBuf,
        #[arg(long)]
        seq_len: usize,
        #[arg(long)]
        batch_size: usize,
        /// Batches to evaluate.
        #[arg(long, default_value_t = 1)]
        batches: usize,
        /// Tokenizer to use instead of HF_DIR/tokenizer.json.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Print `{"loss": ..., "tokens": ...}`.
        #[arg(long)]
        json: bool,
    },
    /// Sample text from a trained model (a run folder or a model folder).
    Generate {
        dir: PathBuf,
        #[arg(long)]
        prompt: String,
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        #[arg(long, default_value_t = 0.85)]
        temperature: f32,
        #[arg(long, default_value_t = 0.85)]
        top_p: f32,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Show the expanded runs: tag, overrides, parameters, tokens per step.
    Plan {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Print the fully resolved config as TOML.
    Config {
        file: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Follow each value with where it came from.
        #[arg(long)]
        sources: bool,
    },
    /// Check experiment files; exit 0 when all are valid, 2 otherwise.
    Validate {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Print the JSON schema of experiment files.
    Schema,
    /// Training throughput of the configured model on synthetic tokens.
    Bench {
        file: PathBuf,
        /// Timed optimiser steps (after two untimed warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Time every kernel and print where the time goes.
        #[arg(long)]
        profile: bool,
    },
}

/// Parses the command line, runs the command, prints any error chain; 0 ok, 1 failure, 2 bad
/// config or usage.
pub fn main() -> ExitCode {
    // Die quietly on a closed pipe (`minimind plan x | head`), like other Unix tools,
    // instead of panicking inside println!.
    // SAFETY: restoring a signal's default disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.chain().any(|c| c.is::<ConfigError>()) { ExitCode::from(2) } else { ExitCode::from(1) }
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Run { files, set, dry_run, quiet, stop_after } => {
            let mut runs = Vec::new();
            for file in &files {
                runs.extend(load(file, &set)?);
            }
            if dry_run {
                print_dry_run(&runs);
                return Ok(ExitCode::SUCCESS);
            }
            let stop = runner::install_signals()?;
            let mut failed = 0;
            for run in &runs {
                let session = Session { resume: false, stop: stop.clone(), stop_after, quiet };
                match runner::start(run, std::env::args().collect(), session) {
                    Ok((_, Outcome::Completed)) => {}
                    Ok((_, outcome)) => return Ok(ExitCode::from(runner::exit_code(outcome))),
                    Err(e) if runs.len() > 1 => {
                        failed += 1;
                        eprintln!("error: run {}: {e:#}", run.tag.as_deref().unwrap_or(&run.config.name));
                    }
                    Err(e) => return Err(e),
                }
            }
            if failed > 0 {
                anyhow::bail!("{failed} of {} runs failed", runs.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume { run_dir, quiet, stop_after } => {
            let stop = runner::install_signals()?;
            let outcome = runner::resume(&run_dir, Session { resume: true, stop, stop_after, quiet })?;
            Ok(ExitCode::from(runner::exit_code(outcome)))
        }
        Command::Eval { hf_dir, data, seq_len, batch_size, batches, tokenizer, json } => {
            let r =
                crate::eval::eval_dir(&hf_dir, &data, tokenizer.as_deref(), seq_len, batch_size, batches)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("loss={} tokens={}", r.loss, r.tokens);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { dir, prompt, max_new_tokens, temperature, top_p, top_k, seed } => {
            let opts = crate::generate::Sampling { max_new_tokens, temperature, top_p, top_k, seed };
            crate::generate::run(&dir, &prompt, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { file, set } => {
            print_plan(&load(&file, &set)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Config { file, set, sources } => {
            for run in load(&file, &set)? {
                if let Some(tag) = &run.tag {
                    println!("# sweep point {tag}");
                }
                print!("{}", config::render(&run.config, sources.then_some(&run.layered)));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Validate { files } => {
            let mut bad = 0;
            for file in &files {
                match load(file, &[]) {
                    Ok(runs) => println!("ok: {} ({} run(s))", file.display(), runs.len()),
                    Err(e) => {
                        bad += 1;
                        eprintln!("error: {e:#}");
                    }
                }
            }
            Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) })
        }
        Command::Bench { file, steps, set, profile } => {
            for run in load(&file, &set)? {
                let c = &run.config;
                crate::train::require_cpu(&c.train)?;
                let r = crate::bench::run(c, steps.max(1), 2, profile)?;
                println!(
                    "{}: hidden {} layers {} moe {} batch {} seq {} accumulation {} threads {}",
                    run.tag.as_deref().unwrap_or(&c.name),
                    c.model.hidden_size,
                    c.model.num_hidden_layers,
                    c.model.use_moe,
                    c.train.batch_size,
                    c.data.max_seq_len,
                    c.train.accumulation_steps,
                    r.threads
                );
                println!(
                    "{} steps of {} tokens in {:.2} s: {:.1} GFLOP/s",
                    r.steps, r.tokens_per_step, r.seconds, r.gflops
                );
                if profile {
                    print_profile(&r);
                }
                println!("tokens_per_s={:.1}", r.tokens_per_s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            print!("{}", config::schema_json());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Loads an experiment with this process's environment and the given `--set` arguments.
fn load(file: &Path, set: &[String]) -> Result<Vec<PlannedRun>> {
    let env = config::parse_env(std::env::vars())?;
    let sets: Vec<Assign> = set.iter().map(|s| config::parse_set(s)).collect::<Result<_, _>>()?;
    Ok(config::load(file, &env, &sets)?)
}

fn print_plan(runs: &[PlannedRun]) {
    println!("{:<28} {:>12} {:>14}  overrides", "run", "parameters", "tokens/step");
    for run in runs {
        let point: Vec<String> =
            run.layered.assigns.iter().map(|a| format!("{}={}", a.key, a.value)).collect();
        println!(
            "{:<28} {:>12} {:>14}  {}",
            run.tag.as_deref().unwrap_or(&run.config.name),
            format_count(run.config.derived.parameters),
            run.config.derived.tokens_per_step,
            if point.is_empty() { "-".to_string() } else { point.join(" ") }
        );
    }
    println!("{} run(s)", runs.len());
}

fn print_dry_run(runs: &[PlannedRun]) {
    let now = chrono::Local::now();
    for run in runs {
        let folder = run_dir::folder_name(&now, &run.config.name, run.tag.as_deref());
        println!(
            "would create {} (config.toml, meta.json, metrics.csv, checkpoints/): {} parameters, {} tokens/step",
            run.config.checkpoint.save_dir.join(folder).display(),
            format_count(run.config.derived.parameters),
            run.config.derived.tokens_per_step
        );
    }
}

/// 25.83M, 1.2K, ...
fn format_count(n: u64) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.2}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

fn print_profile(r: &crate::bench::BenchReport) {
    let total: f64 = r.profile.iter().map(|(_, t)| t.seconds).sum();
    println!("{:<36} {:>7} {:>9} {:>6} {:>8}", "kernel", "calls", "ms/step", "share", "GFLOP/s");
    for (name, t) in &r.profile {
        let gflops = if t.flops > 0.0 { format!("{:.1}", t.flops / t.seconds / 1e9) } else { "-".into() };
        println!(
            "{:<36} {:>7} {:>9.2} {:>5.1}% {:>8}",
            name,
            t.calls / r.steps as u64,
            t.seconds * 1e3 / r.steps as f64,
            100.0 * t.seconds / total,
            gflops
        );
    }
    println!(
        "kernels total {:.1} ms/step of {:.1} ms/step wall",
        total * 1e3 / r.steps as f64,
        r.seconds * 1e3 / r.steps as f64
    );
}
