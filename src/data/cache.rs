//! The token cache: a JSON-lines file tokenised once into `tokens.bin` (u16 when the
//! vocabulary fits, else u32) and `offsets.bin` (u64 document starts), memory-mapped.
//!
//! Built streaming (a chunk of lines at a time, tokenised in parallel), so files larger than
//! RAM work; keyed by the data file's content hash, the tokenizer's hash and the encoding
//! settings, and written to a temporary folder renamed into place.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::tokenizer::Tok;

const FORMAT: u32 = 1;
const LINES_PER_CHUNK: usize = 4096;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CacheInfo {
    pub format: u32,
    pub source: PathBuf,
    pub data_sha256: String,
    pub tokenizer_sha256: String,
    /// Bytes per token: 2 or 4.
    pub width: usize,
    pub documents: u64,
    pub tokens: u64,
    pub skipped_lines: u64,
}

/// A memory-mapped token cache.
pub struct TokenCache {
    pub info: CacheInfo,
    tokens: Option<Mmap>,
    offsets: Mmap,
}

impl TokenCache {
    pub fn documents(&self) -> usize {
        self.info.documents as usize
    }

    /// Token index where document `i` starts (`i == documents()` gives the total).
    pub fn offset(&self, i: usize) -> usize {
        u64::from_le_bytes(self.offsets[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize
    }

    /// Tokens of document `i`, widened into `out` (cleared first).
    pub fn doc(&self, i: usize, out: &mut Vec<u32>) {
        let (a, b) = (self.offset(i), self.offset(i + 1));
        out.clear();
        let Some(tokens) = &self.tokens else { return };
        let w = self.info.width;
        out.extend(tokens[a * w..b * w].chunks_exact(w).map(|c| {
            if w == 2 {
                u16::from_le_bytes([c[0], c[1]]) as u32
            } else {
                u32::from_le_bytes([c[0], c[1], c[2], c[3]])
            }
        }));
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Opens the cache for `data` under `cache_root`, building it first when missing.
pub fn open_or_build(
    data: &Path,
    tok_path: &Path,
    tok: &Tok,
    skip_bad_lines: bool,
    threads: usize,
    cache_root: &Path,
    quiet: bool,
) -> Result<TokenCache> {
    let data_sha = sha256_file(data)?;
    let tok_sha = sha256_file(tok_path)?;
    let key = {
        let mut h = Sha256::new();
        h.update(format!("{FORMAT}|{data_sha}|{tok_sha}|skip={skip_bad_lines}"));
        hex(&h.finalize())
    };
    let dir = cache_root.join(format!("tokens-{}", &key[..16]));
    if !dir.join("info.json").is_file() {
        build(data, tok, skip_bad_lines, threads, &dir, &data_sha, &tok_sha, quiet)?;
    }
    open(&dir)
}

fn open(dir: &Path) -> Result<TokenCache> {
    let info: CacheInfo = serde_json::from_str(&fs::read_to_string(dir.join("info.json"))?)
        .with_context(|| format!("reading token cache {}", dir.display()))?;
    let map = |name: &str| -> Result<Option<Mmap>> {
        let f = File::open(dir.join(name)).with_context(|| format!("token cache {}", dir.display()))?;
        if f.metadata()?.len() == 0 {
            return Ok(None);
        }
        // SAFETY: cache files are written once, renamed into place and never modified.
        Ok(Some(unsafe { Mmap::map(&f)? }))
    };
    let tokens = map("tokens.bin")?;
    let offsets = map("offsets.bin")?.context("token cache without offsets")?;
    if offsets.len() != (info.documents as usize + 1) * 8 {
        bail!("token cache {} is damaged (offsets); delete it to rebuild", dir.display());
    }
    Ok(TokenCache { info, tokens, offsets })
}

#[allow(clippy::too_many_arguments)]
fn build(
    data: &Path,
    tok: &Tok,
    skip_bad_lines: bool,
    threads: usize,
    dir: &Path,
    data_sha: &str,
    tok_sha: &str,
    quiet: bool,
) -> Result<()> {
    let parent = dir.parent().expect("cache dir has a parent");
    fs::create_dir_all(parent).with_context(|| format!("cannot create cache folder {}", parent.display()))?;
    let tmp = parent.join(format!(
        ".building-{}-{}",
        std::process::id(),
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp)?;
    let result = write_cache(data, tok, skip_bad_lines, threads, &tmp, data_sha, tok_sha, quiet);
    match result {
        Ok(()) => match fs::rename(&tmp, dir) {
            Ok(()) => Ok(()),
            // Another process built it meanwhile.
            Err(_) if dir.join("info.json").is_file() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(())
            }
            Err(e) => Err(e).with_context(|| format!("moving token cache into {}", dir.display())),
        },
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

/// The `text` of one jsonl line, or why the line is unusable.
pub fn parse_line(line: &str) -> std::result::Result<String, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"))?;
    match v.get("text") {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(_) => Err("\"text\" is not a string".into()),
        None => Err("no \"text\" field".into()),
    }
}

#[allow(clippy::too_many_arguments)]
fn write_cache(
    data: &Path,
    tok: &Tok,
    skip_bad_lines: bool,
    threads: usize,
    tmp: &Path,
    data_sha: &str,
    tok_sha: &str,
    quiet: bool,
) -> Result<()> {
    let width = if tok.vocab_size() <= 1 << 16 { 2 } else { 4 };
    let file = File::open(data).with_context(|| format!("cannot open data file {}", data.display()))?;
    let total_bytes = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let mut tokens_out = BufWriter::new(File::create(tmp.join("tokens.bin"))?);
    let mut offsets_out = BufWriter::new(File::create(tmp.join("offsets.bin"))?);
    offsets_out.write_all(&0u64.to_le_bytes())?;
    let bar = if quiet { indicatif::ProgressBar::hidden() } else { indicatif::ProgressBar::new(total_bytes) };
    bar.set_style(
        indicatif::ProgressStyle::with_template("tokenising {bar:30} {bytes}/{total_bytes} ({eta})")
            .expect("valid template"),
    );
    let pool = crate::train::thread_pool(threads)?;
    let (mut docs, mut ntok, mut skipped, mut lineno) = (0u64, 0u64, 0u64, 0usize);
    let mut chunk: Vec<(usize, String)> = Vec::with_capacity(LINES_PER_CHUNK);
    loop {
        chunk.clear();
        let mut eof = false;
        while chunk.len() < LINES_PER_CHUNK {
            let mut line = String::new();
            let n = reader
                .read_line(&mut line)
                .with_context(|| format!("reading {} line {}", data.display(), lineno + 1))?;
            if n == 0 {
                eof = true;
                break;
            }
            bar.inc(n as u64);
            lineno += 1;
            if line.trim().is_empty() {
                continue;
            }
            chunk.push((lineno, line));
        }
        let encoded: Vec<(usize, std::result::Result<Vec<u32>, String>)> = pool.install(|| {
            chunk
                .par_iter()
                .map(|(no, line)| {
                    (*no, parse_line(line).and_then(|t| tok.encode(&t).map_err(|e| e.to_string())))
                })
                .collect()
        });
        for (no, r) in encoded {
            match r {
                Ok(ids) => {
                    ntok += ids.len() as u64;
                    for id in ids {
                        if width == 2 {
                            tokens_out.write_all(&(id as u16).to_le_bytes())?;
                        } else {
                            tokens_out.write_all(&id.to_le_bytes())?;
                        }
                    }
                    docs += 1;
                    offsets_out.write_all(&ntok.to_le_bytes())?;
                }
                Err(_) if skip_bad_lines => skipped += 1,
                Err(why) => bail!(
                    "{}:{no}: malformed line: {why}\n  hint: fix the line, or set data.skip_bad_lines = true to skip and count such lines",
                    data.display()
                ),
            }
        }
        if eof {
            break;
        }
    }
    bar.finish_and_clear();
    if docs == 0 {
        bail!(
            "data file {} has no documents (it is empty{})",
            data.display(),
            if skipped > 0 { " after skipping bad lines" } else { "" }
        );
    }
    tokens_out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    offsets_out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    let info = CacheInfo {
        format: FORMAT,
        source: data.to_path_buf(),
        data_sha256: data_sha.to_string(),
        tokenizer_sha256: tok_sha.to_string(),
        width,
        documents: docs,
        tokens: ntok,
        skipped_lines: skipped,
    };
    fs::write(tmp.join("info.json"), serde_json::to_string_pretty(&info)?)?;
    Ok(())
}
