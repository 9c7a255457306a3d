//! `wasmlm serve`: the OpenAI-compatible API of one node (`docs/api.md` is the contract).

pub mod api;
pub mod apps;
pub mod config;
pub mod error;
pub mod items;
pub mod messages;
pub mod metrics;
pub mod node;
pub mod responses;
pub mod slots;
pub mod wire;
pub mod worker;

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use self::config::NodeConfig;
use self::error::ApiError;
use self::node::Node;
use crate::runtime::{Runtime, RuntimeError};

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    App(#[from] apps::AppError),
}

/// The router of `node`.
pub fn router(node: Arc<Node>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(api::chat_completions))
        .route("/v1/completions", post(api::completions))
        .route("/v1/embeddings", post(api::embeddings))
        .route("/v1/responses", post(responses::create))
        .route(
            "/v1/responses/{id}",
            get(responses::stored).delete(responses::stored),
        )
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{id}", get(api::get_model))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/api/warmup/{model}", post(api::warmup))
        .route("/api/warmup/status/{model}", get(api::warmup_status))
        .route("/tokenize", post(api::tokenize))
        .route("/detokenize", post(api::detokenize))
        .route("/apply-template", post(api::apply_template))
        .route("/node", get(api::node_info))
        .route_layer(middleware::from_fn_with_state(node.clone(), authorize))
        .route_layer(middleware::from_fn_with_state(node.clone(), count))
        .fallback(app_or_fallback)
        .method_not_allowed_fallback(api::method_not_allowed)
        .with_state(node)
}

/// Checks the bearer key on every route but `/health`.
async fn authorize(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    if req.uri().path() == "/health" || authorized(&node, &req) {
        next.run(req).await
    } else if req.uri().path().starts_with("/v1/messages") {
        messages::error_response(ApiError::unauthorized())
    } else {
        ApiError::unauthorized().into_response()
    }
}

/// Whether `req` carries one of the node's keys (or the node has none): OpenAI clients send
/// `Authorization: Bearer KEY`, Anthropic's `x-api-key: KEY`.
fn authorized(node: &Node, req: &Request) -> bool {
    let keys = &node.config.api_keys;
    let h = req.headers();
    let given = h
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| h.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim);
    keys.is_empty() || given.is_some_and(|k| keys.iter().any(|x| same_key(x, k)))
}

/// A path no API route matched: an app's, if one serves it (behind the same keys as the
/// API), else the API's 404.
async fn app_or_fallback(State(node): State<Arc<Node>>, req: Request) -> Response {
    let app = node
        .apps
        .get()
        .and_then(|h| h.find(req.uri().path()).map(|a| (h.clone(), a)));
    let Some((host, app)) = app else {
        let (parts, _) = req.into_parts();
        return api::fallback(State(node), parts.method, parts.uri).await;
    };
    let endpoint = format!("app {}", app.route);
    let res = if authorized(&node, &req) {
        host.handle(app, req).await
    } else {
        ApiError::unauthorized().into_response()
    };
    node.metrics.request(&endpoint, res.status().as_u16());
    res
}

/// Compares keys in time independent of where they differ.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Counts requests by route and status.
async fn count(State(node): State<Arc<Node>>, req: Request, next: Next) -> Response {
    let endpoint = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let res = next.run(req).await;
    node.metrics.request(&endpoint, res.status().as_u16());
    res
}

/// Serves `config` with the component `wasm` until SIGINT or SIGTERM.
pub async fn serve(config: NodeConfig, wasm: Vec<u8>) -> Result<(), ServeError> {
    serve_with(config, wasm, |_| {}).await
}

/// [`serve`], calling `on_listen` with the bound address once the node accepts connections.
pub async fn serve_with(
    config: NodeConfig,
    wasm: Vec<u8>,
    on_listen: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let cache = crate::models::cache_dir().join("components");
    let runtime =
        tokio::task::spawn_blocking(move || Runtime::new(&wasm, HashMap::new(), Some(&cache)))
            .await
            .map_err(|e| ServeError::Io(std::io::Error::other(e.to_string())))??;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen.clone(),
            source,
        })?;
    let addr = listener.local_addr()?;
    let node = Node::new(config, Arc::new(runtime));
    let app_node = node.clone();
    let app_cache = crate::models::cache_dir().join("components");
    let apps = tokio::task::spawn_blocking(move || {
        apps::AppHost::load(&app_node, &app_node.config.apps, Some(&app_cache))
    })
    .await
    .map_err(|e| ServeError::Io(std::io::Error::other(e.to_string())))??;
    if let Some(apps) = apps {
        let _ = node.apps.set(apps);
    }
    announce(&node, addr);
    on_listen(addr);
    let preloader = node.clone();
    tokio::spawn(async move {
        for m in preloader.models.iter().filter(|m| m.config.preload) {
            match preloader.ensure_warm(m, false).await {
                Ok(secs) => eprintln!("wasmlm: {} warmed up in {secs:.2} s", m.name()),
                Err(e) => eprintln!("wasmlm: {}: {}", m.name(), e.message),
            }
        }
    });
    // Streams write one small event per token: Nagle's algorithm would hold them back.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(node))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    Ok(())
}

/// Prints where the node listens and what it serves (stdout, for scripts and tests).
fn announce(node: &Node, addr: SocketAddr) {
    let models: Vec<String> = node
        .models
        .iter()
        .map(|m| {
            let aliases = if m.config.aliases.is_empty() {
                String::new()
            } else {
                format!(", aliases {}", m.config.aliases.join(" "))
            };
            format!(
                "{} ({}, {} slots{aliases}) from {}",
                m.name(),
                m.config.device,
                m.config.slots,
                m.config.spec.path.display()
            )
        })
        .collect();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "wasmlm: listening on http://{addr}");
    for m in models {
        let _ = writeln!(out, "wasmlm: serving {m}");
    }
    for a in node.apps.get().map_or(&[][..], |h| h.apps()) {
        let _ = writeln!(
            out,
            "wasmlm: app {} ({}{}) from {}",
            a.route,
            a.world(),
            if a.reuse { ", warm instances" } else { "" },
            a.path.display()
        );
    }
    let _ = out.flush();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
