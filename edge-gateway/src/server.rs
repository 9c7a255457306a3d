//! The gateway's HTTP server and its background work: node polling and DNS re-resolution.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{header, Method, Request, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::api;
use crate::config::{GatewayConfig, NodeSource};
use crate::gateway::Gateway;
use crate::inventory::{self, NodeState, Transition};

/// The routes, over `gw`.
pub fn router(gw: Arc<Gateway>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(api::model_call))
        .route("/v1/completions", post(api::model_call))
        .route("/v1/embeddings", post(api::model_call))
        .route("/v1/responses", post(api::model_call))
        .route("/v1/messages", post(api::anthropic_call))
        .route("/v1/messages/count_tokens", post(api::anthropic_call))
        .route("/tokenize", post(api::model_call))
        .route("/detokenize", post(api::model_call))
        .route("/apply-template", post(api::model_call))
        .route("/v1/models", get(api::list_models))
        .route("/v1/models/{id}", get(api::get_model))
        .route("/health", get(api::health))
        .route("/metrics", get(api::metrics))
        .route("/node", get(api::node_info))
        .route("/api/warmup/{model}", post(api::warmup))
        .route("/api/warmup/status/{model}", get(api::warmup_status))
        .fallback(api::not_found)
        .method_not_allowed_fallback(api::wrong_method)
        .layer(DefaultBodyLimit::max(api::BODY_LIMIT))
        .with_state(gw)
}

/// GETs `path` on `node` within the health timeout: `(status, JSON body)`.
async fn get_json(
    gw: &Gateway,
    node: &NodeState,
    path: &str,
) -> Result<(StatusCode, Value), String> {
    let mut req = Request::builder()
        .method(Method::GET)
        .uri(format!("{}{path}", node.url));
    if let Some(k) = &gw.config.node_api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(Bytes::new()))
        .map_err(|e| e.to_string())?;
    let fetch = async {
        let resp = gw.client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?;
        let v = serde_json::from_slice(&body.to_bytes()).unwrap_or(Value::Null);
        Ok((status, v))
    };
    tokio::time::timeout(gw.config.health_timeout, fetch)
        .await
        .map_err(|_| format!("no answer within {:?}", gw.config.health_timeout))?
}

/// Polls one node's `/node` and `/health` and applies the result.
async fn poll(gw: &Gateway, node: &NodeState) {
    let mark = node.load_mark();
    let info = get_json(gw, node, "/node").await;
    let result = match info {
        Ok((s, v)) if s.is_success() && v.is_object() => {
            let ready = matches!(get_json(gw, node, "/health").await, Ok((s, _)) if s.is_success());
            Ok(inventory::apply_poll(node, &v, ready, mark))
        }
        Ok((s, _)) => Err(format!("/node answered {s}")),
        Err(e) => Err(e),
    };
    match result {
        Ok(Transition::Readmitted) => {
            let v = node.view();
            eprintln!(
                "edge-gateway: node {} ({}, {}) is up",
                v.id, node.url, v.device
            );
        }
        Ok(_) => {}
        Err(_) => gw.node_failed(node),
    }
}

/// Polls every node, every `health_interval`, forever.
pub async fn poll_forever(gw: Arc<Gateway>) {
    loop {
        poll_all(&gw).await;
        tokio::time::sleep(gw.config.health_interval).await;
    }
}

/// One round of polls, concurrently.
pub async fn poll_all(gw: &Arc<Gateway>) {
    let tasks: Vec<_> = gw
        .inventory
        .all()
        .into_iter()
        .map(|n| {
            let gw = gw.clone();
            tokio::spawn(async move { poll(&gw, &n).await })
        })
        .collect();
    for t in tasks {
        let _ = t.await;
    }
}

/// Re-resolves the DNS node names now.
pub async fn resolve_all(gw: &Gateway) {
    for s in &gw.config.nodes {
        let NodeSource::Dns { host, port } = s else {
            continue;
        };
        match inventory::resolve(host, *port).await {
            Ok(urls) => {
                let name = format!("{host}:{port}");
                for gone in gw.inventory.set_dns_nodes(&name, &urls) {
                    eprintln!("edge-gateway: {gone} left {name}");
                    if let Ok(mut idx) = gw.affinity.lock() {
                        idx.forget(&gone);
                    }
                }
            }
            // Keep the last known addresses: a DNS hiccup must not empty the fleet.
            Err(e) => eprintln!("edge-gateway: resolving {host}: {e}"),
        }
    }
}

/// Re-resolves DNS names every `dns_refresh`, forever.
pub async fn resolve_forever(gw: Arc<Gateway>) {
    loop {
        tokio::time::sleep(gw.config.dns_refresh).await;
        resolve_all(&gw).await;
    }
}

/// Runs the gateway on `config` until SIGINT/SIGTERM.
pub async fn serve(config: GatewayConfig) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(&config.listen).await?;
    let addr = listener.local_addr()?;
    let gw = Arc::new(Gateway::new(config));
    resolve_all(&gw).await;
    println!("edge-gateway: listening on http://{addr}");
    eprintln!(
        "edge-gateway: {} node source(s), {} catalog model(s)",
        gw.config.nodes.len(),
        gw.config.models.len()
    );
    tokio::spawn(poll_forever(gw.clone()));
    if gw
        .config
        .nodes
        .iter()
        .any(|n| matches!(n, NodeSource::Dns { .. }))
    {
        tokio::spawn(resolve_forever(gw.clone()));
    }
    axum::serve(listener, router(gw))
        .with_graceful_shutdown(shutdown())
        .await
}

async fn shutdown() {
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
        () = ctrl_c => {},
        () = term => {},
    }
}
