//! Real `wasmlm serve` nodes and a real `edge-gateway` on loopback, and a small HTTP/1.1
//! client that can read a stream event by event.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The directory holding the workspace's release binaries.
fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edge-gateway"))
        .parent()
        .expect("the binary's folder")
        .to_path_buf()
}

/// The `wasmlm` binary next to ours (built by `cargo test --workspace`).
pub fn wasmlm_bin() -> PathBuf {
    let p = bin_dir().join("wasmlm");
    assert!(
        p.exists(),
        "{} is missing: build it with `cargo build --release -p wasmlm-host`",
        p.display()
    );
    p
}

/// Starts a child and returns the address it prints as `PREFIX: listening on http://ADDR`.
fn start_listening(mut cmd: Command, prefix: &str) -> (Child, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the binary starts");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut lines = BufReader::new(stdout).lines();
    let marker = format!("{prefix}: listening on http://");
    let addr = loop {
        match lines.next() {
            Some(Ok(l)) => {
                if let Some(a) = l.strip_prefix(&marker) {
                    break a.trim().to_string();
                }
            }
            _ => panic!("{prefix} exited before listening"),
        }
    };
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, addr)
}

/// A node: device label, id and process (killed on drop).
pub struct NodeProc {
    pub id: String,
    pub label: String,
    pub addr: String,
    child: Option<Child>,
}

impl NodeProc {
    /// Starts `wasmlm serve` with the default model on `listen`, labelled `label`.
    pub fn start(id: &str, label: &str, listen: &str, extra: &[&str]) -> NodeProc {
        let mut cmd = Command::new(wasmlm_bin());
        cmd.args([
            "serve",
            "--listen",
            listen,
            "--threads",
            "1",
            "--slots",
            "2",
        ])
        .args(["--node-id", id, "--label", label])
        .args(extra)
        .env_remove("WASMLM_API_KEY");
        let (child, addr) = start_listening(cmd, "wasmlm");
        NodeProc {
            id: id.into(),
            label: label.into(),
            addr,
            child: Some(child),
        }
    }

    /// SIGKILLs the node (no graceful shutdown: a crash).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same address.
    pub fn restart(&mut self) {
        self.kill();
        let n = NodeProc::start(&self.id, &self.label, &self.addr, &[]);
        self.child = n.into_child();
    }

    fn into_child(mut self) -> Option<Child> {
        self.child.take()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A gateway process (killed on drop).
pub struct GatewayProc {
    pub addr: String,
    child: Child,
    _dir: PathBuf,
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Three nodes (`gpu=L40S`, `gpu=A10G`, `device=cpu`) and a gateway over them.
pub struct Cluster {
    pub nodes: Vec<NodeProc>,
    pub gateway: GatewayProc,
}

/// The catalog and knobs every test cluster shares; `extra` adds top-level keys and tables.
pub fn cluster(name: &str, extra: &str) -> Cluster {
    let nodes: Vec<NodeProc> = [
        ("l40s", "gpu=L40S"),
        ("a10g", "gpu=A10G"),
        ("cpu", "device=cpu"),
    ]
    .iter()
    .map(|(id, label)| NodeProc::start(id, label, "127.0.0.1:0", &[]))
    .collect();
    // Top-level knobs first: `extra` may end inside a [[keys]] table.
    let mut toml = format!(
        "health_interval = \"200ms\"\nhealth_timeout = \"1s\"\neject_after = 2\n{extra}\n\
         [placement]\nexplore = 0.0\nchunk_bytes = 64\n"
    );
    for n in &nodes {
        toml.push_str(&format!("[[nodes]]\nurl = \"http://{}\"\n", n.addr));
    }
    toml.push_str(
        "[[models]]\nname = \"smollm2\"\ndevices = [\"L40S\", \"A10G\", \"cpu\"]\naliases = [\"tiny\"]\n",
    );
    let c = Cluster {
        nodes,
        gateway: start_gateway(name, &toml),
    };
    c.wait_up(3, ADMIN);
    c
}

/// Starts a gateway on a free port with the config text `toml`.
pub fn start_gateway(name: &str, toml: &str) -> GatewayProc {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("gw-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).expect("writing gateway.toml");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edge-gateway"));
    cmd.arg("--config")
        .arg(&path)
        .args(["--listen", "127.0.0.1:0"]);
    let (child, addr) = start_listening(cmd, "edge-gateway");
    GatewayProc {
        addr,
        child,
        _dir: dir,
    }
}

/// The admin key of test clusters that have keys.
pub const ADMIN: &str = "admin-key-0001";

impl Cluster {
    /// Waits until the gateway reports `n` healthy nodes.
    pub fn wait_up(&self, n: u64, key: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let r = get(&self.gateway.addr, "/health", key);
            let v = r.json();
            if v["nodes"]["up"] == n && v["nodes"]["ready"] == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "gateway never saw {n} nodes up: {}",
                r.text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node with id `id`.
    pub fn node(&mut self, id: &str) -> &mut NodeProc {
        self.nodes.iter_mut().find(|n| n.id == id).expect("a node")
    }
}

/// An HTTP answer.
pub struct Reply {
    /// 0 when the connection failed.
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }
    /// The `data:` payloads of an SSE body.
    pub fn events(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .map(str::to_string)
            .collect()
    }
}

/// Sends a request; `key` empty sends no Authorization.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: Option<&Value>,
) -> Reply {
    let body = body.map(Value::to_string).unwrap_or_default();
    let mut text = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        text.push_str("Content-Type: application/json\r\n");
    }
    if !key.is_empty() {
        text.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    for (k, v) in headers {
        text.push_str(&format!("{k}: {v}\r\n"));
    }
    text.push_str("\r\n");
    text.push_str(&body);
    raw(addr, &text)
}

/// Sends `text` as is and reads the answer until the server closes (status 0: no answer).
pub fn raw(addr: &str, text: &str) -> Reply {
    let none = || Reply {
        status: 0,
        headers: vec![],
        body: vec![],
    };
    let Ok(mut s) = TcpStream::connect(addr) else {
        return none();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    if s.write_all(text.as_bytes()).is_err() {
        return none();
    }
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let mut raw = Vec::new();
    let _ = r.read_to_end(&mut raw);
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked { dechunk(&raw) } else { raw };
    Reply {
        status,
        headers,
        body,
    }
}

pub fn get(addr: &str, path: &str, key: &str) -> Reply {
    request(addr, "GET", path, key, &[], None)
}

pub fn post(addr: &str, path: &str, key: &str, headers: &[(&str, &str)], body: &Value) -> Reply {
    request(addr, "POST", path, key, headers, Some(body))
}

/// Reads a status line and headers.
pub fn read_head(r: &mut impl BufRead) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    if r.read_line(&mut line).unwrap_or(0) == 0 {
        return (0, vec![]);
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Reads one chunk of a chunked body (`None` at its end or on a broken connection).
pub fn read_chunk(r: &mut impl BufRead) -> Option<Vec<u8>> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let n = usize::from_str_radix(line.trim(), 16).ok()?;
    if n == 0 {
        return None;
    }
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut r = BufReader::new(raw);
    let mut out = Vec::new();
    while let Some(c) = read_chunk(&mut r) {
        out.extend(c);
    }
    out
}

/// Opens a streaming POST and returns the reader positioned after the head.
pub fn open_stream(
    addr: &str,
    path: &str,
    key: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> (u16, Vec<(String, String)>, BufReader<TcpStream>) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let body = body.to_string();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !key.is_empty() {
        head.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write");
    s.write_all(body.as_bytes()).expect("write");
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    (status, headers, r)
}

/// A short greedy chat request for SmolLM2, with `extra` fields merged in.
pub fn chat(content: &str, extra: Value) -> Value {
    let mut body = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 4,
        "temperature": 0,
    });
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    body
}

/// Asserts an OpenAI-shaped error with `status` and returns its `error` object.
pub fn assert_openai_error(r: &Reply, status: u16) -> Value {
    assert_eq!(r.status, status, "{}", r.text());
    let e = r.json()["error"].clone();
    assert!(e["message"].is_string() && e["type"].is_string(), "{e}");
    assert!(e.get("param").is_some() && e["code"].is_string(), "{e}");
    e
}
