//! Opening GGUF files with errors a user can act on, and their metadata as JSON.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use serde_json::{Map, Value as Json};

/// Why a model file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("model file not found: {0}")]
    NotFound(PathBuf),
    #[error("cannot read model file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not a GGUF file (it does not start with the GGUF magic)")]
    NotGguf(PathBuf),
    #[error("{path} is not a valid GGUF file: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path} is truncated: tensor {tensor} ends at byte {end} but the file has {size} bytes"
    )]
    Truncated {
        path: PathBuf,
        tensor: String,
        end: u64,
        size: u64,
    },
}

/// A parsed GGUF header and a reader positioned anywhere in the file.
pub struct GgufFile {
    pub path: PathBuf,
    pub content: gguf_file::Content,
    pub reader: BufReader<File>,
}

impl GgufFile {
    /// Opens and checks `path`: magic, header, and that every tensor lies inside the file.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => GgufError::NotFound(path.to_path_buf()),
            _ => io(e),
        })?;
        if file.metadata().map_err(io)?.is_dir() {
            return Err(GgufError::NotGguf(path.to_path_buf()));
        }
        let size = file.metadata().map_err(io)?.len();
        let mut reader = BufReader::new(file);
        let mut magic = [0u8; 4];
        if reader.read_exact(&mut magic).is_err() || &magic != b"GGUF" {
            return Err(GgufError::NotGguf(path.to_path_buf()));
        }
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        let content = gguf_file::Content::read(&mut reader).map_err(|e| GgufError::Invalid {
            path: path.to_path_buf(),
            reason: crate::backend::plain_message(&e),
        })?;
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let bytes = (elems / info.ggml_dtype.block_size()) * info.ggml_dtype.type_size();
            let end = content.tensor_data_offset + info.offset + bytes as u64;
            if end > size {
                return Err(GgufError::Truncated {
                    path: path.to_path_buf(),
                    tensor: name.clone(),
                    end,
                    size,
                });
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            reader,
        })
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// A metadata integer.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.get(key).and_then(|v| v.to_u32().ok())
    }

    /// A metadata float.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.get(key).and_then(|v| v.to_f32().ok())
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<String> {
        self.get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned()
    }

    /// Every metadata key, as JSON (arrays of strings stay arrays).
    pub fn metadata_json(&self) -> Map<String, Json> {
        let mut keys: Vec<&String> = self.content.metadata.keys().collect();
        keys.sort();
        keys.into_iter()
            .map(|k| (k.clone(), to_json(&self.content.metadata[k])))
            .collect()
    }
}

fn to_json(v: &Value) -> Json {
    match v {
        Value::U8(x) => Json::from(*x),
        Value::I8(x) => Json::from(*x),
        Value::U16(x) => Json::from(*x),
        Value::I16(x) => Json::from(*x),
        Value::U32(x) => Json::from(*x),
        Value::I32(x) => Json::from(*x),
        Value::U64(x) => Json::from(*x),
        Value::I64(x) => Json::from(*x),
        Value::F32(x) => Json::from(*x),
        Value::F64(x) => Json::from(*x),
        Value::Bool(x) => Json::from(*x),
        Value::String(s) => Json::from(s.as_str()),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
    }
}
