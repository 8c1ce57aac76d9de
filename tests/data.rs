//! The data pipeline on real text: token cache, MiniMind rows, packed rows, shuffling.

use std::fs;

use minimind::config::DataConfig;
use minimind::data::{Batches, Cursor, Dataset, OpenOptions, Tok, hold_out};
use minimind::signals::Stop;

fn setup(lines: &[&str], packing: bool, t: usize) -> (tempfile::TempDir, Dataset, Tok) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("d.jsonl");
    let body: String = lines.iter().map(|l| format!("{}\n", serde_json::json!({ "text": l }))).collect();
    fs::write(&data, body).unwrap();
    let cfg = DataConfig {
        path: data,
        tokenizer: std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/minimind_tokenizer.json"),
        max_seq_len: t,
        packing,
        text_field: "text".into(),
        skip_bad_lines: false,
        num_workers: 1,
        val_path: None,
        val_fraction: 0.0,
    };
    let cache_root = dir.path().join("cache");
    let opts = OpenOptions {
        cache_root: &cache_root,
        quiet: true,
        heartbeat: std::time::Duration::from_secs(10),
        stop: &Stop::never(),
        stop_after_shards: None,
    };
    let (ds, tok) = Dataset::open(&cfg, 6400, &opts).unwrap();
    (dir, ds, tok)
}

const DOCS: [&str; 3] = ["春风又绿江南岸", "明月何时照我还", "It is a truth universally acknowledged"];

#[test]
fn minimind_rows_are_bos_tokens_eos_pad() {
    let (_d, ds, tok) = setup(&DOCS, false, 12);
    assert_eq!(ds.samples(), 3);
    let (mut ids, mut tg, mut scratch) = (vec![0; 12], vec![0; 12], Vec::new());
    ds.fill(1, &mut ids, &mut tg, &mut scratch);
    let body = tok.encode(DOCS[1]).unwrap();
    let mut want = vec![tok.bos];
    want.extend(body.iter().take(10));
    want.push(tok.eos);
    want.resize(12, tok.pad);
    assert_eq!(ids, want);
    assert_eq!(tg[0], want[1] as i32);
    assert!(tg[11] < 0);
}

#[test]
fn packed_rows_cut_the_eos_joined_stream() {
    let t = 5;
    let (_d, ds, tok) = setup(&DOCS, true, t);
    let mut stream = Vec::new();
    for d in DOCS {
        stream.extend(tok.encode(d).unwrap());
        stream.push(tok.eos);
    }
    assert_eq!(ds.samples(), stream.len() / t);
    let (mut ids, mut tg, mut scratch) = (vec![0; t], vec![0; t], Vec::new());
    for row in 0..ds.samples() {
        ds.fill(row, &mut ids, &mut tg, &mut scratch);
        assert_eq!(ids, stream[row * t..(row + 1) * t], "row {row}");
        let want_targets: Vec<i32> = (0..t).map(|i| if i + 1 < t { ids[i + 1] as i32 } else { -1 }).collect();
        assert_eq!(tg, want_targets);
    }
}

#[test]
fn the_cache_is_reused_and_epochs_reshuffle() {
    let lines: Vec<String> = (0..10).map(|i| format!("第{i}首")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (dir, ds, _) = setup(&refs, false, 8);
    // Token caches are folders; their lock files sit beside them.
    let caches =
        || fs::read_dir(dir.path().join("cache")).unwrap().flatten().filter(|e| e.path().is_dir()).count();
    assert_eq!(caches(), 1);
    let mut batches = Batches::new(ds.samples(), 3, 9).unwrap();
    assert_eq!(batches.per_epoch(), 3, "the partial last batch is dropped");
    let (mut ids, mut tg) = (vec![0; 24], vec![0; 24]);
    let mut cursor = Cursor::default();
    let mut seen = Vec::new();
    for _ in 0..4 {
        batches.next(&ds, &mut cursor, &mut ids, &mut tg);
        seen.push(ids.clone());
    }
    assert_eq!(cursor, Cursor { epoch: 1, batch: 1 });
    // Resuming from a saved cursor gives the same next batch.
    let mut again = Batches::new(ds.samples(), 3, 9).unwrap();
    let mut c2 = Cursor { epoch: 0, batch: 2 };
    again.next(&ds, &mut c2, &mut ids, &mut tg);
    assert_eq!(ids, seen[2]);
}

#[test]
fn held_out_documents_are_never_trained_on() {
    let lines: Vec<String> = (0..40).map(|i| format!("第{i}首词")).collect();
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let (_dir, ds, _) = setup(&refs, false, 8);
    let (train, val) = hold_out(ds.samples(), 0.25, 7);
    assert_eq!(val.len(), 10);
    // Which document a row came from: rows are distinct, so compare filled rows.
    let (mut row, mut tg, mut scratch) = (vec![0; 8], vec![0; 8], Vec::new());
    let held: Vec<Vec<u32>> = val
        .iter()
        .map(|&i| {
            ds.fill(i as usize, &mut row, &mut tg, &mut scratch);
            row.clone()
        })
        .collect();
    let mut batches = Batches::over(train, 3, 7).unwrap();
    let (mut ids, mut targets) = (vec![0; 24], vec![0; 24]);
    let mut cursor = Cursor::default();
    let mut seen = 0;
    while cursor.epoch < 2 {
        batches.next(&ds, &mut cursor, &mut ids, &mut targets);
        for r in ids.chunks(8) {
            assert!(!held.iter().any(|h| h == r), "a held-out document was trained on");
            seen += 1;
        }
    }
    assert!(seen >= 2 * 30 - 3, "two epochs of the 30 training documents ({seen} rows)");
}
