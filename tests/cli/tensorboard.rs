//! TensorBoard event files, read back with the `tensorboard` Python package's own reader (from
//! PyPI: .ci/run installs it into .ci/deps/tensorboard): every metrics row's scalars exactly, for
//! a finished run and for one killed with -9 (and torn mid-record) and resumed.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Scratch, expect, meta, metric, run_quiet, stderr};

/// PYTHONPATH for the `tensorboard` package, or None (SKIPPED; a failure under CI).
fn reader_path() -> Option<String> {
    let install = "python3 -m pip install --target .ci/deps/tensorboard tensorboard==2.21.0";
    crate::python_with("tensorboard", "tensorboard", install)
}

/// Scalars as TensorBoard reads them: tag -> [(step, value)].
type Scalars = BTreeMap<String, Vec<(usize, f32)>>;

/// Every scalar of the run's event files as TensorBoard reads them, and the text tags.
fn read_events(run: &Path, pythonpath: &str) -> (Scalars, Vec<String>) {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "tensors": 0})
ea.Reload()
tags = ea.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags["scalars"]},
    "text": [t for t in tags["tensors"] if ea.Tensors(t)[0].tensor_proto.string_val],
}))
"#;
    let o =
        Command::new("python3").args(["-c", script]).arg(run).env("PYTHONPATH", pythonpath).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let scalars = v["scalars"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(tag, points)| {
            let points = points
                .as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as usize, p[1].as_f64().unwrap() as f32))
                .collect();
            (tag.clone(), points)
        })
        .collect();
    let text = v["text"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    (scalars, text)
}

/// The reader's scalars are metrics.csv's rows, each value rounded to f32 as the event holds it,
/// every step once.
fn assert_events_match_metrics(run: &Path, pythonpath: &str) {
    let (scalars, text) = read_events(run, pythonpath);
    assert_eq!(text, ["config"], "the resolved config as text");
    let steps: Vec<usize> = metric(run, "step").iter().map(|&s| s as usize).collect();
    for tag in ["loss", "lm_loss", "aux_loss", "lr", "grad_norm", "tokens_per_s"] {
        let want: Vec<(usize, f32)> =
            steps.iter().copied().zip(metric(run, tag).iter().map(|&v| v as f32)).collect();
        assert_eq!(scalars[tag], want, "{tag}");
    }
}

fn event_files(run: &Path) -> Vec<PathBuf> {
    fs::read_dir(run)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents."))
        .collect()
}

#[test]
fn tensorboard_reads_every_metrics_row_of_a_finished_run() {
    let Some(py) = reader_path() else { return };
    let s = Scratch::new();
    s.micro("");
    let sets = ["--set", "checkpoint.eval_interval=4", "--set", "data.val_path=\"data.jsonl\""];
    expect(&mut run_quiet(s.path(), &[&["micro.toml"][..], &sets].concat()), 0);
    let run = s.runs()[0].clone();
    assert_eq!(event_files(&run).len(), 1);
    assert_events_match_metrics(&run, &py);
    let (scalars, _) = read_events(&run, &py);
    let val: Vec<usize> = scalars["val_loss"].iter().map(|p| p.0).collect();
    assert_eq!(val, [4, 8, 12], "validation losses where they were measured");

    // Off: no event file.
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "metrics.tensorboard=false"]), 0);
    assert!(event_files(&s.runs()[1]).is_empty());
}

#[test]
fn a_run_killed_mid_record_resumes_with_every_step_once_in_tensorboard() {
    let Some(py) = reader_path() else { return };
    let s = Scratch::new();
    s.micro("");
    let o = run_quiet(s.path(), &["micro.toml", "--crash-at", "checkpoint:8"]).output().unwrap();
    assert_eq!(o.status.code(), None, "killed by SIGKILL: {}", stderr(&o));
    let run = s.runs()[0].clone();
    // Steps 5 to 8 were logged after the step-4 checkpoint; then a record torn mid-write.
    let file = event_files(&run).remove(0);
    let mut bytes = fs::read(&file).unwrap();
    bytes.extend_from_slice(&[40, 0, 0, 0, 0, 0, 0, 0, 1, 2]);
    fs::write(&file, bytes).unwrap();
    let o = expect(crate::minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 0);
    let log = fs::read_to_string(run.join("train.log")).unwrap();
    assert!(log.contains("dropped a torn last record"), "{log}\n{}", stderr(&o));
    assert!(log.contains("after step 4 dropped"), "{log}");
    assert_eq!(meta(&run)["status"], "completed");
    assert_eq!(event_files(&run), [file], "one event file, appended to");
    assert_events_match_metrics(&run, &py);
}
