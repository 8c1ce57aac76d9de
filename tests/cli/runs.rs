//! Training runs: what a run folder holds, exact resume, sweeps, interop.

use std::fs;
use std::path::Path;
use std::process::Command;

use crate::*;

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
    let loss = metric(&runs[0], "loss");
    assert_eq!(loss.len(), 60);
    let (first, last) = (loss[0], loss[59]);
    assert!(first > 8.0, "first loss {first}");
    assert!(last < 6.0, "loss after 60 steps {last}");
    // `tokens` counts real tokens, `tokens_padded` every position of every row.
    let (real, padded) = (metric(&runs[0], "tokens"), metric(&runs[0], "tokens_padded"));
    assert_eq!(padded[59], (60 * 16 * 128) as f64, "tiny: 60 steps of 16 x 128");
    assert!(real[59] < padded[59] && real[59] > 0.5 * padded[59], "{} of {}", real[59], padded[59]);
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
    // Step 1's update blows the weights up: its gradient norm is already NaN, caught before
    // anything is saved.
    assert!(err.contains("training diverged at step 2: the loss became"), "{err}");
    assert!(err.contains("the gradient norm NaN"), "{err}");
    let run = &s.runs()[0];
    let m = meta(run);
    assert_eq!(m["status"], "failed");
    assert!(m["error"].as_str().unwrap().contains("loss became"));
    assert!(fs::read_dir(run.join("checkpoints")).unwrap().next().is_none(), "no checkpoint of NaN weights");
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
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 2);
    assert!(stderr(&o).contains("`data.tokenizer`: cannot load tokenizer"), "{}", stderr(&o));
    assert!(!s.path().join("runs").exists(), "a config error, before any folder");
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
fn from_weight_starts_a_new_run_from_an_export() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let first = s.runs()[0].clone();
    let model = first.join("model");
    let set = format!("checkpoint.from_weight=\"{}\"", model.display());
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", &set]), 0);
    let second = s.runs()[1].clone();
    let first_loss = |run: &Path| -> f64 { metric(run, "loss")[0] };
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
fn the_shipped_experiments_train_on_the_cpu_as_shipped() {
    let s = Scratch::new();
    let save = format!("checkpoint.save_dir=\"{}\"", s.path().join("runs").display());
    // moe_small inherits MiniMind's dtype = "bfloat16" and device = "auto": on the CPU it trains
    // with bf16 products where the CPU has them, else in float32 with one warning. (Smaller
    // batches here only to keep the test short.)
    let exp = repo().join("experiments/moe_small.toml");
    let o = expect(
        run_quiet(s.path(), &[exp.to_str().unwrap()]).args([
            "--set",
            "train.max_steps=1",
            "--set",
            "train.batch_size=2",
            "--set",
            "train.accumulation_steps=1",
            "--set",
            "data.max_seq_len=32",
            "--set",
            &save,
        ]),
        0,
    );
    let out = stdout(&o);
    assert!(out.contains("train.device = \"auto\": training on the CPU"), "{out}");
    let m = meta(&s.runs()[0]);
    assert_eq!(m["device"], serde_json::json!({"requested": "auto", "effective": "cpu"}));
    assert_eq!(m["dtype"]["requested"], "bfloat16");
    let effective = m["dtype"]["effective"].as_str().unwrap();
    let has_bf16 = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().contains(" avx512_bf16");
    // What every shipped file's dry run says about its dtype on this CPU.
    let dtype_line =
        if has_bf16 { "mixed precision on the CPU" } else { "warning: train.dtype = \"bfloat16\"" };
    if has_bf16 {
        // A CPU with bf16 instructions trains MiniMind's dtype as mixed precision.
        assert!(effective.starts_with("bfloat16 ("), "{effective}");
        assert_eq!(out.matches("mixed precision on the CPU").count(), 1, "{out}");
        assert!(!out.contains("warning: train.dtype"), "{out}");
    } else {
        let warning = "warning: train.dtype = \"bfloat16\" (from default): ";
        assert_eq!(out.matches(warning).count(), 1, "{out}");
        assert_eq!(effective, "float32");
    }
    assert_eq!(m["status"], "completed");
    for f in ["base", "dense_small", "moe_small"] {
        let o = expect(minimind(&repo()).args(["run", &format!("experiments/{f}.toml"), "--dry-run"]), 0);
        assert!(stdout(&o).contains(dtype_line), "{f}: {}", stdout(&o));
    }
    // What cannot run at all is a config error, located, before any folder exists.
    let o = expect(
        &mut run_quiet(s.path(), &[exp.to_str().unwrap(), "--set", "train.device=cuda", "--set", &save]),
        2,
    );
    let err = stderr(&o);
    assert!(err.contains("--set train.device=cuda: `train.device`: \"cuda:0\": "), "{err}");
    // Without the CUDA engine built in, or (built in) without a driver on this machine.
    let why = if cfg!(feature = "cuda") { "CUDA driver not found" } else { "this build has no CUDA engine" };
    assert!(err.contains(why) && !err.contains("panicked"), "{err}");
    assert_eq!(s.runs().len(), 1, "no folder for a run that cannot start");
}

/// `plan --gpu` prices a run on a named GPU, class by class, before any GPU is rented; a
/// name the model does not know is a usage error listing the ones it does.
#[test]
fn plan_gpu_predicts_the_step_per_kernel_class() {
    let args = ["plan", "experiments/bench/dense.toml", "--set", "train.dtype=\"bfloat16\"", "--gpu", "h200"];
    let out = stdout(&expect(minimind(&repo()).args(args), 0));
    let line = out
        .lines()
        .find(|l| l.starts_with("bench_dense: predicted on H200 (bfloat16): "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        line.contains(" ms/step, ") && line.contains(" tokens/s, MFU ") && line.contains("steps"),
        "{line}"
    );
    for class in ["attention", "matmul", "pointwise", "norm", "optimizer", "loss"] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(&format!("{class} "))), "{class}: {out}");
    }
    assert!(out.contains("of 141 GB: fits"), "{out}");
    let moe = stdout(&expect(
        minimind(&repo()).args(["plan", "experiments/bench/moe.toml", "--gpu", "rtx 3090"]),
        0,
    ));
    assert!(
        moe.contains("predicted on RTX 3090") && moe.lines().any(|l| l.trim_start().starts_with("routing ")),
        "{moe}"
    );
    let o = expect(minimind(&repo()).args(["plan", "experiments/bench/dense.toml", "--gpu", "voodoo2"]), 2);
    let err = stderr(&o);
    assert!(err.starts_with("error: --gpu voodoo2: no GPU named \"voodoo2\""), "{err}");
    for known in ["H100 SXM", "H200", "A100 80GB", "L40S", "RTX 4090", "RTX 3090"] {
        assert!(err.contains(known), "{known}: {err}");
    }
}

#[test]
fn plan_dry_run_and_the_run_header_show_the_cost() {
    let o = expect(minimind(&repo()).args(["plan", "experiments/base.toml"]), 0);
    let out = stdout(&o);
    for column in ["parameters", "tokens/step", "memory", "FLOP/step", "step", "run"] {
        assert!(out.lines().next().unwrap().contains(column), "{out}");
    }
    let row = out.lines().nth(1).unwrap();
    assert!(row.starts_with("base") && row.contains(" 25.8M ") && row.contains("131.1K"), "{out}");
    assert!(row.contains("GB") && row.contains('~'), "memory and time: {out}");
    let o = expect(minimind(&repo()).args(["run", "experiments/base.toml", "--dry-run"]), 0);
    let out = stdout(&o);
    assert!(out.contains("cost: 25.8M parameters; memory "), "{out}");
    for part in [
        "GB peak (weights 103.3MB",
        "gradients",
        "AdamW moments",
        "activations",
        "FLOP per step",
        "per step, ",
        "for 7 steps",
    ] {
        assert!(out.contains(part), "{part}: {out}");
    }
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "train.max_steps=1"]), 0);
    let log = fs::read_to_string(s.runs()[0].join("train.log")).unwrap();
    assert!(log.contains("cost: 220.3K parameters; memory ") && log.contains("for 1 steps"), "{log}");
    // A run that cannot fit in memory stops before it starts, naming the keys that shrink it.
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "train.batch_size=4000000"]), 2);
    let err = stderr(&o);
    assert!(err.contains("this run needs about") && err.contains("available"), "{err}");
    assert!(err.contains("hint: lower one of train.batch_size (--set train.batch_size=4000000)"), "{err}");
    assert!(err.contains("data.max_seq_len (") && err.contains("micro.toml:"), "{err}");
    assert_eq!(s.runs().len(), 1);
}

/// CI and development machines have no GPU: asking for one is one clear line and exit 2, in
/// the default build (no CUDA engine) and in the `cuda` build (no driver), never a panic.
#[test]
fn cuda_without_a_gpu_is_one_clear_line() {
    let s = Scratch::new();
    s.micro("");
    let why = if cfg!(feature = "cuda") { "CUDA driver not found" } else { "this build has no CUDA engine" };
    let clear = |o: &std::process::Output, origin: &str| {
        let err = stderr(o);
        let first = err.lines().next().unwrap_or_default();
        assert!(first.starts_with(&format!("error: {origin}")) && first.contains(why), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    };
    for device in ["cuda", "cuda:3"] {
        let o =
            expect(&mut run_quiet(s.path(), &["micro.toml", "--set", &format!("train.device={device}")]), 2);
        clear(&o, &format!("--set train.device={device}: `train.device`"));
    }
    assert!(s.runs().is_empty(), "nothing created");
    let o = expect(minimind(s.path()).args(["selftest", "--device", "cuda"]), 2);
    clear(&o, "--device cuda:0");
    let o = expect(
        minimind(s.path())
            .args(["eval", "--device", "cuda:1", "--hf-dir", ".", "--data", "data.jsonl"])
            .args(["--seq-len", "8", "--batch-size", "1"]),
        2,
    );
    clear(&o, "--device cuda:1");
    // auto falls back to the CPU and says why.
    let o = expect(
        &mut run_quiet(s.path(), &["micro.toml", "--set", "train.device=auto", "--set", "train.max_steps=1"]),
        0,
    );
    assert!(
        stdout(&o).contains(&format!("train.device = \"auto\": training on the CPU; {why}")),
        "{}",
        stdout(&o)
    );
    assert_eq!(meta(&s.runs()[0])["device"], serde_json::json!({"requested": "auto", "effective": "cpu"}));
}

#[test]
fn validation_loss_is_what_eval_says_of_the_same_weights_on_the_same_rows() {
    let s = Scratch::new();
    let val: String = SONGCI.lines().rev().take(20).map(|l| format!("{l}\n")).collect();
    s.write("val.jsonl", &val);
    s.micro("");
    let text = fs::read_to_string(s.path().join("micro.toml"))
        .unwrap()
        .replace("max_seq_len = 32", "max_seq_len = 32\nval_path = \"val.jsonl\"")
        .replace("keep_last = 2", "keep_last = 2\neval_interval = 2\neval_batches = 2")
        .replace("max_steps = 12", "max_steps = 6");
    fs::write(s.path().join("micro.toml"), text).unwrap();
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let run = s.runs()[0].clone();
    let csv = fs::read_to_string(run.join("metrics.csv")).unwrap();
    let mut lines = csv.lines();
    let col = lines.next().unwrap().split(',').position(|h| h == "val_loss").unwrap();
    let vals: Vec<&str> = lines.map(|l| l.split(',').nth(col).unwrap()).collect();
    assert_eq!(
        vals.iter().map(|v| v.is_empty()).collect::<Vec<_>>(),
        [true, false, true, false, true, false]
    );
    let last: f64 = vals[5].parse().unwrap();
    let o = expect(
        minimind(s.path())
            .args([
                "eval",
                "--json",
                "--data",
                "val.jsonl",
                "--seq-len",
                "32",
                "--batch-size",
                "4",
                "--batches",
                "2",
            ])
            .arg("--hf-dir")
            .arg(run.join("model")),
        0,
    );
    let ev: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(ev["loss"].as_f64().unwrap(), last, "the same weights, rows and arithmetic");
    let best = vals
        .iter()
        .filter(|v| !v.is_empty())
        .map(|v| v.parse::<f64>().unwrap())
        .fold(f64::INFINITY, f64::min);
    assert_eq!(meta(&run)["best_val_loss"].as_f64(), Some(best));
    // Both kinds of validation data at once is an error naming both keys.
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "data.val_fraction=0.1"]), 2);
    let err = stderr(&o);
    assert!(err.contains("`data.val_fraction`") && err.contains("data.val_path (from"), "{err}");
    // Held out of the training data instead: a validation loss too, on documents not trained on.
    s.write(
        "held.toml",
        &MICRO
            .replace("max_seq_len = 32", "max_seq_len = 32\nval_fraction = 0.1")
            .replace("max_steps = 12", "max_steps = 2"),
    );
    let o = expect(&mut run_quiet(s.path(), &["held.toml"]), 0);
    assert!(stdout(&o).contains("2000 samples, 200 held out for validation"), "{}", stdout(&o));
    let held = s.runs().into_iter().last().unwrap();
    assert!(meta(&held)["best_val_loss"].as_f64().unwrap() > 0.0);
}

/// The summary's next steps name the command the user has: `minimind` when that is this
/// binary on the PATH, else the binary's path; completion scripts for the shells.
#[test]
fn next_steps_name_the_command_the_user_has_and_completions_print() {
    let s = Scratch::new();
    s.micro("");
    let exe = std::fs::canonicalize(env!("CARGO_BIN_EXE_minimind")).unwrap();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let out = stdout(&o);
    assert!(out.contains(&format!("  {} generate ", exe.display())), "not on the PATH: its path\n{out}");
    let bin = s.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(&exe, bin.join("minimind")).unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let o = expect(run_quiet(s.path(), &["micro.toml"]).env("PATH", path), 0);
    let out = stdout(&o);
    assert!(out.contains("\n  minimind generate "), "on the PATH: its name\n{out}");
    assert!(out.contains("\n  minimind resume "), "{out}");
    for (shell, marker) in
        [("bash", "_minimind()"), ("zsh", "#compdef minimind"), ("fish", "complete -c minimind")]
    {
        let o = expect(minimind(s.path()).args(["completions", shell]), 0);
        assert!(stdout(&o).contains(marker), "{shell}");
        assert!(stdout(&o).contains("resume"), "{shell}: every command");
    }
}

#[test]
fn cpu_selftest_checks_the_bf16_products_on_the_path_the_cpu_or_the_pin_gives() {
    let fixtures = repo().join("../shared/fixtures");
    let selftest = |isa: Option<&str>| {
        let mut cmd = minimind(&repo());
        cmd.args(["selftest", "--device", "cpu", "--fixtures"]).arg(&fixtures);
        if let Some(isa) = isa {
            cmd.env("MINIMIND_CPU_ISA", isa);
        }
        stdout(&expect(&mut cmd, 0))
    };
    let out = selftest(None);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // Every bf16 path the CPU has is checked at the five MiniMind2-small shapes.
    let avx = out.matches("matmul avx512bf16 ").count();
    assert_eq!(avx, if cpuinfo.contains(" avx512_bf16") { 5 } else { 0 }, "{out}");
    let amx = out.matches("matmul amx ").count();
    assert!(amx == 0 && !out.contains("the default path amx") || amx == 5, "{out}");
    // On AMX attention's products take it too: every attention case of the suite against f32.
    let attention = out.lines().filter(|l| l.contains("attention") && l.contains(" [amx] ")).count();
    assert_eq!(attention, if amx > 0 { 9 } else { 0 }, "{out}");
    if amx == 0 && avx == 0 {
        assert!(out.contains("no bf16 path on this CPU"), "{out}");
    }
    // Pinned, the default path is the pin; an unknown pin is named.
    assert!(selftest(Some("f32")).contains("the default path f32"));
    assert!(selftest(Some("sse2")).contains("MINIMIND_CPU_ISA=sse2: expected f32, avx512bf16 or amx"));
}

#[test]
fn bfloat16_on_the_cpu_is_mixed_precision_on_the_cpus_path_and_resumes_exactly() {
    let s = Scratch::new();
    s.micro("");
    let bf16 = ["micro.toml", "--set", "train.dtype=\"bfloat16\""];
    let has_path = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default().contains(" avx512_bf16");
    let o = expect(&mut run_quiet(s.path(), &bf16), 0);
    let straight = s.runs()[0].clone();
    let effective = meta(&straight)["dtype"]["effective"].as_str().unwrap().to_string();
    if !has_path {
        // No bf16 instruction: float32, with the warning.
        assert_eq!(effective, "float32");
        assert!(stdout(&o).contains("training in float32"), "{}", stdout(&o));
        return;
    }
    assert!(effective.starts_with("bfloat16 (") && effective.ends_with(" products)"), "{effective}");
    assert!(stdout(&o).contains("mixed precision on the CPU"), "{}", stdout(&o));
    // Stopped and resumed: the same bits as the uninterrupted bf16 run.
    let mut stopped = bf16.to_vec();
    stopped.extend(["--stop-after", "6"]);
    expect(&mut run_quiet(s.path(), &stopped), 130);
    let split = s.runs()[1].clone();
    expect(minimind(s.path()).arg("resume").arg(&split).arg("--quiet"), 0);
    assert_eq!(metric_rows(&straight), metric_rows(&split));
    // The products really are bf16: the losses differ from float32's, a little.
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let f32_run = s.runs()[2].clone();
    let (a, b) = (metric(&straight, "loss"), metric(&f32_run, "loss"));
    assert_ne!(a, b, "bf16 products change the numbers");
    assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 0.05 * y.abs()), "{a:?} vs {b:?}");
    // Pinned off, bfloat16 trains in float32 with the warning, and meta.json says so.
    let o = expect(run_quiet(s.path(), &bf16).env("MINIMIND_CPU_ISA", "f32"), 0);
    assert!(stdout(&o).contains("warning: train.dtype = \"bfloat16\""), "{}", stdout(&o));
    assert_eq!(meta(&s.runs()[3])["dtype"]["effective"], "float32");
}
