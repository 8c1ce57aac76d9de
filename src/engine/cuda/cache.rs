//! Compiled kernels cached on disk, so only the first process on a machine pays NVRTC's
//! 5-12 s. An entry is keyed by everything that changes the binary (the source, the target
//! architecture, NVRTC's version, the options), written atomically (a temporary file,
//! fsync, rename) and stamped with its SHA-256: a damaged entry is compiled again, with a
//! warning, never loaded.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::{Digest, Sha256};

/// The variable that names the cache folder.
pub const CACHE_ENV: &str = "MINIMIND_CACHE_DIR";

/// What an entry file starts with, before the payload's SHA-256 and the payload.
const MAGIC: &[u8; 8] = b"MMKBIN\x00\x01";

/// The cache folder: `MINIMIND_CACHE_DIR`, else `$XDG_CACHE_HOME/minimind`, else
/// `$HOME/.cache/minimind`; none without any of them. Pure.
pub fn dir(minimind: Option<&OsStr>, xdg: Option<&OsStr>, home: Option<&OsStr>) -> Option<PathBuf> {
    let set = |v: Option<&OsStr>| v.filter(|v| !v.is_empty()).map(PathBuf::from);
    set(minimind)
        .or_else(|| set(xdg).map(|x| x.join("minimind")))
        .or_else(|| set(home).map(|h| h.join(".cache").join("minimind")))
}

/// This process's cache folder.
pub fn dir_from_env() -> Option<PathBuf> {
    let v = |k: &str| std::env::var_os(k);
    dir(v(CACHE_ENV).as_deref(), v("XDG_CACHE_HOME").as_deref(), v("HOME").as_deref())
}

/// The file name of the entry for `source` compiled for `arch` by NVRTC `nvrtc` with
/// `options`. Pure.
pub fn entry_name(source: &str, arch: &str, nvrtc: &str, options: &[&str]) -> String {
    let mut h = Sha256::new();
    for part in [source, arch, nvrtc].into_iter().chain(options.iter().copied()) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let hex: String = h.finalize().iter().take(12).map(|b| format!("{b:02x}")).collect();
    format!("kernels-{arch}-nvrtc{nvrtc}-{hex}.bin")
}

/// Where a module came from.
#[derive(Clone, Debug, PartialEq)]
pub enum Origin {
    Cached,
    /// Compiled now, in this many seconds.
    Compiled(f64),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Cached => write!(f, "cached"),
            Origin::Compiled(s) => write!(f, "compiled in {s:.1} s"),
        }
    }
}

/// The payload of an intact entry file, or why it is not one.
fn read_entry(bytes: &[u8]) -> Result<&[u8], &'static str> {
    if bytes.len() < MAGIC.len() + 32 || &bytes[..MAGIC.len()] != MAGIC {
        return Err("not a minimind kernel cache entry");
    }
    let (sum, payload) = bytes[MAGIC.len()..].split_at(32);
    if Sha256::digest(payload).as_slice() != sum {
        return Err("its checksum does not match");
    }
    Ok(payload)
}

/// Writes `payload` as entry `path`, atomically.
fn write_entry(path: &Path, payload: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(OsStr::to_str).unwrap_or("entry"),
        std::process::id()
    ));
    let mut f = std::fs::File::create(&tmp)?;
    let written = f
        .write_all(MAGIC)
        .and_then(|()| f.write_all(&Sha256::digest(payload)))
        .and_then(|()| f.write_all(payload))
        .and_then(|()| f.sync_all())
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The entry `name` from the cache folder `dir`, or `compile`d now and stored. A damaged
/// entry, or a folder that cannot be written, is a warning (through `warn`), not an error:
/// the module is compiled instead.
pub fn fetch(
    dir: Option<&Path>,
    name: &str,
    compile: impl FnOnce() -> Result<Vec<u8>, String>,
    warn: &mut dyn FnMut(String),
) -> Result<(Vec<u8>, Origin), String> {
    let path = dir.map(|d| d.join(name));
    if let Some(p) = &path
        && let Ok(bytes) = std::fs::read(p)
    {
        match read_entry(&bytes) {
            Ok(payload) => return Ok((payload.to_vec(), Origin::Cached)),
            Err(why) => warn(format!(
                "the compiled-kernel cache entry {} is damaged ({why}); compiling again",
                p.display()
            )),
        }
    }
    let start = Instant::now();
    let payload = compile()?;
    let seconds = start.elapsed().as_secs_f64();
    if let Some(p) = &path
        && let Err(e) = write_entry(p, &payload)
    {
        warn(format!(
            "cannot write the compiled-kernel cache entry {}: {e} (set {CACHE_ENV} to a writable folder)",
            p.display()
        ));
    }
    Ok((payload, Origin::Compiled(seconds)))
}

/// Removes entry `name` (it was intact but the driver refused it: compile it again).
pub fn discard(dir: Option<&Path>, name: &str) {
    if let Some(d) = dir {
        let _ = std::fs::remove_file(d.join(name));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_cache_folder_table() {
        fn s(x: &str) -> Option<&OsStr> {
            Some(OsStr::new(x))
        }
        let table = [
            ((s("/c"), s("/x"), s("/h")), Some("/c")),
            ((None, s("/x"), s("/h")), Some("/x/minimind")),
            ((s(""), None, s("/h")), Some("/h/.cache/minimind")),
            ((None, s(""), None), None),
        ];
        for ((m, x, h), want) in table {
            assert_eq!(dir(m, x, h), want.map(PathBuf::from), "{m:?} {x:?} {h:?}");
        }
    }

    #[test]
    fn cuda_cache_key_changes_with_every_input() {
        let base = entry_name("src", "sm_90", "12.9", &["--std=c++17"]);
        assert!(base.starts_with("kernels-sm_90-nvrtc12.9-") && base.ends_with(".bin"), "{base}");
        assert_eq!(
            base,
            entry_name("src", "sm_90", "12.9", &["--std=c++17"]),
            "the same inputs, the same entry"
        );
        let others = [
            entry_name("src ", "sm_90", "12.9", &["--std=c++17"]),
            entry_name("src", "sm_80", "12.9", &["--std=c++17"]),
            entry_name("src", "sm_90", "13.0", &["--std=c++17"]),
            entry_name("src", "sm_90", "12.9", &["--std=c++20"]),
            entry_name("src", "sm_90", "12.9", &[]),
            // Parts are length-prefixed: moving a boundary is another key.
            entry_name("sr", "csm_90", "12.9", &["--std=c++17"]),
        ];
        for o in &others {
            assert_ne!(o, &base);
        }
    }

    #[test]
    fn cuda_cache_compiles_once_then_reads_and_recompiles_a_damaged_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        let name = entry_name("src", "sm_90", "12.9", &[]);
        let mut compiles = 0;
        let mut warnings = Vec::new();
        let get = |compiles: &mut usize, warnings: &mut Vec<String>| {
            fetch(
                Some(&dir),
                &name,
                || {
                    *compiles += 1;
                    Ok(b"CUBIN".to_vec())
                },
                &mut |w| warnings.push(w),
            )
            .unwrap()
        };
        let (bytes, origin) = get(&mut compiles, &mut warnings);
        assert_eq!((bytes.as_slice(), compiles), (&b"CUBIN"[..], 1));
        assert!(matches!(origin, Origin::Compiled(_)));
        let (bytes, origin) = get(&mut compiles, &mut warnings);
        assert_eq!((bytes.as_slice(), origin, compiles), (&b"CUBIN"[..], Origin::Cached, 1));
        assert!(warnings.is_empty(), "{warnings:?}");

        // One flipped byte of the payload: recompiled, with a warning naming the file, and
        // rewritten intact.
        let file = dir.join(&name);
        let mut raw = std::fs::read(&file).unwrap();
        *raw.last_mut().unwrap() ^= 1;
        std::fs::write(&file, &raw).unwrap();
        let (bytes, origin) = get(&mut compiles, &mut warnings);
        assert_eq!((bytes.as_slice(), compiles), (&b"CUBIN"[..], 2));
        assert!(matches!(origin, Origin::Compiled(_)));
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("is damaged (its checksum does not match)") && warnings[0].contains(&name),
            "{warnings:?}"
        );
        // A truncated entry too.
        std::fs::write(&file, &raw[..10]).unwrap();
        get(&mut compiles, &mut warnings);
        assert_eq!(compiles, 3);
        assert!(warnings[1].contains("not a minimind kernel cache entry"), "{warnings:?}");
        assert_eq!(get(&mut compiles, &mut warnings).1, Origin::Cached);
        // No temporary file is left behind.
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from(&name)]);
    }

    #[test]
    fn cuda_cache_in_a_folder_that_cannot_be_written_still_compiles() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("a-file");
        std::fs::write(&file, b"").unwrap();
        let mut warnings = Vec::new();
        let (bytes, _) =
            fetch(Some(&file.join("below")), "entry", || Ok(b"X".to_vec()), &mut |w| warnings.push(w))
                .unwrap();
        assert_eq!(bytes, b"X");
        assert!(warnings.len() == 1 && warnings[0].contains("cannot write"), "{warnings:?}");
        let err = fetch(None, "entry", || Err("no NVRTC".into()), &mut |_| {}).unwrap_err();
        assert_eq!(err, "no NVRTC");
    }
}
