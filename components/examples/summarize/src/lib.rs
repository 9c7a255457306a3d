//! An edge function in the `llm-app` world: it imports `wasmlm:llm/generation` and exports
//! `wasi:http/incoming-handler`. Composed with the llm component (`wasmlm compose`), it is one
//! component that imports only `wasi:nn` and WASI; `wasmlm serve --app /summarize=...` runs it.
//!
//! `POST /summarize` with any text as the body streams back the model's one-paragraph summary
//! as NDJSON while it is generated: `{"delta": "..."}` per chunk, then
//! `{"finish": "stop", "usage": {"prompt_tokens": N, "completion_tokens": M}}`.
//! Query parameters: `model` (default `smollm2`), `max_tokens` (default 96).
#![cfg(target_arch = "wasm32")]

mod llm {
    wit_bindgen::generate!({
        world: "llm-app",
        path: "../../../wit",
        generate_all,
    });
}

use llm::wasmlm::llm::generation::{self, CompletionStream};
use llm::wasmlm::llm::types::{ChatContext, Error, FinishReason, Message, Role, SamplingOptions};
use serde_json::json;
use wasip2::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

/// What the model is told to do with the posted text.
const INSTRUCTION: &str =
    "Summarize the user's text in one or two sentences. Answer with the summary only.";
/// Bodies above this are refused rather than read (the model's context is the real limit).
const MAX_BODY: u64 = 64 << 10;

struct Summarize;

impl wasip2::exports::http::incoming_handler::Guest for Summarize {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        if !matches!(request.method(), Method::Post) {
            return reply(out, 405, &json!({"error": "POST the text to summarize"}));
        }
        let query = request.path_with_query().unwrap_or_default();
        let model = param(&query, "model").unwrap_or_else(|| "smollm2".into());
        let max_tokens = match param(&query, "max_tokens").map(|v| v.parse::<u32>()) {
            None => 96,
            Some(Ok(n)) if n > 0 => n,
            Some(_) => {
                return reply(
                    out,
                    400,
                    &json!({"error": "max_tokens must be a positive integer"}),
                )
            }
        };
        let text = match read_body(&request) {
            Ok(t) if !t.trim().is_empty() => t,
            Ok(_) => {
                return reply(
                    out,
                    400,
                    &json!({"error": "the body is the text to summarize; it is empty"}),
                )
            }
            Err(e) => return reply(out, 400, &json!({"error": e})),
        };
        let messages = [
            message(Role::System, INSTRUCTION),
            message(Role::User, &text),
        ];
        let options = SamplingOptions {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ..no_options()
        };
        let context = ChatContext {
            tools_json: None,
            template_kwargs_json: None,
            tool_choice: None,
            parallel_tool_calls: None,
        };
        let stream = match generation::chat(&model, &messages, &context, &options) {
            Ok(s) => s,
            Err(e) => {
                let status = if matches!(e, Error::ModelNotFound(_)) {
                    404
                } else {
                    400
                };
                return reply(out, status, &json!({"error": describe(&e)}));
            }
        };
        stream_summary(out, &stream);
    }
}

/// Sends each chunk as it comes: the client reads the summary while the model writes it.
fn stream_summary(out: ResponseOutparam, stream: &CompletionStream) {
    let headers =
        Fields::from_list(&[("content-type".to_string(), b"application/x-ndjson".to_vec())])
            .expect("a valid header");
    let response = OutgoingResponse::new(headers);
    let Ok(body) = response.body() else { return };
    ResponseOutparam::set(out, Ok(response));
    let Ok(sink) = body.write() else { return };
    let send = |line: serde_json::Value| {
        let mut bytes = line.to_string().into_bytes();
        bytes.push(b'\n');
        // 4096 is the most one blocking write may take.
        bytes
            .chunks(4096)
            .all(|c| sink.blocking_write_and_flush(c).is_ok())
    };
    loop {
        match stream.next() {
            Ok(Some(chunk)) => {
                if !chunk.text.is_empty() && !send(json!({"delta": chunk.text})) {
                    // The client went away: stop generating.
                    stream.cancel();
                }
                if let Some(reason) = chunk.finish {
                    let u = stream.usage();
                    send(json!({
                        "finish": finish_name(reason),
                        "usage": {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens},
                    }));
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                send(json!({"error": describe(&e)}));
                break;
            }
        }
    }
    drop(sink);
    let _ = OutgoingBody::finish(body, None);
}

fn read_body(request: &IncomingRequest) -> Result<String, String> {
    let body = request
        .consume()
        .map_err(|()| "the body was already read".to_string())?;
    let stream = body
        .stream()
        .map_err(|()| "the body cannot be read".to_string())?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(16 << 10) {
            Ok(chunk) => {
                bytes.extend_from_slice(&chunk);
                if bytes.len() as u64 > MAX_BODY {
                    return Err(format!("the text is over {} KiB", MAX_BODY >> 10));
                }
            }
            Err(wasip2::io::streams::StreamError::Closed) => break,
            Err(e) => return Err(format!("reading the body: {e:?}")),
        }
    }
    String::from_utf8(bytes).map_err(|_| "the body is not UTF-8 text".to_string())
}

fn param(path_with_query: &str, name: &str) -> Option<String> {
    let query = path_with_query.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

fn reply(out: ResponseOutparam, status: u16, body: &serde_json::Value) {
    let headers = Fields::from_list(&[("content-type".to_string(), b"application/json".to_vec())])
        .expect("a valid header");
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(sink) = outgoing.write() {
        let _ = sink.blocking_write_and_flush(body.to_string().as_bytes());
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

fn message(role: Role, content: &str) -> Message {
    Message {
        role,
        content: content.to_string(),
        reasoning: None,
        tool_calls: Vec::new(),
        tool_call_id: None,
    }
}

fn no_options() -> SamplingOptions {
    SamplingOptions {
        max_tokens: None,
        temperature: None,
        top_k: None,
        top_p: None,
        min_p: None,
        repeat_penalty: None,
        repeat_last_n: None,
        presence_penalty: None,
        frequency_penalty: None,
        seed: None,
        stop: Vec::new(),
        stop_token_ids: Vec::new(),
        include_stop: None,
        top_logprobs: None,
        ignore_eos: None,
        choices: Vec::new(),
        logit_bias: Vec::new(),
        format: None,
        reasoning_budget: None,
    }
}

fn finish_name(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::ToolCalls => "tool_calls",
    }
}

fn describe(e: &Error) -> String {
    match e {
        Error::ModelNotFound(m) => format!("model not found: {m}"),
        Error::InvalidInput(m) => format!("invalid input: {m}"),
        Error::ContextOverflow(c) => format!(
            "the text has {} tokens; the model reads at most {}",
            c.prompt_tokens, c.context_length
        ),
        Error::UnsupportedModel(m) => format!("unsupported model: {m}"),
        Error::Backend(m) => format!("backend: {m}"),
    }
}

wasip2::http::proxy::export!(Summarize);
