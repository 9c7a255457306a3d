//! The official `openai` Python SDK against a real `wasmlm serve`: the client our users run
//! must work unchanged. The SDK is installed from PyPI into the target dir on first use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::node::Node;

/// The SDK version the suite pins.
const OPENAI_SDK: &str = "openai==3.54.0";

/// A folder holding the pinned SDK, installed there if it is not yet.
fn sdk_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydeps-openai-3.54.0");
    let marker = dir.join(".complete");
    if !marker.exists() {
        let tmp = dir.with_extension(format!("tmp{}", std::process::id()));
        let out = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-input",
                "--target",
            ])
            .arg(&tmp)
            .arg(OPENAI_SDK)
            .output()
            .expect("python3 -m pip runs");
        assert!(
            out.status.success(),
            "installing {OPENAI_SDK}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(tmp.join(".complete"), "").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).expect("moving the SDK into place");
    }
    dir
}

#[test]
fn the_openai_python_sdk_works_unchanged() {
    let sdk = sdk_dir();
    let smollm2 = format!("smollm2={}", common::smollm2_path().display());
    // A random-weight Qwen3 with the real tokenizer and template, for reasoning and tools.
    let qwen3 = format!("qwen3={}", common::random_qwen3_folder().display());
    let minilm = format!("minilm={}", common::minilm_dir().display());
    let node = Node::start(&[
        "--api-key",
        "test-key",
        "--context",
        "512",
        "--model",
        &smollm2,
        "--model",
        &qwen3,
        "--model",
        &minilm,
    ]);
    // A node with one slot and no queue, to see 429 from a busy node.
    let busy = Node::start(&["--api-key", "test-key", "--slots", "1", "--queue", "0"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/openai_sdk.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(format!("http://{}/v1", node.addr))
        .arg(format!("http://{}/v1", busy.addr))
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/minilm-embeddings.jsonl"))
        .env("PYTHONPATH", &sdk)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "SDK suite failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("all SDK checks passed"), "{stdout}");
}
