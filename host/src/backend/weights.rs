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

use super::linear::{native_matrix, Linear, Stacked};
use super::{plain_message, BackendModelError, DenseDType};
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

    /// `(rows, columns)` of a matrix; `None` for any other rank.
    fn matrix_dims(&self) -> Option<(usize, usize)> {
        match self.shape().dims() {
            &[rows, cols] => Some((rows, cols)),
            _ => None,
        }
    }

    fn shape(&self) -> &candle_core::Shape {
        match self {
            Param::Quant(q) => q.shape(),
            Param::Dense(t) => t.shape(),
        }
    }

    /// Whether `other` can be stacked under `self` as one matrix: same storage, same width.
    fn stacks_with(&self, other: &Param) -> bool {
        let same_storage = match (self, other) {
            (Param::Quant(a), Param::Quant(b)) => a.dtype() == b.dtype(),
            (Param::Dense(a), Param::Dense(b)) => a.dtype() == b.dtype(),
            _ => false,
        };
        match (self.matrix_dims(), other.matrix_dims()) {
            (Some((_, a)), Some((_, b))) => same_storage && a == b,
            _ => false,
        }
    }

    /// `parts` (each `stacks_with` the first) as one matrix on `device`, with each one's
    /// number of rows. Quantized parts are on the host, where their bytes can be joined.
    fn stack(
        parts: Vec<Param>,
        device: &Device,
    ) -> Result<(Linear, Vec<usize>), BackendModelError> {
        let widths: Vec<usize> = parts
            .iter()
            .map(|p| p.matrix_dims().map_or(0, |(rows, _)| rows))
            .collect();
        let mut parts = parts;
        // One part needs no joining, unless its host blocks must move to the device.
        if parts.len() == 1 && (device.is_cpu() || matches!(parts[0], Param::Dense(_))) {
            if let Some(p) = parts.pop() {
                return Ok((p.matmul()?, widths));
            }
        }
        let linear = match parts.as_slice() {
            [Param::Quant(first), ..] => {
                use candle_core::quantized::ggml_file::qtensor_from_ggml;
                let (dtype, dims) = (first.dtype(), first.shape().dims().to_vec());
                let mut bytes = Vec::new();
                for p in &parts {
                    if let Param::Quant(q) = p {
                        bytes.extend_from_slice(&q.data()?);
                    }
                }
                let dims = match dims.as_slice() {
                    [_, cols] => vec![widths.iter().sum(), *cols],
                    _ => dims,
                };
                // candle reads the blocks through a pointer cast without checking the length.
                let expected =
                    dims.iter().product::<usize>() / dtype.block_size() * dtype.type_size();
                if bytes.len() != expected {
                    return Err(BackendModelError::Invalid(format!(
                        "stacked {dtype:?} matrices of {dims:?} hold {} bytes, not {expected}",
                        bytes.len()
                    )));
                }
                Linear::quantized(qtensor_from_ggml(dtype, &bytes, dims, device)?)?
            }
            _ => {
                let ts: Vec<&Tensor> = parts
                    .iter()
                    .filter_map(|p| match p {
                        Param::Dense(t) => Some(t),
                        Param::Quant(_) => None,
                    })
                    .collect();
                Linear::dense(Tensor::cat(&ts, 0)?)
            }
        };
        Ok((linear, widths))
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

/// `params` as products on `device`, each run of adjacent matrices that stack as one.
fn stack_all(params: Vec<Param>, device: &Device) -> Result<Stacked, BackendModelError> {
    let mut stacks = Vec::new();
    let mut run: Vec<Param> = Vec::new();
    for p in params {
        if run.first().is_some_and(|first| !first.stacks_with(&p)) {
            stacks.push(Param::stack(std::mem::take(&mut run), device)?);
        }
        run.push(p);
    }
    if !run.is_empty() {
        stacks.push(Param::stack(run, device)?);
    }
    Ok(Stacked::new(stacks))
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

/// The dtype a dense weight of `stored` dtype is kept in on `device` under `policy`. A GPU
/// multiplies bf16/f16 at twice the bytes per second of f32 (decode reads every weight once
/// per token), with f32 accumulation; the CPU pass wants f32.
pub fn dense_dtype(stored: DType, device: &Device, policy: DenseDType) -> DType {
    let half = matches!(stored, DType::BF16 | DType::F16);
    match policy {
        DenseDType::F32 => DType::F32,
        DenseDType::Stored if half => stored,
        DenseDType::Auto if half && !device.is_cpu() => stored,
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
        /// What dtype dense bf16/f16 weights are kept in.
        dense: DenseDType,
    },
}

impl WeightSource {
    /// Opens a GGUF file or a Hugging Face model folder, whose bf16/f16 weights `dense` places.
    pub fn open(path: &Path, dense: DenseDType) -> Result<Self, BackendModelError> {
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
            dense,
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
            Self::Folder { tensors, dense, .. } => {
                let hf = hf_name(name).ok_or_else(|| {
                    BackendModelError::Tensor(name.into(), "no Hugging Face name".into())
                })?;
                let t = tensors
                    .load(&hf, device)
                    .and_then(|t| t.to_dtype(dense_dtype(t.dtype(), device, *dense)))
                    .map_err(|e| BackendModelError::Tensor(hf.clone(), plain_message(&e)))?;
                Ok(Param::Dense(t))
            }
        }
    }

    /// The matrices `names`, which multiply one input, as few stacked products (see
    /// [`Stacked`]).
    pub fn stacked(
        &mut self,
        names: &[String],
        device: &Device,
    ) -> Result<Stacked, BackendModelError> {
        // GGUF blocks are read on the host, where the bytes of several matrices can be joined.
        let at = match self {
            Self::Gguf(_) => Device::Cpu,
            Self::Folder { .. } => device.clone(),
        };
        let params = names
            .iter()
            .map(|name| self.tensor(name, &at))
            .collect::<Result<Vec<_>, _>>()?;
        stack_all(params, device)
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
        let cpu = Device::Cpu;
        for stored in [DType::BF16, DType::F16, DType::F32] {
            assert_eq!(dense_dtype(stored, &cpu, DenseDType::Auto), DType::F32);
            assert_eq!(dense_dtype(stored, &cpu, DenseDType::F32), DType::F32);
        }
        assert_eq!(
            dense_dtype(DType::BF16, &cpu, DenseDType::Stored),
            DType::BF16
        );
        assert_eq!(
            dense_dtype(DType::F16, &cpu, DenseDType::Stored),
            DType::F16
        );
        assert_eq!(
            dense_dtype(DType::F32, &cpu, DenseDType::Stored),
            DType::F32
        );
    }

    /// Stacked quantized products equal the separate ones to the bit (each output is one
    /// row's dot product either way), and only matrices of one format and width stack.
    #[test]
    fn stacked_products_equal_separate_ones() {
        use candle_core::quantized::GgmlDType;
        let dev = Device::Cpu;
        let matrix = |rows: usize, cols: usize, seed: f32| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|i| (i as f32 * 0.37 + seed).sin() * 2.0)
                .collect();
            Tensor::from_vec(v, (rows, cols), &dev).unwrap()
        };
        let quant = |t: &Tensor, f: GgmlDType| Param::Quant(QTensor::quantize(t, f).unwrap());
        let (q, k, v, other) = (
            matrix(64, 256, 0.0),
            matrix(32, 256, 1.0),
            matrix(32, 256, 2.0),
            matrix(32, 64, 3.0),
        );
        let x: Vec<f32> = (0..3 * 256).map(|i| (i as f32 * 0.11).cos()).collect();
        for (format, dense) in [
            (GgmlDType::Q8_0, false),
            (GgmlDType::Q4K, false),
            (GgmlDType::Q5_0, false),
            (GgmlDType::F32, true),
        ] {
            let param = |t: &Tensor| {
                if dense {
                    Param::Dense(t.clone())
                } else {
                    quant(t, format)
                }
            };
            let stacked = stack_all(vec![param(&q), param(&k), param(&v)], &dev).unwrap();
            assert_eq!(stacked.products(), 1, "{format:?}");
            let together = stacked.rows(&x, 3).unwrap();
            let xt = Tensor::from_slice(&x, (1, 3, 256), &dev).unwrap();
            let as_tensors = stacked.forward(&xt).unwrap();
            for (i, t) in [&q, &k, &v].into_iter().enumerate() {
                let alone = param(t).matmul().unwrap().rows(&x, 3).unwrap();
                if dense {
                    // A dense product's blocking (so its summation order) follows its shape.
                    let close = together[i]
                        .iter()
                        .zip(&alone)
                        .all(|(a, b)| (a - b).abs() < 1e-4);
                    assert!(close, "{format:?} part {i}");
                } else {
                    assert_eq!(together[i], alone, "{format:?} part {i}");
                }
                let tensor: Vec<f32> = as_tensors[i].flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(as_tensors[i].dims(), &[1, 3, t.dim(0).unwrap()]);
                let close = tensor.iter().zip(&alone).all(|(a, b)| (a - b).abs() < 1e-3);
                assert!(close, "{format:?} part {i} as tensors");
            }
        }
        // Formats and widths part the runs: [q8 q8] [q4_0] [q4_0 of another width].
        let mixed = stack_all(
            vec![
                quant(&q, GgmlDType::Q8_0),
                quant(&k, GgmlDType::Q8_0),
                quant(&v, GgmlDType::Q4_0),
                quant(&other, GgmlDType::Q4_0),
            ],
            &dev,
        )
        .unwrap();
        assert_eq!(mixed.products(), 3);
        let x: Vec<f32> = x[..256].to_vec();
        assert!(
            mixed.rows(&x, 1).is_err(),
            "a 64-wide matrix refuses 256 inputs"
        );
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
