//! Logits parity of each architecture against Hugging Face transformers: small random-weight
//! models made by `tests/fixtures/make_arch_fixtures.py` (weights and transformers' logits are
//! committed), run through the backend from a Hugging Face folder (f32, bf16) and from GGUF
//! (f32, f16, q8_0), token by token (the decode path) and as one prompt (the prefill path).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use wasmlm_host::backend::{DenseDType, KvDType, LoadOptions, LoadedModel, Pass, Sequence};

fn fixture(arch: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/arch")
        .join(arch)
}

struct Reference {
    ids: Vec<u32>,
    /// `[position][vocab]`.
    logits: Vec<Vec<f32>>,
    logits_q8_0: Vec<Vec<f32>>,
}

fn reference(arch: &str) -> Reference {
    let t =
        candle_core::safetensors::load(fixture(arch).join("reference.safetensors"), &Device::Cpu)
            .expect("reference loads");
    let rows = |name: &str| -> Vec<Vec<f32>> { t[name].to_vec2().expect("f32 [n, vocab]") };
    let ids: Vec<i64> = t["input_ids"].to_vec1().expect("i64 ids");
    Reference {
        ids: ids.into_iter().map(|i| i as u32).collect(),
        logits: rows("logits"),
        logits_q8_0: rows("logits_q8_0"),
    }
}

/// Largest absolute difference over the largest reference magnitude.
fn relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len(), "vocabulary sizes differ");
    let diff = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let scale = theirs.iter().map(|b| b.abs()).fold(0.0f32, f32::max);
    diff / scale
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0)
}

/// Both forward passes: the CPU's own over rows, and candle's tensor pass that GPUs run.
const PASSES: [Pass; 2] = [Pass::Auto, Pass::Tensors];

/// `pass` with an f32 KV cache: the exact checks hold every other difference to float order.
/// The default f16 cache has its own check ([`check_f16_kv_cache`]).
fn options(pass: Pass) -> LoadOptions {
    LoadOptions {
        pass,
        kv: KvDType::F32,
        ..LoadOptions::default()
    }
}

/// Runs `model` on the reference ids token by token and as one prompt; returns the worst
/// relative error and the positions whose greedy token differs.
fn run(path: &Path, options: LoadOptions, expected: &[Vec<f32>], ids: &[u32]) -> (f32, Vec<usize>) {
    let model = Arc::new(
        LoadedModel::from_path(path, &options, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{} loads: {e}", path.display())),
    );
    let mut seq = Sequence::new(model.clone());
    let mut worst = 0.0f32;
    let mut greedy_mismatch = Vec::new();
    for (i, &id) in ids.iter().enumerate() {
        let logits = seq.extend(&[id]).expect("decode step");
        worst = worst.max(relative_error(&logits, &expected[i]));
        if argmax(&logits) != argmax(&expected[i]) {
            greedy_mismatch.push(i);
        }
    }
    let mut prompt = Sequence::new(model);
    let last = prompt.extend(ids).expect("prefill");
    worst = worst.max(relative_error(&last, &expected[ids.len() - 1]));
    (worst, greedy_mismatch)
}

/// Every form of a fixture; gemma3 runs from GGUF only.
const ALL_VARIANTS: &[&str] = &["hf-f32", "hf-bf16", "model-f32.gguf", "model-f16.gguf"];
const GGUF_VARIANTS: &[&str] = &["model-f32.gguf", "model-f16.gguf"];

/// How far q8_0 may be from transformers: against the dequantized weights, and against f32.
/// The error is activation rounding, which grows with depth.
struct Q8Bounds(f32, f32);
/// f16 KV cache against f32 transformers: measured 4.3e-4 (qwen2), 6.5e-4 (qwen3), 7.8e-4
/// (gemma3, six layers), about one f16 rounding (2⁻¹¹ = 4.9e-4) per layer's attention
/// carried to the logits; an f32 cache is ~7e-7.
const F16_KV_BOUND: f32 = 2e-3;
/// How far the CPU pass with a q8_0 KV cache may be from transformers' f32 logits: measured
/// 1.4e-2 (qwen3) and 2.3e-2 (gemma3, six layers); q8_0 rounds a value by up to 1/254 of its
/// block's largest, the queries too. The q8_0 weights' bounds are 4e-2 to 9e-2.
const Q8_KV_BOUND: f32 = 4e-2;
/// Two layers.
const Q8_SHALLOW: Q8Bounds = Q8Bounds(4e-2, 6e-2);

fn check_arch(arch: &str, variants: &[&str], q8: Q8Bounds) {
    let r = reference(arch);
    let dir = fixture(arch);
    // f32 and bf16 hold the same (bf16-representable) numbers, and so does f16: the only
    // difference left is the order of floating-point operations.
    for pass in PASSES {
        for &variant in variants {
            let (err, mismatch) = run(&dir.join(variant), options(pass), &r.logits, &r.ids);
            assert!(
                err < 1e-4,
                "{arch} {variant} {pass:?}: relative error {err:e}"
            );
            assert!(
                mismatch.is_empty(),
                "{arch} {variant} {pass:?}: greedy differs at {mismatch:?}"
            );
            eprintln!("{arch} {variant} {pass:?}: relative error {err:.2e}");
        }
        // q8_0 against transformers on the same dequantized weights. Run with
        // CANDLE_DEQUANTIZE_ALL=1 (f32 matmuls) this is ~8e-7: the file is read exactly.
        // What is left here, ~2.3e-2, is rounding activations to 8 bits inside each
        // quantized product, as llama.cpp does.
        let q8_0 = dir.join("model-q8_0.gguf");
        let (err, _) = run(&q8_0, options(pass), &r.logits_q8_0, &r.ids);
        assert!(err < q8.0, "{arch} q8_0 {pass:?}: relative error {err:e}");
        // Against the unquantized model: weight and activation rounding together (~2.5e-2).
        let (err_full, mismatch) = run(&q8_0, options(pass), &r.logits, &r.ids);
        assert!(
            err_full < q8.1,
            "{arch} q8_0 {pass:?} vs f32: relative error {err_full:e}"
        );
        assert!(
            mismatch.len() <= r.ids.len() / 4,
            "{arch} q8_0 {pass:?}: greedy differs at {mismatch:?}"
        );
        eprintln!(
            "{arch} q8_0 {pass:?}: {err:.2e} vs dequantized weights, {err_full:.2e} vs f32, greedy differs at {mismatch:?}"
        );
    }
}

/// The CPU pass with its default f16 KV cache (as llama.cpp's): keys, values and attention
/// probabilities rounded to f16 (2⁻¹¹ relative) on the f32 model.
fn check_f16_kv_cache(arch: &str, variant: &str) {
    let r = reference(arch);
    let (err, mismatch) = run(
        &fixture(arch).join(variant),
        LoadOptions::default(),
        &r.logits,
        &r.ids,
    );
    eprintln!(
        "{arch} {variant} f16 KV cache: relative error {err:.2e}, greedy differs at {mismatch:?}"
    );
    assert!(
        err < F16_KV_BOUND,
        "{arch} {variant} f16 KV cache: relative error {err:e}"
    );
    assert!(
        mismatch.is_empty(),
        "{arch} {variant} f16 KV cache: greedy differs at {mismatch:?}"
    );
}

/// The CPU pass with a q8_0 KV cache (llama.cpp's `--cache-type-k q8_0`): keys and values
/// rounded to 8 bits per 32 (1/254 of a block's largest magnitude), the queries too; near-ties
/// may flip, as the q8_0 weights' do.
fn check_q8_0_kv_cache(arch: &str, variant: &str) {
    let r = reference(arch);
    let q8 = LoadOptions {
        kv: KvDType::Q8_0,
        ..LoadOptions::default()
    };
    let (err, mismatch) = run(&fixture(arch).join(variant), q8, &r.logits, &r.ids);
    eprintln!(
        "{arch} {variant} q8_0 KV cache: relative error {err:.2e}, greedy differs at {mismatch:?}"
    );
    assert!(
        err < Q8_KV_BOUND,
        "{arch} {variant} q8_0 KV cache: relative error {err:e}"
    );
    assert!(
        mismatch.len() <= r.ids.len() / 4,
        "{arch} {variant} q8_0 KV cache: greedy differs at {mismatch:?}"
    );
}

/// What a GPU runs on a bf16 folder: the weights stay bf16 and the activations are rounded to
/// bf16 for each product (f32 in between). Checked here on the CPU, through both passes.
fn check_bf16_as_stored(arch: &str) {
    let r = reference(arch);
    let path = fixture(arch).join("hf-bf16");
    for pass in PASSES {
        let stored = LoadOptions {
            pass,
            dense: DenseDType::Stored,
            ..LoadOptions::default()
        };
        let (err, mismatch) = run(&path, stored, &r.logits, &r.ids);
        // bf16 keeps 8 bits of mantissa: ~4e-3 per rounding; two layers of them gave ~1e-2.
        assert!(err < 2.5e-2, "{arch} bf16 {pass:?}: relative error {err:e}");
        // bf16 rounding may flip a near-tie, as q8_0's may: the same bound as q8_0's.
        assert!(
            mismatch.len() <= r.ids.len() / 4,
            "{arch} bf16 {pass:?}: greedy differs at {mismatch:?}"
        );
        eprintln!(
            "{arch} bf16 kept {pass:?}: relative error {err:.2e}, greedy differs at {mismatch:?}"
        );
    }
}

#[test]
fn qwen3_matches_transformers() {
    check_arch("qwen3", ALL_VARIANTS, Q8_SHALLOW);
    check_f16_kv_cache("qwen3", "hf-f32");
    check_q8_0_kv_cache("qwen3", "hf-f32");
    check_bf16_as_stored("qwen3");
}

#[test]
fn qwen2_matches_transformers() {
    check_arch("qwen2", ALL_VARIANTS, Q8_SHALLOW);
    check_f16_kv_cache("qwen2", "hf-f32");
    check_bf16_as_stored("qwen2");
    // Its 16-wide heads do not hold q8_0's blocks of 32: refused at load, in words.
    let q8 = LoadOptions {
        kv: KvDType::Q8_0,
        ..LoadOptions::default()
    };
    let e = LoadedModel::from_path(&fixture("qwen2").join("hf-f32"), &q8, &Device::Cpu)
        .err()
        .expect("q8_0 on 16-wide heads is refused");
    assert!(e.to_string().contains("multiple of 32"), "{e}");
}

/// Gemma 3: sliding-window layers (the window of 4 is shorter than the prompt), a global
/// layer with its own rotary base, q/k norms, sandwich norms, GELU, scaled embeddings.
#[test]
fn gemma3_matches_transformers() {
    // Six layers, each with two extra norms: with CANDLE_DEQUANTIZE_ALL=1 q8_0 is 1.4e-6
    // from the dequantized reference (the file is read exactly); activation rounding
    // makes it ~4.3e-2.
    check_arch("gemma3", GGUF_VARIANTS, Q8Bounds(6e-2, 9e-2));
    check_f16_kv_cache("gemma3", "model-f32.gguf");
    check_q8_0_kv_cache("gemma3", "model-f32.gguf");
}

#[test]
fn unsupported_folder_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("wasmlm-arch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "mamba"}"#).unwrap();
    std::fs::copy(
        fixture("qwen3").join("hf-f32/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = LoadedModel::from_path(&dir, &LoadOptions::default(), &Device::Cpu)
        .err()
        .expect("mamba is refused")
        .to_string();
    assert!(err.contains("'mamba' is not supported"), "{err}");
    std::fs::write(dir.join("config.json"), "{not json").unwrap();
    let err = LoadedModel::from_path(&dir, &LoadOptions::default(), &Device::Cpu)
        .err()
        .expect("broken config is refused")
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "qwen3"}"#).unwrap();
    let err = LoadedModel::from_path(&dir, &LoadOptions::default(), &Device::Cpu)
        .err()
        .expect("a folder without weights is refused")
        .to_string();
    assert!(err.contains("safetensors"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
