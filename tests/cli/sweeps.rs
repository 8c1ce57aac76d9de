//! Sweeps as one thing: the sweep folder and its index, parallel points, a failing point,
//! stop and resume, Slurm job arrays on a real local cluster, and ls / compare / plot.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::*;

/// A 2 x 2 sweep of micro models: learning rate x MoE.
const GRID: &str =
    "[sweep]\ngrid = { \"train.learning_rate\" = [1e-3, 3e-3], \"model.use_moe\" = [false, true] }\n";

pub fn sweep_file(s: &Scratch, grid: &str, steps: usize) -> PathBuf {
    s.micro(grid);
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("max_steps = 12", &format!("max_steps = {steps}"))
        .replace("threads = 1\n", "");
    s.write("micro.toml", &text)
}

/// Sweep folders under runs/.
pub fn sweeps(s: &Scratch) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = s.runs().into_iter().filter(|p| p.join("sweep.toml").is_file()).collect();
    v.sort();
    v
}

/// index.csv as (tag, status, error) rows.
pub fn index(sweep: &Path) -> Vec<(String, String, String)> {
    let mut r = csv::Reader::from_path(sweep.join("index.csv")).unwrap();
    r.records()
        .map(|rec| {
            let rec = rec.unwrap();
            (rec[1].to_string(), rec[3].to_string(), rec[8].to_string())
        })
        .collect()
}

#[test]
fn a_parallel_sweep_runs_every_point_in_its_sweep_folder_and_survives_a_failing_one() {
    let s = Scratch::new();
    // lr = 1e30 without clipping diverges: that point fails, the others complete.
    let grid =
        "[sweep]\ngrid = { \"train.learning_rate\" = [1e-3, 1e30], \"model.use_moe\" = [false, true] }\n";
    let file = sweep_file(&s, grid, 3);
    let text = fs::read_to_string(&file)
        .unwrap()
        .replace("learning_rate = 1e-3", "learning_rate = 1e-3\ngrad_clip = 0.0");
    fs::write(&file, text).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "-j", "2"]), 1);
    let out = stdout(&o);
    assert!(stderr(&o).contains("2 of 4 points failed"), "{}", stderr(&o));
    assert!(out.contains("(1 thread(s)"), "the two cores split between two points: {out}");
    let sweep = &sweeps(&s)[0];
    assert!(sweep.file_name().unwrap().to_string_lossy().ends_with("-micro"));
    let rows = index(sweep);
    assert_eq!(rows.len(), 4);
    for (tag, status, error) in &rows {
        let run = sweep.join(tag);
        assert!(run.join("config.toml").is_file() && run.join("metrics.csv").is_file(), "{tag}");
        if tag.contains("lr=1e30") {
            assert_eq!(status, "failed", "{tag}");
            assert!(error.contains("training diverged"), "{tag}: {error}");
        } else {
            assert_eq!(status, "completed", "{tag}: {error}");
            assert_eq!(meta(&run)["sweep_tag"], tag.as_str());
        }
    }
    let moe = sweep.join("moe=1,lr=1e-3");
    assert!(metric(&moe, "aux_loss")[0] > 0.0, "MoE points report an aux loss");
    let saved: toml::Table = toml::from_str(&fs::read_to_string(sweep.join("sweep.toml")).unwrap()).unwrap();
    assert_eq!(saved["points"].as_array().unwrap().len(), 4);
    assert_eq!(saved["launcher"]["jobs"].as_integer(), Some(2));
    // The picture a user opens first: the loss of every point that logged one.
    let svg = fs::read_to_string(sweep.join("loss.svg")).unwrap();
    for tag in ["moe=0,lr=1e-3", "moe=1,lr=1e-3"] {
        assert!(svg.contains(tag), "loss.svg has no legend entry for {tag}");
    }
}

#[test]
fn a_stopped_sweep_resumes_skipping_completed_points_bit_identically() {
    let s = Scratch::new();
    let file = sweep_file(&s, GRID, 40);
    let text = fs::read_to_string(&file).unwrap().replace("hidden_size = 32", "hidden_size = 96");
    fs::write(&file, text).unwrap();
    // The same sweep, uninterrupted, for reference.
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let straight = sweeps(&s)[0].clone();
    let mut p = Spawned::start(minimind(s.path()).args(["run", "micro.toml", "--quiet"]));
    p.wait_for("[1/4] moe=0,lr=1e-3 completed", 120);
    p.wait_for("[2/4] moe=0,lr=3e-3 started", 30);
    std::thread::sleep(Duration::from_millis(400));
    p.signal("INT");
    let (code, out, err) = p.finish();
    assert_eq!(code, Some(130), "{out}\n{err}");
    let sweep = sweeps(&s)[1].clone();
    let statuses: Vec<String> = index(&sweep).into_iter().map(|r| r.1).collect();
    assert_eq!(statuses, ["completed", "stopped", "queued", "queued"], "{out}");
    let first = sweep.join("moe=0,lr=1e-3/metrics.csv");
    let before = fs::metadata(&first).unwrap().modified().unwrap();
    let o = expect(minimind(s.path()).arg("resume").arg(&sweep), 0);
    assert!(stdout(&o).contains("1 point(s) already completed; 3 to run"), "{}", stdout(&o));
    assert_eq!(
        fs::metadata(&first).unwrap().modified().unwrap(),
        before,
        "a completed point is not run again"
    );
    for tag in ["moe=0,lr=1e-3", "moe=0,lr=3e-3", "moe=1,lr=1e-3", "moe=1,lr=3e-3"] {
        assert_eq!(metric_rows(&straight.join(tag)), metric_rows(&sweep.join(tag)), "{tag}");
        assert_eq!(
            fs::read(straight.join(tag).join("model/model.safetensors")).unwrap(),
            fs::read(sweep.join(tag).join("model/model.safetensors")).unwrap(),
            "{tag}"
        );
    }
    assert!(index(&sweep).iter().all(|r| r.1 == "completed"));
}

#[test]
fn a_deleted_point_folder_is_reported_and_runs_again() {
    let s = Scratch::new();
    sweep_file(&s, GRID, 2);
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let sweep = sweeps(&s)[0].clone();
    fs::remove_dir_all(sweep.join("moe=1,lr=3e-3")).unwrap();
    let o = expect(minimind(s.path()).arg("status").arg(&sweep), 0);
    assert!(
        stdout(&o).contains("missing") && stdout(&o).contains("run folder was deleted"),
        "{}",
        stdout(&o)
    );
    let o = expect(minimind(s.path()).arg("resume").arg(&sweep), 0);
    assert!(stdout(&o).contains("moe=1,lr=3e-3: its run folder"), "{}", stdout(&o));
    assert!(index(&sweep).iter().all(|r| r.1 == "completed"));
}

#[test]
fn bad_sweep_input() {
    let s = Scratch::new();
    sweep_file(&s, GRID, 2);
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "-j", "0"]), 2);
    assert!(stderr(&o).contains("-j 0: a sweep runs at least one point at a time"), "{}", stderr(&o));
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "launcher.kind=\"cluster\""]), 2);
    assert!(
        stderr(&o).contains("--set launcher.kind=\"cluster\": `launcher.kind`")
            && stderr(&o).contains("slurm"),
        "{}",
        stderr(&o)
    );
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "launcher.partitions=\"x\""]), 2);
    assert!(stderr(&o).contains("did you mean `launcher.partition`?"), "{}", stderr(&o));
    let text = fs::read_to_string(s.path().join("micro.toml")).unwrap() + "[launcher]\ncpus_per_tsk = 4\n";
    s.write("bad.toml", &text);
    let o = expect(&mut run_quiet(s.path(), &["bad.toml"]), 2);
    assert!(
        stderr(&o).contains("bad.toml:") && stderr(&o).contains("`launcher.cpus_per_tsk`: unknown key"),
        "{}",
        stderr(&o)
    );
    assert!(s.runs().is_empty(), "nothing created");
    // No Slurm client here: one clear error, exit 1; the sweep then runs here instead.
    let empty = s.path().join("no-slurm-bin");
    fs::create_dir_all(&empty).unwrap();
    let o = expect(run_quiet(s.path(), &["micro.toml", "--launcher", "slurm"]).env("PATH", &empty), 1);
    assert!(
        stderr(&o).contains("sbatch not found") && stderr(&o).contains("--launcher local"),
        "{}",
        stderr(&o)
    );
    let sweep = sweeps(&s)[0].clone();
    let o = expect(
        minimind(s.path()).arg("resume").arg(&sweep).args(["--launcher", "local", "-j", "2", "--quiet"]),
        0,
    );
    assert!(index(&sweep).iter().all(|r| r.1 == "completed"), "{}", stdout(&o));
    let o = expect(minimind(s.path()).arg("resume").arg(sweep.join("moe=0,lr=1e-3")).args(["-j", "2"]), 2);
    assert!(stderr(&o).contains("-j and --launcher apply to a sweep folder"), "{}", stderr(&o));
}

#[test]
fn ls_compare_and_plot_read_real_runs() {
    let s = Scratch::new();
    sweep_file(&s, GRID, 3);
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    s.write("single.toml", &MICRO.replace("max_steps = 12", "max_steps = 2"));
    expect(&mut run_quiet(s.path(), &["single.toml"]), 0);
    let sweep = sweeps(&s)[0].clone();
    let o = expect(minimind(s.path()).arg("ls"), 0);
    let out = stdout(&o);
    assert!(out.contains("(sweep micro: 4 of 4 points completed)"), "{out}");
    for tag in ["moe=0,lr=1e-3", "moe=1,lr=3e-3"] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(tag) && l.contains("completed")), "{out}");
    }
    let o = expect(minimind(s.path()).args(["ls", "--json"]), 0);
    let found: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let kinds: Vec<&str> = found.as_array().unwrap().iter().map(|f| f["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds.iter().filter(|k| **k == "sweep").count(), 1);
    assert_eq!(kinds.iter().filter(|k| **k == "run").count(), 1);
    let o = expect(minimind(s.path()).arg("compare").arg(&sweep), 0);
    let out = stdout(&o);
    let header = out.lines().next().unwrap();
    assert!(header.contains("model.use_moe") && header.contains("train.learning_rate"), "{out}");
    assert!(!header.contains("seed"), "keys that do not differ are left out: {out}");
    // Plots: one line per run, in both formats.
    let svg = s.path().join("loss.svg");
    expect(minimind(s.path()).arg("plot").arg(&sweep).arg("-o").arg(&svg), 0);
    let text = fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"), "an SVG document");
    let colored = text.matches("<polyline").filter(|_| true).count();
    let lines = text
        .split("<polyline")
        .skip(1)
        .filter(|p| !p.split('>').next().unwrap().contains("stroke=\"#000000\""))
        .count();
    assert!(colored >= 4, "{colored}");
    assert_eq!(lines, 4, "one coloured line per run");
    for tag in ["moe=0,lr=1e-3", "moe=1,lr=3e-3"] {
        assert!(text.contains(tag), "legend names {tag}");
    }
    assert!(text.contains("optimiser step") && text.contains("nats/token"), "axes with units");
    let png = s.path().join("loss.png");
    expect(
        minimind(s.path())
            .arg("plot")
            .arg(&sweep)
            .args(["--metric", "lr", "--x", "tokens", "--log-y", "-o"])
            .arg(&png),
        0,
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (1000, 620));
    // A metric the runs lack, and runs without metrics, are named.
    let o =
        expect(minimind(s.path()).arg("plot").arg(&sweep).args(["--metric", "val_loss", "-o"]).arg(&svg), 1);
    assert!(stderr(&o).contains("moe=0,lr=1e-3 (no val_loss values: no validation data)"), "{}", stderr(&o));
    let fresh = sweep.join("moe=0,lr=1e-3");
    fs::remove_file(fresh.join("metrics.csv")).unwrap();
    let o = expect(minimind(s.path()).arg("plot").arg(&fresh).arg("-o").arg(&svg), 1);
    assert!(stderr(&o).contains("moe=0,lr=1e-3 (no metrics yet)"), "{}", stderr(&o));
}

#[test]
fn a_sweep_runs_as_a_slurm_job_array() {
    let Some(_cluster) = LocalSlurm::start() else {
        return;
    };
    let s = Scratch::new();
    sweep_file(&s, GRID, 3);
    let o = expect(
        &mut run_quiet(s.path(), &["micro.toml", "--launcher", "slurm", "--set", "launcher.cpus_per_task=1"]),
        0,
    );
    assert!(stdout(&o).contains("submitted Slurm job array"), "{}", stdout(&o));
    let sweep = sweeps(&s)[0].clone();
    let script = fs::read_to_string(sweep.join("slurm/array.sh")).unwrap();
    assert!(
        script.contains("#SBATCH --array=0,1,2,3") && script.contains("#SBATCH --cpus-per-task=1"),
        "{script}"
    );
    let saved: toml::Table = toml::from_str(&fs::read_to_string(sweep.join("sweep.toml")).unwrap()).unwrap();
    let job = saved["slurm_job"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(180);
    while !index(&sweep).iter().all(|r| r.1 == "completed") {
        assert!(
            Instant::now() < deadline,
            "the array did not complete: {:?}\n{}",
            index(&sweep),
            slurm_logs(&sweep)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let o = expect(minimind(s.path()).arg("status").arg(&sweep), 0);
    assert!(stdout(&o).contains(&format!("Slurm job {job}:")), "{}", stdout(&o));
    // An sbatch refusal is quoted, exit 1.
    let o = expect(
        &mut run_quiet(
            s.path(),
            &["micro.toml", "--launcher", "slurm", "--set", "launcher.partition=\"nowhere\""],
        ),
        1,
    );
    assert!(
        stderr(&o).contains("sbatch refused the job array")
            && stderr(&o).to_lowercase().contains("partition"),
        "{}",
        stderr(&o)
    );
}

pub fn slurm_logs(sweep: &Path) -> String {
    fs::read_dir(sweep.join("slurm"))
        .map(|d| {
            d.flatten()
                .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n---\n")
        })
        .unwrap_or_default()
}

#[test]
fn points_stop_with_a_killed_driver_and_a_resumed_sweep_waits_for_live_ones() {
    let s = Scratch::new();
    sweep_file(&s, GRID, 400);
    // The driver killed with -9 while two points train: they get SIGTERM (their parent died)
    // and stop with a checkpoint instead of training on unnoticed.
    let mut p = Spawned::start(minimind(s.path()).args(["run", "micro.toml", "--quiet", "-j", "2"]));
    p.wait_for("started", 60);
    p.wait_for("started", 60);
    std::thread::sleep(Duration::from_millis(800));
    p.signal("KILL");
    let _ = p.finish();
    let sweep = sweeps(&s)[0].clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    let started: Vec<PathBuf> = ["moe=0,lr=1e-3", "moe=0,lr=3e-3"].iter().map(|t| sweep.join(t)).collect();
    while started.iter().any(|r| meta(r)["status"] == "running") {
        assert!(Instant::now() < deadline, "points still train after their driver died");
        std::thread::sleep(Duration::from_millis(50));
    }
    for r in &started {
        let m = meta(r);
        assert_eq!(
            (m["status"].as_str(), m["reason"].as_str()),
            (Some("stopped"), Some("stopped by SIGTERM"))
        );
    }

    // A point trained by another process when the sweep resumes is waited for, not failed.
    let point = started[0].clone();
    let mut live = Spawned::start(minimind(s.path()).arg("resume").arg(&point).arg("--quiet"));
    live.wait_for("resuming from", 30);
    let o = expect(minimind(s.path()).args(["resume", "--quiet", "-j", "1"]).arg(&sweep), 0);
    let out = stdout(&o);
    assert!(
        out.contains("moe=0,lr=1e-3: still trained by process") && out.contains("waiting for it to end"),
        "{out}"
    );
    assert!(out.contains("moe=0,lr=1e-3 completed (by process"), "{out}");
    assert!(!out.contains("FAILED"), "{out}");
    let (code, _, _) = live.finish();
    assert_eq!(code, Some(0));
    assert!(index(&sweep).iter().all(|r| r.1 == "completed"), "{:?}", index(&sweep));
}

#[test]
fn a_failed_point_says_why_and_sweep_toml_keeps_points_inside() {
    let s = Scratch::new();
    let file = sweep_file(&s, GRID, 2);
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let sweep = sweeps(&s)[0].clone();
    // A point whose process cannot start training (its config.toml broken by hand): the FAILED
    // line carries the first error it printed, kept in the point's stderr.log.
    let point = sweep.join("moe=1,lr=3e-3");
    fs::write(
        point.join("meta.json"),
        fs::read_to_string(point.join("meta.json")).unwrap().replace("\"completed\"", "\"stopped\""),
    )
    .unwrap();
    fs::write(point.join("config.toml"), "[model]\nhidden_size = \"wide\"\n").unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&sweep), 1);
    let out = stdout(&o);
    let line = out.lines().find(|l| l.contains("FAILED")).unwrap_or_else(|| panic!("{out}"));
    assert!(line.contains("hidden_size"), "the point's own first error: {line}");
    assert!(fs::read_to_string(point.join("stderr.log")).unwrap().contains("hidden_size"));
    // A hand-edited sweep.toml cannot send a point outside the sweep.
    let text = fs::read_to_string(sweep.join("sweep.toml")).unwrap();
    let escaped = text.replacen("folder = \"moe=0,lr=1e-3\"", "folder = \"../x\"", 1);
    assert_ne!(text, escaped, "sweep.toml names its points' folders");
    fs::write(sweep.join("sweep.toml"), escaped).unwrap();
    let o = expect(minimind(s.path()).arg("resume").arg(&sweep), 1);
    assert!(stderr(&o).contains("folder `../x`, which is not a folder inside the sweep"), "{}", stderr(&o));
    assert!(!s.path().join("runs/x").exists());
    let _ = file;
}
