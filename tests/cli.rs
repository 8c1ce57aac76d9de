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
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(&o),
        stderr(&o)
    );
    o
}

/// A scratch folder with a tiny data file and tokenizer next to the experiment files.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Scratch {
        let dir = tempfile::tempdir().unwrap();
        fs::copy(
            repo().join("data/minimind_tokenizer.json"),
            dir.path().join("tok.json"),
        )
        .unwrap();
        fs::copy(
            repo().join("data/songci_2k.jsonl"),
            dir.path().join("data.jsonl"),
        )
        .unwrap();
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
        self.write(
            "base.toml",
            "name = \"base\"\n[data]\npath = \"data.jsonl\"\ntokenizer = \"tok.json\"\n",
        )
    }
}

fn resolved(o: &Output) -> toml::Table {
    toml::from_str(&stdout(o)).unwrap_or_else(|e| panic!("{e}\n{}", stdout(o)))
}

// ---------------------------------------------------------------------------------------------
// Config layering and errors

#[test]
fn each_layer_beats_the_ones_below() {
    let s = Scratch::new();
    s.base();
    s.write(
        "mid.toml",
        "extends = \"base.toml\"\nname = \"mid\"\n[train]\nbatch_size = 5\n",
    );
    s.write(
        "exp.toml",
        "extends = \"mid.toml\"\nname = \"exp\"\n[train]\nbatch_size = 6\n",
    );
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
    let o = expect(
        minimind(s.path())
            .args(["config", "exp.toml"])
            .env("MINIMIND_TRAIN__BATCH_SIZE", "7"),
        0,
    );
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
    assert!(
        out.contains("learning_rate = 0.001  # --set train.learning_rate=1e-3"),
        "{out}"
    );
    assert!(
        out.contains("hidden_size = 640  # experiments/moe_small.toml:8:1"),
        "{out}"
    );
    assert!(
        out.contains("path = ") && out.contains("# experiments/base.toml:"),
        "{out}"
    );
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
    let o = expect(
        minimind(&repo())
            .args(["config"])
            .arg(s.path().join("sub/exp.toml")),
        0,
    );
    let t = resolved(&o);
    let path = PathBuf::from(t["data"]["path"].as_str().unwrap());
    assert_eq!(
        path.canonicalize().unwrap(),
        s.path().join("data.jsonl").canonicalize().unwrap()
    );
}

/// Runs `config` on a file with the given text, expects exit 2 and returns stderr.
fn config_error(s: &Scratch, text: &str, extra: &[&str]) -> String {
    s.base();
    s.write("bad.toml", text);
    let o = expect(
        minimind(s.path()).args(["config", "bad.toml"]).args(extra),
        2,
    );
    let err = stderr(&o);
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn malformed_toml_is_located() {
    let s = Scratch::new();
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[train]\nbatch_size = = 3\n",
        &[],
    );
    assert!(err.contains("bad.toml:3:"), "{err}");
    assert!(err.contains("malformed TOML"), "{err}");
}

#[test]
fn unknown_key_is_located_with_a_suggestion() {
    let s = Scratch::new();
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n\n[train]\nbatch_sise = 3\n",
        &[],
    );
    assert!(
        err.contains("bad.toml:4:1: `train.batch_sise`: unknown key"),
        "{err}"
    );
    assert!(err.contains("did you mean `train.batch_size`?"), "{err}");
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[trian]\nbatch_size = 3\n",
        &[],
    );
    assert!(
        err.contains("bad.toml:2:") && err.contains("did you mean `train`?"),
        "{err}"
    );
}

#[test]
fn wrong_type_names_expected_got_and_source() {
    let s = Scratch::new();
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[train]\nbatch_size = \"big\"\n",
        &[],
    );
    assert!(err.contains("bad.toml:3:14: `train.batch_size`"), "{err}");
    assert!(err.contains("string") && err.contains("usize"), "{err}");
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n",
        &["--set", "train.batch_size=big"],
    );
    assert!(
        err.contains("--set train.batch_size=big: `train.batch_size`"),
        "{err}"
    );
    assert!(err.contains("string") && err.contains("usize"), "{err}");
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[train]\ndtype = \"fp8\"\n",
        &[],
    );
    assert!(
        err.contains("bad.toml:3:9") && err.contains("bfloat16"),
        "{err}"
    );
}

#[test]
fn extends_cycles_and_missing_files() {
    let s = Scratch::new();
    s.write("a.toml", "extends = \"b.toml\"\n");
    s.write("b.toml", "name = \"b\"\nextends = \"a.toml\"\n");
    let o = expect(minimind(s.path()).args(["config", "a.toml"]), 2);
    let err = stderr(&o);
    assert!(
        err.contains("b.toml:2:1: `extends`: `extends` cycle"),
        "{err}"
    );
    let err = config_error(&s, "extends = \"nowhere.toml\"\n", &[]);
    assert!(
        err.contains("bad.toml:1:1: `extends`: cannot read experiment file"),
        "{err}"
    );
    assert!(err.contains("nowhere.toml"), "{err}");
    let o = expect(minimind(s.path()).args(["validate", "missing.toml"]), 2);
    assert!(
        stderr(&o).contains("cannot read experiment file missing.toml"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_set_arguments() {
    let s = Scratch::new();
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n",
        &["--set", "train.batch_size"],
    );
    assert!(
        err.contains("--set train.batch_size: expected `section.key=value`"),
        "{err}"
    );
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n",
        &["--set", "train.betas=[0.9,"],
    );
    assert!(err.contains("invalid value `[0.9,`"), "{err}");
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n",
        &["--set", "train.learning_rat=1"],
    );
    assert!(
        err.contains("unknown key") && err.contains("`train.learning_rate`"),
        "{err}"
    );
}

#[test]
fn environment_variable_naming_an_unknown_key() {
    let s = Scratch::new();
    s.base();
    let o = expect(
        minimind(s.path())
            .args(["config", "base.toml"])
            .env("MINIMIND_TRAIN__BATCH_SISE", "3"),
        2,
    );
    let err = stderr(&o);
    assert!(
        err.contains("environment variable MINIMIND_TRAIN__BATCH_SISE"),
        "{err}"
    );
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
    assert!(
        err.contains("bad.toml:3:") && err.contains("cannot be swept"),
        "{err}"
    );
    assert!(err.contains("`train.learning_rate`"), "{err}");
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[sweep]\ngrid = { \"train.learning_rate\" = [] }\n",
        &[],
    );
    assert!(
        err.contains("bad.toml:3:") && err.contains("empty list"),
        "{err}"
    );
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
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[model]\nhidden_size = 500\n",
        &[],
    );
    assert!(
        err.contains("bad.toml:3:1: `model.hidden_size`: 500 is not divisible"),
        "{err}"
    );
    assert!(
        err.contains("num_attention_heads (8, from default)"),
        "{err}"
    );
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[data]\npath = \"none.jsonl\"\n",
        &[],
    );
    assert!(
        err.contains("`data.path`") && err.contains("does not exist"),
        "{err}"
    );
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[model]\nuse_moe = true\nnum_experts_per_tok = 5\n",
        &[],
    );
    assert!(
        err.contains("`model.num_experts_per_tok`: 5 must be between 1 and"),
        "{err}"
    );
}

#[test]
fn sweep_plan_lists_its_points() {
    let o = expect(
        minimind(&repo()).args(["plan", "experiments/sweeps/lr_moe.toml"]),
        0,
    );
    let out = stdout(&o);
    for tag in [
        "moe=0,lr=1e-3",
        "moe=0,lr=3e-3",
        "moe=1,lr=1e-3",
        "moe=1,lr=3e-3",
    ] {
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
    assert_eq!(
        stdout(&o),
        on_disk,
        "schemas/experiment.schema.json is stale: run `make schema`"
    );
}

#[test]
fn dry_run_creates_nothing() {
    let s = Scratch::new();
    s.base();
    let o = expect(
        minimind(s.path()).args(["run", "base.toml", "--dry-run"]),
        0,
    );
    assert!(stdout(&o).contains("would create"), "{}", stdout(&o));
    assert!(!s.path().join("runs").exists());
}
