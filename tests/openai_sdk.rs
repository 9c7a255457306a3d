//! The official `openai` and `anthropic` Python SDKs against a real `wasmlm serve`: the
//! clients our users run must work unchanged. The SDKs are installed from PyPI into the
//! target dir on first use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::node::Node;

/// The SDK versions the suites pin.
const OPENAI_SDK: &str = "openai==3.54.0";
const ANTHROPIC_SDK: &str = "anthropic==2.17.0";

/// A folder holding the pinned package `spec`, installed there if it is not yet.
fn sdk_dir(spec: &str) -> PathBuf {
    let dir =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pydeps-{}", spec.replace("==", "-")));
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
            .arg(spec)
            .output()
            .expect("python3 -m pip runs");
        assert!(
            out.status.success(),
            "installing {spec}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(tmp.join(".complete"), "").unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).expect("moving the SDK into place");
    }
    dir
}

/// Runs the suite `script` with `sdk` on its path; its stdout once it passed.
fn suite(script: &str, sdk: &Path, args: &[String]) -> String {
    let out = Command::new("python3")
        .arg(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../tests")
                .join(script),
        )
        .args(args)
        .env("PYTHONPATH", sdk)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    assert!(out.status.success(), "{script} failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn the_openai_and_anthropic_python_sdks_work_unchanged() {
    let sdk = sdk_dir(OPENAI_SDK);
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
    let vectors =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/vectors/minilm-embeddings.jsonl");
    let out = suite(
        "openai_sdk.py",
        &sdk,
        &[
            format!("http://{}/v1", node.addr),
            format!("http://{}/v1", busy.addr),
            vectors.display().to_string(),
        ],
    );
    assert!(out.contains("all SDK checks passed"), "{out}");
    // Anthropic's SDK against the same node: the Messages API.
    let out = suite(
        "anthropic_sdk.py",
        &sdk_dir(ANTHROPIC_SDK),
        &[format!("http://{}", node.addr)],
    );
    assert!(out.contains("all Anthropic SDK checks passed"), "{out}");
}
