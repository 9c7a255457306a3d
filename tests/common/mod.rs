//! Helpers shared by the end-to-end tests: the real test model and the reference vectors.

#![allow(dead_code)]

pub mod node;

use std::path::PathBuf;

use serde_json::Value;
use wasmlm_host::models::{self, ModelSpec};

/// Path of the default model (SmolLM2-135M-Instruct Q4_1), fetched if missing.
pub fn smollm2_path() -> PathBuf {
    let spec = ModelSpec::default_model(&models::models_dir());
    let known = &models::KNOWN_MODELS[0];
    models::ensure_fetched(known, &spec.path)
        .expect("fetching the test model (CI fetches it with `wasmlm pull`)");
    spec.path
}

/// Rows of a reference vector file in `tests/vectors/`.
pub fn vectors(file: &str) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/vectors")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("vector rows are JSON"))
        .collect()
}

/// A JSON array of integers as token ids.
pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of ids")
        .iter()
        .map(|x| x.as_u64().expect("an id") as u32)
        .collect()
}
