//! Models named by Hugging Face Hub repo id (`hf:owner/name[@revision][:file-or-quant]`),
//! fetched with the `hf-hub` crate into its cache (`$HF_HOME/hub`, shared with Python's
//! `huggingface_hub`), from `$HF_ENDPOINT` when set (a mirror, or a test server), with a
//! progress bar on a terminal and a line per file elsewhere.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

/// The prefix that marks a model spec as a Hub repo id.
pub const PREFIX: &str = "hf:";

/// Files a model folder may need besides its weights; each is fetched when the repo has it.
const FOLDER_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "modules.json",
    "sentence_bert_config.json",
    "1_Pooling/config.json",
];

/// GGUF quantizations tried, in order, when a repo holds several and none is named: a
/// llama.cpp user's usual pick first.
const GGUF_PREFERENCE: &[&str] = &["q4_k_m", "q4_k_s", "q5_k_m", "q8_0", "q4_0", "f16", "bf16"];

/// A model on the Hub.
#[derive(Debug, Clone, PartialEq)]
pub struct HubRef {
    /// `owner/name`.
    pub repo: String,
    pub revision: String,
    /// A GGUF file in the repo, or a quantization tag (`Q8_0`) that picks one.
    pub file: Option<String>,
}

/// Why a Hub model could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("'{0}' is not a Hub repo id: use hf:OWNER/NAME[@REVISION][:FILE-OR-QUANT]")]
    BadRef(String),
    #[error("{repo}: {reason}")]
    Fetch { repo: String, reason: String },
}

impl HubRef {
    /// Parses `owner/name[@revision][:file-or-quant]` (without the `hf:` prefix).
    pub fn parse(s: &str) -> Result<Self, HubError> {
        let bad = || HubError::BadRef(s.to_string());
        let (rest, file) = match s.split_once(':') {
            Some((r, f)) if !f.is_empty() => (r, Some(f.to_string())),
            Some(_) => return Err(bad()),
            None => (s, None),
        };
        let (repo, revision) = match rest.split_once('@') {
            Some((r, v)) if !v.is_empty() => (r, v.to_string()),
            Some(_) => return Err(bad()),
            None => (rest, "main".to_string()),
        };
        let valid = |part: &str| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match repo.split_once('/') {
            Some((owner, name)) if valid(owner) && valid(name) => Ok(Self {
                repo: repo.to_string(),
                revision,
                file,
            }),
            _ => Err(bad()),
        }
    }

    /// Whether `s` looks like a bare repo id (`owner/name`) rather than a path.
    pub fn looks_like_repo(s: &str) -> bool {
        // `models/x.gguf` with a typo is a missing file, not a Hub repo to fetch.
        let lower = s.to_ascii_lowercase();
        let file_like = [".gguf", ".safetensors", ".bin", ".json"]
            .iter()
            .any(|ext| lower.ends_with(ext));
        !file_like
            && !s.starts_with(['.', '/', '~'])
            && s.matches('/').count() == 1
            && Self::parse(s).is_ok()
    }

    fn err(&self, reason: impl std::fmt::Display) -> HubError {
        HubError::Fetch {
            repo: self.repo.clone(),
            reason: reason.to_string(),
        }
    }

    fn hf_repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// Fetches what `r` needs into the Hub cache and returns what to load: the GGUF file, or the
/// snapshot folder of a safetensors model. Files already cached are not fetched again; with
/// no network, a model fetched before still loads from the cache.
pub fn fetch(r: &HubRef) -> Result<PathBuf, HubError> {
    let api = ApiBuilder::from_env()
        .with_progress(false)
        .build()
        .map_err(|e| r.err(e))?;
    let repo = api.repo(r.hf_repo());
    let info = match repo.info() {
        Ok(info) => info,
        Err(e) => {
            return cached(r).ok_or_else(|| r.err(format!("cannot list the repo ({e})")));
        }
    };
    let files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    let has = |f: &str| files.iter().any(|x| x == f);
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();

    if let Some(wanted) = &r.file {
        let pick = if has(wanted) {
            Some(wanted)
        } else {
            let tag = wanted.to_ascii_lowercase();
            ggufs
                .iter()
                .copied()
                .find(|f| f.to_ascii_lowercase().contains(&tag))
        };
        let file = pick.ok_or_else(|| {
            r.err(format!(
                "no file '{wanted}' and no GGUF matching it (GGUF files: {})",
                list(&ggufs)
            ))
        })?;
        return get(r, &repo, file);
    }
    if has("config.json") && files.iter().any(|f| f.ends_with(".safetensors")) {
        let mut config = None;
        for f in &files {
            if f.ends_with(".safetensors") || FOLDER_FILES.contains(&f.as_str()) {
                let path = get(r, &repo, f)?;
                if f == "config.json" {
                    config = Some(path);
                }
            }
        }
        return config
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .ok_or_else(|| r.err("config.json did not download"));
    }
    let file = GGUF_PREFERENCE
        .iter()
        .find_map(|q| {
            ggufs
                .iter()
                .copied()
                .find(|f| f.to_ascii_lowercase().contains(q))
        })
        .or(ggufs.first().copied())
        .ok_or_else(|| {
            r.err("the repo has neither a GGUF file nor config.json with *.safetensors")
        })?;
    get(r, &repo, file)
}

/// One file, from the cache when it is there.
fn get(r: &HubRef, repo: &ApiRepo, file: &str) -> Result<PathBuf, HubError> {
    if let Some(p) = Cache::from_env().repo(r.hf_repo()).get(file) {
        return Ok(p);
    }
    repo.download_with_progress(file, Bar::new(&r.repo))
        .map_err(|e| r.err(format!("downloading {file}: {e}")))
}

/// What a previous fetch left in the cache, for when the Hub cannot be reached.
fn cached(r: &HubRef) -> Option<PathBuf> {
    let cache = Cache::from_env().repo(r.hf_repo());
    match &r.file {
        Some(f) => cache.get(f),
        None => cache
            .get("config.json")
            .and_then(|p| p.parent().map(Path::to_path_buf)),
    }
}

fn list(files: &[&String]) -> String {
    if files.is_empty() {
        return "none".into();
    }
    files
        .iter()
        .map(|f| f.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// Download progress: a bar on a terminal, a line at the start and end of each file
/// elsewhere (logs, CI).
struct Bar {
    repo: String,
    bar: Option<indicatif::ProgressBar>,
    file: String,
    size: usize,
    started: bool,
}

impl Bar {
    fn new(repo: &str) -> Self {
        Self {
            repo: repo.to_string(),
            bar: None,
            file: String::new(),
            size: 0,
            started: false,
        }
    }
}

impl Progress for Bar {
    fn init(&mut self, size: usize, filename: &str) {
        // hf-hub calls init again when it (re)starts the transfer.
        if self.started {
            return;
        }
        self.started = true;
        self.file = filename.to_string();
        self.size = size;
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(size as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "{msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            ) {
                bar.set_style(style);
            }
            bar.set_message(format!("{}/{filename}", self.repo));
            self.bar = Some(bar);
        } else {
            eprintln!(
                "wasmlm: downloading {}/{filename} ({:.1} MB)",
                self.repo,
                size as f64 / 1e6
            );
        }
    }

    fn update(&mut self, size: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(size as u64);
        }
    }

    fn finish(&mut self) {
        match self.bar.take() {
            Some(bar) => bar.finish(),
            None => eprintln!("wasmlm: downloaded {}/{}", self.repo, self.file),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_ids() {
        let r = HubRef::parse("Qwen/Qwen3-0.6B").unwrap();
        assert_eq!(
            (r.repo.as_str(), r.revision.as_str()),
            ("Qwen/Qwen3-0.6B", "main")
        );
        assert_eq!(r.file, None);
        let r = HubRef::parse("unsloth/gemma-3-270m-it-GGUF@v2:Q8_0").unwrap();
        assert_eq!(r.revision, "v2");
        assert_eq!(r.file.as_deref(), Some("Q8_0"));
        for bad in [
            "", "noslash", "a/b/c", "../x", "a/", "a/b@", "a/b:", "a b/c",
        ] {
            assert!(HubRef::parse(bad).is_err(), "{bad:?}");
        }
        assert!(HubRef::looks_like_repo("Qwen/Qwen3-0.6B"));
        assert!(!HubRef::looks_like_repo("./models/x"));
        assert!(!HubRef::looks_like_repo("/abs/model.gguf"));
        assert!(!HubRef::looks_like_repo("model.gguf"));
        assert!(!HubRef::looks_like_repo("models/SmolLM2.Q4_1.GGUF"));
        assert!(!HubRef::looks_like_repo("weights/model.safetensors"));
    }
}
