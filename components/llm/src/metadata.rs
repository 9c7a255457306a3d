//! The model facts the component needs, read from the metadata JSON the host sends over wasi-nn.

use std::fmt;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

/// Version of the tensor protocol this component speaks (see `docs/wasi-nn-protocol.md`).
pub const PROTOCOL_VERSION: u64 = 1;

/// The metadata document of protocol version 1.
#[derive(Debug, Deserialize)]
pub struct ModelMetadata {
    pub protocol: u64,
    pub architecture: String,
    pub context_length: u32,
    pub vocab_size: u32,
    /// GGUF key-value metadata.
    #[serde(default)]
    pub gguf: GgufMetadata,
    /// Text of the model folder's `tokenizer.json`, when there is one.
    #[serde(default)]
    pub tokenizer_json: Option<String>,
    /// Text of the model folder's `tokenizer_config.json`, when there is one.
    #[serde(default)]
    pub tokenizer_config_json: Option<String>,
    /// A chat template the host was told to use instead of the model's own.
    #[serde(default)]
    pub chat_template_override: Option<String>,
    /// Text of the model folder's `chat_template.jinja`, when there is one.
    #[serde(default)]
    pub chat_template_jinja: Option<String>,
    /// "generator" (logits, KV cache) or "embedding" (hidden states of whole sequences).
    #[serde(default = "generator")]
    pub kind: String,
    /// A sentence-transformers folder's `modules.json`, pooling and model config.
    #[serde(default)]
    pub sentence_transformers: Option<Value>,
    /// The model folder's `config.json`.
    #[serde(default)]
    pub hf_config: Option<Map<String, Value>>,
}

/// GGUF metadata. The vocabulary arrays (about 100k strings for a typical model) are read
/// straight into typed vectors: as generic JSON values they would cost several times the
/// memory, and a wasm instance never gives memory back.
#[derive(Debug, Default)]
pub struct GgufMetadata {
    /// `tokenizer.ggml.tokens`.
    pub tokens: Option<Vec<String>>,
    /// `tokenizer.ggml.merges`.
    pub merges: Option<Vec<String>>,
    /// `tokenizer.ggml.token_type`.
    pub token_type: Option<Vec<i32>>,
    /// `tokenizer.ggml.scores` (SentencePiece vocabularies).
    pub scores: Option<Vec<f32>>,
    /// Every other key.
    pub other: Map<String, Value>,
}

impl<'de> Deserialize<'de> for GgufMetadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct GgufVisitor;
        impl<'de> Visitor<'de> for GgufVisitor {
            type Value = GgufMetadata;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of GGUF metadata")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<GgufMetadata, A::Error> {
                let mut out = GgufMetadata::default();
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "tokenizer.ggml.tokens" => out.tokens = Some(map.next_value()?),
                        "tokenizer.ggml.merges" => out.merges = Some(map.next_value()?),
                        "tokenizer.ggml.token_type" => out.token_type = Some(map.next_value()?),
                        "tokenizer.ggml.scores" => out.scores = Some(map.next_value()?),
                        _ => {
                            let v: Value = map.next_value()?;
                            out.other.insert(key, v);
                        }
                    }
                }
                Ok(out)
            }
        }
        d.deserialize_map(GgufVisitor)
    }
}

fn generator() -> String {
    "generator".into()
}

impl ModelMetadata {
    /// A GGUF string value.
    pub fn gguf_str(&self, key: &str) -> Option<&str> {
        self.gguf.other.get(key).and_then(Value::as_str)
    }

    /// A GGUF integer value.
    pub fn gguf_u32(&self, key: &str) -> Option<u32> {
        self.gguf
            .other
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// A GGUF boolean value.
    pub fn gguf_bool(&self, key: &str) -> Option<bool> {
        self.gguf.other.get(key).and_then(Value::as_bool)
    }

    /// `tokenizer_config.json` parsed, or an empty object.
    pub fn tokenizer_config(&self) -> Map<String, Value> {
        self.tokenizer_config_json
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    }
}
