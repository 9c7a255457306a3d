//! `wasmlm serve` over raw HTTP on the real SmolLM2: SSE framing, status codes, headers,
//! warm-up, slots under load and client disconnects.

mod common;

use std::io::{BufReader, Write};
use std::time::{Duration, Instant};

use common::node::{metric, read_chunk, read_head, send, Node};
use serde_json::{json, Value};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": content},
        ],
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

/// Asserts an OpenAI-shaped error with `status`; returns its message.
fn expect_error(r: &common::node::Reply, status: u16) -> String {
    assert_eq!(r.status, status, "{}", r.text());
    let v = r.json();
    let e = &v["error"];
    assert!(e["message"].is_string(), "{v}");
    assert!(e["type"].is_string(), "{v}");
    assert!(e.get("param").is_some() && e.get("code").is_some(), "{v}");
    e["message"].as_str().unwrap_or_default().to_string()
}

#[test]
fn greedy_chat_over_http_matches_llama_cpp() {
    // One slot: the completion below must land where the chat left its cache.
    let node = Node::start(&["--slots", "1"]);
    // The row whose free-running greedy path has no near-tie. tests/parity.rs holds every
    // row to llama.cpp token by token (teacher-forced, within TIE_NATS); free-running, rows
    // 0-2 part from llama.cpp at near-ties that the order of float additions decides (the
    // tiled kernels moved row 1's: "add_two_numbers" for "add_numbers"), which says nothing
    // about the HTTP path this test is for.
    let row = &common::vectors("smollm2-greedy.jsonl")[3];
    let body = json!({
        "model": "smollm2",
        "messages": row["messages"],
        "temperature": 0,
        "max_tokens": common::ids(&row["greedy_ids"]).len(),
    });
    let r = node.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("application/json"));
    let v = r.json();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert_eq!(v["choices"][0]["message"]["content"], row["greedy_text"]);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let u = &v["usage"];
    assert_eq!(u["prompt_tokens"], common::ids(&row["prompt_ids"]).len());
    assert_eq!(u["completion_tokens"], body["max_tokens"]);
    assert_eq!(
        u["total_tokens"].as_u64(),
        Some(u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap())
    );
    assert!(u["prompt_tokens_details"]["cached_tokens"].is_u64());
    for k in [
        "prompt_n",
        "prompt_ms",
        "prompt_per_second",
        "predicted_n",
        "predicted_ms",
        "predicted_per_second",
    ] {
        assert!(v["timings"][k].is_number(), "timings.{k}: {v}");
    }
    assert_eq!(v["device"], "cpu");

    // The same prompt as a raw completion of its token ids gives the same text.
    let r = node.post(
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": row["prompt_ids"], "temperature": 0, "max_tokens": body["max_tokens"]}),
    );
    let v = r.json();
    assert_eq!(v["object"], "text_completion", "{v}");
    assert_eq!(v["choices"][0]["text"], row["greedy_text"]);
    // A conversation re-sent reuses the slot's cache for the prompt both share.
    assert!(
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0,
        "{v}"
    );
}

#[test]
fn sse_streams_are_framed_as_openai_does() {
    let node = Node::start(&[]);
    let body = chat(
        "Name a color.",
        json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 8, "seed": 1, "logprobs": true, "top_logprobs": 2}),
    );
    let r = node.post("/v1/chat/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("event JSON"))
        .collect();
    let id = &chunks[0]["id"];
    assert!(id.as_str().unwrap().starts_with("chatcmpl-"));
    for c in &chunks {
        assert_eq!(&c["id"], id, "one id per stream");
        assert_eq!(c["object"], "chat.completion.chunk");
        assert!(
            c.get("usage").is_some(),
            "include_usage puts usage in every chunk: {c}"
        );
    }
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let (usage_chunk, content) = chunks[1..].split_last().unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    assert_eq!(usage_chunk["usage"]["completion_tokens"], 8);
    let (last, middle) = content.split_last().unwrap();
    for c in middle {
        assert!(
            c["choices"][0]["delta"].get("role").is_none(),
            "role only first: {c}"
        );
        assert!(c["choices"][0]["finish_reason"].is_null(), "{c}");
        assert!(c["usage"].is_null());
        let lp = &c["choices"][0]["logprobs"]["content"][0];
        assert!(lp["logprob"].as_f64().unwrap() <= 0.0, "{c}");
        assert_eq!(lp["top_logprobs"].as_array().map(Vec::len), Some(2), "{c}");
    }
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert!(last["timings"]["predicted_n"].is_u64(), "{last}");
    let text: String = content
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty());

    // Without include_usage no usage field, and streamed text equals the non-streamed one.
    let plain = chat("Name a color.", json!({"max_tokens": 8, "seed": 1}));
    let whole = node.post("/v1/chat/completions", &plain).json();
    let mut streamed = plain.clone();
    streamed["stream"] = json!(true);
    let r = node.post("/v1/chat/completions", &streamed);
    let events = r.events();
    let text: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .inspect(|c| assert!(c.get("usage").is_none(), "{c}"))
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );

    // Completions stream too.
    let r = node.post(
        "/v1/completions",
        &json!({"model": "smollm2", "prompt": "Once upon a time", "max_tokens": 4, "stream": true, "echo": true}),
    );
    let events = r.events();
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["choices"][0]["text"], "Once upon a time");
}

#[test]
fn errors_have_openai_shapes_and_status_codes() {
    let node = Node::start(&["--api-key", "sekret", "--context", "128"]);
    let auth = [("Authorization", "Bearer sekret")];
    let post = |path: &str, body: &[u8]| node.request("POST", path, &auth, Some(body));

    // /health stays open; everything else wants the key.
    assert_eq!(node.get("/health").status, 200);
    assert_eq!(node.get("/health").json(), json!({"status": "ok"}));
    expect_error(&node.get("/v1/models"), 401);
    let wrong = node.request(
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer nope")],
        None,
    );
    assert!(expect_error(&wrong, 401).contains("API key"));
    assert_eq!(node.request("GET", "/v1/models", &auth, None).status, 200);

    expect_error(&post("/v1/chat/completions", b"{not json"), 400);
    expect_error(&post("/v1/chat/completions", b"[1]"), 400);
    let e = post(
        "/v1/chat/completions",
        chat("hi", json!({"n": 17})).to_string().as_bytes(),
    );
    assert!(expect_error(&e, 400).contains("'n' must be an integer from 1 to 16"));
    let e = post(
        "/v1/chat/completions",
        chat("hi", json!({"temperature": -1}))
            .to_string()
            .as_bytes(),
    );
    assert_eq!(e.json()["error"]["param"], "temperature");
    expect_error(&e, 400);
    let e = post(
        "/v1/chat/completions",
        chat("hi", json!({"model": "gpt-9"})).to_string().as_bytes(),
    );
    let msg = expect_error(&e, 404);
    assert!(msg.contains("gpt-9") && msg.contains("smollm2"), "{msg}");
    assert_eq!(e.json()["error"]["code"], "model_not_found");

    // A prompt longer than the context: 400 naming both numbers.
    let long = "word ".repeat(400);
    let e = post(
        "/v1/chat/completions",
        chat(&long, json!({})).to_string().as_bytes(),
    );
    let msg = expect_error(&e, 400);
    assert!(msg.contains("128"), "{msg}");
    assert_eq!(e.json()["error"]["code"], "context_length_exceeded");
    let n: u64 = e.json()["error"]["message"]
        .as_str()
        .unwrap()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .find(|&n| n > 128)
        .expect("the prompt's token count");
    assert!(n > 400, "{msg}");

    // Unknown and out-of-scope routes, wrong methods.
    expect_error(&node.request("GET", "/v2/nothing", &auth, None), 404);
    let files = expect_error(&node.request("GET", "/v1/files", &auth, None), 404);
    assert!(files.contains("out of scope"), "{files}");
    expect_error(
        &node.request("POST", "/v1/fine_tuning/jobs", &auth, Some(b"{}")),
        404,
    );
    expect_error(
        &node.request("GET", "/v1/chat/completions", &auth, None),
        405,
    );

    // A device the node does not have: 400 listing the valid ones.
    let e = node.request(
        "POST",
        "/api/warmup/smollm2",
        &[auth[0], ("X-GPU-Preference", "cuda:3")],
        Some(b""),
    );
    let msg = expect_error(&e, 400);
    assert!(msg.contains("cuda:3") && msg.contains("cpu"), "{msg}");
    let e = post(
        "/v1/chat/completions",
        chat("hi", json!({"gpu_preference": "h100"}))
            .to_string()
            .as_bytes(),
    );
    expect_error(&e, 400);

    // response_format: a known type with what it needs, alone.
    for (extra, words) in [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}),
            "json_schema.schema",
        ),
        (json!({"response_format": {"type": "yaml"}}), "json_object"),
        (json!({"response_format": "json"}), "json_object"),
        (
            json!({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}),
            "guided_choice",
        ),
    ] {
        let e = post(
            "/v1/chat/completions",
            chat("hi", extra).to_string().as_bytes(),
        );
        let msg = expect_error(&e, 400);
        assert!(msg.contains(words), "{msg}");
        assert_eq!(e.json()["error"]["param"], "response_format");
    }
    // A schema keyword the component cannot follow is refused by name, not ignored.
    let schema =
        json!({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}});
    let e = post(
        "/v1/chat/completions",
        chat(
            "hi",
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}}),
        )
        .to_string()
        .as_bytes(),
    );
    let msg = expect_error(&e, 400);
    assert!(msg.contains("multipleOf"), "{msg}");

    // Never a 500 for a hostile body.
    for body in [
        json!({"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}),
        json!({"model": "smollm2", "messages": [{"role": "user", "content": 7}]}),
        json!({"model": "smollm2", "prompt": [1, 2, 99999999]}),
        json!({"model": "smollm2", "messages": "hi"}),
        json!({"model": 5, "messages": []}),
    ] {
        let path = if body.get("prompt").is_some() {
            "/v1/completions"
        } else {
            "/v1/chat/completions"
        };
        expect_error(&post(path, body.to_string().as_bytes()), 400);
    }
    // The node still answers after all that.
    let ok = post(
        "/v1/chat/completions",
        chat("hi", json!({"max_tokens": 2})).to_string().as_bytes(),
    );
    assert_eq!(ok.status, 200, "{}", ok.text());
}

#[test]
fn warmup_loads_a_cold_model_and_reports_it() {
    let dir = std::env::temp_dir().join(format!("wasmlm-serve-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("node.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"edge-7\"\n[labels]\nzone = \"test\"\n[[models]]\nname = \"smollm2\"\npath = {:?}\npreload = false\nslots = 1\naliases = [\"tiny\"]\nkv_cache = \"q8_0\"\n",
            common::smollm2_path().display().to_string()
        ),
    )
    .unwrap();
    let node = Node::start(&["--config", config.to_str().unwrap(), "--label", "rack=3"]);
    let status = node.get("/api/warmup/status/smollm2").json();
    assert_eq!(status["state"], "cold", "{status}");
    let models = node.get("/v1/models").json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "smollm2");
    assert_eq!(models["data"][0]["state"], "cold");

    let r = node.request(
        "POST",
        "/api/warmup/tiny",
        &[("X-GPU-Preference", "cpu")],
        Some(b""),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["state"], "warm");
    assert!(v["load_time_ms"].as_f64().unwrap() > 0.0, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("warmed up in"),
        "{v}"
    );
    let status = node.get("/api/warmup/status/smollm2").json();
    assert_eq!(status["state"], "warm");
    assert_eq!(node.get("/v1/models/tiny").json()["state"], "warm");
    expect_error(&node.get("/api/warmup/status/nope"), 404);

    let inv = node.get("/node").json();
    assert_eq!(inv["id"], "edge-7");
    assert_eq!(inv["labels"], json!({"zone": "test", "rack": "3"}));
    assert_eq!(inv["devices"][0]["kind"], "cpu");
    assert_eq!(inv["models"][0]["state"], "warm");
    assert_eq!(inv["models"][0]["slots"]["total"], 1);
    // The config's q8_0 KV cache serves the README's question.
    assert_eq!(inv["models"][0]["kv_cache"], "q8_0");
    let r = node.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "temperature": 0, "max_tokens": 16, "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name the capital of France."}]}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer = r.json()["choices"][0]["message"]["content"].clone();
    assert!(answer.as_str().unwrap_or("").contains("Paris"), "{answer}");

    // llama.cpp's utility endpoints, on the model's own tokenizer and template.
    let row = &common::vectors("smollm2-tokens.jsonl")[0];
    let t = node
        .post("/tokenize", &json!({"content": row["text"]}))
        .json();
    assert_eq!(t["tokens"], row["ids"]);
    let d = node
        .post("/detokenize", &json!({"tokens": row["ids"]}))
        .json();
    assert_eq!(d["content"], row["text"]);
    let trow = &common::vectors("smollm2-template.jsonl")[0];
    let p = node
        .post("/apply-template", &json!({"messages": trow["messages"], "add_generation_prompt": trow["add_generation_prompt"]}))
        .json();
    assert_eq!(p["prompt"], trow["rendered"]);
    let t = node
        .post(
            "/tokenize",
            &json!({"content": "<|im_start|>", "parse_special": true}),
        )
        .json();
    assert_eq!(t["tokens"].as_array().map(Vec::len), Some(1), "{t}");
    std::fs::remove_dir_all(&dir).ok();
}

/// Reads a streaming response's head and its first `data:` event, leaving the rest unread.
fn open_stream(node: &Node, body: &Value) -> std::net::TcpStream {
    let mut s = node.connect();
    send(
        &mut s,
        "POST",
        "/v1/chat/completions",
        &[],
        Some(body.to_string().as_bytes()),
    );
    {
        let mut r = BufReader::new(&mut s);
        let (status, _) = read_head(&mut r);
        assert_eq!(status, 200);
        let first = read_chunk(&mut r).expect("a first event");
        assert!(first.starts_with(b"data: "));
    }
    s
}

#[test]
fn a_client_that_disconnects_frees_its_slot() {
    let node = Node::start(&["--slots", "1"]);
    let long = chat(
        "Tell me a long story.",
        json!({"stream": true, "max_tokens": 1500, "ignore_eos": true}),
    );
    let s = open_stream(&node, &long);
    let busy = |n: &Node| {
        metric(
            &n.get("/metrics").text(),
            "wasmlm_slots_busy{model=\"smollm2\"}",
        )
    };
    assert_eq!(busy(&node), Some(1.0));
    drop(s);
    let t0 = Instant::now();
    while busy(&node) != Some(0.0) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "slot still busy after the client left"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let text = node.get("/metrics").text();
    let generated =
        metric(&text, "wasmlm_generated_tokens_total{model=\"smollm2\"}").unwrap_or(0.0);
    assert!(
        generated < 1000.0,
        "generation went on after the disconnect: {generated}"
    );
    // The freed slot serves the next request.
    let r = node.post(
        "/v1/chat/completions",
        &chat("hi", json!({"max_tokens": 2})),
    );
    assert_eq!(r.status, 200);
}

#[test]
fn more_clients_than_slots_all_finish_or_get_429() {
    let node = Node::start(&["--slots", "1", "--queue", "1"]);
    let results: Vec<(u16, Option<String>, bool)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..5)
            .map(|i| {
                let node = &node;
                s.spawn(move || {
                    let body = chat(
                        &format!("Count to {i}."),
                        json!({"stream": i % 2 == 0, "max_tokens": 12}),
                    );
                    let r = node.post("/v1/chat/completions", &body);
                    let complete = r.status != 200
                        || r.text().contains("finish_reason\":\"length")
                        || r.text().contains("finish_reason\":\"stop");
                    (
                        r.status,
                        r.header("retry-after").map(String::from),
                        complete,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect()
    });
    let ok = results.iter().filter(|r| r.0 == 200).count();
    assert!(ok >= 2, "one slot + one queued must succeed: {results:?}");
    for (status, retry, complete) in &results {
        assert!(*status == 200 || *status == 429, "{results:?}");
        assert!(complete, "{results:?}");
        if *status == 429 {
            assert_eq!(retry.as_deref(), Some("1"));
        }
    }
    // A worker hands its slot back just after the client has its last byte: give the gauges
    // a moment to settle rather than racing it.
    let settled = |text: &str| {
        metric(text, "wasmlm_slots_busy{model=\"smollm2\"}") == Some(0.0)
            && metric(text, "wasmlm_queue_depth{model=\"smollm2\"}") == Some(0.0)
            && metric(text, "wasmlm_requests_in_flight") == Some(0.0)
    };
    let t0 = Instant::now();
    let mut text = node.get("/metrics").text();
    while !settled(&text) && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
        text = node.get("/metrics").text();
    }
    assert!(settled(&text), "gauges did not return to 0:\n{text}");
    let served = metric(
        &text,
        "wasmlm_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}",
    );
    assert_eq!(served, Some(ok as f64));
    assert!(
        text.contains("wasmlm_time_to_first_token_seconds_bucket{model=\"smollm2\",le=\"+Inf\"}")
    );
    assert!(text.contains("# TYPE wasmlm_inter_token_latency_seconds histogram"));
    let _ = std::io::stdout().flush();
}
