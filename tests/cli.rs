//! The `wasmlm` binary end to end, as a user runs it, on the real SmolLM2.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn wasmlm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmlm"))
        .args(args)
        .output()
        .expect("wasmlm runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a clean failure: non-zero exit, one `wasmlm: error:` line, no panic; returns it.
fn one_line_error(o: &Output) -> String {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "expected failure, got success; stderr: {err}"
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {err}");
    assert!(lines[0].starts_with("wasmlm: error: "), "{err}");
    lines[0].to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmlm-cli-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn model_arg(path: &Path) -> String {
    format!("m={}", path.display())
}

/// `wasmlm run` with `flags`, greedy, asked the README's question; asserts it answers Paris.
fn ask_the_capital_of_france(flags: &[&str]) -> Output {
    common::smollm2_path();
    let question = [
        "--temperature",
        "0",
        "--system",
        "You are a helpful assistant.",
        "Name the capital of France.",
    ];
    let args: Vec<&str> = ["run"]
        .iter()
        .chain(flags)
        .chain(&question)
        .copied()
        .collect();
    let o = wasmlm(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("Paris"), "answer: {}", stdout(&o));
    o
}

#[test]
fn answers_the_capital_of_france_with_a_summary() {
    let o = ask_the_capital_of_france(&[]);
    let summary = stderr(&o).lines().last().unwrap_or_default().to_string();
    for key in [
        "prompt_tokens=",
        "generated_tokens=",
        "ttft_ms=",
        "prefill_tok_s=",
        "decode_tok_s=",
        "peak_rss_mb=",
    ] {
        assert!(summary.contains(key), "summary line lacks {key}: {summary}");
    }
    let prompt_tokens: u32 = summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("prompt_tokens="))
        .and_then(|v| v.parse().ok())
        .expect("prompt_tokens is a number");
    assert!(prompt_tokens > 10);
}

#[test]
fn same_seed_same_output() {
    common::smollm2_path();
    let run = |seed: &str| {
        let o = wasmlm(&[
            "run",
            "--raw",
            "--temperature",
            "1",
            "--seed",
            seed,
            "-n",
            "16",
            "Once upon a time",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(run("11"), run("11"));
    assert_ne!(run("11"), run("12"));
}

#[test]
fn json_mode_prints_one_json_object() {
    common::smollm2_path();
    let o = wasmlm(&[
        "run",
        "--json",
        "--temperature",
        "0",
        "Describe a cat as a JSON object with the keys name, age and color.",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let v: serde_json::Value =
        serde_json::from_str(out.trim_end()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    assert!(v.is_object(), "{out}");

    // A schema: its properties, in its order, of its types.
    let schema = r#"{"type": "object", "properties": {"name": {"type": "string"},
        "age": {"type": "integer"}, "color": {"enum": ["black", "white", "ginger"]}},
        "required": ["name", "age", "color"], "additionalProperties": false}"#;
    let cat = "Describe a cat as a JSON object with the keys name, age and color.";
    let o = wasmlm(&["run", "--json-schema", schema, "--temperature", "0", cat]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    let v: serde_json::Value =
        serde_json::from_str(out.trim_end()).unwrap_or_else(|e| panic!("not JSON ({e}): {out:?}"));
    let keys: Vec<&str> = v
        .as_object()
        .map(|o| o.keys().map(String::as_str).collect())
        .unwrap_or_default();
    assert_eq!(keys, ["name", "age", "color"], "{out}");
    assert!(v["name"].is_string() && v["age"].is_i64(), "{out}");
    assert!(["black", "white", "ginger"].contains(&v["color"].as_str().unwrap_or("")));

    // A schema it cannot follow: one line naming what.
    let bad = r#"{"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 2}}}"#;
    let line = one_line_error(&wasmlm(&["run", "--json-schema", bad, cat]));
    assert!(line.contains("multipleOf"), "{line}");
}

#[test]
fn tokenize_prints_json_ids() {
    let path = common::smollm2_path();
    let o = wasmlm(&["tokenize", "--model", &model_arg(&path), "Hello, world!"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "[19556,28,905,17]");
    let o = wasmlm(&["tokenize", "--special", "<|im_start|>user"]);
    assert!(stdout(&o).trim().starts_with("[1,"), "{}", stdout(&o));
}

#[test]
fn missing_model_file() {
    let line = one_line_error(&wasmlm(&[
        "run",
        "--model",
        "x=/nonexistent/model.gguf",
        "hi",
    ]));
    assert!(
        line.contains("not found") && line.contains("/nonexistent/model.gguf"),
        "{line}"
    );
}

#[test]
fn file_that_is_not_gguf() {
    let p = scratch("notes.gguf");
    std::fs::write(&p, "just some text, not a model\n").unwrap();
    let line = one_line_error(&wasmlm(&["run", "--model", &model_arg(&p), "hi"]));
    assert!(line.contains("is not a GGUF file"), "{line}");
}

#[test]
fn truncated_gguf() {
    let full = std::fs::read(common::smollm2_path()).unwrap();
    // Cut inside the metadata, and cut inside the tensor data.
    for (name, len) in [("head.gguf", 100_000), ("half.gguf", full.len() / 2)] {
        let p = scratch(name);
        std::fs::write(&p, &full[..len]).unwrap();
        let line = one_line_error(&wasmlm(&["run", "--model", &model_arg(&p), "hi"]));
        assert!(
            line.contains("truncated") || line.contains("not a valid GGUF"),
            "{line}"
        );
    }
}

/// A GGUF v3 file with no tensors and only `general.architecture`.
fn gguf_with_architecture(arch: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    let key = "general.architecture";
    b.extend_from_slice(&(key.len() as u64).to_le_bytes());
    b.extend_from_slice(key.as_bytes());
    b.extend_from_slice(&8u32.to_le_bytes()); // string
    b.extend_from_slice(&(arch.len() as u64).to_le_bytes());
    b.extend_from_slice(arch.as_bytes());
    b
}

#[test]
fn unsupported_architecture() {
    let p = scratch("mamba.gguf");
    std::fs::write(&p, gguf_with_architecture("mamba")).unwrap();
    let line = one_line_error(&wasmlm(&["run", "--model", &model_arg(&p), "hi"]));
    assert!(
        line.contains("architecture 'mamba' is not supported"),
        "{line}"
    );
}

#[test]
fn prompt_longer_than_the_context() {
    common::smollm2_path();
    let prompt = "tell me more ".repeat(40);
    let line = one_line_error(&wasmlm(&["run", "--context", "64", &prompt]));
    assert!(line.contains("context holds 64"), "{line}");
}

#[test]
fn a_q8_0_kv_cache_answers_and_unknown_types_are_named() {
    ask_the_capital_of_france(&["--kv-cache", "q8_0"]);
    let o = wasmlm(&["run", "--kv-cache", "q4", "hi"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("(f16, f32, q8_0)"), "{}", stderr(&o));
}

#[test]
fn bad_flags_are_refused() {
    common::smollm2_path();
    let line = one_line_error(&wasmlm(&["run", "--temperature", "-1", "hi"]));
    assert!(line.contains("temperature"), "{line}");
    let line = one_line_error(&wasmlm(&["run", "--model", "nosuchmodel", "hi"]));
    assert!(line.contains("nosuchmodel"), "{line}");
    let line = one_line_error(&wasmlm(&["run", "--threads", "0", "hi"]));
    assert!(line.contains("--threads"), "{line}");
}

#[test]
fn help_documents_the_commands() {
    let o = wasmlm(&["--help"]);
    assert!(o.status.success());
    for cmd in ["run", "tokenize", "bench", "pull"] {
        assert!(stdout(&o).contains(cmd), "{}", stdout(&o));
    }
    let o = wasmlm(&["run", "--help"]);
    for flag in [
        "--model",
        "--max-tokens",
        "--temperature",
        "--seed",
        "--system",
        "--raw",
        "--json",
        "--json-schema",
        "--threads",
    ] {
        assert!(stdout(&o).contains(flag), "run --help lacks {flag}");
    }
}

/// A Hugging Face folder (random Qwen3 weights, the real tokenizer) without a chat template.
fn folder_without_template() -> PathBuf {
    let src = common::random_qwen3_folder();
    let dir = scratch("no-template");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let text = std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(&text).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

#[test]
fn a_model_folder_without_a_template_serves_raw_prompts_or_a_given_template() {
    let dir = folder_without_template();
    let model = format!("q={}", dir.display());
    let base = ["run", "--model", &model, "--temperature", "0", "-n", "3"];
    let err = one_line_error(&wasmlm(&[&base[..], &["Hello"]].concat()));
    assert!(err.contains("has no chat template"), "{err}");
    let o = wasmlm(&[&base[..], &["--raw", "Hello"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("generated_tokens=3"), "{}", stderr(&o));
    let template = scratch("template.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
         <|im_start|>assistant\n",
    )
    .unwrap();
    let t = template.display().to_string();
    let o = wasmlm(&[&base[..], &["--chat-template", &t, "Hello"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    // "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant" is 8 tokens (Jinja drops a
    // template's final newline, as Jinja2 does).
    assert!(stderr(&o).contains("prompt_tokens=8 "), "{}", stderr(&o));
    let missing = wasmlm(&[&base[..], &["--chat-template", "/nonexistent.jinja", "Hi"]].concat());
    assert!(one_line_error(&missing).contains("/nonexistent.jinja"));
}
