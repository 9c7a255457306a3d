//! Wasm apps on `wasmlm serve --app` with the real SmolLM2 and all-MiniLM-L6-v2: the spin-sdk 7
//! example (wasi:http 0.3), a spin-sdk 5 app (wasi:http 0.2), and the llm-app edge function
//! composed with the llm component. Answers are checked against the node's own OpenAI
//! endpoints on the same node.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::node::{metric, Node};
use serde_json::{json, Value};

/// A guest built by the host's build script (`components/examples/`, `tests/apps/`).
fn guest(file: &str) -> PathBuf {
    let dir = env!("WASMLM_GUEST_DIR");
    assert!(
        !dir.is_empty(),
        "the example apps were not built (WASMLM_COMPONENT_WASM skips them)"
    );
    PathBuf::from(dir).join(file)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("wasmlm-apps-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("make a scratch dir");
    dir
}

/// `wasmlm compose` of the summarizer; returns the composed file.
fn composed_summarizer(dir: &std::path::Path) -> PathBuf {
    let out = dir.join("summarize.wasm");
    let o = Command::new(env!("CARGO_BIN_EXE_wasmlm"))
        .args(["compose"])
        .arg(guest("wasmlm_example_summarize.wasm"))
        .arg("-o")
        .arg(&out)
        .output()
        .expect("run wasmlm compose");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn raw_post(node: &Node, path: &str, body: &[u8]) -> common::node::Reply {
    node.request("POST", path, &[], Some(body))
}

#[test]
fn spin_apps_and_a_composed_edge_function_answer_with_the_nodes_models() {
    let dir = scratch("serve");
    let summarize = composed_summarizer(&dir);
    // The composed component carries the llm component: no wasmlm:llm import is left for a
    // host to provide, only wasi:nn and WASI (and the HTTP types it answers with).
    let bytes = std::fs::read(&summarize).unwrap();
    let imports = wasmlm_host::compose::imports(&bytes);
    assert!(
        imports.iter().all(|i| !i.starts_with("wasmlm:")),
        "{imports:?}"
    );
    assert!(
        imports.iter().any(|i| i.starts_with("wasi:nn/")),
        "{imports:?}"
    );
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[[models]]
name = "smollm2"
path = "{smollm2}"
slots = 1

[[models]]
name = "all-minilm-l6-v2"
path = "{minilm}"
slots = 1

[[apps]]
route = "/ask"
path = "{ask}"
models = ["smollm2", "all-minilm-l6-v2"]
max_concurrent = 1

[[apps]]
route = "/p2"
path = "{spin5}"
models = ["smollm2"]
allow_unknown_imports = true

[[apps]]
route = "/summarize"
path = "{summarize}"
"#,
            smollm2 = common::smollm2_path().display(),
            minilm = common::minilm_dir().display(),
            ask = guest("wasmlm_example_ask.wasm").display(),
            spin5 = guest("wasmlm_test_spin5_app.wasm").display(),
            summarize = summarize.display(),
        ),
    )
    .unwrap();
    let node = Node::start(&["--config", config.to_str().unwrap()]);
    let prompt = "The capital of France is";

    // spin-sdk 7: `infer_with_options` at temperature 0 is greedy over the raw prompt: the
    // same text and counts as the node's own raw completion.
    let r = node.post(
        "/ask",
        &json!({"prompt": prompt, "max_tokens": 12, "temperature": 0, "repeat_penalty": 1.0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let ask = r.json();
    let c = node
        .post(
            "/v1/completions",
            &json!({"model": "smollm2", "prompt": prompt, "max_tokens": 12, "temperature": 0}),
        )
        .json();
    assert_eq!(ask["text"], c["choices"][0]["text"], "{ask} vs {c}");
    assert!(ask["text"].as_str().unwrap().contains("Paris"), "{ask}");
    assert_eq!(
        ask["usage"]["prompt_token_count"],
        c["usage"]["prompt_tokens"]
    );
    assert_eq!(ask["usage"]["generated_token_count"], 12);

    // `infer` with no parameters: Spin's defaults (at most 100 tokens), and the prompt count
    // is the prompt's own tokens, not prompt + generated as Spin's local engine reports.
    let r = node.post("/ask", &json!({"prompt": prompt}));
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    let prompt_tokens = node
        .post("/tokenize", &json!({"model": "smollm2", "content": prompt}))
        .json()["tokens"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(v["usage"]["prompt_token_count"], prompt_tokens, "{v}");
    let generated = v["usage"]["generated_token_count"].as_u64().unwrap();
    assert!((1..=100).contains(&generated), "{v}");

    // A model the node does not serve is Spin's model-not-supported.
    let r = node.post("/ask", &json!({"prompt": prompt, "model": "llama2-chat"}));
    assert_eq!(r.status, 404, "{}", r.text());
    assert_eq!(r.json()["error"], "model-not-supported");

    // generate_embeddings gives the node's own vectors.
    let input = ["a cat sits on the mat", "quantum chromodynamics"];
    let r = node.post(
        "/ask/embed",
        &json!({"model": "all-minilm-l6-v2", "input": input}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let app = r.json();
    let api = node
        .post(
            "/v1/embeddings",
            &json!({"model": "all-minilm-l6-v2", "input": input}),
        )
        .json();
    for (i, row) in app["embeddings"].as_array().unwrap().iter().enumerate() {
        let a = row.as_array().unwrap();
        let b = api["data"][i]["embedding"].as_array().unwrap();
        assert_eq!(a.len(), 384);
        for (x, y) in a.iter().zip(b) {
            assert!((x.as_f64().unwrap() - y.as_f64().unwrap()).abs() < 1e-6);
        }
    }
    assert_eq!(
        app["usage"]["prompt_token_count"],
        api["usage"]["prompt_tokens"]
    );

    // spin-sdk 5 (wasi:http 0.2): the same parameters give the same answer as the 0.3 app.
    let r = raw_post(
        &node,
        "/p2/infer",
        json!({"model": "smollm2", "prompt": prompt, "params": {"max_tokens": 16, "temperature": 0}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let p2 = r.json();
    let p3 = node
        .post(
            "/ask",
            &json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}),
        )
        .json();
    assert_eq!(p2["text"], p3["text"], "{p2} vs {p3}");
    assert_eq!(p2["generated_token_count"], 16);
    assert_eq!(p2["prompt_token_count"], prompt_tokens);

    // /p2 may use smollm2 only: the embedding model is outside its allowlist.
    let r = raw_post(
        &node,
        "/p2/embed",
        json!({"model": "all-minilm-l6-v2", "input": ["x"]})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("ModelNotSupported"), "{}", r.text());

    // An import the node does not provide traps when called, and the error names it.
    let r = node.get("/p2/secret");
    assert_eq!(r.status, 500, "{}", r.text());
    assert!(
        r.text().contains("fermyon:spin/variables@2.0.0#get"),
        "{}",
        r.text()
    );
    // ... and the node goes on serving.
    assert_eq!(
        node.post("/ask", &json!({"prompt": "Hi", "max_tokens": 2}))
            .status,
        200
    );

    // The composed edge function streams the summary as NDJSON; its text is the node's own
    // greedy chat answer to the same messages.
    let text = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, \
                France. It is named after the engineer Gustave Eiffel, whose company designed \
                and built the tower from 1887 to 1889.";
    let r = raw_post(&node, "/summarize?max_tokens=24", text.as_bytes());
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/x-ndjson"));
    let lines: Vec<Value> = r
        .text()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 2, "{lines:?}");
    let summary: String = lines.iter().filter_map(|l| l["delta"].as_str()).collect();
    let last = lines.last().unwrap();
    let chat = node
        .post(
            "/v1/chat/completions",
            &json!({
                "model": "smollm2", "temperature": 0, "max_tokens": 24,
                "messages": [
                    {"role": "system", "content": "Summarize the user's text in one or two sentences. Answer with the summary only."},
                    {"role": "user", "content": text},
                ],
            }),
        )
        .json();
    assert_eq!(summary, chat["choices"][0]["message"]["content"], "{chat}");
    assert_eq!(last["finish"], chat["choices"][0]["finish_reason"]);
    assert_eq!(
        last["usage"]["prompt_tokens"],
        chat["usage"]["prompt_tokens"]
    );
    assert_eq!(
        last["usage"]["completion_tokens"],
        chat["usage"]["completion_tokens"]
    );

    // The composed app keeps its instance warm: the second request finds the llm set up and
    // answers the same.
    let again = raw_post(&node, "/summarize?max_tokens=24", text.as_bytes());
    assert_eq!(again.text(), r.text());

    // /ask serves one request at a time: a second one meanwhile is a 429 with Retry-After.
    std::thread::scope(|scope| {
        let long = scope.spawn(|| {
            node.post(
                "/ask",
                &json!({"prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "repeat_penalty": 1.0}),
            )
        });
        let t0 = std::time::Instant::now();
        while node.get("/node").json()["in_flight"].as_u64() == Some(0) {
            assert!(
                t0.elapsed().as_secs() < 30,
                "the long request never started"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let busy = node.post("/ask", &json!({"prompt": "Hi", "max_tokens": 1}));
        assert_eq!(busy.status, 429, "{}", busy.text());
        assert_eq!(busy.header("retry-after"), Some("1"));
        assert_eq!(busy.json()["error"]["code"], "server_busy");
        assert_eq!(long.join().unwrap().status, 200);
    });

    // Unknown paths are still the API's 404; app requests are counted per route.
    assert_eq!(node.get("/nowhere").status, 404);
    let m = node.get("/metrics").text();
    assert!(
        metric(
            &m,
            "wasmlm_requests_total{endpoint=\"app /ask\",status=\"200\"}"
        )
        .is_some_and(|n| n >= 4.0),
        "{m}"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `wasmlm serve` with `args`: it must exit at start; returns its stderr.
fn refused(args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_wasmlm"))
        .args(["serve", "--listen", "127.0.0.1:0", "--model"])
        .arg(format!("smollm2={}", common::smollm2_path().display()))
        .args(args)
        .output()
        .expect("run wasmlm serve");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    err
}

#[test]
fn apps_that_cannot_run_are_refused_at_start_with_the_reason() {
    let spin5 = guest("wasmlm_test_spin5_app.wasm");
    let err = refused(&["--app", &format!("/p2={}", spin5.display())]);
    assert!(err.contains("fermyon:spin/variables@2.0.0"), "{err}");
    assert!(err.contains("--allow-unknown-imports"), "{err}");

    // An llm-app that was not composed imports wasmlm:llm, which no host provides.
    let raw = guest("wasmlm_example_summarize.wasm");
    let err = refused(&["--app", &format!("/s={}", raw.display())]);
    assert!(err.contains("wasmlm:llm/generation@0.6.0"), "{err}");
    assert!(err.contains("wasmlm compose"), "{err}");

    let ask = guest("wasmlm_example_ask.wasm");
    let err = refused(&["--app", &format!("/v1/chat={}", ask.display())]);
    assert!(err.contains("overlaps the node's own /v1"), "{err}");
    let err = refused(&["--app", "/x=/nonexistent/app.wasm"]);
    assert!(err.contains("/nonexistent/app.wasm"), "{err}");
    // The llm component itself is a component with every import met, but no HTTP handler.
    let llm = guest("wasmlm_llm_component.wasm");
    let err = refused(&["--app", &format!("/llm={}", llm.display())]);
    assert!(err.contains("exports no HTTP handler"), "{err}");
    let dir = scratch("refused");
    let not_wasm = dir.join("junk.wasm");
    std::fs::write(&not_wasm, b"\0asm junk").unwrap();
    let err = refused(&["--app", &format!("/j={}", not_wasm.display())]);
    assert!(err.contains("not a component"), "{err}");
    let err = refused(&["--app", "no-equals-sign"]);
    assert!(err.contains("ROUTE=PATH"), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    // Composing something that imports no wasmlm:llm is refused too.
    let o = Command::new(env!("CARGO_BIN_EXE_wasmlm"))
        .args(["compose"])
        .arg(&ask)
        .args(["-o", "/dev/null"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("imports no wasmlm:llm"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}
