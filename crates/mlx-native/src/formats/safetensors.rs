//! safetensors files: an 8-byte little-endian header length, a JSON header mapping each
//! tensor name to its dtype, shape and `data_offsets` (relative to the end of the header),
//! then the tensor bytes. The file is memory-mapped; tensors are views into the mapping.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;
use serde::Deserialize;

use crate::core::backend::HostBytes;
use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// Where one tensor lives in the file and what it holds.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The dtype as the file spells it (`"F16"`, `"BF16"`, `"I64"`, ...).
    pub dtype_name: String,
    /// The library's element type, `None` for dtypes it cannot compute with (F64, I64, F8...).
    pub dtype: Option<DType>,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file.
    pub range: Range<usize>,
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    tensors: BTreeMap<String, TensorInfo>,
}

/// One header entry as written in the file.
#[derive(Deserialize)]
struct HeaderEntry {
    dtype: String,
    shape: Vec<usize>,
    data_offsets: [usize; 2],
}

/// Bits per element of every dtype the safetensors format defines (sub-byte float formats
/// included so that such files still open), and the library dtype where there is one.
fn dtype_bits(name: &str) -> Option<(usize, Option<DType>)> {
    Some(match name {
        "F32" => (32, Some(DType::F32)),
        "F16" => (16, Some(DType::F16)),
        "BF16" => (16, Some(DType::BF16)),
        "U8" => (8, Some(DType::U8)),
        "U32" => (32, Some(DType::U32)),
        "I32" => (32, Some(DType::I32)),
        "BOOL" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => (8, None),
        "I16" | "U16" => (16, None),
        "F64" | "I64" | "U64" | "C64" => (64, None),
        "F4" => (4, None),
        "F6_E2M3" | "F6_E3M2" => (6, None),
        _ => return None,
    })
}

impl SafetensorsFile {
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the mapping is read-only; like every mmap-based loader we rely on the file
        // not being truncated or rewritten while it is open.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let tensors = parse_header(&mmap).map_err(|reason| Error::Malformed {
            path: path.clone(),
            format: "safetensors",
            reason,
        })?;
        Ok(SafetensorsFile {
            path,
            mmap: Arc::new(mmap),
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in sorted order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    /// The tensor `name` on `device`: a view of the mapping on the CPU, one upload elsewhere.
    pub fn load(&self, device: &Device, name: &str) -> Result<Tensor> {
        let info = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })?;
        let dtype = info.dtype.ok_or_else(|| Error::UnsupportedDType {
            name: name.to_string(),
            dtype: info.dtype_name.clone(),
        })?;
        let bytes: HostBytes = self.mmap.clone();
        device.from_host(bytes, info.range.clone(), &info.shape, dtype)
    }
}

/// Parse and check the header of a whole file; the error is the reason it is malformed.
fn parse_header(file: &[u8]) -> std::result::Result<BTreeMap<String, TensorInfo>, String> {
    let len_bytes: [u8; 8] = file
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            format!(
                "{} bytes, too short for the 8-byte header length",
                file.len()
            )
        })?;
    let header_len = u64::from_le_bytes(len_bytes);
    let data_start = usize::try_from(header_len)
        .ok()
        .and_then(|n| n.checked_add(8))
        .filter(|&end| end <= file.len())
        .ok_or_else(|| {
            format!(
                "header length {header_len} runs past the end of the {}-byte file",
                file.len()
            )
        })?;
    let data_len = file.len() - data_start;
    let header: BTreeMap<String, serde_json::Value> = serde_json::from_slice(&file[8..data_start])
        .map_err(|e| format!("header is not a JSON object: {e}"))?;

    let mut tensors = BTreeMap::new();
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let entry: HeaderEntry = serde_json::from_value(value)
            .map_err(|e| format!("tensor `{name}`: bad header entry: {e}"))?;
        let [begin, end] = entry.data_offsets;
        if begin > end || end > data_len {
            return Err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] outside the {data_len} data bytes"
            ));
        }
        let (bits, dtype) = dtype_bits(&entry.dtype)
            .ok_or_else(|| format!("tensor `{name}`: unknown dtype `{}`", entry.dtype))?;
        let expected_bytes = entry
            .shape
            .iter()
            .try_fold(bits, |acc, &d| acc.checked_mul(d))
            .filter(|b| b.is_multiple_of(8))
            .map(|b| b / 8);
        if expected_bytes != Some(end - begin) {
            return Err(format!(
                "tensor `{name}`: {} bytes of data for shape {:?} of {}",
                end - begin,
                entry.shape,
                entry.dtype
            ));
        }
        let info = TensorInfo {
            dtype_name: entry.dtype,
            dtype,
            shape: entry.shape,
            range: data_start + begin..data_start + end,
        };
        tensors.insert(name, info);
    }

    let mut by_start: Vec<(&String, &Range<usize>)> =
        tensors.iter().map(|(n, t)| (n, &t.range)).collect();
    by_start.sort_by_key(|(_, r)| (r.start, r.end));
    for pair in by_start.windows(2) {
        if let [(a, ra), (b, rb)] = pair {
            if rb.start < ra.end {
                return Err(format!("tensors `{a}` and `{b}` overlap"));
            }
        }
    }
    Ok(tensors)
}
