//! The endpoints.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::ApiError;
use super::node::{unix_now, Node, ServedModel, WarmState};
use super::slots::AcquireError;
use super::wire::{self, chat_logprob, finish_reason, GenRequest, LegacyLogprobs, Prompt};
use super::worker::{self, Event, Job, Timings};
use crate::bindings::exports::wasmlm::llm::generation::Chunk;
use crate::bindings::exports::wasmlm::llm::types::{
    FinishReason, Role, StopMatch, ToolCall, Usage,
};
use crate::device::DeviceSpec;

type ApiResult = Result<Response, ApiError>;

fn respond(r: ApiResult) -> Response {
    r.unwrap_or_else(IntoResponse::into_response)
}

/// Reads a request body as a JSON object, within the size limit.
pub(super) async fn read_body(body: Body) -> Result<wire::Body, ApiError> {
    let bytes = axum::body::to_bytes(body, wire::MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::bad_request(format!(
                "The request body could not be read or is larger than {} bytes.",
                wire::MAX_BODY_BYTES
            ))
        })?;
    wire::Body::parse(&bytes)
}

/// The device a request prefers: the `X-GPU-Preference` header, else the body's field.
fn preference(headers: &HeaderMap, body: Option<String>) -> Option<String> {
    headers
        .get("x-gpu-preference")
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or(body)
}

/// Checks that `m` runs on the preferred device; else a 400 listing the valid ones.
fn check_device(m: &ServedModel, pref: Option<&str>) -> Result<(), ApiError> {
    match pref {
        None | Some("auto" | "any") => Ok(()),
        Some(p) if p.parse::<DeviceSpec>().is_ok_and(|d| d == m.config.device) => Ok(()),
        Some(p) => Err(ApiError::bad_param(
            "gpu_preference",
            format!(
                "The device '{p}' is unknown or cannot run '{}' on this node (valid: {}, auto).",
                m.name(),
                m.config.device
            ),
        )),
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(generate(node, headers, body, Kind::Chat).await)
}

/// `POST /v1/completions`.
pub async fn completions(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(generate(node, headers, body, Kind::Completion).await)
}

/// Whether a request's further choices should take other idle slots. Slots share no KV
/// cache, so another slot computes the prompt again: that pays where decoding dominates. On
/// this CPU prefill runs 4–9× decode's tok/s and four batched streams decode 1.85× one
/// (docs/perf.md), so four choices on four slots win while the prompt is shorter than about
/// 3.6× the tokens each may generate. The prompt's tokens are guessed from its bytes (about
/// 4 a token); with no `max_tokens`, answers run long and spreading wins.
fn spread_choices(prompt_bytes: usize, max_tokens: Option<u32>) -> bool {
    max_tokens.is_none_or(|g| prompt_bytes / 4 <= 3 * g as usize)
}

/// The text a slot's caches will hold for these prompts, to route a conversation back to the
/// slot that holds its prefix.
fn affinity_key(prompts: &[Prompt]) -> String {
    match prompts.first() {
        Some(Prompt::Chat(messages, _)) => {
            let mut k = String::new();
            for m in messages {
                let role = match m.role {
                    Role::System => "system",
                    Role::User => "user",
                    Role::Assistant => "assistant",
                    Role::Tool => "tool",
                };
                k.push_str(role);
                k.push('\u{1}');
                k.push_str(&m.content);
                k.push('\u{2}');
            }
            // The answer the worker appends then reads as the next turn's assistant message.
            k.push_str("assistant\u{1}");
            k
        }
        Some(Prompt::Text(t)) => t.clone(),
        Some(Prompt::Tokens(t)) => t.iter().map(|x| format!("{x},")).collect(),
        None => String::new(),
    }
}

/// What every response of one request shares.
struct Meta {
    id: String,
    created: u64,
    model: String,
    device: String,
}

impl Meta {
    fn fingerprint(&self) -> String {
        format!("wasmlm-{}-{}", env!("CARGO_PKG_VERSION"), self.device)
    }
}

/// A hex suffix unique to this node's ids (the time and a counter).
pub(super) fn unique() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    format!("{t:x}{:06x}", n & 0xff_ffff)
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", unique())
}

fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    })
}

fn add_usage(sum: &mut Usage, u: &Usage) {
    sum.prompt_tokens += u.prompt_tokens;
    sum.completion_tokens += u.completion_tokens;
    sum.cached_tokens += u.cached_tokens;
}

fn add_timings(sum: &mut Timings, t: &Timings) {
    if sum.prompt_n == 0 && sum.predicted_n == 0 && sum.prompt_ms == 0.0 {
        *sum = t.clone();
        return;
    }
    sum.prompt_n += t.prompt_n;
    sum.prompt_ms += t.prompt_ms;
    sum.predicted_n += t.predicted_n;
    sum.predicted_ms += t.predicted_ms;
    let rate = |n: u32, ms: f64| {
        if ms > 0.0 {
            f64::from(n) * 1e3 / ms
        } else {
            0.0
        }
    };
    sum.prompt_per_second = rate(sum.prompt_n, sum.prompt_ms);
    sum.predicted_per_second = rate(sum.predicted_n, sum.predicted_ms);
}

async fn generate(node: Arc<Node>, headers: HeaderMap, body: Body, kind: Kind) -> ApiResult {
    let b = read_body(body).await?;
    let req = match kind {
        Kind::Chat => wire::chat_request(&b)?,
        Kind::Completion => wire::completion_request(&b)?,
    };
    let run = start(&node, &headers, &req).await?;
    let meta = Meta {
        id: request_id(if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        }),
        created: unix_now(),
        model: req.model.clone(),
        device: run.device,
    };
    let fmt = Formatter::new(meta, kind, &req);
    if req.stream {
        Ok(sse(fmt, run.first, run.rx, run.in_flight))
    } else {
        collect(fmt, run.first, run.rx).await
    }
}

/// A generation under way: its first event (the status depends on it), the rest to come.
pub(super) struct Started {
    pub first: Event,
    pub rx: mpsc::Receiver<Event>,
    pub in_flight: super::node::InFlight,
    /// The device that serves it.
    pub device: String,
}

/// Finds the model, checks the device, waits for slots and starts `req`'s choices on them;
/// returns once the first event is in (an error before any token is the request's error).
pub(super) async fn start(
    node: &Arc<Node>,
    headers: &HeaderMap,
    req: &GenRequest,
) -> Result<Started, ApiError> {
    let m = node.find(&req.model)?;
    if m.kind() == Some("embedding") {
        return Err(ApiError::bad_param(
            "model",
            format!("'{}' is an embedding model; use /v1/embeddings.", m.name()),
        ));
    }
    check_device(
        &m,
        preference(headers, req.gpu_preference.clone()).as_deref(),
    )?;
    if req.echo && req.prompts.iter().any(|p| matches!(p, Prompt::Tokens(_))) {
        return Err(ApiError::bad_param("echo", "'echo' needs text prompts."));
    }
    let in_flight = node.enter();
    node.ensure_warm(&m, false).await?;
    let key = affinity_key(&req.prompts);
    let lease = m.pool.acquire(&key).await.map_err(|e| match e {
        AcquireError::Busy => ApiError::busy(m.name()),
        AcquireError::Closed => ApiError::unavailable(format!("'{}' has no slots", m.name())),
    })?;
    // Further choices (`n`, several prompts) run beside the first on the slots that are idle
    // now, where the batcher decodes them in one pass; each slot runs its share in turn.
    let mut leases = vec![lease];
    let spread = spread_choices(key.len(), req.options.max_tokens);
    while spread && leases.len() < req.prompts.len() {
        match m.pool.try_acquire(&key) {
            Some(l) => leases.push(l),
            None => break,
        }
    }
    let (tx, mut rx) = mpsc::channel(64);
    let share = leases.len();
    for (k, lease) in leases.into_iter().enumerate() {
        let job = Job {
            model: m.name().to_string(),
            prompts: (k..req.prompts.len())
                .step_by(share)
                .map(|i| (i, req.prompts[i].clone()))
                .collect(),
            options: req.options.clone(),
            key: key.clone(),
            n: req.n,
        };
        let (worker_node, tx) = (node.clone(), tx.clone());
        tokio::task::spawn_blocking(move || {
            worker::run(&worker_node.runtime, lease, job, tx, &worker_node.metrics)
        });
    }
    drop(tx);
    // The first event decides the status: an error before any token is a plain error answer.
    let first = match rx.recv().await {
        Some(Event::Error(e)) => return Err(e),
        Some(ev) => ev,
        None => return Err(ApiError::internal("the generation ended without an answer")),
    };
    Ok(Started {
        first,
        rx,
        in_flight,
        device: m.config.device.to_string(),
    })
}

/// vLLM's `stop_reason`: the stop string or stop token id that ended a choice, else null.
pub(super) fn stop_reason(m: Option<&StopMatch>) -> Value {
    match m {
        Some(StopMatch::Text(s)) => json!(s),
        Some(StopMatch::Token(t)) => json!(t),
        None => Value::Null,
    }
}

/// Builds the JSON of responses and stream chunks.
struct Formatter {
    meta: Meta,
    kind: Kind,
    include_usage: bool,
    logprobs: bool,
    /// Completions with `echo`: the prompt texts to put first.
    echo: Vec<Option<String>>,
    choices: Vec<ChoiceState>,
    usage: Usage,
    timings: Timings,
    done: usize,
    /// Choices per prompt.
    n: usize,
}

#[derive(Default)]
struct ChoiceState {
    text: String,
    reasoning: String,
    tool_calls: Vec<ToolCall>,
    /// Tool calls already streamed (the next one's index).
    calls_sent: usize,
    chat_logprobs: Vec<Value>,
    legacy: LegacyLogprobs,
    finish: Option<FinishReason>,
    stop_match: Option<StopMatch>,
    started: bool,
    /// A stream's finishing chunk waits for its timings.
    held: Option<Chunk>,
}

impl Formatter {
    fn new(meta: Meta, kind: Kind, req: &GenRequest) -> Self {
        let echo = req
            .prompts
            .iter()
            .map(|p| match p {
                Prompt::Text(t) if req.echo => Some(t.clone()),
                _ => None,
            })
            .collect();
        Self {
            meta,
            kind,
            include_usage: req.include_usage,
            logprobs: req.logprobs,
            echo,
            choices: (0..req.prompts.len())
                .map(|_| ChoiceState::default())
                .collect(),
            usage: Usage {
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
            },
            timings: Timings::default(),
            done: 0,
            n: req.n.max(1),
        }
    }

    fn record(&mut self, index: usize, chunk: &Chunk) {
        let Some(c) = self.choices.get_mut(index) else {
            return;
        };
        if !c.started {
            c.started = true;
            if let Some(Some(e)) = self.echo.get(index) {
                c.text.push_str(e);
            }
        }
        c.legacy.push(chunk, c.text.len());
        c.chat_logprobs
            .extend(chunk.logprobs.iter().map(chat_logprob));
        c.text.push_str(&chunk.text);
        c.reasoning.push_str(&chunk.reasoning);
        c.tool_calls.extend(chunk.tool_calls.iter().cloned());
        if chunk.finish.is_some() {
            c.finish = chunk.finish;
            c.stop_match = chunk.stop_match.clone();
        }
    }

    /// A tool call as OpenAI writes it, with an id unique to this response.
    fn tool_call_json(&self, k: usize, call: &ToolCall, streaming: bool) -> Value {
        let id = format!(
            "call_{}_{k}",
            self.meta.id.rsplit('-').next().unwrap_or("0")
        );
        let mut v = json!({
            "id": id,
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        });
        if streaming {
            v["index"] = json!(k);
        }
        v
    }

    /// The chat `message` of a finished choice.
    fn message_json(&self, c: &ChoiceState) -> Value {
        let mut m = json!({"role": "assistant", "content": c.text});
        if !c.reasoning.is_empty() {
            m["reasoning_content"] = json!(c.reasoning);
        }
        if !c.tool_calls.is_empty() {
            let calls: Vec<Value> = c
                .tool_calls
                .iter()
                .enumerate()
                .map(|(k, call)| self.tool_call_json(k, call, false))
                .collect();
            m["tool_calls"] = json!(calls);
            // OpenAI sends null content beside tool calls when the model wrote no text.
            if c.text.trim().is_empty() {
                m["content"] = Value::Null;
            }
        }
        m
    }

    fn finish_name(&self, f: Option<FinishReason>) -> Value {
        f.map_or(Value::Null, |f| json!(finish_reason(f)))
    }

    /// The whole (non-streaming) response.
    fn response(&self) -> Value {
        let choices: Vec<Value> = self
            .choices
            .iter()
            .enumerate()
            .map(|(i, c)| match self.kind {
                Kind::Chat => json!({
                    "index": i,
                    "message": self.message_json(c),
                    "logprobs": if self.logprobs { json!({"content": c.chat_logprobs}) } else { Value::Null },
                    "finish_reason": self.finish_name(c.finish),
                    "stop_reason": stop_reason(c.stop_match.as_ref()),
                }),
                Kind::Completion => json!({
                    "index": i,
                    "text": c.text,
                    "logprobs": if self.logprobs { c.legacy.to_json() } else { Value::Null },
                    "finish_reason": self.finish_name(c.finish),
                    "stop_reason": stop_reason(c.stop_match.as_ref()),
                }),
            })
            .collect();
        json!({
            "id": self.meta.id,
            "object": if self.kind == Kind::Chat { "chat.completion" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": self.meta.fingerprint(),
            "choices": choices,
            "usage": usage_json(&self.usage),
            "timings": self.timings,
            "device": self.meta.device,
        })
    }

    /// One stream chunk's JSON around `choices`.
    fn chunk_json(&self, choices: Value) -> Value {
        let mut v = json!({
            "id": self.meta.id,
            "object": if self.kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": self.meta.fingerprint(),
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }

    /// A stream chunk carrying `text` (and the reasoning, tool calls, logprobs and finish of
    /// `chunk`, whose first tool call is the choice's `call_base`-th).
    fn delta(&self, index: usize, text: &str, chunk: Option<&Chunk>, call_base: usize) -> Value {
        let finish = self.finish_name(chunk.and_then(|c| c.finish));
        let lps = chunk.map_or(&[][..], |c| &c.logprobs[..]);
        let mut choice = match self.kind {
            Kind::Chat => {
                let mut delta = json!({});
                if !text.is_empty() {
                    delta["content"] = json!(text);
                }
                if let Some(c) = chunk {
                    if !c.reasoning.is_empty() {
                        delta["reasoning_content"] = json!(c.reasoning);
                    }
                    if !c.tool_calls.is_empty() {
                        let calls: Vec<Value> = c
                            .tool_calls
                            .iter()
                            .enumerate()
                            .map(|(k, call)| self.tool_call_json(call_base + k, call, true))
                            .collect();
                        delta["tool_calls"] = json!(calls);
                    }
                }
                if delta.as_object().is_some_and(|d| d.is_empty()) && !finish.is_string() {
                    delta["content"] = json!(text);
                }
                json!({
                    "index": index,
                    "delta": delta,
                    "logprobs": if self.logprobs && !lps.is_empty() {
                        json!({"content": lps.iter().map(chat_logprob).collect::<Vec<_>>()})
                    } else { Value::Null },
                    "finish_reason": finish,
                })
            }
            Kind::Completion => {
                let logprobs = if self.logprobs && !lps.is_empty() {
                    let mut l = LegacyLogprobs::default();
                    if let Some(c) = chunk {
                        l.push(c, 0);
                    }
                    l.to_json()
                } else {
                    Value::Null
                };
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        };
        if finish.is_string() {
            choice["stop_reason"] = stop_reason(chunk.and_then(|c| c.stop_match.as_ref()));
        }
        self.chunk_json(json!([choice]))
    }

    /// Adds a finished choice's tokens and timings; the `n` choices of one prompt count
    /// its prompt once, as OpenAI does.
    fn count_done(&mut self, index: usize, usage: &Usage, timings: &Timings) {
        let mut usage = *usage;
        if !index.is_multiple_of(self.n) {
            usage.prompt_tokens = 0;
            usage.cached_tokens = 0;
        }
        add_usage(&mut self.usage, &usage);
        add_timings(&mut self.timings, timings);
        self.done += 1;
    }

    /// Counts `n` more streamed tool calls of choice `index`; returns the first one's index.
    fn sent_calls(&mut self, index: usize, n: usize) -> usize {
        self.choices.get_mut(index).map_or(0, |c| {
            c.calls_sent += n;
            c.calls_sent - n
        })
    }
}

/// What turns a generation's events into a stream's bytes.
pub(super) trait StreamFormat: Send + 'static {
    /// Stream events for `ev`, appended to `out`; false once the stream must end.
    fn stream_event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) -> bool;
    /// The end of a stream whose worker is gone.
    fn stream_end(&mut self, out: &mut VecDeque<Bytes>);
}

impl StreamFormat for Formatter {
    fn stream_event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) -> bool {
        match ev {
            Event::Chunk { index, chunk, .. } => {
                let Some(c) = self.choices.get_mut(index) else {
                    return true;
                };
                if !c.started {
                    c.started = true;
                    match self.kind {
                        Kind::Chat => {
                            let choice = json!([{
                                "index": index,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": Value::Null,
                                "finish_reason": Value::Null,
                            }]);
                            out.push_back(data(&self.chunk_json(choice)));
                        }
                        Kind::Completion => {
                            if let Some(Some(e)) = self.echo.get(index).cloned() {
                                out.push_back(data(&self.delta(index, &e, None, 0)));
                            }
                        }
                    }
                }
                if chunk.finish.is_some() {
                    if let Some(c) = self.choices.get_mut(index) {
                        c.held = Some(chunk);
                    }
                } else if !chunk.text.is_empty()
                    || !chunk.reasoning.is_empty()
                    || !chunk.tool_calls.is_empty()
                    || (self.logprobs && !chunk.logprobs.is_empty())
                {
                    let base = self.sent_calls(index, chunk.tool_calls.len());
                    out.push_back(data(&self.delta(index, &chunk.text, Some(&chunk), base)));
                }
                true
            }
            Event::Done {
                index,
                usage,
                timings,
            } => {
                self.count_done(index, &usage, &timings);
                let held = self.choices.get_mut(index).and_then(|c| c.held.take());
                if let Some(chunk) = held {
                    let base = self.sent_calls(index, chunk.tool_calls.len());
                    let mut v = self.delta(index, &chunk.text, Some(&chunk), base);
                    v["timings"] = json!(timings);
                    out.push_back(data(&v));
                }
                true
            }
            Event::Error(e) => {
                out.push_back(data(&e.body()));
                false
            }
        }
    }

    fn stream_end(&mut self, out: &mut VecDeque<Bytes>) {
        if self.done < self.choices.len() {
            let e = ApiError::internal("the generation ended unexpectedly");
            out.push_back(data(&e.body()));
            return;
        }
        if self.include_usage {
            let mut v = self.chunk_json(json!([]));
            v["usage"] = usage_json(&self.usage);
            v["timings"] = json!(self.timings);
            out.push_back(data(&v));
        }
        out.push_back(Bytes::from_static(b"data: [DONE]\n\n"));
    }
}

pub(super) fn data(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// An SSE event named by its JSON's `type`, as the Responses and Messages APIs send them.
pub(super) fn typed_event(v: &Value) -> Bytes {
    let kind = v["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {kind}\ndata: {v}\n\n"))
}

async fn collect(mut fmt: Formatter, first: Event, mut rx: mpsc::Receiver<Event>) -> ApiResult {
    let mut next = Some(first);
    while let Some(ev) = next {
        match ev {
            Event::Chunk { index, chunk, .. } => fmt.record(index, &chunk),
            Event::Done {
                index,
                usage,
                timings,
            } => fmt.count_done(index, &usage, &timings),
            Event::Error(e) => return Err(e),
        }
        next = rx.recv().await;
    }
    if fmt.done < fmt.choices.len() {
        return Err(ApiError::internal("the generation ended unexpectedly"));
    }
    Ok(Json(fmt.response()).into_response())
}

struct SseState<F> {
    fmt: F,
    rx: mpsc::Receiver<Event>,
    first: Option<Event>,
    out: VecDeque<Bytes>,
    ended: bool,
    _in_flight: super::node::InFlight,
}

pub(super) fn sse<F: StreamFormat>(
    fmt: F,
    first: Event,
    rx: mpsc::Receiver<Event>,
    in_flight: super::node::InFlight,
) -> Response {
    let state = SseState {
        fmt,
        rx,
        first: Some(first),
        out: VecDeque::new(),
        ended: false,
        _in_flight: in_flight,
    };
    // Dropping this stream (the client went away) drops the receiver, which the worker sees
    // at its next token.
    let stream = futures_util::stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.out.pop_front() {
                return Some((Ok::<_, Infallible>(b), st));
            }
            if st.ended {
                return None;
            }
            let ev = match st.first.take() {
                Some(e) => Some(e),
                None => st.rx.recv().await,
            };
            match ev {
                Some(ev) => {
                    if !st.fmt.stream_event(ev, &mut st.out) {
                        st.ended = true;
                    }
                }
                None => {
                    st.fmt.stream_end(&mut st.out);
                    st.ended = true;
                }
            }
        }
    });
    let mut res = Response::new(Body::from_stream(stream));
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    res
}

/// `GET /v1/models`.
pub async fn list_models(State(node): State<Arc<Node>>) -> Response {
    let data: Vec<Value> = node.models.iter().map(|m| node.model_json(m)).collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`.
pub async fn get_model(State(node): State<Arc<Node>>, Path(id): Path<String>) -> Response {
    respond(
        node.find(&id)
            .map(|m| Json(node.model_json(&m)).into_response()),
    )
}

/// `GET /health`: 200 once every preloaded model is warm.
pub async fn health(State(node): State<Arc<Node>>) -> Response {
    let mut failed = Vec::new();
    for m in node.models.iter().filter(|m| m.config.preload) {
        let w = m.warmth();
        match w.state {
            WarmState::Cold | WarmState::Loading => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Json(json!({"status": "loading"})),
                )
                    .into_response()
            }
            WarmState::Failed => {
                failed.push(format!("{}: {}", m.name(), w.error.unwrap_or_default()))
            }
            WarmState::Warm => {}
        }
    }
    if failed.is_empty() {
        Json(json!({"status": "ok"})).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "error", "message": failed.join("; ")})),
        )
            .into_response()
    }
}

/// `GET /metrics`.
pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    let text = node.metrics.render(&node.gauges(), node.in_flight());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// `POST /api/warmup/{model}`: answers once the model is warm.
pub async fn warmup(
    State(node): State<Arc<Node>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    respond(
        async {
            let bytes = axum::body::to_bytes(body, wire::MAX_BODY_BYTES)
                .await
                .map_err(|_| ApiError::bad_request("The request body could not be read."))?;
            let body_pref = if bytes.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                wire::Body::parse(&bytes)?.opt_string("gpu_preference")?
            };
            let m = node.find(&model)?;
            check_device(&m, preference(&headers, body_pref).as_deref())?;
            let was_warm = m.warmth().state == WarmState::Warm;
            let secs = node.ensure_warm(&m, true).await?;
            Ok(Json(json!({
                "model": m.name(),
                "state": "warm",
                "device": m.config.device.to_string(),
                "load_time_ms": secs * 1e3,
                "already_warm": was_warm,
                "message": format!("{} warmed up in {secs:.2} s", m.name()),
            }))
            .into_response())
        }
        .await,
    )
}

/// `GET /api/warmup/status/{model}`.
pub async fn warmup_status(State(node): State<Arc<Node>>, Path(model): Path<String>) -> Response {
    respond(node.find(&model).map(|m| {
        let w = m.warmth();
        Json(json!({
            "model": m.name(),
            "state": w.state.as_str(),
            "device": m.config.device.to_string(),
            "load_time_ms": w.load_secs.map(|s| s * 1e3),
            "error": w.error,
        }))
        .into_response()
    }))
}

/// The model a utility request names, or the only one served.
fn pick_model(node: &Node, b: &wire::Body) -> Result<Arc<ServedModel>, ApiError> {
    match b.opt_string("model")? {
        Some(name) => node.find(&name),
        None if node.models.len() == 1 => Ok(node.models[0].clone()),
        None => Err(ApiError::bad_param(
            "model",
            format!(
                "This node serves several models; name one in 'model' ({}).",
                node.model_names().join(", ")
            ),
        )),
    }
}

/// Runs `f` on a pooled instance of `m` on a blocking thread.
async fn with_instance<R: Send + 'static>(
    node: &Arc<Node>,
    m: &Arc<ServedModel>,
    f: impl FnOnce(&mut crate::runtime::Instance, &str) -> Result<R, crate::runtime::RuntimeError>
        + Send
        + 'static,
) -> Result<R, ApiError> {
    node.ensure_warm(m, false).await?;
    let n = node.clone();
    let name = m.name().to_string();
    tokio::task::spawn_blocking(move || {
        let mut inst = n.runtime.instance(&name)?;
        f(&mut inst, &name)
    })
    .await
    .map_err(|_| ApiError::internal("the tokenizer task failed"))?
    .map_err(ApiError::from)
}

/// `POST /v1/embeddings`.
pub async fn embeddings(State(node): State<Arc<Node>>, body: Body) -> Response {
    respond(
        async {
            let b = read_body(body).await?;
            let req = wire::embedding_request(&b)?;
            let m = node.find(&req.model)?;
            node.ensure_warm(&m, false).await?;
            if m.kind() != Some("embedding") {
                return Err(ApiError::bad_param(
                    "model",
                    format!(
                        "'{}' is not an embedding model; it serves chat and completions.",
                        m.name()
                    ),
                ));
            }
            let inputs = req.inputs;
            let result =
                with_instance(&node, &m, move |inst, name| inst.embed(name, &inputs)).await?;
            let data: Vec<Value> = result
                .embeddings
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let embedding = if req.base64 {
                        json!(wire::base64_f32(v))
                    } else {
                        json!(v)
                    };
                    json!({"object": "embedding", "index": i, "embedding": embedding})
                })
                .collect();
            Ok(Json(json!({
                "object": "list",
                "data": data,
                "model": req.model,
                "usage": {
                    "prompt_tokens": result.prompt_tokens,
                    "total_tokens": result.prompt_tokens,
                },
            }))
            .into_response())
        }
        .await,
    )
}

/// `POST /tokenize`, as llama.cpp's server has it.
pub async fn tokenize(State(node): State<Arc<Node>>, body: Body) -> Response {
    respond(
        async {
            let b = read_body(body).await?;
            let m = pick_model(&node, &b)?;
            let content = b.string("content")?;
            let add_special = b.bool("add_special")?.unwrap_or(false);
            let parse_special = b.bool("parse_special")?.unwrap_or(true);
            let mut tokens = with_instance(&node, &m, move |inst, name| {
                inst.tokenize(name, &content, parse_special)
            })
            .await?;
            if add_special {
                if let Some(bos) = m.info().and_then(|i| i.bos_token) {
                    tokens.insert(0, bos);
                }
            }
            Ok(Json(json!({"tokens": tokens})).into_response())
        }
        .await,
    )
}

/// `POST /detokenize`.
pub async fn detokenize(State(node): State<Arc<Node>>, body: Body) -> Response {
    respond(
        async {
            let b = read_body(body).await?;
            let m = pick_model(&node, &b)?;
            let tokens: Vec<u32> = match b.get("tokens") {
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|v| v.as_u64().and_then(|t| u32::try_from(t).ok()))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        ApiError::bad_param("tokens", "'tokens' must be a list of token ids.")
                    })?,
                _ => {
                    return Err(ApiError::bad_param(
                        "tokens",
                        "'tokens' must be a list of token ids.",
                    ))
                }
            };
            let content =
                with_instance(&node, &m, move |inst, name| inst.detokenize(name, &tokens)).await?;
            Ok(Json(json!({"content": content})).into_response())
        }
        .await,
    )
}

/// The tokens of a chat body's prompt as the model's template renders it, as a generation
/// would count them.
pub(super) async fn count_chat_tokens(
    node: &Arc<Node>,
    model: &str,
    chat: &wire::Body,
) -> Result<u32, ApiError> {
    let m = node.find(model)?;
    let messages = wire::messages(chat)?;
    let context = wire::chat_context(chat)?;
    let tokens = with_instance(node, &m, move |inst, name| {
        let prompt = inst.apply_template(name, &messages, &context, true)?;
        inst.tokenize(name, &prompt, true)
    })
    .await?;
    Ok(tokens.len() as u32)
}

/// `POST /apply-template`.
pub async fn apply_template(State(node): State<Arc<Node>>, body: Body) -> Response {
    respond(
        async {
            let b = read_body(body).await?;
            let m = pick_model(&node, &b)?;
            let messages = wire::messages(&b)?;
            let context = wire::chat_context(&b)?;
            let add = b.bool("add_generation_prompt")?.unwrap_or(true);
            let prompt = with_instance(&node, &m, move |inst, name| {
                inst.apply_template(name, &messages, &context, add)
            })
            .await?;
            Ok(Json(json!({"prompt": prompt})).into_response())
        }
        .await,
    )
}

/// `GET /node`: the inventory the gateway places requests by.
pub async fn node_info(State(node): State<Arc<Node>>) -> Response {
    Json(node.inventory()).into_response()
}

/// Routes this node does not have.
pub async fn fallback(State(node): State<Arc<Node>>, method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let out_of_scope = [
        "/v1/files",
        "/v1/fine_tuning",
        "/v1/fine-tunes",
        "/v1/batches",
        "/v1/uploads",
    ];
    let e = if out_of_scope.iter().any(|p| path.starts_with(p)) {
        ApiError::not_found(format!(
            "{path} is not served: files, fine-tuning and batches are out of scope for an \
             inference node."
        ))
    } else {
        ApiError::not_found(format!("Unknown route: {method} {path}"))
    };
    node.metrics.request("unmatched", 404);
    e.into_response()
}

/// A known route called with the wrong method.
pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    let mut e = ApiError::bad_request(format!("{method} is not allowed on {}", uri.path()));
    e.status = StatusCode::METHOD_NOT_ALLOWED;
    e.into_response()
}

#[cfg(test)]
mod tests {
    use super::spread_choices;

    #[test]
    fn choices_spread_over_slots_unless_the_prompt_outweighs_the_answers() {
        assert!(spread_choices(13, Some(16)));
        assert!(spread_choices(2000, Some(200)));
        assert!(spread_choices(100_000, None));
        // A long document and one token each (logprob evals): one slot, the prompt once.
        assert!(!spread_choices(8000, Some(1)));
        assert!(!spread_choices(12_000, Some(100)));
    }
}
