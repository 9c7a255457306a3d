//! What a node serves: `node.toml` merged with the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::backend::KvDType;
use crate::device::{DeviceError, DeviceSpec};
use crate::models::{ModelError, ModelSpec};

/// Slots per model unless configured.
pub const DEFAULT_SLOTS: usize = 2;
/// Requests that may wait for a slot, per model, unless configured.
pub const DEFAULT_QUEUE: usize = 16;
/// Where a node listens unless configured.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{0}")]
    Invalid(String),
}

/// `node.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    /// Address to listen on, `HOST:PORT`.
    pub listen: Option<String>,
    /// Name of this node in `/node` (default: the host name).
    pub node_id: Option<String>,
    /// Free-form labels reported in `/node` (zone, rack, ...), for the gateway's placement.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Accepted bearer keys; none means the API is open.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Requests that may wait for a slot, per model.
    pub queue: Option<usize>,
    /// Slots for models that do not set their own.
    pub slots: Option<usize>,
    #[serde(default)]
    pub models: Vec<ModelFile>,
    #[serde(default)]
    pub apps: Vec<AppFile>,
}

/// One `[[apps]]` entry: a wasm HTTP app served under a route.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    /// Requests to this path and below it go to the app (`/ask` serves `/ask` and `/ask/...`).
    pub route: String,
    /// The app's component (relative to the config file).
    pub path: PathBuf,
    /// Models the app may use (by name or alias), as Spin's `ai_models`; absent means every
    /// model the node serves.
    pub models: Option<Vec<String>>,
    /// Start even when the app imports interfaces the node does not provide; calling one traps.
    pub allow_unknown_imports: Option<bool>,
    /// Requests served at once; more get 429 (default 16).
    pub max_concurrent: Option<usize>,
    /// Keep instances warm between requests instead of a fresh one per request (default: on
    /// for apps that import `wasi:nn`, i.e. composed with the llm component, whose set-up is
    /// most of a short request; off otherwise, as Spin does).
    pub reuse_instances: Option<bool>,
}

/// One app as the node serves it.
#[derive(Debug, Clone)]
pub struct AppConfig {
    pub route: String,
    pub path: PathBuf,
    /// Model names (or aliases) the app may use; `None` allows all.
    pub models: Option<Vec<String>>,
    pub allow_unknown_imports: bool,
    pub max_concurrent: usize,
    /// `None`: decided by the app's imports.
    pub reuse_instances: Option<bool>,
}

/// Requests one app serves at once unless configured.
pub const DEFAULT_APP_CONCURRENCY: usize = 16;

/// One `[[models]]` entry.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelFile {
    pub name: String,
    /// GGUF file (relative to the config file) or, when absent, the known model `name`.
    pub path: Option<PathBuf>,
    /// Device to run on: `cpu` (default) or `cuda:N` (a build with the `cuda` feature).
    pub device: Option<String>,
    /// Concurrent generations (warm instances, each with its own KV cache).
    pub slots: Option<usize>,
    /// Context length in tokens (default: the model's own; larger is capped to it).
    pub context_length: Option<usize>,
    /// KV cache type on the CPU: `f16` (default, as llama.cpp), `f32` (exact, twice the
    /// bytes per decode step) or `q8_0` (about half of f16's memory).
    pub kv_cache: Option<KvDType>,
    /// Other names clients may use for this model.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Load at start-up (default) or on the first request or warm-up call.
    pub preload: Option<bool>,
    /// A Jinja chat template file (relative to the config file) replacing the model's own.
    pub chat_template: Option<PathBuf>,
}

/// One model as the node serves it.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub spec: ModelSpec,
    pub device: DeviceSpec,
    pub slots: usize,
    pub context_length: Option<usize>,
    /// `None`: `WASMLM_KV_DTYPE` or the default.
    pub kv_cache: Option<KvDType>,
    pub aliases: Vec<String>,
    pub preload: bool,
}

/// Everything `wasmlm serve` runs with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub listen: String,
    pub node_id: String,
    pub labels: BTreeMap<String, String>,
    pub api_keys: Vec<String>,
    pub queue: usize,
    pub models: Vec<ModelConfig>,
    pub apps: Vec<AppConfig>,
}

/// Command-line settings that add to or override the config file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<String>,
    pub models: Vec<String>,
    pub slots: Option<usize>,
    pub queue: Option<usize>,
    pub context_length: Option<usize>,
    /// The KV cache type of every model (over the config file's).
    pub kv_cache: Option<KvDType>,
    pub api_keys: Vec<String>,
    pub labels: Vec<String>,
    pub node_id: Option<String>,
    /// A chat template file for the models named on the command line.
    pub chat_template: Option<PathBuf>,
    /// The device for the models named on the command line (and the default model).
    pub device: Option<DeviceSpec>,
    /// `ROUTE=PATH` apps.
    pub apps: Vec<String>,
    /// Start apps whose imports the node does not all provide (calls to those trap).
    pub allow_unknown_imports: bool,
}

/// Paths the node's own API uses: an app route may not be one of them or lie below one.
const RESERVED_ROUTES: &[&str] = &[
    "/v1",
    "/health",
    "/metrics",
    "/api",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/node",
];

impl NodeConfig {
    /// The config of `file` (if any) with `cli` applied; `models_dir` holds known models.
    pub fn load(
        file: Option<&Path>,
        cli: Overrides,
        models_dir: &Path,
    ) -> Result<Self, ConfigError> {
        let (nf, base) = match file {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.into(),
                    source,
                })?;
                let nf: NodeFile = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.into(),
                    message: e.message().to_string(),
                })?;
                (nf, p.parent().map(Path::to_path_buf).unwrap_or_default())
            }
            None => (NodeFile::default(), PathBuf::new()),
        };
        let default_slots = cli.slots.or(nf.slots).unwrap_or(DEFAULT_SLOTS);
        let mut models = Vec::new();
        for m in nf.models {
            let spec = match &m.path {
                // `path = "hf:OWNER/REPO"`: a Hub model.
                Some(p)
                    if p.to_str()
                        .is_some_and(|s| s.starts_with(crate::hub::PREFIX)) =>
                {
                    ModelSpec::parse(&format!("{}={}", m.name, p.display()), models_dir)?
                }
                Some(p) => ModelSpec {
                    name: m.name.clone(),
                    path: base.join(p),
                    known: None,
                    hub: None,
                    chat_template: None,
                },
                None => {
                    let spec = ModelSpec::parse(&m.name, models_dir)?;
                    if spec.known.is_none() {
                        return Err(ConfigError::Invalid(format!(
                            "model '{}' has no path and is not a known model",
                            m.name
                        )));
                    }
                    spec
                }
            };
            let spec = ModelSpec {
                chat_template: m.chat_template.as_ref().map(|t| base.join(t)),
                ..spec
            };
            let device = match &m.device {
                None => DeviceSpec::Cpu,
                Some(d) => d.parse().map_err(|e: DeviceError| {
                    ConfigError::Invalid(format!("model '{}': {e}", m.name))
                })?,
            };
            models.push(ModelConfig {
                spec,
                device,
                slots: cli.slots.or(m.slots).unwrap_or(default_slots),
                context_length: cli.context_length.or(m.context_length),
                kv_cache: cli.kv_cache.or(m.kv_cache),
                aliases: m.aliases,
                preload: m.preload.unwrap_or(true),
            });
        }
        for s in &cli.models {
            let spec = ModelSpec {
                chat_template: cli.chat_template.clone(),
                ..ModelSpec::parse(s, models_dir)?
            };
            let m = ModelConfig {
                spec,
                device: cli.device.unwrap_or_default(),
                slots: default_slots,
                context_length: cli.context_length,
                kv_cache: cli.kv_cache,
                aliases: Vec::new(),
                preload: true,
            };
            match models.iter_mut().find(|x| x.spec.name == m.spec.name) {
                Some(x) => x.spec = m.spec,
                None => models.push(m),
            }
        }
        if models.is_empty() {
            models.push(ModelConfig {
                spec: ModelSpec::default_model(models_dir),
                device: cli.device.unwrap_or_default(),
                slots: default_slots,
                context_length: cli.context_length,
                kv_cache: cli.kv_cache,
                aliases: Vec::new(),
                preload: true,
            });
        }
        let mut apps: Vec<AppConfig> = nf
            .apps
            .into_iter()
            .map(|a| AppConfig {
                route: a.route,
                path: base.join(a.path),
                models: a.models,
                allow_unknown_imports: a.allow_unknown_imports.unwrap_or(false)
                    || cli.allow_unknown_imports,
                max_concurrent: a.max_concurrent.unwrap_or(DEFAULT_APP_CONCURRENCY),
                reuse_instances: a.reuse_instances,
            })
            .collect();
        for a in &cli.apps {
            let (route, path) = a
                .split_once('=')
                .filter(|(r, p)| !r.is_empty() && !p.is_empty())
                .ok_or_else(|| ConfigError::Invalid(format!("--app '{a}' is not ROUTE=PATH")))?;
            match apps.iter_mut().find(|x| x.route == route) {
                Some(x) => x.path = PathBuf::from(path),
                None => apps.push(AppConfig {
                    route: route.into(),
                    path: PathBuf::from(path),
                    models: None,
                    allow_unknown_imports: cli.allow_unknown_imports,
                    max_concurrent: DEFAULT_APP_CONCURRENCY,
                    reuse_instances: None,
                }),
            }
        }
        let mut labels = nf.labels;
        for l in &cli.labels {
            let (k, v) = l
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| ConfigError::Invalid(format!("--label '{l}' is not KEY=VALUE")))?;
            labels.insert(k.into(), v.into());
        }
        let mut api_keys = nf.api_keys;
        api_keys.extend(cli.api_keys);
        if api_keys.iter().any(String::is_empty) {
            return Err(ConfigError::Invalid("an API key is empty".into()));
        }
        let config = Self {
            listen: cli
                .listen
                .or(nf.listen)
                .unwrap_or_else(|| DEFAULT_LISTEN.into()),
            node_id: cli.node_id.or(nf.node_id).unwrap_or_else(host_name),
            labels,
            api_keys,
            queue: cli.queue.or(nf.queue).unwrap_or(DEFAULT_QUEUE),
            models,
            apps,
        };
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for m in &self.models {
            if m.slots == 0 {
                return Err(ConfigError::Invalid(format!(
                    "model '{}': slots must be at least 1",
                    m.spec.name
                )));
            }
            if m.context_length == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "model '{}': context_length must be at least 1",
                    m.spec.name
                )));
            }
            if !m.device.built() {
                return Err(ConfigError::Invalid(format!(
                    "model '{}': {}",
                    m.spec.name,
                    DeviceError::NotBuilt(m.device)
                )));
            }
            for n in std::iter::once(&m.spec.name).chain(&m.aliases) {
                if !names.insert(n.clone()) {
                    return Err(ConfigError::Invalid(format!(
                        "the model name '{n}' is used twice"
                    )));
                }
            }
        }
        let mut routes = std::collections::HashSet::new();
        for a in &self.apps {
            let r = a.route.as_str();
            let ok = r.starts_with('/')
                && (r == "/" || !r.ends_with('/'))
                && !r.contains(['?', '#', '*', '{', '}', ' '])
                && !r.split('/').any(|seg| seg == ".." || seg == ".");
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "app route '{r}' must be a path such as /ask (no trailing slash, query or \
                     wildcard)"
                )));
            }
            if let Some(x) = RESERVED_ROUTES.iter().find(|x| {
                r == **x || r.starts_with(&format!("{x}/")) || x.starts_with(&format!("{r}/"))
            }) {
                return Err(ConfigError::Invalid(format!(
                    "app route '{r}' overlaps the node's own {x}"
                )));
            }
            if a.max_concurrent == 0 {
                return Err(ConfigError::Invalid(format!(
                    "app {r}: max_concurrent must be at least 1"
                )));
            }
            if !routes.insert(r) {
                return Err(ConfigError::Invalid(format!(
                    "two apps use the route '{r}'"
                )));
            }
            for m in a.models.iter().flatten() {
                if !names.contains(m) {
                    return Err(ConfigError::Invalid(format!(
                        "app {r}: model '{m}' is not served by this node (served: {})",
                        self.models
                            .iter()
                            .map(|m| m.spec.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
            }
        }
        Ok(())
    }
}

/// This machine's host name, or `wasmlm` where there is none.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "wasmlm".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_and_flags_merge() {
        let dir = std::env::temp_dir().join(format!("wasmlm-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            r#"
listen = "0.0.0.0:9000"
api_keys = ["k1"]
[labels]
zone = "a"
[[models]]
name = "small"
path = "m/small.gguf"
slots = 3
aliases = ["gpt-4o-mini"]
kv_cache = "f32"
"#,
        )
        .unwrap();
        let cli = Overrides {
            listen: Some("127.0.0.1:0".into()),
            api_keys: vec!["k2".into()],
            labels: vec!["rack=7".into()],
            ..Overrides::default()
        };
        let c = NodeConfig::load(Some(&path), cli, &dir).unwrap();
        assert_eq!(c.listen, "127.0.0.1:0");
        assert_eq!(c.api_keys, ["k1", "k2"]);
        assert_eq!(c.labels["zone"], "a");
        assert_eq!(c.labels["rack"], "7");
        assert_eq!(c.models.len(), 1);
        assert_eq!(c.models[0].slots, 3);
        assert_eq!(c.models[0].spec.path, dir.join("m/small.gguf"));
        assert_eq!(c.models[0].aliases, ["gpt-4o-mini"]);
        assert_eq!(c.models[0].kv_cache, Some(KvDType::F32));
        std::fs::write(&path, "[[models]]\nname = \"x\"\nkv_cache = \"q4\"\n").unwrap();
        let e = NodeConfig::load(Some(&path), Overrides::default(), &dir).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected one of `f16`, `f32`, `q8_0`"),
            "{e}"
        );
        // The command line's `--kv-cache` over the file's.
        std::fs::write(
            &path,
            "[[models]]\nname = \"x\"\npath = \"x\"\nkv_cache = \"q8_0\"\n",
        )
        .unwrap();
        let c = NodeConfig::load(Some(&path), Overrides::default(), &dir).unwrap();
        assert_eq!(c.models[0].kv_cache, Some(KvDType::Q8_0));
        let cli = Overrides {
            kv_cache: Some(KvDType::F32),
            ..Overrides::default()
        };
        let c = NodeConfig::load(Some(&path), cli, &dir).unwrap();
        assert_eq!(c.models[0].kv_cache, Some(KvDType::F32));
        std::fs::write(
            &path,
            "[[models]]\nname = \"x\"\npath = \"x\"\ndevice = \"cuda:7\"\n",
        )
        .unwrap();
        if !cfg!(feature = "cuda") {
            let e = NodeConfig::load(Some(&path), Overrides::default(), &dir).unwrap_err();
            assert!(e.to_string().contains("scripts/build-cuda.sh"), "{e}");
        }
        std::fs::write(
            &path,
            "[[models]]\nname = \"x\"\npath = \"x\"\ndevice = \"tpu\"\n",
        )
        .unwrap();
        let e = NodeConfig::load(Some(&path), Overrides::default(), &dir).unwrap_err();
        assert!(
            e.to_string().contains("model 'x': unknown device 'tpu'"),
            "{e}"
        );
        std::fs::write(&path, "bogus = 1\n").unwrap();
        let e = NodeConfig::load(Some(&path), Overrides::default(), &dir).unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn apps_merge_and_bad_routes_are_refused() {
        let dir = std::env::temp_dir().join(format!("wasmlm-config-apps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        let with_app = |extra: &str| {
            format!(
                "[[models]]\nname = \"small\"\npath = \"s.gguf\"\naliases = [\"tiny\"]\n\
                 [[apps]]\nroute = \"/ask\"\npath = \"ask.wasm\"\nmodels = [\"tiny\"]\n{extra}"
            )
        };
        std::fs::write(&path, with_app("max_concurrent = 2\n")).unwrap();
        let cli = Overrides {
            apps: vec!["/ask=/elsewhere/ask.wasm".into(), "/sum=sum.wasm".into()],
            ..Overrides::default()
        };
        let c = NodeConfig::load(Some(&path), cli, &dir).unwrap();
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.apps[0].path, PathBuf::from("/elsewhere/ask.wasm"));
        assert_eq!(c.apps[0].models.as_deref(), Some(&["tiny".to_string()][..]));
        assert_eq!(c.apps[0].max_concurrent, 2);
        assert_eq!(c.apps[1].models, None);
        assert_eq!(c.apps[1].max_concurrent, DEFAULT_APP_CONCURRENCY);
        for (extra, expected) in [
            ("max_concurrent = 0\n", "at least 1"),
            (
                "[[apps]]\nroute = \"/ask\"\npath = \"b.wasm\"\n",
                "two apps",
            ),
            (
                "[[apps]]\nroute = \"/metrics\"\npath = \"b.wasm\"\n",
                "overlaps",
            ),
            (
                "[[apps]]\nroute = \"/\"\npath = \"b.wasm\"\nmodels = [\"big\"]\n",
                "'big' is not served",
            ),
            (
                "[[apps]]\nroute = \"/x/\"\npath = \"b.wasm\"\n",
                "trailing slash",
            ),
            (
                "[[apps]]\nroute = \"x\"\npath = \"b.wasm\"\n",
                "must be a path",
            ),
        ] {
            std::fs::write(&path, with_app(extra)).unwrap();
            let e = NodeConfig::load(Some(&path), Overrides::default(), &dir).unwrap_err();
            assert!(e.to_string().contains(expected), "{extra}: {e}");
        }
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn no_model_means_the_default() {
        let c = NodeConfig::load(None, Overrides::default(), Path::new("/m")).unwrap();
        assert_eq!(c.models[0].spec.name, "smollm2");
        assert_eq!(c.models[0].slots, DEFAULT_SLOTS);
    }
}
