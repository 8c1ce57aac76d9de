//! The token cache: a JSON-lines file tokenised once into `tokens.bin` (u16 when the
//! vocabulary fits, else u32) and `offsets.bin` (u64 document starts), memory-mapped.
//!
//! Built streaming (a bounded chunk of lines at a time, tokenised in parallel), so files larger
//! than RAM work; keyed by the data file's content hash, the tokenizer's hash and the encoding
//! settings. `info.json` is its header: format version, counts and the SHA-256 of both files,
//! all checked on every open, so a damaged or truncated cache is rebuilt, never trained on.
//! One process builds a given cache (the others wait on its lock), in a temporary folder that
//! is renamed into place, removed on failure or signal, and cleared at the next start when its
//! builder died.

use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::jsonl::{Lines, Skipped, parse_line};
use super::tokenizer::Tok;
use crate::files::{lock_file, lock_holder};
use crate::signals::{Interrupted, Stop};

const FORMAT: u32 = 2;
const LINES_PER_CHUNK: usize = 4096;
/// A chunk also ends after this many bytes, so a stop request is honoured within a second
/// even for long documents.
const BYTES_PER_CHUNK: u64 = 1 << 20;

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
    /// The first few skipped lines (1-based).
    pub skipped_line_numbers: Vec<u64>,
    /// SHA-256 of tokens.bin and offsets.bin.
    pub tokens_sha256: String,
    pub offsets_sha256: String,
}

/// A memory-mapped token cache, checked against its header when opened.
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
        out.extend(tokens[a * w..b * w].chunks_exact(w).map(|c| token_at(c, w)));
    }
}

fn token_at(c: &[u8], width: usize) -> u32 {
    if width == 2 {
        u16::from_le_bytes([c[0], c[1]]) as u32
    } else {
        u32::from_le_bytes([c[0], c[1], c[2], c[3]])
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a file, read a megabyte at a time; a stop request interrupts it.
fn sha256_file(path: &Path, stop: &Stop) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        stop.check()?;
        let n = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of bytes in memory, 16 MB at a time; a stop request interrupts it.
fn sha256_bytes(bytes: &[u8], stop: &Stop) -> Result<String, Interrupted> {
    let mut h = Sha256::new();
    for chunk in bytes.chunks(16 << 20) {
        stop.check()?;
        h.update(chunk);
    }
    Ok(hex(&h.finalize()))
}

/// How a cache is opened or built: where, how loudly, and what may interrupt it.
pub struct CacheOptions<'a> {
    pub root: &'a Path,
    pub skip_bad_lines: bool,
    /// Tokeniser threads (0: all cores).
    pub threads: usize,
    /// No progress bar; plain progress lines every `heartbeat` instead.
    pub quiet: bool,
    pub heartbeat: Duration,
    pub stop: &'a Stop,
}

/// A cache ready to use, and what happened on the way (rebuilds, waits) for the run log.
pub struct Opened {
    pub cache: TokenCache,
    pub notes: Vec<String>,
}

/// Opens the cache for `data` under `opts.root`, building it first when missing or damaged.
pub fn open_or_build(data: &Path, tok_path: &Path, tok: &Tok, opts: &CacheOptions<'_>) -> Result<Opened> {
    let root = opts.root;
    fs::create_dir_all(root).with_context(|| format!("cannot create cache folder {}", root.display()))?;
    let mut notes = Vec::new();
    remove_dead_builds(root, None);
    let data_sha = sha256_file(data, opts.stop)?;
    let tok_sha = sha256_file(tok_path, opts.stop)?;
    let key = {
        let mut h = Sha256::new();
        h.update(format!("{FORMAT}|{data_sha}|{tok_sha}|skip={}", opts.skip_bad_lines));
        hex(&h.finalize())
    };
    let name = format!("tokens-{}", &key[..16]);
    let dir = root.join(&name);
    let vocab = tok.vocab_size();
    if dir.exists()
        && let Ok(cache) = open_checked(&dir, vocab, opts.stop)?
    {
        return Ok(Opened { cache, notes });
    }
    // Build under the cache's lock; whoever waited finds it built.
    let lock_path = root.join(format!("{name}.lock"));
    let _lock = loop {
        if let Some(lock) = lock_file(&lock_path, false)? {
            break lock;
        }
        if notes.is_empty() {
            let msg = format!(
                "waiting for process {} to finish building the token cache {}",
                lock_holder(&lock_path),
                dir.display()
            );
            crate::metrics::say(&msg);
            notes.push(msg);
        }
        opts.stop.check()?;
        std::thread::sleep(Duration::from_millis(100));
    };
    remove_dead_builds(root, Some(&name));
    if dir.exists() {
        match open_checked(&dir, vocab, opts.stop)? {
            Ok(cache) => return Ok(Opened { cache, notes }),
            Err(why) => {
                let msg = format!("warning: token cache {} is damaged ({why}); rebuilding it", dir.display());
                crate::metrics::say(&msg);
                notes.push(msg);
                fs::remove_dir_all(&dir)
                    .with_context(|| format!("removing the damaged cache {}", dir.display()))?;
            }
        }
    }
    build(data, tok, opts, &dir, &data_sha, &tok_sha)?;
    let cache = open_checked(&dir, vocab, opts.stop)?.map_err(|why| {
        anyhow::anyhow!("the token cache just built in {} does not verify: {why}", dir.display())
    })?;
    Ok(Opened { cache, notes })
}

/// Opens a cache and checks it against its header: sizes, checksums, offsets and token ids.
/// The inner error says what is wrong with it; the outer one is a stop request.
fn open_checked(
    dir: &Path,
    vocab: usize,
    stop: &Stop,
) -> Result<std::result::Result<TokenCache, String>, Interrupted> {
    let mut interrupted = None;
    let checked = check_cache(dir, vocab, &mut |bytes: &[u8]| {
        sha256_bytes(bytes, stop).map_err(|e| {
            interrupted = Some(e);
            "interrupted".to_string()
        })
    });
    match interrupted {
        Some(e) => Err(e),
        None => Ok(checked),
    }
}

fn check_cache(
    dir: &Path,
    vocab: usize,
    sha256: &mut dyn FnMut(&[u8]) -> std::result::Result<String, String>,
) -> std::result::Result<TokenCache, String> {
    let text = fs::read_to_string(dir.join("info.json")).map_err(|e| format!("info.json: {e}"))?;
    let info: CacheInfo = serde_json::from_str(&text).map_err(|e| format!("info.json: {e}"))?;
    if info.format != FORMAT {
        return Err(format!("format {} instead of {FORMAT}", info.format));
    }
    if info.width != 2 && info.width != 4 {
        return Err(format!("token width {}", info.width));
    }
    let mut map = |name: &str, want_len: u64, want_sha: &str| -> std::result::Result<Option<Mmap>, String> {
        let path = dir.join(name);
        let f = File::open(&path).map_err(|e| format!("{name}: {e}"))?;
        let len = f.metadata().map_err(|e| format!("{name}: {e}"))?.len();
        if len != want_len {
            return Err(format!("{name} has {len} bytes where its header says {want_len}: truncated?"));
        }
        let bytes = if len == 0 {
            None
        } else {
            // SAFETY: cache files are written once, renamed into place and never modified; the
            // checksum below is taken over this very mapping.
            Some(unsafe { Mmap::map(&f) }.map_err(|e| format!("{name}: {e}"))?)
        };
        let sha = sha256(bytes.as_deref().unwrap_or(&[]))?;
        if sha != want_sha {
            return Err(format!("{name} does not match its checksum"));
        }
        Ok(bytes)
    };
    let tokens = map("tokens.bin", info.tokens * info.width as u64, &info.tokens_sha256)?;
    let offsets = map("offsets.bin", (info.documents + 1) * 8, &info.offsets_sha256)?
        .ok_or_else(|| "offsets.bin is empty".to_string())?;
    let cache = TokenCache { info, tokens, offsets };
    let mut prev = 0;
    for i in 0..=cache.documents() {
        let o = cache.offset(i);
        if (i == 0 && o != 0) || o < prev {
            return Err(format!("offsets.bin: document {i} starts before the one ahead of it"));
        }
        prev = o;
    }
    if prev as u64 != cache.info.tokens {
        return Err("offsets.bin does not end at the last token".into());
    }
    if let Some(tokens) = &cache.tokens {
        let w = cache.info.width;
        if let Some(bad) = tokens.chunks_exact(w).map(|c| token_at(c, w)).find(|&id| id as usize >= vocab) {
            return Err(format!("token id {bad} is outside the tokenizer's {vocab} tokens"));
        }
    }
    Ok(cache)
}

/// Removes `.building-<pid>-<name>` folders of builders that died: every one whose process is
/// gone, and (when this process holds the lock of cache `locked`) every one for that cache.
fn remove_dead_builds(root: &Path, locked: Option<&str>) {
    for e in fs::read_dir(root).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name.strip_prefix(".building-") else { continue };
        let Some((pid, cache)) = rest.split_once('-') else { continue };
        let dead = match pid.parse::<i32>() {
            Ok(pid) => !process_alive(pid),
            Err(_) => true,
        };
        if dead || locked == Some(cache) {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

fn build(
    data: &Path,
    tok: &Tok,
    opts: &CacheOptions<'_>,
    dir: &Path,
    data_sha: &str,
    tok_sha: &str,
) -> Result<()> {
    let parent = dir.parent().expect("cache dir has a parent");
    let tmp = parent.join(format!(
        ".building-{}-{}",
        std::process::id(),
        dir.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = write_cache(data, tok, opts, &tmp, data_sha, tok_sha).and_then(|()| {
        fs::rename(&tmp, dir).with_context(|| format!("moving the token cache into {}", dir.display()))
    });
    if result.is_err() {
        let _ = fs::remove_dir_all(&tmp);
    }
    result
}

/// A file written with its running SHA-256, checked on every write.
struct Hashed {
    out: BufWriter<File>,
    sha: Sha256,
    path: PathBuf,
}

impl Hashed {
    fn create(path: PathBuf) -> Result<Hashed> {
        let f = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Hashed { out: BufWriter::new(f), sha: Sha256::new(), path })
    }
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.sha.update(bytes);
        self.out.write_all(bytes).with_context(|| format!("writing {}", self.path.display()))
    }
    fn finish(self) -> Result<String> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| e.into_error())
            .with_context(|| format!("writing {}", self.path.display()))?;
        f.sync_all().with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(hex(&self.sha.finalize()))
    }
}

fn write_cache(
    data: &Path,
    tok: &Tok,
    opts: &CacheOptions<'_>,
    tmp: &Path,
    data_sha: &str,
    tok_sha: &str,
) -> Result<()> {
    let width = if tok.vocab_size() <= 1 << 16 { 2 } else { 4 };
    let file = File::open(data).with_context(|| format!("cannot open data file {}", data.display()))?;
    let total_bytes = file.metadata().with_context(|| format!("reading {}", data.display()))?.len();
    let mut lines = Lines::new(BufReader::new(file));
    let mut tokens_out = Hashed::create(tmp.join("tokens.bin"))?;
    let mut offsets_out = Hashed::create(tmp.join("offsets.bin"))?;
    offsets_out.write(&0u64.to_le_bytes())?;
    let mut progress = Progress::new(data, total_bytes, opts.quiet, opts.heartbeat);
    let pool = crate::threads::pool(opts.threads)?;
    let (mut docs, mut ntok) = (0u64, 0u64);
    let mut skipped = Skipped::default();
    let mut chunk: Vec<(u64, std::result::Result<String, String>)> = Vec::with_capacity(LINES_PER_CHUNK);
    let mut bytes = Vec::new();
    loop {
        opts.stop.check()?;
        chunk.clear();
        let start = lines.bytes_read();
        let mut eof = false;
        while chunk.len() < LINES_PER_CHUNK && lines.bytes_read() - start < BYTES_PER_CHUNK {
            match lines.next() {
                None => {
                    eof = true;
                    break;
                }
                Some(line) => chunk.push(line.with_context(|| format!("reading {}", data.display()))?),
            }
        }
        progress.set(lines.bytes_read());
        let encoded: Vec<(u64, std::result::Result<Vec<u32>, String>)> = pool.install(|| {
            chunk
                .par_iter()
                .map(|(no, line)| {
                    let ids = line
                        .clone()
                        .and_then(|l| parse_line(&l))
                        .and_then(|t| tok.encode(&t).map_err(|e| e.to_string()));
                    (*no, ids)
                })
                .collect()
        });
        for (no, r) in encoded {
            match r {
                Ok(ids) => {
                    ntok += ids.len() as u64;
                    bytes.clear();
                    for id in ids {
                        if width == 2 {
                            bytes.extend_from_slice(&(id as u16).to_le_bytes());
                        } else {
                            bytes.extend_from_slice(&id.to_le_bytes());
                        }
                    }
                    tokens_out.write(&bytes)?;
                    docs += 1;
                    offsets_out.write(&ntok.to_le_bytes())?;
                }
                Err(_) if opts.skip_bad_lines => skipped.add(no),
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
    progress.finish();
    if docs == 0 {
        bail!(
            "data file {} has no documents (it is empty{})",
            data.display(),
            if skipped.count > 0 { " after skipping bad lines" } else { "" }
        );
    }
    let info = CacheInfo {
        format: FORMAT,
        source: data.to_path_buf(),
        data_sha256: data_sha.to_string(),
        tokenizer_sha256: tok_sha.to_string(),
        width,
        documents: docs,
        tokens: ntok,
        skipped_lines: skipped.count,
        skipped_line_numbers: skipped.first,
        tokens_sha256: tokens_out.finish()?,
        offsets_sha256: offsets_out.finish()?,
    };
    crate::files::write_synced(&tmp.join("info.json"), serde_json::to_string_pretty(&info)?.as_bytes())
}

/// Tokenising progress: a bar on a terminal, else a line every `heartbeat`.
struct Progress {
    bar: indicatif::ProgressBar,
    lines: bool,
    heartbeat: Duration,
    start: Instant,
    last: Instant,
    total: u64,
    name: String,
}

impl Progress {
    fn new(data: &Path, total: u64, quiet: bool, heartbeat: Duration) -> Progress {
        let bar = if quiet || !crate::metrics::interactive() {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template("tokenising {bar:30} {bytes}/{total_bytes} ({eta})")
                .expect("valid template"),
        );
        let now = Instant::now();
        Progress {
            lines: bar.is_hidden(),
            bar,
            heartbeat,
            start: now,
            last: now,
            total,
            name: data.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string()),
        }
    }

    fn set(&mut self, done: u64) {
        self.bar.set_position(done);
        if !self.lines || self.last.elapsed() < self.heartbeat || done == 0 {
            return;
        }
        self.last = Instant::now();
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = elapsed * (self.total.saturating_sub(done)) as f64 / done as f64;
        crate::metrics::say(&format!(
            "tokenising {}: {:.0}% of {}B, elapsed {}, ETA {}",
            self.name,
            100.0 * done as f64 / self.total.max(1) as f64,
            crate::units::human(self.total as f64),
            crate::units::duration(elapsed),
            crate::units::duration(eta)
        ));
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
