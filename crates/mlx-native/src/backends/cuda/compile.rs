//! NVRTC compilation of the kernel sources to CUBIN for the device's own architecture.
//! Compiled modules are cached in memory (once per source and architecture per process) and on
//! disk under `$XDG_CACHE_HOME/mlx-native/cuda` (or `~/.cache/mlx-native/cuda`), keyed by a
//! hash of the source text, the options and the NVRTC version, so a second start compiles
//! nothing.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use crate::{Error, Result};

/// One NVRTC program: shared header text followed by one kernel family's source.
pub(crate) struct Source {
    pub name: &'static str,
    pub parts: &'static [&'static str],
}

/// The first bytes of every CUBIN (an ELF image).
const ELF_MAGIC: &[u8] = b"\x7fELF";

/// Options besides the architecture. No fast-math: results are compared with the CPU backend.
const OPTIONS: &[&str] = &["-std=c++17"];

/// NVRTC options for compute capability `arch`, with any extra ones from
/// `MLXN_NVRTC_OPTIONS` (e.g. `-D` switches of a kernel variant under measurement).
fn options(arch: u32) -> Vec<String> {
    let mut options: Vec<String> = OPTIONS.iter().map(|o| o.to_string()).collect();
    options.push(format!("--gpu-architecture=sm_{arch}"));
    if let Ok(extra) = std::env::var("MLXN_NVRTC_OPTIONS") {
        options.extend(extra.split_whitespace().map(str::to_string));
    }
    options
}

/// The CUBIN of `source` for compute capability `arch` (e.g. 90 for 9.0).
pub(crate) fn cubin(source: &Source, arch: u32) -> Result<Arc<Vec<u8>>> {
    /// One slot per (source, architecture): different sources compile in parallel, a source
    /// asked for twice at once compiles once.
    type Slot = Arc<Mutex<Option<Arc<Vec<u8>>>>>;
    static COMPILED: OnceLock<Mutex<HashMap<(&'static str, u32), Slot>>> = OnceLock::new();
    let slot = COMPILED
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| poisoned())?
        .entry((source.name, arch))
        .or_default()
        .clone();
    let mut slot = slot.lock().map_err(|_| poisoned())?;
    if let Some(bytes) = &*slot {
        return Ok(bytes.clone());
    }
    let text = source.parts.concat();
    let options = options(arch);
    let (major, minor) = nvrtc_version()?;
    let key = fnv1a(&[
        text.as_bytes(),
        options.join(" ").as_bytes(),
        format!("nvrtc {major}.{minor}").as_bytes(),
    ]);
    let path =
        cache_dir().map(|dir| dir.join(format!("{}-sm{arch}-{key:016x}.cubin", source.name)));
    // A cached file that is not an ELF image (damaged) is compiled again and replaced.
    let cached = path.as_ref().and_then(|p| std::fs::read(p).ok());
    let bytes = match cached.filter(|b| b.starts_with(ELF_MAGIC)) {
        Some(bytes) => bytes,
        None => {
            let bytes = compile(source.name, &text, &options)?;
            if let Some(path) = &path {
                store(path, &bytes);
            }
            bytes
        }
    };
    let bytes = Arc::new(bytes);
    *slot = Some(bytes.clone());
    Ok(bytes)
}

fn poisoned() -> Error {
    Error::Cuda("kernel compile cache lock poisoned by a panic".into())
}

fn nvrtc_present() -> Result<()> {
    // SAFETY: only tries to load the library. cudarc's NVRTC calls panic when it is missing,
    // so every path reaches them through this check.
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::Cuda(
            "the NVRTC library (libnvrtc) was not found; it compiles the CUDA kernels".into(),
        ))
    }
}

fn nvrtc_version() -> Result<(i32, i32)> {
    nvrtc_present()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is loaded; the pointers are valid for the call.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(|e| Error::Cuda(format!("nvrtcVersion: {e}")))?;
    Ok((major, minor))
}

/// Destroys the program however compilation ends.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by create_program and destroyed only here. A failure leaks the
        // program, which is all that could be done about it.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn compile(name: &str, text: &str, options: &[String]) -> Result<Vec<u8>> {
    nvrtc_present()?;
    let cuda_err =
        |what: &str, e: nvrtc::NvrtcError| Error::Cuda(format!("{name}.cu: {what}: {e}"));
    let src = CString::new(text).map_err(|_| Error::Cuda(format!("{name}.cu holds a NUL byte")))?;
    let file = CString::new(format!("{name}.cu")).map_err(|_| Error::Cuda(name.to_string()))?;
    let program =
        Program(nvrtc::create_program(&src, Some(&file)).map_err(|e| cuda_err("create", e))?);
    // SAFETY: `program` is live until dropped at the end of this function.
    unsafe {
        if let Err(e) = nvrtc::compile_program(program.0, options) {
            let log = nvrtc::get_program_log(program.0)
                .map(c_text)
                .unwrap_or_default();
            return Err(Error::Cuda(format!(
                "compiling {name}.cu failed ({e}):\n{log}"
            )));
        }
        let mut size = 0usize;
        nvrtc_sys::nvrtcGetCUBINSize(program.0, &mut size)
            .result()
            .map_err(|e| cuda_err("CUBIN size", e))?;
        let mut cubin = vec![0u8; size];
        nvrtc_sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr() as *mut c_char)
            .result()
            .map_err(|e| cuda_err("CUBIN", e))?;
        Ok(cubin)
    }
}

/// NVRTC's NUL-terminated log as text.
fn c_text(chars: Vec<c_char>) -> String {
    let bytes: Vec<u8> = chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("mlx-native").join("cuda"))
}

/// Writes through a temporary file and a rename, so a concurrent reader never sees half a
/// file. The disk cache only saves time: when it cannot be written the next start compiles
/// again, so failures are not errors.
fn store(path: &std::path::Path, bytes: &[u8]) {
    let Some(dir) = path.parent() else { return };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let written = std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&tmp, bytes))
        .and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// 64-bit FNV-1a over the parts, each followed by a separator byte.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kernel source compiles for Hopper. Needs only NVRTC (no GPU); skipped without it.
    #[test]
    fn every_source_compiles() {
        if nvrtc_present().is_err() {
            println!("skipped: no NVRTC library");
            return;
        }
        for source in super::super::kernels::SOURCES {
            let text = source.parts.concat();
            let cubin = compile(source.name, &text, &options(90)).unwrap();
            assert!(
                cubin.starts_with(ELF_MAGIC),
                "{} did not give an ELF CUBIN",
                source.name
            );
        }
    }

    /// scripts/nvrtc_cubin.py (the SASS tool's compile, with no Rust build) passes NVRTC the
    /// options this module does: a change to either must reach the other.
    #[test]
    fn sass_script_compiles_with_these_options() {
        let script = include_str!("../../../../../scripts/nvrtc_cubin.py");
        let line = script
            .lines()
            .find(|l| l.trim_start().starts_with("options = ["))
            .expect("nvrtc_cubin.py sets `options = [...]`");
        let listed = |option: &str| line.contains(&format!("\"{option}\""));
        for option in OPTIONS {
            assert!(listed(option), "nvrtc_cubin.py lacks {option}: {line}");
        }
        // OPTIONS and the architecture, quoted, and nothing else but the extra options.
        assert_eq!(line.matches('"').count(), 2 * (OPTIONS.len() + 1), "{line}");
        let arch = options(90)[OPTIONS.len()].replace("90", "{args.arch}");
        assert!(line.contains(&format!("f\"{arch}\"")), "{line}");
    }

    /// Kernels are launched with programmatic stream serialization, which is safe only if each
    /// waits for its predecessor before touching memory an earlier kernel may write: every
    /// `extern "C" __global__` function's body must begin with `kernel_entry()` or
    /// `kernel_entry_early(…)` (common.cuh; it waits first), or, for the matvecs (the short
    /// prompts' tensor-core kernel too) and decode attention, which load weights or K/V rows
    /// first, call a function that waits inside.
    #[test]
    fn every_kernel_begins_with_kernel_entry() {
        const ENTRY: &str = "extern \"C\" __global__";
        const WAITS_INSIDE: [&str; 6] = [
            "matvec<",
            "matvec_tc<",
            "gather_tc_",
            "attn_decode<",
            "flash_decode<",
            "matmul_tcq_rows<",
        ];
        let mut kernels = 0;
        for source in super::super::kernels::SOURCES {
            let text = source.parts.concat();
            for (at, _) in text.match_indices(ENTRY) {
                let body = text[at..].split_once('{').map_or("", |(_, b)| b);
                let first = body.trim_start_matches(|c: char| c.is_whitespace() || c == '\\');
                let kernel = body.split(ENTRY).next().unwrap_or_default();
                let name = text[at..].lines().next().unwrap_or_default();
                assert!(
                    first.starts_with("kernel_entry();")
                        || first.starts_with("kernel_entry_early(")
                        || WAITS_INSIDE.iter().any(|f| kernel.contains(f)),
                    "{}.cu: kernel at `{name}` does not begin with kernel_entry()",
                    source.name
                );
                kernels += 1;
            }
        }
        assert!(kernels > 20, "found only {kernels} kernels");
    }

    #[test]
    fn cache_key_depends_on_every_part() {
        let base = fnv1a(&[b"src", b"opts"]);
        assert_ne!(base, fnv1a(&[b"src", b"opts2"]));
        assert_ne!(base, fnv1a(&[b"sr", b"copts"]));
        assert_eq!(base, fnv1a(&[b"src", b"opts"]));
    }
}
