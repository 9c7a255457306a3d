//! Where a model's tensors and hyper-parameters come from: a GGUF file, or a Hugging Face
//! folder (`config.json` + `*.safetensors`, memory-mapped). Architectures ask for tensors by
//! their GGUF names (`blk.0.attn_q.weight`); a folder's names are translated.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::{QMatMul, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use wasmlm_kernels::QMatrix;

use super::linear::{native_matrix, Linear};
use super::{plain_message, BackendModelError};
use crate::gguf::GgufFile;

/// One tensor as stored: quantized (GGUF) or dense (safetensors: f32 on the CPU, the stored
/// bf16/f16 elsewhere, see [`dense_dtype`]).
pub enum Param {
    Quant(QTensor),
    Dense(Tensor),
}

impl Param {
    /// As an f32 tensor (norm weights, biases).
    pub fn dense(self, device: &Device) -> Result<Tensor, BackendModelError> {
        Ok(match self {
            Param::Quant(q) => q.dequantize(device)?,
            Param::Dense(t) => t.to_dtype(DType::F32)?,
        })
    }

    /// As a matrix to multiply by.
    pub fn matmul(self) -> Result<Linear, BackendModelError> {
        Ok(match self {
            Param::Quant(q) => Linear::quantized(q)?,
            Param::Dense(t) => Linear::dense(t),
        })
    }

    /// As an embedding table.
    pub fn embedding(self) -> Result<Embedding, BackendModelError> {
        Ok(match self {
            Param::Quant(q) if !q.device().is_cpu() => {
                // Rows are looked up on the host: reading them out of device memory would copy
                // the whole table (QTensor::data) on every step. The device copy stays for the
                // tied output projection.
                use candle_core::quantized::ggml_file::qtensor_from_ggml;
                let host = qtensor_from_ggml(
                    q.dtype(),
                    &q.data()?,
                    q.shape().dims().to_vec(),
                    &Device::Cpu,
                )?;
                Embedding::Quant {
                    host: Arc::new(host),
                    device: Some(Arc::new(q)),
                }
            }
            Param::Quant(q) => match native_matrix(q)? {
                Ok(m) => Embedding::Native(Arc::new(m)),
                Err(q) => Embedding::Quant {
                    host: Arc::new(q),
                    device: None,
                },
            },
            Param::Dense(t) => Embedding::Dense(t),
        })
    }
}

/// A token embedding table. A quantized one stays quantized and rows are dequantized on
/// lookup (f32 would cost 4–8× the file's size for large vocabularies).
#[derive(Clone)]
pub enum Embedding {
    /// In a format the native kernels cover (shared with the output projection when tied).
    Native(Arc<QMatrix>),
    /// Rows come from `host` (on the CPU); `device` is the same table where the model runs,
    /// when that is not the CPU.
    Quant {
        host: Arc<QTensor>,
        device: Option<Arc<QTensor>>,
    },
    Dense(Tensor),
}

impl Embedding {
    /// `(vocab, hidden)`.
    pub fn dims(&self) -> (usize, usize) {
        let d = match self {
            Embedding::Native(m) => vec![m.rows(), m.cols()],
            Embedding::Quant { host, .. } => host.shape().dims().to_vec(),
            Embedding::Dense(t) => t.dims().to_vec(),
        };
        (
            d.first().copied().unwrap_or(0),
            d.get(1).copied().unwrap_or(0),
        )
    }

    /// The same table as an output projection (tied embeddings).
    pub fn as_matmul(&self) -> Result<Linear, BackendModelError> {
        Ok(match self {
            Embedding::Native(m) => Linear::Native(m.clone()),
            Embedding::Quant { host, device } => {
                Linear::Candle(QMatMul::from_arc(device.as_ref().unwrap_or(host).clone())?)
            }
            Embedding::Dense(t) => Linear::dense(t.clone()),
        })
    }

    /// Rows of `tokens`, `(1, n, hidden)` on `device`.
    pub fn lookup(&self, tokens: &[u32], device: &Device) -> candle_core::Result<Tensor> {
        let (vocab, hidden) = self.dims();
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(candle_core::Error::Msg(format!(
                "token {bad} outside the vocabulary"
            )));
        }
        match self {
            Embedding::Native(m) => {
                let mut rows = vec![0f32; tokens.len() * hidden];
                for (&t, row) in tokens.iter().zip(rows.chunks_exact_mut(hidden)) {
                    m.dequantize_row(t as usize, row)
                        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                }
                Tensor::from_vec(rows, (1, tokens.len(), hidden), device)
            }
            Embedding::Dense(t) => {
                let ids = Tensor::new(tokens, t.device())?;
                t.index_select(&ids, 0)?
                    .to_dtype(DType::F32)?
                    .to_device(device)?
                    .unsqueeze(0)
            }
            Embedding::Quant { host: q, .. } => {
                use candle_core::quantized::ggml_file::qtensor_from_ggml;
                let dtype = q.dtype();
                let row_bytes = hidden / dtype.block_size() * dtype.type_size();
                let data = q.data()?;
                let rows = tokens
                    .iter()
                    .map(|&t| {
                        let start = t as usize * row_bytes;
                        let raw = data.get(start..start + row_bytes).ok_or_else(|| {
                            candle_core::Error::Msg(format!("token {t} outside the vocabulary"))
                        })?;
                        qtensor_from_ggml(dtype, raw, vec![1, hidden], &Device::Cpu)?
                            .dequantize(&Device::Cpu)
                    })
                    .collect::<candle_core::Result<Vec<_>>>()?;
                Tensor::cat(&rows, 0)?.to_device(device)?.unsqueeze(0)
            }
        }
    }
}

/// The hyper-parameters every architecture here needs, from GGUF keys or `config.json`.
#[derive(Debug, Clone)]
pub struct HParams {
    pub n_layer: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    pub hidden: usize,
    pub eps: f32,
    pub rope_base: f32,
    /// Linear rotary scaling: positions are multiplied by this (1 / the scaling factor).
    pub rope_scale: f32,
    /// Keys a sliding-window layer sees, counting the query's own position.
    pub sliding_window: Option<usize>,
    /// The context the model was trained for.
    pub context_length: usize,
}

impl HParams {
    fn check(self) -> Result<Self, BackendModelError> {
        if self.n_head == 0
            || self.n_kv_head == 0
            || self.head_dim == 0
            || !self.head_dim.is_multiple_of(2)
            || self.n_layer == 0
            || self.hidden == 0
            || !self.n_head.is_multiple_of(self.n_kv_head)
        {
            return Err(BackendModelError::Invalid(format!(
                "inconsistent hyper-parameters: {self:?}"
            )));
        }
        Ok(self)
    }
}

/// The position multiplier of a GGUF's `rope.scaling.*` keys: linear scaling is supported,
/// other kinds are refused rather than run wrong.
fn gguf_rope_scale(f: &GgufFile, arch: &str) -> Result<f32, BackendModelError> {
    let kind = f
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map_or("none", String::as_str);
    let factor = f
        .get_f32(&format!("{arch}.rope.scaling.factor"))
        .unwrap_or(1.0);
    match kind {
        "none" => Ok(1.0),
        "linear" if factor > 0.0 && factor.is_finite() => Ok(1.0 / factor),
        other => Err(BackendModelError::Invalid(format!(
            "rope scaling '{other}' (factor {factor}) is not supported yet"
        ))),
    }
}

/// The dtype a dense weight of `stored` dtype is kept in on `device`. A GPU multiplies bf16/f16
/// at twice the bytes per second of f32 (decode reads every weight once per token), with f32
/// accumulation; the CPU pass wants f32. `WASMLM_DENSE_DTYPE=f32` or `=stored` overrides it.
pub fn dense_dtype(stored: DType, device: &Device) -> DType {
    let half = matches!(stored, DType::BF16 | DType::F16);
    match std::env::var("WASMLM_DENSE_DTYPE").as_deref() {
        Ok("f32") => DType::F32,
        Ok("stored") if half => stored,
        _ if half && !device.is_cpu() => stored,
        _ => DType::F32,
    }
}

/// An open model: its tensors and what it says about itself.
pub enum WeightSource {
    Gguf(GgufFile),
    Folder {
        dir: PathBuf,
        config: serde_json::Map<String, Value>,
        tensors: MmapedSafetensors,
    },
}

impl WeightSource {
    /// Opens a GGUF file or a Hugging Face model folder.
    pub fn open(path: &Path) -> Result<Self, BackendModelError> {
        if !path.is_dir() {
            return Ok(Self::Gguf(GgufFile::open(path)?));
        }
        let invalid = |m: String| BackendModelError::Invalid(format!("{}: {m}", path.display()));
        let text = std::fs::read_to_string(path.join("config.json"))
            .map_err(|e| invalid(format!("a model folder needs config.json ({e})")))?;
        let config = match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => map,
            Ok(_) => return Err(invalid("config.json is not a JSON object".into())),
            Err(e) => return Err(invalid(format!("config.json: {e}"))),
        };
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| invalid(e.to_string()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        if files.is_empty() {
            return Err(invalid("no *.safetensors file".into()));
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader (candle,
        // safetensors, llama.cpp) this assumes nobody truncates them while the model is served.
        let tensors =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| invalid(plain_message(&e)))?;
        Ok(Self::Folder {
            dir: path.to_path_buf(),
            config,
            tensors,
        })
    }

    /// The architecture the model declares: GGUF `general.architecture` or `config.json`'s
    /// `model_type`.
    pub fn architecture(&self) -> Option<String> {
        match self {
            Self::Gguf(f) => f.architecture(),
            Self::Folder { config, .. } => config
                .get("model_type")
                .and_then(Value::as_str)
                .map(str::to_string),
        }
    }

    /// Whether the tensor exists.
    pub fn has(&self, name: &str) -> bool {
        match self {
            Self::Gguf(f) => f.content.tensor_infos.contains_key(name),
            Self::Folder { tensors, .. } => hf_name(name).is_some_and(|n| tensors.get(&n).is_ok()),
        }
    }

    /// A tensor by GGUF name.
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<Param, BackendModelError> {
        let fail =
            |e: candle_core::Error| BackendModelError::Tensor(name.to_string(), plain_message(&e));
        match self {
            Self::Gguf(f) => f
                .content
                .tensor(&mut f.reader, name, device)
                .map(Param::Quant)
                .map_err(fail),
            Self::Folder { tensors, .. } => {
                let hf = hf_name(name).ok_or_else(|| {
                    BackendModelError::Tensor(name.into(), "no Hugging Face name".into())
                })?;
                let t = tensors
                    .load(&hf, device)
                    .and_then(|t| t.to_dtype(dense_dtype(t.dtype(), device)))
                    .map_err(|e| BackendModelError::Tensor(hf.clone(), plain_message(&e)))?;
                Ok(Param::Dense(t))
            }
        }
    }

    /// Whether a folder has the tensor of this Hugging Face name.
    pub fn has_hf(&self, name: &str) -> bool {
        match self {
            Self::Gguf(_) => false,
            Self::Folder { tensors, .. } => tensors.get(name).is_ok(),
        }
    }

    /// A folder's tensor by its Hugging Face name, as f32.
    pub fn hf_tensor(&self, name: &str, device: &Device) -> Result<Tensor, BackendModelError> {
        match self {
            Self::Gguf(_) => Err(BackendModelError::Tensor(
                name.into(),
                "this architecture loads from a Hugging Face folder only".into(),
            )),
            Self::Folder { tensors, .. } => tensors
                .load(name, device)
                .and_then(|t| t.to_dtype(DType::F32))
                .map_err(|e| BackendModelError::Tensor(name.into(), plain_message(&e))),
        }
    }

    /// A tensor that an architecture may or may not have.
    pub fn optional(
        &mut self,
        name: &str,
        device: &Device,
    ) -> Result<Option<Param>, BackendModelError> {
        if self.has(name) {
            self.tensor(name, device).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Hyper-parameters of a llama-like decoder.
    pub fn hparams(&self, arch: &str) -> Result<HParams, BackendModelError> {
        match self {
            Self::Gguf(f) => {
                let need = |k: &str| {
                    f.get_u32(&format!("{arch}.{k}"))
                        .map(|v| v as usize)
                        .ok_or_else(|| BackendModelError::MissingMetadata(format!("{arch}.{k}")))
                };
                let n_head = need("attention.head_count")?;
                let hidden = need("embedding_length")?;
                let head_dim = need("attention.key_length").unwrap_or(hidden / n_head.max(1));
                let rope_dim = need("rope.dimension_count").unwrap_or(head_dim);
                if rope_dim != head_dim {
                    return Err(BackendModelError::Invalid(format!(
                        "partial rotary embeddings ({rope_dim} of {head_dim}) are not supported"
                    )));
                }
                HParams {
                    n_layer: need("block_count")?,
                    n_head,
                    n_kv_head: need("attention.head_count_kv").unwrap_or(n_head),
                    head_dim,
                    hidden,
                    eps: f
                        .get_f32(&format!("{arch}.attention.layer_norm_rms_epsilon"))
                        .unwrap_or(1e-5),
                    rope_base: f
                        .get_f32(&format!("{arch}.rope.freq_base"))
                        .unwrap_or(10_000.0),
                    rope_scale: gguf_rope_scale(f, arch)?,
                    sliding_window: need("attention.sliding_window").ok().filter(|&w| w > 0),
                    context_length: need("context_length").unwrap_or(2048),
                }
                .check()
            }
            Self::Folder { config, .. } => {
                let int = |k: &str| config.get(k).and_then(Value::as_u64).map(|v| v as usize);
                let need = |k: &str| {
                    int(k).ok_or_else(|| {
                        BackendModelError::MissingMetadata(format!("config.json: {k}"))
                    })
                };
                if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
                    if act != "silu" {
                        return Err(BackendModelError::Invalid(format!(
                            "hidden_act '{act}' is not supported for {arch} (silu is)"
                        )));
                    }
                }
                let rope = config.get("rope_parameters").or(config.get("rope_scaling"));
                let rope_type = rope
                    .and_then(|r| r.get("rope_type").or(r.get("type")))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                if rope_type != "default" {
                    return Err(BackendModelError::Invalid(format!(
                        "rope scaling '{rope_type}' is not supported yet"
                    )));
                }
                let rope_base = config
                    .get("rope_theta")
                    .or(rope.and_then(|r| r.get("rope_theta")))
                    .and_then(Value::as_f64)
                    .unwrap_or(10_000.0) as f32;
                let n_head = need("num_attention_heads")?;
                let hidden = need("hidden_size")?;
                HParams {
                    n_layer: need("num_hidden_layers")?,
                    n_head,
                    n_kv_head: int("num_key_value_heads").unwrap_or(n_head),
                    head_dim: int("head_dim").unwrap_or(hidden / n_head.max(1)),
                    hidden,
                    eps: config
                        .get("rms_norm_eps")
                        .and_then(Value::as_f64)
                        .unwrap_or(1e-6) as f32,
                    rope_base,
                    rope_scale: 1.0,
                    sliding_window: None,
                    context_length: int("max_position_embeddings").unwrap_or(2048),
                }
                .check()
            }
        }
    }

    /// Whether the file stores Q and K rows permuted for interleaved (GPT-J style) rotation,
    /// as llama.cpp's converter does for the llama architecture only.
    pub fn interleaved_rope(&self, arch: &str) -> bool {
        matches!(self, Self::Gguf(_)) && arch == "llama"
    }

    /// The metadata the component reads: GGUF keys, or the folder's config and tokenizer files.
    pub fn metadata_json(&self) -> serde_json::Map<String, Value> {
        match self {
            Self::Gguf(f) => f.metadata_json(),
            Self::Folder { .. } => serde_json::Map::new(),
        }
    }

    /// The folder holding the model's companion files (tokenizer, template).
    pub fn folder(&self) -> Option<PathBuf> {
        match self {
            Self::Gguf(f) => f.path.parent().map(Path::to_path_buf),
            Self::Folder { dir, .. } => Some(dir.clone()),
        }
    }

    /// `config.json`, for a folder.
    pub fn config(&self) -> Option<&serde_json::Map<String, Value>> {
        match self {
            Self::Gguf(_) => None,
            Self::Folder { config, .. } => Some(config),
        }
    }
}

/// The Hugging Face name of a GGUF tensor name (llama.cpp's converter, read backwards).
pub fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match rest {
        "attn_norm.weight" => "input_layernorm.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "attn_q.bias" => "self_attn.q_proj.bias",
        "attn_k.bias" => "self_attn.k_proj.bias",
        "attn_v.bias" => "self_attn.v_proj.bias",
        "attn_q_norm.weight" => "self_attn.q_norm.weight",
        "attn_k_norm.weight" => "self_attn.k_norm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_weights_stay_half_precision_only_off_the_cpu() {
        // (WASMLM_DENSE_DTYPE is not set in tests.)
        let cpu = Device::Cpu;
        assert_eq!(dense_dtype(DType::BF16, &cpu), DType::F32);
        assert_eq!(dense_dtype(DType::F16, &cpu), DType::F32);
        assert_eq!(dense_dtype(DType::F32, &cpu), DType::F32);
    }

    #[test]
    fn translates_names() {
        assert_eq!(
            hf_name("blk.12.attn_k_norm.weight").as_deref(),
            Some("model.layers.12.self_attn.k_norm.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("rope_freqs.weight"), None);
    }
}
