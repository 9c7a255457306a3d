//! Forwarding: one request to the chosen node, retried on another before the first byte, and
//! the answer streamed back unbuffered while the gateway learns from what passes through.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use serde_json::Value;

use crate::affinity::PrefixHashes;
use crate::error::ApiError;
use crate::gateway::{Eligible, Gateway};
use crate::inventory::{InFlight, NodeState, Speed};
use crate::limits::Caller;
use crate::metrics::Target;
use crate::policy::Demand;

/// What to send and how to place it.
pub struct Forward {
    pub method: Method,
    /// Path and query on the node.
    pub path: String,
    pub body: Bytes,
    /// The catalog name of the model (empty for model-less utility calls).
    pub model: String,
    pub hashes: Option<PrefixHashes>,
    /// Estimated prompt and output tokens, for the policy.
    pub demand: Demand,
    pub caller: Caller,
    /// When the gateway received the request.
    pub received: Instant,
}

/// Headers of a node's answer that reach the client.
const PASSED: &[header::HeaderName] = &[
    header::CONTENT_TYPE,
    header::CACHE_CONTROL,
    header::RETRY_AFTER,
];

/// Sends `fwd` to one of `nodes` (chosen by the policy), retrying others on failure before the
/// first byte, and returns the answer to stream back.
pub async fn forward(gw: Arc<Gateway>, nodes: Vec<Eligible>, fwd: Forward) -> Response {
    let mut left = nodes;
    let mut last: Option<Response> = None;
    // The node whose attempt failed, counted as a retry once another node is tried.
    let mut failed: Option<Target> = None;
    let attempts = 1 + gw.config.retry_budget as usize;
    for _ in 0..attempts {
        let Some((i, _reason)) = gw.choose(&left, &fwd.model, fwd.hashes.as_ref(), fwd.demand)
        else {
            break;
        };
        if let Some(t) = failed.take() {
            gw.metrics.retry(&t);
        }
        let e = left.swap_remove(i);
        let target: Target = (e.view.id.clone(), fwd.model.clone(), e.view.device.clone());
        let guard = e.node.enter();
        let sent = Instant::now();
        match send(&gw, &e.node, &fwd).await {
            Err(err) => {
                gw.metrics.error(&target);
                gw.node_failed(&e.node);
                eprintln!("edge-gateway: {} ({}): {err}", e.view.id, e.node.url);
                failed = Some(target);
            }
            Ok(resp) => {
                let status = resp.status();
                gw.metrics.request(&target, status.as_u16());
                if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
                    // Refused before its first byte: another node may take it.
                    if status.is_server_error() {
                        gw.metrics.error(&target);
                    }
                    let (parts, body) = resp.into_parts();
                    let bytes = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let mut r = Response::new(Body::from(bytes));
                    *r.status_mut() = parts.status;
                    pass_headers(&parts.headers, r.headers_mut(), &e);
                    last = Some(r);
                    failed = Some(target);
                    continue;
                }
                gw.metrics
                    .upstream_ttft(&target, sent.elapsed().as_secs_f64());
                gw.metrics
                    .queue_time(&fwd.model, sent.duration_since(fwd.received).as_secs_f64());
                if status.is_success() {
                    if let Some(h) = &fwd.hashes {
                        gw.remember(h, &e.node.url);
                    }
                }
                return relay(gw.clone(), resp, e, guard, &fwd, target);
            }
        }
    }
    match last {
        // Every node refused: the last refusal (429 busy, 503 loading) says why, as the node
        // would have.
        Some(r) => r,
        None => ApiError::unavailable(format!(
            "No node could be reached for '{}'; retry later.",
            fwd.model
        ))
        .into_response(),
    }
}

/// One attempt on one node.
async fn send(
    gw: &Gateway,
    node: &NodeState,
    fwd: &Forward,
) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut req = Request::builder()
        .method(fwd.method.clone())
        .uri(format!("{}{}", node.url, fwd.path))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(k) = &gw.config.node_api_key {
        req = req.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let req = req
        .body(Full::new(fwd.body.clone()))
        .map_err(|e| format!("bad request toward the node: {e}"))?;
    let limit = gw.config.first_byte_timeout;
    match tokio::time::timeout(limit, gw.client.request(req)).await {
        Ok(r) => r.map_err(|e| {
            // hyper-util's error says "client error (Connect)"; its source says why.
            match std::error::Error::source(&e) {
                Some(s) => format!("{e}: {s}"),
                None => e.to_string(),
            }
        }),
        Err(_) => Err(format!("no answer within {limit:?} (first_byte_timeout)")),
    }
}

/// The node's headers a client sees, plus `x-served-by` and `x-served-device`.
fn pass_headers(from: &HeaderMap, to: &mut HeaderMap, e: &Eligible) {
    for name in PASSED {
        if let Some(v) = from.get(name) {
            to.insert(name.clone(), v.clone());
        }
    }
    if let Ok(v) = HeaderValue::from_str(&e.view.id) {
        to.insert("x-served-by", v);
    }
    if let Ok(v) = HeaderValue::from_str(&e.view.device) {
        to.insert("x-served-device", v);
    }
    // Behind a gateway fronting gateways, the inner one knows the real node and device.
    for name in ["x-served-by", "x-served-device"] {
        if let Some(v) = from.get(name) {
            to.insert(name, v.clone());
        }
    }
}

/// Streams the node's answer to the client, watching it for usage and timings.
fn relay(
    gw: Arc<Gateway>,
    resp: hyper::Response<hyper::body::Incoming>,
    e: Eligible,
    guard: InFlight,
    fwd: &Forward,
    target: Target,
) -> Response {
    let (parts, body) = resp.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut out = Response::builder().status(parts.status);
    if let Some(h) = out.headers_mut() {
        pass_headers(&parts.headers, h, &e);
    }
    let tap = Tap {
        body: body.into_data_stream(),
        sse,
        pending: Vec::new(),
        seen: Seen::default(),
        done: false,
        ctx: Some(Finish {
            gw,
            node: e.node.clone(),
            _guard: guard,
            model: fwd.model.clone(),
            caller: fwd.caller,
            target,
        }),
    };
    let stream = futures_util::stream::unfold(tap, |mut tap| async move {
        if tap.done {
            return None;
        }
        match tap.body.next().await {
            Some(Ok(bytes)) => {
                tap.observe(&bytes);
                Some((Ok(bytes), tap))
            }
            Some(Err(err)) => {
                tap.done = true;
                let event = tap.broken(&err);
                match event {
                    Some(ev) => Some((Ok(Bytes::from(ev)), tap)),
                    None => Some((Err(std::io::Error::other(err.to_string())), tap)),
                }
            }
            None => {
                tap.complete();
                None
            }
        }
    });
    out.body(Body::from_stream(stream))
        .unwrap_or_else(|_| ApiError::unavailable("bad answer from node").into_response())
}

/// Usage and timings seen in an answer.
#[derive(Default)]
struct Seen {
    total_tokens: Option<u64>,
    speed: Speed,
}

impl Seen {
    /// Reads an answer or a stream event: OpenAI's `usage.total_tokens`, Anthropic's
    /// `usage` parts, and the `timings` beside them; a Responses event holds them in its
    /// `response`.
    fn take(&mut self, v: &Value) {
        let v = v.get("response").filter(|r| r.is_object()).unwrap_or(v);
        let usage = v.get("usage");
        let part = |k: &str| usage.and_then(|u| u.get(k)).and_then(Value::as_u64);
        let anthropic = part("output_tokens")
            .zip(part("input_tokens"))
            .map(|(o, i)| {
                o + i
                    + part("cache_read_input_tokens").unwrap_or(0)
                    + part("cache_creation_input_tokens").unwrap_or(0)
            });
        if let Some(t) = part("total_tokens").or(anthropic) {
            self.total_tokens = Some(t);
        }
        if let Some(t) = v.get("timings") {
            // One token's "speed" is noise: learn from answers with a few tokens.
            let f = |k: &str| t.get(k).and_then(Value::as_f64);
            if f("predicted_n").unwrap_or(0.0) >= 4.0 {
                self.speed.decode_tps = f("predicted_per_second");
            }
            if f("prompt_n").unwrap_or(0.0) >= 8.0 {
                self.speed.prefill_tps = f("prompt_per_second");
            }
            if let (Some(p), Some(d)) = (f("prompt_ms"), f("predicted_ms")) {
                self.speed.service_s = Some((p + d) / 1e3);
            }
        }
    }
}

/// What the end of an answer updates.
struct Finish {
    gw: Arc<Gateway>,
    node: Arc<NodeState>,
    /// Held until the answer ends or the client goes away.
    _guard: InFlight,
    model: String,
    caller: Caller,
    target: Target,
}

struct Tap {
    body: http_body_util::BodyDataStream<hyper::body::Incoming>,
    sse: bool,
    /// SSE: the unfinished line; JSON: the body so far (bounded).
    pending: Vec<u8>,
    seen: Seen,
    done: bool,
    ctx: Option<Finish>,
}

/// JSON answers larger than this are passed on without being read for usage.
const WATCH_LIMIT: usize = 4 << 20;

impl Tap {
    fn observe(&mut self, bytes: &[u8]) {
        if !self.sse {
            if self.pending.len() + bytes.len() <= WATCH_LIMIT {
                self.pending.extend_from_slice(bytes);
            }
            return;
        }
        self.pending.extend_from_slice(bytes);
        while let Some(pos) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=pos).collect();
            let Some(data) = line.strip_prefix(b"data: {") else {
                continue;
            };
            let cheap = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
            if cheap(b"\"timings\"") || cheap(b"_tokens\"") {
                let json = &line[b"data: ".len()..];
                if let Ok(v) = serde_json::from_slice::<Value>(json) {
                    self.seen.take(&v);
                }
            }
        }
        if self.pending.len() > WATCH_LIMIT {
            self.pending.clear();
        }
    }

    fn complete(&mut self) {
        if !self.sse && !self.pending.is_empty() {
            if let Ok(v) = serde_json::from_slice::<Value>(&self.pending) {
                self.seen.take(&v);
            }
        }
        if let Some(ctx) = self.ctx.take() {
            ctx.node.learn(&ctx.model, self.seen.speed);
            if let Some(t) = self.seen.total_tokens {
                ctx.gw.limits.spend_tokens(ctx.caller, t);
            }
        }
    }

    /// The node failed after the first byte: an SSE stream gets an error event.
    fn broken(&mut self, err: &dyn std::fmt::Display) -> Option<String> {
        let ctx = self.ctx.take()?;
        ctx.gw.metrics.error(&ctx.target);
        ctx.gw.node_failed(&ctx.node);
        eprintln!("edge-gateway: {} failed mid-answer: {err}", ctx.target.0);
        self.sse.then(|| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "server_error",
                "upstream_failed",
                format!(
                    "The node serving this stream ({}) failed mid-stream; the answer is incomplete.",
                    ctx.target.0
                ),
            )
            .sse_event()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_is_read_from_openai_responses_and_anthropic_answers() {
        let timings = json!({"predicted_n": 10, "predicted_per_second": 50.0});
        for (answer, total) in [
            (
                json!({"usage": {"total_tokens": 12}, "timings": timings}),
                12,
            ),
            (
                json!({"type": "response.completed",
                       "response": {"usage": {"total_tokens": 13}, "timings": timings}}),
                13,
            ),
            (
                json!({"type": "message_delta", "timings": timings,
                       "usage": {"input_tokens": 4, "cache_read_input_tokens": 6,
                                 "cache_creation_input_tokens": 0, "output_tokens": 4}}),
                14,
            ),
        ] {
            let mut seen = Seen::default();
            seen.take(&answer);
            assert_eq!(seen.total_tokens, Some(total), "{answer}");
            assert_eq!(seen.speed.decode_tps, Some(50.0), "{answer}");
        }
        let mut seen = Seen::default();
        seen.take(&json!({"type": "response.created", "response": {"usage": null}}));
        assert_eq!(seen.total_tokens, None);
    }
}
