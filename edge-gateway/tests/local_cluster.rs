//! `scripts/local-cluster.sh`, as the README's quick start runs it: its first stdout line is
//! the gateway's URL once all three nodes are healthy, a request with a device preference is
//! served there, and SIGTERM stops every process it started.

mod support;

use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use support::{chat, post};

/// A base port with it and the next three free right now.
fn free_base() -> u16 {
    for _ in 0..50 {
        let Ok(l) = TcpListener::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(a) = l.local_addr() else { continue };
        let base = a.port();
        drop(l);
        if base < 60000 && (0..4).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no 4 consecutive free ports");
}

#[test]
fn the_quick_start_cluster_serves_and_stops() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = Path::new(env!("CARGO_BIN_EXE_edge-gateway"))
        .parent()
        .and_then(Path::parent)
        .expect("the target dir");
    let base = free_base();
    let mut child = Command::new("bash")
        .arg(root.join("scripts/local-cluster.sh"))
        .arg(base.to_string())
        .env("CARGO_TARGET_DIR", target)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the script starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    assert_eq!(first, format!("http://127.0.0.1:{base}"));

    let gw = format!("127.0.0.1:{base}");
    let r = post(
        &gw,
        "/v1/chat/completions",
        "",
        &[("X-GPU-Preference", "L40S")],
        &chat("Hi", json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-served-by"), Some("l40s"));

    // SIGTERM stops the gateway and the three nodes.
    // (bash's builtin kill: a minimal image may lack /bin/kill.)
    let _ = Command::new("bash")
        .args(["-c", &format!("kill -TERM {}", child.id())])
        .status();
    let _ = child.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    for port in base..base + 4 {
        while TcpStream::connect(("127.0.0.1", port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "port {port} still answers after SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}
