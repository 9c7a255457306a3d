//! OpenAI's Responses API (`POST /v1/responses`), which the openai SDK's `responses.create`,
//! `responses.parse` and `responses.stream` speak.
//!
//! A request is read into a chat request (its `input` items become messages, `instructions`
//! a system message first, `text.format` the `response_format`, its flat function tools
//! chat's nested ones) and runs the chat path unchanged: the same template, tool-call
//! parsing, reasoning split and constrained decoding. What comes back is laid out as
//! Responses output items: a `reasoning` item (a thinking model's `<think>` part), a
//! `message` with `output_text`, and a `function_call` per tool call. The node keeps no
//! responses (`store` is false): a conversation is sent whole each turn, as with chat.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{self, unique, StreamFormat};
use super::error::ApiError;
use super::items::{Item, Items, Step};
use super::node::{unix_now, Node};
use super::wire;
use super::worker::Event;

/// Responses keys that have no chat counterpart and are taken here, not passed on.
const OWN_KEYS: [&str; 19] = [
    "input",
    "instructions",
    "max_output_tokens",
    "text",
    "tools",
    "tool_choice",
    "top_logprobs",
    "include",
    "store",
    "metadata",
    "reasoning",
    "truncation",
    "parallel_tool_calls",
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "service_tier",
    "max_tool_calls",
    "stream_options",
];

/// Chat keys a Responses body must not carry: they would bypass the translation.
const CHAT_KEYS: [&str; 7] = [
    "messages",
    "response_format",
    "max_tokens",
    "max_completion_tokens",
    "logprobs",
    "n",
    "functions",
];

/// Chat parameters and the Responses parameters they come from, for errors.
const CHAT_NAMES: [(&str, &str); 4] = [
    ("messages", "input"),
    ("max_tokens", "max_output_tokens"),
    ("response_format", "text.format"),
    ("reasoning_effort", "reasoning.effort"),
];

/// `POST /v1/responses`.
pub async fn create(State(node): State<Arc<Node>>, headers: HeaderMap, body: Body) -> Response {
    match run(node, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// `GET` or `DELETE /v1/responses/{id}`: nothing is stored to find.
pub async fn stored() -> Response {
    ApiError::not_found(
        "This node stores no responses ('store' is false): send the whole conversation as \
         'input' each turn.",
    )
    .into_response()
}

async fn run(node: Arc<Node>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let b = api::read_body(body).await?;
    let chat = chat_body(&b)?;
    let req = wire::chat_request(&chat).map_err(|e| e.renamed(&CHAT_NAMES))?;
    let started = api::start(&node, &headers, &req).await?;
    let mut out = Responder::new(unix_now(), req.model.clone(), settings(&b), req.logprobs);
    if req.stream {
        return Ok(api::sse(out, started.first, started.rx, started.in_flight));
    }
    out.items.collect(started.first, started.rx).await?;
    Ok(Json(out.response()).into_response())
}

/// The chat body a Responses body asks for; other keys (`temperature`, `top_p`, `stream`,
/// vLLM's and llama.cpp's sampling extras) pass through as they are.
fn chat_body(b: &wire::Body) -> Result<wire::Body, ApiError> {
    for key in ["previous_response_id", "conversation", "prompt"] {
        if b.get(key).is_some() {
            return Err(ApiError::bad_param(
                key,
                format!(
                    "'{key}' is not supported: this node stores no responses or prompts; send \
                     the whole conversation as 'input'."
                ),
            ));
        }
    }
    if b.bool("background")? == Some(true) {
        return Err(ApiError::bad_param(
            "background",
            "'background' is not supported: this node answers while the request is open.",
        ));
    }
    if let Some(k) = CHAT_KEYS.iter().find(|k| b.get(k).is_some()) {
        let instead = match *k {
            "messages" => "'input'",
            "response_format" => "'text.format'",
            "max_tokens" | "max_completion_tokens" => "'max_output_tokens'",
            "logprobs" => "'top_logprobs'",
            _ => "/v1/chat/completions",
        };
        return Err(ApiError::bad_param(
            k,
            format!("'{k}' is a Chat Completions parameter; the Responses API takes {instead}."),
        ));
    }
    let mut chat: Map<String, Value> =
        b.0.iter()
            .filter(|(k, _)| !OWN_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    chat.insert("messages".into(), Value::Array(messages(b)?));
    if let Some(n) = b.int_in("max_output_tokens", 1, u32::MAX as i64)? {
        chat.insert("max_tokens".into(), json!(n));
    }
    if let Some(format) = text_format(b)? {
        chat.insert("response_format".into(), format);
    }
    if let Some(tools) = tools(b)? {
        chat.insert("tools".into(), tools);
    }
    if let Some(choice) = tool_choice(b)? {
        chat.insert("tool_choice".into(), choice);
    }
    if let Some(parallel) = b.bool("parallel_tool_calls")? {
        chat.insert("parallel_tool_calls".into(), json!(parallel));
    }
    if let Some(effort) = b.get("reasoning").and_then(|r| r.get("effort")) {
        if !effort.is_null() {
            chat.insert("reasoning_effort".into(), effort.clone());
        }
    }
    let include = match b.get("include") {
        None => Vec::new(),
        Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
        Some(_) => {
            return Err(ApiError::bad_param(
                "include",
                "'include' must be a list of strings.",
            ))
        }
    };
    let top = b.int_in("top_logprobs", 0, 20)?;
    if top.is_some() || include.contains(&"message.output_text.logprobs") {
        chat.insert("logprobs".into(), json!(true));
        chat.insert("top_logprobs".into(), json!(top.unwrap_or(0)));
    }
    Ok(wire::Body(chat))
}

/// The text of a content list's parts of the given types (`input_text`, `output_text`, and
/// chat's `text`), or the reason it has none.
fn part_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (k, p) in parts.iter().enumerate() {
                let here = format!("{at}.content[{k}]");
                match (p.get("type").and_then(Value::as_str), p.get("text")) {
                    (Some("input_text" | "output_text" | "text"), Some(Value::String(t))) => {
                        text.push_str(t)
                    }
                    (Some("refusal"), _) => {}
                    (Some(t @ ("input_text" | "output_text" | "text")), _) => {
                        return Err(ApiError::bad_param(
                            &here,
                            format!("An '{t}' part needs 'text', a string."),
                        ))
                    }
                    (Some(t), _) => {
                        return Err(ApiError::bad_param(
                            &here,
                            format!("Content parts of type '{t}' are not supported; send text."),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::bad_param(&here, "A content part needs a 'type'."))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::bad_param(
            &format!("{at}.content"),
            "'content' must be a string or a list of parts.",
        )),
    }
}

/// `instructions` and `input` as chat messages: input messages as they are, a
/// `function_call` as an assistant's tool call (consecutive calls in one message), a
/// `function_call_output` as a tool message, a `reasoning` item as the next assistant
/// message's `reasoning_content`.
fn messages(b: &wire::Body) -> Result<Vec<Value>, ApiError> {
    let mut out: Vec<Value> = Vec::new();
    match b.get("instructions") {
        None => {}
        Some(Value::String(s)) => out.push(json!({"role": "system", "content": s})),
        Some(_) => {
            return Err(ApiError::bad_param(
                "instructions",
                "'instructions' must be a string.",
            ))
        }
    }
    let items = match b.get("input") {
        Some(Value::String(s)) => {
            out.push(json!({"role": "user", "content": s}));
            return Ok(out);
        }
        Some(Value::Array(_)) | None => b.list("input")?,
        Some(_) => {
            return Err(ApiError::bad_param(
                "input",
                "'input' must be a string or a list of items.",
            ))
        }
    };
    let mut reasoning: Option<String> = None;
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let bad = |what: &str| ApiError::bad_param(&at, what.to_string());
        let Value::Object(item) = item else {
            return Err(bad("Each input item must be an object."));
        };
        let str_field = |key: &str| match item.get(key) {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(ApiError::bad_param(
                &format!("{at}.{key}"),
                format!("'{key}' must be a string."),
            )),
        };
        let kind = item.get("type").and_then(Value::as_str);
        match kind {
            None | Some("message") => {
                let role = match item.get("role").and_then(Value::as_str) {
                    Some(r @ ("user" | "system" | "developer" | "assistant")) => r,
                    Some(r) => {
                        return Err(bad(&format!(
                            "Unknown role '{r}' (user, system, developer, assistant)."
                        )))
                    }
                    None => return Err(bad("A message needs a 'role'.")),
                };
                let content = part_text(item.get("content").unwrap_or(&Value::Null), &at)?;
                let mut m = json!({"role": role, "content": content});
                if role == "assistant" {
                    if let Some(r) = reasoning.take() {
                        m["reasoning_content"] = json!(r);
                    }
                }
                out.push(m);
            }
            Some("function_call") => {
                let call = json!({
                    "id": str_field("call_id")?,
                    "type": "function",
                    "function": {"name": str_field("name")?, "arguments": str_field("arguments")?},
                });
                let last = out.last_mut().filter(|m| {
                    m["role"] == "assistant" && m.get("tool_calls").is_some() && reasoning.is_none()
                });
                match last {
                    Some(m) => {
                        if let Some(calls) = m["tool_calls"].as_array_mut() {
                            calls.push(call)
                        }
                    }
                    None => {
                        let mut m =
                            json!({"role": "assistant", "content": null, "tool_calls": [call]});
                        if let Some(r) = reasoning.take() {
                            m["reasoning_content"] = json!(r);
                        }
                        out.push(m);
                    }
                }
            }
            Some("function_call_output") => {
                let output = part_text(item.get("output").unwrap_or(&Value::Null), &at)?;
                out.push(json!({
                    "role": "tool",
                    "tool_call_id": str_field("call_id")?,
                    "content": output,
                }));
            }
            Some("reasoning") => {
                // The reasoning text, else its summary: what the model thought before the
                // next assistant turn.
                let texts = |key: &str| -> String {
                    item.get(key)
                        .and_then(Value::as_array)
                        .map(|parts| {
                            parts
                                .iter()
                                .filter_map(|p| p.get("text").and_then(Value::as_str))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                let text = Some(texts("content"))
                    .filter(|t| !t.is_empty())
                    .unwrap_or_else(|| texts("summary"));
                reasoning = Some(text);
            }
            Some("item_reference") => {
                return Err(bad(
                    "Item references are not supported: this node stores no responses; send \
                     the items themselves.",
                ))
            }
            Some(t) => {
                return Err(bad(&format!(
                    "Input items of type '{t}' are not supported (message, function_call, \
                     function_call_output, reasoning)."
                )))
            }
        }
    }
    Ok(out)
}

/// `text.format` as chat's `response_format`.
fn text_format(b: &wire::Body) -> Result<Option<Value>, ApiError> {
    let format = match b.get("text") {
        None => return Ok(None),
        Some(Value::Object(t)) => match t.get("format") {
            None | Some(Value::Null) => return Ok(None),
            Some(f) => f,
        },
        Some(_) => return Err(ApiError::bad_param("text", "'text' must be an object.")),
    };
    let bad = || {
        ApiError::bad_param(
            "text.format",
            "'text.format' must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or \
             {\"type\": \"json_schema\", \"name\", \"schema\", \"strict\"}.",
        )
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "json_object"}))),
        Some("json_schema") => {
            let schema = format
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(bad)?;
            Ok(Some(json!({
                "type": "json_schema",
                "json_schema": {
                    "name": format.get("name").cloned().unwrap_or(json!("response")),
                    "schema": schema,
                    "strict": format.get("strict").cloned().unwrap_or(Value::Null),
                },
            })))
        }
        _ => Err(bad()),
    }
}

/// The Responses API's flat function tools as chat's nested ones.
fn tools(b: &wire::Body) -> Result<Option<Value>, ApiError> {
    let list = match b.get("tools") {
        None => return Ok(None),
        Some(Value::Array(list)) => list,
        Some(_) => return Err(ApiError::bad_param("tools", "'tools' must be a list.")),
    };
    let mut out = Vec::with_capacity(list.len());
    for (i, t) in list.iter().enumerate() {
        let at = format!("tools[{i}]");
        match t.get("type").and_then(Value::as_str) {
            Some("function") => {}
            Some(other) => {
                return Err(ApiError::bad_param(
                    &at,
                    format!(
                        "Tools of type '{other}' are not supported: this node calls no tools \
                         itself; declare 'function' tools and run them in the client."
                    ),
                ))
            }
            None => return Err(ApiError::bad_param(&at, "A tool needs a 'type'.")),
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(ApiError::bad_param(
                &format!("{at}.name"),
                "A function tool needs a 'name'.",
            ));
        };
        let mut function = json!({"name": name});
        for key in ["description", "parameters", "strict"] {
            if let Some(v) = t.get(key).filter(|v| !v.is_null()) {
                function[key] = v.clone();
            }
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Some(Value::Array(out)))
}

/// `tool_choice` as chat takes it (`{"type": "function", "name"}` nests its name).
fn tool_choice(b: &wire::Body) -> Result<Option<Value>, ApiError> {
    match b.get("tool_choice") {
        None => Ok(None),
        Some(v @ Value::String(_)) => Ok(Some(v.clone())),
        Some(v) if v.get("type").and_then(Value::as_str) == Some("function") => {
            match v.get("name").and_then(Value::as_str) {
                Some(name) => Ok(Some(
                    json!({"type": "function", "function": {"name": name}}),
                )),
                None => Err(ApiError::bad_param(
                    "tool_choice",
                    "A function 'tool_choice' needs a 'name'.",
                )),
            }
        }
        Some(_) => Err(ApiError::bad_param(
            "tool_choice",
            "'tool_choice' must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \
             \"name\": ...}.",
        )),
    }
}

/// The request's settings a Response object repeats back.
fn settings(b: &wire::Body) -> Map<String, Value> {
    let get = |k: &str| b.get(k).cloned().unwrap_or(Value::Null);
    let or = |k: &str, d: Value| b.get(k).cloned().unwrap_or(d);
    let mut s = Map::new();
    s.insert("instructions".into(), get("instructions"));
    s.insert("max_output_tokens".into(), get("max_output_tokens"));
    s.insert("metadata".into(), or("metadata", json!({})));
    s.insert(
        "parallel_tool_calls".into(),
        or("parallel_tool_calls", json!(true)),
    );
    s.insert("previous_response_id".into(), Value::Null);
    s.insert(
        "reasoning".into(),
        or("reasoning", json!({"effort": null, "summary": null})),
    );
    s.insert("store".into(), json!(false));
    s.insert("temperature".into(), or("temperature", json!(1.0)));
    s.insert(
        "text".into(),
        or("text", json!({"format": {"type": "text"}})),
    );
    s.insert("tool_choice".into(), or("tool_choice", json!("auto")));
    s.insert("tools".into(), or("tools", json!([])));
    s.insert("top_logprobs".into(), get("top_logprobs"));
    s.insert("top_p".into(), or("top_p", json!(1.0)));
    s.insert("truncation".into(), json!("disabled"));
    s.insert("user".into(), get("user"));
    s
}

/// Lays a generation out as a Response object, whole or as stream events.
struct Responder {
    id: String,
    created: u64,
    model: String,
    settings: Map<String, Value>,
    items: Items,
    /// Stream events sent (each carries its number).
    sequence: u64,
    started: bool,
}

impl Responder {
    fn new(created: u64, model: String, settings: Map<String, Value>, logprobs: bool) -> Self {
        Self {
            id: format!("resp_{}", unique()),
            created,
            model,
            settings,
            items: Items::new(["rs", "msg", "fc"], logprobs),
            sequence: 0,
            started: false,
        }
    }

    /// Item `k` as the Responses API shows it.
    fn item_json(&self, k: usize) -> Value {
        let o = &self.items.output[k];
        let status = if !o.done {
            "in_progress"
        } else if self.items.incomplete(k) {
            "incomplete"
        } else {
            "completed"
        };
        match &o.item {
            Item::Reasoning(text) => json!({
                "type": "reasoning", "id": o.id, "status": status, "summary": [],
                "content": [{"type": "reasoning_text", "text": text}],
            }),
            Item::Text { text, logprobs } => json!({
                "type": "message", "id": o.id, "status": status, "role": "assistant",
                "content": [text_part(text, logprobs)],
            }),
            Item::Call {
                call_id,
                name,
                arguments,
            } => json!({
                "type": "function_call", "id": o.id, "status": status, "call_id": call_id,
                "name": name, "arguments": arguments,
            }),
        }
    }

    /// The stream events of `steps`.
    fn events(&self, steps: Vec<Step>) -> Vec<Value> {
        let mut events = Vec::new();
        for step in steps {
            match step {
                Step::Added(k) => {
                    let id = &self.items.output[k].id;
                    let mut item = self.item_json(k);
                    match self.items.output[k].item {
                        Item::Reasoning(_) | Item::Text { .. } => item["content"] = json!([]),
                        Item::Call { .. } => item["arguments"] = json!(""),
                    }
                    events.push(json!({
                        "type": "response.output_item.added", "output_index": k, "item": item,
                    }));
                    if let Item::Text { .. } = self.items.output[k].item {
                        events.push(json!({
                            "type": "response.content_part.added",
                            "item_id": id, "output_index": k, "content_index": 0,
                            "part": text_part("", &[]),
                        }));
                    }
                }
                Step::Delta(k, delta, logprobs) => {
                    let id = &self.items.output[k].id;
                    events.push(match self.items.output[k].item {
                        Item::Reasoning(_) => json!({
                            "type": "response.reasoning_text.delta",
                            "item_id": id, "output_index": k, "content_index": 0, "delta": delta,
                        }),
                        Item::Text { .. } => json!({
                            "type": "response.output_text.delta",
                            "item_id": id, "output_index": k, "content_index": 0,
                            "delta": delta, "logprobs": logprobs,
                        }),
                        Item::Call { .. } => json!({
                            "type": "response.function_call_arguments.delta",
                            "item_id": id, "output_index": k, "delta": delta,
                        }),
                    });
                }
                Step::Done(k) => {
                    let o = &self.items.output[k];
                    match &o.item {
                        Item::Reasoning(text) => events.push(json!({
                            "type": "response.reasoning_text.done",
                            "item_id": o.id, "output_index": k, "content_index": 0, "text": text,
                        })),
                        Item::Text { text, logprobs } => {
                            events.push(json!({
                                "type": "response.output_text.done",
                                "item_id": o.id, "output_index": k, "content_index": 0,
                                "text": text, "logprobs": logprobs,
                            }));
                            events.push(json!({
                                "type": "response.content_part.done",
                                "item_id": o.id, "output_index": k, "content_index": 0,
                                "part": text_part(text, logprobs),
                            }));
                        }
                        Item::Call {
                            name, arguments, ..
                        } => events.push(json!({
                            "type": "response.function_call_arguments.done",
                            "item_id": o.id, "output_index": k, "name": name,
                            "arguments": arguments,
                        })),
                    }
                    events.push(json!({
                        "type": "response.output_item.done", "output_index": k,
                        "item": self.item_json(k),
                    }));
                }
            }
        }
        events
    }

    /// `completed`, `incomplete` (cut by `max_output_tokens` or the context) or `in_progress`.
    fn status(&self) -> &'static str {
        match (self.items.usage.is_some(), self.items.cut()) {
            (false, _) => "in_progress",
            (true, true) => "incomplete",
            (true, false) => "completed",
        }
    }

    /// The Response object.
    fn response(&self) -> Value {
        let items = &self.items;
        let mut r = json!({
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status(),
            "background": false,
            "error": null,
            "incomplete_details": if self.status() == "incomplete" {
                json!({"reason": "max_output_tokens"})
            } else { Value::Null },
            "model": self.model,
            "output": (0..items.output.len())
                .filter(|&k| items.usage.is_some() || items.output[k].done)
                .map(|k| self.item_json(k))
                .collect::<Vec<_>>(),
            "usage": items.usage.map(|u| json!({
                "input_tokens": u.prompt_tokens,
                "input_tokens_details": {"cached_tokens": u.cached_tokens},
                "output_tokens": u.completion_tokens,
                "output_tokens_details": {
                    "reasoning_tokens": items.reasoning_tokens.min(u.completion_tokens),
                },
                "total_tokens": u.prompt_tokens + u.completion_tokens,
            })),
        });
        if let Some(o) = r.as_object_mut() {
            o.extend(self.settings.clone());
            if let Some(t) = &items.timings {
                o.insert("timings".into(), json!(t));
            }
        }
        r
    }

    /// Writes `events` as SSE, numbered.
    fn send(&mut self, events: Vec<Value>, out: &mut VecDeque<Bytes>) {
        for mut e in events {
            e["sequence_number"] = json!(self.sequence);
            self.sequence += 1;
            out.push_back(api::typed_event(&e));
        }
    }
}

fn text_part(text: &str, logprobs: &[Value]) -> Value {
    json!({"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs})
}

impl StreamFormat for Responder {
    fn stream_event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) -> bool {
        let mut events = Vec::new();
        if !self.started {
            self.started = true;
            let r = self.response();
            events.push(json!({"type": "response.created", "response": r}));
            events.push(json!({"type": "response.in_progress", "response": r}));
        }
        let go_on = match ev {
            Event::Chunk { chunk, .. } => {
                let steps = self.items.record(&chunk);
                events.extend(self.events(steps));
                true
            }
            Event::Done { usage, timings, .. } => {
                let steps = self.items.finish(usage, timings);
                events.extend(self.events(steps));
                let kind = if self.status() == "incomplete" {
                    "response.incomplete"
                } else {
                    "response.completed"
                };
                events.push(json!({"type": kind, "response": self.response()}));
                true
            }
            Event::Error(e) => {
                let body = e.body();
                let err = &body["error"];
                events.push(json!({
                    "type": "error",
                    "code": err["code"], "message": err["message"], "param": err["param"],
                }));
                false
            }
        };
        self.send(events, out);
        go_on
    }

    fn stream_end(&mut self, out: &mut VecDeque<Bytes>) {
        if self.items.usage.is_none() {
            let e = json!({
                "type": "error", "code": "internal_error", "param": null,
                "message": "the generation ended unexpectedly",
            });
            self.send(vec![e], out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bindings::exports::wasmlm::llm::types::Usage;
    use crate::server::items::tests::chunk;
    use crate::server::wire::tests::body;

    #[test]
    fn items_become_the_chat_messages_a_template_expects() {
        let b = body(json!({
            "model": "m", "instructions": "Be terse.", "seed": 7, "max_output_tokens": 9,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": "auto", "parallel_tool_calls": false, "reasoning": {"effort": "none"},
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "a"},
                                             {"type": "input_text", "text": "b"}]},
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{\"x\":1}"},
                {"type": "function_call_output", "call_id": "c1", "output": "one"},
                {"type": "function_call_output", "call_id": "c2",
                 "output": [{"type": "input_text", "text": "two"}]},
                {"type": "message", "role": "assistant",
                 "content": [{"type": "output_text", "text": "done", "annotations": []}]},
            ],
        }));
        let chat = chat_body(&b).unwrap();
        let call = |id: &str, args: &str| json!({"id": id, "type": "function", "function": {"name": "f", "arguments": args}});
        assert_eq!(
            chat.0["messages"],
            json!([
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "ab"},
                {"role": "assistant", "content": null, "reasoning_content": "hm",
                 "tool_calls": [call("c1", "{}"), call("c2", "{\"x\":1}")]},
                {"role": "tool", "tool_call_id": "c1", "content": "one"},
                {"role": "tool", "tool_call_id": "c2", "content": "two"},
                {"role": "assistant", "content": "done"},
            ])
        );
        assert_eq!(chat.0["max_tokens"], 9);
        assert_eq!(chat.0["seed"], 7);
        assert_eq!(
            chat.0["response_format"]["json_schema"]["schema"],
            json!({"type": "object"})
        );
        assert_eq!(chat.0["tools"][0]["function"]["name"], "f");
        assert_eq!(chat.0["tool_choice"], "auto");
        assert_eq!(chat.0["parallel_tool_calls"], false);
        assert_eq!(chat.0["reasoning_effort"], "none");
        let named = tool_choice(&body(
            json!({"tool_choice": {"type": "function", "name": "f"}}),
        ));
        assert_eq!(
            named.unwrap(),
            Some(json!({"type": "function", "function": {"name": "f"}}))
        );
        for key in ["input", "instructions", "text", "max_output_tokens"] {
            assert!(!chat.0.contains_key(key), "{key}");
        }
        let r = wire::chat_request(&chat).unwrap();
        assert_eq!(r.options.max_tokens, Some(9));
    }

    #[test]
    fn what_a_node_cannot_do_is_a_400_naming_the_responses_parameter() {
        for (extra, param) in [
            (json!({"input": []}), "input"),
            (
                json!({"input": [{"type": "item_reference", "id": "x"}]}),
                "input[0]",
            ),
            (
                json!({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}),
                "input[0].content[0]",
            ),
            (
                json!({"input": [{"type": "function_call", "name": "f"}]}),
                "input[0].call_id",
            ),
            (
                json!({"input": "x", "previous_response_id": "resp_1"}),
                "previous_response_id",
            ),
            (json!({"input": "x", "background": true}), "background"),
            (json!({"input": "x", "messages": []}), "messages"),
            (json!({"input": "x", "max_tokens": 3}), "max_tokens"),
            (
                json!({"input": "x", "tools": [{"type": "file_search"}]}),
                "tools[0]",
            ),
            (
                json!({"input": "x", "tool_choice": {"type": "function"}}),
                "tool_choice",
            ),
            (
                json!({"input": "x", "text": {"format": {"type": "yaml"}}}),
                "text.format",
            ),
            (json!({"input": "x", "top_logprobs": 21}), "top_logprobs"),
        ] {
            let mut b = json!({"model": "m"});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = chat_body(&body(b)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
            assert_eq!(e.status, 400);
        }
        // The chat path's own checks come back in Responses names.
        let chat = chat_body(&body(json!({"model": "m", "input": "x",
            "text": {"format": {"type": "json_schema", "schema": {"type": "object"}}},
            "guided_regex": "a"})))
        .unwrap();
        let e = wire::chat_request(&chat).unwrap_err().renamed(&CHAT_NAMES);
        assert_eq!(e.param.as_deref(), Some("guided_regex"), "{}", e.message);
        assert_eq!(
            ApiError::bad_param("messages[2].content", "x")
                .renamed(&CHAT_NAMES)
                .param
                .as_deref(),
            Some("input[2].content")
        );
    }

    #[test]
    fn a_stream_numbers_its_events_and_ends_with_the_whole_response() {
        let mut r = Responder::new(0, "m".into(), Map::new(), false);
        let mut out = VecDeque::new();
        for c in [
            chunk("", "think", &[]),
            chunk("\n", "", &[]),
            chunk("", "", &[("f", "{}")]),
        ] {
            assert!(r.stream_event(
                Event::Chunk {
                    index: 0,
                    chunk: c,
                    prompt: None,
                },
                &mut out
            ));
        }
        let usage = Usage {
            prompt_tokens: 5,
            completion_tokens: 3,
            cached_tokens: 0,
        };
        let timings = Default::default();
        assert!(r.stream_event(
            Event::Done {
                index: 0,
                usage,
                timings
            },
            &mut out
        ));
        let events: Vec<Value> = out
            .iter()
            .map(|b| {
                let text = std::str::from_utf8(b).unwrap();
                let (head, data) = text.split_once("\ndata: ").unwrap();
                let e: Value = serde_json::from_str(data.trim()).unwrap();
                assert_eq!(head.strip_prefix("event: "), e["type"].as_str());
                e
            })
            .collect();
        let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "response.created",
                "response.in_progress",
                "response.output_item.added",
                "response.reasoning_text.delta",
                "response.reasoning_text.done",
                "response.output_item.done",
                "response.output_item.added",
                "response.function_call_arguments.delta",
                "response.function_call_arguments.done",
                "response.output_item.done",
                "response.completed",
            ]
        );
        for (n, e) in events.iter().enumerate() {
            assert_eq!(e["sequence_number"], n);
        }
        let whole = &events[10]["response"];
        assert_eq!(whole["status"], "completed");
        assert_eq!(whole["output"][1]["type"], "function_call");
        assert_eq!(whole["output"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            whole["usage"]["output_tokens_details"]["reasoning_tokens"],
            1
        );
    }
}
