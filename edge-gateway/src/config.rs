//! `gateway.toml`: the nodes to front, the model catalog, keys and limits. Every problem is
//! reported with the file's line, at start, before the gateway listens.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A rejected config: the file, the line and what is wrong there.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {message}", path.display())]
    At {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// Where requests go: a fixed node or a DNS name whose every address is a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeSource {
    /// `url = "http://host:port"`.
    Static(String),
    /// `dns = "name:port"`, re-resolved every `dns_refresh`.
    Dns { host: String, port: u16 },
}

/// One catalog entry: where a model may run and what else it is called.
#[derive(Debug, Clone)]
pub struct CatalogModel {
    pub name: String,
    /// Device kinds (`L40S`, `cpu`) the model is compatible with.
    pub devices: Vec<String>,
    pub aliases: Vec<String>,
}

/// A client key and its limits (`None`: unlimited).
#[derive(Debug, Clone)]
pub struct ClientKey {
    pub key: String,
    pub name: String,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
}

/// Placement knobs (see `policy.rs`).
#[derive(Debug, Clone)]
pub struct PlacementConfig {
    /// Probability of a uniformly random pick among the candidates.
    pub explore: f64,
    /// How much more loaded (normalised) than the best the affinity node may be and still win.
    pub affinity_slack: f64,
    /// Size of the prompt chunks whose hashes remember where a prefix was served.
    pub chunk_bytes: usize,
    /// `strategy = "round-robin"`: ignore load, speed and prefixes (a baseline for benchmarks).
    pub round_robin: bool,
}

/// The whole validated config.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub listen: String,
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub nodes: Vec<NodeSource>,
    pub models: Vec<CatalogModel>,
    pub keys: Vec<ClientKey>,
    pub admin_key: Option<String>,
    pub node_api_key: Option<String>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub eject_after: u32,
    pub dns_refresh: Duration,
    /// Extra attempts on other nodes before the first byte.
    pub retry_budget: u32,
    /// How long a node may take to answer a forwarded request's head (generation answers once
    /// its first token exists) before the attempt counts as failed.
    pub first_byte_timeout: Duration,
    pub placement: PlacementConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    id: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    node_api_key: Option<String>,
    admin_key: Option<String>,
    health_interval: Option<DurationText>,
    health_timeout: Option<DurationText>,
    eject_after: Option<Spanned<u32>>,
    dns_refresh: Option<DurationText>,
    retry_budget: Option<u32>,
    first_byte_timeout: Option<DurationText>,
    #[serde(default)]
    placement: PlacementFile,
    #[serde(default)]
    nodes: Vec<Spanned<NodeFile>>,
    #[serde(default)]
    models: Vec<Spanned<ModelFile>>,
    #[serde(default)]
    keys: Vec<Spanned<KeyFile>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PlacementFile {
    explore: Option<Spanned<f64>>,
    affinity_slack: Option<Spanned<f64>>,
    chunk_bytes: Option<Spanned<usize>>,
    strategy: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeFile {
    url: Option<String>,
    dns: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ModelFile {
    name: String,
    devices: Vec<String>,
    #[serde(default)]
    aliases: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    key: String,
    name: Option<String>,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
}

/// `"500ms"`, `"2s"`, `"1m"`: checked while parsing, so a bad one names its line.
#[derive(Deserialize)]
#[serde(try_from = "String")]
struct DurationText(Duration);

impl TryFrom<String> for DurationText {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        parse_duration(&s).map(DurationText)
    }
}

/// Parses `500ms`, `2s`, `1.5s` or `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("`{s}` is not a duration (write e.g. \"500ms\", \"2s\" or \"1m\")");
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else {
        return Err(bad());
    };
    let v: f64 = num.trim().parse().map_err(|_| bad())?;
    if !(v.is_finite() && v > 0.0) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Checks `http://host:port[/]` and returns it without the trailing slash.
fn node_url(s: &str) -> Result<String, String> {
    let rest = if let Some(r) = s.strip_prefix("http://") {
        r
    } else if s.starts_with("https://") {
        return Err(format!(
            "`{s}`: nodes are reached over plain HTTP on the private network; TLS ends at the \
             gateway or a mesh in front of it"
        ));
    } else {
        return Err(format!("`{s}` is not a node URL (write http://HOST:PORT)"));
    };
    let hostport = rest.trim_end_matches('/');
    if hostport.is_empty() || hostport.contains('/') {
        return Err(format!(
            "`{s}`: a node URL is http://HOST:PORT, without a path"
        ));
    }
    Ok(format!("http://{hostport}"))
}

fn dns_target(s: &str) -> Result<(String, u16), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("`{s}`: write the DNS name with its port, NAME:PORT"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("`{s}`: `{port}` is not a port"))?;
    if host.is_empty() {
        return Err(format!("`{s}`: the DNS name is empty"));
    }
    Ok((host.to_string(), port))
}

impl GatewayConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text).map_err(|(line, message)| ConfigError::At {
            path: path.into(),
            line,
            message,
        })
    }

    /// Validates a config text; errors are `(line, message)`.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
        let file: File = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(1, |s| line_of(s.start));
            (line, e.message().to_string())
        })?;
        let at = |span: std::ops::Range<usize>, m: String| (line_of(span.start), m);

        let mut nodes = Vec::new();
        for n in &file.nodes {
            let source = match (&n.get_ref().url, &n.get_ref().dns) {
                (Some(u), None) => NodeSource::Static(node_url(u).map_err(|m| at(n.span(), m))?),
                (None, Some(d)) => {
                    let (host, port) = dns_target(d).map_err(|m| at(n.span(), m))?;
                    NodeSource::Dns { host, port }
                }
                _ => {
                    return Err(at(
                        n.span(),
                        "a node has exactly one of `url` or `dns`".into(),
                    ))
                }
            };
            if nodes.contains(&source) {
                return Err(at(n.span(), "this node is listed twice".into()));
            }
            nodes.push(source);
        }
        if nodes.is_empty() {
            return Err((1, "no [[nodes]]: name at least one `url` or `dns`".into()));
        }

        let mut names = HashSet::new();
        let mut models = Vec::new();
        for m in &file.models {
            let e = m.get_ref();
            if e.name.trim().is_empty() {
                return Err(at(m.span(), "a model's `name` is empty".into()));
            }
            if e.devices.is_empty() || e.devices.iter().any(|d| d.trim().is_empty()) {
                return Err(at(
                    m.span(),
                    format!(
                        "model `{}`: `devices` lists the device kinds it may run on \
                         (e.g. [\"L40S\", \"cpu\"])",
                        e.name
                    ),
                ));
            }
            for n in std::iter::once(&e.name).chain(&e.aliases) {
                if !names.insert(n.to_ascii_lowercase()) {
                    return Err(at(
                        m.span(),
                        format!("`{n}` names two models (names and aliases are unique)"),
                    ));
                }
            }
            models.push(CatalogModel {
                name: e.name.clone(),
                devices: e.devices.clone(),
                aliases: e.aliases.clone(),
            });
        }

        let mut keys = Vec::new();
        let mut seen = HashSet::new();
        for (i, k) in file.keys.iter().enumerate() {
            let e = k.get_ref();
            if e.key.len() < 8 {
                return Err(at(k.span(), "a key is at least 8 characters".into()));
            }
            if !seen.insert(e.key.clone()) {
                return Err(at(k.span(), "this key is listed twice".into()));
            }
            if e.requests_per_minute == Some(0) || e.tokens_per_minute == Some(0) {
                return Err(at(
                    k.span(),
                    "a limit of 0 refuses everything; leave it out for no limit".into(),
                ));
            }
            if file.admin_key.as_deref() == Some(e.key.as_str()) {
                return Err(at(k.span(), "a client key equals the admin key".into()));
            }
            keys.push(ClientKey {
                key: e.key.clone(),
                name: e.name.clone().unwrap_or_else(|| format!("key{}", i + 1)),
                requests_per_minute: e.requests_per_minute,
                tokens_per_minute: e.tokens_per_minute,
            });
        }

        let p = &file.placement;
        let explore = p.explore.as_ref().map_or(Ok(0.05), |v| {
            let x = *v.get_ref();
            if (0.0..=1.0).contains(&x) {
                Ok(x)
            } else {
                Err(at(v.span(), "`explore` is a probability in 0..=1".into()))
            }
        })?;
        let affinity_slack = p.affinity_slack.as_ref().map_or(Ok(1.0), |v| {
            let x = *v.get_ref();
            if x.is_finite() && x >= 0.0 {
                Ok(x)
            } else {
                Err(at(v.span(), "`affinity_slack` is ≥ 0".into()))
            }
        })?;
        let chunk_bytes = p.chunk_bytes.as_ref().map_or(Ok(64), |v| {
            let x = *v.get_ref();
            if (16..=65536).contains(&x) {
                Ok(x)
            } else {
                Err(at(v.span(), "`chunk_bytes` is in 16..=65536".into()))
            }
        })?;
        let round_robin = match &p.strategy {
            None => false,
            Some(s) => match s.get_ref().as_str() {
                "balanced" => false,
                "round-robin" => true,
                other => {
                    return Err(at(
                        s.span(),
                        format!("`strategy` is \"balanced\" or \"round-robin\", not `{other}`"),
                    ))
                }
            },
        };
        let eject_after = match &file.eject_after {
            Some(v) if *v.get_ref() == 0 => {
                return Err(at(v.span(), "`eject_after` is at least 1".into()))
            }
            Some(v) => *v.get_ref(),
            None => 3,
        };

        Ok(GatewayConfig {
            listen: file.listen.unwrap_or_else(|| "127.0.0.1:8080".into()),
            id: file.id.unwrap_or_else(|| "edge-gateway".into()),
            labels: file.labels,
            nodes,
            models,
            keys,
            admin_key: file.admin_key,
            node_api_key: file.node_api_key,
            health_interval: file.health_interval.map_or(Duration::from_secs(2), |d| d.0),
            health_timeout: file.health_timeout.map_or(Duration::from_secs(2), |d| d.0),
            eject_after,
            dns_refresh: file.dns_refresh.map_or(Duration::from_secs(10), |d| d.0),
            retry_budget: file.retry_budget.unwrap_or(2),
            first_byte_timeout: file
                .first_byte_timeout
                .map_or(Duration::from_secs(300), |d| d.0),
            placement: PlacementConfig {
                explore,
                affinity_slack,
                chunk_bytes,
                round_robin,
            },
        })
    }

    /// The catalog entry a request's `model` names (by name or alias, ignoring case).
    pub fn catalog(&self, model: &str) -> Option<&CatalogModel> {
        self.models.iter().find(|m| {
            m.name.eq_ignore_ascii_case(model)
                || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(model))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> (usize, String) {
        GatewayConfig::parse(text).expect_err("rejected")
    }

    #[test]
    fn a_full_config_parses() {
        let c = GatewayConfig::parse(
            r#"
listen = "127.0.0.1:9000"
admin_key = "admin-secret"
health_interval = "500ms"
eject_after = 2
[placement]
explore = 0
[[nodes]]
url = "http://127.0.0.1:8081/"
[[nodes]]
dns = "wasmlm.default.svc:8080"
[[models]]
name = "qwen3-0.6b"
devices = ["L40S", "A10G"]
aliases = ["gpt-4o-mini"]
[[keys]]
key = "client-key-1"
requests_per_minute = 60
"#,
        )
        .expect("valid");
        assert_eq!(
            c.nodes[0],
            NodeSource::Static("http://127.0.0.1:8081".into())
        );
        assert_eq!(
            c.nodes[1],
            NodeSource::Dns {
                host: "wasmlm.default.svc".into(),
                port: 8080
            }
        );
        assert_eq!(c.health_interval, Duration::from_millis(500));
        assert_eq!(c.placement.explore, 0.0);
        assert_eq!(
            c.catalog("GPT-4o-mini").map(|m| m.name.as_str()),
            Some("qwen3-0.6b")
        );
        assert_eq!(c.keys[0].name, "key1");
    }

    #[test]
    fn problems_name_their_line() {
        let base = "[[nodes]]\nurl = \"http://a:1\"\n";
        let (line, m) = err(&format!("{base}[[models]]\nname = \"m\"\ndevices = []\n"));
        assert_eq!(line, 3, "{m}");
        assert!(m.contains("devices"), "{m}");
        let (line, m) = err(&format!(
            "listen = \"x\"\nhealth_interval = \"soon\"\n{base}"
        ));
        assert_eq!(line, 2, "{m}");
        assert!(m.contains("not a duration"), "{m}");
        let (line, m) = err("[[nodes]]\nurl = \"https://a:1\"\n");
        assert_eq!(line, 1, "{m}");
        let (line, m) = err(&format!("bogus = 1\n{base}"));
        assert_eq!(line, 1, "{m}");
        assert!(m.contains("bogus"), "{m}");
        let (_, m) = err("listen = \"x\"\n");
        assert!(m.contains("no [[nodes]]"), "{m}");
        let (line, m) = err(&format!(
            "{base}[[models]]\nname = \"a\"\ndevices = [\"cpu\"]\n[[models]]\nname = \"b\"\ndevices = [\"cpu\"]\naliases = [\"A\"]\n"
        ));
        assert_eq!(line, 6, "{m}");
        let (line, m) = err(&format!("{base}[[keys]]\nkey = \"short\"\n"));
        assert_eq!(line, 3, "{m}");
        let (line, _) = err(&format!("{base}[[nodes]]\nurl = \"http://a:1\"\n"));
        assert_eq!(line, 3);
        let (line, m) = err(&format!("{base}[placement]\nexplore = 2.0\n"));
        assert_eq!(line, 4, "{m}");
    }
}
