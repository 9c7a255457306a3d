//! Models by Hugging Face Hub repo id, end to end through the `wasmlm` binary, against a local
//! HTTP server that answers the Hub's API as `hf-hub` uses it (`HF_ENDPOINT`): these machines
//! reach no hub. The server serves a random-weight Qwen3 folder (real tokenizer) and the
//! gemma3 fixture GGUFs.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Repo id → (file name in the repo → bytes).
type Repos = HashMap<String, HashMap<String, Vec<u8>>>;

struct Hub {
    repos: Repos,
    /// File transfers served (not counting metadata probes of one byte).
    downloads: AtomicUsize,
}

async fn answer(State(hub): State<Arc<Hub>>, headers: HeaderMap, req: Request) -> Response {
    let path = req.uri().path().to_string();
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // /api/models/{owner}/{name}/revision/{rev}
        let parts: Vec<&str> = rest.split('/').collect();
        let Some(files) = parts.get(..2).and_then(|p| hub.repos.get(&p.join("/"))) else {
            return (StatusCode::NOT_FOUND, "Repository not found").into_response();
        };
        let siblings: Vec<_> = files
            .keys()
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        return axum::Json(serde_json::json!({ "sha": COMMIT, "siblings": siblings }))
            .into_response();
    }
    // /{owner}/{name}/resolve/{rev}/{file...}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let file = match parts.as_slice() {
        [owner, name, "resolve", _rev, file] => hub
            .repos
            .get(&format!("{owner}/{name}"))
            .and_then(|files| files.get(*file)),
        _ => None,
    };
    let Some(data) = file else {
        return (StatusCode::NOT_FOUND, "Entry not found").into_response();
    };
    let size = data.len();
    let (start, end) = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split_once('-'))
        .map(|(a, b)| {
            let a: usize = a.parse().unwrap_or(0);
            let b: usize = b.parse().map_or(size.saturating_sub(1), |b: usize| b);
            (a.min(size), (b + 1).min(size))
        })
        .unwrap_or((0, size));
    if end - start > 1 {
        hub.downloads.fetch_add(1, Ordering::SeqCst);
    }
    let etag = format!(
        "\"{:x}-{size}\"",
        data.iter().map(|&b| b as u64).sum::<u64>()
    );
    Response::builder()
        .status(StatusCode::PARTIAL_CONTENT)
        .header("x-repo-commit", COMMIT)
        .header(header::ETAG, etag)
        .header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end.saturating_sub(1)),
        )
        .body(Body::from(data[start..end].to_vec()))
        .expect("a response")
}

/// Starts the fake Hub on a free port; returns its address and counters.
fn start_hub() -> (String, Arc<Hub>) {
    let read_dir = |dir: &Path, names: &[&str]| -> HashMap<String, Vec<u8>> {
        names
            .iter()
            .map(|n| {
                let bytes = std::fs::read(dir.join(n)).expect("fixture file");
                (n.to_string(), bytes)
            })
            .collect()
    };
    let qwen = common::random_qwen3_folder();
    let qwen_files: Vec<String> = std::fs::read_dir(&qwen)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    let qwen_names: Vec<&str> = qwen_files.iter().map(String::as_str).collect();
    let mut qwen_repo = read_dir(&qwen, &qwen_names);
    qwen_repo.insert("README.md".into(), b"# a random Qwen3\n".to_vec());
    let gemma = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/arch/gemma3");
    let gemma_repo = read_dir(
        &gemma,
        &["model-f32.gguf", "model-f16.gguf", "model-q8_0.gguf"],
    );
    let hub = Arc::new(Hub {
        repos: HashMap::from([
            ("test/qwen3-tiny".to_string(), qwen_repo),
            ("test/gemma3-tiny-GGUF".to_string(), gemma_repo),
        ]),
        downloads: AtomicUsize::new(0),
    });
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    let state = hub.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let app = Router::new().fallback(answer).with_state(state);
            axum::serve(listener, app).await.unwrap();
        });
    });
    (format!("http://{addr}"), hub)
}

fn wasmlm(endpoint: &str, hf_home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_wasmlm"))
        .args(args)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env_remove("HF_TOKEN")
        .output()
        .expect("wasmlm runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn fresh_home(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_safetensors_repo_is_fetched_once_then_served_from_the_cache() {
    let (endpoint, hub) = start_hub();
    let home = fresh_home("qwen3");

    let o = wasmlm(&endpoint, &home, &["pull", "hf:test/qwen3-tiny"]);
    let err = text(&o.stderr);
    assert!(o.status.success(), "{err}");
    // Progress, one line per file when stderr is not a terminal.
    assert!(
        err.contains("downloading test/qwen3-tiny/model.safetensors"),
        "{err}"
    );
    assert!(
        err.contains("downloaded test/qwen3-tiny/config.json"),
        "{err}"
    );
    assert!(
        !err.contains("README.md"),
        "only what the model needs: {err}"
    );
    let out = text(&o.stdout);
    let (name, path) = out.trim().split_once('\t').expect("NAME\\tPATH");
    assert_eq!(name, "test/qwen3-tiny");
    let dir = Path::new(path);
    assert!(dir.starts_with(&home), "{path} is in HF_HOME");
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(dir.join(f).exists(), "{f} in {path}");
    }
    let fetched = hub.downloads.load(Ordering::SeqCst);
    assert!(fetched >= 4, "{fetched} files");

    // The fetched folder serves: the real Qwen3 tokenizer answers.
    let o = wasmlm(
        &endpoint,
        &home,
        &["tokenize", "--model", "hf:test/qwen3-tiny", "Hello world"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "[9707,1879]");
    assert_eq!(
        hub.downloads.load(Ordering::SeqCst),
        fetched,
        "cached files are not fetched again"
    );

    // With the Hub unreachable, the cached snapshot still loads.
    let o = wasmlm(
        "http://127.0.0.1:9",
        &home,
        &[
            "tokenize",
            "--model",
            "tiny=hf:test/qwen3-tiny",
            "Hello world",
        ],
    );
    assert!(o.status.success(), "offline: {}", text(&o.stderr));
    assert_eq!(text(&o.stdout).trim(), "[9707,1879]");
}

#[test]
fn a_gguf_repo_picks_the_named_quantization() {
    let (endpoint, _hub) = start_hub();
    let home = fresh_home("gguf");
    let o = wasmlm(&endpoint, &home, &["pull", "hf:test/gemma3-tiny-GGUF:F32"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).trim().ends_with("model-f32.gguf"));
    // No tag: the usual preference order of llama.cpp users (here q8_0 over f16 and f32).
    let o = wasmlm(&endpoint, &home, &["pull", "hf:test/gemma3-tiny-GGUF"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    assert!(text(&o.stdout).trim().ends_with("model-q8_0.gguf"));
    let o = wasmlm(&endpoint, &home, &["pull", "hf:test/gemma3-tiny-GGUF:Q2_K"]);
    let err = text(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("no GGUF matching") && err.contains("model-q8_0.gguf"),
        "{err}"
    );
}

#[test]
fn a_missing_repo_or_bad_id_is_a_one_line_error() {
    let (endpoint, _hub) = start_hub();
    let home = fresh_home("missing");
    for (spec, expect) in [
        ("hf:test/no-such-model", "test/no-such-model"),
        ("hf:not-a-repo", "not a Hub repo id"),
    ] {
        let o = wasmlm(&endpoint, &home, &["pull", spec]);
        let err = text(&o.stderr);
        assert!(!o.status.success(), "{spec}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(
            err.starts_with("wasmlm: error: ") && err.contains(expect),
            "{err}"
        );
    }
}
