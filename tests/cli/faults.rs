//! Faults injected into runs through the real binary: kill -9 at random moments, signals, a
//! closed stdout, full disks, two processes on one folder, damaged files, changed data.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::*;

/// A model whose micro-batches take about half a second: signals land inside a step.
const SLOW: &str = r#"
name = "slow"
[model]
hidden_size = 256
num_hidden_layers = 4
num_attention_heads = 4
num_key_value_heads = 2
max_position_embeddings = 256
[data]
path = "data.jsonl"
tokenizer = "tok.json"
max_seq_len = 128
[train]
batch_size = 4
accumulation_steps = 4
max_steps = 5
dtype = "float32"
device = "cpu"
threads = 1
[checkpoint]
log_interval = 1
save_interval = 100
"#;

fn spawn_run(s: &Scratch, args: &[&str]) -> Spawned {
    Spawned::start(minimind(s.path()).arg("run").args(args).args(["--quiet", "--progress-every", "0"]))
}

fn checkpoints(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    v.sort();
    v
}

fn model_bytes(run: &Path) -> Vec<u8> {
    fs::read(run.join("model/model.safetensors")).unwrap()
}

/// A small deterministic generator for the test's own random choices.
struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn kill_9_at_random_moments_then_resume_matches_an_uninterrupted_run() {
    let s = Scratch::new();
    // 40 steps, a checkpoint every 4, only one kept: a kill at any moment must leave one.
    s.micro("");
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("max_steps = 12", "max_steps = 40")
        .replace("keep_last = 2", "keep_last = 1")
        .replace("hidden_size = 32", "hidden_size = 64");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let straight = s.runs()[0].clone();

    // Killed inside the checkpoint at step 8, after its files were written, before its marker.
    let o = run_quiet(s.path(), &["micro.toml", "--crash-at", "checkpoint:8"]).output().unwrap();
    assert_eq!(o.status.code(), None, "killed by SIGKILL: {}", stderr(&o));
    let run = s.runs()[1].clone();
    assert_eq!(meta(&run)["status"], "running", "a kill -9 cannot record anything");
    let complete: Vec<String> = checkpoints(&run).into_iter().filter(|c| !c.starts_with('.')).collect();
    assert_eq!(complete, ["step-00000004"], "the kept checkpoint survived; the partial one is not complete");

    let mut rng = Lcg(7);
    let mut kills = 0;
    for _ in 0..6 {
        let mut child = minimind(s.path())
            .args(["resume", "--quiet"])
            .arg(&run)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30 + rng.below(600)));
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap();
            kills += 1;
        }
        child.wait().unwrap();
        if meta(&run)["status"] == "completed" {
            break;
        }
        let complete = checkpoints(&run).iter().filter(|c| !c.starts_with('.')).count();
        assert!(complete >= 1, "a complete checkpoint is always on disk: {:?}", checkpoints(&run));
    }
    eprintln!("{kills} resumes killed at random moments");
    assert!(kills >= 2, "the random kills landed during runs ({kills})");
    if meta(&run)["status"] != "completed" {
        // Killed in the middle of exporting the final model.
        let o = minimind(s.path())
            .args(["resume", "--quiet", "--crash-at", "export"])
            .arg(&run)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), None, "{}", stderr(&o));
        expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    }
    assert_eq!(meta(&run)["status"], "completed");
    assert_eq!(metric_rows(&straight), metric_rows(&run));
    assert_eq!(metric_rows(&run).len(), 41, "header + 40 steps, each once");
    assert_eq!(model_bytes(&straight), model_bytes(&run));
}

#[test]
fn a_kill_during_export_resumes_into_a_complete_export() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let o = run_quiet(s.path(), &["micro.toml", "--crash-at", "export"]).output().unwrap();
    assert_eq!(o.status.code(), None);
    let run = s.runs()[1].clone();
    assert!(!run.join("model/config.json").exists(), "config.json is written last");
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(stdout(&o).contains("(step 12)"), "{}", stdout(&o));
    assert_eq!(model_bytes(&s.runs()[0]), model_bytes(&run));
    assert_eq!(metric_rows(&s.runs()[0]), metric_rows(&run));
}

#[test]
fn a_signal_mid_step_checkpoints_the_last_complete_step_and_resumes_exactly() {
    let s = Scratch::new();
    s.write("slow.toml", SLOW);
    expect(&mut run_quiet(s.path(), &["slow.toml"]), 0);
    let mut p = spawn_run(&s, &["slow.toml"]);
    p.wait_for("step 3/5, micro-batch 1/4", 60);
    p.signal("INT");
    let (code, out, err) = p.finish();
    assert_eq!(code, Some(130), "{out}\n{err}");
    assert!(err.contains("SIGINT: stopping after this micro-batch"), "{err}");
    assert!(err.contains("Ctrl-C again to quit now"), "{err}");
    assert!(out.contains("stopped by SIGINT after step 2"), "{out}");
    let run = s.runs()[1].clone();
    assert_eq!(checkpoints(&run), ["step-00000002"]);
    let m = meta(&run);
    assert_eq!((m["status"].as_str(), m["last_step"].as_u64()), (Some("stopped"), Some(2)));
    assert_eq!(m["reason"], "stopped by SIGINT");
    expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert_eq!(metric_rows(&s.runs()[0]), metric_rows(&run));
    assert_eq!(model_bytes(&s.runs()[0]), model_bytes(&run));
}

#[test]
fn a_second_signal_quits_at_once_and_the_previous_checkpoint_stays_valid() {
    let s = Scratch::new();
    s.write("slow.toml", &SLOW.replace("save_interval = 100", "save_interval = 1"));
    let mut p = spawn_run(&s, &["slow.toml"]);
    p.wait_for("step 2/5, micro-batch 1/4", 60);
    p.signal("INT");
    std::thread::sleep(Duration::from_millis(100));
    p.signal("INT");
    let (code, out, err) = p.finish();
    assert_eq!(code, Some(130), "{out}\n{err}");
    assert!(err.contains("SIGINT: quitting now"), "{err}");
    let run = s.runs()[0].clone();
    let m = meta(&run);
    assert_eq!(m["status"], "stopped");
    assert!(m["reason"].as_str().unwrap().contains("SIGINT twice"), "{m}");
    assert_eq!(m["last_step"], 1);
    assert_eq!(checkpoints(&run), ["step-00000001"]);
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(stdout(&o).contains("(step 1)"), "{}", stdout(&o));
    let steps = metric(&run, "step");
    assert_eq!(steps, [1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn progress_lines_keep_coming_inside_a_long_micro_batch() {
    let s = Scratch::new();
    // Micro-batches of about two seconds, a progress line wanted every half second; no --quiet:
    // without a terminal there is no bar, only lines.
    s.write(
        "slow.toml",
        &SLOW.replace("batch_size = 4", "batch_size = 16").replace("max_steps = 5", "max_steps = 1"),
    );
    let o = expect(minimind(s.path()).args(["run", "slow.toml", "--progress-every", "0.5"]), 0);
    let out = stdout(&o);
    let running: Vec<&str> = out.lines().filter(|l| l.contains(" running: elapsed ")).collect();
    assert!(running.len() >= 2, "{out}");
    assert!(running.iter().all(|l| l.starts_with("step 1/1, micro-batch ") && l.contains(", ETA ")), "{out}");
    assert!(
        out.contains("step 1/1, micro-batch 1/4 running"),
        "from the start of the first micro-batch: {out}"
    );
}

#[test]
fn sighup_stops_with_a_checkpoint_like_sigint() {
    let s = Scratch::new();
    s.write("slow.toml", SLOW);
    let mut p = spawn_run(&s, &["slow.toml"]);
    p.wait_for("step 2/5, micro-batch 4/4", 60);
    p.signal("HUP");
    let (code, out, err) = p.finish();
    assert_eq!(code, Some(129), "{out}\n{err}");
    assert!(err.contains("SIGHUP: stopping after this micro-batch"), "{err}");
    let run = s.runs()[0].clone();
    let m = meta(&run);
    assert_eq!((m["status"].as_str(), m["reason"].as_str()), (Some("stopped"), Some("stopped by SIGHUP")));
    assert!(!checkpoints(&run).is_empty());
    expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert_eq!(metric(&run, "step"), [1.0, 2.0, 3.0, 4.0, 5.0]);
}

/// A data file big enough that tokenising it takes many seconds.
fn big_data(s: &Scratch, copies: usize) {
    let mut data = String::with_capacity(SONGCI.len() * copies);
    for _ in 0..copies {
        data.push_str(SONGCI);
    }
    s.write("data.jsonl", &data);
}

fn cache_entries(s: &Scratch) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(s.path().join("runs/.cache"))
        .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_signal_during_tokenisation_stops_it_within_a_second() {
    let s = Scratch::new();
    big_data(&s, 60);
    s.micro("");
    let p = spawn_run(&s, &["micro.toml"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    // Shards are tokenised into `.partial-<cache>/`; `.building-` appears only for the final join.
    while !cache_entries(&s).iter().any(|e| e.starts_with(".partial-")) {
        assert!(Instant::now() < deadline, "tokenising never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let sent = Instant::now();
    p.signal("TERM");
    let (code, out, err) = p.finish();
    let took = sent.elapsed();
    assert_eq!(code, Some(143), "{out}\n{err}");
    eprintln!("tokenising stopped {took:?} after SIGTERM");
    assert!(took < Duration::from_secs(1), "stopped {took:?} after the signal");
    assert!(
        !cache_entries(&s)
            .iter()
            .any(|e| e.starts_with(".building-") || e.starts_with("tokens-") && !e.ends_with(".lock")),
        "no cache is left half-joined or taken as complete: {:?}",
        cache_entries(&s)
    );
    assert!(
        cache_entries(&s).iter().any(|e| e.starts_with(".partial-")),
        "the tokenised shards are kept for the next build: {:?}",
        cache_entries(&s)
    );
    let run = s.runs()[0].clone();
    assert_eq!(meta(&run)["status"], "stopped");
}

#[test]
fn a_closed_stdout_does_not_stop_training() {
    let s = Scratch::new();
    s.micro("");
    let mut child = run_quiet(s.path(), &["micro.toml"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let mut first = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        assert!(!first.is_empty());
    } // the read end closes here, as `| head -1` does
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let run = s.runs()[0].clone();
    assert_eq!(meta(&run)["status"], "completed");
    assert!(fs::read_to_string(run.join("train.log")).unwrap().contains("done in"));
    assert_eq!(metric_rows(&run).len(), 13);
}

#[test]
fn a_panic_is_recorded_as_a_failure_with_the_last_step() {
    let s = Scratch::new();
    s.micro("");
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--crash-at", "panic:3"]), 1);
    assert!(stderr(&o).contains("internal error (a bug"), "{}", stderr(&o));
    let m = meta(&s.runs()[0]);
    assert_eq!(m["status"], "failed");
    assert_eq!(m["last_step"], 3);
    assert!(m["error"].as_str().unwrap().contains("testing aid"), "{m}");
}

#[test]
fn one_process_per_run_folder() {
    let s = Scratch::new();
    s.micro("");
    s.write("long.toml", "extends = \"micro.toml\"\nname = \"long\"\n[train]\nmax_steps = 100000\n[checkpoint]\nsave_interval = 5\n");
    let mut first = spawn_run(&s, &["long.toml"]);
    first.wait_for("step 6/100000", 60);
    let run = s.runs()[0].clone();
    let pid = first.child.id();
    let started = Instant::now();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 1);
    assert!(started.elapsed() < Duration::from_secs(5), "fails at once");
    let err = stderr(&o);
    assert!(err.contains(&format!("in use by another minimind process (pid {pid})")), "{err}");
    // Auto-resume does not adopt a live run: it starts its own.
    let o = expect(
        &mut run_quiet(
            s.path(),
            &["long.toml", "--set", "checkpoint.resume=\"auto\"", "--set", "train.max_steps=2"],
        ),
        0,
    );
    assert!(stdout(&o).contains("is still running"), "{}", stdout(&o));
    assert_eq!(s.runs().len(), 2);
    first.signal("INT");
    let (code, _, _) = first.finish();
    assert_eq!(code, Some(130));
    // Once the first process is gone, the folder is free again.
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "checkpoint.resume=\"auto\""]), 0);
    assert!(!stdout(&o).contains("still running"), "{}", stdout(&o));
}

#[test]
fn resuming_a_run_without_a_checkpoint_says_so_and_starts_from_step_0() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    // Killed while writing its first checkpoint: no complete one exists.
    let o = run_quiet(s.path(), &["micro.toml", "--crash-at", "checkpoint:4"]).output().unwrap();
    assert_eq!(o.status.code(), None);
    let run = s.runs()[1].clone();
    assert!(checkpoints(&run).iter().all(|c| c.starts_with('.')), "{:?}", checkpoints(&run));
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(stdout(&o).contains("no complete checkpoint yet: starting from step 0"), "{}", stdout(&o));
    assert_eq!(metric_rows(&s.runs()[0]), metric_rows(&run));
    assert_eq!(meta(&run)["resumes"][0]["from_step"], 0);
}

#[test]
fn a_data_change_before_resume_is_refused_unless_allowed() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let run = s.runs()[0].clone();
    // Fewer documents (7 micro-batches an epoch instead of 500, so the cursor at step 5, batch
    // 10, is past the new epoch's end) and a new one.
    let mut data: String = SONGCI.lines().take(29).map(|l| format!("{l}\n")).collect();
    data.push_str("{\"text\": \"一首新词\"}\n");
    s.write("data.jsonl", &data);
    let o =
        expect(minimind(s.path()).args(["resume", "--quiet", "--set", "train.max_steps=13"]).arg(&run), 1);
    let err = stderr(&o);
    assert!(err.contains("what it trains on changed") && err.contains("the data file"), "{err}");
    // A refused resume changes nothing: the run is still stopped, its config as it was.
    assert_eq!(meta(&run)["status"], "stopped");
    assert_eq!(meta(&run)["resumes"].as_array().unwrap().len(), 0);
    assert!(fs::read_to_string(run.join("config.toml")).unwrap().contains("max_steps = 12"));
    assert!(err.contains("data.jsonl changed (sha256"), "{err}");
    assert!(err.contains("--allow-data-change"), "{err}");
    let o = expect(
        minimind(s.path()).args(["resume", "--quiet", "--allow-data-change", "--stop-after", "9"]).arg(&run),
        130,
    );
    assert!(stdout(&o).contains("allowed by --allow-data-change"), "{}", stdout(&o));
    let m = meta(&run);
    let changes =
        m["resumes"].as_array().unwrap().last().unwrap()["data_changes"].as_array().unwrap().clone();
    assert!(changes[0].as_str().unwrap().contains("the data file"), "{m}");
    // The checkpoint written on the new data resumes as it is: its cursor carries the old
    // data's epochs, which is no damage.
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(!stdout(&o).contains("damaged") && stdout(&o).contains("(step 9)"), "{}", stdout(&o));
    // A changed tokenizer is named as such.
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let run = s.runs()[1].clone();
    let mut tok = fs::read_to_string(s.path().join("tok.json")).unwrap();
    tok.push('\n');
    s.write("tok.json", &tok);
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 1);
    assert!(stderr(&o).contains("the tokenizer"), "{}", stderr(&o));
}

#[test]
fn resume_set_takes_safe_keys_refuses_others_and_extends_a_completed_run() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let run = s.runs()[0].clone();
    let o = expect(
        minimind(s.path())
            .args(["resume", "--quiet", "--set", "model.hidden_size=64", "--set", "seed=3"])
            .arg(&run),
        2,
    );
    let err = stderr(&o);
    assert!(err.contains("model.hidden_size, seed cannot change when a run resumes"), "{err}");
    assert!(err.contains("a resume may set: train.max_steps"), "{err}");
    let o = expect(
        minimind(s.path())
            .args(["resume", "--quiet", "--set", "train.max_steps=14", "--set", "checkpoint.log_interval=2"])
            .arg(&run),
        0,
    );
    assert!(stdout(&o).contains("step 14/14"), "{}", stdout(&o));
    let saved: toml::Table = toml::from_str(&fs::read_to_string(run.join("config.toml")).unwrap()).unwrap();
    assert_eq!(saved["train"]["max_steps"].as_integer(), Some(14));
    let m = meta(&run);
    let overrides = &m["resumes"][0]["overrides"];
    assert_eq!(overrides[0]["key"], "train.max_steps");
    assert_eq!(overrides[0]["source"], "--set train.max_steps=14");
    assert_eq!(metric(&run, "step"), [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 14.0]);
    // A completed run resumes only to go further.
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 1);
    assert!(stderr(&o).contains("already completed (14 steps)"), "{}", stderr(&o));
    assert!(stderr(&o).contains("--set train.max_steps=28"), "{}", stderr(&o));
    expect(minimind(s.path()).args(["resume", "--quiet", "--set", "train.max_steps=16"]).arg(&run), 0);
    assert_eq!(meta(&run)["last_step"], 16);
}

#[test]
fn a_hand_edited_config_toml_gets_located_errors_not_a_panic() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let run = s.runs()[0].clone();
    let path = run.join("config.toml");
    let good = fs::read_to_string(&path).unwrap();
    let heads_line = good.lines().position(|l| l.starts_with("num_attention_heads")).unwrap() + 1;
    fs::write(&path, good.replace("num_attention_heads = 2", "num_attention_heads = 3")).unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 2);
    let err = stderr(&o);
    assert!(!err.contains("panicked"), "{err}");
    let hidden_line = good.lines().position(|l| l.starts_with("hidden_size")).unwrap() + 1;
    assert!(
        err.contains(&format!("config.toml:{hidden_line}:1: `model.hidden_size`: 32 is not divisible by model.num_attention_heads (3, from {}:{heads_line}:1)", path.display())),
        "{err}"
    );
    fs::write(&path, good.replace("batch_size = 4", "batch_sise = 4")).unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 2);
    assert!(stderr(&o).contains("did you mean `train.batch_size`?"), "{}", stderr(&o));
    fs::write(&path, good.replace("batch_size = 4", "batch_size = \"4\"")).unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 2);
    assert!(stderr(&o).contains("expected a non-negative integer, got the string \"4\""), "{}", stderr(&o));
    fs::write(&path, &good).unwrap();
    expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
}

#[test]
fn damaged_meta_json_does_not_block_resume() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let run = s.runs()[1].clone();
    let text = fs::read_to_string(run.join("meta.json")).unwrap();
    let damaged = text.replace("\"cpu_cores\": ", "\"cpu_cores\": \"many\", \"x\": ");
    fs::write(run.join("meta.json"), damaged).unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(stderr(&o).contains("damaged field(s) cpu_cores were reset"), "{}", stderr(&o));
    assert_eq!(meta(&run)["status"], "completed");
    assert_eq!(meta(&run)["name"], "micro", "the fields that were fine are kept");
    // Not JSON at all (a crash can leave no meta.json behind, or garbage).
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let run = s.runs()[2].clone();
    fs::write(run.join("meta.json"), "{\"name\": \"mic").unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(stderr(&o).contains("rebuilt from config.toml"), "{}", stderr(&o));
    assert_eq!(metric_rows(&s.runs()[0]), metric_rows(&run));
}

#[test]
fn a_partial_metrics_row_is_dropped_on_resume() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "6"]), 130);
    let run = s.runs()[1].clone();
    let mut f = fs::OpenOptions::new().append(true).open(run.join("metrics.csv")).unwrap();
    std::io::Write::write_all(&mut f, b"7,0,123,2").unwrap();
    drop(f);
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    assert!(stdout(&o).contains("dropped a partial last row (\"7,0,123,2\")"), "{}", stdout(&o));
    assert_eq!(metric_rows(&s.runs()[0]), metric_rows(&run));
}

#[test]
fn checksums_are_verified_before_compatibility() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "9"]), 130);
    let run = s.runs()[1].clone();
    // The newest checkpoint's state.json now claims another model: damage, not a real mismatch.
    let state = run.join("checkpoints/step-00000009/state.json");
    let text = fs::read_to_string(&state).unwrap().replace("\"hidden_size\": 32", "\"hidden_size\": 64");
    fs::write(&state, text).unwrap();
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    let out = stdout(&o);
    assert!(out.contains("skipping damaged checkpoint") && out.contains("(step 8)"), "{out}");
    assert!(out.contains("kept as"), "{out}");
    assert!(run.join("checkpoints/step-00000009.damaged").is_dir());
    assert_eq!(metric_rows(&s.runs()[0]), metric_rows(&run));
}

fn token_cache(s: &Scratch) -> PathBuf {
    let name =
        cache_entries(s).into_iter().find(|e| e.starts_with("tokens-") && !e.ends_with(".lock")).unwrap();
    s.path().join("runs/.cache").join(name)
}

#[test]
fn a_damaged_token_cache_is_rebuilt_never_trained_on() {
    let s = Scratch::new();
    s.micro("");
    let text =
        fs::read_to_string(s.path().join("micro.toml")).unwrap().replace("max_steps = 12", "max_steps = 3");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let tokens = token_cache(&s).join("tokens.bin");
    let bytes = fs::read(&tokens).unwrap();
    fs::write(&tokens, &bytes[..bytes.len() - 10]).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let out = stdout(&o);
    assert!(
        out.contains("is damaged (tokens.bin has") && out.contains("truncated?); rebuilding it"),
        "{out}"
    );
    assert_eq!(out.matches("is damaged").count(), 1, "said once: {out}");
    // Same length, one token changed: the checksum catches it.
    let mut bytes = fs::read(&tokens).unwrap();
    bytes[100] ^= 1;
    fs::write(&tokens, &bytes).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    assert!(stdout(&o).contains("tokens.bin does not match its checksum"), "{}", stdout(&o));
    fs::write(token_cache(&s).join("info.json"), "{").unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    assert!(stdout(&o).contains("info.json"), "{}", stdout(&o));
    let runs = s.runs();
    for r in &runs[1..] {
        assert_eq!(metric_rows(&runs[0]), metric_rows(r), "trained on the rebuilt cache");
    }
}

#[test]
fn dead_cache_builders_are_cleared_and_concurrent_runs_build_the_cache_once() {
    let s = Scratch::new();
    big_data(&s, 8);
    s.micro("");
    let text =
        fs::read_to_string(s.path().join("micro.toml")).unwrap().replace("max_steps = 12", "max_steps = 1");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    // A builder that died (its process is gone) left its folder behind.
    let mut dead = Command::new("true").spawn().unwrap();
    let pid = dead.id();
    dead.wait().unwrap();
    let leftover = s.path().join(format!("runs/.cache/.building-{pid}-tokens-0123456789abcdef"));
    fs::create_dir_all(&leftover).unwrap();
    fs::write(leftover.join("tokens.bin"), b"partial").unwrap();
    let a = spawn_run(&s, &["micro.toml"]);
    let b = spawn_run(&s, &["micro.toml"]);
    let (ca, oa, ea) = a.finish();
    let (cb, ob, eb) = b.finish();
    assert_eq!((ca, cb), (Some(0), Some(0)), "{oa}\n{ea}\n{ob}\n{eb}");
    let waited = [&oa, &ob].iter().filter(|o| o.contains("waiting for process")).count();
    assert_eq!(waited, 1, "one built, the other waited:\n{oa}\n---\n{ob}");
    let caches: Vec<String> = cache_entries(&s).into_iter().filter(|e| !e.ends_with(".lock")).collect();
    assert_eq!(caches.len(), 1, "{caches:?}");
    assert!(!leftover.exists(), "the dead builder's folder is gone");
}

#[test]
fn bad_lines_are_skipped_everywhere_the_data_is_read() {
    let s = Scratch::new();
    // Bad lines first, so the final evaluation (the first rows of the file) meets them too.
    let mut data: Vec<u8> = b"{\"text\": \"\xff\xfe\"}\nnot json\n".to_vec();
    for line in SONGCI.lines().take(40) {
        data.extend_from_slice(line.as_bytes());
        data.push(b'\n');
    }
    fs::write(s.path().join("data.jsonl"), &data).unwrap();
    s.micro("");
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 1);
    assert!(stderr(&o).contains("data.jsonl:1: malformed line: invalid UTF-8 at byte 11"), "{}", stderr(&o));
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("max_seq_len = 32", "max_seq_len = 32\nskip_bad_lines = true")
        .replace("max_steps = 12", "max_steps = 2");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    assert!(stdout(&o).contains("2 malformed line(s) skipped (line 1, 2)"), "{}", stdout(&o));
    let m = meta(&s.runs()[1]);
    assert_eq!(m["skipped_lines"], 2);
    assert_eq!(m["skipped_line_numbers"], serde_json::json!([1, 2]));
    assert!(m["final_eval"]["loss"].as_f64().unwrap() > 0.0);
}

#[test]
fn generate_samples_from_an_interrupted_run() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "4"]), 130);
    let run = s.runs()[0].clone();
    let o = expect(
        minimind(s.path()).arg("generate").arg(&run).args(["--prompt", "春风", "--max-new-tokens", "4"]),
        0,
    );
    assert!(stdout(&o).starts_with("春风"), "{}", stdout(&o));
    assert!(
        stderr(&o).contains("no export yet: sampling from") && stderr(&o).contains("step 4"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_bad_config_json_is_an_error_not_a_panic() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "train.max_steps=1"]), 0);
    let model = s.runs()[0].join("model");
    let cfg = fs::read_to_string(model.join("config.json")).unwrap();
    for (from, to, says) in [
        (
            "\"num_key_value_heads\": 1",
            "\"num_key_value_heads\": 3",
            "not a multiple of model.num_key_value_heads",
        ),
        ("\"num_attention_heads\": 2", "\"num_attention_heads\": 0", "must be greater than 0"),
        ("\"hidden_size\": 32", "\"hidden_size\": 33", "not divisible"),
    ] {
        fs::write(model.join("config.json"), cfg.replace(from, to)).unwrap();
        for args in [
            vec!["eval", "--data", "data.jsonl", "--seq-len", "16", "--batch-size", "2", "--hf-dir"],
            vec!["generate", "--prompt", "x"],
        ] {
            let o = expect(minimind(s.path()).args(&args).arg(&model), 1);
            let err = stderr(&o);
            assert!(err.contains(says) && !err.contains("panicked"), "{args:?} {to}: {err}");
        }
    }
}

#[test]
fn a_disk_filling_while_metrics_are_appended_reports_that_first() {
    let s = Scratch::new();
    let mnt = s.path().join("small");
    let Some(disk) = Tmpfs::mount(&mnt, "256k") else { return };
    // A small data file, so the token cache leaves the disk to metrics.csv and train.log; no
    // checkpoint before the disk is full.
    let small: String = SONGCI.lines().take(200).map(|l| format!("{l}\n")).collect();
    s.write("small.jsonl", &small);
    s.micro("");
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("path = \"data.jsonl\"", "path = \"small.jsonl\"")
        .replace("max_steps = 12", "max_steps = 1000000")
        .replace("save_interval = 4", &format!("save_interval = 1000000\nsave_dir = \"{}\"", mnt.display()));
    fs::write(s.path().join("micro.toml"), text).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 1);
    let err = stderr(&o);
    let run: PathBuf = fs::read_dir(&mnt)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .unwrap();
    // A row goes to metrics.csv, then to the TensorBoard events: whichever needs a new page of
    // the full disk first reports it.
    let first = err.lines().find(|l| l.starts_with("error: ")).unwrap();
    let csv = format!("appending a row to {}", run.join("metrics.csv").display());
    let events = format!("appending to {}", run.join("events.out.tfevents").display());
    assert!(
        (first.contains(&csv) || first.contains(&events)) && first.contains("No space left"),
        "the first error is the metrics one: {err}"
    );
    assert!(err.contains("could not record the failure in meta.json either"), "{err}");
    // With room again the run resumes (from step 0: it had no checkpoint yet), whatever the
    // full disk left at the end of metrics.csv.
    disk.resize("64m");
    let o =
        expect(minimind(s.path()).args(["resume", "--quiet", "--set", "train.max_steps=20"]).arg(&run), 0);
    assert!(stdout(&o).contains("no complete checkpoint yet"), "{}", stdout(&o));
    let want: Vec<f64> = (1..=20).map(f64::from).collect();
    assert_eq!(metric(&run, "step"), want);
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let s = Scratch::new();
    let mnt = s.path().join("small");
    let Some(disk) = Tmpfs::mount(&mnt, "3m") else { return };
    s.micro("");
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("keep_last = 2", &format!("keep_last = 5\nsave_dir = \"{}\"", mnt.display()));
    fs::write(s.path().join("micro.toml"), text).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 1);
    let err = stderr(&o);
    assert!(err.contains("writing checkpoint") && err.contains("No space left"), "{err}");
    let run: PathBuf = fs::read_dir(&mnt)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .unwrap();
    assert_eq!(meta(&run)["status"], "failed");
    let complete: Vec<_> =
        fs::read_dir(run.join("checkpoints")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!complete.is_empty(), "an earlier checkpoint exists");
    assert!(
        complete.iter().all(|n| !n.to_string_lossy().starts_with('.')),
        "no partial checkpoint left: {complete:?}"
    );
    // With room again, the run resumes from the last complete checkpoint and finishes.
    disk.resize("64m");
    let o = expect(minimind(s.path()).arg("resume").arg(&run).arg("--quiet"), 0);
    assert!(stdout(&o).contains("resuming from"), "{}", stdout(&o));
}
