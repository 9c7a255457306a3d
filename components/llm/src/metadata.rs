//! The model facts the component needs, read from the metadata JSON the host sends over wasi-nn.

use serde::Deserialize;
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
    /// GGUF key-value metadata, verbatim.
    #[serde(default)]
    pub gguf: Map<String, Value>,
    /// Text of the model folder's `tokenizer.json`, when there is one.
    #[serde(default)]
    pub tokenizer_json: Option<String>,
    /// Text of the model folder's `tokenizer_config.json`, when there is one.
    #[serde(default)]
    pub tokenizer_config_json: Option<String>,
}

impl ModelMetadata {
    /// A GGUF string value.
    pub fn gguf_str(&self, key: &str) -> Option<&str> {
        self.gguf.get(key).and_then(Value::as_str)
    }

    /// A GGUF integer value.
    pub fn gguf_u32(&self, key: &str) -> Option<u32> {
        self.gguf
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|v| u32::try_from(v).ok())
    }

    /// A GGUF boolean value.
    pub fn gguf_bool(&self, key: &str) -> Option<bool> {
        self.gguf.get(key).and_then(Value::as_bool)
    }

    /// A GGUF array value.
    pub fn gguf_array(&self, key: &str) -> Option<&Vec<Value>> {
        self.gguf.get(key).and_then(Value::as_array)
    }

    /// `tokenizer_config.json` parsed, or an empty object.
    pub fn tokenizer_config(&self) -> Map<String, Value> {
        self.tokenizer_config_json
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default()
    }
}
