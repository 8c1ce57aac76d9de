//! Command-line surface: clap commands mapped to library calls. No training logic here.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};

use crate::config::{self, Assign, ConfigError, ConfigErrors, Device, PlannedRun};
use crate::cost::{self, Cost};
use crate::metrics::{human, say};
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

/// Testing aids shared by `run` and `resume` (hidden from --help).
#[derive(Args, Debug, Clone)]
struct TestingAids {
    /// Testing aid: stop as if interrupted right after this optimiser step.
    #[arg(long, hide = true)]
    stop_after: Option<usize>,
    /// Testing aid: kill this process with SIGKILL at a named point (checkpoint, export, step; optionally :STEP).
    #[arg(long, hide = true)]
    crash_at: Option<String>,
    /// Testing aid: which communicator carries the gradients (device: NCCL even for one rank).
    #[arg(long, hide = true, value_enum, default_value = "auto")]
    comm: crate::engine::comm::CommChoice,
    /// Testing aid: append each micro-batch's sample indices to FILE.<rank>.
    #[arg(long, hide = true)]
    trace_samples: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train every run of the experiment files (every sweep point in turn).
    #[command(after_help = RUN_EXAMPLES)]
    Run {
        /// Experiment files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Override a key: `section.key=value` (TOML value syntax); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Print the runs, their folders and their cost; create nothing.
        #[arg(long)]
        dry_run: bool,
        /// No progress bars, plain lines only.
        #[arg(long)]
        quiet: bool,
        /// Without a progress bar, print a progress line when nothing was printed for this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        progress_every: f64,
        /// A sweep's points run this many at a time on this machine: the cores split between them, and
        /// with GPUs one point per GPU.
        #[arg(short = 'j', long = "jobs", value_name = "N")]
        jobs: Option<usize>,
        /// Where a sweep's points run: local (this machine) or slurm (one job array).
        #[arg(long, value_enum)]
        launcher: Option<config::LauncherKind>,
        /// Data parallel: train with N local ranks (started through mpirun; needs the `mpi` build).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        #[command(flatten)]
        aids: TestingAids,
    },
    /// Continue an interrupted run (or a sweep) exactly, from its last complete checkpoint(s).
    #[command(after_help = RESUME_EXAMPLES)]
    Resume {
        /// The run folder (runs/<timestamp>-<name>), or a sweep folder.
        run_dir: PathBuf,
        /// Change a key that affects neither the model nor the data order (max_steps, intervals, threads, ...).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Resume even though the data file, tokenizer or tokens changed since the checkpoint.
        #[arg(long)]
        allow_data_change: bool,
        /// No progress bars, plain lines only.
        #[arg(long)]
        quiet: bool,
        /// Without a progress bar, print a progress line when nothing was printed for this many seconds.
        #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
        progress_every: f64,
        /// A sweep folder: run its points this many at a time from now on (saved in sweep.toml).
        #[arg(short = 'j', long = "jobs", value_name = "N")]
        jobs: Option<usize>,
        /// A sweep folder: where its points run from now on (saved in sweep.toml).
        #[arg(long, value_enum)]
        launcher: Option<config::LauncherKind>,
        /// Data parallel: continue with N local ranks (any number that divides a step's micro-batches).
        #[arg(long, value_name = "N")]
        nproc: Option<usize>,
        #[command(flatten)]
        aids: TestingAids,
    },
    /// Mean next-token loss of a model folder on the first N*B samples of a jsonl file.
    Eval {
        /// Folder with config.json, model.safetensors and tokenizer.json.
        #[arg(long)]
        hf_dir: PathBuf,
        /// JSON-lines file, one {"text": ...} per line.
        #[arg(long)]
        data: PathBuf,
        /// Tokens per row, T.
        #[arg(long)]
        seq_len: usize,
        /// Rows per batch, B.
        #[arg(long)]
        batch_size: usize,
        /// Batches to evaluate.
        #[arg(long, default_value_t = 1)]
        batches: usize,
        /// Tokenizer to use instead of HF_DIR/tokenizer.json.
        #[arg(long)]
        tokenizer: Option<PathBuf>,
        /// Skip (and count) malformed lines instead of failing.
        #[arg(long)]
        skip_bad_lines: bool,
        /// Print `{"loss": ..., "tokens": ...}`.
        #[arg(long)]
        json: bool,
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
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 128)]
        max_new_tokens: usize,
        /// Softmax temperature; 0 picks the most likely token.
        #[arg(long, default_value_t = 0.85)]
        temperature: f32,
        /// Nucleus sampling: keep the most likely tokens up to this probability mass.
        #[arg(long, default_value_t = 0.85)]
        top_p: f32,
        /// Keep only the k most likely tokens (0: all).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Seed of the sampler.
        #[arg(long, default_value_t = 42)]
        seed: u64,
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
    /// Print the JSON schema of experiment files.
    Schema,
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
    let world = if trains { crate::dist::World::init() } else { Ok(crate::dist::World::single()) };
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
fn fail(e: &anyhow::Error, world: Option<&crate::dist::World>) -> ExitCode {
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

fn session(
    quiet: bool,
    progress_every: f64,
    aids: TestingAids,
    stop: crate::signals::Stop,
    world: &crate::dist::World,
) -> Session {
    if let Some(point) = aids.crash_at {
        crate::signals::set_crash_point(point);
    }
    Session {
        stop_after: aids.stop_after,
        quiet,
        heartbeat: Duration::from_secs_f64(progress_every.max(0.0)),
        comm: aids.comm,
        trace: aids.trace_samples,
        world: world.clone(),
        ..Session::new(stop)
    }
}

fn dispatch(cli: Cli, world: &crate::dist::World) -> Result<ExitCode> {
    match cli.command {
        Command::Run { files, set, dry_run, quiet, progress_every, jobs, launcher, nproc, aids } => {
            if jobs == Some(0) {
                return Err(ConfigError::new(
                    config::Origin::Arg("-j 0".into()),
                    None,
                    "a sweep runs at least one point at a time",
                )
                .into());
            }
            let mut experiments = Vec::new();
            for file in &files {
                experiments.push(load(file, &set)?);
            }
            if dry_run {
                for runs in &experiments {
                    print_dry_run(runs)?;
                }
                return Ok(ExitCode::SUCCESS);
            }
            if let Some(n) = nproc.filter(|&n| n > 1) {
                let run = one_run(&experiments, &format!("--nproc {n}"), "--nproc")?;
                check_nproc(n, world, Some(&run.config.train))?;
                return launch_ranks(n);
            }
            let stop = crate::signals::install()?;
            let session = session(quiet, progress_every, aids, stop, world);
            if world.size() > 1 {
                // Every rank resolved the same command; rank 0 creates the run and tells the
                // others, which check their own resolution against it.
                let run = one_run(&experiments, "the launch", "a data-parallel launch")?;
                let outcome = if world.is_owner() {
                    runner::start(run, std::env::args().collect(), session)?.1
                } else {
                    crate::train::follow(&session, Some(&run.config))?
                };
                return Ok(ExitCode::from(runner::exit_code(outcome)));
            }
            let mut failed = Vec::new();
            for runs in &experiments {
                let result = match runs.as_slice() {
                    [run] if run.tag.is_none() => {
                        runner::start(run, std::env::args().collect(), session.clone()).map(|(_, o)| o)
                    }
                    points => {
                        let file_launcher = &points[0].layered.merged.launcher;
                        let l = crate::sweep::launcher(file_launcher, jobs, launcher);
                        let sweep = crate::sweep::Sweep::create(points, l, std::env::args().collect())?;
                        runner::run_sweep(&sweep, &session)
                    }
                };
                match result {
                    Ok(Outcome::Completed) => {}
                    Ok(outcome) => return Ok(ExitCode::from(runner::exit_code(outcome))),
                    Err(e) if experiments.len() > 1 => {
                        let _ = writeln!(std::io::stderr(), "error: {}: {e:#}", runs[0].config.name);
                        failed.push(runs[0].config.name.clone());
                    }
                    Err(e) => return Err(e),
                }
            }
            if !failed.is_empty() {
                anyhow::bail!(
                    "{} of {} experiments failed: {}",
                    failed.len(),
                    experiments.len(),
                    failed.join(", ")
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Resume {
            run_dir,
            set,
            allow_data_change,
            quiet,
            progress_every,
            jobs,
            launcher,
            nproc,
            aids,
        } => {
            let sets = parse_sets(&set)?;
            if let Some(n) = nproc.filter(|&n| n > 1) {
                if crate::sweep::is_sweep(&run_dir) {
                    return Err(usage(
                        &format!("--nproc {n}"),
                        "--nproc continues one run folder, not a sweep",
                    )
                    .into());
                }
                check_nproc(n, world, None)?;
                return launch_ranks(n);
            }
            if jobs.is_some() || launcher.is_some() {
                relaunch(&run_dir, jobs, launcher)?;
            }
            let stop = crate::signals::install()?;
            let session = session(quiet, progress_every, aids, stop, world);
            if world.size() > 1 && crate::sweep::is_sweep(&run_dir) {
                return Err(usage(
                    "the launch",
                    "a data-parallel launch continues one run folder, not a sweep",
                )
                .into());
            }
            let outcome = if world.is_owner() {
                runner::resume(&run_dir, &sets, allow_data_change, session)?
            } else {
                crate::train::follow(&session, None)?
            };
            Ok(ExitCode::from(runner::exit_code(outcome)))
        }
        Command::Eval {
            hf_dir,
            data,
            seq_len,
            batch_size,
            batches,
            tokenizer,
            skip_bad_lines,
            json,
            device,
        } => {
            let device = device_arg(device)?;
            let (r, skipped) = crate::eval::eval_dir(
                &hf_dir,
                &data,
                tokenizer.as_deref(),
                seq_len,
                batch_size,
                batches,
                skip_bad_lines,
                device,
            )?;
            if let Some(s) = skipped.describe() {
                crate::metrics::warn(&s);
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("loss={} tokens={}", r.loss, r.tokens);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Generate { dir, prompt, max_new_tokens, temperature, top_p, top_k, seed, device } => {
            let device = device_arg(device)?;
            let opts = crate::generate::Sampling { max_new_tokens, temperature, top_p, top_k, seed };
            crate::generate::run(&dir, &prompt, &opts, device)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plan { file, set, nproc, gpu } => {
            let gpu = gpu
                .map(|name| crate::roofline::find(&name).map_err(|why| usage(&format!("--gpu {name}"), &why)))
                .transpose()?;
            let runs = load(&file, &set)?;
            print_plan(&runs, nproc.max(1))?;
            if let Some(gpu) = gpu {
                print_gpu_plan(&runs, gpu)?;
            }
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
                let placement = runner::preflight(c, &run.layered)?;
                for note in placement.all_notes() {
                    println!("{note}");
                }
                let r = crate::bench::run(c, placement.device, placement.dtype, steps.max(1), 2, profile)?;
                println!(
                    "{} on {}: hidden {} layers {} moe {} batch {} seq {} accumulation {} threads {}",
                    run.tag.as_deref().unwrap_or(&c.name),
                    r.device,
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
                if profile && !r.model.is_empty() {
                    print_device_profile(&r);
                } else if profile {
                    print_profile(&r);
                }
                println!("tokens_per_s={:.1}", r.tokens_per_s);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { dir, json } => {
            crate::report::ls(&dir, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Compare { runs } => {
            crate::report::compare(&runs)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Plot { runs, output, metric, x, log_y } => {
            crate::report::plot(&runs, &output, metric, x, log_y)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { sweep_dir } => {
            let sweep = crate::sweep::Sweep::open(&sweep_dir)?;
            let rows = sweep.refresh_index()?;
            crate::sweep::print_index(&rows);
            if let Some(job) = &sweep.file.slurm_job {
                let queue = crate::slurm::queue(job);
                say(&format!("Slurm job {job}:"));
                for r in &rows {
                    let state = queue.get(&r.index).map_or("not in the queue", String::as_str);
                    say(&format!("  {:<4} {:<28} {state}", r.index, r.tag));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Selftest { device, fixtures } => {
            let device = device_arg(device)?;
            crate::selftest::run(device, &fixtures)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema => {
            print!("{}", config::schema_json());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The one run of a data-parallel command: one experiment file that is not a sweep. `what`
/// is the argument that asked for it, `who` names it in the message.
fn one_run<'a>(
    experiments: &'a [Vec<PlannedRun>],
    what: &str,
    who: &str,
) -> Result<&'a PlannedRun, ConfigError> {
    match experiments {
        [runs] if runs.len() == 1 && runs[0].tag.is_none() => Ok(&runs[0]),
        _ => Err(usage(what, &format!("{who} trains one run: give one experiment file that is not a sweep"))
            .hint("a sweep's points train with several ranks each through launcher.tasks_per_point (Slurm)")),
    }
}

/// A usage error (exit 2) about `what` was given.
fn usage(what: &str, why: &str) -> ConfigError {
    ConfigError::new(config::Origin::Arg(what.into()), None, why)
}

/// Whether `--nproc n` can start here: an MPI build, not inside a launch already, and with the
/// CUDA engine a GPU per rank.
fn check_nproc(n: usize, world: &crate::dist::World, train: Option<&config::TrainConfig>) -> Result<()> {
    let what = format!("--nproc {n}");
    if !cfg!(feature = "mpi") {
        return Err(usage(&what, "this build has no MPI, so it cannot start ranks")
            .hint("build with `cargo build --release --features mpi` (Debian: apt install libopenmpi-dev openmpi-bin clang libclang-dev)")
            .into());
    }
    if world.size() > 1 {
        return Err(usage(
            &what,
            &format!("this process is already one of {} ranks started by {}", world.size(), world.launcher),
        )
        .into());
    }
    if let Some(t) = train
        && let Ok((Device::Cuda(_), _)) = crate::train::choose_device(t.device)
        && let Ok(gpus) = crate::engine::gpu::probe()
        && let Err(why) = crate::train::rank_gpu(0, n, gpus.names.len())
    {
        return Err(usage(&what, &why).into());
    }
    Ok(())
}

/// Runs this command line, without `--nproc`, as `n` ranks under mpirun.
fn launch_ranks(n: usize) -> Result<ExitCode> {
    let stop = crate::signals::install()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let code = crate::dist::nproc::launch(n, &crate::dist::nproc::without_nproc(&args), &stop)?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// The device a `--device` argument resolves to here; a GPU that cannot be used is a usage
/// error (exit 2).
fn device_arg(requested: Device) -> Result<Device, ConfigError> {
    crate::train::choose_device(requested)
        .map(|(device, _)| device)
        .map_err(|why| ConfigError::new(config::Origin::Arg(format!("--device {requested}")), None, why))
}

/// `resume SWEEP_DIR -j N --launcher K`: the sweep's launcher from now on, saved in sweep.toml.
fn relaunch(dir: &std::path::Path, jobs: Option<usize>, kind: Option<config::LauncherKind>) -> Result<()> {
    if jobs == Some(0) {
        return Err(ConfigError::new(
            config::Origin::Arg("-j 0".into()),
            None,
            "a sweep runs at least one point at a time",
        )
        .into());
    }
    if !crate::sweep::is_sweep(dir) {
        return Err(ConfigError::new(
            config::Origin::Arg("-j / --launcher".into()),
            None,
            format!("{} is a run folder: -j and --launcher apply to a sweep folder", dir.display()),
        )
        .into());
    }
    let mut sweep = crate::sweep::Sweep::open(dir)?;
    sweep.file.launcher = crate::sweep::launcher(&sweep.file.launcher, jobs, kind);
    sweep.save()
}

/// Every `--set` argument parsed; all bad ones reported together.
fn parse_sets(set: &[String]) -> Result<Vec<Assign>, ConfigErrors> {
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for s in set {
        match config::parse_set(s) {
            Ok(a) => out.push(a),
            Err(e) => bad.push(e),
        }
    }
    if bad.is_empty() { Ok(out) } else { Err(ConfigErrors(bad)) }
}

/// Loads an experiment with this process's environment and the given `--set` arguments.
fn load(file: &Path, set: &[String]) -> Result<Vec<PlannedRun>> {
    let env = config::parse_env(std::env::vars())?;
    for w in &env.warnings {
        crate::metrics::warn(w);
    }
    let sets = parse_sets(set)?;
    Ok(config::load(file, &env.assigns, &sets)?)
}

/// Steps a run will take when that is known without tokenising: `max_steps`, or (rows being
/// documents when unpacked) epochs over the non-blank lines of the data file.
fn planned_steps(c: &config::Config) -> Option<usize> {
    if let Some(n) = c.train.max_steps {
        return Some(n);
    }
    if c.data.packing {
        return None;
    }
    let file = std::fs::File::open(&c.data.path).ok()?;
    let docs = crate::data::jsonl::Lines::new(std::io::BufReader::new(file)).count();
    Some(c.train.epochs * (docs / c.train.batch_size) / c.train.accumulation_steps)
}

/// The run's cost with the measured throughput of this machine (measured once, cached).
fn cost_of(c: &config::Config) -> Cost {
    Cost::of(c, planned_steps(c), cost::machine_gflops(c.train.threads).ok())
}

/// The runs' costs; `ranks` data-parallel ranks multiply each step's batch (the global batch,
/// `batch_size x accumulation_steps x ranks` rows) and its tokens.
fn print_plan(runs: &[PlannedRun], ranks: usize) -> Result<()> {
    say(&format!(
        "{:<24} {:>10} {:>14} {:>11} {:>10} {:>11} {:>10} {:>10}  overrides",
        "run", "parameters", "global batch", "tokens/step", "memory", "FLOP/step", "step", "run"
    ));
    for run in runs {
        let c = &run.config;
        let cost = cost_of(c);
        let point: Vec<String> =
            run.layered.assigns.iter().map(|a| format!("{}={}", a.key, a.value)).collect();
        let step = cost.step_seconds();
        let (b, a) = (c.train.batch_size, c.train.accumulation_steps);
        let batch = if ranks > 1 {
            format!("{b}x{a}x{ranks}={}", b * a * ranks)
        } else {
            format!("{b}x{a}={}", b * a)
        };
        say(&format!(
            "{:<24} {:>10} {:>14} {:>11} {:>10} {:>11} {:>10} {:>10}  {}",
            run.tag.as_deref().unwrap_or(&c.name),
            human(cost.parameters as f64),
            batch,
            human((c.derived.tokens_per_step * ranks as u64) as f64),
            format!("{}B", human(cost.memory.peak)),
            human(cost.flops_per_step),
            step.map_or("?".into(), |s| format!("~{}", seconds(s))),
            match (step, cost.steps) {
                (Some(s), Some(n)) => format!("~{}", crate::metrics::duration(s * n as f64)),
                _ => "?".into(),
            },
            if point.is_empty() { "-".to_string() } else { point.join(" ") }
        ));
    }
    say(&format!("{} run(s); time estimated from this machine's measured matrix-multiply speed", runs.len()));
    if ranks > 1 {
        say(&format!(
            "global batch: batch_size x accumulation_steps x {ranks} ranks rows per step; step time is one rank's"
        ));
    }
    Ok(())
}

/// Each run's predicted step on `gpu`, class by class (see `roofline`).
fn print_gpu_plan(runs: &[PlannedRun], gpu: &crate::roofline::Gpu) -> Result<()> {
    say(&format!(
        "on {} ({:.0} TFLOP/s bf16 tensor, {:.1} f32, {:.0} GB/s, {:.0} GB; {}):",
        gpu.name, gpu.tensor_tflops, gpu.cuda_tflops, gpu.bandwidth_gbs, gpu.memory_gb, gpu.source
    ));
    for run in runs {
        let c = &run.config;
        let p = crate::roofline::predict_run(c, gpu)?;
        say(&format!("{}: {}", run.tag.as_deref().unwrap_or(&c.name), p.describe(planned_steps(c))));
        say(&format!(
            "  {:<10} {:>6} {:>10} {:>10} {:>9} {:>6}",
            "class", "calls", "GFLOP", "GB moved", "ms", "share"
        ));
        for sh in &p.shares {
            say(&format!(
                "  {:<10} {:>6} {:>10.1} {:>10.2} {:>9.3} {:>5.0}%",
                sh.class.name(),
                sh.calls,
                sh.flops / 1e9,
                sh.bytes / 1e9,
                sh.seconds * 1e3,
                100.0 * sh.seconds / p.step_seconds
            ));
        }
        say(&format!(
            "  memory {}B of {:.0} GB: {}",
            human(p.memory_bytes),
            gpu.memory_gb,
            if p.fits { "fits" } else { "does not fit" }
        ));
    }
    say("efficiencies assumed per class (src/roofline.rs), until a GPU measures them");
    Ok(())
}

fn seconds(s: f64) -> String {
    if s < 10.0 { format!("{s:.2}s") } else { crate::metrics::duration(s) }
}

fn print_dry_run(runs: &[PlannedRun]) -> Result<()> {
    let now = chrono::Local::now();
    for run in runs {
        let c = &run.config;
        let folder = run_dir::folder_name(&now, &c.name, run.tag.as_deref());
        let placement = runner::preflight(c, &run.layered)?;
        say(&format!(
            "would create {} (config.toml, meta.json, metrics.csv, checkpoints/)",
            c.checkpoint.save_dir.join(folder).display()
        ));
        for note in placement.all_notes() {
            say(&format!("  {note}"));
        }
        say(&format!("  cost: {}", cost_of(c).describe()));
    }
    Ok(())
}

/// The CUDA engine's profile: per kernel, launches per step (counted on the device), the
/// FLOPs and bytes the step-time model gives them, the time measured on a GPU (the emulator
/// cannot time) and the model's prediction on a GPU it knows; then per class, predicted
/// against measured: the factor to recalibrate `roofline::efficiency` by.
fn print_device_profile(r: &crate::bench::BenchReport) {
    use std::collections::BTreeMap;
    let gpu = crate::roofline::find(&r.device).ok();
    let steps = r.steps as f64;
    // The model's calls of one step, by kernel: FLOPs, bytes, predicted seconds, class.
    let mut model: BTreeMap<&str, (f64, f64, f64, crate::engine::dry::Class)> = BTreeMap::new();
    for c in &r.model {
        let e = model.entry(c.kernel).or_insert((0.0, 0.0, 0.0, c.class));
        e.0 += c.flops;
        e.1 += c.bytes;
        e.2 += gpu.map_or(0.0, |g| crate::roofline::seconds(c, g));
    }
    let measured = r.profile.iter().any(|(_, t)| t.seconds > 0.0);
    println!(
        "{:<30} {:>9} {:>10} {:>10} {:>12} {:>13}",
        "kernel", "launches", "GFLOP", "MB moved", "measured ms", "predicted ms"
    );
    let mut classes: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for (name, t) in &r.profile {
        let (flops, bytes, predicted, class) = model.get(name.as_str()).copied().unwrap_or((
            0.0,
            0.0,
            0.0,
            crate::engine::dry::Class::Pointwise,
        ));
        let ms = t.seconds * 1e3 / steps;
        let c = classes.entry(class.name()).or_default();
        *c = (c.0 + ms, c.1 + predicted * 1e3);
        println!(
            "{:<30} {:>9} {:>10.2} {:>10.1} {:>12} {:>13}",
            name,
            format!("{:.0}", t.calls as f64 / steps),
            flops / 1e9,
            bytes / 1e6,
            if measured { format!("{ms:.3}") } else { "-".into() },
            if gpu.is_some() { format!("{:.3}", predicted * 1e3) } else { "-".into() }
        );
    }
    println!("per step; FLOPs and bytes as src/engine/dry.rs counts them");
    match (gpu, measured) {
        (Some(g), true) => {
            println!(
                "{:<12} {:>12} {:>13} {:>16}",
                "class", "measured ms", "predicted ms", "predicted/measured"
            );
            for (class, (ms, predicted)) in &classes {
                println!("{:<12} {:>12.3} {:>13.3} {:>16.2}", class, ms, predicted, predicted / ms.max(1e-9));
            }
            println!(
                "on {}: a class's efficiency in src/roofline.rs times predicted/measured is what this GPU reached",
                g.name
            );
        }
        (None, true) => println!("no model of this GPU in src/roofline.rs: times measured, none predicted"),
        (_, false) => println!("the emulator counts launches but cannot time them"),
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
