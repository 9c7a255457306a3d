//! Anthropic's Messages API (`POST /v1/messages`, `POST /v1/messages/count_tokens`), which the
//! `anthropic` SDK and the tools built on it speak, as llama.cpp's server and vLLM serve it.
//!
//! As with the Responses API, a request is read into a chat request (`system` a system
//! message, `tool_use` blocks an assistant's tool calls, `tool_result` blocks tool messages,
//! `thinking` blocks reasoning) and runs the chat path; the answer comes back as content
//! blocks (`thinking`, `text`, `tool_use`). Errors take Anthropic's shape.

use std::collections::VecDeque;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Map, Value};

use super::api::{self, unique, StreamFormat};
use super::error::ApiError;
use super::items::{Item, Items, Step};
use super::node::Node;
use super::wire;
use super::worker::Event;
use crate::bindings::exports::wasmlm::llm::types::Usage;
use crate::bindings::exports::wasmlm::llm::types::{FinishReason, StopMatch};

/// Chat parameters and the Messages parameters they come from, for errors.
const CHAT_NAMES: [(&str, &str); 3] = [
    ("stop", "stop_sequences"),
    ("response_format", "output_config.format"),
    ("thinking_token_budget", "thinking.budget_tokens"),
];

/// `POST /v1/messages`.
pub async fn create(State(node): State<Arc<Node>>, headers: HeaderMap, body: Body) -> Response {
    match run(node, headers, body).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

/// `POST /v1/messages/count_tokens`: the prompt's tokens as the model's template renders it.
pub async fn count_tokens(State(node): State<Arc<Node>>, body: Body) -> Response {
    let count = async {
        let b = api::read_body(body).await?;
        let mut chat = chat_body(&b, false)?;
        let model = chat.string("model")?;
        chat.0.remove("max_tokens");
        api::count_chat_tokens(&node, &model, &chat).await
    };
    match count.await {
        Ok(n) => Json(json!({"input_tokens": n})).into_response(),
        Err(e) => error_response(e),
    }
}

/// An error as Anthropic writes it: `{"type": "error", "error": {"type", "message"}}`.
pub fn error_response(e: ApiError) -> Response {
    let kind = match e.status.as_u16() {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 => "overloaded_error",
        _ => "api_error",
    };
    let message = match &e.param {
        Some(p) if !e.message.contains(p.as_str()) => format!("{p}: {}", e.message),
        _ => e.message.clone(),
    };
    let mut res = (
        e.status,
        Json(json!({"type": "error", "error": {"type": kind, "message": message}})),
    )
        .into_response();
    if let Some(s) = e.retry_after {
        res.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    res
}

async fn run(node: Arc<Node>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let b = api::read_body(body).await?;
    let chat = chat_body(&b, true)?;
    let req = wire::chat_request(&chat).map_err(|e| e.renamed(&CHAT_NAMES))?;
    let started = api::start(&node, &headers, &req).await?;
    let mut out = Replier::new(req.model.clone());
    if req.stream {
        return Ok(api::sse(out, started.first, started.rx, started.in_flight));
    }
    out.items.collect(started.first, started.rx).await?;
    Ok(Json(out.message()).into_response())
}

/// The chat body a Messages body asks for; `temperature`, `top_p`, `top_k`, `stream` and
/// vLLM's extras pass through. `generating` false (counting tokens) lets `max_tokens` go.
fn chat_body(b: &wire::Body, generating: bool) -> Result<wire::Body, ApiError> {
    for key in ["mcp_servers", "container"] {
        if b.get(key)
            .is_some_and(|v| v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::bad_param(
                key,
                format!("'{key}' is not supported: this node runs no tools or containers."),
            ));
        }
    }
    if b.int_in("n", 1, 1).is_err() {
        return Err(ApiError::bad_param(
            "n",
            "The Messages API gives one answer a request: 'n' must be 1.",
        ));
    }
    let own = [
        "n",
        "system",
        "messages",
        "stop_sequences",
        "tools",
        "tool_choice",
        "thinking",
        "output_config",
        "output_format",
        "metadata",
        "service_tier",
        "context_management",
        "max_tokens",
    ];
    let mut chat: Map<String, Value> =
        b.0.iter()
            .filter(|(k, _)| !own.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    chat.insert("messages".into(), Value::Array(messages(b)?));
    if generating {
        if let Some(n) = b.int_in("max_tokens", 1, u32::MAX as i64)? {
            chat.insert("max_tokens".into(), json!(n));
        }
    }
    if let Some(stop) = b.get("stop_sequences") {
        chat.insert("stop".into(), stop.clone());
    }
    if let Some(tools) = tools(b)? {
        chat.insert("tools".into(), tools);
    }
    if let Some(choice) = tool_choice(b)? {
        chat.insert("tool_choice".into(), choice);
    }
    match b
        .get("tool_choice")
        .and_then(|c| c.get("disable_parallel_tool_use"))
    {
        None | Some(Value::Null) => {}
        Some(Value::Bool(off)) => {
            chat.insert("parallel_tool_calls".into(), json!(!off));
        }
        Some(_) => {
            return Err(ApiError::bad_param(
                "tool_choice.disable_parallel_tool_use",
                "'tool_choice.disable_parallel_tool_use' must be a boolean.",
            ))
        }
    }
    if let Some(format) = output_format(b)? {
        chat.insert("response_format".into(), format);
    }
    match b
        .get("thinking")
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
    {
        Some("enabled") => {
            thinking(&mut chat, true);
            // Anthropic's budget is a cap the generation enforces, as vLLM's is.
            if let Some(n) = b.get("thinking").and_then(|t| t.get("budget_tokens")) {
                chat.insert("thinking_token_budget".into(), n.clone());
            }
        }
        Some("disabled") => thinking(&mut chat, false),
        _ => {}
    }
    Ok(wire::Body(chat))
}

/// Sets the template's `enable_thinking` (Qwen3's switch), unless the body set it itself.
fn thinking(chat: &mut Map<String, Value>, on: bool) {
    let kwargs = chat
        .entry("chat_template_kwargs")
        .or_insert_with(|| json!({}));
    if let Some(k) = kwargs.as_object_mut() {
        k.entry("enable_thinking").or_insert(json!(on));
    }
}

/// The text of a `system` or `tool_result` content: a string or a list of text blocks.
fn block_text(v: &Value, at: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(blocks) => {
            let mut text = String::new();
            for (k, b) in blocks.iter().enumerate() {
                match (b.get("type").and_then(Value::as_str), b.get("text")) {
                    (Some("text"), Some(Value::String(t))) => text.push_str(t),
                    (t, _) => {
                        return Err(ApiError::bad_param(
                            &format!("{at}[{k}]"),
                            format!(
                                "Only text blocks are supported here, not {}.",
                                t.map_or("a block without a type".into(), |t| format!("'{t}'"))
                            ),
                        ))
                    }
                }
            }
            Ok(text)
        }
        _ => Err(ApiError::bad_param(
            at,
            "Content must be a string or a list of text blocks.",
        )),
    }
}

/// `system` and `messages` as chat messages: a user turn's `tool_result` blocks become tool
/// messages (before its text), an assistant turn's `tool_use` blocks its tool calls and its
/// `thinking` blocks its `reasoning_content`.
fn messages(b: &wire::Body) -> Result<Vec<Value>, ApiError> {
    let mut out = Vec::new();
    if let Some(system) = b.get("system") {
        out.push(json!({"role": "system", "content": block_text(system, "system")?}));
    }
    let list = b.list("messages")?;
    for (i, m) in list.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            _ => {
                return Err(ApiError::bad_param(
                    &format!("{at}.role"),
                    "A message's 'role' must be 'user' or 'assistant'.",
                ))
            }
        };
        let blocks = match m.get("content") {
            Some(Value::String(s)) => {
                out.push(json!({"role": role, "content": s}));
                continue;
            }
            Some(Value::Array(blocks)) => blocks,
            _ => {
                return Err(ApiError::bad_param(
                    &format!("{at}.content"),
                    "'content' must be a string or a list of content blocks.",
                ))
            }
        };
        let (mut text, mut reasoning, mut calls, mut results) =
            (String::new(), String::new(), Vec::new(), Vec::new());
        for (k, block) in blocks.iter().enumerate() {
            let here = format!("{at}.content[{k}]");
            let field = |key: &str| {
                block
                    .get(key)
                    .ok_or_else(|| ApiError::bad_param(&here, format!("This block needs '{key}'.")))
            };
            let str_field = |key: &str| {
                field(key)?
                    .as_str()
                    .map(String::from)
                    .ok_or_else(|| ApiError::bad_param(&here, format!("'{key}' must be a string.")))
            };
            match (block.get("type").and_then(Value::as_str), role) {
                (Some("text"), _) => text.push_str(&str_field("text")?),
                (Some("thinking"), "assistant") => reasoning.push_str(&str_field("thinking")?),
                (Some("redacted_thinking"), "assistant") => {}
                (Some("tool_use"), "assistant") => calls.push(json!({
                    "id": str_field("id")?,
                    "type": "function",
                    "function": {"name": str_field("name")?, "arguments": field("input")?.to_string()},
                })),
                (Some("tool_result"), "user") => {
                    let content = block_text(
                        block.get("content").unwrap_or(&Value::Null),
                        &format!("{here}.content"),
                    )?;
                    results.push(json!({
                        "role": "tool",
                        "tool_call_id": str_field("tool_use_id")?,
                        "content": content,
                    }));
                }
                (Some(t), _) => {
                    return Err(ApiError::bad_param(
                        &here,
                        format!(
                            "Content blocks of type '{t}' are not supported in a {role} message \
                             (text, and tool_result from the user or tool_use and thinking \
                             from the assistant)."
                        ),
                    ))
                }
                (None, _) => {
                    return Err(ApiError::bad_param(&here, "A content block needs a 'type'."))
                }
            }
        }
        let had_results = !results.is_empty();
        out.extend(results);
        if role == "assistant" {
            let mut m = json!({"role": "assistant", "content": text});
            if !reasoning.is_empty() {
                m["reasoning_content"] = json!(reasoning);
            }
            if !calls.is_empty() {
                m["tool_calls"] = json!(calls);
            }
            out.push(m);
        } else if !text.is_empty() || !had_results {
            out.push(json!({"role": "user", "content": text}));
        }
    }
    Ok(out)
}

/// Anthropic's tools (`name`, `description`, `input_schema`) as chat's function tools;
/// server tools (web search, code execution, ...) are refused.
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
            None | Some("custom") => {}
            Some(other) => {
                return Err(ApiError::bad_param(
                    &at,
                    format!(
                        "Tools of type '{other}' are not supported: this node runs no tools \
                         itself; declare client tools (name, description, input_schema)."
                    ),
                ))
            }
        }
        let Some(name) = t.get("name").and_then(Value::as_str) else {
            return Err(ApiError::bad_param(&at, "A tool needs a 'name'."));
        };
        let mut function = json!({"name": name});
        if let Some(d) = t.get("description").filter(|d| !d.is_null()) {
            function["description"] = d.clone();
        }
        if let Some(s) = t.get("input_schema").filter(|s| !s.is_null()) {
            function["parameters"] = s.clone();
        }
        out.push(json!({"type": "function", "function": function}));
    }
    Ok(Some(Value::Array(out)))
}

/// `tool_choice` `{"type": "auto" | "any" | "tool" | "none"}` as chat's.
fn tool_choice(b: &wire::Body) -> Result<Option<Value>, ApiError> {
    let Some(v) = b.get("tool_choice") else {
        return Ok(None);
    };
    match (v.get("type").and_then(Value::as_str), v.get("name")) {
        (Some("auto"), _) => Ok(Some(json!("auto"))),
        (Some("any"), _) => Ok(Some(json!("required"))),
        (Some("none"), _) => Ok(Some(json!("none"))),
        (Some("tool"), Some(Value::String(name))) => Ok(Some(
            json!({"type": "function", "function": {"name": name}}),
        )),
        _ => Err(ApiError::bad_param(
            "tool_choice",
            "'tool_choice' must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \
             \"none\"} or {\"type\": \"tool\", \"name\": ...}.",
        )),
    }
}

/// `output_config.format` (or the older top-level `output_format`), `{"type": "json_schema",
/// "schema"}`, as chat's `response_format`.
fn output_format(b: &wire::Body) -> Result<Option<Value>, ApiError> {
    let (key, format) = match (
        b.get("output_config")
            .and_then(|c| c.get("format"))
            .filter(|f| !f.is_null()),
        b.get("output_format"),
    ) {
        (Some(f), _) => ("output_config.format", f),
        (None, Some(f)) => ("output_format", f),
        (None, None) => return Ok(None),
    };
    match (
        format.get("type").and_then(Value::as_str),
        format.get("schema"),
    ) {
        (Some("json_schema"), Some(schema @ Value::Object(_))) => Ok(Some(json!({
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema},
        }))),
        _ => Err(ApiError::bad_param(
            key,
            format!("'{key}' must be {{\"type\": \"json_schema\", \"schema\": {{...}}}}."),
        )),
    }
}

/// Lays a generation out as a Message, whole or as stream events.
struct Replier {
    id: String,
    model: String,
    items: Items,
    started: bool,
    /// The counts once the prompt was computed, for `message_start`.
    prompt: Option<Usage>,
}

impl Replier {
    fn new(model: String) -> Self {
        Self {
            id: format!("msg_{}", unique()),
            model,
            items: Items::new(["thinking", "text", "toolu"], false),
            started: false,
            prompt: None,
        }
    }

    /// Content block `k` (a stream's start shows it empty).
    fn block(&self, k: usize, empty: bool) -> Value {
        let o = &self.items.output[k];
        match &o.item {
            Item::Reasoning(t) => json!({
                "type": "thinking", "thinking": if empty { "" } else { t }, "signature": "",
            }),
            Item::Text { text, .. } => {
                json!({"type": "text", "text": if empty { "" } else { text }})
            }
            Item::Call {
                name, arguments, ..
            } => {
                let input = if empty {
                    json!({})
                } else {
                    serde_json::from_str(arguments).unwrap_or_else(|_| json!({}))
                };
                json!({"type": "tool_use", "id": o.id, "name": name, "input": input})
            }
        }
    }

    /// `end_turn`, `max_tokens`, `tool_use` or `stop_sequence`.
    fn stop_reason(&self) -> Value {
        match self.items.finish {
            None => Value::Null,
            Some(FinishReason::Length) => json!("max_tokens"),
            Some(_) if self.has_call() => json!("tool_use"),
            Some(_) if matches!(self.items.stop_match, Some(StopMatch::Text(_))) => {
                json!("stop_sequence")
            }
            Some(_) => json!("end_turn"),
        }
    }

    /// The stop sequence that ended the message, else null.
    fn stop_sequence(&self) -> Value {
        match &self.items.stop_match {
            Some(StopMatch::Text(s)) => json!(s),
            _ => Value::Null,
        }
    }

    fn has_call(&self) -> bool {
        self.items
            .output
            .iter()
            .any(|o| matches!(o.item, Item::Call { .. }))
    }

    /// Anthropic's usage: `input_tokens` are those not read from the cache. Before the end,
    /// the prompt's counts (as Anthropic's `message_start` has them).
    fn usage(&self) -> Value {
        let u = self.items.usage.or(self.prompt);
        json!({
            "input_tokens": u.map_or(0, |u| u.prompt_tokens - u.cached_tokens.min(u.prompt_tokens)),
            "cache_read_input_tokens": u.map_or(0, |u| u.cached_tokens),
            "cache_creation_input_tokens": 0,
            "output_tokens": u.map_or(0, |u| u.completion_tokens),
        })
    }

    /// The Message object.
    fn message(&self) -> Value {
        let whole = self.items.usage.is_some();
        let mut m = json!({
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": (0..self.items.output.len())
                .filter(|_| whole)
                .map(|k| self.block(k, false))
                .collect::<Vec<_>>(),
            "stop_reason": self.stop_reason(),
            "stop_sequence": self.stop_sequence(),
            "usage": self.usage(),
        });
        if let Some(t) = &self.items.timings {
            m["timings"] = json!(t);
        }
        m
    }

    fn events(&self, steps: Vec<Step>) -> Vec<Value> {
        steps
            .into_iter()
            .map(|step| match step {
                Step::Added(k) => json!({
                    "type": "content_block_start", "index": k,
                    "content_block": self.block(k, true),
                }),
                Step::Delta(k, text, _) => {
                    let delta = match self.items.output[k].item {
                        Item::Reasoning(_) => json!({"type": "thinking_delta", "thinking": text}),
                        Item::Text { .. } => json!({"type": "text_delta", "text": text}),
                        Item::Call { .. } => {
                            json!({"type": "input_json_delta", "partial_json": text})
                        }
                    };
                    json!({"type": "content_block_delta", "index": k, "delta": delta})
                }
                Step::Done(k) => json!({"type": "content_block_stop", "index": k}),
            })
            .collect()
    }
}

fn send(events: Vec<Value>, out: &mut VecDeque<Bytes>) {
    out.extend(events.iter().map(api::typed_event));
}

impl StreamFormat for Replier {
    fn stream_event(&mut self, ev: Event, out: &mut VecDeque<Bytes>) -> bool {
        let mut events = Vec::new();
        if let Event::Chunk {
            prompt: Some(p), ..
        } = &ev
        {
            self.prompt.get_or_insert(*p);
        }
        if !self.started {
            self.started = true;
            events.push(json!({"type": "message_start", "message": self.message()}));
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
                events.push(json!({
                    "type": "message_delta",
                    "delta": {"stop_reason": self.stop_reason(), "stop_sequence": self.stop_sequence()},
                    "usage": self.usage(),
                    "timings": self.items.timings,
                }));
                events.push(json!({"type": "message_stop"}));
                true
            }
            Event::Error(e) => {
                events.push(json!({
                    "type": "error", "error": {"type": "api_error", "message": e.message},
                }));
                false
            }
        };
        send(events, out);
        go_on
    }

    fn stream_end(&mut self, out: &mut VecDeque<Bytes>) {
        if self.items.usage.is_none() {
            let e = json!({"type": "error", "error": {
                "type": "api_error", "message": "the generation ended unexpectedly"}});
            send(vec![e], out);
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
    fn blocks_become_the_chat_messages_a_template_expects() {
        let b = body(json!({
            "model": "m", "max_tokens": 9, "top_k": 5, "stop_sequences": ["\n\n"],
            "system": [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}],
            "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "thinking": {"type": "disabled"},
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [
                    {"type": "thinking", "thinking": "hm", "signature": ""},
                    {"type": "text", "text": "Let me look."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"x": 1}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t1",
                     "content": [{"type": "text", "text": "one"}]},
                    {"type": "text", "text": "And now?"},
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "t2", "name": "f", "input": {}},
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "t2", "content": "two"},
                ]},
            ],
        }));
        let chat = chat_body(&b, true).unwrap();
        let call = |id: &str, args: &str| json!({"id": id, "type": "function", "function": {"name": "f", "arguments": args}});
        assert_eq!(
            chat.0["messages"],
            json!([
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "Let me look.", "reasoning_content": "hm",
                 "tool_calls": [call("t1", "{\"x\":1}")]},
                {"role": "tool", "tool_call_id": "t1", "content": "one"},
                {"role": "user", "content": "And now?"},
                {"role": "assistant", "content": "", "tool_calls": [call("t2", "{}")]},
                {"role": "tool", "tool_call_id": "t2", "content": "two"},
            ])
        );
        assert_eq!(chat.0["stop"], json!(["\n\n"]));
        assert_eq!(chat.0["top_k"], 5);
        assert_eq!(chat.0["tool_choice"], "required");
        assert_eq!(chat.0["parallel_tool_calls"], false);
        let think = body(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                                "thinking": {"type": "enabled", "budget_tokens": 64}}),
        );
        let think = chat_body(&think, true).unwrap();
        assert_eq!(
            wire::chat_request(&think).unwrap().options.reasoning_budget,
            Some(64)
        );
        assert_eq!(
            chat.0["tools"][0]["function"]["parameters"],
            json!({"type": "object"})
        );
        assert_eq!(chat.0["chat_template_kwargs"]["enable_thinking"], false);
        let r = wire::chat_request(&chat).unwrap();
        assert_eq!(r.options.max_tokens, Some(9));
        // Counting tokens takes no `max_tokens`.
        assert!(!chat_body(&b, false).unwrap().0.contains_key("max_tokens"));
    }

    #[test]
    fn what_the_node_cannot_do_is_a_400_naming_the_field() {
        for (extra, param) in [
            (json!({"messages": []}), "messages"),
            (
                json!({"messages": [{"role": "system", "content": "x"}]}),
                "messages[0].role",
            ),
            (
                json!({"messages": [{"role": "user", "content": [{"type": "tool_use"}]}]}),
                "messages[0].content[0]",
            ),
            (
                json!({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]}),
                "messages[0].content[0]",
            ),
            (json!({"system": [{"type": "image"}]}), "system[0]"),
            (
                json!({"tools": [{"type": "bash_20250124", "name": "bash"}]}),
                "tools[0]",
            ),
            (json!({"tool_choice": {"type": "tool"}}), "tool_choice"),
            (
                json!({"output_config": {"format": {"type": "json_schema"}}}),
                "output_config.format",
            ),
            (json!({"mcp_servers": [{"url": "x"}]}), "mcp_servers"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"n": 2}), "n"),
        ] {
            let mut b = json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
            b.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let e = chat_body(&body(b), true).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}: {}", e.message);
        }
    }

    #[test]
    fn a_message_counts_cached_tokens_apart_and_says_why_it_stopped() {
        let mut r = Replier::new("m".into());
        r.items.record(&chunk("", "", &[("f", "{\"x\": 1}")]));
        let mut last = chunk("", "", &[]);
        last.finish = Some(FinishReason::ToolCalls);
        r.items.record(&last);
        r.items.finish(
            Usage {
                prompt_tokens: 30,
                completion_tokens: 7,
                cached_tokens: 20,
            },
            Default::default(),
        );
        let m = r.message();
        assert_eq!(m["content"][0]["type"], "tool_use");
        assert_eq!(m["content"][0]["input"], json!({"x": 1}));
        assert!(m["content"][0]["id"]
            .as_str()
            .unwrap()
            .starts_with("toolu_"));
        assert_eq!(m["stop_reason"], "tool_use");
        assert_eq!(
            m["usage"],
            json!({"input_tokens": 10, "cache_read_input_tokens": 20,
                   "cache_creation_input_tokens": 0, "output_tokens": 7})
        );
        // The chat path's checks come back in Messages names.
        let chat = chat_body(
            &body(
                json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
                         "stop_sequences": 5}),
            ),
            true,
        )
        .unwrap();
        let e = wire::chat_request(&chat).unwrap_err().renamed(&CHAT_NAMES);
        assert_eq!(e.param.as_deref(), Some("stop_sequences"), "{}", e.message);
        // Anthropic's error shape names the field in the message.
        let res = error_response(ApiError::bad_param("tools[0]", "No."));
        assert_eq!(res.status(), 400);
    }
}
