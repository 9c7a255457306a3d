//! A Spin app, as `spin new http-rust` would start it, that asks a model through Spin's `llm`
//! interface. Run by `wasmlm serve --app /ask=wasmlm_example_ask.wasm`, which serves the
//! `fermyon:spin/llm` import with the node's models.
//!
//! - `POST /ask` with `{"prompt": "...", "model": "smollm2"}` answers with `llm::infer`
//!   (Spin's default parameters); any of `max_tokens`, `temperature`, `top_k`, `top_p`,
//!   `repeat_penalty`, `repeat_penalty_last_n` switches to `llm::infer_with_options`.
//! - `POST /ask/embed` with `{"model": "all-minilm-l6-v2", "input": ["...", ...]}` answers
//!   with `llm::generate_embeddings`.
#![cfg(target_arch = "wasm32")]

use http_body_util::BodyExt;
use serde::Deserialize;
use serde_json::json;
use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_service;
use spin_sdk::llm::{self, InferencingModel, InferencingParams};

#[derive(Deserialize)]
struct Ask {
    prompt: String,
    #[serde(default = "default_model")]
    model: String,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
    top_k: Option<u32>,
    top_p: Option<f32>,
    repeat_penalty: Option<f32>,
    repeat_penalty_last_n: Option<u32>,
}

#[derive(Deserialize)]
struct Embed {
    model: String,
    input: Vec<String>,
}

fn default_model() -> String {
    "smollm2".into()
}

#[http_service]
async fn handle(req: Request) -> anyhow::Result<impl IntoResponse> {
    let path = req.uri().path().to_string();
    if req.method() != "POST" {
        return Ok(reply(405, json!({"error": "use POST"})));
    }
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| anyhow::anyhow!("reading the request body: {e:?}"))?
        .to_bytes();
    Ok(if path.ends_with("/embed") {
        embed(&body)
    } else {
        ask(&body)
    })
}

fn ask(body: &[u8]) -> Response<String> {
    let a: Ask = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(e) => return reply(400, json!({"error": format!("bad request: {e}")})),
    };
    let model = InferencingModel::Other(&a.model);
    let tuned = a.max_tokens.is_some()
        || a.temperature.is_some()
        || a.top_k.is_some()
        || a.top_p.is_some()
        || a.repeat_penalty.is_some()
        || a.repeat_penalty_last_n.is_some();
    let result = if tuned {
        // Spin's defaults for whatever is not given.
        let params = InferencingParams {
            max_tokens: a.max_tokens.unwrap_or(100),
            repeat_penalty: a.repeat_penalty.unwrap_or(1.1),
            repeat_penalty_last_n_token_count: a.repeat_penalty_last_n.unwrap_or(64),
            temperature: a.temperature.unwrap_or(0.8),
            top_k: a.top_k.unwrap_or(40),
            top_p: a.top_p.unwrap_or(0.9),
        };
        llm::infer_with_options(model, &a.prompt, params)
    } else {
        llm::infer(model, &a.prompt)
    };
    match result {
        Ok(r) => reply(
            200,
            json!({
                "text": r.text,
                "usage": {
                    "prompt_token_count": r.usage.prompt_token_count,
                    "generated_token_count": r.usage.generated_token_count,
                },
            }),
        ),
        Err(e) => llm_error(e),
    }
}

fn embed(body: &[u8]) -> Response<String> {
    let e: Embed = match serde_json::from_slice(body) {
        Ok(e) => e,
        Err(err) => return reply(400, json!({"error": format!("bad request: {err}")})),
    };
    match llm::generate_embeddings(llm::EmbeddingModel::Other(&e.model), &e.input) {
        Ok(r) => reply(
            200,
            json!({
                "embeddings": r.embeddings,
                "usage": {"prompt_token_count": r.usage.prompt_token_count},
            }),
        ),
        Err(err) => llm_error(err),
    }
}

fn llm_error(e: llm::Error) -> Response<String> {
    let (status, error) = match e {
        llm::Error::ModelNotSupported => (404, "model-not-supported".to_string()),
        llm::Error::InvalidInput(m) => (400, format!("invalid-input: {m}")),
        llm::Error::RuntimeError(m) => (500, format!("runtime-error: {m}")),
    };
    reply(status, json!({"error": error}))
}

fn reply(status: u16, body: serde_json::Value) -> Response<String> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(body.to_string())
        .expect("a status and a header always make a response")
}
