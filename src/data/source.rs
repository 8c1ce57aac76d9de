//! Where documents come from: `data.path` names a file, a folder or a glob of shards, read in
//! sorted path order, each by its extension: JSON lines (`.jsonl`, `.json`, any other name),
//! JSON lines compressed with zstd (`.zst`) or gzip (`.gz`), or Parquet (`.parquet`, its
//! text column). Every reader streams: a bounded chunk of lines, or one Parquet row group, at
//! a time.
//!
//! A shard that cannot be decoded further (a damaged zstd frame or gzip member) ends with one
//! unusable entry at the row where it broke; a damaged Parquet row group is one unusable entry
//! for the group, and reading goes on with the next. Unusable entries are skipped and counted
//! with `data.skip_bad_lines`, else an error naming the shard and the row, as malformed JSON
//! lines are.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use super::jsonl::{Lines, parse_line};

/// How a shard is encoded, by its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    JsonlZst,
    JsonlGz,
    Parquet,
}

impl Format {
    /// The format of `path` by its extension; anything unknown is read as JSON lines.
    pub fn of(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("zst" | "zstd") => Format::JsonlZst,
            Some("gz") => Format::JsonlGz,
            Some("parquet") => Format::Parquet,
            _ => Format::Jsonl,
        }
    }

    /// Whether a folder listing takes the file `name` as a shard.
    fn is_data(name: &str) -> bool {
        [".jsonl", ".json", ".jsonl.zst", ".json.zst", ".jsonl.gz", ".json.gz", ".parquet"]
            .iter()
            .any(|ext| name.ends_with(ext))
    }
}

/// Whether a `data.path` value is a glob pattern.
pub fn is_glob(spec: &str) -> bool {
    spec.contains(['*', '?', '['])
}

/// The shards `spec` names, sorted by path: the file itself, a folder's data files (searched
/// below it, hidden ones left out), or the files a glob matches.
pub fn shards(spec: &Path) -> Result<Vec<PathBuf>> {
    let text = spec.to_string_lossy();
    let mut found: Vec<PathBuf> = if is_glob(&text) {
        let paths = glob::glob(&text).with_context(|| format!("data path {text} is not a valid glob"))?;
        let matched: Vec<PathBuf> = paths.filter_map(|p| p.ok()).filter(|p| p.is_file()).collect();
        if matched.is_empty() {
            bail!("data path {text} matches no file");
        }
        matched
    } else if spec.is_dir() {
        let files: Vec<PathBuf> = walkdir::WalkDir::new(spec)
            .follow_links(true)
            .into_iter()
            .filter_entry(|e| e.depth() == 0 || !e.file_name().to_string_lossy().starts_with('.'))
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_file() && Format::is_data(&e.file_name().to_string_lossy()))
            .map(|e| e.into_path())
            .collect();
        if files.is_empty() {
            bail!(
                "data folder {} holds no data files (.jsonl, .json, .jsonl.zst, .jsonl.gz or .parquet)",
                spec.display()
            );
        }
        files
    } else if spec.is_file() {
        vec![spec.to_path_buf()]
    } else {
        bail!("data file {} does not exist", spec.display());
    };
    found.sort();
    Ok(found)
}

/// One document of a shard: its 1-based row (line for JSON lines), and its text or why the
/// row cannot be used.
pub type Doc = (u64, std::result::Result<String, String>);

/// A shard's documents in order, a bounded chunk at a time.
pub trait Reader: Send {
    /// Appends up to `max_docs` documents (or about `max_bytes` of input) to `out`; false once
    /// the shard is exhausted.
    fn fill(&mut self, out: &mut Vec<Doc>, max_docs: usize, max_bytes: u64) -> Result<bool>;
    /// Bytes of the shard's file consumed so far (for progress).
    fn bytes_read(&self) -> u64;
}

/// Opens `shard` for reading its documents' `field`.
pub fn open(shard: &Path, field: &str) -> Result<Box<dyn Reader>> {
    let file = File::open(shard).with_context(|| format!("cannot open data file {}", shard.display()))?;
    let counted = Counted { inner: file, bytes: std::sync::Arc::default() };
    let bytes = counted.bytes.clone();
    let field = field.to_string();
    Ok(match Format::of(shard) {
        Format::Jsonl => Box::new(JsonLines::new(Box::new(counted), bytes, field, None)),
        Format::JsonlZst => {
            let d = zstd::stream::read::Decoder::new(counted)
                .with_context(|| format!("reading {} as zstd", shard.display()))?;
            Box::new(JsonLines::new(Box::new(d), bytes, field, Some("zstd")))
        }
        Format::JsonlGz => {
            let d = flate2::read::MultiGzDecoder::new(BufReader::new(counted));
            Box::new(JsonLines::new(Box::new(d), bytes, field, Some("gzip")))
        }
        Format::Parquet => Box::new(ParquetRows::open(shard, &field)?),
    })
}

/// A reader that counts the bytes read through it.
struct Counted {
    inner: File,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Read for Counted {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bytes.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
}

/// JSON lines, plain or through a decompressor (`codec` names it for messages).
struct JsonLines {
    lines: Lines<BufReader<Box<dyn Read + Send>>>,
    bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
    field: String,
    codec: Option<&'static str>,
    done: bool,
}

impl JsonLines {
    fn new(
        input: Box<dyn Read + Send>,
        bytes: std::sync::Arc<std::sync::atomic::AtomicU64>,
        field: String,
        codec: Option<&'static str>,
    ) -> JsonLines {
        JsonLines { lines: Lines::new(BufReader::new(input)), bytes, field, codec, done: false }
    }
}

impl Reader for JsonLines {
    fn fill(&mut self, out: &mut Vec<Doc>, max_docs: usize, max_bytes: u64) -> Result<bool> {
        let start = self.lines.bytes_read();
        let mut taken = 0;
        while !self.done && taken < max_docs && self.lines.bytes_read() - start < max_bytes {
            match self.lines.next() {
                None => self.done = true,
                Some(Ok((no, line))) => {
                    out.push((no, line.and_then(|l| parse_line(&l, &self.field))));
                    taken += 1;
                }
                // Plain files: a real read error. Compressed ones: damaged data, after which
                // nothing of the shard can be decoded.
                Some(Err(e)) => match self.codec {
                    None => return Err(e).context("reading the data file"),
                    Some(codec) => {
                        let why = format!("damaged {codec} data ({e}); the rest of the shard cannot be read");
                        out.push((self.lines.line_number() + 1, Err(why)));
                        self.done = true;
                    }
                },
            }
        }
        Ok(!self.done)
    }

    fn bytes_read(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A Parquet file's text column, one row group at a time.
struct ParquetRows {
    file: parquet::file::serialized_reader::SerializedFileReader<File>,
    /// The leaf column holding the text.
    column: usize,
    /// The column's maximum definition level: a row below it is null.
    max_def: i16,
    next_group: usize,
    /// Rows before the next row group.
    row: u64,
    pending: VecDeque<Doc>,
    /// Compressed bytes of the row groups read so far.
    bytes: u64,
}

impl ParquetRows {
    fn open(path: &Path, field: &str) -> Result<ParquetRows> {
        use parquet::file::reader::FileReader;
        let f = File::open(path).with_context(|| format!("cannot open data file {}", path.display()))?;
        let file = parquet::file::serialized_reader::SerializedFileReader::new(f)
            .with_context(|| format!("{} is not a readable Parquet file", path.display()))?;
        let schema = file.metadata().file_metadata().schema_descr_ptr();
        let Some(column) = (0..schema.num_columns()).find(|&i| schema.column(i).path().parts() == [field])
        else {
            let names: Vec<String> =
                (0..schema.num_columns()).map(|i| schema.column(i).path().string()).collect();
            bail!(
                "{} has no column {field:?} (its columns: {})\n  hint: set data.text_field to the column that holds the text",
                path.display(),
                names.join(", ")
            );
        };
        let max_def = schema.column(column).max_def_level();
        Ok(ParquetRows { file, column, max_def, next_group: 0, row: 0, pending: VecDeque::new(), bytes: 0 })
    }

    /// The next row group's documents into `pending`; a group that cannot be decoded is one
    /// unusable entry at its first row.
    fn read_group(&mut self) {
        use parquet::file::reader::FileReader;
        let g = self.next_group;
        self.next_group += 1;
        let meta = self.file.metadata().row_group(g);
        let rows = meta.num_rows().max(0) as u64;
        self.bytes += meta.compressed_size().max(0) as u64;
        let first = self.row + 1;
        self.row += rows;
        match self.group_texts(g) {
            Ok(texts) if texts.len() as u64 == rows => {
                self.pending.extend(texts.into_iter().enumerate().map(|(i, t)| (first + i as u64, t)));
            }
            Ok(texts) => self.pending.push_back((
                first,
                Err(format!("damaged row group {g}: {} of its {rows} rows decode", texts.len())),
            )),
            Err(e) => {
                self.pending.push_back((first, Err(format!("damaged row group {g} ({rows} rows): {e}"))))
            }
        }
    }

    fn group_texts(&self, g: usize) -> parquet::errors::Result<Vec<std::result::Result<String, String>>> {
        use parquet::column::reader::ColumnReader;
        use parquet::file::reader::FileReader;
        let group = self.file.get_row_group(g)?;
        let ColumnReader::ByteArrayColumnReader(mut reader) = group.get_column_reader(self.column)? else {
            return Err(parquet::errors::ParquetError::General(
                "the text column does not hold strings".into(),
            ));
        };
        let mut out = Vec::new();
        let (mut defs, mut values) = (Vec::new(), Vec::new());
        loop {
            defs.clear();
            values.clear();
            let (records, _, _) = reader.read_records(4096, Some(&mut defs), None, &mut values)?;
            if records == 0 {
                break;
            }
            let mut v = values.iter();
            for i in 0..records {
                let present = self.max_def == 0 || defs.get(i).is_some_and(|&d| d == self.max_def);
                out.push(match present.then(|| v.next()).flatten() {
                    Some(b) => std::str::from_utf8(b.data())
                        .map(str::to_string)
                        .map_err(|e| format!("invalid UTF-8 at byte {} of the text", e.valid_up_to() + 1)),
                    None => Err("the text is null".to_string()),
                });
            }
        }
        Ok(out)
    }
}

impl Reader for ParquetRows {
    fn fill(&mut self, out: &mut Vec<Doc>, max_docs: usize, _max_bytes: u64) -> Result<bool> {
        use parquet::file::reader::FileReader;
        let groups = self.file.num_row_groups();
        let mut taken = 0;
        while taken < max_docs {
            if self.pending.is_empty() {
                if self.next_group == groups {
                    return Ok(false);
                }
                self.read_group();
                continue;
            }
            out.extend(self.pending.pop_front());
            taken += 1;
        }
        Ok(!self.pending.is_empty() || self.next_group < groups)
    }

    fn bytes_read(&self) -> u64 {
        self.bytes
    }
}

/// Documents in the data at `spec` when that is cheap to know: non-blank lines of plain JSON
/// lines, rows in Parquet metadata; None when a shard is compressed (or unreadable).
pub fn count_documents(spec: &Path) -> Option<u64> {
    use parquet::file::reader::FileReader;
    let mut total = 0;
    for shard in shards(spec).ok()? {
        total += match Format::of(&shard) {
            Format::Jsonl => Lines::new(BufReader::new(File::open(&shard).ok()?)).count() as u64,
            Format::Parquet => {
                let r = parquet::file::serialized_reader::SerializedFileReader::new(File::open(&shard).ok()?)
                    .ok()?;
                r.metadata().file_metadata().num_rows().max(0) as u64
            }
            Format::JsonlZst | Format::JsonlGz => return None,
        };
    }
    Some(total)
}

/// Every document of `shard`, in order, through [`open`] (tests and small readers).
pub fn read_all(shard: &Path, field: &str) -> Result<Vec<Doc>> {
    let mut reader = open(shard, field)?;
    let mut out = Vec::new();
    while reader.fill(&mut out, 4096, 1 << 20)? {}
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_by_name_and_what_a_folder_lists() {
        for (name, format, listed) in [
            ("a.jsonl", Format::Jsonl, true),
            ("a.json", Format::Jsonl, true),
            ("chunk1/example_train_0.jsonl.zst", Format::JsonlZst, true),
            ("a.jsonl.gz", Format::JsonlGz, true),
            ("train-00000-of-00012.parquet", Format::Parquet, true),
            ("notes.txt", Format::Jsonl, false),
            ("README.md", Format::Jsonl, false),
        ] {
            assert_eq!(Format::of(Path::new(name)), format, "{name}");
            assert_eq!(Format::is_data(name), listed, "{name}");
        }
        assert!(
            is_glob("fineweb/sample/*.parquet") && is_glob("a/part-[0-9].jsonl") && !is_glob("data/x.jsonl")
        );
    }

    #[test]
    fn shards_are_sorted_and_hidden_files_left_out() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b/2.jsonl", "b/10.jsonl", "a.jsonl.gz", ".hidden/x.jsonl", "skip.txt"] {
            let p = dir.path().join(name);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, "").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter().map(|p| p.strip_prefix(dir.path()).unwrap().display().to_string()).collect()
        };
        assert_eq!(names(shards(dir.path()).unwrap()), ["a.jsonl.gz", "b/10.jsonl", "b/2.jsonl"]);
        assert_eq!(names(shards(&dir.path().join("b/*.jsonl")).unwrap()), ["b/10.jsonl", "b/2.jsonl"]);
        let none = shards(&dir.path().join("c/*.parquet")).unwrap_err().to_string();
        assert!(none.contains("matches no file"), "{none}");
        let empty = tempfile::tempdir().unwrap();
        assert!(shards(empty.path()).unwrap_err().to_string().contains("holds no data files"));
    }
}
