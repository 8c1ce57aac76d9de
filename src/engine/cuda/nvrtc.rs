//! NVRTC, called through the library [`super::libs`] opened (CUDA 12 or 13): `kernels.cu`
//! compiled for the device's exact architecture into a CUBIN, which the driver loads as it
//! is (no JIT, so an NVRTC newer than the driver works too). Only a device newer than every
//! architecture NVRTC knows gets PTX for the newest one, for the driver to finish.

use std::ffi::{CStr, CString, c_char, c_int, c_void};

use super::libs::{self, Lib};

type Program = *mut c_void;
type Status = c_int;

struct Api {
    version: unsafe extern "C" fn(*mut c_int, *mut c_int) -> Status,
    create: unsafe extern "C" fn(
        *mut Program,
        *const c_char,
        *const c_char,
        c_int,
        *const *const c_char,
        *const *const c_char,
    ) -> Status,
    compile: unsafe extern "C" fn(Program, c_int, *const *const c_char) -> Status,
    log_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    log: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    cubin_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    cubin: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    ptx_size: unsafe extern "C" fn(Program, *mut usize) -> Status,
    ptx: unsafe extern "C" fn(Program, *mut c_char) -> Status,
    destroy: unsafe extern "C" fn(*mut Program) -> Status,
    error_string: unsafe extern "C" fn(Status) -> *const c_char,
    num_archs: unsafe extern "C" fn(*mut c_int) -> Status,
    archs: unsafe extern "C" fn(*mut c_int) -> Status,
}

fn api() -> Result<&'static Api, String> {
    static API: std::sync::OnceLock<Result<Api, String>> = std::sync::OnceLock::new();
    API.get_or_init(|| {
        let lib = libs::get(Lib::Nvrtc).map_err(|m| m.to_string())?;
        // SAFETY: each symbol has the signature nvrtc.h gives it.
        unsafe {
            Ok(Api {
                version: lib.function("nvrtcVersion")?,
                create: lib.function("nvrtcCreateProgram")?,
                compile: lib.function("nvrtcCompileProgram")?,
                log_size: lib.function("nvrtcGetProgramLogSize")?,
                log: lib.function("nvrtcGetProgramLog")?,
                cubin_size: lib.function("nvrtcGetCUBINSize")?,
                cubin: lib.function("nvrtcGetCUBIN")?,
                ptx_size: lib.function("nvrtcGetPTXSize")?,
                ptx: lib.function("nvrtcGetPTX")?,
                destroy: lib.function("nvrtcDestroyProgram")?,
                error_string: lib.function("nvrtcGetErrorString")?,
                num_archs: lib.function("nvrtcGetNumSupportedArchs")?,
                archs: lib.function("nvrtcGetSupportedArchs")?,
            })
        }
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn check(api: &Api, what: &str, s: Status) -> Result<(), String> {
    if s == 0 {
        return Ok(());
    }
    // SAFETY: NVRTC returns a static NUL-terminated string.
    let name = unsafe { CStr::from_ptr((api.error_string)(s)) }.to_string_lossy().into_owned();
    Err(format!("{what}: {name}"))
}

/// NVRTC's version, "12.9".
pub fn version() -> Result<String, String> {
    let api = api()?;
    let (mut a, mut b) = (0, 0);
    // SAFETY: writes two ints.
    check(api, "nvrtcVersion", unsafe { (api.version)(&mut a, &mut b) })?;
    Ok(format!("{a}.{b}"))
}

/// The real architectures NVRTC compiles for (80 for sm_80, ...).
pub fn supported_archs() -> Result<Vec<i32>, String> {
    let api = api()?;
    let mut n = 0;
    // SAFETY: the count, then an array of that many ints.
    unsafe {
        check(api, "nvrtcGetNumSupportedArchs", (api.num_archs)(&mut n))?;
        let mut v = vec![0; n.max(0) as usize];
        check(api, "nvrtcGetSupportedArchs", (api.archs)(v.as_mut_ptr()))?;
        Ok(v)
    }
}

/// What the driver loads: a CUBIN for one architecture, or PTX it compiles itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    Cubin,
    Ptx,
}

/// A compiled program and NVRTC's log (ptxas's report with `--ptxas-options=-v`).
pub struct Compiled {
    pub image: Image,
    /// The CUBIN, or the PTX with its NUL.
    pub bytes: Vec<u8>,
    pub log: String,
}

/// The target for a device of compute capability `cc` (90 for 9.0): its own architecture
/// when NVRTC knows it, else PTX of the newest one NVRTC knows below it. Pure.
pub fn target(cc: i32, supported: &[i32]) -> Option<(String, Image)> {
    if supported.contains(&cc) {
        return Some((format!("sm_{cc}"), Image::Cubin));
    }
    let below = supported.iter().copied().filter(|&a| a <= cc).max()?;
    Some((format!("compute_{below}"), Image::Ptx))
}

/// Compiles `source` for `arch` (`sm_90` gives a CUBIN, `compute_90` PTX) with `options`
/// beyond the architecture. The error carries NVRTC's log.
pub fn compile(source: &str, arch: &str, options: &[&str]) -> Result<Compiled, String> {
    let api = api()?;
    let src = CString::new(source).map_err(|_| "the kernel source has a NUL".to_string())?;
    let name = CString::new("kernels.cu").expect("no NUL");
    let mut opts: Vec<CString> = vec![CString::new(format!("--gpu-architecture={arch}")).expect("no NUL")];
    opts.extend(options.iter().map(|o| CString::new(*o).expect("options have no NUL")));
    let ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let image = if arch.starts_with("sm_") { Image::Cubin } else { Image::Ptx };
    let mut prog: Program = std::ptr::null_mut();
    // SAFETY: one program, created, compiled, read and destroyed here; the strings outlive it.
    unsafe {
        check(
            api,
            "nvrtcCreateProgram",
            (api.create)(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()),
        )?;
        let compiled = (api.compile)(prog, ptrs.len() as c_int, ptrs.as_ptr());
        let mut n = 0usize;
        let mut log = String::new();
        if (api.log_size)(prog, &mut n) == 0 && n > 1 {
            let mut buf = vec![0u8; n];
            if (api.log)(prog, buf.as_mut_ptr() as *mut c_char) == 0 {
                log = String::from_utf8_lossy(&buf[..n - 1]).into_owned();
            }
        }
        let out = check(api, "nvrtcCompileProgram", compiled)
            .map_err(|e| format!("{e}; NVRTC says:\n{log}"))
            .and_then(|()| {
                let (size, get) = match image {
                    Image::Cubin => (api.cubin_size, api.cubin),
                    Image::Ptx => (api.ptx_size, api.ptx),
                };
                let mut n = 0usize;
                check(api, "reading the compiled size", size(prog, &mut n))?;
                let mut bytes = vec![0u8; n];
                check(api, "reading the compiled program", get(prog, bytes.as_mut_ptr() as *mut c_char))?;
                Ok(Compiled { image, bytes, log })
            });
        let _ = (api.destroy)(&mut prog);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuda_target_is_the_device_architecture_or_ptx_below_it() {
        let known = [75, 80, 86, 89, 90, 100, 120];
        let table = [
            (90, Some(("sm_90", Image::Cubin))),
            (80, Some(("sm_80", Image::Cubin))),
            // A device newer than NVRTC: PTX of the newest architecture below it.
            (121, Some(("compute_120", Image::Ptx))),
            (87, Some(("compute_86", Image::Ptx))),
            // Older than anything NVRTC builds for.
            (70, None),
        ];
        for (cc, want) in table {
            let got = target(cc, &known);
            assert_eq!(got.as_ref().map(|(a, i)| (a.as_str(), *i)), want, "compute capability {cc}");
        }
    }
}
