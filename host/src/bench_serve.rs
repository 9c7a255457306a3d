//! `wasmlm bench-serve`: the node's HTTP path against the in-process component path, sampling
//! (temperature 1) against greedy decoding, JSON mode against free text, aggregate decode
//! throughput with several concurrent streams, and `n` choices in one request against as many
//! requests in turn, in one run.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use wasmlm_host::backend::KvDType;
use wasmlm_host::bindings::exports::wasmlm::llm::types::{
    Message, OutputFormat, Role, SamplingOptions,
};
use wasmlm_host::device::DeviceSpec;
use wasmlm_host::runtime::{default_options, message, no_context, Runtime};
use wasmlm_host::server::config::{NodeConfig, Overrides};

/// What one streamed generation measured.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    /// Time to the first generated token.
    ttft: Duration,
    /// Generated tokens after the first, and the time they took.
    decoded: usize,
    decode_time: Duration,
}

impl Sample {
    fn decode_rate(&self) -> f64 {
        self.decoded as f64 / self.decode_time.as_secs_f64().max(1e-9)
    }
}

fn prompt(i: usize) -> String {
    format!("Story number {i}: write a long story about a lighthouse keeper and the sea.")
}

/// A request whose answer is long JSON either way, so JSON mode and free text decode much
/// the same tokens.
fn json_prompt(i: usize) -> String {
    format!("List {i}: write a JSON object that lists 40 countries, each with its capital, population and area.")
}

fn messages(text: &str) -> Vec<Message> {
    vec![
        message(Role::System, "You are a helpful assistant."),
        message(Role::User, text),
    ]
}

/// The component in process, as `wasmlm run` drives it, greedy (`temperature` 0) or
/// sampling from the whole vocabulary (an API request's defaults at `temperature` 1), in
/// `format` (JSON mode ends where the object closes).
fn direct(
    runtime: &Runtime,
    model: &str,
    text: &str,
    gen: u32,
    temperature: f32,
    format: OutputFormat,
) -> Result<Sample> {
    let mut inst = runtime.instance(model)?;
    let options = SamplingOptions {
        max_tokens: Some(gen),
        temperature: Some(temperature),
        seed: Some(7),
        ignore_eos: Some(true),
        format: Some(format),
        ..default_options()
    };
    let t0 = Instant::now();
    let mut stream = inst.chat(model, &messages(text), &no_context(), &options)?;
    let (mut first, mut last, mut n) = (None, None, 0);
    while let Some(c) = stream.next_chunk()? {
        if !c.tokens.is_empty() {
            let now = Instant::now();
            first.get_or_insert(now);
            last = Some(now);
            n += c.tokens.len();
        }
    }
    let (first, last) = first.zip(last).ok_or_else(|| anyhow!("no tokens"))?;
    Ok(Sample {
        ttft: first - t0,
        decoded: n.saturating_sub(1),
        decode_time: last - first,
    })
}

/// The same request through `POST /v1/chat/completions` with `stream: true`.
fn http(addr: &str, model: &str, text: &str, gen: u32) -> Result<Sample> {
    let body = json!({
        "model": model,
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        "max_tokens": gen,
        "temperature": 0,
        "ignore_eos": true,
        "stream": true,
        "logprobs": true,
    })
    .to_string();
    let t0 = Instant::now();
    let (mut r, _) = post_json(addr, "/v1/chat/completions", &body)?;
    let mut line = String::new();
    // Chunked SSE: count tokens by their logprobs entries, timestamp each event.
    let (mut first, mut last, mut n) = (None, None, 0);
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let size = usize::from_str_radix(line.trim(), 16).context("chunk size")?;
        if size == 0 {
            break;
        }
        let mut buf = vec![0; size + 2];
        r.read_exact(&mut buf)?;
        let now = Instant::now();
        for ev in String::from_utf8_lossy(&buf[..size]).split("\n\n") {
            let Some(data) = ev.strip_prefix("data: ") else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(data) else {
                continue;
            };
            let k = v["choices"][0]["logprobs"]["content"]
                .as_array()
                .map_or(0, Vec::len);
            if k > 0 {
                first.get_or_insert(now);
                last = Some(now);
                n += k;
            }
        }
    }
    let (first, last) = first.zip(last).ok_or_else(|| anyhow!("no tokens"))?;
    Ok(Sample {
        ttft: first - t0,
        decoded: n.saturating_sub(1),
        decode_time: last - first,
    })
}

/// The wall time of one non-streaming chat request for `n` sampled choices of `gen` tokens.
fn http_choices(addr: &str, model: &str, text: &str, gen: u32, n: usize, seed: u64) -> Result<f64> {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": gen,
        "temperature": 1.0,
        "seed": seed,
        "ignore_eos": true,
        "n": n,
    })
    .to_string();
    let t0 = Instant::now();
    let (mut r, _) = post_json(addr, "/v1/chat/completions", &body)?;
    let mut answer = String::new();
    r.read_to_string(&mut answer)?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Sends `POST path` with a JSON body on a new connection; returns the reader past the headers
/// of a 200 answer and whether its body is chunked.
pub fn post_json(addr: &str, path: &str, body: &str) -> Result<(BufReader<TcpStream>, bool)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    if !line.contains(" 200 ") {
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        bail!("{path}: {} {rest}", line.trim());
    }
    let mut chunked = false;
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        chunked |= line
            .to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked");
    }
    Ok((r, chunked))
}

/// The middle value of `v`.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark against a node serving `model_spec` started in this process.
#[allow(clippy::too_many_arguments)]
pub fn run(
    runtime: Runtime,
    model: String,
    model_spec: String,
    device: DeviceSpec,
    kv_cache: Option<KvDType>,
    gen: u32,
    rounds: usize,
    streams: &[usize],
) -> Result<()> {
    let max_streams = streams.iter().copied().max().unwrap_or(1);
    let config = NodeConfig::load(
        None,
        Overrides {
            listen: Some("127.0.0.1:0".into()),
            models: vec![model_spec],
            slots: Some(max_streams),
            queue: Some(max_streams),
            device: Some(device),
            kv_cache,
            ..Overrides::default()
        },
        &wasmlm_host::models::models_dir(),
    )?;
    let t0 = Instant::now();
    let addr = start_node(config)?;
    println!(
        "node_ready_s={:.2} model={model} gen_tokens={gen} rounds={rounds}",
        t0.elapsed().as_secs_f64()
    );

    // HTTP overhead: the same request both ways, back to back, each round.
    let runtime = Arc::new(runtime);
    direct(&runtime, &model, &prompt(999), 4, 0.0, OutputFormat::Text)?;
    http(&addr, &model, &prompt(999), 4)?;
    let (mut ttft_r, mut dec_r, mut sampled_r, mut json_r) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let text = prompt(round);
        let d = direct(
            &runtime,
            &model,
            &format!("{text} (direct)"),
            gen,
            0.0,
            OutputFormat::Text,
        )?;
        let h = http(&addr, &model, &format!("{text} (http!!)"), gen)?;
        let s = direct(
            &runtime,
            &model,
            &format!("{text} (sample)"),
            gen,
            1.0,
            OutputFormat::Text,
        )?;
        // The same request as free text and in JSON mode, greedy.
        let jt = direct(
            &runtime,
            &model,
            &json_prompt(round),
            gen,
            0.0,
            OutputFormat::Text,
        )?;
        let j = direct(
            &runtime,
            &model,
            &json_prompt(round),
            gen,
            0.0,
            OutputFormat::JsonObject,
        )?;
        println!(
            "round={round} direct_ttft_ms={:.1} http_ttft_ms={:.1} direct_decode_tok_s={:.1} http_decode_tok_s={:.1} sampled_decode_tok_s={:.1} json_text_decode_tok_s={:.1} json_mode_decode_tok_s={:.1} json_mode_tokens={}",
            d.ttft.as_secs_f64() * 1e3,
            h.ttft.as_secs_f64() * 1e3,
            d.decode_rate(),
            h.decode_rate(),
            s.decode_rate(),
            jt.decode_rate(),
            j.decode_rate(),
            j.decoded + 1
        );
        ttft_r.push(h.ttft.as_secs_f64() / d.ttft.as_secs_f64());
        dec_r.push(h.decode_rate() / d.decode_rate());
        sampled_r.push(s.decode_rate() / d.decode_rate());
        json_r.push(j.decode_rate() / jt.decode_rate());
    }
    println!(
        "median ratio http/direct ttft={:.3} decode={:.3}; sampled (temperature 1)/greedy decode={:.3}; json mode/free text decode={:.3}",
        median(ttft_r),
        median(dec_r),
        median(sampled_r),
        median(json_r)
    );

    // Concurrency: aggregate decode throughput with N streams at once.
    let mut base = None;
    for &n in streams {
        let t0 = Instant::now();
        let samples: Vec<Result<Sample>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|i| {
                    let addr = &addr;
                    let model = &model;
                    s.spawn(move || http(addr, model, &prompt(1000 + n * 10 + i), gen))
                })
                .collect();
            hs.into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(anyhow!("client panicked"))))
                .collect()
        });
        let wall = t0.elapsed().as_secs_f64();
        let samples = samples.into_iter().collect::<Result<Vec<_>>>()?;
        let tokens: usize = samples.iter().map(|s| s.decoded + 1).sum();
        let aggregate = tokens as f64 / wall;
        let per_stream: f64 =
            samples.iter().map(Sample::decode_rate).sum::<f64>() / samples.len() as f64;
        let b = *base.get_or_insert(aggregate);
        println!(
            "streams={n} aggregate_tok_s={aggregate:.1} per_stream_decode_tok_s={per_stream:.1} vs_1_stream={:.2}",
            aggregate / b
        );
    }

    // `n` choices in one request (spread over the idle slots, decoded in one batch) against
    // the same choices (seed + i) as requests one after another.
    if max_streams > 1 {
        let k = max_streams;
        let mut speedups = Vec::new();
        for round in 0..rounds {
            let text = prompt(2000 + round);
            let mut in_turn = 0.0;
            for i in 0..k {
                in_turn += http_choices(&addr, &model, &text, gen, 1, 7 + i as u64)?;
            }
            let together = http_choices(&addr, &model, &text, gen, k, 7)?;
            println!("round={round} n={k} one_request_s={together:.2} {k}_requests_in_turn_s={in_turn:.2}");
            speedups.push(in_turn / together);
        }
        println!(
            "median speedup of n={k} in one request over {k} requests in turn={:.2}",
            median(speedups)
        );
    }
    Ok(())
}

/// Starts a node serving `config` in this process; returns its address once healthy.
pub fn start_node(config: NodeConfig) -> Result<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let wasm = wasmlm_host::runtime::EMBEDDED_COMPONENT.to_vec();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build();
        let outcome = rt.map_err(anyhow::Error::from).and_then(|rt| {
            rt.block_on(wasmlm_host::server::serve_with(config, wasm, move |addr| {
                let _ = tx.send(addr);
            }))
            .map_err(anyhow::Error::from)
        });
        if let Err(e) = outcome {
            eprintln!("wasmlm: bench node: {e:#}");
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(300))
        .context("the bench node did not start")?
        .to_string();
    let t0 = Instant::now();
    loop {
        let healthy = TcpStream::connect(&addr).ok().and_then(|mut s| {
            write!(
                s,
                "GET /health HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).ok()?;
            Some(out.starts_with("HTTP/1.1 200"))
        });
        if healthy == Some(true) {
            break;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the bench node never became healthy");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(addr)
}
