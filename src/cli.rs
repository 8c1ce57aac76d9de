//! Command-line surface: clap commands mapped to library calls. No training logic here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::config::{self, ConfigError, ConfigErrors, Device};
use crate::dist::World;
use crate::runner::{self, SessionArgs, load};

/// Config-driven MiniMind pretraining: experiment files in, run folders out.
#[derive(Parser, Debug)]
#[command(name = "minimind", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

const RUN_EXAMPLES: &str = "\
Examples:
  minimind run experiments/tiny.toml
  minimind run experiments/dense_small.toml --set train.learning_rate=1e-3 --set model.use_moe=true
  MINIMIND_TRAIN__BATCH_SIZE=8 minimind run experiments/dense_small.toml
  minimind run experiments/sweeps/lr_moe.toml --dry-run
  minimind run experiments/sweeps/lr_moe.toml -j 2 --launcher local

Layering, lowest to highest: defaults < `extends` chain < the file < MINIMIND_<SECTION>__<KEY>
environment variables < --set < the sweep point. SIGINT/SIGTERM/SIGHUP stop after the current
micro-batch with a checkpoint (exit 130/143/129); a second signal quits at once.";

const RESUME_EXAMPLES: &str = "\
Examples:
  minimind resume runs/20261128-101500-tiny
  minimind resume runs/20261128-101500-tiny --set train.max_steps=400 --set checkpoint.save_interval=50

A resume may --set only keys that change neither the model nor the order of the data.";

#[derive(Subcommand, Debug)]
enum Command {
    /// Train every run of the experiment files (every sweep point in turn).
    #[command(after_help = RUN_EXAMPLES)]
    Run {
        /// Experiment files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print the runs, their folders and their cost; create nothing.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Continue an interrupted run (or a sweep) exactly, from its last complete checkpoint(s).
    #[command(after_help = RESUME_EXAMPLES)]
    Resume {
        /// The run folder (runs/<timestamp>-<name>), or a sweep folder.
        run_dir: PathBuf,
        /// Resume even though the data file, tokenizer or tokens changed since the checkpoint.
        #[arg(long)]
        allow_data_change: bool,
        #[command(flatten)]
        session: SessionArgs,
    },
    /// Mean next-token loss of a model folder on the first N*B samples of a jsonl file.
    Eval {
        #[command(flatten)]
        args: crate::eval::EvalArgs,
        /// Where to run: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: Device,
    },
    /// Sample text from a trained model: a run folder (its export, or its newest checkpoint) or a model folder.
    Generate {
        /// A run folder or a model folder (config.json, model.safetensors, tokenizer.json).
        dir: PathBuf,
        /// The text to continue.
        #[arg(long)]
        prompt: String,
        #[command(flatten)]
        sampling: crate::generate::Sampling,
        /// Where to run: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: Device,
    },
    /// Show the expanded runs: tag, overrides, parameters, tokens per step, memory, FLOPs, time.
    Plan {
        /// Experiment file (TOML).
        file: PathBuf,
        /// Override a key: `section.key=value` (TOML value syntax); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Data parallel: the ranks that will train it (for the global batch).
        #[arg(long, value_name = "N", default_value_t = 1)]
        nproc: usize,
        /// Predict the step time on this GPU (H100, H200, A100, L40S, 4090, 3090): per kernel
        /// class, MFU, whether it fits, the whole run.
        #[arg(long, value_name = "NAME")]
        gpu: Option<String>,
    },
    /// Print the fully resolved config as TOML.
    Config {
        /// Experiment file (TOML).
        file: PathBuf,
        /// Override a key: `section.key=value` (TOML value syntax); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Follow each value with where it came from.
        #[arg(long)]
        sources: bool,
    },
    /// Check experiment files; exit 0 when all are valid, 2 otherwise.
    Validate {
        /// Experiment files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Data: `data prepare FILE` builds an experiment's token cache ahead of training.
    Data {
        #[command(subcommand)]
        command: DataCommand,
    },
    /// Print the JSON schema of experiment files.
    Schema,
    /// Print a shell completion script: `minimind completions bash > ~/.local/share/bash-completion/completions/minimind`.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Runs and sweeps under a folder: status, steps, losses, throughput, start, duration.
    Ls {
        /// The folder to look in.
        #[arg(default_value = "runs")]
        dir: PathBuf,
        /// Print JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The config keys that differ between runs, then their metrics, best validation loss first.
    Compare {
        /// Run folders and sweep folders.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
    },
    /// One line per run of a metric: an SVG or PNG picture.
    Plot {
        /// Run folders and sweep folders.
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The picture to write: FILE.svg or FILE.png.
        #[arg(short = 'o', long = "output")]
        output: PathBuf,
        /// What to plot.
        #[arg(long, value_enum, default_value = "loss")]
        metric: crate::report::Metric,
        /// Along which axis.
        #[arg(long, value_enum, default_value = "step")]
        x: crate::report::XAxis,
        /// A logarithmic y axis.
        #[arg(long)]
        log_y: bool,
    },
    /// A sweep's points: their state from the run folders and, for Slurm, from the queue.
    Status {
        /// The sweep folder.
        sweep_dir: PathBuf,
    },
    /// Check a device's kernels against the CPU's, then the PyTorch fixtures on it.
    Selftest {
        /// The device to check: cpu (against itself on one thread) or cuda / cuda:N.
        #[arg(long, default_value = "cpu")]
        device: Device,
        /// The PyTorch reference fixtures (dense_tiny, moe_tiny, dense_songci).
        #[arg(long, default_value = "../shared/fixtures")]
        fixtures: PathBuf,
    },
    /// Training throughput of the configured model on synthetic tokens.
    Bench {
        /// Experiment file (TOML).
        file: PathBuf,
        /// Timed optimiser steps (after two untimed warm-up steps).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Override a key: `section.key=value` (TOML value syntax); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Time every kernel and print where the time goes.
        #[arg(long)]
        profile: bool,
        /// Time the CPU's matrix products at the experiment's shapes instead: f32 against bf16
        /// (where the CPU has AVX512-BF16), GFLOP/s as medians of alternating rounds.
        #[arg(long, conflicts_with = "profile")]
        matmul: bool,
    },
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Tokenise an experiment's data into its token cache now (shards in parallel, resumable),
    /// with progress and a summary: documents, tokens, skipped rows, tokens per document.
    Prepare {
        /// Experiment file (TOML).
        file: PathBuf,
        /// Override a key: `section.key=value` (TOML value syntax); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// No progress bar, plain lines only.
        #[arg(long)]
        quiet: bool,
        /// Testing aid: stop as if interrupted once this many shards are tokenised.
        #[arg(long, hide = true)]
        stop_after_shards: Option<usize>,
    },
}

/// Parses the command line, runs the command, prints any error chain; 0 ok, 1 failure, 2 bad
/// config or usage.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let trains = matches!(cli.command, Command::Run { dry_run: false, .. } | Command::Resume { .. });
    // A training process outlives a closed stdout (`| head`): writes fail quietly and training
    // goes on, logged to train.log. Other commands die quietly on a closed pipe, like other
    // Unix tools, instead of panicking inside println!.
    // SAFETY: setting a signal's disposition at start-up, before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, if trains { libc::SIG_IGN } else { libc::SIG_DFL });
    }
    // The ranks of a data-parallel launch find each other before anything else (MPI ends
    // when `world` is dropped, after the command).
    let world = if trains { World::init() } else { Ok(World::single()) };
    let world = match world {
        Ok(w) => w,
        Err(e) => return fail(&e, None),
    };
    match dispatch(cli, &world) {
        Ok(code) => code,
        Err(e) => fail(&e, Some(&world)),
    }
}

/// Prints the error chain; exit 2 for a bad config or usage (or a GPU this machine cannot
/// use), else 1. A rank of a
/// data-parallel run ends every rank (the others would wait for it forever).
fn fail(e: &anyhow::Error, world: Option<&World>) -> ExitCode {
    let setup = |c: &(dyn std::error::Error + 'static)| {
        c.is::<ConfigError>() || c.is::<ConfigErrors>() || c.is::<crate::engine::gpu::Unusable>()
    };
    let code = if e.chain().any(setup) { 2 } else { 1 };
    match world.filter(|w| w.size() > 1) {
        Some(w) => {
            let _ = writeln!(std::io::stderr(), "error: rank {}: {e:#}", w.rank());
            w.comm.abort(code)
        }
        None => {
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}

/// Each command is one call; the helpers below only adapt arguments.
fn dispatch(cli: Cli, world: &World) -> Result<ExitCode> {
    match cli.command {
        Command::Run { files, dry_run, session } => runner::run_experiments(&files, dry_run, session, world),
        Command::Resume { run_dir, allow_data_change, session } => {
            runner::resume(&run_dir, allow_data_change, session, world)
        }
        Command::Eval { args, device } => crate::eval::command(&args, device_arg(device)?).map(ok),
        Command::Generate { dir, prompt, sampling, device } => {
            crate::generate::run(&dir, &prompt, &sampling, device_arg(device)?).map(ok)
        }
        Command::Plan { file, set, nproc, gpu } => plan(&file, &set, nproc, gpu.as_deref()).map(ok),
        Command::Config { file, set, sources } => print_config(&file, &set, sources).map(ok),
        Command::Validate { files } => Ok(validate(&files)),
        Command::Data { command: DataCommand::Prepare { file, set, quiet, stop_after_shards } } => {
            prepare(&file, &set, quiet, stop_after_shards)
        }
        Command::Schema => Ok(print_text(&config::schema_json())),
        Command::Completions { shell } => Ok(completions(shell)),
        Command::Ls { dir, json } => crate::report::ls(&dir, json).map(ok),
        Command::Compare { runs } => crate::report::compare(&runs).map(ok),
        Command::Plot { runs, output, metric, x, log_y } => {
            crate::report::plot(&runs, &output, metric, x, log_y).map(ok)
        }
        Command::Status { sweep_dir } => crate::sweep::status(&sweep_dir).map(ok),
        Command::Selftest { device, fixtures } => {
            crate::selftest::run(device_arg(device)?, &fixtures).map(ok)
        }
        Command::Bench { file, steps, set, profile, matmul: true } => {
            let _ = profile;
            crate::bench::matmul(&load(&file, &set)?, steps).map(ok)
        }
        Command::Bench { file, steps, set, profile, matmul: false } => {
            crate::bench::report(&load(&file, &set)?, steps, profile).map(ok)
        }
    }
}

fn ok(_: ()) -> ExitCode {
    ExitCode::SUCCESS
}

fn print_text(text: &str) -> ExitCode {
    print!("{text}");
    ExitCode::SUCCESS
}

/// The completion script of `shell` for every command and option, on stdout.
fn completions(shell: clap_complete::Shell) -> ExitCode {
    use clap::CommandFactory;
    clap_complete::generate(shell, &mut Cli::command(), "minimind", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// The device a `--device` argument resolves to here; a GPU that cannot be used is a usage
/// error (exit 2).
fn device_arg(requested: Device) -> Result<Device, ConfigError> {
    crate::train::choose_device(requested)
        .map(|(device, _)| device)
        .map_err(|why| ConfigError::new(config::Origin::Arg(format!("--device {requested}")), None, why))
}

/// `plan`: the runs' cost here, and with `--gpu` their predicted step on that GPU.
fn plan(file: &Path, set: &[String], nproc: usize, gpu: Option<&str>) -> Result<()> {
    let gpu = gpu
        .map(|name| {
            crate::roofline::find(name)
                .map_err(|why| ConfigError::new(config::Origin::Arg(format!("--gpu {name}")), None, why))
        })
        .transpose()?;
    let runs = load(file, set)?;
    crate::cost::print_plan(&runs, nproc.max(1));
    match gpu {
        Some(gpu) => crate::roofline::print_plan(&runs, gpu),
        None => Ok(()),
    }
}

/// `data prepare`: the experiment's token caches, stoppable like training.
fn prepare(file: &Path, set: &[String], quiet: bool, stop_after_shards: Option<usize>) -> Result<ExitCode> {
    let runs = load(file, set)?;
    let stop = crate::signals::install()?;
    crate::prepare::prepare(&runs, &crate::prepare::Prepare { quiet, stop: &stop, stop_after_shards })
}

/// `config`: each run's resolved config as TOML, with `sources` where each value came from.
fn print_config(file: &Path, set: &[String], sources: bool) -> Result<()> {
    for run in load(file, set)? {
        if let Some(tag) = &run.tag {
            println!("# sweep point {tag}");
        }
        print!("{}", config::render(&run.config, sources.then_some(&run.layered)));
    }
    Ok(())
}

/// `validate`: each file checked; 0 when all are valid, else 2.
fn validate(files: &[PathBuf]) -> ExitCode {
    let mut bad = 0;
    for file in files {
        match load(file, &[]) {
            Ok(runs) => println!("ok: {} ({} run(s))", file.display(), runs.len()),
            Err(e) => {
                bad += 1;
                eprintln!("error: {e:#}");
            }
        }
    }
    if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(2) }
}
