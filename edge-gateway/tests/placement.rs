//! The gateway in front of three real `wasmlm serve` nodes with the real SmolLM2, labelled as
//! an L40S, an A10G and a CPU box: placement by preference, the 400 for an incompatible one,
//! warm-up, prefix affinity, limits and the openai SDK. (Failures live in `failover.rs`, a
//! separate binary, so the two clusters do not share the CPU.)

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use support::{assert_openai_error, chat, get, post, ADMIN};

const CLIENT: &str = "client-key-0001";

#[test]
fn places_by_device_warms_sticks_to_prefixes_and_limits_keys() {
    let keys = format!(
        "admin_key = \"{ADMIN}\"\n\
         [[keys]]\nkey = \"{CLIENT}\"\n\
         [[keys]]\nkey = \"limited-rpm-key\"\nrequests_per_minute = 2\n\
         [[keys]]\nkey = \"limited-tpm-key\"\ntokens_per_minute = 10\n"
    );
    let c = support::cluster("placement", &keys);
    let gw = c.gateway.addr.as_str();

    // Keys: none, or a wrong one, is a 401.
    assert_openai_error(
        &post(gw, "/v1/chat/completions", "", &[], &chat("Hi", json!({}))),
        401,
    );
    assert_openai_error(
        &post(
            gw,
            "/v1/chat/completions",
            "wrong-key-123",
            &[],
            &chat("Hi", json!({})),
        ),
        401,
    );

    // Routing by header and by body preference; the node would answer 400 to a preference for
    // a device it does not have, so these also prove the gateway strips it.
    for (device, id) in [("L40S", "l40s"), ("A10G", "a10g"), ("cpu", "cpu")] {
        let r = post(
            gw,
            "/v1/chat/completions",
            CLIENT,
            &[("X-GPU-Preference", device)],
            &chat("Hi", json!({})),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-served-device"), Some(device));
        assert_eq!(r.header("x-served-by"), Some(id));
        assert_eq!(r.json()["object"], "chat.completion");
        let body = chat("Hello", json!({"gpu_preference": device.to_lowercase()}));
        let r = post(gw, "/v1/chat/completions", CLIENT, &[], &body);
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-served-device"), Some(device));
    }

    // A preference the model is not compatible with: 400 naming the compatible devices.
    let r = post(
        gw,
        "/v1/chat/completions",
        CLIENT,
        &[("X-GPU-Preference", "H100")],
        &chat("Hi", json!({})),
    );
    let e = assert_openai_error(&r, 400);
    assert_eq!(e["param"], "gpu_preference");
    let msg = e["message"].as_str().unwrap();
    for d in ["L40S", "A10G", "cpu"] {
        assert!(msg.contains(d), "{msg}");
    }

    // Hostile bodies: not JSON, and a declared size over the limit (refused before it is read).
    let r = support::request(
        gw,
        "POST",
        "/v1/chat/completions",
        CLIENT,
        &[],
        Some(&json!("a string")),
    );
    assert_openai_error(&r, 400);
    let r = support::raw(
        gw,
        &format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT}\r\n\
             Content-Type: application/json\r\nContent-Length: 40000000\r\nConnection: close\r\n\r\n{{"
        ),
    );
    assert_openai_error(&r, 413);

    // Catalog alias, unknown model, models list.
    let r = post(
        gw,
        "/v1/chat/completions",
        CLIENT,
        &[],
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let e = assert_openai_error(
        &post(
            gw,
            "/v1/chat/completions",
            CLIENT,
            &[],
            &json!({"model": "nope", "messages": []}),
        ),
        404,
    );
    assert_eq!(e["code"], "model_not_found");
    let models = get(gw, "/v1/models", CLIENT).json();
    let m = &models["data"][0];
    assert_eq!(m["id"], "smollm2", "{models}");
    assert!(
        m["aliases"].as_array().unwrap().contains(&json!("tiny")),
        "{m}"
    );
    let devices: HashSet<&str> = m["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device"].as_str().unwrap())
        .collect();
    assert_eq!(devices, HashSet::from(["L40S", "A10G", "cpu"]), "{m}");
    assert_eq!(get(gw, "/v1/models/tiny", CLIENT).json()["id"], "smollm2");

    // Warm-up: admin only; one node of the preferred device, or all of them.
    let e = assert_openai_error(
        &post(gw, "/api/warmup/smollm2", CLIENT, &[], &json!({})),
        403,
    );
    assert_eq!(e["type"], "permission_error");
    let r = post(
        gw,
        "/api/warmup/smollm2",
        ADMIN,
        &[("X-GPU-Preference", "A10G")],
        &json!({}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(
        (
            v["state"].as_str(),
            v["node"].as_str(),
            v["device"].as_str()
        ),
        (Some("warm"), Some("a10g"), Some("A10G")),
        "{v}"
    );
    let r = post(gw, "/api/warmup/smollm2?all=true", ADMIN, &[], &json!({}));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        r.json()["devices"].as_array().map(Vec::len),
        Some(3),
        "{}",
        r.text()
    );
    let status = get(gw, "/api/warmup/status/smollm2", ADMIN).json();
    let entries = status["devices"].as_array().expect("devices");
    assert_eq!(entries.len(), 3, "{status}");
    for d in entries {
        assert_eq!(d["state"], "warm", "{status}");
        assert!(d["load_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{status}");
    }

    // Multi-turn conversations return to the node that holds their KV cache.
    for (i, topic) in ["the sea", "mountains", "a city at night"]
        .iter()
        .enumerate()
    {
        let system = format!("You are a poet #{i}. You write one short line about {topic}, never more, and you never explain it.");
        let mut messages = vec![
            json!({"role": "system", "content": system}),
            json!({"role": "user", "content": "Write the line."}),
        ];
        let r = post(
            gw,
            "/v1/chat/completions",
            CLIENT,
            &[],
            &json!({"model": "smollm2", "messages": messages, "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let first = r.header("x-served-by").unwrap().to_string();
        messages.push(r.json()["choices"][0]["message"].clone());
        messages.push(json!({"role": "user", "content": "Another one, please."}));
        let r = post(
            gw,
            "/v1/chat/completions",
            CLIENT,
            &[],
            &json!({"model": "smollm2", "messages": messages, "max_tokens": 12, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(
            r.header("x-served-by"),
            Some(first.as_str()),
            "turn 2 of conversation {i}"
        );
        let cached = r.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap_or(0);
        assert!(cached > 0, "turn 2 reuses the KV cache: {}", r.text());
    }

    // Streams pass through, framed as the node frames them.
    let r = post(
        gw,
        "/v1/chat/completions",
        CLIENT,
        &[],
        &chat(
            "Name a color.",
            json!({"stream": true, "stream_options": {"include_usage": true}, "max_tokens": 6}),
        ),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("content-type"), Some("text/event-stream"));
    assert!(r.header("x-served-by").is_some());
    let events = r.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let usage: Value = serde_json::from_str(&events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6, "{usage}");

    // Limits: requests per minute, then tokens per minute.
    assert_eq!(get(gw, "/v1/models", "limited-rpm-key").status, 200);
    assert_eq!(get(gw, "/v1/models", "limited-rpm-key").status, 200);
    let r = get(gw, "/v1/models", "limited-rpm-key");
    let e = assert_openai_error(&r, 429);
    assert_eq!(e["type"], "rate_limit_error");
    assert!(
        r.header("retry-after")
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|s| s >= 1),
        "{:?}",
        r.headers
    );
    let r = post(
        gw,
        "/v1/chat/completions",
        "limited-tpm-key",
        &[],
        &chat("Hi", json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let r = post(
        gw,
        "/v1/chat/completions",
        "limited-tpm-key",
        &[],
        &chat("Hi", json!({})),
    );
    let e = assert_openai_error(&r, 429);
    assert!(
        e["message"].as_str().unwrap().contains("tokens per minute"),
        "{e}"
    );
    assert!(r.header("retry-after").is_some());

    // Metrics: admin only, per node, model and device.
    assert_openai_error(&get(gw, "/metrics", CLIENT), 403);
    let m = get(gw, "/metrics", ADMIN).text();
    for needle in [
        "wasmlm_gateway_requests_total{node=\"a10g\",model=\"smollm2\",device=\"A10G\",status=\"200\"}",
        "wasmlm_gateway_upstream_ttft_seconds_count{node=\"l40s\",model=\"smollm2\",device=\"L40S\"}",
        "wasmlm_gateway_queue_seconds_count{model=\"smollm2\"}",
        "wasmlm_gateway_node_up{node=\"cpu\",device=\"cpu\"} 1",
    ] {
        assert!(m.contains(needle), "{needle} missing from\n{m}");
    }

    // A gateway can front another gateway: the outer one sees the inner one as a node.
    let outer = support::start_gateway(
        "outer",
        &format!(
            "node_api_key = \"{CLIENT}\"\nhealth_interval = \"200ms\"\n\
             [[nodes]]\nurl = \"http://{gw}\"\n"
        ),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while get(&outer.addr, "/health", "").status != 200 {
        assert!(
            std::time::Instant::now() < deadline,
            "the outer gateway never saw the inner one"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let r = post(
        &outer.addr,
        "/v1/chat/completions",
        "",
        &[("X-GPU-Preference", "auto")],
        &chat("Hi", json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        ["l40s", "a10g", "cpu"].contains(&r.header("x-served-by").unwrap_or_default()),
        "{:?}",
        r.headers
    );
    drop(outer);

    // The official openai SDK, unchanged, against the gateway.
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_gateway.py"))
        .arg(format!("http://{gw}/v1"))
        .arg(CLIENT)
        .env("PYTHONPATH", sdk_dir())
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ok  streaming chat"), "{stdout}");
}

/// The pinned openai SDK, installed under the target dir on first use.
fn sdk_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("pydeps-openai-3.54.0-gateway");
    if !dir.join(".complete").exists() {
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
            .arg("openai==3.54.0")
            .output()
            .expect("python3 -m pip runs");
        assert!(
            out.status.success(),
            "installing openai: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(tmp.join(".complete"), "").expect("marker");
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir).expect("moving the SDK into place");
    }
    dir
}
