//! Nothing silent (#20): faults around the edges of a run — tokenizers whose ids outgrow the
//! cache width, hand-edited run files, readers of killed or damaged runs, checkpoint contents —
//! each injected through the real binary, with the outcome asserted (exit code, message,
//! meta.json, nothing renamed or lost).

use std::fs;

use crate::{Scratch, expect, meta, minimind, run_quiet, stderr, stdout};

/// The one token cache under the scratch folder's runs/.
fn token_cache(s: &Scratch) -> std::path::PathBuf {
    fs::read_dir(s.path().join("runs/.cache"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.is_dir() && p.file_name().unwrap().to_string_lossy().starts_with("tokens-"))
        .expect("a token cache")
}

/// The scratch tokenizer with every id moved up by `shift` (a sparse vocabulary: 6400 tokens,
/// ids from `shift` on), as a tokenizer trained elsewhere and pruned can have.
fn shifted_tokenizer(s: &Scratch, shift: u64) {
    let path = s.path().join("tok.json");
    let mut t: serde_json::Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    for id in t["model"]["vocab"].as_object_mut().unwrap().values_mut() {
        *id = (id.as_u64().unwrap() + shift).into();
    }
    for added in t["added_tokens"].as_array_mut().unwrap() {
        added["id"] = (added["id"].as_u64().unwrap() + shift).into();
    }
    fs::write(&path, serde_json::to_string(&t).unwrap()).unwrap();
}

#[test]
fn tokenizer_ids_past_16_bits_widen_the_cache_and_past_the_vocabulary_are_refused() {
    let s = Scratch::new();
    shifted_tokenizer(&s, 65_536);
    s.micro("");
    // 6400 tokens, but ids up to 71935: the model's 6400 rows cannot hold them.
    let o = expect(&mut run_quiet(s.path(), &["micro.toml"]), 2);
    let err = stderr(&o);
    assert!(err.contains("`data.tokenizer`") && err.contains("emits ids up to 71935"), "{err}");
    assert!(err.contains("set model.vocab_size = 71936"), "{err}");
    assert!(!s.path().join("runs").exists(), "refused before any folder");

    // With the vocabulary the hint names, the cache stores 32-bit ids and the run completes
    // (its final evaluation reads them back).
    let o = expect(
        &mut run_quiet(
            s.path(),
            &["micro.toml", "--set", "model.vocab_size=71936", "--set", "train.max_steps=2"],
        ),
        0,
    );
    let run = s.runs()[0].clone();
    assert_eq!(meta(&run)["status"], "completed", "{}", stderr(&o));
    let cache = token_cache(&s);
    let info: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(cache.join("info.json")).unwrap()).unwrap();
    assert_eq!(info["width"], 4, "{info}");
    let tokens = fs::read(cache.join("tokens.bin")).unwrap();
    let ids: Vec<u32> = tokens.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
    assert!(!ids.is_empty() && ids.iter().all(|&id| (65_536..71_936).contains(&id)), "ids kept whole");
}

/// `ls` rows by run folder name: (status, steps, loss) as printed.
fn ls_rows(s: &Scratch) -> Vec<(String, String, String, String)> {
    let o = expect(minimind(s.path()).arg("ls"), 0);
    stdout(&o)
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[0].to_string(), f[1].to_string(), f[2].to_string(), f[3].to_string())
        })
        .collect()
}

#[test]
fn readers_show_died_and_damaged_runs_and_read_past_a_torn_row() {
    let s = Scratch::new();
    s.micro("");
    // A run killed with -9 after step 5: meta.json still says running.
    let o = run_quiet(s.path(), &["micro.toml", "--crash-at", "step:5"]).output().unwrap();
    assert_eq!(o.status.code(), None, "killed by SIGKILL: {}", stderr(&o));
    let died = s.runs()[0].clone();
    assert_eq!(meta(&died)["status"], "running");
    // A completed run, then its meta.json damaged and a torn row appended to its metrics.
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let torn = s.runs()[1].clone();
    let text = fs::read_to_string(torn.join("metrics.csv")).unwrap();
    let complete = text.lines().count() - 1;
    fs::write(torn.join("metrics.csv"), format!("{text}13,0,41")).unwrap();
    let third = {
        expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "train.max_steps=2"]), 0);
        s.runs()[2].clone()
    };
    fs::write(third.join("meta.json"), "{\"name\": \"micro\", \"sta").unwrap();

    let name = |p: &std::path::Path| p.file_name().unwrap().to_string_lossy().to_string();
    let rows = ls_rows(&s);
    let find = |p: &std::path::Path| rows.iter().find(|r| r.0 == name(p)).cloned().expect("listed");
    let (_, status, steps, _) = find(&died);
    // Killed inside step 5, after its update, before its metrics row: 4 steps logged.
    assert_eq!((status.as_str(), steps.as_str()), ("died", "4"), "{rows:?}");
    let (_, status, steps, loss) = find(&torn);
    assert_eq!((status.as_str(), steps.as_str()), ("completed", "12"), "{rows:?}");
    assert_ne!(loss, "-", "the complete rows are read: {rows:?}");
    let (_, status, steps, _) = find(&third);
    assert_eq!((status.as_str(), steps.as_str()), ("damaged", "2"), "{rows:?}");
    assert_eq!(complete, 12, "log_interval 1: one row per step");

    // plot and compare read the complete rows of the torn file.
    let svg = s.path().join("torn.svg");
    expect(minimind(s.path()).arg("plot").arg(&torn).arg(&died).arg("-o").arg(&svg), 0);
    let text = fs::read_to_string(&svg).unwrap();
    // Twelve steps: the x axis labels steps, each once (the y axis labels have decimals).
    let labels: Vec<&str> = text
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>')?.1.split("</text>").next())
        .map(str::trim)
        .collect();
    let steps: Vec<&str> = labels.iter().copied().filter(|l| l.parse::<u64>().is_ok()).collect();
    assert!(steps.len() >= 5, "the step axis is labelled: {labels:?}");
    let mut unique = steps.clone();
    unique.dedup();
    assert_eq!(unique, steps, "a step labelled twice: {labels:?}");
    // The lines take the palette's first colours (each readable on white: a unit test).
    assert!(text.contains("stroke=\"#1F77B4\"") && text.contains("stroke=\"#D95F02\""), "palette colours");
    let o = expect(minimind(s.path()).arg("compare").arg(&torn).arg(&died), 0);
    let line = stdout(&o).lines().rev().find(|l| l.starts_with(&name(&torn))).unwrap().to_string();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((fields[1], fields[2]), ("completed", "12"), "{line}");
    assert!(fields[3].parse::<f64>().is_ok(), "the loss of step 12: {line}");
}

/// Rewrites checkpoint `ck`'s COMPLETE marker for its files as they are now: a change made
/// this way passes the checksums, so only a check of the contents can catch it.
fn re_sign(ck: &std::path::Path) {
    use sha2::{Digest, Sha256};
    let marker = fs::read_to_string(ck.join("COMPLETE")).unwrap();
    let mut out = String::new();
    for line in marker.lines() {
        let name = line.split(' ').next().unwrap();
        let bytes = fs::read(ck.join(name)).unwrap();
        let sha: String = Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
        out.push_str(&format!("{name} {} {sha}\n", bytes.len()));
    }
    fs::write(ck.join("COMPLETE"), out).unwrap();
}

/// The step-9 checkpoint of a run stopped after step 9 (checkpoints 8 and 9 kept), changed by
/// `change` and re-signed; resumed, it must be set aside with `why`, the run going on from step
/// 8 to the same metrics as an uninterrupted run.
fn falls_back_from_step_9(change: &dyn Fn(&std::path::Path), why: &str) {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "9"]), 130);
    let runs = s.runs();
    let ck = runs[1].join("checkpoints/step-00000009");
    change(&ck);
    re_sign(&ck);
    let o = expect(minimind(s.path()).arg("resume").arg(&runs[1]).arg("--quiet"), 0);
    let out = stdout(&o);
    assert!(out.contains("skipping damaged checkpoint") && out.contains(why), "{out}");
    assert!(out.contains("(step 8)") && !out.contains("learning rate"), "{out}");
    assert!(runs[1].join("checkpoints/step-00000009.damaged").is_dir(), "set aside, as hash damage is");
    assert_eq!(crate::metric_rows(&runs[0]), crate::metric_rows(&runs[1]));
}

#[test]
fn checkpoint_contents_are_checked_past_their_checksums() {
    // A NaN among the weights (the checksums re-signed to match).
    falls_back_from_step_9(
        &|ck| {
            let path = ck.join("model.safetensors");
            let mut bytes = fs::read(&path).unwrap();
            let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            bytes[8 + header..8 + header + 4].copy_from_slice(&f32::NAN.to_le_bytes());
            fs::write(&path, bytes).unwrap();
        },
        "is NaN (not finite)",
    );
    // A data cursor past the epoch's batches.
    falls_back_from_step_9(
        &|ck| {
            let path = ck.join("state.json");
            let mut state: serde_json::Value =
                serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
            state["cursor"]["batch"] = 99_999.into();
            fs::write(&path, serde_json::to_string_pretty(&state).unwrap()).unwrap();
        },
        "data cursor (epoch 0, batch 99999) is not where step 9 leaves the data",
    );
}

#[test]
fn a_hand_edited_config_toml_is_checked_against_the_checkpoint() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "8"]), 130);
    let run = s.runs()[0].clone();
    let config = run.join("config.toml");
    let original = fs::read_to_string(&config).unwrap();
    let checkpoints = || {
        let mut v: Vec<String> = fs::read_dir(run.join("checkpoints"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect();
        v.sort();
        v
    };
    let before = checkpoints();
    assert_eq!(before, ["step-00000004", "step-00000008"]);
    let resume = || minimind(s.path()).arg("resume").arg(&run).arg("--quiet").output().unwrap();

    // A model-shape edit: refused with the keys and both values; nothing set aside.
    fs::write(&config, original.replace("hidden_size = 32", "hidden_size = 64")).unwrap();
    let o = resume();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("model.hidden_size (32 in the checkpoint, 64 now)"), "{err}");
    assert!(!err.contains("damaged") && !stdout(&o).contains("damaged"), "not damage: {err}");
    assert_eq!(checkpoints(), before, "nothing renamed");
    assert_eq!(meta(&run)["status"], "stopped");

    // A data-order edit: refused as `--set` refuses it.
    fs::write(&config, original.replace("batch_size = 4", "batch_size = 8")).unwrap();
    let o = resume();
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("train.batch_size (4 then, 8 now)") && err.contains("order of the data"), "{err}");
    assert_eq!(checkpoints(), before, "nothing renamed");

    // An emptied config.toml: an error naming the file.
    fs::write(&config, "").unwrap();
    let o = resume();
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(err.contains("config.toml") && err.contains("emptied or cut short"), "{err}");
    assert!(!err.contains("data.jsonl"), "not about the default data path: {err}");

    // A resumable edit: accepted, and recorded as `--set` records it.
    fs::write(&config, original.replace("learning_rate = 0.001", "learning_rate = 0.002")).unwrap();
    let o = resume();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("config.toml was edited since"), "{}", stdout(&o));
    let m = meta(&run);
    let set = &m["resumes"].as_array().unwrap().last().unwrap()["overrides"][0];
    assert_eq!(
        (set["key"].as_str(), set["value"].as_str()),
        (Some("train.learning_rate"), Some("0.002")),
        "{m}"
    );
    assert!(set["source"].as_str().unwrap().contains("edited by hand (was 0.001)"), "{m}");
    assert_eq!(m["status"], "completed");
}

#[test]
fn values_legal_but_almost_certainly_wrong_are_warned_of_and_recorded() {
    let s = Scratch::new();
    s.micro("");
    // More threads than any machine here has cores, and a warm-up the schedule ignores.
    let o = expect(
        &mut run_quiet(
            s.path(),
            &[
                "micro.toml",
                "--set",
                "train.threads=512",
                "--set",
                "train.warmup_steps=5",
                "--set",
                "train.max_steps=2",
            ],
        ),
        0,
    );
    let run = s.runs()[0].clone();
    let warned: Vec<String> =
        meta(&run)["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap().to_string()).collect();
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(warned[0].starts_with("train.threads = 512 is more than this machine's"), "{warned:?}");
    assert!(warned[1].contains("train.warmup_steps = 5 has no effect"), "{warned:?}");
    let log = fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("warning: train.threads = 512"), "in the header: {log}\n{}", stdout(&o));

    // A warm-up as long as the run; on resume, configuration variables that a resume ignores.
    expect(
        &mut run_quiet(
            s.path(),
            &[
                "micro.toml",
                "--set",
                "train.schedule=\"warmup_cosine\"",
                "--set",
                "train.warmup_steps=50",
                "--stop-after",
                "4",
            ],
        ),
        130,
    );
    let run = s.runs()[1].clone();
    assert!(meta(&run)["warnings"][0].as_str().unwrap().contains("is not below the run's 12 step(s)"));
    let o = expect(
        minimind(s.path()).arg("resume").arg(&run).arg("--quiet").env("MINIMIND_TRAIN__LEARNING_RATE", "1.0"),
        0,
    );
    let m = meta(&run);
    let last = m["warnings"].as_array().unwrap().last().unwrap().as_str().unwrap().to_string();
    assert!(last.starts_with("MINIMIND_TRAIN__LEARNING_RATE set in the environment"), "{m}");
    assert!(stdout(&o).contains("MINIMIND_TRAIN__LEARNING_RATE"), "{}", stdout(&o));

    // Data whose every text is empty.
    let s = Scratch::new();
    s.write("data.jsonl", &"{\"text\": \"\"}\n".repeat(64));
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "train.max_steps=1"]), 0);
    let m = meta(&s.runs()[0]);
    assert!(m["warnings"][0].as_str().unwrap().starts_with("the training data has no tokens"), "{m}");
}

#[test]
fn a_save_dir_that_cannot_be_a_folder_says_what_is_in_the_way() {
    let s = Scratch::new();
    s.micro("");
    s.write("afile", "not a folder");
    std::os::unix::fs::symlink(s.path().join("nowhere"), s.path().join("dangling")).unwrap();
    std::os::unix::fs::symlink(s.path().join("loop"), s.path().join("loop")).unwrap();
    for (save_dir, why) in [
        ("afile", "afile is a file, not a folder"),
        ("afile/runs", "afile is a file, not a folder"),
        ("dangling", "dangling is a link to"),
        ("loop/runs", "loop is a symbolic link loop"),
    ] {
        let set = format!("checkpoint.save_dir=\"{save_dir}\"");
        let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", &set]), 1);
        let err = stderr(&o);
        assert!(err.contains("cannot create the runs folder") && err.contains(why), "{save_dir}: {err}");
        assert!(!err.contains("File exists"), "{err}");
    }
    // A tokenizer path that is a folder says so (a config error, before any folder).
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "data.tokenizer=\".\""]), 2);
    assert!(stderr(&o).contains("is a folder; the tokenizer is a file"), "{}", stderr(&o));
}

#[test]
fn metrics_lost_or_damaged_before_a_resume_come_back_from_train_log() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml"]), 0);
    let straight = s.runs()[0].clone();
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "8"]), 130);
    let run = s.runs()[1].clone();
    // metrics.csv deleted: every row up to the checkpoint comes back, exactly.
    fs::remove_file(run.join("metrics.csv")).unwrap();
    let o =
        expect(minimind(s.path()).arg("resume").arg(&run).arg("--quiet").arg("--stop-after").arg("10"), 130);
    assert!(
        stdout(&o).contains("metrics.csv: restored 8 row(s) from train.log (steps 1-8)"),
        "{}",
        stdout(&o)
    );
    // A damaged row is named by its step (and restored too).
    let path = run.join("metrics.csv");
    let text = fs::read_to_string(&path).unwrap();
    let damaged: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with("4,") { l.replacen(",", ",x", 2).replacen(",x", ",", 1) } else { l.to_string() }
        })
        .collect();
    fs::write(&path, damaged.join("\n") + "\n").unwrap();
    let o = expect(minimind(s.path()).arg("resume").arg(&run).arg("--quiet"), 0);
    let out = stdout(&o);
    assert!(out.contains("dropped 1 damaged row(s): line 5 (step 4)"), "{out}");
    assert!(out.contains("restored 1 row(s) from train.log (steps 4)"), "{out}");
    assert_eq!(crate::metric_rows(&straight), crate::metric_rows(&run));
}

#[test]
fn a_token_cache_cut_short_under_a_live_run_fails_it_with_the_file_named() {
    let s = Scratch::new();
    s.micro("");
    let mut p = crate::Spawned::start(minimind(s.path()).args([
        "run",
        "micro.toml",
        "--set",
        "train.max_steps=100000",
        "--set",
        "checkpoint.save_interval=100000",
    ]));
    p.wait_for("step 3/", 60);
    let cache = token_cache(&s);
    fs::File::options().write(true).open(cache.join("tokens.bin")).unwrap().set_len(0).unwrap();
    let (code, out, err) = p.finish();
    assert_eq!(code, Some(1), "not SIGBUS: {out}\n{err}");
    assert!(err.contains("tokens.bin was cut short while this run read it"), "{err}");
    let m = meta(&s.runs()[0]);
    assert_eq!(m["status"], "failed");
    assert!(m["error"].as_str().unwrap().contains("cut short"), "{m}");
}

#[test]
fn a_forged_completed_status_is_continued_to_the_run_end_not_extended() {
    let s = Scratch::new();
    s.micro("");
    expect(&mut run_quiet(s.path(), &["micro.toml", "--stop-after", "8"]), 130);
    let run = s.runs()[0].clone();
    let text = fs::read_to_string(run.join("meta.json")).unwrap().replace("\"stopped\"", "\"completed\"");
    fs::write(run.join("meta.json"), text).unwrap();
    let o = expect(minimind(s.path()).arg("resume").arg(&run).arg("--quiet"), 0);
    let err = stderr(&o);
    assert!(err.contains("says completed, but its last step 8 is short of train.max_steps = 12"), "{err}");
    assert!(!err.contains("--set train.max_steps"), "no hint that changes the schedule: {err}");
    let m = meta(&run);
    assert_eq!((m["status"].as_str(), m["last_step"].as_u64()), (Some("completed"), Some(12)));
}
