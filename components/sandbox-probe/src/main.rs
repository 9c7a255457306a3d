//! A WASI guest that tries to reach outside its sandbox. The host's tests run it with the WASI
//! context every LLM instance gets and expect every attempt to fail (exit code 0); exit code 1
//! lists what got through on stderr.

fn main() {
    let mut escaped: Vec<String> = Vec::new();
    for path in [
        "/etc/passwd",
        "/etc/hostname",
        "/proc/self/environ",
        "Cargo.toml",
    ] {
        if std::fs::read(path).is_ok() {
            escaped.push(format!("read {path}"));
        }
    }
    for dir in ["/", "."] {
        if std::fs::read_dir(dir).is_ok() {
            escaped.push(format!("list {dir}"));
        }
    }
    if std::fs::write("/tmp/wasmlm-sandbox-probe", b"x").is_ok() {
        escaped.push("write /tmp".into());
    }
    if std::net::TcpListener::bind("127.0.0.1:0").is_ok() {
        escaped.push("bind a TCP socket".into());
    }
    if std::env::vars_os().next().is_some() {
        escaped.push("read the environment".into());
    }
    if !escaped.is_empty() {
        eprintln!("sandbox-probe escaped: {}", escaped.join(", "));
        std::process::exit(1);
    }
}
