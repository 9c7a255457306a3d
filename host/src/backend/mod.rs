//! The candle backend of `wasi:nn`: GGUF models behind wasmtime-wasi-nn's backend traits,
//! speaking the LLM tensor protocol (`docs/wasi-nn-protocol.md`).
//!
//! One architecture per file behind [`CausalLm`]; a graph is a loaded model shared by all its
//! execution contexts, and an execution context is one sequence with its own [`KvCache`].

pub mod batch;
pub mod bert;
pub mod decoder;
pub mod gemma3;
pub mod kv_cache;
pub mod linear;
pub mod llama;
pub mod qwen2;
pub mod qwen3;
pub mod weights;

use std::path::Path;
use std::sync::Arc;

use candle_core::Device;
use serde_json::json;
use wasmtime_wasi_nn::backend::{
    BackendError, BackendExecutionContext, BackendFromDir, BackendGraph, BackendInner, Id,
    NamedTensor,
};
use wasmtime_wasi_nn::wit::{ExecutionTarget, GraphEncoding, TensorType};
use wasmtime_wasi_nn::{ExecutionContext, Graph, Tensor};

use crate::gguf::GgufError;
use kv_cache::KvCache;
pub use kv_cache::KvDType;
use weights::WeightSource;

/// Version of the tensor protocol the backend speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Most tokens one forward pass takes. Longer inputs run in chunks: attention scratch grows
/// with chunk × context (scores for 64 tokens at a 2k context are ~5 MB per layer, for 512
/// ~40 MB), and the guest decides how many tokens it sends.
const MAX_TOKENS_PER_PASS: usize = 64;

/// Architectures this backend runs, by GGUF `general.architecture` or `config.json`'s
/// `model_type`.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "qwen2", "qwen3", "gemma3", "bert"];

/// A decoder-only language model: the seam between the protocol and each architecture.
pub trait CausalLm: Send + Sync {
    /// Appends `tokens` to the sequence in `cache` and returns the logits after the last one.
    fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> candle_core::Result<Vec<f32>>;
    /// Appends one token to each of several sequences in one pass (batched decode) and
    /// returns each one's logits. The default runs them one by one.
    fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        tokens
            .iter()
            .zip(caches.iter_mut())
            .map(|(&t, c)| self.forward(&[t], c))
            .collect()
    }
    /// An empty cache for one sequence of at most `max_len` positions.
    fn new_cache(&self, max_len: usize) -> KvCache;
    /// Number of logits per position.
    fn vocab_size(&self) -> usize;
}

/// A bidirectional encoder: the last hidden states of one whole sequence.
pub trait Encoder: Send + Sync {
    /// `(n, hidden)` hidden states of `tokens`.
    fn encode(&self, tokens: &[u32]) -> candle_core::Result<candle_core::Tensor>;
    /// The hidden states of each of several sequences; the default encodes them one by one.
    fn encode_batch(&self, seqs: &[&[u32]]) -> candle_core::Result<Vec<candle_core::Tensor>> {
        seqs.iter().map(|s| self.encode(s)).collect()
    }
    /// Number of token ids.
    fn vocab_size(&self) -> usize;
    /// Width of a hidden state.
    fn hidden_size(&self) -> usize;
    /// Longest sequence.
    fn max_positions(&self) -> usize;
}

/// What a model computes.
pub enum Weights {
    /// A generator: logits of the next token, with a KV cache per sequence.
    Causal(Box<dyn CausalLm>),
    /// An embedding model: hidden states of a whole sequence.
    Encoder(Box<dyn Encoder>),
}

impl Weights {
    /// Number of token ids.
    pub fn vocab_size(&self) -> usize {
        match self {
            Weights::Causal(m) => m.vocab_size(),
            Weights::Encoder(m) => m.vocab_size(),
        }
    }

    /// The generator, if the model is one.
    pub fn causal(&self) -> Option<&dyn CausalLm> {
        match self {
            Weights::Causal(m) => Some(&**m),
            Weights::Encoder(_) => None,
        }
    }

    /// "generator" or "embedding": what the model can be asked for.
    pub fn kind(&self) -> &'static str {
        match self {
            Weights::Causal(_) => "generator",
            Weights::Encoder(_) => "embedding",
        }
    }
}

/// Why a model cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum BackendModelError {
    #[error(transparent)]
    File(#[from] GgufError),
    #[error("{path}: architecture '{arch}' is not supported (supported: {supported})")]
    UnsupportedArchitecture {
        path: String,
        arch: String,
        supported: String,
    },
    #[error("missing model metadata: {0}")]
    MissingMetadata(String),
    #[error("tensor {0}: {1}")]
    Tensor(String, String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("KV cache: {0}")]
    KvCache(String),
    #[error("{}", plain_message(.0))]
    Candle(#[from] candle_core::Error),
}

/// A candle error's message without the backtrace candle attaches when `RUST_BACKTRACE` is set.
pub fn plain_message(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => plain_message(inner),
        candle_core::Error::Context { inner, context } => {
            format!("{context}: {}", plain_message(inner))
        }
        other => other.to_string(),
    }
}

/// Which forward pass a decoder runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pass {
    /// The CPU's own pass over plain rows on the CPU, candle's tensor pass elsewhere.
    #[default]
    Auto,
    /// candle's tensor pass everywhere: what a GPU runs, run on the CPU to check or compare it.
    Tensors,
}

/// The dtype dense (safetensors) bf16/f16 weights are kept in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DenseDType {
    /// f32 on the CPU, the stored bf16/f16 elsewhere (see [`weights::dense_dtype`]).
    #[default]
    Auto,
    /// f32 everywhere.
    F32,
    /// As stored, everywhere (on the CPU too: what a GPU computes, to check it there).
    Stored,
}

/// How a model is loaded, beyond its file and device.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Caps the model's own context length.
    pub context: Option<usize>,
    pub pass: Pass,
    pub dense: DenseDType,
    /// The CPU pass's KV cache type.
    pub kv: KvDType,
}

impl LoadOptions {
    /// The defaults, with a context cap, and the developers' overrides from the environment:
    /// `WASMLM_FORWARD=tensors`, `WASMLM_DENSE_DTYPE=f32|stored` and `WASMLM_KV_DTYPE=f32|q8_0`.
    pub fn from_env(context: Option<usize>) -> Self {
        let var = |k: &str| std::env::var(k).unwrap_or_default();
        Self {
            context,
            pass: match var("WASMLM_FORWARD").as_str() {
                "tensors" => Pass::Tensors,
                _ => Pass::Auto,
            },
            dense: match var("WASMLM_DENSE_DTYPE").as_str() {
                "f32" => DenseDType::F32,
                "stored" => DenseDType::Stored,
                _ => DenseDType::Auto,
            },
            kv: KvDType::from_env(),
        }
    }
}

/// A model in memory, ready to serve sequences.
pub struct LoadedModel {
    pub architecture: String,
    pub context_length: usize,
    pub weights: Weights,
    /// The protocol's metadata document, built once.
    pub metadata: Vec<u8>,
    pub file_size: u64,
    /// Where concurrent decode steps meet to run as one batch.
    pub batcher: batch::Batcher,
}

impl LoadedModel {
    /// Loads a GGUF file or a Hugging Face model folder; `context` caps the model's own
    /// context length. What the model is comes from its metadata, never its file name.
    pub fn from_path(
        path: &Path,
        options: &LoadOptions,
        device: &Device,
    ) -> Result<Self, BackendModelError> {
        let context = options.context;
        let mut src = WeightSource::open(path, options.dense)?;
        let file_size = model_size(path);
        let arch = src.architecture().unwrap_or_default();
        let family = match arch.as_str() {
            "llama" => Some(llama::FAMILY),
            "qwen2" => Some(qwen2::FAMILY),
            "qwen3" => Some(qwen3::FAMILY),
            "gemma3" => Some(gemma3::FAMILY),
            _ => None,
        };
        if family.is_some_and(|f| f.post_norms) && src.config().is_some() {
            // Hugging Face stores Gemma norms as `w` for `x * (1 + w)`; only GGUF files hold
            // them as the plain RMS norm weights this decoder multiplies by.
            return Err(BackendModelError::Invalid(format!(
                "{arch} is supported from GGUF files, not Hugging Face folders yet"
            )));
        }
        let (weights, context_length) = if let Some(family) = family {
            let (m, ctx) = decoder::load_family(&mut src, &arch, family, options, device)?;
            (Weights::Causal(Box::new(m)), ctx)
        } else if arch == "bert" {
            let m = bert::Bert::load(&src, device)?;
            let ctx = context.map_or(m.max_positions(), |c| c.min(m.max_positions()));
            (Weights::Encoder(Box::new(m)), ctx.max(1))
        } else {
            return Err(BackendModelError::UnsupportedArchitecture {
                path: path.display().to_string(),
                arch: if arch.is_empty() {
                    "(none)".into()
                } else {
                    arch
                },
                supported: SUPPORTED_ARCHITECTURES.join(", "),
            });
        };
        let mut doc = json!({
            "protocol": PROTOCOL_VERSION,
            "architecture": arch,
            "context_length": context_length,
            "vocab_size": weights.vocab_size(),
            "kind": weights.kind(),
            "gguf": src.metadata_json(),
        });
        if let Some(config) = src.config() {
            doc["hf_config"] = json!(config);
        }
        // A model folder's tokenizer and template files travel with the metadata.
        if let Some(dir) = src.folder() {
            for (key, file) in [
                ("tokenizer_json", "tokenizer.json"),
                ("tokenizer_config_json", "tokenizer_config.json"),
                ("chat_template_jinja", "chat_template.jinja"),
            ] {
                if let Ok(text) = std::fs::read_to_string(dir.join(file)) {
                    doc[key] = json!(text);
                }
            }
            // A sentence-transformers folder says how to pool and normalize.
            let read = |f: &str| {
                std::fs::read_to_string(dir.join(f))
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            };
            if let Some(modules) = read("modules.json") {
                doc["sentence_transformers"] = json!({
                    "modules": modules,
                    "pooling": read("1_Pooling/config.json"),
                    "config": read("sentence_bert_config.json"),
                });
            }
        }
        let metadata =
            serde_json::to_vec(&doc).map_err(|e| BackendModelError::Invalid(e.to_string()))?;
        let architecture = doc["architecture"].as_str().unwrap_or_default().to_string();
        drop(doc);
        drop(src);
        release_freed_memory();
        Ok(Self {
            architecture,
            context_length,
            weights,
            metadata,
            file_size,
            batcher: batch::Batcher::default(),
        })
    }
}

impl LoadedModel {
    /// Replaces (or supplies) the model's chat template.
    pub fn set_chat_template(&mut self, template: &str) -> Result<(), BackendModelError> {
        let mut doc: serde_json::Value = serde_json::from_slice(&self.metadata)
            .map_err(|e| BackendModelError::Invalid(e.to_string()))?;
        doc["chat_template_override"] = json!(template);
        self.metadata =
            serde_json::to_vec(&doc).map_err(|e| BackendModelError::Invalid(e.to_string()))?;
        Ok(())
    }
}

/// Bytes of a model file, or of a folder's files.
fn model_size(path: &Path) -> u64 {
    if path.is_dir() {
        std::fs::read_dir(path)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.metadata().ok())
                    .filter(|m| m.is_file())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    } else {
        std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
    }
}

/// Returns freed heap pages to the OS. Loading leaves tens of MB of freed small allocations
/// (the GGUF metadata tree, its JSON form, read buffers) that glibc would otherwise keep
/// resident for the life of the process.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases memory the allocator already considers free.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The `ggml` encoding's backend. Models are normally preloaded by name; `graph.load` with
/// GGUF bytes is refused, so a guest cannot make the host allocate arbitrary models.
#[derive(Default)]
pub struct CandleBackend;

impl BackendInner for CandleBackend {
    fn encoding(&self) -> GraphEncoding {
        GraphEncoding::Ggml
    }

    fn load(
        &mut self,
        _builders: &[&[u8]],
        _target: ExecutionTarget,
    ) -> Result<Graph, BackendError> {
        Err(protocol_error(
            "loading models from guest bytes is disabled: use load-by-name with a model the host preloaded",
        ))
    }

    fn as_dir_loadable(&mut self) -> Option<&mut dyn BackendFromDir> {
        None
    }
}

/// A graph: one loaded model.
pub struct CandleGraph(pub Arc<LoadedModel>);

impl CandleGraph {
    /// The wasi-nn graph for `model`.
    pub fn graph(model: Arc<LoadedModel>) -> Graph {
        let inner: Box<dyn BackendGraph> = Box::new(CandleGraph(model));
        Graph::from(inner)
    }
}

impl BackendGraph for CandleGraph {
    fn init_execution_context(&self) -> Result<ExecutionContext, BackendError> {
        let ctx: Box<dyn BackendExecutionContext> = Box::new(Sequence::new(self.0.clone()));
        Ok(ExecutionContext::from(ctx))
    }
}

/// An execution context: one sequence and its KV cache.
pub struct Sequence {
    model: Arc<LoadedModel>,
    cache: KvCache,
    /// Tells this sequence's steps apart in the model's batcher.
    id: u64,
}

/// The next [`Sequence::id`].
static NEXT_SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Sequence {
    /// An empty sequence on `model`.
    pub fn new(model: Arc<LoadedModel>) -> Self {
        let cache = match &model.weights {
            Weights::Causal(m) => m.new_cache(model.context_length),
            Weights::Encoder(_) => KvCache::new(0, 0),
        };
        let id = NEXT_SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self { model, cache, id }
    }

    /// The hidden states of several whole sequences, `tokens` holding them one after another
    /// (`lengths` says where each ends), in one pass: `sum(lengths) * hidden` values.
    pub fn encode_batch(
        &self,
        tokens: &[u32],
        lengths: &[usize],
    ) -> Result<(Vec<f32>, usize), String> {
        let Weights::Encoder(m) = &self.model.weights else {
            return Err("this model is a generator: send input_ids for logits".into());
        };
        if tokens.is_empty() || lengths.contains(&0) {
            return Err("input_ids is empty".into());
        }
        if lengths.iter().sum::<usize>() != tokens.len() {
            return Err(format!(
                "sequence_lengths add up to {}, but input_ids holds {}",
                lengths.iter().sum::<usize>(),
                tokens.len()
            ));
        }
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= m.vocab_size()) {
            return Err(format!(
                "token id {bad} is outside the vocabulary (size {})",
                m.vocab_size()
            ));
        }
        if let Some(&n) = lengths.iter().find(|&&n| n > self.model.context_length) {
            return Err(format!(
                "context overflow: {n} tokens do not fit the context of {}",
                self.model.context_length
            ));
        }
        let mut seqs = Vec::with_capacity(lengths.len());
        let mut at = 0;
        for &n in lengths {
            seqs.push(&tokens[at..at + n]);
            at += n;
        }
        let mut states = Vec::with_capacity(tokens.len() * m.hidden_size());
        for t in m.encode_batch(&seqs).map_err(|e| plain_message(&e))? {
            states.extend(
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| plain_message(&e))?,
            );
        }
        Ok((states, m.hidden_size()))
    }

    /// Appends tokens and returns the logits after the last, with the protocol's checks.
    pub fn extend(&mut self, tokens: &[u32]) -> Result<Vec<f32>, String> {
        let Weights::Causal(weights) = &self.model.weights else {
            return Err("this model is an encoder: it gives hidden states, not logits".into());
        };
        if tokens.is_empty() {
            return Err("input_ids is empty".into());
        }
        let vocab = weights.vocab_size();
        if let Some(bad) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(format!(
                "token id {bad} is outside the vocabulary (size {vocab})"
            ));
        }
        let end = self.cache.len() + tokens.len();
        if end > self.cache.max_len() {
            return Err(format!(
                "context overflow: {end} tokens do not fit the context of {}",
                self.cache.max_len()
            ));
        }
        let mut logits = Vec::new();
        for chunk in tokens.chunks(MAX_TOKENS_PER_PASS) {
            let cache = std::mem::replace(&mut self.cache, KvCache::new(0, 0));
            let (cache, out) = self
                .model
                .batcher
                .forward(&**weights, self.id, chunk, cache);
            self.cache = cache;
            logits = out?;
        }
        Ok(logits)
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Keeps the first `len` positions.
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len)
    }
}

fn protocol_error(msg: impl std::fmt::Display) -> BackendError {
    BackendError::BackendAccess(wasmtime::format_err!("{msg}"))
}

fn ids_of(t: &Tensor) -> Result<Vec<u32>, BackendError> {
    let values: Vec<i64> = match t.ty {
        TensorType::I64 => t
            .data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect(),
        TensorType::I32 => t
            .data
            .chunks_exact(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap_or_default()) as i64)
            .collect(),
        other => {
            return Err(protocol_error(format!(
                "token tensors must be i64 or i32, not {other:?}"
            )))
        }
    };
    values
        .into_iter()
        .map(|v| {
            u32::try_from(v).map_err(|_| protocol_error(format!("token id {v} is out of range")))
        })
        .collect()
}

fn tensor(ty: TensorType, dims: Vec<u32>, data: Vec<u8>) -> Tensor {
    Tensor::new(dims, ty, data)
}

impl BackendExecutionContext for Sequence {
    fn set_input(&mut self, _id: Id, _tensor: &Tensor) -> Result<(), BackendError> {
        Err(protocol_error(
            "the LLM protocol uses compute with named tensors only",
        ))
    }

    fn get_output(&mut self, _id: Id) -> Result<Tensor, BackendError> {
        Err(protocol_error(
            "the LLM protocol uses compute with named tensors only",
        ))
    }

    fn compute(
        &mut self,
        inputs: Option<Vec<NamedTensor>>,
    ) -> Result<Option<Vec<NamedTensor>>, BackendError> {
        let inputs = inputs.unwrap_or_default();
        let mut outputs = Vec::new();
        let find = |name: &str| inputs.iter().find(|t| t.name == name).map(|t| &t.tensor);
        if let Some(unknown) = inputs.iter().find(|t| {
            !matches!(
                t.name.as_str(),
                "truncate" | "input_ids" | "sequence_lengths" | "metadata"
            )
        }) {
            return Err(protocol_error(format!(
                "unknown input tensor '{}'",
                unknown.name
            )));
        }
        if find("metadata").is_some() {
            let md = self.model.metadata.clone();
            outputs.push(NamedTensor {
                name: "metadata".into(),
                tensor: tensor(TensorType::U8, vec![md.len() as u32], md),
            });
        }
        if let Some(t) = find("truncate") {
            let len = *ids_of(t)?
                .first()
                .ok_or_else(|| protocol_error("truncate needs one value"))?;
            if len as usize > self.len() {
                return Err(protocol_error(format!(
                    "cannot truncate to {len}: the sequence holds {}",
                    self.len()
                )));
            }
            self.truncate(len as usize);
        }
        if let (Some(t), Weights::Encoder(_)) = (find("input_ids"), &self.model.weights) {
            let ids = ids_of(t)?;
            let lengths: Vec<usize> = match find("sequence_lengths") {
                Some(l) => ids_of(l)?.into_iter().map(|n| n as usize).collect(),
                None => vec![ids.len()],
            };
            let (states, hidden) = self.encode_batch(&ids, &lengths).map_err(protocol_error)?;
            let n = (states.len() / hidden.max(1)) as u32;
            let bytes: Vec<u8> = states.iter().flat_map(|l| l.to_le_bytes()).collect();
            outputs.push(NamedTensor {
                name: "hidden_states".into(),
                tensor: tensor(TensorType::Fp32, vec![n, hidden as u32], bytes),
            });
        } else if let Some(t) = find("input_ids") {
            let logits = self.extend(&ids_of(t)?).map_err(protocol_error)?;
            let bytes: Vec<u8> = logits.iter().flat_map(|l| l.to_le_bytes()).collect();
            outputs.push(NamedTensor {
                name: "logits".into(),
                tensor: tensor(TensorType::Fp32, vec![logits.len() as u32], bytes),
            });
        }
        outputs.push(NamedTensor {
            name: "n_past".into(),
            tensor: tensor(
                TensorType::I64,
                vec![1],
                (self.len() as i64).to_le_bytes().to_vec(),
            ),
        });
        Ok(Some(outputs))
    }
}
