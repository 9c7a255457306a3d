//! Helpers shared by the end-to-end tests: the real test model and the reference vectors.

#![allow(dead_code)]

pub mod node;

use std::path::PathBuf;

use serde_json::Value;
use wasmlm_host::models::{self, ModelSpec};

/// Path of the default model (SmolLM2-135M-Instruct Q4_1), fetched if missing.
pub fn smollm2_path() -> PathBuf {
    let dir = models::models_dir();
    let spec = ModelSpec::default_model(&dir);
    let known = &models::KNOWN_MODELS[0];
    models::ensure_fetched(known, &dir)
        .expect("fetching the test model (CI fetches it with `wasmlm pull`)");
    spec.path
}

/// The folder of the known model `name`, fetched if missing.
fn known_dir(name: &str) -> PathBuf {
    let dir = models::models_dir();
    let known = models::known(name).expect("a known model");
    models::ensure_fetched(known, &dir)
        .unwrap_or_else(|e| panic!("fetching {name} (CI fetches it with `wasmlm pull`): {e}"));
    dir.join(known.dir)
}

/// The all-MiniLM-L6-v2 folder (sentence embeddings), fetched if missing.
pub fn minilm_dir() -> PathBuf {
    known_dir("all-minilm-l6-v2")
}

/// The real Gemma-3-270M Q4_K_M GGUF, fetched if missing.
pub fn gemma3_path() -> PathBuf {
    known_dir("gemma3-270m").join("gemma-3-270m-q4_k_m.gguf")
}

/// The folder of the real Qwen3 tokenizer and chat template, fetched if missing.
pub fn qwen3_tokenizer_dir() -> PathBuf {
    known_dir("qwen3-tokenizer")
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

/// A Qwen3 model folder with the real Qwen3 tokenizer and chat template and small random
/// weights of the real vocabulary (151,936): what a random model cannot say, tests constrain
/// with `choices`. Made once per test binary.
pub fn random_qwen3_folder() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("random-qwen3-v1");
        if dir.join(".complete").exists() {
            return dir;
        }
        let tok = qwen3_tokenizer_dir();
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).expect("creating the model folder");
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(tok.join(f), tmp.join(f)).expect("copying the tokenizer");
        }
        write_random_qwen3(&tmp);
        std::fs::write(tmp.join(".complete"), "").expect("marking the folder complete");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).expect("moving the model folder into place");
        dir
    })
    .clone()
}

fn write_random_qwen3(dir: &std::path::Path) {
    use candle_core::{Device, Tensor};
    let (vocab, hidden, inter, layers, heads, kv_heads, head_dim) = (151_936, 32, 64, 2, 2, 1, 16);
    let config = serde_json::json!({
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    });
    std::fs::write(dir.join("config.json"), config.to_string()).expect("writing config.json");
    // A fixed linear congruential sequence: the same weights on every run.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut random = |shape: &[usize], scale: f32, offset: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                offset + scale * (((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5)
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("a tensor")
    };
    let mut t = std::collections::HashMap::new();
    t.insert(
        "model.embed_tokens.weight".to_string(),
        random(&[vocab, hidden], 1.0, 0.0),
    );
    t.insert("model.norm.weight".to_string(), random(&[hidden], 0.2, 1.0));
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        let w = |rows: usize, cols: usize| (rows, cols, 2.0 / (cols as f32).sqrt());
        for (name, (rows, cols, scale)) in [
            ("self_attn.q_proj.weight", w(heads * head_dim, hidden)),
            ("self_attn.k_proj.weight", w(kv_heads * head_dim, hidden)),
            ("self_attn.v_proj.weight", w(kv_heads * head_dim, hidden)),
            ("self_attn.o_proj.weight", w(hidden, heads * head_dim)),
            ("mlp.gate_proj.weight", w(inter, hidden)),
            ("mlp.up_proj.weight", w(inter, hidden)),
            ("mlp.down_proj.weight", w(hidden, inter)),
        ] {
            t.insert(format!("{p}.{name}"), random(&[rows, cols], scale, 0.0));
        }
        for (name, n) in [
            ("input_layernorm.weight", hidden),
            ("post_attention_layernorm.weight", hidden),
            ("self_attn.q_norm.weight", head_dim),
            ("self_attn.k_norm.weight", head_dim),
        ] {
            t.insert(format!("{p}.{name}"), random(&[n], 0.2, 1.0));
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).expect("writing weights");
}
