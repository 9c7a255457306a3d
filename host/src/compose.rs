//! `wasmlm compose`: plugs the llm component into an app that imports `wasmlm:llm` (world
//! `llm-app`), as `wasm-tools compose APP -d LLM` does, so that the result needs no host-side
//! `wasmlm:llm` at all: it imports only `wasi:nn`, WASI and whatever else the app imports.

use std::path::Path;

use wasm_compose::composer::ComponentComposer;
use wasm_compose::config::Config;

/// Why an app could not be composed.
#[derive(Debug, thiserror::Error)]
pub enum ComposeError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("composing {app}: {message}")]
    Compose { app: String, message: String },
    #[error(
        "{app} imports no wasmlm:llm interface: there is nothing to plug the llm component into"
    )]
    NothingToPlug { app: String },
    #[error("the composed component still imports {}: the llm component does not export it", .0.join(", "))]
    Unresolved(Vec<String>),
}

/// The component `app` with its `wasmlm:llm` imports satisfied by the llm component `llm`.
pub fn compose(app: &Path, llm: &[u8]) -> Result<Vec<u8>, ComposeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ComposeError::Io { path, source }
    };
    let app_bytes = std::fs::read(app).map_err(io(app))?;
    let app_name = app.display().to_string();
    if !imports(&app_bytes)
        .iter()
        .any(|i| i.starts_with("wasmlm:llm/"))
    {
        return Err(ComposeError::NothingToPlug { app: app_name });
    }
    // wasm-compose reads its definitions from files.
    let dir = std::env::temp_dir().join(format!("wasmlm-compose-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let llm_path = dir.join("wasmlm-llm.wasm");
    std::fs::write(&llm_path, llm).map_err(io(&llm_path))?;
    let config = Config {
        definitions: vec![llm_path.clone()],
        ..Config::default()
    };
    let composed = ComponentComposer::new(app, &config).compose();
    let _ = std::fs::remove_dir_all(&dir);
    let composed = composed.map_err(|e| ComposeError::Compose {
        app: app_name,
        message: format!("{e:#}"),
    })?;
    let left: Vec<String> = imports(&composed)
        .into_iter()
        .filter(|i| i.starts_with("wasmlm:llm/"))
        .collect();
    if !left.is_empty() {
        return Err(ComposeError::Unresolved(left));
    }
    Ok(composed)
}

/// The names a component imports at its top level.
pub fn imports(component: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        match payload {
            Ok(wasmparser::Payload::Version { .. }) => depth += 1,
            Ok(wasmparser::Payload::End(_)) => depth = depth.saturating_sub(1),
            Ok(wasmparser::Payload::ComponentImportSection(section)) if depth == 1 => {
                names.extend(
                    section
                        .into_iter()
                        .flatten()
                        .map(|i| i.name.name.to_string()),
                );
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    names
}
