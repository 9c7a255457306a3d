//! The gateway's routes: the node's API (`docs/api.md`) with placement in front.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::affinity::PrefixHashes;
use crate::error::ApiError;
use crate::gateway::{Eligible, Gateway, BYTES_PER_TOKEN};
use crate::policy::Demand;

/// Output tokens assumed for a request that sets no `max_tokens`.
const DEFAULT_OUTPUT_TOKENS: f64 = 128.0;
use crate::inventory;
use crate::metrics::NodeGauges;
use crate::proxy::{self, Forward};

type Shared = State<Arc<Gateway>>;

/// Request bodies above this are refused (a 2048-input embedding batch fits easily).
pub const BODY_LIMIT: usize = 32 << 20;

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        // Anthropic's clients send the key as `x-api-key`.
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
        .map(str::trim)
}

/// The request's device preference: the header, else the body field (which is removed, since
/// the node serves on its own device).
fn take_preference(
    headers: &HeaderMap,
    body: &mut Map<String, Value>,
) -> Result<Option<String>, ApiError> {
    let field = match body.remove("gpu_preference") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s),
        Some(_) => {
            return Err(ApiError::bad_param(
                "gpu_preference",
                "'gpu_preference' must be a string such as \"L40S\" or \"auto\".",
            ))
        }
    };
    let header = headers
        .get("x-gpu-preference")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok(header.or(field))
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            "The request body must be a JSON object.",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_value",
            format!("The request body is not valid JSON: {e}"),
        )),
    }
}

/// `POST /v1/messages` and its `count_tokens`: placed and forwarded as any model call, with
/// the gateway's own errors in Anthropic's shape, as the node writes its.
pub async fn anthropic_call(state: Shared, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let res = model_call(state, uri, headers, body).await;
    if res.status().is_success() {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, 1 << 16).await else {
        return Response::from_parts(parts, Body::empty());
    };
    let openai = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(|v| v.get("type").is_none())
        .and_then(|v| v.get("error").and_then(|e| e.get("message")).cloned());
    let Some(message) = openai else {
        return Response::from_parts(parts, Body::from(bytes));
    };
    let kind = match parts.status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, Body::from(body.to_string()))
}

/// `POST` on a generation or utility endpoint: place it and forward it.
pub async fn model_call(State(gw): Shared, uri: Uri, headers: HeaderMap, body: Body) -> Response {
    let received = Instant::now();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("The request body is over {} MiB.", BODY_LIMIT >> 20),
        )
        .into_response()
    };
    // A declared size over the limit is refused before a byte of it is read.
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > BODY_LIMIT) {
        return too_large();
    }
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(e) => {
            let e = e.into_inner();
            if e.is::<http_body_util::LengthLimitError>() {
                return too_large();
            }
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                format!("The request body could not be read: {e}"),
            )
            .into_response();
        }
    };
    match place_and_forward(gw, uri, headers, body, received).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn place_and_forward(
    gw: Arc<Gateway>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
    received: Instant,
) -> Result<Response, ApiError> {
    let caller = gw.limits.admit(bearer(&headers))?;
    let path = uri.path();
    let generation = path.starts_with("/v1/");
    let mut obj = parse_object(&body)?;
    let preference = take_preference(&headers, &mut obj)?;
    let model = match obj.get("model") {
        Some(Value::String(m)) if !m.is_empty() => Some(m.clone()),
        None | Some(Value::Null) if !generation => None,
        _ => {
            return Err(ApiError::bad_param(
                "model",
                "'model' is required: the name of a served model (see /v1/models).",
            ))
        }
    };
    let (nodes, canonical) = match &model {
        Some(m) => {
            let canonical = gw.canonical(m);
            if &canonical != m {
                obj.insert("model".into(), Value::String(canonical.clone()));
            }
            (gw.eligible(m, preference.as_deref())?, canonical)
        }
        None => (gw.any_node(), String::new()),
    };
    if nodes.is_empty() {
        return Err(ApiError::unavailable(
            "No healthy node right now; retry later.",
        ));
    }
    let body_value = Value::Object(obj);
    let prompt = [
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
    ]
    .contains(&path)
    .then(|| PrefixHashes::prompt_text(&body_value))
    .flatten();
    let demand = Demand {
        prompt_tokens: prompt
            .as_ref()
            .map_or(0.0, |t| t.len() as f64 / BYTES_PER_TOKEN),
        output_tokens: if prompt.is_some() {
            ["max_completion_tokens", "max_tokens", "max_output_tokens"]
                .iter()
                .find_map(|k| body_value.get(*k).and_then(Value::as_f64))
                .map_or(DEFAULT_OUTPUT_TOKENS, |n| n.clamp(1.0, 4096.0))
        } else {
            0.0
        },
    };
    let hashes = prompt.map(|t| PrefixHashes::of(&canonical, &t, gw.config.placement.chunk_bytes));
    let fwd = Forward {
        method: Method::POST,
        path: uri
            .path_and_query()
            .map_or_else(|| path.to_string(), |p| p.to_string()),
        body: Bytes::from(body_value.to_string()),
        model: canonical,
        hashes,
        demand,
        caller,
        received,
    };
    Ok(proxy::forward(gw, nodes, fwd).await)
}

/// A model gathered across nodes: aliases, `{device, node, state}` entries, kind, context.
#[derive(Default)]
struct Gathered {
    aliases: Vec<String>,
    devices: Vec<Value>,
    kind: Option<String>,
    context_length: Option<u64>,
}

/// One model across the healthy nodes: its devices and states.
fn model_entries(gw: &Gateway) -> Vec<Value> {
    let mut models: BTreeMap<String, Gathered> = BTreeMap::new();
    for n in gw.inventory.all() {
        let v = n.view();
        if !v.up {
            continue;
        }
        for m in &v.models {
            let compatible = gw
                .config
                .catalog(&m.id)
                .is_none_or(|c| c.devices.iter().any(|d| d.eq_ignore_ascii_case(&v.device)));
            if !compatible {
                continue;
            }
            let e = models.entry(m.id.clone()).or_default();
            e.aliases.extend(m.aliases.iter().cloned());
            e.devices
                .push(json!({"device": v.device, "node": v.id, "state": m.state}));
            e.kind = e.kind.take().or_else(|| m.kind.clone());
            e.context_length = e.context_length.or(m.context_length);
        }
    }
    let created = crate::unix_now();
    models
        .into_iter()
        .map(|(id, g)| {
            let Gathered {
                mut aliases,
                devices,
                kind,
                context_length: ctx,
            } = g;
            if let Some(c) = gw.config.catalog(&id) {
                aliases.extend(c.aliases.iter().cloned());
            }
            aliases.sort();
            aliases.dedup();
            let warm = devices.iter().find(|d| d["state"] == "warm");
            let state = if warm.is_some() { "warm" } else { "cold" };
            let device = warm.or(devices.first()).map(|d| d["device"].clone());
            json!({
                "id": id, "object": "model", "created": created, "owned_by": "wasmlm",
                "aliases": aliases, "device": device, "devices": devices, "state": state,
                "kind": kind, "context_length": ctx,
            })
        })
        .collect()
}

/// `GET /v1/models`: the union of the healthy nodes' models.
pub async fn list_models(State(gw): Shared, headers: HeaderMap) -> Response {
    if let Err(e) = gw.limits.admit(bearer(&headers)) {
        return ApiError::from(e).into_response();
    }
    Json(json!({"object": "list", "data": model_entries(&gw)})).into_response()
}

/// `GET /v1/models/{id}`: one model by id or alias.
pub async fn get_model(State(gw): Shared, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(e) = gw.limits.admit(bearer(&headers)) {
        return ApiError::from(e).into_response();
    }
    let entries = model_entries(&gw);
    let hit = entries.iter().find(|m| {
        m["id"]
            .as_str()
            .is_some_and(|s| s.eq_ignore_ascii_case(&id))
            || m["aliases"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|x| x.as_str().is_some_and(|s| s.eq_ignore_ascii_case(&id)))
            })
    });
    match hit {
        Some(m) => Json(m.clone()).into_response(),
        None => ApiError::from(crate::gateway::PlaceError::UnknownModel {
            model: id,
            served: entries
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect(),
        })
        .into_response(),
    }
}

/// `GET /health`: 200 while at least one node is healthy.
pub async fn health(State(gw): Shared) -> Response {
    let nodes = gw.inventory.all();
    let views: Vec<_> = nodes.iter().map(|n| n.view()).collect();
    let up = views.iter().filter(|v| v.up).count();
    // Ready: up and every preloaded model warm (the node's own /health is 200).
    let ready = views.iter().filter(|v| v.up && v.ready).count();
    let counts = json!({"up": up, "ready": ready, "total": nodes.len()});
    if up > 0 {
        Json(json!({"status": "ok", "nodes": counts})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message": "no healthy node", "nodes": counts})),
        )
            .into_response()
    }
}

/// `GET /metrics` (admin).
pub async fn metrics(State(gw): Shared, headers: HeaderMap) -> Response {
    if let Err(e) = gw.limits.admit_admin(bearer(&headers)) {
        return ApiError::from(e).into_response();
    }
    let gauges: Vec<NodeGauges> = gw
        .inventory
        .all()
        .iter()
        .map(|n| {
            let v = n.view();
            NodeGauges {
                node: v.id,
                device: v.device,
                up: v.up,
                in_flight: n.in_flight.load(std::sync::atomic::Ordering::Relaxed),
            }
        })
        .collect();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render(&gauges),
    )
        .into_response()
}

/// `GET /node`: the gateway described as a node, so another gateway can front it.
pub async fn node_info(State(gw): Shared, headers: HeaderMap) -> Response {
    if let Err(e) = gw.limits.admit(bearer(&headers)) {
        return ApiError::from(e).into_response();
    }
    let entries = model_entries(&gw);
    let mut kinds: Vec<String> = entries
        .iter()
        .flat_map(|m| m["devices"].as_array().cloned().unwrap_or_default())
        .filter_map(|d| d["device"].as_str().map(str::to_string))
        .collect();
    kinds.sort();
    kinds.dedup();
    let in_flight: u32 = gw
        .inventory
        .all()
        .iter()
        .map(|n| n.in_flight.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    let models: Vec<Value> = entries
        .iter()
        .map(|m| {
            json!({"id": m["id"], "aliases": m["aliases"], "device": m["device"],
                   "state": m["state"], "context_length": m["context_length"], "kind": m["kind"]})
        })
        .collect();
    Json(json!({
        "id": gw.config.id,
        "version": env!("CARGO_PKG_VERSION"),
        "labels": gw.config.labels,
        "devices": kinds.iter().map(|k| json!({"id": k, "kind": k, "name": k})).collect::<Vec<_>>(),
        "models": models,
        "in_flight": in_flight,
        "queue_depth": 0,
        "uptime_s": gw.started.elapsed().as_secs(),
    }))
    .into_response()
}

/// `?all=true` on warm-up.
#[derive(Deserialize)]
pub struct WarmupQuery {
    #[serde(default)]
    all: bool,
}

/// `POST /api/warmup/{model}` (admin): warms the model on one node with the preferred device,
/// or on every matching node with `?all=true`; answers once warm.
pub async fn warmup(
    State(gw): Shared,
    Path(model): Path<String>,
    Query(q): Query<WarmupQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match warm(gw, model, q.all, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn warm(
    gw: Arc<Gateway>,
    model: String,
    all: bool,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    gw.limits.admit_admin(bearer(&headers))?;
    let mut obj = if body.iter().all(u8::is_ascii_whitespace) {
        Map::new()
    } else {
        parse_object(&body)?
    };
    let preference = take_preference(&headers, &mut obj)?;
    let mut nodes = gw.eligible(&model, preference.as_deref())?;
    let canonical = gw.canonical(&model);
    if !all {
        let (i, _) = gw
            .choose(&nodes, &canonical, None, Demand::default())
            .ok_or_else(|| ApiError::unavailable("No healthy node right now."))?;
        nodes = vec![nodes.swap_remove(i)];
    }
    let tasks: Vec<_> = nodes
        .into_iter()
        .map(|e| {
            let gw = gw.clone();
            tokio::spawn(async move {
                let r = warm_one(&gw, &e).await;
                (e, r)
            })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        if let Ok(r) = t.await {
            results.push(r);
        }
    }
    if !all {
        let Some((e, r)) = results.pop() else {
            return Err(ApiError::unavailable("The warm-up did not complete."));
        };
        let (status, mut v) = r.unwrap_or_else(|msg| {
            (
                StatusCode::BAD_GATEWAY,
                json!({"error": {"message": msg, "type": "server_error", "param": null, "code": "upstream_failed"}}),
            )
        });
        if let Value::Object(m) = &mut v {
            if status.is_success() {
                m.insert("node".into(), json!(e.view.id));
                m.insert("device".into(), json!(e.view.device));
            }
        }
        let mut resp = (status, Json(v)).into_response();
        if let Ok(h) = e.view.id.parse() {
            resp.headers_mut().insert("x-served-by", h);
        }
        if let Ok(h) = e.view.device.parse() {
            resp.headers_mut().insert("x-served-device", h);
        }
        return Ok(resp);
    }
    let mut ok = true;
    let devices: Vec<Value> = results
        .into_iter()
        .map(|(e, r)| match r {
            Ok((s, v)) if s.is_success() => json!({
                "device": e.view.device, "node": e.view.id, "state": "warm",
                "load_ms": v.get("load_time_ms"), "already_warm": v.get("already_warm"),
            }),
            Ok((_, v)) => {
                ok = false;
                json!({"device": e.view.device, "node": e.view.id, "state": "failed",
                       "error": v.pointer("/error/message")})
            }
            Err(msg) => {
                ok = false;
                json!({"device": e.view.device, "node": e.view.id, "state": "failed", "error": msg})
            }
        })
        .collect();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::BAD_GATEWAY
    };
    Ok((
        status,
        Json(json!({"model": canonical, "devices": devices})),
    )
        .into_response())
}

/// Asks one node to warm its model; `(status, body)` of its answer.
async fn warm_one(gw: &Gateway, e: &Eligible) -> Result<(StatusCode, Value), String> {
    let mut req = hyper::Request::builder()
        .method(Method::POST)
        .uri(format!("{}/api/warmup/{}", e.node.url, e.model_id))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = &gw.config.node_api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(Bytes::from_static(b"{}")))
        .map_err(|err| err.to_string())?;
    let resp = gw.client.request(req).await.map_err(|err| {
        gw.node_failed(&e.node);
        format!("{} did not answer: {err}", e.view.id)
    })?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|err| err.to_string())?
        .to_bytes();
    let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if status.is_success() {
        inventory::mark_warm(
            &e.node,
            &e.model_id,
            v.get("load_time_ms").and_then(Value::as_f64),
        );
    }
    Ok((status, v))
}

/// `GET /api/warmup/status/{model}` (admin): per node, the model's state there.
pub async fn warmup_status(
    State(gw): Shared,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(e) = gw.limits.admit_admin(bearer(&headers)) {
        return ApiError::from(e).into_response();
    }
    let canonical = gw.canonical(&model);
    let catalog = gw.config.catalog(&model);
    let mut devices = Vec::new();
    let mut kinds_seen = Vec::new();
    for n in gw.inventory.all() {
        let v = n.view();
        let Some(m) = inventory::served(&v, &canonical) else {
            continue;
        };
        if catalog.is_some_and(|c| !c.devices.iter().any(|d| d.eq_ignore_ascii_case(&v.device))) {
            continue;
        }
        kinds_seen.push(v.device.to_ascii_lowercase());
        devices.push(json!({
            "device": v.device, "node": v.id,
            "state": if v.up { m.state.as_str() } else { "unreachable" },
            "load_ms": m.load_ms, "healthy": v.up,
        }));
    }
    if let Some(c) = catalog {
        for d in &c.devices {
            if !kinds_seen.contains(&d.to_ascii_lowercase()) {
                devices.push(json!({"device": d, "node": null, "state": "absent", "load_ms": null, "healthy": false}));
            }
        }
    } else if devices.is_empty() {
        return ApiError::from(crate::gateway::PlaceError::UnknownModel {
            model,
            served: model_entries(&gw)
                .iter()
                .filter_map(|m| m["id"].as_str().map(str::to_string))
                .collect(),
        })
        .into_response();
    }
    Json(json!({"model": canonical, "devices": devices})).into_response()
}

/// Any other route: 404 in OpenAI's shape.
pub async fn not_found(uri: Uri) -> Response {
    ApiError::not_found(format!("Unknown route {}.", uri.path())).into_response()
}

/// A known route with the wrong method.
pub async fn wrong_method(method: Method, uri: Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("{method} is not allowed on {}.", uri.path()),
    )
    .into_response()
}
