//! Gateway benchmarks on real nodes (`cargo bench -p wasmlm-edge-gateway`):
//!
//! 1. **Overhead**: the same small requests (`max_tokens: 1`, and `/tokenize`) sent straight
//!    to a node and through a gateway in front of it, interleaved in one run over keep-alive
//!    connections: latency p50/p99 of each and requests/s with 4 clients.
//! 2. **Placement quality**: a shared-prefix multi-tenant workload (tenants with long system
//!    prompts, many short questions) over three nodes through a gateway with our policy and
//!    through one doing round-robin: time to first token and throughput, and their ratio.
//!
//! Prints a Markdown report for `docs/perf.md`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(mut cmd: Command, prefix: &str) -> (Proc, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let marker = format!("{prefix}: listening on http://");
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) if l.starts_with(&marker) => break l[marker.len()..].trim().to_string(),
            Some(Ok(_)) => {}
            _ => panic!("{prefix} exited before listening"),
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (Proc(child), addr)
}

fn node(id: &str, label: &str, threads: &str) -> (Proc, String) {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_edge-gateway")).with_file_name("wasmlm");
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--threads",
        threads,
        "--slots",
        "2",
    ])
    .args(["--node-id", id, "--label", label]);
    spawn(cmd, "wasmlm")
}

fn gateway(nodes: &[&str], strategy: &str) -> (Proc, String, PathBuf) {
    let dir = std::env::temp_dir().join(format!("gw-bench-{}-{strategy}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    // GATEWAY_BENCH_PLACEMENT adds [placement] keys (to try other knobs).
    let mut toml = format!(
        "health_interval = \"500ms\"\n[placement]\nexplore = 0.0\nstrategy = \"{strategy}\"\n{}\n",
        std::env::var("GATEWAY_BENCH_PLACEMENT").unwrap_or_default()
    );
    for n in nodes {
        toml.push_str(&format!("[[nodes]]\nurl = \"http://{n}\"\n"));
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).expect("config");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-gateway"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"]);
    let (p, addr) = spawn(cmd, "edge-gateway");
    (p, addr, dir)
}

/// A keep-alive HTTP/1.1 connection.
struct Conn {
    addr: String,
    /// `x-served-by` of the last answer.
    served_by: String,
    r: BufReader<TcpStream>,
}

impl Conn {
    fn open(addr: &str) -> Conn {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        Conn {
            addr: addr.into(),
            served_by: String::new(),
            r: BufReader::new(s),
        }
    }

    /// POSTs `body`; returns (status, time to the answer head, the body).
    fn post(&mut self, path: &str, body: &Value) -> (u16, Duration, Vec<u8>) {
        let body = body.to_string();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            self.addr,
            body.len()
        );
        let t = Instant::now();
        let s = self.r.get_mut();
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body.as_bytes()).expect("write");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("status");
        let head_at = t.elapsed();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let (mut len, mut chunked) = (None, false);
        loop {
            line.clear();
            self.r.read_line(&mut line).expect("header");
            if line.trim().is_empty() {
                break;
            }
            let l = line.to_ascii_lowercase();
            if let Some(v) = l.strip_prefix("x-served-by:") {
                self.served_by = v.trim().to_string();
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                len = v.trim().parse::<usize>().ok();
            }
            if l.starts_with("transfer-encoding:") && l.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.r.read_line(&mut line).expect("chunk size");
                let n = usize::from_str_radix(line.trim(), 16).expect("hex");
                let mut buf = vec![0; n + 2];
                self.r.read_exact(&mut buf).expect("chunk");
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
        } else if let Some(n) = len {
            out.resize(n, 0);
            self.r.read_exact(&mut out).expect("body");
        }
        (status, head_at, out)
    }
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn wait_ready(gw: &str, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        if let Ok(mut s) = TcpStream::connect(gw) {
            let _ = write!(
                s,
                "GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            );
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            if let Some(body) = text.split("\r\n\r\n").nth(1) {
                let body = body.lines().find(|l| l.starts_with('{')).unwrap_or(body);
                if let Ok(v) = serde_json::from_str::<Value>(body) {
                    if v["nodes"]["ready"] == n {
                        return;
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("gateway {gw} never had {n} ready nodes");
}

fn overhead() {
    let (_n, node_addr) = node("bench", "device=cpu", "2");
    let (_g, gw, _dir) = gateway(&[&node_addr], "balanced");
    wait_ready(&gw, 1);
    println!("## Gateway overhead (1 node, keep-alive, interleaved)\n");
    println!("| request | path | p50 ms | p99 ms | added p50 ms | added p99 ms |");
    println!("|---|---|---|---|---|---|");
    let gen = json!({"model": "smollm2", "prompt": "Hi", "max_tokens": 1, "temperature": 0});
    let tok = json!({"content": "The quick brown fox jumps over the lazy dog."});
    for (name, path, body, n) in [
        ("completion, max_tokens 1", "/v1/completions", &gen, 300),
        ("/tokenize", "/tokenize", &tok, 2000),
    ] {
        let mut direct = Conn::open(&node_addr);
        let mut via = Conn::open(&gw);
        for _ in 0..20 {
            direct.post(path, body);
            via.post(path, body);
        }
        let (mut d, mut g) = (Vec::new(), Vec::new());
        for i in 0..n {
            // Alternate which goes first, so drift and caching favour neither.
            let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
            for w in order {
                let c = if w == 0 { &mut direct } else { &mut via };
                let t = Instant::now();
                let (status, _, _) = c.post(path, body);
                assert_eq!(status, 200);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                if w == 0 {
                    d.push(ms)
                } else {
                    g.push(ms)
                }
            }
        }
        let (d50, d99, g50, g99) = (
            pct(&mut d, 0.5),
            pct(&mut d, 0.99),
            pct(&mut g, 0.5),
            pct(&mut g, 0.99),
        );
        println!("| {name} | direct | {d50:.2} | {d99:.2} | | |");
        println!(
            "| {name} | gateway | {g50:.2} | {g99:.2} | {:.2} | {:.2} |",
            g50 - d50,
            g99 - d99
        );
    }
    // Requests/s with 4 clients, direct then through the gateway, alternating twice.
    let rps = |addr: &str| {
        let secs = 8.0;
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let addr = addr.to_string();
                let gen = gen.clone();
                std::thread::spawn(move || {
                    let mut c = Conn::open(&addr);
                    let t = Instant::now();
                    let mut n = 0u32;
                    while t.elapsed().as_secs_f64() < secs {
                        assert_eq!(c.post("/v1/completions", &gen).0, 200);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .sum::<u32>() as f64
            / secs
    };
    let (mut d, mut g) = (0.0, 0.0);
    for _ in 0..2 {
        d += rps(&node_addr);
        g += rps(&gw);
    }
    println!(
        "\nRequests/s, 4 clients, max_tokens 1: direct {:.1}, gateway {:.1} → **{:.3}×**\n",
        d / 2.0,
        g / 2.0,
        g / d
    );
}

fn placement() {
    let nodes: Vec<(Proc, String)> = ["a", "b", "c"]
        .iter()
        .map(|id| node(id, "device=cpu", "1"))
        .collect();
    let addrs: Vec<&str> = nodes.iter().map(|(_, a)| a.as_str()).collect();
    let (_g1, ours, _d1) = gateway(&addrs, "balanced");
    let (_g2, rr, _d2) = gateway(&addrs, "round-robin");
    wait_ready(&ours, 3);
    wait_ready(&rr, 3);
    let (tenants, questions, clients) = (4, 5, 3);
    let system = |t: usize| {
        format!(
            "You are the support assistant of company number {t}. {}",
            "Answer politely, briefly and precisely, quote the order number back, never invent \
             policies, and escalate anything about refunds above one hundred euros to a human. "
                .repeat(6)
        )
    };
    let run = |gw: &str| {
        // Tenants interleave; the clients run them side by side.
        let jobs: Vec<(usize, usize)> = (0..questions)
            .flat_map(|q| (0..tenants).map(move |t| (t, q)))
            .collect();
        let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs.into_iter()));
        let t0 = Instant::now();
        let handles: Vec<_> = (0..clients)
            .map(|_| {
                let jobs = jobs.clone();
                let gw = gw.to_string();
                std::thread::spawn(move || {
                    let mut c = Conn::open(&gw);
                    // (time to first token, share of the prompt cached)
                    let mut out = Vec::new();
                    loop {
                        let next = jobs.lock().expect("jobs").next();
                        let Some((t, q)) = next else { break };
                        let body = json!({
                            "model": "smollm2", "max_tokens": 8, "temperature": 0, "stream": true,
                            "stream_options": {"include_usage": true},
                            "messages": [
                                {"role": "system", "content": system(t)},
                                {"role": "user", "content": format!("Where is my order {t}{q}{q}?")},
                            ],
                        });
                        let (status, ttft, sse) = c.post("/v1/chat/completions", &body);
                        assert_eq!(status, 200);
                        let text = String::from_utf8_lossy(&sse).into_owned();
                        let usage = text
                            .split("\n\n")
                            .filter_map(|e| e.strip_prefix("data: "))
                            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
                            .find(|v| v["usage"].is_object())
                            .unwrap_or_default();
                        let u = &usage["usage"];
                        let cached = u["prompt_tokens_details"]["cached_tokens"]
                            .as_f64()
                            .unwrap_or(0.0);
                        let prompt = u["prompt_tokens"].as_f64().unwrap_or(1.0);
                        if std::env::var_os("GATEWAY_BENCH_VERBOSE").is_some() {
                            eprintln!(
                                "tenant={t} q={q} node={} cached={cached} ttft={:.2}",
                                c.served_by,
                                ttft.as_secs_f64()
                            );
                        }
                        out.push((ttft.as_secs_f64(), cached / prompt));
                    }
                    out
                })
            })
            .collect();
        let results: Vec<(f64, f64)> = handles
            .into_iter()
            .flat_map(|h| h.join().expect("client"))
            .collect();
        let wall = t0.elapsed().as_secs_f64();
        let n = results.len() as f64;
        let mut ttfts: Vec<f64> = results.iter().map(|r| r.0).collect();
        Run {
            mean_ttft: ttfts.iter().sum::<f64>() / n,
            p50_ttft: pct(&mut ttfts, 0.5),
            rps: n / wall,
            cached: results.iter().map(|r| r.1).sum::<f64>() / n,
        }
    };
    // Round-robin, ours, round-robin: each run starts with the caches the previous one left,
    // and the two round-robin runs bracket ours against drift on this shared machine.
    let rr1 = run(&rr);
    let o = run(&ours);
    let rr2 = run(&rr);
    let r = Run {
        mean_ttft: (rr1.mean_ttft + rr2.mean_ttft) / 2.0,
        p50_ttft: (rr1.p50_ttft + rr2.p50_ttft) / 2.0,
        rps: (rr1.rps + rr2.rps) / 2.0,
        cached: (rr1.cached + rr2.cached) / 2.0,
    };
    println!(
        "## Placement: {tenants} tenants × {questions} questions, 3 nodes, {clients} clients\n"
    );
    println!("| policy | mean TTFT s | p50 TTFT s | requests/s | prompt cached |");
    println!("|---|---|---|---|---|");
    for (name, x) in [
        ("round-robin (mean of 2 runs)", &r),
        ("ours (load/speed + prefix affinity)", &o),
    ] {
        println!(
            "| {name} | {:.3} | {:.3} | {:.2} | {:.0}% |",
            x.mean_ttft,
            x.p50_ttft,
            x.rps,
            x.cached * 100.0
        );
    }
    println!(
        "\nOurs vs round-robin: mean TTFT **{:.2}×** lower, throughput **{:.2}×**.",
        r.mean_ttft / o.mean_ttft,
        o.rps / r.rps
    );
}

/// One placement run's results.
struct Run {
    mean_ttft: f64,
    p50_ttft: f64,
    rps: f64,
    cached: f64,
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing: run only when asked.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let which = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_default();
    if which.is_empty() || which == "overhead" {
        overhead();
    }
    if which.is_empty() || which == "placement" {
        placement();
    }
}
