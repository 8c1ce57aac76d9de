//! Data parallel on CPU: two MPI ranks on this machine (the `mpi` build; `make test` runs these
//! with `--features mpi`), launched by `--nproc`, by `mpirun` directly and by Slurm's `srun`.
//! Without the `mpi` build, the launches that need it are refused.

use std::fs;
#[cfg(feature = "mpi")]
use std::path::Path;
#[cfg(feature = "mpi")]
use std::process::Command;

use crate::*;

/// The micro model with MoE, one thread per rank and `steps` steps.
fn micro_moe(s: &Scratch, steps: usize, accumulation: usize) -> std::path::PathBuf {
    s.micro("");
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("max_steps = 12", &format!("max_steps = {steps}"))
        .replace("accumulation_steps = 2", &format!("accumulation_steps = {accumulation}"))
        .replace("max_position_embeddings = 64", "max_position_embeddings = 64\nuse_moe = true");
    s.write("micro.toml", &text)
}

#[cfg(not(feature = "mpi"))]
#[test]
fn without_the_mpi_build_a_launch_of_several_ranks_is_refused() {
    let s = Scratch::new();
    micro_moe(&s, 2, 1);
    let o = expect(minimind(s.path()).args(["run", "micro.toml", "--quiet", "--nproc", "2"]), 2);
    assert!(stderr(&o).contains("no MPI") && stderr(&o).contains("--features mpi"), "{}", stderr(&o));
    // Started as one of two ranks (mpirun's environment): never two unrelated runs.
    let o =
        expect(minimind(s.path()).args(["run", "micro.toml", "--quiet"]).env("OMPI_COMM_WORLD_SIZE", "2"), 2);
    assert!(stderr(&o).contains("one of 2 ranks") && stderr(&o).contains("no MPI"), "{}", stderr(&o));
    // srun without an MPI plugin: the tasks could not find each other.
    let o = expect(
        minimind(s.path())
            .args(["run", "micro.toml", "--quiet"])
            .env("SLURM_STEP_ID", "0")
            .env("SLURM_STEP_NUM_TASKS", "2"),
        2,
    );
    assert!(stderr(&o).contains("srun --mpi=pmix"), "{}", stderr(&o));
    assert!(s.runs().is_empty(), "{:?}", s.runs());
}

/// mpirun with the environment Open MPI needs to run as root (CI runs as root).
#[cfg(feature = "mpi")]
fn mpirun(dir: &Path) -> Command {
    let mut cmd = Command::new("mpirun");
    cmd.current_dir(dir)
        .env("XDG_CACHE_HOME", Path::new(env!("CARGO_TARGET_TMPDIR")).join("xdg-cache"))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "--bind-to", "none"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("MINIMIND_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// Two ranks under one mpirun, each with a command line of its own: `minimind run micro.toml
/// --quiet` and `rank0` or `rank1` (what one launcher could not give them).
#[cfg(feature = "mpi")]
fn two_commands(dir: &Path, rank0: &[&str], rank1: &[&str]) -> Command {
    let exe = env!("CARGO_BIN_EXE_minimind");
    let mut cmd = mpirun(dir);
    cmd.args(["-np", "1", exe, "run", "micro.toml", "--quiet"]).args(rank0);
    cmd.args([":", "-np", "1", exe, "run", "micro.toml", "--quiet"]).args(rank1);
    cmd
}

/// A trace written by `--trace-samples`: per step, the micro-batches this rank trained.
#[cfg(feature = "mpi")]
fn trace(path: &Path) -> std::collections::BTreeMap<usize, Vec<Vec<usize>>> {
    let mut out: std::collections::BTreeMap<usize, Vec<Vec<usize>>> = Default::default();
    for line in fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).lines() {
        let (step, rows) = line.split_once(':').unwrap();
        let rows = rows.split_whitespace().map(|r| r.parse().unwrap()).collect();
        out.entry(step.parse().unwrap()).or_default().push(rows);
    }
    out
}

/// The run's micro-batches in the global order, from the traces of `ranks` ranks: micro-batch
/// j of a step is rank j % ranks's (j / ranks)-th.
#[cfg(feature = "mpi")]
fn global_order(prefix: &Path, ranks: usize) -> Vec<Vec<usize>> {
    let traces: Vec<_> = (0..ranks).map(|r| trace(&prefix.with_extension(r.to_string()))).collect();
    let mut out = Vec::new();
    for (step, first) in &traces[0] {
        for k in 0..first.len() {
            for t in &traces {
                out.push(t[step][k].clone());
            }
        }
    }
    out
}

#[cfg(feature = "mpi")]
#[test]
fn two_ranks_equal_one_process_accumulating_two_bit_for_bit() {
    let s = Scratch::new();
    micro_moe(&s, 20, 1);
    let o = expect(minimind(s.path()).args(["run", "micro.toml", "--quiet", "--nproc", "2"]), 0);
    assert!(stdout(&o).contains("data parallel: rank 0 of 2 (mpirun)"), "{}", stdout(&o));
    assert!(stdout(&o).contains("accumulation 2 = 1 per rank x 2 ranks"), "{}", stdout(&o));
    expect(
        minimind(s.path()).args(["run", "micro.toml", "--quiet", "--set", "train.accumulation_steps=2"]),
        0,
    );
    let runs = s.runs();
    let (two, one) = (&runs[0], &runs[1]);
    // Same losses, grad norms, token counts and learning rates at every step; same weights.
    let rows = metric_rows(two);
    assert_eq!(rows.len(), 21, "{rows:?}");
    assert_eq!(rows, metric_rows(one));
    assert_eq!(
        fs::read(two.join("model/model.safetensors")).unwrap(),
        fs::read(one.join("model/model.safetensors")).unwrap()
    );
    let world = &meta(two)["world"];
    assert_eq!((world["size"].as_u64(), world["global_batch"].as_u64()), (Some(2), Some(8)), "{world}");
    assert_eq!(world["launcher"], "mpirun");
    assert_eq!(world["hosts"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>(), 2);
    assert_eq!(meta(one)["world"]["size"].as_u64(), Some(1));
    // Rank 1 wrote its own log and nothing else.
    let log = fs::read_to_string(two.join("rank-1.log")).unwrap();
    assert!(log.contains("data parallel: rank 1 of 2") && log.contains("step 20/20"), "{log}");
    // (TensorBoard's event file is named by its start time and host: one per run, any name.)
    let listed = |dir: &Path| -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .map(|n| if n.starts_with("events.out.tfevents.") { "events.out.tfevents.*".into() } else { n })
            .collect()
    };
    let mut names = listed(two);
    names.sort();
    let alone = listed(one);
    names.retain(|n| n != "rank-1.log" && !alone.contains(n));
    assert!(names.is_empty(), "files only the 2-rank run has: {names:?}");
    // Stopped in one process and resumed with two ranks: still the same bits.
    expect(
        minimind(s.path()).args([
            "run",
            "micro.toml",
            "--quiet",
            "--set",
            "train.accumulation_steps=2",
            "--stop-after",
            "7",
        ]),
        130,
    );
    let split = s.runs()[2].clone();
    let o = expect(minimind(s.path()).args(["resume", "--quiet", "--nproc", "2"]).arg(&split), 0);
    assert!(stdout(&o).contains("written by 1 rank(s), now 2"), "{}", stdout(&o));
    assert_eq!(metric_rows(&split), metric_rows(one));
    assert_eq!(
        fs::read(split.join("model/model.safetensors")).unwrap(),
        fs::read(one.join("model/model.safetensors")).unwrap()
    );
    // `plan` prints the global batch.
    let o = expect(minimind(s.path()).args(["plan", "micro.toml", "--nproc", "2"]), 0);
    assert!(stdout(&o).contains("4x1x2=8"), "{}", stdout(&o));
}

#[cfg(feature = "mpi")]
#[test]
fn a_run_stopped_with_two_ranks_resumes_with_one_on_the_same_samples() {
    let s = Scratch::new();
    micro_moe(&s, 20, 2);
    let traces = s.path().join("traces");
    fs::create_dir(&traces).unwrap();
    let o = expect(
        minimind(s.path())
            .args(["run", "micro.toml", "--quiet", "--nproc", "2", "--stop-after", "7", "--trace-samples"])
            .arg(traces.join("a")),
        130,
    );
    assert!(stdout(&o).contains("stopped by SIGINT after step 7"), "{}", stdout(&o));
    let run = s.runs()[0].clone();
    let o = expect(
        minimind(s.path()).args(["resume", "--quiet", "--trace-samples"]).arg(traces.join("b")).arg(&run),
        0,
    );
    assert!(
        stdout(&o).contains(
            "written by 2 rank(s), now 1: the 4 micro-batches of a step are split anew, 4 per rank"
        ),
        "{}",
        stdout(&o)
    );
    // The same run uninterrupted, in one process accumulating the global 4.
    expect(
        minimind(s.path())
            .args(["run", "micro.toml", "--quiet", "--set", "train.accumulation_steps=4", "--trace-samples"])
            .arg(traces.join("u")),
        0,
    );
    let mut resumed = global_order(&traces.join("a"), 2);
    assert_eq!(resumed.len(), 7 * 4);
    resumed.extend(global_order(&traces.join("b"), 1));
    let uninterrupted = global_order(&traces.join("u"), 1);
    assert_eq!(uninterrupted.len(), 20 * 4);
    assert_eq!(resumed, uninterrupted, "the micro-batches differ");
    // 80 micro-batches of 4 rows are within the first epoch (2,000 rows): none twice.
    let rows: Vec<usize> = resumed.iter().flatten().copied().collect();
    let distinct: std::collections::BTreeSet<usize> = rows.iter().copied().collect();
    assert_eq!((rows.len(), distinct.len()), (320, 320));
    let last = |run: &Path| metric_rows(run).last().unwrap().split(',').take(4).collect::<Vec<_>>().join(",");
    assert_eq!(last(&run), last(&s.runs()[1]), "samples and tokens seen");
}

#[cfg(feature = "mpi")]
#[test]
fn ranks_with_different_configs_fail_naming_the_key_and_the_rank() {
    let s = Scratch::new();
    micro_moe(&s, 4, 1);
    let o = expect(&mut two_commands(s.path(), &[], &["--set", "train.learning_rate=0.01"]), 2);
    assert!(stderr(&o).contains("rank 1 has train.learning_rate = 0.01 (rank 0: 0.001)"), "{}", stderr(&o));
    let m = meta(&s.runs()[0]);
    assert_eq!(m["status"], "failed");
    assert!(m["error"].as_str().unwrap().contains("train.learning_rate"), "{m}");
}

#[cfg(feature = "mpi")]
#[test]
fn a_rank_that_dies_ends_the_others_and_leaves_the_run_resumable() {
    let s = Scratch::new();
    micro_moe(&s, 60, 1);
    let started = std::time::Instant::now();
    let o = two_commands(
        s.path(),
        &["--set", "checkpoint.log_interval=5"],
        &["--set", "checkpoint.log_interval=5", "--crash-at", "step:30"],
    )
    .output()
    .unwrap();
    let took = started.elapsed();
    assert!(!o.status.success(), "{}", stdout(&o));
    assert!(took.as_secs() < 60, "mpirun took {took:?} to end the run");
    assert!(stderr(&o).contains("rank 1") && stderr(&o).contains("signal 9"), "{}", stderr(&o));
    let run = s.runs()[0].clone();
    let m = meta(&run);
    assert_ne!(m["status"], "completed", "{m}");
    // At most one save interval (4 steps) lost; one process finishes the run. (mpirun may
    // return while a killed rank still holds the run's lock for a moment.)
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let o = loop {
        let o = minimind(s.path()).args(["resume", "--quiet"]).arg(&run).output().unwrap();
        if !stderr(&o).contains("in use by another minimind process") || std::time::Instant::now() > deadline
        {
            break o;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    };
    assert_eq!(o.status.code(), Some(0), "{}\n{}", stdout(&o), stderr(&o));
    let from: usize = stdout(&o)
        .split("(step ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no resume step in {}", stdout(&o)));
    assert!((26..=30).contains(&from), "resumed from step {from}");
    assert_eq!(meta(&run)["status"], "completed");
    assert_eq!(metric_rows(&run).len(), 1 + 60 / 5);
}

#[cfg(feature = "mpi")]
#[test]
fn nproc_without_mpirun_names_the_package() {
    let s = Scratch::new();
    micro_moe(&s, 2, 1);
    let o = expect(
        minimind(s.path()).args(["run", "micro.toml", "--quiet", "--nproc", "2"]).env("PATH", "/nonexistent"),
        1,
    );
    assert!(stderr(&o).contains("mpirun not found") && stderr(&o).contains("openmpi-bin"), "{}", stderr(&o));
    // A sweep is not one run.
    s.write(
        "sweep.toml",
        "extends = \"micro.toml\"\n[sweep]\ngrid = { \"train.learning_rate\" = [1e-3, 3e-3] }\n",
    );
    let o = expect(minimind(s.path()).args(["run", "sweep.toml", "--quiet", "--nproc", "2"]), 2);
    assert!(stderr(&o).contains("--nproc trains one run"), "{}", stderr(&o));
    assert!(s.runs().is_empty(), "{:?}", s.runs());
}

#[cfg(feature = "mpi")]
#[test]
fn srun_starts_the_ranks_and_a_slurm_sweep_gives_a_point_two_tasks() {
    let Some(_cluster) = LocalSlurm::start() else {
        return;
    };
    let s = Scratch::new();
    micro_moe(&s, 6, 1);
    let exe = env!("CARGO_BIN_EXE_minimind");
    let o = expect(
        Command::new("srun").current_dir(s.path()).args([
            "-n",
            "2",
            "--mpi=pmix",
            "--kill-on-bad-exit=1",
            exe,
            "run",
            "micro.toml",
            "--quiet",
        ]),
        0,
    );
    assert!(stdout(&o).contains("data parallel: rank 0 of 2 (srun)"), "{}", stdout(&o));
    let world = &meta(&s.runs()[0])["world"];
    assert_eq!((world["launcher"].as_str(), world["size"].as_u64()), (Some("srun"), Some(2)), "{world}");
    // Without the PMIx plugin the tasks cannot meet: a clear error, not two runs.
    let o = Command::new("srun")
        .current_dir(s.path())
        .env_remove("SLURM_MPI_TYPE")
        .args(["-n", "2", "--mpi=none", exe, "run", "micro.toml", "--quiet"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(stderr(&o).contains("srun --mpi=pmix"), "{}", stderr(&o));
    assert_eq!(s.runs().len(), 1);

    // A one-point sweep whose point trains on two tasks.
    s.write(
        "sweep.toml",
        "extends = \"micro.toml\"\n[sweep]\ngrid = { \"train.learning_rate\" = [2e-3] }\n[launcher]\nkind = \"slurm\"\ncpus_per_task = 1\ntasks_per_point = 2\n",
    );
    expect(minimind(s.path()).args(["run", "sweep.toml", "--quiet"]), 0);
    let sweep = crate::sweeps::sweeps(&s)[0].clone();
    let script = fs::read_to_string(sweep.join("slurm/array.sh")).unwrap();
    assert!(script.contains("#SBATCH --ntasks=2") && script.contains("srun --mpi=pmix"), "{script}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let point = loop {
        let rows = crate::sweeps::index(&sweep);
        if rows.iter().all(|r| r.1 == "completed") {
            let dirs = fs::read_dir(&sweep).unwrap().flatten().map(|e| e.path());
            break dirs.into_iter().find(|p| p.join("meta.json").is_file()).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the point did not complete: {rows:?}\n{}",
            crate::sweeps::slurm_logs(&sweep)
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
    };
    let world = &meta(&point)["world"];
    assert_eq!((world["launcher"].as_str(), world["size"].as_u64()), (Some("srun"), Some(2)), "{world}");
}

#[test]
fn a_forced_communicator_for_one_process_changes_no_number() {
    let s = Scratch::new();
    micro_moe(&s, 6, 2);
    expect(minimind(s.path()).args(["run", "micro.toml", "--quiet"]), 0);
    let o = expect(minimind(s.path()).args(["run", "micro.toml", "--quiet", "--comm", "host"]), 0);
    assert!(stdout(&o).contains("gradients: MPI all-reduce over host memory, 1 rank(s)"), "{}", stdout(&o));
    let runs = s.runs();
    assert_eq!(metric_rows(&runs[0]), metric_rows(&runs[1]));
    // The CPU has no communicator of its own (NCCL is the CUDA engine's).
    let o = expect(minimind(s.path()).args(["run", "micro.toml", "--quiet", "--comm", "device"]), 1);
    assert!(stderr(&o).contains("has no communicator of its own"), "{}", stderr(&o));
}
