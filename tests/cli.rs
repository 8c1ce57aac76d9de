//! Every CLI test, in one binary, driving the real executable.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The binary with a clean `MINIMIND_*` environment, run in `dir`.
fn minimind(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_minimind"));
    cmd.current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("MINIMIND_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs and expects the given exit code; returns the output.
fn expect(cmd: &mut Command, code: i32) -> Output {
    let o = cmd.output().expect("binary runs");
    assert_eq!(o.status.code(), Some(code), "stdout:\n{}\nstderr:\n{}", stdout(&o), stderr(&o));
    o
}

/// A scratch folder with a tiny data file and tokenizer next to the experiment files.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(repo().join("data/minimind_tokenizer.json"), dir.path().join("tok.json")).unwrap();
        fs::copy(repo().join("data/songci_2k.jsonl"), dir.path().join("data.jsonl")).unwrap();
        Scratch { dir }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        fs::write(&p, text).unwrap();
        p
    }
    /// A valid small experiment file body (data paths relative to the file).
    fn base(&self) -> PathBuf {
        self.write("base.toml", "name = \"base\"\n[data]\npath = \"data.jsonl\"\ntokenizer = \"tok.json\"\n")
    }
}

const SONGCI: &str = include_str!("../data/songci_2k.jsonl");

fn resolved(o: &Output) -> toml::Table {
    toml::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}\n{}", stdout(o)))
}

// ---------------------------------------------------------------------------------------------
// Config layering and errors

#[test]
fn each_layer_beats_the_ones_below() {
    let s = Scratch::new();
    s.base();
    s.write("mid.toml", "extends = \"base.toml\"\nname = \"mid\"\n[train]\nbatch_size = 5\n");
    s.write("exp.toml", "extends = \"mid.toml\"\nname = \"exp\"\n[train]\nbatch_size = 6\n");
    let get = |o: &Output| resolved(o)["train"]["batch_size"].as_integer().unwrap();

    // default < extends chain
    let o = expect(minimind(s.path()).args(["config", "mid.toml"]), 0);
    assert_eq!(get(&o), 5);
    let o = expect(minimind(s.path()).args(["config", "base.toml"]), 0);
    assert_eq!(get(&o), 32, "MiniMind's default");
    // chain < file
    let o = expect(minimind(s.path()).args(["config", "exp.toml"]), 0);
    assert_eq!(get(&o), 6);
    // file < environment
    let o = expect(minimind(s.path()).args(["config", "exp.toml"]).env("MINIMIND_TRAIN__BATCH_SIZE", "7"), 0);
    assert_eq!(get(&o), 7);
    // environment < --set
    let o = expect(
        minimind(s.path())
            .args(["config", "exp.toml", "--set", "train.batch_size=8"])
            .env("MINIMIND_TRAIN__BATCH_SIZE", "7"),
        0,
    );
    assert_eq!(get(&o), 8);
    // the last --set wins
    let o = expect(
        minimind(s.path()).args([
            "config",
            "exp.toml",
            "--set",
            "train.batch_size=8",
            "--set",
            "train.batch_size=9",
        ]),
        0,
    );
    assert_eq!(get(&o), 9);
}

#[test]
fn sources_name_each_layer() {
    let o = expect(
        minimind(&repo()).args([
            "config",
            "experiments/moe_small.toml",
            "--set",
            "train.learning_rate=1e-3",
            "--sources",
        ]),
        0,
    );
    let out = stdout(&o);
    assert!(out.contains("learning_rate = 0.001  # --set train.learning_rate=1e-3"), "{out}");
    assert!(out.contains("hidden_size = 640  # experiments/moe_small.toml:8:1"), "{out}");
    assert!(out.contains("path = ") && out.contains("# experiments/base.toml:"), "{out}");
    assert!(out.contains("num_hidden_layers = 8  # default"), "{out}");
    assert!(out.contains("intermediate_size = 1728  # derived"), "{out}");

    let o = expect(
        minimind(&repo())
            .args(["config", "experiments/tiny.toml", "--sources"])
            .env("MINIMIND_TRAIN__BATCH_SIZE", "3"),
        0,
    );
    assert!(
        stdout(&o).contains("batch_size = 3  # environment variable MINIMIND_TRAIN__BATCH_SIZE"),
        "{}",
        stdout(&o)
    );
}

#[test]
fn relative_paths_are_relative_to_the_file_that_sets_them() {
    let s = Scratch::new();
    s.base();
    fs::create_dir(s.path().join("sub")).unwrap();
    s.write("sub/exp.toml", "extends = \"../base.toml\"\nname = \"x\"\n");
    let o = expect(minimind(&repo()).args(["config"]).arg(s.path().join("sub/exp.toml")), 0);
    let t = resolved(&o);
    let path = PathBuf::from(t["data"]["path"].as_str().unwrap());
    assert_eq!(path.canonicalize().unwrap(), s.path().join("data.jsonl").canonicalize().unwrap());
}

/// Runs `config` on a file with the given text, expects exit 2 and returns stderr.
fn config_error(s: &Scratch, text: &str, extra: &[&str]) -> String {
    s.base();
    s.write("bad.toml", text);
    let o = expect(minimind(s.path()).args(["config", "bad.toml"]).args(extra), 2);
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn malformed_toml_is_located() {
    let s = Scratch::new();
    let err = config_error(&s, "extends = \"base.toml\"\n[train]\nbatch_size = = 3\n", &[]);
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("malformed TOML"), "{err}");
}

#[test]
fn unknown_key_is_located_with_a_suggestion() {
    let s = Scratch::new();
    let err = config_error(&s, "extends = \"base.toml\"\n\n[train]\nbatch_sise = 3\n", &[]);
    assert!(err.contains("bad.toml:4:1: `train.batch_sise`: unknown key"), "{err}");
    assert!(err.contains("did you mean `train.batch_size`?"), "{err}");
    let err = config_error(&s, "extends = \"base.toml\"\n[trian]\nbatch_size = 3\n", &[]);
    assert!(err.contains("bad.toml:2:") && err.contains("did you mean `train`?"), "{err}");
}

#[test]
fn wrong_type_names_expected_got_and_source() {
    let s = Scratch::new();
    let err = config_error(&s, "extends = \"base.toml\"\n[train]\nbatch_size = \"big\"\n", &[]);
    assert!(err.contains("bad.toml:3:14: `train.batch_size`"), "{err}");
    assert!(err.contains("string") && err.contains("usize"), "{err}");
    let err = config_error(&s, "extends = \"base.toml\"\n", &["--set", "train.batch_size=big"]);
    assert!(err.contains("--set train.batch_size=big: `train.batch_size`"), "{err}");
    assert!(err.contains("string") && err.contains("usize"), "{err}");
    let err = config_error(&s, "extends = \"base.toml\"\n[train]\ndtype = \"fp8\"\n", &[]);
    assert!(err.contains("bad.toml:3:9") && err.contains("bfloat16"), "{err}");
}

#[test]
fn extends_cycles_and_missing_files() {
    let s = Scratch::new();
    s.write("a.toml", "extends = \"b.toml\"\n");
    s.write("b.toml", "name = \"b\"\nextends = \"a.toml\"\n");
    let o = expect(minimind(s.path()).args(["config", "a.toml"]), 2);
    let err = stderr(&o);
    assert!(err.contains("b.toml:2:1: `extends`: `extends` cycle"), "{err}");
    let err = config_error(&s, "extends = \"nowhere.toml\"\n", &[]);
    assert!(err.contains("bad.toml:1:1: `extends`: cannot read experiment file"), "{err}");
    assert!(err.contains("nowhere.toml"), "{err}");
    let o = expect(minimind(s.path()).args(["validate", "missing.toml"]), 2);
    assert!(stderr(&o).contains("cannot read experiment file missing.toml"), "{}", stderr(&o));
}

#[test]
fn bad_set_arguments() {
    let s = Scratch::new();
    let err = config_error(&s, "extends = \"base.toml\"\n", &["--set", "train.batch_size"]);
    assert!(err.contains("--set train.batch_size: expected `section.key=value`"), "{err}");
    let err = config_error(&s, "extends = \"base.toml\"\n", &["--set", "train.betas=[0.9,"]);
    assert!(err.contains("invalid value `[0.9,`"), "{err}");
    let err = config_error(&s, "extends = \"base.toml\"\n", &["--set", "train.learning_rat=1"]);
    assert!(err.contains("unknown key") && err.contains("`train.learning_rate`"), "{err}");
}

#[test]
fn environment_variable_naming_an_unknown_key() {
    let s = Scratch::new();
    s.base();
    let o =
        expect(minimind(s.path()).args(["config", "base.toml"]).env("MINIMIND_TRAIN__BATCH_SISE", "3"), 2);
    let err = stderr(&o);
    assert!(err.contains("environment variable MINIMIND_TRAIN__BATCH_SISE"), "{err}");
    assert!(err.contains("MINIMIND_TRAIN__BATCH_SIZE"), "{err}");
}

#[test]
fn bad_sweeps() {
    let s = Scratch::new();
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[sweep]\ngrid = { \"train.learning_rat\" = [1e-3] }\n",
        &[],
    );
    assert!(err.contains("bad.toml:3:") && err.contains("cannot be swept"), "{err}");
    assert!(err.contains("`train.learning_rate`"), "{err}");
    let err =
        config_error(&s, "extends = \"base.toml\"\n[sweep]\ngrid = { \"train.learning_rate\" = [] }\n", &[]);
    assert!(err.contains("bad.toml:3:") && err.contains("empty list"), "{err}");
    // Every point is validated: a bad value in the second point is reported with its tag.
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[sweep]\ngrid = { \"model.num_attention_heads\" = [8, 7] }\n",
        &[],
    );
    assert!(err.contains("sweep point heads=7"), "{err}");
}

#[test]
fn cross_field_checks_name_both_sources() {
    let s = Scratch::new();
    let err = config_error(&s, "extends = \"base.toml\"\n[model]\nhidden_size = 500\n", &[]);
    assert!(err.contains("bad.toml:3:1: `model.hidden_size`: 500 is not divisible"), "{err}");
    assert!(err.contains("num_attention_heads (8, from default)"), "{err}");
    let err = config_error(&s, "extends = \"base.toml\"\n[data]\npath = \"none.jsonl\"\n", &[]);
    assert!(err.contains("`data.path`") && err.contains("does not exist"), "{err}");
    let err =
        config_error(&s, "extends = \"base.toml\"\n[model]\nuse_moe = true\nnum_experts_per_tok = 5\n", &[]);
    assert!(err.contains("`model.num_experts_per_tok`: 5 must be between 1 and"), "{err}");
}

#[test]
fn sweep_plan_lists_its_points() {
    let o = expect(minimind(&repo()).args(["plan", "experiments/sweeps/lr_moe.toml"]), 0);
    let out = stdout(&o);
    for tag in ["moe=0,lr=1e-3", "moe=0,lr=3e-3", "moe=1,lr=1e-3", "moe=1,lr=3e-3"] {
        assert!(out.contains(tag), "{out}");
    }
    assert!(out.contains("4 run(s)"), "{out}");
}

#[test]
fn shipped_experiments_validate() {
    let mut cmd = minimind(&repo());
    cmd.arg("validate");
    for f in ["base", "dense_small", "moe_small", "tiny", "sweeps/lr_moe"] {
        cmd.arg(format!("experiments/{f}.toml"));
    }
    expect(&mut cmd, 0);
}

#[test]
fn schema_file_is_current() {
    let o = expect(minimind(&repo()).arg("schema"), 0);
    let on_disk = fs::read_to_string(repo().join("schemas/experiment.schema.json")).unwrap();
    assert_eq!(stdout(&o), on_disk, "schemas/experiment.schema.json is stale: run `make schema`");
}

#[test]
fn dry_run_creates_nothing() {
    let s = Scratch::new();
    s.base();
    let o = expect(minimind(s.path()).args(["run", "base.toml", "--dry-run"]), 0);
    assert!(stdout(&o).contains("would create"), "{}", stdout(&o));
    assert!(!s.path().join("runs").exists());
}

// ---------------------------------------------------------------------------------------------
// Training runs

/// A model small enough that a dozen steps take well under a second.
const MICRO: &str = r#"
name = "micro"
[model]
hidden_size = 32
num_hidden_layers = 1
num_attention_heads = 2
num_key_value_heads = 1
max_position_embeddings = 64
[data]
path = "data.jsonl"
tokenizer = "tok.json"
max_seq_len = 32
[train]
batch_size = 4
accumulation_steps = 2
learning_rate = 1e-3
max_steps = 12
dtype = "float32"
device = "cpu"
threads = 1
[checkpoint]
log_interval = 1
save_interval = 4
keep_last = 2
"#;

impl Scratch {
    fn micro(&self, extra: &str) -> PathBuf {
        self.write("micro.toml", &format!("{MICRO}\n{extra}"))
    }
    /// Run folders under runs/, oldest first.
    fn runs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(self.path().join("runs"))
            .map(|d| d.flatten().map(|e| e.path()).filter(|p| p.is_dir() && !p.ends_with(".cache")).collect())
            .unwrap_or_default();
        v.retain(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'));
        v.sort();
        v
    }
}

fn meta(run: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(run.join("meta.json")).unwrap()).unwrap()
}

/// metrics.csv rows without the wall-clock columns (tokens_per_s, elapsed_s).
fn metric_rows(run: &Path) -> Vec<String> {
    fs::read_to_string(run.join("metrics.csv"))
        .unwrap()
        .lines()
        .map(|l| l.split(',').take(8).collect::<Vec<_>>().join(","))
        .collect()
}

fn run_quiet(dir: &Path, args: &[&str]) -> Command {
    let mut c = minimind(dir);
    c.arg("run").args(args).arg("--quiet");
    c
}

#[test]
fn tiny_experiment_trains_and_its_loss_falls() {
    let s = Scratch::new();
    let exp = repo().join("experiments/tiny.toml");
    let o = expect(
        run_quiet(s.path(), &[exp.to_str().unwrap()])
            .args(["--set", "train.max_steps=60", "--set", "checkpoint.log_interval=1"])
            .args(["--set", &format!("checkpoint.save_dir=\"{}\"", s.path().join("runs").display())]),
        0,
    );
    let runs = s.runs();
    assert_eq!(runs.len(), 1, "{}", stdout(&o));
    let rows = fs::read_to_string(runs[0].join("metrics.csv")).unwrap();
    let loss = |line: &str| line.split(',').nth(3).unwrap().parse::<f64>().unwrap();
    let lines: Vec<&str> = rows.lines().skip(1).collect();
    assert_eq!(lines.len(), 60);
    let (first, last) = (loss(lines[0]), loss(lines[59]));
    assert!(first > 8.0, "first loss {first}");
    assert!(last < 6.0, "loss after 60 steps {last}");
    // The run folder holds everything DESIGN.md lists.
    let r = &runs[0];
    for f in [
        "config.toml",
        "meta.json",
        "metrics.csv",
        "train.log",
        "model/config.json",
        "model/model.safetensors",
        "model/tokenizer.json",
    ] {
        assert!(r.join(f).is_file(), "{f} missing");
    }
    let m = meta(r);
    assert_eq!(m["status"], "completed");
    for key in [
        "command_line",
        "overrides",
        "host",
        "cpu_model",
        "cpu_cores",
        "crate_version",
        "started_at",
        "ended_at",
        "git",
    ] {
        assert!(!m[key].is_null() || key == "git", "meta.json lacks {key}: {m}");
    }
    let over = m["overrides"].as_array().unwrap();
    let lr = over.iter().find(|o| o["key"] == "train.max_steps").unwrap();
    assert_eq!(lr["source"], "--set train.max_steps=60");
    assert_eq!(lr["value"], "60");
    // config.toml is the resolved config: it parses and matches `minimind config`.
    let saved: toml::Table = toml::from_str(&fs::read_to_string(r.join("config.toml")).unwrap()).unwrap();
    assert_eq!(saved["train"]["max_steps"].as_integer(), Some(60));
    assert_eq!(saved["model"]["intermediate_size"].as_integer(), Some(384));
    // The export loads back in eval with the loss the run recorded.
    let fe = &m["final_eval"];
    let o = expect(
        minimind(s.path())
            .args(["eval", "--json", "--hf-dir"])
            .arg(r.join("model"))
            .args(["--data"])
            .arg(repo().join("data/songci_2k.jsonl"))
            .args([
                "--seq-len",
                &fe["seq_len"].to_string(),
                "--batch-size",
                &fe["batch_size"].to_string(),
                "--batches",
                &fe["batches"].to_string(),
            ]),
        0,
    );
    let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(ev["tokens"], fe["tokens"]);
    assert!((ev["loss"].as_f64().unwrap() - fe["loss"].as_f64().unwrap()).abs() < 1e-9, "{ev} vs {fe}");
    // And generates text in the corpus's style (Chinese characters).
    let o = expect(
        minimind(s.path()).arg("generate").arg(r).args([
            "--prompt",
            "春风",
            "--max-new-tokens",
            "24",
            "--seed",
            "1",
        ]),
        0,
    );
    let text = stdout(&o);
    assert!(text.starts_with("春风"), "{text}");
    assert!(text.chars().skip(2).filter(|c| ('\u{4e00}'..='\u{9fff}').contains(c)).count() >= 3, "{text}");
}

#[test]
fn resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    // Stopped after step 6 (a checkpoint is written at the stop), then resumed.
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "6"]), 130);
    let runs = s.runs();
    let (straight, split) = (&runs[0], &runs[1]);
    assert_eq!(meta(split)["status"], "stopped");
    expect(minimind(s.path()).arg("resume").arg(split).arg("--quiet"), 0);
    assert_eq!(meta(split)["status"], "completed");
    assert_eq!(metric_rows(straight), metric_rows(split));
    assert_eq!(metric_rows(split).len(), 13, "header + 12 steps, none repeated");
    assert_eq!(
        fs::read(straight.join("model/model.safetensors")).unwrap(),
        fs::read(split.join("model/model.safetensors")).unwrap()
    );
}

#[test]
fn resume_after_a_crash_drops_metrics_past_the_checkpoint() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "7"]), 130);
    let runs = s.runs();
    // As if killed hard after step 7: the newest checkpoint (step 7) never got written.
    fs::remove_dir_all(runs[1].join("checkpoints/step-00000007")).unwrap();
    let o = expect(minimind(s.path()).arg("resume").arg(&runs[1]).arg("--quiet"), 0);
    assert!(stdout(&o).contains("resuming from") && stdout(&o).contains("step 4"), "{}", stdout(&o));
    assert_eq!(metric_rows(&runs[0]), metric_rows(&runs[1]));
}

#[test]
fn damaged_checkpoint_is_skipped_for_the_previous_one() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "9"]), 130);
    let runs = s.runs();
    let newest = runs[1].join("checkpoints/step-00000009/model.safetensors");
    let bytes = fs::read(&newest).unwrap();
    fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let o = expect(minimind(s.path()).arg("resume").arg(&runs[1]).arg("--quiet"), 0);
    let out = stdout(&o);
    assert!(out.contains("skipping damaged checkpoint") && out.contains("truncated or corrupt"), "{out}");
    assert!(out.contains("step-00000008") && out.contains("(step 8)"), "{out}");
    assert_eq!(metric_rows(&runs[0]), metric_rows(&runs[1]));
}

#[test]
fn sigint_stops_with_a_checkpoint_and_the_run_resumes() {
    let s = Scratch::new();
    s.micro("");
    s.write(
        "long.toml",
        "extends = \"micro.toml\"\nname = \"long\"\n[train]\nmax_steps = 400\n[checkpoint]\nsave_interval = 1000\n",
    );
    let mut child = minimind(s.path())
        .args(["run", "long.toml", "--quiet"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let rows = s
            .runs()
            .first()
            .and_then(|r| fs::read_to_string(r.join("metrics.csv")).ok())
            .map_or(0, |t| t.lines().count());
        if rows >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no metrics appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    let run = &s.runs()[0];
    let m = meta(run);
    assert_eq!(m["status"], "stopped");
    let stopped_rows = metric_rows(run).len() - 1;
    assert!(stopped_rows < 400, "the run was not interrupted");
    let cks: Vec<_> = fs::read_dir(run.join("checkpoints")).unwrap().flatten().collect();
    assert_eq!(cks.len(), 1, "one checkpoint, written at the stop");
    expect(minimind(s.path()).arg("resume").arg(run).arg("--quiet"), 0);
    let rows = metric_rows(run);
    assert_eq!(rows.len(), 401);
    let steps: Vec<&str> = rows.iter().skip(1).map(|r| r.split(',').next().unwrap()).collect();
    let want: Vec<String> = (1..=400).map(|i| i.to_string()).collect();
    assert_eq!(steps, want, "every step exactly once");
}

#[test]
fn resume_auto_continues_the_unfinished_run_or_names_shape_changes() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "checkpoint.resume=\"auto\""]), 0);
    let runs = s.runs();
    assert_eq!(runs.len(), 1, "continued the same folder");
    assert_eq!(meta(&runs[0])["status"], "completed");

    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "5"]), 130);
    let o = expect(
        &mut run_quiet(
            s.path(),
            &["micro.toml", "--set", "checkpoint.resume=\"auto\"", "--set", "model.hidden_size=64"],
        ),
        1,
    );
    let err = stderr(&o);
    assert!(
        err.contains("differing keys") && err.contains("model.hidden_size (32 in the checkpoint, 64 now)"),
        "{err}"
    );
    assert!(err.contains("model.head_dim"), "{err}");
}

#[test]
fn nan_loss_fails_the_run_and_keeps_the_last_checkpoint() {
    let s = Scratch::new();
    s.micro("");
    let o = expect(
        &mut run_quiet(
            s.path(),
            &["micro.toml", "--set", "train.learning_rate=1e30", "--set", "train.grad_clip=0.0"],
        ),
        1,
    );
    let err = stderr(&o);
    assert!(err.contains("the loss became"), "{err}");
    let run = &s.runs()[0];
    let m = meta(run);
    assert_eq!(m["status"], "failed");
    assert!(m["error"].as_str().unwrap().contains("loss became"));
}

/// Runs micro.toml with its data replaced by `data` and returns stderr (exit 1).
fn data_error(data: &str, extra: &str) -> String {
    let s = Scratch::new();
    s.write("data.jsonl", data);
    s.micro(extra);
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 1);
    let err = stderr(&o);
    assert!(err.starts_with("error: ") && !err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_data_is_reported_with_its_location() {
    let err = data_error("", "");
    assert!(err.contains("has no documents"), "{err}");
    let err = data_error("{\"text\": \"a\"}\n{\"text\": \"b\"}\nnot json\n", "");
    assert!(err.contains("data.jsonl:3: malformed line: not valid JSON"), "{err}");
    assert!(err.contains("skip_bad_lines"), "{err}");
    let err = data_error("{\"text\": \"a\"}\n{\"title\": \"b\"}\n", "");
    assert!(err.contains("data.jsonl:2: malformed line: no \"text\" field"), "{err}");
    let err = data_error("{\"text\": \"a\"}\n{\"text\": \"b\"}\n", "");
    assert!(err.contains("fewer than one batch"), "{err}");
}

#[test]
fn bad_lines_can_be_skipped_and_are_counted() {
    let s = Scratch::new();
    let mut data: String = SONGCI.lines().take(40).map(|l| format!("{l}\n")).collect();
    data.push_str("oops\n{\"x\": 1}\n");
    s.write("data.jsonl", &data);
    s.micro("");
    let mut text = fs::read_to_string(s.path().join("micro.toml")).unwrap();
    text = text
        .replace("max_seq_len = 32", "max_seq_len = 32\nskip_bad_lines = true")
        .replace("max_steps = 12", "max_steps = 2");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    assert_eq!(meta(&s.runs()[0])["skipped_lines"], 2);
}

#[test]
fn bad_tokenizer_and_sequence_length() {
    let s = Scratch::new();
    s.write("tok.json", "{ not a tokenizer");
    s.micro("");
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 1);
    assert!(stderr(&o).contains("cannot load tokenizer"), "{}", stderr(&o));
    let s = Scratch::new();
    s.micro("");
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "data.max_seq_len=128"]), 2);
    assert!(stderr(&o).contains("above model.max_position_embeddings (64"), "{}", stderr(&o));
}

#[test]
fn a_runs_folder_that_cannot_be_created() {
    let s = Scratch::new();
    s.micro("");
    s.write("blocker", "a file, not a folder");
    let o =
        expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "checkpoint.save_dir=\"blocker/runs\""]), 1);
    assert!(stderr(&o).contains("cannot create the runs folder"), "{}", stderr(&o));
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let s = Scratch::new();
    let mnt = s.path().join("small");
    fs::create_dir(&mnt).unwrap();
    // Needs root (CI runs as root); elsewhere there is no way to fill a disk safely.
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=3m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a small tmpfs here (not root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _guard = Unmount(mnt.clone());
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
    assert!(Command::new("mount").args(["-o", "remount,size=64m"]).arg(&mnt).status().unwrap().success());
    let o = expect(minimind(s.path()).arg("resume").arg(&run).arg("--quiet"), 0);
    assert!(stdout(&o).contains("resuming from"), "{}", stdout(&o));
}

#[test]
fn eval_reproduces_the_pytorch_loss_of_a_fixture() {
    let fixtures = repo().join("../shared/fixtures/dense_songci");
    let expected: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(fixtures.join("expected.json")).unwrap()).unwrap();
    let o = expect(
        minimind(&repo())
            .args(["eval", "--json", "--hf-dir"])
            .arg(&fixtures)
            .arg("--data")
            .arg(repo().join("../shared/data/zh_songci.jsonl"))
            .args(["--seq-len", "64", "--batch-size", "4"]),
        0,
    );
    let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let want = expected["lm_loss"].as_f64().unwrap();
    assert!((ev["loss"].as_f64().unwrap() - want).abs() < 1e-5, "{ev} vs {want}");
}

#[test]
fn a_sweep_runs_every_point_in_its_own_folder() {
    let s = Scratch::new();
    s.micro(
        "[sweep]\ngrid = { \"train.learning_rate\" = [1e-3, 3e-3], \"model.use_moe\" = [false, true] }\n",
    );
    let text =
        fs::read_to_string(s.path().join("micro.toml")).unwrap().replace("max_steps = 12", "max_steps = 2");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let names: Vec<String> =
        s.runs().iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    for tag in ["moe=0,lr=1e-3", "moe=0,lr=3e-3", "moe=1,lr=1e-3", "moe=1,lr=3e-3"] {
        assert!(names.iter().any(|n| n.ends_with(&format!("-micro-{tag}"))), "{tag} in {names:?}");
    }
    let moe_run = s.runs().into_iter().find(|p| p.to_string_lossy().ends_with("moe=1,lr=3e-3")).unwrap();
    let m = meta(&moe_run);
    assert_eq!(m["sweep_tag"], "moe=1,lr=3e-3");
    let rows = fs::read_to_string(moe_run.join("metrics.csv")).unwrap();
    let aux: f64 = rows.lines().nth(1).unwrap().split(',').nth(5).unwrap().parse().unwrap();
    assert!(aux > 0.0, "MoE points report an aux loss");
}

#[test]
fn from_weight_starts_a_new_run_from_an_export() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let first = s.runs()[0].clone();
    let model = first.join("model");
    let set = format!("checkpoint.from_weight=\"{}\"", model.display());
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", &set]), 0);
    let second = s.runs()[1].clone();
    let first_loss = |run: &Path| -> f64 {
        let rows = fs::read_to_string(run.join("metrics.csv")).unwrap();
        rows.lines().nth(1).unwrap().split(',').nth(3).unwrap().parse().unwrap()
    };
    assert!(
        first_loss(&second) < first_loss(&first) - 0.05,
        "trained weights start lower: {} vs {}",
        first_loss(&second),
        first_loss(&first)
    );
    let o = expect(
        &mut run_quiet(s.path(), &["micro.toml", "--set", &set, "--set", "model.num_hidden_layers=2"]),
        1,
    );
    assert!(stderr(&o).contains("model.num_hidden_layers (1 in the weights, 2 now)"), "{}", stderr(&o));
}

#[test]
fn a_run_this_build_cannot_train_says_how_and_leaves_no_folder() {
    let s = Scratch::new();
    s.micro("");
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "train.dtype=bfloat16"]), 1);
    let err = stderr(&o);
    assert!(err.contains("train.dtype = \"bfloat16\": the CPU engine computes in float32"), "{err}");
    assert!(err.contains("hint: --set train.dtype=\"float32\""), "{err}");
    assert!(s.runs().is_empty(), "no run folder for a run that cannot start");
}
