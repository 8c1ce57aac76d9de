//! Finding and loading the CUDA libraries: the driver, cuBLAS, NVRTC and NCCL, on CUDA 12
//! and 13, wherever they live: `MINIMIND_CUDA_LIBS` (which replaces the search), the
//! toolkit named by `CUDA_HOME`/`CUDA_PATH`, the system loader path, `/usr/local/cuda*`, and
//! the pip layouts PyTorch installs (`site-packages/nvidia/cu13/lib`, `nvidia/cublas/lib`,
//! ...). No symlinks and no `LD_LIBRARY_PATH` are needed.
//!
//! Each library is opened by its full path, dependencies first (cuBLASLt before cuBLAS, the
//! NVRTC builtins before NVRTC), so the loader resolves them by their soname from the same
//! folder. cuBLAS, NVRTC and NCCL are then called through the handles opened here
//! (`blas`, `nvrtc`, `nccl`); the driver through cudarc, whose own lookup of
//! `libcuda.so.1` finds the library already loaded.
//!
//! The search order is a pure function ([`candidates`]) of what the environment holds
//! ([`Places`]); I/O stays in [`Places::from_env`] and [`open`].

use std::ffi::{CStr, CString, c_void};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The variable that replaces the search with its folders (`DIR[:DIR]`).
pub const LIBS_ENV: &str = "MINIMIND_CUDA_LIBS";

/// A library the CUDA engine loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lib {
    Driver,
    Cublas,
    Nvrtc,
    Nccl,
}

impl Lib {
    pub fn title(self) -> &'static str {
        match self {
            Lib::Driver => "CUDA driver",
            Lib::Cublas => "cuBLAS",
            Lib::Nvrtc => "NVRTC",
            Lib::Nccl => "NCCL",
        }
    }

    /// The file names to look for, preferred first. `cuda_major` is the newest CUDA major
    /// version the driver supports: cuBLAS 13 needs a CUDA 13 driver, so an older driver
    /// never gets it; NVRTC of either version works with any driver (it compiles for the
    /// device, the driver only loads the binary).
    pub fn names(self, cuda_major: Option<u32>) -> Vec<&'static str> {
        let newest_first = |v13: &'static str, v12: &'static str, plain: &'static str| {
            if cuda_major.is_some_and(|m| m < 13) { vec![v12, plain] } else { vec![v13, v12, plain] }
        };
        match self {
            Lib::Driver => vec!["libcuda.so.1", "libcuda.so"],
            Lib::Cublas => newest_first("libcublas.so.13", "libcublas.so.12", "libcublas.so"),
            Lib::Nvrtc => newest_first("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"),
            Lib::Nccl => vec!["libnccl.so.2", "libnccl.so"],
        }
    }

    /// What must be loaded from the same folder first, for the file `name` of this library:
    /// exact names, or (ending in `*`) the first file with that prefix.
    fn companions(self, name: &str) -> Vec<String> {
        match self {
            Lib::Cublas => vec![name.replace("libcublas", "libcublasLt")],
            Lib::Nvrtc => vec![name.replace("libnvrtc.so", "libnvrtc-builtins.so") + "*"],
            Lib::Driver | Lib::Nccl => Vec::new(),
        }
    }

    /// The one-line fix when it is missing.
    fn hint(self) -> &'static str {
        match self {
            Lib::Driver => {
                "hint: install the NVIDIA driver (a GPU machine has libcuda.so.1), or set MINIMIND_CUDA_LIBS to its folder"
            }
            Lib::Cublas => {
                "hint: pip install nvidia-cublas (CUDA 13) or nvidia-cublas-cu12 (CUDA 12), or set MINIMIND_CUDA_LIBS to the folder of libcublas.so.*"
            }
            Lib::Nvrtc => {
                "hint: pip install nvidia-cuda-nvrtc (CUDA 13) or nvidia-cuda-nvrtc-cu12 (CUDA 12), or set MINIMIND_CUDA_LIBS to the folder of libnvrtc.so.*"
            }
            Lib::Nccl => {
                "hint: pip install nvidia-nccl-cu13 or nvidia-nccl-cu12, or set MINIMIND_CUDA_LIBS to the folder of libnccl.so.2"
            }
        }
    }
}

/// Where one candidate is looked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Place {
    /// The system loader's own search (LD_LIBRARY_PATH, the ldconfig cache, /lib, /usr/lib).
    Loader,
    Dir(PathBuf),
}

/// What the environment offers the search; gathered by [`Places::from_env`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Places {
    /// `MINIMIND_CUDA_LIBS`: when set, the only folders searched.
    pub only: Option<Vec<PathBuf>>,
    /// `CUDA_HOME`, `CUDA_PATH`.
    pub cuda_home: Vec<PathBuf>,
    /// Toolkit installs: `/usr/local/cuda`, then `/usr/local/cuda-X.Y`, newest first.
    pub toolkits: Vec<PathBuf>,
    /// Python site-packages folders (virtualenv, conda, the `python3` on PATH, system ones).
    pub python_sites: Vec<PathBuf>,
}

/// The library folders of a toolkit root.
fn toolkit_dirs(root: &Path) -> Vec<PathBuf> {
    let target = if cfg!(target_arch = "aarch64") { "sbsa-linux" } else { "x86_64-linux" };
    vec![root.join("lib64"), root.join("targets").join(target).join("lib"), root.join("lib")]
}

/// The folders of a site-packages where NVIDIA's wheels put `lib`: the CUDA 13 wheels share
/// `nvidia/cu13/lib`, the CUDA 12 ones have a folder per package.
fn site_dirs(site: &Path) -> Vec<PathBuf> {
    let nvidia = site.join("nvidia");
    let mut dirs: Vec<PathBuf> =
        ["cu13", "cublas", "cuda_nvrtc", "nccl", "cu12"].iter().map(|p| nvidia.join(p).join("lib")).collect();
    dirs.push(site.join("torch").join("lib"));
    dirs
}

/// The places to look for `lib`, in order. Pure.
pub fn places(lib: Lib, p: &Places) -> Vec<Place> {
    if let Some(only) = &p.only {
        return only.iter().cloned().map(Place::Dir).collect();
    }
    let mut out: Vec<Place> = p.cuda_home.iter().flat_map(|h| toolkit_dirs(h)).map(Place::Dir).collect();
    out.push(Place::Loader);
    if lib == Lib::Driver {
        // The driver comes with the system, not with a toolkit or a wheel (WSL keeps it apart).
        for d in ["/usr/lib/wsl/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64"]
        {
            out.push(Place::Dir(PathBuf::from(d)));
        }
        return out;
    }
    out.extend(p.toolkits.iter().flat_map(|t| toolkit_dirs(t)).map(Place::Dir));
    out.extend(p.python_sites.iter().flat_map(|s| site_dirs(s)).map(Place::Dir));
    let mut seen = Vec::new();
    out.retain(|place| {
        let new = !seen.contains(place);
        seen.push(place.clone());
        new
    });
    out
}

/// One thing to try to open: a name for the loader, or a file that exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Candidate {
    Name(&'static str),
    File(PathBuf),
}

/// Every candidate for `lib`, in the order they are tried: per place, the preferred names
/// first. Files are only candidates where `exists` says so. Pure but for `exists`.
pub fn candidates(
    lib: Lib,
    p: &Places,
    cuda_major: Option<u32>,
    exists: &dyn Fn(&Path) -> bool,
) -> Vec<Candidate> {
    let names = lib.names(cuda_major);
    let mut out = Vec::new();
    for place in places(lib, p) {
        for &name in &names {
            match &place {
                Place::Loader => out.push(Candidate::Name(name)),
                Place::Dir(d) => {
                    let f = d.join(name);
                    if exists(&f) {
                        out.push(Candidate::File(f));
                    }
                }
            }
        }
    }
    out
}

impl Places {
    /// What this process's environment and file system offer.
    pub fn from_env() -> Places {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let only =
            var(LIBS_ENV).map(|v| std::env::split_paths(&v).filter(|d| !d.as_os_str().is_empty()).collect());
        let cuda_home = ["CUDA_HOME", "CUDA_PATH"].iter().filter_map(|k| var(k)).map(PathBuf::from).collect();
        let mut toolkits = vec![PathBuf::from("/usr/local/cuda")];
        let mut versioned: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir("/usr/local")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                let v = name.strip_prefix("cuda-")?;
                let key = v.split('.').map(|x| x.parse().unwrap_or(0)).collect();
                Some((key, e.path()))
            })
            .collect();
        versioned.sort_by(|a, b| b.0.cmp(&a.0));
        toolkits.extend(versioned.into_iter().map(|(_, p)| p));
        Places { only, cuda_home, toolkits, python_sites: python_sites() }
    }
}

/// Site-packages folders that may hold NVIDIA's wheels: the active virtualenv or conda
/// environment, the prefix of each `python3` on PATH (as named and with links resolved), the
/// user's and the system's.
fn python_sites() -> Vec<PathBuf> {
    let mut prefixes: Vec<PathBuf> = Vec::new();
    for k in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(k).filter(|v| !v.is_empty()) {
            prefixes.push(PathBuf::from(v));
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let py = dir.join("python3");
            if py.is_file() {
                prefixes.extend(dir.parent().map(Path::to_path_buf));
                if let Some(real) =
                    std::fs::canonicalize(&py).ok().and_then(|r| r.parent()?.parent().map(Path::to_path_buf))
                {
                    prefixes.push(real);
                }
            }
        }
    }
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(home).join(".local"));
    }
    prefixes.extend(["/usr/local", "/usr"].map(PathBuf::from));
    let mut sites = Vec::new();
    for prefix in prefixes {
        let lib = prefix.join("lib");
        let mut pythons: Vec<PathBuf> = std::fs::read_dir(&lib)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for py in pythons.into_iter().rev() {
            for sub in ["site-packages", "dist-packages"] {
                let site = py.join(sub);
                if site.is_dir() && !sites.contains(&site) {
                    sites.push(site);
                }
            }
        }
    }
    sites
}

/// A library this process has opened: its handle (never closed), file and version.
pub struct Opened {
    pub lib: Lib,
    handle: usize,
    pub path: PathBuf,
    pub version: String,
}

impl Opened {
    /// The function `symbol`, typed as `F` (an `unsafe extern "C" fn`).
    ///
    /// # Safety
    /// `F` must be the symbol's C signature.
    pub unsafe fn function<F: Copy>(&self, symbol: &str) -> Result<F, String> {
        assert_eq!(
            std::mem::size_of::<F>(),
            std::mem::size_of::<*mut c_void>(),
            "{symbol}: a function pointer"
        );
        let p = self.symbol(symbol)?;
        // SAFETY: a function's address, read as the pointer type the caller vouches for.
        Ok(unsafe { std::mem::transmute_copy::<*mut c_void, F>(&p) })
    }

    /// The address of `symbol`, or why not.
    pub fn symbol(&self, symbol: &str) -> Result<*mut c_void, String> {
        let c = CString::new(symbol).expect("symbol names have no NUL");
        // SAFETY: a live handle from dlopen; dlsym only looks the name up.
        let p = unsafe { libc::dlsym(self.handle as *mut c_void, c.as_ptr()) };
        if p.is_null() {
            Err(format!("{} ({}) has no symbol {symbol}", self.lib.title(), self.path.display()))
        } else {
            Ok(p)
        }
    }
}

/// A library that could not be opened: what was tried, and the fix.
#[derive(Clone, Debug)]
pub struct Missing {
    pub lib: Lib,
    pub names: Vec<&'static str>,
    /// The folders that exist and were looked in (the loader's own search comes first).
    pub folders: Vec<PathBuf>,
    /// Files found that failed to open, with the loader's reason.
    pub refused: Vec<(String, String)>,
    pub only: bool,
}

impl std::fmt::Display for Missing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} not found: tried {}", self.lib.title(), self.names.join(", "))?;
        if self.only {
            write!(f, " in {LIBS_ENV} only")?;
        } else {
            write!(f, " on the system loader path")?;
        }
        let folders: Vec<String> = self.folders.iter().map(|d| d.display().to_string()).collect();
        if !folders.is_empty() {
            write!(f, "\n  folders: {}", folders.join(", "))?;
        }
        for (file, why) in &self.refused {
            write!(f, "\n  {file} did not load: {why}")?;
        }
        write!(f, "\n  {}", self.lib.hint())
    }
}

/// The last dlerror, as text.
fn dl_error() -> String {
    // SAFETY: dlerror returns a NUL-terminated string owned by the loader, or null.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() { "unknown error".into() } else { CStr::from_ptr(e).to_string_lossy().into_owned() }
    }
}

/// dlopen of `what` (a loader name or a full path).
fn dlopen(what: &str) -> Result<usize, String> {
    let c = CString::new(what).map_err(|_| format!("{what}: a NUL in the name"))?;
    // SAFETY: opens a shared library; its initialisers are NVIDIA's.
    let h = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() { Err(dl_error()) } else { Ok(h as usize) }
}

/// The file a symbol of an opened library lives in (the loader's own search resolved it).
fn file_of(handle: usize, symbol: &str) -> Option<PathBuf> {
    let c = CString::new(symbol).ok()?;
    // SAFETY: dlsym/dladdr only read the loader's tables.
    unsafe {
        let p = libc::dlsym(handle as *mut c_void, c.as_ptr());
        if p.is_null() {
            return None;
        }
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(p, &mut info) == 0 || info.dli_fname.is_null() {
            return None;
        }
        Some(PathBuf::from(CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned()))
    }
}

/// A symbol every version of the library has (to find its file and prove it is the one).
fn probe_symbol(lib: Lib) -> &'static str {
    match lib {
        Lib::Driver => "cuDriverGetVersion",
        Lib::Cublas => "cublasCreate_v2",
        Lib::Nvrtc => "nvrtcVersion",
        Lib::Nccl => "ncclGetVersion",
    }
}

/// Opens the companions of `name` found in `dir` (best effort: a missing one shows up as
/// the library's own load error).
fn open_companions(lib: Lib, dir: &Path, name: &str) {
    for c in lib.companions(name) {
        let file = match c.strip_suffix('*') {
            None => Some(dir.join(&c)),
            Some(prefix) => {
                let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with(prefix)))
                    .collect();
                found.sort();
                found.pop()
            }
        };
        if let Some(f) = file.filter(|f| f.exists()) {
            let _ = dlopen(&f.to_string_lossy());
        }
    }
}

/// Opens `lib`: the first candidate that loads and has the library's symbols.
pub fn open(lib: Lib, p: &Places, cuda_major: Option<u32>) -> Result<Opened, Missing> {
    let mut refused = Vec::new();
    for c in candidates(lib, p, cuda_major, &|f| f.is_file()) {
        let (what, dir) = match &c {
            Candidate::Name(n) => (n.to_string(), None),
            Candidate::File(f) => (f.to_string_lossy().into_owned(), f.parent().map(Path::to_path_buf)),
        };
        if let Some(dir) = &dir {
            let name =
                Path::new(&what).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            open_companions(lib, dir, &name);
        }
        match dlopen(&what) {
            Ok(handle) => {
                let path = file_of(handle, probe_symbol(lib));
                let Some(path) = path else {
                    refused.push((what, format!("no symbol {}", probe_symbol(lib))));
                    continue;
                };
                let mut opened = Opened { lib, handle, path, version: String::new() };
                opened.version = version(&opened);
                return Ok(opened);
            }
            // A name the loader does not know is simply not there; a file that exists but
            // does not load is worth reporting.
            Err(why) => {
                if dir.is_some() {
                    refused.push((what, why));
                }
            }
        }
    }
    let folders = places(lib, p)
        .into_iter()
        .filter_map(|pl| match pl {
            Place::Dir(d) if d.is_dir() => Some(d),
            _ => None,
        })
        .collect();
    Err(Missing { lib, names: lib.names(cuda_major), folders, refused, only: p.only.is_some() })
}

/// The library's version, asked of itself ("?" when it does not say).
fn version(o: &Opened) -> String {
    let sym = |s: &str| o.symbol(s).ok();
    // SAFETY: each symbol is called with the signature NVIDIA's headers give it.
    unsafe {
        match o.lib {
            Lib::Driver => sym("cuDriverGetVersion")
                .map(|f| {
                    let f: unsafe extern "C" fn(*mut i32) -> i32 = std::mem::transmute(f);
                    let mut v = 0;
                    if f(&mut v) == 0 { format!("CUDA {}.{}", v / 1000, v % 1000 / 10) } else { "?".into() }
                })
                .unwrap_or_else(|| "?".into()),
            Lib::Cublas => sym("cublasGetProperty")
                .map(|f| {
                    let f: unsafe extern "C" fn(i32, *mut i32) -> i32 = std::mem::transmute(f);
                    let mut v = [0; 3];
                    let ok = (0..3).all(|i| f(i as i32, &mut v[i]) == 0);
                    if ok { format!("{}.{}.{}", v[0], v[1], v[2]) } else { "?".into() }
                })
                .unwrap_or_else(|| "?".into()),
            Lib::Nvrtc => sym("nvrtcVersion")
                .map(|f| {
                    let f: unsafe extern "C" fn(*mut i32, *mut i32) -> i32 = std::mem::transmute(f);
                    let (mut a, mut b) = (0, 0);
                    if f(&mut a, &mut b) == 0 { format!("{a}.{b}") } else { "?".into() }
                })
                .unwrap_or_else(|| "?".into()),
            Lib::Nccl => sym("ncclGetVersion")
                .map(|f| {
                    let f: unsafe extern "C" fn(*mut i32) -> i32 = std::mem::transmute(f);
                    let mut v = 0;
                    // NCCL 2.9 and later: major * 10000 + minor * 100 + patch.
                    if f(&mut v) == 0 {
                        format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
                    } else {
                        "?".into()
                    }
                })
                .unwrap_or_else(|| "?".into()),
        }
    }
}

/// The newest CUDA major version the driver supports, from its version string.
fn major_of(driver: &Opened) -> Option<u32> {
    driver.version.strip_prefix("CUDA ")?.split('.').next()?.parse().ok()
}

/// Each library, opened once per process.
fn slot(lib: Lib) -> &'static OnceLock<Result<Opened, Missing>> {
    static SLOTS: [OnceLock<Result<Opened, Missing>>; 4] =
        [OnceLock::new(), OnceLock::new(), OnceLock::new(), OnceLock::new()];
    &SLOTS[lib as usize]
}

/// `lib`, opened on first use (the driver before cuBLAS, whose version it decides).
pub fn get(lib: Lib) -> Result<&'static Opened, &'static Missing> {
    slot(lib)
        .get_or_init(|| {
            let major = match lib {
                Lib::Driver => None,
                _ => get(Lib::Driver).ok().and_then(major_of),
            };
            open(lib, &Places::from_env(), major)
        })
        .as_ref()
}

/// One line per library opened so far or now: what file, what version (selftest's report).
pub fn report(libs: &[Lib]) -> Vec<String> {
    libs.iter()
        .map(|&lib| match get(lib) {
            Ok(o) => format!("{:<11} {} ({})", o.lib.title(), o.path.display(), o.version),
            Err(m) => format!("{:<11} not found ({})", lib.title(), m.names.join(", ")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(root: &Path, rel: &str) {
        let f = root.join(rel);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"").unwrap();
    }

    #[test]
    fn cuda_library_names_follow_the_driver() {
        let table: [(Lib, Option<u32>, &[&str]); 6] = [
            (Lib::Cublas, Some(13), &["libcublas.so.13", "libcublas.so.12", "libcublas.so"]),
            (Lib::Cublas, Some(12), &["libcublas.so.12", "libcublas.so"]),
            (Lib::Cublas, None, &["libcublas.so.13", "libcublas.so.12", "libcublas.so"]),
            (Lib::Nvrtc, Some(12), &["libnvrtc.so.12", "libnvrtc.so"]),
            (Lib::Nccl, Some(13), &["libnccl.so.2", "libnccl.so"]),
            (Lib::Driver, None, &["libcuda.so.1", "libcuda.so"]),
        ];
        for (lib, major, want) in table {
            assert_eq!(lib.names(major), want, "{lib:?} with a CUDA {major:?} driver");
        }
        assert_eq!(Lib::Cublas.companions("libcublas.so.13"), ["libcublasLt.so.13"]);
        assert_eq!(Lib::Nvrtc.companions("libnvrtc.so.12"), ["libnvrtc-builtins.so.12*"]);
    }

    #[test]
    fn cuda_library_search_order() {
        // The places each library is looked in, as a table over what the environment holds.
        let p = Places {
            only: None,
            cuda_home: vec!["/opt/cuda".into()],
            toolkits: vec!["/usr/local/cuda".into(), "/usr/local/cuda-13.0".into()],
            python_sites: vec!["/venv/lib/python3.12/site-packages".into()],
        };
        let dirs = |lib: Lib, p: &Places| -> Vec<String> {
            places(lib, p)
                .into_iter()
                .map(|pl| match pl {
                    Place::Loader => "<loader>".to_string(),
                    Place::Dir(d) => d.display().to_string(),
                })
                .collect()
        };
        let cublas = dirs(Lib::Cublas, &p);
        assert_eq!(
            cublas[..5],
            [
                "/opt/cuda/lib64",
                "/opt/cuda/targets/x86_64-linux/lib",
                "/opt/cuda/lib",
                "<loader>",
                "/usr/local/cuda/lib64"
            ]
        );
        let site = "/venv/lib/python3.12/site-packages/nvidia";
        let tail: Vec<&str> = cublas[cublas.len() - 6..].iter().map(String::as_str).collect();
        let want_tail = [
            format!("{site}/cu13/lib"),
            format!("{site}/cublas/lib"),
            format!("{site}/cuda_nvrtc/lib"),
            format!("{site}/nccl/lib"),
            format!("{site}/cu12/lib"),
            "/venv/lib/python3.12/site-packages/torch/lib".to_string(),
        ];
        assert_eq!(tail, want_tail);
        assert!(
            cublas.iter().position(|d| d == "/usr/local/cuda-13.0/lib64")
                < cublas.iter().position(|d| d.starts_with("/venv"))
        );
        // The driver is the system's: no toolkit or wheel folders.
        assert!(
            dirs(Lib::Driver, &p)
                .iter()
                .all(|d| !d.starts_with("/venv") && !d.starts_with("/usr/local/cuda"))
        );
        assert!(dirs(Lib::Driver, &p).contains(&"/usr/lib/wsl/lib".to_string()));
        // MINIMIND_CUDA_LIBS replaces everything, the loader included.
        let only = Places { only: Some(vec!["/mine".into(), "/also".into()]), ..p.clone() };
        for lib in [Lib::Driver, Lib::Cublas, Lib::Nvrtc, Lib::Nccl] {
            assert_eq!(dirs(lib, &only), ["/mine", "/also"], "{lib:?}");
        }
    }

    #[test]
    fn cuda_13_pip_layout_of_empty_files_is_found() {
        // PyTorch's CUDA 13 wheels: cuBLAS and NVRTC share nvidia/cu13/lib, NCCL has its own
        // folder; a CUDA 12 toolkit also present comes later for a CUDA 13 driver.
        let tmp = tempfile::tempdir().unwrap();
        let site = tmp.path().join("venv/lib/python3.12/site-packages");
        for f in [
            "nvidia/cu13/lib/libcublas.so.13",
            "nvidia/cu13/lib/libcublasLt.so.13",
            "nvidia/cu13/lib/libnvrtc.so.13",
            "nvidia/cu13/lib/libnvrtc-builtins.so.13.0",
            "nvidia/nccl/lib/libnccl.so.2",
        ] {
            touch(&site, f);
        }
        let toolkit = tmp.path().join("cuda-12.4");
        touch(&toolkit, "lib64/libcublas.so.12");
        let p =
            Places { toolkits: vec![toolkit.clone()], python_sites: vec![site.clone()], ..Places::default() };
        let files = |lib: Lib, major: Option<u32>| -> Vec<PathBuf> {
            candidates(lib, &p, major, &|f| f.is_file())
                .into_iter()
                .filter_map(|c| match c {
                    Candidate::File(f) => Some(f),
                    Candidate::Name(_) => None,
                })
                .collect()
        };
        let lib13 = site.join("nvidia/cu13/lib");
        assert_eq!(
            files(Lib::Cublas, Some(13)),
            [toolkit.join("lib64/libcublas.so.12"), lib13.join("libcublas.so.13")]
        );
        assert_eq!(files(Lib::Nvrtc, Some(13)), [lib13.join("libnvrtc.so.13")]);
        assert_eq!(files(Lib::Nccl, Some(13)), [site.join("nvidia/nccl/lib/libnccl.so.2")]);
        // A CUDA 12 driver never gets cuBLAS 13.
        assert_eq!(files(Lib::Cublas, Some(12)), [toolkit.join("lib64/libcublas.so.12")]);
        // The loader's names come between the toolkit folders of CUDA_HOME and the others.
        let all = candidates(Lib::Nvrtc, &p, Some(13), &|f| f.is_file());
        assert_eq!(all[0], Candidate::Name("libnvrtc.so.13"));
        // An empty file is found but does not load: the report says so, with the fix.
        let only = Places { only: Some(vec![lib13.clone()]), ..Places::default() };
        let err = open(Lib::Nvrtc, &only, Some(13)).err().expect("an empty file is no library");
        let text = err.to_string();
        assert!(text.starts_with("NVRTC not found: tried libnvrtc.so.13, libnvrtc.so.12, libnvrtc.so in MINIMIND_CUDA_LIBS only"), "{text}");
        assert!(text.contains(&format!("folders: {}", lib13.display())), "{text}");
        assert!(text.contains("libnvrtc.so.13 did not load"), "{text}");
        assert!(
            text.trim_end()
                .lines()
                .last()
                .unwrap()
                .trim_start()
                .starts_with("hint: pip install nvidia-cuda-nvrtc"),
            "{text}"
        );
    }
}
