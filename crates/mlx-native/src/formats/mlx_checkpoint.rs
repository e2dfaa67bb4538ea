//! MLX checkpoints as mlx-lm writes them: a directory holding `config.json` and safetensors
//! weights (one `model.safetensors`, shards listed by `model.safetensors.index.json`, or any
//! `*.safetensors`). Quantized linears are MLX affine triples `{p}.weight` (u32 words),
//! `{p}.scales`, `{p}.biases`, described by config.json's `quantization` section.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::core::device::Device;
use crate::core::tensor::Tensor;
use crate::formats::safetensors::SafetensorsFile;
use crate::ops::{ExpertLinear, Linear};
use crate::quant::WeightLayout;
use crate::{Error, Result};

/// MLX affine quantization settings of a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct QuantConfig {
    pub bits: u32,
    pub group_size: usize,
    /// Per-module settings keyed by module path (`model.layers.0.mlp.down_proj`):
    /// `Some((bits, group_size))`, or `None` for a module left unquantized.
    pub overrides: HashMap<String, Option<(u32, usize)>>,
}

/// MLX's defaults for a per-module override that omits a field (`nn.quantize`, affine mode).
const DEFAULT_OVERRIDE_BITS: u32 = 4;
const DEFAULT_OVERRIDE_GROUP_SIZE: usize = 64;

pub struct MlxCheckpoint {
    dir: PathBuf,
    config: Value,
    files: Vec<SafetensorsFile>,
    /// Index into `files` of the file holding each tensor.
    location: HashMap<String, usize>,
    quant: Option<QuantConfig>,
}

impl MlxCheckpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<MlxCheckpoint> {
        let dir = dir.as_ref().to_path_buf();
        let config_path = dir.join("config.json");
        let config = read_json(&config_path, "JSON")?;
        let quant = parse_quant(&config, &config_path)?;
        let (files, location) = open_weights(&dir)?;
        Ok(MlxCheckpoint {
            dir,
            config,
            files,
            location,
            quant,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// config.json as parsed JSON, for the model-specific config readers.
    pub fn config(&self) -> &Value {
        &self.config
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    pub fn quantization(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// The (bits, group_size) the config gives the module at `prefix`, `None` when the
    /// checkpoint is unquantized or the module is left dense by a per-module override.
    pub fn quant_for(&self, prefix: &str) -> Option<(u32, usize)> {
        let q = self.quant.as_ref()?;
        match q.overrides.get(prefix) {
            Some(params) => *params,
            None => Some((q.bits, q.group_size)),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.location.contains_key(name)
    }

    pub fn tensor(&self, device: &Device, name: &str) -> Result<Tensor> {
        let file = self
            .location
            .get(name)
            .and_then(|&i| self.files.get(i))
            .ok_or_else(|| Error::MissingTensor {
                path: self.dir.clone(),
                name: name.to_string(),
            })?;
        file.load(device, name)
    }

    /// The `n`×`k` linear at `prefix` (also used for embedding tables: n = vocab, k = hidden):
    /// MLX affine when `{prefix}.scales` exists, dense `{prefix}.weight` otherwise; with
    /// `bias`, plus `{prefix}.bias`.
    pub fn linear(
        &self,
        device: &Device,
        prefix: &str,
        n: usize,
        k: usize,
        bias: bool,
    ) -> Result<Linear> {
        let (layout, tensors) = self.weight(device, prefix)?;
        let bias = if bias {
            Some(self.tensor(device, &format!("{prefix}.bias"))?)
        } else {
            None
        };
        Linear::new(prefix, layout, tensors, bias, n, k)
    }

    /// `experts` stacked `n`×`k` matrices at `prefix` (mlx-lm's `SwitchLinear`:
    /// `{prefix}.weight` `[experts, n, k]`, quantized like a linear).
    pub fn experts(
        &self,
        device: &Device,
        prefix: &str,
        experts: usize,
        n: usize,
        k: usize,
    ) -> Result<ExpertLinear> {
        let (layout, tensors) = self.weight(device, prefix)?;
        ExpertLinear::new(prefix, layout, tensors, experts, n, k)
    }

    /// The layout and tensors of the weight at `prefix`: MLX affine when `{prefix}.scales`
    /// exists (bits and group size from the config), dense `{prefix}.weight` otherwise.
    fn weight(&self, device: &Device, prefix: &str) -> Result<(WeightLayout, Vec<Tensor>)> {
        Ok(if self.has(&format!("{prefix}.scales")) {
            let (bits, group_size) = self.quant_for(prefix).ok_or_else(|| {
                let (field, reason) = match self.quant {
                    None => (
                        "quantization".to_string(),
                        format!("missing, but the checkpoint stores `{prefix}.scales`"),
                    ),
                    Some(_) => (
                        format!("quantization.{prefix}"),
                        format!("leaves the module unquantized, but the checkpoint stores `{prefix}.scales`"),
                    ),
                };
                Error::Config {
                    path: self.config_path(),
                    field,
                    reason,
                }
            })?;
            let tensors = ["weight", "scales", "biases"]
                .iter()
                .map(|part| self.tensor(device, &format!("{prefix}.{part}")))
                .collect::<Result<Vec<_>>>()?;
            (WeightLayout::MlxAffine { bits, group_size }, tensors)
        } else {
            let weight = self.tensor(device, &format!("{prefix}.weight"))?;
            (WeightLayout::Dense, vec![weight])
        })
    }
}

fn read_json(path: &Path, format: &'static str) -> Result<Value> {
    let text = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_slice(&text).map_err(|e| Error::Malformed {
        path: path.to_path_buf(),
        format,
        reason: e.to_string(),
    })
}

type WeightFiles = (Vec<SafetensorsFile>, HashMap<String, usize>);

/// Open the weight files of `dir` and say where each tensor is.
fn open_weights(dir: &Path) -> Result<WeightFiles> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.is_file() {
        return open_indexed(dir, &index_path);
    }
    let single = dir.join("model.safetensors");
    let paths = if single.is_file() {
        vec![single]
    } else {
        let mut paths = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let path = entry.map_err(|e| Error::io(dir, e))?.path();
            if path.extension().is_some_and(|e| e == "safetensors") && path.is_file() {
                paths.push(path);
            }
        }
        paths.sort();
        paths
    };
    if paths.is_empty() {
        return Err(Error::io(
            dir,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no model.safetensors.index.json, model.safetensors or *.safetensors",
            ),
        ));
    }
    let mut files: Vec<SafetensorsFile> = Vec::new();
    let mut location: HashMap<String, usize> = HashMap::new();
    for path in paths {
        let file = SafetensorsFile::open(&path)?;
        for name in file.names() {
            if let Some(other) = location.get(name).and_then(|&i| files.get(i)) {
                return Err(Error::Malformed {
                    path: path.clone(),
                    format: "safetensors",
                    reason: format!("tensor `{name}` is also in {}", other.path().display()),
                });
            }
            location.insert(name.to_string(), files.len());
        }
        files.push(file);
    }
    Ok((files, location))
}

/// Shards named by an index's `weight_map` (tensor name → shard file name), each opened once.
fn open_indexed(dir: &Path, index_path: &Path) -> Result<WeightFiles> {
    let malformed = |reason: String| Error::Malformed {
        path: index_path.to_path_buf(),
        format: "safetensors index",
        reason,
    };
    let index = read_json(index_path, "safetensors index")?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| malformed("no `weight_map` object".into()))?;
    let mut shard_of: BTreeMap<&str, &str> = BTreeMap::new();
    for (name, shard) in map {
        let shard = shard
            .as_str()
            .filter(|s| Path::new(s).file_name().is_some_and(|f| f == *s))
            .ok_or_else(|| {
                malformed(format!("tensor `{name}`: shard {shard} is not a file name"))
            })?;
        shard_of.insert(name, shard);
    }
    let mut files = Vec::new();
    let mut file_index: HashMap<&str, usize> = HashMap::new();
    let mut location = HashMap::new();
    for (name, shard) in shard_of {
        let i = match file_index.get(shard) {
            Some(&i) => i,
            None => {
                files.push(SafetensorsFile::open(dir.join(shard))?);
                file_index.insert(shard, files.len() - 1);
                files.len() - 1
            }
        };
        if files.get(i).and_then(|f| f.info(name)).is_none() {
            return Err(malformed(format!(
                "tensor `{name}` is not in its shard {shard}"
            )));
        }
        location.insert(name.to_string(), i);
    }
    Ok((files, location))
}

/// The quantization section of config.json (`quantization`, else `quantization_config`).
fn parse_quant(config: &Value, path: &Path) -> Result<Option<QuantConfig>> {
    let present = |key: &str| config.get(key).filter(|v| !v.is_null());
    let (section, q) = match (present("quantization"), present("quantization_config")) {
        (Some(q), _) => ("quantization", q),
        (None, Some(q)) => ("quantization_config", q),
        (None, None) => return Ok(None),
    };
    let obj = q.as_object().ok_or_else(|| Error::Config {
        path: path.to_path_buf(),
        field: section.into(),
        reason: "expected an object".into(),
    })?;
    if let Some(method) = obj.get("quant_method") {
        return Err(Error::UnsupportedQuant(format!(
            "{}: {section}.quant_method {method} (only MLX affine checkpoints are supported)",
            path.display()
        )));
    }
    let (bits, group_size) = quant_params(obj, section, path)?;
    let missing = |field: &str| Error::Config {
        path: path.to_path_buf(),
        field: format!("{section}.{field}"),
        reason: "missing".into(),
    };
    let bits = bits.ok_or_else(|| missing("bits"))?;
    let group_size = group_size.ok_or_else(|| missing("group_size"))?;

    let mut overrides = HashMap::new();
    for (key, value) in obj {
        let setting = match value {
            Value::Bool(false) => None,
            Value::Bool(true) => Some((bits, group_size)),
            Value::Object(o) => {
                let (b, g) = quant_params(o, &format!("{section}.{key}"), path)?;
                Some((
                    b.unwrap_or(DEFAULT_OVERRIDE_BITS),
                    g.unwrap_or(DEFAULT_OVERRIDE_GROUP_SIZE),
                ))
            }
            // Global scalars (bits, group_size, mode) are not module overrides.
            _ => continue,
        };
        overrides.insert(key.clone(), setting);
    }
    Ok(Some(QuantConfig {
        bits,
        group_size,
        overrides,
    }))
}

/// `bits` and `group_size` of one settings object, `None` where absent; `at` is the object's
/// dotted field path for errors.
fn quant_params(
    obj: &serde_json::Map<String, Value>,
    at: &str,
    path: &Path,
) -> Result<(Option<u32>, Option<usize>)> {
    if let Some(mode) = obj.get("mode").filter(|m| m.as_str() != Some("affine")) {
        return Err(Error::UnsupportedQuant(format!(
            "{}: {at}.mode {mode} (only affine is supported)",
            path.display()
        )));
    }
    let int = |key: &str| -> Result<Option<u32>> {
        obj.get(key)
            .map(|v| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| Error::Config {
                        path: path.to_path_buf(),
                        field: format!("{at}.{key}"),
                        reason: format!("expected a non-negative integer, found {v}"),
                    })
            })
            .transpose()
    };
    Ok((int("bits")?, int("group_size")?.map(|g| g as usize)))
}
