//! The token cache: the data's shards (see `source`) tokenised once into `tokens.bin` (u16
//! when the vocabulary fits, else u32) and `offsets.bin` (u64 document starts), memory-mapped.
//!
//! Built streaming (a bounded chunk of documents at a time, tokenised in parallel, shards in
//! parallel too), so corpora larger than RAM work; keyed by the shards' content hashes (with
//! their names and sizes when there are several), the tokenizer's hash and the encoding
//! settings. `info.json` is its header: format version, counts and the SHA-256 of both files,
//! all checked on every open, so a damaged or truncated cache is rebuilt, never trained on.
//! One process builds a given cache (the others wait on its lock). Each shard is tokenised
//! into `.partial-<cache>/` and marked done, so a stopped build continues from the shards it
//! finished; the shards are then joined, in path order, in a temporary folder renamed into
//! place (removed on failure or signal, cleared at the next start when its builder died).

use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::jsonl::Skipped;
use super::mapped::Mapped;
use super::source::{self, Doc};
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
    /// The first few skipped lines (1-based, within their shard).
    pub skipped_line_numbers: Vec<u64>,
    /// The first few skipped rows as `shard:row: why`.
    #[serde(default)]
    pub skipped_rows: Vec<String>,
    /// The shards, in the order their documents are: name, bytes and SHA-256.
    #[serde(default)]
    pub shards: Vec<Shard>,
    /// SHA-256 of tokens.bin and offsets.bin.
    pub tokens_sha256: String,
    pub offsets_sha256: String,
}

/// One shard of the data as the cache key saw it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Shard {
    pub path: PathBuf,
    pub bytes: u64,
    pub sha256: String,
}

/// A memory-mapped token cache, checked against its header when opened.
pub struct TokenCache {
    pub info: CacheInfo,
    tokens: Option<Mapped>,
    offsets: Mapped,
}

impl TokenCache {
    pub fn documents(&self) -> usize {
        self.info.documents as usize
    }

    /// Token index where document `i` starts (`i == documents()` gives the total).
    pub fn offset(&self, i: usize) -> usize {
        u64::from_le_bytes(self.offsets[i * 8..i * 8 + 8].try_into().expect("8 bytes")) as usize
    }

    /// Every document's length in tokens.
    pub fn lengths(&self) -> Vec<u64> {
        (0..self.documents()).map(|i| (self.offset(i + 1) - self.offset(i)) as u64).collect()
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

/// Bytes per token id in the cache: 16 bits while every id the tokenizer can emit fits.
fn token_width(id_limit: usize) -> usize {
    if id_limit <= 1 << 16 { 2 } else { 4 }
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
    /// The field (JSON lines) or column (Parquet) holding each document's text.
    pub text_field: &'a str,
    pub skip_bad_lines: bool,
    /// Tokeniser threads (0: all cores).
    pub threads: usize,
    /// No progress bar; plain progress lines every `heartbeat` instead.
    pub quiet: bool,
    pub heartbeat: Duration,
    pub stop: &'a Stop,
    /// Testing aid: stop as if interrupted once this many shards are tokenised.
    pub stop_after_shards: Option<usize>,
}

/// A cache ready to use, and what happened on the way (rebuilds, waits) for the run log.
pub struct Opened {
    pub cache: TokenCache,
    pub notes: Vec<String>,
}

/// Opens the cache for `data` (a file, a folder or a glob of shards) under `opts.root`,
/// building it first when missing or damaged.
pub fn open_or_build(data: &Path, tok_path: &Path, tok: &Tok, opts: &CacheOptions<'_>) -> Result<Opened> {
    let root = opts.root;
    fs::create_dir_all(root).with_context(|| format!("cannot create cache folder {}", root.display()))?;
    let mut notes = Vec::new();
    remove_dead_builds(root, None);
    let shards = hash_shards(&source::shards(data)?, opts)?;
    let data_sha = data_hash(&shards);
    let tok_sha = sha256_file(tok_path, opts.stop)?;
    let key = {
        let mut h = Sha256::new();
        // The field enters the key only when it is not the default (older caches stay valid).
        let field =
            if opts.text_field == "text" { String::new() } else { format!("|field={}", opts.text_field) };
        h.update(format!("{FORMAT}|{data_sha}|{tok_sha}|skip={}{field}", opts.skip_bad_lines));
        hex(&h.finalize())
    };
    let name = format!("tokens-{}", &key[..16]);
    let dir = root.join(&name);
    let vocab = tok.id_limit;
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
                lock_holder(&lock_path).unwrap_or_else(|| "?".into()),
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
    let header = Header { source: data.to_path_buf(), data_sha, tok_sha, shards };
    build(&header, tok, opts, &dir)?;
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
    let mut map =
        |name: &str, want_len: u64, want_sha: &str| -> std::result::Result<Option<Mapped>, String> {
            let path = dir.join(name);
            let f = File::open(&path).map_err(|e| format!("{name}: {e}"))?;
            let len = f.metadata().map_err(|e| format!("{name}: {e}"))?.len();
            if len != want_len {
                return Err(format!("{name} has {len} bytes where its header says {want_len}: truncated?"));
            }
            let bytes = if len == 0 {
                None
            } else {
                // The checksum below is taken over this very mapping; a truncation under a live
                // run is caught (see `mapped`).
                Some(super::mapped::map(&f, &path).map_err(|e| format!("{name}: {e}"))?)
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

/// What a cache is made of, for its header.
struct Header {
    source: PathBuf,
    data_sha: String,
    tok_sha: String,
    shards: Vec<Shard>,
}

/// Each shard's size and SHA-256, hashed in parallel; a stop request interrupts it.
fn hash_shards(paths: &[PathBuf], opts: &CacheOptions<'_>) -> Result<Vec<Shard>> {
    let pool = crate::threads::pool(opts.threads)?;
    pool.install(|| {
        paths
            .par_iter()
            .map(|p| {
                let bytes = fs::metadata(p).with_context(|| format!("reading {}", p.display()))?.len();
                Ok(Shard { path: p.clone(), bytes, sha256: sha256_file(p, opts.stop)? })
            })
            .collect()
    })
}

/// The data's content hash: one shard's own (as for a single file before shards existed), else
/// the hash of every shard's name, size and hash in order, so a shard added, removed, renamed
/// or changed is a data change. Pure.
fn data_hash(shards: &[Shard]) -> String {
    if let [one] = shards {
        return one.sha256.clone();
    }
    let mut h = Sha256::new();
    for s in shards {
        let name = s.path.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string());
        h.update(format!("{name} {} {}\n", s.bytes, s.sha256));
    }
    hex(&h.finalize())
}

/// A shard tokenised into `.partial-<cache>/`: what its marker records.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
struct ShardDone {
    sha256: String,
    documents: u64,
    tokens: u64,
    skipped: u64,
    skipped_first: Vec<u64>,
    skipped_rows: Vec<String>,
}

/// Tokenises every shard not yet done into `.partial-<name>/`, then joins them into the cache
/// `dir` through a temporary folder.
fn build(h: &Header, tok: &Tok, opts: &CacheOptions<'_>, dir: &Path) -> Result<()> {
    let parent = dir.parent().expect("cache dir has a parent");
    let name = dir.file_name().and_then(|n| n.to_str()).unwrap_or("x");
    let partial = parent.join(format!(".partial-{name}"));
    fs::create_dir_all(&partial).with_context(|| format!("creating {}", partial.display()))?;
    let width = token_width(tok.id_limit);
    tokenise_shards(h, tok, opts, &partial, width)?;
    let tmp = parent.join(format!(".building-{}-{name}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = join_shards(h, opts, &partial, &tmp, width).and_then(|()| {
        fs::rename(&tmp, dir).with_context(|| format!("moving the token cache into {}", dir.display()))
    });
    match result {
        Ok(()) => {
            let _ = fs::remove_dir_all(&partial);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}

fn shard_file(partial: &Path, i: usize, ext: &str) -> PathBuf {
    partial.join(format!("shard-{i:06}.{ext}"))
}

/// Each shard whose marker is missing (or for other bytes), tokenised in parallel with the
/// others; a stop request leaves the finished ones for the next build.
fn tokenise_shards(
    h: &Header,
    tok: &Tok,
    opts: &CacheOptions<'_>,
    partial: &Path,
    width: usize,
) -> Result<()> {
    let total: u64 = h.shards.iter().map(|s| s.bytes).sum();
    let progress = Progress::new(&h.source, total, h.shards.len(), opts.quiet, opts.heartbeat);
    let pool = crate::threads::pool(opts.threads)?;
    let reused = (0..h.shards.len())
        .filter(|&i| read_done(partial, i).is_some_and(|d| d.sha256 == h.shards[i].sha256))
        .count();
    if reused > 0 {
        crate::metrics::say(&format!(
            "{reused} of {} shard(s) already tokenised by an earlier build; continuing with the rest",
            h.shards.len()
        ));
    }
    pool.install(|| {
        h.shards.par_iter().enumerate().try_for_each(|(i, shard)| -> Result<()> {
            if let Some(done) = read_done(partial, i).filter(|d| d.sha256 == shard.sha256) {
                progress.advance(shard.bytes, done.documents, done.tokens);
                progress.shard_done();
                return Ok(());
            }
            tokenise_shard((i, shard), tok, opts, partial, (width, &progress))?;
            if progress.shard_done() >= opts.stop_after_shards.unwrap_or(usize::MAX) {
                opts.stop.request(libc::SIGINT);
            }
            Ok(())
        })
    })?;
    progress.finish();
    Ok(())
}

fn read_done(partial: &Path, i: usize) -> Option<ShardDone> {
    serde_json::from_slice(&fs::read(shard_file(partial, i, "json")).ok()?).ok()
}

/// Shard `i`: its documents' tokens (`.tokens`, `width` bytes each) and lengths (`.lens`, u64
/// each), then its marker (`.json`), written last.
fn tokenise_shard(
    (i, shard): (usize, &Shard),
    tok: &Tok,
    opts: &CacheOptions<'_>,
    partial: &Path,
    (width, progress): (usize, &Progress),
) -> Result<()> {
    let mut reader = source::open(&shard.path, opts.text_field)?;
    let mut tokens_out = Hashed::create(shard_file(partial, i, "tokens"))?;
    let mut lens_out = Hashed::create(shard_file(partial, i, "lens"))?;
    let mut done = ShardDone { sha256: shard.sha256.clone(), ..ShardDone::default() };
    let mut skipped = Skipped::default();
    let what = if source::Format::of(&shard.path) == source::Format::Parquet { "row" } else { "line" };
    let (mut chunk, mut bytes, mut read) = (Vec::<Doc>::with_capacity(LINES_PER_CHUNK), Vec::new(), 0);
    loop {
        opts.stop.check()?;
        chunk.clear();
        let more = reader.fill(&mut chunk, LINES_PER_CHUNK, BYTES_PER_CHUNK)?;
        let encoded: Vec<(u64, std::result::Result<Vec<u32>, String>)> = chunk
            .par_iter()
            .map(|(no, text)| (*no, text.clone().and_then(|t| tok.encode(&t).map_err(|e| e.to_string()))))
            .collect();
        let (docs_before, tokens_before) = (done.documents, done.tokens);
        for (no, r) in encoded {
            match r {
                Ok(ids) => {
                    bytes.clear();
                    for id in &ids {
                        if width == 2 {
                            bytes.extend_from_slice(&(*id as u16).to_le_bytes());
                        } else {
                            bytes.extend_from_slice(&id.to_le_bytes());
                        }
                    }
                    tokens_out.write(&bytes)?;
                    lens_out.write(&(ids.len() as u64).to_le_bytes())?;
                    done.documents += 1;
                    done.tokens += ids.len() as u64;
                }
                Err(why) if opts.skip_bad_lines => {
                    skipped.add(no);
                    if done.skipped_rows.len() < super::jsonl::FIRST_SKIPPED {
                        done.skipped_rows.push(format!("{}:{no}: {why}", shard.path.display()));
                    }
                }
                Err(why) => bail!(
                    "{}:{no}: malformed {what}: {why}\n  hint: fix the {what}, or set data.skip_bad_lines = true to skip and count such {what}s",
                    shard.path.display()
                ),
            }
        }
        let now = reader.bytes_read();
        progress.advance(now - read, done.documents - docs_before, done.tokens - tokens_before);
        read = now;
        if !more {
            break;
        }
    }
    progress.advance(shard.bytes.saturating_sub(read), 0, 0);
    tokens_out.finish()?;
    lens_out.finish()?;
    (done.skipped, done.skipped_first) = (skipped.count, skipped.first);
    crate::files::write_synced(&shard_file(partial, i, "json"), &serde_json::to_vec(&done)?)
}

/// The shards' tokens and lengths joined, in shard order, into tokens.bin, offsets.bin and
/// info.json in `tmp`.
fn join_shards(h: &Header, opts: &CacheOptions<'_>, partial: &Path, tmp: &Path, width: usize) -> Result<()> {
    let mut tokens_out = Hashed::create(tmp.join("tokens.bin"))?;
    let mut offsets_out = Hashed::create(tmp.join("offsets.bin"))?;
    offsets_out.write(&0u64.to_le_bytes())?;
    let (mut docs, mut total) = (0u64, 0u64);
    let mut skipped = Skipped::default();
    let mut skipped_rows = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    for i in 0..h.shards.len() {
        let done =
            read_done(partial, i).with_context(|| format!("shard {i} of the token cache is not done"))?;
        let mut tokens = File::open(shard_file(partial, i, "tokens"))?;
        loop {
            opts.stop.check()?;
            let n = tokens.read(&mut buf)?;
            if n == 0 {
                break;
            }
            tokens_out.write(&buf[..n])?;
        }
        let lens = fs::read(shard_file(partial, i, "lens"))?;
        for len in lens.chunks_exact(8) {
            total += u64::from_le_bytes(len.try_into().expect("8 bytes"));
            offsets_out.write(&total.to_le_bytes())?;
        }
        docs += done.documents;
        skipped.count += done.skipped;
        for row in done.skipped_first {
            if skipped.first.len() < super::jsonl::FIRST_SKIPPED {
                skipped.first.push(row);
            }
        }
        skipped_rows.extend(done.skipped_rows);
    }
    skipped_rows.truncate(super::jsonl::FIRST_SKIPPED);
    if docs == 0 {
        bail!(
            "data file {} has no documents (it is empty{})",
            h.source.display(),
            if skipped.count > 0 { " after skipping bad lines" } else { "" }
        );
    }
    let info = CacheInfo {
        format: FORMAT,
        source: h.source.clone(),
        data_sha256: h.data_sha.clone(),
        tokenizer_sha256: h.tok_sha.clone(),
        width,
        documents: docs,
        tokens: total,
        skipped_lines: skipped.count,
        skipped_line_numbers: skipped.first,
        skipped_rows,
        shards: h.shards.clone(),
        tokens_sha256: tokens_out.finish()?,
        offsets_sha256: offsets_out.finish()?,
    };
    crate::files::write_synced(&tmp.join("info.json"), serde_json::to_string_pretty(&info)?.as_bytes())
}

/// Tokenising progress, shared by the shards in flight: a bar on a terminal, else a line every
/// `heartbeat` with shards, documents, tokens, MB/s and the ETA.
struct Progress {
    bar: indicatif::ProgressBar,
    lines: bool,
    heartbeat: Duration,
    start: Instant,
    total: u64,
    shards: usize,
    name: String,
    /// Bytes, documents, tokens, shards done, and when the last line was printed.
    done: std::sync::Mutex<(u64, u64, u64, usize, Instant)>,
}

impl Progress {
    fn new(data: &Path, total: u64, shards: usize, quiet: bool, heartbeat: Duration) -> Progress {
        let bar = if quiet || !crate::metrics::interactive() {
            indicatif::ProgressBar::hidden()
        } else {
            indicatif::ProgressBar::new(total)
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "tokenising {bar:30} {bytes}/{total_bytes} {msg} ({eta})",
            )
            .expect("valid template"),
        );
        let now = Instant::now();
        Progress {
            lines: bar.is_hidden(),
            bar,
            heartbeat,
            start: now,
            total,
            shards,
            name: data.file_name().map_or_else(String::new, |n| n.to_string_lossy().to_string()),
            done: std::sync::Mutex::new((0, 0, 0, 0, now)),
        }
    }

    fn advance(&self, bytes: u64, docs: u64, tokens: u64) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        (d.0, d.1, d.2) = (d.0 + bytes, d.1 + docs, d.2 + tokens);
        self.bar.set_position(d.0);
        self.bar.set_message(format!("{} docs", crate::units::human(d.1 as f64)));
        if !self.lines || d.4.elapsed() < self.heartbeat || d.0 == 0 {
            return;
        }
        d.4 = Instant::now();
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = elapsed * (self.total.saturating_sub(d.0)) as f64 / d.0 as f64;
        crate::metrics::say(&format!(
            "tokenising {}: {:.0}% of {}B, {}/{} shards, {} documents, {} tokens, {:.1} MB/s, elapsed {}, ETA {}",
            self.name,
            100.0 * d.0 as f64 / self.total.max(1) as f64,
            crate::units::human(self.total as f64),
            d.3,
            self.shards,
            crate::units::human(d.1 as f64),
            crate::units::human(d.2 as f64),
            d.0 as f64 / 1e6 / elapsed.max(1e-9),
            crate::units::duration(elapsed),
            crate::units::duration(eta)
        ));
    }

    /// Counts a finished shard; returns how many are.
    fn shard_done(&self) -> usize {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        d.3 += 1;
        d.3
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_width_follows_the_largest_id() {
        // id_limit is one past the largest id: 65536 ids (0..=65535) still fit 16 bits.
        for (limit, width) in [(6400, 2), (65535, 2), (65536, 2), (65537, 4), (151_936, 4)] {
            assert_eq!(token_width(limit), width, "ids below {limit}");
        }
    }

    fn shard(name: &str, bytes: u64, sha: &str) -> Shard {
        Shard { path: PathBuf::from("/d").join(name), bytes, sha256: sha.into() }
    }

    #[test]
    fn the_data_hash_covers_every_shard() {
        let one = [shard("a.jsonl", 10, "aa")];
        assert_eq!(data_hash(&one), "aa", "one file: its own hash, as before shards");
        let two = [shard("a.jsonl", 10, "aa"), shard("b.jsonl", 20, "bb")];
        let base = data_hash(&two);
        let changed = [
            vec![shard("a.jsonl", 10, "aa"), shard("b.jsonl", 20, "bc")],
            vec![shard("a.jsonl", 10, "aa"), shard("c.jsonl", 20, "bb")],
            vec![shard("a.jsonl", 10, "aa"), shard("b.jsonl", 21, "bb")],
            vec![shard("b.jsonl", 20, "bb"), shard("a.jsonl", 10, "aa")],
            vec![shard("a.jsonl", 10, "aa"), shard("b.jsonl", 20, "bb"), shard("c.jsonl", 1, "cc")],
        ];
        for c in changed {
            assert_ne!(data_hash(&c), base, "{c:?}");
        }
        let moved = [shard("a.jsonl", 10, "aa"), shard("b.jsonl", 20, "bb")].map(|mut s| {
            s.path = PathBuf::from("/elsewhere").join(s.path.file_name().unwrap());
            s
        });
        assert_eq!(data_hash(&moved), base, "the same shards in another folder");
    }
}
