//! Data as it ships: one corpus as a JSON-lines file, zstd and gzip shards, and Parquet files
//! (ours, and pyarrow's as a real client writes them) gives the same token cache bits and the
//! same losses; damaged compressed data and Parquet row groups are reported or skipped; a
//! changed shard refuses a resume; a stopped `data prepare` continues.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use crate::{Scratch, expect, meta, metric, minimind, run_quiet, stderr, stdout};

/// The sample corpus's documents, one JSON line each.
fn corpus() -> Vec<String> {
    let text = fs::read_to_string(crate::repo().join("data/songci_2k.jsonl")).unwrap();
    text.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("{l}\n")).collect()
}

/// `lines` split into `n` consecutive parts.
fn parts(lines: &[String], n: usize) -> Vec<Vec<String>> {
    let size = lines.len().div_ceil(n);
    lines.chunks(size).map(<[String]>::to_vec).collect()
}

fn write_zst(path: &Path, lines: &[String]) {
    let mut e = zstd::stream::write::Encoder::new(fs::File::create(path).unwrap(), 3).unwrap();
    e.include_checksum(true).unwrap();
    e.write_all(lines.concat().as_bytes()).unwrap();
    e.finish().unwrap();
}

fn write_gz(path: &Path, lines: &[String]) {
    let mut e =
        flate2::write::GzEncoder::new(fs::File::create(path).unwrap(), flate2::Compression::default());
    e.write_all(lines.concat().as_bytes()).unwrap();
    e.finish().unwrap();
}

/// The documents' texts in a Parquet file with a nullable `text` column (as pyarrow writes
/// strings) and another column beside it, `groups` row groups, snappy-compressed.
fn write_parquet(path: &Path, lines: &[String], groups: usize) {
    use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
    let schema = "message doc { OPTIONAL INT64 id; OPTIONAL BYTE_ARRAY text (UTF8); }";
    let schema = Arc::new(parquet::schema::parser::parse_message_type(schema).unwrap());
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::file::writer::SerializedFileWriter::new(
        fs::File::create(path).unwrap(),
        schema,
        Arc::new(props),
    )
    .unwrap();
    for (g, group) in parts(lines, groups).iter().enumerate() {
        let texts: Vec<ByteArray> = group
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                ByteArray::from(v["text"].as_str().unwrap())
            })
            .collect();
        let defs = vec![1i16; texts.len()];
        let ids: Vec<i64> = (0..texts.len() as i64).map(|i| i + 1000 * g as i64).collect();
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<Int64Type>().write_batch(&ids, Some(&defs), None).unwrap();
        col.close().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        col.typed::<ByteArrayType>().write_batch(&texts, Some(&defs), None).unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// PYTHONPATH with pyarrow (a real client's Parquet file), or None (SKIPPED; a failure under CI).
fn pyarrow() -> Option<String> {
    let install = "python3 -m pip install --target .ci/deps/pyarrow pyarrow==21.0.0";
    crate::python_with("pyarrow", "pyarrow.parquet", install)
}

/// The token cache a run trained on: its info.json.
fn cache_info(run: &Path) -> serde_json::Value {
    let root = run.parent().unwrap().join(".cache");
    let config: toml::Table = fs::read_to_string(run.join("config.toml")).unwrap().parse().unwrap();
    let source = config["data"]["path"].as_str().unwrap().to_string();
    for e in fs::read_dir(root).unwrap().flatten() {
        let info = e.path().join("info.json");
        if let Ok(text) = fs::read_to_string(&info) {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            if v["source"] == source.as_str() {
                return v;
            }
        }
    }
    panic!("no token cache for {}", run.display());
}

fn train(s: &Scratch, data: &str) -> PathBuf {
    let before = s.runs().len();
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", &format!("data.path={data:?}")]), 0);
    let runs = s.runs();
    assert_eq!(runs.len(), before + 1, "{}", stdout(&o));
    runs[before].clone()
}

#[test]
fn one_corpus_as_jsonl_zst_gz_and_parquet_gives_the_same_tokens_and_losses() {
    let s = Scratch::new();
    s.micro("");
    let lines = corpus();
    let dir = |name: &str| {
        let d = s.path().join(name);
        fs::create_dir_all(&d).unwrap();
        d
    };
    for (i, part) in parts(&lines, 3).iter().enumerate() {
        write_zst(&dir("zst").join(format!("part-{i}.jsonl.zst")), part);
    }
    for (i, part) in parts(&lines, 2).iter().enumerate() {
        write_gz(&dir("gz").join(format!("part-{i}.jsonl.gz")), part);
    }
    for (i, part) in parts(&lines, 2).iter().enumerate() {
        // Two files of two row groups each.
        write_parquet(&dir("parquet").join(format!("train-{i:05}-of-00002.parquet")), part, 2);
    }
    let mut sources = vec!["data.jsonl".to_string(), "zst".into(), "gz/*.jsonl.gz".into(), "parquet".into()];
    if let Some(py) = pyarrow() {
        let script = r#"
import json, sys, pyarrow as pa, pyarrow.parquet as pq
texts = [json.loads(l)["text"] for l in open(sys.argv[1]) if l.strip()]
pq.write_table(pa.table({"text": texts, "n": list(range(len(texts)))}), sys.argv[2], row_group_size=700)
"#;
        let out = dir("pyarrow").join("part-0.parquet");
        let o = Command::new("python3")
            .args(["-c", script])
            .arg(s.path().join("data.jsonl"))
            .arg(&out)
            .env("PYTHONPATH", py)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", stderr(&o));
        sources.push("pyarrow/*.parquet".into());
    }
    let runs: Vec<PathBuf> = sources.iter().map(|src| train(&s, src)).collect();
    let reference = cache_info(&runs[0]);
    let loss = metric(&runs[0], "loss");
    for (src, run) in sources.iter().zip(&runs) {
        let info = cache_info(run);
        for key in ["tokens_sha256", "offsets_sha256", "documents", "tokens"] {
            assert_eq!(info[key], reference[key], "{src}: {key}");
        }
        assert_eq!(metric(run, "loss"), loss, "{src}: the same losses");
    }
    assert_eq!(cache_info(&runs[1])["shards"].as_array().unwrap().len(), 3);
}

#[test]
fn damaged_zstd_data_and_parquet_row_groups_are_reported_or_skipped() {
    let s = Scratch::new();
    s.micro("");
    let lines = corpus();
    fs::create_dir(s.path().join("zst")).unwrap();
    for (i, part) in parts(&lines, 3).iter().enumerate() {
        write_zst(&s.path().join(format!("zst/part-{i}.jsonl.zst")), part);
    }
    let damage = |path: &Path, at: usize| {
        let mut b = fs::read(path).unwrap();
        b[at..at + 16].fill(0xA5);
        fs::write(path, b).unwrap();
    };
    let shard = s.path().join("zst/part-1.jsonl.zst");
    damage(&shard, fs::metadata(&shard).unwrap().len() as usize / 2);
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "data.path=\"zst\""]), 1);
    let err = stderr(&o);
    assert!(err.contains("part-1.jsonl.zst:") && err.contains("damaged zstd data"), "{err}");
    assert!(err.contains("data.skip_bad_lines"), "{err}");
    let o = expect(
        &mut run_quiet(
            s.path(),
            &["micro.toml", "--set", "data.path=\"zst\"", "--set", "data.skip_bad_lines=true"],
        ),
        0,
    );
    let run = s.runs().last().unwrap().clone();
    let skipped = meta(&run)["skipped_lines"].as_u64().unwrap();
    assert!(skipped >= 1, "{}", stdout(&o));
    let info = cache_info(&run);
    assert!(info["skipped_rows"][0].as_str().unwrap().contains("part-1.jsonl.zst:"), "{info}");
    // The other shards' documents are all there, the damaged one's up to where it broke.
    let docs = info["documents"].as_u64().unwrap() as usize;
    assert!(docs >= 2 * lines.len() / 3 && docs < lines.len(), "{docs}");

    // Parquet: the first of two row groups damaged (the text column's page header overwritten).
    fs::create_dir(s.path().join("pq")).unwrap();
    let file = s.path().join("pq/part-0.parquet");
    write_parquet(&file, &lines, 2);
    let text_chunk = {
        use parquet::file::reader::FileReader;
        let r = parquet::file::serialized_reader::SerializedFileReader::new(fs::File::open(&file).unwrap())
            .unwrap();
        r.metadata().row_group(0).column(1).byte_range().0 as usize
    };
    damage(&file, text_chunk);
    let o = expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "data.path=\"pq\""]), 1);
    let err = stderr(&o);
    assert!(err.contains("part-0.parquet:1:") && err.contains("damaged row group 0"), "{err}");
    expect(
        &mut run_quiet(
            s.path(),
            &["micro.toml", "--set", "data.path=\"pq\"", "--set", "data.skip_bad_lines=true"],
        ),
        0,
    );
    let run = s.runs().last().unwrap().clone();
    let info = cache_info(&run);
    assert_eq!(info["documents"].as_u64().unwrap() as usize, lines.len() - lines.len().div_ceil(2));
    assert_eq!(meta(&run)["skipped_lines"], 1, "one damaged row group");
}

#[test]
fn a_shard_changed_before_resume_is_refused() {
    let s = Scratch::new();
    s.micro("");
    let lines = corpus();
    fs::create_dir(s.path().join("zst")).unwrap();
    let shards = parts(&lines, 3);
    for (i, part) in shards.iter().enumerate() {
        write_zst(&s.path().join(format!("zst/part-{i}.jsonl.zst")), part);
    }
    expect(&mut run_quiet(s.path(), &["micro.toml", "--set", "data.path=\"zst\"", "--stop-after", "4"]), 130);
    let run = s.runs()[0].clone();
    write_zst(&s.path().join("zst/part-2.jsonl.zst"), &shards[2][1..]);
    let o = expect(minimind(s.path()).args(["resume", "--quiet"]).arg(&run), 1);
    let err = stderr(&o);
    assert!(err.contains("what it trains on changed") && err.contains("zst changed (sha256"), "{err}");
    assert_eq!(meta(&run)["status"], "stopped");
}

#[test]
fn a_stopped_data_prepare_continues_from_its_finished_shards() {
    let s = Scratch::new();
    s.micro("");
    let lines = corpus();
    fs::create_dir(s.path().join("zst")).unwrap();
    for (i, part) in parts(&lines, 6).iter().enumerate() {
        write_zst(&s.path().join(format!("zst/part-{i}.jsonl.zst")), part);
    }
    let prepare = |extra: &[&str]| {
        let mut c = minimind(s.path());
        c.args(["data", "prepare", "micro.toml", "--quiet", "--set", "data.path=\"zst\""]);
        c.args(["--set", "data.num_workers=1"]).args(extra);
        c
    };
    let o = expect(&mut prepare(&["--stop-after-shards", "2"]), 130);
    assert!(stdout(&o).contains("stopped by SIGINT"), "{}", stdout(&o));
    let o = expect(&mut prepare(&[]), 0);
    let out = stdout(&o);
    assert!(out.contains("of 6 shard(s) already tokenised"), "{out}");
    assert!(out.contains("token cache ready") && out.contains("6 shard(s), 2.0K documents"), "{out}");
    assert!(out.contains("tokens per document: mean") && out.contains("no rows skipped"), "{out}");
    // Training finds the cache built; it equals one built in one go from the JSON-lines file.
    let run = train(&s, "zst");
    let log = fs::read_to_string(run.join("train.log")).unwrap();
    assert!(!log.contains("tokenising"), "{log}");
    let whole = train(&s, "data.jsonl");
    assert_eq!(cache_info(&run)["tokens_sha256"], cache_info(&whole)["tokens_sha256"]);
    assert_eq!(metric(&run, "loss"), metric(&whole, "loss"));
}
