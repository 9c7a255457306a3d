//! A real `wasmlm serve` on a free loopback port, and a small HTTP/1.1 client for it.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// A running node; killed on drop.
pub struct Node {
    child: Child,
    pub addr: String,
}

impl Node {
    /// Starts `wasmlm serve` with `args` (plus a free port) and waits until `/health` is 200
    /// (or, with `wait_healthy` false, until it listens).
    pub fn start_with(args: &[&str], wait_healthy: bool) -> Node {
        let model = super::smollm2_path();
        let model_arg = format!("smollm2={}", model.display());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_wasmlm"));
        cmd.arg("serve").args(["--listen", "127.0.0.1:0"]);
        if !args.contains(&"--config") && !args.contains(&"--model") {
            cmd.args(["--model", &model_arg]);
        }
        // Tests run side by side on few cores; candle's spinning thread pools would fight.
        if !args.contains(&"--threads") {
            cmd.args(["--threads", "1"]);
        }
        let mut child = cmd
            .args(args)
            .env_remove("WASMLM_API_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("wasmlm serve starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(a) = l.strip_prefix("wasmlm: listening on http://") {
                        break a.trim().to_string();
                    }
                }
                _ => {
                    let _ = child.kill();
                    panic!("wasmlm serve exited before listening");
                }
            }
        };
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        let node = Node { child, addr };
        if wait_healthy {
            let t0 = Instant::now();
            loop {
                let r = node.get("/health");
                if r.status == 200 {
                    break;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "node not healthy: {} {}",
                    r.status,
                    r.text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        node
    }

    /// Starts a node with `args` and waits until it is healthy.
    pub fn start(args: &[&str]) -> Node {
        Self::start_with(args, true)
    }

    /// `GET path`.
    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], None)
    }

    /// `POST path` with a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Reply {
        self.request("POST", path, &[], Some(body.to_string().as_bytes()))
    }

    /// Any request; `body` is sent as is with `Content-Type: application/json`.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut s = self.connect();
        send(&mut s, method, path, headers, body);
        read_reply(&mut s)
    }

    /// A connection to the node.
    pub fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(&self.addr).expect("connect to node");
        s.set_read_timeout(Some(Duration::from_secs(300))).ok();
        s
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes one request on `s`.
pub fn send(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).expect("send request");
    if let Some(b) = body {
        s.write_all(b).expect("send body");
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `data:` payloads of an SSE body, checking the framing on the way.
    pub fn events(&self) -> Vec<String> {
        let text = self.text();
        assert!(
            text.ends_with("\n\n"),
            "SSE body must end with a blank line: {text:?}"
        );
        text.split_terminator("\n\n")
            .map(|e| {
                e.strip_prefix("data: ")
                    .unwrap_or_else(|| panic!("event without 'data: ': {e:?}"))
                    .to_string()
            })
            .collect()
    }
}

/// Reads the status line and headers of a response from `r`.
pub fn read_head(r: &mut BufReader<&mut TcpStream>) -> (u16, Vec<(String, String)>) {
    let mut line = String::new();
    r.read_line(&mut line).expect("status line");
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        r.read_line(&mut h).expect("header line");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    (status, headers)
}

/// Reads one chunk of a chunked body; `None` at the end.
pub fn read_chunk(r: &mut BufReader<&mut TcpStream>) -> Option<Vec<u8>> {
    let mut size = String::new();
    r.read_line(&mut size).ok()?;
    let n = usize::from_str_radix(size.trim(), 16).ok()?;
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf).ok()?;
    buf.truncate(n);
    (n > 0).then_some(buf)
}

fn read_reply(s: &mut TcpStream) -> Reply {
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r);
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        while let Some(c) = read_chunk(&mut r) {
            body.extend(c);
        }
    } else if let Some(n) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body).expect("body");
    } else {
        r.read_to_end(&mut body).expect("body");
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// The value of a metric line `name{labels} value` in Prometheus text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
}
