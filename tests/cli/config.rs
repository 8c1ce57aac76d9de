//! Experiment files, layering and config errors.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

use crate::*;

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
    let err = config_error(&s, "extends = \"base.toml\"\n[train]\nbatch_size = \"16\"\n", &[]);
    assert!(
        err.contains(
            "bad.toml:3:14: `train.batch_size`: expected a non-negative integer, got the string \"16\""
        ),
        "{err}"
    );
    let err = config_error(&s, "extends = \"base.toml\"\n", &["--set", "train.batch_size=big"]);
    assert!(
        err.contains("--set train.batch_size=big: `train.batch_size`: expected a non-negative integer, got the string \"big\""),
        "{err}"
    );
    let err = config_error(&s, "extends = \"base.toml\"\n[train]\nlearning_rate = true\n", &[]);
    assert!(err.contains("expected a number, got the boolean true"), "{err}");
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

#[test]
fn every_error_in_a_file_is_reported() {
    let s = Scratch::new();
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[train]\nbatch_sise = 3\nlearning_rate = \"fast\"\n[model]\nuse_moes = true\n",
        &[],
    );
    assert_eq!(err.matches("error: ").count(), 3, "{err}");
    assert!(err.contains("bad.toml:3:1: `train.batch_sise`: unknown key"), "{err}");
    assert!(
        err.contains("bad.toml:4:17: `train.learning_rate`: expected a number, got the string \"fast\""),
        "{err}"
    );
    assert!(err.contains("bad.toml:6:1: `model.use_moes`: unknown key"), "{err}");
    // Resolution reports every broken rule too, each at its own origin.
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[train]\nbatch_size = 0\n[checkpoint]\nkeep_last = 0\n",
        &[],
    );
    assert!(err.contains("bad.toml:3:1: `train.batch_size`: must be greater than 0"), "{err}");
    assert!(err.contains("bad.toml:5:1: `checkpoint.keep_last`: must be greater than 0"), "{err}");
}

#[test]
fn cross_field_errors_name_every_value_and_its_origin() {
    let s = Scratch::new();
    let err = config_error(&s, "extends = \"base.toml\"\n", &["--set", "model.num_key_value_heads=3"]);
    assert!(
        err.contains("`model.num_attention_heads`: 8 is not a multiple of model.num_key_value_heads (3, from --set model.num_key_value_heads=3)"),
        "{err}"
    );
    let err = config_error(
        &s,
        "extends = \"base.toml\"\n[model]\nhidden_size = 520\n",
        &["--set", "model.num_attention_heads=16"],
    );
    assert!(
        err.contains("bad.toml:3:1: `model.hidden_size`: 520 is not divisible by model.num_attention_heads (16, from --set model.num_attention_heads=16)"),
        "{err}"
    );
}

#[test]
fn environment_variables_with_one_underscore_or_no_section() {
    let s = Scratch::new();
    s.base();
    let o = expect(minimind(s.path()).args(["config", "base.toml"]).env("MINIMIND_TRAIN_BATCH_SIZE", "3"), 2);
    let err = stderr(&o);
    assert!(err.contains("environment variable MINIMIND_TRAIN_BATCH_SIZE"), "{err}");
    assert!(err.contains("double underscore: MINIMIND_TRAIN__BATCH_SIZE"), "{err}");
    // A variable that names no section belongs to someone else: one warning, and the command works.
    let o = expect(minimind(s.path()).args(["config", "base.toml"]).env("MINIMIND_HOME", "/opt/minimind"), 0);
    let err = stderr(&o);
    assert_eq!(err.matches("warning:").count(), 1, "{err}");
    assert!(err.contains("ignoring environment variable MINIMIND_HOME"), "{err}");
    assert_eq!(resolved(&o)["train"]["batch_size"].as_integer(), Some(32));
    // minimind's own non-config variables pass without a word.
    let o = expect(minimind(s.path()).args(["config", "base.toml"]).env("MINIMIND_CUDA_EMULATOR", "1"), 0);
    assert!(stderr(&o).is_empty(), "{}", stderr(&o));
}

#[test]
fn every_argument_has_help_and_run_shows_examples() {
    for cmd in ["run", "resume", "eval", "generate", "plan", "config", "validate", "schema", "bench"] {
        let o = expect(minimind(&repo()).args([cmd, "-h"]), 0);
        let help = stdout(&o);
        let lines: Vec<&str> = help.lines().collect();
        let mut in_args = false;
        for (i, line) in lines.iter().enumerate() {
            if line.ends_with(':') && !line.starts_with(' ') {
                in_args = matches!(*line, "Arguments:" | "Options:");
                continue;
            }
            let entry = line.trim_start();
            if in_args && (entry.starts_with('-') || entry.starts_with('<') || entry.starts_with('[')) {
                // `  --flag <VALUE>  Description`, or the description on the next, deeper line.
                let inline = entry.split("  ").filter(|p| !p.trim().is_empty()).count() >= 2;
                let indent = |l: &str| l.len() - l.trim_start().len();
                let below = lines.get(i + 1).is_some_and(|next| {
                    let n = next.trim_start();
                    indent(next) > indent(line) && !n.is_empty() && !n.starts_with('-')
                });
                assert!(inline || below, "`minimind {cmd}`: no description for {entry:?}\n{help}");
            }
        }
    }
    let o = expect(minimind(&repo()).args(["run", "--help"]), 0);
    let help = stdout(&o);
    assert!(help.contains("--set train.learning_rate=1e-3"), "{help}");
    assert!(help.contains("MINIMIND_TRAIN__BATCH_SIZE=8 minimind run"), "{help}");
}

#[test]
fn make_targets_honour_cargo_target_dir() {
    let o = expect(
        Command::new("make")
            .current_dir(repo())
            .args(["-n", "run", "bench"])
            .env("CARGO_TARGET_DIR", "/elsewhere/t"),
        0,
    );
    let out = stdout(&o);
    assert!(out.contains("/elsewhere/t/release/minimind run"), "{out}");
    assert!(out.contains("/elsewhere/t/release/minimind bench"), "{out}");
    assert!(!out.contains("./target/"), "{out}");
}

/// `make test`'s plan (scripts/test.sh): with each prerequisite missing, its suite is one
/// SKIPPED line with the install command and the rest still runs; under CI any skip fails.
#[test]
fn the_test_plan_skips_what_is_missing_and_fails_under_ci() {
    let plan = |mpi: u8, cxx: u8, root: u8, py: u8, ci: bool| {
        let mut cmd = Command::new("bash");
        cmd.current_dir(repo()).args(["scripts/test.sh", "plan"]).env("CARGO", "cargo");
        cmd.env("HAVE_MPI", mpi.to_string()).env("HAVE_CXX", cxx.to_string());
        cmd.env("IS_ROOT", root.to_string()).env("HAVE_NVRTC", "1").env("HAVE_PYDEPS", py.to_string());
        if ci {
            cmd.env("CI", "true");
        } else {
            cmd.env_remove("CI");
        }
        let o = cmd.output().unwrap();
        (o.status.code(), stdout(&o), stderr(&o))
    };
    let everything = [
        "RUN: cargo test\n",
        "RUN: cargo test --features mpi\n",
        "RUN: cargo test --features cuda --lib cuda\n",
        "RUN: cargo test --features cuda,mpi --test cli cuda\n",
    ]
    .concat();
    // (mpi, c++, root, python packages): the suites that run, what is skipped and its install command.
    type Row<'a> = ((u8, u8, u8, u8), &'a [&'a str], &'a [&'a str]);
    let table: [Row; 5] = [
        ((1, 1, 1, 1), &["--features mpi", "--features cuda,mpi --test cli cuda"], &[]),
        (
            (0, 1, 1, 1),
            &["RUN: cargo test\n", "--features cuda --lib cuda", "--features cuda --test cli cuda"],
            &["SKIPPED: mpi ", "apt install libopenmpi-dev openmpi-bin clang libclang-dev"],
        ),
        ((1, 0, 1, 1), &["--features mpi\n"], &["SKIPPED: cuda ", "no C++ compiler", "apt install g++"]),
        ((1, 1, 0, 1), &["--features cuda,mpi --test cli cuda"], &["SKIPPED: root-only tests", "not root"]),
        (
            (1, 1, 1, 0),
            &["--features cuda,mpi --test cli cuda"],
            &["SKIPPED: read-back tests", "tensorboard==2.21.0", "pyarrow==21.0.0"],
        ),
    ];
    for ((mpi, cxx, root, py), runs, skips) in table {
        let (code, out, err) = plan(mpi, cxx, root, py, false);
        assert_eq!(code, Some(0), "{out}{err}");
        for r in runs {
            assert!(out.contains(r), "({mpi},{cxx},{root},{py}): {r:?} should run\n{out}");
        }
        for s in skips {
            assert!(out.contains(s), "({mpi},{cxx},{root},{py}): {s:?} missing\n{out}");
        }
        if skips.is_empty() {
            assert_eq!(out, everything, "nothing missing: every suite, nothing skipped");
        } else {
            assert!(!out.contains("RUN: cargo test --features mpi\n") || mpi == 1, "{out}");
            assert!(!out.contains("--features cuda") || cxx == 1, "{out}");
            // Under CI the same plan fails, naming the skips.
            let (code, _, err) = plan(mpi, cxx, root, py, true);
            assert_eq!(code, Some(1), "a skip under CI must fail\n{err}");
            assert!(err.contains("skipped under CI"), "{err}");
        }
    }
    let (code, out, _) = plan(1, 1, 1, 1, true);
    assert_eq!((code, out), (Some(0), everything), "under CI with everything installed");
}
