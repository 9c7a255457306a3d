//! `wasmlm bench-app`: the same generation asked through a wasm app's `fermyon:spin/llm`
//! import (the spin-sdk 7 example on `/ask`) and through the node's `/v1/completions`, on one
//! node in one run: decode rate and the latency the app path adds.

use std::io::{BufRead, Read};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use wasmlm_host::server::config::{NodeConfig, Overrides};

use crate::bench_serve::{median, post_json, start_node};

/// `POST path` with a JSON body; the parsed answer and the time to its last byte.
fn post(addr: &str, path: &str, body: &Value) -> Result<(Value, Duration)> {
    let t0 = Instant::now();
    let (mut r, chunked) = post_json(addr, path, &body.to_string())?;
    let mut out = Vec::new();
    if chunked {
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim(), 16).context("chunk size")?;
            if size == 0 {
                break;
            }
            let mut buf = vec![0; size + 2];
            r.read_exact(&mut buf)?;
            out.extend_from_slice(&buf[..size]);
        }
    } else {
        r.read_to_end(&mut out)?;
    }
    let elapsed = t0.elapsed();
    Ok((
        serde_json::from_slice(&out).context("a JSON answer")?,
        elapsed,
    ))
}

/// One request both ways; returns (tokens, api time, app time), checking they agree.
fn both(
    addr: &str,
    model: &str,
    prompt: &str,
    gen: u32,
    app_first: bool,
) -> Result<(u64, f64, f64)> {
    let api = || {
        post(
            addr,
            "/v1/completions",
            &json!({"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0}),
        )
    };
    let app = || {
        post(
            addr,
            "/ask",
            &json!({"model": model, "prompt": prompt, "max_tokens": gen, "temperature": 0, "repeat_penalty": 1.0}),
        )
    };
    let (a, b) = if app_first {
        let b = app()?;
        (api()?, b)
    } else {
        let a = api()?;
        (a, app()?)
    };
    let (api_v, api_t) = a;
    let (app_v, app_t) = b;
    if api_v["choices"][0]["text"] != app_v["text"] {
        bail!("the two paths disagree: {api_v} vs {app_v}");
    }
    let n = app_v["usage"]["generated_token_count"]
        .as_u64()
        .unwrap_or(0);
    Ok((n, api_t.as_secs_f64(), app_t.as_secs_f64()))
}

/// Runs the benchmark on a node serving `model_spec` and the app at `app`.
pub fn run(model_spec: String, app: Option<PathBuf>, gen: u32, rounds: usize) -> Result<()> {
    let app = app
        .unwrap_or_else(|| PathBuf::from(env!("WASMLM_GUEST_DIR")).join("wasmlm_example_ask.wasm"));
    let config = NodeConfig::load(
        None,
        Overrides {
            listen: Some("127.0.0.1:0".into()),
            models: vec![model_spec],
            slots: Some(1),
            apps: vec![format!("/ask={}", app.display())],
            ..Overrides::default()
        },
        &wasmlm_host::models::models_dir(),
    )?;
    let model = config.models[0].spec.name.clone();
    let addr = start_node(config)?;
    let prompt = "Once upon a time, in a lighthouse at the edge of the sea, there lived";
    both(&addr, &model, prompt, 4, false)?;
    println!("app={} gen_tokens={gen} rounds={rounds}", app.display());
    // Latency: one generated token, so the difference is the app path's own cost.
    let mut added = Vec::new();
    for round in 0..rounds * 3 {
        let (_, api, app) = both(&addr, &model, prompt, 1, round % 2 == 1)?;
        added.push((app - api) * 1e3);
    }
    // Decode: the same long greedy generation both ways, alternating which goes first.
    let mut ratio = Vec::new();
    for round in 0..rounds {
        let (n, api, app) = both(&addr, &model, prompt, gen, round % 2 == 1)?;
        let (api_rate, app_rate) = (n as f64 / api, n as f64 / app);
        println!(
            "round={round} tokens={n} openai_tok_s={api_rate:.1} app_tok_s={app_rate:.1} ratio={:.3}",
            app_rate / api_rate
        );
        ratio.push(app_rate / api_rate);
    }
    println!(
        "median app/openai decode ratio={:.3} added latency p50={:.2} ms (max_tokens 1, {} pairs)",
        median(ratio),
        median(added.clone()),
        added.len()
    );
    Ok(())
}
