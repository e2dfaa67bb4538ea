//! GGUF files (versions 2 and 3, little-endian), as written by llama.cpp: a header, typed
//! metadata, tensor records and an aligned data section, memory-mapped and validated once at
//! open so that every later access is in bounds.
//!
//! Layout: `"GGUF"`, version u32, tensor count u64, metadata count u64; metadata entries
//! (key string, value type u32, value); tensor records (name string, n_dims u32, dims u64 ×
//! n_dims with dims\[0\] the innermost, ggml type u32, data offset u64 relative to the data
//! section); padding to `general.alignment` (default 32); the data section. Strings are a
//! u64 byte length and UTF-8 bytes.
//!
//! Note for model loaders: llama.cpp's converter permutes the rows of `attn_q` and `attn_k`
//! so that the two elements RoPE rotates together are adjacent instead of half a head apart
//! (Hugging Face's "rotate half" layout). A llama-family GGUF therefore runs *traditional*
//! (interleaved-pair) RoPE (`ops::rope(.., traditional = true, ..)`) on the weights as
//! stored, where the same model from safetensors runs the non-traditional form.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::Mmap;

use crate::core::backend::HostBytes;
use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::tensor::Tensor;
use crate::formats::tokenizer::GgufVocab;
use crate::ops::{ExpertLinear, Linear};
use crate::quant::{ggml, GgmlType, WeightLayout};
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: usize = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: usize = 4;
/// Arrays nested deeper than this are rejected, bounding recursion on hostile files.
const MAX_ARRAY_DEPTH: usize = 8;
/// Elements reserved up front for an array; more grow as they are actually read, so a
/// lying count cannot allocate more than the file backs.
const MAX_ARRAY_RESERVE: usize = 1 << 16;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl GgufValue {
    pub fn type_name(&self) -> &'static str {
        match self {
            GgufValue::U8(_) => "u8",
            GgufValue::I8(_) => "i8",
            GgufValue::U16(_) => "u16",
            GgufValue::I16(_) => "i16",
            GgufValue::U32(_) => "u32",
            GgufValue::I32(_) => "i32",
            GgufValue::U64(_) => "u64",
            GgufValue::I64(_) => "i64",
            GgufValue::F32(_) => "f32",
            GgufValue::F64(_) => "f64",
            GgufValue::Bool(_) => "bool",
            GgufValue::String(_) => "string",
            GgufValue::Array(_) => "array",
        }
    }

    /// Any integer value, widened (writers differ in which integer type they use).
    pub fn as_i128(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// Any numeric value as f64 (integers included).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i128().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// Type and (short) value, for error messages.
    fn summary(&self) -> String {
        match self {
            GgufValue::String(s) if s.chars().count() > 40 => {
                format!("string {:?}…", s.chars().take(40).collect::<String>())
            }
            GgufValue::String(s) => format!("string {s:?}"),
            GgufValue::Array(a) => format!("array of {} elements", a.len()),
            GgufValue::Bool(v) => format!("bool {v}"),
            v => match (v.as_i128(), v.as_f64()) {
                (Some(i), _) => format!("{} {i}", v.type_name()),
                (None, Some(f)) => format!("{} {f}", v.type_name()),
                _ => v.type_name().to_string(),
            },
        }
    }
}

/// One tensor record.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensorInfo {
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension, so a matrix of `n`
    /// rows by `k` columns has dims `[k, n]`.
    pub dims: Vec<usize>,
    pub ggml_type: GgmlType,
    /// Byte range of the tensor's data within the file (validated to lie inside it).
    pub range: Range<usize>,
}

impl GgufTensorInfo {
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }
}

/// An open GGUF file: parsed metadata and tensor records over a shared memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: Arc<Mmap>,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: usize,
}

impl GgufFile {
    /// Map and validate `path`. Malformed files (truncated, bad magic or version, absurd
    /// counts, tensors past the end, misaligned or overlapping data) are `Error::Malformed`
    /// naming the record at fault; tensor types this library cannot compute with are
    /// `Error::UnsupportedQuant`.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the map is read-only; as with any mapped file, modifying it while it is
        // open is outside this library's control (and the documented caveat of memmap2).
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let parsed = parse(&path, &mmap)?;
        Ok(GgufFile {
            path,
            mmap: Arc::new(mmap),
            version: parsed.version,
            by_name: parsed.by_name,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            alignment: parsed.alignment,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// Alignment of tensor data (`general.alignment`, 32 when absent).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    pub fn metadata(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// Metadata keys, sorted.
    pub fn metadata_keys(&self) -> impl Iterator<Item = &str> {
        self.metadata.keys().map(String::as_str)
    }

    fn config_error(&self, key: &str, reason: String) -> Error {
        Error::Config {
            path: self.path.clone(),
            field: key.to_string(),
            reason,
        }
    }

    /// `Ok(None)` when `key` is absent; an error when present but `convert` rejects it.
    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<T>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => convert(v).map(Some).ok_or_else(|| {
                self.config_error(key, format!("expected {expected}, found {}", v.summary()))
            }),
        }
    }

    fn required<T>(&self, key: &str, value: Result<Option<T>>) -> Result<T> {
        value?.ok_or_else(|| self.config_error(key, "missing from the GGUF metadata".into()))
    }

    fn array<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        convert: impl Fn(&'a GgufValue) -> Option<T>,
    ) -> Result<Option<Vec<T>>> {
        self.typed(key, expected, |v| {
            v.as_array()?.iter().map(&convert).collect()
        })
    }

    /// An integer value (of any integer type) that fits in u32.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        self.typed(key, "an integer in u32 range", |v| {
            v.as_i128()?.try_into().ok()
        })
    }

    pub fn get_u32(&self, key: &str) -> Result<u32> {
        self.required(key, self.opt_u32(key))
    }

    /// An integer value (of any integer type) that fits in u64.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        let v = self.typed(key, "an integer in u64 range", |v| {
            v.as_i128()?.try_into().ok()
        });
        self.required(key, v)
    }

    /// A numeric value (float or integer) as f32.
    pub fn opt_f32(&self, key: &str) -> Result<Option<f32>> {
        self.typed(key, "a number", |v| v.as_f64().map(|f| f as f32))
    }

    pub fn get_f32(&self, key: &str) -> Result<f32> {
        self.required(key, self.opt_f32(key))
    }

    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        self.typed(key, "a bool", GgufValue::as_bool)
    }

    pub fn get_bool(&self, key: &str) -> Result<bool> {
        self.required(key, self.opt_bool(key))
    }

    /// An array of bools (`None` when `key` is absent).
    pub fn opt_bool_array(&self, key: &str) -> Result<Option<Vec<bool>>> {
        self.array(key, "an array of bools", GgufValue::as_bool)
    }

    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        self.typed(key, "a string", GgufValue::as_str)
    }

    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.required(key, self.opt_str(key))
    }

    pub fn get_str_array(&self, key: &str) -> Result<Vec<String>> {
        let v = self.array(key, "an array of strings", |v| v.as_str().map(String::from));
        self.required(key, v)
    }

    /// An array of numbers (floats or integers) as f32.
    pub fn get_f32_array(&self, key: &str) -> Result<Vec<f32>> {
        let v = self.array(key, "an array of numbers", |v| v.as_f64().map(|f| f as f32));
        self.required(key, v)
    }

    /// An array of integers that fit in i32.
    pub fn get_i32_array(&self, key: &str) -> Result<Vec<i32>> {
        let v = self.array(key, "an array of i32 integers", |v| {
            v.as_i128()?.try_into().ok()
        });
        self.required(key, v)
    }

    /// `general.architecture` (the prefix of the model's hyper-parameter keys).
    pub fn architecture(&self) -> Result<&str> {
        self.get_str("general.architecture")
    }

    /// Tensor names in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// Tensor records in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.tensor_info(name).ok_or_else(|| Error::MissingTensor {
            path: self.path.clone(),
            name: name.to_string(),
        })
    }

    /// The raw (block-encoded) bytes of a tensor.
    pub fn tensor_data(&self, name: &str) -> Result<&[u8]> {
        let info = self.require_tensor(name)?;
        // Ranges were checked against the map's length at open.
        Ok(&self.mmap[info.range.clone()])
    }

    /// A weight matrix (or embedding table) of GGUF dims `[k, n]`: `n` rows of `k` elements,
    /// kept in its ggml block type (F32/F16/BF16 included, as blocks of one) and used in
    /// place from the memory map on the CPU.
    pub fn load_linear(&self, device: &Device, name: &str) -> Result<Linear> {
        let info = self.require_tensor(name)?;
        let [k, n] = info.dims[..] else {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` has dims {:?}; a matrix needs two",
                self.path.display(),
                info.dims
            )));
        };
        let host: HostBytes = self.mmap.clone();
        let bytes = device.from_host(host, info.range.clone(), &[info.range.len()], DType::U8)?;
        Linear::new(
            name,
            WeightLayout::Gguf(info.ggml_type),
            vec![bytes],
            None,
            n,
            k,
        )
    }

    /// A stack of expert matrices (llama.cpp's `ffn_*_exps`, dims `[k, n, experts]`) as stored,
    /// one row of `[experts, n·row_bytes]` bytes an expert.
    pub fn load_experts(&self, device: &Device, name: &str) -> Result<ExpertLinear> {
        let info = self.require_tensor(name)?;
        let &[k, n, experts] = &info.dims[..] else {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` has dims {:?}; stacked experts need three",
                self.path.display(),
                info.dims
            )));
        };
        if experts == 0 {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` stacks no experts (dims {:?})",
                self.path.display(),
                info.dims
            )));
        }
        let host: HostBytes = self.mmap.clone();
        let shape = [experts, info.range.len() / experts];
        let bytes = device.from_host(host, info.range.clone(), &shape, DType::U8)?;
        ExpertLinear::new(
            name,
            WeightLayout::Gguf(info.ggml_type),
            vec![bytes],
            experts,
            n,
            k,
        )
    }

    /// A 1-D tensor (norm weights, biases) of any supported type as an f32 tensor.
    pub fn load_vector_f32(&self, device: &Device, name: &str) -> Result<Tensor> {
        let values = self.vector_f32(name)?;
        device.from_slice(&values, &[values.len()])
    }

    /// The values of the one-dimensional tensor `name`, as f32 on the host.
    pub fn vector_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.require_tensor(name)?;
        let [len] = info.dims[..] else {
            return Err(Error::Invalid(format!(
                "{}: tensor `{name}` has dims {:?}; a vector needs one",
                self.path.display(),
                info.dims
            )));
        };
        let mut values = vec![0f32; len];
        ggml::dequantize_row(info.ggml_type, self.tensor_data(name)?, &mut values)?;
        Ok(values)
    }

    /// The embedded tokenizer (`tokenizer.ggml.*`). Optional per-token arrays must have one
    /// entry per token. Without `tokenizer.ggml.add_bos_token`, a BOS is added for
    /// SentencePiece ("llama") and WordPiece ("bert") vocabularies, as llama.cpp does.
    pub fn vocab(&self) -> Result<GgufVocab> {
        const P: &str = "tokenizer.ggml.";
        let key = |k: &str| format!("{P}{k}");
        let model = self.get_str(&key("model"))?.to_string();
        let tokens = self.get_str_array(&key("tokens"))?;
        let per_token = |k: &str, len: usize| -> Result<()> {
            if len != 0 && len != tokens.len() {
                return Err(self.config_error(
                    &key(k),
                    format!("{len} entries for {} tokens", tokens.len()),
                ));
            }
            Ok(())
        };
        let token_types = match self.metadata(&key("token_type")) {
            Some(_) => self.get_i32_array(&key("token_type"))?,
            None => Vec::new(),
        };
        per_token("token_type", token_types.len())?;
        let scores = match self.metadata(&key("scores")) {
            Some(_) => self.get_f32_array(&key("scores"))?,
            None => Vec::new(),
        };
        per_token("scores", scores.len())?;
        let merges = match self.metadata(&key("merges")) {
            Some(_) => self.get_str_array(&key("merges"))?,
            None => Vec::new(),
        };
        let token_id = |k: &str| -> Result<Option<u32>> {
            match self.opt_u32(&key(k))? {
                Some(id) if id as usize >= tokens.len() => Err(self.config_error(
                    &key(k),
                    format!("token id {id} outside the vocabulary of {}", tokens.len()),
                )),
                id => Ok(id),
            }
        };
        let (bos, eos) = (token_id("bos_token_id")?, token_id("eos_token_id")?);
        let add_bos = self
            .opt_bool(&key("add_bos_token"))?
            .unwrap_or(model == "llama" || model == "bert");
        Ok(GgufVocab {
            pre: self.opt_str(&key("pre"))?.map(String::from),
            model,
            tokens,
            token_types,
            scores,
            merges,
            bos,
            eos,
            add_bos,
        })
    }

    /// The Jinja chat template (`tokenizer.chat_template`), when the file has one.
    pub fn chat_template(&self) -> Option<String> {
        self.metadata("tokenizer.chat_template")?
            .as_str()
            .map(String::from)
    }
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: usize,
}

fn parse(path: &Path, bytes: &[u8]) -> Result<Parsed> {
    let malformed = |reason: String| Error::Malformed {
        path: path.to_path_buf(),
        format: "gguf",
        reason,
    };
    let mut r = Reader { bytes, pos: 0 };

    let magic = r.take(4).map_err(|e| malformed(format!("header: {e}")))?;
    if magic != MAGIC {
        return Err(malformed(format!("bad magic {magic:?}, expected \"GGUF\"")));
    }
    let version = r.u32().map_err(|e| malformed(format!("header: {e}")))?;
    if !(2..=3).contains(&version) {
        let hint = if (2..=3).contains(&version.swap_bytes()) {
            " (a big-endian file, which is not supported)"
        } else {
            ""
        };
        return Err(malformed(format!(
            "version {version}{hint}; only versions 2 and 3 are supported"
        )));
    }
    let header = |r: &mut Reader| -> Result<(u64, u64), String> { Ok((r.u64()?, r.u64()?)) };
    let (n_tensors, n_kv) = header(&mut r).map_err(|e| malformed(format!("header: {e}")))?;
    // Smallest encodings: a metadata entry is an empty key, a type and a 1-byte value; a
    // tensor record an empty name, n_dims, type and offset.
    r.check_count(n_kv, 8 + 4 + 1, "metadata entries")
        .map_err(|e| malformed(format!("header: {e}")))?;
    r.check_count(n_tensors, 8 + 4 + 4 + 8, "tensor records")
        .map_err(|e| malformed(format!("header: {e}")))?;

    let mut metadata = BTreeMap::new();
    for i in 0..n_kv {
        let key = r
            .string()
            .map_err(|e| malformed(format!("metadata entry #{i}: key: {e}")))?;
        let value = r
            .u32()
            .and_then(|ty| r.value(ty, 0))
            .map_err(|e| malformed(format!("metadata `{key}`: {e}")))?;
        if metadata.contains_key(&key) {
            return Err(malformed(format!("metadata `{key}` appears twice")));
        }
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_i128()
            .and_then(|a| usize::try_from(a).ok())
            .filter(|a| a.is_power_of_two())
            .ok_or_else(|| {
                malformed(format!(
                    "metadata `general.alignment`: {} is not a power of two",
                    v.summary()
                ))
            })?,
    };

    let mut records = Vec::new();
    for i in 0..n_tensors {
        let name = r
            .string()
            .map_err(|e| malformed(format!("tensor record #{i}: name: {e}")))?;
        let (dims, type_id, offset) = r
            .tensor_record()
            .map_err(|e| malformed(format!("tensor `{name}`: {e}")))?;
        let ggml_type = GgmlType::from_id(type_id).map_err(|e| {
            let detail = match e {
                Error::UnsupportedQuant(msg) => msg,
                other => other.to_string(),
            };
            Error::UnsupportedQuant(format!("{}: tensor `{name}`: {detail}", path.display()))
        })?;
        let bytes = tensor_bytes(&dims, ggml_type)
            .map_err(|e| malformed(format!("tensor `{name}`: {e}")))?;
        if !offset.is_multiple_of(alignment as u64) {
            return Err(malformed(format!(
                "tensor `{name}`: data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        records.push((name, dims, ggml_type, offset, bytes));
    }

    let data_start = r.pos.checked_next_multiple_of(alignment).ok_or_else(|| {
        malformed(format!(
            "alignment {alignment} puts the data section out of range"
        ))
    })?;
    let mut tensors = Vec::with_capacity(records.len());
    let mut by_name = HashMap::with_capacity(records.len());
    for (name, dims, ggml_type, offset, size) in records {
        let start = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(data_start));
        let range = start
            .and_then(|s| Some(s..s.checked_add(size)?))
            .filter(|range| range.end <= bytes.len())
            .ok_or_else(|| {
                malformed(format!(
                    "tensor `{name}`: {size} bytes at data offset {offset} (file offset {data_start} + {offset}) run past the end of the file ({} bytes)",
                    bytes.len()
                ))
            })?;
        if by_name.insert(name.clone(), tensors.len()).is_some() {
            return Err(malformed(format!("tensor `{name}` appears twice")));
        }
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            range,
        });
    }

    let mut by_start: Vec<&GgufTensorInfo> =
        tensors.iter().filter(|t| !t.range.is_empty()).collect();
    by_start.sort_by_key(|t| t.range.start);
    if let Some(w) = by_start
        .windows(2)
        .find(|w| w[1].range.start < w[0].range.end)
    {
        return Err(malformed(format!(
            "the data of tensors `{}` ({:?}) and `{}` ({:?}) overlap",
            w[0].name, w[0].range, w[1].name, w[1].range
        )));
    }

    Ok(Parsed {
        version,
        metadata,
        tensors,
        by_name,
        alignment,
    })
}

/// Bytes of a tensor of `dims` (ggml order) and type `t`, checking that rows split into
/// whole blocks and that nothing overflows.
fn tensor_bytes(dims: &[usize], t: GgmlType) -> Result<usize, String> {
    let elems = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| format!("dims {dims:?} overflow"))?;
    let row = dims.first().copied().unwrap_or(1);
    if !row.is_multiple_of(t.block_size()) {
        return Err(format!(
            "rows of {row} elements are not a multiple of {}'s block size {}",
            t.name(),
            t.block_size()
        ));
    }
    (elems / t.block_size())
        .checked_mul(t.block_bytes())
        .ok_or_else(|| format!("dims {dims:?} overflow"))
}

/// A cursor over the file's bytes; every read is bounds-checked. Errors are reasons that the
/// caller prefixes with the record being read.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let slice = self
            .bytes
            .get(self.pos..)
            .and_then(|rest| rest.get(..n))
            .ok_or_else(|| {
                format!(
                    "truncated: {n} bytes needed at offset {}, {} left",
                    self.pos,
                    self.remaining()
                )
            })?;
        self.pos += n;
        Ok(slice)
    }

    fn fixed<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.fixed().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.fixed().map(u64::from_le_bytes)
    }

    /// Rejects a count of items (each at least `min_bytes` long) that the rest of the file
    /// cannot hold, before anything is allocated for them.
    fn check_count(&self, count: u64, min_bytes: usize, what: &str) -> Result<usize, String> {
        usize::try_from(count)
            .ok()
            .filter(|&c| c <= self.remaining() / min_bytes)
            .ok_or_else(|| {
                format!(
                    "{count} {what} cannot fit in the {} bytes left at offset {}",
                    self.remaining(),
                    self.pos
                )
            })
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        let len = self.check_count(len, 1, "string bytes")?;
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|e| format!("string is not UTF-8: {e}"))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, String> {
        Ok(match ty {
            0 => GgufValue::U8(u8::from_le_bytes(self.fixed()?)),
            1 => GgufValue::I8(i8::from_le_bytes(self.fixed()?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.fixed()?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.fixed()?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.fixed()?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.fixed()?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.fixed()?)),
            7 => match self.fixed::<1>()?[0] {
                0 => GgufValue::Bool(false),
                1 => GgufValue::Bool(true),
                b => return Err(format!("bool byte {b} is neither 0 nor 1")),
            },
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested more than {MAX_ARRAY_DEPTH} deep"));
                }
                let elem = self.u32()?;
                let count = self.u64()?;
                let min_bytes = value_min_bytes(elem)
                    .ok_or_else(|| format!("array of unknown value type {elem}"))?;
                let count = self.check_count(count, min_bytes, "array elements")?;
                let mut items = Vec::with_capacity(count.min(MAX_ARRAY_RESERVE));
                for i in 0..count {
                    let item = self
                        .value(elem, depth + 1)
                        .map_err(|e| format!("element {i}: {e}"))?;
                    items.push(item);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.fixed()?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.fixed()?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.fixed()?)),
            other => return Err(format!("unknown value type {other}")),
        })
    }

    /// The part of a tensor record after its name: dims, type id, offset.
    fn tensor_record(&mut self) -> Result<(Vec<usize>, u32, u64), String> {
        let n_dims = self.u32()?;
        if n_dims as usize > MAX_DIMS {
            return Err(format!("{n_dims} dimensions (at most {MAX_DIMS})"));
        }
        let dims = (0..n_dims)
            .map(|_| {
                let d = self.u64()?;
                usize::try_from(d)
                    .ok()
                    .filter(|&d| d <= i64::MAX as usize)
                    .ok_or_else(|| format!("dimension {d} out of range"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok((dims, self.u32()?, self.u64()?))
    }
}

/// Smallest encoded size of a value of type `ty` (None for unknown types).
fn value_min_bytes(ty: u32) -> Option<usize> {
    Some(match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 | 10..=12 => 8,
        9 => 4 + 8,
        _ => return None,
    })
}
