//! The gateway in front of three real `wasmlm serve` nodes with the real SmolLM2 when nodes
//! fail: a client that leaves, a node killed mid-stream, a node killed and restarted.

mod support;

use std::io::BufRead;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{assert_openai_error, chat, get, open_stream, post, read_chunk};

#[test]
fn survives_nodes_dying_mid_test_and_mid_stream() {
    let mut c = support::cluster("failover", "");
    let gw = c.gateway.addr.clone();
    let long = |device: &str| {
        let body = chat(
            "Count from one to a thousand.",
            json!({"stream": true, "max_tokens": 400, "ignore_eos": true, "temperature": 0}),
        );
        let (status, headers, r) = open_stream(
            &gw,
            "/v1/chat/completions",
            "",
            &[("X-GPU-Preference", device)],
            &body,
        );
        assert_eq!(status, 200);
        assert!(
            headers
                .iter()
                .any(|(k, v)| k == "x-served-device" && v == device),
            "{headers:?}"
        );
        r
    };

    // A client that goes away cancels its generation on the node.
    let mut r = long("cpu");
    assert!(read_chunk(&mut r).is_some());
    drop(r);
    let cpu = c.node("cpu").addr.clone();
    let deadline = Instant::now() + Duration::from_secs(5);
    while get(&cpu, "/node", "").json()["in_flight"] != 0 {
        assert!(
            Instant::now() < deadline,
            "the node kept generating for a client that left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A node killed mid-stream: the client gets an OpenAI error event, not a hang.
    let mut r = long("A10G");
    let mut seen = String::new();
    for _ in 0..3 {
        seen.push_str(&String::from_utf8_lossy(
            &read_chunk(&mut r).expect("a chunk"),
        ));
    }
    c.node("a10g").kill();
    let started = Instant::now();
    while let Some(chunk) = read_chunk(&mut r) {
        seen.push_str(&String::from_utf8_lossy(&chunk));
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the stream never ended"
        );
    }
    let last = seen
        .trim_end()
        .rsplit("\n\n")
        .next()
        .unwrap_or_default()
        .to_string();
    let event: Value =
        serde_json::from_str(last.strip_prefix("data: ").unwrap_or(&last)).unwrap_or(Value::Null);
    assert!(event["error"]["message"].is_string(), "last event: {last}");
    assert_eq!(event["error"]["type"], "server_error");
    assert!(!seen.contains("[DONE]"));
    let mut rest = String::new();
    let _ = r.read_line(&mut rest);

    // Requests keep succeeding on the others; the dead node is ejected.
    for i in 0..6 {
        let r = post(
            &gw,
            "/v1/chat/completions",
            "",
            &[],
            &chat(&format!("Say {i}."), json!({"max_tokens": 2})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_ne!(r.header("x-served-by"), Some("a10g"));
    }
    c.wait_up(2, "");
    let m = get(&gw, "/metrics", "").text();
    assert!(
        m.contains("wasmlm_gateway_ejections_total{node=\"a10g\"} 1"),
        "{m}"
    );
    // The device is compatible but absent right now: 503 with Retry-After.
    let r = post(
        &gw,
        "/v1/chat/completions",
        "",
        &[("X-GPU-Preference", "A10G")],
        &chat("Hi", json!({})),
    );
    assert_openai_error(&r, 503);
    assert!(r.header("retry-after").is_some());
    let status = get(&gw, "/api/warmup/status/smollm2", "").json();
    assert!(
        status["devices"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["node"] == "a10g" && d["state"] == "unreachable"),
        "{status}"
    );

    // Restarted, it is readmitted and serves again.
    c.node("a10g").restart();
    c.wait_up(3, "");
    let r = post(
        &gw,
        "/v1/chat/completions",
        "",
        &[("X-GPU-Preference", "A10G")],
        &chat("Hi", json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("a10g"));
}
